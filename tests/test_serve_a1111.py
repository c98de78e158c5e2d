"""diffusekit serve, A1111 API: driven by the real `webuiapi` client over loopback HTTP; images compared with the
library's direct output for the same seed (identical)."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
webuiapi = pytest.importorskip("webuiapi")

from serve_helpers import random_lora as _random_lora, running_server, wait_idle  # noqa: E402

SD = "diffusekit-fashion-sd"
DDPM = "diffusekit-fashion-ddpm"
PROMPT = "a photo of a red dress"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    from diffusekit.hub import BUNDLED_DIR

    root = tmp_path_factory.mktemp("models")
    shutil.copytree(BUNDLED_DIR / DDPM, root / "my-ddpm")
    (root / "Lora").mkdir()
    _random_lora(root / "Lora" / "redder.safetensors")
    _random_loha(root / "Lora" / "hadastyle.safetensors")
    (root / "embeddings").mkdir()
    (root / "embeddings" / "broken.pt").write_bytes(b"")  # listed as skipped, as A1111 does
    from safetensors.torch import save_file
    import torch

    save_file({"emb_params": torch.randn(2, 32, generator=torch.Generator().manual_seed(0))},
              root / "embeddings" / "glowstyle9.safetensors")  # A1111's embedding format, 2 vectors
    torch.save({"string_to_token": {"*": 265}, "name": "oldstyle", "step": 1500, "sd_checkpoint": "a9263745",
                "sd_checkpoint_name": "v1-5",
                "string_to_param": {"*": torch.randn(3, 32, generator=torch.Generator().manual_seed(1))}},
               root / "embeddings" / "oldstyle.pt")  # A1111's .pt, 3 vectors
    outside = tmp_path_factory.mktemp("outside")
    shutil.copytree(BUNDLED_DIR / DDPM, outside / "secret")
    (root / "linked").symlink_to(outside / "secret")  # a link out of the folder must not be served
    _tiny_single_file(root / SINGLE)
    return root


SINGLE = "tiny-sd.safetensors"
LOHA_LAYER = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v"
LOHA_METADATA = {"ss_tag_frequency": '{"img": {"red": 2}}', "ss_output_name": "hada_style_v1",
                 "ss_network_module": "lycoris.kohya", "ss_network_dim": "4", "ss_network_alpha": "2.0",
                 "ss_network_args": '{"algo": "loha", "conv_dim": "4"}', "ss_sd_model_name": "v1-5.safetensors"}


def _random_loha(path):
    """A LyCORIS LoHa file as kohya's trainer writes it (keys and metadata) for one layer of the bundled SD UNet."""
    import torch
    from safetensors.torch import save_file

    from diffusekit import UNet2DConditionModel

    weight = UNet2DConditionModel.from_pretrained(SD, subfolder="unet").get_submodule(LOHA_LAYER).weight
    g = torch.Generator().manual_seed(3)
    name = "lora_unet_" + LOHA_LAYER.replace(".", "_")
    out, fan_in = weight.shape
    tensors = {f"{name}.alpha": torch.tensor(2.0)}
    for i in ("1", "2"):
        tensors[f"{name}.hada_w{i}_a"] = torch.randn(out, 4, generator=g)
        tensors[f"{name}.hada_w{i}_b"] = torch.randn(4, fan_in, generator=g)
    save_file(tensors, path, metadata=LOHA_METADATA)


def _tiny_single_file(path):
    """A random-weight SD 1.x checkpoint in the original single-file layout, small but with an architecture that
    from_single_file infers from the shapes (channels in multiples of 32, CLIP's vocabulary size)."""
    import torch

    from diffusekit import (AutoencoderKL, CLIPTextConfig, CLIPTextModel, DiffusionPipeline,
                            StableDiffusionPipeline, UNet2DConditionModel)

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8)
    vae = AutoencoderKL(block_out_channels=(32, 64), latent_channels=4, layers_per_block=1, sample_size=16,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=77))
    bundled = DiffusionPipeline.from_pretrained(SD)
    StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=bundled.tokenizer, unet=unet,
                            scheduler=bundled.scheduler, requires_safety_checker=False).save_single_file(path)


@pytest.fixture(scope="module")
def server(models_dir):
    with running_server(models_dir=models_dir, default_model=SD) as (url, app):
        wait_idle(app)
        yield url, app


@pytest.fixture()
def api(server):
    url, app = server
    wait_idle(app)
    return webuiapi.WebUIApi(baseurl=f"{url}/sdapi/v1", sampler="DPM++ 2M", steps=4)


