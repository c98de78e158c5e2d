"""Linear multistep sampler (k-diffusion ``sample_lms``)."""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..configuration import register_to_config
from . import core
from .base import SchedulerMixin, SchedulerOutput, SigmaSchedulerMixin

logger = logging.getLogger(__name__)

LMSDiscreteSchedulerOutput = SchedulerOutput


class LMSDiscreteScheduler(SigmaSchedulerMixin, SchedulerMixin):
    """Linear multistep (Adams-Bashforth in sigma) over the last ``order`` derivatives (default 4).

    Same config keys, defaults and results as diffusers'. The coefficients integrate the Lagrange polynomials
    exactly (diffusers integrates them numerically with scipy; the values agree to ~1e-7), so scipy is not needed.
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
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ):
        self._check_common_options()
        self._init_train_schedule(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        self.is_scale_input_called = False
        self.set_timesteps(len(self.alphas_cumprod))  # trained_betas may be shorter than num_train_timesteps

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps=None,
        sigmas=None,
    ) -> None:
        """Set ``num_inference_steps`` timesteps (spacing / karras / exponential / beta sigmas per the config)."""
        self._check_set_timesteps_args(num_inference_steps, timesteps, sigmas)
        cfg = self.config
        ts, sig, _ = core.discrete_sigma_schedule(
            self.alphas_cumprod, num_inference_steps, cfg.timestep_spacing, cfg.steps_offset, self._sigma_kind(),
            owner=type(self).__name__,
        )
        self.num_inference_steps = num_inference_steps
        sigmas = core.sigmas_to_tensor(sig, 0.0)
        self._sigma_values = sigmas.tolist()  # CPU floats for the coefficients
        self.sigmas = sigmas.to(device)
        self.timesteps = torch.from_numpy(np.asarray(ts, dtype=np.float32)).to(device=device)
        self.derivatives: list[torch.Tensor] = []
        self._reset_run_state()

    def get_lms_coefficient(self, order: int, t: int, current_order: int) -> float:
        """Coefficient of the derivative ``current_order`` steps back for the step at index ``t``."""
        return core.lms_coefficient(self._sigma_values, t, order, current_order)

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        order: int = 4,
        return_dict: bool = True,
        generator: torch.Generator | None = None,
    ) -> SchedulerOutput | tuple:
        """One linear multistep step of order ``min(order, steps so far + 1)``."""
        if not self.is_scale_input_called:
            logger.warning("%s: call scale_model_input before step for correct denoising", type(self).__name__)
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        sigma = self.sigmas[i]
        x0 = core.ve_x0(model_output, sample, sigma, self.config.prediction_type)
        derivatives = self.derivatives + [core.to_d(sample, x0, sigma)]
        if len(derivatives) > order:
            derivatives = derivatives[1:]
        self.derivatives = derivatives
        order = min(i + 1, order)
        coeffs = [self.get_lms_coefficient(order, i, k) for k in range(order)]
        prev_sample = sample + sum(c * d for c, d in zip(coeffs, reversed(derivatives)))

        self._step_index += 1
        if not return_dict:
            return prev_sample, x0
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
