"""``pipe.quantize(...)``: calibrate a pipeline's UNet on the pipeline's own runs, then quantize it to int8."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .quantize import quantize_model

# A small, varied default calibration set (subjects, styles, scenes); calibration runs each through the whole schedule
DEFAULT_CALIBRATION_PROMPTS: tuple[str, ...] = (
    "a photograph of an astronaut riding a horse",
    "a watercolor painting of a lighthouse on a cliff at sunset",
    "a close-up portrait of an old man with a beard, studio lighting",
    "a red dress on a white background, product photo",
    "a bowl of ramen with chopsticks, top view",
    "a futuristic city skyline at night, neon lights, digital art",
    "a cat sleeping on a windowsill, soft morning light",
    "an ink sketch of a mountain village",
)


# VAE (components=("unet", "vae")): only the decoder is quantized; its first and last convolutions stay float32
VAE_MODULES_TO_NOT_CONVERT: tuple[str, ...] = (
    "encoder", "quant_conv", "post_quant_conv", "decoder.conv_in", "decoder.conv_out",
)


def quantize_pipeline(
    pipe: Any,
    prompts: Sequence[str] | None = None,
    *,
    num_inference_steps: int = 20,
    guidance_scale: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str | None = None,
    seed: int = 0,
    modules_to_not_convert: Sequence[str] | None = None,
    observer: str = "minmax",
    percentile: float | None = None,
    components: Sequence[str] = ("unet",),
    **call_kwargs: Any,
) -> Any:
    unet = getattr(pipe, "unet", None)
    if unet is None:
        raise ValueError(f"{type(pipe).__name__}.quantize: this pipeline has no UNet to quantize")
    components = tuple(components)
    if not components or not set(components) <= {"unet", "vae"} or "unet" not in components:
        raise ValueError(f"quantize: components={components!r}; expected ('unet',) or ('unet', 'vae')")
    if "vae" in components and getattr(pipe, "vae", None) is None:
        raise ValueError(f"{type(pipe).__name__}.quantize: components include 'vae' but the pipeline has none")
    prompts = list(DEFAULT_CALIBRATION_PROMPTS if prompts is None else ([prompts] if isinstance(prompts, str)
                                                                         else prompts))
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("quantize: prompts must be a non-empty list of strings (or None for the built-in set)")
    text = getattr(pipe, "text_encoder", None) is not None  # text-to-image family: prompts, CFG, latent output

    latents = []

    def run(_unet) -> int:
        for i, prompt in enumerate(prompts):
            kwargs = dict(num_inference_steps=num_inference_steps,
                          generator=torch.Generator("cpu").manual_seed(seed + i), **call_kwargs)
            if text:
                kwargs.update(prompt=prompt, guidance_scale=guidance_scale, height=height, width=width,
                              output_type="latent")
                if negative_prompt is not None:
                    kwargs["negative_prompt"] = negative_prompt
            out = pipe(**kwargs)
            if "vae" in components:
                latents.append(out[0] if isinstance(out, tuple) else getattr(out, "images", None))
        return len(prompts)

    info = {"calibration_runs": len(prompts), "num_inference_steps": int(num_inference_steps)}
    if text:
        info["guidance_scale"] = float(guidance_scale)
    quantize_model(unet, run, modules_to_not_convert=modules_to_not_convert, observer=observer,
                   percentile=percentile, calibration_info=info)
    if "vae" in components:
        vae = pipe.vae
        scale = vae.config.scaling_factor

        def decode(_vae) -> int:  # the decoder on the latents the calibration runs produced (the encoder stays float)
            for z in latents:
                vae.decode(z / scale)
            return len(latents)

        quantize_model(vae, decode, modules_to_not_convert=VAE_MODULES_TO_NOT_CONVERT, observer=observer,
                       percentile=percentile, calibration_info=info)
    return pipe
