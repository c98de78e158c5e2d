"""The scheduler contract shared by every scheduler (diffusers' ``SchedulerMixin`` API).

A scheduler class:

* subclasses :class:`SchedulerMixin` and decorates ``__init__`` with ``@register_to_config``, using diffusers' keyword
  names and defaults, so ``scheduler_config.json`` files interchange both ways;
* keeps the training schedule (``betas``, ``alphas``, ``alphas_cumprod``) as tensors that are never written in place,
  and the per-run state (``timesteps``, ``sigmas``, ``num_inference_steps``, step index, solver history lists) small:
  ``copy.copy(scheduler)`` gives an independent run state sharing the schedule tensors
  (:meth:`SchedulerMixin.__copy__`); pipelines copy their scheduler at the start of each call;
* implements ``set_timesteps(num_inference_steps=None, device=None, timesteps=None, sigmas=None)``,
  ``scale_model_input(sample, timestep)``, ``step(model_output, timestep, sample, ..., generator=None,
  return_dict=True)`` returning :class:`SchedulerOutput` (or a tuple), ``add_noise(original, noise, timesteps)`` and
  ``__len__`` (number of training timesteps). Every ``step`` takes ``generator`` (deterministic ones ignore it), so
  pipelines pass it without looking at the signature; a scheduler whose step takes ``eta`` sets ``accepts_eta``;
* exposes ``order``, ``init_noise_sigma``, ``timesteps`` (int64 for discrete-timestep schedulers, float32 for sigma
  schedulers), ``sigmas`` where diffusers has them, ``step_index``, ``begin_index`` and ``set_begin_index``.

The maths lives in :mod:`diffusekit.schedulers.core`; classes here only adapt it.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..configuration import ConfigMixin, config_source, read_json
from ..hub import resolve_file, split_hub_kwargs
from ..outputs import BaseOutput
from . import core

logger = logging.getLogger(__name__)

SCHEDULER_CONFIG_NAME = "scheduler_config.json"

# Scheduler class name -> module (under diffusekit.schedulers) that defines it. Modules are imported lazily, only
# when `compatibles` is asked for. Add a scheduler with `register_scheduler`.
_SCHEDULER_MODULES: dict[str, str] = {
    "DDPMScheduler": "ddpm",
    "DDIMScheduler": "ddim",
    "PNDMScheduler": "pndm",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_ancestral",
    "LMSDiscreteScheduler": "lms",
    "HeunDiscreteScheduler": "heun",
    "KDPM2DiscreteScheduler": "kdpm2",
    "KDPM2AncestralDiscreteScheduler": "kdpm2_ancestral",
    "DPMSolverMultistepScheduler": "dpmsolver_multistep",
    "DPMSolverSinglestepScheduler": "dpmsolver_singlestep",
    "DPMSolverSDEScheduler": "dpmsolver_sde",
    "UniPCMultistepScheduler": "unipc",
    "DEISMultistepScheduler": "deis",
}

# diffusers' KarrasDiffusionSchedulers family: schedulers that can replace each other in a pipeline
# (`Cls.from_config(pipe.scheduler.config)`). LCM is not in it, as in diffusers.
KARRAS_DIFFUSION_SCHEDULERS: tuple[str, ...] = tuple(_SCHEDULER_MODULES)


def register_scheduler(name: str, module: str, compatible: bool = True) -> None:
    """Make ``name`` (defined in ``diffusekit.schedulers.<module>``) known to ``compatibles`` without importing it.

    ``compatible=True`` adds it to the interchangeable family that :attr:`SchedulerMixin.compatibles` lists.
    """
    global KARRAS_DIFFUSION_SCHEDULERS
    _SCHEDULER_MODULES[name] = module
    if compatible and name not in KARRAS_DIFFUSION_SCHEDULERS:
        KARRAS_DIFFUSION_SCHEDULERS = KARRAS_DIFFUSION_SCHEDULERS + (name,)


def load_scheduler_class(name: str):
    """Import and return the scheduler class called ``name``, or ``None`` when it is unknown / not built yet."""
    module = _SCHEDULER_MODULES.get(name)
    if module is None:
        return None
    try:
        mod = importlib.import_module(f"{__package__}.{module}")
    except ModuleNotFoundError as err:
        if err.name == f"{__package__}.{module}":
            return None
        raise
    return getattr(mod, name, None)


@dataclasses.dataclass
class SchedulerOutput(BaseOutput):
    """Output of ``step``: the sample at the previous timestep and, where the scheduler computes it, the predicted
    denoised sample ``pred_original_sample`` (x0)."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


class classproperty:
    """A read-only property evaluated on the class (works on instances too)."""

    def __init__(self, fget):
        self.fget = fget
        self.__doc__ = fget.__doc__

    def __get__(self, obj, owner):
        return self.fget(owner)


