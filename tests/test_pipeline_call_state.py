"""Per-call pipeline state that callbacks read and write (diffusers' ``num_timesteps``, ``guidance_scale``,
``do_classifier_free_guidance``, ``cross_attention_kwargs``, ``interrupt`` / ``_interrupt``): same values and same
images as diffusers with the same callbacks, in every SD pipeline; and kept per thread."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from PIL import Image

import diffusekit

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from diffusers.callbacks import SDCFGCutoffCallback  # noqa: E402
from sd_assets import build_tiny_sd  # noqa: E402

PROMPT = "a red sneaker"
STATE = ("num_timesteps", "guidance_scale", "guidance_rescale", "do_classifier_free_guidance",
         "cross_attention_kwargs", "clip_skip", "interrupt")


def _load(folder):
    pair = diffusekit.DiffusionPipeline.from_pretrained(folder), diffusers.DiffusionPipeline.from_pretrained(folder)
    for pipe, library in zip(pair, (diffusekit, diffusers)):
        pipe.set_progress_bar_config(disable=True)
        pipe.scheduler = library.DDIMScheduler.from_config(pipe.scheduler.config)
    return pair


@pytest.fixture(scope="module")
def photo():
    x = np.linspace(0, 1, 24 * 32 * 3, dtype=np.float32).reshape(24, 32, 3)
    return Image.fromarray((x * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def mask():
    m = Image.new("L", (32, 24))
    m.paste(255, (8, 4, 24, 16))
    return m


@pytest.fixture(scope="module")
def t2i(tmp_path_factory):
    return _load(build_tiny_sd(tmp_path_factory.mktemp("t2i")))


@pytest.fixture(scope="module", params=[9, 4], ids=["inpaint-unet", "plain-unet"])
def inpaint(request, tmp_path_factory):
    return _load(build_tiny_sd(tmp_path_factory.mktemp(f"inpaint{request.param}"),
                               pipeline="StableDiffusionInpaintPipeline", unet_in_channels=request.param))


@pytest.fixture(scope="module")
def img2img(tmp_path_factory):
    # (built as such: diffusers' own from_pipe(text-to-image) gives other numbers here)
    return _load(build_tiny_sd(tmp_path_factory.mktemp("i2i"), pipeline="StableDiffusionImg2ImgPipeline"))


def _calls(pipe, kind, photo, mask):
    """The pipeline's call kwargs for each kind of SD pipeline, and the pipeline to call."""
    if kind == "t2i":
        return pipe, {}
    if kind == "img2img":
        return pipe, {"image": photo, "strength": 0.75}
    return pipe, {"image": photo, "mask_image": mask, "height": 24, "width": 32, "strength": 0.75}


def _run(pipe, callback=None, names=("latents",), **kwargs):
    kwargs = {"prompt": PROMPT, "num_inference_steps": 4, "output_type": "np", **kwargs}
    return pipe(generator=torch.Generator().manual_seed(0), callback_on_step_end=callback,
                callback_on_step_end_tensor_inputs=list(names), **kwargs).images


def _recorder(log, stop_at=None, names=STATE):
    def callback(pipe, i, t, tensors):
        log.append({name: getattr(pipe, name) for name in names} | {"i": i})
        if i == stop_at:
            pipe._interrupt = True
        return tensors
    return callback


@pytest.mark.parametrize("kind", ["t2i", "img2img"])
def test_state_and_interrupt_match_diffusers(t2i, img2img, photo, mask, kind):
    pair = t2i if kind == "t2i" else img2img
    (ours, kw_a), (ref, kw_b) = _calls(pair[0], kind, photo, mask), _calls(pair[1], kind, photo, mask)
    logs = ([], [])
    # (no clip_skip / lora "scale": diffusers reaches for text_encoder.text_model, gone in transformers 5)
    extra = dict(cross_attention_kwargs={}, guidance_scale=4.0)
    if kind == "t2i":
        extra["guidance_rescale"] = 0.3
    names = [name for name in STATE if hasattr(type(ref), name)]  # diffusers' img2img has no guidance_rescale
    a = _run(ours, _recorder(logs[0], 1, names), **kw_a, **extra)
    b = _run(ref, _recorder(logs[1], 1, names), **kw_b, **extra)
    assert logs[0] == logs[1]  # the same values at each step, and steps after the interrupt are skipped
    assert [entry["i"] for entry in logs[0]] == [0, 1]
    assert logs[0][0]["num_timesteps"] == (4 if kind == "t2i" else 3)
    assert np.abs(a - b).max() < 1 / 255  # the half-denoised latents are decoded, as in diffusers
    for name in ("num_timesteps", "guidance_scale", "do_classifier_free_guidance", "interrupt"):
        assert getattr(ours, name) == getattr(ref, name)  # still readable after the call
    assert _run(ours, **kw_a).shape == a.shape and not ours.interrupt  # the next call starts afresh


def test_interrupt_in_inpainting(inpaint, photo, mask):
    (ours, kw), (ref, _) = _calls(inpaint[0], "inpaint", photo, mask), _calls(inpaint[1], "inpaint", photo, mask)
    logs = ([], [])
    names = [name for name in STATE if hasattr(type(ref), name)]
    a = _run(ours, _recorder(logs[0], 0, names), **kw)
    b = _run(ref, _recorder(logs[1], 0, names), **kw)
    assert logs[0] == logs[1] and len(logs[0]) == 1
    assert np.abs(a - b).max() < 1 / 255
    assert np.abs(a - _run(ours, **kw)).max() > 1e-3  # the interrupted run really stopped early


