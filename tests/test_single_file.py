"""Single-file checkpoints (original CompVis / Stability layout): parity with diffusers' ``from_single_file``, our
writer against an independent key table, round trips, architecture inference, and errors for bad files.

The reference conversion below is written from the layout of the released files (``v1-5-pruned.safetensors``:
``model.diffusion_model.input_blocks.N.M``, ``first_stage_model.encoder.down.N.block.M``,
``cond_stage_model.transformer.text_model.*``; ``v2-1_768-ema-pruned.safetensors``:
``cond_stage_model.model.transformer.resblocks.N.attn.in_proj_weight``), with loops of its own: it never calls
diffusekit's tables.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import diffusekit
from conftest import assert_close

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from sd_assets import build_tiny_sd  # noqa: E402
from sdxl_assets import WIDTH_2  # noqa: E402

# ---------------------------------------------------------------------------------------------------- reference table

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def reference_unet_prefixes(cfg) -> list[tuple]:
    """(diffusers prefix, original prefix, resnet renames or None), enumerated block by block."""
    layers, n = cfg["layers_per_block"], len(cfg["block_out_channels"])
    down_attn = [t.startswith("CrossAttn") for t in cfg["down_block_types"]]
    up_attn = [t.startswith("CrossAttn") for t in cfg["up_block_types"]]
    pairs = [("conv_in.", "input_blocks.0.0.", None), ("time_embedding.linear_1.", "time_embed.0.", None),
             ("time_embedding.linear_2.", "time_embed.2.", None), ("conv_norm_out.", "out.0.", None),
             ("conv_out.", "out.2.", None), ("add_embedding.linear_1.", "label_emb.0.0.", None),
             ("add_embedding.linear_2.", "label_emb.0.2.", None)]
    i = 1
    for b in range(n):
        for j in range(layers):
            pairs.append((f"down_blocks.{b}.resnets.{j}.", f"input_blocks.{i}.0.", RESNET))
            if down_attn[b]:
                pairs.append((f"down_blocks.{b}.attentions.{j}.", f"input_blocks.{i}.1.", None))
            i += 1
        if b != n - 1:
            pairs.append((f"down_blocks.{b}.downsamplers.0.conv.", f"input_blocks.{i}.0.op.", None))
            i += 1
    pairs += [("mid_block.resnets.0.", "middle_block.0.", RESNET), ("mid_block.attentions.0.", "middle_block.1.", None),
              ("mid_block.resnets.1.", "middle_block.2.", RESNET)]
    o = 0
    for b in range(n):
        for j in range(layers + 1):
            pairs.append((f"up_blocks.{b}.resnets.{j}.", f"output_blocks.{o}.0.", RESNET))
            if up_attn[b]:
                pairs.append((f"up_blocks.{b}.attentions.{j}.", f"output_blocks.{o}.1.", None))
            if j == layers and b != n - 1:
                slot = 2 if up_attn[b] else 1
                pairs.append((f"up_blocks.{b}.upsamplers.0.conv.", f"output_blocks.{o}.{slot}.conv.", None))
            o += 1
    return pairs


def reference_unet(sd, cfg) -> dict:
    pairs = reference_unet_prefixes(cfg)
    out = {}
    for key, value in sd.items():
        (dprefix, oprefix, renames), = [p for p in pairs if key.startswith(p[0])]
        rest = key[len(dprefix):]
        if renames:
            head, tail = rest.split(".", 1)
            rest = renames[head] + "." + tail
        out["model.diffusion_model." + oprefix + rest] = value
    return out


def reference_vae(sd, cfg) -> dict:
    n = len(cfg["block_out_channels"])
    out = {}
    for key, value in sd.items():
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", key)
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
        k = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
                   lambda m: f"decoder.up.{n - 1 - int(m[1])}.block.{m[2]}.", k)
        k = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{n - 1 - int(m[1])}.upsample.", k)
        k = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", k)
        if "mid_block.attentions.0." in k:
            k = k.replace("mid_block.attentions.0.", "mid.attn_1.")
            for a, b in (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                         ("to_out.0.", "proj_out.")):
                k = k.replace("attn_1." + a, "attn_1." + b)
            if value.ndim == 2:  # the original attention uses 1x1 convolutions
                value = value[:, :, None, None]
        k = k.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        out["first_stage_model." + k] = value
    return out


def reference_clip(sd, p="cond_stage_model.transformer.") -> dict:
    return {p + (k if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items()}


def reference_open_clip(sd, num_layers, extra_layer=True, p="cond_stage_model.model.") -> dict:
    """open_clip's text tower; ``extra_layer`` adds the unused last resblock + projection the released files have;
    a model's own projection (SDXL's bigG) is written as open_clip holds it, ``x @ text_projection``."""
    sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    out = {p + "token_embedding.weight": sd["embeddings.token_embedding.weight"],
           p + "positional_embedding": sd["embeddings.position_embedding.weight"],
           p + "ln_final.weight": sd["final_layer_norm.weight"], p + "ln_final.bias": sd["final_layer_norm.bias"]}
    for i in range(num_layers):
        s, r = f"encoder.layers.{i}.", f"{p}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[r + f"attn.in_proj_{kind}"] = torch.cat([sd[s + f"self_attn.{x}_proj.{kind}"] for x in "qkv"])
            out[r + f"attn.out_proj.{kind}"] = sd[s + f"self_attn.out_proj.{kind}"]
            out[r + f"ln_1.{kind}"] = sd[s + f"layer_norm1.{kind}"]
            out[r + f"ln_2.{kind}"] = sd[s + f"layer_norm2.{kind}"]
            out[r + f"mlp.c_fc.{kind}"] = sd[s + f"mlp.fc1.{kind}"]
            out[r + f"mlp.c_proj.{kind}"] = sd[s + f"mlp.fc2.{kind}"]
    if "text_projection.weight" in sd:
        out[p + "text_projection"] = sd["text_projection.weight"].T
    if extra_layer:
        g = torch.Generator().manual_seed(1)
        last = f"{p}transformer.resblocks.{num_layers}."
        for key in [k for k in out if k.startswith(f"{p}transformer.resblocks.0.")]:
            out[last + key.split("resblocks.0.", 1)[1]] = torch.randn(out[key].shape, generator=g)
        width = out[p + "token_embedding.weight"].shape[1]
        out[p + "text_projection"] = torch.randn(width, width, generator=g)
        out[p + "logit_scale"] = torch.tensor(4.6)
    return out


def reference_file(folder: Path, path: Path, open_clip=False, extras=True) -> Path:
    """Convert a diffusers-saved folder to the original single-file layout with the tables above."""
    def read(sub, name):
        cfg = json.loads((folder / sub / "config.json").read_text())
        return load_file(folder / sub / name), cfg

    unet, unet_cfg = read("unet", "diffusion_pytorch_model.safetensors")
    vae, vae_cfg = read("vae", "diffusion_pytorch_model.safetensors")
    text, text_cfg = read("text_encoder", "model.safetensors")
    tensors = {**reference_unet(unet, unet_cfg), **reference_vae(vae, vae_cfg)}
    tensors.update(reference_open_clip(text, text_cfg["num_hidden_layers"]) if open_clip else reference_clip(text))
    if extras:  # what the released files carry besides the weights
        tensors["alphas_cumprod"] = torch.linspace(1, 0.01, 1000)
        tensors["first_stage_model.loss.logvar"] = torch.zeros(())
        if not open_clip:
            tensors["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if path.suffix == ".safetensors":
        save_file(tensors, path)
    else:
        torch.save({"state_dict": tensors, "global_step": 1, "epoch": 0}, path)
    return path


# ---------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def v1(tmp_path_factory):
    root = tmp_path_factory.mktemp("sf_v1")
    folder = build_tiny_sd(root / "folder")
    return folder, reference_file(folder, root / "model.safetensors")


@pytest.fixture(scope="module")
def v2(tmp_path_factory):
    """SD 2.x: linear projections, upcast attention, v-prediction, an OpenCLIP (gelu) text encoder."""
    root = tmp_path_factory.mktemp("sf_v2")
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                        prediction_type="v_prediction")
    folder = build_tiny_sd(root / "folder", scheduler=scheduler, use_linear_projection=True, upcast_attention=True,
                           attention_head_dim=(2, 4), text_overrides={"hidden_act": "gelu"})
    return folder, reference_file(folder, root / "model.safetensors", open_clip=True)


def _unet_out(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    x = torch.randn(2, cfg.in_channels, 8, 8, generator=g)
    ctx = torch.randn(2, 5, cfg.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500]), encoder_hidden_states=ctx).sample


def _vae_out(vae):
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return vae.decode(vae.encode(x).latent_dist.mode()).sample


def _text_out(te):
    ids = torch.tensor([[998, 5, 17, 999, 999, 999]])
    with torch.no_grad():
        return te(ids)[0]


def _same_models(a, b, rtol=1e-5, atol=1e-5):
    assert_close(_unet_out(a.unet), _unet_out(b.unet), rtol=rtol, atol=atol)
    assert_close(_vae_out(a.vae), _vae_out(b.vae), rtol=rtol, atol=atol)
    assert_close(_text_out(a.text_encoder), _text_out(b.text_encoder), rtol=rtol, atol=atol)


def _images(pipe, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    if "image" not in kwargs:
        kwargs.update(height=16, width=16)
    return pipe(["a red sneaker"], num_inference_steps=3, output_type="np", generator=torch.manual_seed(0),
                **kwargs).images


# ---------------------------------------------------------------------------------------------------- writer


@pytest.mark.parametrize("which", ["v1", "v2"])
def test_writer_matches_the_reference_table(which, request):
    folder, reference = request.getfixturevalue(which)
    pipe = diffusekit.StableDiffusionPipeline.from_pretrained(folder)
    out = pipe.save_single_file(reference.parent / f"ours_{which}.safetensors")
    ours, ref = load_file(out), load_file(reference)
    ref = {k: v for k, v in ref.items() if not k.startswith(("alphas_cumprod", "first_stage_model.loss."))
           and not k.endswith("position_ids")}
    if which == "v2":  # the unused last OpenCLIP layer and projection are not in a diffusers model
        last = f"resblocks.{pipe.text_encoder.config.num_hidden_layers}."
        ref = {k: v for k, v in ref.items() if last not in k and not k.endswith(("text_projection", "logit_scale"))}
    assert sorted(ours) == sorted(ref)
    for key in ref:
        assert torch.equal(ours[key], ref[key]), key


# ---------------------------------------------------------------------------------------------------- parity


def test_v1_pipeline_matches_diffusers_from_single_file(v1):
    folder, path = v1
    ours = diffusekit.StableDiffusionPipeline.from_single_file(path, config=folder)
    ref = diffusers.StableDiffusionPipeline.from_single_file(path, config=str(folder), local_files_only=True,
                                                             safety_checker=None)
    assert type(ours.scheduler).__name__ == type(ref.scheduler).__name__
    _same_models(ours, ref)
    assert_close(_images(ours), _images(ref), rtol=1e-4, atol=1e-4)


def test_v2_open_clip_v_prediction_matches_diffusers(v2):
    folder, path = v2
    ours = diffusekit.StableDiffusionPipeline.from_single_file(path, config=folder)
    ref = diffusers.StableDiffusionPipeline.from_single_file(path, config=str(folder), local_files_only=True,
                                                             safety_checker=None)
    assert ours.unet.config.upcast_attention and ours.unet.config.use_linear_projection
    assert ours.scheduler.config.prediction_type == "v_prediction"
    assert ours.text_encoder.config.num_hidden_layers == ref.text_encoder.config.num_hidden_layers == 3
    _same_models(ours, ref)
    assert_close(_images(ours), _images(ref), rtol=1e-4, atol=1e-4)


def test_inpainting_nine_channel_checkpoint(tmp_path):
    folder = build_tiny_sd(tmp_path / "folder", unet_in_channels=9, pipeline="StableDiffusionInpaintPipeline")
    path = reference_file(folder, tmp_path / "inpaint.safetensors")
    ours = diffusekit.StableDiffusionInpaintPipeline.from_single_file(path, config=folder)
    ref = diffusers.StableDiffusionInpaintPipeline.from_single_file(path, config=str(folder), local_files_only=True,
                                                                    safety_checker=None)
    assert ours.unet.config.in_channels == 9
    _same_models(ours, ref)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    mask = (torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(4)) > 0.5).float()
    a = _images(ours, image=image, mask_image=mask)
    b = _images(ref, image=image, mask_image=mask)
    assert_close(a, b, rtol=1e-4, atol=1e-4)
    # inferred without config: the 9-channel UNet is recognised as an inpainting one
    from diffusekit.single_file import infer

    assert infer.detect_family({k: tuple(v.shape) for k, v in load_file(path).items()}) == "inpainting"
    from diffusekit.single_file.convert import load_any

    assert type(load_any(path, config=folder)).__name__ == "StableDiffusionInpaintPipeline"


def test_img2img_from_single_file(v1):
    folder, path = v1
    # PNDM (the folder's scheduler) differs from diffusers on purpose part-way (see PNDMScheduler): Euler here
    ours = diffusekit.StableDiffusionImg2ImgPipeline.from_single_file(
        path, config=folder, scheduler=diffusekit.EulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler"))
    ref = diffusers.StableDiffusionImg2ImgPipeline.from_single_file(
        path, config=str(folder), local_files_only=True, safety_checker=None,
        scheduler=diffusers.EulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler"))
    from PIL import Image

    pixels = (torch.rand(16, 16, 3, generator=torch.Generator().manual_seed(3)) * 255).to(torch.uint8).numpy()
    image = Image.fromarray(pixels)
    assert_close(_images(ours, image=image, strength=0.75), _images(ref, image=image, strength=0.75),
                 rtol=1e-4, atol=1e-4)


def test_model_classes_load_their_component(v1, v2):
    for folder, path in (v1, v2):
        for name, cls in (("unet", "UNet2DConditionModel"), ("vae", "AutoencoderKL")):
            ours = getattr(diffusekit, cls).from_single_file(path, config=folder, subfolder=name)
            ref = getattr(diffusers, cls).from_single_file(str(path), config=str(folder), subfolder=name,
                                                           local_files_only=True)
            out = _unet_out if name == "unet" else _vae_out
            assert_close(out(ours), out(ref))
        # the pipeline folder as config: the component's subfolder is found
        te = diffusekit.CLIPTextModel.from_single_file(path, config=folder)
        assert_close(_text_out(te), _text_out(diffusekit.CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")))


# ---------------------------------------------------------------------------------------------------- round trips


def test_round_trips_both_ways(v2, tmp_path):
    folder, path = v2
    # folder -> file -> folder: every tensor comes back bit for bit
    pipe = diffusekit.StableDiffusionPipeline.from_pretrained(folder)
    single = pipe.save_single_file(tmp_path / "a.safetensors")
    back = diffusekit.StableDiffusionPipeline.from_single_file(single, config=folder)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(pipe, name).state_dict(), getattr(back, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # file -> folder -> file: the same tensors (less what a diffusers model does not hold)
    back.save_pretrained(tmp_path / "folder")
    again = diffusekit.StableDiffusionPipeline.from_pretrained(tmp_path / "folder").save_single_file(
        tmp_path / "b.ckpt")
    first, second = load_file(single), torch.load(again, weights_only=True)["state_dict"]
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    # and diffusers reads the .ckpt we wrote
    ref = diffusers.StableDiffusionPipeline.from_single_file(str(again), config=str(folder), local_files_only=True,
                                                             safety_checker=None)
    _same_models(back, ref)


def test_ckpt_nesting_and_dtype(v1, tmp_path):
    folder, _ = v1
    path = reference_file(folder, tmp_path / "model.ckpt")
    pipe = diffusekit.StableDiffusionPipeline.from_single_file(path, config=folder, torch_dtype=torch.float16)
    assert {p.dtype for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters()} == {torch.float16}
    ref = diffusekit.StableDiffusionPipeline.from_pretrained(folder)
    a, b = pipe.unet.state_dict(), ref.unet.state_dict()
    assert all(torch.equal(a[k], b[k].half()) for k in a)


def test_ema_weights(v1, tmp_path):
    folder, path = v1
    tensors = load_file(path)
    ema = {}
    for key, value in tensors.items():
        if key.startswith("model.diffusion_model."):
            ema["model_ema." + "".join(key.split(".")[1:])] = value + 1.0  # Lightning's flattened EMA names
    ema["model_ema.decay"] = torch.tensor(0.9999)
    ema["model_ema.num_updates"] = torch.tensor(10, dtype=torch.int32)
    save_file({**tensors, **ema}, tmp_path / "ema.safetensors")
    plain = diffusekit.UNet2DConditionModel.from_single_file(tmp_path / "ema.safetensors", config=folder)
    averaged = diffusekit.UNet2DConditionModel.from_single_file(tmp_path / "ema.safetensors", config=folder,
                                                                extract_ema=True)
    ref = diffusers.UNet2DConditionModel.from_single_file(str(tmp_path / "ema.safetensors"), config=str(folder),
                                                          subfolder="unet", local_files_only=True, extract_ema=True)
    base = diffusekit.UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    k = "conv_in.weight"
    assert torch.equal(plain.state_dict()[k], base.state_dict()[k])  # non-EMA by default, as diffusers
    assert torch.equal(averaged.state_dict()[k], base.state_dict()[k] + 1.0)
    assert_close(_unet_out(averaged), _unet_out(ref))
    with pytest.raises(ValueError, match="no EMA weights"):
        diffusekit.UNet2DConditionModel.from_single_file(path, config=folder, extract_ema=True)


# ---------------------------------------------------------------------------------------------------- inference


def _tiny_sd_conventions(root, v2=False, vocab_size=1000):
    """Tiny models that keep what SD's weights do not show: 32 norm groups, 8 heads (SD 1.x) or 64-wide heads
    (SD 2.x), CLIP's 64-wide text heads."""
    unet = dict(block_out_channels=(64, 128), norm_num_groups=32, cross_attention_dim=64,
                attention_head_dim=(1, 2) if v2 else 8, use_linear_projection=v2, upcast_attention=v2)
    return build_tiny_sd(root, vae_overrides=dict(block_out_channels=(32, 64), norm_num_groups=32),
                         text_overrides=dict(hidden_size=64, num_attention_heads=1, projection_dim=64,
                                             hidden_act="gelu" if v2 else "quick_gelu", vocab_size=vocab_size),
                         **unet)


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_architecture_inferred_without_config(tmp_path, v2):
    # the SD 2.x model has CLIP's 49408-token vocabulary: its tokenizer comes from the one diffusekit ships
    folder = _tiny_sd_conventions(tmp_path / "folder", v2, vocab_size=49408 if v2 else 1000)
    path = reference_file(folder, tmp_path / "model.safetensors", open_clip=v2)
    if v2:
        pipe = diffusekit.StableDiffusionPipeline.from_single_file(path)
        assert pipe.tokenizer.pad_token == "!" and pipe.tokenizer.model_max_length == 77  # SD 2.x's tokenizer
        assert pipe.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    else:
        tokenizer = diffusekit.CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
        pipe = diffusekit.StableDiffusionPipeline.from_single_file(path, tokenizer=tokenizer)
    ref = diffusekit.StableDiffusionPipeline.from_pretrained(folder)
    for name in ("unet", "vae", "text_encoder"):
        got, want = getattr(pipe, name).config, getattr(ref, name).config
        keys = ["block_out_channels", "layers_per_block", "attention_head_dim", "cross_attention_dim",
                "use_linear_projection", "down_block_types", "up_block_types", "in_channels", "latent_channels",
                "hidden_size", "num_hidden_layers", "hidden_act", "intermediate_size", "norm_num_groups"]
        for key in keys:
            if key in want:
                assert list(np.atleast_1d(got[key])) == list(np.atleast_1d(want[key])), (name, key)
    _same_models(pipe, ref)
    assert pipe.scheduler.config.prediction_type == ("v_prediction" if v2 else "epsilon")
    assert type(pipe.scheduler).__name__ == ("DDIMScheduler" if v2 else "PNDMScheduler")
    assert pipe.unet.config.upcast_attention is v2
    if not v2:  # a 1000-token text encoder is not CLIP's: without config= the tokenizer must be passed
        with pytest.raises(ValueError, match="tokenizer="):
            diffusekit.StableDiffusionPipeline.from_single_file(path)


