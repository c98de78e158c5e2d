"""The spatial transformer of Stable Diffusion UNets: ``Transformer2DModel`` over continuous (B, C, H, W) input.

Only the variant SD 1.x / 2.x UNets use is implemented: GroupNorm, a 1x1 conv (or linear) projection in, a stack of
``BasicTransformerBlock`` (self-attention, cross-attention, GEGLU feed-forward, each pre-LayerNorm and residual), a
projection out and a residual around the whole. Module names are diffusers' checkpoint keys::

    norm, proj_in, transformer_blocks.{i}.{norm1,attn1,norm2,attn2,norm3,ff.net.0.proj,ff.net.2}, proj_out
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention
from .normalization import GroupNorm, norm_act_conv


def mask_to_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A keep-mask ``(B, K)`` (1/True = attend) -> an additive bias ``(B, 1, K)`` (0 keep, -10000 drop).

    Masks of any other rank are taken to be biases already and returned unchanged (diffusers' convention).
    """
    if mask is None or mask.ndim != 2:
        return mask
    return ((1 - mask.to(dtype)) * -10000.0).unsqueeze(1)  # (B, 1, K)


class GEGLU(nn.Module):
    """``x -> a * gelu(g)`` where ``[a, g] = proj(x)``; one linear layer produces both halves."""

    def __init__(self, dim_in: int, dim_out: int, bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2, bias=bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(hidden_states).chunk(2, dim=-1)  # (B, N, dim_out) each
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """``net = [GEGLU(dim -> 4 dim), Dropout, Linear(4 dim -> dim)]`` (keys ``net.0.proj``, ``net.2``).

    ``cpu_kernel`` (``None``: not chosen, off): once the two linear layers are int8 (``diffusekit.quantization``),
    run the first, GEGLU and the second's input quantization as one CPU kernel (``diffusekit.cpu_int8_geglu``);
    ``optimize()`` of a quantized model turns it on where the kernel runs. Float layers ignore it.
    """

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        inner_dim = dim * mult
        self.net = nn.ModuleList(
            [GEGLU(dim, inner_dim, bias=bias), nn.Dropout(dropout), nn.Linear(inner_dim, dim, bias=bias)]
        )
        self._cpu_kernel: bool | None = None

    @property
    def cpu_kernel(self) -> bool | None:
        return self._cpu_kernel

    @cpu_kernel.setter
    def cpu_kernel(self, on: bool | None) -> None:
        self._cpu_kernel = on
        pack = getattr(self.net[0].proj, "pack_geglu", None)  # int8 layers keep the kernel's copy of the weight
        if pack is not None:
            pack(bool(on) and hasattr(self.net[2], "forward_uint8"))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self._cpu_kernel:
            from .. import cpu_int8_geglu

            if cpu_int8_geglu.serves(self.net[0].proj, self.net[2], hidden_states):
                return cpu_int8_geglu.feed_forward(self.net[0].proj, self.net[2], hidden_states)
        for layer in self.net:
            hidden_states = layer(hidden_states)
        return hidden_states


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block: ``x += attn1(norm1 x)``; ``x += attn2(norm2 x, context)``; ``x += ff(norm3 x)``.

    ``only_cross_attention`` makes ``attn1`` attend to the context too (no self-attention at all). Without a
    ``cross_attention_dim`` there is no ``norm2``/``attn2``.
    """

    def __init__(
        self,
        dim: int,
        num_attention_heads: int,
        attention_head_dim: int,
        dropout: float = 0.0,
        cross_attention_dim: int | None = None,
        attention_bias: bool = False,
        only_cross_attention: bool = False,
        upcast_attention: bool = False,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.only_cross_attention = only_cross_attention
        attention = dict(
            heads=num_attention_heads,
            dim_head=attention_head_dim,
            dropout=dropout,
            bias=attention_bias,
            upcast_attention=upcast_attention,
        )
        self_or_text = cross_attention_dim if only_cross_attention else None  # what attn1 attends to

        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn1 = Attention(dim, cross_attention_dim=self_or_text, **attention)
        if cross_attention_dim is not None:
            self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
            self.attn2 = Attention(dim, cross_attention_dim=cross_attention_dim, **attention)
        else:
            self.norm2 = None
            self.attn2 = None
        self.norm3 = nn.LayerNorm(dim, eps=norm_eps)
        self.ff = FeedForward(dim, dropout=dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,  # (B, N, dim)
        encoder_hidden_states: torch.Tensor | None = None,  # (B, S, cross_attention_dim)
        attention_mask: torch.Tensor | None = None,  # bias for attn1
        encoder_attention_mask: torch.Tensor | None = None,  # bias (B, 1, S) for attn2
    ) -> torch.Tensor:
        context = encoder_hidden_states if self.only_cross_attention else None
        hidden_states = hidden_states + self.attn1(self.norm1(hidden_states), context, attention_mask)
        if self.attn2 is not None:
            hidden_states = hidden_states + self.attn2(
                self.norm2(hidden_states), encoder_hidden_states, encoder_attention_mask
            )
        return hidden_states + self.ff(self.norm3(hidden_states))  # (B, N, dim)


class Transformer2DModel(nn.Module):
    """Spatial transformer over a feature map, with a residual around it: (B, C, H, W) -> (B, C, H, W).

    ``use_linear_projection`` picks ``nn.Linear`` for ``proj_in``/``proj_out`` (SD 2.x) instead of 1x1 convs (SD 1.x).
    The inner width is ``num_attention_heads * attention_head_dim`` (equal to ``in_channels`` in SD UNets).
    """

    def __init__(
        self,
        num_attention_heads: int = 16,
        attention_head_dim: int = 88,
        in_channels: int | None = None,
        out_channels: int | None = None,
        num_layers: int = 1,
        dropout: float = 0.0,
        norm_num_groups: int = 32,
        cross_attention_dim: int | None = None,
        attention_bias: bool = False,
        use_linear_projection: bool = False,
        only_cross_attention: bool = False,
        upcast_attention: bool = False,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        if in_channels is None:
            raise ValueError("Transformer2DModel: only continuous input is supported, so in_channels is required")
        inner_dim = num_attention_heads * attention_head_dim
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels, self.out_channels, self.inner_dim = in_channels, out_channels, inner_dim
        self.use_linear_projection = use_linear_projection

        self.norm = GroupNorm(norm_num_groups, in_channels, eps=1e-6)  # eps is fixed at 1e-6, as in diffusers
        if use_linear_projection:
            self.proj_in = nn.Linear(in_channels, inner_dim)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                inner_dim,
                num_attention_heads,
                attention_head_dim,
                dropout=dropout,
                cross_attention_dim=cross_attention_dim,
                attention_bias=attention_bias,
                only_cross_attention=only_cross_attention,
                upcast_attention=upcast_attention,
                norm_eps=norm_eps,
            )
            for _ in range(num_layers)
        )
        if use_linear_projection:
            self.proj_out = nn.Linear(inner_dim, out_channels)
        else:
            self.proj_out = nn.Conv2d(inner_dim, out_channels, kernel_size=1)

    def forward(
        self,
        hidden_states: torch.Tensor,  # (B, C, H, W)
        encoder_hidden_states: torch.Tensor | None = None,  # (B, S, cross_attention_dim)
        attention_mask: torch.Tensor | None = None,  # keep-mask (B, N) or bias
        encoder_attention_mask: torch.Tensor | None = None,  # keep-mask (B, S) or bias (B, 1, S)
    ) -> torch.Tensor:
        attention_mask = mask_to_bias(attention_mask, hidden_states.dtype)
        encoder_attention_mask = mask_to_bias(encoder_attention_mask, hidden_states.dtype)
        batch, _, height, width = hidden_states.shape
        residual = hidden_states

        if self.use_linear_projection:  # flatten, then project
            hidden_states = self.norm(hidden_states)
            hidden_states = hidden_states.permute(0, 2, 3, 1).reshape(batch, height * width, -1)  # (B, HW, C)
            hidden_states = self.proj_in(hidden_states)  # (B, HW, inner)
        else:  # project, then flatten
            hidden_states = norm_act_conv(self.norm, None, self.proj_in, hidden_states)  # (B, inner, H, W)
            hidden_states = hidden_states.permute(0, 2, 3, 1).reshape(batch, height * width, -1)  # (B, HW, inner)

        for block in self.transformer_blocks:
            hidden_states = block(hidden_states, encoder_hidden_states, attention_mask, encoder_attention_mask)

        if self.use_linear_projection:
            hidden_states = self.proj_out(hidden_states)  # (B, HW, C_out)
            hidden_states = hidden_states.reshape(batch, height, width, -1).permute(0, 3, 1, 2)  # (B, C_out, H, W)
        else:
            hidden_states = hidden_states.reshape(batch, height, width, -1).permute(0, 3, 1, 2)  # (B, inner, H, W)
            hidden_states = self.proj_out(hidden_states.contiguous())  # (B, C_out, H, W)
        return hidden_states + residual
