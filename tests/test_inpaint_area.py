"""A1111's "Only masked" inpainting helpers (diffusekit.inpaint_area) against A1111's documented examples and
hand-worked cases: the crop region, its widening to the working aspect ratio, the resize modes, the paste back."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from diffusekit.inpaint_area import (crop_region, expand_crop_region, only_masked_padding, paste_back,
                                     resize_image)


def test_crop_region_and_its_widening():
    mask = Image.new("L", (64, 48), 0)
    ImageDraw.Draw(mask).rectangle((10, 20, 19, 23), fill=1)  # any non-zero grey counts
    assert crop_region(mask) == (10, 20, 20, 24)
    assert crop_region(mask, 3) == (7, 17, 23, 27)
    assert crop_region(mask, 30) == (0, 0, 50, 48)  # clipped to the image
    assert crop_region(Image.new("L", (8, 8), 0), 4) is None  # blank: nothing to crop
    # A1111's docstring: a 128x32 region processed at 512x512 becomes 128x128
    assert expand_crop_region((100, 200, 228, 232), 512, 512, 1024, 1024) == (100, 152, 228, 280)
    # widened past the right edge: shifted back inside
    assert expand_crop_region((41, 21, 64, 48), 48, 32, 64, 48) == (24, 21, 64, 48)
    # taller than wide at 3:2, 20 more pixels than the image: cut at the image's edges
    assert expand_crop_region((0, 0, 10, 40), 3, 2, 50, 40) == (0, 0, 50, 40)


def test_resize_modes():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (10, 40, 3), dtype=np.uint8), "RGB")  # 40 x 10
    just = resize_image(0, image, 20, 20)
    assert just.size == (20, 20)
    np.testing.assert_array_equal(np.asarray(just), np.asarray(image.resize((20, 20), Image.LANCZOS)))
    # crop and resize: scaled to cover 20 x 20 (80 x 20), centred, the sides cut
    cover = resize_image(1, image, 20, 20)
    np.testing.assert_array_equal(np.asarray(cover), np.asarray(image.resize((80, 20), Image.LANCZOS))[:, 30:50])
    # resize and fill: scaled to fit (20 x 5), centred at rows 8..12; the bands above / below are its first / last
    # row stretched (A1111 resizes a zero-height box at the edge: every band row the same)
    fill = np.asarray(resize_image(2, image, 20, 20))
    fitted_image = image.resize((20, 5), Image.LANCZOS)
    fitted = np.asarray(fitted_image)
    np.testing.assert_array_equal(fill[8:13], fitted)
    top = np.asarray(fitted_image.resize((20, 1), box=(0, 0, 20, 0)))
    bottom = np.asarray(fitted_image.resize((20, 1), box=(0, 5, 20, 5)))
    np.testing.assert_array_equal(fill[:8], np.repeat(top, 8, axis=0))
    np.testing.assert_array_equal(fill[13:], np.repeat(bottom, 7, axis=0))
    assert np.abs(top.astype(int) - fitted[:1]).mean() < np.abs(top.astype(int) - fitted[-1:]).mean()


def test_paste_back_puts_the_crop_in_its_region():
    original = Image.new("RGB", (40, 30), (10, 20, 30))
    mask = Image.new("L", (40, 30), 0)
    ImageDraw.Draw(mask).rectangle((12, 8, 21, 17), fill=255)
    from diffusekit.mask_blur import overlay_for

    generated = Image.new("RGB", (20, 20), (200, 100, 50))
    out = np.asarray(paste_back(generated, ((10, 5, 30, 25), overlay_for(original, mask, double=False))))
    assert out.shape == (30, 40, 3)
    np.testing.assert_array_equal(out[8:18, 12:22], np.broadcast_to([200, 100, 50], (10, 10, 3)))
    outside = np.asarray(mask) == 0
    np.testing.assert_array_equal(out[outside], np.asarray(original)[outside])


def test_padding_from_the_parameters():
    from diffusekit.infotext import GenerationParameters

    def params(text):
        return GenerationParameters.from_infotext("x\nSteps: 2, Seed: 1, " + text)

    assert only_masked_padding(params("Seed: 1")) is None
    assert only_masked_padding(params("Inpaint area: Whole picture")) is None
    assert only_masked_padding(params("Inpaint area: Only masked, Masked area padding: 32")) == 32
    assert only_masked_padding(params("Inpaint area: Only masked")) == 0
    with pytest.raises(ValueError, match="Inpaint area must be 'Only masked' or 'Whole picture'"):
        only_masked_padding(params("Inpaint area: Somewhere"))
    with pytest.raises(ValueError, match="Masked area padding must be a number of pixels >= 0"):
        only_masked_padding(params("Inpaint area: Only masked, Masked area padding: -4"))
