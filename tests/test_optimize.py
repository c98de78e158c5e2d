"""``optimize()``: the compiled exact path (docs/PERFORMANCE.md).

Parity first: a tiny random UNet of the real architecture, compiled with the CPU settings (by default into an
AOTInductor package bound to the model's weights), must give eager's output (and diffusers' on the same weights)
within 1e-5 relative, with one package whatever ``return_dict``; the ``torch.compile`` path (``packages=False``)
must hit its persistent cache from a second, fresh process (inductor's counters, not time); fallbacks (no compiler,
a failing compile, grad mode) must run eager. Compiles are slow on 2 cores: the default suite compiles one tiny UNet
and, twice in subprocesses, a toy model; the VAE / text encoder / whole-pipeline checks are ``slow``. The packages'
own cross-process tests are in test_aot_packages.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_close, run_json_child
from diffusekit import UNet2DConditionModel, cpu_matmul
from diffusekit import optimize as opt
from diffusekit.models import winograd

diffusers = pytest.importorskip("diffusers")

SRC = Path(__file__).resolve().parents[1] / "src"
TINY_UNET = dict(sample_size=8, block_out_channels=(16, 32), layers_per_block=1,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=4,
                 norm_num_groups=8)


def assert_matches(actual, expected, rel: float = 1e-5) -> None:
    """The exact path's bound: max |difference| within ``rel`` of the output's largest magnitude."""
    scale = expected.abs().max().item()
    diff = (actual - expected).abs().max().item()
    assert scale > 0 and diff <= rel * scale, f"max abs difference {diff:.3g} > {rel:g} x {scale:.3g}"


def _perturb(model: torch.nn.Module, seed: int = 123) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def _unet_pair(tmp_path):
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**TINY_UNET).eval()
    _perturb(ref)
    ref.save_pretrained(tmp_path / "unet")
    return UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval(), ref


def _unet_inputs(batch=2, size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, size, size, generator=g), torch.tensor(321),
            torch.randn(batch, 7, 16, generator=g))


def test_unet_optimize_matches_eager_and_diffusers(tmp_path, monkeypatch):
    # the tiny UNet's 32-channel 3x3 layers go through Winograd (optimize()'s CPU default, its channel rule scaled
    # down; every layer would double the build's 45 s): compiled into the package, within the exact path's bound of
    # eager's direct convolutions and of diffusers
    monkeypatch.setattr(winograd, "MIN_CHANNELS", 32)
    monkeypatch.setattr(winograd, "MIN_PIXELS", 1)
    traced = []
    real_conv2d = winograd.conv2d
    monkeypatch.setattr(winograd, "conv2d", lambda x, weight, bias=None: traced.append(tuple(weight.shape[:2]))
                        or real_conv2d(x, weight, bias))
    ours, ref = _unet_pair(tmp_path)
    upsampler_conv = ours.up_blocks[0].upsamplers[0].conv
    wide = [m for m in ours.modules() if isinstance(m, winograd.Conv2d) and m.kernel_size == (3, 3)
            and min(m.in_channels, m.out_channels) >= 32 and m is not upsampler_conv]
    assert len(wide) == 9
    sample, t, text = _unet_inputs()
    with torch.no_grad():
        eager = ours(sample, t, encoder_hidden_states=text).sample
        expected = ref(sample, t, encoder_hidden_states=text).sample
    assert ours.optimize(cache_dir=tmp_path / "cache") is ours  # the default: a bound package
    call = opt.compiled_call(ours)
    assert call is not None
    with torch.no_grad():
        fast = ours(sample, t, encoder_hidden_states=text).sample
        again = ours(sample, t, encoder_hidden_states=text, return_dict=False)
        explicit = ours(sample, t, encoder_hidden_states=text, return_dict=True)
    assert call.stats["compiled"] == 3 and call.stats["eager_fallback"] == 0 and call.stats["compiles"] == 0
    # traced into the package: every wide layer but the upsampler's (computed before its upsampling), no other
    assert sorted(traced) == sorted((m.out_channels, m.in_channels) for m in wide), traced
    # one package (code only, bound to the live weights) serves every return_dict: the tuple is made outside
    assert call.stats["aoti_builds"] == 1 and len(call.packages.loaded) == 1, call.stats
    (package,) = call.packages.loaded.values()
    # no weight inside: all are inputs (Winograd's weight transform is arithmetic, not a constant matrix)
    constants = package.runner.get_constant_names_to_original_fqns()
    assert all(name.startswith("_tensor_constant") for name in constants.values()), constants
    # the float32 products run on oneDNN where optimize() chose it (cpu_matmul), on MKL elsewhere
    calls = "".join(path.read_text() for path in (tmp_path / "cache").rglob("model.json"))  # its extern calls
    assert ("diffusekit::linear" in calls) == (cpu_matmul.unavailable_reason() is None)
    assert isinstance(again, tuple) and len(again) == 1 and type(explicit).__name__ == "UNet2DConditionOutput"
    assert_matches(fast, eager)
    assert_matches(again[0], eager)
    assert torch.equal(explicit.sample, fast)
    assert_matches(fast, expected)
    assert all(m.winograd for m in ours.modules() if isinstance(m, winograd.Conv2d))

    # a fresh instance (as a fresh process would be: test_aot_packages checks that too) loads the package, builds
    # nothing, compiles nothing; the same code on the same weights gives the same bits
    fresh = UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval().optimize(cache_dir=tmp_path / "cache")
    with torch.no_grad():
        loaded = fresh(sample, t, encoder_hidden_states=text).sample
    stats = opt.compiled_call(fresh).stats
    assert (stats["aoti_builds"], stats["aoti_loads"], stats["compiles"], stats["compiled"]) == (0, 1, 0, 1), stats
    assert torch.equal(loaded, fast)

    # grad mode: eager, autograd intact
    out = ours(sample, t, encoder_hidden_states=text).sample
    out.square().mean().backward()
    assert call.stats["eager_grad"] == 1 and ours.conv_in.weight.grad is not None
    assert_close(out.detach(), eager)


_CHILD = textwrap.dedent("""
    import json, sys, warnings
    import torch
    from diffusekit.optimize import compiled_call, optimize_module
    torch.set_num_threads(1)
    torch.manual_seed(int(sys.argv[2]))
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.GroupNorm(4, 8), torch.nn.SiLU(),
                                torch.nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = model(x)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            optimize_module(model, cache_dir=sys.argv[1], packages=False)
            fast = model(x)
    stats = dict(compiled_call(model).stats)
    stats["max_rel"] = ((fast - eager).abs().max() / eager.abs().max()).item()
    stats["warnings"] = [str(w.message) for w in caught if "optimize()" in str(w.message)]
    stats["sum"] = fast.sum().item()
    print(json.dumps(stats))
