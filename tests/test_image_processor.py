"""VaeImageProcessor (image and mask preprocessing, crops, overlays) against diffusers', on real photos."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffusekit.pipelines.image_processor import VaeImageProcessor, image_size

diffusers = pytest.importorskip("diffusers")
skimage_data = pytest.importorskip("skimage.data")

REF = diffusers.image_processor.VaeImageProcessor


@pytest.fixture(scope="module")
def photos():
    """Real photos at odd sizes (not multiples of 8): cat 300x451, coffee 400x600 (downscaled), astronaut 512x512."""
    cat = Image.fromarray(skimage_data.chelsea())
    coffee = Image.fromarray(skimage_data.coffee()).resize((151, 101))
    astronaut = Image.fromarray(skimage_data.astronaut()).resize((64, 64))
    return {"cat": cat, "coffee": coffee, "astronaut": astronaut}


def same(a, b, atol=0.0):
    assert type(a) is type(b)
    a = a.numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    b = b.numpy() if isinstance(b, torch.Tensor) else np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    np.testing.assert_allclose(a, b, atol=atol, rtol=0)


@pytest.mark.parametrize("resample", ["lanczos", "bicubic", "nearest"])
@pytest.mark.parametrize("factor", [8, 16])
def test_pil_images_match_diffusers(photos, resample, factor):
    ours, ref = VaeImageProcessor(vae_scale_factor=factor, resample=resample), REF(vae_scale_factor=factor,
                                                                                    resample=resample)
    for image in (photos["cat"], [photos["coffee"], photos["coffee"].transpose(Image.FLIP_LEFT_RIGHT)]):
        a, b = ours.preprocess(image), ref.preprocess(image)
        same(a, b)
        assert a.shape[-2] % factor == 0 and a.shape[-1] % factor == 0 and a.min() >= -1 and a.max() <= 1
    same(ours.preprocess(photos["cat"], height=64, width=96), ref.preprocess(photos["cat"], height=64, width=96))
    assert ours.preprocess(photos["cat"]).shape == (1, 3, 296 - 296 % factor, 448)


def test_numpy_and_torch_inputs_match_diffusers(photos):
    ours, ref = VaeImageProcessor(), REF()
    cat = np.asarray(photos["cat"], dtype=np.float32) / 255  # (300, 451, 3)
    coffee = np.asarray(photos["coffee"], dtype=np.float32) / 255
    inputs = [
        cat,  # one (H, W, C) array
        np.stack([coffee, coffee[::-1].copy()]),  # (B, H, W, C)
        [coffee, coffee[:, ::-1].copy()],  # a list of arrays
        torch.from_numpy(cat).permute(2, 0, 1),  # (C, H, W)
        torch.from_numpy(np.stack([coffee, coffee])).permute(0, 3, 1, 2),  # (B, C, H, W)
        [torch.from_numpy(coffee).permute(2, 0, 1)] * 3,  # list of (C, H, W)
    ]
    for image in inputs:
        same(ours.preprocess(image), ref.preprocess(image))
    same(ours.preprocess(cat, height=128, width=64), ref.preprocess(cat, height=128, width=64))


def test_numpy_array_is_what_pil_gives(photos):
    # the same pixels as an array (already at a multiple of 8) or as a PIL image: the same tensor
    image = photos["astronaut"]
    from_pil = VaeImageProcessor().preprocess(image)
    from_np = VaeImageProcessor().preprocess(np.asarray(image, dtype=np.float32) / 255)
    same(from_pil, from_np, atol=1e-6)


def test_uint8_inputs_are_scaled(photos):
    """Deliberate difference: uint8 arrays / tensors are read as 0..255 (diffusers would take them as 0..1)."""
    pixels = np.asarray(photos["astronaut"])  # uint8
    expected = VaeImageProcessor().preprocess(pixels.astype(np.float32) / 255)
    same(VaeImageProcessor().preprocess(pixels), expected)
    same(VaeImageProcessor().preprocess(torch.from_numpy(pixels).permute(2, 0, 1)), expected)


def test_latents_and_minus_one_range_tensors_pass_through():
    ours, ref = VaeImageProcessor(), REF()
    latents = torch.randn(2, 4, 5, 7)
    assert ours.preprocess(latents) is latents or torch.equal(ours.preprocess(latents), latents)
    signed = torch.rand(1, 3, 16, 16) * 2 - 1  # already in [-1, 1]: left as it is, as diffusers does
    with pytest.warns(FutureWarning):
        expected = ref.preprocess(signed)
    same(ours.preprocess(signed), expected)


def test_rgba_and_grayscale_pil_converted_when_asked(photos):
    rgba = photos["astronaut"].convert("RGBA")
    ours, ref = VaeImageProcessor(do_convert_rgb=True), REF(do_convert_rgb=True)
    same(ours.preprocess(rgba), ref.preprocess(rgba))
    assert ours.preprocess(rgba).shape[1] == 3


MASK_ARGS = dict(do_normalize=False, do_binarize=True, do_convert_grayscale=True)


def _masks():
    rng = np.random.default_rng(0)
    soft = rng.random((37, 45)).astype(np.float32)  # a soft mask at an odd size
    return [
        Image.fromarray((soft * 255).astype(np.uint8), mode="L"),  # PIL grayscale
        Image.fromarray((soft * 255).astype(np.uint8), mode="L").convert("RGB"),  # PIL RGB: converted to L
        soft,  # (H, W)
        soft[..., None],  # (H, W, 1)
        np.stack([soft, 1 - soft]),  # (B, H, W)
        torch.from_numpy(soft),  # (H, W)
        torch.from_numpy(soft)[None],  # (1, H, W)
        torch.from_numpy(np.stack([soft, 1 - soft]))[:, None],  # (B, 1, H, W)
    ]


@pytest.mark.parametrize("index", range(8))
def test_masks_match_diffusers(index):
    mask = _masks()[index]
    ours, ref = VaeImageProcessor(**MASK_ARGS), REF(**MASK_ARGS)
    a, b = ours.preprocess(mask, height=32, width=40), ref.preprocess(mask, height=32, width=40)
    same(a, b)
    assert a.shape[1] == 1 and set(torch.unique(a).tolist()) <= {0.0, 1.0}


def test_blurred_mask_matches_diffusers():
    mask = _masks()[0].resize((64, 48))
    ours, ref = VaeImageProcessor(**MASK_ARGS), REF(**MASK_ARGS)
    blurred = ours.blur(mask, blur_factor=5)
    same(blurred, ref.blur(mask, blur_factor=5))
    assert np.asarray(blurred).std() < np.asarray(mask).std()  # it did blur
    same(ours.preprocess(blurred), ref.preprocess(blurred))


def _box_mask(size, box):
    mask = Image.new("L", size)
    mask.paste(255, box)
    return mask


@pytest.mark.parametrize("pad", [0, 3, 32])
def test_crop_region_matches_diffusers(pad):
    rng = np.random.default_rng(pad)
    cases = [((64, 48), (10, 20, 20, 30)), ((64, 48), (0, 0, 5, 40)), ((64, 48), (60, 40, 64, 48)),
             ((100, 30), (40, 10, 45, 12)), ((30, 100), (1, 1, 29, 3))]
    for _ in range(20):  # random boxes anywhere
        w, h = rng.integers(16, 80, size=2)
        x1, y1 = rng.integers(0, w - 1), rng.integers(0, h - 1)
        cases.append(((int(w), int(h)), (int(x1), int(y1), int(rng.integers(x1 + 1, w + 1)),
                                         int(rng.integers(y1 + 1, h + 1)))))
    for size, box in cases:
        mask = _box_mask(size, box)
        for width, height in ((32, 32), (64, 32), (24, 48)):
            got = VaeImageProcessor.get_crop_region(mask, width, height, pad=pad)
            assert got == REF.get_crop_region(mask, width, height, pad=pad), (size, box, width, height)
            x1, y1, x2, y2 = got
            assert 0 <= x1 < x2 <= size[0] and 0 <= y1 < y2 <= size[1]


def test_crop_region_of_empty_mask_is_whole_image():
    assert VaeImageProcessor.get_crop_region(Image.new("L", (40, 30)), 32, 32, pad=4) == (0, 0, 40, 30)


@pytest.mark.parametrize("mode", ["fill", "crop"])
def test_fill_and_crop_resize_match_diffusers(photos, mode):
    for image in (photos["cat"], photos["cat"].transpose(Image.TRANSPOSE), photos["astronaut"]):
        for width, height in ((64, 48), (48, 64), (40, 40)):
            a = VaeImageProcessor().resize(image, height, width, resize_mode=mode)
            b = REF().resize(image, height, width, resize_mode=mode)
            assert a.size == (width, height)
            same(a, b)


def test_overlay_matches_diffusers(photos):
    image = photos["coffee"]
    mask = _box_mask(image.size, (30, 20, 90, 70))
    generated = photos["astronaut"].resize((48, 40))
    coords = VaeImageProcessor.get_crop_region(mask, 48, 40, pad=4)
    a = VaeImageProcessor().apply_overlay(mask, image, generated, coords)
    b = REF().apply_overlay(mask, image, generated, coords)
    same(a, b)
    kept = np.asarray(mask) == 0
    np.testing.assert_array_equal(np.asarray(a)[kept], np.asarray(image)[kept])  # unmasked pixels are the original
    same(VaeImageProcessor().apply_overlay(mask, image, generated.resize(image.size)),
         REF().apply_overlay(mask, image, generated.resize(image.size)))


def test_postprocess_matches_diffusers():
    images = torch.rand(2, 3, 8, 8) * 2.2 - 1.1
    for output_type in ("pt", "np"):
        same(VaeImageProcessor().postprocess(images, output_type), REF().postprocess(images, output_type))
    pils = VaeImageProcessor().postprocess(images, "pil", do_denormalize=[True, False])
    refs = REF().postprocess(images, "pil", do_denormalize=[True, False])
    for a, b in zip(pils, refs):
        same(a, b)


def test_bad_inputs_are_named():
    proc = VaeImageProcessor()
    with pytest.raises(TypeError, match="PIL image, a numpy array or a torch tensor"):
        proc.preprocess("cat.png")
    with pytest.raises(TypeError, match="empty list"):
        proc.preprocess([])
    with pytest.raises(TypeError, match="Image, ndarray"):
        proc.preprocess([Image.new("RGB", (8, 8)), np.zeros((8, 8, 3))])
    with pytest.raises(TypeError):
        proc.preprocess(torch.zeros(1, 1, 1, 8, 8))
    with pytest.raises(ValueError, match="resize_mode"):
        proc.resize(torch.zeros(1, 3, 8, 8), 16, 16, resize_mode="fill")
    with pytest.raises(ValueError, match="both"):
        VaeImageProcessor(do_convert_rgb=True, do_convert_grayscale=True)


def test_image_size_of_each_kind(photos):
    assert image_size(photos["cat"]) == (300, 451)
    assert image_size([photos["cat"]]) == (300, 451)
    assert image_size(np.zeros((30, 40, 3))) == (30, 40)
    assert image_size(np.zeros((2, 30, 40, 3))) == (30, 40)
    assert image_size(np.zeros((30, 40))) == (30, 40)
    assert image_size(torch.zeros(3, 30, 40)) == (30, 40)
    assert image_size(torch.zeros(2, 1, 30, 40)) == (30, 40)
