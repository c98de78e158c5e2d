"""Batches on a Ray cluster: Ray Data ``map_batches`` over an actor pool, each actor holding one loaded pipeline.

Each row of the dataset is one planned batch of jobs (JSON), so Ray Data never re-groups jobs: the batches are the
ones the local run forms, and the images are identical. Actors (``concurrency=workers``; ``num_gpus=1`` gives one
actor per GPU) load the pipeline once and return PNG bytes; the driver writes files and the manifest.

Fault tolerance is Ray Data's: actor-pool operators run with ``max_restarts=-1`` and ``max_task_retries=-1``, so a
batch whose actor dies is retried on a restarted actor. The output of a retried batch reaches the driver once; the
driver also writes each job at most once per run, so a retry can never duplicate a manifest line.

Ray is optional (``pip install 'diffusekit[ray]'``) and imported only here, when ``--ray`` is used.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

from .jobs import Job
from .worker import RESULT_FIELDS

__all__ = ["import_ray", "ray_results"]

RAY_HINT = "pip install 'diffusekit[ray]'"


def import_ray():
    """``ray`` with Ray Data, or an ImportError that says how to get it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as error:
        raise ImportError(f"--ray needs Ray with Ray Data, which is not installed ({error}): {RAY_HINT}") from None
    return ray


class _RayBatchActor:
    """The callable class Ray Data instantiates once per actor: one pipeline per actor, one planned batch per call."""

    def __init__(self, worker_cls, **kwargs):
        self.worker = worker_cls(**kwargs)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        rows: list[dict[str, Any]] = []
        for payload in batch["jobs"]:
            rows.extend(self.worker.run([Job.from_dict(job) for job in json.loads(payload)]))
        return {field: [row[field] for row in rows] for field in RESULT_FIELDS}


def ray_results(batches: list[list[Job]], config, worker_cls) -> Iterator[list[dict[str, Any]]]:
    ray = import_ray()
    if not ray.is_initialized():
        ray.init(address=config.ray_address, log_to_driver=False)
    items = [{"jobs": json.dumps([job.to_dict() for job in batch])} for batch in batches]
    dataset = ray.data.from_items(items, override_num_blocks=len(items))  # a block per batch: spread over actors
    options: dict[str, Any] = {"num_cpus": config.cpus_per_worker}
    if config.gpus_per_worker:
        options["num_gpus"] = config.gpus_per_worker
    dataset = dataset.map_batches(
        _RayBatchActor, batch_size=1, compute=ray.data.ActorPoolStrategy(size=config.workers), zero_copy_batch=True,
        fn_constructor_kwargs={"worker_cls": worker_cls, **config.worker_kwargs()}, **options)
    for row in dataset.iter_rows():
        yield [{field: row[field] for field in RESULT_FIELDS}]
