"""Stable Diffusion inpainting: repaint the white part of a mask, keep the black part.

Two kinds of UNet work:

- a dedicated inpainting UNet (9 input channels: latents, the mask at latent size, and the latents of the image with
  the masked part blacked out), as in ``stable-diffusion-inpainting``;
- an ordinary text-to-image UNet (4 input channels): after each step the kept region is put back, taken from the
  image latents noised to the next timestep (the last step keeps the clean image latents there), as diffusers does.

``strength`` works as in image-to-image (see :mod:`.stable_diffusion_img2img`); at 1.0 (the default) the latents
start from pure noise.

Differences from diffusers, on purpose (besides those of image-to-image):
- ``image`` and ``mask_image`` must have the same size (diffusers resizes both silently), and the mask must have a
  single channel when given as an array or tensor (a PIL mask is converted to grayscale, as in diffusers).
- At least one step runs whatever the strength (diffusers raises when ``int(steps * strength)`` is 0).
- ``padding_mask_crop`` with an all-black mask uses the whole image (diffusers divides by zero).
"""

from __future__ import annotations

from typing import Any

import torch

from ..random import Generator, randn_tensor
from .call_signatures import CALLBACKS, OURS, OUTPUT, SAMPLING, call_signature
from .checks import checked_image_size
from .image_processor import VaeImageProcessor, _is_pil, image_kind, image_size
from .pieces import check_strength, cut_at_denoising_end, set_strength_schedule
from .stable_diffusion import StableDiffusionPipelineOutput
from .stable_diffusion_img2img import StableDiffusionImg2ImgPipeline


