"""Euler ancestral sampler (k-diffusion ``sample_euler_ancestral``)."""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..configuration import register_to_config
from . import core
from .base import SchedulerMixin, SchedulerOutput, SigmaSchedulerMixin

logger = logging.getLogger(__name__)

EulerAncestralDiscreteSchedulerOutput = SchedulerOutput


class EulerAncestralDiscreteScheduler(SigmaSchedulerMixin, SchedulerMixin):
    """Euler ancestral: an Euler step down to ``sigma_down`` plus fresh noise of std ``sigma_up`` each step.

    Same config keys, defaults and (seeded) results as diffusers'. ``prediction_type="sample"`` is supported here
    (diffusers raises NotImplementedError for it).
    """

    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        self._check_common_options()
        self._init_train_schedule(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr
        )
        if rescale_betas_zero_snr:
            # zero terminal SNR means sigma = inf at the last step; keep it finite (as diffusers does)
            self.alphas_cumprod = torch.cat([self.alphas_cumprod[:-1], torch.tensor([2.0**-24])])
        sigmas = torch.from_numpy(core.train_sigmas(self.alphas_cumprod)).flip(0)
        self.sigmas = torch.cat([sigmas, torch.zeros(1)])
        self.timesteps = torch.from_numpy(np.arange(num_train_timesteps, dtype=np.float32)[::-1].copy())
        self.num_inference_steps = None
        self.is_scale_input_called = False
        self._reset_run_state()

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps=None,
        sigmas=None,
    ) -> None:
        """Set ``num_inference_steps`` timesteps spaced per ``timestep_spacing`` and their sigmas."""
        self._check_set_timesteps_args(num_inference_steps, timesteps, sigmas)
        cfg = self.config
        ts, sig, _ = core.discrete_sigma_schedule(
            self.alphas_cumprod, num_inference_steps, cfg.timestep_spacing, cfg.steps_offset, owner=type(self).__name__
        )
        self.num_inference_steps = num_inference_steps
        self.sigmas = core.sigmas_to_tensor(sig, 0.0, device)
        self.timesteps = torch.from_numpy(ts.astype(np.float32)).to(device=device)
        self._reset_run_state()

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """One ancestral Euler step (draws noise from ``generator``)."""
        owner = type(self).__name__
        self._reject_integer_timestep(owner, timestep)
        if not self.is_scale_input_called:
            logger.warning("%s: call scale_model_input before step for correct denoising", owner)
        if self._step_index is None:
            self._init_step_index(timestep)

        sigma = self.sigmas[self._step_index]
        sample = sample.to(torch.float32)
        x0 = core.ve_x0(model_output, sample, sigma, self.config.prediction_type)
        sigma_up, sigma_down = core.ancestral_split(sigma, self.sigmas[self._step_index + 1])
        derivative = core.to_d(sample, x0, sigma)
        prev_sample = sample + derivative * (sigma_down - sigma)
        noise = core.randn_tensor(
            model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
        )
        prev_sample = (prev_sample + noise * sigma_up).to(model_output.dtype)

        self._step_index += 1
        if not return_dict:
            return prev_sample, x0
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
