"""Stable Diffusion XL text-to-image: two CLIP text encoders (ViT-L and OpenCLIP bigG), size / crop conditioning.

The pieces SDXL adds to those of :mod:`.pieces` (see docs/PIPELINES.md):

- **prompt encoding** (:class:`XLPromptEncodingMixin`): each encoder's penultimate hidden states, concatenated along
  the width (768 + 1280 = 2048), and the pooled, projected output of the encoder that has a projection (bigG);
  ``prompt_2`` / ``negative_prompt_2`` go to the second encoder (default: the first prompts). The refiner has only
  the second encoder, which then gets ``prompt``. An empty negative prompt is all zeros when the pipeline's
  ``force_zeros_for_empty_prompt`` says so (the base: yes). Textual inversion as diffusers' (one call per encoder),
  plus A1111 / kohya SDXL files in one call; ``pipe.prompt_syntax = "a1111"`` reads A1111's prompt syntax on both
  encoders (:func:`diffusekit.prompts.encode_prompt_a1111_xl`, docs/LORA_AND_PROMPTS.md).
- **conditioning extras**: ``add_text_embeds`` (the pooled embeddings) and ``add_time_ids`` (original size, crop
  top-left and target size, or, for the refiner, an aesthetic score instead of the target size), given to the UNet
  as ``added_cond_kwargs``; negative size conditioning for the unconditional branch.
- **schedule cut-offs**: ``denoising_end`` stops the base early and ``denoising_start`` (img2img / inpaint) starts
  the refiner where it stopped: diffusers' ensemble-of-experts hand-over of latents (``output_type="latent"``).
- **decoding**: SDXL's VAE (``scaling_factor`` 0.13025) says ``force_upcast``: a float16 VAE decodes in float32.

Differences from diffusers, on purpose:
- No invisible watermark: ``add_watermarker=True`` is refused (diffusers adds one only when the
  ``invisible-watermark`` package is installed; images are then not reproducible across installs).
- The fp16 VAE upcast runs on a float32 copy of the VAE for the call; the pipeline's VAE keeps its dtype throughout
  (diffusers casts the shared VAE to float32 and back, which another thread could observe).
- IP-Adapter (``ip_adapter_image`` / ``ip_adapter_image_embeds``, ``image_encoder``) is not implemented: refused.
- Negative size conditioning with several images: each unconditional row gets the negative time ids (diffusers
  tiles ``[negative, positive]`` over the batch, so with a batch above one and negative sizes that differ from the
  positive ones, rows get mixed up). With one image, or equal sizes, the numbers are the same.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import numbers
from typing import Any, Sequence

import torch

from ..loaders.lora import StableDiffusionXLLoraLoaderMixin
from ..loaders.textual_inversion import TextualInversionLoaderMixin
from ..outputs import BaseOutput
from .base import DiffusionPipeline
from ..single_file.pipeline import FromSingleFileMixin
from .call_signatures import CALLBACKS, OURS, OUTPUT, SAMPLING, XL_EMBEDS, XL_SIZES, call_signature
from .checks import checked_image_size
from .image_processor import postprocess
from .pieces import LatentDiffusionMixin, check_denoising_fractions, custom_schedule, cut_at_denoising_end, \
    warn_truncation

logger = logging.getLogger(__name__)

Size = tuple[int, int]
#: the UNet's ``added_cond_kwargs`` names -> the loop's tensors
ADDED_COND = {"text_embeds": "add_text_embeds", "time_ids": "add_time_ids"}


@dataclasses.dataclass
class StableDiffusionXLPipelineOutput(BaseOutput):
    """``images``: a list of PIL images, a numpy array (B, H, W, C), a tensor, or latents, per ``output_type``."""

    images: Any


def _as_list(prompt: str | Sequence[str] | None, batch: int) -> list[str] | None:
    if prompt is None:
        return None
    return [prompt] * batch if isinstance(prompt, str) else list(prompt)


class XLPromptEncodingMixin:
    """SDXL prompt encoding and size conditioning (needs ``tokenizer`` / ``text_encoder`` (may be None),
    ``tokenizer_2`` / ``text_encoder_2``, ``unet``, and the ``force_zeros_for_empty_prompt`` option)."""

    #: "plain": prompts read as diffusers reads them; "a1111": A1111's emphasis, BREAK and long-prompt rules on both
    #: text encoders, pooled embeddings as A1111 makes them (:func:`diffusekit.prompts.encode_prompt_a1111_xl`)
    prompt_syntax: str = "plain"

    def _encoders(self) -> list[tuple[Any, Any]]:
        pairs = [(self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)]
        return [(tok, enc) for tok, enc in pairs if tok is not None and enc is not None]

    def _encode_xl(self, prompts: list[list[str]], max_length: int | None,
                   clip_skip: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One prompt list per encoder -> (hidden states cat along the width (B, L, D1 + D2), pooled (B, P))."""
        states, pooled = [], None
        for texts, (tokenizer, encoder) in zip(prompts, self._encoders()):
            convert = getattr(self, "maybe_convert_prompt", None)  # multi-vector textual-inversion tokens
            texts = convert(list(texts), tokenizer) if convert is not None else texts
            if max_length is None:
                warn_truncation(tokenizer, texts)
            ids = tokenizer(texts, padding="max_length", max_length=max_length or tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids.to(encoder.device)
            out = encoder(ids, output_hidden_states=True)
            if pooled is None and getattr(out, "text_embeds", None) is not None:
                pooled = out.text_embeds  # (B, P): the projected pool of the encoder that has a projection
            states.append(out.hidden_states[-(2 if clip_skip is None else clip_skip + 2)])  # (B, L, D_i)
        return torch.cat(states, dim=-1), pooled

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        prompt_2: str | list[str] | None = None,
        device: torch.device | None = None,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        lora_scale: float | None = None,
        clip_skip: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """``(prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds)``, each
        repeated ``num_images_per_prompt`` times (negatives None without guidance). ``lora_scale`` scales the text
        encoders' LoRA layers (default: during a pipeline call, that call's ``cross_attention_kwargs["scale"]``).
        With ``pipe.prompt_syntax = "a1111"`` the prompts are read with A1111's syntax
        (:func:`diffusekit.prompts.encode_prompt_a1111_xl`) unless embeddings are given."""
        if self.prompt_syntax not in ("plain", "a1111"):
            raise ValueError(f"prompt_syntax must be 'plain' or 'a1111', got {self.prompt_syntax!r}")
        scaled = getattr(self, "_text_encoder_lora_scale", None)
        with scaled(lora_scale) if scaled is not None else contextlib.nullcontext():
            if self.prompt_syntax == "a1111" and prompt_embeds is None and negative_prompt_embeds is None:
                from ..prompts import encode_prompt_a1111_xl

                return encode_prompt_a1111_xl(
                    self, prompt, negative_prompt, prompt_2=prompt_2, negative_prompt_2=negative_prompt_2,
                    num_images_per_prompt=num_images_per_prompt,
                    do_classifier_free_guidance=do_classifier_free_guidance, clip_skip=clip_skip, device=device)
            return self._encode_prompt_xl(prompt, prompt_2, device, num_images_per_prompt, do_classifier_free_guidance,
                                          negative_prompt, negative_prompt_2, prompt_embeds, negative_prompt_embeds,
                                          pooled_prompt_embeds, negative_pooled_prompt_embeds, clip_skip)

    def _encode_prompt_xl(self, prompt, prompt_2, device, num_images_per_prompt, do_classifier_free_guidance,
                          negative_prompt, negative_prompt_2, prompt_embeds, negative_prompt_embeds,
                          pooled_prompt_embeds, negative_pooled_prompt_embeds, clip_skip):
        device = device or self.device
        if prompt_embeds is None:
            prompts = _as_list(prompt, 1)
            prompt_embeds, pooled = self._encode_xl([prompts, _as_list(prompt_2, len(prompts)) or prompts], None,
                                                    clip_skip)
            pooled_prompt_embeds = pooled if pooled_prompt_embeds is None else pooled_prompt_embeds
        batch = prompt_embeds.shape[0]
        zeros = negative_prompt is None and self._options.get("force_zeros_for_empty_prompt", False)
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            if zeros:
                negative_prompt_embeds = torch.zeros_like(prompt_embeds)
                negative_pooled_prompt_embeds = torch.zeros_like(pooled_prompt_embeds)
            else:
                negatives = _as_list(negative_prompt or "", batch)
                negatives_2 = _as_list(negative_prompt_2 or negative_prompt or "", batch)
                for name, values in (("negative_prompt", negatives), ("negative_prompt_2", negatives_2)):
                    if len(values) != batch:
                        raise ValueError(f"{name} has {len(values)} entries but prompt has {batch}: give one per "
                                         "prompt")
                negative_prompt_embeds, negative_pooled = self._encode_xl([negatives, negatives_2],
                                                                          prompt_embeds.shape[1], None)
                if negative_pooled_prompt_embeds is None:
                    negative_pooled_prompt_embeds = negative_pooled
        encoder = self.text_encoder_2
        dtype = encoder.dtype if encoder is not None else self.unet.dtype

        def repeat(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.to(dtype=dtype, device=device).repeat_interleave(num_images_per_prompt, 0)

        if not do_classifier_free_guidance:
            return repeat(prompt_embeds), None, repeat(pooled_prompt_embeds), None
        return (repeat(prompt_embeds), repeat(negative_prompt_embeds), repeat(pooled_prompt_embeds),
                repeat(negative_pooled_prompt_embeds))

    # ------------------------------------------------------------------ size conditioning

    def _projection_dim(self, pooled: torch.Tensor) -> int:
        encoder = self.text_encoder_2
        return int(pooled.shape[-1]) if encoder is None else encoder.config.projection_dim

    def time_ids(self, ids: Sequence[float], pooled: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(1, K) time ids, checked against the UNet's ``add_embedding`` input width."""
        config = self.unet.config
        if config.addition_embed_type != "text_time":
            raise ValueError(f"{type(self).__name__} needs an SDXL UNet (addition_embed_type='text_time'), got "
                             f"addition_embed_type={config.addition_embed_type!r}")
        passed = config.addition_time_embed_dim * len(ids) + self._projection_dim(pooled)
        expected = config.projection_class_embeddings_input_dim
        if passed != expected:
            refiner = "requires_aesthetics_score"
            raise ValueError(
                f"the UNet expects {expected} added-embedding features but {len(ids)} time ids and the pooled text "
                f"make {passed}: the UNet and text_encoder_2 do not match, or {refiner!r} is set wrongly for this "
                f"UNet (True for the refiner: 5 time ids with the aesthetic score; False for the base: 6)"
            )
        return torch.tensor([list(ids)], dtype=dtype)

    def size_conditioning(self, pooled: torch.Tensor, negative_pooled: torch.Tensor | None,
                          ids: Sequence[float], negative_ids: Sequence[float], batch: int,
                          device: torch.device) -> dict[str, torch.Tensor]:
        """``add_text_embeds`` / ``add_time_ids`` for the loop (``cat([negative, positive])`` under guidance)."""
        add_time_ids = self.time_ids(ids, pooled, pooled.dtype).repeat(batch, 1)  # (B, K)
        if self.do_classifier_free_guidance:
            pooled = torch.cat([negative_pooled, pooled])
            add_time_ids = torch.cat([self.time_ids(negative_ids, pooled, pooled.dtype).repeat(batch, 1), add_time_ids])
        return {"add_text_embeds": pooled.to(device), "add_time_ids": add_time_ids.to(device)}

    def check_call(self, call) -> None:
        """SDXL's argument checks (``call``: the call's arguments by name)."""
        if call.get("ip_adapter_image") is not None or call.get("ip_adapter_image_embeds") is not None:
            raise NotImplementedError("IP-Adapter (ip_adapter_image / ip_adapter_image_embeds) is not implemented "
                                      "by diffusekit")
        height, width = call.get("height"), call.get("width")
        if height is not None and (height % 8 or width % 8):
            raise ValueError(f"height and width must be multiples of 8, got {height}x{width}")
        prompt_embeds, negative_prompt_embeds = call.prompt_embeds, call.negative_prompt_embeds
        if (call.prompt is None) == (prompt_embeds is None):
            raise ValueError("pass exactly one of prompt and prompt_embeds")
        for name in ("prompt", "prompt_2", "negative_prompt", "negative_prompt_2"):
            value = call.get(name)
            if value is not None and not (isinstance(value, str) or (isinstance(value, (list, tuple)) and value and
                                                                     all(isinstance(p, str) for p in value))):
                raise TypeError(f"{name} must be a str or a non-empty list of str, got {value!r}")
        if call.prompt_2 is not None and prompt_embeds is not None:
            raise ValueError("pass at most one of prompt_2 and prompt_embeds")
        if prompt_embeds is not None and call.pooled_prompt_embeds is None:
            raise ValueError("prompt_embeds needs pooled_prompt_embeds too (both come from encode_prompt)")
        if negative_prompt_embeds is not None and call.negative_pooled_prompt_embeds is None:
            raise ValueError("negative_prompt_embeds needs negative_pooled_prompt_embeds too (both come from "
                             "encode_prompt)")
        if negative_prompt_embeds is not None and (call.negative_prompt, call.negative_prompt_2) != (None, None):
            raise ValueError("pass either negative_prompt(_2) or negative_prompt_embeds, not both")
        if prompt_embeds is not None and negative_prompt_embeds is not None and \
                prompt_embeds.shape != negative_prompt_embeds.shape:
            raise ValueError(f"prompt_embeds {tuple(prompt_embeds.shape)} and negative_prompt_embeds "
                             f"{tuple(negative_prompt_embeds.shape)} must have the same shape")
        for name in ("num_inference_steps", "num_images_per_prompt"):
            value = call.get(name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        check_denoising_fractions(call.get("denoising_start"), call.denoising_end)
        if not self._encoders() and prompt_embeds is None:
            raise ValueError(f"{type(self).__name__} has no text encoder: pass prompt_embeds and pooled_prompt_embeds")

    def encode_call(self, call, device: torch.device) -> tuple:
        return self.encode_prompt(
            call.prompt, call.prompt_2, device, call.num_images_per_prompt, self.do_classifier_free_guidance,
            call.negative_prompt, call.negative_prompt_2, call.prompt_embeds, call.negative_prompt_embeds,
            call.pooled_prompt_embeds, call.negative_pooled_prompt_embeds, clip_skip=call.clip_skip,
        )

    def time_id_pairs(self, call, height: int, width: int) -> tuple[tuple, tuple]:
        """(time ids, negative time ids) of text-to-image: original size, crop top-left, target size; the
        negative ones only when both negative sizes are given (else the positive ones), as in diffusers."""
        size = (height, width)
        ids = (*_size(call.original_size, "original_size", size),
               *_size(call.crops_coords_top_left, "crops_coords_top_left", (0, 0)),
               *_size(call.target_size, "target_size", size))
        if call.negative_original_size is None or call.negative_target_size is None:
            return ids, ids
        return ids, (*_size(call.negative_original_size, "negative_original_size", size),
                     *_size(call.negative_crops_coords_top_left, "negative_crops_coords_top_left", (0, 0)),
                     *_size(call.negative_target_size, "negative_target_size", size))

    def call_conditioning(self, call, pooled: torch.Tensor, negative_pooled: torch.Tensor | None, batch: int,
                          latents: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        """The loop's ``add_text_embeds`` / ``add_time_ids`` for ``call`` (sizes from the latents' size)."""
        ids, negative_ids = self.time_id_pairs(call, latents.shape[-2] * self.vae_scale_factor,
                                               latents.shape[-1] * self.vae_scale_factor)
        return self.size_conditioning(pooled, negative_pooled, ids, negative_ids, batch, device)


def _size(value: Any, name: str, default: Size) -> tuple[int, ...]:
    if value is None:
        return tuple(default)
    if not (isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, numbers.Real) for v in value)):
        raise ValueError(f"{name} must be a (height, width) pair, got {value!r}")
    return tuple(value)


class StableDiffusionXLPipeline(TextualInversionLoaderMixin, StableDiffusionXLLoraLoaderMixin, XLPromptEncodingMixin,
                                LatentDiffusionMixin, DiffusionPipeline, FromSingleFileMixin):
    """``pipe(prompt, ...).images``: SDXL text-to-image (see the module docstring for the pieces and differences).

    Components: ``vae``, ``text_encoder`` (CLIP ViT-L), ``text_encoder_2`` (OpenCLIP bigG with projection),
    ``tokenizer``, ``tokenizer_2``, ``unet``, ``scheduler``; ``image_encoder`` / ``feature_extractor`` (IP-Adapter)
    must be None. Option ``force_zeros_for_empty_prompt`` (model_index.json). Two call arguments diffusers does not
    have, last: ``guidance_interval=(lo, hi)`` (guidance only on part of the steps; docs/PIPELINES.md) and
    ``deep_cache`` (feature reuse across steps; ``enable_deep_cache()``).
    """

    component_names = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "scheduler",
                       "image_encoder", "feature_extractor")
    _optional_components = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "image_encoder",
                            "feature_extractor")
    _option_names = ("force_zeros_for_empty_prompt", "add_watermarker")
    _callback_tensor_inputs = ("latents", "prompt_embeds", "add_text_embeds", "add_time_ids")
    upcast_vae_when_forced = True

    def __init__(self, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler,
                 image_encoder=None, feature_extractor=None, force_zeros_for_empty_prompt: bool = True,
                 add_watermarker: bool | None = None):
        _refuse_extras(image_encoder, add_watermarker)
        self.register_modules(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                              tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, image_encoder=None,
                              feature_extractor=feature_extractor)
        self.register_options(force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)

    @property
    def default_sample_size(self) -> int:
        return self.unet.config.sample_size

    def latents_to_images(self, latents: torch.Tensor, output_type: str) -> Any:
        """Decode (in float32 when the VAE asks for it) and convert to ``output_type``; latents stay as they are."""
        if output_type == "latent":
            return latents
        return postprocess(self.decode_latents(latents), output_type)

    def output(self, call, images: Any) -> StableDiffusionXLPipelineOutput | tuple[Any]:
        return StableDiffusionXLPipelineOutput(images=images) if call.return_dict else (images,)

    @torch.no_grad()
    @call_signature("prompt prompt_2 height width num_inference_steps timesteps sigmas denoising_end "
                    f"guidance_scale=5.0 negative_prompt negative_prompt_2 {SAMPLING} latents {XL_EMBEDS} {OUTPUT} "
                    f"guidance_rescale {XL_SIZES} {CALLBACKS} {OURS}")
    def __call__(self, call) -> StableDiffusionXLPipelineOutput | tuple[Any]:
        """SDXL text-to-image (diffusers' signature); ``denoising_end`` stops early for a refiner to take over."""
        call.height, call.width = checked_image_size(self, call.height, call.width, multiple=8)
        device, scheduler, (prompt_embeds, negative_prompt_embeds, pooled, negative_pooled) = self.prepare_call(call)
        custom = custom_schedule(call.timesteps, call.sigmas)
        scheduler.set_timesteps(None if custom else call.num_inference_steps, device=device, **custom)
        batch = prompt_embeds.shape[0]
        latents = self.prepare_latents(batch, call.height, call.width, prompt_embeds.dtype, device, call.generator,
                                       call.latents, scheduler.init_noise_sigma)
        extras = self.call_conditioning(call, pooled, negative_pooled, batch, latents, device)
        latents = self.denoise_call(
            call, scheduler, cut_at_denoising_end(scheduler, scheduler.timesteps, call.denoising_end),
            self.loop_tensors(latents, prompt_embeds, negative_prompt_embeds, **extras), batch, device,
            added_cond=ADDED_COND,
        )
        return self.output(call, self.latents_to_images(latents, call.output_type))


def _refuse_extras(image_encoder: Any, add_watermarker: bool | None) -> None:
    if image_encoder is not None:
        raise NotImplementedError("image_encoder (IP-Adapter) is not implemented by diffusekit: pass "
                                  "image_encoder=None")
    if add_watermarker:
        raise NotImplementedError("add_watermarker=True: diffusekit does not add an invisible watermark (it needs "
                                  "the invisible-watermark package); pass add_watermarker=False or None")
