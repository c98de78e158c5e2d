"""UNet and VAE stages (down / mid / up blocks), registered by their config names.

Models never pick a block with an if-chain: they call ``get_block(kind, name, config_key)`` (see
:mod:`diffusekit.models.registry`) and construct the class with **one uniform set of keyword arguments**, so every
block of a kind fits the same call. Blocks declare the keywords they use and take the rest in ``**extra``, which
they ignore (a cross-attention block consumes ``cross_attention_dim``; a plain block ignores it).

Construction (keyword-only):

* ``kind="down"``: ``in_channels, out_channels, temb_channels, num_layers, add_downsample, resnet_eps,
  resnet_act_fn, resnet_groups, attention_head_dim, downsample_padding, resnet_time_scale_shift, dropout, **extra``
  (``extra`` as passed by the UNets: ``downsample_type``, ``cross_attention_dim``, ``num_attention_heads``,
  ``transformer_layers_per_block``, ``use_linear_projection``, ``only_cross_attention``, ``upcast_attention``, ...).
* ``kind="up"``: the same, with ``prev_output_channel`` (channels coming from the block below) and ``add_upsample``
  instead of ``add_downsample``/``downsample_padding``; ``in_channels`` is the width of the skip connection of the
  last layer. ``extra``: ``upsample_type``, ``resolution_idx``, cross-attention keys.
* ``kind="mid"``: ``in_channels, temb_channels, num_layers, resnet_eps, resnet_act_fn, resnet_groups,
  attention_head_dim, resnet_time_scale_shift, dropout, output_scale_factor, **extra`` (``extra``: ``attn_groups``,
  ``add_attention``, cross-attention keys).

``temb_channels=None`` builds blocks without a time embedding (the VAE). ``attention_head_dim`` is the width of one
head; heads = channels // attention_head_dim (``None``: one head spanning all channels, as diffusers).

Calls:

* down: ``block(hidden_states, temb) -> (hidden_states, res_samples)`` where ``res_samples`` is a tuple of the
  skip tensors it produced (one per layer, plus one after the downsampler). VAE encoder blocks return only
  ``hidden_states``.
* up: ``block(hidden_states, res_hidden_states_tuple, temb, upsample_size=None) -> hidden_states``; it pops one skip
  tensor per layer from the end of the tuple. VAE decoder blocks: ``block(hidden_states, temb=None)``.
* mid: ``block(hidden_states, temb) -> hidden_states``.

Each block has a class attribute ``has_cross_attention``; blocks with ``True`` are also given
``encoder_hidden_states`` (and masks) by the conditional UNet.

Key names (``resnets.N``, ``attentions.N``, ``downsamplers.0.conv``, ``upsamplers.0.conv``) are diffusers'.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import Attention
from .freeu import FreeUSkips
from .registry import register_block
from .resnet import Downsample2D, ResnetBlock2D, Upsample2D


class Checkpointable:
    """Mixin of the UNet / VAE stages: their layers can be recomputed in the backward pass instead of stored.

    ``ModelMixin.enable_gradient_checkpointing()`` sets ``gradient_checkpointing`` and the function used on every
    module that has the attribute (diffusers' mechanism); blocks run each resnet and attention layer through
    :meth:`_layer`. Gradients are the same as without it (dropout masks are replayed from the saved RNG state).
    """

    gradient_checkpointing = False
    _gradient_checkpointing_func = None

    def _layer(self, layer, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(layer, *args)
        return layer(*args)


def _resnet(
    in_channels: int,
    out_channels: int,
    temb_channels: int | None,
    resnet_eps: float,
    resnet_groups: int,
    dropout: float,
    resnet_time_scale_shift: str,
    resnet_act_fn: str,
    output_scale_factor: float,
    **kwargs,
) -> ResnetBlock2D:
    return ResnetBlock2D(
        in_channels=in_channels,
        out_channels=out_channels,
        temb_channels=temb_channels,
        eps=resnet_eps,
        groups=resnet_groups,
        dropout=dropout,
        time_embedding_norm=resnet_time_scale_shift,
        non_linearity=resnet_act_fn,
        output_scale_factor=output_scale_factor,
        **kwargs,
    )


def _spatial_attention(
    channels: int, attention_head_dim: int | None, norm_groups: int | None, eps: float, output_scale_factor: float
) -> Attention:
    """Self-attention over the pixels of a feature map, with its own GroupNorm and a residual connection.

    ``channels // attention_head_dim`` heads of ``attention_head_dim`` channels, as diffusers: a head width that does
    not divide ``channels`` gives a narrower inner width (``to_q``: channels -> heads * head_dim).
    """
    head_dim = attention_head_dim if attention_head_dim is not None else channels
    if head_dim < 1 or channels // head_dim < 1:
        raise ValueError(
            f"attention_head_dim={head_dim} is wider than the block's {channels} channels: that leaves no attention "
            "head (diffusers cannot build this either); use a head width of at most the smallest block width"
        )
    return Attention(
        channels,
        heads=channels // head_dim,
        dim_head=head_dim,
        rescale_output_factor=output_scale_factor,
        eps=eps,
        norm_num_groups=norm_groups,
        residual_connection=True,
        bias=True,
        upcast_softmax=True,
    )


def _up_in_channels(i: int, num_layers: int, in_channels: int, prev_output_channel: int, out_channels: int):
    """(hidden channels, skip channels) entering layer ``i`` of an up block."""
    skip = in_channels if i == num_layers - 1 else out_channels
    hidden = prev_output_channel if i == 0 else out_channels
    return hidden, skip


def skip_layers(block: nn.Module) -> int:
    """The skip tensors a UNet down block yields: one per resnet layer, one more after its downsampler."""
    return len(block.resnets) + (getattr(block, "downsamplers", None) is not None)


def interleaved(num_layers: int, make_resnet, make_attention) -> tuple[nn.ModuleList, nn.ModuleList]:
    """``(resnets, attentions)`` built in diffusers' order: resnet 0, attention 0, resnet 1, attention 1, ...

    Construction order decides which random numbers each layer draws, so this order makes
    ``torch.manual_seed(s); Model(**cfg)`` give the same initial weights as diffusers.
    """
    resnets, attentions = [], []
    for i in range(num_layers):
        resnets.append(make_resnet(i))
        attentions.append(make_attention(i))
    return nn.ModuleList(resnets), nn.ModuleList(attentions)


def mid_interleaved(num_layers: int, make_resnet, make_attention) -> tuple[nn.ModuleList, nn.ModuleList]:
    """Mid blocks' order: resnet 0, then attention i and resnet i + 1 for each layer (``make_resnet(0)`` first)."""
    resnets, attentions = [make_resnet(0)], []
    for i in range(num_layers):
        attention = make_attention(i)
        if attention is not None:
            attentions.append(attention)
        resnets.append(make_resnet(i + 1))
    return nn.ModuleList(resnets), nn.ModuleList(attentions)


# ---------------------------------------------------------------------------------------------------- down


@register_block("down")
class DownBlock2D(nn.Module, Checkpointable):
    """``num_layers`` resnets, then an optional stride-2 conv."""

    runs_layer_ranges = True  # forward(..., stop=) (up blocks: start= too): part of the layers, for feature caching

    has_cross_attention = False

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
        **extra,
    ):
        super().__init__()
        common = (temb_channels, resnet_eps, resnet_groups, dropout, resnet_time_scale_shift, resnet_act_fn)
        self.resnets = nn.ModuleList(
            _resnet(in_channels if i == 0 else out_channels, out_channels, *common, output_scale_factor)
            for i in range(num_layers)
        )
        self.downsamplers = (
            nn.ModuleList([Downsample2D(out_channels, use_conv=True, padding=downsample_padding)])
            if add_downsample
            else None
        )

    def forward(
        self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None, stop: int | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """``stop``: run only the first ``stop`` layers (the downsampler is the last one), for feature caching."""
        stop = skip_layers(self) if stop is None else stop
        res_samples: tuple[torch.Tensor, ...] = ()
        for resnet in self.resnets[:stop]:
            hidden_states = self._layer(resnet, hidden_states, temb)  # (B, C_out, H, W)
            res_samples += (hidden_states,)
        if self.downsamplers is not None and stop > len(self.resnets):
            hidden_states = self.downsamplers[0](hidden_states)  # (B, C_out, H/2, W/2)
            res_samples += (hidden_states,)
        return hidden_states, res_samples


@register_block("down")
class AttnDownBlock2D(nn.Module, Checkpointable):
    """``num_layers`` x (resnet -> spatial self-attention), then a downsampler.

    ``downsample_type``: ``"conv"`` (stride-2 conv, default) or ``"resnet"`` (a resnet with ``down=True``).
    """

    has_cross_attention = False

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
        attention_head_dim: int | None = 1,
        downsample_padding: int = 1,
        resnet_time_scale_shift: str = "default",
        dropout: float = 0.0,
        output_scale_factor: float = 1.0,
        downsample_type: str | None = "conv",
        **extra,
    ):
        super().__init__()
        common = (temb_channels, resnet_eps, resnet_groups, dropout, resnet_time_scale_shift, resnet_act_fn)
        resnets, attentions = interleaved(
            num_layers,
            lambda i: _resnet(in_channels if i == 0 else out_channels, out_channels, *common, output_scale_factor),
            lambda i: _spatial_attention(out_channels, attention_head_dim, resnet_groups, resnet_eps, output_scale_factor),
        )
        self.attentions, self.resnets = attentions, resnets  # diffusers' registration (state dict) order
        downsample_type = (downsample_type or "conv") if add_downsample else None
        if downsample_type == "conv":
            self.downsamplers = nn.ModuleList([Downsample2D(out_channels, use_conv=True, padding=downsample_padding)])
        elif downsample_type == "resnet":
            resnet = _resnet(out_channels, out_channels, *common, output_scale_factor, down=True)
            self.downsamplers = nn.ModuleList([resnet])
        elif downsample_type is None:
            self.downsamplers = None
        else:
            raise ValueError(f"unknown downsample_type {downsample_type!r}; expected 'conv' or 'resnet'")
        self.downsample_type = downsample_type

    def forward(
        self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        res_samples: tuple[torch.Tensor, ...] = ()
        for resnet, attn in zip(self.resnets, self.attentions):
            hidden_states = self._layer(attn, self._layer(resnet, hidden_states, temb))  # (B, C_out, H, W)
            res_samples += (hidden_states,)
        if self.downsamplers is not None:
            down = self.downsamplers[0]
            hidden_states = down(hidden_states, temb) if self.downsample_type == "resnet" else down(hidden_states)
            res_samples += (hidden_states,)
        return hidden_states, res_samples


@register_block("down")
class DownEncoderBlock2D(DownBlock2D):
    """VAE encoder stage: a :class:`DownBlock2D` without time embedding, returning only the hidden states."""

    def __init__(self, *, temb_channels: int | None = None, **kwargs):
        super().__init__(temb_channels=None, **kwargs)

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        for resnet in self.resnets:
            hidden_states = self._layer(resnet, hidden_states, None)  # (B, C_out, H, W)
        if self.downsamplers is not None:
            hidden_states = self.downsamplers[0](hidden_states)  # (B, C_out, H/2, W/2)
        return hidden_states


# ---------------------------------------------------------------------------------------------------- mid


@register_block("mid")
class UNetMidBlock2D(nn.Module, Checkpointable):
    """resnet, then ``num_layers`` x (spatial self-attention -> resnet), at constant resolution.

    ``attn_groups`` (GroupNorm groups of the attentions) defaults to ``resnet_groups`` with
    ``resnet_time_scale_shift="default"`` and to *no* attention norm otherwise, as diffusers.
    ``resnet_groups=None`` means ``min(in_channels // 4, 32)``. ``add_attention=False`` keeps only the resnets.
    """

    has_cross_attention = False

    def __init__(
        self,
        *,
        in_channels: int,
        temb_channels: int | None,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_act_fn: str = "swish",
        resnet_groups: int | None = 32,
        attention_head_dim: int | None = 1,
        resnet_time_scale_shift: str = "default",
        dropout: float = 0.0,
        output_scale_factor: float = 1.0,
        attn_groups: int | None = None,
        add_attention: bool = True,
        **extra,
    ):
        super().__init__()
        resnet_groups = resnet_groups if resnet_groups is not None else min(in_channels // 4, 32)
        if attn_groups is None:
            attn_groups = resnet_groups if resnet_time_scale_shift == "default" else None
        common = (temb_channels, resnet_eps, resnet_groups, dropout, resnet_time_scale_shift, resnet_act_fn)
        self.add_attention = add_attention
        # without attention, diffusers keeps a list of None placeholders; an empty list has the same keys
        resnets, attentions = mid_interleaved(
            num_layers,
            lambda i: _resnet(in_channels, in_channels, *common, output_scale_factor),
            lambda i: (
                _spatial_attention(in_channels, attention_head_dim, attn_groups, resnet_eps, output_scale_factor)
                if add_attention
                else None
            ),
        )
        self.attentions, self.resnets = attentions, resnets  # diffusers' registration (state dict) order

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        hidden_states = self._layer(self.resnets[0], hidden_states, temb)  # (B, C, H, W)
        for i, resnet in enumerate(self.resnets[1:]):
            if self.add_attention:
                hidden_states = self._layer(self.attentions[i], hidden_states)
            hidden_states = self._layer(resnet, hidden_states, temb)
        return hidden_states


# ---------------------------------------------------------------------------------------------------- up


@register_block("up")
class UpBlock2D(nn.Module, Checkpointable, FreeUSkips):
    """``num_layers`` resnets, each on ``cat(hidden, skip)``, then an optional 2x upsampler."""

    runs_layer_ranges = True  # forward(..., stop=) (up blocks: start= too): part of the layers, for feature caching

    has_cross_attention = False

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
        **extra,
    ):
        super().__init__()
        common = (temb_channels, resnet_eps, resnet_groups, dropout, resnet_time_scale_shift, resnet_act_fn)
        resnets = []
        for i in range(num_layers):
            hidden, skip = _up_in_channels(i, num_layers, in_channels, prev_output_channel, out_channels)
            resnets.append(_resnet(hidden + skip, out_channels, *common, output_scale_factor))
        self.resnets = nn.ModuleList(resnets)
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels, use_conv=True)]) if add_upsample else None
        self.resolution_idx = extra.get("resolution_idx")  # FreeU's stage (models/freeu.py)

    def forward(
        self,
        hidden_states: torch.Tensor,
        res_hidden_states_tuple: tuple[torch.Tensor, ...],
        temb: torch.Tensor | None = None,
        upsample_size: tuple[int, int] | None = None,
        start: int = 0,
        stop: int | None = None,
    ) -> torch.Tensor:
        """``start`` / ``stop``: run only layers ``start`` to ``stop`` (``hidden_states`` enters layer ``start``;
        ``res_hidden_states_tuple`` holds those layers' skips; the upsampler runs with the last layer), for feature
        caching."""
        stop = len(self.resnets) if stop is None else stop
        for resnet in self.resnets[start:stop]:
            skip, res_hidden_states_tuple = res_hidden_states_tuple[-1], res_hidden_states_tuple[:-1]
            hidden_states = self._layer(resnet, self._join(hidden_states, skip), temb)  # (B, C_out, H, W)
        if self.upsamplers is not None and stop == len(self.resnets):
            hidden_states = self.upsamplers[0](hidden_states, upsample_size)  # (B, C_out, 2H, 2W)
        return hidden_states


