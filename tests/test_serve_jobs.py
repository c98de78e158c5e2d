"""diffusekit serve, job API: queue, server-sent events with previews, images, cancel, bounded queue (429)."""

from __future__ import annotations

import base64
import io
import json
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
requests = pytest.importorskip("requests")

from serve_helpers import running_server, wait_idle  # noqa: E402

SD = "diffusekit-fashion-sd"
SLOW_JOB = {"prompt": "a photo of a bag", "steps": 150, "width": 96, "height": 96, "cfg_scale": 4, "seed": 1,
            "sampler_name": "Euler"}


@pytest.fixture(scope="module")
def server():
    with running_server(queue_size=1) as (url, app):
        wait_idle(app)
        yield url, app


def sse_events(response):
    """(event, data) pairs of a text/event-stream response, as they arrive."""
    name, data = None, []
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif line == "" and name:
            yield name, json.loads("\n".join(data))
            name, data = None, []


def _wait_state(url, job_id, states, timeout=120):
    deadline = time.monotonic() + timeout
    while True:
        status = requests.get(f"{url}/v1/jobs/{job_id}", timeout=30).json()
        if status["state"] in states or time.monotonic() > deadline:
            return status
        time.sleep(0.05)


def test_job_stream_previews_and_images_equal_the_library_output(server):
    import torch
    from PIL import Image

    from diffusekit import DiffusionPipeline, get_scheduler

    url, app = server
    wait_idle(app)
    body = {"prompt": "a photo of a green sneaker", "steps": 6, "width": 32, "height": 32, "cfg_scale": 4,
            "seed": 42, "sampler_name": "DPM++ 2M", "batch_size": 2}
    answer = requests.post(f"{url}/v1/jobs", json=body, timeout=30)
    assert answer.status_code == 202
    job_id = answer.json()["id"]
    steps, previews = [], []
    with requests.get(f"{url}/v1/jobs/{job_id}/events", stream=True, timeout=60) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        for name, data in sse_events(stream):
            if name == "progress" and data["state"] == "running" and data["step"]:
                steps.append(data["step"])
                previews.append(data["preview"])
            if name == "done":
                final = data
                break
    assert final["state"] == "done" and final["seeds"] == [42, 43] and len(final["images"]) == 2
    assert steps and steps == sorted(steps) and max(steps) <= 6
    head, _, payload = previews[-1].partition(",")
    assert head == "data:image/png;base64"
    assert Image.open(io.BytesIO(base64.b64decode(payload))).size == (32, 32)

    pipe = DiffusionPipeline.from_pretrained(SD)
    pipe.scheduler = get_scheduler("DPM++ 2M", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    direct = pipe(prompt=[body["prompt"]] * 2, num_inference_steps=6, guidance_scale=4.0, height=32, width=32,
                  generator=[torch.Generator("cpu").manual_seed(s) for s in (42, 43)]).images
    for link, want, text in zip(final["images"], direct, final["infotexts"]):
        png = requests.get(f"{url}{link}", timeout=30)
        assert png.headers["content-type"] == "image/png"
        got = Image.open(io.BytesIO(png.content))
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        assert got.info["parameters"] == text
    assert requests.get(f"{url}/v1/jobs/{job_id}/images/2.png", timeout=30).status_code == 404
    assert requests.get(f"{url}/v1/jobs/nope", timeout=30).status_code == 404


def test_unconditional_model_streams_progress_and_previews(server):
    """DDPM / DDIM report every step (their step-callback extension), with a preview of the pixel-space sample."""
    import torch
    from PIL import Image

    from diffusekit import DiffusionPipeline

    url, app = server
    wait_idle(app)
    # the tiny DDPM runs in milliseconds: queue it behind a slow job and listen before it starts, with enough
    # steps that the stream (which samples the job's state every EVENT_POLL_S) sees it running
    slow = requests.post(f"{url}/v1/jobs", json=SLOW_JOB, timeout=30).json()["id"]
    assert _wait_state(url, slow, ("running",))["state"] == "running"
    body = {"model": "diffusekit-fashion-ddpm", "steps": 40, "seed": 5}
    job_id = requests.post(f"{url}/v1/jobs", json=body, timeout=30).json()["id"]
    steps, previews = [], []
    with requests.get(f"{url}/v1/jobs/{job_id}/events", stream=True, timeout=120) as stream:
        for name, data in sse_events(stream):
            if name == "progress" and data["state"] == "queued" and slow is not None:
                requests.delete(f"{url}/v1/jobs/{slow}", timeout=30)  # listening: let the DDPM run
                slow = None
            if name == "progress" and data["state"] == "running" and data["step"]:
                steps.append(data["step"])
                previews.append(data["preview"])
                assert data["steps"] == 40
            if name == "done":
                final = data
                break
    assert final["state"] == "done" and final["seeds"] == [5]
    assert steps and steps == sorted(steps) and set(steps) <= set(range(1, 41))
    head, _, payload = previews[-1].partition(",")
    assert head == "data:image/png;base64"
    preview = Image.open(io.BytesIO(base64.b64decode(payload)))
    pipe = DiffusionPipeline.from_pretrained("diffusekit-fashion-ddpm")
    pipe.set_progress_bar_config(disable=True)
    [direct] = pipe(num_inference_steps=40, generator=[torch.Generator("cpu").manual_seed(5)]).images
    assert preview.size == direct.size
    got = Image.open(io.BytesIO(requests.get(f"{url}{final['images'][0]}", timeout=30).content))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(direct))


