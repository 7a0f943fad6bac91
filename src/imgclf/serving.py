"""The MLflow pyfunc that serves a checkpoint: image files in, class predictions out.

`mlflow models serve` decodes the base64 strings of `{"inputs": ["<base64 image file>", ...]}` into
bytes (the `list[bytes]` type hint asks for that); each image is decoded with Pillow and resized exactly
as the prepare stage did, and the model normalises it as in training. Logged by the register stage as a
"models from code" pyfunc (see model_code.py): no pickled Python objects, weights in safetensors.
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
from mlflow.exceptions import INVALID_PARAMETER_VALUE, MlflowException

from imgclf.images import ImageError, decode
from imgclf.models import load_checkpoint, predict_proba


def predictions(probs: np.ndarray, classes: list[str]) -> list[dict[str, Any]]:
    """One dict per image: the most probable class, its index and its probability."""
    best = probs.argmax(1)
    return [{"class": classes[k], "index": int(k), "probability": float(row[k])} for k, row in zip(best, probs)]


class ImageClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.model, self.meta = load_checkpoint(context.artifacts["weights"], context.artifacts["meta"])

    def predict(self, model_input: list[bytes], params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        size, channels = self.meta["image_size"], self.meta["channels"]
        arrays = []
        for i, data in enumerate(model_input):
            try:
                arrays.append(decode(data, size, channels))
            except ImageError as exc:
                # INVALID_PARAMETER_VALUE makes the scoring server answer 400 instead of 500.
                raise MlflowException(f"input {i}: {exc}", error_code=INVALID_PARAMETER_VALUE) from None
        if not arrays:
            return []
        probs = predict_proba(self.model, np.stack(arrays))
        return predictions(probs, self.meta["classes"])
