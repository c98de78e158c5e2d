"""Image helpers the tutorials import from ``diffusers.utils``: ``load_image`` and ``make_image_grid``.

``from diffusekit.utils import load_image, make_image_grid`` behaves as diffusers' functions of the same names
(same arguments, same pixels). ``image_grid`` is the forgiving variant the command line uses (columns chosen for
you, a short last row allowed).
"""

from __future__ import annotations

import math
import os
from typing import Callable

__all__ = ["image_grid", "load_image", "make_image_grid"]

URL_TIMEOUT_S = 30  # diffusers' default request timeout


def load_image(image, convert_method: Callable | None = None):
    """A PIL image from a path, an ``http(s)://`` URL or a PIL image, EXIF-rotated and converted to RGB.

    ``convert_method(image) -> image`` replaces the RGB conversion, as in diffusers.
    """
    from PIL import Image, ImageOps

    if isinstance(image, (str, os.PathLike)):
        text = os.fspath(image)
        if text.startswith(("http://", "https://")):
            import io
            import urllib.request

            with urllib.request.urlopen(text, timeout=URL_TIMEOUT_S) as response:  # noqa: S310 (scheme checked)
                image = Image.open(io.BytesIO(response.read()))
        elif os.path.isfile(text):
            image = Image.open(text)
        else:
            raise ValueError(f"load_image: {text!r} is neither an http(s) URL nor an existing file")
    elif not isinstance(image, Image.Image):
        raise ValueError(f"load_image takes a path, an http(s) URL or a PIL image, got {type(image).__name__}")
    image = ImageOps.exif_transpose(image)
    return convert_method(image) if convert_method is not None else image.convert("RGB")


def make_image_grid(images, rows: int, cols: int, resize: int | None = None):
    """``rows`` x ``cols`` images (exactly that many) pasted into one RGB image; ``resize`` squares each first."""
    if len(images) != rows * cols:
        raise ValueError(f"make_image_grid: {len(images)} images do not fill {rows} rows x {cols} columns")
    if resize is not None:
        images = [image.resize((resize, resize)) for image in images]
    return _paste(images, cols)


def image_grid(images, columns: int | None = None):
    """Paste equally sized images into a grid of ``columns`` (default: about square); the last row may be short."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    return _paste(images, columns or math.ceil(math.sqrt(len(images))))


def _paste(images, columns: int):
    from PIL import Image

    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height))
    for i, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((i % columns) * width, (i // columns) * height))
    return grid
