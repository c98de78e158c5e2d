"""Whole-checkpoint atomic saves: kills at random moments, crashes inside the commit, stale layouts, concurrent saves."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from diffusekit import DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusekit import _io
from kill_trials import run_trials, tiny_unet

HERE = Path(__file__).resolve().parent


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def two_unets():
    torch.manual_seed(0)
    a = tiny_unet()
    torch.manual_seed(1)
    return a, tiny_unet()


# ------------------------------------------------------------------------------------------ kills at random moments


def test_killed_sharded_save_loads_old_or_new_never_a_mix(tmp_path):
    result = run_trials("sharded", 3, tmp_path, seed=1)
    assert result["mixed"] == 0 and result["error"] == 0, result
    assert result["after_next_save_files"] == 0, result  # the next save swept the killed saves' staging folders


def test_killed_pipeline_save_loads_old_or_new_never_a_mix(tmp_path):
    result = run_trials("pipeline", 2, tmp_path, seed=2)
    assert result["mixed"] == 0 and result["error"] == 0, result
    assert result["after_next_save_files"] == 0, result


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sharded", "pipeline"])
def test_kill_soak(tmp_path, kind):
    result = run_trials(kind, 30, tmp_path, seed=3)
    print(result)
    assert result["mixed"] == 0 and result["error"] == 0, result
    assert result["after_next_save_files"] == 0, result


# ------------------------------------------------------------------------------------------ crashes inside the commit


def test_crash_before_the_journal_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    old, new = two_unets()
    old.save_pretrained(tmp_path, max_shard_size="150KB")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # as a kill would, at the moment the journal is written

    monkeypatch.setattr(_io, "atomic_write_text", crash)
    with pytest.raises(KeyboardInterrupt):
        new.save_pretrained(tmp_path, max_shard_size="150KB")
    monkeypatch.undo()
    assert same_weights(old, UNet2DModel.from_pretrained(tmp_path))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".diffusekit")]  # the stage was removed


@pytest.mark.parametrize("moves_before_crash", [0, 1, 7])
def test_crash_while_moving_files_in_is_rolled_forward_by_the_next_load(tmp_path, monkeypatch, moves_before_crash):
    old, new = two_unets()
    old.save_pretrained(tmp_path, max_shard_size="150KB")
    real_replace, calls = os.replace, []

    def replace(src, dst):
        if _io.STAGE_PREFIX in str(src) and _io.STAGE_PREFIX not in str(dst):  # a move out of the stage
            calls.append(dst)
            if len(calls) > moves_before_crash:
                raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(_io.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        new.save_pretrained(tmp_path, max_shard_size="150KB")
    monkeypatch.undo()
    assert (tmp_path / _io.JOURNAL_NAME).exists()
    assert same_weights(new, UNet2DModel.from_pretrained(tmp_path))  # finished by the load
    assert not (tmp_path / _io.JOURNAL_NAME).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".diffusekit")]


def test_interrupted_pipeline_commit_is_finished_by_a_component_load(tmp_path, monkeypatch):
    old, new = two_unets()
    DDPMPipeline(unet=old, scheduler=DDPMScheduler()).save_pretrained(tmp_path)
    monkeypatch.setattr(_io, "_apply_journal", lambda folder, journal: None)  # killed right after the journal
    DDPMPipeline(unet=new, scheduler=DDPMScheduler(num_train_timesteps=500)).save_pretrained(tmp_path)
    monkeypatch.undo()
    assert same_weights(new, UNet2DModel.from_pretrained(tmp_path, subfolder="unet"))
    assert DDPMScheduler.from_pretrained(tmp_path, subfolder="scheduler").config.num_train_timesteps == 500


def test_hostile_journal_cannot_move_or_delete_outside_the_folder(tmp_path):
    folder, outside = tmp_path / "model", tmp_path / "precious.txt"
    outside.write_text("keep me")
    tiny_unet().save_pretrained(folder)
    for entry in (["../precious.txt"], [os.fspath(outside)]):
        (folder / _io.JOURNAL_NAME).write_text(
            '{"stage": ".diffusekit-staging-x", "files": [], "delete": %s}' % str(entry).replace("'", '"'))
        with pytest.raises(ValueError, match="leaves the folder|absolute"):
            UNet2DModel.from_pretrained(folder)
        assert outside.read_text() == "keep me"
    (folder / _io.JOURNAL_NAME).write_text('{"stage": "../..", "files": [], "delete": []}')
    with pytest.raises(OSError, match="not a diffusekit commit journal"):
        UNet2DModel.from_pretrained(folder)


# ------------------------------------------------------------------------------------------ what a save replaces


@pytest.mark.parametrize(
    "first, second, load",
    [
        ({}, {"max_shard_size": "150KB"}, {}),  # single file -> shards
        ({"max_shard_size": "150KB"}, {}, {}),  # shards -> single file
        ({}, {"safe_serialization": False}, {}),  # safetensors -> .bin
        ({"variant": "fp16"}, {"variant": "fp16", "max_shard_size": "150KB"}, {"variant": "fp16"}),
    ],
    ids=["single-to-shards", "shards-to-single", "safetensors-to-bin", "variant-single-to-shards"],
)
def test_resave_in_another_layout_loads_the_new_save(tmp_path, first, second, load):
    old, new = two_unets()
    old.save_pretrained(tmp_path, **first)
    new.save_pretrained(tmp_path, **second)
    assert same_weights(new, UNet2DModel.from_pretrained(tmp_path, **load))


def test_save_keeps_unrelated_files_and_other_variants(tmp_path):
    old, new = two_unets()
    old.save_pretrained(tmp_path / "pipe" / "unet", variant="fp16")
    (tmp_path / "pipe" / "README.md").write_text("my notes")
    (tmp_path / "pipe" / "unet" / "notes.txt").write_text("unet notes")
    DDPMPipeline(unet=new, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "pipe")
    assert (tmp_path / "pipe" / "README.md").read_text() == "my notes"
    assert (tmp_path / "pipe" / "unet" / "notes.txt").read_text() == "unet notes"
    assert same_weights(old, UNet2DModel.from_pretrained(tmp_path / "pipe", subfolder="unet", variant="fp16"))
    assert same_weights(new, DDPMPipeline.from_pretrained(tmp_path / "pipe").unet)


def test_component_saved_into_a_pipeline_folder(tmp_path):
    old, new = two_unets()
    DDPMPipeline(unet=old, scheduler=DDPMScheduler()).save_pretrained(tmp_path)
    new.save_pretrained(tmp_path / "unet", max_shard_size="150KB")  # locks the pipeline folder too
    assert same_weights(new, DDPMPipeline.from_pretrained(tmp_path).unet)
    assert not (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").exists()


# ------------------------------------------------------------------------------------------ concurrent saves


def test_a_second_save_waits_for_the_first(tmp_path):
    old, new = two_unets()
    inside_first, release_first, second_entered = threading.Event(), threading.Event(), threading.Event()
    real_write = UNet2DModel._write_checkpoint

    def slow_write(self, *args):
        real_write(self, *args)
        if self is old:
            inside_first.set()
            release_first.wait(30)
        else:
            second_entered.set()

    UNet2DModel._write_checkpoint = slow_write
    try:
        first = threading.Thread(target=old.save_pretrained, args=(tmp_path,))
        first.start()
        inside_first.wait(30)
        second = threading.Thread(target=new.save_pretrained, args=(tmp_path,))
        second.start()
        time.sleep(0.3)
        # the lock holds the second save out while the first is inside (cannot pass by accident: without the lock
        # the second save would have written and committed by now)
        assert not second_entered.is_set()
        release_first.set()
        first.join(30)
        second.join(30)
    finally:
        UNet2DModel._write_checkpoint = real_write
        release_first.set()
    assert same_weights(new, UNet2DModel.from_pretrained(tmp_path))


def test_two_processes_saving_at_once_leave_one_whole_checkpoint(tmp_path):
    code = (
        "import sys, torch; torch.set_num_threads(1)\n"
        "sys.path.insert(0, sys.argv[3])\n"
        "from kill_trials import tiny_unet\n"
        "torch.manual_seed(int(sys.argv[2])); tiny_unet().save_pretrained(sys.argv[1], max_shard_size='150KB')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.fspath(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", code, os.fspath(tmp_path), str(seed), os.fspath(HERE)], env=env)
             for seed in (0, 1)]
    assert [p.wait(120) for p in procs] == [0, 0]
    loaded = UNet2DModel.from_pretrained(tmp_path)
    assert any(same_weights(loaded, unet) for unet in two_unets())
    shutil.rmtree(tmp_path)


def test_tokenizer_save_is_whole_and_supersedes_an_old_tokenizer_json(tmp_path):
    from clip_assets import write_clip_tokenizer

    from diffusekit import CLIPTokenizer

    write_clip_tokenizer(tmp_path / "src", num_merges=10)
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path / "src")
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "tokenizer.json").write_text("{}")  # another layout of the same component
    (tmp_path / "dst" / "README.md").write_text("notes")
    tokenizer.save_pretrained(tmp_path / "dst")
    assert not (tmp_path / "dst" / "tokenizer.json").exists() and (tmp_path / "dst" / "README.md").exists()
    assert CLIPTokenizer.from_pretrained(tmp_path / "dst")("a cat").input_ids == tokenizer("a cat").input_ids
