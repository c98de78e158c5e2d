"""The worker: a loaded pipeline that turns one batch of jobs into encoded PNGs (the same code locally and on Ray).

A worker loads its pipeline once and keeps it for every batch it is given. It never writes output files: it
returns each image as PNG bytes (with the A1111 parameters chunk) and the driver writes them, so a worker that dies
half way and is retried cannot leave a file or a manifest line behind.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

from .jobs import Job

__all__ = ["BatchWorker", "RESULT_FIELDS"]

logger = logging.getLogger(__name__)

# one result row per job (the columns of Ray Data's output blocks)
RESULT_FIELDS = ("id", "png", "seed", "status", "error", "batch_s", "batch_images", "worker")


class BatchWorker:
    """``BatchWorker(model, device=, threads=, optimize=)(jobs) -> rows``: one result row per job (see
    :data:`RESULT_FIELDS`).

    ``threads`` sets torch's intra-op threads for this process (``None``: leave torch's default); ``optimize`` runs
    the pipeline on the compiled fast path (:func:`~diffusekit.generation.fast_path`).
    """

    def __init__(self, model: str, device: str = "cpu", threads: int | None = None, optimize: bool = False):
        import torch

        from ..generation import fast_path
        from ..pipelines.base import DiffusionPipeline

        if threads:
            torch.set_num_threads(threads)
        started = time.perf_counter()
        self.pipe = DiffusionPipeline.from_pretrained(model).to(device)
        self.pipe.set_progress_bar_config(disable=True)
        note = fast_path(self.pipe, optimize)
        if note:
            logger.warning("%s: %s", model, note)
        self.load_s = time.perf_counter() - started
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def run(self, jobs: list[Job]) -> list[dict[str, Any]]:
        from PIL import Image

        from ..generation import generate
        from ..infotext import png_bytes

        started = time.perf_counter()
        try:
            images = [Image.open(job.image) for job in jobs] if jobs[0].image else None
            masks = [Image.open(job.mask) for job in jobs] if jobs[0].mask else None
            result = generate(self.pipe, [job.params for job in jobs], image=images, mask=masks)
            encoded = [png_bytes(image, params) for image, params in zip(result.images, result.parameters)]
            error = None
        except Exception as exc:  # one bad batch must not end the run: its jobs are reported as failed
            encoded, error = [None] * len(jobs), f"{type(exc).__name__}: {exc}"
        seconds = time.perf_counter() - started
        return [{"id": job.id, "png": data, "seed": job.params.seed, "status": "failed" if error else "ok",
                 "error": error, "batch_s": round(seconds, 4), "batch_images": len(jobs), "worker": self.name}
                for job, data in zip(jobs, encoded)]

    __call__ = run
