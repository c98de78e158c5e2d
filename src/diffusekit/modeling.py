"""``ModelMixin``: diffusers-format ``from_pretrained`` / ``save_pretrained`` for ``torch.nn.Module`` models.

Loading builds the model on the meta device (no random init, no memory), checks the checkpoint's keys and shapes
against it strictly, and moves the checkpoint's tensors into the model with ``assign=True``: one copy of the weights
in memory, never two. Module paths equal checkpoint keys, so no renaming happens on the way.
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

from ._io import atomic_checkpoint, reading_checkpoint
from .configuration import (ConfigMixin, ConfigValidationError, config_attribute, config_source, read_json,
                            refuse_config_assignment, validate_config)
from .hub import EntryNotFound, local_checkpoint_folders, resolve_file, split_hub_kwargs

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]


class _SkipInit(torch.overrides.TorchFunctionMode):
    """Skip ``torch.nn.init`` initialisers while a model is built for loading: the checkpoint overwrites them.

    On the meta device they cost no memory but still run (and ``normal_`` on a meta tensor imports torch._dynamo,
    1.5 s the first time). A torch-function mode is per thread, so a model built in another thread meanwhile is
    initialised as usual.
    """

    _INITIALISERS = frozenset(
        getattr(torch.nn.init, name) for name in dir(torch.nn.init) if name.endswith("_") and not name.startswith("_")
    )

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self._INITIALISERS:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


class CheckpointError(ValueError):
    """A weights file that cannot be used: corrupt, unsafe, or not matching the model."""


def resolve_dtype(dtype: Any, torch_dtype: Any, where: str, allow_dict: bool = False) -> Any:
    """``dtype=`` (diffusers' current name) or ``torch_dtype=`` (its older one): the one given, checked.

    Both at once is an error unless they agree. ``allow_dict`` (pipelines) also takes ``{component: dtype}`` with an
    optional ``"default"`` entry, as diffusers.
    """
    if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
        raise ValueError(f"{where}: got dtype={dtype!r} and torch_dtype={torch_dtype!r}; pass only one of them")
    value = dtype if dtype is not None else torch_dtype
    if value is None or isinstance(value, torch.dtype):
        return value
    if allow_dict and isinstance(value, Mapping):
        bad = {k: v for k, v in value.items() if not (isinstance(k, str) and isinstance(v, torch.dtype))}
        if bad:
            raise TypeError(f"{where}: a dtype dict maps component names to torch dtypes, got entries {bad!r}")
        return dict(value)
    kinds = "a torch.dtype such as torch.float16" + (" or a dict {component: dtype}" if allow_dict else "")
    raise TypeError(f"{where}: dtype / torch_dtype must be {kinds}, got {value!r}")


def with_variant(filename: str, variant: str | None) -> str:
    """``diffusion_pytorch_model.safetensors`` + ``fp16`` -> ``diffusion_pytorch_model.fp16.safetensors``."""
    if not variant:
        return filename
    if not isinstance(variant, str) or any(c in variant for c in "/\\\x00") or variant in (".", ".."):
        raise ValueError(f"variant={str(variant)[:80]!r} must be a plain name such as 'fp16' (no path separators)")
    stem, ext = filename.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"


def _index_name(weights_file: str, variant: str | None) -> str:
    # diffusers: diffusion_pytorch_model.safetensors.index.json, variant -> ....safetensors.index.fp16.json
    return with_variant(f"{weights_file}.index.json", variant)


# ---------------------------------------------------------------------------------------------------- reading


def read_safetensors(path: Path, keys: Iterable[str] | None = None) -> StateDict:
    """Read a safetensors file (optionally only ``keys``), with an error naming the file if it is damaged."""
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(path), framework="pt", device="cpu") as handle:
            names = handle.keys() if keys is None else keys
            return {name: handle.get_tensor(name) for name in names}
    except Exception as err:  # safetensors raises its own error type for every kind of damage
        raise CheckpointError(
            f"cannot read weights file {path}: {err}. The file is truncated or corrupt: re-download or re-save it"
        ) from None


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape from a safetensors header, without reading any tensor data."""
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(path), framework="pt", device="cpu") as handle:
            return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except Exception as err:
        raise CheckpointError(
            f"cannot read weights file {path}: {err}. The file is truncated or corrupt: re-download or re-save it"
        ) from None


