"""Int8 quantize-dequantize (QDQ) layers: ``Int8Conv2d`` and ``Int8Linear``.

Each layer holds its weight as int8 with one float32 scale per output channel (symmetric, zero point 0) and the
calibrated quantization parameters of its input activation (uint8, one scale and zero point per tensor). Its forward
pass is written as the exact op pattern that torch's inductor x86 quantization passes lower to oneDNN int8 kernels::

    x  -> quantize_per_tensor(u8) -> dequantize_per_tensor ─┐
    w8 -> dequantize_per_channel(s8) ───────────────────────┴─> conv2d / linear (+ float bias)

Run eagerly, this *simulates* int8 (correct numbers, slower than float32: the weight is dequantized on every call).
Compiled with inductor freezing (``model.optimize()``, or ``torch.compile`` with ``torch._inductor.config.freezing``
set, under ``torch.no_grad()``), inductor folds each pattern into a pre-packed ``onednn.qconv2d_pointwise`` /
``onednn.qlinear_pointwise`` call: that is where the int8 speed comes from.

Checkpoint keys (module path + ``.weight`` etc.) mirror the float layer's, plus three small tensors::

    weight            int8     [out, in/groups, kh, kw] or [out, in]
    weight_scale      float32  [out]
    bias              float32  [out]          (when the float layer had one)
    input_scale       float32  []
    input_zero_point  int32    []
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models import winograd

ACT_QMIN, ACT_QMAX = 0, 255  # activations: uint8, per-tensor affine
W_QMIN, W_QMAX = -128, 127  # weights: int8, per-channel symmetric (values in [-127, 127], zero point 0)


def _ops():
    """torch.ops.quantized_decomposed, registered on first use (importing the module registers the ops)."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401

    return torch.ops.quantized_decomposed


def quantize_weight_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: ``(int8 weight, float32 scale [out])`` with ``w ~= q * scale``."""
    w = weight.detach().float()
    absmax = w.reshape(w.shape[0], -1).abs().amax(dim=1)
    scale = (absmax / 127.0).clamp(min=1e-12)  # an all-zero channel gets a tiny scale (its values stay 0)
    q = torch.round(w / scale.reshape(-1, *([1] * (w.dim() - 1)))).clamp(-127, 127).to(torch.int8)
    return q, scale


def activation_qparams(low: float, high: float) -> tuple[float, int]:
    """uint8 affine parameters covering ``[low, high]`` (widened to include 0, so 0 is exact): (scale, zero point)."""
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    scale = (high - low) / (ACT_QMAX - ACT_QMIN)
    if not scale > 0 or scale != scale:  # all zeros (or nan): any scale works; keep it positive
        scale = 1.0
    zero_point = int(min(max(round(ACT_QMIN - low / scale), ACT_QMIN), ACT_QMAX))
    return float(scale), zero_point


class _Int8Layer(nn.Module):
    """Shared buffers and forward helpers of the int8 layers."""

    # optimize() compiles models holding these layers with inductor freezing on (optimize.QUANTIZED_OPTIONS)
    _needs_freezing = True

    weight: torch.Tensor
    weight_scale: torch.Tensor
    input_scale: torch.Tensor
    input_zero_point: torch.Tensor

    def _init_buffers(self, weight_shape, out_features: int, bias: bool, device=None) -> None:
        self.register_buffer("weight", torch.zeros(weight_shape, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        # zero points of a symmetric weight: always 0, rebuilt on load (not saved)
        self.register_buffer("weight_zero_point", torch.zeros(out_features, dtype=torch.int64, device=device),
                             persistent=False)
        self.register_buffer("input_scale", torch.ones((), dtype=torch.float32, device=device))
        self.register_buffer("input_zero_point", torch.zeros((), dtype=torch.int32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None
        # python copies of the activation parameters: the compiled graph sees them as constants
        self._input_qparams: tuple[float, int] = (1.0, 0)

    def set_weight(self, weight: torch.Tensor) -> None:
        q, scale = quantize_weight_per_channel(weight)
        self.weight = q.to(self.weight.device)
        self.weight_scale = scale.to(self.weight.device)
        self.weight_zero_point = torch.zeros(scale.shape, dtype=torch.int64, device=self.weight.device)

    def set_input_qparams(self, scale: float, zero_point: int) -> None:
        if not (scale > 0 and scale < float("inf")) or not ACT_QMIN <= int(zero_point) <= ACT_QMAX:
            raise ValueError(f"activation scale must be positive and finite and the zero point in "
                             f"[{ACT_QMIN}, {ACT_QMAX}], got scale={scale!r}, zero_point={zero_point!r}")
        device = self.input_scale.device
        self.input_scale = torch.tensor(float(scale), dtype=torch.float32, device=device)
        self.input_zero_point = torch.tensor(int(zero_point), dtype=torch.int32, device=device)
        self._input_qparams = (float(self.input_scale), int(zero_point))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if not self.weight_scale.is_meta:
            self.weight_zero_point = torch.zeros(self.weight_scale.shape, dtype=torch.int64,
                                                 device=self.weight_scale.device)
        if not self.input_scale.is_meta:
            self.set_input_qparams(float(self.input_scale), int(self.input_zero_point))

    def _qdq_input(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise RuntimeError(
                f"{type(self).__name__}: int8 quantized models run on the CPU only (got an input on {x.device}); "
                "on a GPU load the float checkpoint and use torch_dtype=torch.float16 or torch.bfloat16 instead"
            )
        return self._dq_uint8(self._quantize_input(x))

    def _quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as the uint8 this layer's input parameters give (what the kernels that feed ``forward_uint8`` take)."""
        scale, zero_point = self._input_qparams
        return _ops().quantize_per_tensor(x, scale, zero_point, ACT_QMIN, ACT_QMAX, torch.uint8)

    def _dq_uint8(self, x: torch.Tensor) -> torch.Tensor:
        scale, zero_point = self._input_qparams
        return _ops().dequantize_per_tensor(x, scale, zero_point, ACT_QMIN, ACT_QMAX, torch.uint8)

    def _dq_weight(self) -> torch.Tensor:
        return _ops().dequantize_per_channel(self.weight, self.weight_scale, self.weight_zero_point, 0,
                                             W_QMIN, W_QMAX, torch.int8)


