"""Stable Diffusion XL pipelines: parity with diffusers on tiny random SDXL base / refiner / inpainting folders
(two CLIP encoders with the real vocabulary, saved by diffusers): text-to-image, the base -> refiner hand-over,
image-to-image and inpainting, two schedulers each; loading, dispatch, callbacks and the fp16 VAE upcast."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import diffusekit

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from diffusers.callbacks import SDXLCFGCutoffCallback  # noqa: E402
from sdxl_assets import build_tiny_sdxl  # noqa: E402

PROMPT = "a red sneaker on a white table"


def _load(folder):
    pair = diffusekit.DiffusionPipeline.from_pretrained(folder), diffusers.DiffusionPipeline.from_pretrained(folder)
    for pipe in pair:
        pipe.set_progress_bar_config(disable=True)
    return pair


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return _load(build_tiny_sdxl(tmp_path_factory.mktemp("base")))


@pytest.fixture(scope="module")
def refiner(tmp_path_factory):
    return _load(build_tiny_sdxl(tmp_path_factory.mktemp("refiner"), "StableDiffusionXLImg2ImgPipeline",
                                 refiner=True, seed=1))


@pytest.fixture(scope="module")
def inpaint(tmp_path_factory):
    return _load(build_tiny_sdxl(tmp_path_factory.mktemp("inpaint"), "StableDiffusionXLInpaintPipeline",
                                 unet_in_channels=9, seed=2))


@pytest.fixture(scope="module")
def photo():
    x = np.linspace(0, 1, 24 * 32 * 3, dtype=np.float32).reshape(24, 32, 3)
    return Image.fromarray((np.sin(x * 20) * 127 + 128).astype(np.uint8))


@pytest.fixture(scope="module")
def mask():
    m = Image.new("L", (32, 24))
    m.paste(255, (8, 4, 24, 16))
    return m


def run_both(pair, scheduler=None, seed=0, **kwargs):
    ours, ref = pair
    if scheduler:
        ours.scheduler = getattr(diffusekit, scheduler).from_config(ours.scheduler.config)
        ref.scheduler = getattr(diffusers, scheduler).from_config(ref.scheduler.config)
    kwargs = {"prompt": PROMPT, "num_inference_steps": 4, "output_type": "np", **kwargs}
    a = ours(generator=torch.Generator().manual_seed(seed), **kwargs).images
    b = ref(generator=torch.Generator().manual_seed(seed), **kwargs).images
    return a, b


def assert_match(a, b):
    a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
    assert a.shape == b.shape
    assert np.abs(a - b).max() < 1 / 255


def test_loads_our_classes(base, refiner, inpaint):
    for (ours, _), cls in ((base, "StableDiffusionXLPipeline"), (refiner, "StableDiffusionXLImg2ImgPipeline"),
                           (inpaint, "StableDiffusionXLInpaintPipeline")):
        assert type(ours) is getattr(diffusekit, cls)
        assert isinstance(ours.text_encoder_2, diffusekit.CLIPTextModelWithProjection)
        assert isinstance(ours.tokenizer_2, diffusekit.CLIPTokenizer) and ours.tokenizer_2.pad_token == "!"
        assert isinstance(ours.unet, diffusekit.UNet2DConditionModel)
    assert refiner[0].text_encoder is None and refiner[0].tokenizer is None
    assert refiner[0].config.requires_aesthetics_score is True
    assert base[0].config.force_zeros_for_empty_prompt is True


@pytest.mark.parametrize("scheduler", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_text_to_image_parity(base, scheduler):
    assert_match(*run_both(base, scheduler))
    assert_match(*run_both(base, scheduler, prompt=[PROMPT, "a boot"], prompt_2=["studio photo", "studio"],
                           negative_prompt=["blurry", "dark"], negative_prompt_2="low quality",
                           num_images_per_prompt=2, guidance_rescale=0.5, height=24, width=32))


def test_text_to_image_size_conditioning_and_no_guidance(base):
    sizes = dict(original_size=(64, 48), crops_coords_top_left=(8, 4), target_size=(32, 32),
                 negative_original_size=(16, 16), negative_crops_coords_top_left=(0, 8), negative_target_size=(24, 24))
    a, b = run_both(base, "EulerDiscreteScheduler", **sizes)
    assert_match(a, b)
    assert np.abs(a - run_both(base)[0]).max() > 1e-3  # the size conditioning matters
    assert_match(*run_both(base, guidance_scale=1.0))
    assert_match(*run_both(base, negative_prompt="", guidance_scale=3.0))  # an explicit "" is encoded, not zeroed


@pytest.mark.parametrize("scheduler", ["EulerDiscreteScheduler", "DDIMScheduler"])
def test_base_to_refiner_hand_over(base, refiner, scheduler):
    """diffusers' ensemble of experts: the base stops at denoising_end, the refiner starts there from its latents."""
    for pair in (base, refiner):
        for pipe, library in zip(pair, (diffusekit, diffusers)):
            pipe.scheduler = getattr(library, scheduler).from_config(pipe.scheduler.config)
    latents = run_both(base, num_inference_steps=10, denoising_end=0.7, output_type="latent")
    torch.testing.assert_close(latents[0], latents[1], rtol=1e-4, atol=1e-4)
    assert base[0].num_timesteps == base[1].num_timesteps == 7
    a, b = run_both(refiner, image=latents[1], num_inference_steps=10, denoising_start=0.7)
    assert_match(a, b)
    assert refiner[0].num_timesteps == refiner[1].num_timesteps == 3


