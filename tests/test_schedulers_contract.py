"""The scheduler contract: config files both ways with diffusers, cross-loading, copies, add_noise, errors, devices."""

from __future__ import annotations

import copy
import inspect
import json

import diffusers
import pytest
import torch

import diffusekit
from diffusekit.schedulers.base import SchedulerMixin, SchedulerOutput
from diffusekit.schedulers.ddim import DDIMScheduler
from diffusekit.schedulers.ddpm import DDPMScheduler
from diffusekit.schedulers.euler import EulerDiscreteScheduler
from diffusekit.schedulers.euler_ancestral import EulerAncestralDiscreteScheduler
from diffusekit.schedulers.heun import HeunDiscreteScheduler
from diffusekit.schedulers.kdpm2 import KDPM2DiscreteScheduler
from diffusekit.schedulers.kdpm2_ancestral import KDPM2AncestralDiscreteScheduler
from diffusekit.schedulers.lms import LMSDiscreteScheduler
from diffusekit.schedulers.pndm import PNDMScheduler
from scheduler_helpers import SHAPE, adopt_train_schedule, assert_close, dummy_model, quiet, run_loop, theirs_default

OURS = [DDPMScheduler, DDIMScheduler, PNDMScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler,
        LMSDiscreteScheduler, HeunDiscreteScheduler, KDPM2DiscreteScheduler, KDPM2AncestralDiscreteScheduler]
THEIRS = {cls: getattr(diffusers, cls.__name__) for cls in OURS}
DISCRETE = (DDPMScheduler, DDIMScheduler, PNDMScheduler)
STOCHASTIC = (DDPMScheduler, EulerAncestralDiscreteScheduler, KDPM2AncestralDiscreteScheduler)
ids = [c.__name__ for c in OURS]

# a non-default value for every class, plus class-specific options
COMMON = {"beta_schedule": "scaled_linear", "beta_start": 0.0002, "beta_end": 0.015, "num_train_timesteps": 500,
          "steps_offset": 1, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}
SPECIFIC = {
    DDPMScheduler: {"variance_type": "fixed_large", "clip_sample": False, "thresholding": True,
                    "rescale_betas_zero_snr": True, "sample_max_value": 2.0},
    DDIMScheduler: {"set_alpha_to_one": False, "clip_sample_range": 2.0, "dynamic_thresholding_ratio": 0.9},
    PNDMScheduler: {"skip_prk_steps": True, "set_alpha_to_one": True},
    EulerDiscreteScheduler: {"use_karras_sigmas": True, "interpolation_type": "log_linear", "sigma_min": 0.01,
                             "timestep_type": "continuous", "final_sigmas_type": "sigma_min"},
    EulerAncestralDiscreteScheduler: {"rescale_betas_zero_snr": True},
    LMSDiscreteScheduler: {"use_exponential_sigmas": True},
    HeunDiscreteScheduler: {"use_karras_sigmas": True, "clip_sample": True},
    KDPM2DiscreteScheduler: {"use_karras_sigmas": True},
    KDPM2AncestralDiscreteScheduler: {"use_exponential_sigmas": True},
}


def config_for(cls):
    return {**COMMON, **SPECIFIC[cls]}


def test_exports_and_signatures_match_diffusers():
    for cls in OURS:
        assert getattr(diffusekit, cls.__name__) is cls
        ours = inspect.signature(cls.__init__).parameters
        theirs = inspect.signature(THEIRS[cls].__init__).parameters
        assert list(ours) == list(theirs), cls.__name__  # same keys, same order
        for name in ours:
            assert ours[name].default == theirs[name].default, (cls.__name__, name)
    assert diffusekit.SchedulerMixin is SchedulerMixin and diffusekit.SchedulerOutput is SchedulerOutput


