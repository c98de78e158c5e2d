"""AUTOMATIC1111's web API (``/sdapi/v1/*``): the subset its clients use, with A1111's field names and defaults.

Requests become jobs on the shared queue (so A1111 clients and ``/v1/jobs`` clients take turns on one model); the
response comes when the job finishes. Images come back as base64 PNGs carrying the "parameters" chunk, ``info`` as
A1111's JSON string. Fields A1111 has but diffusekit does not act on (hires fix, face restoration, tiling,
subseeds, scripts) are accepted and ignored, as A1111 ignores unknown ones. ``mask_blur`` (or ``mask_blur_x`` /
``mask_blur_y``, default 4 each, as A1111's) blurs the inpainting mask and composites the result onto the original,
as A1111 does (:mod:`diffusekit.mask_blur`); ``inpaint_full_res`` (default true, as A1111's API) with
``inpaint_full_res_padding`` inpaints only a crop around the mask, at the working size, and pastes it back
(:mod:`diffusekit.inpaint_area`).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, ConfigDict

from ..infotext import GenerationParameters, parse_infotext
from .images import BadImage, b64, image_from_b64
from .jobs import FAILED, INTERRUPTED, Job, JobRequest
from .models import parse_lora_tags

# A1111's schedule types shown by /schedulers (name, label); "automatic" is the sampler's own default
SCHEDULERS = (("automatic", "Automatic"), ("karras", "Karras"), ("exponential", "Exponential"),
              ("sgm_uniform", "SGM Uniform"), ("beta", "Beta"))


class Txt2ImgRequest(BaseModel):
    """A1111's ``StableDiffusionProcessingTxt2Img`` API fields that matter here (defaults as A1111's)."""

    model_config = ConfigDict(extra="allow")

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0
    sampler_name: str | None = None
    sampler_index: str | None = "Euler"
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    denoising_strength: float | None = None
    override_settings: dict[str, Any] | None = None
    send_images: bool = True
    save_images: bool = False
    # diffusekit's own (not A1111's; docs/SERVE.md): the step savings, guidance only on the steps lo <= i / n < hi and
    # DeepCache feature reuse (an int cache_interval, or [cache_interval, cache_branch_id]); FreeU's factors
    # ([s1, s2, b1, b2] or {"s1": ..., ...}: diffusers' enable_freeu)
    guidance_interval: list[float] | None = None
    deep_cache: int | list[int] | None = None
    freeu: list[Any] | dict[str, Any] | None = None  # checked by step_savings (no lax conversion of "0.9" / true)


MASK_BLUR_DEFAULT = 4  # A1111's, when a request leaves mask_blur out


class Img2ImgRequest(Txt2ImgRequest):
    init_images: list[str] | None = None
    mask: str | None = None
    denoising_strength: float | None = 0.75
    resize_mode: int = 0
    inpainting_mask_invert: int = 0
    mask_blur: int | None = None  # A1111: when given, sets both mask_blur_x and mask_blur_y
    mask_blur_x: int = MASK_BLUR_DEFAULT
    mask_blur_y: int = MASK_BLUR_DEFAULT
    inpaint_full_res: bool = True  # A1111's API default ("Only masked"; its web page defaults to the whole picture)
    inpaint_full_res_padding: int = 0
    include_init_images: bool = False


class PngInfoRequest(BaseModel):
    image: str


def _unprocessable(message: str) -> HTTPException:
    return HTTPException(status_code=422, detail=message)


def build_request(state, body: Txt2ImgRequest, *, img2img: bool, model: str | None = None) -> JobRequest:
    """Check ``body`` against the server's limits and turn it into a :class:`JobRequest` (422 when it cannot run)."""
    from ..generation import random_seed, step_savings
    from ..schedulers.names import resolve_sampler

    config = state.config
    for name in ("width", "height"):
        value = getattr(body, name)
        if value < 8 or value % 8:
            raise _unprocessable(f"{name} must be a positive multiple of 8, got {value}")
    if body.width * body.height > config.max_pixels:
        raise _unprocessable(f"width x height = {body.width}x{body.height} = {body.width * body.height} pixels; this "
                             f"server allows at most {config.max_pixels} (--max-pixels)")
    if not 1 <= body.steps <= config.max_steps:
        raise _unprocessable(f"steps must be between 1 and {config.max_steps} (--max-steps), got {body.steps}")
    if body.batch_size < 1 or body.n_iter < 1:
        raise _unprocessable(f"batch_size and n_iter must be at least 1, got {body.batch_size} and {body.n_iter}")
    if body.batch_size * body.n_iter > config.max_images:
        raise _unprocessable(f"batch_size x n_iter = {body.batch_size * body.n_iter} images; this server allows at "
                             f"most {config.max_images} per request (--max-images)")
    if body.denoising_strength is not None and not 0 <= body.denoising_strength <= 1:
        raise _unprocessable(f"denoising_strength must be in [0, 1], got {body.denoising_strength}")
    overrides = body.override_settings or {}
    model_name = model or overrides.get("sd_model_checkpoint") or state.model_name
    try:
        entry = state.registry.resolve(model_name)
    except LookupError as exc:
        raise _unprocessable(str(exc)) from None
    sampler = body.sampler_name or body.sampler_index or "Euler"
    schedule = body.scheduler if body.scheduler and body.scheduler.lower() != "automatic" else None
    label = dict(SCHEDULERS).get(schedule.lower(), schedule) if schedule else None
    try:
        resolve_sampler(f"{sampler} {label}" if label else sampler)
    except (ValueError, TypeError) as exc:
        raise _unprocessable(f"sampler_name / scheduler: {exc}") from None
    try:
        tags = parse_lora_tags(body.prompt)
        for name in tags:
            state.registry.lora_file(name)
    except (ValueError, LookupError) as exc:
        raise _unprocessable(str(exc).strip("'\"")) from None
    clip_skip = overrides.get("CLIP_stop_at_last_layers")
    if clip_skip is not None and (not isinstance(clip_skip, int) or clip_skip < 1):
        raise _unprocessable(f"override_settings.CLIP_stop_at_last_layers must be an int >= 1, got {clip_skip!r}")
    try:
        savings = step_savings(body.guidance_interval, body.deep_cache, body.freeu)
    except ValueError as exc:
        raise _unprocessable(str(exc)) from None
    seed = random_seed() if body.seed is None or body.seed < 0 else body.seed
    params = GenerationParameters(
        prompt=body.prompt, negative_prompt=body.negative_prompt, steps=body.steps, sampler=sampler,
        schedule_type=label, cfg_scale=body.cfg_scale, seed=seed, width=body.width, height=body.height,
        clip_skip=clip_skip if clip_skip and clip_skip > 1 else None, **savings,
    )
    image = mask = None
    if img2img:
        image, mask = _input_images(state, body, params)
        params = params.replace(denoising_strength=body.denoising_strength if body.denoising_strength is not None
                                else 0.75)
        if mask is not None:
            params = params.replace(extra={**params.extra, **_inpaint_extra(body)})
    return JobRequest(model=entry.name, params=params, batch_size=body.batch_size, n_iter=body.n_iter, image=image,
                      mask=mask)


