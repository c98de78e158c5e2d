"""The file sets real hub repos have, built here with diffusers and arranged as on the Hub, load as in diffusers.

* ``google/ddpm-cifar10-32``: flat (``config.json``, ``diffusion_pytorch_model.bin`` + ``.safetensors``,
  ``scheduler_config.json``, ``model_index.json``, ``README.md`` all at the root), an 0.1-era config and the legacy
  attention key names in the weights.
* ``runwayml/stable-diffusion-v1-5``: per-component folders with ``.bin`` + ``.safetensors``, ``fp16`` and
  ``non_ema`` variants (only for some components), and root files that are not components
  (``v1-5-pruned.safetensors``, ``v1-5-pruned-emaonly.ckpt``, ``v1-inference.yaml``) which must be ignored.

Each loads from a local folder and from a Hugging Face cache laid out as ``huggingface_hub`` writes it (offline).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import diffusekit
from sd_assets import build_tiny_sd
from test_hub import make_cache

diffusers = pytest.importorskip("diffusers")

UNET = dict(
    sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8, attention_head_dim=8,
)
# the keys of google/ddpm-cifar10-32's config.json (written by diffusers 0.0.4); values from UNET
LEGACY_UNET_KEYS = (
    "act_fn", "attention_head_dim", "block_out_channels", "center_input_sample", "down_block_types",
    "downsample_padding", "flip_sin_to_cos", "freq_shift", "in_channels", "layers_per_block", "mid_block_scale_factor",
    "norm_eps", "norm_num_groups", "out_channels", "sample_size", "time_embedding_type", "up_block_types",
)
DDPM_SCHEDULER_CONFIG = {  # google/ddpm-cifar10-32's scheduler_config.json
    "_class_name": "DDPMScheduler", "_diffusers_version": "0.1.1", "beta_end": 0.02, "beta_schedule": "linear",
    "beta_start": 0.0001, "clip_sample": True, "num_train_timesteps": 1000, "trained_betas": None,
    "variance_type": "fixed_small",
}
LEGACY_ATTENTION_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def legacy_attention_keys(state_dict: dict) -> dict:
    pattern = re.compile(r"(attentions\.\d+\.)(to_q|to_k|to_v|to_out\.0)\.")
    return {pattern.sub(lambda m: m.group(1) + LEGACY_ATTENTION_NAMES[m.group(2)] + ".", k): v.contiguous()
            for k, v in state_dict.items()}


def build_ddpm_flat(folder: Path, formats=("bin", "safetensors")) -> Path:
    """A tiny google/ddpm-cifar10-32: every file at the root, as that repo has them."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**UNET)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"_class_name": "UNet2DModel", "_diffusers_version": "0.0.4"}
    config.update({k: v for k, v in unet.config.items() if k in LEGACY_UNET_KEYS})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    weights = legacy_attention_keys(unet.state_dict())
    if "bin" in formats:
        torch.save(weights, folder / "diffusion_pytorch_model.bin")
    if "safetensors" in formats:
        save_file(weights, folder / "diffusion_pytorch_model.safetensors")
    (folder / "scheduler_config.json").write_text(json.dumps(DDPM_SCHEDULER_CONFIG, indent=2))
    index = {"_class_name": "DDPMPipeline", "_diffusers_version": "0.1.1",
             "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    (folder / "README.md").write_text("---\nlicense: apache-2.0\ntags:\n- pytorch\n- diffusers\n---\n# DDPM\n")
    return folder


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ddpm_images(pipe):
    return quiet(pipe)(batch_size=1, num_inference_steps=4, generator=torch.manual_seed(0), output_type="np").images


@pytest.fixture(scope="module")
def ddpm_repo(tmp_path_factory):
    folder = build_ddpm_flat(tmp_path_factory.mktemp("ddpm") / "ddpm-cifar10-32")
    reference = ddpm_images(diffusers.DDPMPipeline.from_pretrained(folder))
    return folder, reference


@pytest.mark.parametrize("cls_name", ["DDPMPipeline", "DiffusionPipeline", "DDIMPipeline"])
def test_flat_ddpm_repo_loads_from_a_folder(ddpm_repo, cls_name):
    folder, reference = ddpm_repo
    pipe = getattr(diffusekit, cls_name).from_pretrained(folder)
    assert type(pipe.unet).__name__ == "UNet2DModel"
    if cls_name != "DDIMPipeline":
        np.testing.assert_allclose(ddpm_images(pipe), reference, atol=1e-5)
        assert pipe.scheduler.config.variance_type == "fixed_small"


@pytest.mark.parametrize("use_safetensors", [None, False, True])
def test_flat_ddpm_repo_components_load_from_the_root(ddpm_repo, use_safetensors):
    # the tutorial's "write the loop yourself" lines
    folder, _ = ddpm_repo
    ours = diffusekit.UNet2DModel.from_pretrained(folder, use_safetensors=use_safetensors)
    theirs = diffusers.UNet2DModel.from_pretrained(folder, use_safetensors=use_safetensors)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in theirs.state_dict().items())
    scheduler = diffusekit.DDPMScheduler.from_pretrained(folder)
    assert scheduler.config.num_train_timesteps == 1000 and scheduler.config.clip_sample is True