class SchedulerMixin(ConfigMixin):
    """Base class of all schedulers: config files, loading, cheap copies, step-index bookkeeping.

    Subclasses set ``order`` (model evaluations per solver step as diffusers counts them; 2 for Heun/KDPM2) and,
    when they are not part of the interchangeable family, ``_compatibles`` (class names).

    **Difference from diffusers (deliberate).** ``trained_betas`` shorter than ``num_train_timesteps``: the sigma
    schedulers (Euler, LMS, Heun, KDPM2, DPM-Solver, UniPC, DEIS, ...) take the betas' length as the number of
    training steps, which gives the numbers diffusers gives with ``num_train_timesteps=len(trained_betas)``.
    diffusers keeps timesteps up to ``num_train_timesteps - 1`` and clamps every sigma past the betas to the last
    one (a schedule that stays at the highest noise level). ``len(scheduler)`` still reports the config value.
    ``step`` with a (first) timestep that is not in ``scheduler.timesteps`` raises a ``ValueError`` that says so:
    diffusers' multistep schedulers (DPM-Solver, UniPC, DEIS) then silently jump to the last step, and DDPM / DDIM
    step from it with the stride formula; neither is what a caller passing a wrong timestep wants.
    """

    config_name = SCHEDULER_CONFIG_NAME
    has_compatibles = True
    order: int = 1
    accepts_eta: bool = False  # True where step() takes DDIM's eta
    init_noise_sigma: float | torch.Tensor = 1.0
    _compatibles: Sequence[str] | None = None  # None: the KARRAS_DIFFUSION_SCHEDULERS family
    # attribute names of containers that are replaced but never mutated: shared (not copied) by __copy__
    _shared_state: frozenset[str] = frozenset(
        {"_positions", "_prev_list", "_config", "_sigma_values", "_froms", "_tos"}
    )

    # per-run state defaults (instances overwrite them)
    timesteps: torch.Tensor
    num_inference_steps: int | None = None
    _step_index: int | None = None
    _begin_index: int | None = None

    # ---- loading / saving ------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None,
        return_unused_kwargs: bool = False, **kwargs: Any
    ):
        """Load from a folder or hub repo holding ``scheduler_config.json`` (``subfolder="scheduler"`` for pipelines).

        Hub options (``revision``, ``cache_dir``, ``local_files_only``, ``token``, ``force_download``) go to the hub;
        any other keyword overrides a config value (``timestep_spacing="trailing"``). A file written for another
        scheduler class loads quietly (its foreign keys are ignored); one written for this class warns about keys we
        do not know.
        """
        hub_kwargs = split_hub_kwargs(kwargs)
        params = set(cls._config_params())
        bad = sorted(k for k in kwargs if k not in params)
        if bad and not return_unused_kwargs:
            raise TypeError(
                f"{cls.__name__}.from_pretrained got unknown argument(s) {bad}; config keys: {sorted(params)}"
            )
        path = resolve_file(pretrained_model_name_or_path, cls.config_name, subfolder=subfolder, **hub_kwargs)
        data = read_json(path, what="config")
        cls.extract_init_kwargs(data, warn_unknown=data.get("_class_name") == cls.__name__)  # warns only
        with config_source(path):
            return cls.from_config(data, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> Path:
        """Write ``scheduler_config.json`` into ``save_directory`` (diffusers reads it); return its path."""
        if kwargs.get("push_to_hub"):
            raise NotImplementedError("push_to_hub is not supported; upload the folder with `hf upload`")
        return self.save_config(save_directory)

    @classproperty
    def compatibles(cls) -> list[type]:
        """Scheduler classes that share this one's contract (``Other.from_config(this.config)`` works)."""
        names = [cls.__name__]
        family = KARRAS_DIFFUSION_SCHEDULERS if cls._compatibles is None else tuple(cls._compatibles)
        names += [n for n in family if n != cls.__name__]
        classes = []
        for name in names:
            klass = cls if name == cls.__name__ else load_scheduler_class(name)
            if klass is not None:
                classes.append(klass)
        return classes

    # ---- copies ----------------------------------------------------------------------------------------------------

    def __copy__(self):
        """A scheduler with independent run state: lists/dicts (solver history) are copied, tensors shared.

        Tensors are never written in place by any scheduler. Containers named in ``_shared_state`` are lookup tables
        that are replaced, never mutated, so they are shared too. Subclasses keeping other mutable objects must
        override this (call ``super().__copy__()`` and copy them).
        """
        new = self.__class__.__new__(self.__class__)
        state = self.__dict__.copy()
        for key, value in state.items():
            if key in self._shared_state:
                continue
            if isinstance(value, list):
                state[key] = list(value)
            elif isinstance(value, dict):
                state[key] = dict(value)
        new.__dict__.update(state)
        return new

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def __repr__(self) -> str:
        items = ", ".join(f"{k}={v!r}" for k, v in self.config.items() if k != "trained_betas")
        return f"{type(self).__name__}({items})"

    # ---- step index bookkeeping --------------------------------------------------------------------------------------

    @property
    def step_index(self) -> int | None:
        """Index into ``timesteps`` of the next ``step`` (``None`` until the first ``scale_model_input``/``step``)."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """First index used; set by pipelines that start partway (img2img) with :meth:`set_begin_index`."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index

    def index_for_timestep(self, timestep, schedule_timesteps: torch.Tensor | None = None) -> int:
        """Position of ``timestep`` in the schedule; for a value that occurs twice (Heun/KDPM2 schedules, or an
        img2img start in the middle of one) the second occurrence, as diffusers does."""
        if schedule_timesteps is None:
            schedule_timesteps = self.timesteps
        if isinstance(timestep, torch.Tensor):
            timestep = timestep.to(schedule_timesteps.device)
        indices = (schedule_timesteps == timestep).nonzero()
        if len(indices) == 0:
            raise ValueError(
                f"{type(self).__name__}: timestep {float(timestep)!r} is not in the schedule; pass one of "
                "`scheduler.timesteps` (after set_timesteps)"
            )
        return int(indices[1 if len(indices) > 1 else 0].item())

    def _init_step_index(self, timestep) -> None:
        if self._begin_index is None:
            self._step_index = self.index_for_timestep(timestep)
        else:
            self._step_index = self._begin_index

    def _reset_run_state(self) -> None:
        """Forget the position in the schedule (called by ``set_timesteps``)."""
        self._step_index = None
        self._begin_index = None

    # ---- helpers for subclasses --------------------------------------------------------------------------------------

    def _init_train_schedule(
        self,
        num_train_timesteps: int,
        beta_start: float,
        beta_end: float,
        beta_schedule: str,
        trained_betas=None,
        rescale_betas_zero_snr: bool = False,
    ) -> None:
        """Set ``betas``, ``alphas`` and ``alphas_cumprod`` (float32, computed in float64; see core.make_betas)."""
        self.betas, self.alphas, self.alphas_cumprod = core.make_train_schedule(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr,
            owner=type(self).__name__,
        )

    def _check_set_timesteps_args(
        self,
        num_inference_steps: int | None,
        timesteps,
        sigmas,
        allow_timesteps: bool = False,
        allow_sigmas: bool = False,
    ) -> None:
        """The shared argument rules of ``set_timesteps``: exactly one of num_inference_steps / timesteps / sigmas."""
        name = type(self).__name__
        if timesteps is not None and not allow_timesteps:
            raise ValueError(f"{name} does not support custom `timesteps`; pass num_inference_steps")
        if sigmas is not None and not allow_sigmas:
            raise ValueError(f"{name} does not support custom `sigmas`; pass num_inference_steps")
        given = [n for n, v in (("num_inference_steps", num_inference_steps), ("timesteps", timesteps),
                                ("sigmas", sigmas)) if v is not None]
        if len(given) != 1:
            allowed = ["num_inference_steps"] + (["timesteps"] if allow_timesteps else []) + (
                ["sigmas"] if allow_sigmas else [])
            raise ValueError(f"{name}.set_timesteps: pass exactly one of {allowed} (got {given or 'none'})")

    def _sigma_kind(self) -> str | None:
        cfg = self.config
        return core.sigma_schedule_kind(
            type(self).__name__,
            cfg.get("use_karras_sigmas", False),
            cfg.get("use_exponential_sigmas", False),
            cfg.get("use_beta_sigmas", False),
        )

    def _check_common_options(self) -> None:
        """Validate the options most schedulers share (names present in the config only)."""
        owner, cfg = type(self).__name__, self.config
        if "prediction_type" in cfg:
            core.check_choice(owner, "prediction_type", cfg.prediction_type, self._prediction_types())
        if "timestep_spacing" in cfg:
            core.check_choice(owner, "timestep_spacing", cfg.timestep_spacing, core.TIMESTEP_SPACINGS)
        self._sigma_kind()

    @classmethod
    def _prediction_types(cls) -> tuple[str, ...]:
        return core.PREDICTION_TYPES

    def _add_noise_by_sigma(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """``add_noise`` of a sigma scheduler: ``x0 + sigma(t) * noise`` with ``t`` looked up in ``self.timesteps``
        (or, once a begin index is set, the sigma of the current step)."""
        schedule = self.timesteps.to(original_samples.device)
        timesteps = torch.as_tensor(timesteps, device=original_samples.device).reshape(-1)
        if self._begin_index is None:
            indices = [self.index_for_timestep(t, schedule) for t in timesteps]
        elif self._step_index is not None:
            indices = [self._step_index] * timesteps.shape[0]
        else:
            indices = [self._begin_index] * timesteps.shape[0]
        sigma = self.sigmas.to(original_samples.device)[indices]
        return core.ve_add_noise(original_samples, noise, sigma)


class SigmaSchedulerMixin:
    """Shared pieces of k-diffusion (sigma) schedulers: Euler, Heun, LMS, KDPM2, DPM-Solver ...

    They keep ``sigmas`` (float32, one more than the steps: the final sigma, usually 0) next to float32
    ``timesteps``; the model input is scaled by ``1 / sqrt(sigma**2 + 1)``; ``step_index`` counts the steps taken.
    """

    is_scale_input_called: bool = False

    @property
    def init_noise_sigma(self) -> torch.Tensor:
        """Standard deviation of the initial noise (see :func:`core.init_noise_sigma_for`)."""
        return core.init_noise_sigma_for(self.sigmas, self.config.timestep_spacing)

    def _input_sigma(self) -> torch.Tensor:
        """The sigma the model input is scaled for at the current step (KDPM2 overrides)."""
        return self.sigmas[self._step_index]

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """Scale the sample to the model's input: ``sample / sqrt(sigma**2 + 1)``."""
        if self._step_index is None:
            self._init_step_index(timestep)
        sigma = self._input_sigma()
        self.is_scale_input_called = True
        return sample / ((sigma**2 + 1) ** 0.5)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """``x0 + sigma(t) * noise`` for ``timesteps`` taken from ``self.timesteps`` (img2img start)."""
        return self._add_noise_by_sigma(original_samples, noise, timesteps)

    @staticmethod
    def _reject_integer_timestep(owner: str, timestep) -> None:
        if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
            raise ValueError(
                f"{owner}.step got an integer index as timestep (e.g. from enumerate(timesteps)); pass one of "
                "`scheduler.timesteps` instead"
            )


class DiscreteTimestepMixin:
    """Schedule bookkeeping for schedulers that step between integer timesteps (DDPM, DDIM, LCM ...).

    ``_set_schedule(int_timesteps, device)`` stores ``timesteps`` (int64, on ``device``) and, on the CPU, each
    timestep's position and the timestep it steps to: the next entry of the schedule, ``-1`` (the final alpha) for
    the last. This is the schedule-array rule of :func:`core.previous_timesteps`; no stride formula anywhere.
    The lookups are by value, so ``step`` stays a function of ``timestep`` (img2img may start anywhere).
    """

    _positions: dict[int, int]
    _prev_list: list[int]

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The model takes the sample unscaled."""
        return sample

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[int] | None = None,
        sigmas=None,
    ) -> None:
        """Choose the inference timesteps: ``num_inference_steps`` spaced per ``timestep_spacing``, or ``timesteps``."""
        self._check_set_timesteps_args(num_inference_steps, timesteps, sigmas, allow_timesteps=True)
        cfg = self.config
        self.custom_timesteps = timesteps is not None
        if self.custom_timesteps:
            schedule = core.check_custom_timesteps(type(self).__name__, timesteps, cfg.num_train_timesteps)
        else:
            schedule = core.spaced_timesteps(
                cfg.num_train_timesteps, num_inference_steps, cfg.timestep_spacing, cfg.steps_offset,
                owner=type(self).__name__,
            )
        self.num_inference_steps = len(schedule)
        self._set_schedule(np.round(schedule), device)
        self._reset_run_state()

    def _set_schedule(self, timesteps: np.ndarray, device=None) -> None:
        timesteps = np.asarray(timesteps, dtype=np.int64)
        self.timesteps = torch.from_numpy(timesteps.copy()).to(device)
        # never mutated after this point (rebuilt by the next set_timesteps), so copies may share them
        self._positions = {t: i for i, t in enumerate(timesteps.tolist())}
        self._prev_list = core.previous_timesteps(timesteps).tolist()

    def _position(self, timestep) -> int:
        t = int(timestep)
        try:
            return self._positions[t]
        except KeyError:
            shown = self.timesteps.tolist()
            shown = shown if len(shown) <= 12 else shown[:6] + ["..."] + shown[-3:]
            raise ValueError(
                f"{type(self).__name__}: timestep {t} is not in the current schedule {shown}; pass one of "
                "`scheduler.timesteps`"
            ) from None

    def previous_timestep(self, timestep) -> int:
        """The timestep ``step`` moves ``timestep`` to (``-1``: past the end, i.e. the final alpha)."""
        return self._prev_list[self._position(timestep)]
