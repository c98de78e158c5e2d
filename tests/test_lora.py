"""LoRA: kohya/A1111 and diffusers/PEFT files written here load into our pipeline with the numbers diffusers + peft
give (UNet through diffusers' load_lora_weights, text encoder through peft on transformers' CLIP); several adapters,
set_adapters weights, cross_attention_kwargs scale, fuse/unfuse (bit-exact restore), unload; the models' state
dict keys never change; bad files give errors naming the file and key."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import diffusekit
from diffusekit.loaders.lora import LoraError

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from sd_assets import CROSS_DIM, build_tiny_sd, load_both  # noqa: E402

UNET_PATHS = [
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2",
    "down_blocks.0.attentions.0.proj_in",  # 1x1 conv
    "down_blocks.0.resnets.0.conv1",  # 3x3 conv: LoCon
    "down_blocks.0.resnets.0.time_emb_proj",
    "mid_block.resnets.0.conv2",
    "up_blocks.1.resnets.0.conv_shortcut",
    "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v",
]
TE_PATHS = [
    "text_model.encoder.layers.0.self_attn.q_proj",
    "text_model.encoder.layers.1.self_attn.out_proj",
    "text_model.encoder.layers.2.mlp.fc1",
]


def random_lora(model, paths, fmt, prefix, rank=4, alpha=None, seed=0, std=0.2):
    """A random LoRA for ``paths`` of ``model`` in kohya (``lora_unet_...``) or PEFT (``unet.<path>.lora_A``) keys."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for path in paths:
        module = model.get_submodule(path)
        if isinstance(module, torch.nn.Conv2d):
            down = torch.randn(rank, module.in_channels, *module.kernel_size, generator=g) * std
            up = torch.randn(module.out_channels, rank, 1, 1, generator=g) * std
        else:
            down = torch.randn(rank, module.in_features, generator=g) * std
            up = torch.randn(module.out_features, rank, generator=g) * std
        if fmt == "kohya":
            name = prefix + path.replace(".", "_")
            sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = down, up
            if alpha is not None:
                sd[f"{name}.alpha"] = torch.tensor(float(alpha))
        else:
            sd[f"{prefix}{path}.lora_A.weight"], sd[f"{prefix}{path}.lora_B.weight"] = down, up
    return sd


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("sd-lora"))


@pytest.fixture
def pipes(sd_folder):
    return load_both(sd_folder)


def unet_inputs():
    g = torch.Generator().manual_seed(5)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]), torch.randn(2, 7, CROSS_DIM, generator=g)


def unet_out(pipe, **kwargs):
    x, t, ctx = unet_inputs()
    with torch.no_grad():
        return pipe.unet(x, t, encoder_hidden_states=ctx, **kwargs).sample


