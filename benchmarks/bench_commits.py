"""The exact path's SD 1.5 UNet step at two commits of diffusekit, fresh processes interleaved.

For a change that replaces code rather than adding a switch (so ``bench_int8_speed exact --choice`` cannot compare
both sides in one process): each commit is checked out into a temporary git worktree, and fresh processes alternate
between the two (round r runs A then B, round r + 1 B then A). Each process imports diffusekit from its worktree,
loads the UNet of ``--folder``, ``optimize()`` s it with the default settings (its AOTInductor package: the first
process of each commit builds it, minutes, later ones load it) and times ``--calls`` warm CFG steps (batch 2, 77x768
context) at ``--latents``. Reported: the median of all warm calls per commit, their range, the ratio, and how far
apart the two commits' outputs are. Processes rather than one process because both sides are the same modules at
different versions; interleaving spreads a drifting machine over both.

    python -m benchmarks.bench_commits d0bcee6 HEAD --folder .bench/sd15-random --latents 64 --rounds 4 --calls 3
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import REPO, emit, interleaved_children, quiet_environment, set_threads


def child(args) -> None:
    sys.path.insert(0, args.tree)  # this commit's diffusekit, before the one of the parent's PYTHONPATH
    import torch

    set_threads(args.threads)
    import diffusekit

    if not Path(diffusekit.__file__).resolve().is_relative_to(Path(args.tree).resolve()):
        raise RuntimeError(f"imported {diffusekit.__file__}, not the worktree {args.tree}")
    unet = diffusekit.UNet2DConditionModel.from_pretrained(args.folder, subfolder="unet", use_safetensors=True)
    unet.optimize()
    g = torch.Generator().manual_seed(0)
    size = args.latents
    sample, text = torch.randn(2, 4, size, size, generator=g), torch.randn(2, 77, 768, generator=g)
    step = torch.tensor(500)
    calls = []
    with torch.no_grad():
        start = time.perf_counter()
        out = unet(sample, step, encoder_hidden_states=text).sample
        first = time.perf_counter() - start
        for _ in range(args.calls):
            start = time.perf_counter()
            unet(sample, step, encoder_hidden_states=text)
            calls.append(time.perf_counter() - start)
    torch.save(out, args.out)
    emit({"first": first, "calls": calls})


def _worktree(commit: str, root: Path) -> Path:
    sha = subprocess.run(["git", "rev-parse", "--short", commit], cwd=REPO, check=True, capture_output=True,
                         text=True).stdout.strip()
    tree = root / sha
    subprocess.run(["git", "worktree", "add", "--detach", str(tree), sha], cwd=REPO, check=True, capture_output=True)
    return tree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", help="the commit before (e.g. a hash or HEAD~1)")
    parser.add_argument("head", nargs="?", default="HEAD", help="the commit after (default: HEAD)")
    parser.add_argument("--folder", default=".bench/sd15-random", help="SD 1.5 diffusers folder (its unet/)")
    parser.add_argument("--latents", type=int, default=64, help="latent size: 32 (256² image) or 64 (512²)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--calls", type=int, default=3, help="warm calls timed per process")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tree", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    quiet_environment(args.threads)
    import torch

    folder = str(Path(args.folder).resolve())
    with tempfile.TemporaryDirectory(prefix="bench-commits-") as tmp:
        root = Path(tmp)
        trees = {name: _worktree(commit, root) for name, commit in (("base", args.base), ("head", args.head))}
        try:
            cases = {name: ["-m", "benchmarks.bench_commits", args.base, "--child", "--tree", str(tree / "src"),
                            "--folder", folder, "--latents", str(args.latents), "--calls", str(args.calls),
                            "--threads", str(args.threads), "--out", str(root / f"{name}.pt")]
                     for name, tree in trees.items()}
            results = interleaved_children(cases, args.rounds, timeout=1800)  # base, head; then head, base; ...
            calls = {name: [t for run in runs for t in run["calls"]] for name, runs in results.items()}
            base, head = torch.load(root / "base.pt"), torch.load(root / "head.pt")
            apart = float((head - base).abs().max() / base.abs().max())
        finally:
            for tree in trees.values():
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, capture_output=True)
    medians = {name: statistics.median(values) for name, values in calls.items()}
    for name in trees:
        print(f"{name} {trees[name].name}: warm calls " + " ".join(f"{t:.2f}" for t in calls[name]))
        print(f"{name} {trees[name].name}: median {medians[name]:.3f} s, calls {min(calls[name]):.2f}-"
              f"{max(calls[name]):.2f} s (n={len(calls[name])})")
    print(f"ratio head / base: {medians['head'] / medians['base']:.3f}; outputs {apart:.1e} apart "
          f"(largest difference over the base's largest value)")


if __name__ == "__main__":
    main()
