"""Helpers for the scheduler parity tests: a deterministic dummy denoiser loop and diffusers oracles."""

from __future__ import annotations

import inspect
import warnings

import torch

SHAPE = (2, 3, 4, 4)


def fixed_tensors(shape=SHAPE):
    """(fixed model term, initial noise): the same for every run."""
    fixed = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    start = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    return fixed, start


def dummy_model(sample: torch.Tensor, t, fixed: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
    """A deterministic stand-in for a denoiser: depends on the input and on t, bounded for every parameterisation."""
    t = torch.as_tensor(t, dtype=torch.float32)
    return sample * (t / num_train_timesteps) + 0.1 * fixed


def run_loop(
    scheduler,
    num_inference_steps=10,
    set_timesteps_kwargs: dict | None = None,
    seed: int | None = 0,
    begin_index: int | None = None,
    model_channels_factor: int = 1,
    collect: bool = False,
):
    """Full sampling loop with ``dummy_model``; returns the final sample (or every step's sample with ``collect``).

    A generator seeded with ``seed`` goes to ``step`` when its signature takes one (diffusers' deterministic
    schedulers do not). ``begin_index``: start partway, img2img style (``add_noise`` at that timestep first).
    """
    kwargs = dict(set_timesteps_kwargs or {})
    if "timesteps" not in kwargs and "sigmas" not in kwargs:
        kwargs["num_inference_steps"] = num_inference_steps
    scheduler.set_timesteps(**kwargs)
    fixed, start = fixed_tensors()
    timesteps = scheduler.timesteps
    sample = start * scheduler.init_noise_sigma
    if begin_index is not None:
        scheduler.set_begin_index(begin_index)
        timesteps = timesteps[begin_index:]
        sample = scheduler.add_noise(fixed, start, timesteps[:1].repeat(SHAPE[0]))
    step_params = inspect.signature(scheduler.step).parameters
    step_kwargs = {}
    if "generator" in step_params and seed is not None:
        step_kwargs["generator"] = torch.Generator().manual_seed(seed)
    samples = []
    num_train = scheduler.config.num_train_timesteps
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in timesteps:
            model_input = scheduler.scale_model_input(sample, t)
            out = dummy_model(model_input, t, fixed, num_train)
            if model_channels_factor > 1:  # models that also predict a variance
                out = torch.cat([out] + [torch.full_like(out, 0.3)] * (model_channels_factor - 1), dim=1)
            sample = scheduler.step(out, t, sample, **step_kwargs).prev_sample
            samples.append(sample)
    return samples if collect else sample


def use_training_schedule_of(ours, theirs):
    """Give ``ours`` diffusers' float32 training schedule (diffusers accumulates alphas_cumprod in float32, we in
    float64): isolates the solver maths, which must then agree to float32 rounding."""
    ours.alphas_cumprod = theirs.alphas_cumprod.clone()
    if hasattr(ours, "_derive_from_alphas_cumprod"):
        ours._derive_from_alphas_cumprod()
    return ours


def case_id(kwargs: dict) -> str:
    def short(v):
        text = str(v.tolist() if hasattr(v, "tolist") else v)
        return text if len(text) <= 24 else text[:20] + "..."

    return ",".join(f"{k}={short(v)}" for k, v in kwargs.items()) or "default"


def assert_close(actual, expected, rtol=1e-6, atol=1e-6, msg=""):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, msg=msg or None)
