"""diffusekit batch on Ray (local instance, 2 CPUs): same files as a local run with 1 or 2 actors; a dying actor's
batch is retried on another with no duplicate manifest lines. One Ray instance for the module (start-up costs)."""

from __future__ import annotations

import json
import os

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

from diffusekit.batch import BatchConfig, BatchWorker, read_manifest, run_batch  # noqa: E402

from test_batch import MODEL, png_files, sample_jobs, write_jobs  # noqa: E402


@pytest.fixture(scope="module")
def ray_instance():
    # address="local": always a new instance of our own; with no address Ray joins any instance already running on
    # the machine (another test run's), where num_cpus is refused
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=128 * 2**20, log_to_driver=False,
             configure_logging=False)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ray-jobs")
    jobs_file = write_jobs(folder / "jobs.jsonl", sample_jobs(6, steps=2))
    run_batch(BatchConfig(jobs_file, MODEL, folder / "local", batch_size=2, progress=False), log=lambda m: None)
    return jobs_file, png_files(folder / "local")


def test_ray_gives_the_same_files_as_a_local_run(ray_instance, local_reference, tmp_path):
    # one actor here; two actors (and a retry) in the next test, against the same local files
    jobs_file, reference = local_reference
    summary = run_batch(BatchConfig(jobs_file, MODEL, tmp_path / "out", batch_size=2, workers=1, ray=True),
                        log=lambda m: None)
    assert (summary.done, summary.failed) == (6, 0)
    assert png_files(tmp_path / "out") == reference and len(reference) == 6


def _crash_once_worker(marker: str, victim: str):
    """A worker class whose actor dies (the process exits) the first time it is handed ``victim``'s batch."""

    class CrashOnce(BatchWorker):  # defined in a function: Ray ships it by value to the actors
        def run(self, jobs):
            if any(job.id == victim for job in jobs) and not os.path.exists(marker):
                open(marker, "w").close()
                os._exit(1)  # as a killed or crashed worker process: no exception, no result
            return super().run(jobs)

    return CrashOnce


def test_dead_actor_batch_is_retried_without_duplicates(ray_instance, local_reference, tmp_path):
    jobs_file, reference = local_reference
    marker = tmp_path / "crashed"
    out = tmp_path / "out"
    summary = run_batch(BatchConfig(jobs_file, MODEL, out, batch_size=2, workers=2, ray=True),
                        worker_cls=_crash_once_worker(str(marker), "j3"), log=lambda m: None)
    assert marker.exists()  # an actor did die
    assert (summary.done, summary.failed) == (6, 0)
    ids = [json.loads(line)["id"] for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(ids) == sorted(f"j{i}" for i in range(6))  # every job once
    records, _ = read_manifest(out / "manifest.jsonl")
    assert all(record["status"] == "ok" for record in records.values())
    assert png_files(out) == reference  # 2 actors, one of them restarted: still the local run's files
