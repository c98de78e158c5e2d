"""Config system shared by models, schedulers and pipelines.

A configurable class declares its config as the keyword arguments of ``__init__`` and decorates ``__init__`` with
:func:`register_to_config`. The bound arguments (defaults filled in) become ``self.config``: a :class:`FrozenConfig`,
a read-only ``dict`` with attribute access. Files are diffusers' JSON format (``config.json`` /
``scheduler_config.json`` with ``_class_name`` and ``_diffusers_version``), so both libraries read each other's.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
import functools
import inspect
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping

from . import __version__
from ._io import atomic_write_text
from .hub import resolve_file, split_hub_kwargs

logger = logging.getLogger(__name__)

# Written into saved configs so diffusers accepts the files; the value diffusers reads is informational only.
DIFFUSERS_COMPAT_VERSION = "0.30.0"


class FrozenConfig(dict):
    """A read-only mapping with attribute access: ``config["sample_size"] == config.sample_size``.

    ``defaults_used`` names the keys whose values were the class defaults rather than given (diffusers'
    ``_use_default_values``): another class built ``from_config`` this one uses its own defaults for them.
    """

    def __init__(self, data=(), defaults_used: Iterable[str] = ()):
        super().__init__(data)
        object.__setattr__(self, "defaults_used", frozenset(defaults_used))

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no attribute {name!r}; known keys: {sorted(self)}") from None

    def _refuse(self, *args, **kwargs):
        raise TypeError(
            "a config is frozen: build a new object instead, e.g. `Cls.from_config(obj.config, key=value)`"
        )

    __setitem__ = __delitem__ = __setattr__ = __delattr__ = _refuse
    clear = pop = popitem = setdefault = update = __ior__ = _refuse  # type: ignore[assignment]

    def __deepcopy__(self, memo):
        return FrozenConfig(self, self.defaults_used)

    def __reduce__(self):
        return (FrozenConfig, (dict(self), self.defaults_used))


def _to_jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_to_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_to_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _to_jsonable(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # numpy arrays / torch tensors (e.g. trained_betas)
        return value.tolist()
    return value


# the file a config being built came from, for error messages (set by from_pretrained / load_config)
_config_source: contextvars.ContextVar[str | None] = contextvars.ContextVar("diffusekit_config_source", default=None)


@contextlib.contextmanager
def config_source(path: str | os.PathLike | None):
    """Name ``path`` in validation errors of configs built inside the block."""
    token = _config_source.set(os.fspath(path) if path is not None else None)
    try:
        yield
    finally:
        _config_source.reset(token)


def register_to_config(init):
    """Decorate ``__init__`` so its bound keyword arguments become the frozen ``self.config``.

    The signature is read once, when the class is defined.
    """
    signature = inspect.signature(init)
    params = [p for name, p in signature.parameters.items() if name != "self"]
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        raise TypeError(f"{init.__qualname__}: configurable __init__ may not take *args")

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        ignore = set(getattr(type(self), "ignore_for_config", ()))
        # private keys (``_class_name``, ``_name_or_path`` ...) go into the config only, never to __init__, as in
        # diffusers: ``Model(**json.load(open("config.json")))`` works
        private = {k: kwargs.pop(k) for k in [k for k in kwargs if k.startswith("_")]}
        bound = signature.bind(self, *args, **kwargs)
        given = set(bound.arguments)
        bound.apply_defaults()
        config = {}
        for name, value in list(bound.arguments.items())[1:]:
            param = signature.parameters[name]
            if param.kind is param.VAR_KEYWORD:
                continue  # extra keys are handled by from_config, never stored blindly
            if name not in ignore:
                # a mutable default (diffusers' `disable_corrector=[]`) is copied, never shared between objects
                config[name] = copy.copy(value) if name not in given and isinstance(value, (list, dict)) else value
        validate_config(type(self), {k: v for k, v in config.items() if k in given}, _config_source.get())
        defaults_used = [name for name in config if name not in given]
        self._config = FrozenConfig({**private, **config}, defaults_used=defaults_used)
        outermost = "_config_sealed" not in self.__dict__
        if outermost:
            self.__dict__["_config_sealed"] = False
        init(self, *args, **kwargs)
        if outermost:  # from now on, assigning a config key as an attribute is refused
            self.__dict__["_config_sealed"] = True

    wrapper._config_params = tuple(p.name for p in params if p.kind is not p.VAR_KEYWORD)  # type: ignore[attr-defined]
    return wrapper


def config_attribute(obj: Any, name: str, config: Mapping[str, Any] | None = None) -> Any:
    """``obj.<config key>``: the config value with a ``FutureWarning`` naming ``.config.<key>``, as diffusers does.

    ``config`` defaults to ``obj``'s own. Raises ``AttributeError`` for any other name.
    """
    if config is None:
        config = obj.__dict__.get("_config")
    if config is not None and not name.startswith("_") and name in config:
        kind = "unet" if isinstance(obj, _torch_module_type()) else "scheduler"
        warnings.warn(
            f"Accessing config attribute `{name}` directly via '{type(obj).__name__}' object attribute is deprecated. "
            f"Please access '{name}' over '{type(obj).__name__}'s config object instead, e.g. "
            f"'{kind}.config.{name}'.",
            FutureWarning,
            stacklevel=3,
        )
        return config[name]
    raise AttributeError(f"'{type(obj).__name__}' object has no attribute '{name}'")


def refuse_config_assignment(obj: Any, name: str) -> None:
    """Refuse ``obj.<config key> = value`` once the config is set (it would silently disagree with ``obj.config``).

    diffusers lets such an assignment shadow the config; diffusekit refuses it on purpose.
    """
    config = obj.__dict__.get("_config")
    if (
        obj.__dict__.get("_config_sealed")
        and name in config
        and name not in obj.__dict__
        and not name.startswith("_")
    ):
        raise AttributeError(
            f"{type(obj).__name__}.{name} is a config value (read it as `.config.{name}`) and cannot be assigned: "
            f"build a new object instead, e.g. `{type(obj).__name__}.from_config(obj.config, {name}=...)`"
        )


def _torch_module_type() -> type:
    import sys

    torch = sys.modules.get("torch")
    return torch.nn.Module if torch is not None else type(None)


class ConfigMixin:
    """Adds ``config``, ``from_config``, ``load_config`` and ``save_config`` to a class with a registered ``__init__``.

    Config keys also read as attributes (``scheduler.num_train_timesteps``) with a ``FutureWarning`` pointing at
    ``.config.<key>``, as in diffusers. Deliberate difference: assigning one (``scheduler.num_train_timesteps = 5``)
    raises ``AttributeError`` once ``__init__`` has run; diffusers lets it shadow the config silently.
    """

    config_name: str = "config.json"
    ignore_for_config: tuple[str, ...] = ()
    has_compatibles: bool = False  # True for schedulers: `compatibles` lists the classes that can swap in
    _config: FrozenConfig

    @property
    def config(self) -> FrozenConfig:
        return self._config

    def register_to_config(self, **kwargs: Any) -> None:
        """Record ``kwargs`` in ``self.config`` after construction (diffusers' method of the same name), e.g. a value
        normalised by ``__init__``. The config stays frozen to everyone else."""
        self._config = FrozenConfig({**self._config, **kwargs}, self._config.defaults_used - set(kwargs))

    def __getattr__(self, name: str) -> Any:
        # only called when normal lookup fails: config keys answer as attributes, deprecated (as in diffusers)
        return config_attribute(self, name)

    def __setattr__(self, name: str, value: Any) -> None:
        refuse_config_assignment(self, name)
        super().__setattr__(name, value)

    @classmethod
    def _config_params(cls) -> tuple[str, ...]:
        params = getattr(cls.__init__, "_config_params", None)
        if params is None:
            raise TypeError(f"{cls.__name__}.__init__ is not decorated with @register_to_config")
        return params

    @staticmethod
    def _given_values(config: Mapping[str, Any]) -> dict[str, Any]:
        """``config`` less the values that were only defaults of the class that wrote it (and metadata keys)."""
        defaults = set(getattr(config, "defaults_used", ())) | set(config.get("_use_default_values") or ())
        return {k: v for k, v in config.items() if k not in defaults and not k.startswith("_")}

    @classmethod
    def extract_init_kwargs(cls, config: Mapping[str, Any], warn_unknown: bool = False) -> dict[str, Any]:
        """Keep the keys of ``config`` that ``__init__`` takes.

        Metadata keys (``_class_name`` …) and values that were only another class's defaults are dropped. Other
        unknown keys are not used; with ``warn_unknown`` they are named in one warning (used when a file written for
        this very class carries keys we do not know).
        """
        params = set(cls._config_params())
        given = cls._given_values(config)
        kwargs = {k: v for k, v in given.items() if k in params}
        unknown = sorted(k for k in given if k not in params)
        if unknown and warn_unknown:
            logger.warning("%s: ignoring config keys it does not use: %s", cls.__name__, ", ".join(unknown))
        return kwargs

    def _keep_foreign_keys(self, config: Mapping[str, Any]) -> None:
        """Carry the keys of ``config`` that this class does not use in ``self.config``, unused.

        As diffusers does: swapping schedulers A -> B -> A keeps A's settings (e.g. ``set_alpha_to_one``), and a
        newer file's keys survive a load/save round trip.
        """
        params = set(self._config_params())
        foreign = {k: v for k, v in self._given_values(config).items() if k not in params}
        if foreign:
            self._config = FrozenConfig({**foreign, **self._config}, self._config.defaults_used)

    @classmethod
    def extract_init_dict(cls, config_dict: Mapping[str, Any], **kwargs: Any):
        """diffusers' split of a config: ``(init kwargs, unused keys, hidden "_" keys)``; ``kwargs`` override."""
        params = set(cls._config_params())
        init = {k: v for k, v in cls._given_values(config_dict).items() if k in params}
        init.update({k: kwargs.pop(k) for k in list(kwargs) if k in params})
        unused = {k: v for k, v in config_dict.items() if k not in params and not k.startswith("_")}
        hidden = {k: v for k, v in config_dict.items() if k.startswith("_")}
        return init, {**unused, **kwargs}, hidden

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None = None, return_unused_kwargs: bool = False, **overrides):
        """Build from another object's config (any compatible class's: foreign keys are ignored quietly).

        ``overrides`` replace config values: ``Scheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)``.
        With ``return_unused_kwargs=True`` the result is ``(instance, {keys not used})`` (the config's foreign keys
        and unknown overrides) instead of an error for unknown overrides, as in diffusers.
        """
        if config is None:
            config = {}
        elif isinstance(config, ConfigMixin):
            config = config.config
        elif not isinstance(config, Mapping):
            raise TypeError(f"{cls.__name__}.from_config expects a config mapping, got {type(config).__name__}")
        params = set(cls._config_params())
        bad = sorted(k for k in overrides if k not in params and not k.startswith("_"))
        if bad and not return_unused_kwargs:
            raise TypeError(
                f"{cls.__name__}.from_config got unknown argument(s) {bad}; it accepts: {sorted(params)}"
            )
        # as diffusers: the config's keys this class does not take, and the unknown overrides
        unused = {**{k: v for k, v in config.items() if k not in params}, **{k: overrides.pop(k) for k in bad}}
        kwargs = cls.extract_init_kwargs(config)
        kwargs.update(overrides)
        instance = cls(**kwargs)
        instance._keep_foreign_keys(config)
        return (instance, unused) if return_unused_kwargs else instance

    @classmethod
    def load_config(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        subfolder: str | None = None,
        return_unused_kwargs: bool = False,
        return_commit_hash: bool = False,
        **kwargs,
    ):
        """Read the JSON config file of a folder or hub repo into a plain dict.

        As in diffusers, ``return_unused_kwargs`` adds the keyword arguments that are not hub options and
        ``return_commit_hash`` the hub commit the file came from (None for a local folder) to a returned tuple.
        """
        hub_kwargs = split_hub_kwargs(kwargs)
        if kwargs and not return_unused_kwargs:
            raise TypeError(f"{cls.__name__}.load_config got unexpected keyword argument(s) {sorted(kwargs)}")
        path = resolve_file(pretrained_model_name_or_path, cls.config_name, subfolder=subfolder, **hub_kwargs)
        outputs: tuple = (read_json(path, what="config"),)
        if return_unused_kwargs:
            outputs += (kwargs,)
        if return_commit_hash:
            parts = Path(path).parts
            commit = parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else None
            outputs += (commit,)
        return outputs if len(outputs) > 1 else outputs[0]

    get_config_dict = load_config  # diffusers' older name, kept there as a deprecated alias

    def to_json_string(self) -> str:
        """The config as the JSON text :meth:`save_config` writes (diffusers' format, with ``_class_name``)."""
        data = _to_jsonable(dict(self.config))
        for key in ("_use_default_values", "_ignore_files"):  # bookkeeping diffusers does not write either
            data.pop(key, None)
        data.update(
            _class_name=type(self).__name__,
            _diffusers_version=DIFFUSERS_COMPAT_VERSION,
            _diffusekit_version=__version__,
        )
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def to_json_file(self, json_file_path: str | os.PathLike) -> None:
        """Write :meth:`to_json_string` to ``json_file_path`` (atomically)."""
        atomic_write_text(Path(json_file_path), self.to_json_string())

    def save_config(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs: Any) -> Path:
        """Write the config as diffusers-format JSON (atomically) and return the file path."""
        if push_to_hub:
            raise NotImplementedError("push_to_hub is not supported: diffusekit never uploads; use `hf upload`")
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        path = save_directory / self.config_name
        atomic_write_text(path, self.to_json_string())
        return path