""")


def _child(cache: Path, seed: int = 0) -> dict:
    return run_json_child(_CHILD, str(cache), str(seed))


def test_compile_cache_is_hit_by_a_fresh_process_and_survives_corruption(tmp_path):
    """The torch.compile path (``packages=False``, also the fallback of a failed package build)."""
    cache = tmp_path / "cache"
    first = _child(cache)
    assert first["fxgraph_cache_miss"] >= 1 and first["fxgraph_cache_hit"] == 0, first
    entries = list((opt._versioned(cache) / "fxgraph").rglob("*"))
    assert entries, "no FX-graph entry in our cache folder"
    # other weights, same architecture: the same entry (weights are not in the key), their own outputs
    second = _child(cache, seed=1)
    assert second["fxgraph_cache_hit"] >= 1 and second["fxgraph_cache_miss"] == 0, second
    assert abs(second["sum"] - first["sum"]) > 1e-3
    for result in (first, second):
        assert result["compiled"] == 1 and result["eager_fallback"] == 0 and result["max_rel"] < 1e-5
        assert result["warnings"] == []
    # every cache file truncated (a disk full / killed writer): still the right numbers, rebuilt
    for path in opt._versioned(cache).rglob("*"):
        if path.is_file():
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    third = _child(cache)
    assert third["max_rel"] < 1e-5 and third["compiled"] + third["eager_fallback"] == 1, third
    assert len(third["warnings"]) <= 1, third


def _toy():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.SiLU(), torch.nn.Linear(8, 2)).eval()


_REUSE_CHILD = textwrap.dedent("""
    import json, os, resource, sys
    import torch
    from diffusekit import optimize as opt
    if sys.argv[2] == "env":  # a user who tuned malloc themselves (read at call time)
        os.environ["MALLOC_TOP_PAD_"] = "131072"
    model = torch.nn.Linear(4, 4)
    opt.optimize_module(model, use_cache=False, reuse_memory=sys.argv[1] == "1")  # lazy: nothing compiles
    x = torch.ones(16 << 20)  # 64 MiB

    def step():  # three 64 MiB intermediates, written and freed, as a model's call makes them
        y = x * 2
        z = torch.relu(y)
        del y
        return float((z + 1)[0])

    faults = []
    for _ in range(10):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({"faults": faults}))
