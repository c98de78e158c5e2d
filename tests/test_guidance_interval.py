"""``guidance_interval=(lo, hi)``: guidance only on the steps ``lo <= i / n < hi``; the other steps run the UNet on
the conditional batch only (Kynkäänniemi et al. 2024). Checked against the plain pipeline, guidance switched off by a
callback (diffusers' CFG cut-off), ``guidance_scale=1``, and the UNet's batch sizes, in SD text-to-image, inpainting
(conditioning concatenated to the input) and SDXL (``added_cond_kwargs``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import diffusekit

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from sd_assets import build_tiny_sd  # noqa: E402
from sdxl_assets import build_tiny_sdxl  # noqa: E402

STEPS = 4


def _load(folder):
    pipe = diffusekit.DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = diffusekit.DDIMScheduler.from_config(pipe.scheduler.config)  # one UNet call per step
    return pipe


@pytest.fixture(scope="module", params=["t2i", "inpaint", "sdxl"])
def case(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "sdxl":
        return _load(build_tiny_sdxl(folder)), {}
    if request.param == "t2i":
        return _load(build_tiny_sd(folder)), {}
    pipe = _load(build_tiny_sd(folder, pipeline="StableDiffusionInpaintPipeline", unet_in_channels=9))
    image = Image.fromarray(np.linspace(0, 255, 32 * 32 * 3).reshape(32, 32, 3).astype(np.uint8))
    mask = Image.new("L", (32, 32))
    mask.paste(255, (8, 8, 24, 24))
    return pipe, {"image": image, "mask_image": mask, "height": 32, "width": 32}


def _run(pipe, extra, **kwargs):
    kwargs = {"prompt": "a red sneaker", "num_inference_steps": STEPS, "guidance_scale": 6.0, "output_type": "np",
              **extra, **kwargs}
    return pipe(generator=torch.Generator().manual_seed(0), **kwargs).images


def _batches(pipe, extra, **kwargs):
    sizes = []
    handle = pipe.unet.register_forward_hook(lambda module, args, kwargs_, out: sizes.append(out[0].shape[0]),
                                             with_kwargs=True)
    try:
        _run(pipe, extra, **kwargs)
    finally:
        handle.remove()
    return sizes


def test_full_interval_is_the_default(case):
    pipe, extra = case
    np.testing.assert_array_equal(_run(pipe, extra, guidance_interval=(0, 1)), _run(pipe, extra))
    assert _batches(pipe, extra, guidance_interval=(0.0, 1.0)) == [2] * STEPS


def test_steps_outside_run_the_conditional_batch_only(case):
    pipe, extra = case
    assert _batches(pipe, extra, guidance_interval=(0.25, 0.75)) == [1, 2, 2, 1]
    assert _batches(pipe, extra, guidance_interval=(0.5, 0.5)) == [1] * STEPS
    guided = _run(pipe, extra)
    assert np.abs(_run(pipe, extra, guidance_interval=(0.25, 0.75)) - guided).max() > 1e-3  # it changes the image


def test_empty_interval_is_guidance_off(case):
    pipe, extra = case
    np.testing.assert_allclose(_run(pipe, extra, guidance_interval=(0.5, 0.5)), _run(pipe, extra, guidance_scale=1.0),
                               atol=1e-6, rtol=0)


def test_interval_end_is_diffusers_cfg_cutoff(case):
    """(0, 0.5) equals guidance switched off by a callback after half the steps (diffusers' SDCFGCutoffCallback: scale
    0 and the positive half of every doubled tensor)."""
    pipe, extra = case
    names = [n for n in ("prompt_embeds", "add_text_embeds", "add_time_ids", "mask", "masked_image_latents")
             if n in pipe._callback_tensor_inputs]

    def cutoff(p, i, t, tensors):
        if i + 1 != STEPS // 2:
            return tensors
        p._guidance_scale = 0.0
        return {k: v.chunk(2)[1] if k != "latents" else v for k, v in tensors.items()}

    reference = _run(pipe, extra, callback_on_step_end=cutoff, callback_on_step_end_tensor_inputs=["latents", *names])
    np.testing.assert_allclose(_run(pipe, extra, guidance_interval=(0, 0.5)), reference, atol=1e-6, rtol=0)


@pytest.mark.parametrize("bad", [(0.5, 0.2), (-0.1, 0.5), (0, 1.5), 0.5, (0, 0.5, 1), ("a", "b"), (True, 1)])
def test_bad_interval_is_refused(case, bad):
    pipe, extra = case
    with pytest.raises(ValueError, match="guidance_interval"):
        _run(pipe, extra, guidance_interval=bad)
