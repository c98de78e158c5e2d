"""Multi-head attention with diffusers' checkpoint layout (``to_q``, ``to_k``, ``to_v``, ``to_out.0``, ``group_norm``).

One class serves three uses:

* spatial self-attention in UNet / VAE blocks: input ``(B, C, H, W)``, optional ``group_norm`` before the
  projections, ``residual_connection=True`` and ``rescale_output_factor``;
* self-attention over tokens: input ``(B, N, C)``;
* cross-attention: ``encoder_hidden_states`` ``(B, M, cross_attention_dim)`` supply keys and values.

The product is computed by :func:`torch.nn.functional.scaled_dot_product_attention` (default scale
``1 / sqrt(dim_head)``). ``upcast_attention`` (or ``upcast_softmax``) runs that product in float32 when the inputs are
half precision, and casts the result back. ``set_attention_slice(n)`` computes it for ``n`` (batch, head) pairs at a
time (diffusers' sliced attention), which bounds the memory of backends that materialise the score matrix.

Fused projections (diffusers' ``fuse_projections`` / ``fuse_qkv_projections``): q, k and v of a self-attention call
(k and v of a cross-attention call) come from one matrix product against the layers' weights concatenated at call
time. diffusers keeps a concatenated copy instead (a ``to_qkv`` / ``to_kv`` layer): here there is no second copy of
the weights to go stale or to land in a saved checkpoint, and a layer with a LoRA or offload hook, or an int8 one,
is simply run on its own. The numbers are diffusers' fused ones.

Not implemented, deliberately: diffusers' attention-processor classes (``set_processor``, ``attn_processors``) and
IP-Adapter; the one code path here is SDPA, optionally sliced, or (opt-in, float32 on an AVX-512 BF16 CPU, the int8
path's default) diffusekit's fused bf16 kernel (``diffusekit.cpu_attention``), or (the exact path's default under
``optimize()``, for the larger products: ``EXACT_KERNEL_MIN_SCORES``) the same kernel with float32 products, SDPA's
numbers to float32 rounding.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from .normalization import GroupNorm


#: the float32 kernel (``cpu_exact_attention``) serves calls with at least this many scores per head (queries x
#: keys): below, torch's SDPA is as fast or faster. Measured on SD 1.5's shapes (heads split from the projections):
#: 4096 x 4096 tokens 0.68-0.75x SDPA's time, 1024 x 1024 0.80-0.84x, 4096 x 77 0.7-0.9x; 1024 x 77 1.11x and
#: 256 x 256 1.02x (left to SDPA)
EXACT_KERNEL_MIN_SCORES = 2**18
#: ... and heads at most this wide: the VAE's single 512-channel head runs faster in SDPA (1.06-1.14x with the kernel)
EXACT_KERNEL_MAX_HEAD_DIM = 160


class Attention(nn.Module):
    """Multi-head (self or cross) attention.

    Args:
        query_dim: channels of ``hidden_states``.
        cross_attention_dim: channels of ``encoder_hidden_states``; ``None`` means self-attention (``query_dim``).
        heads, dim_head: number of heads and channels per head; the inner width is ``heads * dim_head``.
        dropout: dropout after the output projection (``to_out.1``).
        bias: bias on ``to_q``/``to_k``/``to_v``. ``out_bias``: bias on ``to_out.0``.
        upcast_attention / upcast_softmax: compute the attention product in float32 for half-precision inputs.
        norm_num_groups: if set, a ``GroupNorm(norm_num_groups, query_dim, eps)`` is applied to the input first.
        rescale_output_factor: the output (after the residual, if any) is divided by this.
        residual_connection: add the block's input to its output.
        out_dim: output channels of ``to_out.0`` (defaults to ``query_dim``).
    """

    def __init__(
        self,
        query_dim: int,
        cross_attention_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
        bias: bool = False,
        upcast_attention: bool = False,
        upcast_softmax: bool = False,
        out_bias: bool = True,
        norm_num_groups: int | None = None,
        eps: float = 1e-5,
        rescale_output_factor: float = 1.0,
        residual_connection: bool = False,
        out_dim: int | None = None,
    ):
        super().__init__()
        if heads < 1 or dim_head < 1:
            raise ValueError(f"Attention needs heads >= 1 and dim_head >= 1, got heads={heads}, dim_head={dim_head}")
        self.heads = heads
        self.dim_head = dim_head
        self.inner_dim = heads * dim_head
        self.query_dim = query_dim
        self.cross_attention_dim = cross_attention_dim if cross_attention_dim is not None else query_dim
        self.is_cross_attention = cross_attention_dim is not None
        self.upcast = upcast_attention or upcast_softmax
        self.rescale_output_factor = rescale_output_factor
        self.residual_connection = residual_connection
        self.out_dim = out_dim if out_dim is not None else query_dim
        self.slice_size: int | None = None  # set_attention_slice: (batch, head) pairs per SDPA call; None = all
        # float32 CPU calls without a mask through diffusekit.cpu_attention: True / False as chosen with
        # ModelMixin.enable_ / disable_cpu_fused_attention; None (not chosen): SDPA, and optimize() of an int8 model
        # turns it on where the kernel runs
        self.cpu_fused_attention: bool | None = None
        # on the int8 route (an int8 to_out.0 under the fused kernel): q . k and p . v as int8 products (True) or
        # bf16 ones (False); docs/QUANTIZATION.md, "int8 products"
        self.cpu_int8_products = True
        # float32 CPU calls without a mask, with EXACT_KERNEL_MIN_SCORES scores per head or more and heads at most
        # EXACT_KERNEL_MAX_HEAD_DIM wide, through diffusekit.cpu_attention's float32 products (SDPA's numbers to
        # float32 rounding, faster there); None (not chosen): SDPA, and optimize() of a float model turns it on
        # where the kernel runs
        self.cpu_exact_attention: bool | None = None
        self.fused_projections = False  # fuse_projections(): one matrix product for q, k, v (or k, v)

        if norm_num_groups is not None:
            self.group_norm = GroupNorm(num_groups=norm_num_groups, num_channels=query_dim, eps=eps, affine=True)
        else:
            self.group_norm = None
        self.to_q = nn.Linear(query_dim, self.inner_dim, bias=bias)
        self.to_k = nn.Linear(self.cross_attention_dim, self.inner_dim, bias=bias)
        self.to_v = nn.Linear(self.cross_attention_dim, self.inner_dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(self.inner_dim, self.out_dim, bias=out_bias), nn.Dropout(dropout)])

    @property
    def sliceable_head_dim(self) -> int:
        """The number of heads (diffusers' name): the most a slice can hold per batch item."""
        return self.heads

    def set_attention_slice(self, slice_size: int | None) -> None:
        """Compute attention for ``slice_size`` (batch, head) pairs at a time; ``None`` turns slicing off.

        The result equals unsliced attention; memory for the score matrix drops to ``slice_size / (B * heads)`` of it
        where the backend materialises it (CPU SDPA in torch 2.x does not: BENCHMARKS.md).
        """
        if slice_size is not None and not (isinstance(slice_size, int) and 1 <= slice_size <= self.heads):
            raise ValueError(f"slice_size {slice_size!r} has to be an int from 1 to the {self.heads} heads, or None")
        self.slice_size = slice_size

    def _attend(self, query, key, value, mask):
        """SDPA over (B, heads, N, d), whole or ``slice_size`` heads of one batch item at a time.

        Slices are views (no copies of q/k/v): each call's score matrix is ``slice_size`` heads big. Slices never span
        two batch items (diffusers' flat (batch x head) slices can); the numbers are the same either way.
        """
        exact = (self.cpu_exact_attention and query.shape[-2] * key.shape[-2] >= EXACT_KERNEL_MIN_SCORES
                 and query.shape[-1] <= EXACT_KERNEL_MAX_HEAD_DIM)
        if self.cpu_fused_attention or exact:
            from .. import cpu_attention

            if cpu_attention.serves(query, key, value, mask):  # (B, heads, N, d); never materialises scores
                return cpu_attention.attention(query, key, value,
                                               products="bf16" if self.cpu_fused_attention else "float32")
        batch, heads = query.shape[:2]
        size = self.slice_size
        if size is None or size >= batch * heads:
            return F.scaled_dot_product_attention(query, key, value, attn_mask=mask)  # (B, heads, N, d)
        out = query.new_empty(query.shape)  # (B, heads, N, d)
        for b in range(batch):
            items = slice(b, b + 1)
            item_mask = None if mask is None else mask[items if mask.shape[0] > 1 else slice(0, 1)]
            for h in range(0, heads, size):
                part = slice(h, h + size)
                part_mask = None
                if item_mask is not None:  # (1, 1|heads, 1|N, M)
                    part_mask = item_mask[:, part] if item_mask.shape[1] > 1 else item_mask
                # 4-d views on purpose: CPU SDPA takes its memory-efficient kernel for (B, H, N, d) inputs, and a
                # path that materialises the score matrix for 3-d ones
                out[items, part] = F.scaled_dot_product_attention(
                    query[items, part], key[items, part], value[items, part], attn_mask=part_mask
                )  # (1, size, N, d)
        return out

    def _attend_quantized(self, query, key, value, mask) -> torch.Tensor | None:
        """With the fused CPU kernel on and an int8 ``to_out.0`` (``forward_uint8``): the attention written straight
        as that layer's uint8 input, ``(B, N, heads, d)`` (one pass less over a float32 tensor), its two products in
        int8 unless ``cpu_int8_products`` is False; else ``None``."""
        if not self.cpu_fused_attention or not hasattr(self.to_out[0], "forward_uint8"):
            return None
        from .. import cpu_attention

        if not cpu_attention.serves(query, key, value, mask):
            return None
        return cpu_attention.attention_quantize(query, key, value, *self.to_out[0]._input_qparams,
                                                products="int8" if self.cpu_int8_products else "bf16")

    def fuse_projections(self, fuse: bool = True) -> None:
        """diffusers' switch: compute q, k, v (self-attention calls) or k, v (cross-attention calls) in one matrix
        product. No fused copy of the weights is kept (module docstring); ``fuse=False`` turns it off."""
        self.fused_projections = bool(fuse)

    def _project(self, hidden_states: torch.Tensor, context: torch.Tensor, self_attention: bool):
        """(q, k, v): (B, N, inner), (B, M, inner), (B, M, inner); fused where :meth:`fuse_projections` asked and
        every layer involved is a plain ``nn.Linear`` without hooks."""
        if self.fused_projections:  # the default (off) costs one attribute read
            layers = (self.to_q, self.to_k, self.to_v) if self_attention else (self.to_k, self.to_v)
            if all(type(layer) is nn.Linear and not layer._forward_hooks and not layer._forward_pre_hooks
                   for layer in layers) and len({layer.bias is None for layer in layers}) == 1:
                weight = torch.cat([layer.weight for layer in layers])  # (len(layers) * inner, C)
                bias = None if layers[0].bias is None else torch.cat([layer.bias for layer in layers])
                fused = F.linear(context, weight, bias).split(self.inner_dim, dim=-1)  # views (B, M, inner) each
                return (*fused,) if self_attention else (self.to_q(hidden_states), *fused)
        return self.to_q(hidden_states), self.to_k(context), self.to_v(context)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        # (B, N, heads * dim_head) -> (B, heads, N, dim_head)
        batch, length, _ = x.shape
        return x.view(batch, length, self.heads, -1).transpose(1, 2)

    def _prepare_mask(self, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Bring a mask to a shape ``scaled_dot_product_attention`` broadcasts: ``(B, 1 or heads, 1 or Nq, Nk)``.

        Accepts ``(B, Nk)``, ``(B, 1 or Nq, Nk)`` or ``(B, 1 or heads, 1 or Nq, Nk)``. A boolean mask marks the
        positions to attend to; a floating mask is an additive bias (diffusers' convention: 0 keep, -10000 drop).
        """
        if mask.ndim == 2:
            mask = mask[:, None, None, :]
        elif mask.ndim == 3:
            mask = mask[:, None, :, :]
        elif mask.ndim != 4:
            raise ValueError(f"attention_mask must have 2, 3 or 4 dimensions, got shape {tuple(mask.shape)}")
        return mask if mask.dtype == torch.bool else mask.to(dtype)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        residual = hidden_states
        spatial = hidden_states.ndim == 4
        if spatial:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)  # (B, HW, C)

        if self.group_norm is not None:
            # GroupNorm wants channels first: (B, N, C) -> (B, C, N) -> norm -> (B, N, C)
            hidden_states = self.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states  # (B, M, C_ctx)
        # (B, heads, N, d), (B, heads, M, d), (B, heads, M, d)
        query, key, value = map(self._split_heads, self._project(hidden_states, context, encoder_hidden_states is None))
        out_dtype = query.dtype

        if self.upcast and out_dtype in (torch.float16, torch.bfloat16):
            query, key, value = query.float(), key.float(), value.float()
        mask = None if attention_mask is None else self._prepare_mask(attention_mask, query.dtype)
        quantized = self._attend_quantized(query, key, value, mask)
        if quantized is not None:  # uint8 (B, N, heads, d) for an int8 to_out
            batch_size, length = quantized.shape[:2]
            hidden_states = self.to_out[0].forward_uint8(quantized.reshape(batch_size, length, self.inner_dim))
        else:
            attended = self._attend(query, key, value, mask)  # (B, heads, N, d)
            batch_size, _, length, _ = attended.shape
            attended = attended.transpose(1, 2).reshape(batch_size, length, self.inner_dim).to(out_dtype)  # (B,N,inner)
            hidden_states = self.to_out[0](attended)  # (B, N, out_dim)
        hidden_states = self.to_out[1](hidden_states)
        if spatial:
            hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, height, width)  # (B, C, H, W)
        if self.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / self.rescale_output_factor


def fuse_qkv_projections(model: nn.Module, fuse: bool = True) -> None:
    """:meth:`Attention.fuse_projections` on every attention layer of ``model``."""
    for module in model.modules():
        if isinstance(module, Attention):
            module.fuse_projections(fuse)


def set_attention_slice(model: nn.Module, slice_size: str | int | list[int | None] | None = "auto") -> None:
    """Set the slice size of every :class:`Attention` in ``model`` (in module order), with diffusers' values.

    ``"auto"``: half of each layer's heads (at least 1); ``"max"``: one (batch, head) pair at a time; an int: that
    many for every layer; a list: one value per attention layer; ``None``: no slicing.
    """
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    if slice_size == "auto":
        sizes = [max(1, layer.heads // 2) for layer in layers]  # diffusers: heads // 2, which is 0 for one head
    elif slice_size == "max":
        sizes = [1] * len(layers)
    elif isinstance(slice_size, (list, tuple)):
        if len(slice_size) != len(layers):
            raise ValueError(
                f"slice_size gives {len(slice_size)} values, but {type(model).__name__} has {len(layers)} attention "
                "layers: give one per layer, or one int, 'auto', 'max' or None"
            )
        sizes = list(slice_size)
    elif slice_size is None or isinstance(slice_size, int):
        sizes = [slice_size] * len(layers)
    else:
        raise ValueError(f"slice_size must be 'auto', 'max', an int, a list of ints or None, got {slice_size!r}")
    for layer, size in zip(layers, sizes):
        if size is not None and isinstance(size, int) and size > layer.heads:
            raise ValueError(f"slice_size {size} has to be smaller or equal to {layer.heads} (the layer's heads)")
    for layer, size in zip(layers, sizes):
        layer.set_attention_slice(size)


# ---------------------------------------------------------------------------------------------------- legacy keys

# Checkpoints written before diffusers 0.14 (e.g. the google/ddpm-* and early VAE repos) name the projections of the
# UNet / VAE spatial attention blocks ``query``/``key``/``value``/``proj_attn``. They map one to one onto ours.
LEGACY_ATTENTION_KEYS = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_KEY = re.compile(
    r"^(?P<block>(?:.+\.)?attentions\.\d+)\.(?P<name>query|key|value|proj_attn)\.(?P<p>weight|bias)$"
)


def rename_legacy_attention_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename ``<...>.attentions.N.{query,key,value,proj_attn}.*`` to ``to_q/to_k/to_v/to_out.0``; other keys pass."""
    renamed = {}
    for key, value in state_dict.items():
        match = _LEGACY_KEY.match(key)
        if match:
            key = f"{match['block']}.{LEGACY_ATTENTION_KEYS[match['name']]}.{match['p']}"
        renamed[key] = value
    return renamed
