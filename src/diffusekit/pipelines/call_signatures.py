"""The ``__call__`` signatures of the Stable Diffusion pipelines, as data.

Each pipeline's public signature is diffusers' (same names, order, defaults), but the parameters mean the same thing
everywhere, so they are described once here: :data:`PARAMETERS` gives each name its annotation and usual default,
and a pipeline lists its own order (and the defaults it changes)::

    @call_signature("prompt image strength=0.8 num_inference_steps ...")
    def __call__(self, call): ...      # call.prompt, call.image, call.strength, ...

The decorated ``__call__`` has the full signature (``inspect.signature``, ``help()``, positional arguments and
unknown-keyword errors work as for a hand-written one); its body gets the bound arguments, defaults applied, as
attributes of one :class:`Call` object, which the pieces (:mod:`.pieces`) read too.
"""

from __future__ import annotations

import ast
import functools
import inspect
import types
from typing import Any, Callable, Sequence

import torch

from ..random import Generator

Prompt = str | list[str] | None
Tensor = torch.Tensor | None
Size = tuple[int, int] | None
Callback = Callable[..., dict[str, Any]] | None

#: name -> (annotation, default) of every parameter a Stable Diffusion pipeline call takes
PARAMETERS: dict[str, tuple[Any, Any]] = {
    "prompt": (Prompt, None),
    "prompt_2": (Prompt, None),
    "image": (Any, None),
    "mask_image": (Any, None),
    "masked_image_latents": (Tensor, None),
    "depth_map": (Any, None),
    "height": (int | None, None),
    "width": (int | None, None),
    "padding_mask_crop": (int | None, None),
    "strength": (float, 0.8),
    "num_inference_steps": (int, 50),
    "timesteps": (list[int] | None, None),
    "sigmas": (list[float] | None, None),
    "denoising_start": (float | None, None),
    "denoising_end": (float | None, None),
    "guidance_scale": (float, 7.5),
    "negative_prompt": (Prompt, None),
    "negative_prompt_2": (Prompt, None),
    "num_images_per_prompt": (int, 1),
    "eta": (float, 0.0),
    "generator": (Generator, None),
    "latents": (Tensor, None),
    "prompt_embeds": (Tensor, None),
    "negative_prompt_embeds": (Tensor, None),
    "pooled_prompt_embeds": (Tensor, None),
    "negative_pooled_prompt_embeds": (Tensor, None),
    "ip_adapter_image": (Any, None),
    "ip_adapter_image_embeds": (Any, None),
    "output_type": (str | None, "pil"),
    "return_dict": (bool, True),
    "cross_attention_kwargs": (dict[str, Any] | None, None),
    "guidance_rescale": (float, 0.0),
    "original_size": (Size, None),
    "crops_coords_top_left": (tuple[int, int], (0, 0)),
    "target_size": (Size, None),
    "negative_original_size": (Size, None),
    "negative_crops_coords_top_left": (tuple[int, int], (0, 0)),
    "negative_target_size": (Size, None),
    "aesthetic_score": (float, 6.0),
    "negative_aesthetic_score": (float, 2.5),
    "clip_skip": (int | None, None),
    "callback_on_step_end": (Callback, None),
    "callback_on_step_end_tensor_inputs": (Sequence[str], ("latents",)),
    # ours, not diffusers' (after diffusers' parameters, so positional calls mean the same)
    "guidance_interval": (tuple[float, float] | None, None),
    "deep_cache": (Any, None),
}

# runs of parameters that several signatures share, in diffusers' order (for f-strings in the specs)
SAMPLING = "num_images_per_prompt eta generator"
OUTPUT = "output_type return_dict cross_attention_kwargs"
CALLBACKS = "clip_skip callback_on_step_end callback_on_step_end_tensor_inputs"
#: diffusekit's own parameters, last in every Stable Diffusion signature (docs/PIPELINES.md)
OURS = "guidance_interval deep_cache"
XL_EMBEDS = "prompt_embeds negative_prompt_embeds pooled_prompt_embeds negative_pooled_prompt_embeds " \
            "ip_adapter_image ip_adapter_image_embeds"
XL_SIZES = "original_size crops_coords_top_left target_size negative_original_size negative_crops_coords_top_left " \
           "negative_target_size"


class Call(types.SimpleNamespace):
    """The arguments of one pipeline call, by name (defaults applied)."""

    def get(self, name: str, default: Any = None) -> Any:
        return getattr(self, name, default)


def _parse(spec: str) -> list[inspect.Parameter]:
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    for item in spec.split():
        name, _, default = item.partition("=")
        annotation, usual = PARAMETERS[name]
        value = ast.literal_eval(default) if default else usual
        params.append(inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=value,
                                        annotation=annotation))
    return params


def call_signature(spec: str) -> Callable[[Callable[[Any, Call], Any]], Callable[..., Any]]:
    """Give ``__call__(self, call)`` the public signature ``spec`` (names in order, ``name=default`` to change a
    default); the decorated method binds its arguments as Python would and passes them as one :class:`Call`."""
    signature = inspect.Signature(_parse(spec))

    def decorate(body: Callable[[Any, Call], Any]) -> Callable[..., Any]:
        @functools.wraps(body)
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            try:
                bound = signature.bind(self, *args, **kwargs)
            except TypeError as err:
                raise TypeError(f"{type(self).__name__}.__call__: {err}") from None
            bound.apply_defaults()
            values = dict(bound.arguments)
            del values["self"]
            return body(self, Call(**values))

        __call__.__signature__ = signature
        del __call__.__wrapped__  # inspect.signature must read __signature__, not the body's (self, call)
        return __call__

    return decorate
