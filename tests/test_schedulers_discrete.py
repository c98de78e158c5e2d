"""DDPM, DDIM and PNDM: parity with diffusers per option, and the documented schedule-array difference."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch

from diffusekit.schedulers.ddim import DDIMScheduler
from diffusekit.schedulers.ddpm import DDPMScheduler
from diffusekit.schedulers.pndm import PNDMScheduler
from scheduler_helpers import (
    EXACT,
    adopt_train_schedule,
    assert_close,
    check_parity,
    dummy_model,
    learned_variance_model,
    rel_err,
    run_loop,
)

N = {"num_inference_steps": 5}
TRAINED = np.linspace(1e-4, 0.03, 1000).tolist()

# one option at a time (plus a few meaningful combinations), each with a step count
DDPM_CASES = [
    ({}, N),
    ({"beta_schedule": "scaled_linear"}, {"num_inference_steps": 7}),
    ({"beta_schedule": "squaredcos_cap_v2"}, N),
    ({"beta_schedule": "sigmoid"}, N),
    ({"beta_schedule": "laplace"}, {"num_inference_steps": 3}),
    ({"trained_betas": TRAINED}, N),
    ({"prediction_type": "v_prediction"}, N),
    ({"prediction_type": "sample"}, N),
    ({"variance_type": "fixed_small_log"}, N),
    ({"variance_type": "fixed_large"}, N),
    ({"clip_sample": False}, N),
    ({"clip_sample_range": 0.5}, N),
    ({"thresholding": True, "sample_max_value": 1.5, "dynamic_thresholding_ratio": 0.9}, N),
    ({"timestep_spacing": "trailing"}, {"num_inference_steps": 8}),
    ({"timestep_spacing": "linspace"}, {"num_inference_steps": 6}),  # DDPM itself uses the schedule array
    ({"steps_offset": 1}, N),
    ({"rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}, N),
    ({"num_train_timesteps": 100}, {"num_inference_steps": 100}),
    ({}, {"timesteps": [980, 700, 311, 50, 3]}),
]


@pytest.mark.parametrize("config,set_kwargs", DDPM_CASES, ids=[f"{c}-{s}" for c, s in DDPM_CASES])
def test_ddpm_parity(config, set_kwargs):
    check_parity(DDPMScheduler, diffusers.DDPMScheduler, config, set_kwargs)


@pytest.mark.parametrize("variance_type", ["learned", "learned_range"])
def test_ddpm_learned_variance_parity(variance_type):
    check_parity(DDPMScheduler, diffusers.DDPMScheduler, {"variance_type": variance_type}, N,
                 model=learned_variance_model)


def test_ddpm_fixed_large_log_is_fixed_large_in_log_form():
    """diffusers takes sqrt(log(beta)) here (NaN); ours uses std = exp(0.5 * log(beta)) = sqrt(beta)."""
    a = run_loop(DDPMScheduler(variance_type="fixed_large_log"), N)
    b = run_loop(DDPMScheduler(variance_type="fixed_large"), N)
    assert torch.isfinite(a).all()
    assert_close(a, b, 1e-6, "fixed_large_log vs fixed_large")
    assert not torch.isfinite(run_loop(diffusers.DDPMScheduler(variance_type="fixed_large_log"), N)).all()


def test_ddpm_learned_variance_needs_variance_channels():
    s = DDPMScheduler(variance_type="learned")
    s.set_timesteps(3)
    x = torch.zeros(1, 3, 4, 4)
    with pytest.raises(ValueError, match="twice the sample's channels"):
        s.step(torch.zeros_like(x), s.timesteps[0], x)


def test_ddpm_without_set_timesteps_steps_one_training_step():
    ours, theirs = DDPMScheduler(), diffusers.DDPMScheduler()
    adopt_train_schedule(ours, theirs)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    for t in (999, 500, 1):
        a = ours.step(dummy_model(x, t), t, x, generator=torch.Generator().manual_seed(t)).prev_sample
        b = theirs.step(dummy_model(x, t), t, x, generator=torch.Generator().manual_seed(t)).prev_sample
        assert_close(a, b, EXACT, f"t={t}")
    assert ours.previous_timestep(500) == 499


DDIM_CASES = [
    ({}, N, {}),
    ({"beta_schedule": "scaled_linear", "steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False},
     {"num_inference_steps": 10}, {}),
    ({"beta_schedule": "squaredcos_cap_v2"}, N, {}),
    ({"trained_betas": TRAINED}, N, {}),
    ({"prediction_type": "v_prediction"}, N, {}),
    ({"prediction_type": "sample"}, N, {}),
    ({"clip_sample": False}, {"num_inference_steps": 8}, {}),
    ({"clip_sample_range": 0.7}, N, {"use_clipped_model_output": True}),
    ({"thresholding": True, "sample_max_value": 2.0}, N, {}),
    ({"set_alpha_to_one": False}, N, {}),
    ({"timestep_spacing": "trailing"}, {"num_inference_steps": 4}, {}),  # 4 divides 1000: same as diffusers
    ({"timestep_spacing": "trailing", "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"},
     {"num_inference_steps": 5}, {}),
    ({"steps_offset": 1}, {"num_inference_steps": 3}, {}),  # leading: 1000 // 3 stride is the schedule
    ({}, N, {"eta": 0.5}),
    ({"clip_sample": False}, {"num_inference_steps": 6}, {"eta": 1.0, "use_clipped_model_output": True}),
]


@pytest.mark.parametrize("config,set_kwargs,step_kwargs", DDIM_CASES,
                         ids=[f"{c}-{s}-{k}" for c, s, k in DDIM_CASES])
def test_ddim_parity(config, set_kwargs, step_kwargs):
    check_parity(DDIMScheduler, diffusers.DDIMScheduler, config, set_kwargs, step_kwargs)


def test_ddim_variance_noise_equals_generator_noise():
    s = DDIMScheduler()
    s.set_timesteps(4)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    t = s.timesteps[1]
    a = s.step(dummy_model(x, t), t, x, eta=1.0, generator=torch.Generator().manual_seed(5)).prev_sample
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    b = s.step(dummy_model(x, t), t, x, eta=1.0, variance_noise=noise).prev_sample
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="not both"):
        s.step(dummy_model(x, t), t, x, eta=1.0, variance_noise=noise, generator=torch.Generator())


def ddim_reference(scheduler, schedule, x, eta=0.0):
    """A DDIM loop written out from the paper, the previous timestep being the next entry of ``schedule``."""
    ac = scheduler.alphas_cumprod.double()
    x = x.double()
    for i, t in enumerate(schedule):
        a_t = ac[t]
        a_prev = ac[schedule[i + 1]] if i + 1 < len(schedule) else torch.tensor(1.0, dtype=torch.float64)
        eps = dummy_model(x.float(), t).double()
        x0 = ((x - (1 - a_t) ** 0.5 * eps) / a_t**0.5).clamp(-1, 1)
        x = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps
    return x.float()


@pytest.mark.parametrize("spacing,steps", [("linspace", 10), ("linspace", 4), ("trailing", 7), ("trailing", 3)])
def test_ddim_follows_schedule_array_where_diffusers_strides(spacing, steps):
    """diffusers issue #9261: diffusers' DDIM steps to ``t - 1000 // n`` (not in the schedule for linspace spacing,
    nor for trailing spacing when n does not divide 1000). Ours steps to the next scheduled timestep."""
    ours, theirs = DDIMScheduler(timestep_spacing=spacing), diffusers.DDIMScheduler(timestep_spacing=spacing)
    adopt_train_schedule(ours, theirs)
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    assert torch.equal(ours.timesteps, theirs.timesteps)  # same schedule ...
    schedule = ours.timesteps.tolist()
    stride = 1000 // steps
    assert any(t - stride not in schedule + [min(schedule) - stride] for t in schedule[:-1])  # ... which is uneven
    for t, t_next in zip(schedule, schedule[1:] + [-1]):
        assert ours.previous_timestep(t) == t_next

    start = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    a = run_loop(ours, {"num_inference_steps": steps}, start=start)
    b = run_loop(theirs, {"num_inference_steps": steps}, start=start)
    ref = ddim_reference(ours, schedule, start)
    assert_close(a, ref, 1e-5, "ours vs the schedule-array reference")
    assert rel_err(b, ref) > 1e-4, "diffusers was expected to differ here (stride-based previous timestep)"


def test_ddim_reference_agrees_with_diffusers_where_stride_is_right():
    """The same reference matches diffusers for leading spacing: the reference itself is sound."""
    theirs = diffusers.DDIMScheduler()
    theirs.set_timesteps(5)
    start = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    b = run_loop(theirs, N, start=start)
    assert_close(b, ddim_reference(theirs, theirs.timesteps.tolist(), start), 1e-5, "diffusers vs reference")


def test_ddim_custom_timesteps_follow_the_same_rule():
    s = DDIMScheduler(clip_sample=False)
    s.set_timesteps(timesteps=[901, 650, 402, 121, 7])
    assert s.timesteps.dtype == torch.int64 and s.num_inference_steps == 5
    assert [s.previous_timestep(t) for t in s.timesteps.tolist()] == [650, 402, 121, 7, -1]
    start = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    a = run_loop(s, {"timesteps": [901, 650, 402, 121, 7]}, start=start)
    s2 = DDIMScheduler(clip_sample=True)
    assert_close(run_loop(s2, {"timesteps": [901, 650, 402, 121, 7]}, start=start),
                 ddim_reference(s2, [901, 650, 402, 121, 7], start), 1e-5, "custom timesteps vs reference")
    assert torch.isfinite(a).all()


def test_ddim_step_at_unknown_timestep_is_a_clear_error():
    s = DDIMScheduler()
    s.set_timesteps(5)
    x = torch.zeros(1, 3, 4, 4)
    with pytest.raises(ValueError, match="not in the current schedule"):
        s.step(x, 123, x)
    with pytest.raises(ValueError, match="set_timesteps"):
        DDIMScheduler().step(x, 999, x)


PNDM_CASES = [
    ({}, {"num_inference_steps": 6}),
    ({"skip_prk_steps": True}, {"num_inference_steps": 6}),
    ({"skip_prk_steps": True}, {"num_inference_steps": 1}),
    ({"skip_prk_steps": True}, {"num_inference_steps": 2}),
    ({"skip_prk_steps": True, "steps_offset": 1, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
      "beta_end": 0.012, "set_alpha_to_one": False}, {"num_inference_steps": 10}),  # Stable Diffusion 1.x
    ({"beta_schedule": "squaredcos_cap_v2"}, {"num_inference_steps": 5}),
    ({"trained_betas": TRAINED, "skip_prk_steps": True}, {"num_inference_steps": 4}),
    ({"prediction_type": "v_prediction"}, {"num_inference_steps": 5}),
    ({"prediction_type": "v_prediction", "skip_prk_steps": True}, {"num_inference_steps": 5}),
    ({"set_alpha_to_one": True}, {"num_inference_steps": 4}),
    ({"timestep_spacing": "trailing"}, {"num_inference_steps": 5}),
    ({"timestep_spacing": "trailing", "skip_prk_steps": True}, {"num_inference_steps": 8}),
    ({"steps_offset": 1}, {"num_inference_steps": 5}),
]


@pytest.mark.parametrize("config,set_kwargs", PNDM_CASES, ids=[f"{c}-{s}" for c, s in PNDM_CASES])
def test_pndm_parity(config, set_kwargs):
    check_parity(PNDMScheduler, diffusers.PNDMScheduler, config, set_kwargs)


@pytest.mark.parametrize("skip_prk_steps", [False, True])
def test_pndm_linspace_follows_schedule_array(skip_prk_steps):
    """With linspace spacing diffusers' PNDM steps by the stride ``1000 // n``; ours by the schedule. The evaluation
    timesteps of the PLMS part agree; the results differ."""
    cfg = {"timestep_spacing": "linspace", "skip_prk_steps": skip_prk_steps}
    ours, theirs = PNDMScheduler(**cfg), diffusers.PNDMScheduler(**cfg)
    adopt_train_schedule(ours, theirs)
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    n_plms = len(ours.plms_timesteps)
    assert torch.equal(ours.timesteps[-n_plms:], theirs.timesteps[-n_plms:])
    base = np.round(np.linspace(0, 999, 10))[::-1].astype(int).tolist()  # 999, 888, ..., 0
    successor = dict(zip(base, base[1:] + [-1]))
    n_prk = len(ours.prk_timesteps)
    for f, t in zip(ours._froms[n_prk:], ours._tos[n_prk:]):  # every PLMS step goes to the next scheduled timestep
        assert t == successor[f], (f, t)
    if not skip_prk_steps:  # Runge-Kutta midpoints halve the real step: 999 -> 888 has its midpoint at 943
        assert ours.prk_timesteps[:4].tolist() == [999, 943, 943, 888]
    a = run_loop(ours, {"num_inference_steps": 10})
    b = run_loop(theirs, {"num_inference_steps": 10})
    assert torch.isfinite(a).all() and rel_err(a, b) > 1e-4


def test_pndm_odd_stride_runge_kutta_lands_on_its_midpoint():
    """Stride 125: the midpoint of 999 -> 874 is 936, where the model is evaluated next; the sub-step targets it
    (diffusers' targets 999 - 62 = 937). The PLMS part and all evaluation timesteps equal diffusers'."""
    ours, theirs = PNDMScheduler(), diffusers.PNDMScheduler()
    adopt_train_schedule(ours, theirs)
    ours.set_timesteps(8)
    theirs.set_timesteps(8)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    assert ours.timesteps[:4].tolist() == [875, 812, 812, 750]  # leading: 875 -> 750, midpoint 812
    assert ours._tos[:4] == [812, 812, 750, 750]
    assert rel_err(run_loop(ours, {"num_inference_steps": 8}), run_loop(theirs, {"num_inference_steps": 8})) > 1e-5


def test_pndm_few_steps_without_skip_is_a_clear_error():
    with pytest.raises(ValueError, match="skip_prk_steps"):
        PNDMScheduler().set_timesteps(3)


@pytest.mark.parametrize("num_inference_steps", [4, 7])
def test_pndm_part_way_run_takes_every_remaining_step_once(num_inference_steps):
    """img2img starts PNDM at ``begin_index``: each evaluation then moves the sample one base step, ending at the
    final alpha (diffusers restarts its Heun warm-up there and skips a step: a deliberate difference)."""
    import torch

    from diffusekit import PNDMScheduler

    for begin in range(num_inference_steps + 1):
        s = PNDMScheduler(skip_prk_steps=True, steps_offset=1)
        s.set_timesteps(num_inference_steps)
        s.set_begin_index(begin)
        moves = []
        transfer = s._transfer
        s._transfer = lambda x, t, prev, out: (moves.append((t, prev)), transfer(x, t, prev, out))[1]
        x = torch.zeros(2)
        for t in s.timesteps[begin:]:
            x = s.step(torch.zeros(2), t, x).prev_sample
        if begin == 0:
            continue  # the full run: covered by the parity tests
        starts = [t for t, _ in moves]
        assert starts[0] == int(s.timesteps[max(begin, 2)])  # the first step starts where the run begins
        assert all(prev == t for (_, prev), (t, _) in zip(moves, moves[1:]))  # contiguous
        assert moves[-1][1] == -1  # ends at the final alpha


def test_pndm_part_way_needs_skip_prk_steps():
    import torch

    from diffusekit import PNDMScheduler

    s = PNDMScheduler(skip_prk_steps=False)
    s.set_timesteps(10)
    s.set_begin_index(5)
    with pytest.raises(ValueError, match="needs skip_prk_steps=True"):
        s.step(torch.zeros(1), s.timesteps[5], torch.zeros(1))
