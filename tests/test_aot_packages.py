"""AOTInductor packages: the warm start of optimize() (the exact path's bound packages; int8 / float with freezing).

The real contract is across processes: a second, fresh process must load the package its predecessor built and
compile nothing (its own stats: no build, one load; and the same output bits, or for a bound package, its own
weights' outputs), a corrupt package must be rebuilt with one warning, never loaded. Builds take ~10-20 s each on one
core, so the default suite builds twice (a toy int8 model and a toy float model, each in a subprocess, then loaded by
a second one); the key, its cache and the cheap structure check, the signature rules, the manifest check (a corrupt
library is refused before loading) and eviction are tested without compiling; the rebuild of a truncated package is
``slow``.
"""

from __future__ import annotations

import json
import os
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from conftest import run_json_child
from diffusekit import aot_packages as aot
from diffusekit import optimize as opt


_CHILD = textwrap.dedent("""
    import json, os, sys, warnings
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from safetensors.torch import save_file
    from torch import nn
    from diffusekit.modeling import read_safetensors
    from diffusekit.optimize import compiled_call, optimize_module
    from diffusekit.quantization import quantize_model

    def resident_kb(path):  # this process's resident pages of a mapped file (/proc/self/smaps)
        path, total, mine = os.path.realpath(path), 0, False
        for line in open("/proc/self/smaps"):
            fields = line.split()
            if not fields[0].endswith(":"):  # a mapping's header line
                mine = len(fields) >= 6 and fields[5] == path
            elif mine and fields[0] == "Rss:":
                total += int(fields[1])
        return total

    torch.manual_seed(int(sys.argv[2]))
    # the 2048 x 2048 layer gives the package 4 MB of frozen int8 constants (its code is a few hundred kB)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.SiLU(), nn.Flatten(2), nn.Linear(36, 2048), nn.SiLU(),
                          nn.Linear(2048, 2048), nn.SiLU(), nn.Linear(2048, 8)).eval()
    x = torch.randn(2, 8, 6, 6, generator=torch.Generator().manual_seed(5))
    quantize_model(model, [x * 1.2, x])
    # the weights memory-mapped from a checkpoint, as from_pretrained loads them: the first process writes it, later
    # ones map the same file (where each weight lies in it is part of the package's key)
    weights = Path(sys.argv[1]).parent / f"weights-{sys.argv[2]}.safetensors"
    if not weights.exists():
        save_file(model.state_dict(), weights)
    model.load_state_dict(read_safetensors(weights), assign=True)
    with torch.no_grad():
        eager = model(x)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            optimize_module(model, cache_dir=sys.argv[1])
            fast = model(x)
    stats = dict(compiled_call(model).stats)
    stats["rel"] = ((fast - eager).norm() / eager.norm()).item()
    stats["warnings"] = [str(w.message) for w in caught if "optimize()" in str(w.message)]
    stats["out"] = fast.flatten().tolist()
    libraries = sorted(Path(sys.argv[1]).glob("*/aoti/*/model.so"))
    stats["library_kb"] = [p.stat().st_size // 1024 for p in libraries]
    stats["library_resident_kb"] = [resident_kb(p) for p in libraries]
    stats["weights_kb"], stats["weights_resident_kb"] = weights.stat().st_size // 1024, resident_kb(weights)
    print(json.dumps(stats))
""")


def _child(cache: Path, seed: int = 0) -> dict:
    return run_json_child(_CHILD, str(cache), str(seed))


def _entries(cache: Path) -> list[Path]:
    root = opt._versioned(cache) / "aoti"
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.exists() else []


def _cold_and_warm(cache: Path) -> tuple[dict, Path]:
    cold = _child(cache)
    assert cold["aoti_builds"] == 1 and cold["aoti_loads"] == 0 and cold["compiled"] == 1, cold
    assert cold["weight_packs"] >= 2  # int8 conv + linear lowered to pre-packed oneDNN kernels inside the package
    assert cold["eager_fallback"] == 0 and cold["warnings"] == [] and cold["rel"] < 5e-3
    (entry,) = _entries(cache)
    manifest = json.loads((entry / "manifest.json").read_text())
    assert manifest["size"] == (entry / "model.so").stat().st_size and not list(entry.parent.glob(".tmp-*"))

    warm = _child(cache)  # a fresh process: loads, compiles nothing (no dynamo / inductor compile either)
    assert warm["aoti_loads"] == 1 and warm["aoti_builds"] == 0 and warm["compiles"] == 0, warm
    assert warm["compile_seconds"] == 0 and warm["fxgraph_cache_miss"] == 0 and warm["warnings"] == []
    assert warm["out"] == cold["out"]
    # memory, by mechanism: the package's library holds the frozen weights, which loading copies out once; its pages
    # go back to the OS while it does (one copy of the weights, not two), and the model's own checkpoint pages are
    # never held beside that copy (its digest names the weights by their place in the file; anything read goes back)
    (library_kb,), (library_resident_kb,) = warm["library_kb"], warm["library_resident_kb"]
    assert library_kb > 4000 and library_resident_kb < 1500, warm
    assert warm["weights_kb"] > 4000 and warm["weights_resident_kb"] < 500, warm
    # the native page-out helper (loading copies the weights out of the library while holding the GIL) was built
    assert list((opt._versioned(cache) / "aoti").glob("pageout-*.so"))
    return cold, entry


