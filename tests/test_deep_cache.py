"""DeepCache-style feature reuse (``enable_deep_cache`` / a call's ``deep_cache=``): full steps run the whole UNet and
keep the feature entering the branch's up layer; cached steps run only the layers shallower than the branch.

Checked: a cached UNet call on the inputs its feature came from equals the full call bit for bit (every branch, SD and
SDXL block layouts); off / interval 1 give the old images exactly; cached steps really skip the deep blocks (block
calls counted); the schedule (uniform, non-uniform, first step full, img2img strength, guidance_interval's batch
changes, interrupt); one pipeline in two threads keeps two caches; bad parameters are refused by name."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from PIL import Image

import diffusekit
from diffusekit.models.deep_cache import DeepCacheStep
from diffusekit.pipelines.deep_cache import DeepCacheConfig, DeepCacheRun, deep_cache_config

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from sd_assets import build_tiny_sd, tiny_unet_kwargs  # noqa: E402
from sdxl_assets import build_tiny_sdxl  # noqa: E402

STEPS = 6


# ---------------------------------------------------------------------------------------------------- the UNet


@pytest.mark.parametrize("layout", ["sd", "sdxl"])
def test_cached_call_on_the_same_inputs_equals_the_full_call(layout):
    """For every branch: the full call with deep_cache is the plain call, and a cached call fed the feature the full
    call kept (same inputs) gives the same output bit for bit: the cached call computes exactly the layers it
    should, and continues from the right place."""
    torch.manual_seed(0)
    if layout == "sd":  # cross-attention down first, two layers + downsampler per block (as SD 1.x / 2.x)
        kwargs = tiny_unet_kwargs(layers_per_block=2)
    else:  # plain down block first, cross-attention deep (as SDXL); odd sizes (upsample_size path)
        kwargs = tiny_unet_kwargs(layers_per_block=2, block_out_channels=(16, 32, 32), down_block_types=(
            "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), up_block_types=(
            "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
    unet = diffusekit.UNet2DConditionModel(**kwargs).eval()
    sample, context = torch.randn(2, 4, 9, 11), torch.randn(2, 5, kwargs["cross_attention_dim"])
    with torch.no_grad():
        reference = unet(sample, 10, context).sample
        branches = unet.num_deep_cache_branches
        assert branches == (6 if layout == "sd" else 9)  # 1 + 3 per block with a downsampler + 2 for the last
        for branch in range(branches):
            full = DeepCacheStep(branch)
            np.testing.assert_array_equal(unet(sample, 10, context, deep_cache=full).sample, reference)
            cached = unet(sample, 10, context, deep_cache=DeepCacheStep(branch, full.feature)).sample
            np.testing.assert_array_equal(cached, reference, err_msg=f"branch {branch}")


def _counted(unet):
    """Forward-call counts of the UNet's blocks and every up-block resnet."""
    counts: dict[str, int] = {}
    modules = {"mid": unet.mid_block, **{f"down{i}": b for i, b in enumerate(unet.down_blocks)},
               **{f"up{i}": b for i, b in enumerate(unet.up_blocks)},
               **{f"up{i}.resnet{j}": r for i, b in enumerate(unet.up_blocks) for j, r in enumerate(b.resnets)},
               **{f"down{i}.resnet{j}": r for i, b in enumerate(unet.down_blocks) for j, r in enumerate(b.resnets)}}
    handles = [m.register_forward_hook(lambda *_, name=name: counts.__setitem__(name, counts.get(name, 0) + 1))
               for name, m in modules.items()]
    return counts, handles


