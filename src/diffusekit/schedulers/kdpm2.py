"""KDPM2: the DPM-Solver-2 sampler of k-diffusion (``sample_dpm_2``)."""

from __future__ import annotations

import numpy as np
import torch

from ..configuration import register_to_config
from . import core
from .base import SchedulerMixin, SchedulerOutput, SigmaSchedulerMixin

KDPM2DiscreteSchedulerOutput = SchedulerOutput


def repeat_evaluations(values: torch.Tensor) -> torch.Tensor:
    """Per-evaluation layout of a per-step array: ``[v0, v1, v1, v2, v2, ..., vN, vN, vN]``."""
    return torch.cat([values[:1], values[1:].repeat_interleave(2), values[-1:]])


def interleaved_timesteps(
    ts: np.ndarray, sigmas_interpol: torch.Tensor, log_sigmas: np.ndarray, ancestral: bool
) -> torch.Tensor:
    """Evaluation timesteps of KDPM2 / KDPM2 ancestral: each step's start interleaved with the timestep of its
    midpoint sigma (found by log-sigma interpolation); float32."""
    ts_t = torch.from_numpy(np.asarray(ts, dtype=np.float32))
    ts_interpol = core.sigma_to_t(sigmas_interpol.numpy(), log_sigmas)
    ts_interpol = torch.from_numpy(np.asarray(ts_interpol, dtype=np.float32))
    mids = ts_interpol[:-2] if ancestral else ts_interpol[1:-1]
    return torch.cat([ts_t[:1], torch.stack((mids[:, None], ts_t[1:, None]), dim=-1).flatten()])


class KDPM2DiscreteScheduler(SigmaSchedulerMixin, SchedulerMixin):
    """DPM-Solver-2 (k-diffusion): an Euler half step to the log-midpoint sigma, then a full step with the slope
    evaluated there. Two model evaluations per step; ``timesteps`` lists both. Same config keys, defaults and results
    as diffusers' (timesteps are float32 in every configuration here; diffusers' are float64 with karras /
    exponential / beta sigmas). ``prediction_type="sample"`` is supported (diffusers raises for it).
    """

    order = 2

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "linear",
        trained_betas=None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ):
        self._check_common_options()
        self._init_train_schedule(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        self.set_timesteps(len(self.alphas_cumprod))  # trained_betas may be shorter than num_train_timesteps

    def _schedule(self, num_inference_steps: int):
        """CPU arrays ``(timesteps, sigmas with final 0, log_sigmas)``; callers move their results to the device."""
        cfg = self.config
        kind = self._sigma_kind()
        ts, sig, log_sigmas = core.discrete_sigma_schedule(
            self.alphas_cumprod, num_inference_steps, cfg.timestep_spacing, cfg.steps_offset, kind,
            owner=type(self).__name__,
        )
        if kind == "karras":
            ts = np.round(ts)  # as diffusers does for karras sigmas (only)
        self.num_inference_steps = num_inference_steps
        return ts, core.sigmas_to_tensor(sig, 0.0), log_sigmas

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps=None,
        sigmas=None,
        *,
        num_train_timesteps: int | None = None,
    ) -> None:
        """Set ``num_inference_steps`` steps (two evaluations each)."""
        self._check_set_timesteps_args(num_inference_steps, timesteps, sigmas)
        ts, sig, log_sigmas = self._schedule(num_inference_steps)
        sigmas_interpol = core.geometric_mean_sigma(sig, sig.roll(1))
        self.log_sigmas = torch.from_numpy(log_sigmas).to(device)
        self.timesteps = interleaved_timesteps(ts, sigmas_interpol, log_sigmas, ancestral=False).to(device)
        self.sigmas = repeat_evaluations(sig).to(device)
        self.sigmas_interpol = repeat_evaluations(sigmas_interpol).to(device)
        self.sample = None
        self._reset_run_state()

    @property
    def state_in_first_order(self) -> bool:
        """True when the next ``step`` is the first evaluation of a step."""
        return self.sample is None

    def _input_sigma(self) -> torch.Tensor:
        i = self._step_index
        return self.sigmas[i] if self.state_in_first_order else self.sigmas_interpol[i]

    def step(
        self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True,
        generator: torch.Generator | None = None,
    ) -> SchedulerOutput | tuple:
        """First evaluation: Euler to the midpoint sigma. Second: the full step with the midpoint slope."""
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        first = self.state_in_first_order
        if first:
            sigma, sigma_interpol, sigma_next = self.sigmas[i], self.sigmas_interpol[i + 1], self.sigmas[i + 1]
        else:
            sigma, sigma_interpol, sigma_next = self.sigmas[i - 1], self.sigmas_interpol[i], self.sigmas[i]
        sigma_input = sigma if first else sigma_interpol
        x0 = core.ve_x0(model_output, sample, sigma_input, self.config.prediction_type)
        if first:
            derivative = core.to_d(sample, x0, sigma)
            dt = sigma_interpol - sigma
            self.sample = sample
        else:
            derivative = core.to_d(sample, x0, sigma_interpol)
            dt = sigma_next - sigma
            sample = self.sample
            self.sample = None
        prev_sample = sample + derivative * dt

        self._step_index += 1
        if not return_dict:
            return prev_sample, x0
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