def _inpaint_extra(body: Img2ImgRequest) -> dict[str, Any]:
    """The infotext entries of an inpainting request's mask blur and inpaint area (as A1111 records them)."""
    from ..inpaint_area import INPAINT_AREA_KEY, ONLY_MASKED, PADDING_KEY
    from ..mask_blur import mask_blur_extra

    if body.mask_blur is not None:
        checked, x, y = {"mask_blur": body.mask_blur}, body.mask_blur, body.mask_blur
    else:
        checked, x, y = {"mask_blur_x": body.mask_blur_x, "mask_blur_y": body.mask_blur_y}, body.mask_blur_x, \
            body.mask_blur_y
    for name, value in {**checked, "inpaint_full_res_padding": body.inpaint_full_res_padding}.items():
        if value < 0:
            raise _unprocessable(f"{name} must be >= 0 pixels, got {value}")
    extra: dict[str, Any] = mask_blur_extra(x, y)  # "Mask blur: 4" as A1111 records it
    if body.inpaint_full_res:
        extra |= {INPAINT_AREA_KEY: ONLY_MASKED, PADDING_KEY: body.inpaint_full_res_padding}
    return extra


def _input_images(state, body: Img2ImgRequest, params: GenerationParameters):
    """The init image (resized to the request's size, A1111's resize mode 0, unless "only masked" inpainting keeps
    its size) and the mask as A1111 takes it (its ``create_binary_mask``, inverted if asked) at the upload's size:
    A1111 blurs a mask before resizing it (:mod:`diffusekit.mask_blur`), and the pipeline resizes an unblurred one
    the same way (Lanczos)."""
    from PIL import ImageOps

    from ..inpaint_area import resize_image
    from ..mask_blur import binary_mask

    if not body.init_images:
        raise _unprocessable("init_images: img2img needs one base64 image in init_images")
    limit = state.config.max_upload_pixels
    size = (params.width, params.height)
    try:
        image = image_from_b64(body.init_images[0], "init_images[0]", limit).convert("RGB")
        mask = binary_mask(image_from_b64(body.mask, "mask", limit)) if body.mask else None
    except BadImage as exc:
        raise _unprocessable(str(exc)) from None
    if mask is not None and body.inpaint_full_res:  # "only masked": the image keeps its size, the crop is scaled
        size = image.size
    image = resize_image(0, image, *size)  # A1111's resize_mode 0, "just resize", to the requested size
    if mask is not None and body.inpainting_mask_invert:
        mask = ImageOps.invert(mask)
    return image, mask


