"""A classifier as an ONNX graph run by onnxruntime: how the int8 model (imgclf.compress) is evaluated,
served and exported, in place of the PyTorch module.

The graph is the one imgclf.export writes: uint8 images (N, C, H, W) in 0..255 in, class probabilities
(N, classes) out, normalisation and test-time augmentation inside.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime

from imgclf.card import ModelCard

INPUT = "images"
# The compress stage's output folder (compress.model_dir), as the register stage reads it.
COMPRESSED_FILE = "compressed.json"  # {"method", "val_accuracy", "test_accuracy"}
GRAPH_FILE = "model.onnx"
SUFFIX = {"int8": "int8", "prune": "pruned"}  # the compressed model is registered as <name>-<suffix>


class OnnxClassifier:
    def __init__(self, graph: bytes | str | Path, num_classes: int, threads: int = 0) -> None:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads  # 0: onnxruntime's default, one per physical core
        options.log_severity_level = 3  # errors only: no notices about unused initializers
        self.graph = graph if isinstance(graph, bytes) else Path(graph).read_bytes()
        self.session = onnxruntime.InferenceSession(self.graph, options, providers=["CPUExecutionProvider"])
        self.num_classes = num_classes

    def predict_proba(self, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
        """uint8 (N, H, W, C) -> float32 class probabilities (N, classes), as models.predict_proba."""
        out = []
        for start in range(0, len(images), batch_size):
            batch = np.ascontiguousarray(np.asarray(images[start : start + batch_size], np.uint8).transpose(0, 3, 1, 2))
            out.append(self.session.run(None, {INPUT: batch})[0])
        return np.concatenate(out) if out else np.zeros((0, self.num_classes), np.float32)


def load_onnx(graph: str | Path, card_path: str | Path) -> tuple[OnnxClassifier, ModelCard]:
    """The counterpart of models.load_checkpoint for an ONNX graph and the card it was made from."""
    card = ModelCard.read(card_path)
    return OnnxClassifier(graph, card.num_classes), card