def test_cached_call_skips_the_deep_layers():
    """Tiny SD UNet (one layer per down block, two per up block): skips s0 (conv_in), s1 (down0's layer), s2 (down0's
    downsampler), s3 (down1's layer), eaten by up0.resnet0 (s3), up0.resnet1 (s2), up1.resnet0 (s1), up1.resnet1
    (s0). Branch k runs the down layers making s1..sk and the up layers eating sk..s0; never the mid block."""
    unet = diffusekit.UNet2DConditionModel(**tiny_unet_kwargs()).eval()
    sample, context = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 32)
    full = DeepCacheStep(0)
    with torch.no_grad():
        unet(sample, 1, context, deep_cache=full)
        for branch, ran in [(0, {"up1", "up1.resnet1"}),
                            (1, {"down0", "down0.resnet0", "up1", "up1.resnet0", "up1.resnet1"}),
                            (2, {"down0", "down0.resnet0", "up0", "up0.resnet1", "up1", "up1.resnet0",
                                 "up1.resnet1"}),
                            (3, {"down0", "down0.resnet0", "down1", "down1.resnet0", "up0", "up0.resnet0",
                                 "up0.resnet1", "up1", "up1.resnet0", "up1.resnet1"})]:
            keep = DeepCacheStep(branch)
            unet(sample, 1, context, deep_cache=keep)
            counts, handles = _counted(unet)
            try:
                unet(sample, 1, context, deep_cache=DeepCacheStep(branch, keep.feature))
            finally:
                for h in handles:
                    h.remove()
            assert set(counts) == ran, branch
            assert "mid" not in counts


def test_cached_half_of_a_guided_feature_is_the_conditional_features():
    """An unguided step after a guided full step uses the conditional half of the cached feature: the same as the
    feature of a conditional-only full step (the UNet treats samples independently)."""
    unet = diffusekit.UNet2DConditionModel(**tiny_unet_kwargs()).eval()
    run = DeepCacheRun(DeepCacheConfig(cache_interval=2, cache_branch_id=1), 4)
    sample, context = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    with torch.no_grad():
        step = run.step(0, doubled=True)
        unet(sample, 1, context, deep_cache=step)
        run.keep(step, doubled=True)
        half = run.step(1, doubled=False)
        assert half.reuse and half.cached.shape[0] == 1
        alone = DeepCacheStep(1)
        unet(sample[1:], 1, context[1:], deep_cache=alone)
        torch.testing.assert_close(half.cached, alone.feature, rtol=1e-5, atol=1e-6)
        # a guided step with only conditional features cached runs in full
        run.keep(alone, doubled=False)
        assert not run.step(3, doubled=True).reuse
    assert run.ran == [True, False, True]


def test_bad_unet_branch_is_refused():
    unet = diffusekit.UNet2DConditionModel(**tiny_unet_kwargs()).eval()
    with pytest.raises(ValueError, match="cache_branch_id must be an int from 0 to 3"):
        unet(torch.randn(1, 4, 8, 8), 1, torch.randn(1, 5, 32), deep_cache=DeepCacheStep(4))


# ---------------------------------------------------------------------------------------------------- schedules


def test_schedules():
    assert DeepCacheConfig(cache_interval=3).full_steps(10) == {0, 3, 6, 9}
    assert DeepCacheConfig(cache_interval=1).full_steps(4) == {0, 1, 2, 3}
    steps = sorted(DeepCacheConfig(cache_interval=5, skip_mode="non-uniform").full_steps(50))
    assert len(steps) == 10 and steps[0] == 0 and max(steps) < 50
    gaps = np.diff(steps)
    near = [g for s, g in zip(steps, gaps) if abs(s - 15) <= 8]
    far = [g for s, g in zip(steps, gaps) if s >= 30]
    assert max(near) < min(far)  # denser around the center (30 % of the steps) than at the end


@pytest.mark.parametrize("kwargs, match", [
    ({"cache_interval": 0}, "cache_interval"), ({"cache_interval": "3"}, "cache_interval"),
    ({"cache_interval": 2.0}, "cache_interval"), ({"cache_branch_id": -1}, "cache_branch_id"),
    ({"cache_branch_id": True}, "cache_branch_id"), ({"skip_mode": "random"}, "skip_mode"),
    ({"center": 2}, "center"), ({"pow": 1}, "pow"),
])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DeepCacheConfig(**kwargs)


