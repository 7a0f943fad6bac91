"""The README's pictures: small copies of the figures the evaluate stage drew (run `dvc repro` first).

    python docs/figures.py --from metrics/plots --out docs/figures

Each is scaled to at most WIDTH pixels across and reduced to a 128-colour palette, so that the committed
PNG files stay small (tens of kilobytes). The README shows those of the default pipeline (digits, LeNet).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

WIDTH = 560  # pixels
PICTURES = ("gradcam_wrong.png", "top_losses.png", "reliability.png", "confusion_normalized.png")


def shrink(source: Path, target: Path, width: int = WIDTH) -> None:
    with Image.open(source) as image:
        image = image.convert("RGB")
        if image.width > width:
            image = image.resize((width, round(image.height * width / image.width)), Image.Resampling.LANCZOS)
        target.parent.mkdir(parents=True, exist_ok=True)
        image.quantize(128).save(target, optimize=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", type=Path, default=Path("metrics/plots"))
    parser.add_argument("--out", type=Path, default=Path("docs/figures"))
    args = parser.parse_args(argv)
    missing = [name for name in PICTURES if not (args.source / name).is_file()]
    if missing:
        print(f"error: {args.source} lacks {', '.join(missing)}: run `dvc repro` first", file=sys.stderr)
        raise SystemExit(1)
    for name in PICTURES:
        shrink(args.source / name, args.out / name)
        print(f"{args.out / name}: {(args.out / name).stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