def test_original_config_yaml(tmp_path):
    folder = _tiny_sd_conventions(tmp_path / "folder")
    path = reference_file(folder, tmp_path / "model.safetensors")
    yaml_text = """
model:
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.0120
    timesteps: 1000
    scale_factor: 0.18215
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 32
        in_channels: 4
        out_channels: 4
        model_channels: 64
        attention_resolutions: [1]
        num_res_blocks: 1
        channel_mult: [1, 2]
        num_heads: 8
        use_spatial_transformer: True
        transformer_depth: 1
        context_dim: 64
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        ddconfig:
          double_z: true
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 32
          ch_mult: [1, 2]
          num_res_blocks: 1
          attn_resolutions: []
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder
"""
    yaml_path = tmp_path / "v1-inference.yaml"
    yaml_path.write_text(yaml_text)
    unet = diffusekit.UNet2DConditionModel.from_single_file(path, original_config=yaml_path)
    ref = diffusers.UNet2DConditionModel.from_single_file(str(path), original_config=str(yaml_path),
                                                          local_files_only=True)
    for key in ("block_out_channels", "down_block_types", "up_block_types", "attention_head_dim", "layers_per_block",
                "cross_attention_dim", "sample_size"):
        assert list(np.atleast_1d(unet.config[key])) == list(np.atleast_1d(ref.config[key])), key
    assert_close(_unet_out(unet), _unet_out(ref))
    vae = diffusekit.AutoencoderKL.from_single_file(path, original_config=yaml_path)
    ref_vae = diffusers.AutoencoderKL.from_single_file(str(path), original_config=str(yaml_path), local_files_only=True)
    assert vae.config.scaling_factor == ref_vae.config.scaling_factor == 0.18215
    assert_close(_vae_out(vae), _vae_out(ref_vae))
    pipe = diffusekit.StableDiffusionPipeline.from_single_file(
        path, original_config=yaml_path, tokenizer=diffusekit.CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"))
    assert pipe.scheduler.config.beta_end == 0.012 and pipe.scheduler.config.prediction_type == "epsilon"
    with pytest.raises(ValueError, match="not both"):
        diffusekit.UNet2DConditionModel.from_single_file(path, config=folder, original_config=yaml_path)


# ---------------------------------------------------------------------------------------------------- components


def test_missing_vae_needs_vae_argument(v1, tmp_path):
    folder, path = v1
    tensors = {k: v for k, v in load_file(path).items() if not k.startswith("first_stage_model.")}
    save_file(tensors, tmp_path / "novae.safetensors")
    with pytest.raises(ValueError, match=r"novae\.safetensors holds no VAE.*vae="):
        diffusekit.StableDiffusionPipeline.from_single_file(tmp_path / "novae.safetensors", config=folder)
    vae = diffusekit.AutoencoderKL.from_pretrained(folder, subfolder="vae")
    pipe = diffusekit.StableDiffusionPipeline.from_single_file(tmp_path / "novae.safetensors", config=folder, vae=vae)
    assert pipe.vae is vae


def test_standalone_vae_file(v1, tmp_path):
    folder, _ = v1
    vae = diffusekit.AutoencoderKL.from_pretrained(folder, subfolder="vae")
    out = vae.save_single_file(tmp_path / "vae-ft-mse.safetensors")
    keys = load_file(out)
    assert "encoder.conv_in.weight" in keys and not any(k.startswith("first_stage_model.") for k in keys)
    back = diffusekit.AutoencoderKL.from_single_file(out, config=folder, subfolder="vae")
    assert_close(_vae_out(back), _vae_out(vae), rtol=0, atol=0)
    ref = diffusers.AutoencoderKL.from_single_file(str(out), config=str(folder), subfolder="vae", local_files_only=True)
    assert_close(_vae_out(back), _vae_out(ref))


# ---------------------------------------------------------------------------------------------------- bad files


def test_truncated_file_names_the_file(v1, tmp_path):
    _, path = v1
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.safetensors.*truncated"):
        diffusekit.StableDiffusionPipeline.from_single_file(tmp_path / "cut.safetensors")


class _Payload:
    def __reduce__(self):
        return (print, ("code from a checkpoint ran",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_ckpt_with_code_is_refused(v1, tmp_path, capsys):
    _, path = v1
    bad = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "callbacks": _Payload()}, bad)
    with pytest.raises(ValueError, match=r"refusing to load .*evil\.ckpt"):
        diffusekit.StableDiffusionPipeline.from_single_file(bad)
    assert "code from a checkpoint ran" not in capsys.readouterr().out
    # a pickle that is not even a torch file
    (tmp_path / "raw.ckpt").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ValueError, match=r"raw\.ckpt"):
        diffusekit.UNet2DConditionModel.from_single_file(tmp_path / "raw.ckpt")


