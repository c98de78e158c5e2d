"""KDPM2 ancestral: k-diffusion's ``sample_dpm_2_ancestral``."""

from __future__ import annotations

import torch

from ..configuration import register_to_config
from . import core
from .base import SchedulerOutput
from .kdpm2 import KDPM2DiscreteScheduler, interleaved_timesteps, repeat_evaluations

KDPM2AncestralDiscreteSchedulerOutput = SchedulerOutput


class KDPM2AncestralDiscreteScheduler(KDPM2DiscreteScheduler):
    """DPM-Solver-2 with ancestral noise: the deterministic part goes down to ``sigma_down`` through the log-midpoint
    of ``sigma`` and ``sigma_down``, then fresh noise of std ``sigma_up`` is added. Same config keys, defaults and
    seeded results as diffusers' (timesteps float32; ``prediction_type="sample"`` supported)."""

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
        sigmas_next = torch.cat([sig[1:], sig.new_zeros(1)])
        sigmas_up, sigmas_down = core.ancestral_split(sig, sigmas_next)
        sigmas_down = torch.cat([sigmas_down[:-1], sigmas_down.new_zeros(1)])
        sigmas_interpol = core.geometric_mean_sigma(sig, sigmas_down)
        sigmas_interpol = torch.cat([sigmas_interpol[:-2], sigmas_interpol.new_zeros(2)])
        self.log_sigmas = torch.from_numpy(log_sigmas).to(device)
        self.timesteps = interleaved_timesteps(ts, sigmas_interpol, log_sigmas, ancestral=True).to(device)
        self.sigmas = repeat_evaluations(sig).to(device)
        self.sigmas_interpol = repeat_evaluations(sigmas_interpol).to(device)
        self.sigmas_up = repeat_evaluations(sigmas_up).to(device)
        self.sigmas_down = repeat_evaluations(sigmas_down).to(device)
        self.sample = None
        self._reset_run_state()

    def _input_sigma(self) -> torch.Tensor:
        i = self._step_index
        return self.sigmas[i] if self.state_in_first_order else self.sigmas_interpol[i - 1]

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """First evaluation: Euler to the midpoint. Second: step to ``sigma_down`` with the midpoint slope, plus
        noise of std ``sigma_up`` (drawn from ``generator``)."""
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        first = self.state_in_first_order
        if first:
            sigma, sigma_interpol = self.sigmas[i], self.sigmas_interpol[i]
            sigma_up, sigma_down = self.sigmas_up[i], self.sigmas_down[i - 1]
        else:
            sigma, sigma_interpol = self.sigmas[i - 1], self.sigmas_interpol[i - 1]
            sigma_up, sigma_down = self.sigmas_up[i - 1], self.sigmas_down[i - 1]
        sigma_input = sigma if first else sigma_interpol
        x0 = core.ve_x0(model_output, sample, sigma_input, self.config.prediction_type)
        if first:
            derivative = core.to_d(sample, x0, sigma)
            dt = sigma_interpol - sigma
            self.sample = sample
            self.dt = dt
            prev_sample = sample + derivative * dt
        else:
            derivative = core.to_d(sample, x0, sigma_interpol)
            dt = sigma_down - sigma
            sample = self.sample
            self.sample = None
            prev_sample = sample + derivative * dt
            noise = core.randn_tensor(
                model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
            )
            prev_sample = prev_sample + noise * sigma_up

        self._step_index += 1
        if not return_dict:
            return prev_sample, x0
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