@pytest.mark.parametrize("cls", OURS, ids=ids)
def test_save_pretrained_is_read_by_diffusers_and_back(cls, tmp_path):
    quiet()
    ours = cls(**config_for(cls))
    path = ours.save_pretrained(tmp_path / "ours")
    data = json.loads(path.read_text())
    assert path.name == "scheduler_config.json" and data["_class_name"] == cls.__name__
    theirs = THEIRS[cls].from_pretrained(tmp_path / "ours")
    for key, value in ours.config.items():
        assert theirs.config[key] == value, key

    theirs.save_pretrained(tmp_path / "theirs")
    again = cls.from_pretrained(tmp_path / "theirs")
    assert dict(again.config) == dict(ours.config)
    # and the two schedules agree
    again.set_timesteps(4)
    theirs.set_timesteps(4)
    assert again.timesteps.shape == theirs.timesteps.shape


def test_from_pretrained_subfolder_overrides_and_warnings(tmp_path, caplog):
    DDIMScheduler(timestep_spacing="leading").save_pretrained(tmp_path / "scheduler")
    s = DDIMScheduler.from_pretrained(tmp_path, subfolder="scheduler", timestep_spacing="trailing")
    assert s.config.timestep_spacing == "trailing"
    with pytest.raises(TypeError, match="not_an_option"):
        DDIMScheduler.from_pretrained(tmp_path, subfolder="scheduler", not_an_option=1)
    # a file for this very class with a key we do not know: one warning naming it
    f = tmp_path / "scheduler" / "scheduler_config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), "future_option": 3}))
    with caplog.at_level("WARNING"):
        DDIMScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    assert "future_option" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):  # another class's file loads quietly
        EulerDiscreteScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    assert "future_option" not in caplog.text


def test_trained_betas_round_trip(tmp_path):
    betas = torch.linspace(1e-4, 0.02, 1000).tolist()
    s = DDPMScheduler(trained_betas=betas)
    s.save_pretrained(tmp_path)
    theirs = diffusers.DDPMScheduler.from_pretrained(tmp_path)
    assert_close(theirs.betas, s.betas, 1e-7, "betas")
    assert_close(DDPMScheduler.from_pretrained(tmp_path).alphas_cumprod, s.alphas_cumprod, 0, "alphas_cumprod")


@pytest.fixture(scope="module")
def source_configs():
    """(ours, diffusers') configs with the common non-default options, for every scheduler (built once)."""
    quiet()
    common = lambda src: {k: v for k, v in config_for(src).items() if k in COMMON}  # noqa: E731
    return {src: (src(**common(src)).config, THEIRS[src](**common(src)).config) for src in OURS}


@pytest.mark.parametrize("dst", OURS, ids=ids)
def test_from_config_cross_loads_from_every_scheduler(dst, source_configs):
    for src, (ours_config, theirs_config) in source_configs.items():
        s = dst.from_config(ours_config)
        for key in ("beta_schedule", "beta_start", "num_train_timesteps", "steps_offset", "timestep_spacing"):
            assert s.config[key] == ours_config[key], (src.__name__, key)
        s2 = dst.from_config(theirs_config)
        assert dict(s2.config) == dict(s.config)
        s.set_timesteps(4)
    # overrides
    assert dst.from_config(DDIMScheduler().config, steps_offset=3).config.steps_offset == 3


@pytest.mark.parametrize("cls", OURS, ids=ids)
def test_compatibles_and_basic_attributes(cls):
    compatibles = cls.compatibles
    assert compatibles[0] is cls and set(OURS) <= set(compatibles)
    assert cls().compatibles == compatibles  # works on instances too
    assert all(issubclass(c, SchedulerMixin) for c in compatibles)
    s = cls()
    assert len(s) == 1000 and s.order == THEIRS[cls].order
    s.set_timesteps(4)
    assert s.timesteps.dtype == (torch.int64 if cls in DISCRETE else torch.float32)
    theirs = theirs_default(THEIRS[cls])
    theirs.set_timesteps(4)
    assert s.timesteps.dtype == theirs.timesteps.dtype


