"""Pipeline reuse: DiffusionPipeline.from_pipe (shared weights, overrides) and the AutoPipelineFor* task classes,
checked against diffusers' choices of class."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import diffusekit

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from sd_assets import build_tiny_sd  # noqa: E402

AUTO = ("AutoPipelineForText2Image", "AutoPipelineForImage2Image", "AutoPipelineForInpainting")


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("sd"))


@pytest.fixture(scope="module")
def inpaint_folder(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("inpaint"), pipeline="StableDiffusionInpaintPipeline",
                         unet_in_channels=9)


@pytest.fixture(scope="module")
def text2img(sd_folder):
    pipe = diffusekit.StableDiffusionPipeline.from_pretrained(sd_folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pointers(module: torch.nn.Module) -> list[int]:
    return [p.data_ptr() for p in module.parameters()]


@pytest.mark.parametrize("folder_name", ["sd_folder", "inpaint_folder"])
@pytest.mark.parametrize("auto", AUTO)
def test_auto_from_pretrained_picks_the_class_diffusers_picks(request, folder_name, auto):
    folder = request.getfixturevalue(folder_name)
    ours = getattr(diffusekit, auto).from_pretrained(folder)
    ref = getattr(diffusers, auto).from_pretrained(folder)
    assert type(ours).__name__ == type(ref).__name__
    assert type(ours).__module__.startswith("diffusekit.")
    assert ours.unet.config.in_channels == ref.unet.config.in_channels  # the checkpoint's own UNet


@pytest.mark.parametrize("auto", AUTO)
def test_auto_from_pipe_picks_the_class_diffusers_picks(sd_folder, text2img, auto):
    ref = diffusers.StableDiffusionPipeline.from_pretrained(sd_folder)
    for source in ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"):
        ours = getattr(diffusekit, auto).from_pipe(getattr(diffusekit, source).from_pipe(text2img))
        expected = getattr(diffusers, auto).from_pipe(getattr(diffusers, source).from_pipe(ref))
        assert type(ours).__name__ == type(expected).__name__


def test_from_pipe_shares_weights_without_copying(text2img):
    img2img = diffusekit.StableDiffusionImg2ImgPipeline.from_pipe(text2img)
    inpaint = diffusekit.AutoPipelineForInpainting.from_pipe(img2img)
    for pipe in (img2img, inpaint):
        for name in ("unet", "vae", "text_encoder"):
            assert getattr(pipe, name) is getattr(text2img, name)
            assert pointers(getattr(pipe, name)) == pointers(getattr(text2img, name))
        assert pipe.tokenizer is text2img.tokenizer and pipe.scheduler is text2img.scheduler
    assert text2img.unet.config.in_channels == 4  # inpainting runs the plain UNet with latent blending
    same_again = diffusekit.DiffusionPipeline.from_pipe(inpaint)
    assert type(same_again) is diffusekit.StableDiffusionInpaintPipeline and same_again.unet is text2img.unet


def test_from_pipe_gives_the_same_images_as_loading(sd_folder, text2img):
    photo = Image.fromarray((np.random.default_rng(0).random((24, 32, 3)) * 255).astype(np.uint8))
    before = text2img.scheduler.num_inference_steps
    reused = diffusekit.AutoPipelineForImage2Image.from_pipe(text2img)
    loaded = diffusekit.AutoPipelineForImage2Image.from_pretrained(sd_folder)
    for pipe in (reused, loaded):
        pipe.set_progress_bar_config(disable=True)
    a, b = (pipe("a red sneaker", image=photo, num_inference_steps=3, generator=torch.manual_seed(0),
                 output_type="np").images for pipe in (reused, loaded))
    np.testing.assert_array_equal(a, b)
    # running the new pipeline leaves the shared scheduler untouched (each call uses its own copy)
    assert text2img.scheduler.num_inference_steps == before


def test_from_pipe_overrides_and_errors(text2img, sd_folder):
    scheduler = diffusekit.EulerDiscreteScheduler.from_config(text2img.scheduler.config)
    new = diffusekit.StableDiffusionInpaintPipeline.from_pipe(text2img, scheduler=scheduler,
                                                              requires_safety_checker=False)
    assert new.scheduler is scheduler and text2img.scheduler is not scheduler
    assert new.config["requires_safety_checker"] is False
    assert diffusekit.StableDiffusionImg2ImgPipeline.from_pipe(new).config["requires_safety_checker"] is False
    with pytest.raises(TypeError, match="unknown argument"):
        diffusekit.StableDiffusionImg2ImgPipeline.from_pipe(text2img, vea=None)
    ddpm = diffusekit.DDPMPipeline(unet=text2img.unet, scheduler=text2img.scheduler)
    with pytest.raises(ValueError, match="needs a 'vae' component"):
        diffusekit.StableDiffusionImg2ImgPipeline.from_pipe(ddpm)
    depth = diffusekit.StableDiffusionDepth2ImgPipeline.from_pipe(text2img, feature_extractor=None)
    assert depth.depth_estimator is None and depth.unet is text2img.unet  # optional components: None


def test_from_pipe_dtype_casts_the_shared_modules(sd_folder):
    pipe = diffusekit.StableDiffusionPipeline.from_pretrained(sd_folder)
    new = diffusekit.StableDiffusionImg2ImgPipeline.from_pipe(pipe, torch_dtype=torch.float64)
    assert new.dtype == torch.float64 and pipe.unet.dtype == torch.float64  # one set of weights
    assert pointers(new.unet) == pointers(pipe.unet)


def test_auto_errors(tmp_path, text2img):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
    with pytest.raises(ValueError, match="no text-to-image pipeline is linked to 'DDPMPipeline'"):
        diffusekit.AutoPipelineForText2Image.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no inpainting pipeline"):
        diffusekit.AutoPipelineForInpainting.from_pipe(diffusekit.DDPMPipeline(unet=text2img.unet,
                                                                              scheduler=text2img.scheduler))
    with pytest.raises(TypeError, match="from_pretrained"):
        diffusekit.AutoPipelineForText2Image()