def test_int8_package_is_loaded_by_a_fresh_process_without_compiling(tmp_path):
    _cold_and_warm(tmp_path / "cache")


_BOUND_CHILD = textwrap.dedent("""
    import json, sys, warnings
    import torch
    torch.set_num_threads(1)
    from torch import nn
    from diffusekit.optimize import compiled_call, optimize_module

    torch.manual_seed(int(sys.argv[2]))
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.SiLU(), nn.Flatten(2),
                          nn.Linear(16, 4)).eval()
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    out = {}

    def check(name):
        fast, eager = model(x), model._call_impl(x)
        out[name] = ((fast - eager).abs().max() / eager.abs().max()).item()

    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimize_module(model, cache_dir=sys.argv[1])  # the default: a bound package (exact path)
        check("first")
        model[4].bias.add_(1.0)  # in place (fuse_lora, load_state_dict): the bound package reads the live tensor
        check("in_place")
        model[0].weight = nn.Parameter(torch.randn(8, 3, 3, 3))  # a new parameter object: bound again
        check("replaced")
        model[1].weight.data = torch.randn(8)  # new storage under the same object
        check("data_swapped")
        model.load_state_dict({k: torch.randn_like(v) for k, v in model.state_dict().items()})
        check("load_state_dict")
    stats = dict(compiled_call(model).stats)
    stats["rel"] = out
    stats["warnings"] = [str(w.message) for w in caught if "optimize()" in str(w.message)]
    stats["constants"] = len(next(iter(compiled_call(model).packages.loaded.values())).runner
                             .get_constant_names_to_original_fqns())
    print(json.dumps(stats))
""")


def test_bound_package_runs_on_the_live_weights_and_other_weights_load_it(tmp_path):
    """The exact path: a package of code only (no constant inside), built once; a fresh process with *other weights*
    of the same architecture loads it and compiles nothing; in-place edits, replaced parameters, swapped storage and
    ``load_state_dict`` are all seen without a rebuild; every output within 1e-5 of eager."""
    cache = tmp_path / "cache"
    for seed, (builds, loads) in ((0, (1, 0)), (1, (0, 1))):
        result = run_json_child(_BOUND_CHILD, str(cache), str(seed))
        assert (result["aoti_builds"], result["aoti_loads"]) == (builds, loads), result
        assert result["compiles"] == 0 and result["eager_fallback"] == 0 and result["warnings"] == [], result
        assert result["compiled"] == 5 and result["constants"] == 0, result
        assert all(rel < 1e-5 for rel in result["rel"].values()), result["rel"]
    (entry,) = _entries(cache)
    assert json.loads((entry / "manifest.json").read_text())["weights"] == "bound (inputs)"


class _Carry:
    """A per-call object in the shape of DeepCache's step (aot.PackageInput): a tensor in, a tensor written back."""

    def __init__(self, gain: int, cached=None):
        self.gain, self.cached, self.feature = gain, cached, None

    def package_split(self):
        return self.gain, (self.cached,)

    @classmethod
    def package_join(cls, gain, tensors):
        return cls(gain, tensors[0])

    def package_results(self):
        return () if self.feature is None else (self.feature,)

    def package_take(self, results):
        self.feature = results[0] if results else None


class _UsesCarry(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x, carry=None):
        y = self.lin(x)
        if carry is not None:
            if carry.cached is not None:
                y = y + carry.cached
            carry.feature = y * carry.gain  # written into the caller's object
        return y


