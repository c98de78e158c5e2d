"""Swapping schedulers both ways (the quicktour's `Other.from_config(pipe.scheduler.config)`): every pair gives the
config diffusers gives, in memory (defaults-used semantics), through saved files, and A -> B -> A."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

import diffusekit
from diffusekit.schedulers.base import KARRAS_DIFFUSION_SCHEDULERS
from scheduler_helpers import run_loop

diffusers = pytest.importorskip("diffusers")

# the pairs people swap: the DDPM checkpoints' scheduler and the DPM-Solver / UniPC / DEIS / Euler family
CORE = ("DDPMScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler",
        "DEISMultistepScheduler", "EulerDiscreteScheduler")
# diffusers maps DEIS's algorithm_type alias but then refuses it under the default final_sigmas_type (documented)
DIFFUSERS_REFUSES = {("file", "DEISMultistepScheduler", "DPMSolverMultistepScheduler"),
                     ("file", "DEISMultistepScheduler", "DPMSolverSinglestepScheduler")}
SOURCE_KWARGS = {"DDPMScheduler": {"variance_type": "fixed_small", "beta_schedule": "scaled_linear"}}


def plain(config) -> dict:
    fix = (lambda v: [fix(x) for x in v] if isinstance(v, (list, tuple)) else v)
    return {k: fix(v) for k, v in dict(config).items() if not k.startswith("_")}


def swapped(lib, mode: str, a: str, b: str, folder):
    A, B = getattr(lib, a), getattr(lib, b)
    source = A(**SOURCE_KWARGS.get(a, {}))
    if mode == "memory":
        return B.from_config(source.config)
    if mode == "file":  # a file written by diffusers, as found in checkpoints
        getattr(diffusers, a)(**SOURCE_KWARGS.get(a, {})).save_config(folder)
        return B.from_pretrained(folder)
    return A.from_config(B.from_config(source.config).config)  # A -> B -> A


def check_pairs(names, tmp_path):
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    mismatches = []
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            for mode in ("memory", "file", "round trip"):
                if (mode, a, b) in DIFFUSERS_REFUSES:
                    continue
                folder = tmp_path / f"{i}-{j}-{mode}"
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ours = plain(swapped(diffusekit, mode, a, b, folder).config)
                    theirs = plain(swapped(diffusers, mode, a, b, folder).config)
                diff = {k: (ours.get(k, "-"), theirs.get(k, "-")) for k in set(ours) | set(theirs)
                        if ours.get(k, "-") != theirs.get(k, "-")}
                if diff:
                    mismatches.append(f"{mode} {a} -> {b}: (ours, diffusers) {diff}")
    assert not mismatches, "\n".join(mismatches)


def test_swaps_between_the_common_schedulers_match_diffusers(tmp_path):
    check_pairs(CORE, tmp_path)


@pytest.mark.slow
def test_swaps_between_every_compatible_scheduler_match_diffusers(tmp_path):
    check_pairs(KARRAS_DIFFUSION_SCHEDULERS, tmp_path)


@pytest.mark.parametrize("target", ["DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler"])
def test_ddpm_config_runs_in_dpm_solvers_and_back(target, tmp_path):
    ddpm = diffusers.DDPMScheduler(variance_type="fixed_small", beta_schedule="scaled_linear")
    ours = getattr(diffusekit, target).from_config(ddpm.config)
    theirs = getattr(diffusers, target).from_config(ddpm.config)
    assert ours.config.variance_type == "fixed_small"
    torch.testing.assert_close(run_loop(ours), run_loop(theirs), rtol=5e-5, atol=5e-5)
    # a folder saved by a DPM solver (`"variance_type": null`) loads into DDPM, which steps it as fixed_small
    diffusers.DPMSolverMultistepScheduler().save_config(tmp_path)
    back = diffusekit.DDPMScheduler.from_pretrained(tmp_path)
    ref = diffusers.DDPMScheduler.from_pretrained(tmp_path)
    assert back.config.variance_type is None and ref.config.variance_type is None
    torch.testing.assert_close(run_loop(back, step_kwargs={}), run_loop(ref), rtol=5e-5, atol=5e-5)


def test_singlestep_keeps_its_own_lower_order_final_default_after_swaps():
    for source in ("DEISMultistepScheduler", "UniPCMultistepScheduler", "DPMSolverMultistepScheduler"):
        via = getattr(diffusekit, source).from_config(diffusekit.DPMSolverSinglestepScheduler().config)
        assert diffusekit.DPMSolverSinglestepScheduler.from_config(via.config).config.lower_order_final is False
        direct = diffusekit.DPMSolverSinglestepScheduler.from_config(getattr(diffusekit, source)().config)
        assert direct.config.lower_order_final is False


def test_unknown_variance_type_is_refused_clearly():
    with pytest.raises(ValueError, match="variance_type='fixed_tiny'"):
        diffusekit.DPMSolverMultistepScheduler(variance_type="fixed_tiny")
    with pytest.raises(ValueError, match="variance_type='fixed_tiny'"):
        diffusekit.DDPMScheduler(variance_type="fixed_tiny")