@pytest.mark.parametrize("scheduler", ["EulerAncestralDiscreteScheduler", "DDIMScheduler"])
def test_image_to_image_parity(base, refiner, photo, scheduler):
    img2img = (diffusekit.AutoPipelineForImage2Image.from_pipe(base[0]),
               diffusers.AutoPipelineForImage2Image.from_pipe(base[1]))
    assert type(img2img[0]) is diffusekit.StableDiffusionXLImg2ImgPipeline
    for pipe in img2img:
        pipe.set_progress_bar_config(disable=True)
    assert_match(*run_both(img2img, scheduler, image=photo, strength=0.6))
    assert_match(*run_both(refiner, scheduler, image=photo, strength=0.6, aesthetic_score=7.0,
                           negative_aesthetic_score=2.0))


@pytest.mark.parametrize("scheduler", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_inpaint_parity(inpaint, photo, mask, scheduler):
    kwargs = dict(image=photo, mask_image=mask, height=24, width=32)
    assert_match(*run_both(inpaint, scheduler, **kwargs))
    assert_match(*run_both(inpaint, scheduler, strength=1.0, **kwargs))


def test_inpaint_with_an_ordinary_unet(base, photo, mask):
    pair = (diffusekit.AutoPipelineForInpainting.from_pipe(base[0]),
            diffusers.AutoPipelineForInpainting.from_pipe(base[1]))
    assert type(pair[0]) is diffusekit.StableDiffusionXLInpaintPipeline
    for pipe in pair:
        pipe.set_progress_bar_config(disable=True)
    a, b = run_both(pair, "EulerDiscreteScheduler", image=photo, mask_image=mask, height=24, width=32, strength=0.7)
    assert_match(a, b)


def test_cfg_cutoff_callback_and_interrupt_match_diffusers(base):
    callback = SDXLCFGCutoffCallback(cutoff_step_ratio=0.5)
    assert_match(*run_both(base, callback_on_step_end=callback))

    def stop(pipe, i, t, tensors):
        pipe._interrupt = i == 1
        return tensors

    a, b = run_both(base, callback_on_step_end=stop)
    assert_match(a, b)
    assert base[0].interrupt and base[0].num_timesteps == 4
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        base[0](PROMPT, num_inference_steps=1, callback_on_step_end=stop,
                callback_on_step_end_tensor_inputs=["negative_prompt_embeds"])


def test_fp16_vae_decodes_in_float32_without_changing_the_pipeline(base):
    ours, ref = base
    full = run_both(base)[0]
    ours.vae.to(torch.float16)
    ref.vae.to(torch.float16)
    try:
        a, b = run_both(base)
        assert ours.vae.dtype == torch.float16  # upcast on a copy: the shared VAE keeps its dtype
        assert_match(a, b)
        assert np.abs(a - full).max() < 1 / 255
    finally:
        ours.vae.to(torch.float32)
        ref.vae.to(torch.float32)


def test_saved_by_us_loads_in_diffusers(base, tmp_path):
    ours, ref = base
    ours.save_pretrained(tmp_path)
    back = diffusers.DiffusionPipeline.from_pretrained(tmp_path)
    back.set_progress_bar_config(disable=True)
    assert type(back).__name__ == "StableDiffusionXLPipeline"
    assert_match(*run_both((ours, back)))


def test_clear_errors(base, refiner):
    ours, _ = base
    with pytest.raises(ValueError, match="pooled_prompt_embeds"):
        ours(prompt_embeds=torch.zeros(1, 77, 64), num_inference_steps=1)
    with pytest.raises(NotImplementedError, match="IP-Adapter"):
        ours(PROMPT, ip_adapter_image=Image.new("RGB", (8, 8)), num_inference_steps=1)
    with pytest.raises(ValueError, match="denoising_start"):
        refiner[0](PROMPT, image=torch.zeros(1, 4, 8, 8), denoising_start=0.8, denoising_end=0.5)
    with pytest.raises(NotImplementedError, match="watermark"):
        diffusekit.StableDiffusionXLPipeline(**ours.components, add_watermarker=True)
    with pytest.raises(ValueError, match="requires_aesthetics_score"):  # a base UNet with aesthetic-score time ids
        diffusekit.StableDiffusionXLImg2ImgPipeline(**ours.components, requires_aesthetics_score=True)(
            PROMPT, image=torch.zeros(1, 4, 8, 8), num_inference_steps=1)