def test_bounded_queue_cancel_waiting_and_running(server):
    url, app = server
    wait_idle(app)
    running = requests.post(f"{url}/v1/jobs", json=SLOW_JOB, timeout=30).json()["id"]
    assert _wait_state(url, running, ("running",))["state"] == "running"
    waiting = requests.post(f"{url}/v1/jobs", json=SLOW_JOB, timeout=30)
    assert waiting.status_code == 202 and waiting.json()["position"] == 0
    full = requests.post(f"{url}/v1/jobs", json=SLOW_JOB, timeout=30)  # queue_size=1: one may wait
    assert full.status_code == 429 and "queue is full" in full.json()["detail"] and full.headers["retry-after"]
    a1111 = requests.post(f"{url}/sdapi/v1/txt2img", json=SLOW_JOB, timeout=30)  # the same queue
    assert a1111.status_code == 429

    cancelled = requests.delete(f"{url}/v1/jobs/{waiting.json()['id']}", timeout=30).json()
    assert cancelled["cancelled"] and cancelled["state"] == "cancelled"
    assert requests.delete(f"{url}/v1/jobs/{running}", timeout=30).json()["cancelled"]
    status = _wait_state(url, running, ("cancelled", "done", "failed"))
    assert status["state"] == "cancelled" and status["step"] < 150 and status["images"] == []
    wait_idle(app)
    again = requests.post(f"{url}/v1/jobs", json={**SLOW_JOB, "steps": 2}, timeout=30).json()["id"]
    assert _wait_state(url, again, ("done", "failed"))["state"] == "done"  # the worker goes on after a cancel


def test_models_and_status_and_failed_job(server):
    url, app = server
    wait_idle(app)
    models = requests.get(f"{url}/v1/models", timeout=30).json()
    assert {m["name"] for m in models["models"]} == {SD, "diffusekit-fashion-ddpm"}
    assert models["default"] == SD and [m["name"] for m in models["models"] if m["loaded"]] == [SD]
    status = requests.get(f"{url}/v1/status", timeout=30).json()
    assert status["limits"]["queue_size"] == 1 and status["queued"] == 0
    bad_model = requests.post(f"{url}/v1/jobs", json={"prompt": "x", "model": "../x"}, timeout=30)
    assert bad_model.status_code == 422 and "unknown model" in bad_model.text
    # an unconditional model asked for image-to-image: accepted (the model is known), then failed with a reason
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buffer, format="PNG")
    job = requests.post(f"{url}/v1/jobs", json={"model": "diffusekit-fashion-ddpm", "steps": 2, "width": 32,
                                                "height": 32, "init_images": [base64.b64encode(buffer.getvalue())
                                                                              .decode()]}, timeout=30).json()
    failed = _wait_state(url, job["id"], ("done", "failed"))
    assert failed["state"] == "failed" and "unconditional" in failed["error"]
