"""One generation request -> images, each with the A1111 parameters that remake it.

The piece the command line, the HTTP server and batch generation share, so that a seed means the same image
everywhere: image ``i`` of a request is drawn from its own generator seeded ``seed + i`` (A1111's rule), so it
does not depend on how many images were asked for at once or on which process made it.

    pipe = DiffusionPipeline.from_pretrained("diffusekit-fashion-sd")
    result = generate(pipe, GenerationParameters(prompt="a red dress", steps=20, sampler="DPM++ 2M Karras",
                                                 cfg_scale=5, seed=1, width=32, height=32), batch_size=2)
    save_png(result.images[0], "a.png", result.parameters[0])

The task follows the inputs: an ``image`` makes it image-to-image (``denoising_strength``), an ``image`` and a
``mask`` inpainting; the family's pipeline for that task is built on the loaded components with
:meth:`DiffusionPipeline.from_pipe` (shared weights, nothing copied). The sampler is set on that per-call pipeline,
never on ``pipe``, so concurrent requests with different samplers do not interfere.
"""

from __future__ import annotations

import dataclasses
import secrets
from typing import Any, Callable

from .infotext import GenerationParameters

__all__ = ["SHARED_FIELDS", "GenerationResult", "fast_path", "generate", "random_seed", "request_pipeline",
           "step_savings", "task_of"]

SEED_RANGE = 2**32  # A1111 draws random seeds below 2**32


def random_seed() -> int:
    return secrets.randbelow(SEED_RANGE)


def task_of(image: Any = None, mask: Any = None) -> str:
    """``"text-to-image"``, ``"image-to-image"`` or ``"inpainting"`` from the inputs given."""
    from .pipelines.auto import IMAGE2IMAGE, INPAINTING, TEXT2IMAGE

    if mask is not None and image is None:
        raise ValueError("a mask needs an image to inpaint: pass image= as well")
    return INPAINTING if mask is not None else IMAGE2IMAGE if image is not None else TEXT2IMAGE


def request_pipeline(pipe, task: str, sampler: str | None = None):
    """The pipeline that runs ``task`` on ``pipe``'s components, with ``sampler`` (an A1111 / ComfyUI name) if given.

    Returns ``pipe`` itself when nothing changes; otherwise a new pipeline object sharing ``pipe``'s modules.
    """
    from .pipelines.auto import TEXT2IMAGE, task_class
    from .schedulers.names import get_scheduler

    target = type(pipe) if task == TEXT2IMAGE else task_class(task, type(pipe).__name__)
    if sampler is None and target is type(pipe):
        return pipe
    overrides = {"scheduler": get_scheduler(sampler, pipe.scheduler.config)} if sampler else {}
    run = target.from_pipe(pipe, **overrides)
    if hasattr(pipe, "_progress_bar_config"):  # a quiet pipe (e.g. in a server) stays quiet per call
        run.set_progress_bar_config(**pipe._progress_bar_config)
    if getattr(pipe, "deep_cache", None) is not None:  # enable_deep_cache() on pipe holds for its requests
        run._deep_cache_default = pipe.deep_cache
    return run


def fast_path(pipe, optimize: bool) -> str | None:
    """The surfaces' ``--optimize`` (``generate``, ``serve``, ``batch``) on a loaded pipeline: ``pipe.optimize()``
    when ``optimize`` (the compiled exact path; the int8 kernels for a model written by ``diffusekit quantize``).
    Without it, returns a note for the user when ``pipe`` holds int8 layers, which then only simulate int8 (slower
    than float32); otherwise ``None``."""
    from torch import nn

    from .optimize import _is_quantized

    if optimize:
        pipe.optimize()
        return None
    quantized = [name for name, component in sorted(pipe.components.items())
                 if isinstance(component, nn.Module) and _is_quantized(component)]
    if quantized:
        return (f"the {' and '.join(quantized)} of this model are int8: without --optimize they simulate int8 in "
                "float32, slower than the float model; add --optimize for the int8 kernels")
    return None


@dataclasses.dataclass
class GenerationResult:
    images: list  # PIL images (or arrays/tensors, as output_type says)
    parameters: list[GenerationParameters]  # one per image: its own seed
    nsfw_content_detected: list[bool] | None = None


def _sampler_name(params: GenerationParameters) -> str | None:
    if not params.sampler:
        return None
    if params.schedule_type and params.schedule_type.lower() not in ("automatic", "normal", "default"):
        return f"{params.sampler} {params.schedule_type}"
    return params.sampler


