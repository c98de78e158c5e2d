"""Kill-and-reload trials: SIGKILL a ``save_pretrained`` at a random moment, then check what the folder loads as.

A trial saves checkpoint A (complete), starts a child process that saves checkpoint B over it, kills the child
with SIGKILL at a uniformly random moment of the save (the child times one warm-up save first), then loads the
folder in this process and classifies it: ``old`` (exactly A), ``new`` (exactly B), ``mixed`` (some weights of
each, or weights of neither) or ``error`` (does not load). Temp litter is what the folder holds beyond the files
of a clean save. Used by tests/test_durability.py (a few trials) and its slow soak, and by hand:
``PYTHONPATH=src python tests/kill_trials.py sharded 20``.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

# the child: build B from the saved A (every weight + 1), time one save elsewhere, wait for "go", save over A
_CHILD = textwrap.dedent(
    """
    import sys, time, torch
    torch.set_num_threads(1)
    kind, source, target, scratch = sys.argv[1:5]
    if kind == "sharded":
        from diffusekit import UNet2DModel as Cls
        kwargs = dict(max_shard_size="150KB")
    else:
        from diffusekit import DiffusionPipeline as Cls
        kwargs = {}
    obj = Cls.from_pretrained(source)
    modules = [obj] if kind == "sharded" else [m for _, m in obj._modules()]
    with torch.no_grad():
        for module in modules:
            for p in module.parameters():
                p.add_(1.0)
    start = time.perf_counter()
    obj.save_pretrained(scratch, **kwargs)
    print(time.perf_counter() - start, flush=True)
    sys.stdin.readline()
    obj.save_pretrained(target, **kwargs)
    print("done", flush=True)
    """
)


def tiny_unet():
    from diffusekit import UNet2DModel

    return UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8,
    )


def make_source(kind: str, folder: Path) -> Path:
    """Checkpoint A of ``kind`` ("sharded" UNet or SD "pipeline"), saved by diffusekit into ``folder``."""
    if kind == "sharded":
        torch.manual_seed(0)
        tiny_unet().save_pretrained(folder, max_shard_size="150KB")
    else:
        sys.path.insert(0, os.fspath(HERE))
        from sd_assets import build_tiny_sd

        from diffusekit import DiffusionPipeline

        build_tiny_sd(folder.with_name(folder.name + "-diffusers"))
        DiffusionPipeline.from_pretrained(folder.with_name(folder.name + "-diffusers")).save_pretrained(folder)
    return folder


def _weights(kind: str, folder: Path) -> dict[str, torch.Tensor]:
    from diffusekit import DiffusionPipeline, UNet2DModel

    if kind == "sharded":
        return UNet2DModel.from_pretrained(folder).state_dict()
    pipe = DiffusionPipeline.from_pretrained(folder)
    return {f"{name}.{k}": v for name, module in pipe._modules() for k, v in module.state_dict().items()}


def classify(kind: str, folder: Path, old: dict[str, torch.Tensor]) -> str:
    try:
        found = _weights(kind, folder)
    except Exception:
        return "error"
    if found.keys() != old.keys():
        return "mixed"
    same = [torch.equal(found[k], old[k]) for k in old]
    shifted = [torch.equal(found[k], old[k] + 1.0) if old[k].is_floating_point() else torch.equal(found[k], old[k])
               for k in old]
    if all(same):
        return "old"
    if all(shifted):
        return "new"
    return "mixed"


def _files(folder: Path) -> dict[str, int]:
    return {os.fspath(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def run_trials(kind: str, trials: int, workdir: Path, seed: int = 0, next_save: bool = True) -> dict:
    """Run ``trials`` kill-and-reload trials; return the outcome counts and the temp litter left behind."""
    rng = random.Random(seed)
    source = make_source(kind, workdir / "source")
    clean_files = set(_files(source))
    old = _weights(kind, source)
    outcomes: Counter = Counter()
    litter_files = litter_bytes = left_files = left_bytes = 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.fspath(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    for trial in range(trials):
        target = workdir / f"trial{trial}"
        scratch = workdir / f"scratch{trial}"
        shutil.copytree(source, target)
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, kind, os.fspath(source), os.fspath(target), os.fspath(scratch)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        )
        duration = float(child.stdout.readline())
        child.stdin.write("go\n")
        child.stdin.flush()
        threading_sleep(rng.uniform(0.0, duration))
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        outcomes[classify(kind, target, old)] += 1
        # litter: whatever the folder holds beyond what a clean save writes, after the kill and after the next save
        extra = {k: v for k, v in _files(target).items() if k not in clean_files}
        litter_files += len(extra)
        litter_bytes += sum(extra.values())
        if next_save:
            _save(kind, source, target)
            extra = {k: v for k, v in _files(target).items() if k not in clean_files}
            left_files += len(extra)
            left_bytes += sum(extra.values())
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(target, ignore_errors=True)
    return {"kind": kind, "trials": trials, **{k: outcomes.get(k, 0) for k in ("old", "new", "mixed", "error")},
            "litter_files": litter_files, "litter_bytes": litter_bytes,
            **({"after_next_save_files": left_files, "after_next_save_bytes": left_bytes} if next_save else {})}


def _save(kind: str, source: Path, target: Path) -> None:
    from diffusekit import DiffusionPipeline, UNet2DModel

    if kind == "sharded":
        UNet2DModel.from_pretrained(source).save_pretrained(target, max_shard_size="150KB")
    else:
        DiffusionPipeline.from_pretrained(source).save_pretrained(target)


def threading_sleep(seconds: float) -> None:
    import time

    time.sleep(seconds)


if __name__ == "__main__":
    import tempfile

    kind, n = sys.argv[1], int(sys.argv[2])
    with tempfile.TemporaryDirectory() as tmp:
        print(run_trials(kind, n, Path(tmp)))
