"""diffusekit batch, locally: job validation, batch planning, multi-prompt generate(), manifest, resume, kill safety."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from diffusekit.batch import (BatchConfig, BatchInputError, BatchWorker, JobDefaults, ManifestWriter, load_jobs,
                              plan_batches, read_manifest, run_batch)
from diffusekit.infotext import GenerationParameters, read_parameters

MODEL = "diffusekit-fashion-sd"
PROMPTS = ["a photo of a red dress", "a photo of a blue ankle boot", "a photo of a green bag",
           "a photo of a purple sneaker"]


def write_jobs(path: Path, jobs: list, extra_lines: list[str] = ()) -> Path:
    lines = [json.dumps(job) for job in jobs] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def sample_jobs(count: int = 5, steps: int = 3) -> list[dict]:
    """Mixed jobs: two samplers, so planning forms groups; different prompts and seeds inside a group."""
    return [{"id": f"j{i}", "prompt": PROMPTS[i % 4], "seed": 100 + i, "steps": steps, "width": 32, "height": 32,
             "guidance_scale": 4, "sampler": "Euler a" if i % 3 else "DPM++ 2M"} for i in range(count)]


def png_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


# ---------------------------------------------------------------------------------------------- jobs file


def test_invalid_lines_are_reported_with_their_numbers(tmp_path):
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "in.png")
    Image.new("L", (16, 16)).save(tmp_path / "small-mask.png")
    good = {"id": "a", "prompt": "x", "seed": 1}
    lines = [
        json.dumps(good),                                         # 1 ok
        "{not json",                                              # 2
        json.dumps({"promt": "x"}),                               # 3 typo
        json.dumps({"id": "../escape", "prompt": "x"}),           # 4 id would leave the folder
        json.dumps({"id": "a", "prompt": "again"}),               # 5 repeated id
        json.dumps({"prompt": "x", "steps": "20"}),               # 6 wrong type
        json.dumps({"prompt": "x", "width": 30}),                 # 7 not a multiple of 8
        json.dumps({"prompt": "x", "image": "missing.png"}),      # 8 missing file
        json.dumps({"prompt": "x", "mask": "in.png"}),            # 9 mask without image
        json.dumps({"prompt": "x", "strength": 0.5}),             # 10 strength without image
        json.dumps({"prompt": "x", "sampler": "Eulr a"}),         # 11 unknown sampler
        json.dumps({"prompt": "x", "image": "in.png", "mask": "small-mask.png"}),  # 12 sizes differ
        json.dumps(["a list"]),                                   # 13 not an object
        "",                                                       # 14 blank: skipped, not invalid
        json.dumps({"prompt": "x", "image": "in.png", "strength": 0.5}),  # 15 ok (img2img)
    ]
    (tmp_path / "jobs.jsonl").write_text("\n".join(lines) + "\n")
    jobs, invalid = load_jobs(tmp_path / "jobs.jsonl")
    assert [job.line for job in jobs] == [1, 15]
    assert [bad.line for bad in invalid] == list(range(2, 14))
    messages = {bad.line: bad.error for bad in invalid}
    assert "not valid JSON" in messages[2]
    assert "did you mean 'prompt'" in messages[3]
    assert "names the output file" in messages[4]
    assert "already used on line 1" in messages[5]
    assert "'steps' must be an integer" in messages[6]
    assert "multiple of 8" in messages[7]
    assert "does not exist" in messages[8]
    assert "needs an 'image'" in messages[9]
    assert "'strength' applies" in messages[10]
    assert "'sampler'" in messages[11]
    assert "same size" in messages[12]
    assert jobs[1].task == "image-to-image" and jobs[1].image_size == (32, 32)
    assert jobs[1].image == str((tmp_path / "in.png").resolve()) and jobs[1].id == "line-000015"


def test_defaults_fill_missing_keys_and_seeds_are_fixed(tmp_path):
    path = write_jobs(tmp_path / "jobs.jsonl", [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y", "seed": 5,
                                                                            "steps": 9, "negative_prompt": "z"}])
    defaults = JobDefaults(negative_prompt="blurry", steps=7, guidance_scale=3.0, width=32, height=32,
                           sampler="Euler a")
    (a, b), invalid = load_jobs(path, defaults)
    assert not invalid
    assert (a.params.steps, a.params.negative_prompt, a.params.cfg_scale, a.params.sampler) == (7, "blurry", 3.0,
                                                                                                 "Euler a")
    assert (b.params.steps, b.params.negative_prompt, b.params.seed) == (9, "z", 5)
    again, _ = load_jobs(path, defaults)
    assert again[0].params.seed == a.params.seed  # derived from the id: the same on every run and machine
    assert load_jobs(path, JobDefaults(seed=42))[0][0].params.seed == 42


def test_batches_depend_only_on_the_job_list(tmp_path):
    jobs, _ = load_jobs(write_jobs(tmp_path / "jobs.jsonl", sample_jobs(7)))
    batches = plan_batches(jobs, 2)
    # DPM++ 2M: j0, j3, j6; Euler a: j1, j2, j4, j5 -> groups in order of first appearance, chunks of 2
    assert [[job.id for job in batch] for batch in batches] == [["j0", "j3"], ["j6"], ["j1", "j2"], ["j4", "j5"]]
    assert plan_batches(jobs, 2) == batches
    with pytest.raises(ValueError, match="batch_size"):
        plan_batches(jobs, 0)


# ---------------------------------------------------------------------------------------------- generate()


@pytest.fixture(scope="module")
def sd_pipe():
    from diffusekit import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(MODEL)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_generate_runs_several_prompts_in_one_batch(sd_pipe):
    from diffusekit.generation import generate

    base = GenerationParameters(steps=3, sampler="Euler a", cfg_scale=4.0, width=32, height=32)
    requests = [base.replace(prompt=PROMPTS[0], seed=5), base.replace(prompt=PROMPTS[1], seed=9,
                                                                      negative_prompt="blurry")]
    together = generate(sd_pipe, requests)
    assert [(p.prompt, p.seed) for p in together.parameters] == [(PROMPTS[0], 5), (PROMPTS[1], 9)]
    assert together.parameters[1].negative_prompt == "blurry"
    for request, image in zip(requests, together.images):
        alone = generate(sd_pipe, request).images[0]
        difference = np.abs(np.asarray(image, dtype=int) - np.asarray(alone, dtype=int)).max()
        assert difference <= 1  # same noise and prompt; batched convolutions may differ in the last bit
    swapped = generate(sd_pipe, requests[::-1])
    assert not np.array_equal(np.asarray(swapped.images[0]), np.asarray(together.images[0]))
    with pytest.raises(ValueError, match="differs from params\\[0\\] in steps"):
        generate(sd_pipe, [requests[0], requests[1].replace(steps=4)])
    with pytest.raises(ValueError, match="got 3 images for 2 requests"):
        generate(sd_pipe, requests, image=[None] * 3)


# ---------------------------------------------------------------------------------------------- manifest


def test_manifest_appends_whole_lines_after_a_torn_one(tmp_path):
    path = tmp_path / "manifest.jsonl"
    path.write_bytes(b'{"id": "a", "status": "ok", "file": "a.png"}\n{"id": "b", "sta')  # killed mid-line
    with ManifestWriter(path) as writer:
        writer.append({"id": "c", "status": "ok", "file": "c.png"})
    records, problems = read_manifest(path)
    assert sorted(records) == ["a", "c"]
    assert len(problems) == 1 and "line 2" in problems[0]


# ---------------------------------------------------------------------------------------------- local runs


def test_local_run_writes_pngs_and_manifest_and_resumes(tmp_path):
    jobs_file = write_jobs(tmp_path / "jobs.jsonl", sample_jobs(5), ["{broken"])
    out = tmp_path / "out"
    config = BatchConfig(jobs_file, MODEL, out, batch_size=2, progress=False)
    with pytest.raises(BatchInputError, match="line 6"):
        run_batch(BatchConfig(jobs_file, MODEL, out, strict=True, progress=False))
    assert not out.exists() or not list(out.glob("*.png"))  # --strict refuses before any work
    first = run_batch(config, log=lambda message: None)
    assert (first.done, first.failed, first.skipped, [bad.line for bad in first.invalid]) == (5, 0, 0, [6])
    files = png_files(out)
    assert sorted(files) == [f"j{i}.png" for i in range(5)]
    records, problems = read_manifest(out / "manifest.jsonl")
    assert not problems and sorted(records) == [f"j{i}" for i in range(5)]
    assert records["j1"]["status"] == "ok" and records["j1"]["seed"] == 101 and records["j1"]["file"] == "j1.png"
    assert set(records["j1"]["timings"]) == {"batch_s", "image_s", "write_s"}
    params = GenerationParameters.from_infotext(read_parameters(out / "j4.png"))
    assert (params.prompt, params.seed, params.steps, params.sampler) == (PROMPTS[0], 104, 3, "Euler a")

    again = run_batch(config, log=lambda message: None)  # everything done: nothing runs
    assert (again.done, again.skipped) == (0, 5)
    (out / "j2.png").unlink()  # a lost file is made again, identical (its batch re-runs with the same companions)
    (out / ".j3.png.x1.tmp").write_bytes(b"half")  # what a kill during a write leaves
    third = run_batch(config, log=lambda message: None)
    assert (third.done, third.skipped) == (1, 4)
    assert png_files(out) == files and not list(out.glob(".*.tmp"))
    lines = (out / "manifest.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines].count("j2") == 2 and len(lines) == 6


def test_image_to_image_and_inpainting_jobs_batch_with_their_own_images(tmp_path):
    from PIL import Image

    Image.new("RGB", (32, 32), "red").save(tmp_path / "red.png")
    Image.new("RGB", (32, 32), "blue").save(tmp_path / "blue.png")
    Image.new("L", (32, 32), 255).save(tmp_path / "mask.png")
    common = {"prompt": PROMPTS[0], "steps": 3, "guidance_scale": 4}
    jobs = [{"id": "r", "image": "red.png", "strength": 0.5, "seed": 1, **common},
            {"id": "b", "image": "blue.png", "strength": 0.5, "seed": 1, **common},
            {"id": "m", "image": "blue.png", "mask": "mask.png", "seed": 2, **common}]
    jobs_file = write_jobs(tmp_path / "jobs.jsonl", jobs)
    summary = run_batch(BatchConfig(jobs_file, MODEL, tmp_path / "out", batch_size=2, progress=False))
    assert (summary.done, summary.failed) == (3, 0)
    red, blue = (np.asarray(Image.open(tmp_path / "out" / name), dtype=float) for name in ("r.png", "b.png"))
    assert red[..., 0].mean() - red[..., 2].mean() > blue[..., 0].mean() - blue[..., 2].mean()  # own init image
    params = GenerationParameters.from_infotext(read_parameters(tmp_path / "out" / "r.png"))
    assert params.denoising_strength == 0.5


def test_failed_jobs_are_recorded_and_retried_by_the_next_run(tmp_path):
    class Failing(BatchWorker):
        def run(self, jobs):
            rows = super().run(jobs)
            if any(job.id == "j1" for job in jobs):
                for row in rows:
                    row.update(status="failed", error="RuntimeError: out of memory", png=None)
            return rows

    jobs_file = write_jobs(tmp_path / "jobs.jsonl", sample_jobs(3, steps=2))
    config = BatchConfig(jobs_file, MODEL, tmp_path / "out", batch_size=2, progress=False)
    logged = []
    first = run_batch(config, worker_cls=Failing, log=logged.append)
    assert (first.done, first.failed) == (1, 2) and any("'j1'" in line and "out of memory" in line for line in logged)
    records, _ = read_manifest(tmp_path / "out" / "manifest.jsonl")
    assert records["j1"]["status"] == "failed" and records["j1"]["file"] is None
    second = run_batch(config, log=lambda message: None)
    assert (second.done, second.failed, second.skipped) == (2, 0, 1)


class FakeWorker(BatchWorker):
    """No model: "PNG" bytes name the job. Its process exits (as if killed) when handed the batch of the job named
    by $BATCH_TEST_CRASH ("ID" every time, or "ID:MARKER" once: the marker file records that it happened)."""

    def __init__(self, **kwargs):
        self.name = f"fake:{os.getpid()}"

    def run(self, jobs):
        victim, _, marker = os.environ.get("BATCH_TEST_CRASH", "").partition(":")
        if any(job.id == victim for job in jobs) and not (marker and os.path.exists(marker)):
            if marker:
                open(marker, "w").close()
            os._exit(1)
        return [{"id": job.id, "png": f"png:{job.id}".encode(), "seed": job.params.seed, "status": "ok",
                 "error": None, "batch_s": 0.0, "batch_images": len(jobs), "worker": self.name} for job in jobs]


@pytest.mark.parametrize("once", [True, False], ids=["dies-once", "dies-every-time"])
def test_dead_local_worker_process_batch_is_retried_then_reported(tmp_path, monkeypatch, once):
    marker = tmp_path / "died"
    monkeypatch.setenv("BATCH_TEST_CRASH", f"j3:{marker}" if once else "j3")
    jobs_file = write_jobs(tmp_path / "jobs.jsonl", sample_jobs(6))
    out = tmp_path / "out"
    logged = []
    summary = run_batch(BatchConfig(jobs_file, MODEL, out, workers=2, progress=False), worker_cls=FakeWorker,
                        log=logged.append)
    ids = [json.loads(line)["id"] for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(ids) == [f"j{i}" for i in range(6)]  # every job once, whatever died
    records, _ = read_manifest(out / "manifest.jsonl")
    if once:
        assert marker.exists() and (summary.done, summary.failed) == (6, 0)
    else:
        assert (summary.done, summary.failed) == (5, 1)
        assert records["j3"]["status"] == "failed" and "died 2 times" in records["j3"]["error"]
    assert all((out / f"j{i}.png").read_bytes() == f"png:j{i}".encode() for i in range(6) if i != 3 or once)


def test_kill_mid_run_loses_no_image_and_leaves_no_partial_file(tmp_path):
    """SIGKILL a running `diffusekit batch`, resume it: the files equal an uninterrupted run's with 2 processes."""
    from PIL import Image

    jobs_file = write_jobs(tmp_path / "jobs.jsonl", sample_jobs(24, steps=3))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "diffusekit", "batch", str(jobs_file), "--model", MODEL, "--out", str(out),
               "--batch-size", "2", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                        os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = out / "manifest.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if manifest.exists() and manifest.read_bytes().count(b"\n") >= 3:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    records, problems = read_manifest(manifest)
    assert 3 <= len(records) < 24 and not problems
    for png in out.glob("*.png"):
        with Image.open(png) as image:
            image.load()  # every visible PNG is whole
    assert all((out / record["file"]).is_file() for record in records.values())
    resumed = run_batch(BatchConfig(jobs_file, MODEL, out, batch_size=2, progress=False, defaults=JobDefaults(
        model=MODEL)), log=lambda message: None)
    assert resumed.skipped == len(records) and resumed.done == 24 - len(records)
    final, _ = read_manifest(manifest)
    ids = [json.loads(line)["id"] for line in manifest.read_text().splitlines() if line.strip()]
    assert sorted(ids) == sorted(final) and len(final) == 24  # each job recorded once
    assert not list(out.glob(".*.tmp"))
    reference = tmp_path / "reference"
    run_batch(BatchConfig(jobs_file, MODEL, reference, batch_size=2, workers=2, progress=False,
                          defaults=JobDefaults(model=MODEL)), log=lambda message: None)
    assert png_files(out) == png_files(reference)


# ---------------------------------------------------------------------------------------------- command line


def test_cli_strict_and_missing_ray(tmp_path, monkeypatch, capsys):
    from diffusekit.__main__ import main

    jobs_file = write_jobs(tmp_path / "jobs.jsonl", sample_jobs(1), ["[1, 2]"])
    assert main(["batch", str(jobs_file), "--model", MODEL, "--out", str(tmp_path / "o"), "--strict"]) == 2
    assert "line 2: a job must be a JSON object" in capsys.readouterr().err
    assert main(["batch", str(jobs_file), "--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 2
    assert "could not start a worker with model" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    assert main(["batch", str(jobs_file), "--model", MODEL, "--out", str(tmp_path / "o"), "--ray"]) == 2
    assert "pip install 'diffusekit[ray]'" in capsys.readouterr().err
