"""Residual block and 2x resampling layers shared by the UNets and the VAE (diffusers' key names)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import winograd
from .normalization import GroupNorm, norm_act_conv

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "swish": nn.SiLU,
    "silu": nn.SiLU,
    "mish": nn.Mish,
    "gelu": nn.GELU,
    "relu": nn.ReLU,
}


def get_activation(name: str) -> nn.Module:
    """An activation module from its config name (``"silu"``/``"swish"``, ``"mish"``, ``"gelu"``, ``"relu"``)."""
    try:
        return _ACTIVATIONS[name.lower()]()
    except KeyError:
        raise ValueError(f"unknown activation function {name!r}; supported: {sorted(_ACTIVATIONS)}") from None


class Downsample2D(nn.Module):
    """Halve height and width: a stride-2 3x3 conv (key ``conv``), or 2x2 average pooling when ``use_conv=False``.

    ``padding=0`` pads one pixel on the right and bottom first (the original DDPM / LDM convention).
    ``name`` is accepted for diffusers compatibility; the conv is stored as ``conv`` whatever it is (diffusers'
    checkpoints of the configs in scope use ``conv``).
    """

    def __init__(
        self,
        channels: int,
        use_conv: bool = True,
        out_channels: int | None = None,
        padding: int = 1,
        name: str = "conv",
        kernel_size: int = 3,
        bias: bool = True,
    ):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.padding = padding
        if use_conv:
            self.conv = nn.Conv2d(channels, self.out_channels, kernel_size, stride=2, padding=padding, bias=bias)
        else:
            if self.out_channels != channels:
                raise ValueError("Downsample2D without a conv cannot change the channel count")
            self.conv = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.shape[1] != self.channels:
            raise ValueError(f"Downsample2D expects {self.channels} channels, got {hidden_states.shape[1]}")
        if self.use_conv and self.padding == 0:
            hidden_states = F.pad(hidden_states, (0, 1, 0, 1))  # (B, C, H+1, W+1)
        return self.conv(hidden_states)  # (B, C_out, H/2, W/2)


class Upsample2D(nn.Module):
    """Double height and width by nearest-neighbour interpolation, then an optional 3x3 conv (key ``conv``).

    ``forward(x, output_size)`` interpolates to ``output_size`` instead of 2x (used when a UNet input is not a
    multiple of its total downsampling factor).

    ``fused_upsample``: ``None`` until ``optimize()`` of a float ``UNet2DConditionModel`` on the CPU sets it; where
    True, a 2x call whose convolution :func:`winograd.upsample_gemm_pays` runs as :func:`winograd.upsample_conv2d` (the
    convolution of the upsampled image computed on the input itself, 2.25x fewer multiply-adds).
    """

    def __init__(
        self,
        channels: int,
        use_conv: bool = True,
        out_channels: int | None = None,
        name: str = "conv",
        kernel_size: int = 3,
        padding: int = 1,
        bias: bool = True,
    ):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = winograd.Conv2d(channels, self.out_channels, kernel_size, padding=padding, bias=bias)
        else:
            self.conv = None
        self.fused_upsample: bool | None = None

    def forward(self, hidden_states: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        if hidden_states.shape[1] != self.channels:
            raise ValueError(f"Upsample2D expects {self.channels} channels, got {hidden_states.shape[1]}")
        if (self.fused_upsample and output_size is None and self.conv is not None
                and winograd.upsample_gemm_pays(self.conv, hidden_states)):
            return winograd.upsample_conv2d(hidden_states, self.conv.weight, self.conv.bias)  # (B, C_out, 2H, 2W)
        if output_size is None:
            hidden_states = F.interpolate(hidden_states, scale_factor=2.0, mode="nearest")  # (B, C, 2H, 2W)
        else:
            hidden_states = F.interpolate(hidden_states, size=output_size, mode="nearest")
        if self.conv is not None:
            hidden_states = self.conv(hidden_states)  # (B, C_out, 2H, 2W)
        return hidden_states


class ResnetBlock2D(nn.Module):
    """GroupNorm -> act -> conv -> (+ time embedding) -> GroupNorm -> act -> dropout -> conv, plus a shortcut.

    Args (diffusers' names):
        in_channels, out_channels: channels in and out (``out_channels=None``: same as in).
        temb_channels: width of the time embedding; ``None`` for blocks without one (the VAE).
        groups, groups_out: groups of ``norm1`` and ``norm2`` (``groups_out=None``: ``groups``).
        eps: GroupNorm epsilon. non_linearity: activation name. dropout: before ``conv2``.
        time_embedding_norm: ``"default"`` adds the projected embedding before ``norm2``; ``"scale_shift"`` projects
            to ``2 * out_channels`` and applies ``norm2(h) * (1 + scale) + shift``.
        skip_time_act: do not apply the activation to ``temb`` before ``time_emb_proj``.
        output_scale_factor: the sum ``shortcut + residual`` is divided by it.
        use_in_shortcut: force (or forbid) the 1x1 ``conv_shortcut``; by default present when channels change.
        up, down: resample inside the block (nearest 2x / 2x2 average pooling, no weights).
        conv_shortcut_bias: bias of ``conv_shortcut``. conv_2d_out_channels: output channels of ``conv2``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        temb_channels: int | None = 512,
        groups: int = 32,
        groups_out: int | None = None,
        eps: float = 1e-6,
        dropout: float = 0.0,
        non_linearity: str = "swish",
        time_embedding_norm: str = "default",
        output_scale_factor: float = 1.0,
        use_in_shortcut: bool | None = None,
        conv_shortcut_bias: bool = True,
        skip_time_act: bool = False,
        up: bool = False,
        down: bool = False,
        conv_2d_out_channels: int | None = None,
        conv_shortcut: bool = False,  # accepted for diffusers compatibility: the shortcut is always a 1x1 conv
        pre_norm: bool = True,  # accepted for diffusers compatibility: always pre-norm
        kernel: str | None = None,
    ):
        super().__init__()
        if time_embedding_norm not in ("default", "scale_shift"):
            raise ValueError(
                f"ResnetBlock2D: unsupported time_embedding_norm {time_embedding_norm!r}; "
                "use 'default' or 'scale_shift'"
            )
        if kernel not in (None, "sde_vp"):
            raise ValueError(f"ResnetBlock2D: unsupported resampling kernel {kernel!r}")
        out_channels = in_channels if out_channels is None else out_channels
        conv_2d_out_channels = conv_2d_out_channels or out_channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.time_embedding_norm = time_embedding_norm
        self.output_scale_factor = output_scale_factor
        self.skip_time_act = skip_time_act
        self.up, self.down = up, down

        self.norm1 = GroupNorm(num_groups=groups, num_channels=in_channels, eps=eps, affine=True)
        self.conv1 = winograd.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if temb_channels is None:
            self.time_emb_proj = None
        else:
            proj_out = 2 * out_channels if time_embedding_norm == "scale_shift" else out_channels
            self.time_emb_proj = nn.Linear(temb_channels, proj_out)
        self.norm2 = GroupNorm(num_groups=groups_out or groups, num_channels=out_channels, eps=eps, affine=True)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = winograd.Conv2d(out_channels, conv_2d_out_channels, kernel_size=3, stride=1, padding=1)
        self.nonlinearity = get_activation(non_linearity)

        # weightless resampling (the "resnet" down/upsample types)
        self.upsample = Upsample2D(in_channels, use_conv=False) if up else None
        self.downsample = Downsample2D(in_channels, use_conv=False) if down and not up else None

        if use_in_shortcut is None:
            use_in_shortcut = in_channels != conv_2d_out_channels
        self.conv_shortcut = (
            nn.Conv2d(in_channels, conv_2d_out_channels, kernel_size=1, stride=1, padding=0, bias=conv_shortcut_bias)
            if use_in_shortcut
            else None
        )

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        # input_tensor: (B, C_in, H, W); temb: (B, temb_channels) or None
        if self.upsample is None and self.downsample is None:
            hidden_states = norm_act_conv(self.norm1, self.nonlinearity, self.conv1, input_tensor)  # (B, C_out, H, W)
        else:
            hidden_states = self.nonlinearity(self.norm1(input_tensor))
            if self.upsample is not None:
                input_tensor = self.upsample(input_tensor)
                hidden_states = self.upsample(hidden_states)
            else:
                input_tensor = self.downsample(input_tensor)
                hidden_states = self.downsample(hidden_states)
            hidden_states = self.conv1(hidden_states)  # (B, C_out, H, W)

        if self.time_emb_proj is not None and temb is not None:
            if not self.skip_time_act:
                temb = self.nonlinearity(temb)
            temb = self.time_emb_proj(temb)[:, :, None, None]  # (B, C_out or 2*C_out, 1, 1)
        else:
            temb = None

        if self.time_embedding_norm == "scale_shift":
            if temb is None:
                raise ValueError("ResnetBlock2D with time_embedding_norm='scale_shift' needs a time embedding")
            scale, shift = temb.chunk(2, dim=1)
            hidden_states = self.norm2(hidden_states) * (1 + scale) + shift
            hidden_states = self.conv2(self.dropout(self.nonlinearity(hidden_states)))  # (B, C_out, H, W)
        else:  # conv2(dropout(act(norm2(h + temb))))
            hidden_states = norm_act_conv(self.norm2, self.nonlinearity, self.conv2, hidden_states, temb, self.dropout)
        shortcut = input_tensor if self.conv_shortcut is None else self.conv_shortcut(input_tensor)
        return (shortcut + hidden_states) / self.output_scale_factor
