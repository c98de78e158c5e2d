"""``diffusekit convert SRC DST``: a single-file checkpoint <-> a diffusers folder (docs/SINGLE_FILE.md)."""

from __future__ import annotations

import sys


def add_parser(commands) -> None:
    convert = commands.add_parser(
        "convert", help="convert a single-file checkpoint (.safetensors/.ckpt) <-> a diffusers folder",
        description="SRC and DST are each a .safetensors/.ckpt file (original CompVis layout) or a diffusers "
                    "folder; the suffix decides. See docs/SINGLE_FILE.md.")
    convert.add_argument("src", help="single file, or diffusers folder / hub repo id in the cache")
    convert.add_argument("dst", help="single file (.safetensors recommended, or .ckpt) or folder to write")
    convert.add_argument("--config", default=None, help="diffusers folder of the same architecture (configs, "
                                                          "tokenizer, scheduler) for a single-file SRC")
    convert.add_argument("--original-config", default=None, help="the original .yaml (v1-inference.yaml ...)")
    convert.add_argument("--extract-ema", action="store_true", help="use the EMA UNet weights (model_ema.*)")
    convert.add_argument("--half", action="store_true", help="write float16 weights")
    convert.add_argument("--overwrite", action="store_true", help="replace DST if it exists")


def run(args) -> int:
    from ..single_file.convert import convert

    try:
        out = convert(args.src, args.dst, config=args.config, original_config=args.original_config,
                      extract_ema=args.extract_ema, half=args.half, overwrite=args.overwrite)
    except (ValueError, OSError, NotImplementedError) as exc:
        print(f"diffusekit convert: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
