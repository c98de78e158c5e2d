"""The job queue and the worker that runs it: one job at a time, on the one loaded model.

Every request that generates (A1111's ``txt2img`` / ``img2img``, ``POST /v1/jobs``) and every model switch becomes a
:class:`Job` in a bounded queue; a full queue refuses new work (:class:`QueueFull`, answered 429) instead of
growing. One worker thread takes jobs in order, loads the job's model when it differs from the loaded one (the
previous one is freed first), and runs :func:`diffusekit.generation.generate` with a step callback that records
progress and the latest latents (for previews) and asks the pipeline to stop on interrupt / cancel.

Finished jobs stay readable (``GET /v1/jobs/{id}``) until ``keep_jobs`` newer ones have finished.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time
import uuid
from typing import Any

from ..infotext import GenerationParameters
from ..inpaint_area import INPAINT_AREA_KEY, PADDING_KEY

ONLY_MASKED_KEYS = (INPAINT_AREA_KEY, PADDING_KEY)

logger = logging.getLogger(__name__)

QUEUED, RUNNING, DONE, FAILED, CANCELLED, INTERRUPTED = "queued", "running", "done", "failed", "cancelled", \
    "interrupted"
FINISHED = (DONE, FAILED, CANCELLED, INTERRUPTED)


class QueueFull(RuntimeError):
    """The job queue holds ``queue_size`` jobs already."""


class _Stopped(Exception):
    """Raised from the step callback when a pipeline kept going after it was asked to stop."""


@dataclasses.dataclass
class JobRequest:
    """What to run: ``params`` (seed already drawn), ``batch_size`` × ``n_iter`` images, optional image / mask."""

    model: str
    params: GenerationParameters = dataclasses.field(default_factory=GenerationParameters)
    batch_size: int = 1
    n_iter: int = 1
    image: Any = None
    mask: Any = None
    kind: str = "generate"  # or "load": only make ``model`` the loaded one

    @property
    def task(self) -> str:
        return "inpainting" if self.mask is not None else "image-to-image" if self.image is not None else \
            "text-to-image"


class Job:
    def __init__(self, request: JobRequest, source: str = "api"):
        self.id = uuid.uuid4().hex
        self.request = request
        self.source = source
        self.state = QUEUED
        self.created = time.time()
        self.started: float | None = None
        self.finished: float | None = None
        self.step = 0
        self.steps = request.params.steps or 0
        self.batch_index = 0
        self.latents = None
        self.preview = None  # the loaded model's LatentPreview, set when the job starts
        self._preview: tuple | None = None  # (latents it was made from, PNG bytes)
        self.parameters: list[GenerationParameters] = []
        self.pngs: list[bytes] = []
        self.error: str | None = None
        self.error_kind: str | None = None  # "input" for bad requests found while running
        self.model_name: str | None = None
        self.model_hash: str | None = None
        self.version = 0  # bumped on every change, for event streams
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self._stop: str | None = None  # None, INTERRUPTED or CANCELLED
        self._stop_asked = False
        self._in_worker = False

    # ---------------------------------------------------------------- state

    @property
    def done(self) -> bool:
        return self.state in FINISHED

    @property
    def progress(self) -> float:
        if self.state in FINISHED:
            return 1.0
        if self.state != RUNNING or not self.steps:
            return 0.0
        return min(1.0, (self.batch_index + self.step / self.steps) / max(1, self.request.n_iter))

    def eta(self) -> float:
        progress = self.progress
        if self.started is None or progress <= 0 or progress >= 1:
            return 0.0
        elapsed = time.time() - self.started
        return elapsed / progress - elapsed

    def touch(self) -> None:
        self.version += 1

    def stop(self, how: str) -> None:
        self._stop = how
        self.touch()

    def _finish(self, state: str, error: str | None = None) -> None:
        self.state = state
        self.error = error
        self.finished = time.time()
        self.latents = None
        self._preview = None
        self.touch()
        if not self._in_worker:  # the worker resolves its job itself, once it is no longer its current one
            self._resolve()

    def _resolve(self) -> None:
        if not self.future.done():
            self.future.set_result(self)

    def preview_png(self, latents=None) -> bytes | None:
        """The latest step's preview as PNG bytes (rendered once per step, shared by every viewer); ``latents``:
        those of the step a viewer was told about (read before the job may have finished), default the latest."""
        latents, preview = self.latents if latents is None else latents, self.preview
        if latents is None or preview is None:
            return None
        cached = self._preview
        if cached is not None and cached[0] is latents:
            return cached[1]
        params = self.request.params
        sized = params.width and params.height and not preview.pixel_space  # a pixel-space sample is the image
        size = (params.width, params.height) if sized else None
        png = preview.png(latents, 0, size)
        self._preview = (latents, png)
        return png

    def summary(self, base_url: str = "") -> dict[str, Any]:
        return {
            "id": self.id, "state": self.state, "task": self.request.task, "model": self.model_name or
            self.request.model, "progress": round(self.progress, 4), "step": self.step, "steps": self.steps,
            "batch": self.batch_index, "batches": self.request.n_iter, "eta": round(self.eta(), 3),
            "created": self.created, "started": self.started, "finished": self.finished, "error": self.error,
            "images": [f"{base_url}/v1/jobs/{self.id}/images/{i}.png" for i in range(len(self.pngs))],
            "infotexts": [str(p) for p in self.parameters], "seeds": [p.seed for p in self.parameters],
        }


class JobQueue:
    """Bounded FIFO of jobs with cancellation of waiting ones, plus the table of recent jobs by id."""

    def __init__(self, capacity: int, keep: int):
        self.capacity = capacity
        self.keep = keep
        self._waiting: collections.deque[Job] = collections.deque()
        self._jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self._cond = threading.Condition()
        self._closed = False

    def submit(self, job: Job) -> int:
        """Queue ``job``; returns its position (0 = next). Raises :class:`QueueFull`."""
        with self._cond:
            if self._closed:
                raise RuntimeError("the server is shutting down")
            if len(self._waiting) >= self.capacity:
                raise QueueFull(f"the job queue is full ({self.capacity} jobs waiting); retry later")
            self._waiting.append(job)
            self._jobs[job.id] = job
            self._trim()
            self._cond.notify_all()
            return len(self._waiting) - 1

    def _trim(self) -> None:
        finished = [jid for jid, j in self._jobs.items() if j.done]
        for jid in finished[: max(0, len(finished) - self.keep)]:
            del self._jobs[jid]

    def get(self, job_id: str) -> Job | None:
        with self._cond:
            return self._jobs.get(job_id)

    def position(self, job: Job) -> int | None:
        with self._cond:
            try:
                return self._waiting.index(job)
            except ValueError:
                return None

    def __len__(self) -> int:
        with self._cond:
            return len(self._waiting)

    def cancel_waiting(self, job: Job) -> bool:
        with self._cond:
            try:
                self._waiting.remove(job)
            except ValueError:
                return False
        job._finish(CANCELLED)
        return True

    def next(self, timeout: float | None = None) -> Job | None:
        with self._cond:
            if not self._cond.wait_for(lambda: self._waiting or self._closed, timeout):
                return None
            if self._closed and not self._waiting:
                return None
            return self._waiting.popleft()

    def finished(self) -> None:
        with self._cond:
            self._trim()

    def close(self) -> list[Job]:
        with self._cond:
            self._closed = True
            left = list(self._waiting)
            self._waiting.clear()
            self._cond.notify_all()
        for job in left:
            job._finish(CANCELLED, "the server shut down")
        return left


class Worker:
    """The thread that runs jobs one by one on :class:`~.models.ModelHolder`'s model."""

    def __init__(self, queue: JobQueue, holder):
        self.queue = queue
        self.holder = holder
        self.current: Job | None = None
        self.completed = 0
        self._thread = threading.Thread(target=self._loop, name="diffusekit-serve-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        job = self.current
        self.queue.close()
        if job is not None:
            job.stop(CANCELLED)
        self._thread.join(timeout)

    def interrupt(self) -> Job | None:
        """A1111's interrupt: stop the running job after the current step; images made so far are kept."""
        job = self.current
        if job is not None and not job.done:
            job.stop(INTERRUPTED)
        return job

    def cancel(self, job: Job) -> bool:
        if job.done:
            return False
        if self.queue.cancel_waiting(job):
            return True
        job.stop(CANCELLED)
        return True

    def _loop(self) -> None:
        while True:
            job = self.queue.next()
            if job is None:
                return
            job._in_worker = True
            self.current = job
            try:
                self._run(job)
            except BaseException as exc:  # never let one job take the worker down
                logger.exception("job %s failed", job.id)
                job._finish(FAILED, f"{type(exc).__name__}: {exc}")
            finally:
                self.current = None
                self.completed += 1
                self.queue.finished()
                job._resolve()  # after ``current`` is cleared: a client that sees its answer sees an idle server

    def _run(self, job: Job) -> None:
        import torch

        from ..generation import generate

        if job._stop is not None:
            job._finish(job._stop)
            return
        job.state = RUNNING
        job.started = time.time()
        job.touch()
        request = job.request
        try:
            loaded = self.holder.get(request.model)
        except Exception as exc:
            job._finish(FAILED, f"could not load model {request.model!r}: {type(exc).__name__}: {exc}")
            return
        job.model_name, job.model_hash, job.preview = loaded.name, loaded.hash, loaded.preview
        if request.kind == "load":
            job._finish(DONE)
            return
        pipe = loaded.pipe
        params = request.params.replace(model=loaded.name, model_hash=loaded.hash)
        if not hasattr(pipe, "encode_prompt"):
            # unconditional (DDPM/DDIM): prompt, guidance and size do not apply, and the model's own scheduler is
            # used (their sampling loop has no scale_model_input, which the Euler-type samplers need)
            params = params.replace(prompt="", negative_prompt="", cfg_scale=None, width=None, height=None,
                                    denoising_strength=None, sampler=None, schedule_type=None, guidance_interval=None,
                                    deep_cache_interval=None, deep_cache_branch=None, freeu=None)
            if request.image is not None:
                job.error_kind = "input"
                job._finish(FAILED, f"model {loaded.name} is unconditional ({type(pipe).__name__}): it has no "
                                    "image-to-image or inpainting")
                return

        def on_step(step: int, total: int, latents) -> bool:
            if job._stop is not None:
                if job._stop_asked:  # the pipeline did not honour the request: leave the loop from here
                    raise _Stopped()
                job._stop_asked = True
                return True
            job.latents = latents.detach().clone() if isinstance(latents, torch.Tensor) else None
            job.step, job.steps = step, total  # after the latents: a step a viewer sees has its latents
            job.touch()
            return False

        try:
            prompt, lora_hashes = loaded.apply_loras(params.prompt, self.holder.registry)
        except (ValueError, LookupError) as exc:
            job.error_kind = "input"
            job._finish(FAILED, str(exc))
            return
        recorded = params
        if lora_hashes:
            recorded = params.replace(extra={**params.extra, "Lora hashes": ", ".join(
                f"{name}: {digest}" for name, digest in lora_hashes.items())})
        ti_hashes = loaded.embeddings_used(params.prompt, params.negative_prompt)
        if ti_hashes:  # as A1111 records the embeddings a prompt used
            recorded = recorded.replace(extra={**recorded.extra, "TI hashes": ", ".join(
                f"{name}: {digest}" for name, digest in ti_hashes.items())})
        params = params.replace(prompt=prompt)
        # A1111's prompt syntax ((emphasis:1.2), BREAK, long prompts) for the SD 1.x/2.x and SDXL families
        syntax = "a1111"
        base_seed = params.seed
        for index in range(request.n_iter):
            if job._stop is not None:
                break
            job.batch_index, job.step = index, 0
            job.touch()
            try:
                result = generate(pipe, params.replace(seed=base_seed + index * request.batch_size),
                                  batch_size=request.batch_size, image=request.image, mask=request.mask,
                                  on_step=on_step, prompt_syntax=syntax)
            except _Stopped:
                break
            except (ValueError, TypeError) as exc:
                job.error_kind = "input"
                job._finish(FAILED, str(exc))
                return
            if job._stop != CANCELLED:  # a cancelled job keeps nothing; an interrupted one keeps what it made
                # the prompt as written, LoRA tags included; "only masked" dropped where a blank mask ran img2img
                result.parameters = [recorded.replace(seed=p.seed, width=p.width, height=p.height, extra={
                    k: v for k, v in recorded.extra.items() if k not in ONLY_MASKED_KEYS or k in p.extra})
                    for p in result.parameters]
                self._collect(job, result)
        job._finish(job._stop or DONE)

    @staticmethod
    def _collect(job: Job, result) -> None:
        from .images import png_bytes

        for image, params in zip(result.images, result.parameters):
            job.parameters.append(params)
            job.pngs.append(png_bytes(image, params))
        job.touch()
