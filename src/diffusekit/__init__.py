"""diffusekit: diffusion models, schedulers and pipelines that read and write diffusers checkpoints.

Importing the package is cheap: torch and the model code load on first use of a name.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> module (relative to this package) that defines it
_EXPORTS: dict[str, str] = {
    # config / outputs
    "ConfigMixin": "configuration",
    "FrozenConfig": "configuration",
    "register_to_config": "configuration",
    "BaseOutput": "outputs",
    "ModelMixin": "modeling",
    # models
    "UNet2DModel": "models.unet_2d",
    "UNet2DOutput": "models.unet_2d",
    "UNet2DConditionModel": "models.unet_2d_condition",
    "UNet2DConditionOutput": "models.unet_2d_condition",
    "AutoencoderKL": "models.autoencoder_kl",
    "CLIPTextModel": "models.clip",
    "CLIPTextModelWithProjection": "models.clip",
    "CLIPTextConfig": "models.clip",
    "CLIPTokenizer": "models.clip_tokenizer",
    "CLIPVisionModel": "models.clip_vision",
    "StableDiffusionSafetyChecker": "models.safety_checker",
    "CLIPImageProcessor": "pipelines.image_processor",
    "CLIPFeatureExtractor": "pipelines.image_processor",
    "CLIPImageProcessorPil": "pipelines.image_processor",
    # schedulers
    "SchedulerMixin": "schedulers.base",
    "SchedulerOutput": "schedulers.base",
    "DDPMScheduler": "schedulers.ddpm",
    "DDIMScheduler": "schedulers.ddim",
    "PNDMScheduler": "schedulers.pndm",
    "EulerDiscreteScheduler": "schedulers.euler",
    "EulerAncestralDiscreteScheduler": "schedulers.euler_ancestral",
    "LMSDiscreteScheduler": "schedulers.lms",
    "HeunDiscreteScheduler": "schedulers.heun",
    "KDPM2DiscreteScheduler": "schedulers.kdpm2",
    "KDPM2AncestralDiscreteScheduler": "schedulers.kdpm2_ancestral",
    "DPMSolverMultistepScheduler": "schedulers.dpmsolver_multistep",
    "DPMSolverSinglestepScheduler": "schedulers.dpmsolver_singlestep",
    "DPMSolverSDEScheduler": "schedulers.dpmsolver_sde",
    "UniPCMultistepScheduler": "schedulers.unipc",
    "DEISMultistepScheduler": "schedulers.deis",
    "LCMScheduler": "schedulers.lcm",
    "get_scheduler": "schedulers.names",
    # pipelines
    "DiffusionPipeline": "pipelines.base",
    "ImagePipelineOutput": "pipelines.base",
    "DDPMPipeline": "pipelines.ddpm",
    "DDIMPipeline": "pipelines.ddim",
    "StableDiffusionPipeline": "pipelines.stable_diffusion",
    "StableDiffusionPipelineOutput": "pipelines.stable_diffusion",
    "StableDiffusionImg2ImgPipeline": "pipelines.stable_diffusion_img2img",
    "StableDiffusionInpaintPipeline": "pipelines.stable_diffusion_inpaint",
    "StableDiffusionDepth2ImgPipeline": "pipelines.stable_diffusion_depth2img",
    "StableDiffusionXLPipeline": "pipelines.stable_diffusion_xl",
    "StableDiffusionXLPipelineOutput": "pipelines.stable_diffusion_xl",
    "StableDiffusionXLImg2ImgPipeline": "pipelines.stable_diffusion_xl_img2img",
    "StableDiffusionXLInpaintPipeline": "pipelines.stable_diffusion_xl_inpaint",
    "DPTForDepthEstimation": "pipelines.stable_diffusion_depth2img",
    "DPTImageProcessor": "pipelines.stable_diffusion_depth2img",
    "DPTImageProcessorPil": "pipelines.stable_diffusion_depth2img",
    "DPTFeatureExtractor": "pipelines.stable_diffusion_depth2img",
    "VaeImageProcessor": "pipelines.image_processor",
    "AutoPipelineForText2Image": "pipelines.auto",
    "AutoPipelineForImage2Image": "pipelines.auto",
    "AutoPipelineForInpainting": "pipelines.auto",
    # A1111 prompt syntax
    "encode_prompt_a1111": "prompts",
    "encode_prompt_a1111_xl": "prompts",
    "parse_prompt_attention": "prompts",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'diffusekit' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # cache: the next lookup is a plain attribute
    return value


def __dir__():
    return __all__


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from .configuration import ConfigMixin, FrozenConfig, register_to_config  # noqa: F401
