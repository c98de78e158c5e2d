"""ModelMixin loading/saving mechanics on a toy model: formats, variants, shards, dtypes, strictness, atomicity."""

from __future__ import annotations

import json
import os

import pytest
import torch

from diffusekit.configuration import register_to_config
from diffusekit.modeling import CheckpointError, ModelMixin


class Toy(ModelMixin):
    @register_to_config
    def __init__(self, width: int = 4, depth: int = 2):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(depth))
        self.norm = torch.nn.GroupNorm(2, width)

    def forward(self, x):  # (B, width)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


@pytest.fixture()
def toy():
    return Toy(width=4, depth=2)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_roundtrip_safetensors(toy, tmp_path):
    toy.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    loaded = Toy.from_pretrained(tmp_path)
    assert same_weights(toy, loaded) and not loaded.training
    assert loaded.config == {"width": 4, "depth": 2}
    assert oct(os.stat(tmp_path / "config.json").st_mode & 0o777) == "0o644"


def test_roundtrip_bin_and_use_safetensors_policy(toy, tmp_path):
    toy.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "diffusion_pytorch_model.bin").exists()
    assert same_weights(toy, Toy.from_pretrained(tmp_path))  # None: prefer safetensors, accept .bin
    assert same_weights(toy, Toy.from_pretrained(tmp_path, use_safetensors=False))
    with pytest.raises(FileNotFoundError, match="use_safetensors=False"):
        Toy.from_pretrained(tmp_path, use_safetensors=True)


def test_prefers_safetensors_over_bin(toy, tmp_path):
    import shutil

    toy.save_pretrained(tmp_path / "bin", safe_serialization=False)
    other = Toy(width=4, depth=2)
    other.save_pretrained(tmp_path)
    # a folder holding both formats (as hub repos do): a save supersedes its own older files, so copy the .bin in
    shutil.copy(tmp_path / "bin" / "diffusion_pytorch_model.bin", tmp_path)
    assert same_weights(other, Toy.from_pretrained(tmp_path))
    assert same_weights(toy, Toy.from_pretrained(tmp_path, use_safetensors=False))  # False: the .bin


def test_subfolder_and_variant(toy, tmp_path):
    toy.save_pretrained(tmp_path / "unet", variant="fp16")
    assert (tmp_path / "unet" / "diffusion_pytorch_model.fp16.safetensors").exists()
    assert same_weights(toy, Toy.from_pretrained(tmp_path, subfolder="unet", variant="fp16"))
    with pytest.raises(FileNotFoundError, match="drop variant"):
        Toy.from_pretrained(tmp_path, subfolder="unet", variant="bf16")


@pytest.mark.parametrize("safe", [True, False])
def test_sharded_checkpoint(toy, tmp_path, safe):
    toy.save_pretrained(tmp_path, safe_serialization=safe, max_shard_size=100)
    index_name = "diffusion_pytorch_model.safetensors.index.json" if safe else "diffusion_pytorch_model.bin.index.json"
    index = json.loads((tmp_path / index_name).read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((tmp_path / s).exists() for s in shards)
    assert same_weights(toy, Toy.from_pretrained(tmp_path))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_torch_dtype(toy, tmp_path, dtype):
    toy.save_pretrained(tmp_path)
    loaded = Toy.from_pretrained(tmp_path, torch_dtype=dtype)
    assert loaded.dtype == dtype
    assert torch.equal(loaded.layers[0].weight, toy.layers[0].weight.to(dtype))
    with pytest.raises(TypeError, match="torch_dtype"):
        Toy.from_pretrained(tmp_path, torch_dtype="float16")


def test_half_checkpoint_loads_as_float32_by_default(toy, tmp_path):
    toy.to(torch.float16).save_pretrained(tmp_path)
    assert Toy.from_pretrained(tmp_path).dtype == torch.float32


def test_config_override_and_unknown_kwarg(toy, tmp_path):
    toy.save_pretrained(tmp_path)
    with pytest.raises(TypeError, match="unexpected keyword.*bogus"):
        Toy.from_pretrained(tmp_path, bogus=1)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        Toy.from_pretrained(tmp_path, width=8)


def test_missing_and_unexpected_keys_are_listed(toy, tmp_path):
    Toy(width=4, depth=1).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"width": 4, "depth": 2}))
    with pytest.raises(CheckpointError) as err:
        Toy.from_pretrained(tmp_path)
    text = str(err.value)
    assert "missing from the checkpoint (2)" in text and "layers.1.weight" in text and "layers.1.bias" in text

    Toy(width=4, depth=3).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"width": 4, "depth": 2}))
    with pytest.raises(CheckpointError, match=r"in the checkpoint but not in the model \(2\)"):
        Toy.from_pretrained(tmp_path)


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    Toy(width=6).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"width": 4}))
    with pytest.raises(CheckpointError, match=r"layers.0.weight: checkpoint \[6, 6\] vs model \[4, 4\]"):
        Toy.from_pretrained(tmp_path)


