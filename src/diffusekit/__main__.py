"""Command line: ``python -m diffusekit <command>`` (also installed as ``diffusekit``).

  generate MODEL [--prompt TEXT] ...   run the pipeline in a diffusers-format folder or hub repo, write a PNG grid
  demo [--out DIR]                     build tiny random-weight models, save them in diffusers format, load them
                                       back and generate: a smoke test of the whole stack that needs no download
  train unconditional|text-to-image    train on Fashion-MNIST, export in diffusers format (diffusekit.training)
  eval ...                             measure sample quality (diffusekit train --help, diffusekit eval --help)
  serve [--models DIR] [--port 7860]   HTTP server: A1111-compatible API, job API, web page (diffusekit[serve])
  batch JOBS.jsonl --model M --out DIR one PNG per JSON-lines job + manifest.jsonl, resumable; --ray for a cluster
"""

from __future__ import annotations

import argparse
import os
import math
import sys
from pathlib import Path


def image_grid(images, columns: int | None = None):
    """Paste equally sized PIL images into one grid image."""
    from PIL import Image

    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height))
    for i, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((i % columns) * width, (i // columns) * height))
    return grid


def _generate(args) -> Path:
    import torch

    from .pipelines.base import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(args.model).to(args.device)
    generator = torch.Generator("cpu").manual_seed(args.seed)
    options = {"num_inference_steps": args.steps, "generator": generator}
    if args.prompt is not None:
        options.update(prompt=[args.prompt] * args.num_images, guidance_scale=args.guidance_scale)
    else:
        options.update(batch_size=args.num_images)
    images = pipe(**options).images
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images).save(out)
    return out


def _demo(args) -> None:
    import torch

    from .pipelines.ddpm import DDPMPipeline
    from .models.unet_2d import UNet2DModel
    from .schedulers.ddpm import DDPMScheduler

    out = Path(args.out)
    print("demo: smoke run on a tiny RANDOM-WEIGHT UNet2DModel (expect noise images; trained models: diffusekit generate diffusekit-fashion-ddpm)")
    torch.manual_seed(args.seed)
    unet = UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(out / "tiny-ddpm")
    print(f"demo: saved a diffusers-format pipeline to {out / 'tiny-ddpm'}; loading it back and sampling")
    pipe = DDPMPipeline.from_pretrained(out / "tiny-ddpm").to(args.device)
    images = pipe(batch_size=4, num_inference_steps=args.steps, generator=torch.manual_seed(args.seed)).images
    image_grid(images).save(out / "ddpm-grid.png")
    print(f"demo: wrote {out / 'ddpm-grid.png'}")


def _add_serve_parser(commands) -> None:
    serve = commands.add_parser("serve", help="HTTP server: A1111-compatible API, job queue and web page")
    serve.add_argument("--models", default=None, metavar="DIR",
                       help="folder of diffusers-format model folders to serve besides the bundled models "
                            "(LoRA files in DIR/Lora, embeddings in DIR/embeddings)")
    serve.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: loopback only)")
    serve.add_argument("--port", type=int, default=7860)
    serve.add_argument("--api-key", default=os.environ.get("DIFFUSEKIT_API_KEY"),
                       help="key every request must carry (Bearer, X-API-Key or Basic password); needed to "
                            "listen beyond loopback (default: $DIFFUSEKIT_API_KEY)")
    serve.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without an API key")
    serve.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                       help="allow browser pages from ORIGIN to call the API (repeatable; default: none)")
    serve.add_argument("--model", default=None, help="model loaded at start (default: first in --models, else "
                                                      "diffusekit-fashion-sd)")
    serve.add_argument("--device", default="cpu")
    serve.add_argument("--max-pixels", type=int, default=2048 * 2048, help="largest width*height per image")
    serve.add_argument("--max-steps", type=int, default=150)
    serve.add_argument("--max-images", type=int, default=16, help="largest batch_size*n_iter per request")
    serve.add_argument("--max-body-mb", type=int, default=32, help="largest request body, MiB")
    serve.add_argument("--queue-size", type=int, default=16, help="jobs that may wait; more get 429")


def _serve(args) -> int:
    from .serve import ServeConfig, require_dependencies

    try:
        require_dependencies()
    except ImportError as exc:
        print(f"diffusekit serve: {exc}", file=sys.stderr)
        return 2
    from .serve.app import serve

    try:
        config = ServeConfig(
            models_dir=args.models, host=args.host, port=args.port, api_key=args.api_key, insecure=args.insecure,
            cors_origins=tuple(args.cors_origin), device=args.device, default_model=args.model,
            max_pixels=args.max_pixels, max_steps=args.max_steps, max_images=args.max_images,
            max_body_bytes=args.max_body_mb * 1024 * 1024, queue_size=args.queue_size)
        config.check_exposure()
    except (ValueError, LookupError) as exc:
        print(f"diffusekit serve: {exc}", file=sys.stderr)
        return 2
    serve(config)
    return 0