def read_torch_bin(path: Path) -> StateDict:
    """Read a pickled ``.bin`` state dict with ``weights_only=True``: tensors and plain containers only."""
    import pickle

    import zipfile

    try:  # mmap needs torch's zip format; older (legacy, non-zip) .bin files that diffusers reads load without it
        data = torch.load(os.fspath(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refusing to load {path}: it holds objects other than tensors ({str(err).splitlines()[0]}). "
            "Only plain state dicts load safely; convert it to safetensors with a trusted tool"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"cannot read weights file {path}: {err}. Re-download or re-save it") from None
    if isinstance(data, Mapping) and "state_dict" in data and isinstance(data["state_dict"], Mapping):
        data = data["state_dict"]
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"weights file {path} does not hold a state dict (a mapping of names to tensors)")
    return dict(data)


def read_weights(path: Path) -> StateDict:
    return read_safetensors(path) if path.suffix == ".safetensors" else read_torch_bin(path)


def state_dict_diff(
    expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]], limit: int = 20
) -> str:
    """A readable account of missing keys, unexpected keys and shape mismatches ('' when they agree)."""

    def listing(title, items):
        items = sorted(items)
        more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
        return f"  {title} ({len(items)}):\n" + "\n".join(f"    {i}" for i in items[:limit]) + more

    missing = set(expected) - set(found)
    unexpected = set(found) - set(expected)
    mismatched = [
        f"{k}: checkpoint {list(found[k])} vs model {list(expected[k])}"
        for k in set(expected) & set(found)
        if tuple(found[k]) != tuple(expected[k])
    ]
    parts = []
    if missing:
        parts.append(listing("missing from the checkpoint", missing))
    if unexpected:
        parts.append(listing("in the checkpoint but not in the model", unexpected))
    if mismatched:
        parts.append(listing("shape mismatches", mismatched))
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------------- the mixin