# fields every request of one generate() call must share: they shape the one pipeline call that runs them all
SHARED_FIELDS = ("steps", "sampler", "schedule_type", "cfg_scale", "width", "height", "denoising_strength",
                 "clip_skip", "guidance_interval", "deep_cache_interval", "deep_cache_branch", "freeu")


def step_savings(guidance_interval: Any = None, deep_cache: Any = None, freeu: Any = None) -> dict[str, Any]:
    """A request's opt-in sampling changes, checked, as :class:`GenerationParameters` fields: the step savings
    ``guidance_interval`` ``(lo, hi)`` (guidance only on the steps ``lo <= i / n < hi``) and ``deep_cache`` (DeepCache
    feature reuse: an int ``cache_interval``, or ``(cache_interval, cache_branch_id)``), and ``freeu`` (FreeU's
    ``[s1, s2, b1, b2]`` or a mapping of them). The one reader of these for the command line, the server and batch
    jobs; raises ``ValueError`` naming the field."""
    from .models.freeu import check_freeu
    from .pipelines.deep_cache import deep_cache_config
    from .pipelines.pieces import check_guidance_interval

    fields: dict[str, Any] = {"guidance_interval": check_guidance_interval(
        tuple(guidance_interval) if isinstance(guidance_interval, list) else guidance_interval),
        "freeu": check_freeu(freeu)}
    if deep_cache is not None and not isinstance(deep_cache, (bool, dict)):
        config = deep_cache_config(tuple(deep_cache) if isinstance(deep_cache, list) else deep_cache)
        fields.update(deep_cache_interval=config.cache_interval, deep_cache_branch=config.cache_branch_id)
    elif deep_cache is not None:
        raise ValueError(f"deep_cache must be an int cache_interval or a pair [cache_interval, cache_branch_id], got "
                         f"{deep_cache!r}")
    else:
        fields.update(deep_cache_interval=None, deep_cache_branch=None)
    return fields


def _deep_cache_argument(params: GenerationParameters) -> Any:
    """The pipeline call's ``deep_cache`` for ``params`` (None: the pipeline's own setting)."""
    if params.deep_cache_interval is None:
        return None
    return {"cache_interval": params.deep_cache_interval, "cache_branch_id": params.deep_cache_branch or 0,
            "skip_mode": params.extra.get(DEEP_CACHE_MODE_KEY, "uniform")}


DEEP_CACHE_MODE_KEY = "Deep cache mode"  # recorded only for a pipeline enabled with skip_mode="non-uniform"


def _request_list(params) -> list[GenerationParameters]:
    requests = [params] if isinstance(params, GenerationParameters) else list(params)
    if not requests or not all(isinstance(p, GenerationParameters) for p in requests):
        raise TypeError("params must be a GenerationParameters or a non-empty list of them, got "
                        f"{type(params).__name__}")
    first = requests[0]
    for i, other in enumerate(requests[1:], 1):
        differing = [f for f in SHARED_FIELDS if getattr(other, f) != getattr(first, f)]
        if differing:
            raise ValueError(f"params[{i}] differs from params[0] in {', '.join(differing)}: requests run together "
                             f"must share {', '.join(SHARED_FIELDS)} (prompts and seeds may differ); run them in "
                             "separate calls")
    return requests


def _per_image(value: Any, count: int, batch_size: int, what: str) -> Any:
    """``value`` as given (one for all), or a list with one entry per request expanded to one per image."""
    if count == 1 or value is None or not isinstance(value, (list, tuple)):
        return value
    if len(value) != count:
        raise ValueError(f"got {len(value)} {what}s for {count} requests: pass one {what}, or one per request")
    return [v for v in value for _ in range(batch_size)]


PROMPT_SYNTAXES = ("plain", "a1111")