def test_wrong_model_names_file_and_key(v1, tmp_path):
    folder, path = v1
    vae_only = diffusekit.AutoencoderKL.from_pretrained(folder, subfolder="vae").save_single_file(tmp_path / "v.safetensors")
    with pytest.raises(ValueError, match=r"v\.safetensors holds no UNet .*model\.diffusion_model\.input_blocks\.0\.0\.weight"):
        diffusekit.UNet2DConditionModel.from_single_file(vae_only)
    # a config of another architecture: the diff names the file and the keys
    other = build_tiny_sd(tmp_path / "other", block_out_channels=(16, 16))
    with pytest.raises(ValueError, match=r"(?s)model\.safetensors.*does not match.*model\.diffusion_model\.input_blocks"):
        diffusekit.UNet2DConditionModel.from_single_file(path, config=other, subfolder="unet")
    # an SDXL file is recognised and refused clearly
    save_file({"conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": torch.zeros(2),
               "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 4, 3, 3)}, tmp_path / "xl.safetensors")
    with pytest.raises(ValueError, match="SDXL"):
        diffusekit.StableDiffusionPipeline.from_single_file(tmp_path / "xl.safetensors")
    with pytest.raises(FileNotFoundError):
        diffusekit.StableDiffusionPipeline.from_single_file(tmp_path / "nope.safetensors")
    # a LoRA file is named as one
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 16)},
              tmp_path / "lora.safetensors")
    with pytest.raises(ValueError, match=r"lora\.safetensors holds no UNet.*LoRA.*load_lora_weights"):
        diffusekit.StableDiffusionPipeline.from_single_file(tmp_path / "lora.safetensors")