class ModelMixin(torch.nn.Module, ConfigMixin):
    """Base class of every diffusekit model.

    Subclasses set the file names (diffusers' by default; transformers-format models such as CLIP override them) and
    may override :meth:`_config_kwargs_from_file` or :meth:`_adapt_state_dict` for format quirks.
    """

    config_name = "config.json"
    safetensors_name = "diffusion_pytorch_model.safetensors"
    bin_name = "diffusion_pytorch_model.bin"
    # regexes of checkpoint keys to drop silently (e.g. buffers older writers saved)
    _ignore_unexpected_keys: tuple[str, ...] = ()
    # diffusers-format configs carry unknown keys along (as diffusers does); transformers-format ones set False
    _keep_unknown_config_keys: bool = True

    # ------------------------------------------------------------------ config keys as attributes

    def __getattr__(self, name: str) -> Any:
        # parameters, buffers and submodules first (torch.nn.Module), then config keys (deprecated, as in diffusers)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return config_attribute(self, name)

    def __setattr__(self, name: str, value: Any) -> None:
        refuse_config_assignment(self, name)
        super().__setattr__(name, value)

    # ------------------------------------------------------------------ properties

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Number of parameters (only those with ``requires_grad`` / without ``nn.Embedding`` weights)."""
        skip = set()
        if exclude_embeddings:
            skip = {id(m.weight) for m in self.modules() if isinstance(m, torch.nn.Embedding)}
        return sum(p.numel() for p in self.parameters()
                   if id(p) not in skip and (p.requires_grad or not only_trainable))

    def get_memory_footprint(self, return_buffers: bool = True) -> int:
        """Bytes held by the parameters (and buffers): what the model costs in memory."""
        tensors = [*self.parameters(), *(self.buffers() if return_buffers else ())]
        return sum(t.numel() * t.element_size() for t in tensors)

    # ------------------------------------------------------------------ attention kernels

    def set_use_memory_efficient_attention_xformers(self, valid: bool, attention_op: Any = None) -> None:
        """A no-op: attention is always torch's ``scaled_dot_product_attention``, which already picks
        memory-efficient (or flash) kernels. Difference from diffusers (deliberate): no ``xformers`` needed."""
        logger.info("%s: diffusekit always uses torch's scaled_dot_product_attention; xformers is not used",
                    type(self).__name__)

    def enable_xformers_memory_efficient_attention(self, attention_op: Any = None) -> None:
        """A no-op, see :meth:`set_use_memory_efficient_attention_xformers`."""
        self.set_use_memory_efficient_attention_xformers(True, attention_op)

    def disable_xformers_memory_efficient_attention(self) -> None:
        """A no-op, see :meth:`set_use_memory_efficient_attention_xformers`."""

    def enable_cpu_fused_attention(self, *, warn: bool = True) -> bool:
        """Run this model's attention with diffusekit's fused CPU kernel (``diffusekit.cpu_attention``: bf16 dot
        products, float32 softmax; about half the time of torch's float32 SDPA, relative error of a few 1e-3) for
        float32 CPU calls without a mask; returns whether it is on. Built on first use (seconds, once per machine).
        Where it cannot run (a CPU without AVX-512 BF16, no C++ compiler, a failed build) attention stays SDPA,
        with one warning (``warn=False``: a log line). ``optimize()`` turns it on for int8 models, where attention
        before an int8 output projection also runs its two products in int8 (``Attention.cpu_int8_products``;
        docs/QUANTIZATION.md). Not in diffusers.
        """
        from . import cpu_attention

        reason = cpu_attention.unavailable_reason()
        if reason is not None:
            message = f"{type(self).__name__}: the fused CPU attention kernel is unavailable ({reason}); attention " \
                      f"stays torch's scaled_dot_product_attention"
            if warn:
                warnings.warn(message, RuntimeWarning, stacklevel=2)
            else:
                logger.info(message)
            return False
        self._set_cpu_fused_attention(True)
        return True

    def disable_cpu_fused_attention(self) -> None:
        """Back to torch's ``scaled_dot_product_attention`` (see :meth:`enable_cpu_fused_attention`), also where
        ``optimize()`` chose the kernel's exact float32 products."""
        self._set_cpu_fused_attention(False)
        for module in self.modules():
            if hasattr(module, "cpu_exact_attention"):
                module.cpu_exact_attention = False

    def _set_cpu_fused_attention(self, enabled: bool) -> None:
        for module in self.modules():
            if hasattr(module, "cpu_fused_attention"):
                module.cpu_fused_attention = enabled

    # ------------------------------------------------------------------ training

    # models whose blocks can recompute activations in the backward pass (the UNets and the VAE)
    _supports_gradient_checkpointing: bool = False

    def enable_gradient_checkpointing(self, gradient_checkpointing_func: Callable | None = None) -> None:
        """Trade compute for memory in training: each block layer's activations are recomputed in the backward pass
        instead of stored. Gradients are unchanged. ``gradient_checkpointing_func`` replaces the default
        ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``, as in diffusers. No effect without grad.
        """
        if not self._supports_gradient_checkpointing:
            raise ValueError(f"{type(self).__name__} does not support gradient checkpointing")
        if gradient_checkpointing_func is None:
            import functools

            from torch.utils.checkpoint import checkpoint

            gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)
        self._set_gradient_checkpointing(True, gradient_checkpointing_func)

    def disable_gradient_checkpointing(self) -> None:
        """Store activations again (the default)."""
        if self._supports_gradient_checkpointing:
            self._set_gradient_checkpointing(False, None)

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in self.modules())

    def _set_gradient_checkpointing(self, enable: bool, func: Callable | None) -> None:
        for module in self.modules():
            if hasattr(module, "gradient_checkpointing"):
                module._gradient_checkpointing_func = func
                module.gradient_checkpointing = enable

    # ------------------------------------------------------------------ speed

    # submodules optimize() compiles ("" = the model's own calls); the VAE compiles encoder and decoder, since its
    # callers use encode() / decode() rather than forward()
    _optimize_targets: tuple[str, ...] = ("",)

    def optimize(self, *, cache_dir: str | os.PathLike | None = None, use_cache: bool = True,
                 dynamic: bool | None = False, mode: str | None = None,
                 options: dict[str, Any] | None = None, release_weights: bool = True,
                 packages: bool | None = None, reuse_memory: bool = True) -> "ModelMixin":
        """Compile this model for faster inference, outputs within 1e-5 relative of eager fp32 (an int8 model runs
        its int8 kernels instead, close to but not within 1e-5 of its simulated int8; docs/QUANTIZATION.md); returns
        ``self``.

        CPU: inductor (fused C++ kernels; freezing opt-in via ``options={"freezing": True}``, automatic for int8
        QDQ models) under ``torch.no_grad()`` / ``inference_mode``;
        accelerators: plain ``torch.compile``. Compiles lazily on the first call per input shape; compiled code is
        cached on disk (``cache_dir``, default ``diffusekit.optimize.default_cache_dir()``). By default (CPU,
        static shapes) each input shape is built once per machine into an AOTInductor package that later processes
        load in seconds (``diffusekit.aot_packages``; the exact path's hold code only and run on the model's own
        weights); a call a package cannot serve (forward hooks such as unfused LoRA, numeric arguments, objects other
        than DeepCache's step) uses ``torch.compile``. ``packages=False``: always ``torch.compile`` (its FX-graph
        cache spares the C++ build only). Grad mode runs eager; no compiler -> one warning, eager.
        ``release_weights``: give the memory-mapped checkpoint pages back to the OS once the compiled code has its
        pre-packed copies (about one copy of the weights in memory instead of two). ``reuse_memory`` (CPU): malloc
        keeps the memory a call frees for the next call (no page faults for the activations of every step;
        process-wide, once; ``diffusekit._native.keep_freed_memory``). Not in diffusers (its users call
        ``torch.compile`` themselves). See docs/PERFORMANCE.md.
        """
        from .optimize import optimize_module

        for name in self._optimize_targets:
            optimize_module(self.get_submodule(name), cache_dir=cache_dir, use_cache=use_cache, dynamic=dynamic,
                            mode=mode, options=options, release_weights=release_weights, packages=packages,
                            reuse_memory=reuse_memory)
        return self

    # ------------------------------------------------------------------ hooks

    @classmethod
    def _config_kwargs_from_file(cls, data: dict[str, Any]) -> dict[str, Any]:
        return cls.extract_init_kwargs(data, warn_unknown=True)

    @classmethod
    def _adapt_state_dict(cls, state_dict: StateDict) -> StateDict:
        return state_dict

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        subfolder: str | None = None,
        *,
        use_safetensors: bool | None = None,
        variant: str | None = None,
        torch_dtype: torch.dtype | None = None,
        dtype: torch.dtype | None = None,
        **kwargs,
    ):
        """Load a model from a diffusers-format folder or hub repo.

        ``use_safetensors``: True requires ``.safetensors``; False also allows a ``.bin``; None prefers safetensors.
        ``variant`` picks ``*.{variant}.safetensors`` files; ``dtype`` (or its older name ``torch_dtype``, accepted
        without diffusers' deprecation warning) casts floating-point weights.
        Hub options: ``revision``, ``cache_dir``, ``local_files_only``, ``token``, ``force_download``.
        Remaining keyword arguments override config values (names starting with ``_`` are kept in the config only).
        """
        hub = split_hub_kwargs(kwargs)
        for legacy in ("low_cpu_mem_usage", "device_map", "resume_download", "proxies", "output_loading_info"):
            kwargs.pop(legacy, None)  # accepted for diffusers compatibility; loading is always low-memory here
        torch_dtype = resolve_dtype(dtype, torch_dtype, f"{cls.__name__}.from_pretrained")
        with reading_checkpoint(*local_checkpoint_folders(pretrained_model_name_or_path, subfolder)):
            return cls._load(pretrained_model_name_or_path, subfolder, use_safetensors, variant, torch_dtype, hub,
                             kwargs)

    @classmethod
    def _load(cls, source, subfolder, use_safetensors, variant, torch_dtype, hub, kwargs):
        config_path = resolve_file(source, cls.config_name, subfolder, **hub)
        data = read_json(config_path, what="config")
        quantization = data.get("quantization_config")
        if quantization is not None:  # an int8 checkpoint (diffusekit.quantization): checked before anything is built
            from .quantization.format import validate_quantization_config

            validate_quantization_config(quantization, config_path)
            if torch_dtype not in (None, torch.float32):
                raise ValueError(f"{config_path}: this is an int8 quantized checkpoint; it loads with float32 scales "
                                 f"and biases only, not dtype={torch_dtype}. Load the float checkpoint for that dtype")
        init_kwargs = cls._config_kwargs_from_file({k: v for k, v in data.items() if k != "quantization_config"})
        unknown = sorted(k for k in kwargs if k not in cls._config_params() and not k.startswith("_"))
        if unknown:
            raise TypeError(f"{cls.__name__}.from_pretrained got unexpected keyword argument(s) {unknown}")
        init_kwargs.update(kwargs)

        validate_config(cls, init_kwargs, os.fspath(config_path))  # types and ranges, before anything is built
        files = cls._find_weight_files(source, subfolder, use_safetensors, variant, hub)
        with torch.device("meta"), _SkipInit(), config_source(config_path):
            model = cls(**init_kwargs)
        if quantization is not None:
            from .quantization.format import convert_for_loading

            convert_for_loading(model, quantization, config_path)
        _check_memory(model, config_path, torch_dtype)
        if cls._keep_unknown_config_keys:
            model._keep_foreign_keys(data)  # diffusers-format configs keep unknown keys, as diffusers does
        if quantization is not None and "quantization_config" not in model.config:
            model.register_to_config(quantization_config=quantization)
        model.load_weight_files(files, dtype=torch_dtype)
        return model.eval()

    @classmethod
    def _find_weight_files(cls, source, subfolder, use_safetensors, variant, hub) -> list[Path]:
        kinds = []
        if use_safetensors is not False:
            kinds.append(cls.safetensors_name)
        if use_safetensors is not True:
            kinds.append(cls.bin_name)
        tried = []
        for weights in kinds:
            single = with_variant(weights, variant)
            tried.append(single)
            try:
                return [resolve_file(source, single, subfolder, **hub)]
            except EntryNotFound as err:
                last_error = err
            index = _index_name(weights, variant)
            tried.append(index)
            try:
                index_path = resolve_file(source, index, subfolder, **hub)
            except EntryNotFound:
                continue
            return cls._shard_files(source, subfolder, index_path, weights, hub)
        where = f"{source}/{subfolder}" if subfolder else os.fspath(source)
        advice = []
        if use_safetensors is True:
            advice.append("pass use_safetensors=False to allow a .bin file")
        if variant:
            advice.append(f"drop variant={variant!r} to load the default weights")
        hint = ("; " + "; ".join(advice)) if advice else ""
        detail = f" ({last_error})" if "cache" in str(last_error) else ""
        raise EntryNotFound(f"{where}: no weights file found, looked for {', '.join(tried)}{hint}{detail}")

    @classmethod
    def _shard_files(cls, source, subfolder, index_path: Path, weights: str, hub) -> list[Path]:
        """The files an index's weight map names: each a plain file name of the same format, inside the folder."""
        weight_map = read_json(index_path, what="shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"shard index {index_path} has no 'weight_map' object (key -> shard file name)")
        names = set(weight_map.values())
        suffix = weights.rsplit(".", 1)[1]
        for name in sorted(names, key=str):
            if not isinstance(name, str) or not name.endswith("." + suffix):
                raise CheckpointError(
                    f"shard index {index_path}: weight_map entry {name!r} is not a .{suffix} file name; an index of "
                    f"{weights} may only name .{suffix} shards"
                    + (" (use_safetensors=True never unpickles)" if suffix == "safetensors" else "")
                )
        files = []
        for name in sorted(names):
            try:
                files.append(resolve_file(source, name, subfolder, **hub))
            except ValueError as err:
                raise CheckpointError(f"shard index {index_path}: refusing weight_map entry: {err}") from None
        return files

    def load_weight_files(self, files: list[Path], dtype: torch.dtype | None = None) -> None:
        """Strictly load checkpoint files into this (possibly meta-device) model, taking ownership of the tensors."""
        expected = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        ignore = [re.compile(p) for p in self._ignore_unexpected_keys]

        if all(f.suffix == ".safetensors" for f in files):
            # check keys and shapes from the headers before reading any data
            shapes: dict[str, tuple[int, ...]] = {}
            for f in files:
                shapes.update(safetensors_shapes(f))
            self._check(expected, self._adapted_shapes(shapes), ignore, files)
            state_dict: StateDict = {}
            for f in files:
                state_dict.update(read_safetensors(f))
            state_dict = self._adapt_state_dict(state_dict)
        else:
            state_dict = {}
            for f in files:
                state_dict.update(read_weights(f))
            state_dict = self._adapt_state_dict(state_dict)
            self._check(expected, {k: tuple(v.shape) for k, v in state_dict.items()}, ignore, files)
        # the check passed: any key the model lacks is one of the ignored ones
        state_dict = {k: v for k, v in state_dict.items() if k in expected}

        model_dtypes = {k: v.dtype for k, v in self.state_dict().items()}
        for key, value in state_dict.items():  # an int tensor where floats belong (or the reverse) is named here
            want = model_dtypes[key]
            if value.is_floating_point() != want.is_floating_point or value.is_complex() != want.is_complex:
                names = ", ".join(os.fspath(f) for f in files)
                kind = "floating-point" if want.is_floating_point else f"{want} (not floating-point)"
                raise CheckpointError(
                    f"{names}: weight {key!r} has dtype {value.dtype}, but {type(self).__name__} expects a {kind} "
                    "tensor there; the file is damaged or belongs to another model"
                )
        target = dtype or torch.get_default_dtype()
        for key, value in state_dict.items():
            if value.is_floating_point() and value.dtype != target:
                state_dict[key] = value.to(target)
        self.load_state_dict(state_dict, strict=True, assign=True)
        left_on_meta = [n for n, t in [*self.named_parameters(), *self.named_buffers()] if t.is_meta]
        if left_on_meta:  # a non-persistent buffer the model forgot to rebuild: a bug in the model class
            raise RuntimeError(f"{type(self).__name__}: tensors not restored from the checkpoint: {left_on_meta}")

    @classmethod
    def _adapted_shapes(cls, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        # run the key adapter over placeholder tensors so header checks see the final key names
        fake = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
        return {k: tuple(v.shape) for k, v in cls._adapt_state_dict(fake).items()}

    def _check(self, expected, found, ignore, files) -> None:
        found = {k: s for k, s in found.items() if k in expected or not any(p.search(k) for p in ignore)}
        diff = state_dict_diff(expected, found)
        if diff:
            names = ", ".join(os.fspath(f) for f in files)
            raise CheckpointError(
                f"{names} does not match {type(self).__name__} built from its config:\n{diff}\n"
                "Check that the config.json beside the weights belongs to them, and that the class is the right one."
            )

    # ------------------------------------------------------------------ saving

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str | None = None,
        **_ignored,
    ) -> None:
        """Write ``config.json`` and the weights in diffusers' layout, atomically as a whole.

        Everything is written into a staging folder and committed at once (see ``diffusekit._io.atomic_checkpoint``):
        a save killed at any moment leaves the old checkpoint or the new one. Weight files of this model's earlier
        saves with the same ``variant`` (a single file, shards, the other format) are removed by the commit, so the
        loader cannot prefer them; other files in the folder are left alone.
        """
        with atomic_checkpoint(save_directory) as checkpoint:
            self._write_checkpoint(checkpoint.stage, safe_serialization, variant, max_shard_size)
            checkpoint.supersede("", self._weight_file_pattern(variant).fullmatch)

    @classmethod
    def _weight_file_pattern(cls, variant: str | None) -> re.Pattern:
        """Names of this class's weight files for ``variant``: single, sharded or index, safetensors or ``.bin``."""
        names = []
        for base in (cls.safetensors_name, cls.bin_name):
            stem, ext = base.rsplit(".", 1)
            names.append(re.escape(with_variant(base, variant)))
            names.append(re.escape(stem) + r"-\d{5}-of-\d{5}" + re.escape(f".{variant}" if variant else "")
                         + re.escape(f".{ext}"))
            names.append(re.escape(_index_name(base, variant)))
        return re.compile("|".join(f"(?:{n})" for n in names))

    def _write_checkpoint(self, save_directory: Path, safe_serialization: bool, variant: str | None,
                          max_shard_size: int | str | None) -> None:
        state_dict = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        base = self.safetensors_name if safe_serialization else self.bin_name
        shards = _split_shards(state_dict, _parse_size(max_shard_size))
        if len(shards) == 1:
            names = [with_variant(base, variant)]
        else:
            # diffusers' and transformers' spelling: the variant before the shard number (model.fp16-00001-of-00002)
            stem, ext = with_variant(base, variant).rsplit(".", 1)
            names = [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.{ext}" for i in range(len(shards))]
        for name, shard in zip(names, shards):
            path = save_directory / name
            if safe_serialization:
                from safetensors.torch import save_file

                save_file(shard, os.fspath(path), metadata={"format": "pt"})
            else:
                torch.save(shard, path)
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": sum(v.numel() * v.element_size() for v in state_dict.values())},
                "weight_map": {k: name for name, shard in zip(names, shards) for k in shard},
            }
            (save_directory / _index_name(base, variant)).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        self.save_config(save_directory)


def physical_memory() -> int | None:
    """Bytes of RAM this machine has (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _check_memory(model: torch.nn.Module, config_path, dtype: torch.dtype | None) -> None:
    """Refuse a config whose parameters alone would not fit in this machine's RAM (model built on meta: free)."""
    ram = physical_memory()
    element = torch.empty((), dtype=dtype or torch.get_default_dtype()).element_size()
    need = sum(t.numel() for t in model.state_dict().values()) * element
    if ram is not None and need > ram:
        raise ConfigValidationError(
            f"{config_path}: {type(model).__name__} built from this config would need {need / 2**30:.1f} GiB for its "
            f"weights, more than this machine's {ram / 2**30:.1f} GiB of RAM; check the sizes in the config "
            "(block_out_channels, layers, hidden sizes)"
        )


def _parse_size(size: int | str | None) -> int | None:
    if size is None or isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)\s*", size, re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size={size!r}: expected bytes as an int or a string like '5GB' or '500MB'")
    unit = match.group(2).upper()
    scale = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(match.group(1)) * scale)


def _split_shards(state_dict: StateDict, limit: int | None) -> list[StateDict]:
    if limit is None:
        return [state_dict]
    shards: list[StateDict] = [{}]
    size = 0
    for key, value in state_dict.items():
        nbytes = value.numel() * value.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += nbytes
    return shards
