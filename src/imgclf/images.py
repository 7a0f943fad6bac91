"""Image decoding and resizing shared by prepare and serving, so both see identical pixels."""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

# Both prepare and serving resize with this filter; changing it changes what the model sees.
RESAMPLE = Image.Resampling.BILINEAR


class ImageError(ValueError):
    """Bytes that are not a readable image."""


class ImageTooLarge(ImageError):
    """An image over the pixel limit (from its header, before decoding)."""


def to_array(image: Image.Image, size: int, channels: int) -> np.ndarray:
    """Any Pillow image -> uint8 array (size, size, channels), converted and resized."""
    image = image.convert("L" if channels == 1 else "RGB")
    if image.size != (size, size):
        image = image.resize((size, size), RESAMPLE)
    array = np.asarray(image, dtype=np.uint8)
    return array.reshape(size, size, channels)


def dimensions(data: bytes, max_pixels: int | None = None) -> tuple[int, int]:
    """(width, height) of encoded image file bytes, from the file's header: no pixel is decoded.
    ImageTooLarge over `max_pixels`, ImageError for what Pillow cannot read."""
    with _reading(data, max_pixels), _open(data) as image:
        width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLarge(f"{width}x{height} is {width * height:,} pixels, over the limit of {max_pixels:,}")
    return width, height


def decode(data: bytes, size: int, channels: int, max_pixels: int | None = None) -> np.ndarray:
    """Encoded image file bytes (PNG, JPEG, anything Pillow reads) -> uint8 (size, size, channels).

    `max_pixels` is checked against the size in the file's header, before any pixel is decoded, so a
    decompression bomb (a small file that expands to a huge image) is refused without allocating it."""
    with _reading(data, max_pixels), _open(data) as image:
        width, height = image.size
        if max_pixels is not None and width * height > max_pixels:
            raise ImageTooLarge(f"{width}x{height} is {width * height:,} pixels, over the limit of {max_pixels:,}")
        image.load()
        return to_array(image, size, channels)


def _open(data: bytes) -> Image.Image:
    with warnings.catch_warnings():
        # Pillow warns of large images when it opens them; the limit the caller gives is what decides.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data))


@contextlib.contextmanager
def _reading(data: bytes, max_pixels: int | None) -> Iterator[None]:
    """Pillow's errors while reading `data` -> ImageError (ImageTooLarge for a decompression bomb)."""
    try:
        yield
    except ImageError:
        raise
    except Image.DecompressionBombError:  # Pillow's own backstop, checked when it opens the file
        limit = f"the limit of {max_pixels:,}" if max_pixels is not None else "Pillow's limit"
        raise ImageTooLarge(f"more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels, over {limit}") from None
    except UnidentifiedImageError:
        raise ImageError(f"not an image file Pillow can read ({len(data)} bytes)") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"cannot decode the image: {exc}") from None


def encode_png(array: np.ndarray) -> bytes:
    """uint8 (H, W, C) -> PNG bytes (lossless): how tests and examples send exact pixels."""
    image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
