"""``diffusekit batch``: many generation jobs from a JSON-lines file, locally or on a Ray cluster, resumably.

    from diffusekit.batch import BatchConfig, run_batch
    summary = run_batch(BatchConfig("jobs.jsonl", model="diffusekit-fashion-sd", out="out", batch_size=4))

Pieces: :mod:`.jobs` (parse and validate the file, plan the batches), :mod:`.worker` (a loaded pipeline that turns a
batch into PNG bytes), :mod:`.manifest` (atomic append-only record of finished jobs), :mod:`.runner` (the driver:
resume, dispatch, write), :mod:`.ray_runner` (the same batches on Ray Data's actor pool). See docs/BATCH.md.
"""

from .jobs import JOB_KEYS, InvalidLine, Job, JobDefaults, load_jobs, plan_batches
from .manifest import MANIFEST_NAME, ManifestWriter, done_ids, read_manifest
from .runner import BatchConfig, BatchInputError, BatchSummary, BatchWorkerError, run_batch
from .worker import BatchWorker

__all__ = ["JOB_KEYS", "MANIFEST_NAME", "BatchConfig", "BatchInputError", "BatchSummary", "BatchWorker",
           "BatchWorkerError", "InvalidLine", "Job", "JobDefaults", "ManifestWriter", "done_ids", "load_jobs",
           "plan_batches", "read_manifest", "run_batch"]
