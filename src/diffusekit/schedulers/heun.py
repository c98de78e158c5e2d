"""Heun's second-order sampler (Karras et al. 2022, Algorithm 1 without churn)."""

from __future__ import annotations

import numpy as np
import torch

from ..configuration import register_to_config
from . import core
from .base import SchedulerMixin, SchedulerOutput, SigmaSchedulerMixin

HeunDiscreteSchedulerOutput = SchedulerOutput


class HeunDiscreteScheduler(SigmaSchedulerMixin, SchedulerMixin):
    """Heun: an Euler predictor then a trapezoidal corrector, two model evaluations per step.

    ``timesteps`` lists every evaluation (``[t0, t1, t1, t2, t2, ...]``) and ``sigmas`` matches it. Same config
    keys, defaults and results as diffusers'. ``set_timesteps`` accepts custom ``timesteps``; its
    ``num_train_timesteps`` override is keyword-only here (diffusers' third positional argument).
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
        prediction_type: str = "epsilon",
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
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
        timesteps: list[float] | None = None,
        sigmas=None,
        *,
        num_train_timesteps: int | None = None,
    ) -> None:
        """Set the schedule from ``num_inference_steps`` or custom ``timesteps``."""
        self._check_set_timesteps_args(num_inference_steps, timesteps, sigmas, allow_timesteps=True)
        cfg, owner = self.config, type(self).__name__
        kind = self._sigma_kind()
        if timesteps is not None and kind is not None:
            raise ValueError(f"{owner}: custom `timesteps` cannot be combined with use_{kind}_sigmas=True")
        alphas_cumprod = self.alphas_cumprod
        if num_train_timesteps is not None and num_train_timesteps != alphas_cumprod.shape[0]:
            raise ValueError(f"{owner}: num_train_timesteps must equal the config's ({alphas_cumprod.shape[0]})")
        ts, sig, _ = core.discrete_sigma_schedule(
            alphas_cumprod, num_inference_steps, cfg.timestep_spacing, cfg.steps_offset, kind,
            timesteps=None if timesteps is None else np.asarray(timesteps, dtype=np.float32), owner=owner,
        )
        self.num_inference_steps = len(ts)
        sig = core.sigmas_to_tensor(sig, 0.0, device)
        ts = torch.from_numpy(np.asarray(ts, dtype=np.float32)).to(device)
        # every step but the first is evaluated twice: at its start (predictor) and its end (corrector)
        self.sigmas = torch.cat([sig[:1], sig[1:-1].repeat_interleave(2), sig[-1:]])
        self.timesteps = torch.cat([ts[:1], ts[1:].repeat_interleave(2)])
        self.prev_derivative = None
        self.dt = None
        self.sample = None
        self._reset_run_state()

    @property
    def state_in_first_order(self) -> bool:
        """True when the next ``step`` is a predictor (first-order) evaluation."""
        return self.dt is None

    def step(
        self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True,
        generator: torch.Generator | None = None,
    ) -> SchedulerOutput | tuple:
        """Predictor (Euler) or corrector (average of the two slopes) evaluation, alternately."""
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        first = self.state_in_first_order
        sigma, sigma_next = (self.sigmas[i], self.sigmas[i + 1]) if first else (self.sigmas[i - 1], self.sigmas[i])
        sigma_input = sigma if first else sigma_next
        cfg = self.config
        x0 = core.ve_x0(model_output, sample, sigma_input, cfg.prediction_type)
        x0 = core.process_x0(x0, clip_sample=cfg.clip_sample, clip_sample_range=cfg.clip_sample_range)
        if first:
            derivative = core.to_d(sample, x0, sigma)
            dt = sigma_next - sigma
            self.prev_derivative, self.dt, self.sample = derivative, dt, sample
        else:
            derivative = (self.prev_derivative + core.to_d(sample, x0, sigma_next)) / 2
            dt, sample = self.dt, self.sample
            self.prev_derivative = self.dt = self.sample = None
        prev_sample = sample + derivative * dt

        self._step_index += 1
        if not return_dict:
            return prev_sample, x0
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
