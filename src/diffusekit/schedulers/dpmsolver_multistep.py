"""DPM-Solver / DPM-Solver++ multistep (Lu et al. 2022, https://arxiv.org/abs/2206.00927 and 2211.01095)."""

from __future__ import annotations

import torch

from ..configuration import register_to_config
from . import core
from .base import SchedulerOutput
from .multistep import (
    DPM_ALGORITHMS,
    DPM_SOLVER_TYPES,
    MultistepSchedulerBase,
    clipped_timestep_count,
    data_prediction,
    dpm_coefficients,
    dpm_update,
    multistep_differences,
    noise_prediction,
    respace_sigmas,
    solver_timesteps,
)

# names other solver schedulers use; a config written for them loads with the closest DPM-Solver choice
_ALGORITHM_ALIASES = {"deis": "dpmsolver++"}
_SOLVER_TYPE_ALIASES = {"logrho": "midpoint", "bh1": "midpoint", "bh2": "midpoint"}
# DDPM's fixed_* types come with configs swapped in from DDPMScheduler: like None, the model predicts no variance
VARIANCE_TYPES = (None, "learned", "learned_range", "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log")


def normalise_dpm_options(scheduler, algorithm_types, max_order: int = 3) -> None:
    """Validate (and map foreign aliases of) the DPM-Solver options of ``scheduler``'s config."""
    cfg, owner = scheduler.config, type(scheduler).__name__
    algorithm = _ALGORITHM_ALIASES.get(cfg.algorithm_type, cfg.algorithm_type)
    core.check_choice(owner, "algorithm_type", algorithm, algorithm_types)
    solver_type = _SOLVER_TYPE_ALIASES.get(cfg.solver_type, cfg.solver_type)
    core.check_choice(owner, "solver_type", solver_type, DPM_SOLVER_TYPES)
    core.check_choice(owner, "solver_order", cfg.solver_order, tuple(range(1, max_order + 1)))
    core.check_choice(owner, "variance_type", cfg.variance_type, VARIANCE_TYPES)
    if (algorithm, solver_type) != (cfg.algorithm_type, cfg.solver_type):
        scheduler._update_config(algorithm_type=algorithm, solver_type=solver_type)
    if algorithm in ("dpmsolver", "sde-dpmsolver"):
        if cfg.final_sigmas_type == "zero":
            raise ValueError(
                f"{owner}: final_sigmas_type='zero' is not supported with algorithm_type={algorithm!r} (noise "
                "prediction cannot reach sigma 0); use final_sigmas_type='sigma_min' or a '++' algorithm"
            )
        if cfg.prediction_type == "flow_prediction":
            raise ValueError(f"{owner}: prediction_type='flow_prediction' needs a '++' (data prediction) algorithm")


