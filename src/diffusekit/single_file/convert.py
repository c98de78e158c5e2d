"""``diffusekit convert SRC DST``: a single file <-> a diffusers folder (or file -> file: ``.ckpt`` to
``.safetensors``, EMA extraction, fp16).

The direction follows the paths: a ``.safetensors`` / ``.ckpt`` source is read with ``from_single_file``; anything
else is a diffusers folder (or Hub id in the cache) read with ``from_pretrained``. A destination ending in
``.safetensors`` / ``.ckpt`` is written with ``save_single_file``, anything else as a diffusers folder. Outputs are
written atomically: a folder is built beside its destination and renamed into place.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .._io import replace_folder
from .checkpoint import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, SingleFile
from . import infer

SINGLE_FILE_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES
#: the pipeline class a single file becomes, per family
PIPELINE_FOR_FAMILY = {"v1": "StableDiffusionPipeline", "v2": "StableDiffusionPipeline",
                       "inpainting": "StableDiffusionInpaintPipeline", "inpainting_v2": "StableDiffusionInpaintPipeline",
                       "xl_base": "StableDiffusionXLPipeline", "xl_refiner": "StableDiffusionXLImg2ImgPipeline",
                       "xl_inpaint": "StableDiffusionXLInpaintPipeline"}


def is_single_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in SINGLE_FILE_SUFFIXES


def load_any(source: str | os.PathLike, *, config=None, original_config=None, extract_ema: bool = False,
             torch_dtype: torch.dtype | None = None):
    """A pipeline from a single file (its family's class) or from a diffusers folder / Hub id."""
    import diffusekit

    if is_single_file(source):
        ckpt = SingleFile(source)
        family = infer.detect_family(ckpt.shapes, ckpt.extras)
        infer.family_defaults(family)  # refuses what is not supported, with a clear message
        cls = getattr(diffusekit, PIPELINE_FOR_FAMILY[family])
        # a converted checkpoint has no safety checker: the folder should load without the warning about it
        options = {"requires_safety_checker": False} if "requires_safety_checker" in cls._option_names else {}
        return cls.from_single_file(ckpt, config=config, original_config=original_config, extract_ema=extract_ema,
                                    torch_dtype=torch_dtype, **options)
    if config is not None or original_config is not None or extract_ema:
        raise ValueError(f"{source} is a diffusers folder: --config, --original-config and --extract-ema apply to "
                         "single-file sources only")
    return diffusekit.DiffusionPipeline.from_pretrained(source, torch_dtype=torch_dtype)


def convert(source: str | os.PathLike, destination: str | os.PathLike, *, config=None, original_config=None,
            extract_ema: bool = False, half: bool = False, overwrite: bool = False) -> Path:
    """Convert ``source`` to ``destination`` (see the module docstring); returns the destination path."""
    destination = Path(destination)
    if destination.exists() and not overwrite:
        raise FileExistsError(f"{destination} exists: pass --overwrite (overwrite=True) to replace it")
    if Path(source).resolve() == destination.resolve():
        raise ValueError(f"source and destination are the same path: {destination}")
    dtype = torch.float16 if half else None
    pipe = load_any(source, config=config, original_config=original_config, extract_ema=extract_ema,
                    torch_dtype=dtype)
    if is_single_file(destination):
        if not hasattr(pipe, "save_single_file"):
            raise ValueError(f"{type(pipe).__name__} has no single-file layout")
        if destination.is_dir():
            raise IsADirectoryError(f"{destination} is a folder, not a file to write")
        return pipe.save_single_file(destination, torch_dtype=dtype)
    return replace_folder(pipe.save_pretrained, destination)