class Int8Conv2d(_Int8Layer):
    """A ``Conv2d`` with an int8 per-channel weight and a uint8 per-tensor input (QDQ form, see the module doc)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, device=None):
        super().__init__()
        pair = nn.modules.utils._pair
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.dilation = pair(kernel_size), pair(stride), pair(dilation)
        self.padding = padding if isinstance(padding, str) else pair(padding)
        self._init_buffers((out_channels, in_channels // groups, *self.kernel_size), out_channels, bias, device)

    @classmethod
    def from_float(cls, conv: nn.Conv2d) -> "Int8Conv2d":
        if conv.padding_mode != "zeros":
            raise ValueError(f"Int8Conv2d supports padding_mode='zeros' only, got {conv.padding_mode!r}")
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    conv.groups, conv.bias is not None, device=conv.weight.device)
        layer.set_weight(conv.weight)
        if conv.bias is not None:
            layer.bias = nn.Parameter(conv.bias.detach().float().clone(), requires_grad=False)
        return layer

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, bias={self.bias is not None}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, C_in, H, W] -> [B, C_out, H', W']
        return self._conv(self._qdq_input(x))

    def forward_uint8(self, x: torch.Tensor) -> torch.Tensor:
        """The layer on an input already quantized with its input parameters (uint8 ``[B, C_in, H, W]``, what the
        GroupNorm kernel writes): dequantize, conv (the pattern inductor lowers to a oneDNN int8 convolution)."""
        return self._conv(self._dq_uint8(x))

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self._dq_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)


class Int8Linear(_Int8Layer):
    """A ``Linear`` with an int8 per-channel weight and a uint8 per-tensor input (QDQ form, see the module doc)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_buffers((out_features, in_features), out_features, bias, device)
        # the GEGLU kernel's copy of the weight (diffusekit.cpu_int8_geglu), kept only while it is on
        self.register_buffer("geglu_weight", None, persistent=False)
        self.register_buffer("geglu_colsum", None, persistent=False)

    def pack_geglu(self, enable: bool = True) -> bool:
        """Keep (``enable``) or drop the packed copy of the weight that the fused GEGLU kernel reads, when this layer
        is a feed-forward's GEGLU projection (``diffusekit.cpu_int8_geglu``; about the weight's size again). Kept in
        step with :meth:`set_weight` and loads. Returns whether a copy is kept (not for shapes the kernel does not
        take, or a weight on another device than the CPU)."""
        from ..cpu_int8_geglu import pack, packable

        self.geglu_weight = self.geglu_colsum = None
        if not enable or not packable(self) or self.weight.device.type != "cpu":  # (a meta weight is not on the CPU)
            return False
        self.geglu_weight, self.geglu_colsum = pack(self.weight)
        return True

    def set_weight(self, weight: torch.Tensor) -> None:
        super().set_weight(weight)
        if self.geglu_weight is not None:
            self.pack_geglu()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.geglu_weight is not None:
            self.pack_geglu()

    @classmethod
    def from_float(cls, linear: nn.Linear) -> "Int8Linear":
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, device=linear.weight.device)
        layer.set_weight(linear.weight)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().float().clone(), requires_grad=False)
        return layer

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in_features] -> [..., out_features]
        # contiguous: a strided 3-d input (spatial attention: (B, C, HW) transposed) makes aten.linear a bmm, which
        # inductor only folds into an int8 kernel when the dequantized input has no other user
        return F.linear(self._qdq_input(x.contiguous()), self._dq_weight(), self.bias)

    def forward_uint8(self, x: torch.Tensor) -> torch.Tensor:
        """The layer on an input already quantized with its input parameters (uint8 ``[..., in_features]``, what the
        GEGLU kernel writes): dequantize, linear (the pattern inductor lowers to a oneDNN int8 matmul on ``x``)."""
        return F.linear(self._dq_uint8(x), self._dq_weight(), self.bias)


# float layer class -> int8 layer class (exact types: subclasses with their own forward are left alone, but for the
# blocks' convolutions, whose forward only adds the exact path's Winograd choice)
INT8_LAYERS: dict[type, type[_Int8Layer]] = {nn.Conv2d: Int8Conv2d, winograd.Conv2d: Int8Conv2d,
                                             nn.Linear: Int8Linear}
