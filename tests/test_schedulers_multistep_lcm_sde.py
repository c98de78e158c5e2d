"""Parity of LCMScheduler and DPMSolverSDEScheduler with diffusers (see test_schedulers_multistep.py for the method)."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

import diffusekit
from multistep_helpers import assert_close, case_id, run_loop, use_training_schedule_of

diffusers = pytest.importorskip("diffusers")

LCM_CASES = [
    (dict(), None),
    (dict(prediction_type="v_prediction", timestep_scaling=5.0), None),
    (dict(prediction_type="sample", clip_sample=True, clip_sample_range=0.5), None),
    (dict(thresholding=True, sample_max_value=2.0), None),
    (dict(set_alpha_to_one=False, rescale_betas_zero_snr=True, prediction_type="v_prediction"), None),
    (dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02), None),
    (dict(beta_schedule="squaredcos_cap_v2"), None),
    (dict(original_inference_steps=20), None),
    (dict(), dict(num_inference_steps=4, original_inference_steps=30)),
    (dict(), dict(num_inference_steps=4, strength=0.5)),
    (dict(), dict(num_inference_steps=8)),
    (dict(), dict(num_inference_steps=1)),
    (dict(), dict(timesteps=[999, 759, 499, 259])),
    (dict(), dict(timesteps=[999, 759, 499, 259], strength=0.5)),
]


@pytest.mark.parametrize("kwargs,st", LCM_CASES, ids=[case_id(k) + (f";{case_id(s)}" if s else "") for k, s in LCM_CASES])
def test_lcm_matches_diffusers(kwargs, st):
    ours, theirs = diffusekit.LCMScheduler(**kwargs), diffusers.LCMScheduler(**kwargs)
    use_training_schedule_of(ours, theirs)
    a, b = run_loop(ours, 4, st), run_loop(theirs, 4, st)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    assert_close(a, b)


def test_lcm_end_to_end_and_outputs():
    ours, theirs = diffusekit.LCMScheduler(), diffusers.LCMScheduler()
    assert_close(run_loop(ours, 4), run_loop(theirs, 4), rtol=1e-5, atol=1e-5)
    ours.set_timesteps(4)
    x = torch.randn(2, 3, 4, 4)
    out = ours.step(0.1 * x, ours.timesteps[0], x, generator=torch.Generator().manual_seed(0))
    assert out.denoised is not None and out[1] is out.denoised
    assert ours.step(0.1 * x, ours.timesteps[1], x, return_dict=False)[0].shape == x.shape


def test_lcm_rejects_bad_schedules():
    s = diffusekit.LCMScheduler()
    with pytest.raises(ValueError, match="original_inference_steps"):
        s.set_timesteps(60)
    with pytest.raises(ValueError, match="descending"):
        s.set_timesteps(timesteps=[259, 499])
    with pytest.raises(ValueError, match="exactly one"):
        s.set_timesteps()


# ---- DPMSolverSDEScheduler ------------------------------------------------------------------------------------------

torchsde_missing = pytest.mark.skipif(
    __import__("importlib").util.find_spec("torchsde") is None, reason="torchsde not installed"
)

SDE_CASES = [
    dict(noise_sampler_seed=3),
    dict(noise_sampler_seed=3, prediction_type="v_prediction"),
    dict(noise_sampler_seed=[3, 4]),
    dict(noise_sampler_seed=3, use_karras_sigmas=True, beta_schedule="scaled_linear"),
    dict(noise_sampler_seed=3, use_exponential_sigmas=True),
    dict(noise_sampler_seed=3, timestep_spacing="leading", steps_offset=1),
    dict(noise_sampler_seed=3, timestep_spacing="trailing"),
]


@torchsde_missing
@pytest.mark.parametrize("kwargs", SDE_CASES, ids=case_id)
def test_dpmsolver_sde_matches_diffusers(kwargs):
    """Brownian-tree noise is queried at the schedule's sigmas and is only Hoelder-1/2 continuous in them, so
    parity needs identical sigmas: diffusers' float32 training schedule is used on both sides."""
    ours, theirs = diffusekit.DPMSolverSDEScheduler(**kwargs), diffusers.DPMSolverSDEScheduler(**kwargs)
    use_training_schedule_of(ours, theirs)
    a, b = run_loop(ours, 6, seed=None), run_loop(theirs, 6)
    assert ours.timesteps.dtype == torch.float32
    assert_close(ours.timesteps, theirs.timesteps.float(), rtol=1e-7, atol=0)
    assert_close(ours.sigmas, theirs.sigmas, rtol=0, atol=0)
    assert_close(a, b)


@torchsde_missing
def test_dpmsolver_sde_schedule_end_to_end():
    ours, theirs = diffusekit.DPMSolverSDEScheduler(use_karras_sigmas=True), diffusers.DPMSolverSDEScheduler(
        use_karras_sigmas=True)
    ours.set_timesteps(8)
    theirs.set_timesteps(8)
    assert_close(ours.timesteps, theirs.timesteps.float(), rtol=1e-5, atol=1e-4)
    assert_close(ours.sigmas, theirs.sigmas, rtol=1e-5, atol=1e-6)
    assert_close(torch.as_tensor(ours.init_noise_sigma), torch.as_tensor(theirs.init_noise_sigma), rtol=1e-5)


@torchsde_missing
def test_dpmsolver_sde_generator_seeds_the_tree():
    """Without noise_sampler_seed, ``step(generator=)`` makes runs reproducible (diffusers uses the global RNG)."""
    runs = [run_loop(diffusekit.DPMSolverSDEScheduler(), 5, seed=s) for s in (7, 7, 8)]
    assert_close(runs[0], runs[1], rtol=0, atol=0)
    assert not torch.allclose(runs[0], runs[2])


@torchsde_missing
def test_dpmsolver_sde_copy_mid_run_is_independent():
    s = diffusekit.DPMSolverSDEScheduler(noise_sampler_seed=1)
    s.set_timesteps(4)
    x = torch.randn(2, 3, 4, 4)
    x = s.step(0.1 * x, s.timesteps[0], x).prev_sample
    twin = copy.copy(s)
    assert twin.noise_sampler is not s.noise_sampler and twin.sample is s.sample
    rest = []
    for sched in (s, twin):
        y = x
        for t in sched.timesteps[1:]:
            y = sched.step(0.1 * y, t, y).prev_sample
        rest.append(y)
    assert_close(rest[0], rest[1], rtol=0, atol=0)


def test_dpmsolver_sde_without_torchsde_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchsde", None)  # makes `import torchsde` raise ImportError
    with pytest.raises(ImportError, match="pip install torchsde"):
        diffusekit.DPMSolverSDEScheduler()


@torchsde_missing
def test_dpmsolver_sde_rejects_sample_prediction():
    with pytest.raises(ValueError, match="prediction_type"):
        diffusekit.DPMSolverSDEScheduler(prediction_type="sample")
