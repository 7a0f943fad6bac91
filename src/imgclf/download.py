"""download stage: fetch the raw dataset named by `data.dataset` into `data.raw_dir`.

    python -m imgclf.download --params params.yaml

digits comes from scikit-learn (no network); cifar10/cifar100 download the official archive, or copy
`data.archive`, checksum verified; imagefolder copies the archive at `data.path`, or packs the folder
there into one tar. The folder is filled under a temporary name and renamed when complete, so a failed
or partial download never leaves anything at `data.raw_dir`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from imgclf.config import DataConfig, stage_params
from imgclf.data.datasets import download as fetch
from imgclf.data.types import DataError
from imgclf.files import staged_dir


def download(cfg: DataConfig) -> Path:
    with staged_dir(cfg.raw_dir) as staging:
        fetch(cfg, staging)
    return Path(cfg.raw_dir)


def main(argv: list[str] | None = None) -> None:
    params = stage_params(argv, __doc__)
    try:
        out = download(params.data)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"download: {params.data.dataset} -> {out}")


if __name__ == "__main__":
    main()