@pytest.mark.parametrize("value", ["3", 0, (1, 2, 3), {"interval": 3}, 2.5])
def test_bad_call_argument_is_refused(value):
    with pytest.raises(ValueError, match="cache_interval|deep_cache"):
        deep_cache_config(value)


def test_call_argument_forms():
    default = DeepCacheConfig(cache_interval=4)
    assert deep_cache_config(None, default) is default and deep_cache_config(False, default) is None
    assert deep_cache_config(3) == DeepCacheConfig(3, 0)
    assert deep_cache_config((2, 1)) == DeepCacheConfig(2, 1)
    assert deep_cache_config({"cache_interval": 5, "skip_mode": "non-uniform"}) == DeepCacheConfig(5, 0, "non-uniform")


# ---------------------------------------------------------------------------------------------------- pipelines


def _load(folder):
    pipe = diffusekit.DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = diffusekit.DDIMScheduler.from_config(pipe.scheduler.config)  # one UNet call per step
    return pipe


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return _load(build_tiny_sd(tmp_path_factory.mktemp("sd")))


@pytest.fixture(scope="module", params=["sd", "inpaint", "sdxl"])
def case(request, sd, tmp_path_factory):
    if request.param == "sd":
        return sd, {}
    if request.param == "sdxl":
        return _load(build_tiny_sdxl(tmp_path_factory.mktemp("sdxl"))), {}
    pipe = _load(build_tiny_sd(tmp_path_factory.mktemp("inpaint"), pipeline="StableDiffusionInpaintPipeline",
                               unet_in_channels=9))
    image = Image.fromarray(np.linspace(0, 255, 32 * 32 * 3).reshape(32, 32, 3).astype(np.uint8))
    mask = Image.new("L", (32, 32))
    mask.paste(255, (8, 8, 24, 24))
    return pipe, {"image": image, "mask_image": mask, "height": 32, "width": 32}


def _run(pipe, extra=None, **kwargs):
    kwargs = {"prompt": "a red sneaker", "num_inference_steps": STEPS, "guidance_scale": 6.0, "output_type": "np",
              **(extra or {}), **kwargs}
    return pipe(generator=torch.Generator().manual_seed(0), **kwargs).images


def test_off_and_interval_one_are_the_plain_images(case):
    pipe, extra = case
    plain = _run(pipe, extra)
    np.testing.assert_array_equal(_run(pipe, extra, deep_cache=1), plain)
    pipe.enable_deep_cache(cache_interval=3)
    try:
        np.testing.assert_array_equal(_run(pipe, extra, deep_cache=False), plain)
        cached = _run(pipe, extra)
        np.testing.assert_array_equal(_run(pipe, extra, deep_cache=3), cached)
    finally:
        pipe.disable_deep_cache()
    np.testing.assert_array_equal(_run(pipe, extra), plain)
    assert np.abs(cached - plain).max() > 1e-4  # the cache is used (random weights: no bound on how close)


def test_cached_steps_skip_the_deep_blocks(case):
    pipe, extra = case
    unet = pipe.unet
    counts, handles = _counted(unet)
    try:
        _run(pipe, extra, deep_cache={"cache_interval": 3, "cache_branch_id": 0})
    finally:
        for h in handles:
            h.remove()
    assert pipe._deep_cache_run.ran == [True, False, False, True, False, False]
    assert pipe._deep_cache_run.feature is None  # released at the end of the call
    last = len(unet.up_blocks) - 1
    assert counts["mid"] == 2 and counts["down0"] == 2  # full steps only (branch 0: down block 0 is deep too)
    assert counts[f"up{last}.resnet{len(unet.up_blocks[last].resnets) - 1}"] == STEPS  # the branch's up layer
    assert counts[f"up{last}.resnet0"] == counts["up0"] == 2


