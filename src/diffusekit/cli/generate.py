"""``diffusekit generate``: images from a pipeline; every PNG carries A1111's "parameters" text.

    diffusekit generate diffusekit-fashion-sd --prompt "a photo of a (purple:1.2) ankle boot" \\
        --negative-prompt blurry --sampler "DPM++ 2M Karras" --steps 20 --seed 7 --num-images 4 --out out/boots.png
    diffusekit generate diffusekit-fashion-sd --from-png out/boots-01.png --out out/again.png   # the same image

Output: one image is written to ``--out``; several are written next to it as ``<stem>-<i>.png`` (image ``i`` has
seed ``seed + i``) and ``--out`` gets their grid, carrying the first image's parameters as A1111's grids do.
Prompts use A1111's syntax (``(word:1.3)``, ``[word]``, ``BREAK``, longer than 77 tokens) unless
``--prompt-syntax plain``.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

# flag (argparse dest) -> (GenerationParameters field, default). A flag left out takes the value recorded in the
# --from-png image, then this default.
PARAMETER_FLAGS: dict[str, tuple[str, object]] = {
    "prompt": ("prompt", ""),
    "negative_prompt": ("negative_prompt", ""),
    "steps": ("steps", 25),
    "guidance_scale": ("cfg_scale", 7.5),
    "seed": ("seed", 0),
    "width": ("width", None),
    "height": ("height", None),
    "sampler": ("sampler", None),
    "clip_skip": ("clip_skip", None),
    "strength": ("denoising_strength", None),
}
DEFAULT_STRENGTH = 0.75  # A1111's default denoising strength for image-to-image
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
PROMPT_SYNTAX_KEY = "Prompt syntax"  # recorded only when it is not A1111's
DEFAULT_MASK_BLUR = 4  # A1111's
RECOMPUTED_KEYS = ("Lora hashes", "TI hashes")


def add_parser(commands) -> None:
    gen = commands.add_parser(
        "generate", help="generate images with a pipeline folder, hub repo, bundled model or single-file checkpoint",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gen.add_argument("model", nargs="?", default=None,
                     help="diffusers-format folder, hub repo id, bundled model name or a single-file checkpoint "
                          "(.safetensors / .ckpt); with --from-png, defaults to the image's 'Model'")
    gen.add_argument("--prompt", default=None, help="text prompt (A1111 syntax unless --prompt-syntax plain)")
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--steps", type=int, default=None, help="denoising steps (default 25)")
    gen.add_argument("--num-images", type=int, default=None, help="how many images (default 4; 1 with --from-png)")
    gen.add_argument("--batch-size", type=int, default=None, help="images per pipeline call (default: all at once)")
    gen.add_argument("--guidance-scale", "--cfg-scale", dest="guidance_scale", type=float, default=None,
                     help="classifier-free guidance scale (default 7.5)")
    gen.add_argument("--seed", type=int, default=None,
                     help="seed of the first image, image i gets seed+i (default 0; -1 draws one); recorded per PNG")
    gen.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's)")
    gen.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's)")
    gen.add_argument("--sampler", default=None,
                     help='sampler by its A1111 / ComfyUI name: "DPM++ 2M Karras", "Euler a", "DDIM", ...')
    gen.add_argument("--clip-skip", type=int, default=None,
                     help="A1111 numbering: 1 = the last CLIP layer (no skip), 2 = the penultimate")
    gen.add_argument("--prompt-syntax", choices=("a1111", "plain"), default=None,
                     help="a1111 (default): emphasis, BREAK, long prompts; plain: the text as diffusers reads it")
    gen.add_argument("--image", default=None, help="input image: image-to-image, or inpainting with --mask")
    gen.add_argument("--strength", type=float, default=None,
                     help=f"image-to-image denoising strength (default {DEFAULT_STRENGTH})")
    gen.add_argument("--mask", default=None, help="inpainting mask (white = repaint), with --image")
    gen.add_argument("--mask-blur", type=float, default=None, metavar="PIXELS",
                     help="A1111's mask blur: Gaussian blur of the mask, result composited onto the image through it "
                          "(default 4, or the --from-png image's; 0: the pipeline's output as it is)")
    gen.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                     help="LoRA file (kohya/A1111 or diffusers format) with its weight (default 1, or the weight of "
                          "a <lora:NAME:WEIGHT> tag in the prompt); repeatable")
    gen.add_argument("--embedding", action="append", default=[], metavar="FILE[:TOKEN]",
                     help="textual-inversion embedding (A1111 .pt/.safetensors or diffusers learned_embeds); the "
                          "token defaults to the file's name (A1111) or the one it records; repeatable")
    gen.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                     help="guide only the steps LO <= i / n < HI (e.g. 0.2 0.8); the others run the UNet on the "
                          "conditional half only (docs/STEP_SAVINGS.md)")
    gen.add_argument("--deep-cache", type=int, nargs="+", default=None, metavar=("N", "BRANCH"),
                     help="DeepCache feature reuse: a full UNet step every N steps, the others run only the layers "
                          "shallower than skip branch BRANCH (default 0, the fastest); N=1 is off")
    gen.add_argument("--freeu", type=float, nargs=4, default=None, metavar=("S1", "S2", "B1", "B2"),
                     help="FreeU (diffusers' enable_freeu): skip features' low frequencies times S1 / S2 and backbone "
                          "features times B1 / B2 at the two deepest up stages (e.g. 0.9 0.2 1.5 1.6 for SD 1.5)")
    gen.add_argument("--from-png", default=None, metavar="PNG",
                     help="take prompt and settings from a PNG's A1111 parameters; flags given here override")
    gen.add_argument("--config", default=None, metavar="FOLDER",
                     help="single-file MODEL: a diffusers folder (or bundled name) of the same architecture to take "
                          "configs, tokenizer and scheduler from (default: inferred from the file)")
    gen.add_argument("--optimize", action="store_true",
                     help="run the compiled fast path (pipe.optimize(): within 1e-5 of eager on the CPU; the int8 "
                          "kernels for a model written by diffusekit quantize). The first run of a size builds its "
                          "code once per machine (minutes on a CPU); later runs load it in seconds. LoRAs are fused "
                          "into the weights first (docs/PERFORMANCE.md)")
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--out", default="out/grid.png", help="output PNG (the grid when there are several images)")


def fail(message: str) -> SystemExit:
    return SystemExit(f"diffusekit generate: error: {message}")


A1111_SCHEDULE_TYPES = ("Karras", "Exponential", "SGM Uniform", "Beta")


def split_sampler(name: str) -> dict[str, str | None]:
    """``"DPM++ 2M Karras"`` -> ``{"sampler": "DPM++ 2M", "schedule_type": "Karras"}`` (checked: unknown names fail)."""
    from ..schedulers.names import resolve_sampler

    try:
        resolve_sampler(name)
    except ValueError as err:
        raise fail(f"--sampler: {err}") from None
    for schedule in A1111_SCHEDULE_TYPES:
        if name.lower().endswith(" " + schedule.lower()):
            return {"sampler": name[:-len(schedule)].strip(), "schedule_type": schedule}
    return {"sampler": name, "schedule_type": None}


def _base_parameters(args):
    """The PNG's parameters (``--from-png``) or empty ones."""
    from ..infotext import GenerationParameters, read_parameters

    if args.from_png is None:
        return GenerationParameters()
    path = Path(args.from_png)
    if not path.is_file():
        raise fail(f"--from-png {path}: no such file")
    text = read_parameters(path)
    if not text:
        raise fail(f"--from-png {path}: the image has no A1111 'parameters' text chunk")
    try:
        return GenerationParameters.from_infotext(text)
    except ValueError as err:
        raise fail(f"--from-png {path}: {err}") from None


