"""Config system shared by models, schedulers and pipelines.

A configurable class declares its config as the keyword arguments of ``__init__`` and decorates ``__init__`` with
:func:`register_to_config`. The bound arguments (defaults filled in) become ``self.config``: a :class:`FrozenConfig`,
a read-only ``dict`` with attribute access. Files are diffusers' JSON format (``config.json`` /
``scheduler_config.json`` with ``_class_name`` and ``_diffusers_version``), so both libraries read each other's.
"""

from __future__ import annotations

import copy
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


def read_json(path: str | os.PathLike, what: str = "JSON") -> dict[str, Any]:
    """Read a JSON object from ``path`` with an error naming the file on any problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise OSError(f"cannot read {what} file {path}: {err.strerror or err}") from err
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{what} file {path} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); "
            "fix or re-save the file"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} file {path} must hold a JSON object, found {type(data).__name__}")
    return data