def _add_batch_parser(commands) -> None:
    batch = commands.add_parser("batch", help="one PNG per job of a JSON-lines file, locally or on Ray (docs/BATCH.md)",
                                description="Run every job of JOBS (JSON lines: id, prompt, negative_prompt, seed, "
                                "steps, guidance_scale, width, height, sampler, image, mask, strength) not done yet; "
                                "flags give the defaults for keys a job leaves out. Writes DIR/<id>.png and "
                                "DIR/manifest.jsonl; re-running the same command resumes.")
    batch.add_argument("jobs", help="JSON-lines file, one job per line")
    batch.add_argument("--model", required=True, help="diffusers-format pipeline folder, hub repo id or bundled name")
    batch.add_argument("--out", required=True, help="output folder (PNGs named by job id, manifest.jsonl)")
    batch.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                       help="run on Ray (pip install 'diffusekit[ray]'): a local instance, or the cluster at ADDRESS "
                       "('auto', 'ray://head:10001')")
    batch.add_argument("--workers", type=int, default=1, help="pipelines working at once: Ray actors, or local "
                       "processes without --ray (default 1)")
    batch.add_argument("--batch-size", type=int, default=1, help="jobs of equal size/steps/sampler/CFG run through "
                       "the model together (default 1)")
    batch.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1; results differ "
                       "in the last bits between thread counts, so keep it fixed across runs you compare)")
    batch.add_argument("--device", default="cpu")
    batch.add_argument("--cpus-per-worker", type=float, default=1.0, help="Ray: CPUs each actor reserves")
    batch.add_argument("--gpus-per-worker", type=float, default=0.0, help="Ray: GPUs each actor reserves (1: one "
                       "actor per GPU)")
    batch.add_argument("--strict", action="store_true", help="refuse the whole file if any line is invalid")
    batch.add_argument("--no-progress", action="store_true", help="no progress bar")
    for flag, kind, default in (("--negative-prompt", str, ""), ("--seed", int, None), ("--steps", int, 25),
                                ("--guidance-scale", float, 7.5), ("--width", int, None), ("--height", int, None),
                                ("--sampler", str, None), ("--strength", float, 0.75)):
        batch.add_argument(flag, type=kind, default=default, help=f"default for jobs without it ({default})")


def _batch(args) -> int:
    from .batch import BatchConfig, BatchInputError, JobDefaults, run_batch

    defaults = JobDefaults(negative_prompt=args.negative_prompt, seed=args.seed, steps=args.steps,
                           guidance_scale=args.guidance_scale, width=args.width, height=args.height,
                           sampler=args.sampler, strength=args.strength, model=Path(args.model).name)
    config = BatchConfig(args.jobs, args.model, args.out, batch_size=args.batch_size, workers=args.workers,
                         device=args.device, ray=args.ray is not None, ray_address=args.ray or None,
                         cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker,
                         threads=args.threads, strict=args.strict, progress=not args.no_progress, defaults=defaults)
    try:
        summary = run_batch(config)
    except (BatchInputError, FileNotFoundError, ImportError, ValueError) as error:
        print(f"diffusekit batch: {error}", file=sys.stderr)
        return 2
    print(f"batch: {summary}")
    return 1 if summary.failed else 0


def main(argv: list[str] | None = None) -> int:
    # OpenMP workers that spin while waiting made generation ~10x slower on busy CPU cores (130 s vs 13 s for the
    # README's main job on a shared 2-core machine); this must be set before torch starts its thread pool, so it is
    # done here, in the command-line process only, never on `import diffusekit`. An explicit setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["train"], ["eval"]):  # the training tools parse their own arguments (imported only here)
        from .training.cli import main as training_main

        return training_main(argv)
    parser = argparse.ArgumentParser(prog="diffusekit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate images with a pipeline folder or hub repo")
    gen.add_argument("model", help="diffusers-format pipeline folder or hub repo id")
    gen.add_argument("--prompt", default=None, help="text prompt (text-to-image pipelines)")
    gen.add_argument("--steps", type=int, default=25)
    gen.add_argument("--num-images", type=int, default=4)
    gen.add_argument("--guidance-scale", type=float, default=7.5)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--out", default="out/grid.png")
    demo = commands.add_parser("demo", help="end-to-end smoke run on tiny random-weight models")
    demo.add_argument("--out", default="out")
    demo.add_argument("--steps", type=int, default=25)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--device", default="cpu")
    _add_serve_parser(commands)
    _add_batch_parser(commands)
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "batch":
        return _batch(args)
    if args.command == "generate":
        print(f"wrote {_generate(args)}")
    else:
        _demo(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
