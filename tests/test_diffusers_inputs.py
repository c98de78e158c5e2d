"""Inputs diffusers accepts are accepted here too, with the same results; what diffusers cannot run is refused clearly.

Covers: attention head settings and per-layer transformer depths of the UNet configs, lists of tensors as
img2img / inpainting images, ``dtype=`` / ``torch_dtype=`` (also a dict per component), private ``_`` config keys,
``to_json_string``, and ``save_pretrained(variant=...)`` file names for every component (safety checker included).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import diffusekit
from sd_assets import build_tiny_sd, tiny_unet_kwargs
from test_seeded_init import assert_same_init
from test_unet_2d import TINY as UNET2D_TINY

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


def _forward_equal(name: str, config: dict, *inputs) -> None:
    assert_same_init(name, config)  # same weights from the same seed ...
    torch.manual_seed(0)
    ours = getattr(diffusekit, name)(**config).eval()
    torch.manual_seed(0)
    ref = getattr(diffusers, name)(**config).eval()
    with torch.no_grad():  # ... and the same function of them
        torch.testing.assert_close(ours(*inputs).sample, ref(*inputs).sample, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- head settings

SAMPLE, CONTEXT = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 32)


@pytest.mark.parametrize("head_dim", [3, 5, 16])
def test_unet2d_head_widths_that_do_not_divide_the_channels(head_dim):
    """diffusers builds channels // head_dim heads of head_dim channels: a narrower inner width is fine."""
    _forward_equal("UNet2DModel", dict(UNET2D_TINY, attention_head_dim=head_dim), torch.randn(1, 3, 16, 16), 10)


@pytest.mark.parametrize("heads", [3, 5, (3, 5)])
def test_unet2d_condition_head_counts_that_do_not_divide_the_channels(heads):
    _forward_equal("UNet2DConditionModel", tiny_unet_kwargs(attention_head_dim=heads), SAMPLE, 10, CONTEXT)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(transformer_layers_per_block=[[1, 2], [2, 1]], reverse_transformer_layers_per_block=[[2, 1, 1], [1, 1, 2]]),
        dict(transformer_layers_per_block=[[1, 2, 3], [2, 1, 3]], reverse_transformer_layers_per_block=[[2, 1, 1], [1, 1, 2]]),
        dict(transformer_layers_per_block=[1, 2, 3]),  # longer than the block list: indexed as diffusers does
        dict(transformer_layers_per_block=(2, 1)),
    ],
    ids=["per-layer", "per-layer-longer", "more-entries-than-blocks", "tuple"],
)
def test_transformer_layers_per_block_lists_diffusers_accepts(overrides):
    config = tiny_unet_kwargs(layers_per_block=2, **overrides)
    _forward_equal("UNet2DConditionModel", config, SAMPLE, 10, CONTEXT)


@pytest.mark.parametrize(
    "name, config, match",
    [
        ("UNet2DModel", dict(UNET2D_TINY, attention_head_dim=32), "attention_head_dim=32 is wider"),
        ("UNet2DConditionModel", tiny_unet_kwargs(attention_head_dim=32), "cannot have 32 attention heads"),
        ("UNet2DConditionModel", tiny_unet_kwargs(attention_head_dim=None),
         "cannot have None attention heads|'attention_head_dim' expected"),
        ("UNet2DConditionModel", tiny_unet_kwargs(transformer_layers_per_block=[1]), "transformer_layers_per_block"),
        ("UNet2DConditionModel", tiny_unet_kwargs(transformer_layers_per_block=[[1], [1]]),
         "reverse_transformer_layers_per_block"),
    ],
    ids=["head-wider-than-block", "more-heads-than-channels", "no-head-count", "too-few-depths", "no-reverse"],
)
def test_what_diffusers_cannot_run_is_refused_clearly(name, config, match):
    inputs = (torch.randn(1, 3, 16, 16), 10) if name == "UNet2DModel" else (SAMPLE, 10, CONTEXT)
    with pytest.raises(Exception), torch.no_grad():  # diffusers fails at build or at the first call
        getattr(diffusers, name)(**config)(*inputs)
    with pytest.raises(ValueError, match=match):
        getattr(diffusekit, name)(**config)