def _info(job: Job, body: Txt2ImgRequest) -> dict[str, Any]:
    params = job.request.params
    all_params = job.parameters or [params]
    first = all_params[0]
    return {
        "prompt": params.prompt, "all_prompts": [p.prompt for p in all_params],
        "negative_prompt": params.negative_prompt, "all_negative_prompts": [p.negative_prompt for p in all_params],
        "seed": params.seed, "all_seeds": [p.seed for p in all_params], "subseed": -1,
        "all_subseeds": [-1] * len(all_params), "subseed_strength": 0, "width": first.width, "height": first.height,
        "sampler_name": first.sampler, "cfg_scale": first.cfg_scale, "steps": first.steps,
        "batch_size": job.request.batch_size, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": job.model_name, "sd_model_hash": job.model_hash, "sd_vae_name": None, "sd_vae_hash": None,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1, "denoising_strength": params.denoising_strength,
        "extra_generation_params": {"Schedule type": params.schedule_type} if params.schedule_type else {},
        "index_of_first_image": 0, "infotexts": [str(p) for p in job.parameters], "styles": body.styles or [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)),
        "clip_skip": params.clip_skip or 1, "is_using_inpainting_conditioning": job.request.mask is not None,
        "version": "diffusekit", "interrupted": job.state == INTERRUPTED,
    }


async def run_to_completion(state, request: JobRequest) -> Job:
    job = state.submit(request, source="a1111")
    await asyncio.wrap_future(job.future)
    return job


def _result(job: Job, body: Txt2ImgRequest) -> dict[str, Any]:
    if job.state == FAILED:
        raise HTTPException(status_code=422 if job.error_kind == "input" else 500, detail=job.error)
    parameters = body.model_dump()
    if isinstance(body, Img2ImgRequest) and not body.include_init_images:
        parameters["init_images"] = None
        parameters["mask"] = None
    images = [b64(png) for png in job.pngs] if body.send_images else []
    return {"images": images, "parameters": parameters, "info": json.dumps(_info(job, body))}