@pytest.mark.parametrize("cls", OURS, ids=ids)
def test_step_outputs(cls):
    s = cls()
    s.set_timesteps(4)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    t = s.timesteps[0]
    kw = (lambda: {"generator": torch.Generator().manual_seed(0)}) if cls in STOCHASTIC else dict
    out = s.step(dummy_model(s.scale_model_input(x, t), t), t, x, **kw())
    assert isinstance(out, SchedulerOutput) and out.prev_sample.shape == x.shape
    assert out[0] is out.prev_sample
    s.set_timesteps(4)
    tup = s.step(dummy_model(s.scale_model_input(x, t), t), t, x, return_dict=False, **kw())
    assert isinstance(tup, tuple) and torch.equal(tup[0], out.prev_sample)
    assert len(tup) == (1 if cls is PNDMScheduler else 2)


def _pair_loop(cls, steps_a, steps_b, interleave: bool):
    """Two runs from one loaded scheduler via copy.copy, interleaved step by step or one after the other."""
    base = cls(prediction_type="v_prediction") if cls is not PNDMScheduler else cls(skip_prk_steps=False)
    runs = []
    for steps, seed in ((steps_a, 0), (steps_b, 1)):
        s = copy.copy(base)
        s.set_timesteps(steps)
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(10 + seed)) * s.init_noise_sigma
        runs.append([s, list(s.timesteps), x, torch.Generator().manual_seed(seed)])

    def advance(run):
        s, ts, x, gen = run
        t = ts.pop(0)
        kwargs = {"generator": gen} if cls in STOCHASTIC else {}
        run[2] = s.step(dummy_model(s.scale_model_input(x, t), t), t, x, **kwargs).prev_sample

    if interleave:
        while runs[0][1] or runs[1][1]:
            for run in runs:
                if run[1]:
                    advance(run)
    else:
        for run in runs:
            while run[1]:
                advance(run)
    return runs[0][2], runs[1][2], base


@pytest.mark.parametrize("cls", OURS, ids=ids)
def test_copies_are_independent(cls):
    a1, b1, base = _pair_loop(cls, 6, 5, interleave=True)
    a2, b2, _ = _pair_loop(cls, 6, 5, interleave=False)
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert base.num_inference_steps in (None, 1000)  # the shared scheduler was not touched
    assert base.step_index is None


def test_copy_copies_containers_and_shares_tensors():
    s = LMSDiscreteScheduler()
    s.set_timesteps(5)
    s.history, s.cache = [1], {"a": 1}  # containers a solver may mutate in place (DPM-Solver's model_outputs)
    c = copy.copy(s)
    c.history.append(2)
    c.cache["b"] = 2
    assert s.history == [1] and s.cache == {"a": 1}
    assert c.alphas_cumprod is s.alphas_cumprod and c.sigmas is s.sigmas  # tensors shared, not copied
    assert c.config is s.config and type(c.config) is type(s.config)  # the frozen config stays frozen
    assert c._sigma_values is s._sigma_values  # replaced-never-mutated tables are shared


@pytest.mark.parametrize("cls", OURS, ids=ids)
def test_copy_mid_run_forks_the_solver_state(cls):
    s = cls()
    s.set_timesteps(6)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * s.init_noise_sigma
    ts = list(s.timesteps)
    for t in ts[:3]:
        x = s.step(dummy_model(s.scale_model_input(x, t), t), t, x,
                   **({"generator": torch.Generator().manual_seed(1)} if cls in STOCHASTIC else {})).prev_sample
    fork = copy.copy(s)
    results = []
    for sched in (fork, s):  # run the fork to the end first; the original must be unaffected
        y = x
        for t in ts[3:]:
            y = sched.step(dummy_model(sched.scale_model_input(y, t), t), t, y,
                           **({"generator": torch.Generator().manual_seed(2)} if cls in STOCHASTIC else {})).prev_sample
        results.append(y)
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("cls", STOCHASTIC + (DDIMScheduler,), ids=lambda c: c.__name__)
def test_seeded_noise_reproduces_and_depends_on_seed(cls):
    kwargs = {"eta": 1.0} if cls is DDIMScheduler else {}
    a = run_loop(cls(), step_kwargs=kwargs, seed=0)
    b = run_loop(cls(), step_kwargs=kwargs, seed=0)
    other_start = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1234))
    c = run_loop(cls(), step_kwargs=kwargs, seed=1, start=other_start)
    assert torch.equal(a, b) and not torch.allclose(a, c)


