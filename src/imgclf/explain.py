"""Grad-CAM overlays for any image a user has, from a registered model: where it looked, what it said.

    python -m imgclf.explain "models:/digits-lenet@champion" examples/digit-3.png --out explained/
    python -m imgclf.explain "models:/digits-lenet/2" photos/ --out explained/

Writes one PNG per image into --out (`<name>.png` for `<name>`, a folder's sub-folders kept): the picture
with the Grad-CAM map of the predicted class over it (imgclf.gradcam) and that class and its probability
above. Images are decoded and resized exactly as for serving; the probability is the served model's. A file
that is not an image, or a model URI with no model behind it, is an `error: ...` line and exit code 1
(the other images of a folder are still explained). Reads the same MLflow store as the pipeline
(MLFLOW_TRACKING_URI, else mlflow.db at the repository root).
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from imgclf.data.archives import hidden
from imgclf.files import write_bytes
from imgclf.gradcam import gradcam
from imgclf.models import predict_proba
from imgclf.plots import overlay_figure, png
from imgclf.serving import RequestError, load_registered

DISPLAY_SIDE = 512  # pixels: larger pictures are shown scaled down


def sources(source: Path) -> list[tuple[str, Path]]:
    """(name to write, file) for an image file, or for every file under a folder (sorted, hidden ones left out)."""
    if source.is_file():
        return [(source.name, source)]
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.is_file())
        return [(p.relative_to(source).as_posix(), p) for p in files if not hidden(p.relative_to(source).as_posix())]
    raise FileNotFoundError(f"{source}: no such file or folder")


def shown(data: bytes, channels: int) -> np.ndarray:
    """The picture as the user sees it (its own size, at most DISPLAY_SIDE per side), uint8 (H, W, C)."""
    with Image.open(io.BytesIO(data)) as image:
        image.thumbnail((DISPLAY_SIDE, DISPLAY_SIDE))
        array = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    return array.reshape(*array.shape[:2], channels)


def explain_file(model, data: bytes) -> tuple[bytes, str, float]:
    """One image file -> (overlay PNG, predicted class, its probability); RequestError when it is not an image."""
    pixels = model.decode_all([data])  # the limits and the decoding of the served model
    probs = predict_proba(model.model, pixels)[0]
    best = int(probs.argmax())
    cam = gradcam(model.model, pixels, np.array([best]))[0]
    name = model.card.classes[best]
    figure = overlay_figure(shown(data, model.card.channels), cam, f"predicted {name} ({probs[best]:.1%})")
    return png(figure), name, float(probs[best])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_uri", help='e.g. "models:/digits-lenet@champion" or "models:/digits-lenet/3"')
    parser.add_argument("source", type=Path, help="an image file, or a folder of them")
    parser.add_argument("--out", type=Path, required=True, help="the folder to write the overlays to")
    args = parser.parse_args(argv)
    try:
        files = sources(args.source)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    if not files:
        print(f"error: {args.source}: no files in the folder", file=sys.stderr)
        raise SystemExit(1)

    model = load_registered(args.model_uri)
    failed = 0
    for name, path in files:
        try:
            overlay, label, probability = explain_file(model, path.read_bytes())
        except RequestError as exc:
            print(f"error: {path}: {exc.message.removeprefix('input 0: ')}", file=sys.stderr)
            failed += 1
            continue
        write_bytes(args.out / f"{name}.png", overlay)
        print(f"explain: {name}: {label} ({probability:.1%}) -> {args.out / f'{name}.png'}")
    print(f"explain: {len(files) - failed} of {len(files)} files explained, overlays in {args.out}")
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
