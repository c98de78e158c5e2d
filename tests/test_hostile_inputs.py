"""Hostile and malformed inputs: each is refused with an error naming the file / key / argument, and nothing from a
file is executed or read from outside the model folder. ``HOSTILE`` counts the inputs tried (docs/SAFETY.md)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

from diffusekit import (
    DDPMScheduler,
    DiffusionPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)
from diffusekit.configuration import ConfigValidationError
from diffusekit.modeling import CheckpointError
from kill_trials import tiny_unet

UNET = dict(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=[32, 64],
            down_block_types=["DownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "UpBlock2D"],
            norm_num_groups=8)


@pytest.fixture()
def unet_folder(tmp_path):
    tiny_unet().save_pretrained(tmp_path / "model", max_shard_size="150KB")
    return tmp_path / "model"


def rewrite_index(folder: Path, change) -> None:
    path = folder / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(path.read_text())
    key = sorted(index["weight_map"])[0]
    index["weight_map"][key] = change(index["weight_map"][key])
    path.write_text(json.dumps(index))


class _Boom:
    """A pickle payload that would create ``marker`` when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


# ------------------------------------------------------------------------------------------ paths stay inside


@pytest.mark.parametrize("entry", ["../../x.safetensors", "/etc/x.safetensors", "sub/../../x.safetensors"])
def test_index_entry_leaving_the_folder_is_refused(unet_folder, entry):
    rewrite_index(unet_folder, lambda _: entry)
    with pytest.raises(CheckpointError, match="refusing weight_map entry") as info:
        UNet2DModel.from_pretrained(unet_folder)
    assert "passwd" not in str(info.value) and "hosts" not in str(info.value)  # never a listing of /etc


def test_index_entry_symlinked_out_of_the_folder_is_refused(unet_folder, tmp_path):
    shard = sorted(unet_folder.glob("*-00001-of-*.safetensors"))[0]
    outside = tmp_path / "outside.safetensors"
    shard.rename(outside)
    shard.symlink_to(outside)
    with pytest.raises(CheckpointError, match="leaves the folder"):
        UNet2DModel.from_pretrained(unet_folder)


def test_weights_and_config_symlinked_out_are_refused(tmp_path):
    tiny_unet().save_pretrained(tmp_path / "elsewhere")
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").symlink_to(tmp_path / "elsewhere" / "config.json")
    with pytest.raises(ValueError, match="leaves the folder"):
        UNet2DModel.from_pretrained(folder)
    (folder / "config.json").unlink()
    (folder / "config.json").write_text((tmp_path / "elsewhere" / "config.json").read_text())
    (folder / "diffusion_pytorch_model.safetensors").symlink_to(
        tmp_path / "elsewhere" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError, match="leaves the folder"):
        UNet2DModel.from_pretrained(folder)


@pytest.mark.parametrize("subfolder", ["..", "../model", "/etc", "a/../../b", "unet_link"])
def test_subfolder_leaving_the_folder_is_refused(unet_folder, tmp_path, subfolder):
    (unet_folder / "unet_link").symlink_to(tmp_path)
    with pytest.raises(ValueError, match="leaves the folder|relative path inside"):
        UNet2DModel.from_pretrained(unet_folder, subfolder=subfolder)


@pytest.mark.parametrize("variant", ["../../x", "a/b", "..", "a\\b"])
def test_variant_with_path_parts_is_refused(unet_folder, variant):
    with pytest.raises(ValueError, match="variant"):
        UNet2DModel.from_pretrained(unet_folder, variant=variant)


def test_missing_file_error_lists_only_the_model_folder(unet_folder):
    with pytest.raises(ValueError) as info:
        UNet2DModel.from_pretrained(unet_folder, subfolder="/etc")
    assert "passwd" not in str(info.value)


# ------------------------------------------------------------------------------------------ nothing is unpickled


def test_use_safetensors_refuses_an_index_of_bin_files(unet_folder):
    rewrite_index(unet_folder, lambda name: name.replace(".safetensors", ".bin"))
    with pytest.raises(CheckpointError, match="never unpickles"):
        UNet2DModel.from_pretrained(unet_folder, use_safetensors=True)


