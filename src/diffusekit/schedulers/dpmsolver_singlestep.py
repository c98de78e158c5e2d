"""DPM-Solver(++) singlestep: each solver step of order k spends k model evaluations between two schedule points
(Lu et al. 2022, https://arxiv.org/abs/2206.00927)."""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..configuration import register_to_config
from . import core
from .base import SchedulerOutput
from .dpmsolver_multistep import converted_output, normalise_dpm_options
from .multistep import (
    MultistepSchedulerBase,
    clipped_timestep_count,
    dpm_coefficients,
    respace_sigmas,
    singlestep_update,
    solver_timesteps,
)

logger = logging.getLogger(__name__)

SINGLESTEP_ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++", "dpmsolver")


def singlestep_orders(num_steps: int, solver_order: int, lower_order_final: bool, final_zero: bool) -> list[int]:
    """The order of each step: repeating ``1, 2, ..., solver_order`` blocks (a block of order k is one k-th order
    singlestep solve); with ``lower_order_final`` the tail is cut into lower-order blocks so it ends exactly on the
    last step, and a zero final sigma forces the last step to first order."""
    if solver_order > 3:
        raise ValueError(f"solver_order={solver_order}: DPM-Solver singlestep supports orders 1-3")
    if solver_order == 1:
        orders = [1] * num_steps
    elif not lower_order_final:
        orders = list(range(1, solver_order + 1)) * (num_steps // solver_order)
    elif solver_order == 2:
        orders = [1, 2] * (num_steps // 2) + ([1] if num_steps % 2 else [])
        if num_steps % 2 == 0:
            orders[-1] = 1  # ... 1, 2 | 1, 1
    else:
        blocks, rest = divmod(num_steps, 3)
        if rest == 0:
            orders = [1, 2, 3] * (blocks - 1) + [1, 2, 1]
        else:
            orders = [1, 2, 3] * blocks + [1, 2][:rest]
    if final_zero and orders:
        orders[-1] = 1
    return orders


class DPMSolverSinglestepScheduler(MultistepSchedulerBase):
    """DPM-Solver(++) singlestep sampler; same config keys, defaults and results as diffusers'.

    ``algorithm_type``: ``dpmsolver++`` (default), ``sde-dpmsolver++`` (stochastic) or ``dpmsolver``;
    ``solver_order`` 1-3; ``solver_type`` ``midpoint`` / ``heun``. The timesteps are the multistep ones; the orders
    per step come from :func:`singlestep_orders`. As in diffusers, ``lower_order_final`` is switched on for the run
    when the final sigma is zero or the step count is not a multiple of the order (the latter with a warning);
    unlike diffusers the config is left as given.

    **Differences from diffusers (deliberate).** ``variance_type`` must be one of None, ``learned``,
    ``learned_range`` or DDPM's ``fixed_*`` types (the last ones, from a swapped-in DDPM config, mean no predicted
    variance, as in diffusers); any other value raises, where diffusers ignores it. A DEIS config
    (``algorithm_type="deis"``) loads as ``dpmsolver++``; diffusers maps that alias too but then refuses it with the
    default ``final_sigmas_type="zero"``.
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        solver_order: int = 2,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        algorithm_type: str = "dpmsolver++",
        solver_type: str = "midpoint",
        lower_order_final: bool = False,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        final_sigmas_type: str = "zero",
        lambda_min_clipped: float = -float("inf"),
        variance_type: str | None = None,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
    ):
        normalise_dpm_options(self, SINGLESTEP_ALGORITHMS)
        self._setup_solver()
        self._lower_order_final = lower_order_final
        self.order_list = singlestep_orders(num_train_timesteps, solver_order, lower_order_final,
                                            final_sigmas_type == "zero")

    def _reset_history(self) -> None:
        super()._reset_history()
        self.sample = None  # the sample at the start of the current singlestep block

    def get_order_list(self, num_inference_steps: int) -> list[int]:
        """The solver order of each of ``num_inference_steps`` steps."""
        cfg = self.config
        return singlestep_orders(num_inference_steps, cfg.solver_order, self._lower_order_final,
                                 cfg.final_sigmas_type == "zero")

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        mu: float | None = None,
        timesteps: list[int] | None = None,
        sigmas=None,
    ) -> None:
        """Build the schedule for ``num_inference_steps`` (linspace spacing), or from custom integer ``timesteps``."""
        cfg, owner = self.config, type(self).__name__
        self._check_set_timesteps_args(num_inference_steps, timesteps, sigmas, allow_timesteps=True)
        kind = self._sigma_kind()
        if timesteps is not None:
            if kind is not None:
                raise ValueError(f"{owner}: custom `timesteps` cannot be combined with use_{kind}_sigmas=True")
            if cfg.use_flow_sigmas:
                raise ValueError(f"{owner}: custom `timesteps` cannot be combined with use_flow_sigmas=True")
            timesteps = core.check_custom_timesteps(owner, timesteps, cfg.num_train_timesteps).astype(np.int64)
            num_inference_steps = len(timesteps)
        else:
            last = clipped_timestep_count(self.lambda_t, cfg.lambda_min_clipped)
            timesteps = solver_timesteps(cfg.num_train_timesteps, num_inference_steps, "linspace", 0, last, owner)
        train = self._train_sigmas()
        if kind is not None:
            sigmas, t_frac = respace_sigmas(kind, train, num_inference_steps)
            timesteps = t_frac.round() if kind == "karras" else t_frac
        elif cfg.use_flow_sigmas:
            sigmas, timesteps = self._flow_schedule(num_inference_steps, mu)
        else:
            sigmas = core.interp_sigmas(timesteps, train)
        final = self._train_sigma_min() if cfg.final_sigmas_type == "sigma_min" else 0.0
        self._store_schedule(timesteps, sigmas, final, device)

        lower_order_final = cfg.lower_order_final
        if not lower_order_final and cfg.final_sigmas_type == "zero":
            # the default config: a last step to sigma 0 must be first order (diffusers warns and edits its config)
            logger.debug("%s: final_sigmas_type='zero' implies lower_order_final=True", owner)
            lower_order_final = True
        if not lower_order_final and num_inference_steps % cfg.solver_order != 0:
            logger.warning(
                "%s: %d steps is not a multiple of solver_order=%d; using lower_order_final=True for this run",
                owner, num_inference_steps, cfg.solver_order,
            )
            lower_order_final = True
        self._lower_order_final = lower_order_final
        self.order_list = self.get_order_list(num_inference_steps)

    def convert_model_output(self, model_output: torch.Tensor, *args, sample: torch.Tensor = None, **kwargs):
        """x0 (``++`` algorithms) or eps (``dpmsolver``) at the current step."""
        if sample is None:
            if len(args) > 1:
                sample = args[1]
            else:
                raise ValueError("convert_model_output needs `sample`")
        return converted_output(self, model_output, sample)

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """Advance one step; a step of order k > 1 completes a block started k - 1 steps earlier."""
        i = self._begin_step(timestep)
        cfg = self.config
        converted = self.convert_model_output(model_output, sample=sample)
        self.model_outputs = self.model_outputs[1:] + [converted]
        noise = None
        if cfg.algorithm_type == "sde-dpmsolver++":
            noise = core.randn_tensor(converted.shape, generator=generator, device=converted.device,
                                      dtype=converted.dtype)
        order = self.order_list[i]
        while self.model_outputs[-order] is None:  # not enough history yet (e.g. img2img start mid-block)
            order -= 1
        if order == 1:
            self.sample = sample
        outputs = self.model_outputs[-order:]
        levels = [self._level(i - k) for k in range(order - 1, -1, -1)]  # block start .. current
        dst = self._level(i + 1)
        coef = dpm_coefficients(cfg.algorithm_type, levels[0], dst)
        prev_sample = singlestep_update(
            self.sample, outputs, [lv.lam for lv in levels], coef, dst.lam, cfg.solver_type, noise
        )
        self._step_index = i + 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)