def test_object_inputs_are_served_by_a_package_and_their_results_written_back(tmp_path):
    """A call with a per-call object (DeepCache's step) runs from a package: its tensors are inputs (a new value is
    used, not baked in), its static part is in the key (another gain: another package), and what the call writes
    into it comes back into the caller's object, as eager writes it."""
    model = _UsesCarry().eval()
    x = torch.randn(3, 4)
    with torch.no_grad():
        opt.optimize_module(model, cache_dir=tmp_path, packages=True)
        for cached in (torch.randn(3, 4), torch.randn(3, 4)):
            fast, slow = _Carry(2, cached), _Carry(2, cached)
            out, ref = model(x, carry=fast), model._call_impl(x, carry=slow)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(fast.feature, slow.feature, rtol=1e-5, atol=1e-6)
        stats = opt.compiled_call(model).stats
        assert (stats["aoti_builds"], stats["compiled"], stats["compiles"]) == (1, 2, 0), stats
        packages = opt.compiled_call(model).packages
        def key(carry):
            return packages.key(aot.call_signature((x,), {"carry": carry})[0])

        assert key(_Carry(2, x)) != key(_Carry(3, x))  # the static part is in the key
        assert key(_Carry(2, x)) != key(_Carry(2, None))  # a missing tensor too


