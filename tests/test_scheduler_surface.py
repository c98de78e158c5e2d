"""Scheduler surface that users call directly: PNDM's step_prk / step_plms, UniPC's disable_corrector default,
trained_betas shorter than num_train_timesteps (each against diffusers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffusekit
from scheduler_helpers import EXACT, OWN, SHAPE, adopt_train_schedule, dummy_model, quiet, run_loop

diffusers = pytest.importorskip("diffusers")


def close(a, b, tol):
    scale = max(1.0, float(b.abs().max()))
    assert float((a - b).abs().max()) <= tol * scale


@pytest.mark.parametrize("skip_prk_steps", [False, True])
def test_pndm_step_prk_and_step_plms_called_directly(skip_prk_steps):
    quiet()
    kwargs = dict(skip_prk_steps=skip_prk_steps)
    ours, theirs = diffusekit.PNDMScheduler(**kwargs), diffusers.PNDMScheduler(**kwargs)
    adopt_train_schedule(ours, theirs)
    results = []
    for scheduler in (ours, theirs):
        scheduler.set_timesteps(10)  # an even stride: see PNDMScheduler's docstring for odd ones
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
        n_prk = len(scheduler.prk_timesteps)
        for i, t in enumerate(scheduler.timesteps):
            method = scheduler.step_prk if i < n_prk else scheduler.step_plms
            x = method(dummy_model(x, t), t, x).prev_sample
        results.append(x)
    close(results[0], results[1], EXACT)


def test_pndm_step_methods_refuse_the_wrong_phase():
    scheduler = diffusekit.PNDMScheduler()
    scheduler.set_timesteps(8)
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="Runge-Kutta warm-up steps first"):
        scheduler.step_plms(x, scheduler.timesteps[0], x)
    for t in scheduler.timesteps[: len(scheduler.prk_timesteps)]:
        scheduler.step_prk(x, t, x, return_dict=False)
    with pytest.raises(ValueError, match="warm-up is over"):
        scheduler.step_prk(x, scheduler.timesteps[len(scheduler.prk_timesteps)], x)


def test_unipc_disable_corrector_round_trips_like_diffusers(tmp_path):
    ours, theirs = diffusekit.UniPCMultistepScheduler(), diffusers.UniPCMultistepScheduler()
    assert ours.config.disable_corrector == theirs.config.disable_corrector == []
    ours.save_config(tmp_path / "ours")
    theirs.save_config(tmp_path / "theirs")
    for folder in ("ours", "theirs"):
        reloaded = diffusekit.UniPCMultistepScheduler.from_pretrained(tmp_path / folder)
        assert reloaded.config.disable_corrector == []
        assert reloaded.config == ours.config
        assert diffusers.UniPCMultistepScheduler.from_pretrained(tmp_path / folder).config.disable_corrector == []
    # the default is never shared between objects
    a, b = diffusekit.UniPCMultistepScheduler(), diffusekit.UniPCMultistepScheduler()
    assert a.config.disable_corrector is not b.config.disable_corrector
    with_list = diffusekit.UniPCMultistepScheduler(disable_corrector=[0, 2])
    assert with_list.config.disable_corrector == [0, 2]


SHORT_BETAS = np.linspace(0.001, 0.2, 20).tolist()


@pytest.mark.parametrize(
    "name",
    ["EulerDiscreteScheduler", "LMSDiscreteScheduler", "HeunDiscreteScheduler", "KDPM2DiscreteScheduler",
     "KDPM2AncestralDiscreteScheduler"],
)
def test_short_trained_betas_define_the_training_schedule(name):
    """``trained_betas`` of length 20 under the default ``num_train_timesteps=1000``: the schedule has 20 training
    steps, the numbers diffusers gives when the config says ``num_train_timesteps=20``. (diffusers itself keeps
    timesteps up to 999 and clamps every sigma to the last trained one: a deliberate difference, documented in
    ``SchedulerMixin``.)"""
    quiet()
    ours = getattr(diffusekit, name)(trained_betas=SHORT_BETAS)
    theirs = getattr(diffusers, name)(trained_betas=SHORT_BETAS, num_train_timesteps=len(SHORT_BETAS))
    a = run_loop(ours, {"num_inference_steps": 5})
    b = run_loop(theirs, {"num_inference_steps": 5})
    torch.testing.assert_close(ours.timesteps, theirs.timesteps.to(ours.timesteps.dtype), rtol=1e-6, atol=1e-4)
    close(a, b, OWN)
    assert len(ours) == 1000  # __len__ still reports the config, as diffusers'
