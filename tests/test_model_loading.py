"""Loading edge cases with UNet2DModel / AutoencoderKL: dtypes, file formats, variants, shards, bad files."""

from __future__ import annotations

import json

import pytest
import torch

from diffusekit import AutoencoderKL, UNet2DModel
from diffusekit.modeling import CheckpointError

diffusers = pytest.importorskip("diffusers")

TOL = dict(rtol=1e-5, atol=1e-5)

TINY_UNET = dict(
    sample_size=16,
    block_out_channels=(8, 16),
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=4,
    layers_per_block=1,
    attention_head_dim=4,
)
WEIGHTS = "diffusion_pytorch_model.safetensors"


class _NotATensor:  # a pickled object a weights file must never execute or load
    pass


@pytest.fixture(scope="module")
def ref_unet():
    from diffusers import UNet2DModel as RefUNet

    torch.manual_seed(0)
    return RefUNet(**TINY_UNET).eval()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 16, 16, generator=g), torch.tensor([3, 700])


@torch.no_grad()
def _check_same(model, ref, inputs, **tol):
    sample, t = inputs
    torch.testing.assert_close(model(sample, t).sample, ref(sample, t).sample, **(tol or TOL))


# ---------------------------------------------------------------------------------------------------- formats


def test_bin_and_safetensors(tmp_path, ref_unet, inputs):
    ref_unet.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "diffusion_pytorch_model.bin").exists()
    _check_same(UNet2DModel.from_pretrained(tmp_path / "bin"), ref_unet, inputs)  # falls back to .bin
    _check_same(UNet2DModel.from_pretrained(tmp_path / "bin", use_safetensors=False), ref_unet, inputs)
    with pytest.raises(OSError, match="use_safetensors=False"):
        UNet2DModel.from_pretrained(tmp_path / "bin", use_safetensors=True)

    # ours writes .bin that diffusers reads
    from diffusers import UNet2DModel as RefUNet

    ours = UNet2DModel.from_pretrained(tmp_path / "bin")
    ours.save_pretrained(tmp_path / "ours_bin", safe_serialization=False)
    _check_same(RefUNet.from_pretrained(tmp_path / "ours_bin", use_safetensors=False).eval(), ref_unet, inputs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_torch_dtype(tmp_path, ref_unet, inputs, dtype):
    from diffusers import UNet2DModel as RefUNet

    ref_unet.save_pretrained(tmp_path)
    ours = UNet2DModel.from_pretrained(tmp_path, torch_dtype=dtype)
    ref = RefUNet.from_pretrained(tmp_path, torch_dtype=dtype).eval()
    assert all(p.dtype == dtype for p in ours.parameters()) and ours.dtype == dtype
    sample, t = inputs
    with torch.no_grad():
        got = ours(sample.to(dtype), t).sample
        assert got.dtype == dtype
        # same weights, same rounding points: close to diffusers in the same dtype, and to fp32
        torch.testing.assert_close(got, ref(sample.to(dtype), t).sample, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(got.float(), ref_unet(sample, t).sample, rtol=5e-2, atol=5e-2)


def test_variant_fp16_files(tmp_path, ref_unet, inputs):
    from diffusers import UNet2DModel as RefUNet

    ref_unet.save_pretrained(tmp_path)  # default fp32 weights ...
    RefUNet.from_pretrained(tmp_path, torch_dtype=torch.float16).save_pretrained(tmp_path, variant="fp16")  # ... + fp16
    assert (tmp_path / "diffusion_pytorch_model.fp16.safetensors").exists()
    default = UNet2DModel.from_pretrained(tmp_path)
    _check_same(default, ref_unet, inputs)
    half = UNet2DModel.from_pretrained(tmp_path, variant="fp16", torch_dtype=torch.float16)
    assert half.dtype == torch.float16
    upcast = UNet2DModel.from_pretrained(tmp_path, variant="fp16")  # fp16 file, default dtype: fp32 model
    assert upcast.dtype == torch.float32
    for key, value in upcast.state_dict().items():  # exactly the fp16 values
        torch.testing.assert_close(value, ref_unet.state_dict()[key].half().float(), rtol=0, atol=0)
    with pytest.raises(OSError, match="variant"):
        UNet2DModel.from_pretrained(tmp_path, variant="bf16")


def test_sharded_checkpoints_both_ways(tmp_path, ref_unet, inputs):
    from diffusers import UNet2DModel as RefUNet

    ref_unet.save_pretrained(tmp_path / "ref", max_shard_size="40KB")
    shards = sorted(p.name for p in (tmp_path / "ref").glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "ref" / "diffusion_pytorch_model.safetensors.index.json").exists()
    ours = UNet2DModel.from_pretrained(tmp_path / "ref")
    _check_same(ours, ref_unet, inputs)

    ours.save_pretrained(tmp_path / "ours", max_shard_size="40KB")
    assert len(list((tmp_path / "ours").glob("*.safetensors"))) > 1
    _check_same(RefUNet.from_pretrained(tmp_path / "ours").eval(), ref_unet, inputs)
    _check_same(UNet2DModel.from_pretrained(tmp_path / "ours"), ref_unet, inputs)


def test_sharded_variant(tmp_path, ref_unet, inputs):
    half = UNet2DModel.from_pretrained(_saved(tmp_path / "src", ref_unet), torch_dtype=torch.float16)
    half.save_pretrained(tmp_path / "out", variant="fp16", max_shard_size="40KB")
    loaded = UNet2DModel.from_pretrained(tmp_path / "out", variant="fp16")
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, ref_unet.state_dict()[key].half().float(), rtol=0, atol=0)
    from diffusers import UNet2DModel as RefUNet

    ref = RefUNet.from_pretrained(tmp_path / "out", variant="fp16", torch_dtype=torch.float32).eval()
    _check_same(loaded, ref, inputs)


def _saved(folder, model):
    model.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------------- bad input


def test_unknown_block_type_in_config_file(tmp_path, ref_unet):
    _saved(tmp_path, ref_unet)
    config = json.loads((tmp_path / "config.json").read_text())
    config["down_block_types"] = ["DownBlock2D", "CrossAttnDownBlock3D"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"'CrossAttnDownBlock3D' in down_block_types\[1\]"):
        UNet2DModel.from_pretrained(tmp_path)


def test_wrong_shapes_are_listed(tmp_path, ref_unet):
    _saved(tmp_path, ref_unet)
    config = json.loads((tmp_path / "config.json").read_text())
    config["block_out_channels"] = [8, 24]  # not the architecture of these weights
    config["norm_num_groups"] = 4
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as info:
        UNet2DModel.from_pretrained(tmp_path)
    message = str(info.value)
    assert "shape mismatches" in message
    assert "down_blocks.1.attentions.0.group_norm.bias: checkpoint [16] vs model [24]" in message
    assert WEIGHTS in message


def test_missing_and_unexpected_keys_are_listed(tmp_path, ref_unet):
    from safetensors.torch import save_file

    state = {k: v.clone() for k, v in ref_unet.state_dict().items()}
    del state["conv_out.bias"]
    state["conv_out.extra"] = torch.zeros(1)
    ref_unet.save_config(tmp_path)
    save_file(state, tmp_path / WEIGHTS)
    with pytest.raises(CheckpointError) as info:
        UNet2DModel.from_pretrained(tmp_path)
    message = str(info.value)
    assert "missing from the checkpoint" in message and "conv_out.bias" in message
    assert "not in the model" in message and "conv_out.extra" in message


def test_truncated_safetensors_names_the_file(tmp_path, ref_unet):
    _saved(tmp_path, ref_unet)
    path = tmp_path / WEIGHTS
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.safetensors.*(truncated|corrupt)"):
        UNet2DModel.from_pretrained(tmp_path)


def test_pickled_object_in_bin_is_refused(tmp_path, ref_unet):
    ref_unet.save_config(tmp_path)
    state = dict(ref_unet.state_dict())
    state["payload"] = _NotATensor()
    torch.save(state, tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"refusing to load .*diffusion_pytorch_model\.bin.*other than tensors"):
        UNet2DModel.from_pretrained(tmp_path)


def test_vae_checkpoint_with_unet_config_is_refused(tmp_path, ref_unet):
    import shutil

    from diffusers import AutoencoderKL as RefVAE

    torch.manual_seed(0)
    RefVAE(block_out_channels=(8,), norm_num_groups=4).save_pretrained(tmp_path / "vae")
    assert AutoencoderKL.from_pretrained(tmp_path / "vae").dtype == torch.float32
    ref_unet.save_config(tmp_path / "mixed")
    shutil.copy(tmp_path / "vae" / WEIGHTS, tmp_path / "mixed" / WEIGHTS)
    with pytest.raises(CheckpointError, match="missing from the checkpoint"):
        UNet2DModel.from_pretrained(tmp_path / "mixed")
