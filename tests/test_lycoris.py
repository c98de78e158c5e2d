"""LyCORIS LoHa / LoKr / full / (IA)³ / norm layers (and DoRA's ``dora_scale``) in the LoRA loader: files written
here in kohya / LyCORIS keys (``lora_unet_<layer>.hada_w1_a`` ..., ``.lokr_w1`` ..., ``.alpha``, with kohya's
``ss_network_module`` metadata) load with the numbers peft's LoHa / LoKr / (IA)³ layers give for the same tensors
(UNet outputs of diffusers + peft, CLIP outputs of transformers + peft, per-layer weight deltas); BOFT, OFT and
GLoRA files as the LyCORIS package saves them load with the weights its own modules merge; the LoKr full-matrix
scale, full / norm differences, DoRA and the older OFT / GLoRA layouts against the formulas of LyCORIS / A1111
written out here; set_adapters weights, fuse / unfuse / unload, the CLI's ``<lora:name:w>`` tag and hash; malformed
files name the file and key."""

from __future__ import annotations

import json

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
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2",
    "down_blocks.0.attentions.0.proj_in",  # 1x1 conv
    "down_blocks.0.resnets.0.conv1",  # 3x3 conv (16 -> 16)
    "down_blocks.0.resnets.0.time_emb_proj",
    "mid_block.resnets.0.conv2",  # 3x3 conv (32 -> 32)
    "up_blocks.1.resnets.0.conv_shortcut",
    "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v",
]
TE_PATHS = [
    "text_model.encoder.layers.0.self_attn.q_proj",
    "text_model.encoder.layers.1.self_attn.out_proj",
    "text_model.encoder.layers.2.mlp.fc1",  # 32 -> 37 (a prime: LoKr factors 1 x 37)
]


def kohya_metadata(algo: str, dim: int, alpha: float) -> dict[str, str]:
    """The metadata kohya's trainer writes for a LyCORIS network (``--network_module lycoris.kohya``)."""
    return {"ss_network_module": "lycoris.kohya", "ss_network_dim": str(dim), "ss_network_alpha": str(alpha),
            "ss_network_args": json.dumps({"algo": algo, "conv_dim": str(dim), "conv_alpha": str(alpha)})}


def peft_file(model, config, paths, prefix, alpha, seed, std=0.3, strip=""):
    """Inject peft LoHa / LoKr layers for ``paths`` into ``model``, fill them with random numbers, and return them
    as a kohya / LyCORIS state dict (``prefix + path with _`` + ``.hada_w1_a`` ...; peft's parameter names and
    shapes are LyCORIS's)."""
    targets = [p[len(strip):] if p.startswith(strip) else p for p in paths]
    config.target_modules = targets
    peft.inject_adapter_in_model(config, model, adapter_name="x")
    g = torch.Generator().manual_seed(seed)
    sd = {}
    with torch.no_grad():
        for path, target in zip(paths, targets):
            layer = model.get_submodule(target)
            name = prefix + path.replace(".", "_")
            for part in layer.adapter_layer_names:
                params = getattr(layer, part)
                if "x" in params:
                    params["x"].copy_(torch.randn(params["x"].shape, generator=g) * std)
                    sd[f"{name}.{part}"] = params["x"].detach().clone()
            sd[f"{name}.alpha"] = torch.tensor(float(alpha))
    return sd


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("sd-lycoris"))


@pytest.fixture
def pipes(sd_folder):
    return load_both(sd_folder)


def unet_out(unet, **kwargs):
    g = torch.Generator().manual_seed(5)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 7, CROSS_DIM, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500]), encoder_hidden_states=ctx, **kwargs).sample


def peft_layers(model):
    return [m for m in model.modules() if isinstance(m, peft.tuners.lycoris_utils.LycorisLayer)]


def load_weighted_and_fuse(pipe, state_dict, name, weight, paths):
    """Load ``state_dict`` as adapter ``name`` at ``weight``, check that it changes the UNet's output, fuse it;
    returns the weights of ``paths`` before and the unfused output."""
    weights = {p: pipe.unet.get_submodule(p).weight.detach().clone() for p in paths}
    before = unet_out(pipe.unet)
    pipe.load_lora_weights(state_dict, adapter_name=name)
    pipe.set_adapters(name, weight)
    unfused = unet_out(pipe.unet)
    assert (unfused - before).abs().max() > 1e-2
    pipe.fuse_lora()
    return weights, unfused


CONFIGS = {
    # LoHa on Linear and 1x1 convs, CP / Tucker (hada_t1 / hada_t2) on the 3x3 convs
    "loha": lambda: peft.LoHaConfig(r=4, alpha=2.0, use_effective_conv2d=True, init_weights=False),
    "loha-plain-conv": lambda: peft.LoHaConfig(r=2, alpha=3.0, init_weights=False),
    # LoKr with a low-rank w1 and w2 and the Tucker w2 (lokr_t2) on 3x3 convs
    "lokr": lambda: peft.LoKrConfig(r=1, alpha=0.5, decompose_both=True, use_effective_conv2d=True,
                                    init_weights=False),
    # LoKr with a full w1, and w2 full on the 16-channel layers, low-rank / Tucker (rank 2) on the 32-channel ones
    # (alpha = rank: peft scales full factors by alpha / rank, LyCORIS and A1111 do not)
    "lokr-tucker": lambda: peft.LoKrConfig(r=2, alpha=2.0, use_effective_conv2d=True, init_weights=False),
    # LoKr with full w1 and w2 where the rank is large
    "lokr-full": lambda: peft.LoKrConfig(r=8, alpha=8.0, decompose_factor=4, init_weights=False),
}


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_unet_matches_peft(pipes, tmp_path, kind):
    ours, ref = pipes
    base = unet_out(ours.unet)
    keys = list(ours.unet.state_dict())
    config = CONFIGS[kind]()
    lyco = peft_file(ref.unet, config, UNET_PATHS, "lora_unet_", config.alpha, seed=1, std=0.4)
    parts = {k.rsplit(".", 1)[1] for k in lyco}
    expected_parts = {
        "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha"},
        "loha-plain-conv": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
        "lokr": {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha"},
        "lokr-tucker": {"lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha"},
        "lokr-full": {"lokr_w1", "lokr_w2", "alpha"},
    }[kind]
    assert parts == expected_parts  # every layout of the kind is exercised
    file = tmp_path / f"{kind}.safetensors"
    save_file(lyco, file, metadata=kohya_metadata(kind[:4], config.r, config.alpha))
    ours.load_lora_weights(file, adapter_name="lyco")
    assert list(ours.unet.state_dict()) == keys
    assert ours.get_list_adapters() == {"unet": ["lyco"]}
    with_adapter = unet_out(ours.unet)
    torch.testing.assert_close(with_adapter, unet_out(ref.unet), rtol=1e-4, atol=1e-5)
    assert (with_adapter - base).abs().max() > 1e-2
    # the call scale (diffusers scales peft's LyCORIS layers through cross_attention_kwargs too)
    torch.testing.assert_close(unet_out(ours.unet, cross_attention_kwargs={"scale": 0.5}),
                               unet_out(ref.unet, cross_attention_kwargs={"scale": 0.5}), rtol=1e-4, atol=1e-5)
    # an adapter weight (set_adapters; A1111's <lora:name:0.6>) is peft's set_scale
    ours.set_adapters("lyco", 0.6)
    for layer in peft_layers(ref.unet):
        layer.set_scale("x", 0.6)
    weighted = unet_out(ours.unet)
    torch.testing.assert_close(weighted, unet_out(ref.unet), rtol=1e-4, atol=1e-5)
    # fused: the same numbers from the weights; unfuse restores them bit for bit; unload keeps fused weights
    before = {k: v.clone() for k, v in ours.unet.state_dict().items()}
    ours.fuse_lora()
    torch.testing.assert_close(unet_out(ours.unet), weighted, rtol=1e-4, atol=1e-5)
    changed = [k for k, v in ours.unet.state_dict().items() if not torch.equal(v, before[k])]
    assert sorted(changed) == sorted(f"{p}.weight" for p in UNET_PATHS)
    ours.unfuse_lora()
    assert all(torch.equal(v, before[k]) for k, v in ours.unet.state_dict().items())
    torch.testing.assert_close(unet_out(ours.unet), weighted, rtol=0, atol=0)
    ours.unload_lora_weights()
    torch.testing.assert_close(unet_out(ours.unet), base, rtol=0, atol=0)