def request_parameters(args):
    """Parameters of the request: defaults <- the --from-png image <- flags given; plus the prompt syntax."""
    params = _base_parameters(args)
    for flag, (field, default) in PARAMETER_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            params = params.replace(**{field: value})
            if flag == "sampler":  # recorded as A1111 1.9+ does: "Sampler: DPM++ 2M, Schedule type: Karras"
                params = params.replace(**split_sampler(value))
        elif getattr(params, field) is None:
            params = params.replace(**{field: default})
    if args.image is not None and args.mask is None and params.denoising_strength is None:
        params = params.replace(denoising_strength=DEFAULT_STRENGTH)
    if args.image is None:
        params = params.replace(denoising_strength=None)
    from ..mask_blur import MASK_BLUR_KEY, MASK_BLUR_X_KEY, MASK_BLUR_Y_KEY

    if args.mask_blur is not None and not args.mask_blur >= 0:
        raise fail(f"--mask-blur must be >= 0 pixels, got {args.mask_blur}")
    if args.mask_blur is not None:  # one size for both axes, over a PNG's separate X / Y sizes
        params.extra.pop(MASK_BLUR_X_KEY, None)
        params.extra.pop(MASK_BLUR_Y_KEY, None)
    blur = args.mask_blur if args.mask_blur is not None else params.extra.get(
        MASK_BLUR_KEY, 0 if args.from_png else DEFAULT_MASK_BLUR)  # A1111 records it only when above 0
    params.extra.pop(MASK_BLUR_KEY, None)
    if args.mask is not None and blur not in (0, "0"):
        params.extra[MASK_BLUR_KEY] = int(blur) if isinstance(blur, float) and blur.is_integer() else blur
    params = _step_savings(args, params)
    from ..infotext import FREEU_KEY

    foreign = params.extra.pop(FREEU_KEY, None)  # another tool's FreeU settings (not diffusers' four factors)
    if foreign is not None and params.freeu is None:
        print(f"diffusekit generate: the PNG's {FREEU_KEY} entry {foreign!r} is not diffusers' four factors (another "
              "tool's FreeU); this image is made without it (--freeu S1 S2 B1 B2 sets FreeU)", file=sys.stderr)
    for key in RECOMPUTED_KEYS:  # describe this run's files, written again from the files given now
        params.extra.pop(key, None)
    syntax = args.prompt_syntax or params.extra.pop(PROMPT_SYNTAX_KEY, "a1111")
    if syntax not in ("a1111", "plain"):
        raise fail(f"unknown prompt syntax {syntax!r} (a1111 or plain)")
    if syntax != "a1111":
        params.extra[PROMPT_SYNTAX_KEY] = syntax
    return params, syntax


