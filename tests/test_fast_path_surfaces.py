"""The CPU fast paths where users meet them: ``diffusekit quantize`` (an int8 folder the same as ``pipe.quantize``
+ ``save_pretrained`` writes), and ``--optimize`` on ``diffusekit generate`` (LoRAs fused first, so no hook keeps
the compiled code from serving), ``diffusekit serve`` and ``diffusekit batch`` (every worker). The default tests
record the ``optimize()`` call; the slow one compiles for real and compares pixels with eager."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffusekit import DiffusionPipeline
from diffusekit.__main__ import main
from diffusekit.aot_packages import has_hooks
from diffusekit.infotext import GenerationParameters, read_parameters

SD = "diffusekit-fashion-sd"
FAST = ["--steps", "2", "--width", "32", "--height", "32"]
CALIBRATION = ["--prompt", "a red dress", "--prompt", "a blue coat", *FAST]
# flags whose loss would change the tensors written (the library call below takes the same)
CALIBRATION_CHOICES = ["--seed", "3", "--guidance-scale", "4", "--observer", "average"]


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.fixture
def optimize_calls(monkeypatch):
    """Record ``pipe.optimize()`` (pipeline type, whether the UNet had hooks) instead of compiling."""
    calls = []

    def record(self, **kwargs):
        calls.append((type(self).__name__, has_hooks(self.unet)))
        return self

    monkeypatch.setattr(DiffusionPipeline, "optimize", record)
    return calls


@pytest.fixture(scope="module")
def int8_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "fashion-int8"
    assert main(["quantize", SD, str(out), *CALIBRATION, *CALIBRATION_CHOICES, "--vae"]) == 0
    return out


def test_quantize_writes_what_the_library_writes(int8_folder):
    pipe = DiffusionPipeline.from_pretrained(SD)
    pipe.set_progress_bar_config(disable=True)
    pipe.quantize(["a red dress", "a blue coat"], num_inference_steps=2, height=32, width=32, seed=3,
                  guidance_scale=4.0, observer="average", components=("unet", "vae"))
    loaded = DiffusionPipeline.from_pretrained(int8_folder)
    for name in ("unet", "vae"):
        config = json.loads((int8_folder / name / "config.json").read_text())
        assert config["quantization_config"]["quant_method"] == "diffusekit_int8"
        ours, theirs = loaded.components[name].state_dict(), pipe.components[name].state_dict()
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), f"{name}.{key}"
    assert "quantization_config" not in json.loads((int8_folder / "text_encoder" / "config.json").read_text())


def test_quantize_refusals(tmp_path, int8_folder):
    with pytest.raises(SystemExit, match="exists; choose another folder or pass --overwrite"):
        main(["quantize", SD, str(int8_folder), *CALIBRATION])
    with pytest.raises(SystemExit, match="is or holds MODEL"):
        main(["quantize", str(int8_folder), str(int8_folder), "--overwrite", *CALIBRATION])
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n  \n")
    with pytest.raises(SystemExit, match=r"--prompts-file .*prompts.txt: no prompts in it"):
        main(["quantize", SD, str(tmp_path / "out"), "--prompts-file", str(empty)])
    with pytest.raises(SystemExit, match="--steps must be at least 1"):
        main(["quantize", SD, str(tmp_path / "out"), "--steps", "0"])
    with pytest.raises(SystemExit, match="there is no single-file int8 format"):
        main(["quantize", SD, str(tmp_path / "out.safetensors")])
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match="file is a file; name a folder"):
        main(["quantize", SD, str(tmp_path / "file"), "--overwrite"])
    with pytest.raises(SystemExit, match="is or holds MODEL"):
        main(["quantize", str(int8_folder / "unet"), str(int8_folder), "--overwrite"])
    with pytest.raises(SystemExit, match=r"unconditional \(DDPMPipeline\): --prompt, --width do not apply"):
        main(["quantize", "diffusekit-fashion-ddpm", str(tmp_path / "out"), "--prompt", "a", "--width", "32"])
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.safetensors").exists()


def test_quantize_overwrite_replaces_the_whole_folder(tmp_path):
    out = tmp_path / "int8"
    out.mkdir()
    (out / "stale.txt").write_text("from before")
    assert main(["quantize", SD, str(out), *CALIBRATION, "--overwrite"]) == 0
    assert not (out / "stale.txt").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["int8"]
    assert "quantization_config" in json.loads((out / "unet" / "config.json").read_text())
    assert "quantization_config" not in json.loads((out / "vae" / "config.json").read_text())  # no --vae


def test_quantize_an_unconditional_model(tmp_path, capsys):
    out = tmp_path / "ddpm-int8"
    assert main(["quantize", "diffusekit-fashion-ddpm", str(out), "--steps", "2"]) == 0
    assert "calibrating on 8 seeded runs x 2 steps" in capsys.readouterr().err
    assert "quantization_config" in json.loads((out / "unet" / "config.json").read_text())


def test_quantize_prompts_file_adds_to_prompt(tmp_path):
    from diffusekit.cli.quantize import calibration_prompts

    listed = tmp_path / "prompts.txt"
    listed.write_text("a green hat\n\n a black boot \n")

    class Args:
        prompt = ["a red dress"]
        prompts_file = str(listed)

    assert calibration_prompts(Args) == ["a red dress", "a green hat", "a black boot"]
    Args.prompt, Args.prompts_file = None, None
    assert calibration_prompts(Args) is None  # the built-in set


def test_generate_optimize_and_the_int8_note(tmp_path, capsys, int8_folder, optimize_calls):
    args = ["generate", "--prompt", "a photo of a red dress", "--num-images", "1", *FAST]
    assert main([*args[:1], SD, *args[1:], "--optimize", "--out", str(tmp_path / "a.png")]) == 0
    assert optimize_calls == [("StableDiffusionPipeline", False)]
    assert "--optimize" not in capsys.readouterr().err
    assert main([*args[:1], str(int8_folder), *args[1:], "--out", str(tmp_path / "b.png")]) == 0
    assert "the unet and vae of this model are int8: without --optimize" in capsys.readouterr().err
    assert main([*args[:1], SD, *args[1:], "--out", str(tmp_path / "c.png")]) == 0
    assert capsys.readouterr().err == "" and len(optimize_calls) == 1


def _text_encoder_lora(path) -> None:
    """A kohya LoRA for the bundled text encoder's first query projection, strong enough to show in the image."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(1)
    name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    save_file({f"{name}.lora_down.weight": torch.randn(4, 32, generator=generator) * 2,
               f"{name}.lora_up.weight": torch.randn(32, 4, generator=generator) * 2,
               f"{name}.alpha": torch.tensor(4.0)}, path)


