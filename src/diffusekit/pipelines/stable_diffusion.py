"""Stable Diffusion text-to-image: CLIP text encoder + UNet2DConditionModel + AutoencoderKL + any scheduler.

Differences from diffusers, on purpose:
- ``clip_skip`` applies to the negative prompt too (diffusers encodes the negative prompt from the last layer
  whatever ``clip_skip`` says, so positive and negative embeddings come from different layers).
- A VAE whose config sets ``shift_factor`` gets ``latents / scaling_factor + shift_factor`` before decoding
  (diffusers' SD pipeline ignores the shift). SD 1.x/2.x VAEs have no shift, so their numbers are unchanged.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

import torch

from ..loaders.lora import StableDiffusionLoraLoaderMixin
from ..loaders.textual_inversion import TextualInversionLoaderMixin
from .base import DiffusionPipeline
from .call_signatures import CALLBACKS, OURS, OUTPUT, SAMPLING, call_signature
from .checks import check_steps, checked_image_size
from .pieces import LatentDiffusionMixin, custom_schedule, warn_truncation
from .pieces import guidance_scale_embedding, rescale_noise_cfg  # noqa: F401  (public here since 0.1)
from .image_processor import postprocess
from ..outputs import BaseOutput
from ..single_file.pipeline import FromSingleFileMixin

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class StableDiffusionPipelineOutput(BaseOutput):
    """``images`` per ``output_type``; ``nsfw_content_detected``: a flag per image, or None without a checker."""

    images: Any
    nsfw_content_detected: list[bool] | None


class StableDiffusionPipeline(TextualInversionLoaderMixin, StableDiffusionLoraLoaderMixin, LatentDiffusionMixin, DiffusionPipeline, FromSingleFileMixin):
    """``pipe(prompt, ...).images``: text-to-image with classifier-free guidance.

    Components: ``vae``, ``text_encoder``, ``tokenizer``, ``unet``, ``scheduler``; ``safety_checker`` and
    ``feature_extractor`` may be None (``nsfw_content_detected`` is then None).

    Differs from diffusers: two more call arguments, last, ``guidance_interval=(lo, hi)`` (guidance only on the steps
    ``lo <= i / n < hi``; opt-in, docs/PIPELINES.md) and ``deep_cache`` (DeepCache-style feature reuse for this call;
    ``enable_deep_cache()`` / ``disable_deep_cache()`` set it for every call), in every SD-family pipeline.
    """

    component_names = ("vae", "text_encoder", "tokenizer", "unet", "scheduler", "safety_checker", "feature_extractor")
    #: tensors a ``callback_on_step_end`` may ask for (and replace)
    _callback_tensor_inputs: tuple[str, ...] = ("latents", "prompt_embeds", "negative_prompt_embeds")
    _optional_components = ("safety_checker", "feature_extractor")
    _option_names = ("requires_safety_checker",)
    #: "plain": prompts read as diffusers reads them; "a1111": A1111's emphasis, BREAK and long-prompt rules
    #: (diffusekit.prompts) in encode_prompt, so in every SD pipeline call: ``pipe.prompt_syntax = "a1111"``
    prompt_syntax: str = "plain"

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, safety_checker=None, feature_extractor=None,
                 requires_safety_checker: bool = True):
        if safety_checker is None and requires_safety_checker:
            logger.warning(
                "%s runs without a safety checker: generated images are not screened for unsafe content",
                type(self).__name__,
            )
        if safety_checker is not None and feature_extractor is None:
            raise ValueError(
                f"{type(self).__name__}: a safety_checker needs its feature_extractor (the CLIPImageProcessor in the "
                "checkpoint's feature_extractor/ folder); pass safety_checker=None to run without one"
            )
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                              scheduler=scheduler, safety_checker=safety_checker,
                              feature_extractor=feature_extractor)
        self.register_options(requires_safety_checker=requires_safety_checker)

    # ------------------------------------------------------------------ prompt encoding

    def _encode_text(self, texts: list[str], max_length: int, clip_skip: int | None) -> torch.Tensor:
        """Token ids -> (B, seq, dim) embeddings, from the last layer or ``clip_skip`` layers before it."""
        texts = self.maybe_convert_prompt(list(texts), self.tokenizer)  # multi-vector textual-inversion tokens
        tokens = self.tokenizer(texts, padding="max_length", max_length=max_length, truncation=True,
                                return_tensors="pt")
        ids = tokens.input_ids.to(self.text_encoder.device)
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(self.text_encoder.device)
        if clip_skip is None:
            return self.text_encoder(ids, attention_mask=mask)[0]
        hidden = self.text_encoder(ids, attention_mask=mask, output_hidden_states=True)[-1][-(clip_skip + 1)]
        return self.text_encoder.text_model.final_layer_norm(hidden)  # the last layer's norm, as the top layer has

    def _warn_truncation(self, prompts: list[str]) -> None:
        warn_truncation(self.tokenizer, prompts)

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        device: torch.device | None = None,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        clip_skip: int | None = None,
        lora_scale: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return ``(prompt_embeds, negative_prompt_embeds)``, each repeated ``num_images_per_prompt`` times.

        ``lora_scale`` scales the text encoder's LoRA layers (default: during a pipeline call, that call's
        ``cross_attention_kwargs["scale"]``, as diffusers passes it). With ``pipe.prompt_syntax = "a1111"`` the
        prompts are read with A1111's syntax (:func:`diffusekit.prompts.encode_prompt_a1111`)."""
        device = device or self.device
        if self.prompt_syntax not in ("plain", "a1111"):
            raise ValueError(f"prompt_syntax must be 'plain' or 'a1111', got {self.prompt_syntax!r}")
        if self.prompt_syntax == "a1111" and prompt_embeds is None and negative_prompt_embeds is None:
            from ..prompts import encode_prompt_a1111

            with self._text_encoder_lora_scale(lora_scale):
                return encode_prompt_a1111(self, prompt, negative_prompt, num_images_per_prompt=num_images_per_prompt,
                                           do_classifier_free_guidance=do_classifier_free_guidance,
                                           clip_skip=clip_skip, device=device)
        if prompt_embeds is None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            self._warn_truncation(prompts)
            with self._text_encoder_lora_scale(lora_scale):
                prompt_embeds = self._encode_text(prompts, self.tokenizer.model_max_length, clip_skip)
        batch = prompt_embeds.shape[0]
        dtype = self.text_encoder.dtype if self.text_encoder is not None else self.unet.dtype
        prompt_embeds = prompt_embeds.to(dtype=dtype, device=device).repeat_interleave(num_images_per_prompt, dim=0)
        if not do_classifier_free_guidance:
            return prompt_embeds, None
        if negative_prompt_embeds is None:
            if negative_prompt is None:
                negatives = [""] * batch
            elif isinstance(negative_prompt, str):
                negatives = [negative_prompt] * batch
            else:
                negatives = list(negative_prompt)
            with self._text_encoder_lora_scale(lora_scale):
                negative_prompt_embeds = self._encode_text(negatives, prompt_embeds.shape[1], clip_skip)
        negative_prompt_embeds = negative_prompt_embeds.to(dtype=dtype, device=device)
        return prompt_embeds, negative_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)

    # ------------------------------------------------------------------ checks

    def check_inputs(self, prompt, height, width, negative_prompt, prompt_embeds, negative_prompt_embeds,
                     num_inference_steps, num_images_per_prompt) -> None:
        checked_image_size(self, height, width, multiple=8)
        self.check_prompt_inputs(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_inference_steps,
                                 num_images_per_prompt)

    def check_prompt_inputs(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                            num_inference_steps, num_images_per_prompt) -> None:
        """The checks of every SD pipeline that do not depend on the image size."""
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass exactly one of prompt and prompt_embeds")
        if prompt is not None and not (isinstance(prompt, str) or
                                       (isinstance(prompt, Sequence) and all(isinstance(p, str) for p in prompt))):
            raise TypeError(f"prompt must be a str or a list of str, got {type(prompt).__name__}")
        if isinstance(prompt, Sequence) and not isinstance(prompt, str) and len(prompt) == 0:
            raise ValueError("prompt is an empty list")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("pass at most one of negative_prompt and negative_prompt_embeds")
        batch = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
        if isinstance(negative_prompt, (list, tuple)) and len(negative_prompt) != batch:
            raise ValueError(
                f"negative_prompt has {len(negative_prompt)} entries but prompt has {batch}: give one per prompt"
            )
        width_expected = self.unet.config.cross_attention_dim
        for name, embeds in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
            if embeds is None:
                continue
            if embeds.ndim != 3 or embeds.shape[-1] != width_expected:
                raise ValueError(
                    f"{name} must have shape (batch, tokens, {width_expected}) to match the UNet's "
                    f"cross_attention_dim, got {tuple(embeds.shape)}"
                )
        if prompt_embeds is not None and negative_prompt_embeds is not None and \
                prompt_embeds.shape != negative_prompt_embeds.shape:
            raise ValueError(
                f"prompt_embeds {tuple(prompt_embeds.shape)} and negative_prompt_embeds "
                f"{tuple(negative_prompt_embeds.shape)} must have the same shape"
            )
        check_steps(num_inference_steps)
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive int, got {num_images_per_prompt!r}")

    # ------------------------------------------------------------------ latents

    def run_safety_checker(self, images: torch.Tensor) -> tuple[torch.Tensor, list[bool] | None]:
        if self.safety_checker is None:
            return images, None
        pixels = postprocess(images, "pil")
        clip_input = self.feature_extractor(pixels, return_tensors="pt").pixel_values.to(self.device)
        return self.safety_checker(images=images, clip_input=clip_input.to(images.dtype))

    # ------------------------------------------------------------------ call

    def encode_call(self, call, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.encode_prompt(call.prompt, device, call.num_images_per_prompt, self.do_classifier_free_guidance,
                                  call.negative_prompt, call.prompt_embeds, call.negative_prompt_embeds, call.clip_skip)

    def check_call(self, call) -> None:
        self.check_inputs(call.prompt, call.height, call.width, call.negative_prompt, call.prompt_embeds,
                          call.negative_prompt_embeds, call.num_inference_steps, call.num_images_per_prompt)

    def output(self, call, images: Any, nsfw: list[bool] | None) -> StableDiffusionPipelineOutput | tuple[Any, ...]:
        return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=nsfw) if call.return_dict else \
            (images, nsfw)

    @torch.no_grad()
    @call_signature("prompt height width num_inference_steps timesteps sigmas guidance_scale negative_prompt "
                    f"{SAMPLING} latents prompt_embeds negative_prompt_embeds {OUTPUT} guidance_rescale "
                    f"{CALLBACKS} {OURS}")
    def __call__(self, call) -> StableDiffusionPipelineOutput | tuple[Any, ...]:
        """Text-to-image (diffusers' signature): returns ``images`` and ``nsfw_content_detected``."""
        call.height, call.width = checked_image_size(self, call.height, call.width, multiple=8)
        device, scheduler, (prompt_embeds, negative_prompt_embeds) = self.prepare_call(call)
        custom = custom_schedule(call.timesteps, call.sigmas)
        scheduler.set_timesteps(None if custom else call.num_inference_steps, device=device, **custom)
        batch = prompt_embeds.shape[0]
        latents = self.prepare_latents(batch, call.height, call.width, prompt_embeds.dtype, device, call.generator,
                                       call.latents, scheduler.init_noise_sigma)
        latents = self.denoise_call(call, scheduler, scheduler.timesteps,
                                    self.loop_tensors(latents, prompt_embeds, negative_prompt_embeds), batch, device)
        return self.output(call, *self.latents_to_images(latents, call.output_type))

    # ------------------------------------------------------------------ decoding

    def latents_to_images(self, latents: torch.Tensor, output_type: str) -> tuple[Any, list[bool] | None]:
        """Decode, screen with the safety checker (flagged images come back black) and convert to ``output_type``;
        returns ``(images, nsfw_content_detected)``. ``output_type="latent"`` returns the latents unchanged."""
        if output_type == "latent":
            return latents, None
        images, nsfw = self.run_safety_checker(self.decode_latents(latents))
        images = postprocess(images, output_type, [True] * len(images) if nsfw is None else [not n for n in nsfw])
        return images, nsfw