# ---------------------------------------------------------------------------------------------------- CLI


def test_cli_convert_both_ways(v1, tmp_path):
    from diffusekit.__main__ import main

    folder, path = v1
    assert main(["convert", str(path), str(tmp_path / "out"), "--config", str(folder)]) == 0
    index = json.loads((tmp_path / "out" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["requires_safety_checker"] is False
    ref = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "out")  # diffusers reads the folder
    ours = diffusekit.StableDiffusionPipeline.from_pretrained(folder)
    _same_models(ours, ref)
    # back to one file, in float16: the reference file's tensors
    assert main(["convert", str(tmp_path / "out"), str(tmp_path / "back.safetensors"), "--half"]) == 0
    back, ref_file = load_file(tmp_path / "back.safetensors"), load_file(path)
    assert all(back[k].dtype == torch.float16 and torch.equal(back[k], ref_file[k].half()) for k in back)
    # a file to a file: .ckpt -> .safetensors
    assert main(["convert", str(tmp_path / "back.safetensors"), str(tmp_path / "again.ckpt"), "--config",
                 str(folder)]) == 0
    assert torch.load(tmp_path / "again.ckpt", weights_only=True)["state_dict"].keys() == back.keys()
    # nothing is overwritten by accident, and errors are one line on stderr
    assert main(["convert", str(path), str(tmp_path / "out"), "--config", str(folder)]) == 2
    assert main(["convert", str(path), str(tmp_path / "out"), "--config", str(folder), "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging leftovers


# ---------------------------------------------------------------------------------------------------- SDXL


def reference_xl_file(folder: Path, path: Path, refiner=False) -> Path:
    """sd_xl_base_1.0's layout: conditioner.embedders.0.transformer (CLIP-L), .1.model (bigG); the refiner has
    bigG alone at conditioner.embedders.0.model."""
    def read(sub, name):
        return load_file(folder / sub / name), json.loads((folder / sub / "config.json").read_text())

    unet, unet_cfg = read("unet", "diffusion_pytorch_model.safetensors")
    vae, vae_cfg = read("vae", "diffusion_pytorch_model.safetensors")
    big, big_cfg = read("text_encoder_2", "model.safetensors")
    tensors = {**reference_unet(unet, unet_cfg), **reference_vae(vae, vae_cfg)}
    tensors.update(reference_open_clip(big, big_cfg["num_hidden_layers"], extra_layer=False,
                                       p=f"conditioner.embedders.{0 if refiner else 1}.model."))
    if not refiner:
        tensors.update(reference_clip(read("text_encoder", "model.safetensors")[0],
                                      p="conditioner.embedders.0.transformer."))
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    return path


def _xl_unet_out(unet):
    g = torch.Generator().manual_seed(0)
    cfg = unet.config
    x = torch.randn(2, cfg.in_channels, 8, 8, generator=g)
    ctx = torch.randn(2, 5, cfg.cross_attention_dim, generator=g)
    ids = (cfg.projection_class_embeddings_input_dim - WIDTH_2) // cfg.addition_time_embed_dim
    cond = {"text_embeds": torch.randn(2, WIDTH_2, generator=g), "time_ids": torch.randn(2, ids, generator=g)}
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500]), encoder_hidden_states=ctx, added_cond_kwargs=cond).sample


