"""Euler sampler of the probability-flow ODE (Karras et al. 2022, Algorithm 2), with optional churn."""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..configuration import register_to_config
from . import core
from .base import SchedulerMixin, SchedulerOutput, SigmaSchedulerMixin

logger = logging.getLogger(__name__)

EulerDiscreteSchedulerOutput = SchedulerOutput


class EulerDiscreteScheduler(SigmaSchedulerMixin, SchedulerMixin):
    """Euler (k-diffusion ``sample_euler``); same config keys, defaults and results as diffusers'.

    Options: ``use_karras_sigmas`` / ``use_exponential_sigmas`` / ``use_beta_sigmas`` (at most one),
    ``sigma_min`` / ``sigma_max`` (range of those schedules), ``interpolation_type`` (``linear`` or ``log_linear``),
    ``timestep_type`` (``continuous`` with v-prediction feeds ``0.25 * log(sigma)`` as the timestep),
    ``final_sigmas_type`` (``zero`` or ``sigma_min``), ``rescale_betas_zero_snr``. ``set_timesteps`` accepts custom
    ``timesteps`` or ``sigmas`` (the latter including the final sigma). ``step`` takes ``s_churn``, ``s_tmin``,
    ``s_tmax``, ``s_noise`` (stochastic churn).
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
        interpolation_type: str = "linear",
        use_karras_sigmas: bool | None = False,
        use_exponential_sigmas: bool | None = False,
        use_beta_sigmas: bool | None = False,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        timestep_spacing: str = "linspace",
        timestep_type: str = "discrete",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        final_sigmas_type: str = "zero",
    ):
        owner = type(self).__name__
        self._check_common_options()
        core.check_choice(owner, "interpolation_type", interpolation_type, ("linear", "log_linear"))
        core.check_choice(owner, "timestep_type", timestep_type, ("discrete", "continuous"))
        core.check_choice(owner, "final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))
        self._init_train_schedule(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr
        )
        if rescale_betas_zero_snr:
            # zero terminal SNR means sigma = inf at the last step; keep it finite (as diffusers does)
            self.alphas_cumprod = torch.cat([self.alphas_cumprod[:-1], torch.tensor([2.0**-24])])
        sigmas = torch.from_numpy(core.train_sigmas(self.alphas_cumprod)).flip(0)
        self.num_inference_steps = None
        if self._continuous_timesteps():
            self.timesteps = 0.25 * sigmas.log()
        else:
            self.timesteps = torch.from_numpy(np.arange(num_train_timesteps, dtype=np.float32)[::-1].copy())
        self.sigmas = torch.cat([sigmas, torch.zeros(1)])
        self.is_scale_input_called = False
        self._reset_run_state()

    @classmethod
    def _prediction_types(cls) -> tuple[str, ...]:
        return core.PREDICTION_TYPES + ("original_sample",)

    def _continuous_timesteps(self) -> bool:
        return self.config.timestep_type == "continuous" and self.config.prediction_type == "v_prediction"

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[float] | None = None,
        sigmas: list[float] | None = None,
    ) -> None:
        """Set the schedule from ``num_inference_steps``, custom ``timesteps``, or custom ``sigmas`` (with final)."""
        self._check_set_timesteps_args(num_inference_steps, timesteps, sigmas, allow_timesteps=True, allow_sigmas=True)
        cfg, owner = self.config, type(self).__name__
        kind = self._sigma_kind()
        if timesteps is not None and kind is not None:
            raise ValueError(f"{owner}: custom `timesteps` cannot be combined with use_{kind}_sigmas=True")
        if timesteps is not None and self._continuous_timesteps():
            raise ValueError(f"{owner}: custom `timesteps` cannot be used with timestep_type='continuous' v-prediction")

        if sigmas is not None:
            sig = np.asarray(sigmas, dtype=np.float32)
            log_sigmas = np.log(core.train_sigmas(self.alphas_cumprod))
            ts = core.sigma_to_t(sig[:-1], log_sigmas)
            self.num_inference_steps = len(sig) - 1
            sigmas_t = torch.from_numpy(sig).to(device=device)
        else:
            if timesteps is not None:
                timesteps = np.asarray(timesteps, dtype=np.float32)
            ts, sig, _ = core.discrete_sigma_schedule(
                self.alphas_cumprod, num_inference_steps, cfg.timestep_spacing, cfg.steps_offset, kind,
                cfg.sigma_min, cfg.sigma_max, timesteps, cfg.interpolation_type, owner,
            )
            self.num_inference_steps = len(ts)
            if cfg.final_sigmas_type == "sigma_min":
                final = float(core.train_sigmas(self.alphas_cumprod)[0])
            else:
                final = 0.0
            sigmas_t = core.sigmas_to_tensor(sig, final, device)

        if self._continuous_timesteps():
            self.timesteps = 0.25 * sigmas_t[:-1].log()
        else:
            self.timesteps = torch.from_numpy(np.asarray(ts, dtype=np.float32)).to(device=device)
        self.sigmas = sigmas_t
        self._reset_run_state()

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """One Euler step ``x + (x - x0) / sigma_hat * (sigma_next - sigma_hat)``; ``s_churn > 0`` first raises the
        noise level to ``sigma_hat = sigma * (1 + gamma)`` with fresh noise (for sigmas within [s_tmin, s_tmax])."""
        owner = type(self).__name__
        self._reject_integer_timestep(owner, timestep)
        if not self.is_scale_input_called:
            logger.warning("%s: call scale_model_input before step for correct denoising", owner)
        if self._step_index is None:
            self._init_step_index(timestep)

        sample = sample.to(torch.float32)  # upcast: precision of the ODE update
        sigma = self.sigmas[self._step_index]
        gamma = min(s_churn / (len(self.sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (gamma + 1)
        if gamma > 0:
            noise = core.randn_tensor(
                model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
            )
            sample = sample + noise * s_noise * (sigma_hat**2 - sigma**2) ** 0.5

        prediction_type = self.config.prediction_type
        if prediction_type == "original_sample":
            prediction_type = "sample"
        # the model saw the input scaled for sigma (not sigma_hat); eps-prediction applies at sigma_hat
        x0 = core.ve_x0(model_output, sample, sigma_hat if prediction_type == "epsilon" else sigma, prediction_type)
        derivative = core.to_d(sample, x0, sigma_hat)
        dt = self.sigmas[self._step_index + 1] - sigma_hat
        prev_sample = (sample + derivative * dt).to(model_output.dtype)

        self._step_index += 1
        if not return_dict:
            return prev_sample, x0
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """v-prediction target ``alpha_t * noise - sigma_t * x0`` at ``timesteps`` taken from ``self.timesteps``.

        Uses the noise level of each timestep's sigma. (diffusers indexes ``alphas_cumprod`` with the *position* in
        the inference schedule here, which only matches the timestep by accident; we use the schedule's sigma.)
        """
        self._reject_integer_timestep(type(self).__name__, timesteps)
        schedule = self.timesteps.to(sample.device)
        timesteps = torch.as_tensor(timesteps, device=sample.device).reshape(-1)
        sigma = self.sigmas.to(sample.device)[[self.index_for_timestep(t, schedule) for t in timesteps]]
        return core.ve_velocity(sample, noise, sigma)
