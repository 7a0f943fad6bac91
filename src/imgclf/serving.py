"""The MLflow pyfunc that serves a checkpoint, and the guard that makes `mlflow models serve` safe.

Requests to `POST /invocations` (Content-Type: application/json):
  {"inputs": ["<base64 of an image file>", ...]}                       PNG, JPEG, anything Pillow reads
  {"inputs": {"array": "<base64 of raw bytes>", "shape": [N, H, W, C], "dtype": "uint8"}}
                                                                        pixels a client decoded itself
Each image is converted and resized exactly as the prepare stage did, and normalised inside the model.
The answer: {"predictions": [{"class", "index", "probability", "top_k": [...]}, ...]}, one per image.

Limits (bytes per request and per image, pixels per image and per request, images per request) come
from the `serve` section of params.yaml, stored with the model by the register stage, and are checked
before anything is decoded: pixels from the image headers, so a decompression bomb is refused without
being allocated. Decoding stops, between images, once nobody waits for the answer (ABANDONED, set by
the connection guard in connection.py: the client went away, or MLflow's request timeout answered).

MLflow's stock scoring server answers 500 to invalid base64, echoes the whole payload in its error
messages and reads bodies of any size. When `mlflow models serve` loads this model, `load_context`
therefore replaces the server's `invocations` handler with `guarded_invocations`: every bad input gets
a 4xx with a short message naming the input and the problem (no payload, no stack trace), and the
server keeps serving. Logged by the register stage as a "models from code" pyfunc (model_code.py): no
pickled Python objects, weights in safetensors.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import contextvars
import json
import logging
import os
import reprlib
import sys
import threading
from collections.abc import Iterator
from typing import Any

import mlflow
import numpy as np
import pydantic
from mlflow.exceptions import INVALID_PARAMETER_VALUE, MlflowException
from mlflow.pyfunc import scoring_server
from PIL import Image

from imgclf.config import ConfigError, ServeConfig, from_mapping
from imgclf.images import ImageError, ImageTooLarge, decode, dimensions, to_array
from imgclf.models import load_checkpoint, predict_proba
from imgclf.onnx_model import OnnxClassifier, load_onnx
from imgclf.tracking import StoreUnavailable, use_store

LIMITS_ARTIFACT = "serving.json"  # the `serve` section, as register stored it with the model
MAX_DIGITS = 18  # digits of a number in a request: more is no size or count we would accept
# Set per request by the connection guard (connection.py) when nobody waits for the answer any more.
ABANDONED: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar("abandoned", default=None)
_logger = logging.getLogger(__name__)
_served: ServeConfig | None = None  # the limits of the model `mlflow models serve` loaded (install_guard)


# What the model answers per image: the output schema MLflow records with it. (Created by name: "class"
# is a Python keyword, and MLflow names the fields as the model class does.)
TopClass = pydantic.create_model("TopClass", **{"class": (str, ...), "index": (int, ...), "probability": (float, ...)})
Prediction = pydantic.create_model(
    "Prediction",
    **{"class": (str, ...), "index": (int, ...), "probability": (float, ...), "top_k": (list[TopClass], ...)},
)


class _UnionHintNotice(logging.Filter):
    """Drops MLflow's notice that predict's input hint (bytes or str) is "any" to it: that is known, and
    ImageClassifier checks every input itself. Other records pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Union type hint is inferred as AnyType")


def quiet_union_hint_notice() -> None:
    """Install the filter once (model_code.py, which MLflow runs when it loads the model, and register)."""
    hints = logging.getLogger("mlflow.types.type_hints")
    if not any(isinstance(f, _UnionHintNotice) for f in hints.filters):
        hints.addFilter(_UnionHintNotice())


class RequestError(ValueError):
    """A bad request: HTTP status and a short message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def predictions(probs: np.ndarray, classes: list[str], top_k: int) -> list[dict[str, Any]]:
    """One dict per image: the most probable class, its index and probability, and the top k."""
    k = min(top_k, len(classes))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    out = []
    for row, best in zip(probs, order):
        top = [{"class": classes[i], "index": int(i), "probability": float(row[i])} for i in best]
        out.append({**top[0], "top_k": top})
    return out


def short(value: Any) -> str:
    """A few characters of a client's value, for an error message (never the payload)."""
    brief = reprlib.Repr()
    brief.maxlevel, brief.maxlist, brief.maxdict = 2, 5, 3
    brief.maxstring = brief.maxlong = brief.maxother = 24
    return brief.repr(value)