def test_img2img_strength_starts_with_a_full_step(sd):
    pipe = diffusekit.StableDiffusionImg2ImgPipeline.from_pipe(sd)
    pipe.set_progress_bar_config(disable=True)
    image = Image.fromarray(np.linspace(0, 255, 32 * 32 * 3).reshape(32, 32, 3).astype(np.uint8))
    _run(pipe, image=image, strength=0.5, deep_cache=2)  # steps 3, 4, 5 of 6 run: the first of them in full
    assert pipe._deep_cache_run.ran == [True, False, True]


@pytest.mark.parametrize("interval, ran, batches", [
    ((0.5, 1.0), [True, False, True, True, True, False], [1, 1, 1, 2, 2, 2]),  # guided step 3: no uncond features
    ((0.0, 0.5), [True, False, True, False, True, False], [2, 2, 2, 1, 1, 1]),  # step 3: cond half of step 2's
])
def test_guidance_interval_batch_changes(case, interval, ran, batches):
    pipe, extra = case
    sizes = []
    handle = pipe.unet.register_forward_hook(lambda m, a, k, out: sizes.append(out[0].shape[0]), with_kwargs=True)
    try:
        _run(pipe, extra, guidance_interval=interval, deep_cache=2)
    finally:
        handle.remove()
    assert sizes == batches and pipe._deep_cache_run.ran == ran


def test_callbacks_see_every_step_and_interrupt_stops(sd):
    seen = []

    def callback(p, i, t, tensors):
        seen.append(i)
        if i == 2:
            p._interrupt = True
        return tensors

    _run(sd, deep_cache=2, callback_on_step_end=callback)
    assert seen == [0, 1, 2] and sd._deep_cache_run.ran == [True, False, True]


def test_two_threads_keep_their_own_caches(sd):
    """Two threads step one pipeline in lockstep (a barrier in the callback), one with interval 2, one with 3 and
    the other branch: each gets the image it gets alone."""
    alone = {2: _run(sd, deep_cache=(2, 0)), 3: _run(sd, deep_cache=(3, 1))}
    barrier = threading.Barrier(2, timeout=60)
    results, errors = {}, []

    def work(interval, branch):
        def step(p, i, t, tensors):
            barrier.wait()
            return tensors

        try:
            results[interval] = _run(sd, deep_cache=(interval, branch), callback_on_step_end=step)
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=work, args=args) for args in ((2, 0), (3, 1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for interval in (2, 3):
        np.testing.assert_array_equal(results[interval], alone[interval])


def test_pipeline_refuses_bad_settings(sd):
    with pytest.raises(ValueError, match="cache_branch_id must be below 4"):
        sd.enable_deep_cache(cache_interval=2, cache_branch_id=4)
    with pytest.raises(ValueError, match="cache_interval"):
        sd.enable_deep_cache(cache_interval=0)
    with pytest.raises(ValueError, match="deep_cache"):
        _run(sd, deep_cache="fast")
    assert sd.deep_cache is None
    sd.enable_deep_cache(cache_interval=2, cache_branch_id=3)
    assert sd.deep_cache == DeepCacheConfig(2, 3)
    sd.disable_deep_cache()
    assert sd.deep_cache is None


@pytest.mark.slow
def test_deep_cache_under_optimize_matches_eager():
    """optimize() compiles the full and the cached call as two graphs; both match eager (the feature a compiled
    full step keeps too)."""
    torch.manual_seed(0)
    unet = diffusekit.UNet2DConditionModel(**tiny_unet_kwargs()).eval()
    sample, context = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    with torch.inference_mode():
        eager_full = DeepCacheStep(1)
        eager = unet(sample, 10, context, deep_cache=eager_full).sample
        eager_cached = unet(sample * 0.9, 10, context, deep_cache=DeepCacheStep(1, eager_full.feature)).sample
        unet.optimize(use_cache=False)
        full = DeepCacheStep(1)
        compiled = unet(sample, 10, context, deep_cache=full).sample
        cached = unet(sample * 0.9, 10, context, deep_cache=DeepCacheStep(1, full.feature)).sample
    for got, want in ((compiled, eager), (full.feature, eager_full.feature), (cached, eager_cached)):
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()