# ---------------------------------------------------------------------------------------------------- images as lists


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("pipes")
    return {
        "img2img": build_tiny_sd(base / "sd", pipeline="StableDiffusionImg2ImgPipeline"),
        "inpaint": build_tiny_sd(base / "inpaint", unet_in_channels=9, pipeline="StableDiffusionInpaintPipeline"),
    }


@pytest.mark.parametrize("task", ["img2img", "inpaint"])
def test_lists_of_tensors_as_images(folders, task):
    g = torch.Generator().manual_seed(3)
    images = [torch.rand(3, 16, 16, generator=g) for _ in range(2)]
    masks = [(torch.rand(1, 16, 16, generator=g) > 0.5).float() for _ in range(2)]
    kwargs = dict(prompt=["a red cat", "a blue dog"], image=images, num_inference_steps=3, output_type="np")
    if task == "inpaint":
        kwargs["mask_image"] = masks
    outputs = []
    for lib in (diffusekit, diffusers):
        pipe = lib.DiffusionPipeline.from_pretrained(folders[task])
        pipe.scheduler = lib.DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        outputs.append(pipe(generator=torch.manual_seed(0), **kwargs).images)
    ours, ref = outputs
    assert ours.shape == ref.shape == (2, 16, 16, 3)
    assert np.abs(ours - ref).max() < 1 / 255
    # the same as one stacked batch
    pipe = diffusekit.DiffusionPipeline.from_pretrained(folders[task])
    pipe.scheduler = diffusekit.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    stacked = dict(kwargs, image=torch.stack(images))
    if task == "inpaint":
        stacked["mask_image"] = torch.stack(masks)
    np.testing.assert_allclose(pipe(generator=torch.manual_seed(0), **stacked).images, ours, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- dtype


def test_dtype_and_torch_dtype_on_models_and_pipelines(folders):
    folder = folders["img2img"]
    unet = diffusekit.UNet2DConditionModel.from_pretrained(folder, subfolder="unet", dtype=torch.float16)
    assert unet.dtype == torch.float16
    unet = diffusekit.UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=torch.bfloat16)
    assert unet.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="pass only one"):
        diffusekit.UNet2DConditionModel.from_pretrained(folder, subfolder="unet", dtype=torch.float16,
                                                        torch_dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="must be a torch.dtype"):
        diffusekit.UNet2DConditionModel.from_pretrained(folder, subfolder="unet", dtype={"unet": torch.float16})
    pipe = diffusekit.DiffusionPipeline.from_pretrained(folder, dtype=torch.float16)
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float16}


@pytest.mark.parametrize("keyword", ["dtype", "torch_dtype"])
def test_dtype_dict_per_component_as_diffusers(folders, keyword):
    spec = {"unet": torch.float16, "default": torch.bfloat16}
    ours = diffusekit.DiffusionPipeline.from_pretrained(folders["img2img"], **{keyword: spec})
    ref = diffusers.DiffusionPipeline.from_pretrained(folders["img2img"], **{keyword: spec})
    for name in ("unet", "vae", "text_encoder"):
        assert getattr(ours, name).dtype == getattr(ref, name).dtype
    assert (ours.unet.dtype, ours.vae.dtype) == (torch.float16, torch.bfloat16)
    ours = diffusekit.DiffusionPipeline.from_pretrained(folders["img2img"], dtype={"vae": torch.float16})
    assert (ours.vae.dtype, ours.unet.dtype) == (torch.float16, torch.float32)  # no "default": float32
    with pytest.raises(TypeError, match="component names to torch dtypes"):
        diffusekit.DiffusionPipeline.from_pretrained(folders["img2img"], dtype={"unet": "fp16"})


# ---------------------------------------------------------------------------------------------------- config


