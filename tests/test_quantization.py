"""int8 quantization (diffusekit.quantization): QDQ layers vs a reference computation, calibration, the checkpoint
format round trip, hostile quantization_config, pipeline calibration, and compiled int8 == eager int8."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

import diffusekit
from diffusekit.models import winograd
from diffusekit.quantization import (Int8Conv2d, Int8Linear, QuantizationConfigError, is_quantized,
                                     quantize_model)
from diffusekit.quantization.modules import activation_qparams, quantize_weight_per_channel
from sd_assets import build_tiny_sd, tiny_unet_kwargs


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    return diffusekit.UNet2DConditionModel(**tiny_unet_kwargs()).eval()


def unet_inputs(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [dict(sample=torch.randn(2, 4, 8, 8, generator=g), timestep=torch.tensor(999 - 300 * i),
                 encoder_hidden_states=torch.randn(2, 5, 32, generator=g)) for i in range(n)]


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """(float UNet, int8 UNet calibrated on unet_inputs(), folder it was saved to)."""
    float_unet = tiny_unet()
    q = quantize_model(tiny_unet(), unet_inputs())
    folder = tmp_path_factory.mktemp("int8")
    q.save_pretrained(folder)
    return float_unet, q, folder


# ------------------------------------------------------------------------------------ layers vs a reference


def test_weight_quantization_is_symmetric_per_channel():
    w = torch.randn(6, 3, 3, 3)
    w[2] = 0
    q, scale = quantize_weight_per_channel(w)
    assert q.dtype == torch.int8 and scale.shape == (6,)
    assert int(q.abs().amax()) == 127 and int(q[2].abs().amax()) == 0
    torch.testing.assert_close(q.float() * scale[:, None, None, None], w, atol=float(scale.max()) / 2 + 1e-7,
                               rtol=0)


def test_activation_qparams_cover_range_and_keep_zero_exact():
    scale, zp = activation_qparams(-1.0, 3.0)
    assert scale == pytest.approx(4 / 255) and zp == round(1 / scale)
    assert activation_qparams(0.5, 2.0)[1] == 0  # range widened to include 0
    assert activation_qparams(-2.0, -0.5)[1] == 255
    assert activation_qparams(0.0, 0.0) == (1.0, 0)


def _reference_qdq(x, scale, zp):
    q = torch.clamp(torch.round(x / scale) + zp, 0, 255)
    return (q - zp) * scale


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_int8_layer_matches_reference_computation(kind):
    torch.manual_seed(0)
    if kind == "conv":
        layer = nn.Conv2d(8, 6, 3, stride=2, padding=1)
        x = torch.randn(2, 8, 9, 9) * 2 + 0.5
    else:
        layer = nn.Linear(8, 6)
        x = torch.randn(2, 5, 8) * 2 + 0.5
    q = (Int8Conv2d if kind == "conv" else Int8Linear).from_float(layer)
    scale, zp = activation_qparams(float(x.min()), float(x.max()))
    q.set_input_qparams(scale, zp)
    wq, ws = quantize_weight_per_channel(layer.weight)
    w = wq.float() * ws.reshape(-1, *[1] * (layer.weight.dim() - 1))
    xq = _reference_qdq(x, scale, zp)
    expected = (torch.nn.functional.conv2d(xq, w, layer.bias, 2, 1) if kind == "conv"
                else torch.nn.functional.linear(xq, w, layer.bias))
    with torch.no_grad():
        got = q(x)
        assert_float = layer(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert rel_err(got, assert_float) < 0.02  # and int8 is close to float (8-bit weights and inputs)
    # clipping: inputs beyond the calibrated range saturate, as the uint8 kernel does
    big = x * 10
    torch.testing.assert_close(q(big).detach(), (torch.nn.functional.conv2d(_reference_qdq(big, scale, zp), w,
                               layer.bias, 2, 1) if kind == "conv" else
                               torch.nn.functional.linear(_reference_qdq(big, scale, zp), w, layer.bias)))


def test_int8_layer_refuses_a_gpu_tensor_clearly():
    layer = Int8Linear.from_float(nn.Linear(4, 4))
    with pytest.raises(RuntimeError, match="CPU only.*float16"):
        layer(torch.zeros(1, 4, device="meta"))


# ------------------------------------------------------------------------------------ observers


def test_observers_track_the_range_over_all_calls():
    from diffusekit.quantization.observers import make_observer

    calls = [torch.randn(4000) * s + m for s, m in ((1.0, 0.0), (3.0, 1.0), (0.5, -2.0))]
    minmax, pct, avg = make_observer("minmax"), make_observer("percentile", 99.0), make_observer("average")
    for x in calls:
        for obs in (minmax, pct, avg):
            obs.observe(x)
    assert minmax.range() == (min(float(x.min()) for x in calls), max(float(x.max()) for x in calls))
    q = [torch.quantile(x, torch.tensor([0.01, 0.99])) for x in calls]
    assert pct.range() == pytest.approx((min(float(v[0]) for v in q), max(float(v[1]) for v in q)), abs=1e-2)
    assert avg.range() == pytest.approx((sum(float(x.min()) for x in calls) / 3, sum(float(x.max()) for x in calls)
                                         / 3))
    with pytest.raises(ValueError, match="percentile"):
        make_observer("percentile", 30)


# ------------------------------------------------------------------------------------ quantize_model


def test_quantize_model_converts_layers_and_keeps_defaults_float(quantized):
    float_unet, q, _ = quantized
    assert is_quantized(q) and not is_quantized(float_unet)
    assert type(q.conv_in) is nn.Conv2d and type(q.conv_out) is nn.Conv2d
    assert type(q.time_embedding.linear_1) is nn.Linear
    assert type(q.down_blocks[0].resnets[0].time_emb_proj) is nn.Linear
    assert isinstance(q.down_blocks[0].resnets[0].conv1, Int8Conv2d)
    assert isinstance(q.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q, Int8Linear)
    config = q.config["quantization_config"]
    assert config["quant_method"] == "diffusekit_int8" and "conv_in" in config["modules_to_not_convert"]
    assert q.dtype == torch.float32
    # int8 weights: the state dict is about a quarter of the float one
    size = lambda m: sum(t.numel() * t.element_size() for t in m.state_dict().values())  # noqa: E731
    assert size(q) < 0.45 * size(float_unet)


def test_quantized_output_close_to_float(quantized):
    float_unet, q, _ = quantized
    with torch.no_grad():
        for inputs in unet_inputs(seed=5):  # not the calibration inputs
            ref = float_unet(**inputs).sample
            assert rel_err(q(**inputs).sample, ref) < 0.05


def test_quantize_model_options_and_refusals():
    q = quantize_model(tiny_unet(), unet_inputs(1), modules_to_not_convert=["down_blocks.0", "*.to_k"],
                       observer="percentile", percentile=99.9)
    assert type(q.down_blocks[0].resnets[0].conv1) is winograd.Conv2d  # kept float
    assert type(q.up_blocks[1].attentions[0].transformer_blocks[0].attn2.to_k) is nn.Linear
    assert isinstance(q.up_blocks[1].attentions[0].transformer_blocks[0].attn2.to_v, Int8Linear)
    assert q.config["quantization_config"]["calibration"]["percentile"] == 99.9
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(q, unet_inputs(1))
    with pytest.raises(ValueError, match="never called"):
        quantize_model(tiny_unet(), [])
    with pytest.raises(ValueError, match="observer="):
        quantize_model(tiny_unet(), unet_inputs(1), observer="kl")


# ------------------------------------------------------------------------------------ format round trip


def test_save_load_round_trip_is_bit_equal(quantized):
    _, q, folder = quantized
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"]["format_version"] == 1
    from safetensors import safe_open

    with safe_open(str(folder / "diffusion_pytorch_model.safetensors"), "pt") as f:
        key = "down_blocks.0.resnets.0.conv1"
        assert f.get_tensor(f"{key}.weight").dtype == torch.int8
        assert f.get_tensor(f"{key}.weight_scale").dtype == torch.float32
        assert f.get_tensor(f"{key}.input_scale").shape == ()
        assert f.get_tensor(f"{key}.input_zero_point").dtype == torch.int32
        assert f.get_tensor("conv_in.weight").dtype == torch.float32
    loaded = diffusekit.UNet2DConditionModel.from_pretrained(folder)
    assert isinstance(loaded.down_blocks[0].resnets[0].conv1, Int8Conv2d)
    assert loaded.config["quantization_config"] == q.config["quantization_config"]
    with torch.no_grad():
        for inputs in unet_inputs(seed=7):
            assert torch.equal(loaded(**inputs).sample, q(**inputs).sample)
    # and again: a loaded int8 model saves the same checkpoint
    again = folder.parent / "again"
    loaded.save_pretrained(again)
    assert json.loads((again / "config.json").read_text())["quantization_config"] == config["quantization_config"]


def test_quantized_checkpoint_refuses_half_dtype(quantized):
    with pytest.raises(ValueError, match="int8 quantized checkpoint"):
        diffusekit.UNet2DConditionModel.from_pretrained(quantized[2], torch_dtype=torch.float16)


HOSTILE = [
    (lambda c: "not a dict", "must be a JSON object"),
    (lambda c: {**c, "quant_method": "bitsandbytes"}, "quant_method"),
    (lambda c: {k: v for k, v in c.items() if k != "weight_bits"}, "'weight_bits'.*missing"),
    (lambda c: {**c, "weight_bits": 4}, "'weight_bits'.*must be 8"),
    (lambda c: {**c, "format_version": 2}, "newer than this diffusekit"),
    (lambda c: {**c, "format_version": "1"}, "'format_version'"),
    (lambda c: {**c, "activation_scheme": "int8_symmetric"}, "activation_scheme"),
    (lambda c: {**c, "modules_to_not_convert": "conv_in"}, "modules_to_not_convert"),
    (lambda c: {**c, "modules_to_not_convert": [1, 2]}, "modules_to_not_convert"),
    (lambda c: {**c, "modules_to_not_convert": ["no_such.layer"]}, "not Conv2d/Linear layers"),
    (lambda c: {**c, "calibration": {"a": [[[[1]]]]}}, "calibration"),
    (lambda c: {**c, "code": "import os"}, "unknown keys"),
]


@pytest.mark.parametrize("edit, message", HOSTILE)
def test_hostile_quantization_config_is_refused_naming_file_and_key(quantized, tmp_path, edit, message):
    folder = tmp_path / "bad"
    shutil.copytree(quantized[2], folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = edit(config["quantization_config"])
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(QuantizationConfigError, match=message) as info:
        diffusekit.UNet2DConditionModel.from_pretrained(folder)
    assert "config.json" in str(info.value)


def test_partial_quantization_config_does_not_match_weights(quantized, tmp_path):
    """A config that claims a layer is float while the file holds it as int8 fails with the checkpoint error."""
    folder = tmp_path / "partial"
    shutil.copytree(quantized[2], folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["modules_to_not_convert"].append("down_blocks.0.resnets.0.conv1")
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(diffusekit.modeling.CheckpointError, match="conv1.weight_scale"):
        diffusekit.UNet2DConditionModel.from_pretrained(folder)


def test_float_checkpoint_with_int8_config_is_refused(quantized, tmp_path):
    folder = tmp_path / "float"
    quantized[0].save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = quantized[1].config["quantization_config"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(diffusekit.modeling.CheckpointError):
        diffusekit.UNet2DConditionModel.from_pretrained(folder)


# ------------------------------------------------------------------------------------ pipelines


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("sd"))


def test_pipeline_quantize_calibrates_over_the_schedule_and_round_trips(sd_folder, tmp_path):
    pipe = diffusekit.StableDiffusionPipeline.from_pretrained(sd_folder)
    pipe.set_progress_bar_config(disable=True)
    calls = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, a, k: calls.append(a[0].shape[0]), with_kwargs=True)
    ref = pipe("a cat", num_inference_steps=3, generator=torch.Generator().manual_seed(3), output_type="pt").images
    per_run = len(calls)
    pipe.quantize(["a dog", "a red car"], num_inference_steps=3, guidance_scale=5.0)
    hook.remove()
    assert len(calls) == 3 * per_run and set(calls) == {2}  # every step of every prompt, CFG batch
    assert is_quantized(pipe.unet)
    info = pipe.unet.config["quantization_config"]["calibration"]
    assert info["calibration_runs"] == 2 and info["num_inference_steps"] == 3
    out = pipe("a cat", num_inference_steps=3, generator=torch.Generator().manual_seed(3), output_type="pt").images
    assert float((out - ref).abs().max()) < 0.1
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = diffusekit.DiffusionPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert is_quantized(loaded.unet)
    again = loaded("a cat", num_inference_steps=3, generator=torch.Generator().manual_seed(3), output_type="pt").images
    assert torch.equal(again, out)


def test_pipeline_quantize_vae_decoder_on_the_calibration_latents(sd_folder, tmp_path):
    pipe = diffusekit.StableDiffusionPipeline.from_pretrained(sd_folder)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe("a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(3), output_type="pt").images
    pipe.quantize(["a dog"], num_inference_steps=2, components=("unet", "vae"))
    assert isinstance(pipe.vae.decoder.up_blocks[0].resnets[0].conv1, Int8Conv2d)
    assert type(pipe.vae.decoder.conv_out) is nn.Conv2d and type(pipe.vae.post_quant_conv) is nn.Conv2d
    assert not is_quantized(pipe.vae.encoder)
    out = pipe("a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(3), output_type="pt").images
    assert float((out - ref).abs().mean()) < 0.05
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = diffusekit.DiffusionPipeline.from_pretrained(tmp_path / "pipe")
    assert isinstance(loaded.vae.decoder.up_blocks[0].resnets[0].conv1, Int8Conv2d)
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded.vae.decode(z).sample, pipe.vae.decode(z).sample)


def test_pipeline_quantize_refuses_bad_prompts(sd_folder):
    pipe = diffusekit.StableDiffusionPipeline.from_pretrained(sd_folder)
    with pytest.raises(ValueError, match="prompts"):
        pipe.quantize([])
    with pytest.raises(ValueError, match="components"):
        pipe.quantize(["a dog"], components=("vae",))


# ------------------------------------------------------------------------------------ compiled int8


def test_compiled_int8_matches_eager_int8_and_lowers_to_onednn(tmp_path):
    """optimize() (inductor freezing) turns the QDQ pattern into oneDNN int8 convolutions / matmuls (counted), with
    the eager int8 numbers."""
    from torch._dynamo.utils import counters

    from diffusekit.optimize import compiled_call, optimize_module

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.SiLU(), nn.Conv2d(16, 16, 3, padding=1),
                          nn.Flatten(2), nn.Linear(36, 8)).eval()
    x = torch.randn(2, 8, 6, 6)
    quantize_model(model, [x * 1.2, x])
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        eager = model(x)
        optimize_module(model, cache_dir=tmp_path)
        compiled = model(x)
    assert compiled_call(model).stats["compiled"] == 1 and compiled_call(model).stats["eager_fallback"] == 0
    assert counters["inductor"]["qconv_weight_prepack_matcher_count"] == 2
    assert counters["inductor"]["qlinear_weight_prepack_matcher_count"] == 1
    torch.testing.assert_close(compiled, eager, rtol=2e-2, atol=2e-2)
    assert rel_err(compiled, eager) < 5e-3


@pytest.mark.slow
def test_optimize_on_a_quantized_unet_matches_eager_int8(quantized, tmp_path):
    """The loaded int8 UNet under optimize(): compiled (no eager fallback), oneDNN int8 kernels, eager int8 numbers.
    Eager runs with the CPU kernels optimize() turns on for int8 models (fused bf16 attention, GroupNorm), so the two
    differ by compilation only; the kernels' own error against torch's is tested in test_cpu_attention.py."""
    from torch._dynamo.utils import counters

    from diffusekit.optimize import _default_cpu_kernels, compiled_call

    loaded = diffusekit.UNet2DConditionModel.from_pretrained(quantized[2])
    inputs = unet_inputs(1, seed=9)[0]
    torch._dynamo.reset()
    counters.clear()
    _default_cpu_kernels(loaded)
    with torch.no_grad():
        eager = loaded(**inputs).sample
        loaded.optimize(cache_dir=tmp_path)
        compiled = loaded(**inputs).sample
    assert compiled_call(loaded).stats["compiled"] == 1 and compiled_call(loaded).stats["eager_fallback"] == 0
    assert counters["inductor"]["qconv_weight_prepack_matcher_count"] > 10
    assert rel_err(compiled, eager) < 2e-2


def test_compiled_int8_attention_keeps_a_fused_attention_kernel():
    """At 512² the float attention product is ~45 % of a compiled int8 UNet step (docs/QUANTIZATION.md, profile):
    compiled, its projections must be oneDNN int8 matmuls and the product itself one fused kernel per attention
    (diffusekit's bf16 CPU kernel, optimize()'s default for int8 where it runs; else torch's fused CPU flash SDPA),
    never a decomposed matmul + softmax + matmul that materialises the score matrix."""
    from torch.profiler import ProfilerActivity, profile

    from diffusekit import cpu_attention
    from diffusekit.models.attention import Attention
    from diffusekit.optimize import compiled_call, optimize_module

    torch.manual_seed(0)
    model = Attention(32, heads=2, dim_head=16, norm_num_groups=8, residual_connection=True, bias=True).eval()
    x = torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        reference = model(x)
    quantize_model(model, [x, x * 0.8])
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(x)
        # use_cache=False: compiled in process (not an AOTInductor package, whose kernels the profiler cannot name);
        # both go through the same inductor lowering
        optimize_module(model, use_cache=False)
        model(x)  # compile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            compiled = model(x)
    assert compiled_call(model).stats["eager_fallback"] == 0 and compiled_call(model).stats["aoti_builds"] == 0
    calls = {}
    for event in prof.events():
        calls[event.name] = calls.get(event.name, 0) + 1
    fused = cpu_attention.available()
    assert model.cpu_fused_attention is (True if fused else None)
    # the fused kernel writes to_out.0's uint8 input itself (cpu_attention_quantize)
    kernel = "diffusekit::cpu_attention_quantize" if fused else "aten::_scaled_dot_product_flash_attention_for_cpu"
    assert calls.get(kernel) == 1, list(calls.items())
    assert calls.get("onednn::qlinear_pointwise") == 4, list(calls.items())  # to_q, to_k, to_v, to_out.0
    assert not {"aten::bmm", "aten::_softmax", "aten::matmul", "aten::mm"} & set(calls), sorted(calls)
    assert rel_err(compiled, eager) < 5e-3 and rel_err(compiled, reference) < 2e-2
