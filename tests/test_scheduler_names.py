"""UI sampler names -> schedulers (diffusekit.schedulers.names / diffusekit.get_scheduler)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

import diffusekit
from diffusekit.schedulers.names import resolve_sampler, sampler_names, schedule_names
from multistep_helpers import assert_close, run_loop, use_training_schedule_of

diffusers = pytest.importorskip("diffusers")

HAS_TORCHSDE = importlib.util.find_spec("torchsde") is not None
SD_CONFIG = dict(
    diffusers.PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                            skip_prk_steps=True, set_alpha_to_one=False, timestep_spacing="leading").config
)
SD_CONFIG.pop("_use_default_values", None)

# The equivalents diffusers documents for A1111 / ComfyUI sampler names (scheduler class, from_config overrides).
DOCUMENTED = {
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "DPM++ 2M SDE Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True,
                                                            "algorithm_type": "sde-dpmsolver++"}),
    "DPM++ 2M SDE Heun Exponential": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++",
                                                                      "solver_type": "heun",
                                                                      "use_exponential_sigmas": True}),
    "DPM++ SDE": ("DPMSolverSDEScheduler", {}),
    "DPM++ SDE Karras": ("DPMSolverSDEScheduler", {"use_karras_sigmas": True}),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DPM2 Karras": ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),
    "DPM2 a Karras": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler Karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Euler a SGM Uniform": ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "LMS Karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "DDIM": ("DDIMScheduler", {}),
    "PLMS": ("PNDMScheduler", {"skip_prk_steps": True}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "DEIS": ("DEISMultistepScheduler", {}),
    "LCM": ("LCMScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpmpp_2m_sde_gpu_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True,
                                                                "algorithm_type": "sde-dpmsolver++"}),
    "dpmpp_sde:exponential": ("DPMSolverSDEScheduler", {"use_exponential_sigmas": True}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "euler beta": ("EulerDiscreteScheduler", {"use_beta_sigmas": True}),
    "dpm_2_ancestral/karras": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}),
    "lms normal": ("LMSDiscreteScheduler", {}),
    "ddim sgm_uniform": ("DDIMScheduler", {"timestep_spacing": "trailing"}),
    "uni_pc": ("UniPCMultistepScheduler", {"solver_type": "bh1"}),
    "uni_pc_bh2": ("UniPCMultistepScheduler", {"solver_type": "bh2"}),
    "deis": ("DEISMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
}


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_name_builds_the_documented_diffusers_equivalent(name):
    cls_name, overrides = DOCUMENTED[name]
    if cls_name == "DPMSolverSDEScheduler" and not HAS_TORCHSDE:
        pytest.skip("torchsde not installed")
    ours = diffusekit.get_scheduler(name, SD_CONFIG)
    assert type(ours).__name__ == cls_name
    theirs = getattr(diffusers, cls_name).from_config(SD_CONFIG, **overrides)
    own = set(ours.config)
    differing = {k: (ours.config[k], theirs.config[k]) for k in own if k in theirs.config
                 and ours.config[k] != theirs.config[k] and not (ours.config[k] in ((), []) and theirs.config[k] == [])}
    assert not differing


@pytest.mark.parametrize("name", ["DPM++ 2M SDE Karras", "uni_pc_bh2", "DEIS Exponential"])  # uni_pc (bh1): diffusers ends in NaN
def test_named_scheduler_samples_like_diffusers(name):
    ours = diffusekit.get_scheduler(name, SD_CONFIG)
    cls_name, overrides = DOCUMENTED.get(name, ("DEISMultistepScheduler", {"use_exponential_sigmas": True}))
    theirs = getattr(diffusers, cls_name).from_config(SD_CONFIG, **overrides)
    use_training_schedule_of(ours, theirs)
    assert_close(run_loop(ours, 8), run_loop(theirs, 8))


@pytest.mark.parametrize("name", sampler_names())
def test_every_name_and_schedule_builds(name):
    spec = resolve_sampler(name)
    if spec.scheduler == "DPMSolverSDEScheduler" and not HAS_TORCHSDE:
        pytest.skip("torchsde not installed")
    params = set(spec.scheduler_class()._config_params())
    for schedule in spec.schedules:
        full = resolve_sampler(f"{name} {schedule}")
        assert set(full.options) <= params, set(full.options) - params
        scheduler = diffusekit.get_scheduler(f"{name} {schedule}", SD_CONFIG)
        scheduler.set_timesteps(4)
        assert len(scheduler.timesteps) >= 4


def test_switching_names_on_one_config_resets_the_previous_choices():
    sde_karras = diffusekit.get_scheduler("DPM++ 2M SDE Karras", SD_CONFIG)
    plain = diffusekit.get_scheduler("DPM++ 2M", sde_karras)  # a scheduler is accepted in place of its config
    assert plain.config.algorithm_type == "dpmsolver++" and not plain.config.use_karras_sigmas
    assert plain.config.steps_offset == 1 and plain.config.beta_schedule == "scaled_linear"
    third = diffusekit.get_scheduler("DPM++ 2M", diffusekit.DPMSolverMultistepScheduler(solver_order=3).config)
    assert third.config.solver_order == 2
    overridden = diffusekit.get_scheduler("DPM++ 2M Karras", SD_CONFIG, solver_order=3, use_karras_sigmas=False)
    assert overridden.config.solver_order == 3 and not overridden.config.use_karras_sigmas
    assert type(diffusekit.get_scheduler("euler")).__name__ == "EulerDiscreteScheduler"  # config optional


def test_names_are_case_and_space_insensitive():
    assert resolve_sampler("  dpm++   2m  KARRAS ") == resolve_sampler("DPM++ 2M Karras")
    assert resolve_sampler("DPMPP_2M_SDE_karras").options == resolve_sampler("DPM++ 2M SDE Karras").options


def test_unknown_names_list_close_matches():
    with pytest.raises(ValueError, match=r"unknown sampler name 'DPM\+\+ 2M Karas'.*'DPM\+\+ 2M Karras'"):
        diffusekit.get_scheduler("DPM++ 2M Karas")
    with pytest.raises(ValueError, match=r"did you mean.*'dpmpp_2m'"):
        resolve_sampler("dpmpp2m")
    with pytest.raises(ValueError, match=r"did you mean.*'Euler a'"):
        resolve_sampler("Eular a")
    with pytest.raises(ValueError, match="unknown sampler name"):
        resolve_sampler("zzzz")


def test_unsupported_schedule_and_unavailable_sampler():
    with pytest.raises(ValueError, match=r"'Euler a'.*does not support the 'karras' schedule.*normal, sgm_uniform"):
        resolve_sampler("Euler a Karras")
    with pytest.raises(ValueError, match=r"does not support the 'sgm_uniform'"):
        resolve_sampler("DPM++ 2S a SGM Uniform")  # singlestep has no timestep_spacing
    with pytest.raises(ValueError, match="'DPM adaptive' has no equivalent"):
        resolve_sampler("DPM adaptive")
    with pytest.raises(TypeError):
        resolve_sampler(None)


def test_approximations_say_so():
    assert "approximation" in resolve_sampler("DPM++ 2S a").note
    assert "approximation" in resolve_sampler("dpmpp_3m_sde_gpu").note
    assert resolve_sampler("DPM++ 2M").note == ""
    assert set(schedule_names()) == {"normal", "karras", "exponential", "beta", "sgm_uniform"}


def test_class_lookup_is_lazy():
    """Resolving names imports neither torch nor any scheduler module (torch is blocked in the child process);
    building one imports just that scheduler's module (checked in-process by the tests above)."""
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # any torch import now fails\n"
        "from diffusekit.schedulers.names import resolve_sampler, sampler_names\n"
        "for name in sampler_names():\n"
        "    for schedule in resolve_sampler(name).schedules:\n"
        "        resolve_sampler(name + ' ' + schedule)\n"
        "loaded = [m for m in sys.modules if m.startswith('diffusekit.schedulers.') and m != 'diffusekit.schedulers.names']\n"
        "assert not loaded, loaded\n"
        "try:\n"
        "    resolve_sampler('DPM++ 2M Karras').scheduler_class()\n"
        "except ImportError:\n"
        "    print('deferred')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "deferred"
