"""Images in and out of the HTTP API: base64 PNGs carrying A1111's "parameters" chunk; uploads with size limits."""

from __future__ import annotations

import base64
import binascii
import io
import warnings

from ..infotext import PNG_KEY


class BadImage(ValueError):
    """An uploaded image that cannot be used (not base64, not an image, too large)."""


def png_bytes(image, parameters=None) -> bytes:
    """The PNG file of a PIL image, with ``parameters`` (infotext) in its "parameters" text chunk."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if parameters is not None:
        info.add_text(PNG_KEY, str(parameters))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def decode_b64(text: str, field: str) -> bytes:
    """Raw bytes from base64, with or without a ``data:image/...;base64,`` prefix (as A1111 accepts)."""
    if not isinstance(text, str) or not text:
        raise BadImage(f"{field}: expected a base64-encoded image, got {type(text).__name__}")
    if text.startswith("data:"):
        _, _, text = text.partition(",")
    try:
        return base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError):
        raise BadImage(f"{field}: not valid base64") from None


def open_image(data: bytes, field: str, max_pixels: int):
    """A loaded PIL image from file bytes; refuses more than ``max_pixels`` before decoding any pixel data."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise BadImage(f"{field}: image is {width}x{height} = {width * height} pixels; this server accepts "
                               f"at most {max_pixels} pixels per uploaded image")
            image.load()
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage(f"{field}: image too large to decode safely (decompression bomb refused)") from None
    except Exception as exc:  # PIL raises many types for bad files
        raise BadImage(f"{field}: not a readable image ({type(exc).__name__}: {exc})") from None
    return image


def image_from_b64(text: str, field: str, max_pixels: int):
    return open_image(decode_b64(text, field), field, max_pixels)
