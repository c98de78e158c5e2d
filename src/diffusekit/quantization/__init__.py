"""Post-training static int8 quantization (weights and activations) for CPU inference.

``pipe.quantize()`` / :func:`quantize_model` calibrate activation ranges by running the float model (the pipeline's own
prompts and latents over every timestep), then swap ``Conv2d`` / ``Linear`` layers for int8 QDQ layers
(:mod:`.modules`). The result saves with ``save_pretrained`` and loads with ``from_pretrained`` straight into int8
(:mod:`.format`). Eagerly it is simulated int8 (correct, slower); ``optimize()`` compiles it to oneDNN int8 kernels.
See docs/QUANTIZATION.md.
"""

from .format import QuantizationConfigError, validate_quantization_config
from .modules import Int8Conv2d, Int8Linear
from .quantize import DEFAULT_MODULES_TO_NOT_CONVERT, is_quantized, quantize_model

__all__ = [
    "DEFAULT_MODULES_TO_NOT_CONVERT",
    "Int8Conv2d",
    "Int8Linear",
    "QuantizationConfigError",
    "is_quantized",
    "quantize_model",
    "validate_quantization_config",
]