def test_pickle_payload_in_a_bin_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    model = tiny_unet()
    state = {**model.state_dict(), "x": _Boom(marker)}
    model.save_pretrained(tmp_path / "m", safe_serialization=False)
    torch.save(state, tmp_path / "m" / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refusing to load"):
        UNet2DModel.from_pretrained(tmp_path / "m")
    assert not marker.exists()


def test_legacy_non_zip_bin_loads(tmp_path):
    model = tiny_unet()
    model.save_pretrained(tmp_path, safe_serialization=False)
    torch.save(model.state_dict(), tmp_path / "diffusion_pytorch_model.bin", _use_new_zipfile_serialization=False)
    loaded = UNet2DModel.from_pretrained(tmp_path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_training_resume_never_unpickles_objects(tmp_path):
    from diffusekit.training.loop import TrainLoop

    marker = tmp_path / "pwned"
    torch.save({"version": 2, "x": _Boom(marker)}, tmp_path / "checkpoint.pt")
    loop = TrainLoop(tmp_path, {"m": torch.nn.Linear(2, 2)}, config={}, lr=1e-3, total_steps=1)
    with pytest.raises(ValueError, match="holds objects other than tensors"):
        loop.resume()
    assert not marker.exists()


def test_package_torch_loads_are_weights_only():
    source = Path(__file__).resolve().parents[1] / "src" / "diffusekit"
    calls = [(p, line) for p in source.rglob("*.py") for line in p.read_text().splitlines() if "torch.load(" in line]
    assert calls and all("weights_only=True" in line for _, line in calls), calls


# ------------------------------------------------------------------------------------------ local paths win


def test_dot_and_relative_paths_load_the_local_folder(tmp_path, monkeypatch):
    from diffusekit.hub import bundled_models

    name = bundled_models()[0]  # a local folder named like a bundled model
    torch.manual_seed(5)
    local = tiny_unet()
    local.save_pretrained(tmp_path / name / "unet")
    monkeypatch.chdir(tmp_path / name / "unet")
    assert torch.equal(UNet2DModel.from_pretrained(".").conv_in.weight, local.conv_in.weight)
    monkeypatch.chdir(tmp_path)
    assert torch.equal(UNet2DModel.from_pretrained(name, subfolder="unet").conv_in.weight, local.conv_in.weight)
    assert torch.equal(UNet2DModel.from_pretrained(f"./{name}/unet").conv_in.weight, local.conv_in.weight)


# ------------------------------------------------------------------------------------------ configs


BAD_UNET_CONFIGS = [
    ({"layers_per_block": "2"}, "layers_per_block", "expected"),
    ({"layers_per_block": 10**6}, "layers_per_block", "<= 100"),
    ({"block_out_channels": [32, -64]}, "block_out_channels", ">= 1"),
    ({"block_out_channels": [32, "64"]}, "block_out_channels", "expected"),
    ({"attention_head_dim": 0}, "attention_head_dim", ">= 1"),
    ({"norm_num_groups": 0}, "norm_num_groups", ">= 1"),
    ({"sample_size": -8}, "sample_size", ">= 1"),
    ({"in_channels": 3.5}, "in_channels", "expected"),
    ({"norm_eps": 0}, "norm_eps", "> 0"),
    ({"center_input_sample": "yes"}, "center_input_sample", "expected"),
]


@pytest.mark.parametrize("change, key, message", BAD_UNET_CONFIGS, ids=[c[1] + str(i) for i, c in enumerate(BAD_UNET_CONFIGS)])
def test_bad_config_values_are_refused_naming_file_and_key(unet_folder, change, key, message):
    config = json.loads((unet_folder / "config.json").read_text())
    config.update(change)
    (unet_folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigValidationError, match=message) as info:
        UNet2DModel.from_pretrained(unet_folder)
    assert os.fspath(unet_folder / "config.json") in str(info.value) and repr(key) in str(info.value)


def test_nulls_that_diffusers_files_carry_are_accepted(unet_folder):
    config = json.loads((unet_folder / "config.json").read_text())
    config.update(center_input_sample=None)  # a flag written as null: None means the default
    (unet_folder / "config.json").write_text(json.dumps(config))
    UNet2DModel.from_pretrained(unet_folder)


def test_config_bigger_than_the_machine_is_refused_before_loading(unet_folder):
    config = json.loads((unet_folder / "config.json").read_text())
    config["block_out_channels"] = [60000, 60000]
    config["norm_num_groups"] = 100
    (unet_folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigValidationError, match="GiB of RAM"):
        UNet2DModel.from_pretrained(unet_folder)


def test_direct_construction_is_validated_too():
    with pytest.raises(ConfigValidationError, match="attention_head_dim"):
        UNet2DConditionModel(attention_head_dim=0)


@pytest.mark.parametrize("change, key", [
    ({"num_train_timesteps": 0}, "num_train_timesteps"),
    ({"num_train_timesteps": "1000"}, "num_train_timesteps"),
    ({"beta_end": 5}, "beta_end"),
    ({"beta_start": -0.1}, "beta_start"),
])
def test_bad_scheduler_config_is_refused(tmp_path, change, key):
    DDPMScheduler().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "scheduler_config.json").read_text())
    config.update(change)
    (tmp_path / "scheduler_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigValidationError, match=key) as info:
        DDPMScheduler.from_pretrained(tmp_path)
    assert "scheduler_config.json" in str(info.value)


@pytest.mark.parametrize("value", [-1, 0, "77", 7.5])
def test_bad_tokenizer_model_max_length_is_refused(tmp_path, value):
    from clip_assets import write_clip_tokenizer

    from diffusekit import CLIPTokenizer

    write_clip_tokenizer(tmp_path, num_merges=10)
    path = tmp_path / "tokenizer_config.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    config["model_max_length"] = value
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model_max_length") as info:
        CLIPTokenizer.from_pretrained(tmp_path)
    assert "tokenizer_config.json" in str(info.value)


MALFORMED_JSON = [
    (b'{"sample_size": "\xff\xfe"}', "not UTF-8"),
    (b"[" * 100_000 + b"]" * 100_000, "nests"),
    (b'{"sample_size": ' + b"9" * 5000 + b"}", "cannot be read"),
    (b'{"sample_size": 8', "not valid JSON"),
    (b"[1, 2]", "must hold a JSON object"),
]


@pytest.mark.parametrize("raw, message", MALFORMED_JSON, ids=["utf8", "deep", "digits", "truncated", "list"])
def test_malformed_json_names_the_file(unet_folder, raw, message):
    (unet_folder / "config.json").write_bytes(raw)
    with pytest.raises(ValueError, match=message) as info:
        UNet2DModel.from_pretrained(unet_folder)
    assert "config.json" in str(info.value)


# ------------------------------------------------------------------------------------------ model_index.json


@pytest.mark.parametrize("entry, where", [
    ({"_class_name": "DiffusionPipeline"}, "concrete pipeline"),
    ({"_class_name": "ModelMixin"}, "concrete pipeline"),
    ({"_class_name": "get_scheduler"}, "concrete pipeline"),
    ({"_class_name": "__version__"}, "concrete pipeline"),
    ({"_class_name": "_EXPORTS"}, "not implemented"),
    ({"unet": ["diffusers", "DiffusionPipeline"]}, "model, scheduler"),
    ({"unet": ["diffusers", "FrozenConfig"]}, "model, scheduler"),
    ({"scheduler": ["diffusers", "SchedulerMixin"]}, "model, scheduler"),
])
def test_model_index_names_only_registered_classes(tmp_path, entry, where):
    from diffusekit import DDPMPipeline

    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler()).save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    index.update(entry)
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=where) as info:
        DiffusionPipeline.from_pretrained(tmp_path)
    assert "model_index.json" in str(info.value)


