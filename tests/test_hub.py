"""Hub repo ids resolve through huggingface_hub's cache, offline, on a cache folder laid out by the test."""

from __future__ import annotations

import shutil
import time

import pytest
import torch

from diffusekit import hub
from diffusekit.hub import EntryNotFound, resolve_file
from test_modeling_io import Toy, same_weights

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def make_cache(cache_dir, repo_id: str, source_dir, subfolder: str = "", revision: str = "main"):
    """Lay out huggingface_hub's cache format: refs/<revision> -> commit, snapshots/<commit>/<files>."""
    repo_folder = cache_dir / ("models--" + repo_id.replace("/", "--"))
    (repo_folder / "refs").mkdir(parents=True, exist_ok=True)
    (repo_folder / "refs" / revision).write_text(COMMIT)
    target = repo_folder / "snapshots" / COMMIT / subfolder
    shutil.copytree(source_dir, target, dirs_exist_ok=True)
    return repo_folder


@pytest.fixture()
def cached_repo(tmp_path):
    toy = Toy(width=4)
    toy.save_pretrained(tmp_path / "src")
    cache = tmp_path / "cache"
    make_cache(cache, "acme/toy", tmp_path / "src", subfolder="unet")
    return toy, cache


def test_repo_id_loads_from_cache_offline(cached_repo, monkeypatch):
    toy, cache = cached_repo
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets at import
    loaded = Toy.from_pretrained("acme/toy", subfolder="unet", cache_dir=cache)
    assert same_weights(toy, loaded)


def test_repo_id_loads_with_local_files_only(cached_repo):
    toy, cache = cached_repo
    loaded = Toy.from_pretrained("acme/toy", subfolder="unet", cache_dir=cache, local_files_only=True)
    assert same_weights(toy, loaded)


def test_cache_miss_offline_is_one_clear_error(cached_repo):
    _, cache = cached_repo
    with pytest.raises(EntryNotFound, match=r"acme/other/unet: config.json is not in the local Hugging Face cache"):
        Toy.from_pretrained("acme/other", subfolder="unet", cache_dir=cache, local_files_only=True)


def test_unreachable_hub_fails_fast_without_retries(cached_repo, monkeypatch):
    _, cache = cached_repo
    monkeypatch.setattr(hub, "_hub_reachable", lambda endpoint, timeout=3.0: False)
    start = time.monotonic()
    with pytest.raises(EntryNotFound, match="the Hub cannot be reached"):
        resolve_file("acme/missing", "config.json", cache_dir=cache)
    assert time.monotonic() - start < 5  # huggingface_hub's own retry loop would take ~20 s


def test_unreachable_hub_still_serves_the_cache(cached_repo, monkeypatch):
    toy, cache = cached_repo
    monkeypatch.setattr(hub, "_hub_reachable", lambda endpoint, timeout=3.0: False)
    assert same_weights(toy, Toy.from_pretrained("acme/toy", subfolder="unet", cache_dir=cache))


def test_revision_is_honoured(tmp_path):
    toy = Toy(width=4)
    toy.save_pretrained(tmp_path / "src")
    make_cache(tmp_path / "cache", "acme/toy", tmp_path / "src", revision="v1")
    path = resolve_file("acme/toy", "config.json", revision="v1", cache_dir=tmp_path / "cache", local_files_only=True)
    assert path.name == "config.json" and COMMIT in str(path)
    with pytest.raises(EntryNotFound):
        resolve_file("acme/toy", "config.json", revision="v2", cache_dir=tmp_path / "cache", local_files_only=True)


def test_invalid_repo_id(tmp_path):
    with pytest.raises(ValueError, match="neither an existing local folder nor a valid hub repo id"):
        resolve_file("not a valid id!!", "config.json", cache_dir=tmp_path, local_files_only=True)


def test_torch_not_needed_to_resolve(tmp_path):
    # hub resolution is plain file logic: it works for any file name and returns Paths
    (tmp_path / "x.txt").write_text("hi")
    assert resolve_file(tmp_path, "x.txt").read_text() == "hi"
    assert isinstance(torch.__version__, str)
