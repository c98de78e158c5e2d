"""``DiffusionPipeline``: loading, saving and moving a set of components described by ``model_index.json``.

A pipeline subclass lists its components as the parameters of ``__init__`` (diffusers' names) and calls
``self.register_modules(...)``. ``model_index.json`` maps each name to ``[library, ClassName]``; the class names are
resolved through diffusekit's own exports, so ``["transformers", "CLIPTextModel"]`` loads diffusekit's CLIP.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable

import torch

from ..configuration import DIFFUSERS_COMPAT_VERSION, FrozenConfig, config_attribute, read_json
from ..hub import EntryNotFound, local_checkpoint_folders, local_folder, resolve_file, split_hub_kwargs
from ..modeling import ModelMixin, resolve_dtype
from ..outputs import BaseOutput
from .._io import atomic_checkpoint, atomic_write_text, reading_checkpoint

logger = logging.getLogger(__name__)

INDEX_NAME = "model_index.json"


@dataclasses.dataclass
class ImagePipelineOutput(BaseOutput):
    """``images``: a list of PIL images, a numpy array (B, H, W, C) or a tensor (B, C, H, W), per ``output_type``."""

    images: Any


def _resolve_class(class_name: str, where: str, kind: str = "component") -> type:
    """The registered class ``class_name`` names in a ``model_index.json``: a concrete pipeline (``kind="pipeline"``)
    or a loadable component (models, schedulers, and classes marked ``_pipeline_component``). Nothing else of the
    package resolves, so a file cannot reach arbitrary attributes or base classes."""
    import diffusekit

    from ..schedulers.base import SchedulerMixin

    cls = getattr(diffusekit, class_name, None) if isinstance(class_name, str) and class_name in diffusekit.__all__ \
        else None
    if kind == "pipeline":
        ok = isinstance(cls, type) and issubclass(cls, DiffusionPipeline) and cls is not DiffusionPipeline
        expected = "a concrete pipeline class (e.g. StableDiffusionPipeline)"
    else:
        ok = isinstance(cls, type) and (
            (issubclass(cls, (ModelMixin, SchedulerMixin)) and cls not in (ModelMixin, SchedulerMixin))
            or getattr(cls, "_pipeline_component", False)
        )
        expected = "a model, scheduler, tokenizer or image processor class"
    if not ok:
        if cls is not None:
            raise ValueError(f"{where}: {class_name!r} is not {expected}; fix the file's class name")
        raise ValueError(
            f"{where}: class {class_name!r} is not implemented by diffusekit. Load that component yourself and pass "
            "it as a keyword argument, or pass None if the pipeline can do without it"
        )
    return cls


class DiffusionPipeline:
    """Base class of all pipelines. Subclasses define ``__init__(self, <components>, <options>)``.

    ``component_names`` lists the component parameters of ``__init__``; those in ``_optional_components`` may be
    None. ``_option_names`` are plain (non-component) config values such as ``requires_safety_checker``, stored in
    ``model_index.json`` beside the components.
    """

    config_name = INDEX_NAME
    # order for enable_model_cpu_offload (diffusers' attribute); None: the components' order
    model_cpu_offload_seq: str | None = None
    has_compatibles = False
    ignore_for_config: tuple[str, ...] = ()
    component_names: tuple[str, ...] = ()
    _optional_components: tuple[str, ...] = ()
    _option_names: tuple[str, ...] = ()
    _progress_bar_config: dict[str, Any]

    # ------------------------------------------------------------------ components

    def register_modules(self, **components: Any) -> None:
        for name, component in components.items():
            setattr(self, name, component)
        self._component_names = tuple(dict.fromkeys((*getattr(self, "_component_names", ()), *components)))

    def register_options(self, **options: Any) -> None:
        self._options = {**getattr(self, "_options", {}), **options}

    @property
    def components(self) -> dict[str, Any]:
        """The pipeline's components by name, ready to build another pipeline: ``Other(**pipe.components)``."""
        return {name: getattr(self, name) for name in self._component_names}

    def __getattr__(self, name: str) -> Any:
        # options (requires_safety_checker ...) read as attributes, deprecated, as diffusers' config keys are
        return config_attribute(self, name, self.__dict__.get("_options"))

    @property
    def parameters(self) -> dict[str, Any]:
        """The options (non-component ``__init__`` arguments, e.g. ``requires_safety_checker``), as diffusers'."""
        return dict(getattr(self, "_options", {}))

    @property
    def name_or_path(self) -> str | os.PathLike | None:
        """The folder or repo id the pipeline was loaded from (None when built from components)."""
        return self.__dict__.get("_name_or_path")

    @staticmethod
    def numpy_to_pil(images):
        """Float images (B, H, W, C) in [0, 1] -> a list of PIL images."""
        from .image_processor import numpy_to_pil

        return numpy_to_pil(images)

    def prepare_extra_step_kwargs(self, generator=None, eta: float = 0.0) -> dict[str, Any]:
        """The extra ``scheduler.step`` arguments: ``eta`` for schedulers that take it, and the generator."""
        kwargs: dict[str, Any] = {"generator": generator}
        if getattr(self.scheduler, "accepts_eta", False):
            kwargs["eta"] = eta
        return kwargs

    @classmethod
    def load_config(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> dict[str, Any]:
        """Read ``model_index.json`` of a folder or hub repo into a plain dict."""
        hub = split_hub_kwargs(kwargs)
        if kwargs:
            raise TypeError(f"{cls.__name__}.load_config got unexpected keyword argument(s) {sorted(kwargs)}")
        return read_json(resolve_file(pretrained_model_name_or_path, INDEX_NAME, **hub), what="pipeline index")

    @property
    def config(self) -> FrozenConfig:
        entries: dict[str, Any] = {name: list(_library_and_class(c)) for name, c in self.components.items()}
        entries.update(getattr(self, "_options", {}))
        return FrozenConfig(entries)

    def _modules(self) -> Iterable[tuple[str, torch.nn.Module]]:
        return ((n, c) for n, c in self.components.items() if isinstance(c, torch.nn.Module))

    # ------------------------------------------------------------------ device / dtype

    def to(self, *args, **kwargs) -> "DiffusionPipeline":
        """Move every torch module: ``pipe.to("cuda")``, ``pipe.to(torch.float16)``, ``pipe.to("cpu", torch.float32)``."""
        for _, module in self._modules():
            module.to(*args, **kwargs)
        return self

    @property
    def device(self) -> torch.device:
        """Where the pipeline computes: the models' device, or the accelerator when CPU offload is on."""
        offload = self.__dict__.get("_offload_device")
        if offload is not None:
            return offload
        for _, module in self._modules():
            return next(module.parameters()).device
        return torch.device("cpu")

    _execution_device = device  # diffusers' name for the same thing

    # ------------------------------------------------------------------ memory helpers

    def _vae_for(self, method: str):
        vae = getattr(self, "vae", None)
        if vae is None:
            raise AttributeError(f"{type(self).__name__}.{method}: this pipeline has no vae")
        return vae

    def enable_vae_slicing(self) -> None:
        """Decode a batch one image at a time (less memory, same images): ``pipe.vae.enable_slicing()``.

        Kept for the tutorials that call it; diffusers 0.42 removed the pipeline-level name.
        """
        self._vae_for("enable_vae_slicing").enable_slicing()

    def disable_vae_slicing(self) -> None:
        """Undo :meth:`enable_vae_slicing`: ``pipe.vae.disable_slicing()``."""
        self._vae_for("disable_vae_slicing").disable_slicing()

    def enable_vae_tiling(self) -> None:
        """Encode/decode large images in overlapping tiles (bounded memory): ``pipe.vae.enable_tiling()``."""
        self._vae_for("enable_vae_tiling").enable_tiling()

    def disable_vae_tiling(self) -> None:
        """Undo :meth:`enable_vae_tiling`: ``pipe.vae.disable_tiling()``."""
        self._vae_for("disable_vae_tiling").disable_tiling()

    def set_use_memory_efficient_attention_xformers(self, valid: bool, attention_op: Any = None) -> None:
        """A no-op, see :meth:`enable_xformers_memory_efficient_attention`."""
        if valid:
            self.enable_xformers_memory_efficient_attention(attention_op)

    def enable_xformers_memory_efficient_attention(self, attention_op: Any = None) -> None:
        """Nothing to enable: diffusekit's attention is always torch's ``scaled_dot_product_attention``, which picks a
        memory-efficient (or flash) kernel by itself on GPUs. Kept so copied snippets run; logs that it is a no-op.

        Difference from diffusers (deliberate): diffusers needs the ``xformers`` package and CUDA, and raises
        without them; ``attention_op`` is ignored here.
        """
        logger.info("%s.enable_xformers_memory_efficient_attention: diffusekit always uses torch's "
                    "scaled_dot_product_attention (memory-efficient kernels included); nothing to do",
                    type(self).__name__)

    def disable_xformers_memory_efficient_attention(self) -> None:
        """A no-op, as :meth:`enable_xformers_memory_efficient_attention`."""

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str | None = None) -> None:
        """Keep the models in CPU memory and move each one whole onto the accelerator while it runs (the previous
        one goes back). Needs an accelerator: on a CPU-only machine it raises ``RuntimeError``, as diffusers does.
        Implemented with torch hooks (diffusers needs ``accelerate``)."""
        from .offload import ModelOffload, offload_device

        target = offload_device("enable_model_cpu_offload", gpu_id, device)
        self.remove_all_hooks()
        modules = dict(self._modules())
        order = (self.model_cpu_offload_seq or "").split("->")
        models = [modules.pop(name) for name in order if name in modules] + list(modules.values())
        self.__dict__["_model_offload"] = ModelOffload(models, target)
        self.__dict__["_offload_device"] = target

    def enable_sequential_cpu_offload(self, gpu_id: int | None = None,
                                      device: torch.device | str | None = None) -> None:
        """Keep the weights in CPU memory and move each block onto the accelerator only for its own forward (least
        accelerator memory, slow). Needs an accelerator: raises ``RuntimeError`` on a CPU-only machine, as diffusers.
        """
        from .offload import offload_device, sequential_offload

        target = offload_device("enable_sequential_cpu_offload", gpu_id, device)
        self.remove_all_hooks()
        for _, module in self._modules():
            sequential_offload(module, target)
        self.__dict__["_offload_device"] = target

    def maybe_free_model_hooks(self) -> None:
        """With model offload on: move the model still on the accelerator back to CPU memory."""
        offload = self.__dict__.get("_model_offload")
        if offload is not None:
            offload.free()

    def remove_all_hooks(self) -> None:
        """Switch CPU offload off (the models stay where they are; move them with ``pipe.to(...)``)."""
        from .offload import remove_hooks

        remove_hooks(module for _, module in self._modules())
        self.__dict__.pop("_model_offload", None)
        self.__dict__.pop("_offload_device", None)

    @property
    def dtype(self) -> torch.dtype:
        for _, module in self._modules():
            return next(module.parameters()).dtype
        return torch.float32

    # ------------------------------------------------------------------ progress

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """Options for tqdm (e.g. ``disable=True``, ``leave=False``, ``desc=...``)."""
        self._progress_bar_config = dict(kwargs)

    def progress_bar(self, iterable: Iterable | None = None, total: int | None = None):
        from tqdm.auto import tqdm

        config = getattr(self, "_progress_bar_config", {})
        return tqdm(iterable, total=total, **config)

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        torch_dtype: torch.dtype | dict[str, torch.dtype] | None = None,
        use_safetensors: bool | None = None,
        variant: str | None = None,
        dtype: torch.dtype | dict[str, torch.dtype] | None = None,
        **kwargs: Any,
    ) -> "DiffusionPipeline":
        """Load every component listed in ``model_index.json``; keyword arguments replace components or options.

        On ``DiffusionPipeline`` itself, the pipeline class is the one named by ``_class_name`` in the index.
        ``dtype`` (or its older name ``torch_dtype``, accepted without diffusers' deprecation warning) is one dtype
        for every model, or a dict per component, ``{"unet": torch.float16, "default": torch.float32}`` (components
        not named get ``"default"``, else float32, as in diffusers).
        """
        hub = split_hub_kwargs(kwargs)
        torch_dtype = resolve_dtype(dtype, torch_dtype, f"{cls.__name__}.from_pretrained", allow_dict=True)
        for legacy in ("low_cpu_mem_usage", "device_map", "resume_download", "proxies"):
            kwargs.pop(legacy, None)
        with reading_checkpoint(*local_checkpoint_folders(pretrained_model_name_or_path)):
            return cls._load(pretrained_model_name_or_path, torch_dtype, use_safetensors, variant, hub, kwargs)

    @classmethod
    def _load(cls, source, torch_dtype, use_safetensors, variant, hub, kwargs) -> "DiffusionPipeline":
        index_path = resolve_file(source, INDEX_NAME, **hub)
        index = read_json(index_path, what="pipeline index")
        pipeline_cls = cls._pipeline_class(index, index_path)

        names = pipeline_cls.component_names
        unknown = sorted(set(kwargs) - set(names) - set(pipeline_cls._option_names))
        if unknown:
            raise TypeError(
                f"{pipeline_cls.__name__}.from_pretrained got unknown argument(s) {unknown}; components are "
                f"{list(names)}, options are {list(pipeline_cls._option_names)}"
            )
        init_kwargs: dict[str, Any] = {}
        loaded_variants = 0
        for name in names:
            if name in kwargs:  # passed in by the caller (a component object, or None to leave it out)
                init_kwargs[name] = kwargs.pop(name)
                continue
            entry = index.get(name)
            if entry is None or (isinstance(entry, list) and entry[-1] is None):
                if name not in pipeline_cls._optional_components:
                    raise ValueError(
                        f"{index_path}: component {name!r} is missing, and {pipeline_cls.__name__} needs it; "
                        f"add it to the folder or pass {name}=... to from_pretrained"
                    )
                init_kwargs[name] = None
                continue
            if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, str) for e in entry)):
                raise ValueError(f"{index_path}: entry {name!r} must be [library, ClassName], found {entry!r}")
            try:
                component_cls = _resolve_class(entry[1], f"{index_path}: component {name!r}")
            except ValueError:
                if name not in pipeline_cls._optional_components:
                    raise
                logger.warning("%s: optional component %r (%s) is not implemented by diffusekit; loading "
                               "the pipeline without it", index_path, name, entry[1])
                init_kwargs[name] = None
                continue
            component_dtype = torch_dtype
            if isinstance(torch_dtype, dict):
                component_dtype = torch_dtype.get(name, torch_dtype.get("default", torch.float32))
            init_kwargs[name], used_variant = _load_component(
                component_cls, source, name, hub, variant=variant, torch_dtype=component_dtype,
                use_safetensors=use_safetensors,
            )
            loaded_variants += used_variant
        if isinstance(torch_dtype, dict):
            strays = sorted(set(torch_dtype) - set(names) - {"default"})
            if strays:  # diffusers ignores them silently; a typo would leave a component in the wrong dtype
                logger.warning("%s: dtype dict names %s, which are not components of this pipeline (%s)",
                               pipeline_cls.__name__, strays, ", ".join(names))
        if variant is not None and not loaded_variants:
            raise ValueError(
                f"{source}: no component has weights of variant={variant!r} (files like "
                f"diffusion_pytorch_model.{variant}.safetensors); drop variant= to load the default weights"
            )
        for option in pipeline_cls._option_names:
            if option in kwargs:
                init_kwargs[option] = kwargs.pop(option)
            elif option in index:
                init_kwargs[option] = index[option]
        pipeline = pipeline_cls(**init_kwargs)
        pipeline.__dict__["_name_or_path"] = source  # as given, like diffusers' config._name_or_path
        return pipeline

    @classmethod
    def from_pipe(cls, pipeline: "DiffusionPipeline", *, torch_dtype: torch.dtype | None = None,
                  **kwargs: Any) -> "DiffusionPipeline":
        """A pipeline of this class built on ``pipeline``'s loaded components, shared, not copied (no extra memory):
        ``StableDiffusionImg2ImgPipeline.from_pipe(text2img_pipe)``.

        Keyword arguments replace components (``safety_checker=None``) or options (``requires_safety_checker=...``);
        components this class has but ``pipeline`` lacks come from the keywords, or are None when optional. On
        ``DiffusionPipeline`` itself the class is ``pipeline``'s own. ``torch_dtype`` casts the new pipeline's modules,
        which are the old pipeline's too.
        """
        target = type(pipeline) if cls is DiffusionPipeline else cls
        unknown = sorted(set(kwargs) - set(target.component_names) - set(target._option_names))
        if unknown:
            raise TypeError(
                f"{target.__name__}.from_pipe got unknown argument(s) {unknown}; components are "
                f"{list(target.component_names)}, options are {list(target._option_names)}"
            )
        available = pipeline.components
        init_kwargs: dict[str, Any] = {}
        for name in target.component_names:
            if name in kwargs:
                init_kwargs[name] = kwargs[name]
            elif name in available:
                init_kwargs[name] = available[name]
            elif name in target._optional_components:
                init_kwargs[name] = None
            else:
                raise ValueError(
                    f"{target.__name__} needs a {name!r} component, which {type(pipeline).__name__} does not have: "
                    f"pass {name}=... to from_pipe"
                )
        options = getattr(pipeline, "_options", {})
        for option in target._option_names:
            if option in kwargs:
                init_kwargs[option] = kwargs[option]
            elif option in options:
                init_kwargs[option] = options[option]
        new = target(**init_kwargs)
        if torch_dtype is not None:
            new.to(torch_dtype)
        return new

    @classmethod
    def _pipeline_class(cls, index: dict[str, Any], index_path: Path) -> type["DiffusionPipeline"]:
        if cls is not DiffusionPipeline:
            return cls
        name = index.get("_class_name")
        if not isinstance(name, str):
            raise ValueError(f"{index_path}: no '_class_name' naming the pipeline class")
        return _resolve_class(name, f"{index_path}: _class_name", kind="pipeline")

    # ------------------------------------------------------------------ saving

    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True,
                        variant: str | None = None, max_shard_size: int | str | None = None,
                        push_to_hub: bool = False, **kwargs: Any) -> None:
        """Write each component into its subfolder and ``model_index.json``, atomically as a whole.

        All files go to a staging folder first and are committed together (``diffusekit._io.atomic_checkpoint``): a
        save killed at any moment leaves the old pipeline or the new one, never a mix. Files that are not part of
        the checkpoint (a README, other variants' weights) are left alone.
        """
        if push_to_hub:
            raise NotImplementedError("push_to_hub is not supported: diffusekit never uploads; use `hf upload`")
        with atomic_checkpoint(save_directory) as checkpoint:
            stage = checkpoint.stage
            for name, component in self.components.items():
                if component is None:
                    continue
                if isinstance(component, ModelMixin):
                    component.save_pretrained(stage / name, safe_serialization=safe_serialization, variant=variant,
                                              max_shard_size=max_shard_size)
                elif hasattr(component, "save_pretrained"):
                    component.save_pretrained(stage / name)
                else:
                    raise TypeError(f"component {name!r} ({type(component).__name__}) cannot be saved")
            (stage / INDEX_NAME).write_text(self.to_json_string(), encoding="utf-8")

    def to_json_string(self) -> str:
        """``model_index.json`` as :meth:`save_pretrained` writes it."""
        index = {"_class_name": type(self).__name__, "_diffusers_version": DIFFUSERS_COMPAT_VERSION}
        index.update({k: (list(v) if isinstance(v, list) else v) for k, v in self.config.items()})
        return json.dumps(index, indent=2, sort_keys=True) + "\n"

    def to_json_file(self, json_file_path: str | os.PathLike) -> None:
        """Write :meth:`to_json_string` to ``json_file_path`` (atomically)."""
        atomic_write_text(Path(json_file_path), self.to_json_string())

    def save_config(self, save_directory: str | os.PathLike) -> None:
        """Write ``model_index.json`` alone into ``save_directory`` (atomically)."""
        Path(save_directory).mkdir(parents=True, exist_ok=True)
        self.to_json_file(Path(save_directory) / INDEX_NAME)

    # ------------------------------------------------------------------ memory

    def enable_attention_slicing(self, slice_size: str | int | None = "auto") -> None:
        """Compute attention in slices of (batch, head) pairs in every component that supports it (the conditional
        UNet): ``"auto"`` (half the heads), ``"max"`` (one pair at a time) or an int. Same images; less peak memory
        where the attention backend materialises the score matrix (see BENCHMARKS.md), somewhat slower."""
        self.set_attention_slice(slice_size)

    def disable_attention_slicing(self) -> None:
        """Compute attention in one step again (the default)."""
        self.enable_attention_slicing(None)

    def set_attention_slice(self, slice_size: str | int | None) -> None:
        for _, module in self._modules():
            if hasattr(module, "set_attention_slice"):
                module.set_attention_slice(slice_size)

    # ------------------------------------------------------------------ int8

    def quantize(self, prompts: Iterable[str] | None = None, *, num_inference_steps: int = 20,
                 guidance_scale: float = 7.5, height: int | None = None, width: int | None = None,
                 **kwargs: Any) -> "DiffusionPipeline":
        """Quantize the UNet to int8 weights and activations (CPU), calibrated by running this pipeline; returns self.

        Each of ``prompts`` (default: a built-in set of 8 varied prompts) runs through the whole schedule of
        ``num_inference_steps`` with ``guidance_scale`` at ``height`` x ``width`` (latent output, fixed seeds
        ``seed``, ``seed + 1``, ...), so the activation ranges cover every timestep and both halves of the CFG batch.
        Other keyword arguments: ``negative_prompt``, ``seed`` (0), ``modules_to_not_convert``, ``observer``
        (``"minmax"`` / ``"percentile"`` / ``"average"``), ``percentile``, ``components`` (``("unet",)``; add
        ``"vae"`` to also quantize the VAE decoder on the latents of the same runs), and anything the pipeline's
        ``__call__`` takes. The
        quantized UNet saves with ``save_pretrained`` and loads with ``from_pretrained`` without recalibrating.
        Eagerly it is simulated int8 (slower than float32); call ``optimize()`` for the int8 speed. Not in diffusers.
        See docs/QUANTIZATION.md.
        """
        from ..quantization.pipeline import quantize_pipeline

        return quantize_pipeline(self, prompts, num_inference_steps=num_inference_steps,
                                 guidance_scale=guidance_scale, height=height, width=width, **kwargs)

    # ------------------------------------------------------------------ speed

    # the components optimize() compiles, where the pipeline has them (the VAE: its decoder and encoder)
    _optimize_components: tuple[str, ...] = ("unet", "vae", "text_encoder", "text_encoder_2")

    def optimize(self, *, cache_dir: str | os.PathLike | None = None, use_cache: bool = True,
                 dynamic: bool | None = False, mode: str | None = None,
                 options: dict[str, Any] | None = None, release_weights: bool = True,
                 packages: bool | None = None, reuse_memory: bool = True) -> "DiffusionPipeline":
        """Compile the UNet, the VAE and the text encoder(s) for faster inference (``ModelMixin.optimize`` on
        each, with the same arguments): images within 1e-5 relative of eager fp32 (int8 components from
        ``quantize()``: their int8 kernels), compiled code cached on disk per
        machine (by default on the CPU: AOTInductor packages a later process loads in seconds; ``packages=False``:
        ``torch.compile``); returns ``self``. Each model compiles on its first call per input shape. Not in
        diffusers. See docs/PERFORMANCE.md."""
        for name in self._optimize_components:
            component = self.components.get(name)
            if component is not None and hasattr(component, "optimize"):
                component.optimize(cache_dir=cache_dir, use_cache=use_cache, dynamic=dynamic, mode=mode,
                                   options=options, release_weights=release_weights, packages=packages,
                                   reuse_memory=reuse_memory)
        return self

    # ------------------------------------------------------------------ per-call state

    def _fresh_scheduler(self):
        """A private copy of the scheduler for one call, so concurrent calls never share run state."""
        return copy.copy(self.scheduler)