def test_two_kinds_together_fuse_to_peft_deltas(pipes):
    """LoHa and LoKr active at once with adapter weights: the fused weights are the base plus each adapter's
    weight times peft's delta for its tensors."""
    ours, ref = pipes
    loha = peft_file(ref.unet, CONFIGS["loha"](), UNET_PATHS[:6], "lora_unet_", 2.0, seed=2)
    expected = {}
    with torch.no_grad():
        for layer_path in UNET_PATHS[:6]:
            layer = ref.unet.get_submodule(layer_path)
            expected[layer_path] = 0.7 * layer.get_delta_weight("x")
    fresh = diffusers.UNet2DConditionModel.from_config(ref.unet.config)
    lokr = peft_file(fresh, CONFIGS["lokr"](), UNET_PATHS[3:], "lora_unet_", 0.5, seed=3)
    with torch.no_grad():
        for layer_path in UNET_PATHS[3:]:
            delta = 0.3 * fresh.get_submodule(layer_path).get_delta_weight("x")
            expected[layer_path] = expected.get(layer_path, 0) + delta
    ours.load_lora_weights(loha, adapter_name="hada")
    ours.load_lora_weights(lokr, adapter_name="kron")
    ours.set_adapters(["hada", "kron"], adapter_weights=[0.7, 0.3])
    unfused = unet_out(ours.unet)
    base = {p: ours.unet.get_submodule(p).weight.detach().clone() for p in UNET_PATHS}
    ours.fuse_lora()
    for layer_path in UNET_PATHS:
        torch.testing.assert_close(ours.unet.get_submodule(layer_path).weight - base[layer_path],
                                   expected[layer_path], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(unet_out(ours.unet), unfused, rtol=1e-4, atol=1e-5)


def test_lokr_full_factors_ignore_alpha_and_low_rank_ones_use_it(pipes):
    """LyCORIS / A1111: ``kron(w1, w2)`` as it is when both factors are full (whatever the alpha), times
    ``alpha / rank`` when one is low-rank. Written out here from the LyCORIS definition."""
    ours, _ = pipes
    g = torch.Generator().manual_seed(4)
    linear, conv = UNET_PATHS[0], UNET_PATHS[4]  # (16, 16) Linear, (16, 16, 3, 3) conv
    name = {p: "lora_unet_" + p.replace(".", "_") for p in (linear, conv)}
    w1, w2 = torch.randn(4, 2, generator=g), torch.randn(4, 8, generator=g)
    c1, c2a, c2b = torch.randn(2, 4, generator=g), torch.randn(8, 3, generator=g), torch.randn(3, 4 * 9, generator=g)
    sd = {f"{name[linear]}.lokr_w1": w1, f"{name[linear]}.lokr_w2": w2, f"{name[linear]}.alpha": torch.tensor(5.0),
          f"{name[conv]}.lokr_w1": c1, f"{name[conv]}.lokr_w2_a": c2a, f"{name[conv]}.lokr_w2_b": c2b,
          f"{name[conv]}.alpha": torch.tensor(6.0)}
    base = {p: ours.unet.get_submodule(p).weight.detach().clone() for p in (linear, conv)}
    ours.load_lora_weights(sd)
    ours.fuse_lora()
    # kron by hand: [i*b + j, m*d + n] = w1[i, m] * w2[j, n]
    want_linear = torch.einsum("im,jn->ijmn", w1, w2).reshape(16, 16)
    torch.testing.assert_close(ours.unet.get_submodule(linear).weight - base[linear], want_linear, rtol=1e-5,
                               atol=1e-6)
    w2_conv = (c2a @ c2b).reshape(8, 4, 3, 3)
    want_conv = torch.einsum("im,jnpq->ijmnpq", c1, w2_conv).reshape(16, 16, 3, 3) * (6.0 / 3)
    torch.testing.assert_close(ours.unet.get_submodule(conv).weight - base[conv], want_conv, rtol=1e-5, atol=1e-6)


def test_locon_with_a_cp_middle(pipes):
    """LyCORIS LoCon with ``lora_mid`` (CP / Tucker convolutions): ΔW[:, :, k, l] = up @ mid[:, :, k, l] @ down
    (A1111's ``rebuild_cp_decomposition``), scale alpha / rank; the unfused layers (1x1 down, the middle with the
    layer's stride and padding, 1x1 up) give the fused weights' output."""
    ours, _ = pipes
    g = torch.Generator().manual_seed(11)
    paths = [UNET_PATHS[4], UNET_PATHS[6], "down_blocks.0.downsamplers.0.conv"]  # 3x3; 32 channels; stride 2
    sd, want = {}, {}
    for path in paths:
        module = ours.unet.get_submodule(path)
        assert module.kernel_size == (3, 3)
        name = "lora_unet_" + path.replace(".", "_")
        down = torch.randn(3, module.in_channels, 1, 1, generator=g) * 0.3
        mid = torch.randn(2, 3, 3, 3, generator=g) * 0.3  # (rank of up, rank of down, k, k)
        up = torch.randn(module.out_channels, 2, 1, 1, generator=g) * 0.3
        sd |= {f"{name}.lora_down.weight": down, f"{name}.lora_mid.weight": mid, f"{name}.lora_up.weight": up,
               f"{name}.alpha": torch.tensor(1.5)}
        delta = torch.empty(module.out_channels, module.in_channels, 3, 3)
        for k in range(3):
            for j in range(3):
                delta[:, :, k, j] = up[:, :, 0, 0] @ mid[:, :, k, j] @ down[:, :, 0, 0]
        want[path] = delta * (1.5 / 3)  # alpha / rank, rank = lora_down's
    base, unfused = load_weighted_and_fuse(ours, sd, "cp", 0.8, paths)
    for path in paths:
        torch.testing.assert_close(ours.unet.get_submodule(path).weight - base[path], 0.8 * want[path], rtol=1e-5,
                                   atol=1e-6)
    torch.testing.assert_close(unet_out(ours.unet), unfused, rtol=1e-4, atol=1e-5)


def a1111_dora(base, delta, magnitude, multiplier, rows=None):
    """A1111's ``apply_weight_decompose`` then the multiplier (``network.py``), column norms for (1, in) and row
    norms for (out, 1) magnitudes (LyCORIS's ``wd_on_out``; ``rows`` says which for a (1, 1) magnitude)."""
    merged = base + delta
    if not (magnitude.shape[0] != 1 if rows is None else rows):
        norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(merged.shape[1], *[1] * (base.ndim - 1)).transpose(0, 1)
    else:
        norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (base.ndim - 1))
    return (merged * (magnitude / norm) - base) * multiplier