def test_truncated_safetensors_names_the_file(toy, tmp_path):
    toy.save_pretrained(tmp_path)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model.safetensors.*truncated or corrupt"):
        Toy.from_pretrained(tmp_path)
    path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        Toy.from_pretrained(tmp_path)


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_bin_with_non_tensor_objects_is_refused(toy, tmp_path):
    toy.save_config(tmp_path)
    state = dict(toy.state_dict())
    state["payload"] = Evil()
    torch.save(state, tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="holds objects other than tensors"):
        Toy.from_pretrained(tmp_path)


def test_bin_that_is_not_a_state_dict(toy, tmp_path):
    toy.save_config(tmp_path)
    torch.save([1, 2, 3], tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="does not hold a state dict"):
        Toy.from_pretrained(tmp_path)


def test_missing_weights_lists_what_was_looked_for(toy, tmp_path):
    toy.save_config(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no weights file found, looked for diffusion_pytorch_model.safetensors"):
        Toy.from_pretrained(tmp_path)


def test_missing_folder_and_file_instead_of_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Toy.from_pretrained(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        Toy.from_pretrained(tmp_path / "file")


def test_failed_save_leaves_previous_checkpoint_intact(toy, tmp_path, monkeypatch):
    toy.save_pretrained(tmp_path)
    before = (tmp_path / "diffusion_pytorch_model.safetensors").read_bytes()
    import safetensors.torch

    def boom(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        Toy(width=4).save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["config.json", "diffusion_pytorch_model.safetensors"]


def test_loading_does_not_initialise_random_weights(toy, tmp_path, monkeypatch):
    toy.save_pretrained(tmp_path)
    calls = []
    original = torch.nn.Linear.reset_parameters

    def spy(self):
        calls.append(self.weight.device.type)
        return original(self)

    monkeypatch.setattr(torch.nn.Linear, "reset_parameters", spy)
    Toy.from_pretrained(tmp_path)
    assert set(calls) <= {"meta"}  # built on the meta device: no real memory, no random init work


def test_skipping_init_while_loading_is_confined_to_the_loading_thread():
    """Initialisers are skipped while a model is built for loading, in that thread only, and only meanwhile."""
    import threading

    from diffusekit.modeling import _SkipInit

    def fresh_linear():
        torch.manual_seed(123)
        return torch.nn.Linear(8, 8).weight.detach().clone()

    expected = fresh_linear()
    seen = {}
    with _SkipInit():
        skipped = torch.nn.Linear(8, 8, device="meta")
        zeros = torch.zeros(4)
        torch.nn.init.normal_(zeros)  # inside the mode no initialiser runs
        assert torch.count_nonzero(zeros) == 0
        worker = threading.Thread(target=lambda: seen.setdefault("other", fresh_linear()))
        worker.start()
        worker.join()
    assert skipped.weight.is_meta
    assert torch.equal(seen["other"], expected)  # another thread initialised as usual
    assert torch.equal(fresh_linear(), expected)  # and this thread again after the load