@pytest.fixture(scope="module")
def sd_pipe():
    from diffusekit import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(SD)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _direct(pipe, cls_name, sampler, seeds, **kwargs):
    """The library's own output: the pipeline called directly, one generator per image."""
    import torch

    import diffusekit
    from diffusekit import get_scheduler

    run = getattr(diffusekit, cls_name).from_pipe(pipe, scheduler=get_scheduler(sampler, pipe.scheduler.config))
    run.set_progress_bar_config(disable=True)
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    return run(generator=generators, **kwargs).images


def _same(a, b):
    assert a.size == b.size and a.mode == b.mode
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_txt2img_images_equal_the_library_output_and_carry_parameters(api, sd_pipe):
    from diffusekit.infotext import GenerationParameters

    result = api.txt2img(prompt=PROMPT, negative_prompt="blurry", seed=5, steps=4, width=32, height=32,
                         cfg_scale=4, sampler_name="DPM++ 2M", scheduler="karras", batch_size=2)
    direct = _direct(sd_pipe, "StableDiffusionPipeline", "DPM++ 2M Karras", [5, 6], prompt=[PROMPT] * 2,
                     negative_prompt=["blurry"] * 2, num_inference_steps=4, guidance_scale=4.0, height=32, width=32)
    assert len(result.images) == 2
    for got, want in zip(result.images, direct):
        _same(got, want)
    info = result.info
    assert info["all_seeds"] == [5, 6] and info["sd_model_name"] == SD and info["sampler_name"] == "DPM++ 2M"
    assert info["width"] == 32 and info["height"] == 32 and info["steps"] == 4
    for image, text, seed in zip(result.images, info["infotexts"], (5, 6)):
        assert image.info["parameters"] == text
        params = GenerationParameters.from_infotext(text)
        assert (params.prompt, params.negative_prompt, params.seed, params.steps, params.cfg_scale) == \
            (PROMPT, "blurry", seed, 4, 4.0)
        assert (params.sampler, params.schedule_type, params.model) == ("DPM++ 2M", "Karras", SD)
        assert params.model_hash and len(params.model_hash) == 10
    assert result.parameters["prompt"] == PROMPT and result.parameters["seed"] == 5


def test_n_iter_continues_the_seeds_and_random_seed_is_recorded(api, sd_pipe):
    result = api.txt2img(prompt=PROMPT, seed=20, steps=3, width=32, height=32, cfg_scale=4, batch_size=1, n_iter=2,
                         sampler_name="Euler a")
    assert result.info["all_seeds"] == [20, 21]
    _same(result.images[1], _direct(sd_pipe, "StableDiffusionPipeline", "Euler a", [21], prompt=[PROMPT],
                                    num_inference_steps=3, guidance_scale=4.0, height=32, width=32)[0])
    drawn = api.txt2img(prompt=PROMPT, seed=-1, steps=2, width=32, height=32)
    assert 0 <= drawn.info["seed"] < 2**32 and f"Seed: {drawn.info['seed']}," in drawn.info["infotexts"][0]


def test_img2img_and_inpainting_equal_the_library_output(api, sd_pipe):
    from PIL import Image, ImageDraw

    init = Image.new("RGB", (32, 32), (10, 10, 10))
    ImageDraw.Draw(init).ellipse((6, 4, 26, 28), fill=(200, 30, 40))
    result = api.img2img(images=[init], prompt=PROMPT, seed=7, steps=5, width=32, height=32, cfg_scale=4,
                         denoising_strength=0.6, sampler_name="Euler")
    direct = _direct(sd_pipe, "StableDiffusionImg2ImgPipeline", "Euler", [7], prompt=[PROMPT], image=init,
                     strength=0.6, num_inference_steps=5, guidance_scale=4.0)
    _same(result.image, direct[0])
    assert "Denoising strength: 0.6" in result.info["infotexts"][0]
    assert result.parameters["init_images"] is None  # A1111 leaves them out unless include_init_images

    mask = Image.new("L", (32, 32), 0)
    ImageDraw.Draw(mask).rectangle((0, 0, 15, 31), fill=255)  # white = repaint
    painted = api.img2img(images=[init], mask_image=mask, prompt="a photo of a blue dress", seed=8, steps=5,
                          width=32, height=32, cfg_scale=4, denoising_strength=0.9, sampler_name="Euler",
                          mask_blur=0, inpaint_full_res=False)  # the whole picture (A1111's API default: only masked)
    direct = _direct(sd_pipe, "StableDiffusionInpaintPipeline", "Euler", [8], prompt=["a photo of a blue dress"],
                     image=init, mask_image=mask, strength=0.9, num_inference_steps=5, guidance_scale=4.0,
                     height=32, width=32)
    _same(painted.image, direct[0])
    assert painted.info["is_using_inpainting_conditioning"] is True
    assert "Mask blur" not in painted.info["infotexts"][0]
    # A1111's default mask_blur (4): the mask blurred, the result composited onto the original (test_mask_blur.py)
    from diffusekit.generation import generate
    from diffusekit.infotext import GenerationParameters

    blurred = api.img2img(images=[init], mask_image=mask, prompt="a photo of a blue dress", seed=8, steps=5,
                          width=32, height=32, cfg_scale=4, denoising_strength=0.9, sampler_name="Euler")
    text = blurred.info["infotexts"][0]
    assert "Mask blur: 4" in text and "Inpaint area: Only masked" in text and "Masked area padding: 0" in text
    library = generate(sd_pipe, GenerationParameters.from_infotext(text), image=init, mask=mask,
                       prompt_syntax="a1111").images[0]
    _same(blurred.image, library)
    far = np.s_[:, 26:]  # more than the blur's 10-pixel reach from the painted half: the original, exactly
    np.testing.assert_array_equal(np.asarray(blurred.image)[far], np.asarray(init)[far])
    assert not np.array_equal(np.asarray(blurred.image), np.asarray(painted.image))


