"""Sampler names of the popular UIs -> scheduler class + options.

``get_scheduler("DPM++ 2M Karras", pipe.scheduler.config)`` builds ``DPMSolverMultistepScheduler`` from the
pipeline's config with ``use_karras_sigmas=True``. Names are matched case-insensitively, with:

* AUTOMATIC1111 sampler names ("Euler a", "DPM++ 2M SDE", "DPM2 a", "PLMS" ...), optionally followed by a schedule
  type ("Karras", "Exponential", "Beta", "SGM Uniform", "Automatic"/"Normal"): "DPM++ 2M SDE Karras";
* ComfyUI sampler names ("dpmpp_2m", "euler_ancestral", "uni_pc_bh2" ...), optionally joined to a ComfyUI scheduler
  name by a space, ``_``, ``:`` or ``/``: "dpmpp_2m karras", "dpmpp_2m_sde_gpu:exponential".

A sampler name sets every option that defines it (e.g. "DPM++ 2M" sets ``algorithm_type="dpmsolver++"``,
``solver_order=2`` and turns karras/exponential/beta sigmas off), so switching names on one config never inherits
the previous sampler's choices. Scheduler classes are imported only when ``get_scheduler`` builds one.

Samplers that have no faithful equivalent here are mapped to the closest scheduler and say so in
``SamplerSpec.note`` ("DPM++ 2S a", "DPM++ 3M SDE"); those with none at all ("DPM fast", "DPM adaptive", "Restart")
raise a ``ValueError`` saying so.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import re
from types import MappingProxyType
from typing import Any, Mapping

__all__ = ["SamplerSpec", "get_scheduler", "resolve_sampler", "sampler_names", "schedule_names"]


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """A resolved sampler: scheduler class name and the options passed to ``from_config``."""

    scheduler: str
    options: Mapping[str, Any]
    schedules: tuple[str, ...] = ()  # schedule types this sampler accepts (keys of _SCHEDULES)
    note: str = ""

    def scheduler_class(self):
        """The scheduler class (imports its module now)."""
        return getattr(importlib.import_module("diffusekit"), self.scheduler)


# schedule type -> options. "sigma" schedules need use_*_sigmas; "sgm_uniform" needs timestep_spacing.
_NO_SIGMA_SCHEDULE = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}
_SCHEDULES: dict[str, dict[str, Any]] = {
    "normal": {},
    "karras": {**_NO_SIGMA_SCHEDULE, "use_karras_sigmas": True},
    "exponential": {**_NO_SIGMA_SCHEDULE, "use_exponential_sigmas": True},
    "beta": {**_NO_SIGMA_SCHEDULE, "use_beta_sigmas": True},
    "sgm_uniform": {"timestep_spacing": "trailing"},
}
# spellings of the schedule types (normalised: lower case, single spaces)
_SCHEDULE_ALIASES = {
    "normal": "normal", "automatic": "normal", "default": "normal",
    "karras": "karras", "exponential": "exponential", "beta": "beta",
    "sgm uniform": "sgm_uniform", "sgm_uniform": "sgm_uniform", "sgm-uniform": "sgm_uniform",
}
_A1111_SCHEDULE_NAMES = {"karras": "Karras", "exponential": "Exponential", "beta": "Beta", "sgm_uniform": "SGM Uniform"}
SIGMA_SCHEDULES = ("normal", "karras", "exponential", "beta", "sgm_uniform")
SPACING_ONLY = ("normal", "sgm_uniform")


def _spec(scheduler: str, schedules=SIGMA_SCHEDULES, note: str = "", **options) -> SamplerSpec:
    if "karras" in schedules:
        options = {**_NO_SIGMA_SCHEDULE, **options}  # the plain name means "no special sigma schedule"
    return SamplerSpec(scheduler, MappingProxyType(dict(options)), tuple(schedules), note)


_DPM_PP_2M = dict(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", use_lu_lambdas=False)
_DPM_PP_2M_SDE = dict(algorithm_type="sde-dpmsolver++", solver_order=2, solver_type="midpoint", use_lu_lambdas=False)
_DPM_PP_3M_SDE = dict(algorithm_type="sde-dpmsolver++", solver_order=3, solver_type="heun", use_lu_lambdas=False)
_APPROX_2S_A = ("approximation: ancestral DPM-Solver++(2S) has no diffusers scheduler; DPM-Solver++ singlestep "
                "order 2 (deterministic) is the closest")
_APPROX_3M_SDE = ("approximation: DPM-Solver++ multistep SDE of order 3 (k-diffusion's 3M SDE uses a different "
                  "third-order update)")

# canonical name -> spec. A1111 names first, then ComfyUI names.
_SAMPLERS: dict[str, SamplerSpec] = {
    # --- AUTOMATIC1111 / Forge --------------------------------------------------------------------------------------
    "DPM++ 2M": _spec("DPMSolverMultistepScheduler", **_DPM_PP_2M),
    "DPM++ 2M SDE": _spec("DPMSolverMultistepScheduler", **_DPM_PP_2M_SDE),
    "DPM++ 2M SDE Heun": _spec("DPMSolverMultistepScheduler", **{**_DPM_PP_2M_SDE, "solver_type": "heun"}),
    "DPM++ 3M SDE": _spec("DPMSolverMultistepScheduler", note=_APPROX_3M_SDE, **_DPM_PP_3M_SDE),
    "DPM++ 2S a": _spec("DPMSolverSinglestepScheduler", schedules=("normal", "karras", "exponential", "beta"),
                        note=_APPROX_2S_A, algorithm_type="dpmsolver++", solver_order=2),
    "DPM++ SDE": _spec("DPMSolverSDEScheduler"),
    "DPM2": _spec("KDPM2DiscreteScheduler"),
    "DPM2 a": _spec("KDPM2AncestralDiscreteScheduler"),
    "Euler": _spec("EulerDiscreteScheduler"),
    "Euler a": _spec("EulerAncestralDiscreteScheduler", schedules=SPACING_ONLY),
    "Heun": _spec("HeunDiscreteScheduler"),
    "LMS": _spec("LMSDiscreteScheduler"),
    "DDIM": _spec("DDIMScheduler", schedules=SPACING_ONLY),
    "DDPM": _spec("DDPMScheduler", schedules=SPACING_ONLY),
    "PLMS": _spec("PNDMScheduler", schedules=SPACING_ONLY, skip_prk_steps=True),
    "PNDM": _spec("PNDMScheduler", schedules=SPACING_ONLY, skip_prk_steps=False),
    "UniPC": _spec("UniPCMultistepScheduler"),
    "DEIS": _spec("DEISMultistepScheduler"),
    "LCM": _spec("LCMScheduler", schedules=("normal",)),
    # --- ComfyUI ----------------------------------------------------------------------------------------------------
    "euler": _spec("EulerDiscreteScheduler"),
    "euler_ancestral": _spec("EulerAncestralDiscreteScheduler", schedules=SPACING_ONLY),
    "heun": _spec("HeunDiscreteScheduler"),
    "dpm_2": _spec("KDPM2DiscreteScheduler"),
    "dpm_2_ancestral": _spec("KDPM2AncestralDiscreteScheduler"),
    "lms": _spec("LMSDiscreteScheduler"),
    "dpmpp_2s_ancestral": _spec("DPMSolverSinglestepScheduler", schedules=("normal", "karras", "exponential", "beta"),
                                note=_APPROX_2S_A, algorithm_type="dpmsolver++", solver_order=2),
    "dpmpp_sde": _spec("DPMSolverSDEScheduler"),
    "dpmpp_sde_gpu": _spec("DPMSolverSDEScheduler"),
    "dpmpp_2m": _spec("DPMSolverMultistepScheduler", **_DPM_PP_2M),
    "dpmpp_2m_sde": _spec("DPMSolverMultistepScheduler", **_DPM_PP_2M_SDE),
    "dpmpp_2m_sde_gpu": _spec("DPMSolverMultistepScheduler", **_DPM_PP_2M_SDE),
    "dpmpp_3m_sde": _spec("DPMSolverMultistepScheduler", note=_APPROX_3M_SDE, **_DPM_PP_3M_SDE),
    "dpmpp_3m_sde_gpu": _spec("DPMSolverMultistepScheduler", note=_APPROX_3M_SDE, **_DPM_PP_3M_SDE),
    "ddpm": _spec("DDPMScheduler", schedules=SPACING_ONLY),
    "ddim": _spec("DDIMScheduler", schedules=SPACING_ONLY),
    "lcm": _spec("LCMScheduler", schedules=("normal",)),
    "deis": _spec("DEISMultistepScheduler"),
    "uni_pc": _spec("UniPCMultistepScheduler", solver_type="bh1"),
    "uni_pc_bh2": _spec("UniPCMultistepScheduler", solver_type="bh2"),
}

# names the UIs have but no scheduler here implements
_UNAVAILABLE = {
    "dpm fast": "DPM fast", "dpm_fast": "DPM fast", "dpm adaptive": "DPM adaptive", "dpm_adaptive": "DPM adaptive",
    "restart": "Restart", "ipndm": "iPNDM", "ipndm_v": "iPNDM-v", "res_multistep": "RES multistep",
    "ddim cfg++": "DDIM CFG++", "euler_cfg_pp": "Euler CFG++", "euler_ancestral_cfg_pp": "Euler a CFG++",
    "dpmpp_2m_cfg_pp": "DPM++ 2M CFG++", "dpmpp_2s_ancestral_cfg_pp": "DPM++ 2S a CFG++", "heunpp2": "Heun++ 2",
}


def _normalise(name: str) -> str:
    return re.sub(r"\s+", " ", name.strip().lower())


_INDEX: dict[str, str] = {_normalise(k): k for k in _SAMPLERS}
_SCHEDULE_SUFFIXES = sorted(_SCHEDULE_ALIASES, key=len, reverse=True)


def sampler_names() -> list[str]:
    """Every sampler name (A1111 and ComfyUI spellings), without schedule suffixes."""
    return list(_SAMPLERS)


def schedule_names() -> list[str]:
    """The schedule types a sampler name may end with (see the module docstring)."""
    return list(_SCHEDULES)


def _known_combinations() -> list[str]:
    names = list(_SAMPLERS)
    for key, spec in _SAMPLERS.items():
        comfy = key == key.lower()
        for schedule in spec.schedules:
            if schedule != "normal":
                names.append(f"{key} {schedule}" if comfy else f"{key} {_A1111_SCHEDULE_NAMES[schedule]}")
    return names


def _unknown(name: str) -> ValueError:
    close = difflib.get_close_matches(name, _known_combinations(), n=5, cutoff=0.5)
    if not close:  # case-insensitive second try
        lowered = {_normalise(n): n for n in _known_combinations()}
        close = [lowered[m] for m in difflib.get_close_matches(_normalise(name), list(lowered), n=5, cutoff=0.5)]
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return ValueError(
        f"unknown sampler name {name!r}{hint} Known samplers: {', '.join(_SAMPLERS)}; optional schedule suffix: "
        f"{', '.join(_SCHEDULES)}"
    )


def resolve_sampler(name: str) -> SamplerSpec:
    """The :class:`SamplerSpec` (class name + options) for a UI sampler name, with any schedule suffix applied."""
    if not isinstance(name, str):
        raise TypeError(f"sampler name must be a string, got {type(name).__name__}")
    key = _normalise(name)
    if key in _INDEX:
        return _SAMPLERS[_INDEX[key]]
    for alias in _SCHEDULE_SUFFIXES:
        for sep in (" ", "_", ":", "/"):
            suffix = sep + alias
            if key.endswith(suffix) and key[: -len(suffix)].strip() in _INDEX:
                base_name = _INDEX[key[: -len(suffix)].strip()]
                base = _SAMPLERS[base_name]
                schedule = _SCHEDULE_ALIASES[alias]
                if schedule not in base.schedules:
                    raise ValueError(
                        f"sampler {base_name!r} ({base.scheduler}) does not support the {schedule!r} schedule; "
                        f"it supports: {', '.join(base.schedules) or 'none'}"
                    )
                options = {**base.options, **_SCHEDULES[schedule]}
                return SamplerSpec(base.scheduler, MappingProxyType(options), (schedule,), base.note)
    if key in _UNAVAILABLE:
        raise ValueError(f"sampler {_UNAVAILABLE[key]!r} has no equivalent scheduler in diffusekit")
    raise _unknown(name)


def get_scheduler(name: str, config: Mapping[str, Any] | Any = None, **overrides):
    """Build the scheduler a UI sampler name stands for: ``Cls.from_config(config, **options, **overrides)``.

    ``config`` is usually the pipeline's scheduler config (``pipe.scheduler.config``) or a scheduler; keys the
    class does not know are ignored. ``overrides`` win over the name's options. Unknown names raise ``ValueError``
    listing close matches.
    """
    spec = resolve_sampler(name)
    cls = spec.scheduler_class()
    if config is not None and hasattr(config, "config") and not isinstance(config, Mapping):
        config = config.config
    return cls.from_config(config, **{**spec.options, **overrides})
