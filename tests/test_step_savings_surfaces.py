"""The step savings (``guidance_interval``, DeepCache) everywhere a request is made: the shared reader
(``generation.step_savings``), ``generate()``, the A1111 infotext (round trip, ``--from-png`` remakes the pixels),
``diffusekit generate`` flags, ``diffusekit serve`` (a real HTTP request) and ``diffusekit batch`` job keys."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffusekit.__main__ import main
from diffusekit.generation import generate, step_savings
from diffusekit.infotext import GenerationParameters, read_parameters

SD = "diffusekit-fashion-sd"
PROMPT = "a photo of a red dress"
SAVINGS = {"guidance_interval": (0.2, 0.8), "deep_cache_interval": 2, "deep_cache_branch": 1}


@pytest.fixture(scope="module")
def sd_pipe():
    from diffusekit import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(SD)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _direct(pipe, seed: int, **kwargs):
    """The pipeline called directly (the model's own scheduler), 4 steps, 32x32, CFG 4."""
    return pipe(PROMPT, num_inference_steps=4, guidance_scale=4.0, height=32, width=32,
                generator=[torch.Generator("cpu").manual_seed(seed)], **kwargs).images[0]


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_reader_checks_and_normalises():
    assert step_savings() == {"guidance_interval": None, "deep_cache_interval": None, "deep_cache_branch": None}
    assert step_savings([0.2, 0.8], [3, 1]) == {"guidance_interval": (0.2, 0.8), "deep_cache_interval": 3,
                                                "deep_cache_branch": 1}
    assert step_savings(deep_cache=2)["deep_cache_branch"] == 0
    for bad in ({"guidance_interval": [0.8, 0.2]}, {"guidance_interval": [0.5]}, {"deep_cache": 0},
                {"deep_cache": [2, -1]}, {"deep_cache": True}, {"deep_cache": "3"}, {"deep_cache": [1, 2, 3]}):
        with pytest.raises(ValueError, match="guidance_interval|cache_interval|cache_branch_id|deep_cache"):
            step_savings(**bad)


def test_infotext_round_trip():
    params = GenerationParameters(prompt="a", steps=20, cfg_scale=4, seed=3, **SAVINGS)
    text = params.to_infotext()
    assert "Guidance interval: 0.2-0.8, Deep cache interval: 2, Deep cache branch: 1" in text
    assert GenerationParameters.from_infotext(text) == params
    assert "Guidance" not in GenerationParameters(prompt="a", steps=2, seed=1).to_infotext()  # only when used
    with pytest.raises(ValueError, match="'Guidance interval' should be lo-hi"):
        GenerationParameters.from_infotext("a\nSteps: 2, Seed: 1, Guidance interval: most")


def test_generate_runs_and_records_them(sd_pipe):
    params = GenerationParameters(prompt=PROMPT, steps=4, cfg_scale=4, seed=9, width=32, height=32, **SAVINGS)
    result = generate(sd_pipe, params)
    direct = _direct(sd_pipe, 9, guidance_interval=(0.2, 0.8), deep_cache=(2, 1))
    np.testing.assert_array_equal(_pixels(result.images[0]), _pixels(direct))
    assert result.parameters[0] == params
    plain = generate(sd_pipe, params.replace(guidance_interval=None, deep_cache_interval=None, deep_cache_branch=None))
    assert not np.array_equal(_pixels(plain.images[0]), _pixels(direct))
    # a pipeline's own enable_deep_cache setting holds for requests without one (a sampler's from_pipe too), and is
    # recorded
    sd_pipe.enable_deep_cache(cache_interval=3)
    try:
        bare = params.replace(guidance_interval=None, deep_cache_interval=None, deep_cache_branch=None,
                              sampler="Euler")
        result = generate(sd_pipe, bare)
    finally:
        sd_pipe.disable_deep_cache()
    assert (result.parameters[0].deep_cache_interval, result.parameters[0].deep_cache_branch) == (3, 0)
    np.testing.assert_array_equal(_pixels(result.images[0]),
                                  _pixels(generate(sd_pipe, bare.replace(deep_cache_interval=3)).images[0]))


def test_cli_generate_flags_and_from_png(tmp_path, capsys):
    out = tmp_path / "a.png"
    assert main(["generate", SD, "--prompt", PROMPT, "--steps", "4", "--width", "32", "--height", "32",
                 "--guidance-scale", "4", "--seed", "9", "--num-images", "1", "--prompt-syntax", "plain",
                 "--guidance-interval", "0.2", "0.8", "--deep-cache", "2", "1", "--out", str(out)]) == 0
    params = GenerationParameters.from_infotext(read_parameters(out))
    assert (params.guidance_interval, params.deep_cache_interval, params.deep_cache_branch) == ((0.2, 0.8), 2, 1)
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(out), "--out", str(again)]) == 0
    with Image.open(out) as a, Image.open(again) as b:
        np.testing.assert_array_equal(_pixels(a), _pixels(b))
    off = tmp_path / "off.png"  # a flag overrides the PNG: interval 1 runs every step in full
    assert main(["generate", "--from-png", str(out), "--deep-cache", "1", "--out", str(off)]) == 0
    assert GenerationParameters.from_infotext(read_parameters(off)).deep_cache_interval == 1
    for flags, words in ((["--deep-cache", "0"], "cache_interval"), (["--deep-cache", "2", "1", "3"], "BRANCH"),
                         (["--guidance-interval", "0.9", "0.1"], "guidance_interval"),
                         (["--deep-cache", "2", "40"], "cache_branch_id must be below 4")):
        with pytest.raises(SystemExit, match=words):
            main(["generate", SD, "--prompt", "x", "--steps", "2", "--width", "32", "--height", "32",
                  "--num-images", "1", *flags, "--out", str(tmp_path / "bad.png")])


