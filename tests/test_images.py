"""Decoding: any format, mode and size becomes the model's input shape; bad bytes are refused."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from imgclf.images import ImageError, ImageTooLarge, decode, dimensions, encode_png, to_array


def encoded(mode: str, size: tuple[int, int], fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color=128 if mode in ("L", "P", "I;16") else (120,) * len(mode)).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "mode, size, fmt",
    [
        ("RGB", (50, 20), "JPEG"),
        ("L", (8, 8), "PNG"),
        ("RGBA", (64, 64), "PNG"),
        ("P", (31, 33), "GIF"),
        ("I;16", (40, 40), "PNG"),
        ("RGB", (32, 32), "BMP"),
    ],
)
@pytest.mark.parametrize("channels", [1, 3])
def test_any_image_becomes_the_model_shape(mode, size, fmt, channels):
    array = decode(encoded(mode, size, fmt), 32, channels)
    assert array.shape == (32, 32, channels) and array.dtype == np.uint8


def test_png_round_trip_is_exact():
    array = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(decode(encode_png(array), 32, 3), array)
    gray = array[..., :1]
    np.testing.assert_array_equal(decode(encode_png(gray), 32, 1), gray)


def test_decode_matches_the_prepare_path():
    array = np.random.default_rng(1).integers(0, 256, (8, 8, 1), dtype=np.uint8)
    expected = to_array(Image.fromarray(array[..., 0]), 32, 1)
    np.testing.assert_array_equal(decode(encode_png(array), 32, 1), expected)


@pytest.mark.parametrize(
    "data", [b"", b"not an image at all", encoded("RGB", (64, 64), "JPEG")[:200], encoded("RGB", (64, 64), "PNG")[:60]]
)
def test_bad_bytes_raise_image_error(data):
    with pytest.raises(ImageError):
        decode(data, 32, 3)


def test_dimensions_come_from_the_header_and_refuse_over_the_limit():
    data = encoded("L", (300, 200), "PNG")
    assert dimensions(data) == (300, 200)
    with pytest.raises(ImageTooLarge, match="300x200 is 60,000 pixels, over the limit of 59,999"):
        dimensions(data, max_pixels=59_999)
    with pytest.raises(ImageError, match="not an image file"):
        dimensions(b"not an image")
