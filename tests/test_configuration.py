"""Config system: frozen configs, from_config cross-loading, diffusers-format JSON both ways."""

from __future__ import annotations

import copy
import json
import logging
import pickle

import pytest

from diffusekit.configuration import ConfigMixin, FrozenConfig, read_json, register_to_config


class Thing(ConfigMixin):
    config_name = "thing_config.json"

    @register_to_config
    def __init__(self, size: int = 8, names=("a", "b"), mode: str = "x"):
        self.size = size


class Other(ConfigMixin):
    @register_to_config
    def __init__(self, size: int = 1, extra: float = 0.5):
        pass


def test_config_holds_bound_arguments_with_defaults():
    thing = Thing(4, mode="y")
    assert thing.config == {"size": 4, "names": ("a", "b"), "mode": "y"}
    assert thing.config.size == 4 and thing.config["mode"] == "y"


def test_config_is_frozen_with_a_helpful_error():
    config = Thing().config
    for mutate in (
        lambda: config.__setitem__("size", 3),
        lambda: setattr(config, "size", 3),
        lambda: config.update(size=3),
        lambda: config.pop("size"),
        lambda: config.__delitem__("size"),
    ):
        with pytest.raises(TypeError, match="from_config"):
            mutate()
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        config.nope


def test_frozen_config_copies_and_pickles():
    config = Thing(size=3).config
    for clone in (copy.copy(config), copy.deepcopy(config), pickle.loads(pickle.dumps(config))):
        assert isinstance(clone, FrozenConfig) and clone == config


def test_from_config_keeps_foreign_keys_unused_and_applies_overrides():
    other = Other(size=5, extra=0.25)
    thing = Thing.from_config(other.config, mode="z")
    assert thing.config.size == 5 and thing.config.mode == "z"
    assert thing.config.extra == 0.25  # carried along, unused: Other.from_config(thing.config) gets it back
    assert Other.from_config(thing.config).config.extra == 0.25


def test_defaults_of_the_source_class_do_not_override_own_defaults():
    class A(ConfigMixin):
        @register_to_config
        def __init__(self, shared: int = 1, flag: bool = True):
            pass

    class B(ConfigMixin):
        @register_to_config
        def __init__(self, shared: int = 2, flag: bool = False):
            pass

    a = A(flag=True)  # flag given, shared left at A's default
    assert a.config.defaults_used == {"shared"}
    b = B.from_config(a.config)
    assert b.config.shared == 2 and b.config.flag is True
    # diffusers writes the same information as a `_use_default_values` key
    assert B.from_config({"shared": 1, "flag": True, "_use_default_values": ["shared"]}).config.shared == 2


def test_from_config_rejects_unknown_override():
    with pytest.raises(TypeError, match="unknown argument.*bogus"):
        Thing.from_config({}, bogus=1)


def test_save_and_load_config_roundtrip(tmp_path):
    thing = Thing(size=2, names=("q",))
    path = thing.save_config(tmp_path)
    data = json.loads(path.read_text())
    assert data["_class_name"] == "Thing" and "_diffusers_version" in data
    assert data["names"] == ["q"]
    loaded = Thing.load_config(tmp_path)
    assert Thing.from_config(loaded).config == {"size": 2, "names": ["q"], "mode": "x"}


def test_unknown_keys_warn_once_naming_them(caplog):
    with caplog.at_level(logging.WARNING):
        kwargs = Thing.extract_init_kwargs({"size": 3, "future_key": 1, "_class_name": "Thing"}, warn_unknown=True)
    assert kwargs == {"size": 3}
    warnings = [r for r in caplog.records if "future_key" in r.getMessage()]
    assert len(warnings) == 1


def test_read_json_errors_name_the_file(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json is not valid JSON"):
        read_json(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        read_json(bad)
    with pytest.raises(OSError, match="cannot read"):
        read_json(tmp_path / "missing.json")


def test_missing_config_file_names_folder_and_contents(tmp_path):
    (tmp_path / "weights.bin").write_text("")
    with pytest.raises(FileNotFoundError, match=r"no file thing_config.json.*weights.bin"):
        Thing.load_config(tmp_path)


def test_args_star_rejected():
    with pytest.raises(TypeError, match=r"\*args"):

        class Bad(ConfigMixin):
            @register_to_config
            def __init__(self, *args):
                pass
