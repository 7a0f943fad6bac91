"""Export a registered model to ONNX and check it under onnxruntime against PyTorch.

    python -m imgclf.export "models:/digits-lenet@champion" --out model.onnx

The ONNX graph takes uint8 images (N, C, H, W) in 0..255 at the model's size and returns class
probabilities (N, classes): normalisation (and test-time flips, when the model uses them) are inside, as
in serving. After writing, it runs the same batch through onnxruntime and PyTorch and prints the
largest absolute difference between their probabilities; over `--tolerance` it fails and keeps no file.
Class names and preprocessing go in the ONNX metadata. A compressed model (`models:/digits-lenet-int8@champion`,
imgclf.compress) is already an ONNX graph of that form: it is written as registered.
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
from torch.nn import functional as F

from imgclf.card import ModelCard
from imgclf.files import write_bytes
from imgclf.models import Classifier
from imgclf.onnx_model import OnnxClassifier
from imgclf.serving import load_registered

# The card fields the ONNX metadata carries.
METADATA = ("classes", "image_size", "channels", "mean", "std", "tta_flip", "tta_translate")


class Probabilities(nn.Module):
    def __init__(self, model: Classifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The classifier's eval-mode forward (models.Classifier) with its test-time views stacked into one
        batch: the graph then holds the network once, not once per view, and a quantizer that gives each
        convolution node its own copy of the weights keeps one copy."""
        model = self.model
        x = model.normalise(images)
        views, weights = [x], [1.0]
        if model.tta_translate:
            p = model.tta_translate
            h, w = x.shape[2:]
            padded = F.pad(x, (p, p, p, p), mode="reflect")
            views, weights = [x, padded[:, :, :h, :w], padded[:, :, 2 * p :, 2 * p :]], [0.5, 0.25, 0.25]
        if model.tta_flip:
            views, weights = views + [v.flip(3) for v in views], [wt / 2 for wt in weights] * 2
        logits = model.net(torch.cat(views)).float().unflatten(0, (len(views), -1))
        combined = sum(wt * logits[i] for i, wt in enumerate(weights))
        return torch.softmax(combined, dim=1)


def to_onnx(model: Classifier, card: ModelCard, example: torch.Tensor) -> bytes:
    """The ONNX graph of the classifier (uint8 NCHW in, probabilities out, any batch size), with the card's
    class names and preprocessing in its metadata."""
    module = Probabilities(model.cpu()).eval()
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
    add_metadata(graph, card)
    return graph.SerializeToString()


def add_metadata(graph: onnx.ModelProto, card: ModelCard) -> None:
    for key in METADATA:
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, json.dumps(card.to_dict()[key])


def nchw(batch: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) -> the graph's input, uint8 (N, C, H, W)."""
    return torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).contiguous()


def export(model: Classifier, card: ModelCard, out: Path, batch: np.ndarray, tolerance: float = 1e-4) -> float:
    """Write `out` and return the max abs difference of onnxruntime's probabilities from PyTorch's."""
    example = nchw(batch)
    data = to_onnx(model, card, example)
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"images": example.numpy()})
    with torch.inference_mode():
        expected = Probabilities(model.cpu()).eval()(example).numpy()
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
    if isinstance(python_model.model, OnnxClassifier):  # a compressed model: already the graph to export
        probs = python_model.model.predict_proba(batch)
        write_bytes(args.out, python_model.model.graph)
        print(
            f"export: {args.model_uri} -> {args.out} (its ONNX graph as registered); onnxruntime ran it on 8 "
            f"images, probabilities summing to 1 within {float(np.abs(probs.sum(1) - 1).max()):.2e}"
        )
        return
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
