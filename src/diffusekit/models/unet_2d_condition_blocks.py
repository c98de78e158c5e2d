"""Cross-attention UNet stages of Stable Diffusion: each resnet is followed by a spatial ``Transformer2DModel``.

Registered in the block registry under diffusers' names (``CrossAttnDownBlock2D``, ``UNetMidBlock2DCrossAttn``,
``CrossAttnUpBlock2D``) and built with the uniform keyword convention of :mod:`diffusekit.models.unet_blocks`. The
cross-attention keywords they consume from ``extra``:

* ``num_attention_heads`` heads of every transformer (each head is ``out_channels // num_attention_heads`` wide);
* ``cross_attention_dim`` width of ``encoder_hidden_states``;
* ``transformer_layers_per_block`` transformer blocks per layer: an int, or one int per layer;
* ``use_linear_projection``, ``only_cross_attention``, ``upcast_attention`` (see ``Transformer2DModel``).

``attention_head_dim`` is accepted and ignored, as in diffusers (the SD UNet passes heads via
``num_attention_heads``). Calls add ``encoder_hidden_states``, ``attention_mask`` and ``encoder_attention_mask`` to
the plain blocks' calls; the down block also takes ``additional_residuals`` (T2I-Adapter features added after its
last layer).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .freeu import FreeUSkips
from .registry import register_block
from .resnet import Downsample2D, Upsample2D
from .transformer_2d import Transformer2DModel
from .unet_blocks import Checkpointable, _resnet, _up_in_channels, interleaved, mid_interleaved, skip_layers


def _layers_list(transformer_layers_per_block: int | Sequence[int], num_layers: int) -> list[int]:
    """An int (same for every layer) or one value per layer -> a list of ``num_layers`` ints.

    A longer list is accepted and its first ``num_layers`` values used, as diffusers (the mid block of an asymmetric
    UNet gets the last down block's per-layer list).
    """
    if isinstance(transformer_layers_per_block, int):
        return [transformer_layers_per_block] * num_layers
    layers = list(transformer_layers_per_block)
    if len(layers) < num_layers:
        raise ValueError(
            f"transformer_layers_per_block {layers} must give one value per layer of the block ({num_layers})"
        )
    return layers[:num_layers]


class _CrossAttnLayers:
    """Builders shared by the three block classes (a mixin: no state, no keys)."""

    _resnet = staticmethod(_resnet)  # the same resnet builder as the other UNet blocks

    @staticmethod
    def _transformer(
        channels: int,
        num_attention_heads: int,
        num_layers: int,
        cross_attention_dim: int,
        norm_num_groups: int,
        use_linear_projection: bool,
        only_cross_attention: bool,
        upcast_attention: bool,
    ) -> Transformer2DModel:
        if not isinstance(num_attention_heads, int) or not 1 <= num_attention_heads <= channels:
            raise ValueError(
                f"a block with {channels} channels cannot have {num_attention_heads} attention heads "
                "(attention_head_dim of the UNet config is the head count of each block; diffusers cannot build "
                "this either); use between 1 and the block's channel count"
            )
        # heads of channels // heads channels each, as diffusers; a non-divisor gives a narrower inner width
        return Transformer2DModel(
            num_attention_heads,
            channels // num_attention_heads,  # (sic) diffusers' "attention_head_dim" is the head count here
            in_channels=channels,
            num_layers=num_layers,
            cross_attention_dim=cross_attention_dim,
            norm_num_groups=norm_num_groups,
            use_linear_projection=use_linear_projection,
            only_cross_attention=only_cross_attention,
            upcast_attention=upcast_attention,
        )


# ---------------------------------------------------------------------------------------------------- down


@register_block("down")
class CrossAttnDownBlock2D(nn.Module, _CrossAttnLayers, Checkpointable):
    """``num_layers`` x (resnet -> transformer), then an optional stride-2 conv; returns every layer's output."""

    has_cross_attention = True
    runs_layer_ranges = True  # forward(..., stop=) (up blocks: start= too): part of the layers, for feature caching

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        temb_channels: int | None,
        num_layers: int = 1,
        add_downsample: bool = True,
        resnet_eps: float = 1e-6,
        resnet_act_fn: str = "swish",
        resnet_groups: int = 32,
        attention_head_dim: int | None = None,
        downsample_padding: int = 1,
        resnet_time_scale_shift: str = "default",
        dropout: float = 0.0,
        output_scale_factor: float = 1.0,
        num_attention_heads: int = 1,
        cross_attention_dim: int = 1280,
        transformer_layers_per_block: int | Sequence[int] = 1,
        use_linear_projection: bool = False,
        only_cross_attention: bool = False,
        upcast_attention: bool = False,
        **extra,
    ):
        super().__init__()
        self.num_attention_heads = num_attention_heads
        depth = _layers_list(transformer_layers_per_block, num_layers)
        resnet = (temb_channels, resnet_eps, resnet_groups, dropout, resnet_time_scale_shift, resnet_act_fn)
        resnets, attentions = interleaved(
            num_layers,
            lambda i: self._resnet(in_channels if i == 0 else out_channels, out_channels, *resnet, output_scale_factor),
            lambda i: self._transformer(
                out_channels, num_attention_heads, depth[i], cross_attention_dim, resnet_groups,
                use_linear_projection, only_cross_attention, upcast_attention,
            ),
        )
        self.attentions, self.resnets = attentions, resnets  # diffusers' registration (state dict) order
        self.downsamplers = (
            nn.ModuleList([Downsample2D(out_channels, use_conv=True, padding=downsample_padding)])
            if add_downsample
            else None
        )

    def forward(
        self,
        hidden_states: torch.Tensor,  # (B, C_in, H, W)
        temb: torch.Tensor | None = None,  # (B, temb_channels)
        encoder_hidden_states: torch.Tensor | None = None,  # (B, S, cross_attention_dim)
        attention_mask: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        additional_residuals: torch.Tensor | None = None,  # (B, C_out, H, W)
        stop: int | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """``stop``: run only the first ``stop`` layers (the downsampler is the last one), for feature caching."""
        stop = skip_layers(self) if stop is None else stop
        res_samples: tuple[torch.Tensor, ...] = ()
        last = len(self.resnets) - 1
        for i, (resnet, attn) in enumerate(zip(self.resnets, self.attentions)):
            if i >= stop:
                return hidden_states, res_samples
            hidden_states = self._layer(resnet, hidden_states, temb)  # (B, C_out, H, W)
            hidden_states = self._layer(
                attn, hidden_states, encoder_hidden_states, attention_mask, encoder_attention_mask
            )
            if i == last and additional_residuals is not None:
                hidden_states = hidden_states + additional_residuals
            res_samples += (hidden_states,)
        if self.downsamplers is not None and stop > len(self.resnets):
            hidden_states = self.downsamplers[0](hidden_states)  # (B, C_out, H/2, W/2)
            res_samples += (hidden_states,)
        return hidden_states, res_samples


# ---------------------------------------------------------------------------------------------------- mid


@register_block("mid")
class UNetMidBlock2DCrossAttn(nn.Module, _CrossAttnLayers, Checkpointable):
    """resnet, then ``num_layers`` x (transformer -> resnet), at constant resolution and width.

    ``resnet_groups=None`` means ``min(in_channels // 4, 32)``; ``resnet_groups_out`` (default ``resnet_groups``) is
    used by the transformers and every resnet but the first one's ``norm1``, as diffusers.
    """

    has_cross_attention = True

    def __init__(
        self,
        *,
        in_channels: int,
        temb_channels: int | None,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_act_fn: str = "swish",
        resnet_groups: int | None = 32,
        attention_head_dim: int | None = None,
        resnet_time_scale_shift: str = "default",
        dropout: float = 0.0,
        output_scale_factor: float = 1.0,
        out_channels: int | None = None,
        resnet_groups_out: int | None = None,
        num_attention_heads: int = 1,
        cross_attention_dim: int = 1280,
        transformer_layers_per_block: int | Sequence[int] = 1,
        use_linear_projection: bool = False,
        upcast_attention: bool = False,
        **extra,  # only_cross_attention is not used by this block, as in diffusers
    ):
        super().__init__()
        out_channels = out_channels or in_channels
        self.num_attention_heads = num_attention_heads
        groups = resnet_groups if resnet_groups is not None else min(in_channels // 4, 32)
        groups_out = resnet_groups_out or groups
        depth = _layers_list(transformer_layers_per_block, num_layers)
        common = (temb_channels, resnet_eps)
        rest = (dropout, resnet_time_scale_shift, resnet_act_fn, output_scale_factor)
        resnets, attentions = mid_interleaved(
            num_layers,
            lambda i: (
                self._resnet(in_channels, out_channels, *common, groups, *rest, groups_out=groups_out)
                if i == 0
                else self._resnet(out_channels, out_channels, *common, groups_out, *rest)
            ),
            lambda i: self._transformer(
                out_channels, num_attention_heads, depth[i], cross_attention_dim, groups_out,
                use_linear_projection, False, upcast_attention,
            ),
        )
        self.attentions, self.resnets = attentions, resnets  # diffusers' registration (state dict) order

    def forward(
        self,
        hidden_states: torch.Tensor,  # (B, C, H, W)
        temb: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden_states = self._layer(self.resnets[0], hidden_states, temb)  # (B, C_out, H, W)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            hidden_states = self._layer(
                attn, hidden_states, encoder_hidden_states, attention_mask, encoder_attention_mask
            )
            hidden_states = self._layer(resnet, hidden_states, temb)
        return hidden_states


# ---------------------------------------------------------------------------------------------------- up


@register_block("up")
class CrossAttnUpBlock2D(nn.Module, _CrossAttnLayers, Checkpointable, FreeUSkips):
    """``num_layers`` x (resnet on ``cat(hidden, skip)`` -> transformer), then an optional 2x upsampler."""

    has_cross_attention = True
    runs_layer_ranges = True  # forward(..., stop=) (up blocks: start= too): part of the layers, for feature caching

    def __init__(
        self,
        *,
        in_channels: int,
        prev_output_channel: int,
        out_channels: int,
        temb_channels: int | None,
        num_layers: int = 1,
        add_upsample: bool = True,
        resnet_eps: float = 1e-6,
        resnet_act_fn: str = "swish",
        resnet_groups: int = 32,
        attention_head_dim: int | None = None,
        resnet_time_scale_shift: str = "default",
        dropout: float = 0.0,
        output_scale_factor: float = 1.0,
        num_attention_heads: int = 1,
        cross_attention_dim: int = 1280,
        transformer_layers_per_block: int | Sequence[int] = 1,
        use_linear_projection: bool = False,
        only_cross_attention: bool = False,
        upcast_attention: bool = False,
        **extra,
    ):
        super().__init__()
        self.num_attention_heads = num_attention_heads
        depth = _layers_list(transformer_layers_per_block, num_layers)
        resnet = (temb_channels, resnet_eps, resnet_groups, dropout, resnet_time_scale_shift, resnet_act_fn)

        def make_resnet(i: int) -> nn.Module:
            hidden, skip = _up_in_channels(i, num_layers, in_channels, prev_output_channel, out_channels)
            return self._resnet(hidden + skip, out_channels, *resnet, output_scale_factor)

        resnets, attentions = interleaved(
            num_layers,
            make_resnet,
            lambda i: self._transformer(
                out_channels, num_attention_heads, depth[i], cross_attention_dim, resnet_groups,
                use_linear_projection, only_cross_attention, upcast_attention,
            ),
        )
        self.attentions, self.resnets = attentions, resnets  # diffusers' registration (state dict) order
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels, use_conv=True)]) if add_upsample else None
        self.resolution_idx = extra.get("resolution_idx")  # FreeU's stage (models/freeu.py)

    def forward(
        self,
        hidden_states: torch.Tensor,  # (B, C_prev, H, W)
        res_hidden_states_tuple: tuple[torch.Tensor, ...],
        temb: torch.Tensor | None = None,
        upsample_size: tuple[int, int] | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        start: int = 0,
        stop: int | None = None,
    ) -> torch.Tensor:
        """``start`` / ``stop``: run only layers ``start`` to ``stop`` (``hidden_states`` enters layer ``start``;
        ``res_hidden_states_tuple`` holds those layers' skips; the upsampler runs with the last layer), for feature
        caching."""
        stop = len(self.resnets) if stop is None else stop
        for resnet, attn in zip(self.resnets[start:stop], self.attentions[start:stop]):
            skip, res_hidden_states_tuple = res_hidden_states_tuple[-1], res_hidden_states_tuple[:-1]
            hidden_states = self._layer(resnet, self._join(hidden_states, skip), temb)  # (B, C_out, H, W)
            hidden_states = self._layer(
                attn, hidden_states, encoder_hidden_states, attention_mask, encoder_attention_mask
            )
        if self.upsamplers is not None and stop == len(self.resnets):
            hidden_states = self.upsamplers[0](hidden_states, upsample_size)  # (B, C_out, 2H, 2W)
        return hidden_states