def test_flat_ddpm_repo_with_bin_only(tmp_path):
    folder = build_ddpm_flat(tmp_path / "ddpm-bin", formats=("bin",))
    reference = ddpm_images(diffusers.DDPMPipeline.from_pretrained(folder))
    np.testing.assert_allclose(ddpm_images(diffusekit.DDPMPipeline.from_pretrained(folder)), reference, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="use_safetensors=False"):
        diffusekit.DDPMPipeline.from_pretrained(folder, use_safetensors=True)


@pytest.mark.parametrize("cls_name", ["DDPMPipeline", "DiffusionPipeline"])
def test_flat_ddpm_repo_loads_from_the_hub_cache(ddpm_repo, tmp_path, cls_name):
    folder, reference = ddpm_repo
    cache = tmp_path / "cache"
    make_cache(cache, "google/ddpm-cifar10-32", folder)
    pipe = getattr(diffusekit, cls_name).from_pretrained("google/ddpm-cifar10-32", cache_dir=cache,
                                                         local_files_only=True)
    np.testing.assert_allclose(ddpm_images(pipe), reference, atol=1e-5)


# ------------------------------------------------------------------------------------------- SD 1.5 repo layout


def _perturbed(state_dict: dict) -> dict:
    return {k: (v + 0.01 if v.is_floating_point() else v).contiguous() for k, v in state_dict.items()}


def build_sd_hub_layout(folder: Path) -> Path:
    """A tiny runwayml/stable-diffusion-v1-5: the files that repo has, in its places."""
    build_tiny_sd(folder, legacy_tokenizer_files=True)
    for name in ("unet", "vae"):
        sub = folder / name
        weights = load_file(sub / "diffusion_pytorch_model.safetensors")
        torch.save(weights, sub / "diffusion_pytorch_model.bin")
        half = {k: v.half() for k, v in weights.items()}
        save_file(half, sub / "diffusion_pytorch_model.fp16.safetensors")
        torch.save(half, sub / "diffusion_pytorch_model.fp16.bin")
        non_ema = _perturbed(weights)
        save_file(non_ema, sub / "diffusion_pytorch_model.non_ema.safetensors")
        torch.save(non_ema, sub / "diffusion_pytorch_model.non_ema.bin")
    text = folder / "text_encoder"
    weights = load_file(text / "model.safetensors")
    torch.save(weights, text / "pytorch_model.bin")
    save_file({k: v.half() for k, v in weights.items()}, text / "model.fp16.safetensors")
    torch.save({k: v.half() for k, v in weights.items()}, text / "pytorch_model.fp16.bin")
    # root files of the repo that are not components: a single-file checkpoint, an A1111 ckpt, the LDM yaml
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)},
              folder / "v1-5-pruned.safetensors")
    torch.save({"state_dict": {"model.diffusion_model.out.2.bias": torch.zeros(4)}}, folder / "v1-5-pruned-emaonly.ckpt")
    (folder / "v1-inference.yaml").write_text("model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n")
    (folder / "README.md").write_text("---\nlicense: creativeml-openrail-m\n---\n# Stable Diffusion v1-5\n")
    (folder / ".gitattributes").write_text("*.bin filter=lfs diff=lfs merge=lfs -text\n")
    return folder


