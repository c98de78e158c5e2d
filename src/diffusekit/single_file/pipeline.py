"""``StableDiffusionPipeline.from_single_file(path)`` (and img2img / inpaint) and ``pipe.save_single_file(path)``.

The file holds the UNet, usually the VAE and the text encoder; never the tokenizer or the scheduler. Those come
from ``config=`` (a diffusers folder or Hub id in the cache, as in diffusers), or else from the model family's
defaults (``keymaps.FAMILIES``) and the CLIP vocabulary that ships with diffusekit.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from ..configuration import read_json
from ..hub import resolve_file, split_hub_kwargs
from . import infer, keymaps
from .checkpoint import SingleFile, write_single_file
from .infer import SingleFileError
from .loading import CLIP_VOCAB_FOLDER, FromOriginalModelMixin, component_state_dict, load_component, locate

logger = logging.getLogger(__name__)

#: the components a single file holds, and the class each is read with when ``config=`` does not name one
FILE_COMPONENTS = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel",
                   "text_encoder_2": "CLIPTextModelWithProjection"}
#: the tokenizer of each text encoder slot
TOKENIZER_OF = {"tokenizer": "text_encoder", "tokenizer_2": "text_encoder_2"}
#: diffusers' deprecated ``scheduler_type=`` names
LEGACY_SCHEDULER_TYPES = {
    "pndm": "PNDMScheduler", "lms": "LMSDiscreteScheduler", "heun": "HeunDiscreteScheduler",
    "euler": "EulerDiscreteScheduler", "euler-ancestral": "EulerAncestralDiscreteScheduler",
    "dpm": "DPMSolverMultistepScheduler", "ddim": "DDIMScheduler",
}
_LEGACY_PIPELINE_KWARGS = ("low_cpu_mem_usage", "device_map", "disable_mmap", "proxies", "resume_download")


def _class(name: str):
    import diffusekit

    try:
        return getattr(diffusekit, name)
    except AttributeError:
        raise ValueError(f"class {name!r} is not implemented by diffusekit") from None


def _default_tokenizer(text_encoder, family: str, ckpt: SingleFile, slot: str = "tokenizer"):
    from ..models.clip_tokenizer import CLIPTokenizer

    if text_encoder is None:
        return None
    vocab = text_encoder.config.vocab_size
    if vocab != keymaps.CLIP_VOCAB_SIZE:
        raise SingleFileError(
            f"{ckpt.name}: its text encoder has a {vocab}-token vocabulary, not CLIP's {keymaps.CLIP_VOCAB_SIZE}, and "
            f"a single file holds no tokenizer: pass {slot}=CLIPTokenizer.from_pretrained(...) or config= (a "
            "diffusers folder of this model)"
        )
    return CLIPTokenizer.from_pretrained(
        CLIP_VOCAB_FOLDER, model_max_length=text_encoder.config.max_position_embeddings,
        pad_token=infer.family_defaults(family)["pad_token"][slot],
    )


class FromSingleFileMixin:
    """Adds ``from_single_file`` and ``save_single_file`` to a Stable Diffusion pipeline class."""

    @classmethod
    def from_single_file(cls, pretrained_model_link_or_path, *, config=None, original_config=None,
                         torch_dtype: torch.dtype | None = None, extract_ema: bool = False, **kwargs):
        """Build the pipeline from one ``.safetensors`` / ``.ckpt`` file in the original layout.

        ``config``: a diffusers folder (or Hub id in the cache) of the same architecture: every component's config,
        the tokenizer and the scheduler come from it (as in diffusers, which needs it offline). Without it the
        architecture is inferred from the file (docs/SINGLE_FILE.md), the tokenizer is CLIP's (shipped with
        diffusekit) and the scheduler is the model family's reference one. ``original_config``: the original
        ``.yaml`` (``v1-inference.yaml``, ``v2-inference-v.yaml``) instead. Keyword arguments pass components
        (``vae=``, ``scheduler=``, ``safety_checker=`` ...; a component passed is not read from the file), options
        (``requires_safety_checker``), or UNet / VAE config overrides (``upcast_attention=True``). diffusers'
        deprecated ``prediction_type=`` and ``scheduler_type=`` still set the scheduler.
        """
        hub = split_hub_kwargs(kwargs)
        for legacy in _LEGACY_PIPELINE_KWARGS:
            kwargs.pop(legacy, None)
        if "original_config_file" in kwargs:
            original_config = kwargs.pop("original_config_file")
        if kwargs.pop("load_safety_checker", None):
            raise NotImplementedError(
                "load_safety_checker=True (deprecated in diffusers) would download a model: pass "
                "safety_checker=StableDiffusionSafetyChecker.from_pretrained(...) and feature_extractor=... instead"
            )
        if torch_dtype is not None and not isinstance(torch_dtype, torch.dtype):
            raise TypeError(f"torch_dtype must be a torch.dtype such as torch.float16, got {torch_dtype!r}")
        prediction_type = kwargs.pop("prediction_type", None)
        scheduler_type = kwargs.pop("scheduler_type", None)
        if scheduler_type is not None and scheduler_type not in LEGACY_SCHEDULER_TYPES:
            raise ValueError(f"scheduler_type={scheduler_type!r}: expected one of {sorted(LEGACY_SCHEDULER_TYPES)}")
        passed = {name: kwargs.pop(name) for name in cls.component_names if name in kwargs}
        options = {name: kwargs.pop(name) for name in cls._option_names if name in kwargs}
        overrides = _split_overrides(kwargs, cls)

        ckpt = pretrained_model_link_or_path if isinstance(pretrained_model_link_or_path, SingleFile) else \
            SingleFile(pretrained_model_link_or_path, **hub)
        family = infer.detect_family(ckpt.shapes, ckpt.extras)
        defaults = infer.family_defaults(family)
        xl_class = "text_encoder_2" in cls.component_names
        if defaults["xl"] != xl_class:
            wanted = "StableDiffusionXL" if defaults["xl"] else "StableDiffusion"
            raise SingleFileError(
                f"{ckpt.name} is {'an SDXL' if defaults['xl'] else 'an SD 1.x/2.x'} checkpoint ({family}): load it "
                f"with {wanted}Pipeline / {wanted}Img2ImgPipeline / {wanted}InpaintPipeline.from_single_file, not "
                f"{cls.__name__}"
            )
        if "unet" not in passed:
            locate("unet", ckpt)  # a file without a UNet (a LoRA, a VAE ...) is named as such first
        index: dict[str, Any] = {}
        if config is not None:
            index = read_json(resolve_file(config, "model_index.json", **hub), what="pipeline index")

        components: dict[str, Any] = {}
        for name in cls.component_names:
            if name in passed:
                components[name] = passed[name]
            elif name in FILE_COMPONENTS:
                class_name = _index_class(index, name) or FILE_COMPONENTS[name]
                model_cls = _class(class_name)
                if not (isinstance(model_cls, type) and issubclass(model_cls, FromOriginalModelMixin)):
                    raise ValueError(f"{class_name} ({name}) cannot be read from a single file: pass {name}=...")
                if config is not None and index and _index_class(index, name) is None \
                        and name in cls._optional_components:
                    components[name] = None  # the config's pipeline has none (an SDXL refiner's text_encoder)
                    continue
                if name.startswith("text_encoder") and name in cls._optional_components and \
                        infer.text_encoder_layout(ckpt.shapes, name) is None:
                    components[name] = None  # the file has none and the pipeline can do without
                    continue
                components[name] = load_component(
                    model_cls, model_cls._single_file_kind, ckpt, config=config, subfolder=name if config else None,
                    original_config=original_config, torch_dtype=torch_dtype,
                    extract_ema=extract_ema and name == "unet", overrides=overrides.get(name), hub=hub,
                    slot=name if name.startswith("text_encoder") else None,
                )
            elif name in TOKENIZER_OF:
                if config is not None:
                    class_name = _index_class(index, name)
                    components[name] = _class(class_name).from_pretrained(config, subfolder=name, **hub) \
                        if class_name else None
                else:
                    components[name] = _default_tokenizer(components.get(TOKENIZER_OF[name]), family, ckpt, name)
            elif name == "scheduler":
                components[name] = _scheduler(config, index, original_config, family, ckpt, hub)
            elif name in cls._optional_components:
                components[name] = None  # as diffusers: the safety checker is never read from a single file
            else:
                raise ValueError(f"{cls.__name__}.from_single_file: pass {name}=..., a single file does not hold it")
        if scheduler_type is not None or prediction_type is not None:
            scheduler = components["scheduler"]
            target = _class(LEGACY_SCHEDULER_TYPES[scheduler_type]) if scheduler_type else type(scheduler)
            extra = {"prediction_type": prediction_type} if prediction_type else {}
            components["scheduler"] = target.from_config(scheduler.config, **extra)
        for option in cls._option_names:
            if option in options:
                components[option] = options[option]
            elif option in index:
                components[option] = index[option]
            elif config is None and option in defaults["options"]:
                components[option] = defaults["options"][option]
        return cls(**components)

    def save_single_file(self, path: str | os.PathLike, *, torch_dtype: torch.dtype | None = None) -> Path:
        """Write the UNet, VAE and text encoder to one file in the original layout (``.safetensors``, or a
        weights-only ``.ckpt``), atomically. The tokenizer, scheduler and safety checker are not part of the format
        (an SD 2.x file does not record v-prediction either: loading assumes it, as diffusers does)."""
        tensors: dict[str, torch.Tensor] = {}
        xl = "text_encoder_2" in self.component_names
        for name in FILE_COMPONENTS:
            model = getattr(self, name, None)
            if model is None:
                continue
            if not isinstance(model, FromOriginalModelMixin):
                raise TypeError(f"{name} ({type(model).__name__}) has no single-file layout")
            prefix = None
            if xl and name.startswith("text_encoder"):
                prefix = keymaps.XL_TEXT_SAVE_PREFIXES[name]
                if name == "text_encoder_2" and getattr(self, "text_encoder", None) is None:
                    prefix = keymaps.XL_REFINER_TEXT_SAVE_PREFIX  # the refiner's only text encoder
            tensors.update(component_state_dict(model, model._single_file_kind, prefix, torch_dtype))
        return write_single_file(path, tensors)


def _index_class(index: dict, name: str) -> str | None:
    entry = index.get(name)
    return entry[1] if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str) else None


def _split_overrides(kwargs: dict, pipeline_cls) -> dict[str, dict]:
    """Leftover keyword arguments are config overrides of every file component whose class takes them (as in
    diffusers: ``norm_num_groups=`` reaches the UNet and the VAE)."""
    out: dict[str, dict] = {}
    for key in list(kwargs):
        takers = [name for name, class_name in FILE_COMPONENTS.items() if key in _class(class_name)._config_params()]
        for name in takers:
            out.setdefault(name, {})[key] = kwargs[key]
        if takers:
            del kwargs[key]
    if kwargs:
        raise TypeError(
            f"{pipeline_cls.__name__}.from_single_file got unknown argument(s) {sorted(kwargs)}; components are "
            f"{list(pipeline_cls.component_names)}, options are {list(pipeline_cls._option_names)}"
        )
    return out


def _scheduler(config, index, original_config, family, ckpt, hub):
    if config is not None:
        name = _index_class(index, "scheduler")
        if name is None:
            raise ValueError(f"{config}: model_index.json names no scheduler; pass scheduler=...")
        return _class(name).from_pretrained(config, subfolder="scheduler", **hub)
    if original_config is not None:
        name, settings = infer.scheduler_spec_from_original(infer.read_original_config(original_config), family)
    else:
        name, settings = infer.scheduler_spec(family, ckpt.extras)
    return _class(name).from_config(settings)
