"""``diffusekit train ...`` and ``diffusekit eval ...`` (argument parsing only; the work is imported on use).

  diffusekit train unconditional --output-dir runs/ddpm [--steps N ...]   UNet2DModel + DDPM on Fashion-MNIST
  diffusekit train text-to-image --output-dir runs/sd [--steps N ...]     tiny Stable Diffusion on tinted
                                                                          Fashion-MNIST with colour/class captions
  diffusekit eval classifier --out runs/classifier.pt                     the Fashion-MNIST judge for eval
  diffusekit eval unconditional MODEL [--num-samples N]                   Fréchet distance in classifier space
  diffusekit eval text-to-image MODEL [--per-prompt N]                    + class accuracy and colour match
"""

from __future__ import annotations

import argparse
import shlex
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffusekit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    top = parser.add_subparsers(dest="command", required=True)

    train = top.add_parser("train", help="train a model on Fashion-MNIST and export it in diffusers format")
    kinds = train.add_subparsers(dest="kind", required=True)
    from . import unconditional

    unconditional.add_arguments(kinds.add_parser("unconditional", help="UNet2DModel + DDPMScheduler (DDPMPipeline)"))
    try:
        from . import text_to_image
    except ImportError:  # pragma: no cover - the module is optional while it is being written
        text_to_image = None
    if text_to_image is not None:
        text_to_image.add_arguments(kinds.add_parser(
            "text-to-image", help="tiny Stable Diffusion (VAE, CLIP text encoder, UNet2DConditionModel)"))

    from . import evaluate

    evaluate.add_arguments(top.add_parser("eval", help="measure sample quality with a Fashion-MNIST classifier"))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.command_line = "diffusekit " + shlex.join(argv)
    if args.command == "train":
        if args.kind == "unconditional":
            from .unconditional import train
        else:
            from .text_to_image import train
        train(args)
    else:
        from .evaluate import run

        run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