def generate(pipe, params: GenerationParameters | list[GenerationParameters], *, batch_size: int = 1,
             image: Any = None, mask: Any = None, on_step: Callable[[int, int, Any], bool | None] | None = None,
             output_type: str = "pil", prompt_syntax: str = "plain", **pipeline_kwargs: Any) -> GenerationResult:
    """Run ``params`` on ``pipe`` and return ``batch_size`` images with their own parameters.

    ``params.seed`` of ``None`` or ``-1`` draws a random seed (recorded in the result). ``on_step(step, total,
    latents)`` is called after every denoising step (for DDPM / DDIM the latents are the pixel-space sample); returning ``True`` from it
    stops the run early (the images so far are decoded, as A1111's interrupt does). Extra keyword arguments go to
    the pipeline call as they are (``cross_attention_kwargs=...``). ``prompt_syntax="a1111"`` reads the prompts
    with A1111's emphasis / ``BREAK`` / long-prompt rules (:mod:`diffusekit.prompts`); ``"plain"`` as diffusers.

    ``params.guidance_interval`` / ``deep_cache_interval`` / ``deep_cache_branch`` are the opt-in step savings
    (:func:`step_savings`); without them a pipeline's own ``enable_deep_cache`` setting holds and is recorded.
    ``params.freeu`` turns FreeU on for this call only (``pipe.unet``'s own setting is restored after it); without
    it the UNet's own ``enable_freeu`` setting holds and is recorded. FreeU is module state: calls with factors on
    one UNet run one at a time, and other threads' calls on the same pipeline meanwhile would see them
    (:func:`diffusekit.models.freeu.freeu_for_call`).

    ``params`` may be a list of requests that share size, steps, sampler, CFG scale and strength
    (:data:`SHARED_FIELDS`) but not prompts or seeds: they run through the model in one batch, each giving
    ``batch_size`` images from its own seeds, in order. ``image`` / ``mask`` are then one for all or a list with one
    per request. Batching changes convolution numerics in the last bits (up to 1/255 after conversion to 8 bits on
    CPU), never the noise: an image is the same up to that whatever it was batched with.

    Inpainting with a request's ``extra["Mask blur"]`` above 0 does what A1111's ``mask_blur`` does
    (:mod:`diffusekit.mask_blur`; ``Mask blur X`` / ``Mask blur Y`` for separate sizes): the pipeline gets the binary
    mask blurred, and each image is composited onto the original through it; 0 (or absent) leaves the pipeline's
    output as it is. ``extra["Inpaint area"] = "Only masked"`` (with ``"Masked area padding"``) inpaints a crop
    around the mask at the working size and pastes it back into the image, which keeps its own size, as A1111's
    ``inpaint_full_res`` (:mod:`diffusekit.inpaint_area`).
    """
    import torch

    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    requests = _request_list(params)
    params = requests[0]
    seeds = []
    for request in requests:
        seed = random_seed() if request.seed is None or request.seed == -1 else int(request.seed)
        seeds.extend(seed + i for i in range(batch_size))
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    task = task_of(image, mask)
    image = _per_image(image, len(requests), batch_size, "image")
    mask = _per_image(mask, len(requests), batch_size, "mask")
    if mask is not None and len(seeds) > 1 and not isinstance(image, (list, tuple)):
        # one image per output image: the inpainting pipelines encode a single image once, with the first image's
        # generator, so the others would depend on their batch; each image's own generator encodes its copy
        image = [image] * len(seeds)
    overlays = pastes = None  # A1111's mask_blur (mask_blur.py) and "only masked" inpainting (inpaint_area.py)
    if mask is not None:
        per_output = [r for r in requests for _ in range(batch_size)]
        padding = _only_masked_padding(per_output)
        if padding is not None:
            from .inpaint_area import crop_to_masks

            cropped = crop_to_masks(image, mask, per_output, params.width, params.height, padding)
            if cropped is None:  # every mask blank: A1111 runs image-to-image on the whole picture (and says so)
                from .inpaint_area import INPAINT_AREA_KEY, PADDING_KEY, resize_image

                task, mask = "image-to-image", None
                if params.width and params.height:  # A1111's "just resize" to the working size
                    image = [resize_image(0, im, params.width, params.height) for im in image] \
                        if isinstance(image, (list, tuple)) else resize_image(0, image, params.width, params.height)
                requests = [r.replace(extra={k: v for k, v in r.extra.items() if k not in (INPAINT_AREA_KEY,
                                                                                            PADDING_KEY)})
                            for r in requests]
            else:
                image, mask, pastes = cropped
        else:
            from .mask_blur import blur_masks

            mask, overlays = blur_masks(image, mask, per_output, (params.width, params.height))
    run = request_pipeline(pipe, task, _sampler_name(params))
    kwargs: dict[str, Any] = {"generator": generators, "output_type": output_type}
    if params.steps is not None:
        kwargs["num_inference_steps"] = params.steps
    if prompt_syntax not in PROMPT_SYNTAXES:
        raise ValueError(f"prompt_syntax must be one of {PROMPT_SYNTAXES}, got {prompt_syntax!r}")
    if hasattr(run, "encode_prompt"):  # prompt-conditioned (Stable Diffusion family)
        prompts = [r.prompt for r in requests for _ in range(batch_size)]
        negatives = [r.negative_prompt or "" for r in requests for _ in range(batch_size)]
        # A1111 counts the last layer as clip skip 1, diffusers as 0
        clip_skip = params.clip_skip - 1 if params.clip_skip is not None and params.clip_skip > 1 else None
        if prompt_syntax == "a1111":
            from .prompts import a1111_prompt_kwargs  # SD and SDXL (pooled embeddings too)

            kwargs.update(a1111_prompt_kwargs(run, prompts, negatives, clip_skip=clip_skip,
                                              lora_scale=_lora_scale(pipeline_kwargs)))
        else:
            kwargs.update(prompt=prompts, negative_prompt=negatives if any(negatives) else None)  # None encodes ""
            if clip_skip is not None:
                kwargs["clip_skip"] = clip_skip
        if params.cfg_scale is not None:
            kwargs["guidance_scale"] = params.cfg_scale
        if params.guidance_interval is not None:
            kwargs["guidance_interval"] = params.guidance_interval
        kwargs["deep_cache"] = _deep_cache_argument(params)
        if task == "text-to-image":
            kwargs.update(height=params.height, width=params.width)
        else:
            kwargs["image"] = image
            if params.denoising_strength is not None:
                kwargs["strength"] = params.denoising_strength
            if mask is not None:
                kwargs.update(mask_image=mask, height=params.height, width=params.width)
        if on_step is not None:
            kwargs["callback_on_step_end"] = _step_callback(on_step, params.steps)
    else:  # unconditional: the prompt and guidance do not apply
        kwargs["batch_size"] = len(seeds)
        if on_step is not None:  # DDPM / DDIM take the step callback as an extension (pipelines/ddpm.py)
            kwargs["callback_on_step_end"] = _step_callback(on_step, params.steps)
    kwargs.update(pipeline_kwargs)
    from .models.freeu import freeu_for_call, freeu_setting

    own_freeu = freeu_setting(getattr(run, "unet", None)) if params.freeu is None else None  # enable_freeu() holds
    with freeu_for_call(getattr(run, "unet", run), params.freeu):
        output = run(**kwargs)
    images = list(output.images)
    if overlays is not None:
        from .mask_blur import apply_overlays

        images = apply_overlays(images, overlays)
    if pastes is not None:
        from .inpaint_area import paste_back

        if not all(hasattr(x, "convert") for x in images):
            raise ValueError("Only masked inpainting pastes PIL images back: use output_type='pil'")
        images = [paste_back(im, paste) for im, paste in zip(images, pastes)]
    per_image = [r.replace(seed=s) for r, s in zip((r for r in requests for _ in range(batch_size)), seeds)]
    if not hasattr(run, "encode_prompt"):  # record only what shaped the image: no guidance, no clip skip
        per_image = [p.replace(cfg_scale=None, clip_skip=None, guidance_interval=None, deep_cache_interval=None,
                               deep_cache_branch=None) for p in per_image]
    else:
        if params.deep_cache_interval is None and getattr(run, "deep_cache", None) is not None:
            per_image = [_with_pipeline_deep_cache(p, run.deep_cache) for p in per_image]
        if own_freeu is not None:  # recorded for requests without their own factors
            per_image = [p.replace(freeu=own_freeu) for p in per_image]
    if (params.width is None or params.height is None) and images and hasattr(images[0], "size"):
        per_image = [p.replace(width=im.size[0], height=im.size[1]) for p, im in zip(per_image, images)]
    return GenerationResult(images, per_image, getattr(output, "nsfw_content_detected", None))