def test_progress_preview_and_interrupt(server, api):
    url, app = server
    state = app.state.serve
    box = {}
    worker = threading.Thread(target=lambda: box.setdefault("result", api.txt2img(
        prompt=PROMPT, seed=1, steps=150, width=96, height=96, cfg_scale=4, sampler_name="Euler")))
    worker.start()
    deadline = time.monotonic() + 120
    progress = api.get_progress()
    while progress["state"]["sampling_step"] < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
        progress = api.get_progress()
    assert progress["state"]["sampling_steps"] == 150 and 0 < progress["progress"] < 1
    assert progress["state"]["job_count"] == 1 and progress["eta_relative"] > 0
    from diffusekit.serve.images import image_from_b64

    preview = image_from_b64(progress["current_image"], "preview", 10**6)
    assert preview.size == (96, 96)
    assert api.interrupt() == {}
    worker.join(120)
    assert not worker.is_alive()
    job = next(j for j in state.queue._jobs.values() if j.source == "a1111" and j.request.params.steps == 150)
    assert job.state == "interrupted" and job.step < 150
    assert box["result"].info["interrupted"] is True
    images = box["result"].images  # decoded from the latents at the interrupt, as A1111 does
    assert len(images) == 1 and images[0].size == (96, 96)
    assert api.get_progress()["state"]["job_count"] == 0


def test_models_listing_and_switching(server, api, models_dir):
    names = api.util_get_model_names()
    assert names == sorted([SD, DDPM, "my-ddpm", SINGLE])  # "linked" points outside the folder: not served
    assert api.util_get_current_model() == SD
    api.util_set_model("my-ddpm")
    assert api.util_get_current_model() == "my-ddpm"
    state = server[1].state.serve
    assert state.holder.current.name == "my-ddpm"  # one model in memory: the new one
    result = api.txt2img(prompt="ignored", seed=3, steps=3, width=32, height=32)
    assert result.image.size == (28, 28) and result.image.mode == "L"
    text = result.info["infotexts"][0]
    assert "Model: my-ddpm" in text and "Sampler" not in text and "Size: 28x28" in text
    api.util_set_model(SD)
    assert api.util_get_current_model() == SD
    for bad in ("../../etc/passwd", "linked", str(models_dir / "my-ddpm"), "nope"):
        answer = api.set_options({"sd_model_checkpoint": bad})
        assert "unknown model" in answer["detail"]
    assert api.util_get_current_model() == SD
    # a per-request model through override_settings, as A1111 allows
    one = api.txt2img(prompt="x", seed=1, steps=2, width=32, height=32,
                      override_settings={"sd_model_checkpoint": DDPM})
    assert one.info["sd_model_name"] == DDPM and api.util_get_current_model() == SD


def test_embeddings_a_prompt_uses_are_recorded_as_ti_hashes(api, models_dir):
    from diffusekit.infotext import GenerationParameters, embedding_hash

    common = dict(seed=2, steps=1, width=32, height=32, cfg_scale=4, sampler_name="Euler")
    used = api.txt2img(prompt="a photo of a dress", negative_prompt="glowstyle9, blurry", **common)
    params = GenerationParameters.from_infotext(used.info["infotexts"][0])
    assert params.extra["TI hashes"] == f"glowstyle9: {embedding_hash(models_dir / 'embeddings' / 'glowstyle9.safetensors')}"
    unused = api.txt2img(prompt="a photo of a glowstyle99 dress", **common)  # another word: not the embedding
    assert "TI hashes" not in unused.info["infotexts"][0]


