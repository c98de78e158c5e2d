"""Pipeline helpers that copied snippets call: VAE slicing/tiling, xformers, CPU offload, progress bar, components."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import diffusekit
from diffusekit.pipelines import offload
from sd_assets import build_tiny_sd

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("sd") / "sd")


@pytest.fixture()
def pipe(sd_folder):
    pipe = diffusekit.StableDiffusionPipeline.from_pretrained(sd_folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images(pipe, batch=1, size=32):
    return pipe(["a cat"] * batch, num_inference_steps=2, height=size, width=size, generator=torch.manual_seed(0),
                output_type="np").images


def test_vae_slicing_and_tiling_switch_the_vae_and_keep_the_images(pipe):
    reference = images(pipe, batch=2)
    pipe.enable_vae_slicing()
    assert pipe.vae.use_slicing
    np.testing.assert_allclose(images(pipe, batch=2), reference, atol=1e-5)
    pipe.disable_vae_slicing()
    assert not pipe.vae.use_slicing
    pipe.enable_vae_tiling()
    assert pipe.vae.use_tiling
    pipe.disable_vae_tiling()
    assert not pipe.vae.use_tiling
    np.testing.assert_allclose(images(pipe, batch=2), reference, atol=1e-6)


def test_vae_helpers_on_a_pipeline_without_vae(tmp_path):
    unet = diffusekit.UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4, layers_per_block=1,
                                  down_block_types=("DownBlock2D", "DownBlock2D"),
                                  up_block_types=("UpBlock2D", "UpBlock2D"))
    ddpm = diffusekit.DDPMPipeline(unet=unet, scheduler=diffusekit.DDPMScheduler())
    with pytest.raises(AttributeError, match="DDPMPipeline.enable_vae_slicing: this pipeline has no vae"):
        ddpm.enable_vae_slicing()


def test_xformers_is_a_logged_no_op(pipe, caplog):
    reference = images(pipe)
    with caplog.at_level(logging.INFO, logger="diffusekit"):
        pipe.enable_xformers_memory_efficient_attention()
        pipe.enable_xformers_memory_efficient_attention(attention_op=None)
    assert "scaled_dot_product_attention" in caplog.text
    np.testing.assert_array_equal(images(pipe), reference)
    pipe.disable_xformers_memory_efficient_attention()


@pytest.mark.parametrize("method", ["enable_model_cpu_offload", "enable_sequential_cpu_offload"])
def test_offload_without_an_accelerator_is_a_clear_error(pipe, method, monkeypatch):
    monkeypatch.setattr(offload, "find_accelerator", lambda: None)
    with pytest.raises(RuntimeError, match=f"{method} needs an accelerator .* do not call it"):
        getattr(pipe, method)()
    assert pipe.device.type == "cpu"  # nothing changed
    with pytest.raises(ValueError, match="either gpu_id"):
        getattr(pipe, method)(gpu_id=1, device="cuda:0")


def test_model_offload_moves_one_model_at_a_time(pipe):
    reference = images(pipe)
    pipe.enable_model_cpu_offload(device="cpu")  # the machinery, with the CPU standing in for the accelerator
    hooks = pipe._model_offload
    seen = []
    # vae.decode runs the decoder, not vae.forward: the hooks on a model's children bring the whole model along
    for name, probe in (("text_encoder", pipe.text_encoder), ("unet", pipe.unet), ("vae", pipe.vae.decoder)):
        model = getattr(pipe, name)
        probe.register_forward_hook(lambda m, a, o, name=name, model=model: seen.append((name, hooks.active is model)))
    np.testing.assert_allclose(images(pipe), reference, atol=1e-6)
    assert {name for name, _ in seen} == {"text_encoder", "unet", "vae"}
    assert all(active for _, active in seen)  # each model was the one on the device while it ran
    pipe.maybe_free_model_hooks()
    assert hooks.active is None
    pipe.remove_all_hooks()
    assert not any("_diffusekit_offload_handles" in m.__dict__ for _, c in pipe._modules() for m in c.modules())


def test_sequential_offload_gives_the_same_images(pipe):
    reference = images(pipe)
    pipe.enable_sequential_cpu_offload(device="cpu")
    assert pipe.device == torch.device("cpu")
    np.testing.assert_allclose(images(pipe), reference, atol=1e-6)
    pipe.remove_all_hooks()
    np.testing.assert_allclose(images(pipe), reference, atol=1e-6)


def test_sequential_offload_moves_every_layer_before_it_runs(pipe, monkeypatch):
    """With the CPU standing in for the accelerator nothing visibly moves, so record the moves instead: every leaf
    with weights must be on the device when its forward runs, also a leaf inside a ModuleList that its block calls
    directly (``attn.to_out[0]``: ModuleList.forward never runs). A GPU showed that gap (tests/test_gpu.py)."""
    on_device, missed = set(), []
    move = offload._move_own

    def recording(module, device):
        (on_device.add if device.type == "cpu" and device.index == 0 else on_device.discard)(module)
        move(module, torch.device("cpu"))

    monkeypatch.setattr(offload, "_move_own", recording)
    pipe.enable_sequential_cpu_offload(device="cpu:0")
    for model in (pipe.unet, pipe.vae, pipe.text_encoder):
        for module in model.modules():
            if not any(True for _ in module.children()) and any(True for _ in module.parameters(recurse=False)):
                module.register_forward_pre_hook(
                    lambda m, args: None if m in on_device else missed.append(type(m).__name__))
    images(pipe)
    assert not missed, f"{len(missed)} layers ran before their weights were moved: {sorted(set(missed))}"
    assert not on_device  # and every one went back afterwards


def test_offload_moves_nested_inputs():
    # the hooks move the caller's tensors (in lists, tuples, dicts) onto the offload device, leaving the rest
    moved = offload._to_device({"a": [torch.zeros(1)], "b": (torch.ones(1), 3)}, torch.device("cpu"))
    assert isinstance(moved["b"], tuple) and moved["b"][1] == 3 and moved["a"][0].device.type == "cpu"


def test_progress_bar_config(pipe):
    pipe.set_progress_bar_config(disable=True, desc="denoising")
    bar = pipe.progress_bar(range(3))
    assert bar.disable and list(bar) == [0, 1, 2]
    pipe.set_progress_bar_config(leave=False)
    assert pipe._progress_bar_config == {"leave": False}


def test_components_build_another_pipeline_like_diffusers(pipe, sd_folder):
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(sd_folder, safety_checker=None)
    # image_encoder is diffusers' IP-Adapter component, out of scope here (see tests/test_public_surface.py)
    assert set(pipe.components) == set(theirs.components) - {"image_encoder"}
    img2img = diffusekit.StableDiffusionImg2ImgPipeline(**pipe.components)
    assert img2img.unet is pipe.unet and img2img.vae is pipe.vae