def test_kohya_locon_unet_matches_diffusers(pipes, tmp_path):
    ours, ref = pipes
    base = unet_out(ours)
    keys = list(ours.unet.state_dict())
    lora = random_lora(ours.unet, UNET_PATHS, "kohya", "lora_unet_", rank=4, alpha=2.0)
    save_file(lora, tmp_path / "style.safetensors")
    ours.load_lora_weights(tmp_path / "style.safetensors")
    ref.load_lora_weights(str(tmp_path), weight_name="style.safetensors")
    assert list(ours.unet.state_dict()) == keys  # no LoRA keys in the model: it saves as the base checkpoint
    assert ours.get_list_adapters() == {"unet": ["default_0"]} and ours.get_active_adapters() == ["default_0"]
    a = unet_out(ours)
    torch.testing.assert_close(a, unet_out(ref), rtol=1e-4, atol=1e-5)
    assert (a - base).abs().max() > 1e-2  # the LoRA changes the output
    half = unet_out(ours, cross_attention_kwargs={"scale": 0.5})
    torch.testing.assert_close(half, unet_out(ref, cross_attention_kwargs={"scale": 0.5}), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(unet_out(ours, cross_attention_kwargs={"scale": 0.0}), base, rtol=0, atol=1e-6)
    torch.testing.assert_close(unet_out(ours), a, rtol=0, atol=0)  # the scale was for that call only


def test_several_adapters_weights_fuse_unfuse_unload(pipes):
    ours, ref = pipes
    base = unet_out(ours)
    before = {k: v.clone() for k, v in ours.unet.state_dict().items()}
    peft_lora = random_lora(ours.unet, UNET_PATHS[:5], "peft", "unet.", rank=4, seed=1)
    kohya_lora = random_lora(ours.unet, UNET_PATHS[3:], "kohya", "lora_unet_", rank=2, alpha=1.0, seed=2)
    for pipe in (ours, ref):
        pipe.load_lora_weights(dict(peft_lora), adapter_name="toy")
        pipe.load_lora_weights(dict(kohya_lora), adapter_name="pixel")
    assert ours.get_active_adapters() == ref.get_active_adapters() == ["pixel"]  # the last loaded one
    torch.testing.assert_close(unet_out(ours), unet_out(ref), rtol=1e-4, atol=1e-5)
    for pipe in (ours, ref):
        pipe.set_adapters(["toy", "pixel"], adapter_weights=[0.7, 0.3])
    assert sorted(ours.get_active_adapters()) == ["pixel", "toy"]
    both = unet_out(ours)
    torch.testing.assert_close(both, unet_out(ref), rtol=1e-4, atol=1e-5)

    for pipe in (ours, ref):
        pipe.fuse_lora(lora_scale=0.8)
    fused = unet_out(ours)
    torch.testing.assert_close(fused, unet_out(ref), rtol=1e-4, atol=1e-5)
    changed = [k for k, v in ours.unet.state_dict().items() if not torch.equal(v, before[k])]
    assert sorted(changed) == sorted(f"{p}.weight" for p in UNET_PATHS)
    ours.unfuse_lora()
    assert all(torch.equal(v, before[k]) for k, v in ours.unet.state_dict().items())  # bit for bit
    torch.testing.assert_close(unet_out(ours), both, rtol=0, atol=0)

    ours.disable_lora()
    torch.testing.assert_close(unet_out(ours), base, rtol=0, atol=0)
    ours.enable_lora()
    ours.delete_adapters("toy")
    assert ours.get_list_adapters() == {"unet": ["pixel"]}
    ours.unload_lora_weights()
    assert ours.get_list_adapters() == {}
    torch.testing.assert_close(unet_out(ours), base, rtol=0, atol=0)


def _on_a_thread(fn):
    """``fn()`` run on a fresh thread, its result (or its exception) brought back."""
    import threading

    box = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised on the calling thread
            box["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive()
    if "error" in box:
        raise box["error"]
    return box["result"]


def test_switching_adapters_while_another_thread_runs_the_unet(pipes):
    """set_adapters / disable_lora on one thread while another runs the UNet: the running forward pass keeps the
    adapters it started with to its end (here the switch happens exactly halfway, at the mid block), the next one
    takes the new ones; never a mix of the two."""
    import threading

    ours, _ = pipes
    ours.load_lora_weights(random_lora(ours.unet, UNET_PATHS, "kohya", "lora_unet_", seed=3), adapter_name="a")
    ours.load_lora_weights(random_lora(ours.unet, UNET_PATHS, "kohya", "lora_unet_", seed=4), adapter_name="b")
    ours.set_adapters("b", 0.5)
    out_b = unet_out(ours)
    ours.disable_lora()
    base = unet_out(ours)
    ours.set_adapters("a")
    out_a = unet_out(ours)
    assert (out_a - out_b).abs().max() > 1e-2 and (out_b - base).abs().max() > 1e-2

    switches = [lambda: ours.set_adapters("b", 0.5), ours.disable_lora]

    def halfway(module, args):  # the switch runs (on its own thread) while this forward pass waits at mid_block
        if switches:
            _on_a_thread(switches.pop(0))

    handle = ours.unet.mid_block.register_forward_pre_hook(halfway)
    try:
        started_a = _on_a_thread(lambda: unet_out(ours))
        started_b = _on_a_thread(lambda: unet_out(ours))
        after = _on_a_thread(lambda: unet_out(ours))
    finally:
        handle.remove()
    torch.testing.assert_close(started_a, out_a, rtol=0, atol=0)
    torch.testing.assert_close(started_b, out_b, rtol=0, atol=0)
    torch.testing.assert_close(after, base, rtol=0, atol=0)

    # free running: one thread toggles a <-> b as fast as it can while another runs forward passes
    ours.set_adapters("a")
    stop = threading.Event()

    def toggle():
        i = 0
        while not stop.is_set():
            ours.set_adapters("b", 0.5) if i % 2 else ours.set_adapters("a")
            i += 1

    toggler = threading.Thread(target=toggle)
    toggler.start()
    try:
        outputs = [_on_a_thread(lambda: unet_out(ours)) for _ in range(6)]
    finally:
        stop.set()
        toggler.join()
    for out in outputs:
        assert torch.equal(out, out_a) or torch.equal(out, out_b)


def test_fuse_then_unload_keeps_the_fused_weights(pipes):
    ours, _ = pipes
    ours.load_lora_weights(random_lora(ours.unet, UNET_PATHS, "kohya", "lora_unet_", alpha=4.0))
    with_lora = unet_out(ours)
    ours.fuse_lora()
    ours.unload_lora_weights()
    torch.testing.assert_close(unet_out(ours), with_lora, rtol=1e-5, atol=1e-5)


def test_text_encoder_matches_peft(pipes, sd_folder):
    ours, _ = pipes
    lora = random_lora(ours.text_encoder, TE_PATHS, "kohya", "lora_te_", rank=4, alpha=2.0, seed=3)
    unet_lora = random_lora(ours.unet, UNET_PATHS[:2], "peft", "unet.", seed=4)
    ours.load_lora_weights({**lora, **unet_lora}, adapter_name="te")
    hf = transformers.CLIPTextModel.from_pretrained(sd_folder / "text_encoder").eval()
    strip = "" if hasattr(hf, "text_model") else "text_model."  # transformers 5 drops the text_model level
    targets = [p[len(strip):] for p in TE_PATHS]
    config = peft.LoraConfig(r=4, lora_alpha=2.0, target_modules=targets, lora_dropout=0.0)
    hf = peft.inject_adapter_in_model(config, hf, adapter_name="te")
    with torch.no_grad():
        for path, target in zip(TE_PATHS, targets):
            layer = hf.get_submodule(target)
            name = "lora_te_" + path.replace(".", "_")
            layer.lora_A["te"].weight.copy_(lora[f"{name}.lora_down.weight"])
            layer.lora_B["te"].weight.copy_(lora[f"{name}.lora_up.weight"])
    ids = ours.tokenizer(["a red sneaker"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(ours.text_encoder(ids)[0], hf(ids)[0], rtol=1e-5, atol=1e-5)
        for module in hf.modules():
            if isinstance(module, peft.tuners.lora.LoraLayer):
                module.scale_layer(0.5)
        expected = hf(ids)[0]
    embeds, _ = ours.encode_prompt("a red sneaker", do_classifier_free_guidance=False, lora_scale=0.5)
    torch.testing.assert_close(embeds, expected, rtol=1e-5, atol=1e-5)
    # a pipeline call's cross_attention_kwargs scale reaches the text encoder too (diffusers' lora_scale)
    kwargs = dict(num_inference_steps=2, output_type="np", guidance_scale=1.0)
    a = ours("a red sneaker", cross_attention_kwargs={"scale": 0.5}, generator=torch.manual_seed(0), **kwargs)
    b = ours(prompt_embeds=embeds, cross_attention_kwargs={"scale": 0.5}, generator=torch.manual_seed(0), **kwargs)
    np.testing.assert_allclose(a.images, b.images, atol=1e-6)
    from diffusekit.prompts import encode_prompt_a1111

    weighted, _ = encode_prompt_a1111(ours, "a red sneaker", lora_scale=0.5, do_classifier_free_guidance=False)
    torch.testing.assert_close(weighted, embeds, rtol=1e-5, atol=1e-5)


def test_pipeline_images_match_diffusers(pipes):
    ours, ref = pipes
    lora = random_lora(ours.unet, UNET_PATHS, "kohya", "lora_unet_", alpha=2.0, seed=6)
    for pipe in (ours, ref):
        pipe.load_lora_weights(dict(lora))
    kwargs = dict(prompt="a red sneaker", num_inference_steps=2, output_type="np",
                  cross_attention_kwargs={"scale": 0.7})
    a = ours(generator=torch.manual_seed(0), **kwargs).images
    b = ref(generator=torch.manual_seed(0), **kwargs).images
    assert np.abs(a - b).max() < 1 / 255


def test_bad_files_name_the_file_and_key(pipes, tmp_path):
    ours, _ = pipes
    good = random_lora(ours.unet, UNET_PATHS[:1], "kohya", "lora_unet_")
    cases = {
        "prefix": ({"lora_vae_decoder_conv_in.lora_down.weight": torch.zeros(4, 4)}, "not a LoRA key diffusekit knows"),
        "layer": ({k.replace("down_blocks_0", "down_blocks_7"): v for k, v in good.items()},
                  "names a layer 'down_blocks_7_attentions.*does not have: a LoRA for another model"),
        "width": (random_lora(torch.nn.ModuleDict({"x": torch.nn.Linear(64, 16)}), ["x"], "kohya",
                              "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q_"),
                  None),
        "rank": ({**good, next(k for k in good if "up" in k): torch.zeros(16, 3)}, "wrong ranks: .* rank 4 .* rank 3"),
        "missing": ({k: v for k, v in good.items() if "up" not in k}, "has no matching up weight"),
        "loha": ({"lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_a": torch.zeros(1)}, "LoHa"),
        "sdxl": ({"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 4)},
                 "text_encoder_2, which this pipeline does not have"),
    }
    wide = {k.replace("_x.", "."): v for k, v in cases["width"][0].items()}
    cases["width"] = (wide, r"has shape \(4, 64\), the layer needs \(rank, 16\)")
    for name, (state_dict, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(state_dict, path)
        with pytest.raises(LoraError, match=f"{name}.safetensors.*{message}"):
            ours.load_lora_weights(path)
    assert ours.get_list_adapters() == {}  # nothing half-loaded
    ours.load_lora_weights(good, adapter_name="x")
    with pytest.raises(LoraError, match="'x' is already loaded"):
        ours.load_lora_weights(good, adapter_name="x")
    with pytest.raises(LoraError, match=r"adapter\(s\) \['nope'\] are not loaded"):
        ours.set_adapters(["nope"])


def test_cli_lora_flag_and_prompt_tags(tmp_path):
    from PIL import Image

    from diffusekit.__main__ import main
    from diffusekit.infotext import GenerationParameters, read_parameters

    sd = "diffusekit-fashion-sd"
    unet = diffusekit.UNet2DConditionModel.from_pretrained(sd, subfolder="unet")
    lora = tmp_path / "redder.safetensors"
    save_file(random_lora(unet, ["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v",
                                 "up_blocks.1.resnets.0.conv1"], "kohya", "lora_unet_", alpha=4.0, std=0.5), lora)
    args = ["generate", sd, "--prompt", "a photo of a dress", "--num-images", "1", "--steps", "3", "--width", "32",
            "--height", "32"]
    plain, styled, again, tagged = (tmp_path / f"{n}.png" for n in ("plain", "styled", "again", "tagged"))
    assert main([*args, "--out", str(plain)]) == 0
    assert main([*args, "--lora", f"{lora}:0.8", "--out", str(styled)]) == 0
    pixels = lambda p: np.asarray(Image.open(p).convert("RGB"), dtype=int)  # noqa: E731
    assert not np.array_equal(pixels(plain), pixels(styled))
    params = GenerationParameters.from_infotext(read_parameters(styled))
    from diffusekit.infotext import lora_hash

    assert params.prompt == "a photo of a dress <lora:redder:0.8>"
    assert params.extra["Lora hashes"] == f"redder: {lora_hash(lora)}"  # A1111's (kohya "addnet") 12 digits
    # the PNG's tag gives the weight back; the file comes from --lora
    assert main(["generate", "--from-png", str(styled), "--lora", str(lora), "--out", str(again)]) == 0
    assert np.array_equal(pixels(again), pixels(styled))
    assert main([*args[:2], "--prompt", "a photo of a dress <lora:redder:0.8>", *args[4:], "--lora", str(lora),
                 "--out", str(tagged)]) == 0
    assert np.array_equal(pixels(tagged), pixels(styled))
    with pytest.raises(SystemExit, match="names <lora:other>, but no --lora file other.safetensors"):
        main([*args[:2], "--prompt", "x <lora:other:1>", *args[4:]])


def test_peft_text_encoder_keys_with_and_without_text_model(pipes):
    ours, _ = pipes
    lora = random_lora(ours.text_encoder, TE_PATHS, "peft", "text_encoder.", seed=7)
    ids = ours.tokenizer(["a red sneaker"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    ours.load_lora_weights(dict(lora), adapter_name="with")
    with torch.no_grad():
        expected = ours.text_encoder(ids)[0]
    ours.unload_lora_weights()
    short = {k.replace("text_encoder.text_model.", "text_encoder."): v for k, v in lora.items()}  # transformers 5
    ours.load_lora_weights(short, adapter_name="without")
    with torch.no_grad():
        torch.testing.assert_close(ours.text_encoder(ids)[0], expected, rtol=0, atol=0)


# kohya's SDXL names are the original (sgm) UNet's; written out here for the tiny SDXL UNet of sdxl_assets
# (layers_per_block 1: input_blocks 1 = down 0 resnet 0, 3 = down 1 layer 0; output_blocks 0, 1 = up 0 layers 0, 1)
SDXL_KOHYA = {
    "lora_unet_input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
    "lora_unet_input_blocks_3_1_transformer_blocks_1_attn2_to_k": "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k",
    "lora_unet_input_blocks_3_1_proj_in": "down_blocks.1.attentions.0.proj_in",
    "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_out_0": "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0",
    "lora_unet_output_blocks_0_1_transformer_blocks_0_ff_net_2": "up_blocks.0.attentions.0.transformer_blocks.0.ff.net.2",
    "lora_unet_output_blocks_1_0_emb_layers_1": "up_blocks.0.resnets.1.time_emb_proj",
    "lora_unet_output_blocks_1_0_skip_connection": "up_blocks.0.resnets.1.conv_shortcut",
}


def test_sdxl_kohya_original_names_and_both_text_encoders(tmp_path):
    from sdxl_assets import build_tiny_sdxl

    folder = build_tiny_sdxl(tmp_path / "sdxl")
    ours = diffusekit.StableDiffusionXLPipeline.from_pretrained(folder)
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
    g = torch.Generator().manual_seed(8)
    lora = {}
    for name, path in SDXL_KOHYA.items():
        module = ours.unet.get_submodule(path)
        conv = isinstance(module, torch.nn.Conv2d)
        fan_in, fan_out = (module.in_channels, module.out_channels) if conv else (module.in_features,
                                                                                  module.out_features)
        kernel = tuple(module.kernel_size) if conv else ()
        lora[f"{name}.lora_down.weight"] = torch.randn(4, fan_in, *kernel, generator=g) * 0.2
        lora[f"{name}.lora_up.weight"] = torch.randn(fan_out, 4, *((1, 1) if conv else ()), generator=g) * 0.2
        lora[f"{name}.alpha"] = torch.tensor(2.0)
    te = random_lora(ours.text_encoder, TE_PATHS[:1], "kohya", "lora_te1_", seed=9)
    te2 = random_lora(ours.text_encoder_2, TE_PATHS[1:], "kohya", "lora_te2_", seed=10)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 7, 64, generator=g)
    added = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.randn(2, 6, generator=g)}

    def out(pipe, **kwargs):
        with torch.no_grad():
            return pipe.unet(x, torch.tensor([3, 700]), encoder_hidden_states=ctx, added_cond_kwargs=added,
                             **kwargs).sample

    base = out(ours)
    ours.load_lora_weights({**lora, **te, **te2}, adapter_name="xl")
    ref.load_lora_weights(dict(lora), adapter_name="xl")  # diffusers' kohya text-encoder path needs transformers 4
    assert ours.get_list_adapters() == {"unet": ["xl"], "text_encoder": ["xl"], "text_encoder_2": ["xl"]}
    torch.testing.assert_close(out(ours), out(ref), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out(ours, cross_attention_kwargs={"scale": 0.3}),
                               out(ref, cross_attention_kwargs={"scale": 0.3}), rtol=1e-4, atol=1e-5)
    assert (out(ours) - base).abs().max() > 1e-2
    plain = ours.encode_prompt("a red sneaker", do_classifier_free_guidance=False, lora_scale=0.0)[0]
    scaled = ours.encode_prompt("a red sneaker", do_classifier_free_guidance=False)[0]
    assert (plain - scaled).abs().max() > 1e-3  # both text encoders' LoRAs act, and lora_scale reaches them
    ours.disable_lora()
    torch.testing.assert_close(ours.encode_prompt("a red sneaker", do_classifier_free_guidance=False)[0], plain,
                               rtol=0, atol=0)