@pytest.mark.slow
def test_a_truncated_package_is_rebuilt_with_one_warning(tmp_path):
    cache = tmp_path / "cache"
    cold, entry = _cold_and_warm(cache)
    so = entry / "model.so"
    so.write_bytes(so.read_bytes()[: so.stat().st_size // 2])  # a truncated library is never dlopen-ed
    fixed = _child(cache)
    assert fixed["aoti_builds"] == 1 and fixed["aoti_loads"] == 0, fixed
    assert len(fixed["warnings"]) == 1 and "rebuilding" in fixed["warnings"][0]
    assert fixed["out"] == cold["out"]


# ---------------------------------------------------------------------------------------- without compiling


def _toy(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.SiLU(), torch.nn.Linear(8, 2)).eval()


def _key(model, signature=("x",)):
    return aot.Packages(model, Path("/nonexistent"), {"freezing": True},
                        {"hash_seconds": 0.0}).key(list(signature))[0]


def test_key_covers_weights_structure_inputs_and_settings():
    model = _toy()
    key = _key(model)
    assert _key(_toy()) == key  # deterministic across instances
    assert _key(_toy(seed=1)) != key  # other weights: other package (they are baked in)
    assert _key(model, ("y",)) != key
    edited = _toy()
    with torch.no_grad():
        edited[0].bias[0] += 1e-6
    assert _key(edited) != key
    other = _toy()
    other[1].inplace = True  # a plain attribute the traced graph may depend on
    assert _key(other) != key
    settings = aot.Packages(model, Path("/x"), {"freezing": True, "max_autotune": True}, {"hash_seconds": 0.0})
    assert settings.key(["x"])[0] != key


def _bound_key(model, signature=("x",)):
    return aot.Packages(model, Path("/nonexistent"), {}, {"hash_seconds": 0.0}, bound=True).key(list(signature))[0]


def test_bound_key_holds_the_weights_layout_not_their_values():
    key = _bound_key(_toy())
    assert _bound_key(_toy(seed=1)) == key  # other values: the same package (weights are inputs)
    assert _bound_key(_toy()) != _key(_toy())  # never a frozen package's key
    assert _bound_key(_toy().double()) != key
    transposed = _toy()
    transposed[0].weight.data = transposed[0].weight.data.t().contiguous().t()  # same shape, other strides
    assert _bound_key(transposed) != key
    wider = _toy()
    wider[2] = torch.nn.Linear(8, 3)
    assert _bound_key(wider) != key
    trained = _toy().train()  # dropout and batch norm trace differently in training mode
    assert _bound_key(trained) != key


def test_key_is_cached_until_the_cheap_check_sees_a_change(monkeypatch):
    calls = []
    describe = aot.structure
    monkeypatch.setattr(aot, "structure", lambda module: calls.append(1) or describe(module))
    model = _toy()
    packages = aot.Packages(model, Path("/nonexistent"), {}, {"hash_seconds": 0.0}, bound=True)
    key = packages.key(["x"])
    assert packages.key(["x"]) == key and packages.key(["y"]) != key and len(calls) == 1
    model[1].inplace = False  # the very same object again: nothing to describe
    assert packages.key(["x"]) == key and len(calls) == 1
    model[1].inplace = True
    assert packages.key(["x"]) != key and len(calls) == 2
    model[1].inplace = False
    assert packages.key(["x"]) == key and len(calls) == 3
    model[1].gain = 1.5
    gained = packages.key(["x"])
    assert gained != key and len(calls) == 4
    model[1].gain = float("1.5")  # an equal value, another object: described again (a false alarm), same key
    assert packages.key(["x"]) == gained and len(calls) == 5
    del model[1].gain
    assert packages.key(["x"]) == key
    model[0].weight = torch.nn.Parameter(torch.randn(8, 4, dtype=torch.float64))  # a replaced parameter, new dtype
    assert packages.key(["x"]) != key
    model[0].weight = torch.nn.Parameter(torch.randn(8, 4))
    assert packages.key(["x"]) == key


def test_structure_watch_sees_what_changes_the_traced_graph():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.SiLU(), torch.nn.Linear(8, 2))
    model.register_buffer("table", torch.zeros(3), persistent=False)
    model.plain = torch.ones(2)  # a plain tensor attribute (a constant of the traced graph)
    model.options = {"scale": 1.0}
    watch = aot.StructureWatch(model)
    assert watch.changed() and not watch.changed() and not watch.changed()

    def changes(edit) -> bool:
        edit()
        return watch.changed() and not watch.changed()

    assert changes(lambda: setattr(model[1], "inplace", True))  # a plain attribute
    assert changes(lambda: setattr(model[1], "new_flag", 3))  # a new one
    assert changes(lambda: model.__setitem__(2, torch.nn.Linear(8, 2)))  # a submodule replaced
    assert changes(lambda: model.append(torch.nn.Identity()))  # one added
    assert changes(lambda: setattr(model[0], "weight", torch.nn.Parameter(torch.randn(8, 4))))  # a parameter
    handles = []
    assert changes(lambda: handles.append(model[0].register_forward_pre_hook(lambda *a: None)))  # a hook
    assert changes(lambda: handles[0].remove())
    assert changes(lambda: model.eval())  # training flag
    assert changes(lambda: model.options.__setitem__("scale", 2.0))  # one level inside a dict attribute
    assert changes(lambda: model.plain.add_(1))  # a tensor attribute edited in place
    assert changes(lambda: model.register_buffer("extra", torch.zeros(1)))
    assert not watch.changed()


def test_weights_digest_names_clean_file_stretches_and_hashes_edited_ones(tmp_path):
    """Frozen keys: a memory-mapped, never-written weight is named by its place in its file (no read of gigabytes at
    a warm start); one edited behind autograd's back (``.data``: no version bump) dirties its mapping and is hashed
    by its bytes; a rewritten file is another identity."""
    from safetensors.torch import save_file

    from diffusekit.modeling import read_safetensors

    path = tmp_path / "w.safetensors"
    save_file({"weight": torch.randn(64, 32), "bias": torch.randn(64)}, path)

    def load():
        layer = torch.nn.Linear(32, 64)
        layer.load_state_dict(read_safetensors(path), assign=True)
        return layer

    layer = load()
    place = aot._file_place(layer.weight.detach(), aot._clean_file_spans())
    assert place is not None and place.startswith(str(path))
    digest = aot.weights_digest(layer)
    assert aot.weights_digest(load()) == digest  # another load of the same file: the same key
    with torch.no_grad():
        layer.weight.data[0, 0] += 1.0
    assert aot._file_place(layer.weight.detach(), aot._clean_file_spans()) is None
    edited = aot.weights_digest(layer)
    assert edited != digest
    with torch.no_grad():
        layer.weight.data[0, 0] += 1.0  # bytes hashed: another edit, another key
    assert aot.weights_digest(layer) != edited
    save_file({"weight": torch.randn(64, 32), "bias": torch.randn(64)}, path)
    assert aot.weights_digest(load()) != digest


def test_signature_refuses_what_a_package_cannot_serve():
    x = torch.randn(2, 3)
    described, tensors = aot.input_signature((x,), {"flag": True, "none": None, "mode": "a"})
    assert len(tensors) == 1 and tensors[0] is x
    assert aot.input_signature((x,), {"flag": False})[0] != aot.input_signature((x,), {"flag": True})[0]
    assert aot.input_signature((x, 3), {}) is None  # a number would be baked into the graph
    assert aot.input_signature((x,), {"scale": 0.5}) is None
    assert aot.input_signature((x, object()), {}) is None  # an object the call may mutate (not a PackageInput)
    assert aot.input_signature((torch.randn(2, requires_grad=True),), {}) is None


def test_hooks_and_unservable_calls_go_to_torch_compile(tmp_path):
    model = _toy()
    stats = {"hash_seconds": 0.0}
    packages = aot.Packages(model, tmp_path, {"freezing": True}, stats)
    x = torch.randn(3, 4)
    assert packages((x, 1.5), {}, None) is aot.NOT_HANDLED
    handle = model[0].register_forward_hook(lambda *a: None)
    assert packages((x,), {}, None) is aot.NOT_HANDLED  # an exported graph would skip the hook
    handle.remove()
    assert not (tmp_path / "aoti").exists() or not _entries(tmp_path)


def test_a_package_not_matching_its_manifest_is_never_loaded(tmp_path):
    entry = tmp_path / "k"
    entry.mkdir()
    (entry / "model.so").write_bytes(b"\x7fELF not really")
    manifest = {"format": aot.FORMAT, "key": "k", "size": 15, "sha256": "0" * 64}
    (entry / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(aot.CorruptPackage, match="sha256"):
        aot.Package(entry, "k")
    manifest["sha256"] = aot._file_sha256(entry / "model.so")
    (entry / "manifest.json").write_text(json.dumps({**manifest, "key": "other"}))
    with pytest.raises(aot.CorruptPackage, match="key"):
        aot.Package(entry, "k")
    (entry / "manifest.json").write_text("{not json")
    with pytest.raises(aot.CorruptPackage):
        aot.Package(entry, "k")


def test_eviction_keeps_the_folder_within_its_limit_least_recently_used_first(tmp_path, monkeypatch):
    monkeypatch.setenv(aot.LIMIT_ENV, str(2.5 * 1024 / 2**30))  # 2.5 KiB
    for i, name in enumerate(["old", "mid", "new"]):
        entry = tmp_path / name
        entry.mkdir()
        (entry / "model.so").write_bytes(b"x" * 1024)
        (entry / "manifest.json").write_text("{}")
        os.utime(entry / "manifest.json", (1000 + i, 1000 + i))
    stale = tmp_path / ".tmp-dead"
    stale.mkdir()
    os.utime(stale, (0, 0))
    aot.evict(tmp_path, keep=tmp_path / "old")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "old"]


def test_a_failing_build_warns_once_and_compiles_in_process(monkeypatch, tmp_path):
    def fail(*args, **kwargs):
        raise RuntimeError("no AOT today")

    monkeypatch.setattr(aot, "build", fail)
    model = _toy()
    x = torch.randn(3, 4)
    opt.optimize_module(model, cache_dir=tmp_path, options={"freezing": True})
    call = opt.compiled_call(model)
    monkeypatch.setattr(call, "compiled", lambda *a, **k: model._call_impl(*a, **k))  # no real compile needed here
    monkeypatch.setattr(call, "_first_call", lambda args, kwargs, sig: model._call_impl(*args, **kwargs))
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match="shapes"):
            model(torch.randn(3, 5))  # the input's fault: raised as eager raises it, packages stay on
        assert call.packages.disabled is None
        first = model(x)
        second = model(x)
    messages = [str(w.message) for w in caught if "optimize()" in str(w.message)]
    assert len(messages) == 1 and "no AOT today" in messages[0] and "in this process" in messages[0]
    assert torch.equal(first, model._call_impl(x)) and torch.equal(second, first)
    assert call.packages.disabled is not None and call.stats["aoti_builds"] == 0


