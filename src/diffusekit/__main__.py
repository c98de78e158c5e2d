"""Command line: ``python -m diffusekit <command>`` (also installed as ``diffusekit``).

  generate MODEL [--prompt TEXT] ...   run the pipeline in a diffusers-format folder or hub repo, write a PNG grid
  demo [--out DIR]                     build tiny random-weight models, save them in diffusers format, load them
                                       back and generate: a smoke test of the whole stack that needs no download
  train unconditional|text-to-image    train on Fashion-MNIST, export in diffusers format (diffusekit.training)
  eval ...                             measure sample quality (diffusekit train --help, diffusekit eval --help)
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
    args = parser.parse_args(argv)
    if args.command == "generate":
        print(f"wrote {_generate(args)}")
    else:
        _demo(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