@pytest.mark.parametrize("cls", DISCRETE, ids=lambda c: c.__name__)
def test_add_noise_and_velocity_discrete(cls):
    ours, theirs = cls(beta_schedule="scaled_linear"), THEIRS[cls](beta_schedule="scaled_linear")
    x0 = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 17, 500, 999])  # any timesteps, not only scheduled ones
    assert_close(ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t), 1e-5, "add_noise")
    adopt_train_schedule(ours, theirs)
    assert_close(ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t), 1e-7, "add_noise (same schedule)")
    assert_close(ours.add_noise(x0, noise, torch.tensor(321)), theirs.add_noise(x0, noise, torch.tensor(321)),
                 1e-7, "one timestep for the batch")
    if hasattr(theirs, "get_velocity"):
        assert_close(ours.get_velocity(x0, noise, t), theirs.get_velocity(x0, noise, t), 1e-7, "velocity")


@pytest.mark.parametrize("cls", [c for c in OURS if c not in DISCRETE], ids=lambda c: c.__name__)
def test_add_noise_sigma_schedulers(cls):
    ours, theirs = cls(), theirs_default(THEIRS[cls])
    adopt_train_schedule(ours, theirs)
    ours.set_timesteps(6)
    theirs.set_timesteps(6)
    x0 = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    idx = [0, 3, len(ours.timesteps) - 1]
    a = ours.add_noise(x0, noise, ours.timesteps[idx])
    b = theirs.add_noise(x0, noise, theirs.timesteps[idx])
    assert_close(a, b, 1e-6, "add_noise")
    ours.set_begin_index(2)
    theirs.set_begin_index(2)  # img2img: every entry gets the begin index's sigma
    assert_close(ours.add_noise(x0, noise, ours.timesteps[idx]), theirs.add_noise(x0, noise, theirs.timesteps[idx]),
                 1e-6, "add_noise with begin index")
    assert_close(ours.add_noise(x0, noise, ours.timesteps[idx]), x0 + noise * ours.sigmas[2], 1e-6, "begin sigma")


@pytest.mark.parametrize("cls", [c for c in OURS if c not in DISCRETE], ids=lambda c: c.__name__)
def test_begin_index_starts_partway(cls):
    """img2img: start at a later timestep with set_begin_index; equals diffusers doing the same."""
    quiet()
    results = []
    for s in (cls(), theirs_default(THEIRS[cls])):
        if results:
            adopt_train_schedule(results[0][1], s)
        s.set_timesteps(8)
        start = 2 * s.order if s.order == 2 else 3
        s.set_begin_index(start)
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
        takes_generator = "generator" in inspect.signature(s.step).parameters
        for t in s.timesteps[start:]:
            kwargs = {"generator": torch.Generator().manual_seed(3)} if takes_generator else {}
            x = s.step(dummy_model(s.scale_model_input(x, t), t), t, x, **kwargs).prev_sample
        results.append((x, s))
    assert results[0][1].step_index == len(results[0][1].timesteps)
    assert_close(results[0][0], results[1][0], 1e-5, "img2img loop")