""")


@pytest.mark.skipif(not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc") if hasattr(os, "confstr")
                    else True, reason="malloc tuning is for glibc")
def test_optimize_lets_malloc_keep_freed_memory_for_the_next_call():
    """CPU ``optimize()`` asks glibc's malloc to keep freed blocks (``_native.keep_freed_memory``): once the heap has
    grown to a step's needs (a few steps: torch's aligned allocations fragment it at first), a step whose three
    64 MiB intermediates are written and freed costs almost no new page faults; with malloc's default every block
    over 32 MiB is mapped afresh, 3 x 16384 4-KiB faults per step. ``reuse_memory=False``, or a malloc setting of
    the user's own in the environment, leaves malloc as it is. Page faults are counted, not time."""
    per_step = 3 * (64 << 20) // 4096
    settled = run_json_child(_REUSE_CHILD, "1", "-")["faults"][4:]  # after four steps
    assert sum(settled) < 0.25 * per_step * len(settled), settled
    for argv in (("0", "-"), ("1", "env")):
        untouched = run_json_child(_REUSE_CHILD, *argv)["faults"][4:]
        assert sum(untouched) > 0.75 * per_step * len(untouched), (argv, untouched)


def test_weights_edited_after_optimize_are_never_served_stale(tmp_path):
    """fuse_lora / load_state_dict edit weights in place, load_state_dict(assign=True) replaces them: an unfrozen
    graph takes the live parameters as inputs, so no recompile (and no per-call walk over the weights). The
    torch.compile path (``packages=False``); the packages' own test (frozen ones are rebuilt): test_aot_packages."""
    model = _toy()
    x = torch.randn(3, 4)
    opt.optimize_module(model, cache_dir=tmp_path, packages=False)
    with torch.no_grad():
        assert_matches(model(x), model._call_impl(x))
        model[0].weight.mul_(1.5)
        assert_matches(model(x), model._call_impl(x))
        model[2].load_state_dict({"weight": torch.randn(2, 8), "bias": torch.randn(2)}, assign=True)
        assert_matches(model(x), model._call_impl(x))
    stats = opt.compiled_call(model).stats
    assert stats["compiled"] == 3 and stats["eager_fallback"] == 0
    assert stats["compiles"] == 1


def test_file_pages_of_the_weights_are_handed_back_never_lost(tmp_path):
    from safetensors.torch import save_file

    from diffusekit.modeling import read_safetensors

    save_file({"weight": torch.randn(1024, 2048), "bias": torch.randn(1024)}, tmp_path / "w.safetensors")
    layer = torch.nn.Linear(2048, 1024)
    layer.load_state_dict(read_safetensors(tmp_path / "w.safetensors"), assign=True)
    expected = layer.weight.clone()

    def rss_file_kb():
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("RssFile"))

    pages = opt._FilePages(layer)
    assert pages.ranges, "the weights are not memory-mapped from the file"
    layer.weight.sum()
    before = rss_file_kb()
    pages.page_out()
    assert before - rss_file_kb() > 6000  # the 8 MB weight left this process's memory
    assert torch.equal(layer.weight, expected)  # and reads back from the file
    with torch.no_grad():
        layer.weight[0].add_(1.0)  # edited in place: a private page that page-out must keep
    pages.page_out()
    assert torch.equal(layer.weight[0], expected[0] + 1.0) and torch.equal(layer.weight[1:], expected[1:])


def test_freezing_opt_in_prepacks_weights_and_matches(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(2, 3, 8, 8)
    opt.optimize_module(model, cache_dir=tmp_path, options={"freezing": True})
    with torch.no_grad():
        assert_matches(model(x), model._call_impl(x))
    stats = opt.compiled_call(model).stats
    assert stats["weight_packs"] >= 2 and stats["compiled"] == 1  # both convs pre-packed for oneDNN


class _Scaled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 2)

    def forward(self, x, scale: float = 1.0):
        return self.linear(x) * scale