# ------------------------------------------------------------------------------------------ pipeline arguments


@pytest.fixture(scope="module")
def sd_pipe(tmp_path_factory):
    from sd_assets import build_tiny_sd

    pipe = StableDiffusionPipeline.from_pretrained(build_tiny_sd(tmp_path_factory.mktemp("sd")))
    pipe.set_progress_bar_config(disable=True)
    return pipe


BAD_CALLS = [
    ({"height": -64}, "height"), ({"height": 0}, "height"), ({"height": 64.0}, "height"), ({"height": 60}, "height"),
    ({"width": -8}, "width"), ({"width": 0}, "width"), ({"width": 32.5}, "width"), ({"width": 36}, "width"),
    ({"height": True}, "height"), ({"height": 10**9}, "height"),
    ({"num_inference_steps": 0}, "num_inference_steps"), ({"num_inference_steps": -3}, "num_inference_steps"),
    ({"num_inference_steps": 2.0}, "num_inference_steps"),
]


@pytest.mark.parametrize("kwargs, name", BAD_CALLS, ids=[f"{k}={v}" for c in BAD_CALLS for k, v in c[0].items()])
def test_bad_pipeline_arguments_are_refused_before_any_work(sd_pipe, monkeypatch, kwargs, name):
    def no_work(*args, **kwargs):
        raise AssertionError("the pipeline started working before checking its arguments")

    monkeypatch.setattr(sd_pipe.text_encoder, "forward", no_work)
    monkeypatch.setattr(sd_pipe.unet, "forward", no_work)
    with pytest.raises(ValueError, match=name):
        sd_pipe("a cat", **{"num_inference_steps": 1, **kwargs})


