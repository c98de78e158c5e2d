"""diffusekit serve under load (loopback only, bounded in jobs and time): many clients queue jobs, some get 429
and retry, one disconnects mid-job (event stream and A1111 call), one interrupts mid-step, bad requests arrive
between good ones. Every accepted job must end done / interrupted / cancelled / failed, the server must keep
serving, and its memory must not grow from one round to the next. Figures go to stdout (run with -s)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
requests = pytest.importorskip("requests")

from serve_helpers import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
JOB = {"prompt": "a photo of a red dress", "steps": 3, "width": 32, "height": 32, "cfg_scale": 4,
       "sampler_name": "Euler a"}
ENDED = {"done", "interrupted", "cancelled", "failed"}
# uvicorn's loop + the worker + torch + anyio's thread pool for sync routes (at most 40, idle ones exit after 10 s)
MAX_THREADS = 40 + 16


@pytest.fixture(scope="module")
def server_process(tmp_path_factory):
    port = free_port()
    log = open(tmp_path_factory.mktemp("serve") / "server.log", "w+b")  # a pipe nobody reads would fill and block
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "diffusekit", "serve", "--port", str(port), "--queue-size", "6", "--max-body-mb", "1"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            status = requests.get(f"{url}/v1/status", timeout=5).json()
            if status["running"] is None and status["queued"] == 0 and status["completed"] >= 1:
                break  # the start-up model load is done
        except requests.ConnectionError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            log.seek(0)
            raise RuntimeError(f"server did not start:\n{log.read().decode(errors='replace')[-3000:]}")
        time.sleep(0.1)
    yield url, proc
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def _submit(url, body, retries=400):
    """POST a job, retrying while the queue is full (429); returns (response, number of 429s)."""
    refusals = 0
    for _ in range(retries):
        answer = requests.post(f"{url}/v1/jobs", json=body, timeout=30)
        if answer.status_code != 429:
            break
        refusals += 1
        time.sleep(0.05)
    return answer, refusals


def _client(url, results):
    """Queue one job (retrying on 429), follow it to its end; record (job id, state, seconds, 429s)."""
    started = time.monotonic()
    answer, refusals = _submit(url, {**JOB, "seed": len(results)})
    if answer.status_code != 202:
        results.append((None, f"http {answer.status_code}", time.monotonic() - started, refusals))
        return
    job_id = answer.json()["id"]
    while True:
        status = requests.get(f"{url}/v1/jobs/{job_id}", timeout=30).json()
        if status["state"] in ENDED:
            break
        time.sleep(0.05)
    results.append((job_id, status["state"], time.monotonic() - started, refusals))


def _disconnecting_stream(url, ids):
    job_id, _ = _submit(url, {**JOB, "steps": 20})
    if job_id.status_code == 202:
        ids.append(job_id.json()["id"])
        with requests.get(f"{url}/v1/jobs/{ids[-1]}/events", stream=True, timeout=30) as stream:
            next(stream.iter_lines())  # read the first event, then hang up


def _disconnecting_a1111(url):
    host, port = url.rsplit(":", 1)
    body = json.dumps({**JOB, "steps": 10}).encode()
    with socket.create_connection(("127.0.0.1", int(port)), timeout=10) as sock:
        sock.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        time.sleep(0.05)  # gone before the answer


def _bad_requests(url, codes):
    for body in ({**JOB, "width": 33}, {**JOB, "steps": 10**6}, {**JOB, "sampler_name": "nope"}, "not json"):
        data = body if isinstance(body, str) else json.dumps(body)
        codes.append(requests.post(f"{url}/v1/jobs", data=data, headers={"Content-Type": "application/json"},
                                   timeout=30).status_code)
    codes.append(requests.post(f"{url}/sdapi/v1/txt2img", data=b"x" * (1536 * 1024), timeout=60).status_code)


def _interrupter(url, flags):
    job, _ = _submit(url, {**JOB, "steps": 150, "width": 96, "height": 96})
    if job.status_code != 202:
        return
    job_id = job.json()["id"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        progress = requests.get(f"{url}/sdapi/v1/progress?skip_current_image=true", timeout=30).json()
        if progress["current_task"] == job_id and progress["state"]["sampling_step"] >= 1:
            requests.post(f"{url}/sdapi/v1/interrupt", timeout=30)
            break
        time.sleep(0.02)
    while True:
        status = requests.get(f"{url}/v1/jobs/{job_id}", timeout=30).json()
        if status["state"] in ENDED:
            flags.append((status["state"], status["step"]))
            return
        time.sleep(0.05)


def _round(url, clients):
    results, stream_ids, codes, interrupts = [], [], [], []
    threads = [threading.Thread(target=_client, args=(url, results)) for _ in range(clients)]
    threads += [threading.Thread(target=_disconnecting_stream, args=(url, stream_ids)),
                threading.Thread(target=_disconnecting_a1111, args=(url,)),
                threading.Thread(target=_bad_requests, args=(url, codes)),
                threading.Thread(target=_interrupter, args=(url, interrupts))]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads), "a client hung"
    return results, stream_ids, codes, interrupts, time.monotonic() - started


def _check_round(url, results, stream_ids, codes, interrupts, clients):
    assert len(results) == clients
    assert all(state == "done" for _, state, _, _ in results), results
    assert sorted(codes) == [413, 422, 422, 422, 422]
    for job_id in stream_ids:  # its client hung up; the job still ran to the end
        deadline = time.monotonic() + 60
        while (state := requests.get(f"{url}/v1/jobs/{job_id}", timeout=30).json()["state"]) not in ENDED:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert state == "done"
    assert stream_ids and interrupts and interrupts[0][0] == "interrupted" and interrupts[0][1] < 150


def _load(server_process, clients, rounds):
    url, proc = server_process
    figures = []
    for index in range(rounds):
        results, stream_ids, codes, interrupts, seconds = _round(url, clients)
        _check_round(url, results, stream_ids, codes, interrupts, clients)
        deadline = time.monotonic() + 60
        while (status := requests.get(f"{url}/v1/status", timeout=30).json())["running"] or status["queued"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        latencies = sorted(r[2] for r in results)
        figures.append({"round": index + 1, "clients": clients, "seconds": round(seconds, 2),
                        "jobs_per_s": round(clients / seconds, 2), "p50_s": round(latencies[len(latencies) // 2], 2),
                        "max_s": round(latencies[-1], 2), "refused_429": sum(r[3] for r in results),
                        "rss_mib": round(_rss_mib(proc.pid), 1), "threads": _threads(proc.pid)})
        print("load round", json.dumps(figures[-1]))
    assert requests.get(f"{url}/v1/models", timeout=30).status_code == 200  # still serving
    return figures


def test_bounded_load(server_process):
    figures = _load(server_process, clients=6, rounds=2)
    assert figures[-1]["rss_mib"] - figures[0]["rss_mib"] < 64  # flat (the first round warms the allocators)
    assert max(f["threads"] for f in figures) <= MAX_THREADS


@pytest.mark.slow
def test_longer_load(server_process):
    figures = _load(server_process, clients=40, rounds=4)
    assert figures[-1]["rss_mib"] - figures[1]["rss_mib"] < 64
    assert max(f["threads"] for f in figures) <= MAX_THREADS
