"""Shared helpers of the scheduler parity tests: a deterministic dummy model loop and comparisons with diffusers."""

from __future__ import annotations

import copy
import inspect
import logging

import torch

SHAPE = (2, 3, 4, 4)

# Tolerances, relative to max(1, max|reference|):
# * EXACT: both libraries use the same float32 training schedule (``adopt_train_schedule``): only operation order
#   may differ, so results agree to float32 rounding (most are bit-identical).
# * OWN: each library uses its own training schedule. Ours is computed in float64 then cast; diffusers' float32
#   cumprod carries ~2e-6 relative rounding error at the tail, which a sampling loop carries through.
EXACT = 1e-6
OWN = 5e-5


def quiet():
    """Silence the "call scale_model_input" warnings diffusers logs on purpose-built loops."""
    logging.getLogger("diffusers").setLevel(logging.ERROR)


def dummy_model(sample: torch.Tensor, t) -> torch.Tensor:
    """A fixed, timestep-dependent 'model': ``0.1 * x * t / 1000 + c`` (c a fixed tensor)."""
    c = torch.linspace(-1, 1, sample[0].numel()).reshape(sample.shape[1:]).to(sample)
    return 0.1 * sample * (float(t) / 1000) + c


def learned_variance_model(sample: torch.Tensor, t) -> torch.Tensor:
    """Twice the channels: eps then a "predicted variance" in (0, 1) (a variance for learned, a log-range
    fraction for learned_range)."""
    return torch.cat([dummy_model(sample, t), torch.sigmoid(sample)], dim=1)


def adopt_train_schedule(ours, theirs) -> None:
    """Give ``ours`` diffusers' float32 training schedule (and what derives from it at construction)."""
    ours.betas, ours.alphas, ours.alphas_cumprod = theirs.betas, theirs.alphas, theirs.alphas_cumprod
    if hasattr(theirs, "final_alpha_cumprod"):
        ours.final_alpha_cumprod = theirs.final_alpha_cumprod


def run_loop(scheduler, set_kwargs=None, step_kwargs=None, model=dummy_model, seed: int = 0, start=None):
    """Full sampling loop; returns the final sample. The generator is passed when ``step`` accepts one."""
    scheduler.set_timesteps(**(set_kwargs or {"num_inference_steps": 5}))
    gen = torch.Generator().manual_seed(seed)
    if start is None:
        start = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1234 + seed))
    x = start * scheduler.init_noise_sigma
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    for t in scheduler.timesteps:
        kwargs = dict(step_kwargs or {})
        if takes_generator:
            kwargs["generator"] = gen
        model_output = model(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(model_output, t, x, **kwargs).prev_sample
    return x


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max(1, max|b|)."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).abs().max() / max(1.0, float(b.abs().max())))


def assert_close(a, b, tol: float, what: str = "") -> None:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert torch.isfinite(b).all() == torch.isfinite(a).all(), f"{what}: non-finite values differ"
    err = rel_err(a, b)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.1g}"


_DEFAULTS: dict = {}


def theirs_default(theirs_cls):
    """A fresh diffusers scheduler with its default config (constructed once, then deep-copied: diffusers' KDPM2
    constructors take ~0.5 s)."""
    if theirs_cls not in _DEFAULTS:
        _DEFAULTS[theirs_cls] = theirs_cls()
    return copy.deepcopy(_DEFAULTS[theirs_cls])


def make_theirs(theirs_cls, config: dict):
    """diffusers' scheduler for ``config``. Several diffusers constructors run a 1000-step ``set_timesteps``, which
    with ``use_beta_sigmas`` means 1000 scipy quantile calls (seconds): build those without the flag and switch it
    on afterwards (only ``set_timesteps`` reads it)."""
    if config.get("use_beta_sigmas"):
        theirs = theirs_cls(**{**config, "use_beta_sigmas": False})
        theirs.register_to_config(use_beta_sigmas=True)
        assert theirs.config.use_beta_sigmas
        return theirs
    return theirs_cls(**config) if config else theirs_default(theirs_cls)


def check_parity(ours_cls, theirs_cls, config: dict, set_kwargs: dict, step_kwargs=None, model=dummy_model,
                 own_tol: float | None = None):
    """Schedule and full-loop parity with diffusers, in both the shared-schedule and own-schedule modes.

    ``own_tol`` loosens the own-schedule comparison for ill-conditioned configurations (see callers).
    """
    quiet()
    ours, theirs = ours_cls(**config), make_theirs(theirs_cls, config)
    fresh_ours, fresh_theirs = copy.deepcopy(ours), copy.deepcopy(theirs)  # some diffusers inits are slow
    # training schedule: ours is float64-then-cast, so equal to ~float32 cumprod rounding
    assert_close(ours.alphas_cumprod, theirs.alphas_cumprod, 2e-5, "alphas_cumprod")

    adopt_train_schedule(ours, theirs)
    ours.set_timesteps(**set_kwargs)
    theirs.set_timesteps(**set_kwargs)
    assert ours.timesteps.shape == theirs.timesteps.shape, (ours.timesteps, theirs.timesteps)
    if ours.timesteps.dtype == torch.int64:
        assert theirs.timesteps.dtype == torch.int64
        assert torch.equal(ours.timesteps, theirs.timesteps), (ours.timesteps, theirs.timesteps)
    else:
        assert ours.timesteps.dtype == torch.float32
        assert_close(ours.timesteps, theirs.timesteps, 2e-6, "timesteps")
    if hasattr(theirs, "sigmas"):
        assert_close(ours.sigmas, theirs.sigmas, EXACT, "sigmas")
    assert_close(torch.as_tensor(ours.init_noise_sigma), torch.as_tensor(theirs.init_noise_sigma), EXACT,
                 "init_noise_sigma")

    a = run_loop(ours, set_kwargs, step_kwargs, model)
    b = run_loop(theirs, set_kwargs, step_kwargs, model)
    assert torch.isfinite(b).all()
    assert_close(a, b, EXACT, "final sample (shared training schedule)")

    a = run_loop(fresh_ours, set_kwargs, step_kwargs, model)
    b = run_loop(fresh_theirs, set_kwargs, step_kwargs, model)
    assert_close(a, b, OWN if own_tol is None else own_tol, "final sample (own training schedules)")
    return a