# ---------------------------------------------------------------------------------------- slow


@pytest.mark.slow
def test_frozen_pipeline_builds_packages_once_and_a_second_pipeline_loads_them(tmp_path):
    """fp32 with freezing: UNet, VAE decoder and text encoder each run from a package (their own output types
    through the package's tree spec), images within 1e-5 of eager; a second pipeline from the same folder loads
    every package and builds none."""
    from sd_assets import build_tiny_sd

    from diffusekit import StableDiffusionPipeline

    folder = build_tiny_sd(tmp_path / "sd")
    kwargs = dict(prompt="a cat", num_inference_steps=2, height=32, width=32, output_type="np")
    images = []
    for round_ in range(2):
        pipe = StableDiffusionPipeline.from_pretrained(folder)
        eager = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
        pipe.optimize(cache_dir=tmp_path / "cache", options={"freezing": True})
        fast = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
        for module in (pipe.unet, pipe.vae.decoder, pipe.text_encoder):
            stats = opt.compiled_call(module).stats
            assert stats["eager_fallback"] == 0 and stats["compiles"] == 0, (type(module).__name__, stats)
            assert (stats["aoti_builds"], stats["aoti_loads"]) == ((1, 0) if round_ == 0 else (0, 1)), stats
        diff = abs(fast - eager).max()
        assert diff <= 1e-5 * abs(eager).max(), diff
        images.append(fast)
    assert (images[0] == images[1]).all()