def _step_savings(args, params):
    """--guidance-interval / --deep-cache / --freeu over what the --from-png image recorded (checked by generation's
    reader)."""
    from ..generation import step_savings

    try:
        if args.guidance_interval is not None:
            params = params.replace(guidance_interval=step_savings(guidance_interval=args.guidance_interval)[
                "guidance_interval"])
        if args.deep_cache is not None:
            if len(args.deep_cache) > 2:
                raise ValueError(f"--deep-cache takes N and optionally BRANCH, got {len(args.deep_cache)} values")
            fields = step_savings(deep_cache=args.deep_cache[0] if len(args.deep_cache) == 1 else args.deep_cache)
            params = params.replace(deep_cache_interval=fields["deep_cache_interval"],
                                    deep_cache_branch=fields["deep_cache_branch"])
        if args.freeu is not None:
            params = params.replace(freeu=step_savings(freeu=args.freeu)["freeu"])
    except ValueError as err:
        raise fail(f"--guidance-interval / --deep-cache / --freeu: {err}") from None
    return params


def load_pipeline(model: str, device: str, config: str | None = None):
    """``(pipeline, model name, model hash or None)``: a single file through ``from_single_file``, else a folder,
    bundled model or hub repo through ``DiffusionPipeline.from_pretrained``."""
    from ..infotext import model_hash
    from ..pipelines.base import DiffusionPipeline

    path = Path(model)
    if path.is_file() and path.suffix.lower() in SINGLE_FILE_SUFFIXES:
        from ..single_file.convert import load_any  # the pipeline class of the file's family (SD 1.x/2.x, SDXL)

        try:
            pipe = load_any(path, config=config)
        except (ValueError, OSError) as exc:
            raise fail(str(exc)) from None
        return pipe.to(device), path.stem, model_hash(path)
    if config is not None:
        raise fail("--config applies to single-file checkpoints (.safetensors / .ckpt) only")
    return DiffusionPipeline.from_pretrained(model).to(device), (path.name if path.is_dir() else model), None