def bounded_int(text: str) -> int:
    """json's parse_int: refuses numbers of thousands of digits (which Python would parse, slowly, or
    refuse with ValueError past 4,300) before converting them."""
    digits = len(text.lstrip("-"))
    if digits > MAX_DIGITS:
        raise RequestError(400, f"a number in the request has {digits:,} digits, more than {MAX_DIGITS}")
    return int(text)


def decode_base64(text: Any, index: int, max_bytes: int) -> bytes:
    if not isinstance(text, str):
        raise RequestError(400, f"input {index}: expected a base64 string, got {type(text).__name__}")
    # MIME-style base64 breaks lines every 76 characters (Python's base64.encodebytes, MLflow's own
    # serving examples): line breaks and spaces are not data. (The body's size is already bounded.)
    text = "".join(text.split())
    if len(text) > (max_bytes + 2) // 3 * 4 + 4:  # the decoded size, known before decoding
        raise RequestError(413, f"input {index}: the image is over the limit of {max_bytes:,} bytes")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, f"input {index}: not valid base64") from None


def parse_request(body: bytes, content_type: str | None, limits: ServeConfig) -> list[bytes] | np.ndarray:
    """Validate a request body: image files (list of bytes) or pixel arrays (uint8 N, H, W, C)."""
    if (content_type or "").split(";")[0].strip().lower() != "application/json":
        raise RequestError(415, "send Content-Type: application/json")
    if len(body) > limits.max_request_bytes:
        raise RequestError(
            413, f"the request body is {len(body):,} bytes, over the limit of {limits.max_request_bytes:,}"
        )
    try:
        payload = json.loads(body, parse_int=bounded_int)
    except RequestError:
        raise
    except RecursionError:
        raise RequestError(400, "the request's JSON is nested too deeply") from None
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        raise RequestError(400, "the request body is not valid JSON") from None
    if not isinstance(payload, dict) or set(payload) != {"inputs"}:
        raise RequestError(
            400,
            'expected {"inputs": [<base64 image>, ...]} or '
            '{"inputs": {"array": <base64>, "shape": [N, H, W, C], "dtype": "uint8"}}',
        )
    inputs = payload["inputs"]
    if isinstance(inputs, dict):
        return parse_array(inputs, limits)
    if not isinstance(inputs, list):
        raise RequestError(400, "inputs must be a list of base64 image files or an array object")
    if not inputs:
        raise RequestError(400, "inputs is empty: send at least one image")
    if len(inputs) > limits.max_images:
        raise RequestError(413, f"{len(inputs)} images in one request, over the limit of {limits.max_images}")
    return [decode_base64(item, i, limits.max_image_bytes) for i, item in enumerate(inputs)]


def parse_array(inputs: dict, limits: ServeConfig) -> np.ndarray:
    if set(inputs) != {"array", "shape", "dtype"}:
        raise RequestError(400, 'an array input has exactly the keys "array", "shape" and "dtype"')
    if inputs["dtype"] != "uint8":
        raise RequestError(400, f"array dtype must be uint8, got {short(inputs['dtype'])}")
    shape = inputs["shape"]
    # type(d) is int: JSON's true and false are Python bools, which isinstance(d, int) lets through
    if not (isinstance(shape, list) and len(shape) == 4 and all(type(d) is int and d > 0 for d in shape)):
        raise RequestError(400, f"array shape must be [N, H, W, C] of positive integers, got {short(shape)}")
    n, h, w, c = shape
    if c not in (1, 3, 4):
        raise RequestError(400, f"array shape {shape}: C must be 1 (gray), 3 (RGB) or 4 (RGBA)")
    if n > limits.max_images:
        raise RequestError(413, f"{n} images in one request, over the limit of {limits.max_images}")
    if h * w > limits.max_image_pixels:
        raise RequestError(
            413, f"array shape {shape}: {h * w:,} pixels per image, over the limit of {limits.max_image_pixels:,}"
        )
    if n * h * w > limits.max_request_pixels:
        raise RequestError(
            413,
            f"array shape {shape}: {n * h * w:,} pixels, over the limit of {limits.max_request_pixels:,} per request",
        )
    raw = decode_base64(inputs["array"], 0, n * h * w * c)
    if len(raw) != n * h * w * c:
        raise RequestError(400, f"array holds {len(raw):,} bytes, but shape {shape} needs {n * h * w * c:,}")
    return np.frombuffer(raw, dtype=np.uint8).reshape(n, h, w, c)