def test_dynamic_cfg_callback_matches_diffusers(t2i):
    """diffusers' own SDCFGCutoffCallback: halves prompt_embeds and sets pipe._guidance_scale = 0 mid-way."""
    ours, ref = t2i
    callback = SDCFGCutoffCallback(cutoff_step_ratio=0.5)
    a = _run(ours, callback, guidance_scale=6.0)
    b = _run(ref, callback, guidance_scale=6.0)
    assert np.abs(a - b).max() < 1 / 255
    assert not ours.do_classifier_free_guidance and ours.guidance_scale == 0.0
    assert np.abs(a - _run(ours, guidance_scale=6.0)).max() > 1e-3


def test_callback_tensors_are_diffusers(t2i):
    """Under guidance the loop's prompt_embeds is cat([negative, positive]), as diffusers gives it to callbacks."""
    shapes = ([], [])
    for pipe, seen in zip(t2i, shapes):
        _run(pipe, lambda p, i, t, k, seen=seen: seen.append({n: tuple(v.shape) for n, v in k.items()}) or k,
             names=("latents", "prompt_embeds", "negative_prompt_embeds"), num_inference_steps=2)
    assert shapes[0] == shapes[1]
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        _run(t2i[0], lambda *a: {}, names=("add_time_ids",))


def test_state_is_per_thread(t2i):
    """Two threads on one pipeline: one interrupts itself at step 0, the other runs every step undisturbed."""
    ours, _ = t2i
    full, stopped = _run(ours, guidance_scale=5.0), _run(ours, _recorder([], stop_at=0), guidance_scale=9.0)
    barrier = threading.Barrier(2, timeout=60)
    results, seen = {}, {}

    def worker(name, scale, stop):
        def callback(pipe, i, t, tensors):
            if i == 0:
                barrier.wait()  # both threads are inside a call now
                if stop:
                    pipe._interrupt = True
                barrier.wait()  # the interrupt is set before the other thread goes on
            seen.setdefault(name, []).append((pipe.guidance_scale, pipe.interrupt))
            return tensors
        results[name] = _run(ours, callback, guidance_scale=scale)

    threads = [threading.Thread(target=worker, args=("a", 5.0, False)),
               threading.Thread(target=worker, args=("b", 9.0, True))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen["a"] == [(5.0, False)] * 4 and seen["b"] == [(9.0, True)]
    np.testing.assert_array_equal(results["a"], full)
    np.testing.assert_array_equal(results["b"], stopped)


# diffusers' parameters a pipeline does not take, and ours it does not have (each explained in the class docstring)
SIGNATURE_DIFFERENCES = {
    "StableDiffusionPipeline": ({"ip_adapter_image", "ip_adapter_image_embeds"}, {"guidance_interval", "deep_cache"}),
    "StableDiffusionImg2ImgPipeline": ({"ip_adapter_image", "ip_adapter_image_embeds"},
                                       {"guidance_rescale", "guidance_interval", "deep_cache"}),
    "StableDiffusionInpaintPipeline": ({"ip_adapter_image", "ip_adapter_image_embeds"},
                                       {"guidance_rescale", "guidance_interval", "deep_cache"}),
    "StableDiffusionDepth2ImgPipeline": (set(), {"guidance_interval", "deep_cache"}),
    "StableDiffusionXLPipeline": (set(), {"guidance_interval", "deep_cache"}),
    "StableDiffusionXLImg2ImgPipeline": (set(), {"guidance_interval", "deep_cache"}),
    "StableDiffusionXLInpaintPipeline": (set(), {"guidance_interval", "deep_cache"}),
    # the step callback, which diffusers' unconditional pipelines lack (serve's progress; pipelines/ddpm.py)
    "DDPMPipeline": (set(), {"callback_on_step_end", "callback_on_step_end_tensor_inputs"}),
    "DDIMPipeline": (set(), {"callback_on_step_end", "callback_on_step_end_tensor_inputs"}),
}


@pytest.mark.parametrize("name", sorted(SIGNATURE_DIFFERENCES))
def test_call_signatures_are_diffusers(name):
    """Signatures are data (pipelines/call_signatures.py): names, order and defaults are diffusers'."""
    import inspect

    ours = inspect.signature(getattr(diffusekit, name).__call__).parameters
    theirs = {k: v for k, v in inspect.signature(getattr(diffusers, name).__call__).parameters.items()
              if k != "kwargs"}
    lacking, extra = SIGNATURE_DIFFERENCES[name]
    assert set(theirs) - set(ours) == lacking and set(ours) - set(theirs) == extra
    shared = [k for k in theirs if k in ours]
    assert [k for k in ours if k in theirs] == shared  # same order: positional calls mean the same
    for key in shared:
        a, b = ours[key].default, theirs[key].default
        assert (list(a) if isinstance(a, tuple) and isinstance(b, list) else a) == b, key
    with pytest.raises(TypeError, match="no_such_argument"):
        getattr(diffusekit, name).__call__(object.__new__(getattr(diffusekit, name)), no_such_argument=1)