def split_suffix(spec: str, flag: str, convert):
    """``"path:value"`` -> ``(path, value)``; ``(spec, None)`` when there is no ``:value`` (or it does not convert)."""
    head, sep, tail = spec.rpartition(":")
    if sep and head and tail and not Path(spec).exists():
        try:
            return head, convert(tail)
        except ValueError:
            pass
    return spec, None


# A1111's <lora:name:weight> prompt tag (<lyco:name:weight>, the LyCORIS extension's spelling, is its alias)
LORA_TAG = re.compile(r"<(?:lora|lyco):([^:>]+)(?::([^:>]*))?(?::[^>]*)?>")


def load_loras(pipe, specs: list[str], prompt: str) -> tuple[str, str, dict[str, str]]:
    """Load ``FILE[:WEIGHT]`` LoRAs and activate them with their weights; ``<lora:NAME:WEIGHT>`` tags in the prompt
    name files given with --lora (by file name) and set their weight, as in A1111.

    Returns ``(prompt for the model, prompt to record, {name: short file hash})``: the recorded prompt carries a
    tag for every LoRA used (A1111's convention, so the PNG says which LoRAs made it).
    """
    from ..infotext import lora_hash
    from ..loaders.lora import LoraError

    files: dict[str, tuple[str, float | None]] = {}
    for spec in specs:
        path, weight = split_suffix(spec, "--lora", float)
        if not Path(path).is_file():
            raise fail(f"--lora {path}: no such file")
        files[Path(path).stem] = (path, weight)
    tags: dict[str, float] = {}
    for name, weight in LORA_TAG.findall(prompt):
        try:
            tags[name] = float(weight) if weight else 1.0
        except ValueError:
            raise fail(f"prompt tag <lora:{name}:{weight}>: the weight is not a number") from None
    missing = [name for name in tags if name not in files]
    if missing:
        raise fail(f"the prompt names <lora:{missing[0]}>, but no --lora file {missing[0]}.safetensors was given")
    if not files:
        return prompt, prompt, {}
    weights = {name: weight if weight is not None else tags.get(name, 1.0) for name, (_, weight) in files.items()}
    for name, (path, _) in files.items():
        try:
            pipe.load_lora_weights(path, adapter_name=name)
        except LoraError as err:
            raise fail(f"--lora: {err}") from None
    pipe.set_adapters(list(weights), list(weights.values()))
    stripped = LORA_TAG.sub("", prompt).strip()
    recorded = stripped + "".join(f" <lora:{name}:{weight:g}>" for name, weight in weights.items())
    return stripped, recorded.strip(), {name: lora_hash(path) for name, (path, _) in files.items()}


def load_embeddings(pipe, specs: list[str]) -> dict[str, str]:
    """Load ``FILE[:TOKEN]`` embeddings; returns token -> short file hash (A1111's "TI hashes")."""
    from ..infotext import embedding_hash
    from ..loaders.textual_inversion import TextualInversionError

    hashes = {}
    for spec in specs:
        path, token = split_suffix(spec, "--embedding", str)
        if not Path(path).is_file():
            raise fail(f"--embedding {path}: no such file")
        tokenizer = getattr(pipe, "tokenizer", None) or getattr(pipe, "tokenizer_2", None)  # SDXL refiner: the 2nd
        before = set(tokenizer.added_tokens_encoder)
        try:
            pipe.load_textual_inversion(path, token=token)
        except TextualInversionError as err:
            raise fail(f"--embedding: {err}") from None
        new = [t for t in tokenizer.added_tokens_encoder if t not in before]
        hashes[new[0]] = embedding_hash(path)
    return hashes


