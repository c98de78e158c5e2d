"""The step savings (``guidance_interval``, DeepCache) and FreeU everywhere a request is made: the shared reader
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
FREEU = (0.9, 0.2, 1.5, 1.6)  # diffusers' example for SD 1.5, in enable_freeu's order (s1, s2, b1, b2)


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
    assert step_savings() == {"guidance_interval": None, "deep_cache_interval": None, "deep_cache_branch": None,
                              "freeu": None}
    assert step_savings([0.2, 0.8], [3, 1], [1, 0, 2, 1]) == {"guidance_interval": (0.2, 0.8), "deep_cache_interval": 3,
                                                              "deep_cache_branch": 1, "freeu": (1.0, 0.0, 2.0, 1.0)}
    assert step_savings(deep_cache=2)["deep_cache_branch"] == 0
    assert step_savings(freeu={"b2": 1.6, "b1": 1.5, "s2": 0.2, "s1": 0.9})["freeu"] == FREEU
    for bad in ({"guidance_interval": [0.8, 0.2]}, {"guidance_interval": [0.5]}, {"deep_cache": 0},
                {"deep_cache": [2, -1]}, {"deep_cache": True}, {"deep_cache": "3"}, {"deep_cache": [1, 2, 3]}):
        with pytest.raises(ValueError, match="guidance_interval|cache_interval|cache_branch_id|deep_cache"):
            step_savings(**bad)
    for bad, words in (([0.9, 0.2, 1.5], r"four factors \[s1, s2, b1, b2\]"), ("0.9 0.2 1.5 1.6", "four factors"),
                       ([0.9, 0.2, True, 1.6], "freeu b1 must be a finite number"),
                       ([0.9, float("nan"), 1.5, 1.6], "freeu s2 must be a finite number"),
                       ({"s1": 1, "s2": 1, "b1": 1}, "exactly the keys s1, s2, b1, b2")):
        with pytest.raises(ValueError, match=words):
            step_savings(freeu=bad)


def test_infotext_round_trip():
    params = GenerationParameters(prompt="a", steps=20, cfg_scale=4, seed=3, **SAVINGS, freeu=FREEU)
    text = params.to_infotext()
    assert "Guidance interval: 0.2-0.8, Deep cache interval: 2, Deep cache branch: 1, " \
           "FreeU: b1=1.5 b2=1.6 s1=0.9 s2=0.2" in text
    assert GenerationParameters.from_infotext(text) == params
    plain = GenerationParameters(prompt="a", steps=2, seed=1).to_infotext()
    assert "Guidance" not in plain and "FreeU" not in plain  # only when used
    with pytest.raises(ValueError, match="'Guidance interval' should be lo-hi"):
        GenerationParameters.from_infotext("a\nSteps: 2, Seed: 1, Guidance interval: most")
    # SD.Next writes the same key and shape (b1 first); any order reads
    assert GenerationParameters.from_infotext("a\nSteps: 2, Seed: 1, FreeU: s2=0.2 b2=1.6 s1=0.9 b1=1.5").freeu == FREEU
    # other shapes under the key (the sd-webui-freeu extension's JSON, broken text) stay text, written back as read,
    # and a typed value replaces them rather than being written beside them
    extension = json.dumps(json.dumps({"backbone_factors": [1.2, 1.4], "skip_factors": [0.9, 0.2]}))
    for bad in ("s1=0.9 s2=0.2 b1=1.5", "s1=0.9 s2=0.2 b1=1.5 b1=1.6", "s1=0.9 s2=0.2 b1=1.5 b2=big", extension):
        text = f"a\nSteps: 2, Seed: 1, FreeU: {bad}"
        params = GenerationParameters.from_infotext(text)
        assert params.freeu is None and params.extra["FreeU"] == (json.loads(bad) if bad == extension else bad)
        assert params.to_infotext() == text
        assert params.replace(freeu=FREEU).to_infotext() == "a\nSteps: 2, Seed: 1, FreeU: b1=1.5 b2=1.6 s1=0.9 s2=0.2"


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


def test_generate_applies_freeu_for_the_call_only(sd_pipe):
    params = GenerationParameters(prompt=PROMPT, steps=4, cfg_scale=4, seed=9, width=32, height=32, freeu=FREEU)
    result = generate(sd_pipe, params)
    assert sd_pipe.unet.up_blocks[0].b1 is None  # the pipeline's own setting (off) is back
    assert result.parameters[0] == params
    sd_pipe.enable_freeu(*FREEU)
    try:
        direct = _direct(sd_pipe, 9)
        # a pipeline's own enable_freeu holds for requests without factors, and is recorded; a request's own
        # factors win for its call, and the pipeline's are restored after it
        own = generate(sd_pipe, params.replace(freeu=None))
        other = generate(sd_pipe, params.replace(freeu=(1.0, 1.0, 1.0, 1.0)))
        assert sd_pipe.unet.up_blocks[1].s2 == 0.2
    finally:
        sd_pipe.disable_freeu()
    np.testing.assert_array_equal(_pixels(result.images[0]), _pixels(direct))
    np.testing.assert_array_equal(_pixels(own.images[0]), _pixels(direct))
    assert own.parameters[0].freeu == FREEU
    plain = generate(sd_pipe, params.replace(freeu=None))
    assert plain.parameters[0].freeu is None
    assert not np.array_equal(_pixels(plain.images[0]), _pixels(direct))
    # factors of 1 leave every feature as it is: FreeU at (1, 1, 1, 1) is the plain image to float32 rounding
    assert np.abs(_pixels(other.images[0]) - _pixels(plain.images[0])).max() <= 1


def test_cli_from_png_of_another_tools_freeu_makes_the_image_without_it(tmp_path, capsys):
    from diffusekit.infotext import save_png

    out = tmp_path / "plain.png"
    args = ["--steps", "2", "--width", "32", "--height", "32", "--seed", "3", "--num-images", "1"]
    assert main(["generate", SD, "--prompt", PROMPT, *args, "--out", str(out)]) == 0
    params = GenerationParameters.from_infotext(read_parameters(out))
    extension = json.dumps({"backbone_factors": [1.2, 1.4], "skip_factors": [0.9, 0.2]})  # sd-webui-freeu's shape
    with Image.open(out) as image:
        save_png(image, tmp_path / "other.png", params.replace(extra={**params.extra, "FreeU": extension}))
    again = tmp_path / "again.png"
    capsys.readouterr()
    assert main(["generate", "--from-png", str(tmp_path / "other.png"), "--out", str(again)]) == 0
    assert "is not diffusers' four factors" in capsys.readouterr().err
    assert "FreeU" not in read_parameters(again)
    with Image.open(out) as a, Image.open(again) as b:
        np.testing.assert_array_equal(_pixels(a), _pixels(b))


def test_generate_refuses_freeu_without_a_conditional_unet():
    from diffusekit import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained("diffusekit-fashion-ddpm")
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="FreeU is not available for UNet2DModel"):
        generate(pipe, GenerationParameters(steps=2, seed=1, freeu=FREEU))


def test_cli_generate_flags_and_from_png(tmp_path, capsys):
    out = tmp_path / "a.png"
    assert main(["generate", SD, "--prompt", PROMPT, "--steps", "4", "--width", "32", "--height", "32",
                 "--guidance-scale", "4", "--seed", "9", "--num-images", "1", "--prompt-syntax", "plain",
                 "--guidance-interval", "0.2", "0.8", "--deep-cache", "2", "1", "--freeu", "0.9", "0.2", "1.5", "1.6",
                 "--out", str(out)]) == 0
    params = GenerationParameters.from_infotext(read_parameters(out))
    assert (params.guidance_interval, params.deep_cache_interval, params.deep_cache_branch) == ((0.2, 0.8), 2, 1)
    assert params.freeu == FREEU
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(out), "--out", str(again)]) == 0
    with Image.open(out) as a, Image.open(again) as b:
        np.testing.assert_array_equal(_pixels(a), _pixels(b))
    off = tmp_path / "off.png"  # a flag overrides the PNG: interval 1 runs every step in full
    assert main(["generate", "--from-png", str(out), "--deep-cache", "1", "--out", str(off)]) == 0
    assert GenerationParameters.from_infotext(read_parameters(off)).deep_cache_interval == 1
    for flags, words in ((["--deep-cache", "0"], "cache_interval"), (["--deep-cache", "2", "1", "3"], "BRANCH"),
                         (["--guidance-interval", "0.9", "0.1"], "guidance_interval"),
                         (["--deep-cache", "2", "40"], "cache_branch_id must be below 4"),
                         (["--freeu", "1", "1", "1", "nan"], "freeu b2 must be a finite number")):
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
                "sampler_name": "DDIM", "guidance_interval": [0.2, 0.8], "deep_cache": [2, 1], "freeu": list(FREEU)}
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
        ddim.enable_freeu(*FREEU)
        try:
            direct = _direct(ddim, 9, guidance_interval=(0.2, 0.8), deep_cache=(2, 1))
        finally:
            ddim.disable_freeu()
        np.testing.assert_array_equal(got, _pixels(direct))
        params = GenerationParameters.from_infotext(text)
        assert (params.guidance_interval, params.deep_cache_interval, params.deep_cache_branch) == ((0.2, 0.8), 2, 1)
        assert params.freeu == FREEU
        assert json.loads(answer.json()["info"])["infotexts"] == [text]
        for bad, words in (({"deep_cache": 0}, "cache_interval"), ({"guidance_interval": [1, 0]}, "guidance_interval"),
                           ({"deep_cache": [2, 99]}, "cache_branch_id must be below 4"),
                           ({"freeu": [1, 2]}, "four factors [s1, s2, b1, b2]"),
                           ({"freeu": ["0.9", 0.2, 1.5, 1.6]}, "freeu s1 must be a finite number")):
            answer = requests.post(f"{url}/sdapi/v1/txt2img", json={**body, **bad}, timeout=120)
            assert answer.status_code == 422 and words in answer.text, answer.text
        job = requests.post(f"{url}/v1/jobs", json={**body, "deep_cache": 3}, timeout=60)  # the job API too
        assert job.status_code == 202, job.text
        bad = requests.post(f"{url}/v1/jobs", json={**body, "freeu": {"s1": 1}}, timeout=60)
        assert bad.status_code == 422 and "exactly the keys" in bad.text, bad.text


def test_batch_job_keys(tmp_path):
    from diffusekit.batch import BatchConfig, JobDefaults, load_jobs, run_batch

    jobs = tmp_path / "jobs.jsonl"
    lines = [{"id": "a", "prompt": PROMPT, "seed": 9, "steps": 4, "width": 32, "height": 32, "guidance_scale": 4,
              "guidance_interval": [0.2, 0.8], "deep_cache": [2, 1], "freeu": list(FREEU)},
             {"id": "b", "prompt": PROMPT, "seed": 9, "steps": 4, "width": 32, "height": 32, "guidance_scale": 4},
             {"id": "c", "prompt": PROMPT, "deep_cache": "fast"},
             {"id": "d", "prompt": PROMPT, "freeu": [0.9, 0.2]}]
    jobs.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    valid, invalid = load_jobs(jobs, JobDefaults(deep_cache=3))
    assert [j.id for j in valid] == ["a", "b"] and len(invalid) == 2 and "deep_cache" in invalid[0].error
    assert "four factors" in invalid[1].error
    assert valid[1].params.deep_cache_interval == 3  # the command line's default
    assert valid[0].batch_key() != valid[1].batch_key()
    out = tmp_path / "out"
    run_batch(BatchConfig(jobs, SD, out, progress=False), log=lambda message: None)
    params = GenerationParameters.from_infotext(read_parameters(out / "a.png"))
    assert (params.guidance_interval, params.deep_cache_interval, params.deep_cache_branch) == ((0.2, 0.8), 2, 1)
    assert params.freeu == FREEU
    assert "Deep cache" not in read_parameters(out / "b.png") and "FreeU" not in read_parameters(out / "b.png")