def _only_masked_padding(requests: list) -> int | None:
    """The "Masked area padding" of requests for A1111's "only masked" inpainting (None: the whole picture); the
    requests of one pipeline call must agree."""
    from .inpaint_area import only_masked_padding

    paddings = {only_masked_padding(r) for r in requests}
    if len(paddings) > 1:
        raise ValueError("requests batched together must share Inpaint area and Masked area padding")
    return paddings.pop()


def _with_pipeline_deep_cache(params: GenerationParameters, config) -> GenerationParameters:
    """Record the pipeline's ``enable_deep_cache`` setting a request ran with."""
    params = params.replace(deep_cache_interval=config.cache_interval, deep_cache_branch=config.cache_branch_id,
                            extra=dict(params.extra))
    if config.skip_mode != "uniform":
        params.extra[DEEP_CACHE_MODE_KEY] = config.skip_mode
    return params


def _lora_scale(pipeline_kwargs: dict[str, Any]) -> float | None:
    """The LoRA scale a call's ``cross_attention_kwargs`` gives the text encoder (for the A1111 prompt path)."""
    return (pipeline_kwargs.get("cross_attention_kwargs") or {}).get("scale")


def _step_callback(on_step, total):
    def callback(pipe, step, timestep, tensors):
        steps = getattr(pipe, "num_timesteps", None) or total
        if on_step(step + 1, steps, tensors.get("latents")):
            pipe._interrupt = True
        return {}

    return callback