MAX_JSON_BYTES = 256 * 2**20  # tokenizer.json files are a few MB; anything near this is not a config


def read_json(path: str | os.PathLike, what: str = "JSON") -> dict[str, Any]:
    """Read a JSON object from ``path`` with an error naming the file on any problem.

    Not UTF-8, not JSON, nested too deep, numbers with thousands of digits, or absurdly large: each is a
    ``ValueError`` that names the file and says what is wrong, never a bare ``UnicodeDecodeError`` /
    ``RecursionError``.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise ValueError(f"{what} file {path} is {size} bytes, more than the {MAX_JSON_BYTES} a JSON file here "
                             "may have; it is not a config or index file")
        raw = path.read_bytes()
    except OSError as err:
        raise OSError(f"cannot read {what} file {path}: {err.strerror or err}") from err
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{what} file {path} is not UTF-8 text (invalid byte at offset {err.start}); JSON files must be UTF-8"
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{what} file {path} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); "
            "fix or re-save the file"
        ) from None
    except RecursionError:
        raise ValueError(f"{what} file {path} nests arrays/objects too deeply to be a config; refusing it") from None
    except ValueError as err:  # e.g. an integer with more digits than Python converts (sys.get_int_max_str_digits)
        raise ValueError(f"{what} file {path} holds a value that cannot be read: {str(err)[:200]}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} file {path} must hold a JSON object, found {type(data).__name__}")
    return data


# ---------------------------------------------------------------------------------------------------- validation
#
# A config is checked before anything is built. The schema of a class is data: the types come from the annotations
# of its ``__init__`` (int, float, bool, str, None, sequences and unions of them; anything else is not checked), and
# the ranges from CONFIG_RANGES below, keyed by diffusers' config names (shared by every class that uses the name),
# plus a class's own ``_config_ranges``.


@dataclasses.dataclass(frozen=True)
class Range:
    """Bounds for a number, or for every number in a (nested) sequence."""

    low: float
    high: float
    low_open: bool = False  # True: low itself is not allowed

    def check(self, value: Any) -> bool:
        if isinstance(value, (list, tuple)):
            return all(self.check(v) for v in value)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            return True  # types are checked separately
        above = value > self.low if self.low_open else value >= self.low
        return above and value <= self.high

    def describe(self) -> str:
        return f"{'>' if self.low_open else '>='} {self.low} and <= {self.high}"


_CHANNELS = Range(1, 65536)
CONFIG_RANGES: dict[str, Range] = {
    # model sizes: positive, and small enough that building the model cannot hang or exhaust memory
    "layers_per_block": Range(1, 100),
    "transformer_layers_per_block": Range(1, 100),
    "num_hidden_layers": Range(1, 1000),
    "attention_head_dim": Range(1, 65536),
    "num_attention_heads": Range(1, 4096),
    "block_out_channels": _CHANNELS,
    "in_channels": _CHANNELS,
    "out_channels": _CHANNELS,
    "latent_channels": _CHANNELS,
    "cross_attention_dim": _CHANNELS,
    "hidden_size": _CHANNELS,
    "intermediate_size": Range(1, 1 << 20),
    "projection_dim": _CHANNELS,
    "norm_num_groups": Range(1, 65536),
    "sample_size": Range(1, 1 << 20),
    "image_size": Range(1, 1 << 20),
    "patch_size": Range(1, 1 << 16),
    "vocab_size": Range(1, 10**7),
    "max_position_embeddings": Range(1, 10**6),
    "time_embedding_dim": _CHANNELS,
    "num_class_embeds": Range(1, 10**7),
    "norm_eps": Range(0, 1, low_open=True),
    "layer_norm_eps": Range(0, 1, low_open=True),
    "dropout": Range(0, 1),
    "attention_dropout": Range(0, 1),
    "scaling_factor": Range(0, 1e6, low_open=True),
    # schedulers
    "num_train_timesteps": Range(1, 10**6),
    "beta_start": Range(0, 1, low_open=True),
    "beta_end": Range(0, 1, low_open=True),
    "solver_order": Range(1, 10),
    "steps_offset": Range(0, 10**6),
}


class ConfigValidationError(ValueError):
    """A config value of the wrong type or out of range."""


def _annotation_ok(value: Any, annotation: Any) -> bool | None:
    """True / False when ``annotation`` says; None when it is a type this schema does not check."""
    import types
    import typing

    if annotation is Any or annotation is inspect.Parameter.empty:
        return None
    if annotation is None or annotation is type(None):
        return value is None
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        results = [_annotation_ok(value, arg) for arg in typing.get_args(annotation)]
        if any(r is True for r in results):
            return True
        return None if any(r is None for r in results) else False
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if annotation is bool:
        return isinstance(value, bool) or (isinstance(value, int) and value in (0, 1))
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    import collections.abc

    if origin in (list, tuple, collections.abc.Sequence) or annotation in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        args = typing.get_args(annotation)
        if not args:
            return True
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(args) != len(value):
                return False
            results = [_annotation_ok(v, a) for v, a in zip(value, args)]
        else:
            results = [_annotation_ok(v, args[0]) for v in value]
        return None if any(r is None for r in results) and not any(r is False for r in results) else all(results)
    if origin in (dict, collections.abc.Mapping) or annotation is dict:
        return isinstance(value, dict)
    return None


@functools.lru_cache(maxsize=None)
def _config_schema(cls: type) -> dict[str, tuple[Any, Range | None]]:
    """Key -> (annotation or None, range or None) for a configurable class, read once."""
    import typing

    init = cls.__init__
    raw = inspect.unwrap(init)
    namespace = {**vars(typing), **getattr(raw, "__globals__", {})}
    ranges = {**CONFIG_RANGES, **getattr(cls, "_config_ranges", {})}
    schema = {}
    for name, param in inspect.signature(raw).parameters.items():
        if name == "self" or param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
            continue
        annotation = param.annotation
        if isinstance(annotation, str):
            try:
                annotation = eval(annotation, namespace)  # the class's own source annotations, never file data
            except Exception:
                annotation = None  # a name only known to type checkers: not checked
        schema[name] = (annotation, ranges.get(name))
    return schema


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def validate_config(cls: type, config: Mapping[str, Any], where: str | None = None) -> None:
    """Check each value of ``config`` that ``cls`` takes against its type and range; raise naming key and file."""
    schema = _config_schema(cls)
    for key, value in config.items():
        if key not in schema:
            continue
        annotation, bounds = schema[key]
        if value is None and bounds is None:
            continue  # diffusers' files carry nulls for flags and names (``upcast_attention: null``): its default
        problem = None
        if annotation is not None and _annotation_ok(value, annotation) is False:
            expected = getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
            problem = f"expected {expected}, got {type(value).__name__} {_short(value)}"
        elif bounds is not None and not bounds.check(value):
            problem = f"must be {bounds.describe()}, got {_short(value)}"
        if problem:
            place = f"{where}: " if where else ""
            raise ConfigValidationError(f"{place}{cls.__name__} config key {key!r} {problem}; fix the value")