def test_png_info_samplers_schedulers_loras_embeddings(api):
    from diffusekit.schedulers.names import resolve_sampler

    made = api.txt2img(prompt=PROMPT, seed=9, steps=2, width=32, height=32)
    info = api.png_info(made.image)
    assert info.info == made.info["infotexts"][0]
    assert info.parameters["Seed"] == "9" and info.parameters["Prompt"] == PROMPT
    samplers = api.util_get_sampler_names()
    assert {"Euler a", "Euler", "DPM++ 2M", "DDIM", "UniPC"} <= set(samplers)
    assert all(s != s.lower() for s in samplers)
    for name in samplers:
        resolve_sampler(name)
    assert {"automatic", "karras", "exponential"} <= set(api.util_get_scheduler_names())
    loras = api.get_loras()
    assert loras == [
        {"name": "hadastyle", "alias": "hada_style_v1", "path": "Lora/hadastyle.safetensors",  # as A1111: metadata
         "metadata": {**LOHA_METADATA, "ss_network_args": {"algo": "loha", "conv_dim": "4"},  # JSON read
                      "ss_tag_frequency": {"img": {"red": 2}}}},
        {"name": "redder", "alias": "redder", "path": "Lora/redder.safetensors", "metadata": {}}]
    keys = list(loras[0]["metadata"])  # A1111's display order: its listed keys first (model name ... tag counts)
    assert keys[:2] == ["ss_sd_model_name", "ss_tag_frequency"]
    embeddings = api.get_embeddings()
    assert set(embeddings["loaded"]) == {"glowstyle9", "oldstyle"} and set(embeddings["skipped"]) == {"broken"}
    # A1111's fields: the vector width and count, and what an A1111 .pt records about its training
    assert embeddings["loaded"]["glowstyle9"] == {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                                  "shape": 32, "vectors": 2}
    assert embeddings["loaded"]["oldstyle"] == {"step": 1500, "sd_checkpoint": "a9263745",
                                                "sd_checkpoint_name": "v1-5", "shape": 32, "vectors": 3}
    assert embeddings["skipped"]["broken"] == {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                               "shape": None, "vectors": None}


def test_each_embedding_file_is_read_once_at_start(models_dir, monkeypatch):
    """The server loads the models folder's embeddings, their /embeddings numbers and their "TI hashes" from one
    read of each file (not one read per use)."""
    import builtins
    import io

    import safetensors
    import torch

    from diffusekit import DiffusionPipeline
    from diffusekit.infotext import embedding_hash
    from diffusekit.serve.models import LoadedModel, ModelRegistry

    registry = ModelRegistry(models_dir)
    files = registry.embedding_files()
    assert {p.name for p in files} == {"broken.pt", "glowstyle9.safetensors", "oldstyle.pt"}
    opened: list[str] = []

    def counting(real):
        def opener(file, *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and "embeddings" in os.fspath(file):
                opened.append(os.path.basename(os.fspath(file)))
            return real(file, *args, **kwargs)
        return opener

    for module, name in ((builtins, "open"), (io, "open"), (safetensors, "safe_open"), (torch, "load")):
        monkeypatch.setattr(module, name, counting(getattr(module, name)))
    loaded = LoadedModel(registry.resolve(SD), DiffusionPipeline.from_pretrained(SD), None, None)
    loaded.load_embeddings(files)
    monkeypatch.undo()
    assert sorted(opened) == ["broken.pt", "glowstyle9.safetensors", "oldstyle.pt"]
    assert set(loaded.embeddings) == {"glowstyle9", "oldstyle"} and set(loaded.skipped_embeddings) == {"broken"}
    assert loaded.embeddings["oldstyle"]["vectors"] == 3 and loaded.embeddings["glowstyle9"]["shape"] == 32
    path = models_dir / "embeddings" / "oldstyle.pt"
    assert loaded.embedding_hashes["oldstyle"] == embedding_hash(path)
    ids = loaded.pipe.tokenizer.convert_tokens_to_ids(["oldstyle", "oldstyle_1", "oldstyle_2"])
    vectors = torch.load(path, weights_only=True)["string_to_param"]["*"]
    torch.testing.assert_close(loaded.pipe.text_encoder.get_input_embeddings().weight[ids], vectors, rtol=0, atol=0)


def test_bad_requests_get_clear_4xx_and_the_server_keeps_serving(server, api):
    import requests

    url = server[0]
    cases = [
        ({"prompt": "x", "width": 33, "height": 32, "steps": 2}, "multiple of 8"),
        ({"prompt": "x", "width": 4096, "height": 4096, "steps": 2}, "--max-pixels"),
        ({"prompt": "x", "width": 32, "height": 32, "steps": 1000}, "--max-steps"),
        ({"prompt": "x", "width": 32, "height": 32, "steps": 2, "batch_size": 8, "n_iter": 4}, "--max-images"),
        ({"prompt": "x", "width": 32, "height": 32, "steps": 2, "sampler_name": "Warp drive"}, "unknown sampler"),
        ({"prompt": "x", "width": 32, "height": 32, "steps": "many"}, "steps"),
    ]
    for body, words in cases:
        answer = requests.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=60)
        assert answer.status_code == 422, (body, answer.text)
        assert words in answer.text, (words, answer.text)
    bad_image = requests.post(f"{url}/sdapi/v1/img2img", json={"init_images": ["bm90IGFuIGltYWdl"], "steps": 2,
                                                                "width": 32, "height": 32}, timeout=60)
    assert bad_image.status_code == 422 and "not a readable image" in bad_image.text
    assert api.txt2img(prompt=PROMPT, seed=1, steps=2, width=32, height=32).image.size == (32, 32)
    info = json.loads(requests.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "width": 32,
                                                                     "height": 32}, timeout=60).json()["info"])
    assert info["sampler_name"] == "Euler"  # A1111's API default sampler


