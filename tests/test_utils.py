"""diffusekit.utils: load_image and make_image_grid as diffusers.utils has them (same pixels)."""

from __future__ import annotations

import http.server
import threading

import numpy as np
import pytest
from PIL import Image

from diffusekit.utils import image_grid, load_image, make_image_grid


def _images(n=6):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (8, 10, 3), dtype=np.uint8)) for _ in range(n)]


def test_make_image_grid_matches_diffusers():
    from diffusers.utils import make_image_grid as reference

    images = _images()
    for kwargs in ({"rows": 2, "cols": 3}, {"rows": 3, "cols": 2, "resize": 5}):
        ours, theirs = make_image_grid(images, **kwargs), reference(images, **kwargs)
        assert ours.size == theirs.size and ours.mode == theirs.mode
        assert np.array_equal(np.asarray(ours), np.asarray(theirs))
    with pytest.raises(ValueError, match="6 images do not fill 2 rows x 2 columns"):
        make_image_grid(images, rows=2, cols=2)
    assert image_grid(images[:5]).size == (30, 16)  # 3 columns, short last row


def test_load_image_path_and_pil_match_diffusers(tmp_path):
    from diffusers.utils import load_image as reference

    # a grey-level PNG with an EXIF rotation: both libraries transpose and convert to RGB
    image = Image.fromarray(np.arange(8 * 10, dtype=np.uint8).reshape(8, 10), "L")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees
    path = tmp_path / "a.jpg"
    image.save(path, exif=exif, quality=95)
    for source in (path, str(path), Image.open(path)):
        ours, theirs = load_image(source), reference(source if not isinstance(source, type(path)) else str(source))
        assert ours.mode == "RGB" and ours.size == theirs.size == (8, 10)
        assert np.array_equal(np.asarray(ours), np.asarray(theirs))
    assert load_image(path, convert_method=lambda im: im.convert("L")).mode == "L"
    with pytest.raises(ValueError, match="neither an http"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="got int"):
        load_image(3)


def test_load_image_from_a_url_on_loopback(tmp_path):
    _images(1)[0].save(tmp_path / "x.png")
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        image = load_image(f"http://127.0.0.1:{server.server_address[1]}/x.png")
        assert np.array_equal(np.asarray(image), np.asarray(_images(1)[0]))
    finally:
        server.shutdown()
        server.server_close()
