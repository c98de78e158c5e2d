"""Images per second of ``diffusekit batch``: batch size 1 vs 4, one process vs local processes vs Ray actors.

    .venv/bin/python benchmarks/bench_batch.py --jobs 64 --steps 20 --rounds 2

Runs the same job list (the bundled ``diffusekit-fashion-sd``, 32x32, class x colour prompts, DPM++ 2M, CFG 4)
through :func:`diffusekit.batch.run_batch` in several configurations, each into a fresh folder, in interleaved
order over ``--rounds`` (forward, then backward) so drifting machine load hits all alike, and prints a markdown table:
median wall seconds from the first batch handed out to the last PNG written (worker start-up and model loading
included, Ray's own start-up not: it is timed once, separately), images per second, the ratio to the first row,
and the seconds the workers spent inside ``generate`` + PNG encoding (sum over batches). Every configuration must
produce the same files as the first one (checked): batching and worker count change speed, never images.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import quiet_environment  # noqa: E402

CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
COLOURS = ["red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink"]


def write_jobs(path: Path, count: int, steps: int) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(count):
            prompt = f"a photo of a {COLOURS[i % len(COLOURS)]} {CLASSES[i // len(COLOURS) % len(CLASSES)]}"
            handle.write(json.dumps({"id": f"job{i:05d}", "prompt": prompt, "seed": i, "steps": steps, "width": 32,
                                     "height": 32, "sampler": "DPM++ 2M", "guidance_scale": 4}) + "\n")


def digest(folder: Path) -> str:
    sha = hashlib.sha256()
    for png in sorted(folder.glob("*.png")):
        sha.update(png.name.encode() + png.read_bytes())
    return sha.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-ray", action="store_true")
    args = parser.parse_args()
    quiet_environment(1)

    from diffusekit.batch import BatchConfig, read_manifest, run_batch

    model = "diffusekit-fashion-sd"
    configs = [("local, 1 process, batch 1", dict(batch_size=1)),
               ("local, 1 process, batch 4", dict(batch_size=4)),
               ("local, 2 processes, batch 4", dict(batch_size=4, workers=2)),
               ("Ray, 1 actor, batch 4", dict(batch_size=4, ray=True, workers=1)),
               ("Ray, 2 actors, batch 4", dict(batch_size=4, ray=True, workers=2))]
    if args.no_ray:
        configs = [c for c in configs if not c[1].get("ray")]
    ray_start = None
    if any(c[1].get("ray") for c in configs):
        import ray

        started = time.perf_counter()
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        import logging

        logging.getLogger("ray.data").setLevel(logging.WARNING)
        ray_start = time.perf_counter() - started
    walls: dict[str, list[float]] = {label: [] for label, _ in configs}
    inside: dict[str, list[float]] = {label: [] for label, _ in configs}
    digests: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        jobs_file = Path(tmp) / "jobs.jsonl"
        write_jobs(jobs_file, args.jobs, args.steps)
        for round_index in range(args.rounds):
            order = configs if round_index % 2 == 0 else configs[::-1]
            for label, options in order:
                out = Path(tmp) / f"{label.replace(' ', '_').replace(',', '')}-{round_index}"
                summary = run_batch(BatchConfig(jobs_file, model, out, progress=False, **options),
                                    log=lambda message: None)
                assert summary.done == args.jobs and summary.failed == 0, summary
                records, _ = read_manifest(out / "manifest.jsonl")
                batches = {(r["worker"], r["batch"]): r["timings"]["batch_s"] for r in records.values()}
                walls[label].append(summary.seconds)
                inside[label].append(sum(batches.values()))
                digests.setdefault(label, digest(out))
                print(f"round {round_index}: {label}: {summary}", file=sys.stderr, flush=True)
    load = os.getloadavg()
    print(f"{args.jobs} jobs, {args.steps} steps DPM++ 2M, 32x32, {model}; {os.cpu_count()} CPUs, 1 torch thread per "
          f"worker; {args.rounds} rounds, median; load average at the end {load[0]:.1f}"
          + (f"; ray.init {ray_start:.1f} s (not in the rows)" if ray_start is not None else ""))
    print()
    print("| configuration | wall s | images/s | vs first row | s inside workers (sum) |")
    print("|---|---|---|---|---|")
    base = statistics.median(walls[configs[0][0]])
    for label, _ in configs:
        wall = statistics.median(walls[label])
        print(f"| {label} | {wall:.1f} | {args.jobs / wall:.2f} | {base / wall:.2f}x | "
              f"{statistics.median(inside[label]):.1f} |")
    groups: dict[str, list[str]] = {}
    for label, _ in configs:
        groups.setdefault(digests[label], []).append(label)
    print()
    for labels in groups.values():
        print(f"identical files: {'; '.join(labels)}")
    sizes = {options.get("batch_size", 1) for _, options in configs}
    assert len(groups) <= len(sizes), "configurations with the same batch size wrote different files"

if __name__ == "__main__":
    main()
