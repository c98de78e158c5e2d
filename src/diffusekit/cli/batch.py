"""``diffusekit batch``: one PNG per job of a JSON-lines file, locally or on Ray (docs/BATCH.md)."""

from __future__ import annotations

import sys
from pathlib import Path


def add_parser(commands) -> None:
    batch = commands.add_parser("batch", help="one PNG per job of a JSON-lines file, locally or on Ray (docs/BATCH.md)",
                                description="Run every job of JOBS (JSON lines: id, prompt, negative_prompt, seed, "
                                "steps, guidance_scale, width, height, sampler, image, mask, strength, "
                                "guidance_interval, deep_cache, freeu) not done yet; flags give the defaults for keys "
                                "a job leaves out. Writes DIR/<id>.png and DIR/manifest.jsonl; re-running the same "
                                "command resumes.")
    batch.add_argument("jobs", help="JSON-lines file, one job per line")
    batch.add_argument("--model", required=True, help="diffusers-format pipeline folder, hub repo id or bundled name")
    batch.add_argument("--out", required=True, help="output folder (PNGs named by job id, manifest.jsonl)")
    batch.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                       help="run on Ray (pip install 'diffusekit[ray]'): without ADDRESS, the cluster in $RAY_ADDRESS or "
                       "one already running on this machine, else a new local instance; or ADDRESS: 'auto', "
                       "'local' (always a new instance), 'HOST:6379', 'ray://HOST:10001'")
    batch.add_argument("--workers", type=int, default=1, help="pipelines working at once: Ray actors, or local "
                       "processes without --ray (default 1)")
    batch.add_argument("--batch-size", type=int, default=1, help="jobs of equal size/steps/sampler/CFG run through "
                       "the model together (default 1)")
    batch.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1; results differ "
                       "in the last bits between thread counts, so keep it fixed across runs you compare)")
    batch.add_argument("--device", default="cpu")
    batch.add_argument("--optimize", action="store_true", help="each worker runs the compiled fast path "
                       "(pipe.optimize(); int8 kernels for a model written by diffusekit quantize); code is built "
                       "once per machine and size, so a cold cache costs the first batches minutes")
    batch.add_argument("--cpus-per-worker", type=float, default=1.0, help="Ray: CPUs each actor reserves")
    batch.add_argument("--gpus-per-worker", type=float, default=0.0, help="Ray: GPUs each actor reserves (1: one "
                       "actor per GPU)")
    batch.add_argument("--strict", action="store_true", help="refuse the whole file if any line is invalid")
    batch.add_argument("--no-progress", action="store_true", help="no progress bar")
    for flag, kind, default in (("--negative-prompt", str, ""), ("--seed", int, None), ("--steps", int, 25),
                                ("--guidance-scale", float, 7.5), ("--width", int, None), ("--height", int, None),
                                ("--sampler", str, None), ("--strength", float, 0.75)):
        batch.add_argument(flag, type=kind, default=default, help=f"default for jobs without it ({default})")
    batch.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                       help="default for jobs without 'guidance_interval': guide only the steps LO <= i / n < HI")
    batch.add_argument("--deep-cache", type=int, nargs="+", default=None, metavar=("N", "BRANCH"),
                       help="default for jobs without 'deep_cache': DeepCache, a full UNet step every N steps, "
                            "skip branch BRANCH (default 0) on the others")
    batch.add_argument("--freeu", type=float, nargs=4, default=None, metavar=("S1", "S2", "B1", "B2"),
                       help="default for jobs without 'freeu': FreeU's factors (diffusers' enable_freeu)")


def _deep_cache_flag(values: list[int] | None):
    if values is None:
        return None
    if len(values) > 2:
        raise SystemExit(f"diffusekit batch: error: --deep-cache takes N and optionally BRANCH, got {values}")
    return values[0] if len(values) == 1 else tuple(values)


def run(args) -> int:
    from ..batch import BatchConfig, BatchInputError, BatchWorkerError, JobDefaults, run_batch

    defaults = JobDefaults(negative_prompt=args.negative_prompt, seed=args.seed, steps=args.steps,
                           guidance_scale=args.guidance_scale, width=args.width, height=args.height,
                           sampler=args.sampler, strength=args.strength, model=Path(args.model).name,
                           guidance_interval=tuple(args.guidance_interval) if args.guidance_interval else None,
                           deep_cache=_deep_cache_flag(args.deep_cache),
                           freeu=tuple(args.freeu) if args.freeu else None)
    config = BatchConfig(args.jobs, args.model, args.out, batch_size=args.batch_size, workers=args.workers,
                         device=args.device, ray=args.ray is not None, ray_address=args.ray or None,
                         cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker,
                         threads=args.threads, optimize=args.optimize, strict=args.strict,
                         progress=not args.no_progress, defaults=defaults)
    try:
        summary = run_batch(config)
    except (BatchInputError, BatchWorkerError, FileNotFoundError, ImportError, ValueError) as error:
        print(f"diffusekit batch: {error}", file=sys.stderr)
        return 2
    print(f"batch: {summary}")
    return 1 if summary.failed else 0