def test_calls_a_package_cannot_serve_use_torch_compile(monkeypatch, tmp_path):
    """The default (packages) refuses a numeric argument (it would be baked into the graph) and a model with forward
    hooks (unfused LoRA): those calls go to torch.compile (here a stand-in that runs eager), never to a build."""
    compiled = []

    def stand_in(fn, **kwargs):
        compiled.append(fn)
        return fn

    monkeypatch.setattr(torch, "compile", stand_in)
    model = _Scaled().eval()
    x = torch.randn(3, 4)
    opt.optimize_module(model, cache_dir=tmp_path)
    call = opt.compiled_call(model)
    assert call.packages is not None and call.packages.bound  # the exact path's default: bound packages
    with torch.no_grad():
        assert torch.equal(model(x, 0.5), model._call_impl(x, 0.5))
        handle = model.linear.register_forward_hook(lambda module, args, out: out + 1)
        assert torch.equal(model(x), model._call_impl(x))
        handle.remove()
    assert call.stats["compiled"] == 2 and call.stats["aoti_builds"] == 0 and len(compiled) == 1, call.stats
    assert not (opt._versioned(tmp_path) / "aoti").exists()  # nothing built


def test_pipeline_optimize_gives_every_component_the_same_default(tmp_path):
    """``pipe.optimize()`` passes its arguments to each model: by default every compiled part (UNet, VAE encoder and
    decoder, text encoder) runs from bound packages; ``packages=False`` or ``use_cache=False``: torch.compile. Lazy:
    nothing is built here."""
    from sd_assets import build_tiny_sd

    from diffusekit import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(build_tiny_sd(tmp_path / "sd"))
    parts = (pipe.unet, pipe.vae.encoder, pipe.vae.decoder, pipe.text_encoder)
    pipe.optimize(cache_dir=tmp_path / "cache")
    for part in parts:
        call = opt.compiled_call(part)
        assert call is not None and call.packages is not None and call.packages.bound, type(part).__name__
    for kwargs in ({"packages": False}, {"use_cache": False}, {"dynamic": None}):
        pipe.optimize(cache_dir=tmp_path / "cache", **kwargs)
        for part in parts:
            assert opt.compiled_call(part).packages is None, (kwargs, type(part).__name__)
    pipe.optimize(cache_dir=tmp_path / "cache", packages=True)
    assert all(opt.compiled_call(part).packages is not None for part in parts)
    assert not (tmp_path / "cache").exists()