BAD_OPTIONS = [
    (DDPMScheduler, "beta_schedule", "foo"),
    (DDPMScheduler, "variance_type", "fixed_medium"),
    (DDPMScheduler, "prediction_type", "x0"),
    (DDIMScheduler, "timestep_spacing", "uniform"),
    (PNDMScheduler, "prediction_type", "sample"),
    (EulerDiscreteScheduler, "interpolation_type", "cubic"),
    (EulerDiscreteScheduler, "timestep_type", "fractional"),
    (EulerDiscreteScheduler, "final_sigmas_type", "one"),
    (LMSDiscreteScheduler, "beta_schedule", "cosine"),
    (HeunDiscreteScheduler, "timestep_spacing", "log"),
    (KDPM2AncestralDiscreteScheduler, "prediction_type", "flow"),
]


@pytest.mark.parametrize("cls,key,value", BAD_OPTIONS, ids=[f"{c.__name__}-{k}" for c, k, _ in BAD_OPTIONS])
def test_bad_option_is_a_clear_error_at_construction(cls, key, value):
    with pytest.raises(ValueError, match=key) as info:
        cls(**{key: value})
    assert repr(value) in str(info.value) and "choose one of" in str(info.value)


@pytest.mark.parametrize("cls", [EulerDiscreteScheduler, LMSDiscreteScheduler, HeunDiscreteScheduler,
                                 KDPM2DiscreteScheduler, KDPM2AncestralDiscreteScheduler], ids=lambda c: c.__name__)
def test_more_than_one_sigma_schedule_is_rejected(cls):
    with pytest.raises(ValueError, match="only one of"):
        cls(use_karras_sigmas=True, use_beta_sigmas=True)


@pytest.mark.parametrize("cls", OURS, ids=ids)
def test_set_timesteps_argument_errors(cls):
    s = cls()
    with pytest.raises(ValueError, match="exactly one"):
        s.set_timesteps()
    with pytest.raises(ValueError, match="larger than num_train_timesteps"):
        s.set_timesteps(1001)
    if cls in (DDPMScheduler, DDIMScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler):
        with pytest.raises(ValueError, match="exactly one"):
            s.set_timesteps(5, timesteps=[900, 500, 100])
        if cls in DISCRETE:
            with pytest.raises(ValueError, match="descending"):
                s.set_timesteps(timesteps=[100, 500, 900])
            with pytest.raises(ValueError, match=r"\[0, 1000\)"):
                s.set_timesteps(timesteps=[1000, 500])
    else:
        with pytest.raises(ValueError, match="custom `timesteps`"):
            s.set_timesteps(timesteps=[900, 500, 100])
    if cls is not EulerDiscreteScheduler:
        with pytest.raises(ValueError, match="custom `sigmas`"):
            s.set_timesteps(sigmas=[3.0, 1.0, 0.0])


def test_custom_timesteps_with_karras_is_rejected():
    for cls in (EulerDiscreteScheduler, HeunDiscreteScheduler):
        with pytest.raises(ValueError, match="use_karras_sigmas"):
            cls(use_karras_sigmas=True).set_timesteps(timesteps=[900.0, 100.0])


@pytest.mark.parametrize("cls", OURS, ids=ids)
def test_set_timesteps_places_tensors_on_the_device(cls):
    s = cls()
    s.set_timesteps(4, device="meta")
    assert s.timesteps.device.type == "meta"
    if hasattr(s, "sigmas"):
        assert s.sigmas.device.type == "meta"
    assert s.alphas_cumprod.device.type == "cpu"  # the shared training schedule stays put


def test_config_is_frozen():
    s = DDIMScheduler()
    with pytest.raises(TypeError, match="frozen"):
        s.config["eta"] = 1  # type: ignore[index]
    assert "DDIMScheduler(" in repr(s)


def test_every_step_takes_a_generator_and_only_ddim_takes_eta():
    """Pipelines pass generator= to every scheduler and eta= where accepts_eta says so: no signature probing."""
    import inspect

    import diffusekit
    from diffusekit.schedulers.base import _SCHEDULER_MODULES

    for name in [*_SCHEDULER_MODULES, "LCMScheduler"]:
        cls = getattr(diffusekit, name)
        params = inspect.signature(cls.step).parameters
        assert "generator" in params, name
        assert ("eta" in params) == cls.accepts_eta, name