def converted_output(scheduler, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """The model output as DPM-Solver uses it: x0 for the ``++`` algorithms, eps for the others (thresholded)."""
    cfg = scheduler.config
    i = scheduler.step_index
    if cfg.variance_type in ("learned", "learned_range") and model_output.shape[1] == 2 * sample.shape[1]:
        model_output = model_output[:, : sample.shape[1]]  # drop the predicted variance
    level = scheduler._level(i)
    if cfg.algorithm_type.endswith("dpmsolver++"):
        return scheduler._threshold(data_prediction(model_output, sample, level, scheduler.sigmas[i], cfg.prediction_type))
    eps = noise_prediction(model_output, sample, level, cfg.prediction_type)
    if cfg.thresholding:
        x0 = scheduler._threshold(core.vp_x0_eps(eps, sample, level.alpha, level.sigma, "epsilon")[0])
        eps = core.vp_eps_from_x0(sample, x0, level.alpha, level.sigma)
    return eps


class DPMSolverMultistepScheduler(MultistepSchedulerBase):
    """DPM-Solver(++) multistep sampler; same config keys, defaults and results as diffusers'.

    ``algorithm_type``: ``dpmsolver++`` (data prediction, default; best for guided sampling), ``sde-dpmsolver++``
    (its SDE form, stochastic: "DPM++ 2M SDE"), ``dpmsolver`` / ``sde-dpmsolver`` (noise prediction). ``solver_order``
    1-3 (``sde-dpmsolver`` has orders 1-2); ``solver_type`` ``midpoint`` or ``heun`` for the second-order update.
    ``lower_order_final`` / ``euler_at_final`` lower the order over the last steps (stabilises short schedules);
    ``final_sigmas_type`` picks the last sigma (``zero`` or the training ``sigma_min``). Sigma spacing: timestep
    spacing, karras, exponential, beta, ``use_lu_lambdas`` (uniform in lambda) or flow sigmas;
    ``lambda_min_clipped`` drops the noisiest timesteps. ``set_timesteps`` accepts custom ``timesteps``.

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
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_lu_lambdas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        final_sigmas_type: str = "zero",
        lambda_min_clipped: float = -float("inf"),
        variance_type: str | None = None,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
    ):
        normalise_dpm_options(self, DPM_ALGORITHMS)
        if self.config.algorithm_type == "sde-dpmsolver" and solver_order == 3:
            raise ValueError(
                f"{type(self).__name__}: algorithm_type='sde-dpmsolver' has no third-order update; use "
                "solver_order 1 or 2, or algorithm_type='sde-dpmsolver++'"
            )
        self._setup_solver()

    @property
    def _stochastic(self) -> bool:
        return self.config.algorithm_type.startswith("sde-")

    def _schedule_kind(self) -> str | None:
        cfg = self.config
        kind = self._sigma_kind()
        if kind == "karras":
            return kind
        if cfg.use_lu_lambdas:
            return "lu"
        return kind

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        mu: float | None = None,
        timesteps: list[int] | None = None,
        sigmas=None,
    ) -> None:
        """Build the schedule for ``num_inference_steps``, or from custom integer ``timesteps`` (descending)."""
        cfg, owner = self.config, type(self).__name__
        self._check_set_timesteps_args(num_inference_steps, timesteps, sigmas, allow_timesteps=True)
        kind = self._schedule_kind()
        if timesteps is not None:
            if kind is not None:
                flag = "use_lu_lambdas" if kind == "lu" else f"use_{kind}_sigmas"
                raise ValueError(f"{owner}: custom `timesteps` cannot be combined with {flag}=True")
            if cfg.use_flow_sigmas:
                raise ValueError(f"{owner}: custom `timesteps` cannot be combined with use_flow_sigmas=True")
            timesteps = core.check_custom_timesteps(owner, timesteps, cfg.num_train_timesteps).astype("int64")
        else:
            last = clipped_timestep_count(self.lambda_t, cfg.lambda_min_clipped)
            timesteps = solver_timesteps(
                cfg.num_train_timesteps, num_inference_steps, cfg.timestep_spacing, cfg.steps_offset, last, owner
            )
        train = self._train_sigmas()
        if kind is not None:
            sigmas, t_frac = respace_sigmas(kind, train, num_inference_steps)
            # karras / lu timesteps are rounded (cosine schedules keep them truncated, as in diffusers)
            rounded = kind in ("karras", "lu") and cfg.beta_schedule != "squaredcos_cap_v2"
            timesteps = t_frac.round() if rounded else t_frac
        elif cfg.use_flow_sigmas:
            sigmas, timesteps = self._flow_schedule(num_inference_steps, mu)
        else:
            sigmas = core.interp_sigmas(timesteps, train)
        final = self._train_sigma_min() if cfg.final_sigmas_type == "sigma_min" else 0.0
        self._store_schedule(timesteps, sigmas, final, device)

    def convert_model_output(self, model_output: torch.Tensor, *args, sample: torch.Tensor = None, **kwargs):
        """x0 (``dpmsolver++`` / ``sde-dpmsolver++``) or eps (``dpmsolver`` / ``sde-dpmsolver``) at the current step."""
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
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """Advance ``sample`` one step; SDE variants draw noise from ``generator`` (or take ``variance_noise``)."""
        i = self._begin_step(timestep)
        cfg = self.config
        n = len(self.timesteps)
        short = cfg.lower_order_final and n < 15
        final_first_order = i == n - 1 and (cfg.euler_at_final or short or cfg.final_sigmas_type == "zero")
        final_second_order = i == n - 2 and short

        converted = self.convert_model_output(model_output, sample=sample)
        self.model_outputs = self.model_outputs[1:] + [converted]
        sample = sample.to(torch.float32)
        noise = None
        if self._stochastic:
            if variance_noise is None:
                noise = core.randn_tensor(converted.shape, generator=generator, device=converted.device,
                                          dtype=torch.float32)
            else:
                noise = variance_noise.to(device=converted.device, dtype=torch.float32)

        if cfg.solver_order == 1 or self.lower_order_nums < 1 or final_first_order:
            order = 1
        elif cfg.solver_order == 2 or self.lower_order_nums < 2 or final_second_order:
            order = 2
        else:
            order = 3
        outputs = self.model_outputs[-order:]
        lams = [self._level(i - k).lam for k in range(order - 1, -1, -1)]
        src, dst = self._level(i), self._level(i + 1)
        derivatives = multistep_differences(outputs, lams, dst.lam)
        coef = dpm_coefficients(cfg.algorithm_type, src, dst)
        prev_sample = dpm_update(sample, derivatives, coef, cfg.solver_type, noise).to(converted.dtype)

        self.lower_order_nums = min(self.lower_order_nums + 1, cfg.solver_order)
        self._step_index = i + 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)