def test_packages_stay_in_our_cache_when_the_user_chose_inductors(monkeypatch, tmp_path):
    """A user's own ``TORCHINDUCTOR_CACHE_DIR`` is inductor's cache for torch.compile (not redirected), but packages
    are diffusekit's: they still run, from diffusekit's cache folder (a warm start for that user too)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setenv("DIFFUSEKIT_CACHE_DIR", str(tmp_path / "ours"))
    model = opt.optimize_module(_toy())
    call = opt.compiled_call(model)
    assert call.cache_dir is None  # inductor's own caches: the user's choice
    assert call.packages is not None and call.packages.folder == opt._versioned(tmp_path / "ours")
    assert opt.compiled_call(opt.optimize_module(_toy(), use_cache=False)).packages is None


def test_no_compiler_warns_once_and_runs_eager(monkeypatch):
    monkeypatch.setattr(opt, "_cpp_compiler", lambda: None)
    model = _toy()
    x = torch.randn(3, 4)
    expected = model(x)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler") as caught:
        assert opt.optimize_module(model) is model
    assert len(caught) == 1 and opt.compiled_call(model) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            assert_close(model(x), expected)


def test_failing_compile_retries_without_cache_then_runs_eager(monkeypatch, tmp_path):
    builds = []

    def broken_compile(fn, **kwargs):
        builds.append(fn)

        def run(*args, **kw):
            raise RuntimeError("C++ compile error: simulated")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    model = _toy()
    x = torch.randn(3, 4)
    expected = model(x)
    opt.optimize_module(model, cache_dir=tmp_path, packages=False)
    with torch.no_grad():
        with pytest.warns(RuntimeWarning, match="retrying once without the compile cache"):
            assert_close(model(x), expected)
        with pytest.warns(RuntimeWarning, match="running eager"):
            assert_close(model(x), expected)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # one warning, then quiet
            assert_close(model(x), expected)
        # an input error is the input's: raised as eager raises it, not hidden
        with pytest.raises(RuntimeError, match="shape"):
            model(torch.randn(3, 5))
    assert len(builds) == 2 and opt.compiled_call(model).options["fx_graph_cache"] is False
    assert opt.compiled_call(model).stats["eager_fallback"] == 3  # the disabled calls, the bad input included


def test_input_errors_are_raised_not_swallowed(monkeypatch, tmp_path):
    def compile_then_fail(fn, **kwargs):
        return fn  # "compiled" = the eager function: an input error raises in both paths

    monkeypatch.setattr(torch, "compile", compile_then_fail)
    model = opt.optimize_module(_toy(), cache_dir=tmp_path, packages=False)
    with torch.no_grad(), pytest.raises(RuntimeError, match="shape"):
        model(torch.randn(3, 5))
    assert opt.compiled_call(model).disabled is None


def test_cache_location_and_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFUSEKIT_CACHE_DIR", str(tmp_path / "mine"))
    assert opt.default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("DIFFUSEKIT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert opt.default_cache_dir() == tmp_path / "xdg" / "diffusekit" / "compile"
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    with opt._inductor_cache(tmp_path / "x"):
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "x")
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    assert not (tmp_path / "xdg").exists()  # nothing written until a compile writes


def test_a_relative_cache_folder_is_taken_from_where_optimize_was_called(monkeypatch, tmp_path):
    # inductor's compiler and linker run in other working directories (measured: an AOTInductor build into a
    # relative folder failed to link)
    monkeypatch.chdir(tmp_path)
    model = opt.optimize_module(torch.nn.Linear(2, 2).eval(), cache_dir="packages")
    folder = opt.compiled_call(model).packages.folder
    assert folder.is_absolute() and folder.parent == tmp_path / "packages", folder
    model = opt.optimize_module(torch.nn.Linear(2, 2).eval(), cache_dir="compiled", packages=False)
    assert opt.compiled_call(model).cache_dir.parent == tmp_path / "compiled"
    assert opt._versioned(Path("env")).parent == tmp_path / "env"  # DIFFUSEKIT_CACHE_DIR=env


def test_import_stays_light():
    code = ("import sys, diffusekit; diffusekit.UNet2DConditionModel.optimize; diffusekit.DiffusionPipeline.optimize;"
            "import diffusekit.optimize; print(sorted(m for m in ('torch._dynamo', 'torch._inductor') "
            "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(SRC)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------------ slow


@pytest.mark.slow
def test_vae_and_text_encoder_optimize_match_eager(tmp_path):
    import transformers

    from diffusekit import AutoencoderKL, CLIPTextModel

    torch.manual_seed(0)
    ref_vae = diffusers.AutoencoderKL(block_out_channels=(8, 16), norm_num_groups=4, latent_channels=4,
                                      layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                                      up_block_types=("UpDecoderBlock2D",) * 2).eval()
    _perturb(ref_vae)
    ref_vae.save_pretrained(tmp_path / "vae")
    vae = AutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        eager = vae.decode(z).sample
        expected = ref_vae.decode(z).sample
        vae.optimize(cache_dir=tmp_path / "cache")
        fast = vae.decode(z).sample
    assert opt.compiled_call(vae.decoder).stats["compiled"] == 1
    assert_matches(fast, eager)
    assert_matches(fast, expected)

    config = transformers.CLIPTextConfig(vocab_size=100, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                         num_attention_heads=2, max_position_embeddings=12)
    ref_text = transformers.CLIPTextModel(config).eval()
    ref_text.save_pretrained(tmp_path / "text")
    text = CLIPTextModel.from_pretrained(tmp_path / "text").eval()
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        eager = text(ids)[0]
        expected = ref_text(ids)[0]
        text.optimize(cache_dir=tmp_path / "cache")
        fast = text(ids)[0]
    assert opt.compiled_call(text).stats["compiled"] == 1
    assert_matches(fast, eager)
    assert_matches(fast, expected)


@pytest.mark.slow
def test_pipeline_optimize_matches_eager(tmp_path):
    from sd_assets import build_tiny_sd

    from diffusekit import StableDiffusionPipeline

    folder = build_tiny_sd(tmp_path / "sd")
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    kwargs = dict(prompt="a cat", num_inference_steps=2, height=32, width=32, output_type="np")
    eager = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    assert pipe.optimize(cache_dir=tmp_path / "cache") is pipe
    fast = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    for module in (pipe.unet, pipe.vae.decoder, pipe.text_encoder):  # each from its bound package (the default)
        stats = opt.compiled_call(module).stats
        assert stats["compiled"] >= 1 and stats["eager_fallback"] == 0, (type(module).__name__, stats)
        assert stats["aoti_builds"] == 1 and stats["compiles"] == 0, (type(module).__name__, stats)
    assert_matches(torch.from_numpy(fast), torch.from_numpy(eager))

    # with DeepCache-style reuse (a per-step object passed to the UNet): still compiled, still exact; first through
    # torch.compile (packages=False)
    kwargs.update(num_inference_steps=3, deep_cache=2)
    pipe.unet._compiled_call_impl = None
    eager = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    pipe.unet.optimize(cache_dir=tmp_path / "cache", packages=False)
    fast = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    stats = opt.compiled_call(pipe.unet).stats
    # one compiled call per UNet step (PNDM runs one more step than asked), two graphs (full and cached steps)
    assert stats["compiled"] == 4 and stats["eager_fallback"] == 0, stats
    assert stats["aoti_builds"] == 0 and stats["compiles"] == 2, stats
    assert_matches(torch.from_numpy(fast), torch.from_numpy(eager))

    # then from packages (the default): one per graph (full and cached steps), the step's tensors passed in and its
    # kept feature passed back out (aot_packages.PackageInput)
    pipe.unet.optimize(cache_dir=tmp_path / "cache")
    fast = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    stats = opt.compiled_call(pipe.unet).stats
    assert (stats["compiled"], stats["aoti_builds"], stats["compiles"]) == (4, 2, 0), stats
    assert_matches(torch.from_numpy(fast), torch.from_numpy(eager))


@pytest.mark.slow
def test_sdxl_pipeline_optimize_matches_eager(tmp_path):
    """SDXL: the UNet's added conditions (pooled text embeddings, time ids) and both text encoders go through their
    packages; a per-call FreeU setting builds its own UNet package and matches eager FreeU."""
    from sdxl_assets import build_tiny_sdxl

    from diffusekit import StableDiffusionXLPipeline
    from diffusekit.generation import generate
    from diffusekit.infotext import GenerationParameters

    pipe = StableDiffusionXLPipeline.from_pretrained(build_tiny_sdxl(tmp_path / "sdxl"))
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a red dress", num_inference_steps=2, height=64, width=64, output_type="np")
    params = GenerationParameters(prompt="a red dress", steps=2, seed=0, width=64, height=64,
                                  freeu=(0.9, 0.2, 1.5, 1.6))
    eager = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    eager_freeu = generate(pipe, params, output_type="np").images[0]
    assert pipe.optimize(cache_dir=tmp_path / "cache") is pipe
    fast = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    for module in (pipe.unet, pipe.vae.decoder, pipe.text_encoder, pipe.text_encoder_2):
        stats = opt.compiled_call(module).stats
        assert stats["compiled"] >= 1 and stats["eager_fallback"] == 0, (type(module).__name__, stats)
        assert stats["aoti_builds"] == 1 and stats["compiles"] == 0, (type(module).__name__, stats)
    assert_matches(torch.from_numpy(fast), torch.from_numpy(eager))
    fast_freeu = generate(pipe, params, output_type="np").images[0]
    assert opt.compiled_call(pipe.unet).stats["aoti_builds"] == 2  # the FreeU factors key their own package
    assert_matches(torch.from_numpy(fast_freeu), torch.from_numpy(eager_freeu))
    assert np.abs(fast_freeu - fast[0]).max() > 1e-3  # FreeU changed the image
    again = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images  # FreeU off again: the first package
    assert opt.compiled_call(pipe.unet).stats["aoti_builds"] == 2 and np.array_equal(again, fast)
