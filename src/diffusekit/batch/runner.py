"""``run_batch``: jobs file -> PNGs + manifest, locally (in process or N processes) or on Ray, resumably.

The driver does everything that touches the output folder: it reads the jobs and the manifest, plans the batches
(:func:`~diffusekit.batch.jobs.plan_batches`), hands batches to workers, and writes each returned image (atomic
rename) and then its manifest record (one ``O_APPEND`` line). Workers only compute. So:

* a killed run leaves whole PNGs and whole manifest lines; a re-run skips every job whose latest record is ``ok``
  and whose file exists, and removes temporary files a kill left behind;
* a batch that a worker was running when it died is run again by another worker (Ray retries the task on a restarted
  actor; locally a new process pool runs the lost batches, one at a time); the driver writes each job once per run,
  so the manifest gets no duplicates;
* a batch with some jobs already done (a kill between two of its files) is run whole again, with the same
  companions, and only its missing files are written: every image is the one an uninterrupted run makes.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from .jobs import InvalidLine, Job, JobDefaults, load_jobs, plan_batches
from .manifest import MANIFEST_NAME, ManifestWriter, done_ids, read_manifest
from .worker import BatchWorker

__all__ = ["BatchConfig", "BatchInputError", "BatchSummary", "BatchWorkerError", "run_batch"]


class BatchInputError(ValueError):
    """The jobs file has invalid lines and ``strict`` is set (the message lists them)."""


@dataclasses.dataclass
class BatchConfig:
    jobs_file: str | os.PathLike
    model: str
    out: str | os.PathLike
    batch_size: int = 1
    workers: int = 1
    device: str = "cpu"
    ray: bool = False
    # None: $RAY_ADDRESS, else a running local cluster, else a new local instance (ray.init's rule); "local": always
    # a new instance; "auto", "HOST:6379", "ray://HOST:10001": that cluster
    ray_address: str | None = None
    cpus_per_worker: float = 1.0  # Ray: CPUs each actor reserves
    gpus_per_worker: float = 0.0  # Ray: GPUs each actor reserves (1 on a GPU cluster: one actor per GPU)
    # torch threads per worker, the same in every mode: CPU kernels give last-bit different results with 1 thread
    # and with several, so a fixed count keeps files identical whatever the number of workers. More cores: workers.
    threads: int = 1
    optimize: bool = False  # each worker runs pipe.optimize() on its pipeline (--optimize)
    strict: bool = False
    progress: bool = True
    defaults: JobDefaults = dataclasses.field(default_factory=JobDefaults)

    def worker_kwargs(self) -> dict[str, Any]:
        """What every worker is built with (``BatchWorker(**kwargs)``), locally, in processes and on Ray."""
        return {"model": self.model, "device": self.device, "threads": self.threads, "optimize": self.optimize}


@dataclasses.dataclass
class BatchSummary:
    jobs: int  # valid jobs in the file
    done: int  # images made by this run
    failed: int
    skipped: int  # already done by an earlier run
    invalid: list[InvalidLine]
    seconds: float  # from the first batch handed out to the last image written (model loading included)
    manifest_problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        return (f"done {self.done}, failed {self.failed}, skipped {self.skipped} (already done), invalid lines "
                f"{len(self.invalid)}; {self.seconds:.1f} s, {self.images_per_second:.2f} images/s")


class BatchWorkerError(RuntimeError):
    """A worker could not start (e.g. the model does not load), or worker processes keep dying."""


def _start_worker(worker_cls, kwargs: dict[str, Any]):
    try:
        return worker_cls(**kwargs)
    except Exception as error:
        raise BatchWorkerError(f"could not start a worker with model {kwargs.get('model')!r}: "
                               f"{type(error).__name__}: {error}") from error


def _local_results(batches: list[list[Job]], config: BatchConfig, worker_cls) -> Iterator[list[dict[str, Any]]]:
    worker = _start_worker(worker_cls, config.worker_kwargs())
    for batch in batches:
        yield worker.run(batch)


_PROCESS_WORKER: Any = None


def _init_process(worker_cls, kwargs):
    global _PROCESS_WORKER
    try:
        _PROCESS_WORKER = _start_worker(worker_cls, kwargs)
    except BatchWorkerError as error:  # reported by the first batch (an initializer that raises breaks the pool)
        _PROCESS_WORKER = error


def _run_in_process(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(_PROCESS_WORKER, BatchWorkerError):
        raise _PROCESS_WORKER
    return _PROCESS_WORKER.run([Job.from_dict(job) for job in jobs])


LOCAL_CRASHES_PER_BATCH = 2  # a batch that kills its worker process this often, running alone, is marked failed
LOCAL_FRUITLESS_POOLS = 5  # pools in a row that die before finishing any batch: give up


def _crashed_rows(batch: list[Job], crashes: int) -> list[dict[str, Any]]:
    error = (f"the worker process died {crashes} times while running this batch alone (killed, out of memory or a "
             "crash in native code); its jobs are marked failed, re-run to try again")
    return [{"id": job.id, "png": None, "seed": job.params.seed, "status": "failed", "error": error, "batch_s": 0.0,
             "batch_images": len(batch), "worker": "local"} for job in batch]


def _process_results(batches: list[list[Job]], config: BatchConfig, worker_cls) -> Iterator[list[dict[str, Any]]]:
    """``config.workers`` local processes, each with its own pipeline; at most two batches queued per worker.

    A worker process that dies breaks the pool: a new pool is started and the batches that were in flight are run
    again, one at a time (so the one that kills its worker is known); a batch that kills its worker
    :data:`LOCAL_CRASHES_PER_BATCH` times alone is reported failed and the run goes on. After
    :data:`LOCAL_FRUITLESS_POOLS` pools in a row die without finishing a batch the run stops (resumable).
    """
    import collections
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    kwargs = config.worker_kwargs()
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch thread pools
    queue = collections.deque(enumerate(batches))
    suspects: set[int] = set()  # batches in flight when a worker died: each runs alone until it completes
    crashes: collections.Counter = collections.Counter()
    fruitless = 0
    while queue:
        pool = ProcessPoolExecutor(config.workers, mp_context=context, initializer=_init_process,
                                   initargs=(worker_cls, kwargs))
        running: dict[Any, tuple[int, list[Job]]] = {}
        lost: list[tuple[int, list[Job]]] = []
        produced = broken = False
        try:
            while (queue or running) and not broken:
                while queue and len(running) < 2 * config.workers:
                    alone = queue[0][0] in suspects or any(index in suspects for index, _ in running.values())
                    if alone and running:
                        break
                    index, batch = queue.popleft()
                    try:
                        running[pool.submit(_run_in_process, [job.to_dict() for job in batch])] = (index, batch)
                    except BrokenProcessPool:
                        queue.appendleft((index, batch))
                        broken = True
                        break
                    if alone:
                        break
                if broken:
                    break
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    index, batch = running.pop(future)
                    try:
                        rows = future.result()
                    except BrokenProcessPool:
                        lost.append((index, batch))
                        broken = True
                        continue
                    suspects.discard(index)
                    produced = True
                    yield rows
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        for future, (index, batch) in running.items():  # finished before the pool broke, or died with it
            if future.done() and not future.cancelled() and future.exception() is None:
                suspects.discard(index)
                produced = True
                yield future.result()
            else:
                lost.append((index, batch))
        if not broken:
            continue
        fruitless = 0 if produced else fruitless + 1
        if fruitless >= LOCAL_FRUITLESS_POOLS:
            raise BatchWorkerError(f"{fruitless} worker pools in a row died before finishing any batch (out of "
                                   "memory while loading the model?); finished images are kept, re-run to resume")
        if len(lost) == 1 and lost[0][0] in suspects:  # it ran alone: it is the one that kills its worker
            index, batch = lost[0]
            crashes[index] += 1
            if crashes[index] >= LOCAL_CRASHES_PER_BATCH:
                suspects.discard(index)
                lost = []
                yield _crashed_rows(batch, crashes[index])
        suspects.update(index for index, _ in lost)
        queue.extendleft(sorted(lost, key=lambda item: item[0], reverse=True))


def _record(job: Job, row: dict[str, Any], batch_index: int, write_s: float) -> dict[str, Any]:
    ok = row["status"] == "ok"
    batch_s = float(row["batch_s"])
    return {
        "id": job.id, "file": job.file if ok else None, "seed": int(row["seed"]), "status": row["status"],
        "error": row["error"], "line": job.line, "batch": batch_index, "batch_images": int(row["batch_images"]),
        "timings": {"batch_s": round(batch_s, 4), "image_s": round(batch_s / max(1, int(row["batch_images"])), 4),
                    "write_s": round(write_s, 4)},
        "worker": row["worker"], "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _remove_stale_temporaries(out: Path) -> None:
    for stale in out.glob(".*.png.*.tmp"):  # atomic_path's temporaries of PNGs a killed run was writing
        stale.unlink(missing_ok=True)


def run_batch(config: BatchConfig, *, worker_cls=BatchWorker, log: Callable[[str], None] | None = None,
              results: Callable[..., Iterable[list[dict[str, Any]]]] | None = None) -> BatchSummary:
    """Run every job of ``config.jobs_file`` not done yet; return the counts. See the module docstring."""
    from .._io import atomic_path

    log = log or (lambda message: print(message, file=sys.stderr))
    if config.ray and results is None:
        from .ray_runner import import_ray, ray_results as results

        import_ray()  # before any work: a missing extra is said at once
    if not isinstance(config.batch_size, int) or config.batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {config.batch_size!r}")
    if not isinstance(config.workers, int) or config.workers < 1:
        raise ValueError(f"workers must be a positive int, got {config.workers!r}")
    if Path(config.model).exists():  # a local folder: the same folder for workers started elsewhere (shared FS)
        config = dataclasses.replace(config, model=str(Path(config.model).resolve()))
    jobs, invalid = load_jobs(config.jobs_file, config.defaults)
    for problem in invalid:
        log(f"{config.jobs_file}: {problem}")
    if invalid and config.strict:
        raise BatchInputError(f"{config.jobs_file}: {len(invalid)} invalid line(s), nothing run (--strict):\n"
                              + "\n".join(str(problem) for problem in invalid))
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(out)
    records, problems = read_manifest(out / MANIFEST_NAME)
    for problem in problems:
        log(problem)
    done = done_ids(out, records) & {job.id for job in jobs}
    batches = plan_batches(jobs, config.batch_size)
    todo = [(index, batch) for index, batch in enumerate(batches) if any(job.id not in done for job in batch)]
    pending = {job.id: (job, index) for index, batch in todo for job in batch if job.id not in done}
    summary = BatchSummary(len(jobs), 0, 0, len(done), invalid, 0.0, problems)
    if not todo:
        return summary
    if results is None:
        if config.workers > 1:
            results = _process_results
        else:
            results = _local_results
    bar = None
    if config.progress and not config.ray:  # on Ray, Ray Data's own progress (and dashboard) shows the run
        from tqdm.auto import tqdm

        bar = tqdm(total=len(pending), unit="image", desc="batch", file=sys.stderr)
    started = time.perf_counter()
    with ManifestWriter(out / MANIFEST_NAME) as manifest:
        for rows in results([batch for _, batch in todo], config, worker_cls):
            for row in rows:
                entry = pending.pop(row["id"], None)
                if entry is None:  # done before, or already written by this run (a retried batch): never twice
                    continue
                job, index = entry
                write_started = time.perf_counter()
                if row["status"] == "ok":
                    with atomic_path(out / job.file) as tmp:
                        tmp.write_bytes(row["png"])
                    summary.done += 1
                else:
                    summary.failed += 1
                    log(f"job {job.id!r} (line {job.line}) failed: {row['error']}")
                manifest.append(_record(job, row, index, time.perf_counter() - write_started))
                if bar is not None:
                    bar.update(1)
    summary.seconds = time.perf_counter() - started
    if bar is not None:
        bar.close()
    return summary