def test_single_file_checkpoint_is_served(api, models_dir):
    from diffusekit import StableDiffusionPipeline
    from diffusekit.infotext import model_hash

    result = api.txt2img(prompt=PROMPT, seed=4, steps=3, width=32, height=32, cfg_scale=4, sampler_name="Euler",
                         override_settings={"sd_model_checkpoint": SINGLE})
    pipe = StableDiffusionPipeline.from_single_file(models_dir / SINGLE, requires_safety_checker=False)
    direct = _direct(pipe, "StableDiffusionPipeline", "Euler", [4], prompt=[PROMPT], num_inference_steps=3,
                     guidance_scale=4.0, height=32, width=32)
    _same(result.image, direct[0])
    assert result.info["sd_model_name"] == SINGLE
    assert result.info["sd_model_hash"] == model_hash(models_dir / SINGLE)  # A1111's hash of the file


def test_lora_tags_and_a1111_prompt_syntax(server, api, sd_pipe, models_dir):
    import requests

    from diffusekit import DiffusionPipeline
    from diffusekit.prompts import encode_prompt_a1111

    common = dict(seed=5, steps=3, width=32, height=32, cfg_scale=4, sampler_name="Euler")
    styled = api.txt2img(prompt=f"{PROMPT} <lora:redder:0.8>", **common)
    pipe = DiffusionPipeline.from_pretrained(SD)
    pipe.load_lora_weights(str(models_dir / "Lora" / "redder.safetensors"), adapter_name="redder")
    pipe.set_adapters(["redder"], [0.8])
    want = _direct(pipe, "StableDiffusionPipeline", "Euler", [5], prompt=[PROMPT], num_inference_steps=3,
                   guidance_scale=4.0, height=32, width=32)[0]
    _same(styled.image, want)
    text = styled.info["infotexts"][0]
    from diffusekit.infotext import lora_hash

    assert text.startswith(f"{PROMPT} <lora:redder:0.8>\n")
    assert f'Lora hashes: "redder: {lora_hash(models_dir / "Lora" / "redder.safetensors")}"' in text
    plain = api.txt2img(prompt=PROMPT, **common)  # no tag: the LoRA is off again
    _same(plain.image, _direct(sd_pipe, "StableDiffusionPipeline", "Euler", [5], prompt=[PROMPT],
                               num_inference_steps=3, guidance_scale=4.0, height=32, width=32)[0])
    assert not np.array_equal(np.asarray(plain.image), np.asarray(styled.image))
    # A1111 emphasis is read as A1111 does
    emphasis = "a photo of a (red:1.4) dress"
    weighted = api.txt2img(prompt=emphasis, **common)
    embeds, negative = encode_prompt_a1111(sd_pipe, [emphasis], [""])
    _same(weighted.image, _direct(sd_pipe, "StableDiffusionPipeline", "Euler", [5], prompt_embeds=embeds,
                                  negative_prompt_embeds=negative, num_inference_steps=3, guidance_scale=4.0,
                                  height=32, width=32)[0])
    unknown = requests.post(f"{server[0]}/sdapi/v1/txt2img", json={"prompt": "x <lora:nope:1>", "steps": 2,
                                                                    "width": 32, "height": 32}, timeout=30)
    assert unknown.status_code == 422 and "unknown LoRA 'nope'" in unknown.text