@register_block("up")
class AttnUpBlock2D(nn.Module, Checkpointable):
    """``num_layers`` x (resnet on ``cat(hidden, skip)`` -> spatial self-attention), then an upsampler.

    ``upsample_type``: ``"conv"`` (nearest 2x + conv, default) or ``"resnet"`` (a resnet with ``up=True``).
    """

    has_cross_attention = False

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
        attention_head_dim: int | None = 1,
        resnet_time_scale_shift: str = "default",
        dropout: float = 0.0,
        output_scale_factor: float = 1.0,
        upsample_type: str | None = "conv",
        **extra,
    ):
        super().__init__()
        common = (temb_channels, resnet_eps, resnet_groups, dropout, resnet_time_scale_shift, resnet_act_fn)

        def resnet(i: int) -> ResnetBlock2D:
            hidden, skip = _up_in_channels(i, num_layers, in_channels, prev_output_channel, out_channels)
            return _resnet(hidden + skip, out_channels, *common, output_scale_factor)

        resnets, attentions = interleaved(
            num_layers,
            resnet,
            lambda i: _spatial_attention(out_channels, attention_head_dim, resnet_groups, resnet_eps, output_scale_factor),
        )
        self.attentions, self.resnets = attentions, resnets  # diffusers' registration (state dict) order
        upsample_type = (upsample_type or "conv") if add_upsample else None
        if upsample_type == "conv":
            self.upsamplers = nn.ModuleList([Upsample2D(out_channels, use_conv=True)])
        elif upsample_type == "resnet":
            resnet = _resnet(out_channels, out_channels, *common, output_scale_factor, up=True)
            self.upsamplers = nn.ModuleList([resnet])
        elif upsample_type is None:
            self.upsamplers = None
        else:
            raise ValueError(f"unknown upsample_type {upsample_type!r}; expected 'conv' or 'resnet'")
        self.upsample_type = upsample_type

    def forward(
        self,
        hidden_states: torch.Tensor,
        res_hidden_states_tuple: tuple[torch.Tensor, ...],
        temb: torch.Tensor | None = None,
        upsample_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        for resnet, attn in zip(self.resnets, self.attentions):
            skip, res_hidden_states_tuple = res_hidden_states_tuple[-1], res_hidden_states_tuple[:-1]
            hidden_states = self._layer(attn, self._layer(resnet, torch.cat([hidden_states, skip], dim=1), temb))
        if self.upsamplers is not None:
            up = self.upsamplers[0]
            hidden_states = up(hidden_states, temb) if self.upsample_type == "resnet" else up(hidden_states)
        return hidden_states


@register_block("up")
class UpDecoderBlock2D(nn.Module, Checkpointable):
    """VAE decoder stage: ``num_layers`` resnets (no skip connections), then an optional 2x upsampler."""

    has_cross_attention = False

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        prev_output_channel: int | None = None,
        temb_channels: int | None = None,
        num_layers: int = 1,
        add_upsample: bool = True,
        resnet_eps: float = 1e-6,
        resnet_act_fn: str = "swish",
        resnet_groups: int = 32,
        attention_head_dim: int | None = None,
        resnet_time_scale_shift: str = "default",
        dropout: float = 0.0,
        output_scale_factor: float = 1.0,
        **extra,
    ):
        super().__init__()
        common = (temb_channels, resnet_eps, resnet_groups, dropout, resnet_time_scale_shift, resnet_act_fn)
        self.resnets = nn.ModuleList(
            _resnet(in_channels if i == 0 else out_channels, out_channels, *common, output_scale_factor)
            for i in range(num_layers)
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels, use_conv=True)]) if add_upsample else None

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        for resnet in self.resnets:
            hidden_states = self._layer(resnet, hidden_states, temb)  # (B, C_out, H, W)
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states)  # (B, C_out, 2H, 2W)
        return hidden_states