def router(state) -> APIRouter:
    from starlette.concurrency import run_in_threadpool

    api = APIRouter(prefix="/sdapi/v1")

    @api.post("/txt2img")
    async def txt2img(body: Txt2ImgRequest):
        request = build_request(state, body, img2img=False)
        return _result(await run_to_completion(state, request), body)

    @api.post("/img2img")
    async def img2img(body: Img2ImgRequest):
        request = await run_in_threadpool(build_request, state, body, img2img=True)  # decodes images
        return _result(await run_to_completion(state, request), body)

    @api.get("/progress")
    def progress(skip_current_image: bool = False):
        job = state.worker.current
        waiting = len(state.queue)
        if job is None:
            return {"progress": 0.0, "eta_relative": 0.0, "state": _state_dict(None, waiting), "current_image": None,
                    "textinfo": None, "current_task": None}
        preview = None if skip_current_image else job.preview_png()
        return {"progress": round(job.progress, 4), "eta_relative": round(job.eta(), 3),
                "state": _state_dict(job, waiting), "current_image": b64(preview) if preview else None,
                "textinfo": None, "current_task": job.id}

    @api.post("/interrupt")
    def interrupt():
        state.worker.interrupt()
        return {}

    @api.get("/samplers")
    def samplers():
        from ..schedulers.names import resolve_sampler, sampler_names

        names = [n for n in sampler_names() if n != n.lower()]  # A1111 spellings (ComfyUI's are lower case)
        return [{"name": n, "aliases": [], "options": {"note": resolve_sampler(n).note} if resolve_sampler(n).note
                 else {}} for n in names]

    @api.get("/schedulers")
    def schedulers():
        return [{"name": name, "label": label, "aliases": None, "default_rho": -1, "need_inner_model": False}
                for name, label in SCHEDULERS]

    @api.get("/sd-models")
    def sd_models():
        loaded = state.holder.current
        out = []
        for entry in state.registry.entries().values():
            short = loaded.hash if loaded is not None and loaded.entry == entry else None
            out.append({"title": entry.name, "model_name": entry.name, "hash": short, "sha256": None,
                        "filename": entry.name, "config": None})
        return out

    @api.get("/options")
    def get_options():
        loaded = state.holder.current
        return {"sd_model_checkpoint": state.model_name, "sd_checkpoint_hash": loaded.hash if loaded else None,
                "CLIP_stop_at_last_layers": 1, "samples_format": "png"}

    @api.post("/options")
    async def set_options(options: dict[str, Any]):
        name = options.get("sd_model_checkpoint")
        if name is not None:
            try:
                entry = state.registry.resolve(name)
            except LookupError as exc:
                raise _unprocessable(str(exc)) from None
            job = await run_to_completion(state, JobRequest(model=entry.name, kind="load"))
            if job.state == FAILED:
                raise HTTPException(status_code=500, detail=job.error)
            state.model_name = entry.name
        return None

    @api.post("/png-info")
    def png_info(body: PngInfoRequest):
        try:
            image = image_from_b64(body.image, "image", state.config.max_upload_pixels)
        except BadImage as exc:
            raise _unprocessable(str(exc)) from None
        items = {k: v for k, v in image.info.items() if isinstance(v, str)}
        text = items.pop("parameters", "")
        return {"info": text, "items": items, "parameters": parse_infotext(text) if text else {}}

    @api.get("/loras")
    def loras():
        return state.registry.loras()

    @api.get("/embeddings")
    def embeddings():
        loaded = state.holder.current
        if loaded is None:
            return {"loaded": {}, "skipped": {}}
        return {"loaded": loaded.embeddings, "skipped": loaded.skipped_embeddings}

    @api.get("/scripts")
    def scripts():
        return {"txt2img": [], "img2img": []}

    return api


def _state_dict(job: Job | None, waiting: int) -> dict[str, Any]:
    if job is None:
        return {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": waiting,
                "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
    return {"skipped": False, "interrupted": job._stop == INTERRUPTED, "stopping_generation": False, "job": job.id,
            "job_count": waiting + 1, "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)),
            "job_no": job.batch_index, "sampling_step": job.step, "sampling_steps": job.steps}
