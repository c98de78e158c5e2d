"""Parity of the solver schedulers (UniPC, DPM-Solver multistep / singlestep, DEIS) with diffusers.

Every option combination runs a full sampling loop with a deterministic dummy model in both libraries:

* with diffusers' own float32 training schedule copied in (``use_training_schedule_of``), the timesteps, sigmas and
  final sample must agree to float32 rounding (1e-6): this pins the solver maths;
* end to end (our float64-accumulated training schedule) a representative subset must agree to 1e-5, the size of
  diffusers' float32 ``alphas_cumprod`` rounding.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffusekit
from multistep_helpers import assert_close, case_id, run_loop, use_training_schedule_of

diffusers = pytest.importorskip("diffusers")

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
FLOW = dict(use_flow_sigmas=True, prediction_type="flow_prediction")


def _cases(name, entries):
    """entries: kwargs, or (kwargs, num_inference_steps, set_timesteps_kwargs)."""
    out = []
    for entry in entries:
        kwargs, steps, st = (entry, 10, None) if isinstance(entry, dict) else (entry + (None,))[:3]
        out.append(pytest.param(name, kwargs, steps, st, id=f"{name[:-9]}[{case_id(kwargs)}{'' if steps == 10 else f',n={steps}'}{',' + case_id(st) if st else ''}]"))
    return out


COMMON_OPTIONS = [
    {},
    SD,
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(use_karras_sigmas=True, **SD),
    dict(use_exponential_sigmas=True),
    dict(use_beta_sigmas=True),
    dict(prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True, **SD),
    dict(prediction_type="sample", thresholding=True, sample_max_value=0.5),
    dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.0),
    dict(timestep_spacing="leading", steps_offset=1, **SD),
    dict(timestep_spacing="trailing"),
    dict(trained_betas=[0.0001 + 0.0002 * i for i in range(100)], num_train_timesteps=100),
    dict(FLOW, flow_shift=3.0),
]

UNIPC = _cases("UniPCMultistepScheduler", [
    *COMMON_OPTIONS,
    dict(solver_order=1),
    (dict(solver_order=3), 12),
    (dict(solver_order=3, lower_order_final=False, final_sigmas_type="sigma_min"), 20),
    dict(solver_order=4),
    dict(solver_type="bh1", final_sigmas_type="sigma_min"),
    dict(solver_type="bh1", solver_order=3, final_sigmas_type="sigma_min"),
    dict(predict_x0=False, final_sigmas_type="sigma_min"),
    dict(predict_x0=False, solver_type="bh1", final_sigmas_type="sigma_min", prediction_type="v_prediction"),
    dict(disable_corrector=[0, 2]),
    dict(final_sigmas_type="sigma_min"),
    dict(final_sigmas_type="sigma_min", use_karras_sigmas=True),
    dict(use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0),
    dict(use_exponential_sigmas=True, sigma_min=0.1, sigma_max=10.0),
    dict(prediction_type="v_prediction"),
    dict(FLOW, use_karras_sigmas=True),
    dict(FLOW, shift_terminal=0.1, flow_shift=2.0),
    (dict(FLOW, use_dynamic_shifting=True), 10, dict(num_inference_steps=10, mu=0.7)),
    (dict(FLOW, use_dynamic_shifting=True, time_shift_type="linear"), 10, dict(num_inference_steps=10, mu=1.5)),
    (dict(FLOW), 6, dict(sigmas=np.array([1.0, 0.8, 0.6, 0.45, 0.3, 0.1]))),  # diffusers needs an array
    (dict(lower_order_final=False, final_sigmas_type="sigma_min"), 20),
])

_DPM_ALGOS = []
for _alg in ("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver"):
    for _order in (1, 2, 3):
        for _type in ("midpoint", "heun"):
            if _alg == "sde-dpmsolver" and _order == 3:
                continue
            _kw = dict(algorithm_type=_alg, solver_order=_order, solver_type=_type)
            if not _alg.endswith("++"):
                _kw["final_sigmas_type"] = "sigma_min"
            _DPM_ALGOS.append(_kw)

DPM_MULTI = _cases("DPMSolverMultistepScheduler", [
    *COMMON_OPTIONS,
    *_DPM_ALGOS,
    (dict(solver_order=3), 20),
    (dict(solver_order=3, algorithm_type="sde-dpmsolver++", solver_type="heun"), 16),
    dict(use_lu_lambdas=True),
    dict(use_lu_lambdas=True, beta_schedule="squaredcos_cap_v2"),
    dict(euler_at_final=True, final_sigmas_type="sigma_min"),
    (dict(lower_order_final=False, final_sigmas_type="sigma_min", solver_order=3), 10),
    (dict(lower_order_final=False, final_sigmas_type="sigma_min"), 20),
    dict(final_sigmas_type="sigma_min", use_karras_sigmas=True),
    dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1),
    dict(lambda_min_clipped=-3.0, timestep_spacing="leading"),
    dict(lambda_min_clipped=-3.0, timestep_spacing="trailing"),
    dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min", prediction_type="sample", thresholding=True),
    dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min", prediction_type="v_prediction"),
    dict(prediction_type="v_prediction", use_karras_sigmas=True, **SD),
    dict(algorithm_type="sde-dpmsolver++", use_karras_sigmas=True, **SD),
    dict(solver_type="bh2"),  # a UniPC solver type loads as midpoint
    (dict(), None, dict(timesteps=[999, 800, 640, 500, 300, 150, 40, 5])),
    (dict(algorithm_type="sde-dpmsolver++"), None, dict(timesteps=[999, 700, 400, 100])),
])

DPM_SINGLE = []
for _n in (9, 10, 11):
    for _kw in _DPM_ALGOS:
        if _kw["algorithm_type"] != "sde-dpmsolver":
            DPM_SINGLE.append((_kw, _n))
DPM_SINGLE = _cases("DPMSolverSinglestepScheduler", [
    # singlestep has no timestep_spacing / steps_offset / zero-SNR options
    *[o for o in COMMON_OPTIONS if "timestep_spacing" not in o and "rescale_betas_zero_snr" not in o],
    *DPM_SINGLE,
    dict(lower_order_final=True),
    (dict(final_sigmas_type="sigma_min", solver_order=3), 12),
    (dict(final_sigmas_type="sigma_min", solver_order=3, lower_order_final=True), 10),
    (dict(final_sigmas_type="sigma_min", solver_order=3, lower_order_final=True), 11),
    dict(final_sigmas_type="sigma_min", solver_order=2),
    dict(lambda_min_clipped=-3.0),
    dict(prediction_type="v_prediction", thresholding=True),
    dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min", prediction_type="sample"),
    dict(use_karras_sigmas=True, solver_order=3, algorithm_type="sde-dpmsolver++"),
    (dict(), None, dict(timesteps=[999, 800, 640, 500, 300, 150, 40, 5])),
])

DEIS = _cases("DEISMultistepScheduler", [
    *[o for o in COMMON_OPTIONS if "rescale_betas_zero_snr" not in o],  # DEIS has no zero-SNR option
    dict(prediction_type="v_prediction", timestep_spacing="trailing", **SD),
    dict(solver_order=1),
    dict(solver_order=3),
    (dict(solver_order=3), 20),
    (dict(solver_order=3, lower_order_final=False), 10),
    dict(algorithm_type="dpmsolver++", solver_type="midpoint"),  # a DPM-Solver config loads as DEIS
    dict(prediction_type="v_prediction"),
])

ALL_CASES = UNIPC + DPM_MULTI + DPM_SINGLE + DEIS


def _pair(name, kwargs):
    return getattr(diffusekit, name)(**kwargs), getattr(diffusers, name)(**kwargs)


@pytest.mark.parametrize("name,kwargs,steps,st_kwargs", ALL_CASES)
def test_solver_loop_matches_diffusers(name, kwargs, steps, st_kwargs):
    ours, theirs = _pair(name, kwargs)
    use_training_schedule_of(ours, theirs)
    ours_out = run_loop(ours, steps, st_kwargs)
    theirs_out = run_loop(theirs, steps, st_kwargs)
    assert ours.timesteps.dtype == theirs.timesteps.dtype == torch.int64
    assert torch.equal(ours.timesteps, theirs.timesteps), (ours.timesteps, theirs.timesteps)
    assert_close(ours.sigmas, theirs.sigmas, rtol=1e-7, atol=1e-7)
    assert torch.isfinite(ours_out).all()
    assert_close(ours_out, theirs_out, rtol=1e-6, atol=1e-6)


END_TO_END = [
    pytest.param(name, kwargs, id=f"{name[:-9]}[{case_id(kwargs)}]")
    for name in ("UniPCMultistepScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
                 "DEISMultistepScheduler")
    for kwargs in ({}, SD, dict(use_karras_sigmas=True, **SD), dict(prediction_type="v_prediction", **SD))
]


@pytest.mark.parametrize("name,kwargs", END_TO_END)
def test_solver_end_to_end_with_own_training_schedule(name, kwargs):
    ours, theirs = _pair(name, kwargs)
    ours_out, theirs_out = run_loop(ours, 10), run_loop(theirs, 10)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    assert_close(ours.sigmas, theirs.sigmas, rtol=1e-5, atol=1e-6)
    assert_close(ours_out, theirs_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs", [dict(solver_type="bh1"), dict(lower_order_final=False),
                                    dict(solver_order=3, lower_order_final=False)], ids=case_id)
def test_unipc_step_to_zero_sigma_is_finite_where_diffusers_is_not(kwargs):
    """A step to sigma 0 has h = inf. diffusers' bh1 computes ``x - alpha * B(h) * 0`` with ``B(h) = -inf`` (NaN)
    and without ``lower_order_final`` a higher order divides by r = 0 (inf). We take the first-order update there,
    the only finite one (it returns the data prediction). All earlier steps agree."""
    ours, theirs = _pair("UniPCMultistepScheduler", kwargs)
    use_training_schedule_of(ours, theirs)
    with np.errstate(all="ignore"):
        ours_steps = run_loop(ours, 8, collect=True)
        try:
            theirs_steps = run_loop(theirs, 8, collect=True)
        except RuntimeError:  # singular order-3 system at h = inf
            theirs_steps = None
    if theirs_steps is not None:
        for a, b in zip(ours_steps[:-1], theirs_steps[:-1]):
            assert_close(a, b)
        assert not torch.isfinite(theirs_steps[-1]).all()
    assert torch.isfinite(ours_steps[-1]).all()


def test_unipc_with_solver_p_matches_diffusers():
    ours = diffusekit.UniPCMultistepScheduler(solver_p=diffusekit.DPMSolverMultistepScheduler(solver_order=1))
    theirs = diffusers.UniPCMultistepScheduler(solver_p=diffusers.DPMSolverMultistepScheduler(solver_order=1))
    use_training_schedule_of(ours, theirs)
    use_training_schedule_of(ours.solver_p, theirs.solver_p)
    assert_close(run_loop(ours, 8), run_loop(theirs, 8))


def test_dpm_learned_variance_output_is_split():
    for kwargs in (dict(variance_type="learned_range"), dict(variance_type="learned", algorithm_type="dpmsolver",
                                                             final_sigmas_type="sigma_min")):
        ours, theirs = _pair("DPMSolverMultistepScheduler", kwargs)
        use_training_schedule_of(ours, theirs)
        assert_close(run_loop(ours, 6, model_channels_factor=2), run_loop(theirs, 6, model_channels_factor=2))


def test_sde_variance_noise_argument():
    """``variance_noise`` replaces the generator draw (same numbers as diffusers)."""
    ours, theirs = _pair("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++"))
    use_training_schedule_of(ours, theirs)
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    results = []
    for s in (ours, theirs):
        s.set_timesteps(5)
        x = torch.ones(2, 3, 4, 4)
        for t in s.timesteps:
            x = s.step(0.5 * x, t, x, variance_noise=noise).prev_sample
        results.append(x)
    assert_close(results[0], results[1])


@pytest.mark.parametrize("name", ["UniPCMultistepScheduler", "DPMSolverMultistepScheduler",
                                  "DPMSolverSinglestepScheduler", "DEISMultistepScheduler"])
@pytest.mark.parametrize("begin", [3, 5])
def test_img2img_start_matches_diffusers(name, begin):
    """Starting partway (``set_begin_index`` + ``add_noise`` at that timestep), as img2img pipelines do."""
    kwargs = dict(algorithm_type="sde-dpmsolver++") if name == "DPMSolverMultistepScheduler" else {}
    ours, theirs = _pair(name, kwargs)
    use_training_schedule_of(ours, theirs)
    assert_close(run_loop(ours, 10, begin_index=begin), run_loop(theirs, 10, begin_index=begin))


@pytest.mark.parametrize("name", ["UniPCMultistepScheduler", "DPMSolverMultistepScheduler",
                                  "DPMSolverSinglestepScheduler", "DEISMultistepScheduler"])
def test_add_noise_matches_diffusers_at_any_timestep(name):
    ours, theirs = _pair(name, SD)
    use_training_schedule_of(ours, theirs)
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    x0 = torch.randn(4, 3, 4, 4)
    noise = torch.randn(4, 3, 4, 4)
    for idx in ([0, 3, 7, 9], [9, 9, 1, 0]):
        t = ours.timesteps[idx]
        assert_close(ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t))


def test_duplicated_first_timestep_starts_at_zero():
    """Karras sigmas over a cosine schedule truncate to repeated timesteps; diffusers then starts at index 1 and
    runs off the end. We start a fresh run at 0."""
    s = diffusekit.DPMSolverMultistepScheduler(beta_schedule="squaredcos_cap_v2", use_karras_sigmas=True)
    s.set_timesteps(10)
    assert s.timesteps[0] == s.timesteps[1]
    out = run_loop(s, 10)
    assert torch.isfinite(out).all() and s.step_index == 10