@contextlib.contextmanager
def image_errors(index: int) -> Iterator[None]:
    """ImageError while reading input `index` -> RequestError naming it (413 over a limit, else 400)."""
    try:
        yield
    except ImageTooLarge as exc:
        raise RequestError(413, f"input {index}: {exc}") from None
    except ImageError as exc:
        raise RequestError(400, f"input {index}: {exc}") from None


def stop_if_abandoned(where: str) -> None:
    """RequestError (503) once nobody waits for this request's answer: the work is stopped, not finished."""
    abandoned = ABANDONED.get()
    if abandoned is not None and abandoned.is_set():
        _logger.warning("request abandoned (client gone or timed out): stopped at %s", where)
        raise RequestError(503, f"the request was abandoned; stopped at {where}")


# MLflow reads predict's type hints, and logs the notice, when the class below is defined: whoever
# imports this module (predict, export, lineage, register, the served model) would print it, so the
# filter goes in first. It drops that one notice and nothing else.
quiet_union_hint_notice()


class ImageClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        if "onnx" in context.artifacts:  # a compressed model (imgclf.compress), run by onnxruntime
            self.model, self.card = load_onnx(context.artifacts["onnx"], context.artifacts["card"])
        else:
            self.model, self.card = load_checkpoint(context.artifacts["weights"], context.artifacts["card"])
        path = context.artifacts["serving"]
        try:
            self.limits = from_mapping(ServeConfig, json.loads(open(path).read()), prefix="serve.")
        except ConfigError as exc:
            raise MlflowException(f"{path} ({LIMITS_ARTIFACT}): {exc}") from None
        # One forward pass at a time, using every core: concurrent ones would oversubscribe the CPU.
        self.lock = threading.Lock()
        if os.environ.get(scoring_server._SERVER_MODEL_PATH):  # loaded by `mlflow models serve`
            install_guard(self.limits)

    def decode_all(self, files: list[bytes], first_index: int = 0) -> np.ndarray:
        """Image files -> uint8 (N, size, size, channels); RequestError naming the first bad one. Every
        header is read, and the pixels counted against the limits, before any image is decoded."""
        size, channels, limits = self.card.image_size, self.card.channels, self.limits
        total = 0
        for i, data in enumerate(files, start=first_index):
            if len(data) > limits.max_image_bytes:
                raise RequestError(413, f"input {i}: {len(data):,} bytes, over the limit of {limits.max_image_bytes:,}")
            with image_errors(i):
                width, height = dimensions(data, limits.max_image_pixels)
            total += width * height
            if total > limits.max_request_pixels:
                raise RequestError(
                    413,
                    f"inputs {first_index}-{i}: {total:,} pixels, over the limit of {limits.max_request_pixels:,} "
                    "per request",
                )
        arrays = []
        for i, data in enumerate(files, start=first_index):
            stop_if_abandoned(f"input {i} of {first_index + len(files)}")
            with image_errors(i):
                arrays.append(decode(data, size, channels, limits.max_image_pixels))
        return np.stack(arrays) if arrays else np.zeros((0, size, size, channels), np.uint8)

    def conform(self, pixels: np.ndarray) -> np.ndarray:
        """Client-decoded uint8 (N, H, W, C) -> the model's size and channels, as prepare does."""
        size, channels = self.card.image_size, self.card.channels
        if pixels.shape[1:] == (size, size, channels):
            return pixels
        modes = {1: "L", 3: "RGB", 4: "RGBA"}
        return np.stack(
            [
                to_array(Image.fromarray(p[..., 0] if p.shape[-1] == 1 else p, modes[p.shape[-1]]), size, channels)
                for p in pixels
            ]
        )

    def classify(self, pixels: np.ndarray) -> list[dict[str, Any]]:
        stop_if_abandoned("classifying")
        with self.lock:
            if isinstance(self.model, OnnxClassifier):
                probs = self.model.predict_proba(pixels)
            else:
                probs = predict_proba(self.model, pixels)
        return predictions(probs, list(self.card.classes), self.limits.top_k)

    def pixels_of(self, item: Any, index: int) -> np.ndarray:
        """One image as the HTTP API takes it, for Python callers: an image file's bytes, its base64 text,
        or uint8 pixels (H, W) or (H, W, C) -> uint8 (size, size, channels)."""
        if isinstance(item, str):
            item = decode_base64(item, index, self.limits.max_image_bytes)
        if isinstance(item, (bytes, bytearray)):
            return self.decode_all([bytes(item)], first_index=index)[0]
        if isinstance(item, np.ndarray):
            array = item[..., None] if item.ndim == 2 else item
            if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
                raise RequestError(
                    400,
                    f"input {index}: an array must be uint8 (H, W) or (H, W, C) with C 1, 3 "
                    f"or 4, got {item.dtype} {item.shape}",
                )
            if array.shape[0] * array.shape[1] > self.limits.max_image_pixels:
                raise RequestError(
                    413,
                    f"input {index}: {array.shape[0] * array.shape[1]:,} pixels, over the "
                    f"limit of {self.limits.max_image_pixels:,}",
                )
            return self.conform(array[None])[0]
        raise RequestError(
            400, f"input {index}: expected image file bytes, base64 text or a uint8 array, got {type(item).__name__}"
        )

    # The type hints are MLflow's signature: any mix of the kinds pixels_of takes in (MLflow cannot say
    # "bytes, str or array" more precisely than "any"), one Prediction per image out.
    def predict(self, model_input: list[bytes | str], params: dict[str, Any] | None = None) -> list[Prediction]:
        """Images in, as the HTTP API takes them (see pixels_of); one prediction per image out. In
        process: the served model goes through the guard, with the same checks and limits."""
        if len(model_input) > self.limits.max_images:
            raise MlflowException(
                f"{len(model_input)} images, over the limit of {self.limits.max_images}",
                error_code=INVALID_PARAMETER_VALUE,
            )
        try:
            return self.classify(np.stack([self.pixels_of(item, i) for i, item in enumerate(model_input)]))
        except RequestError as exc:
            raise MlflowException(exc.message, error_code=INVALID_PARAMETER_VALUE) from None