def _b64(image):
    import base64
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _post_img2img(url, init, mask, status=200, **body):
    """POST /sdapi/v1/img2img as raw JSON (the fields webuiapi does not send); ``(image, info)`` or the response."""
    import base64
    import io

    import requests
    from PIL import Image

    answer = requests.post(f"{url}/sdapi/v1/img2img", json={"init_images": [_b64(init)], "mask": _b64(mask), **body},
                           timeout=300)
    assert answer.status_code == status, answer.text
    if status != 200:
        return answer
    data = answer.json()
    return Image.open(io.BytesIO(base64.b64decode(data["images"][0]))), json.loads(data["info"])


def _photo(size):
    from PIL import Image, ImageDraw

    photo = Image.new("RGB", size, (90, 140, 200))
    draw = ImageDraw.Draw(photo)
    draw.ellipse((6, 4, size[0] - 10, size[1] - 6), fill=(200, 30, 40))
    draw.rectangle((30, 20, 44, 40), fill=(20, 160, 60))
    return photo


def test_mask_blur_x_and_y(server, sd_pipe):
    """A1111's mask_blur_x / mask_blur_y: separate Gaussian sizes along X and Y; mask_blur sets both."""
    from PIL import Image, ImageDraw

    from diffusekit.generation import generate
    from diffusekit.infotext import GenerationParameters
    from diffusekit.mask_blur import blur_mask

    url = server[0]
    init = _photo((32, 32))
    mask = Image.new("L", (32, 32), 0)
    ImageDraw.Draw(mask).rectangle((12, 12, 19, 19), fill=255)
    common = dict(prompt="a photo of a blue dress", seed=8, steps=3, width=32, height=32, cfg_scale=4,
                  denoising_strength=0.9, sampler_name="Euler", inpaint_full_res=False)
    xy, info = _post_img2img(url, init, mask, mask_blur_x=1, mask_blur_y=5, **common)
    text = info["infotexts"][0]
    assert "Mask blur X: 1, Mask blur Y: 5" in text and "Mask blur:" not in text  # A1111 records none when unequal
    params = GenerationParameters.from_infotext(text)
    library = generate(sd_pipe, params, image=init, mask=mask, prompt_syntax="a1111").images[0]
    _same(xy, library)
    # the composite went through the mask blurred 1 pixel along X, 5 along Y: the original shows exactly where
    # that blurred mask is 0, i.e. farther than the 3-pixel X reach left / right of the square but not above it
    reach = np.asarray(blur_mask(mask, 1, 5))
    assert reach[16, 12 - 4] == 0 and reach[12 - 4, 16] > 0
    got, original = np.asarray(xy), np.asarray(init)
    np.testing.assert_array_equal(got[reach == 0], original[reach == 0])
    # mask_blur given: both sizes, recorded as A1111 does
    both, info = _post_img2img(url, init, mask, mask_blur=3, mask_blur_x=1, mask_blur_y=5, **common)
    assert "Mask blur: 3" in info["infotexts"][0]
    same, info = _post_img2img(url, init, mask, mask_blur_x=3, mask_blur_y=3, **common)
    assert "Mask blur: 3" in info["infotexts"][0]
    _same(both, same)
    assert not np.array_equal(np.asarray(both), got)
    bad = _post_img2img(url, init, mask, status=422, mask_blur_y=-2, **common)
    assert "mask_blur_y must be >= 0 pixels, got -2" in bad.text