def _same_xl_models(a, b):
    assert_close(_xl_unet_out(a.unet), _xl_unet_out(b.unet))
    assert_close(_vae_out(a.vae), _vae_out(b.vae))
    for name in ("text_encoder", "text_encoder_2"):
        if getattr(b, name) is None:
            assert getattr(a, name) is None
            continue
        ids = torch.tensor([[998, 5, 17, 999, 999, 999]])
        with torch.no_grad():
            x, y = getattr(a, name)(ids, output_hidden_states=True), getattr(b, name)(ids, output_hidden_states=True)
        assert_close(x[0], y[0])
        assert_close(x.hidden_states[-2], y.hidden_states[-2])


@pytest.mark.parametrize("refiner", [False, True], ids=["base", "refiner"])
def test_sdxl_matches_diffusers_and_the_reference_table(tmp_path, refiner, monkeypatch):
    import sdxl_assets

    # diffusers tells SDXL's two text encoders apart by width (768 vs 1280): the tiny ones must differ too
    monkeypatch.setattr(sdxl_assets, "WIDTH_1", 24)
    build_tiny_sdxl = sdxl_assets.build_tiny_sdxl
    name = "StableDiffusionXLImg2ImgPipeline" if refiner else "StableDiffusionXLPipeline"
    folder = build_tiny_sdxl(tmp_path / "folder", pipeline=name, refiner=refiner)
    path = reference_xl_file(folder, tmp_path / "xl.safetensors", refiner=refiner)
    ours = getattr(diffusekit, name).from_single_file(path, config=folder)
    ref = getattr(diffusers, name).from_single_file(str(path), config=str(folder), local_files_only=True)
    _same_xl_models(ours, ref)
    kwargs = {"image": _pil(16), "strength": 0.75} if refiner else {"height": 16, "width": 16}
    a = ours(["a red sneaker"], num_inference_steps=3, output_type="np", generator=torch.manual_seed(0), **kwargs)
    b = ref(["a red sneaker"], num_inference_steps=3, output_type="np", generator=torch.manual_seed(0), **kwargs)
    assert_close(a.images, b.images, rtol=1e-4, atol=1e-4)
    # our writer gives the reference file, and the folder comes back bit for bit
    written = load_file(diffusekit.DiffusionPipeline.from_pretrained(folder).save_single_file(tmp_path / "ours.safetensors"))
    reference = load_file(path)
    assert sorted(written) == sorted(reference) and all(torch.equal(written[k], reference[k]) for k in reference)
    # without config: the architecture comes from the shapes (tokenizers passed: the tiny vocabulary is not CLIP's;
    # what the weights cannot show and differs from SDXL's is passed too)
    tokenizers = {t: diffusekit.CLIPTokenizer.from_pretrained(folder, subfolder=t)
                  for t in (["tokenizer_2"] if refiner else ["tokenizer", "tokenizer_2"])}
    # the text encoders' head counts are not in the weights either: the model classes take them as overrides
    encoders = {"text_encoder_2": diffusekit.CLIPTextModelWithProjection.from_single_file(path, num_attention_heads=4)}
    if not refiner:
        encoders["text_encoder"] = diffusekit.CLIPTextModel.from_single_file(path, num_attention_heads=4)
    inferred = getattr(diffusekit, name).from_single_file(path, norm_num_groups=8, addition_time_embed_dim=8,
                                                         attention_head_dim=(2, 4), **tokenizers,
                                                         **encoders)
    for key in ("transformer_layers_per_block", "projection_class_embeddings_input_dim",
                "cross_attention_dim", "addition_embed_type", "use_linear_projection"):
        assert list(np.atleast_1d(inferred.unet.config[key])) == list(np.atleast_1d(ref.unet.config[key])), key
    _same_xl_models(inferred, ours)
    assert inferred.vae.config.scaling_factor == 0.13025
    assert type(inferred.scheduler).__name__ == "EulerDiscreteScheduler"
    if refiner:
        assert inferred.text_encoder is None and inferred.tokenizer is None
    # an SDXL file is not an SD 1.x/2.x one; `diffusekit generate FILE` picks the file's pipeline class
    with pytest.raises(ValueError, match="SDXL"):
        diffusekit.StableDiffusionPipeline.from_single_file(path)
    from diffusekit.cli.generate import load_pipeline

    loaded, model_name, digest = load_pipeline(str(path), "cpu", str(folder))
    assert type(loaded).__name__ == name and model_name == "xl" and len(digest) == 10


def _pil(size):
    from PIL import Image

    pixels = (torch.rand(size, size, 3, generator=torch.Generator().manual_seed(3)) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)
