"""Export a registered model to ONNX and check it under onnxruntime against PyTorch.

    python -m imgclf.export "models:/digits-lenet@champion" --out model.onnx

The ONNX graph takes uint8 images (N, C, H, W) in 0..255 at the model's size and returns class
probabilities (N, classes): normalisation (and test-time flips, when the model uses them) are inside, as
in serving. After writing, it runs the same batch through onnxruntime and PyTorch and prints the
largest absolute difference between their probabilities; over `--tolerance` it fails and keeps no file.
Class names and preprocessing go in the ONNX metadata.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
from torch import nn

from imgclf.card import ModelCard
from imgclf.files import write_bytes
from imgclf.models import Classifier
from imgclf.serving import load_registered


class Probabilities(nn.Module):
    def __init__(self, model: Classifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(images).float(), dim=1)


def export(model: Classifier, card: ModelCard, out: Path, batch: np.ndarray, tolerance: float = 1e-4) -> float:
    """Write `out` and return the max abs difference of onnxruntime's probabilities from PyTorch's."""
    module = Probabilities(model.cpu()).eval()
    example = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).contiguous()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        program = torch.onnx.export(
            module,
            (example,),
            input_names=["images"],
            output_names=["probabilities"],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
            dynamo=True,
            verbose=False,
        )
        program.save(str(path))
        graph = onnx.load(str(path))
        for key in ("classes", "image_size", "channels", "mean", "std", "tta_flip", "tta_translate"):
            entry = graph.metadata_props.add()
            entry.key, entry.value = key, json.dumps(card.to_dict()[key])
        data = graph.SerializeToString()
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"images": example.numpy()})
    with torch.inference_mode():
        expected = module(example).numpy()
    difference = float(np.abs(got - expected).max())
    if difference > tolerance:
        raise ValueError(f"onnxruntime differs from PyTorch by {difference:.3g} (tolerance {tolerance:g})")
    write_bytes(out, data)
    return difference


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_uri", help='e.g. "models:/digits-lenet@champion"')
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest accepted difference")
    args = parser.parse_args(argv)

    python_model = load_registered(args.model_uri)
    card = python_model.card
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (8, card.image_size, card.image_size, card.channels), dtype=np.uint8)
    try:
        difference = export(python_model.model, card, args.out, batch, args.tolerance)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    print(
        f"export: {args.model_uri} -> {args.out}; onnxruntime vs PyTorch, max abs difference of the "
        f"probabilities on 8 images: {difference:.2e}"
    )


if __name__ == "__main__":
    main()
