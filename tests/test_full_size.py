"""Full-size Stable Diffusion 1.5 VAE and CLIP ViT-L/14 text encoder with random weights (slow: `pytest -m slow`).

Folders saved by diffusers / transformers at the real architecture sizes must load strictly into diffusekit and give
the same forward outputs. The 860M-parameter UNet has its own slow test in test_unet_2d_condition.py.
"""

from __future__ import annotations

import pytest
import torch

import diffusekit

pytestmark = pytest.mark.slow

SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, sample_size=512,
    block_out_channels=(128, 256, 512, 512), act_fn="silu", scaling_factor=0.18215,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)


def test_sd15_vae_full_config(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(**SD15_VAE).eval()
    ref.save_pretrained(tmp_path / "vae")
    ours = diffusekit.AutoencoderKL.from_pretrained(tmp_path / "vae", use_safetensors=True)
    assert ours.num_parameters() == sum(p.numel() for p in ref.parameters())  # ~83.7M
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        a = ours.encode(image).latent_dist
        b = ref.encode(image).latent_dist
        torch.testing.assert_close(a.mean, b.mean, rtol=1e-4, atol=1e-4)
        latents = a.mean * ours.config.scaling_factor
        torch.testing.assert_close(ours.decode(latents / ours.config.scaling_factor).sample,
                                   ref.decode(latents / ref.config.scaling_factor).sample, rtol=1e-4, atol=1e-4)


def test_clip_vit_l14_text_encoder_full_config(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, bos_token_id=0, eos_token_id=2,
        pad_token_id=1,
    )
    ref = transformers.CLIPTextModel(config).eval()
    ref.save_pretrained(tmp_path / "text_encoder")
    ours = diffusekit.CLIPTextModel.from_pretrained(tmp_path / "text_encoder", use_safetensors=True)
    assert ours.num_parameters() == sum(p.numel() for p in ref.parameters())  # ~123M
    ids = torch.randint(0, 49405, (2, 77), generator=torch.Generator().manual_seed(1))
    ids[:, 0], ids[:, 20:] = 49406, 49407  # bos, then eos padding as SD 1.x tokenizes
    with torch.no_grad():
        a = ours(ids, output_hidden_states=True)
        b = ref(ids, output_hidden_states=True)
    torch.testing.assert_close(a.last_hidden_state, b.last_hidden_state, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a.pooler_output, b.pooler_output, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a.hidden_states[-2], b.hidden_states[-2], rtol=1e-4, atol=1e-4)
