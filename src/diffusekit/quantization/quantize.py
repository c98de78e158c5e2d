"""Post-training static int8 quantization: calibrate activation ranges, then swap layers for int8 QDQ layers."""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from .format import eligible_layers, make_quantization_config, matches, replace_module
from .modules import INT8_LAYERS, activation_qparams
from .observers import make_observer

logger = logging.getLogger(__name__)

# Layers kept in float32 by default (module-path patterns, see ``format.matches``): the first and last convolutions
# (they read / write latents directly and cost little), and the timestep / class / added-condition embeddings (tiny
# matmuls whose inputs span a wide range). Chosen by the measurements in docs/QUANTIZATION.md.
DEFAULT_MODULES_TO_NOT_CONVERT: tuple[str, ...] = (
    "conv_in", "conv_out", "time_embedding", "class_embedding", "add_embedding", "*.time_emb_proj",
)


def check_device_support(model: nn.Module) -> None:
    """Refuse a model on a GPU (int8 here means oneDNN CPU kernels); warn once on a CPU without VNNI."""
    devices = {t.device.type for t in [*model.parameters(), *model.buffers()]}
    if devices - {"cpu", "meta"}:
        raise RuntimeError(
            f"int8 quantization runs on the CPU only, but {type(model).__name__} is on {sorted(devices)}; on a GPU "
            "use torch_dtype=torch.float16 or torch.bfloat16 instead (faster there), or move the model to the CPU"
        )
    warn_without_vnni()


_warned_vnni = False


def warn_without_vnni() -> None:
    global _warned_vnni
    supported = getattr(torch.cpu, "_is_vnni_supported", None)
    if supported is not None and not supported() and not _warned_vnni:
        _warned_vnni = True
        warnings.warn(
            "this CPU has no VNNI (AVX512-VNNI / AVX-VNNI) int8 instructions: int8 models stay correct but will "
            "not be faster than float32 here", RuntimeWarning, stacklevel=3,
        )


@contextlib.contextmanager
def observing(layers: Mapping[str, nn.Module], observer: str, percentile: float | None) -> Iterator[dict]:
    """Attach an observer to the input of each layer while the block runs; yields name -> observer."""
    observers = {name: make_observer(observer, percentile) for name in layers}
    handles = [layer.register_forward_pre_hook(lambda _m, args, obs=observers[name]: obs.observe(args[0]))
               for name, layer in layers.items()]
    try:
        yield observers
    finally:
        for handle in handles:
            handle.remove()


def _run_inputs(model: nn.Module, inputs: Iterable[Any]) -> int:
    count = 0
    for item in inputs:
        if isinstance(item, Mapping):
            model(**item)
        elif isinstance(item, (tuple, list)):
            model(*item)
        else:
            model(item)
        count += 1
    return count


def quantize_model(
    model: nn.Module,
    calibration_inputs: Iterable[Any] | Callable[[nn.Module], Any],
    *,
    modules_to_not_convert: Iterable[str] | None = None,
    observer: str = "minmax",
    percentile: float | None = None,
    calibration_info: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Quantize ``model`` in place to int8 weights and activations; returns it.

    ``calibration_inputs``: the inputs to calibrate on, each a dict of keyword arguments, a tuple of positional ones
    or a single tensor; or a callable that runs the model itself (``pipe.quantize`` passes one that runs the whole
    pipeline). Every ``nn.Conv2d`` / ``nn.Linear`` that the calibration reaches and that ``modules_to_not_convert``
    (module-path patterns; default ``DEFAULT_MODULES_TO_NOT_CONVERT``) does not name becomes an int8 layer; the layers
    calibration never reached stay float32. ``observer``: ``"minmax"`` (default), ``"percentile"`` or
    ``"average"`` (the mean of each call's range).

    The result runs eagerly as simulated int8 (correct, not fast); ``model.optimize()`` (or ``torch.compile`` with
    inductor freezing) turns it into oneDNN int8 kernels. A ``ModelMixin`` records ``quantization_config`` in its
    config, so ``save_pretrained`` / ``from_pretrained`` round-trip it without recalibrating.
    """
    check_device_support(model)
    if any(type(m) in (INT8_LAYERS[nn.Conv2d], INT8_LAYERS[nn.Linear]) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} is already quantized; load the float model to quantize it again")
    patterns = tuple(DEFAULT_MODULES_TO_NOT_CONVERT if modules_to_not_convert is None else modules_to_not_convert)
    layers = eligible_layers(model)
    targets = {name: layer for name, layer in layers.items() if not matches(name, patterns)}
    was_training = model.training
    model.eval()
    with torch.no_grad(), observing(targets, observer, percentile) as observers:
        runs = calibration_inputs(model) if callable(calibration_inputs) else _run_inputs(model, calibration_inputs)
    model.train(was_training)
    unreached = sorted(name for name, obs in observers.items() if obs.calls == 0)
    if len(unreached) == len(targets) and targets:
        raise ValueError("quantize_model: the calibration never called the model's layers; pass calibration inputs "
                         "(or a callable) that run the model at least once")
    if unreached:
        logger.info("quantize_model: %d layers not reached by calibration stay float32: %s", len(unreached),
                    ", ".join(unreached[:10]))
    for name, obs in observers.items():
        if obs.calls == 0:
            continue
        layer = layers[name]
        new = INT8_LAYERS[type(layer)].from_float(layer)
        new.set_input_qparams(*activation_qparams(*obs.range()))
        replace_module(model, name, new)
    keep = [name for name in layers if name not in targets or observers[name].calls == 0]
    info: dict[str, Any] = {"observer": observer}
    if observer == "percentile":
        info["percentile"] = 99.99 if percentile is None else float(percentile)
    if isinstance(runs, int):
        info["calibration_batches"] = runs
    info.update(calibration_info or {})
    config = make_quantization_config(keep, info)
    if hasattr(model, "register_to_config"):
        model.register_to_config(quantization_config=config)
    return model


def is_quantized(model: nn.Module) -> bool:
    """True when ``model`` holds int8 layers."""
    kinds = tuple(INT8_LAYERS.values())
    return any(isinstance(m, kinds) for m in model.modules())