def load_registered(model_uri: str) -> ImageClassifier:
    """The image classifier behind a model URI (`models:/<name>@champion`, ...), for the command-line
    tools; SystemExit(1) saying why when there is none."""
    try:
        use_store()
        model = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
    except (MlflowException, StoreUnavailable, OSError) as exc:
        print(f"error: cannot load {model_uri}: {getattr(exc, 'message', exc)}", file=sys.stderr)
        raise SystemExit(1) from None
    if not isinstance(model, ImageClassifier):
        print(f"error: {model_uri} is not an image classifier of this project", file=sys.stderr)
        raise SystemExit(1)
    return model


def guarded_invocations(data: bytes, content_type: str | None, model, input_schema):
    """Stands in for mlflow.pyfunc.scoring_server.invocations when it serves an ImageClassifier."""
    python_model = model.unwrap_python_model()
    try:
        inputs = parse_request(data, content_type, python_model.limits)
        pixels = python_model.conform(inputs) if isinstance(inputs, np.ndarray) else python_model.decode_all(inputs)
        body, status = {"predictions": python_model.classify(pixels)}, 200
    except RequestError as exc:
        code = {413: "RESOURCE_EXHAUSTED", 503: "CANCELLED"}.get(exc.status, "INVALID_PARAMETER_VALUE")
        body, status = {"error_code": code, "message": exc.message}, exc.status
    return scoring_server.InvocationsResponse(response=json.dumps(body), status=status, mimetype="application/json")


def install_guard(limits: ServeConfig) -> None:
    """Route the scoring server's requests through `guarded_invocations`. The server looks the
    handler up by name on each request, so replacing it while the model loads takes effect; it
    serves this one model only, whose limits the connection guard reads (served_limits)."""
    global _served
    scoring_server.invocations = guarded_invocations
    _served = limits
    if "imgclf.connection" not in sys.modules:  # uvicorn imports its protocol class before the app
        _logger.warning(
            "serving without the connection guard (no body limit before reading, no header deadline): "
            "start with UVICORN_HTTP=imgclf.connection:GuardedH11Protocol in the environment"
        )


def served_limits() -> ServeConfig | None:
    """The limits of the model this `mlflow models serve` process serves; None for another model."""
    return _served