class InpaintMixin:
    """Inpainting pieces shared by SD and SDXL inpainting: input checks, the image and mask at full size, starting
    latents (noise, noised image, or the image latents as they are), the mask and masked-image latents, and the
    kept-region blend for ordinary (4-channel) UNets."""

    @property
    def mask_processor(self) -> VaeImageProcessor:
        return VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_normalize=False, do_binarize=True,
                                 do_convert_grayscale=True)

    def _unet_kind(self) -> int:
        """4 (an ordinary UNet: blend the kept region) or 9 (latents + mask + masked image latents)."""
        channels, latent = self.unet.config.in_channels, self.vae.config.latent_channels
        if channels == latent:
            return 4
        if channels == 2 * latent + 1:
            return 9
        raise ValueError(
            f"the UNet takes {channels} input channels; inpainting needs {latent} (an ordinary UNet) or "
            f"{2 * latent + 1} (latents + mask + masked image latents, an inpainting UNet)"
        )

    def check_inpaint_inputs(self, image, mask_image, height, width, padding_mask_crop, output_type,
                             masked_image_latents=None) -> None:
        if image is None or mask_image is None:
            raise ValueError("image and mask_image are both required (white in the mask = repaint)")
        factor = self.vae_scale_factor
        if height % factor or width % factor:
            raise ValueError(f"height and width must be multiples of {factor} (the VAE scale factor), got "
                             f"{height}x{width}")
        for name, value in (("image", image), ("mask_image", mask_image)):
            if image_kind(value) is None:
                raise TypeError(f"{name} must be a PIL image, a numpy array or a torch tensor, or a list of one of "
                                f"these kinds; got {type(value).__name__}")
        channels = _mask_channels(mask_image)
        if channels != 1:
            raise ValueError(f"mask_image must have a single channel, got {channels}: pass a grayscale mask "
                             "(white = repaint)")
        is_latents = isinstance(image, torch.Tensor) and image.ndim == 4 and self._is_latents(image)
        if is_latents and masked_image_latents is None:
            raise ValueError("image is given as latents: pass masked_image_latents too (the latents of the image "
                             "with the part to repaint blacked out)")
        if not is_latents and image_size(image) != image_size(mask_image):
            raise ValueError(f"image is {_hw(image_size(image))} but mask_image is {_hw(image_size(mask_image))}: "
                             "give them the same size")
        if padding_mask_crop is not None:
            if not (_is_pil(image) and _is_pil(mask_image)):
                raise ValueError("padding_mask_crop needs image and mask_image as single PIL images")
            if output_type != "pil":
                raise ValueError(f"padding_mask_crop needs output_type='pil', got {output_type!r}")

    def _encode_or_take(self, pixels_or_latents: torch.Tensor, generator: Generator) -> torch.Tensor:
        if self._is_latents(pixels_or_latents):
            return pixels_or_latents
        return self.encode_vae_image(pixels_or_latents, generator)

    # ------------------------------------------------------------------ pieces (shared with SDXL inpainting)

    def inpaint_pixels(self, image, mask_image, height: int, width: int,
                       padding_mask_crop: int | None) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """``(image (B, 3, H, W) in [-1, 1] float32, mask (B, 1, H, W) in {0, 1}, crop box or None)``."""
        crop, resize_mode = None, "default"
        if padding_mask_crop is not None:
            crop = self.mask_processor.get_crop_region(mask_image, width, height, pad=padding_mask_crop)
            resize_mode = "fill"
        init_image = self.image_processor.preprocess(image, height, width, resize_mode, crop).to(torch.float32)
        mask = self.mask_processor.preprocess(mask_image, height, width, resize_mode, crop)  # (B, 1, H, W) in {0, 1}
        if mask.shape[1] != 1:
            raise ValueError(f"mask_image must have a single channel, got {mask.shape[1]}: pass a grayscale mask "
                             "(white = repaint)")
        return init_image, mask, crop

    def inpaint_latents(self, scheduler, run: torch.Tensor, init_image: torch.Tensor, latents: torch.Tensor | None,
                        batch: int, num_images_per_prompt: int, generator: Generator, dtype: torch.dtype,
                        device: torch.device, height: int, width: int, *, from_noise: bool, need_image_latents: bool,
                        add_noise: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(starting latents, the noise, the image's clean latents or None)``; the order of draws from
        ``generator`` is diffusers'. ``from_noise`` (strength 1): start from pure noise; ``add_noise=False`` (SDXL's
        ``denoising_start``): start from the image latents as they are (they come noised from the base model)."""
        self.check_image_batch(init_image, batch, num_images_per_prompt)
        if isinstance(generator, (list, tuple)) and len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for {batch} images: pass one generator per image")
        factor = self.vae_scale_factor
        shape = (batch, self.vae.config.latent_channels, height // factor, width // factor)
        image_latents = None
        if self._is_latents(init_image) or need_image_latents or not add_noise or (latents is None and not from_noise):
            image_latents = self._encode_or_take(init_image.to(device, dtype), generator).to(dtype)
            image_latents = image_latents.repeat_interleave(batch // image_latents.shape[0], dim=0)
        if latents is not None and add_noise:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {shape} for this size and batch, got {tuple(latents.shape)}")
            noise = latents.to(device, dtype)
            return noise * scheduler.init_noise_sigma, noise, image_latents
        noise = randn_tensor(shape, generator, device, dtype)
        if not add_noise:
            return image_latents, noise, image_latents
        if from_noise:
            return noise * scheduler.init_noise_sigma, noise, image_latents
        return scheduler.add_noise(image_latents, noise, run[:1].repeat(batch)), noise, image_latents

    def mask_latents(self, init_image: torch.Tensor, mask: torch.Tensor, masked_image_latents: torch.Tensor | None,
                     size: tuple[int, int], batch: int, num_images_per_prompt: int, generator: Generator,
                     dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The mask at latent ``size`` and the latents of the image with the repainted part blacked out, one row per
        output image, doubled under guidance."""
        masked = init_image * (mask < 0.5) if masked_image_latents is None else masked_image_latents
        masked = self._encode_or_take(masked.to(device, dtype), generator).to(dtype)
        mask = torch.nn.functional.interpolate(mask, size=tuple(size)).to(device, dtype)
        self.check_image_batch(mask, batch, num_images_per_prompt, what="mask")
        self.check_image_batch(masked, batch, num_images_per_prompt, what="masked_image_latents")
        mask = mask.repeat_interleave(batch // mask.shape[0], dim=0)
        masked = masked.repeat_interleave(batch // masked.shape[0], dim=0)
        if self.do_classifier_free_guidance:
            mask, masked = torch.cat([mask] * 2), torch.cat([masked] * 2)
        return mask, masked

    def keep_unmasked(self, scheduler, run: torch.Tensor, image_latents: torch.Tensor, noise: torch.Tensor):
        """The loop's ``after_step`` for an ordinary (4-channel) UNet: put back the kept region, taken from the
        image latents noised to the next timestep (clean after the last)."""

        def after_step(i: int, t, latents: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
            keep = tensors["mask"].chunk(2)[0] if self.do_classifier_free_guidance else tensors["mask"]
            known = image_latents
            if i < len(run) - 1:
                known = scheduler.add_noise(image_latents, noise, run[i + 1 : i + 2].repeat(latents.shape[0]))
            return (1 - keep) * known + keep * latents

        return after_step


    def check_inpaint_call(self, call) -> None:
        """Sizes (default: the UNet's sample size), image / mask / strength checks, and the UNet kind."""
        call.height, call.width = checked_image_size(self, call.height, call.width)
        self.check_inpaint_inputs(call.image, call.mask_image, call.height, call.width, call.padding_mask_crop,
                                  call.output_type, call.masked_image_latents)
        check_strength(call.strength)
        self._unet_kind()

    def inpaint_start(self, call, scheduler, batch: int, dtype: torch.dtype,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], dict, Any]:
        """``(timesteps, starting latents, loop tensors (mask, masked_image_latents), loop keywords, crop box)``."""
        unet_kind = self._unet_kind()
        run, _ = set_strength_schedule(scheduler, call.num_inference_steps, call.strength, device, call.timesteps,
                                       call.sigmas, call.get("denoising_start"))
        init_image, mask, crop = self.inpaint_pixels(call.image, call.mask_image, call.height, call.width,
                                                     call.padding_mask_crop)
        latents, noise, image_latents = self.inpaint_latents(
            scheduler, run, init_image, call.latents, batch, call.num_images_per_prompt, call.generator, dtype,
            device, call.height, call.width, from_noise=call.strength == 1.0, need_image_latents=unet_kind == 4,
            add_noise=call.get("denoising_start") is None,
        )
        mask, masked = self.mask_latents(init_image, mask, call.masked_image_latents, latents.shape[2:], batch,
                                         call.num_images_per_prompt, call.generator, dtype, device)
        run = cut_at_denoising_end(scheduler, run, call.get("denoising_end"))
        loop = {"concat": ("mask", "masked_image_latents") if unet_kind == 9 else (),
                "after_step": self.keep_unmasked(scheduler, run, image_latents, noise) if unet_kind == 4 else None}
        return run, latents, {"mask": mask, "masked_image_latents": masked}, loop, crop

    def paste_back(self, call, images: Any, crop: Any) -> Any:
        """With ``padding_mask_crop``: the repainted crop pasted back into the original picture."""
        if crop is None:
            return images
        return [self.image_processor.apply_overlay(call.mask_image, call.image, im, crop) for im in images]


class StableDiffusionInpaintPipeline(InpaintMixin, StableDiffusionImg2ImgPipeline):
    """``pipe(prompt, image=..., mask_image=...).images``: text-guided inpainting (white in the mask = repaint).

    ``image`` as in image-to-image; ``mask_image``: a PIL image (converted to grayscale), a numpy array
    ((H, W), (H, W, 1), (B, H, W) or (B, H, W, 1)) or a torch tensor ((H, W), (B, H, W) or (B, 1, H, W)), values in
    [0, 1], thresholded at 0.5. Soften its edge first with ``pipe.mask_processor.blur(mask, blur_factor=...)``.
    ``masked_image_latents`` replaces the encoding of the masked image (9-channel UNets). ``padding_mask_crop=N``
    works on the box around the mask grown by N pixels, at full resolution, and pastes the result back into the
    original picture (PIL inputs and output only). ``height`` / ``width`` default to the UNet's sample size times
    the VAE scale factor, as in diffusers.
    """

    _callback_tensor_inputs = ("latents", "prompt_embeds", "negative_prompt_embeds", "mask", "masked_image_latents")

    def check_call(self, call) -> None:
        self.check_inpaint_call(call)
        self.check_prompt_inputs(call.prompt, call.negative_prompt, call.prompt_embeds, call.negative_prompt_embeds,
                                 call.num_inference_steps, call.num_images_per_prompt)

    @torch.no_grad()
    @call_signature("prompt image mask_image masked_image_latents height width padding_mask_crop strength=1.0 "
                    "num_inference_steps timesteps sigmas guidance_scale negative_prompt "
                    f"{SAMPLING} latents prompt_embeds negative_prompt_embeds {OUTPUT} guidance_rescale "
                    f"{CALLBACKS} {OURS}")
    def __call__(self, call) -> StableDiffusionPipelineOutput | tuple[Any, ...]:
        """Inpainting (diffusers' signature): white in ``mask_image`` is repainted."""
        device, scheduler, (prompt_embeds, negative_prompt_embeds) = self.prepare_call(call)
        batch = prompt_embeds.shape[0]
        run, latents, extras, loop, crop = self.inpaint_start(call, scheduler, batch, prompt_embeds.dtype, device)
        latents = self.denoise_call(call, scheduler, run,
                                    self.loop_tensors(latents, prompt_embeds, negative_prompt_embeds, **extras),
                                    batch, device, **loop)
        images, nsfw = self.latents_to_images(latents, call.output_type)
        return self.output(call, self.paste_back(call, images, crop), nsfw)


def _mask_channels(mask) -> int:
    """Channels of an array / tensor mask where its shape says so unambiguously (1 otherwise; PIL: 1)."""
    first = mask[0] if isinstance(mask, (list, tuple)) else mask
    if isinstance(first, torch.Tensor) and first.ndim == 4:
        return first.shape[1]
    if not isinstance(first, torch.Tensor) and getattr(first, "ndim", 0) in (3, 4) and first.shape[-1] in (2, 3, 4):
        return first.shape[-1]  # (H, W, C) / (B, H, W, C) arrays
    return 1


def _hw(size: tuple[int, int]) -> str:
    return f"{size[1]}x{size[0]} (w x h)"