def test_dora_scale_as_a1111(pipes):
    ours, _ = pipes
    g = torch.Generator().manual_seed(6)
    lin, conv, conv2 = UNET_PATHS[1], UNET_PATHS[4], UNET_PATHS[6]  # to_k (16 <- 32), 3x3 16->16, 3x3 32->32
    names = {p: "lora_unet_" + p.replace(".", "_") for p in (lin, conv, conv2)}
    weights = {p: ours.unet.get_submodule(p).weight.detach().clone() for p in (lin, conv, conv2)}
    sd, deltas, mags = {}, {}, {}
    # LoRA (kohya keys) + column-norm dora_scale (1, in)
    down, up = torch.randn(2, 32, generator=g) * 0.3, torch.randn(16, 2, generator=g) * 0.3
    sd |= {f"{names[lin]}.lora_down.weight": down, f"{names[lin]}.lora_up.weight": up,
           f"{names[lin]}.alpha": torch.tensor(1.0)}
    deltas[lin] = (up @ down) * 0.5
    mags[lin] = weights[lin].norm(dim=0, keepdim=True) * (1 + 0.2 * torch.rand(1, 32, generator=g))
    # LoHa + column-norm dora_scale (1, in, 1, 1)
    h = [torch.randn(s, generator=g) * 0.3 for s in ((16, 2), (2, 144), (16, 2), (2, 144))]
    sd |= {f"{names[conv]}.hada_{n}": t for n, t in zip(("w1_a", "w1_b", "w2_a", "w2_b"), h)}
    deltas[conv] = ((h[0] @ h[1]) * (h[2] @ h[3])).reshape(16, 16, 3, 3)
    mags[conv] = torch.rand(1, 16, 1, 1, generator=g) + 0.5
    # LoKr + row-norm dora_scale (out, 1, 1, 1) (LyCORIS wd_on_out)
    k1, k2 = torch.randn(4, 4, generator=g) * 0.3, torch.randn(8, 8, 3, 3, generator=g) * 0.3
    sd |= {f"{names[conv2]}.lokr_w1": k1, f"{names[conv2]}.lokr_w2": k2}
    deltas[conv2] = torch.einsum("im,jnpq->ijmnpq", k1, k2).reshape(32, 32, 3, 3)
    mags[conv2] = torch.rand(32, 1, 1, 1, generator=g) + 0.5
    for p in (lin, conv, conv2):
        sd[f"{names[p]}.dora_scale"] = mags[p]
    before = unet_out(ours.unet)
    ours.load_lora_weights(sd, adapter_name="dora")
    ours.set_adapters("dora", 0.6)
    unfused = unet_out(ours.unet)
    assert (unfused - before).abs().max() > 1e-2
    ours.fuse_lora()
    for p in (lin, conv, conv2):
        want = a1111_dora(weights[p], deltas[p], mags[p], 0.6)
        torch.testing.assert_close(ours.unet.get_submodule(p).weight - weights[p], want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(unet_out(ours.unet), unfused, rtol=1e-4, atol=1e-5)  # hooks = fused weights
    # at weight 1 the layer's weight is exactly the magnitude times the direction
    ours.unfuse_lora()
    ours.set_adapters("dora", 1.0)
    ours.fuse_lora()
    merged = weights[lin] + deltas[lin]
    torch.testing.assert_close(ours.unet.get_submodule(lin).weight, merged * mags[lin] / merged.norm(dim=0),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layer", [lambda: torch.nn.Linear(5, 1), lambda: torch.nn.Conv2d(3, 1, 3, padding=1)])
def test_dora_on_a_layer_with_one_output_row(layer):
    """A layer with one output row has a (1, 1) magnitude whichever way DoRA's norms run: peft's
    (``lora_magnitude_vector``) are per output row, as for every layer, and a kohya (1, 1) ``dora_scale`` on a layer
    with more than one input column is LyCORIS's row layout (``wd_on_out``); neither is taken for column norms."""
    from diffusekit.loaders.lora_layers import build_lora

    torch.manual_seed(0)
    donor = torch.nn.Sequential(layer())
    config = peft.LoraConfig(r=2, lora_alpha=3, target_modules=["0"], use_dora=True, init_lora_weights=False)
    peft.inject_adapter_in_model(config, donor, adapter_name="x")
    peft_layer = donor[0]
    with torch.no_grad():
        peft_layer.lora_magnitude_vector["x"].weight.mul_(1.7)
    module = peft_layer.base_layer
    base = module.weight.detach().clone()
    down, up = peft_layer.lora_A["x"].weight.detach(), peft_layer.lora_B["x"].weight.detach()
    magnitude = peft_layer.lora_magnitude_vector["x"].weight.detach()
    x = torch.randn(4, 5) if isinstance(module, torch.nn.Linear) else torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        want = donor(x)
    ours = build_lora(module, {"down": ("k.lora_A", down), "up": ("k.lora_B", up),
                               "magnitude": ("k.lora_magnitude_vector", magnitude)}, 3.0, "test")
    with torch.no_grad():
        got = module(x) + ours.forward_delta(module, x, base, 1.0)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        peft_layer.merge()
        torch.testing.assert_close(base + ours.weight_delta(base, 1.0), module.weight, rtol=1e-5, atol=1e-6)
    # kohya's (1, 1[, 1, 1]) dora_scale: the row layout, A1111's formula with row norms
    scale = torch.full((1,) * base.ndim, 0.8)
    kohya = build_lora(module, {"down": ("k.lora_down", down), "up": ("k.lora_up", up),
                                "dora_scale": ("k.dora_scale", scale)}, 3.0, "test")
    delta = (up.reshape(1, -1) @ down.reshape(2, -1)).reshape(base.shape) * 1.5
    torch.testing.assert_close(kohya.weight_delta(base, 0.6), a1111_dora(base, delta, scale, 0.6, rows=True), rtol=1e-5,
                               atol=1e-6)
    merged = base + kohya.weight_delta(base, 1.0)
    torch.testing.assert_close(merged.norm(), torch.tensor(0.8), rtol=1e-5, atol=1e-6)  # the row's norm: 0.8


def test_peft_dora_in_diffusers_keys_matches_diffusers(pipes):
    """PEFT's DoRA (``unet.<path>.lora_magnitude_vector`` beside ``lora_A`` / ``lora_B``), as diffusers saves it:
    UNet outputs equal diffusers + peft's, with the call scale, adapter weights and fused."""
    ours, ref = pipes
    paths = [UNET_PATHS[0], UNET_PATHS[2], UNET_PATHS[3], UNET_PATHS[4]]  # Linear, feed-forward, 1x1 and 3x3 conv
    donor = diffusers.UNet2DConditionModel.from_config(ref.unet.config)
    donor.load_state_dict(ref.unet.state_dict())
    config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=paths, use_dora=True, init_lora_weights=False)
    peft.inject_adapter_in_model(config, donor, adapter_name="x")
    g = torch.Generator().manual_seed(12)
    with torch.no_grad():
        for path in paths:
            layer = donor.get_submodule(path)
            layer.lora_A["x"].weight.mul_(3.0)  # a delta large enough to turn the directions
            magnitude = layer.lora_magnitude_vector["x"].weight
            magnitude.mul_(1 + 0.3 * torch.rand(magnitude.shape, generator=g))
    dora = {"unet." + k: v.detach().clone() for k, v in peft.get_peft_model_state_dict(donor, adapter_name="x").items()}
    assert sum(k.endswith(".lora_magnitude_vector") for k in dora) == len(paths)
    base = unet_out(ours.unet)
    for pipe in (ours, ref):
        pipe.load_lora_weights(dict(dora), adapter_name="dora")
    got = unet_out(ours.unet)
    torch.testing.assert_close(got, unet_out(ref.unet), rtol=1e-4, atol=1e-5)
    assert (got - base).abs().max() > 1e-2
    torch.testing.assert_close(unet_out(ours.unet, cross_attention_kwargs={"scale": 0.5}),
                               unet_out(ref.unet, cross_attention_kwargs={"scale": 0.5}), rtol=1e-4, atol=1e-5)
    for pipe in (ours, ref):
        pipe.set_adapters("dora", 0.6)
    weighted = unet_out(ours.unet)
    torch.testing.assert_close(weighted, unet_out(ref.unet), rtol=1e-4, atol=1e-5)
    for pipe in (ours, ref):
        pipe.fuse_lora()
    torch.testing.assert_close(unet_out(ours.unet), unet_out(ref.unet), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(unet_out(ours.unet), weighted, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_text_encoder_matches_peft(pipes, sd_folder, kind):
    ours, _ = pipes
    hf = transformers.CLIPTextModel.from_pretrained(sd_folder / "text_encoder").eval()
    strip = "" if hasattr(hf, "text_model") else "text_model."  # transformers 5 drops the text_model level
    config = (peft.LoHaConfig(r=2, alpha=1.0, init_weights=False) if kind == "loha" else
              peft.LoKrConfig(r=1, alpha=2.0, decompose_both=True, init_weights=False))
    lyco = peft_file(hf, config, TE_PATHS, "lora_te_", config.alpha, seed=7, strip=strip)
    ids = ours.tokenizer(["a red sneaker"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        plain = ours.text_encoder(ids)[0]
        ours.load_lora_weights(lyco, adapter_name="te")
        assert ours.get_list_adapters() == {"text_encoder": ["te"]}
        a = ours.text_encoder(ids)[0]
        torch.testing.assert_close(a, hf(ids)[0], rtol=1e-5, atol=1e-5)
        assert (a - plain).abs().max() > 1e-3
        for layer in peft_layers(hf):
            layer.scale_layer(0.5)
        expected = hf(ids)[0]
    embeds, _ = ours.encode_prompt("a red sneaker", do_classifier_free_guidance=False, lora_scale=0.5)
    torch.testing.assert_close(embeds, expected, rtol=1e-5, atol=1e-5)


def test_sdxl_te1_te2_and_original_unet_names(tmp_path):
    """SDXL files: ``lora_te1_`` / ``lora_te2_`` reach the two text encoders, UNet layers by kohya's sgm names; the
    fused weights are the base plus the deltas written out here."""
    from sdxl_assets import build_tiny_sdxl

    pipe = diffusekit.StableDiffusionXLPipeline.from_pretrained(build_tiny_sdxl(tmp_path / "sdxl"))
    g = torch.Generator().manual_seed(8)
    te1, te2 = "text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.1.mlp.fc2"  # 32<-32, 37
    unet = "down_blocks.1.attentions.0.proj_in"  # lora_unet_input_blocks_3_1_proj_in
    h = [torch.randn(s, generator=g) * 0.3 for s in ((32, 2), (2, 32), (32, 2), (2, 32))]
    k1, k2a, k2b = torch.randn(4, 1, generator=g), torch.randn(8, 2, generator=g), torch.randn(2, 37, generator=g)
    u1, u2 = torch.randn(4, 4, generator=g) * 0.3, torch.randn(8, 8, generator=g) * 0.3
    sd = {f"lora_te1_{te1.replace('.', '_')}.hada_{n}": t for n, t in zip(("w1_a", "w1_b", "w2_a", "w2_b"), h)}
    sd |= {f"lora_te1_{te1.replace('.', '_')}.alpha": torch.tensor(1.0)}
    name2 = f"lora_te2_{te2.replace('.', '_')}"
    sd |= {f"{name2}.lokr_w1": k1, f"{name2}.lokr_w2_a": k2a, f"{name2}.lokr_w2_b": k2b,
           f"{name2}.alpha": torch.tensor(4.0)}
    sd |= {"lora_unet_input_blocks_3_1_proj_in.lokr_w1": u1, "lora_unet_input_blocks_3_1_proj_in.lokr_w2": u2}
    models = {"text_encoder": (pipe.text_encoder, te1), "text_encoder_2": (pipe.text_encoder_2, te2),
              "unet": (pipe.unet, unet)}
    base = {c: m.get_submodule(p).weight.detach().clone() for c, (m, p) in models.items()}
    pipe.load_lora_weights(sd, adapter_name="xl")
    assert pipe.get_list_adapters() == {"unet": ["xl"], "text_encoder": ["xl"], "text_encoder_2": ["xl"]}
    pipe.fuse_lora(components=("unet", "text_encoder", "text_encoder_2"))
    want = {"text_encoder": (h[0] @ h[1]) * (h[2] @ h[3]) * 0.5,
            "text_encoder_2": torch.kron(k1, k2a @ k2b) * 2.0,
            "unet": torch.kron(u1, u2).reshape(base["unet"].shape)}
    for c, (model, p) in models.items():
        torch.testing.assert_close(model.get_submodule(p).weight - base[c], want[c], rtol=1e-5, atol=1e-6)


def test_cli_prompt_tag_and_hash(tmp_path):
    from PIL import Image

    from diffusekit.__main__ import main
    from diffusekit.infotext import GenerationParameters, lora_hash, read_parameters

    sd = "diffusekit-fashion-sd"
    unet = diffusekit.UNet2DConditionModel.from_pretrained(sd, subfolder="unet")
    layer = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v"
    module = unet.get_submodule(layer)
    g = torch.Generator().manual_seed(9)
    name = "lora_unet_" + layer.replace(".", "_")
    out, fan_in = module.weight.shape
    lyco = {f"{name}.alpha": torch.tensor(4.0)}
    for i in ("1", "2"):
        lyco[f"{name}.hada_w{i}_a"] = torch.randn(out, 4, generator=g)
        lyco[f"{name}.hada_w{i}_b"] = torch.randn(4, fan_in, generator=g)
    file = tmp_path / "hadastyle.safetensors"
    save_file(lyco, file, metadata=kohya_metadata("loha", 4, 4.0))
    args = ["generate", sd, "--num-images", "1", "--steps", "2", "--width", "32", "--height", "32"]
    pixels = lambda p: np.asarray(Image.open(p).convert("RGB"), dtype=int)  # noqa: E731
    plain, flag, tag, lyco_tag = (tmp_path / f"{n}.png" for n in ("plain", "flag", "tag", "lyco"))
    assert main([*args, "--prompt", "a dress", "--out", str(plain)]) == 0
    assert main([*args, "--prompt", "a dress", "--lora", f"{file}:0.8", "--out", str(flag)]) == 0
    assert not np.array_equal(pixels(plain), pixels(flag))
    params = GenerationParameters.from_infotext(read_parameters(flag))
    assert params.prompt == "a dress <lora:hadastyle:0.8>"
    assert params.extra["Lora hashes"] == f"hadastyle: {lora_hash(file)}"
    assert main([*args, "--prompt", "a dress <lora:hadastyle:0.8>", "--lora", str(file), "--out", str(tag)]) == 0
    assert np.array_equal(pixels(tag), pixels(flag))
    # the LyCORIS extension's <lyco:name:w> spelling, which A1111 keeps as an alias of <lora:...>
    assert main([*args, "--prompt", "a dress <lyco:hadastyle:0.8>", "--lora", str(file), "--out", str(lyco_tag)]) == 0
    assert np.array_equal(pixels(lyco_tag), pixels(flag))


def lycoris_ia3(weight, w, multiplier, on_input):
    """LyCORIS's (IA)³ ``make_weight``: the weight times ``w · multiplier + 1`` along its input (``on_input``) or,
    transposed, its output dimension (``w`` as (n,) for a Linear, (1, n, 1, 1) for a conv)."""
    scale = w.reshape(-1) * multiplier + 1
    if weight.ndim > 2:
        scale = scale.reshape(1, -1, *[1] * (weight.ndim - 2))
    return weight * scale if on_input else (weight.transpose(0, 1) * scale).transpose(0, 1)


def test_ia3_matches_peft_and_lycoris(pipes):
    """(IA)³ in LyCORIS keys (``<layer>.weight`` and ``<layer>.on_input``): the layer's weight scaled by
    ``1 + m·w`` per output row, or per input column with ``on_input``. At weight 1 it equals peft's (IA)³ layers
    (ia3_l = 1 + w; ``feedforward_modules`` scale the input) on the layers where peft and LyCORIS agree (peft also
    scales an output-side layer's bias, LyCORIS and A1111 do not: a bias-free to_q / to_k there); with a weight and
    on an output-side conv with a bias, LyCORIS's ``make_weight`` written out."""
    ours, ref = pipes
    out_side = [UNET_PATHS[0], UNET_PATHS[1]]  # to_q, to_k: Linear without bias
    in_side = [UNET_PATHS[2], UNET_PATHS[3], UNET_PATHS[4]]  # ff.net.2 (Linear with bias), 1x1 conv, 3x3 conv
    config = peft.IA3Config(target_modules=out_side + in_side, feedforward_modules=in_side)
    peft.inject_adapter_in_model(config, ref.unet, adapter_name="x")
    g = torch.Generator().manual_seed(21)
    sd, vectors = {}, {}
    with torch.no_grad():
        for path in out_side + in_side:
            scale = ref.unet.get_submodule(path).ia3_l["x"]
            scale.copy_(1 + 0.5 * torch.randn(scale.shape, generator=g))
            name = "lora_unet_" + path.replace(".", "_")
            vectors[path] = (scale - 1).reshape(-1).clone()
            sd[f"{name}.weight"], sd[f"{name}.on_input"] = vectors[path], torch.tensor(int(path in in_side))
    conv = UNET_PATHS[6]  # mid_block conv2, output side, with a bias
    vectors[conv] = torch.randn(1, 32, 1, 1, generator=g) * 0.5  # LyCORIS's conv shape (1, out, 1, 1)
    sd[f"lora_unet_{conv.replace('.', '_')}.weight"] = vectors[conv]
    sd[f"lora_unet_{conv.replace('.', '_')}.on_input"] = torch.tensor(0)
    base = unet_out(ours.unet)
    weights = {p: ours.unet.get_submodule(p).weight.detach().clone() for p in vectors}
    ours.load_lora_weights({k: v for k, v in sd.items() if not k.startswith(f"lora_unet_{conv.replace('.', '_')}")},
                           adapter_name="peft-like")
    got = unet_out(ours.unet)
    torch.testing.assert_close(got, unet_out(ref.unet), rtol=1e-4, atol=1e-5)
    assert (got - base).abs().max() > 1e-2
    ours.delete_adapters("peft-like")
    ours.load_lora_weights(sd, adapter_name="ia3")
    ours.set_adapters("ia3", 0.6)
    unfused = unet_out(ours.unet)
    before = {k: v.clone() for k, v in ours.unet.state_dict().items()}
    ours.fuse_lora()
    for path, w in vectors.items():
        want = lycoris_ia3(weights[path], w, 0.6, on_input=path in in_side)
        torch.testing.assert_close(ours.unet.get_submodule(path).weight, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(unet_out(ours.unet), unfused, rtol=1e-4, atol=1e-5)
    ours.unfuse_lora()
    assert all(torch.equal(v, before[k]) for k, v in ours.unet.state_dict().items())
    torch.testing.assert_close(unet_out(ours.unet), unfused, rtol=0, atol=0)


NORM_PATHS = ["down_blocks.0.resnets.0.norm1",  # GroupNorm
              "down_blocks.0.attentions.0.norm",  # GroupNorm of the transformer
              "down_blocks.0.attentions.0.transformer_blocks.0.norm2"]  # LayerNorm


def test_full_and_norm_kinds_equal_the_edited_weights(pipes):
    """LyCORIS "full" (``diff``, ``diff_b``) and trained norm layers (``w_norm``, ``b_norm``), as A1111 applies them:
    ``W + m·diff``, ``b + m·diff_b`` (a layer without a bias gets one), the norm's ``w + m·w_norm``, ``b + m·b_norm``;
    checked against diffusers' UNet with those weights written in; fused and unfused; unfuse_lora puts back the
    weights and removes the bias it added."""
    ours, ref = pipes
    g = torch.Generator().manual_seed(22)
    full = {UNET_PATHS[0]: True, UNET_PATHS[2]: False, UNET_PATHS[4]: True}  # path -> with diff_b
    sd = {}
    m = 0.6
    with torch.no_grad():
        for path, with_bias in full.items():
            layer = ref.unet.get_submodule(path)
            name = "lora_unet_" + path.replace(".", "_")
            sd[f"{name}.diff"] = diff = torch.randn(layer.weight.shape, generator=g) * 0.2
            layer.weight += m * diff
            if with_bias:
                sd[f"{name}.diff_b"] = diff_b = torch.randn(layer.weight.shape[0], generator=g) * 0.2
                if layer.bias is None:  # to_q: none; A1111 adds one
                    layer.bias = torch.nn.Parameter(m * diff_b)
                else:
                    layer.bias += m * diff_b
            sd[f"{name}.alpha"] = torch.tensor(3.0)  # ignored: "full" has no rank
        for path in NORM_PATHS:
            layer = ref.unet.get_submodule(path)
            name = "lora_unet_" + path.replace(".", "_")
            sd[f"{name}.w_norm"] = w = torch.randn(layer.weight.shape, generator=g) * 0.3
            sd[f"{name}.b_norm"] = b = torch.randn(layer.bias.shape, generator=g) * 0.3
            layer.weight += m * w
            layer.bias += m * b
    keys = list(ours.unet.state_dict())
    before = {k: v.clone() for k, v in ours.unet.state_dict().items()}
    base = unet_out(ours.unet)
    ours.load_lora_weights(sd, adapter_name="full")
    ours.set_adapters("full", m)
    unfused = unet_out(ours.unet)
    want = unet_out(ref.unet)
    torch.testing.assert_close(unfused, want, rtol=1e-4, atol=1e-5)
    assert (unfused - base).abs().max() > 1e-2
    ours.fuse_lora()
    state = ours.unet.state_dict()
    assert set(state) == set(keys) | {f"{UNET_PATHS[0]}.bias"}  # the bias A1111 gives to_q
    for key, value in ref.unet.state_dict().items():
        if key in state:
            torch.testing.assert_close(state[key], value, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(unet_out(ours.unet), want, rtol=1e-4, atol=1e-5)
    ours.unfuse_lora()
    assert list(ours.unet.state_dict()) == keys
    assert all(torch.equal(v, before[k]) for k, v in ours.unet.state_dict().items())
    torch.testing.assert_close(unet_out(ours.unet), unfused, rtol=0, atol=0)


def lycoris_oft(weight, blocks, constraint, multiplier, rescale=None):
    """LyCORIS's diag-OFT ``get_r`` / ``make_weight``: the Cayley rotation of each block of output rows, blended
    with the identity by the multiplier, ``‖Q‖`` clipped to the constraint when above 0; then the rescale."""
    k, n, _ = blocks.shape
    eye = torch.eye(n)
    q = blocks - blocks.transpose(1, 2)
    if constraint > 0:
        q_norm = torch.norm(q) + 1e-8
        if q_norm > constraint:
            q = q * constraint / q_norm
    r = (eye + q) @ (eye - q).float().inverse()
    merged = torch.einsum("k n m, k n ... -> k m ...", r * multiplier - multiplier * eye + eye,
                          weight.view(k, n, *weight.shape[1:])).reshape(weight.shape)
    return merged if rescale is None else rescale * merged


def test_oft_as_lycoris(pipes):
    """LyCORIS diag-OFT (``oft_blocks``, ``alpha`` the constraint, ``rescale``): fused weights equal LyCORIS's
    merge written out (with a weight; the constraint clipping on one layer; the rescale at weight 1, where LyCORIS
    and A1111 agree), the unfused hooks give the fused output, unfuse_lora restores the weights bit for bit."""
    ours, _ = pipes
    g = torch.Generator().manual_seed(23)
    layers = {UNET_PATHS[0]: (4, 4, 0.0), UNET_PATHS[4]: (2, 8, 0.001), UNET_PATHS[6]: (8, 4, 0.0)}  # k, n, alpha
    sd, blocks = {}, {}
    for path, (k, n, alpha) in layers.items():
        name = "lora_unet_" + path.replace(".", "_")
        sd[f"{name}.oft_blocks"] = blocks[path] = torch.randn(k, n, n, generator=g) * 0.2
        sd[f"{name}.alpha"] = torch.tensor(alpha)
    rescale = torch.rand(32, 1, 1, 1, generator=g) + 0.5
    before = {k: v.clone() for k, v in ours.unet.state_dict().items()}
    weights, unfused = load_weighted_and_fuse(ours, sd, "oft", 0.6, layers)
    for path, (k, n, alpha) in layers.items():
        want = lycoris_oft(weights[path], blocks[path], alpha * weights[path].shape[0], 0.6)
        torch.testing.assert_close(ours.unet.get_submodule(path).weight, want, rtol=1e-5, atol=1e-6)
    clipped = lycoris_oft(weights[UNET_PATHS[4]], blocks[UNET_PATHS[4]], 0.0, 0.6)
    assert not torch.allclose(clipped, ours.unet.get_submodule(UNET_PATHS[4]).weight)  # the constraint acted
    torch.testing.assert_close(unet_out(ours.unet), unfused, rtol=1e-4, atol=1e-5)
    ours.unfuse_lora()
    assert all(torch.equal(v, before[k]) for k, v in ours.unet.state_dict().items())
    ours.delete_adapters("oft")
    conv = UNET_PATHS[6]
    name = "lora_unet_" + conv.replace(".", "_")
    ours.load_lora_weights({f"{name}.oft_blocks": blocks[conv], f"{name}.rescale": rescale}, adapter_name="rescaled")
    ours.fuse_lora()
    torch.testing.assert_close(ours.unet.get_submodule(conv).weight,
                               lycoris_oft(weights[conv], blocks[conv], 0.0, 1.0, rescale), rtol=1e-5, atol=1e-6)
    # kohya's own OFT files (oft_unet_ keys, alpha the constraint as well): the same numbers
    ours.unfuse_lora()
    ours.unload_lora_weights()
    linear = UNET_PATHS[0]
    kohya = {"oft_unet_" + linear.replace(".", "_") + ".oft_blocks": blocks[linear],
             "oft_unet_" + linear.replace(".", "_") + ".alpha": torch.tensor(0.01)}
    ours.load_lora_weights(kohya, adapter_name="kohya")
    ours.fuse_lora()
    torch.testing.assert_close(ours.unet.get_submodule(linear).weight,
                               lycoris_oft(weights[linear], blocks[linear], 0.01 * 16, 1.0), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def lycoris_modules():
    """The LyCORIS package's modules (a test-only oracle, pinned in requirements-test.txt), on its plain torch path
    (no compiled or GPU kernels)."""
    pytest.importorskip("lycoris")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LYCORIS_KERNEL_BACKEND", "torch")
        from lycoris.modules import ButterflyOFTModule, DiagOFTModule, GLoRAModule, LohaModule, LokrModule

        yield {"boft": ButterflyOFTModule, "diag-oft": DiagOFTModule, "glora": GLoRAModule, "loha": LohaModule,
               "lokr": LokrModule}


#: algo -> ({layer: the LyCORIS module's arguments}, the file's dtype); the layers: Linear 16 <- 16, Linear 16 <- 32,
#: 1x1 conv, 3x3 conv 16 -> 16, Linear 16 <- 64 (time_emb_proj), 3x3 conv 32 -> 32
ORACLE_FILES = {
    "boft": ({UNET_PATHS[0]: dict(lora_dim=4, rescaled=True),  # (3, 4, 4, 4): three butterfly stages
              UNET_PATHS[3]: dict(lora_dim=2, constraint=2**-6),  # (4, 8, 2, 2), ‖Q‖ clipped to 16 / 64
              UNET_PATHS[4]: dict(lora_dim=8, rescaled=True),  # (2, 2, 8, 8)
              UNET_PATHS[6]: dict(lora_dim=4)}, torch.float16),  # (4, 8, 4, 4)
    "diag-oft": ({UNET_PATHS[1]: dict(lora_dim=4, rescaled=True),
                  UNET_PATHS[4]: dict(lora_dim=8, rescaled=True, constraint=2**-10)}, torch.float32),
    "glora": ({UNET_PATHS[1]: dict(lora_dim=4, alpha=2.0), UNET_PATHS[3]: dict(lora_dim=2, alpha=1.0),
               UNET_PATHS[4]: dict(lora_dim=4, alpha=8.0), UNET_PATHS[5]: dict(lora_dim=2, alpha=0.0)},
              torch.bfloat16),
    # the CP / Tucker forms (hada_t1 / hada_t2, lokr_t2) on 3x3 convs, checked against LyCORIS too
    "loha": ({UNET_PATHS[0]: dict(lora_dim=2, alpha=1.0), UNET_PATHS[4]: dict(lora_dim=2, alpha=1.0, use_tucker=True),
              UNET_PATHS[6]: dict(lora_dim=4, alpha=2.0, use_tucker=True)}, torch.float16),
    "lokr": ({UNET_PATHS[2]: dict(lora_dim=2, alpha=1.0, decompose_both=True),
              UNET_PATHS[6]: dict(lora_dim=2, alpha=4.0, use_tucker=True, decompose_both=True, factor=4)},
             torch.float32),
}


def plain_layer(weight):
    """A bias-free Linear / Conv2d holding a copy of ``weight`` (for LyCORIS's modules to wrap)."""
    if weight.ndim == 4:
        layer = torch.nn.Conv2d(weight.shape[1], weight.shape[0], tuple(weight.shape[2:]), bias=False)
    else:
        layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer


def lycoris_save(pipe, module_type, layers, dtype, seed, std=0.2):
    """What LyCORIS saves for ``layers`` of the UNet, and its modules that hold those tensors: each module built on
    a copy of the layer, parameters random (``std``), saved as ``lora_unet_<layer>.<its state dict key>`` in
    ``dtype`` and loaded back (so both sides see the same rounded numbers). Returns ``(state dict, {layer: module})``.
    The modules run as LyCORIS runs them in inference (their forward on the layer copy): LyCORIS's
    ``get_merged_weight`` scales LoHa and LoKr by alpha / rank twice, and its file loader (``make_module``)
    mis-sizes a Tucker LoKr, so neither is the reference."""
    g = torch.Generator().manual_seed(seed)
    sd, modules = {}, {}
    for path, kwargs in layers.items():
        module = module_type("x", plain_layer(pipe.unet.get_submodule(path).weight.detach()), 1.0, **kwargs)
        saved = {}
        for key, tensor in module.state_dict().items():
            if key == "rescale":
                tensor = 1 + 0.3 * torch.rand(tensor.shape, generator=g)
            elif key != "alpha":
                tensor = torch.randn(tensor.shape, generator=g) * std
            saved[key] = sd[f"lora_unet_{path.replace('.', '_')}.{key}"] = tensor.to(dtype)
        module.load_state_dict({k: v.float() for k, v in saved.items()})
        module.apply_to()
        modules[path] = module
    return sd, modules


def lycoris_merged(module, multiplier):
    """The weight of the layer under LyCORIS ``module`` at ``multiplier``, read back from its forward by feeding it
    every unit input."""
    module.multiplier = multiplier
    layer = module.org_module[0]
    weight = layer.weight
    fan_in = weight[0].numel()
    units = torch.eye(fan_in).reshape(fan_in, *weight.shape[1:])  # (in, in) or (in·k·k, in, k, k)
    with torch.no_grad():
        return layer(units).reshape(fan_in, -1).T.reshape(weight.shape)


#: algo -> the key suffixes its file must hold (every layout the test means to exercise is there)
ORACLE_PARTS = {
    "boft": {"oft_blocks", "rescale", "alpha"},
    "diag-oft": {"oft_blocks", "rescale", "alpha"},
    "glora": {"a1.weight", "a2.weight", "b1.weight", "b2.weight", "alpha"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha"},
    "lokr": {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha"},
}


@pytest.mark.parametrize("algo", list(ORACLE_FILES))
def test_files_merge_as_lycoris_does(pipes, tmp_path, lycoris_modules, algo):
    """BOFT, diag-OFT (with its rescale at a weight below 1), GLoRA, and LoHa / LoKr with their CP / Tucker forms,
    in files as LyCORIS saves them, loaded from safetensors: at adapter weights 0.5 and 1 the unfused UNet's output
    equals diffusers' UNet with the weights LyCORIS's own file loader and modules merge from the same tensors, and
    fuse_lora writes exactly those weights."""
    ours, ref = pipes
    layers, dtype = ORACLE_FILES[algo]
    sd, modules = lycoris_save(ours, lycoris_modules[algo], layers, dtype, seed=31, std=0.5 if algo == "loha" else 0.2)
    assert {k.split(".", 1)[1] for k in sd} == ORACLE_PARTS[algo]
    assert any(v.ndim == 4 for k, v in sd.items() if k.endswith("oft_blocks")) == (algo == "boft")
    file = tmp_path / f"{algo}.safetensors"
    save_file(sd, file, metadata=kohya_metadata(algo, 4, 1.0))
    base = unet_out(ours.unet)
    before = {k: v.clone() for k, v in ours.unet.state_dict().items()}
    ours.load_lora_weights(file, adapter_name=algo)
    for weight in (0.5, 1.0):
        ours.set_adapters(algo, weight)
        want = {path: lycoris_merged(module, weight) for path, module in modules.items()}
        with torch.no_grad():
            for path, merged in want.items():
                ref.unet.get_submodule(path).weight.copy_(merged)
        unfused = unet_out(ours.unet)
        torch.testing.assert_close(unfused, unet_out(ref.unet), rtol=1e-4, atol=1e-5)
        assert (unfused - base).abs().max() > 1e-2
        ours.fuse_lora()
        for path, merged in want.items():
            torch.testing.assert_close(ours.unet.get_submodule(path).weight, merged, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(unet_out(ours.unet), unfused, rtol=1e-4, atol=1e-5)
        ours.unfuse_lora()
    assert all(torch.equal(v, before[k]) for k, v in ours.unet.state_dict().items())


def test_boft_blends_every_stage(pipes, lycoris_modules):
    """BOFT's change is not linear in the adapter weight (each butterfly stage is blended with the identity, as
    LyCORIS does; A1111 would scale the whole change): the delta at 0.5 is not half the delta at 1, and the call
    scale of diffusers (``cross_attention_kwargs``) is the same blend as the adapter weight."""
    ours, _ = pipes
    path = UNET_PATHS[6]
    sd, modules = lycoris_save(ours, lycoris_modules["boft"], {path: dict(lora_dim=4)}, torch.float32, seed=32)
    base = ours.unet.get_submodule(path).weight.detach().clone()
    half = lycoris_merged(modules[path], 0.5) - base
    full = lycoris_merged(modules[path], 1.0) - base
    assert (half - full / 2).abs().max() > 1e-3 * full.abs().max()
    ours.load_lora_weights(sd, adapter_name="boft")
    ours.set_adapters("boft", 0.5)
    weighted = unet_out(ours.unet)
    ours.set_adapters("boft", 1.0)
    torch.testing.assert_close(unet_out(ours.unet, cross_attention_kwargs={"scale": 0.5}), weighted, rtol=1e-5,
                               atol=1e-6)
    ours.set_adapters("boft", 0.5)
    ours.fuse_lora()
    torch.testing.assert_close(ours.unet.get_submodule(path).weight - base, half, rtol=1e-5, atol=1e-6)


def test_glora_tucker_and_older_layout(pipes, lycoris_modules):
    """GLoRA with LyCORIS 3.0's Tucker ``bm`` on a 3x3 conv (a 1x1 ``b2``, ``bm`` with the layer's kernel) and in the
    layout of LyCORIS ≤ 2.2 (``a1`` (r, in), ``a2`` (in, r), ``b1`` (r, in), ``b2`` (out, r)), against their merges
    written out from LyCORIS's ``make_weight`` of those versions; unfused, fused, at weights 0.5 and 1."""
    from lycoris.functional.general import tucker_weight_from_conv

    ours, _ = pipes
    g = torch.Generator().manual_seed(33)
    r = lambda *s: torch.randn(*s, generator=g) * 0.2  # noqa: E731
    tucker, linear, conv1x1 = UNET_PATHS[6], UNET_PATHS[1], UNET_PATHS[7]  # 3x3 32 -> 32, Linear 16 <- 32, 1x1
    name = {p: "lora_unet_" + p.replace(".", "_") for p in (tucker, linear, conv1x1)}
    weights = {p: ours.unet.get_submodule(p).weight.detach().clone() for p in name}
    t = {"a1": r(32, 2, 1, 1), "a2": r(2, 32, 1, 1), "b1": r(32, 2, 1, 1), "b2": r(2, 32, 1, 1), "bm": r(2, 2, 3, 3)}
    sd = {f"{name[tucker]}.{k}.weight": v for k, v in t.items()} | {f"{name[tucker]}.alpha": torch.tensor(1.0)}
    w = weights[tucker]
    w_a = torch.einsum("oi...,ij->oj...", torch.einsum("oi...,ij->oj...", w, t["a1"].flatten(1)), t["a2"].flatten(1))
    deltas = {tucker: (tucker_weight_from_conv(t["b1"], t["b2"], t["bm"]) + w_a) * (1.0 / 2)}
    for path, alpha in ((linear, 3.0), (conv1x1, 0.0)):  # LyCORIS ≤ 2.2: ΔW = (b2 @ b1 + W @ a2 @ a1) · alpha / r
        w = weights[path]
        out, fan_in = w.shape[:2]
        old = {"a1": r(3, fan_in), "a2": r(fan_in, 3), "b1": r(3, fan_in), "b2": r(out, 3)}
        if w.ndim == 4:
            old = {k: v[:, :, None, None] for k, v in old.items()}
        sd |= {f"{name[path]}.{k}.weight": v for k, v in old.items()} | {f"{name[path]}.alpha": torch.tensor(alpha)}
        flat = {k: v.flatten(1) for k, v in old.items()}
        delta = flat["b2"] @ flat["b1"] + (w.flatten(1) @ flat["a2"]) @ flat["a1"]
        deltas[path] = delta.reshape(w.shape) * (alpha / 3 if alpha else 1.0)
    for weight in (0.5, 1.0):
        _, unfused = load_weighted_and_fuse(ours, sd, f"glora{weight}", weight, name)
        for path, delta in deltas.items():
            torch.testing.assert_close(ours.unet.get_submodule(path).weight - weights[path], weight * delta,
                                       rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(unet_out(ours.unet), unfused, rtol=1e-4, atol=1e-5)
        ours.unfuse_lora()
        ours.delete_adapters(f"glora{weight}")


def test_oft_diag_older_layout(pipes):
    """LyCORIS 2.0 / 2.1's OFT files (``oft_diag``: the block rotations ``R`` themselves, no constraint): the
    weight becomes ``(m·R + (1 − m)·I)ᵀ W`` per block of output rows (LyCORIS 2.0's ``make_weight``, A1111's merge)."""
    ours, _ = pipes
    g = torch.Generator().manual_seed(34)
    paths = {UNET_PATHS[0]: (4, 4), UNET_PATHS[6]: (8, 4)}  # k blocks of n rows
    sd, rotations = {}, {}
    for path, (k, n) in paths.items():
        q = torch.randn(k, n, n, generator=g) * 0.3
        q = q - q.transpose(1, 2)
        eye = torch.eye(n)
        rotations[path] = (eye + q) @ torch.linalg.inv(eye - q)
        sd[f"lora_unet_{path.replace('.', '_')}.oft_diag"] = rotations[path]
    for weight in (0.6, 1.0):
        weights, unfused = load_weighted_and_fuse(ours, sd, f"diag{weight}", weight, paths)
        for path, (k, n) in paths.items():
            blend = weight * rotations[path] + (1 - weight) * torch.eye(n)
            w = weights[path]
            want = torch.einsum("knm,kn...->km...", blend, w.reshape(k, n, *w.shape[1:])).reshape(w.shape)
            torch.testing.assert_close(ours.unet.get_submodule(path).weight, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(unet_out(ours.unet), unfused, rtol=1e-4, atol=1e-5)
        ours.unfuse_lora()
        ours.delete_adapters(f"diag{weight}")


def test_malformed_files_name_the_file_and_key(pipes, tmp_path):
    ours, _ = pipes
    n = "lora_unet_" + UNET_PATHS[0].replace(".", "_")  # Linear (16 <- 16)
    c = "lora_unet_" + UNET_PATHS[4].replace(".", "_")  # conv 3x3 (16 <- 16)
    r = lambda *s: torch.zeros(*s)  # noqa: E731
    loha = {f"{n}.hada_w1_a": r(16, 2), f"{n}.hada_w1_b": r(2, 16), f"{n}.hada_w2_a": r(16, 2),
            f"{n}.hada_w2_b": r(2, 16)}
    cases = {
        "missing": ({k: v for k, v in loha.items() if "w2_b" not in k},
                    rf"key '{n}.hada_w1_a' \(LoHa\) has no matching hada_w2_b weight"),
        "shape": ({**loha, f"{n}.hada_w2_b": r(2, 24)}, rf"key '{n}.hada_w2_b' has shape \(2, 24\), the layer needs "
                  r"\(rank, 16\)"),
        "rank": ({**loha, f"{n}.hada_w1_b": r(3, 16)}, rf"wrong ranks: '{n}.hada_w1_a' has rank 2 but "
                 rf"'{n}.hada_w1_b' has rank 3"),
        "cp_half": ({f"{c}.hada_t1": r(2, 2, 3, 3), f"{c}.hada_w1_a": r(2, 16), f"{c}.hada_w1_b": r(2, 16),
                     f"{c}.hada_w2_a": r(2, 16), f"{c}.hada_w2_b": r(2, 16)}, "has no matching hada_t2 weight"),
        "lokr_missing": ({f"{n}.lokr_w1": r(4, 4)}, r"has no matching lokr_w2 \(or lokr_w2_a and lokr_w2_b\)"),
        "lokr_half": ({f"{n}.lokr_w1": r(4, 4), f"{n}.lokr_w2_a": r(4, 2)}, "has no matching lokr_w2_b weight"),
        "lokr_shape": ({f"{n}.lokr_w1": r(4, 4), f"{n}.lokr_w2": r(4, 8)},
                       r"LoKr keys .*lokr_w1.*lokr_w2.* give a \(16, 32\) weight, the layer needs \(16, 16\)"),
        "lokr_t2_linear": ({f"{n}.lokr_w1": r(4, 4), f"{n}.lokr_w2_a": r(2, 4), f"{n}.lokr_w2_b": r(2, 4),
                            f"{n}.lokr_t2": r(2, 2, 3, 3)}, rf"key '{n}.lokr_t2' has shape .* on a convolution"),
        "mixed": ({**loha, f"{n}.lokr_w1": r(4, 4)}, "mix LoHa .* and LoKr"),
        "alpha_only": ({f"{n}.alpha": torch.tensor(1.0)}, "hold no adapter weights"),
        "dora": ({**loha, f"{n}.dora_scale": r(3, 16)}, rf"key '{n}.dora_scale' has shape \(3, 16\); DoRA needs"),
        "oft": ({f"{n}.oft_blocks": r(3, 4, 4)}, rf"key '{n}.oft_blocks' has shape \(3, 4, 4\), the layer needs "
                r"\(blocks, size, size\) with blocks · size = 16"),
        "boft": ({f"{n}.oft_blocks": r(2, 4, 3, 3)}, rf"key '{n}.oft_blocks' has shape \(2, 4, 3, 3\), the layer "
                 r"needs \(levels, blocks, size, size\) with blocks · size = 16, an even size"),
        "boft_levels": ({f"{n}.oft_blocks": r(4, 4, 4, 4)}, r"blocks divisible by 2\^\(levels − 1\)"),
        "oft_diag": ({f"{n}.oft_diag": r(4, 2, 2)}, rf"key '{n}.oft_diag' has shape \(4, 2, 2\), the layer needs "
                     r"\(blocks, size, size\) with blocks · size = 16"),
        "oft_both": ({f"{n}.oft_diag": r(4, 4, 4), f"{n}.oft_blocks": r(4, 4, 4)}, "are two OFT layouts for one layer"),
        "oft_rescale_only": ({f"{n}.rescale": r(16, 1)}, rf"key '{n}.rescale' \(OFT\) has no matching oft_blocks"),
        "glora_missing": ({f"{n}.a1.weight": r(16, 2), f"{n}.a2.weight": r(2, 16), f"{n}.b1.weight": r(16, 2)},
                          rf"key '{n}.a1.weight' \(GLoRA\) has no matching b2 weight"),
        "glora_shape": ({f"{n}.a1.weight": r(16, 2), f"{n}.a2.weight": r(2, 16), f"{n}.b1.weight": r(24, 2),
                         f"{n}.b2.weight": r(2, 16)}, r"GLoRA keys .*b1.weight' \(24, 2\).* do not fit the layer "
                        r"\(out 16, in 16\)"),
        "glora_rank": ({f"{n}.a1.weight": r(16, 2), f"{n}.a2.weight": r(2, 16), f"{n}.b1.weight": r(16, 3),
                        f"{n}.b2.weight": r(2, 16)}, rf"wrong ranks: '{n}.b2.weight' has rank 2 but '{n}.b1.weight' "
                       "has rank 3"),
        "glora_dora": ({f"{n}.a1.weight": r(16, 2), f"{n}.a2.weight": r(2, 16), f"{n}.b1.weight": r(16, 2),
                        f"{n}.b2.weight": r(2, 16), f"{n}.dora_scale": r(1, 16)}, "DoRA beside GLoRA is not supported"),
        "lokr_t1": ({f"{c}.lokr_t1": r(2, 2, 3, 3), f"{c}.lokr_w1_a": r(2, 4), f"{c}.lokr_w1_b": r(2, 4)},
                    rf"key '{c}.lokr_t1' belongs to LoKr with a Tucker-decomposed first factor \(a key no LyCORIS "
                    "release writes"),
        "ia3_size": ({f"{n}.weight": r(15), f"{n}.on_input": torch.tensor(1)},
                     rf"key '{n}.weight' has shape \(15,\), the layer needs 16 values, one per input column"),
        "diff_shape": ({f"{c}.diff": r(16, 16, 1, 1)}, rf"key '{c}.diff' has shape \(16, 16, 1, 1\), the layer needs "
                       r"\(16, 16, 3, 3\)"),
        "norm_on_linear": ({f"{n}.w_norm": r(16), f"{n}.b_norm": r(16)}, r"trained norm layer \(LyCORIS\) weights "
                           r"for unet\..*to_q, a Linear; that kind applies to GroupNorm / LayerNorm layers"),
        "norm_half": ({"lora_unet_down_blocks_0_resnets_0_norm1.w_norm": r(16)}, "has no matching b_norm weight"),
        "peft_suffix": ({f"{n}.lora_A.weight": r(2, 16)}, rf"key '{n}.lora_A.weight' is not a LoRA key diffusekit "
                        "knows"),
        "diff_on_norm": ({"lora_unet_down_blocks_0_resnets_0_norm1.diff": r(16)},
                         "full weight difference .* a GroupNorm; that kind applies to Linear / Conv2d layers"),
        "mid_linear": ({f"{n}.lora_down.weight": r(2, 16), f"{n}.lora_up.weight": r(16, 2),
                        f"{n}.lora_mid.weight": r(2, 2, 3, 3)}, "a CP-decomposed LoCon middle.* is for a convolution"),
        "mid_kernel": ({f"{c}.lora_down.weight": r(2, 16, 1, 1), f"{c}.lora_up.weight": r(16, 2, 1, 1),
                        f"{c}.lora_mid.weight": r(2, 2, 1, 1)}, rf"key '{c}.lora_mid.weight' has shape \(2, 2, 1, 1\), "
                       r"the layer needs \(rank, rank, 3, 3\)"),
    }
    for case, (state_dict, message) in cases.items():
        path = tmp_path / f"{case}.safetensors"
        save_file(state_dict, path, metadata=kohya_metadata("loha", 2, 1.0))
        with pytest.raises(LoraError, match=f"{case}.safetensors: .*{message}"):
            ours.load_lora_weights(path)
    assert ours.get_list_adapters() == {}  # nothing half-loaded
