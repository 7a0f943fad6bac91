"""Image decoding and resizing shared by prepare and serving, so both see identical pixels."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

# Both prepare and serving resize with this filter; changing it changes what the model sees.
RESAMPLE = Image.Resampling.BILINEAR


class ImageError(ValueError):
    """Bytes that are not a readable image."""


def to_array(image: Image.Image, size: int, channels: int) -> np.ndarray:
    """Any Pillow image -> uint8 array (size, size, channels), converted and resized."""
    image = image.convert("L" if channels == 1 else "RGB")
    if image.size != (size, size):
        image = image.resize((size, size), RESAMPLE)
    array = np.asarray(image, dtype=np.uint8)
    return array.reshape(size, size, channels)


def decode(data: bytes, size: int, channels: int) -> np.ndarray:
    """Encoded image file bytes (PNG, JPEG, anything Pillow reads) -> uint8 (size, size, channels)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return to_array(image, size, channels)
    except UnidentifiedImageError:
        raise ImageError(f"not an image file Pillow can read ({len(data)} bytes)") from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"cannot decode the image: {exc}") from None


def encode_png(array: np.ndarray) -> bytes:
    """uint8 (H, W, C) -> PNG bytes (lossless): how tests and examples send exact pixels."""
    image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