def test_mask_upload_is_blurred_at_its_size_then_resized(server, sd_pipe):
    """A1111's order for an upload of another size than the request: create_binary_mask (an RGBA mask painted over
    with transparency: its alpha), the blur at the upload's size, then the resize to the working size."""
    from PIL import Image, ImageDraw

    from diffusekit.mask_blur import apply_overlay, blur_mask, overlay_for

    url = server[0]
    init = _photo((32, 32))
    upload = Image.new("RGBA", (64, 64), (0, 0, 0, 0))  # black paint: its grey level would mask nothing
    ImageDraw.Draw(upload).rectangle((20, 16, 43, 47), fill=(0, 0, 0, 220))
    result, _ = _post_img2img(url, init, upload, prompt="a photo of a blue dress", seed=4, steps=3, width=32,
                              height=32, cfg_scale=4, denoising_strength=0.9, sampler_name="Euler", mask_blur=4,
                              inpaint_full_res=False)
    latent_mask = blur_mask(upload, 4).resize((32, 32), Image.LANCZOS)
    generated = _direct(sd_pipe, "StableDiffusionInpaintPipeline", "Euler", [4], prompt=["a photo of a blue dress"],
                        image=init, mask_image=latent_mask, strength=0.9, num_inference_steps=3, guidance_scale=4.0,
                        height=32, width=32)[0]
    _same(result, apply_overlay(generated, overlay_for(init, latent_mask)))


def test_inpainting_field_defaults_are_a1111_api_ones():
    """A1111's API (StableDiffusionProcessingImg2Img's defaults): mask_blur_x / mask_blur_y 4, inpaint_full_res
    true ("Only masked") with padding 0; /v1/jobs keeps the whole picture unless asked (its web page's default)."""
    from diffusekit.serve.a1111 import Img2ImgRequest, _inpaint_extra
    from diffusekit.serve.jobs_api import JobBody

    body = Img2ImgRequest(prompt="x")
    assert (body.mask_blur, body.mask_blur_x, body.mask_blur_y) == (None, 4, 4)
    assert body.inpaint_full_res is True and body.inpaint_full_res_padding == 0
    assert _inpaint_extra(body) == {"Mask blur": 4, "Inpaint area": "Only masked", "Masked area padding": 0}
    assert _inpaint_extra(Img2ImgRequest(prompt="x", mask_blur=2, mask_blur_x=7)) == {
        "Mask blur": 2, "Inpaint area": "Only masked", "Masked area padding": 0}  # mask_blur sets both
    assert _inpaint_extra(Img2ImgRequest(prompt="x", mask_blur_y=0, inpaint_full_res=False)) == {
        "Mask blur X": 4, "Mask blur Y": 0}
    assert JobBody(prompt="x").inpaint_full_res is False


def test_inpaint_only_masked(server, sd_pipe):
    """A1111's inpaint_full_res ("Only masked"): the crop around the blurred mask plus padding, widened to the
    working size's aspect ratio, is inpainted at the working size and pasted back into the full-size image."""
    from PIL import Image, ImageDraw

    from diffusekit.generation import generate
    from diffusekit.infotext import GenerationParameters
    from diffusekit.mask_blur import blur_mask

    url = server[0]
    init = _photo((64, 48))  # larger than the working size, and of another shape
    mask = Image.new("L", (64, 48), 0)
    ImageDraw.Draw(mask).rectangle((22, 14, 35, 27), fill=255)
    common = dict(prompt="a photo of a blue dress", seed=5, steps=3, width=48, height=32, cfg_scale=4,
                  denoising_strength=0.9, sampler_name="Euler", mask_blur=2)
    result, info = _post_img2img(url, init, mask, inpaint_full_res=True, inpaint_full_res_padding=4, **common)
    assert result.size == (64, 48)  # the input image's size, not the working size
    text = info["infotexts"][0]
    assert "Mask blur: 2" in text and "Inpaint area: Only masked" in text and "Masked area padding: 4" in text

    # A1111's steps written out: the blurred mask's non-zero box, 4 pixels of padding, widened to 3:2
    blurred = blur_mask(mask, 2)
    m = np.asarray(blurred)
    ys, xs = np.nonzero(m)
    assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (17, 9, 41, 33)
    # padded: (13, 5, 45, 37), 32 x 32; 3:2 needs 48 wide: 16 more, 8 each side
    region = (5, 5, 53, 37)
    crop = init.crop(region).resize((48, 32), Image.LANCZOS)  # 48 x 32 already: the resize keeps it
    crop_mask = blurred.crop(region).resize((48, 32), Image.LANCZOS)
    generated = _direct(sd_pipe, "StableDiffusionInpaintPipeline", "Euler", [5], prompt=["a photo of a blue dress"],
                        image=crop, mask_image=crop_mask, strength=0.9, num_inference_steps=3, guidance_scale=4.0,
                        height=32, width=48)[0]
    back = np.zeros((48, 64, 3))
    back[5:37, 5:53] = np.asarray(generated.resize((48, 32), Image.LANCZOS))
    alpha = (255 - m.astype(float))[..., None] / 255  # the original's weight: 255 - blurred mask, not doubled
    expected = alpha * np.asarray(init) + (1 - alpha) * back
    got = np.asarray(result).astype(float)
    keep, paint = alpha[..., 0] == 1, alpha[..., 0] == 0
    assert keep.any() and paint.any() and (~keep & ~paint).any()
    np.testing.assert_array_equal(got[keep], np.asarray(init)[keep])
    np.testing.assert_array_equal(got[paint], back[paint])
    assert np.abs(got - expected).max() <= 2  # PIL's premultiplied 8-bit steps round in the blend band
    # the library remakes it from the PNG's parameters
    library = generate(sd_pipe, GenerationParameters.from_infotext(text), image=init, mask=mask,
                       prompt_syntax="a1111").images[0]
    _same(result, library)
    # a blank mask: A1111 falls back to image-to-image of the whole picture (at the working size)
    blank, info = _post_img2img(url, init, Image.new("L", (64, 48), 0), inpaint_full_res=True, **common)
    assert blank.size == (48, 32) and "Inpaint area" not in info["infotexts"][0]
    direct = _direct(sd_pipe, "StableDiffusionImg2ImgPipeline", "Euler", [5], prompt=["a photo of a blue dress"],
                     image=init.resize((48, 32), Image.LANCZOS), strength=0.9, num_inference_steps=3,
                     guidance_scale=4.0)[0]
    _same(blank, direct)