def test_generate_optimize_fuses_loras_first(tmp_path, optimize_calls):
    from serve_helpers import random_lora

    unet_lora, text_lora = tmp_path / "redder.safetensors", tmp_path / "wording.safetensors"
    random_lora(unet_lora)
    _text_encoder_lora(text_lora)
    args = ["generate", SD, "--prompt", "a photo of a red dress", "--num-images", "1", *FAST]
    loras = ["--lora", f"{unet_lora}:0.8", "--lora", str(text_lora)]
    assert main([*args, *loras, "--optimize", "--out", str(tmp_path / "fused.png")]) == 0
    assert optimize_calls == [("StableDiffusionPipeline", False)]  # no hook left: a package can serve the UNet
    assert main([*args, *loras, "--out", str(tmp_path / "hooks.png")]) == 0
    assert main([*args, "--lora", str(text_lora), "--out", str(tmp_path / "text.png")]) == 0
    assert main([*args, "--out", str(tmp_path / "plain.png")]) == 0
    fused, hooks, plain = (pixels(tmp_path / f"{name}.png") for name in ("fused", "hooks", "plain"))
    assert np.abs(fused - hooks).max() <= 1  # fused weights: both LoRAs at float rounding
    assert np.abs(fused - plain).max() > 10  # ... and they are applied
    assert np.abs(pixels(tmp_path / "text.png") - plain).max() > 10  # the text encoder's alone shows too
    recorded = GenerationParameters.from_infotext(read_parameters(tmp_path / "fused.png"))
    assert recorded.prompt.endswith("<lora:redder:0.8> <lora:wording:1>")
    assert recorded.extra["Lora hashes"].startswith("redder: ")


def test_serve_optimizes_each_model_it_loads(monkeypatch, caplog, tmp_path, int8_folder, optimize_calls):
    pytest.importorskip("fastapi")
    from serve_helpers import random_lora

    from diffusekit.serve import app as serve_app
    from diffusekit.serve.models import ModelHolder, ModelRegistry

    holder = ModelHolder(ModelRegistry(None), optimize=True)
    first = holder.get(SD)
    assert holder.get(SD) is first and optimize_calls == [("StableDiffusionPipeline", False)]
    assert ModelHolder(ModelRegistry(None)).get(SD) and len(optimize_calls) == 1  # off by default
    # a LoRA request runs on hooks; the next request without tags leaves none behind (packages serve it again)
    (tmp_path / "Lora").mkdir()
    random_lora(tmp_path / "Lora" / "redder.safetensors")
    registry = ModelRegistry(tmp_path)
    prompt, hashes = first.apply_loras("a dress <lora:redder:0.8>", registry)
    assert prompt == "a dress" and list(hashes) == ["redder"] and has_hooks(first.pipe.unet)
    assert first.apply_loras("a dress", registry) == ("a dress", {}) and not has_hooks(first.pipe.unet)
    assert first.apply_loras("a dress <lora:redder:0.5>", registry)[1] == hashes  # loaded again
    configs = []
    monkeypatch.setattr(serve_app, "serve", configs.append)
    assert main(["serve", "--optimize"]) == 0 and main(["serve"]) == 0
    assert [config.optimize for config in configs] == [True, False]
    assert serve_app.ServerState(configs[0]).holder.optimize and not serve_app.ServerState(configs[1]).holder.optimize
    with caplog.at_level("WARNING", logger="diffusekit.serve.models"):
        ModelHolder(ModelRegistry(int8_folder.parent)).get(int8_folder.name)
    assert "of this model are int8: without --optimize" in caplog.text


