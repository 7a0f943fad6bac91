"""download stage: fetch the raw dataset named by `data.dataset` into `data.raw_dir`.

    python -m imgclf.download --params params.yaml

The folder is filled under a temporary name and renamed when complete, so a failed download never
leaves a partial `data.raw_dir` behind.
"""

from __future__ import annotations

from pathlib import Path

from imgclf.config import DataConfig, stage_params
from imgclf.datasets import DATASETS
from imgclf.files import staged_dir


def download(cfg: DataConfig) -> Path:
    with staged_dir(cfg.raw_dir) as staging:
        DATASETS[cfg.dataset].download(staging)
    return Path(cfg.raw_dir)


def main(argv: list[str] | None = None) -> None:
    params = stage_params(argv, __doc__)
    out = download(params.data)
    print(f"download: {params.data.dataset} -> {out}")


if __name__ == "__main__":
    main()
