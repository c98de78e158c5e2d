"""StableDiffusionInpaintPipeline: parity with diffusers for inpainting (9-channel) and ordinary (4-channel) UNets on
a real photo, mask handling (blur, crops, arrays), the kept region, batches, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import diffusekit

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
skimage_data = pytest.importorskip("skimage.data")
from sd_assets import build_tiny_sd  # noqa: E402

PROMPT = "a cup of tea on a wooden table"
SIZE = dict(height=32, width=40)


@pytest.fixture(scope="module")
def photo():
    return Image.fromarray(skimage_data.coffee()).resize((60, 40), Image.BICUBIC)


@pytest.fixture(scope="module")
def mask():
    m = Image.new("L", (60, 40))
    m.paste(255, (20, 8, 44, 30))  # white: repaint the cup
    return m


def _load(folder):
    ours = diffusekit.DiffusionPipeline.from_pretrained(folder)
    ref = diffusers.DiffusionPipeline.from_pretrained(folder)
    for pipe in (ours, ref):
        pipe.set_progress_bar_config(disable=True)
    return ours, ref


@pytest.fixture(scope="module", params=[9, 4], ids=["inpaint-unet", "plain-unet"])
def pipes(request, tmp_path_factory):
    folder = build_tiny_sd(tmp_path_factory.mktemp(f"inpaint{request.param}"),
                           pipeline="StableDiffusionInpaintPipeline", unet_in_channels=request.param)
    return _load(folder)


def run_both(pipes, scheduler_name="DDIMScheduler", generators=None, **kwargs):
    ours, ref = pipes
    ours.scheduler = getattr(diffusekit, scheduler_name).from_config(ours.scheduler.config)
    ref.scheduler = getattr(diffusers, scheduler_name).from_config(ref.scheduler.config)
    kwargs = {"prompt": PROMPT, "num_inference_steps": 3, "output_type": "np", **SIZE, **kwargs}

    def gen():
        return torch.manual_seed(0) if generators is None else [torch.manual_seed(i) for i in range(generators)]

    return ours(generator=gen(), **kwargs), ref(generator=gen(), **kwargs)


def assert_match(a, b):
    pil = not isinstance(a.images, np.ndarray)
    a, b = np.asarray(a.images, dtype=np.float32), np.asarray(b.images, dtype=np.float32)
    assert a.shape == b.shape
    if pil:  # 8-bit values: at most one level apart
        assert np.abs(a - b).max() <= 1
    else:
        assert np.abs(a - b).max() < 1 / 255


@pytest.mark.parametrize("scheduler_name,strength", [
    ("DDIMScheduler", 1.0), ("EulerAncestralDiscreteScheduler", 1.0), ("DDIMScheduler", 0.7),
    ("EulerAncestralDiscreteScheduler", 0.7), ("HeunDiscreteScheduler", 0.7),
])
def test_parity_on_a_photo(pipes, photo, mask, scheduler_name, strength):
    a, b = run_both(pipes, scheduler_name, image=photo, mask_image=mask, strength=strength)
    assert a.images.shape == (1, 32, 40, 3)
    assert_match(a, b)


def test_default_size_batches_and_generator_lists(pipes, photo, mask):
    ours, _ = pipes
    a, b = run_both(pipes, image=photo, mask_image=mask, height=None, width=None)
    assert a.images.shape == (1, 16, 16, 3)  # the UNet's sample size x the VAE factor, as in diffusers
    assert_match(a, b)
    a, b = run_both(pipes, "EulerAncestralDiscreteScheduler", generators=4, image=photo, mask_image=mask,
                    prompt=[PROMPT, "a red apple"], num_images_per_prompt=2, strength=0.8,
                    negative_prompt=["blurry", "dark"])
    assert a.images.shape[0] == 4
    assert_match(a, b)


def test_padding_mask_crop_and_blurred_mask(pipes, photo, mask):
    ours, _ = pipes
    soft = ours.mask_processor.blur(mask, blur_factor=3)
    a, b = run_both(pipes, image=photo, mask_image=soft, padding_mask_crop=4, output_type="pil")
    assert a.images[0].size == photo.size  # pasted back into the full picture
    assert_match(a, b)
    outside = np.asarray(soft) == 0  # exactly the original pixels where the (blurred) mask is black
    np.testing.assert_array_equal(np.asarray(a.images[0])[outside], np.asarray(photo)[outside])


def test_user_latents_and_masked_image_latents(pipes, photo, mask):
    ours, _ = pipes
    latents = torch.randn(1, 4, 16, 20, generator=torch.manual_seed(5))
    assert_match(*run_both(pipes, image=photo, mask_image=mask, latents=latents, strength=0.7))
    masked = torch.randn(1, 4, 16, 20, generator=torch.manual_seed(6))
    assert_match(*run_both(pipes, image=photo, mask_image=mask, masked_image_latents=masked))


def test_mask_kinds_give_the_same_image(pipes, photo, mask):
    ours, _ = pipes
    ours.scheduler = diffusekit.DDIMScheduler.from_config(ours.scheduler.config)

    photo, mask = photo.resize((40, 32)), mask.resize((40, 32))  # at the working size: no resampling differences

    def run(m):
        return ours(PROMPT, image=photo, mask_image=m, num_inference_steps=2, generator=torch.manual_seed(0),
                    output_type="np", **SIZE).images

    expected = run(mask)
    pixels = np.asarray(mask, dtype=np.float32) / 255
    for m in (mask.convert("RGB"), pixels, pixels[..., None], pixels[None], torch.from_numpy(pixels),
              torch.from_numpy(pixels)[None, None], np.asarray(mask) > 127):
        np.testing.assert_allclose(run(m), expected, atol=1e-5)


def test_black_mask_keeps_the_image_latents_with_a_plain_unet(tmp_path_factory, photo):
    """With a 4-channel UNet the kept region is put back after every step: with nothing to repaint, the result is
    the clean image latents exactly."""
    folder = build_tiny_sd(tmp_path_factory.mktemp("plain"), pipeline="StableDiffusionInpaintPipeline")
    ours, _ = _load(folder)
    black = Image.new("L", photo.size)
    out = ours(PROMPT, image=photo, mask_image=black, num_inference_steps=3, output_type="latent",
               generator=torch.manual_seed(0), **SIZE).images
    pixels = ours.image_processor.preprocess(photo, **SIZE)
    expected = ours.encode_vae_image(pixels, torch.manual_seed(0))  # the first draw from the generator
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_callbacks_see_the_mask(pipes, photo, mask):
    ours, _ = pipes
    shapes = []
    ours(PROMPT, image=photo, mask_image=mask, num_inference_steps=2, output_type="latent", **SIZE,
         callback_on_step_end=lambda p, i, t, k: shapes.append((k["mask"].shape, k["masked_image_latents"].shape))
         or {}, callback_on_step_end_tensor_inputs=["mask", "masked_image_latents"])
    assert shapes == [((2, 1, 16, 20), (2, 4, 16, 20))] * 2  # both guidance branches


def test_bad_inputs_have_clear_errors(pipes, photo, mask):
    ours, _ = pipes
    with pytest.raises(ValueError, match="same size"):
        ours(PROMPT, image=photo, mask_image=mask.resize((30, 20)))
    with pytest.raises(ValueError, match="single channel"):
        ours(PROMPT, image=photo, mask_image=np.zeros((40, 60, 3), dtype=np.float32), **SIZE)
    with pytest.raises(ValueError, match="single channel"):
        ours(PROMPT, image=photo, mask_image=torch.zeros(1, 3, 40, 60), **SIZE)
    with pytest.raises(ValueError, match="strength"):
        ours(PROMPT, image=photo, mask_image=mask, strength=1.01)
    with pytest.raises(ValueError, match="both required"):
        ours(PROMPT, image=photo)
    with pytest.raises(ValueError, match="multiples of 2"):
        ours(PROMPT, image=photo, mask_image=mask, height=31, width=40)
    with pytest.raises(ValueError, match="PIL"):
        ours(PROMPT, image=np.zeros((40, 60, 3)), mask_image=np.zeros((40, 60)), padding_mask_crop=4)
    with pytest.raises(ValueError, match="output_type='pil'"):
        ours(PROMPT, image=photo, mask_image=mask, padding_mask_crop=4, output_type="np")
    with pytest.raises(ValueError, match="masked_image_latents"):
        ours(PROMPT, image=torch.zeros(1, 4, 16, 20), mask_image=mask)


def test_unet_with_wrong_channels_is_refused(tmp_path_factory, photo, mask):
    folder = build_tiny_sd(tmp_path_factory.mktemp("five"), pipeline="StableDiffusionInpaintPipeline",
                           unet_in_channels=5)
    ours = diffusekit.StableDiffusionInpaintPipeline.from_pretrained(folder)
    with pytest.raises(ValueError, match="inpainting needs 4 .* or 9"):
        ours(PROMPT, image=photo, mask_image=mask, **SIZE)
