"""StableDiffusionDepth2ImgPipeline: parity with diffusers (a tiny DPT depth estimator, or a user depth map), loading
without transformers, depth map shapes, and saving back to diffusers."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import diffusekit

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
skimage_data = pytest.importorskip("skimage.data")
from sd_assets import build_tiny_sd, tiny_unet_kwargs  # noqa: E402

PROMPT = "a cat, marble statue"


@pytest.fixture(scope="module")
def depth_folder(tmp_path_factory):
    """A tiny depth2img pipeline saved by diffusers: 5-channel UNet and a tiny (non-hybrid) DPT estimator."""
    base = diffusers.StableDiffusionPipeline.from_pretrained(build_tiny_sd(tmp_path_factory.mktemp("sd")))
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**tiny_unet_kwargs(5))
    dpt = transformers.DPTForDepthEstimation(transformers.DPTConfig(
        image_size=32, patch_size=16, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=37, is_hybrid=False, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[16, 16, 32, 32],
        fusion_hidden_size=16, head_in_index=-1,
    )).eval()
    processor = transformers.DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False)
    pipe = diffusers.StableDiffusionDepth2ImgPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=unet, scheduler=base.scheduler,
        depth_estimator=dpt, feature_extractor=processor,
    )
    folder = tmp_path_factory.mktemp("depth")
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pipes(depth_folder):
    ours = diffusekit.DiffusionPipeline.from_pretrained(depth_folder)
    ref = diffusers.DiffusionPipeline.from_pretrained(depth_folder)
    for pipe in (ours, ref):
        pipe.set_progress_bar_config(disable=True)
    return ours, ref


@pytest.fixture(scope="module")
def cat():
    return Image.fromarray(skimage_data.chelsea()).resize((40, 28), Image.BICUBIC)


def run_both(pipes, scheduler_name="DDIMScheduler", **kwargs):
    ours, ref = pipes
    ours.scheduler = getattr(diffusekit, scheduler_name).from_config(ours.scheduler.config)
    ref.scheduler = getattr(diffusers, scheduler_name).from_config(ref.scheduler.config)
    kwargs = {"prompt": PROMPT, "num_inference_steps": 3, "output_type": "np", "strength": 0.75, **kwargs}
    return (ours(generator=torch.manual_seed(0), **kwargs).images,
            ref(generator=torch.manual_seed(0), **kwargs).images)


def assert_match(a, b):
    assert a.shape == b.shape
    assert np.abs(a - b).max() < 1 / 255


def test_loads_with_the_transformers_depth_estimator(pipes):
    ours, _ = pipes
    assert type(ours) is diffusekit.StableDiffusionDepth2ImgPipeline
    assert type(ours.depth_estimator).__name__ == "DPTForDepthEstimation"
    assert ours.unet.config.in_channels == 5


@pytest.mark.parametrize("scheduler_name", ["DDIMScheduler", "EulerAncestralDiscreteScheduler"])
def test_parity_with_estimated_depth(pipes, cat, scheduler_name):
    a, b = run_both(pipes, scheduler_name, image=cat)
    assert a.shape == (1, 28, 40, 3)
    assert_match(a, b)


def test_parity_with_a_user_depth_map_and_batches(pipes, cat):
    depth = torch.rand(1, 50, 70, generator=torch.manual_seed(1))  # any size: resized to the latents
    assert_match(*run_both(pipes, image=cat, depth_map=depth))
    a, b = run_both(pipes, "EulerAncestralDiscreteScheduler", image=cat, depth_map=depth, num_images_per_prompt=2,
                    prompt=[PROMPT], negative_prompt=["blurry"])
    assert a.shape[0] == 2
    assert_match(a, b)


def test_depth_map_shapes_and_kinds(pipes, cat):
    ours, _ = pipes
    depth = np.random.default_rng(0).random((20, 30)).astype(np.float32)

    def run(d, image=cat):
        return ours(PROMPT, image=image, depth_map=d, num_inference_steps=2, generator=torch.manual_seed(0),
                    output_type="np").images

    expected = run(torch.from_numpy(depth)[None])
    for d in (depth, depth[None], torch.from_numpy(depth), torch.from_numpy(depth)[None, None], depth * 7 + 3):
        np.testing.assert_allclose(run(d), expected, atol=1e-5)  # shape and scale do not matter
    # a numpy image (diffusers swaps its height and width when sizing the depth map)
    np.testing.assert_allclose(run(depth, np.asarray(cat, dtype=np.float32) / 255), expected, atol=1e-5)
    flat = run(np.ones((20, 30), dtype=np.float32))  # a flat map: zeros, no NaN
    assert np.isfinite(flat).all()
    for bad in (torch.rand(30), torch.rand(1, 3, 20, 30), torch.rand(1, 1, 1, 20, 30)):
        with pytest.raises(ValueError, match="depth_map must be"):
            run(bad)
    with pytest.raises(ValueError, match="2 depth maps for 1 prompt"):
        run(torch.rand(2, 20, 30))
    with pytest.raises(ValueError, match="strength"):
        ours(PROMPT, image=cat, depth_map=depth, strength=2)


def test_without_transformers(depth_folder, pipes, cat, monkeypatch):
    """The DPT estimator is the only component that needs transformers; without it the error says how to go on."""
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now fails
    with pytest.raises(ImportError) as err:
        diffusekit.DiffusionPipeline.from_pretrained(depth_folder)
    message = str(err.value)
    assert "transformers" in message and "depth_estimator=None" in message and "depth_map" in message
    pipe = diffusekit.DiffusionPipeline.from_pretrained(depth_folder, depth_estimator=None, feature_extractor=None)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.depth_estimator is None and "transformers" not in type(pipe.text_encoder).__module__
    with pytest.raises(ValueError, match="pass depth_map"):
        pipe(PROMPT, image=cat, num_inference_steps=2)
    monkeypatch.undo()
    ours, ref = pipes
    depth = torch.rand(1, 28, 40, generator=torch.manual_seed(2))
    for p, mod in ((pipe, diffusekit), (ref, diffusers)):
        p.scheduler = mod.DDIMScheduler.from_config(p.scheduler.config)
    kwargs = dict(image=cat, depth_map=depth, num_inference_steps=3, strength=0.75, output_type="np")
    assert_match(pipe(PROMPT, generator=torch.manual_seed(0), **kwargs).images,
                 ref(PROMPT, generator=torch.manual_seed(0), **kwargs).images)


def test_save_roundtrip_loads_in_diffusers(pipes, tmp_path):
    ours, _ = pipes
    ours.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["depth_estimator"] == ["transformers", "DPTForDepthEstimation"]
    assert index["feature_extractor"][0] == "transformers"
    back = diffusers.DiffusionPipeline.from_pretrained(tmp_path)
    assert type(back).__name__ == "StableDiffusionDepth2ImgPipeline"
