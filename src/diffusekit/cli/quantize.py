"""``diffusekit quantize MODEL OUT``: an int8 copy of a pipeline, calibrated on its own runs (docs/QUANTIZATION.md).

The command form of ``pipe.quantize(...)`` then ``pipe.save_pretrained(OUT)``. OUT is an ordinary diffusers folder
that every command loads like any other (``diffusekit generate OUT --optimize``): with ``--optimize`` it runs on
the int8 kernels; without it, int8 is simulated and slower than float32.
"""

from __future__ import annotations

import sys
from pathlib import Path


def add_parser(commands) -> None:
    quantize = commands.add_parser(
        "quantize", help="write an int8 copy of a pipeline, calibrated on its own runs (CPU; docs/QUANTIZATION.md)",
        description="Calibrate MODEL's UNet (and with --vae its VAE decoder) on runs of the pipeline itself over "
                    "the whole schedule, quantize to int8 and save to OUT, a diffusers folder that loads back "
                    "without recalibrating. Run it with --optimize (generate, serve, batch) for the int8 speed.")
    quantize.add_argument("model", help="diffusers folder, hub repo id, bundled model name or single-file "
                                        "checkpoint (.safetensors / .ckpt)")
    quantize.add_argument("out", help="folder to write (refused if it exists, unless --overwrite)")
    quantize.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                          help="a calibration prompt, repeatable; best in the domain you will generate "
                               "(default: 8 built-in varied prompts)")
    quantize.add_argument("--prompts-file", default=None, metavar="FILE",
                          help="calibration prompts, one per line (blank lines skipped); adds to --prompt")
    quantize.add_argument("--steps", type=int, default=20, help="steps of each calibration run (default 20)")
    quantize.add_argument("--guidance-scale", "--cfg-scale", dest="guidance_scale", type=float, default=None,
                          help="CFG scale of the calibration runs (default 7.5)")
    quantize.add_argument("--width", type=int, default=None, help="calibration width (default: the model's)")
    quantize.add_argument("--height", type=int, default=None, help="calibration height (default: the model's)")
    quantize.add_argument("--seed", type=int, default=0, help="seed of the first calibration run (default 0)")
    quantize.add_argument("--vae", action="store_true", help="also quantize the VAE decoder (measured on SD 1.x: "
                          "the int8 pipeline's 512² time 8-12%% lower, quality unchanged on the bundled model; "
                          "unmeasured on SDXL's VAE)")
    quantize.add_argument("--observer", choices=("minmax", "percentile", "average"), default="minmax",
                          help="how activation ranges are taken from the calibration runs (default minmax)")
    quantize.add_argument("--percentile", type=float, default=None, help="with --observer percentile: which one")
    quantize.add_argument("--config", default=None, metavar="FOLDER",
                          help="single-file MODEL: a diffusers folder of the same architecture for configs, tokenizer "
                               "and scheduler (default: inferred from the file)")
    quantize.add_argument("--overwrite", action="store_true",
                          help="replace OUT if it exists (the whole folder, swapped in when the new one is written)")


def fail(message: str) -> SystemExit:
    return SystemExit(f"diffusekit quantize: error: {message}")


def calibration_prompts(args) -> list[str] | None:
    """``--prompt`` then the lines of ``--prompts-file``; ``None`` (the built-in set) when neither is given."""
    prompts = list(args.prompt or [])
    if args.prompts_file is not None:
        try:
            text = Path(args.prompts_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise fail(f"--prompts-file {args.prompts_file}: cannot read it ({exc})") from None
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines:
            raise fail(f"--prompts-file {args.prompts_file}: no prompts in it (one per line)")
        prompts += lines
    return prompts or None


def check_out(out: Path, model: str, overwrite: bool) -> None:
    """Refuse, before any calibration, an OUT that cannot take the int8 folder."""
    from ..single_file.convert import is_single_file

    if is_single_file(out):
        raise fail(f"{out}: int8 models are saved as diffusers folders (there is no single-file int8 format); "
                   "name a folder")
    if out.exists() and not out.is_dir():
        raise fail(f"{out} is a file; name a folder to write")
    if out.exists() and not overwrite:
        raise fail(f"{out} exists; choose another folder or pass --overwrite")
    source = Path(model)
    if out.exists() and source.exists() and source.resolve().is_relative_to(out.resolve()):
        raise fail(f"{out} is or holds MODEL ({model}); write the int8 copy to another folder")


def run(args) -> int:
    from .._io import replace_folder
    from ..quantization.pipeline import DEFAULT_CALIBRATION_PROMPTS
    from .generate import load_pipeline

    out = Path(args.out)
    if args.steps < 1:
        raise fail(f"--steps must be at least 1, got {args.steps}")
    check_out(out, args.model, args.overwrite)
    prompts = calibration_prompts(args)
    pipe, _, _ = load_pipeline(args.model, "cpu", args.config)
    pipe.set_progress_bar_config(disable=True)
    conditional = getattr(pipe, "text_encoder", None) is not None
    if not conditional:
        given = [flag for flag, value in (("--prompt", args.prompt), ("--prompts-file", args.prompts_file),
                                          ("--width", args.width), ("--height", args.height),
                                          ("--guidance-scale", args.guidance_scale)) if value is not None]
        if given:
            raise fail(f"{args.model} is unconditional ({type(pipe).__name__}): {', '.join(given)} do not apply; "
                       f"it calibrates on {len(DEFAULT_CALIBRATION_PROMPTS)} seeded runs of --steps steps")
    runs = len(prompts or DEFAULT_CALIBRATION_PROMPTS)
    print(f"calibrating on {runs} {'prompts' if conditional else 'seeded runs'} x {args.steps} steps ...",
          file=sys.stderr, flush=True)
    try:
        pipe.quantize(prompts, num_inference_steps=args.steps,
                      guidance_scale=7.5 if args.guidance_scale is None else args.guidance_scale,
                      height=args.height, width=args.width, seed=args.seed, observer=args.observer,
                      percentile=args.percentile, components=("unet", "vae") if args.vae else ("unet",))
    except (ValueError, TypeError) as exc:
        raise fail(str(exc)) from None
    replace_folder(pipe.save_pretrained, out)
    print(f"wrote {out} (int8 {'UNet and VAE decoder' if args.vae else 'UNet'}); run it with --optimize")
    return 0