@pytest.fixture(scope="module")
def sd_repo(tmp_path_factory):
    return build_sd_hub_layout(tmp_path_factory.mktemp("sd") / "stable-diffusion-v1-5")


def same_modules(ours, theirs, names=("unet", "vae", "text_encoder")):
    for name in names:
        a, b = getattr(ours, name).state_dict(), getattr(theirs, name).state_dict()
        # transformers 5 drops the checkpoint's "text_model." prefix in the module tree, and keeps position_ids
        b = {("text_model." + k if "text_model." + k in a else k): v for k, v in b.items()}
        b = {k: v for k, v in b.items() if k in a}
        assert a.keys() == b.keys(), name
        for key in a:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), f"{name}: {key}"


def sd_images(pipe):
    return quiet(pipe)("a cat", num_inference_steps=2, height=32, width=32, generator=torch.manual_seed(0),
                       output_type="np").images


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"use_safetensors": False},
        {"variant": "fp16"},
        {"variant": "fp16", "torch_dtype": torch.float16},
        {"variant": "non_ema"},  # only unet and vae have non_ema files: the text encoder loads its default weights
    ],
    ids=["default", "bin", "fp16", "fp16-half", "non_ema"],
)
def test_sd_repo_layout_loads_the_same_weights_as_diffusers(sd_repo, options):
    ours = diffusekit.DiffusionPipeline.from_pretrained(sd_repo, **options)
    theirs = diffusers.DiffusionPipeline.from_pretrained(sd_repo, safety_checker=None, **options)
    same_modules(ours, theirs)
    if options.get("variant") == "non_ema":
        default = diffusekit.DiffusionPipeline.from_pretrained(sd_repo)
        assert not torch.equal(ours.unet.conv_in.weight, default.unet.conv_in.weight)


def test_sd_repo_layout_images_match(sd_repo):
    ours = diffusekit.DiffusionPipeline.from_pretrained(sd_repo)
    theirs = diffusers.DiffusionPipeline.from_pretrained(sd_repo, safety_checker=None)
    np.testing.assert_allclose(sd_images(ours), sd_images(theirs), atol=1e-4)


def test_unknown_variant_is_refused_like_diffusers(sd_repo):
    with pytest.raises(ValueError, match="variant='nope'"):
        diffusekit.DiffusionPipeline.from_pretrained(sd_repo, variant="nope")
    with pytest.raises(ValueError):
        diffusers.DiffusionPipeline.from_pretrained(sd_repo, variant="nope")


def test_sd_repo_layout_loads_from_the_hub_cache(sd_repo, tmp_path):
    cache = tmp_path / "cache"
    make_cache(cache, "runwayml/stable-diffusion-v1-5", sd_repo)
    ours = diffusekit.DiffusionPipeline.from_pretrained("runwayml/stable-diffusion-v1-5", cache_dir=cache,
                                                        local_files_only=True, variant="fp16")
    theirs = diffusers.DiffusionPipeline.from_pretrained(sd_repo, safety_checker=None, variant="fp16")
    same_modules(ours, theirs)
    assert type(ours).__name__ == "StableDiffusionPipeline"


def test_bin_only_sd_repo_with_legacy_tokenizer_files(sd_repo, tmp_path):
    """The CompVis/stable-diffusion-v1-4 layout before safetensors: only .bin weights, and a tokenizer of
    vocab.json + merges.txt without tokenizer.json."""
    import shutil

    folder = tmp_path / "stable-diffusion-v1-4"
    shutil.copytree(sd_repo, folder)
    for path in folder.rglob("*.safetensors"):
        path.unlink()
    (folder / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)
    ours = diffusekit.DiffusionPipeline.from_pretrained(folder)
    theirs = diffusers.DiffusionPipeline.from_pretrained(folder, safety_checker=None)
    same_modules(ours, theirs)
    text = "a photo of an astronaut riding a horse"
    assert ours.tokenizer(text).input_ids == theirs.tokenizer(text).input_ids
    with pytest.raises(FileNotFoundError, match="use_safetensors=False"):
        diffusekit.DiffusionPipeline.from_pretrained(folder, use_safetensors=True)
