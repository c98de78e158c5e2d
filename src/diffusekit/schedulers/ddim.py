"""DDIM: denoising diffusion implicit models (Song et al. 2021)."""

from __future__ import annotations

import numpy as np
import torch

from ..configuration import register_to_config
from . import core
from .base import DiscreteTimestepMixin, SchedulerMixin, SchedulerOutput

DDIMSchedulerOutput = SchedulerOutput


class DDIMScheduler(DiscreteTimestepMixin, SchedulerMixin):
    """DDIM sampler (deterministic at ``eta=0``); same config keys and defaults as diffusers' ``DDIMScheduler``.

    **Difference from diffusers (deliberate).** Each step goes from ``timesteps[i]`` to ``timesteps[i + 1]`` (the
    final step to ``final_alpha_cumprod``): the previous timestep is read from the schedule. diffusers computes it as
    ``t - num_train_timesteps // num_inference_steps``, which is only right for evenly strided schedules
    (diffusers issue #9261). Results are therefore identical to diffusers for ``leading`` spacing and for
    ``trailing`` spacing when ``num_inference_steps`` divides ``num_train_timesteps``, and differ (we are right) for
    ``linspace`` spacing and for ``trailing`` spacing with other step counts (there diffusers' steps land one
    timestep off the schedule and its last step lands on timestep 0 instead of the final alpha, e.g. 1000 train
    steps, 7 inference steps: 999 -> 857 while the schedule's next entry is 856). ``set_timesteps`` also accepts custom
    descending ``timesteps`` (diffusers' DDIM does not); the same rule applies to them.
    """

    order = 1
    accepts_eta = True  # pipelines pass their `eta` argument on to step()

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
    ):
        self._check_common_options()
        self._init_train_schedule(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr
        )
        # the alpha the last step lands on: 1 (a clean image) or the first training alpha
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self._set_schedule(np.arange(0, num_train_timesteps)[::-1])
        self._reset_run_state()

    def _alpha_prev(self, prev_t: int) -> torch.Tensor:
        return self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod

    def _get_variance(self, timestep: int, prev_timestep: int) -> torch.Tensor:
        return core.posterior_variance(self.alphas_cumprod[int(timestep)], self._alpha_prev(int(prev_timestep)))

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """One DDIM step from ``timestep`` to the next timestep of the schedule.

        ``eta`` scales the step noise (0: deterministic DDIM, 1: DDPM-like); ``use_clipped_model_output`` recomputes
        eps from the clipped/thresholded x0; ``variance_noise`` supplies the noise instead of ``generator``.
        """
        if self.num_inference_steps is None:
            raise ValueError(f"{type(self).__name__}: call set_timesteps before step")
        t = int(timestep)
        position = self._position(t)
        prev_t = self._prev_list[position]
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self._alpha_prev(prev_t)
        alpha_t, sigma_t = alpha_prod_t**0.5, (1 - alpha_prod_t) ** 0.5

        cfg = self.config
        x0, eps = core.vp_x0_eps(model_output, sample, alpha_t, sigma_t, cfg.prediction_type)
        x0 = core.process_x0(
            x0, cfg.thresholding, cfg.clip_sample, cfg.dynamic_thresholding_ratio, cfg.sample_max_value,
            cfg.clip_sample_range,
        )
        std_dev_t = eta * core.posterior_variance(alpha_prod_t, alpha_prod_t_prev) ** 0.5
        if use_clipped_model_output:
            eps = core.vp_eps_from_x0(sample, x0, alpha_t, sigma_t)
        prev_sample = core.ddim_transfer(x0, eps, alpha_prod_t_prev, std_dev_t)

        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("pass either `generator` or `variance_noise` to step, not both")
            if variance_noise is None:
                variance_noise = core.randn_tensor(
                    model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
                )
            prev_sample = prev_sample + std_dev_t * variance_noise

        self._step_index = position + 1
        if not return_dict:
            return prev_sample, x0
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """Forward process q(x_t | x0) at integer ``timesteps``."""
        return core.vp_add_noise(original_samples, noise, self.alphas_cumprod, timesteps)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """v-prediction training target at integer ``timesteps``."""
        return core.vp_velocity(sample, noise, self.alphas_cumprod, timesteps)