def test_private_config_keys_go_to_the_config_only(tmp_path):
    config = json.loads(diffusers.UNet2DModel(**UNET2D_TINY).to_json_string())  # has _class_name, _diffusers_version
    ours = diffusekit.UNet2DModel(**config, _name_or_path="somewhere")
    assert ours.config["_name_or_path"] == "somewhere"
    assert list(ours.config.block_out_channels) == list(UNET2D_TINY["block_out_channels"])
    again = diffusekit.UNet2DModel.from_config(ours.config, _extra=1)
    assert again.config["_extra"] == 1
    scheduler = diffusekit.DDIMScheduler(_class_name="DDIMScheduler", num_train_timesteps=10)
    assert scheduler.config.num_train_timesteps == 10
    ours.save_pretrained(tmp_path)
    diffusekit.UNet2DModel.from_pretrained(tmp_path, _name_or_path="x")


def test_to_json_string(tmp_path):
    model = diffusekit.UNet2DModel(**UNET2D_TINY)
    text = model.to_json_string()
    assert text == model.save_config(tmp_path).read_text()
    data = json.loads(text)
    assert data["_class_name"] == "UNet2DModel" and data["attention_head_dim"] == UNET2D_TINY["attention_head_dim"]
    ref = diffusers.UNet2DModel.from_config(data)  # diffusers reads it
    assert list(ref.config.block_out_channels) == list(UNET2D_TINY["block_out_channels"])
    scheduler = diffusekit.EulerDiscreteScheduler(use_karras_sigmas=True)
    assert json.loads(scheduler.to_json_string())["use_karras_sigmas"] is True


# ---------------------------------------------------------------------------------------------------- variants


def _weight_files(folder) -> dict[str, list[str]]:
    found = {}
    for root, _, files in os.walk(folder):
        weights = sorted(f for f in files if f.endswith((".safetensors", ".bin", ".json")) and "config" not in f
                         and f not in ("model_index.json", "vocab.json", "tokenizer.json", "special_tokens_map.json"))
        if weights:
            found[os.path.relpath(root, folder)] = weights
    return found


def test_save_pretrained_variant_writes_every_component(tmp_path, folders):
    from test_safety_checker import PROCESSOR, ref_checker

    base = diffusers.StableDiffusionPipeline.from_pretrained(folders["img2img"])
    ref = diffusers.StableDiffusionPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
        scheduler=base.scheduler, safety_checker=ref_checker(), feature_extractor=transformers.CLIPImageProcessor(
            **PROCESSOR),
    )
    ref.save_pretrained(tmp_path / "plain")
    ref.save_pretrained(tmp_path / "ref", variant="fp16")
    ours = diffusekit.StableDiffusionPipeline.from_pretrained(tmp_path / "plain")
    ours.save_pretrained(tmp_path / "ours", variant="fp16")
    files = _weight_files(tmp_path / "ours")
    assert files == _weight_files(tmp_path / "ref")
    assert set(files) == {"unet", "vae", "text_encoder", "safety_checker"}
    assert files["text_encoder"] == ["model.fp16.safetensors"]
    back = diffusekit.StableDiffusionPipeline.from_pretrained(tmp_path / "ours", variant="fp16")
    for name in ("unet", "vae", "text_encoder", "safety_checker"):
        for key, value in getattr(ours, name).state_dict().items():
            assert torch.equal(getattr(back, name).state_dict()[key], value), (name, key)
    diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "ours", variant="fp16")  # diffusers reads ours


@pytest.mark.parametrize("name", ["UNet2DConditionModel", "CLIPTextModel"])
def test_sharded_variant_file_names_as_diffusers(tmp_path, name):
    if name == "CLIPTextModel":
        config = transformers.CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                             num_attention_heads=4)
        ref = transformers.CLIPTextModel(config)
    else:
        ref = diffusers.UNet2DConditionModel(**tiny_unet_kwargs())
    ref.save_pretrained(tmp_path / "ref", variant="fp16", max_shard_size="100KB")
    ours = getattr(diffusekit, name).from_pretrained(tmp_path / "ref", variant="fp16")
    ours.save_pretrained(tmp_path / "ours", variant="fp16", max_shard_size="100KB")
    assert sorted(os.listdir(tmp_path / "ours")) == sorted(os.listdir(tmp_path / "ref"))
    assert len(os.listdir(tmp_path / "ours")) > 3  # config, index and at least two shards
    getattr(diffusekit, name).from_pretrained(tmp_path / "ours", variant="fp16")