def test_huge_prompt_logs_a_short_excerpt(sd_pipe, caplog):
    prompt = "a photo of a red cat " * 50_000  # 1 MB
    with caplog.at_level(logging.WARNING):
        sd_pipe(prompt, num_inference_steps=1, guidance_scale=1.0, output_type="latent")
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "truncated" in text and len(text) < 2000


@pytest.mark.parametrize("loader", ["load_lora_weights", "load_textual_inversion"])
def test_adapter_weight_name_cannot_leave_the_folder(sd_pipe, tmp_path, loader):
    from safetensors.torch import save_file

    (tmp_path / "adapters").mkdir()
    save_file({"x": torch.zeros(1)}, tmp_path / "outside.safetensors")  # exists, but outside the folder named
    with pytest.raises(ValueError, match="relative path inside|leaves the folder"):
        getattr(sd_pipe, loader)(tmp_path / "adapters", weight_name="../outside.safetensors")


# ------------------------------------------------------------------------------------------ weight dtypes


def test_int_weight_where_floats_belong_names_that_key(tmp_path):
    from safetensors.torch import load_file, save_file

    tiny_unet().save_pretrained(tmp_path)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    state["conv_out.weight"] = state["conv_out.weight"].to(torch.int32)
    save_file(state, path)
    with pytest.raises(CheckpointError, match="'conv_out.weight' has dtype torch.int32"):
        UNet2DModel.from_pretrained(tmp_path)


# the number of hostile / malformed inputs this file (and test_durability's journal test) tries, by section
HOSTILE = sum([
    3 + 1 + 2 + 5 + 4 + 1 + 2,  # paths: index entries, symlinked shard and config/weights, subfolders, variants,
    # a listing outside the folder, adapters' weight_name
    3,  # unpickling: an index of .bin under use_safetensors=True, a pickle payload in a .bin, in checkpoint.pt
    len(BAD_UNET_CONFIGS) + 1 + 1 + 4 + 4 + len(MALFORMED_JSON),  # configs
    8,  # model_index.json class names
    len(BAD_CALLS) + 1,  # pipeline arguments, the 1 MB prompt
    1,  # an int weight
    3,  # commit journals naming paths outside the folder or a foreign stage
])


def test_count_of_hostile_inputs_in_the_docs():
    safety = Path(__file__).resolve().parents[1] / "docs" / "SAFETY.md"
    assert f"{HOSTILE} hostile or malformed inputs" in safety.read_text(), HOSTILE


def test_hub_cache_snapshot_symlinks_into_blobs_still_load(tmp_path):
    """The one allowed way out of a folder: a Hugging Face cache snapshot's files are symlinks into its blobs/."""
    tiny_unet().save_pretrained(tmp_path / "plain")
    repo = tmp_path / "models--org--name"
    snapshot = repo / "snapshots" / "abc123" / "unet"
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for i, name in enumerate(["config.json", "diffusion_pytorch_model.safetensors"]):
        blob = repo / "blobs" / f"blob{i}"
        blob.write_bytes((tmp_path / "plain" / name).read_bytes())
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    loaded = UNet2DModel.from_pretrained(repo / "snapshots" / "abc123", subfolder="unet")
    assert torch.equal(loaded.conv_in.weight, UNet2DModel.from_pretrained(tmp_path / "plain").conv_in.weight)