def test_serve_request_fields(sd_pipe):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    requests = pytest.importorskip("requests")
    from serve_helpers import running_server, wait_idle

    with running_server(default_model=SD) as (url, app):
        wait_idle(app)
        body = {"prompt": PROMPT, "seed": 9, "steps": 4, "width": 32, "height": 32, "cfg_scale": 4,
                "sampler_name": "DDIM", "guidance_interval": [0.2, 0.8], "deep_cache": [2, 1]}
        answer = requests.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=120)
        assert answer.status_code == 200, answer.text
        import base64
        import io

        with Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0]))) as image:
            text = image.info["parameters"]
            got = _pixels(image)
        from diffusekit import DDIMScheduler, StableDiffusionPipeline

        ddim = StableDiffusionPipeline.from_pipe(sd_pipe, scheduler=DDIMScheduler.from_config(sd_pipe.scheduler.config))
        ddim.set_progress_bar_config(disable=True)
        np.testing.assert_array_equal(got, _pixels(_direct(ddim, 9, guidance_interval=(0.2, 0.8), deep_cache=(2, 1))))
        params = GenerationParameters.from_infotext(text)
        assert (params.guidance_interval, params.deep_cache_interval, params.deep_cache_branch) == ((0.2, 0.8), 2, 1)
        assert json.loads(answer.json()["info"])["infotexts"] == [text]
        for bad, words in (({"deep_cache": 0}, "cache_interval"), ({"guidance_interval": [1, 0]}, "guidance_interval"),
                           ({"deep_cache": [2, 99]}, "cache_branch_id must be below 4")):
            answer = requests.post(f"{url}/sdapi/v1/txt2img", json={**body, **bad}, timeout=120)
            assert answer.status_code == 422 and words in answer.text, answer.text
        job = requests.post(f"{url}/v1/jobs", json={**body, "deep_cache": 3}, timeout=60)  # the job API too
        assert job.status_code == 202, job.text


def test_batch_job_keys(tmp_path):
    from diffusekit.batch import BatchConfig, JobDefaults, load_jobs, run_batch

    jobs = tmp_path / "jobs.jsonl"
    lines = [{"id": "a", "prompt": PROMPT, "seed": 9, "steps": 4, "width": 32, "height": 32, "guidance_scale": 4,
              "guidance_interval": [0.2, 0.8], "deep_cache": [2, 1]},
             {"id": "b", "prompt": PROMPT, "seed": 9, "steps": 4, "width": 32, "height": 32, "guidance_scale": 4},
             {"id": "c", "prompt": PROMPT, "deep_cache": "fast"}]
    jobs.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    valid, invalid = load_jobs(jobs, JobDefaults(deep_cache=3))
    assert [j.id for j in valid] == ["a", "b"] and len(invalid) == 1 and "deep_cache" in invalid[0].error
    assert valid[1].params.deep_cache_interval == 3  # the command line's default
    assert valid[0].batch_key() != valid[1].batch_key()
    out = tmp_path / "out"
    run_batch(BatchConfig(jobs, SD, out, progress=False), log=lambda message: None)
    params = GenerationParameters.from_infotext(read_parameters(out / "a.png"))
    assert (params.guidance_interval, params.deep_cache_interval, params.deep_cache_branch) == ((0.2, 0.8), 2, 1)
    assert "Deep cache" not in read_parameters(out / "b.png")