def test_batch_optimize_reaches_every_worker(tmp_path, caplog, int8_folder, optimize_calls):
    from diffusekit.batch import BatchConfig, BatchWorker

    with caplog.at_level("WARNING", logger="diffusekit.batch.worker"):
        BatchWorker(str(int8_folder))
    assert "of this model are int8: without --optimize" in caplog.text

    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps({"id": f"j{i}", "prompt": "a red dress", "seed": i}) + "\n" for i in range(2)))
    out = tmp_path / "out"
    assert main(["batch", str(jobs), "--model", SD, "--out", str(out), "--steps", "2", "--width", "32",
                 "--height", "32", "--optimize", "--no-progress"]) == 0
    assert optimize_calls == [("StableDiffusionPipeline", False)] and len(list(out.glob("*.png"))) == 2
    config = BatchConfig(jobs, SD, out, threads=2, optimize=True)
    assert config.worker_kwargs() == {"model": SD, "device": "cpu", "threads": 2, "optimize": True}


@pytest.mark.slow
def test_generate_optimize_compiles_float_and_int8(tmp_path, monkeypatch, int8_folder):
    """Real packages (a fresh cache folder): the float model's pixels match eager's within a level. The int8 model's
    kernels (bf16 attention with int8 products, fused norms) round otherwise than its simulated int8, so its image
    is held to the float one instead: as close to it as the simulated int8 image is, within 3 dB of PSNR."""
    monkeypatch.setenv("DIFFUSEKIT_CACHE_DIR", str(tmp_path / "cache"))
    args = ["--prompt", "a photo of a red dress", "--num-images", "1", *FAST]
    images = {}
    for model in (SD, str(int8_folder)):
        for flags in ((), ("--optimize",)):
            out = tmp_path / f"{len(images)}.png"
            assert main(["generate", model, *args, *flags, "--out", str(out)]) == 0
            images[model, bool(flags)] = pixels(out).astype(np.float64)
    reference = images[SD, False]
    assert np.abs(images[SD, True] - reference).max() <= 1

    def psnr(image):
        return 10 * np.log10(255**2 / max(((image - reference) ** 2).mean(), 1e-12))

    simulated, compiled = psnr(images[str(int8_folder), False]), psnr(images[str(int8_folder), True])
    assert compiled > simulated - 3 and compiled > 20, (compiled, simulated)
    assert any((tmp_path / "cache").rglob("*.so"))


@pytest.mark.slow
def test_optimized_pipeline_with_lora_hooks_follows_each_request(tmp_path, monkeypatch):
    """What ``serve --optimize`` does with LoRA tags, compiled for real: adapters as hooks (``torch.compile`` in
    the process), their weight changed between requests, then unloaded (the packages again); every image matches
    the eager pipeline's for the same request."""
    from serve_helpers import random_lora

    monkeypatch.setenv("DIFFUSEKIT_CACHE_DIR", str(tmp_path / "cache"))
    lora = tmp_path / "redder.safetensors"
    random_lora(lora)
    pipes = [DiffusionPipeline.from_pretrained(SD) for _ in range(2)]
    for pipe in pipes:
        pipe.set_progress_bar_config(disable=True)
        pipe.load_lora_weights(str(lora), adapter_name="redder")
    eager, fast = pipes
    fast.optimize()

    def image(pipe):
        return np.asarray(pipe("a photo of a red dress", num_inference_steps=2, guidance_scale=4.0, height=32,
                               width=32, generator=torch.Generator().manual_seed(0)).images[0], dtype=np.int16)

    for weight in (0.8, 0.3):
        for pipe in pipes:
            pipe.set_adapters(["redder"], [weight])
        assert np.abs(image(fast) - image(eager)).max() <= 1, weight
    for pipe in pipes:
        pipe.unload_lora_weights()
    assert not has_hooks(fast.unet)
    assert np.abs(image(fast) - image(eager)).max() <= 1