def test_lora_alias_clash_is_refused_as_a1111(tmp_path):
    """A1111 (networks.py list_available_networks / load_networks): an ss_output_name alias that an earlier file
    already answers to (its alias or its name) is "forbidden": the name then means a file name only; "none" never
    is an alias. Not the last file winning."""
    import torch
    from safetensors.torch import save_file

    from diffusekit.serve.models import ModelRegistry, UnknownModel

    lora = tmp_path / "Lora"
    (lora / "sub").mkdir(parents=True)
    for name, alias in (("a", "shared"), ("b", "shared"), ("c", "a"), ("d", "unique"), ("e", "None")):
        save_file({"x": torch.zeros(1)}, lora / f"{name}.safetensors", metadata={"ss_output_name": alias})
    registry = ModelRegistry(tmp_path)
    assert registry.lora_file("unique") == lora / "d.safetensors"  # an alias no other file gives
    assert registry.lora_file("a") == lora / "a.safetensors"  # c's alias "a" is a's name: the file wins
    assert registry.lora_file("b") == lora / "b.safetensors"
    for clash in ("shared", "SHARED", "None", "none"):
        with pytest.raises(UnknownModel, match="not taken as an alias") as caught:
            registry.lora_file(clash)
    assert "none" in str(caught.value)
    with pytest.raises(UnknownModel, match=r"Lora/a.safetensors, Lora/b.safetensors"):
        registry.lora_file("shared")
    save_file({"x": torch.zeros(1)}, lora / "sub" / "shared.safetensors")  # a file of that name: it is the one
    assert registry.lora_file("shared") == lora / "sub" / "shared.safetensors"
    assert [e["alias"] for e in registry.loras()][:2] == ["shared", "shared"]  # /loras still shows the aliases


def test_lycoris_file_by_prompt_tag(api, models_dir):
    """A LyCORIS LoHa in the models folder's Lora/ runs from a <lora:name:w> tag (or its metadata alias), as the
    library runs it, and is recorded in "Lora hashes"."""
    from diffusekit import DiffusionPipeline
    from diffusekit.infotext import lora_hash

    common = dict(seed=6, steps=3, width=32, height=32, cfg_scale=4, sampler_name="Euler")
    styled = api.txt2img(prompt=f"{PROMPT} <lora:hadastyle:0.7>", **common)
    pipe = DiffusionPipeline.from_pretrained(SD)
    pipe.load_lora_weights(str(models_dir / "Lora" / "hadastyle.safetensors"), adapter_name="hadastyle")
    pipe.set_adapters(["hadastyle"], [0.7])
    want = _direct(pipe, "StableDiffusionPipeline", "Euler", [6], prompt=[PROMPT], num_inference_steps=3,
                   guidance_scale=4.0, height=32, width=32)[0]
    _same(styled.image, want)
    assert f'Lora hashes: "hadastyle: {lora_hash(models_dir / "Lora" / "hadastyle.safetensors")}"' in \
        styled.info["infotexts"][0]
    by_alias = api.txt2img(prompt=f"{PROMPT} <lora:hada_style_v1:0.7>", **common)
    _same(by_alias.image, want)
    plain = api.txt2img(prompt=PROMPT, **common)
    assert not np.array_equal(np.asarray(plain.image), np.asarray(styled.image))