def _library_and_class(component: Any) -> tuple[str | None, str | None]:
    if component is None:
        return (None, None)
    cls = type(component)
    # a transformers object passed in or loaded through transformers (e.g. depth2img's DPT) is saved as such
    default = "transformers" if cls.__module__.split(".")[0] == "transformers" else "diffusers"
    return (getattr(cls, "_library_name", default), cls.__name__)


def component_subfolder(component_cls: type, source, name: str, hub: dict[str, Any]) -> str | None:
    """Where a component's files are: its subfolder ``name``, or the root (``None``) when that subfolder is absent.

    As in diffusers: the early hub repos (``google/ddpm-cifar10-32`` …) keep ``config.json``, the weights and
    ``scheduler_config.json`` beside ``model_index.json``. For a hub repo, the component's config file is looked up
    in the subfolder first, then at the root.
    """
    folder = local_folder(source)
    if folder is not None:
        return name if (folder / name).is_dir() else None
    probe = getattr(component_cls, "config_name", None)
    if not isinstance(probe, str):
        return name
    try:
        resolve_file(source, probe, subfolder=name, **hub)
        return name
    except EntryNotFound as in_subfolder:
        try:
            resolve_file(source, probe, **hub)
        except EntryNotFound:
            raise in_subfolder from None
        return None


def _load_component(component_cls: type, source, name: str, hub: dict[str, Any], variant: str | None = None,
                    **model_options: Any) -> tuple[Any, bool]:
    """Load one component; return it and whether it was loaded from ``variant`` files.

    As in diffusers, a component without files of the requested variant (a text encoder without ``non_ema``
    weights, a scheduler) loads its default files.
    """
    subfolder = component_subfolder(component_cls, source, name, hub)
    if isinstance(component_cls, type) and issubclass(component_cls, ModelMixin):
        if variant is not None:
            try:
                return component_cls.from_pretrained(source, subfolder=subfolder, variant=variant, **model_options,
                                                     **hub), True
            except EntryNotFound:
                logger.info("%s: no %s weights for component %r, loading its default weights", source, variant, name)
        return component_cls.from_pretrained(source, subfolder=subfolder, **model_options, **hub), False
    loader = getattr(component_cls, "from_pretrained", None)
    if loader is None:
        raise TypeError(f"component {name!r}: {component_cls.__name__} has no from_pretrained")
    return loader(source, subfolder=subfolder, **hub), False