def _open_image(path: str | None, mode: str, flag: str):
    if path is None:
        return None
    from PIL import Image

    if not Path(path).is_file():
        raise fail(f"{flag} {path}: no such file")
    with Image.open(path) as image:
        return image.convert(mode)


def write_images(images, parameters, out: Path) -> list[Path]:
    """Write the images as PNGs with their parameters; several -> ``<stem>-<i>.png`` each plus the grid at ``out``."""
    from ..utils import image_grid
    from ..infotext import save_png

    out.parent.mkdir(parents=True, exist_ok=True)
    if len(images) == 1:
        return [save_png(images[0], out, parameters[0])]
    width = max(2, len(str(len(images) - 1)))
    written = [save_png(image, out.with_name(f"{out.stem}-{i:0{width}d}.png"), params)
               for i, (image, params) in enumerate(zip(images, parameters))]
    return [save_png(image_grid(images), out, parameters[0]), *written]


def run(args) -> int:
    from ..generation import fast_path, generate, random_seed

    params, syntax = request_parameters(args)
    model = args.model or params.model
    if not model:
        raise fail("name a model (folder, hub repo, bundled name or single file), or use --from-png on an image "
                   "that records one")
    if args.mask is not None and args.image is None:
        raise fail("--mask needs --image (the image to inpaint)")
    num_images = args.num_images if args.num_images is not None else 1 if args.from_png else 4
    batch_size = args.batch_size or num_images
    if num_images < 1 or batch_size < 1:
        raise fail("--num-images and --batch-size must be positive")
    image = _open_image(args.image, "RGB", "--image")
    mask = _open_image(args.mask, "L", "--mask")

    pipe, name, digest = load_pipeline(model, args.device, args.config)
    pipe.set_progress_bar_config(disable=True)
    prompt, recorded_prompt, lora_hashes = load_loras(pipe, args.lora, params.prompt)
    if lora_hashes:
        params.extra["Lora hashes"] = ", ".join(f"{name}: {digest}" for name, digest in lora_hashes.items())
    params = params.replace(prompt=prompt)
    ti_hashes = load_embeddings(pipe, args.embedding)
    if ti_hashes:
        params.extra["TI hashes"] = ", ".join(f"{token}: {digest}" for token, digest in ti_hashes.items())
    params = params.replace(model=name, model_hash=digest)  # A1111 hashes single files only
    if args.optimize and lora_hashes:  # fused, the LoRAs leave no hooks: the compiled code serves them too
        pipe.fuse_lora(components=("unet", "text_encoder", "text_encoder_2"))
        pipe.unload_lora_weights()
    note = fast_path(pipe, args.optimize)
    if note:
        print(f"diffusekit generate: {note}", file=sys.stderr)
    if params.seed is None or params.seed == -1:
        params = params.replace(seed=random_seed())
    images, per_image = [], []
    for start in range(0, num_images, batch_size):
        count = min(batch_size, num_images - start)
        try:
            result = generate(pipe, params.replace(seed=params.seed + start), batch_size=count, image=image,
                              mask=mask, prompt_syntax=syntax)
        except ValueError as err:  # a request this model cannot run (e.g. a DeepCache branch it does not have)
            raise fail(str(err)) from None
        images += result.images
        per_image += [p.replace(prompt=recorded_prompt) for p in result.parameters]
    written = write_images(images, per_image, Path(args.out))
    print(f"wrote {written[0]}" + (f" and {len(written) - 1} images {written[1].name} ... {written[-1].name}"
                                   if len(written) > 1 else ""))
    return 0
