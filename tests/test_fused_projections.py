"""Fused q/k/v projections (``fuse_qkv_projections`` on the UNet, the VAE and the SD pipelines) give diffusers' fused
numbers, keep the checkpoint's layout and step aside for layers with hooks (LoRA) or int8 weights."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import diffusekit
from diffusekit.models.attention import Attention
from sd_assets import build_tiny_sd, load_both, tiny_unet_kwargs, tiny_vae_kwargs

diffusers = pytest.importorskip("diffusers")


def _pair(cls_name: str, config: dict):
    torch.manual_seed(0)
    ref = getattr(diffusers, cls_name)(**config).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # biases away from zero, so a bias mix-up shows
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    ours = getattr(diffusekit, cls_name)(**config).eval()
    ours.load_state_dict(ref.state_dict())
    return ours, ref


@torch.no_grad()
def test_unet_fused_projections_match_diffusers_and_unfuse():
    ours, ref = _pair("UNet2DConditionModel", tiny_unet_kwargs(layers_per_block=2))
    g = torch.Generator().manual_seed(1)
    inputs = (torch.randn(2, 4, 8, 8, generator=g), 10, torch.randn(2, 6, 32, generator=g))
    plain = ours(*inputs).sample
    keys = set(ours.state_dict())
    ours.fuse_qkv_projections()
    ref.fuse_qkv_projections()
    layers = [m for m in ours.modules() if isinstance(m, Attention)]
    assert layers and all(m.fused_projections for m in layers)
    fused = ours(*inputs).sample
    torch.testing.assert_close(fused, ref(*inputs).sample, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    assert set(ours.state_dict()) == keys  # no to_qkv / to_kv copies in what gets saved
    ours.unfuse_qkv_projections()
    assert not any(m.fused_projections for m in layers)
    assert torch.equal(ours(*inputs).sample, plain)


@torch.no_grad()
def test_fused_projections_compute_one_product_and_step_aside_for_hooks():
    torch.manual_seed(0)
    attn = Attention(16, cross_attention_dim=8, heads=2, dim_head=4, bias=True).eval()
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 3, 8)
    plain = attn(x, ctx)
    attn.fuse_projections()
    linears = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: linears.append(module) if type(module) is torch.nn.Linear else None)
    try:
        fused = attn(x, ctx)
    finally:
        handle.remove()
    assert linears == [attn.to_q, attn.to_out[0]]  # k and v came from one product, not from their layers
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)
    # a hook on to_k (how LoRA and sequential offload attach) must still run: that call is not fused
    attn.to_k.register_forward_hook(lambda module, args, out: out * 2)
    hooked = attn(x, ctx)
    assert not torch.allclose(hooked, plain)
    attn.fuse_projections(False)
    torch.testing.assert_close(hooked, attn(x, ctx), rtol=0, atol=0)


def test_lora_applies_with_fused_projections(tmp_path):
    """A kohya LoRA on to_q / to_k / to_v (forward hooks) gives the same UNet output fused or not."""
    from safetensors.torch import save_file

    from test_lora import random_lora, unet_out

    ours, _ = load_both(build_tiny_sd(tmp_path / "sd"))
    paths = [f"down_blocks.0.attentions.0.transformer_blocks.0.{p}" for p in ("attn1.to_q", "attn1.to_v", "attn2.to_k")]
    save_file(random_lora(ours.unet, paths, "kohya", "lora_unet_"), tmp_path / "style.safetensors")
    base = unet_out(ours)
    ours.load_lora_weights(tmp_path / "style.safetensors")
    with_lora = unet_out(ours)
    assert (with_lora - base).abs().max() > 1e-2
    ours.fuse_qkv_projections()
    torch.testing.assert_close(unet_out(ours), with_lora, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_vae_fused_projections_match_diffusers():
    ours, ref = _pair("AutoencoderKL", tiny_vae_kwargs())
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    plain = ours.decode(z).sample
    ours.fuse_qkv_projections()
    ref.fuse_qkv_projections()
    torch.testing.assert_close(ours.decode(z).sample, ref.decode(z).sample, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.decode(z).sample, plain, rtol=1e-5, atol=1e-5)


def test_pipeline_fuse_qkv_projections_matches_diffusers(tmp_path, caplog):
    folder = build_tiny_sd(tmp_path / "sd")
    ours, ref = load_both(folder)
    kwargs = dict(prompt="a cat", num_inference_steps=2, output_type="np")
    plain = ours(generator=torch.manual_seed(0), **kwargs).images
    ours.fuse_qkv_projections()
    ref.fuse_qkv_projections()
    assert ours.fusing_unet and ours.fusing_vae
    fused = ours(generator=torch.manual_seed(0), **kwargs).images
    np.testing.assert_allclose(fused, ref(generator=torch.manual_seed(0), **kwargs).images, atol=1e-5)
    np.testing.assert_allclose(fused, plain, atol=1e-5)
    ours.unfuse_qkv_projections(vae=False)
    assert not ours.fusing_unet and ours.fusing_vae
    assert not any(m.fused_projections for m in ours.unet.modules() if isinstance(m, Attention))
    with caplog.at_level(logging.WARNING):
        ours.unfuse_qkv_projections()  # the UNet is no longer fused: a warning, the VAE is unfused
    assert "the unet was not fused" in caplog.text
    assert not ours.fusing_vae


@pytest.mark.slow
def test_fused_projections_under_optimize(tmp_path):
    """Fusing after optimize() (the flag is part of the package key) keeps the compiled numbers."""
    ours, _ = _pair("UNet2DConditionModel", tiny_unet_kwargs(layers_per_block=2))
    inputs = (torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4)), 10, torch.randn(2, 6, 32))
    with torch.no_grad():
        plain = ours(*inputs).sample
        ours.optimize(cache_dir=tmp_path / "cache")
        ours.fuse_qkv_projections()
        torch.testing.assert_close(ours(*inputs).sample, plain, rtol=1e-5, atol=1e-5)
        assert all(m.fused_projections for m in ours.modules() if isinstance(m, Attention))
