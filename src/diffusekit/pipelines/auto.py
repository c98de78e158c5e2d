"""Task-level pipeline classes: the right pipeline class of a model family for a task.

``AutoPipelineForText2Image.from_pretrained(path)`` reads ``_class_name`` in ``model_index.json``, finds the
model family it belongs to (Stable Diffusion, Stable Diffusion XL: text-to-image, image-to-image and inpainting
pipelines) and loads that
family's text-to-image pipeline from the folder. ``AutoPipelineForInpainting.from_pipe(pipe)`` builds the family's
inpainting pipeline on ``pipe``'s loaded components, sharing them (see :meth:`DiffusionPipeline.from_pipe`).
As in diffusers, a checkpoint keeps its own UNet: an inpainting checkpoint's 9-channel UNet does not become a
text-to-image one.
"""

from __future__ import annotations

import os
from typing import Any

from ..configuration import read_json
from ..hub import resolve_file, split_hub_kwargs
from .base import INDEX_NAME, DiffusionPipeline, _resolve_class

TEXT2IMAGE, IMAGE2IMAGE, INPAINTING = "text-to-image", "image-to-image", "inpainting"

#: model family -> task -> pipeline class name (diffusers' AUTO_*_PIPELINES_MAPPING, for the families we have)
FAMILIES: dict[str, dict[str, str]] = {
    "stable-diffusion": {
        TEXT2IMAGE: "StableDiffusionPipeline",
        IMAGE2IMAGE: "StableDiffusionImg2ImgPipeline",
        INPAINTING: "StableDiffusionInpaintPipeline",
    },
    "stable-diffusion-xl": {
        TEXT2IMAGE: "StableDiffusionXLPipeline",
        IMAGE2IMAGE: "StableDiffusionXLImg2ImgPipeline",
        INPAINTING: "StableDiffusionXLInpaintPipeline",
    },
}


def task_class(task: str, pipeline_class_name: str) -> type[DiffusionPipeline]:
    """The pipeline class for ``task`` in the family of ``pipeline_class_name``."""
    for tasks in FAMILIES.values():
        if pipeline_class_name in tasks.values():
            return _resolve_class(tasks[task], f"{task} pipeline of {pipeline_class_name}", kind="pipeline")
    known = sorted(name for tasks in FAMILIES.values() for name in tasks.values())
    raise ValueError(f"no {task} pipeline is linked to {pipeline_class_name!r}; auto pipelines know {known}")


class _AutoPipeline:
    task: str = ""

    def __init__(self, *args: Any, **kwargs: Any):
        raise TypeError(f"{type(self).__name__} is not instantiated: use {type(self).__name__}.from_pretrained(path) "
                        f"or {type(self).__name__}.from_pipe(pipeline)")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> DiffusionPipeline:
        """Load the folder / repo as the ``task`` pipeline of its family; keyword arguments as in
        :meth:`DiffusionPipeline.from_pretrained`."""
        hub = split_hub_kwargs(dict(kwargs))  # a copy: the pipeline's own from_pretrained needs them too
        index_path = resolve_file(pretrained_model_name_or_path, INDEX_NAME, **hub)
        name = read_json(index_path, what="pipeline index").get("_class_name")
        if not isinstance(name, str):
            raise ValueError(f"{index_path}: no '_class_name' naming the pipeline class")
        return task_class(cls.task, name).from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_pipe(cls, pipeline: DiffusionPipeline, **kwargs: Any) -> DiffusionPipeline:
        """The ``task`` pipeline of ``pipeline``'s family on its components (shared, not copied)."""
        return task_class(cls.task, type(pipeline).__name__).from_pipe(pipeline, **kwargs)


class AutoPipelineForText2Image(_AutoPipeline):
    """``from_pretrained`` / ``from_pipe`` -> the family's text-to-image pipeline (``StableDiffusionPipeline``)."""

    task = TEXT2IMAGE


class AutoPipelineForImage2Image(_AutoPipeline):
    """``from_pretrained`` / ``from_pipe`` -> the family's image-to-image pipeline
    (``StableDiffusionImg2ImgPipeline``)."""

    task = IMAGE2IMAGE


class AutoPipelineForInpainting(_AutoPipeline):
    """``from_pretrained`` / ``from_pipe`` -> the family's inpainting pipeline (``StableDiffusionInpaintPipeline``)."""

    task = INPAINTING
