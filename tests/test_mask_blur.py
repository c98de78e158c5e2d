"""A1111's ``mask_blur`` for inpainting (diffusekit.mask_blur through generation.generate, the CLI and the server):
the blur equals OpenCV's as A1111 calls it, bit for bit; the composite equals the alpha blend written out; a blur of
0 leaves today's output unchanged."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from diffusekit.generation import generate
from diffusekit.infotext import GenerationParameters, read_parameters
from diffusekit.mask_blur import apply_overlay, binary_mask, blur_mask, gaussian_kernel, overlay_for

SD = "diffusekit-fashion-sd"


def random_mask(rng, size=None):
    size = size or (int(rng.integers(12, 70)), int(rng.integers(12, 70)))
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    for _ in range(3):
        x, y = (int(v) for v in rng.integers(0, 40, 2))
        draw.rectangle((x, y, x + int(rng.integers(2, 30)), y + int(rng.integers(2, 30))),
                       fill=int(rng.integers(0, 256)))
    return mask


def test_blur_equals_opencv_as_a1111_calls_it():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    for sigma in (0.5, 1, 2, 3, 4, 6.5, 11, 40):  # 40: a kernel wider than the mask (mirrored again and again)
        for _ in range(3):
            mask = random_mask(rng)
            expected = np.asarray(binary_mask(mask)).copy()
            taps = 2 * int(2.5 * sigma + 0.5) + 1
            expected = cv2.GaussianBlur(expected, (taps, 1), sigma)  # modules/processing.py: x, then y
            expected = cv2.GaussianBlur(expected, (1, taps), sigma)
            np.testing.assert_array_equal(np.asarray(blur_mask(mask, sigma)), expected)
    assert sum(gaussian_kernel(4)) == 256 and len(gaussian_kernel(4)) == 21
    # A1111's create_binary_mask: grey levels stay as they are; an RGBA mask with transparency is its alpha, rounded
    assert np.asarray(binary_mask(Image.new("L", (2, 1), 129))).tolist() == [[129, 129]]
    assert np.asarray(binary_mask(Image.new("RGB", (2, 1), (200, 200, 200)))).tolist() == [[200, 200]]
    painted = Image.new("RGBA", (3, 1), (0, 0, 0, 0))
    painted.putpixel((1, 0), (0, 0, 0, 129))
    painted.putpixel((2, 0), (0, 0, 0, 128))
    assert np.asarray(binary_mask(painted)).tolist() == [[0, 255, 0]]
    opaque = Image.new("RGBA", (2, 1), (255, 255, 255, 255))  # no transparency: its grey level, as any other mask
    assert np.asarray(binary_mask(opaque)).tolist() == [[255, 255]]


def test_composite_is_the_alpha_blend_through_the_doubled_mask():
    rng = np.random.default_rng(1)
    original = Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8), "RGB")
    generated = Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8), "RGB")
    mask = Image.new("L", (48, 40), 0)
    ImageDraw.Draw(mask).rectangle((10, 5, 37, 30), fill=200)
    blurred = blur_mask(mask, 4)
    got = np.asarray(apply_overlay(generated, overlay_for(original, blurred))).astype(float)
    m = np.asarray(blurred).astype(float)[..., None]
    alpha = (255 - np.minimum(2 * m, 255)) / 255  # the original's weight
    expected = alpha * np.asarray(original) + (1 - alpha) * np.asarray(generated)
    assert np.abs(got - expected).max() <= 2  # PIL's premultiplied 8-bit steps round on the way
    keep, paint = alpha[..., 0] == 1, alpha[..., 0] == 0
    assert keep.any() and paint.any() and (~keep & ~paint).any()
    np.testing.assert_array_equal(got[keep], np.asarray(original)[keep])
    np.testing.assert_array_equal(got[paint], np.asarray(generated)[paint])


def test_a1111_order_blurs_at_the_upload_size_then_resizes():
    """modules/processing.py: create_binary_mask, cv2.GaussianBlur X then Y on the upload, then resize_image(mode 0,
    Lanczos) to the working size, doubled for the overlay; the image "just resized" to the working size."""
    from diffusekit.mask_blur import blur_masks

    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(5)
    photo = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), "RGB")
    for mask, (sx, sy), size in ((random_mask(rng, (64, 48)), (4, 4), (32, 24)),
                                 (random_mask(rng, (64, 48)), (1, 6), (40, 56)), (None, (3, 3), (24, 16))):
        if mask is None:  # a painted-over RGBA upload: its alpha, rounded
            mask = Image.new("RGBA", (64, 48), (0, 0, 0, 0))
            ImageDraw.Draw(mask).ellipse((10, 8, 40, 30), fill=(0, 0, 0, 200))
        expected = np.asarray(binary_mask(mask)).copy()
        expected = cv2.GaussianBlur(expected, (2 * int(2.5 * sx + 0.5) + 1, 1), sx)
        expected = cv2.GaussianBlur(expected, (1, 2 * int(2.5 * sy + 0.5) + 1), sy)
        expected = Image.fromarray(expected).resize(size, Image.LANCZOS)
        request = GenerationParameters(prompt="x", extra={"Mask blur X": sx, "Mask blur Y": sy})
        got, overlays = blur_masks(photo, mask, [request], size)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
        # the order matters: resizing first (diffusekit before) gives another mask
        assert not np.array_equal(np.asarray(got), np.asarray(blur_mask(binary_mask(mask).resize(size), sx, sy)))
        doubled = np.clip(np.asarray(expected).astype(np.float32) * 2, 0, 255).astype(np.uint8)
        overlay = np.asarray(overlays[0])
        np.testing.assert_array_equal(overlay[..., 3], 255 - doubled)
        keep = overlay[..., 3] == 255
        np.testing.assert_array_equal(overlay[..., :3][keep], np.asarray(photo.resize(size, Image.LANCZOS))[keep])
    # "only masked" inpainting (inpaint_area) blurs at the mask's size too, then gives the mask the image's size
    from diffusekit.inpaint_area import crop_to_masks

    request = GenerationParameters(prompt="x", extra={"Mask blur": 4, "Inpaint area": "Only masked"})
    small = photo.resize((32, 24))
    _, crop_mask, pastes = crop_to_masks(small, mask, [request], 32, 24, 0)
    overlay = np.asarray(pastes[0][1])
    np.testing.assert_array_equal(overlay[..., 3], 255 - np.asarray(blur_mask(mask, 4).resize((32, 24),
                                                                                               Image.LANCZOS)))


@pytest.fixture(scope="module")
def sd_pipe():
    from diffusekit import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(SD)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def photo_and_mask():
    photo = Image.new("RGB", (32, 32), (30, 90, 200))
    ImageDraw.Draw(photo).ellipse((4, 6, 28, 26), fill=(220, 200, 40))
    mask = Image.new("L", (32, 32), 0)
    ImageDraw.Draw(mask).rectangle((8, 0, 23, 31), fill=255)
    return photo, mask


def _params(blur=None, **kw):
    extra = {} if blur is None else {"Mask blur": blur}
    return GenerationParameters(prompt="a photo of a green dress", steps=2, sampler="Euler", cfg_scale=4.0, seed=3,
                                width=32, height=32, denoising_strength=0.9, extra=extra, **kw)


def test_generate_blurs_then_composites_and_zero_changes_nothing(sd_pipe, photo_and_mask):
    import torch

    from diffusekit import StableDiffusionInpaintPipeline, get_scheduler

    photo, mask = photo_and_mask
    run = StableDiffusionInpaintPipeline.from_pipe(sd_pipe, scheduler=get_scheduler("Euler", sd_pipe.scheduler.config))
    run.set_progress_bar_config(disable=True)

    def direct(mask_image):
        return run(prompt=["a photo of a green dress"], image=photo, mask_image=mask_image, strength=0.9,
                   num_inference_steps=2, guidance_scale=4.0, height=32, width=32,
                   generator=[torch.Generator("cpu").manual_seed(3)]).images[0]

    plain = generate(sd_pipe, _params(), image=photo, mask=mask, prompt_syntax="plain")
    zero = generate(sd_pipe, _params(0), image=photo, mask=mask, prompt_syntax="plain")
    today = direct(mask)
    np.testing.assert_array_equal(np.asarray(plain.images[0]), np.asarray(today))
    np.testing.assert_array_equal(np.asarray(zero.images[0]), np.asarray(today))

    blurred = generate(sd_pipe, _params(2), image=photo, mask=mask, prompt_syntax="plain")
    assert "Mask blur: 2" in blurred.parameters[0].to_infotext()
    # the pipeline got the blurred mask (A1111's latent mask) ...
    generated = direct(blur_mask(mask, 2))
    # ... and its image was blended with the original through min(2 * blurred, 255)
    m = np.asarray(blur_mask(mask, 2)).astype(float)[..., None]
    alpha = (255 - np.minimum(2 * m, 255)) / 255
    expected = alpha * np.asarray(photo) + (1 - alpha) * np.asarray(generated)
    got = np.asarray(blurred.images[0]).astype(float)
    assert np.abs(got - expected).max() <= 2  # PIL's premultiplied 8-bit steps round on the way
    outside, inside = alpha[..., 0] == 1, alpha[..., 0] == 0
    assert outside.any() and inside.any() and (~outside & ~inside).any()
    np.testing.assert_array_equal(got[outside], np.asarray(photo)[outside])  # the original, untouched
    np.testing.assert_array_equal(got[inside], np.asarray(generated)[inside])
    assert not np.array_equal(np.asarray(blurred.images[0]), np.asarray(today))
    # a mask of another size (an upload) is blurred at its size, then resized to the request's (A1111's order)
    upload = mask.resize((64, 64), Image.NEAREST)
    wide = generate(sd_pipe, _params(4), image=photo, mask=upload, prompt_syntax="plain")
    assert wide.images[0].size == (32, 32)
    np.testing.assert_array_equal(np.asarray(wide.images[0]), np.asarray(apply_overlay(
        direct(blur_mask(upload, 4).resize((32, 32), Image.LANCZOS)),
        overlay_for(photo, blur_mask(upload, 4).resize((32, 32), Image.LANCZOS)))))
    with pytest.raises(ValueError, match="Mask blur must be a number of pixels >= 0"):
        generate(sd_pipe, _params(-1), image=photo, mask=mask)
    with pytest.raises(ValueError, match="Mask blur composites PIL images"):
        generate(sd_pipe, _params(4), image=photo, mask=mask, output_type="np")


def test_cli_mask_blur_default_flag_and_from_png(tmp_path, photo_and_mask):
    from diffusekit.__main__ import main

    photo, mask = photo_and_mask
    photo.save(tmp_path / "photo.png")
    mask.save(tmp_path / "mask.png")
    common = ["generate", SD, "--prompt", "a green dress", "--image", str(tmp_path / "photo.png"), "--mask",
              str(tmp_path / "mask.png"), "--num-images", "1", "--steps", "2", "--seed", "4"]
    assert main([*common, "--out", str(tmp_path / "default.png")]) == 0
    assert "Mask blur: 4" in read_parameters(tmp_path / "default.png")  # A1111's default
    assert main([*common, "--mask-blur", "0", "--out", str(tmp_path / "zero.png")]) == 0
    assert "Mask blur" not in read_parameters(tmp_path / "zero.png")
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(tmp_path / "default.png"), "--image", str(tmp_path / "photo.png"),
                 "--mask", str(tmp_path / "mask.png"), "--out", str(again)]) == 0
    assert "Mask blur: 4" in read_parameters(again)
    np.testing.assert_array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(tmp_path / "default.png")))
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "zero.png")),
                              np.asarray(Image.open(tmp_path / "default.png")))
    with pytest.raises(SystemExit, match="--mask-blur must be >= 0"):
        main([*common, "--mask-blur", "-2", "--out", str(tmp_path / "bad.png")])


def test_separate_x_and_y_blurs_equal_opencv_as_a1111_calls_it():
    """A1111's mask_blur_x / mask_blur_y: cv2.GaussianBlur with a (k, 1) kernel of sigma X, then (1, k) of sigma Y,
    each only when above 0."""
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(3)
    for sigma_x, sigma_y in ((1, 5), (4, 0), (0, 3), (2.5, 7)):
        mask = random_mask(rng)
        expected = np.asarray(binary_mask(mask)).copy()
        if sigma_x > 0:
            expected = cv2.GaussianBlur(expected, (2 * int(2.5 * sigma_x + 0.5) + 1, 1), sigma_x)
        if sigma_y > 0:
            expected = cv2.GaussianBlur(expected, (1, 2 * int(2.5 * sigma_y + 0.5) + 1), sigma_y)
        np.testing.assert_array_equal(np.asarray(blur_mask(mask, sigma_x, sigma_y)), expected)


def test_blur_keys_in_the_parameters():
    from diffusekit.infotext import GenerationParameters
    from diffusekit.mask_blur import mask_blur_extra, mask_blurs_of

    assert mask_blur_extra(4, 4) == {"Mask blur": 4} and mask_blur_extra(0, 0) == {}
    assert mask_blur_extra(1, 5.5) == {"Mask blur X": 1, "Mask blur Y": 5.5}
    params = GenerationParameters.from_infotext("x\nSteps: 2, Seed: 1, Mask blur X: 1, Mask blur Y: 5")
    assert mask_blurs_of(params) == (1.0, 5.0)
    assert mask_blurs_of(GenerationParameters.from_infotext("x\nSteps: 2, Seed: 1, Mask blur: 3")) == (3.0, 3.0)
    with pytest.raises(ValueError, match="Mask blur Y must be a number of pixels >= 0"):
        mask_blurs_of(GenerationParameters.from_infotext("x\nSteps: 2, Seed: 1, Mask blur Y: -1"))
