"""diffusekit's own API (``/v1/*``): queue jobs, follow them with server-sent events, fetch and cancel them.

    POST   /v1/jobs                  A1111 txt2img / img2img fields (+ ``model``) -> 202 {"id", "state", "position"}
    GET    /v1/jobs/{id}             state, progress, image URLs, infotexts
    GET    /v1/jobs/{id}/events      text/event-stream: ``progress`` events (step, preview PNG as a data URL)
                                     then one ``done`` event with the final state; ends after it
    GET    /v1/jobs/{id}/images/{i}.png   a finished image (PNG with the "parameters" chunk)
    DELETE /v1/jobs/{id}             cancel (waiting: dropped; running: stops after the current step)
    GET    /v1/models                served models, the loaded one, LoRA files
    GET    /v1/status                queue length and limits
"""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import StreamingResponse

from .a1111 import Img2ImgRequest, build_request
from .images import b64

EVENT_POLL_S = 0.05  # how often an event stream looks for news (a job's version counter)
KEEPALIVE_S = 15.0


class JobBody(Img2ImgRequest):
    model: str | None = None
    denoising_strength: float | None = None
    inpaint_full_res: bool = False  # the whole picture by default, as A1111's web page (its API defaults to true)


def router(state) -> APIRouter:
    from starlette.concurrency import run_in_threadpool

    api = APIRouter(prefix="/v1")

    def _job(job_id: str):
        job = state.queue.get(job_id)
        if job is None:
            raise HTTPException(status_code=404, detail=f"no job {job_id!r} (unknown, or finished long ago)")
        return job

    @api.post("/jobs", status_code=202)
    async def create(body: JobBody):
        img2img = bool(body.init_images)
        request = await run_in_threadpool(build_request, state, body, img2img=img2img, model=body.model)
        job = state.submit(request, source="jobs")
        return {"id": job.id, "state": job.state, "position": state.queue.position(job),
                "url": f"/v1/jobs/{job.id}", "events": f"/v1/jobs/{job.id}/events"}

    @api.get("/jobs/{job_id}")
    def status(job_id: str):
        job = _job(job_id)
        out = job.summary()
        out["position"] = state.queue.position(job)
        return out

    @api.delete("/jobs/{job_id}")
    def cancel(job_id: str):
        job = _job(job_id)
        cancelled = state.worker.cancel(job)
        return {"id": job.id, "cancelled": cancelled, "state": job.state}

    @api.get("/jobs/{job_id}/images/{index}.png")
    def image(job_id: str, index: int):
        job = _job(job_id)
        if not 0 <= index < len(job.pngs):
            raise HTTPException(status_code=404, detail=f"job {job_id} has {len(job.pngs)} image(s); no index {index}")
        return Response(job.pngs[index], media_type="image/png",
                        headers={"Content-Disposition": f'inline; filename="{job_id[:8]}-{index}.png"'})

    @api.get("/jobs/{job_id}/events")
    async def events(job_id: str, request: Request, previews: bool = True):
        job = _job(job_id)

        async def stream():
            seen = -1
            last_keepalive = asyncio.get_running_loop().time()
            while True:
                if await request.is_disconnected():
                    return
                if job.version != seen:
                    seen = job.version
                    if job.done:
                        yield _event("done", job.summary())
                        return
                    latents = job.latents  # before the summary: the step it reports has these latents, even if
                    data = job.summary()  # the job finishes (and drops them) while the preview renders
                    data["position"] = state.queue.position(job)
                    if previews:  # rendered off the event loop (a large image's PNG takes milliseconds)
                        png = await run_in_threadpool(job.preview_png, latents)
                        data["preview"] = f"data:image/png;base64,{b64(png)}" if png else None
                    yield _event("progress", data)
                    last_keepalive = asyncio.get_running_loop().time()
                elif asyncio.get_running_loop().time() - last_keepalive > KEEPALIVE_S:
                    yield ": keep-alive\n\n"
                    last_keepalive = asyncio.get_running_loop().time()
                await asyncio.sleep(EVENT_POLL_S)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @api.get("/models")
    def models():
        loaded = state.holder.current
        entries = state.registry.entries()
        return {
            "models": [{"name": e.name, "bundled": e.bundled, "loaded": loaded is not None and loaded.entry == e}
                       for e in entries.values()],
            "default": state.model_name,
            "loras": [lora["name"] for lora in state.registry.loras()],
            "lora_loading": loaded is not None and hasattr(loaded.pipe, "load_lora_weights"),
            "preview_fit_r2": round(loaded.preview.r2, 3) if loaded is not None else None,
        }

    @api.get("/status")
    def server_status():
        config = state.config
        current = state.worker.current
        return {"queued": len(state.queue), "running": current.id if current else None,
                "completed": state.worker.completed,
                "limits": {"max_pixels": config.max_pixels, "max_steps": config.max_steps,
                           "max_images": config.max_images, "max_body_bytes": config.max_body_bytes,
                           "queue_size": config.queue_size}}

    return api


def _event(name: str, data) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"
