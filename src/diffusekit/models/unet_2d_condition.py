"""``UNet2DConditionModel``: the text-conditioned latent UNet of Stable Diffusion 1.x / 2.x (and LCM variants).

Reads and writes diffusers' ``UNet2DConditionModel`` checkpoints: config keys, defaults and module paths are
diffusers', so a ``config.json`` + weights folder moves between the two libraries in both directions.

    sample (B, 4, h, w) ──conv_in──► down blocks ──► mid block ──► up blocks ──► norm/act/conv_out ──► (B, 4, h, w)
                                        │ skip tensors (+ ControlNet residuals) ─▲
    timestep ──time_proj (sinusoidal)──► time_embedding MLP (+ LCM w-embedding, + class embedding) ──► every resnet
    encoder_hidden_states (B, S, cross_attention_dim) ──────────────────► every transformer's cross-attention

A note on names, inherited from diffusers for checkpoint compatibility: for these UNets ``attention_head_dim`` is the
**number of heads** of each stage's transformers (SD 1.x: 8 everywhere; SD 2.x: ``[5, 10, 20, 20]``, i.e. 64-wide
heads); each head is ``channels // heads`` wide. ``num_attention_heads`` is refused, exactly as diffusers does.

SDXL UNets (``addition_embed_type="text_time"``: pooled text + size / crop time ids through ``add_time_proj`` and
``add_embedding``, summed with the time embedding) are supported.

Not supported (a clear error at construction): ``addition_embed_type`` other than ``"text_time"`` (Kandinsky),
``encoder_hid_dim`` / ``encoder_hid_dim_type``, ``dual_cross_attention=True``, ``attention_type`` other than ``"default"`` (GLIGEN), and
block types other than the registered ones (``CrossAttnDownBlock2D``, ``DownBlock2D``, ``UNetMidBlock2DCrossAttn``,
``UNetMidBlock2D``, ``CrossAttnUpBlock2D``, ``UpBlock2D``, ...).
"""

from __future__ import annotations

import logging
import numbers
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from ..configuration import register_to_config
from ..modeling import ModelMixin
from ..outputs import BaseOutput
from ..single_file.loading import FromOriginalModelMixin
from . import unet_2d_condition_blocks, unet_blocks  # noqa: F401  (register the block classes)
from .attention import fuse_qkv_projections, set_attention_slice
from .deep_cache import DeepCacheStep
from .embeddings import GaussianFourierProjection, TimestepEmbedding, Timesteps
from .freeu import set_factors
from .registry import get_block
from .resnet import get_activation
from .transformer_2d import mask_to_bias
from .unet_blocks import skip_layers
from .normalization import GroupNorm

logger = logging.getLogger(__name__)


@dataclass
class UNet2DConditionOutput(BaseOutput):
    """``sample``: the model output (noise / v / x0 prediction), ``(B, out_channels, H, W)``."""

    sample: torch.Tensor = None


def _per_block(name: str, value: Any, n: int, longer_ok: bool = False) -> list:
    """A scalar -> ``[value] * n``; a list/tuple must have one entry per block (``longer_ok``: at least one)."""
    if isinstance(value, (list, tuple)):
        if len(value) < n or (len(value) > n and not longer_ok):
            raise ValueError(f"{name} has {len(value)} entries {list(value)} but the UNet has {n} blocks")
        return list(value)
    return [value] * n


def _refuse(key: str, value: Any, why: str) -> None:
    raise NotImplementedError(f"UNet2DConditionModel: config {key}={value!r} is not supported ({why})")


class UNet2DConditionModel(ModelMixin, FromOriginalModelMixin):
    """Conditional 2D UNet: ``(sample, timestep, encoder_hidden_states) -> sample-shaped prediction``.

    Every keyword is a diffusers config key with diffusers' default; see the module docstring for what is
    supported. Options that only affect block types outside this library's scope (``resnet_skip_time_act``,
    ``resnet_out_scale_factor``, ``cross_attention_norm``, ``mid_block_only_cross_attention``,
    ``addition_embed_type_num_heads``) are accepted and, as in diffusers for these
    blocks, have no effect.

    Training and memory: ``enable_gradient_checkpointing()`` and ``set_attention_slice()`` as in diffusers
    (docs/MEMORY.md). Deliberately not implemented (out of scope for now; one attention code path, SDPA): the
    attention-processor API (``attn_processors``, ``set_attn_processor``: refused; ``set_default_attn_processor``:
    a no-op, the default is the only processor) and IP-Adapter. FreeU: ``enable_freeu`` / ``disable_freeu``
    (``models/freeu.py``); fused projections: ``fuse_qkv_projections`` / ``unfuse_qkv_projections``.
    """

    _supports_gradient_checkpointing = True  # enable_gradient_checkpointing(): recompute block layers

    _single_file_kind = "unet"  # from_single_file / save_single_file: docs/SINGLE_FILE.md
    _exact_winograd = True  # optimize() on the CPU: Winograd 3x3 convolutions where they pay (models/winograd.py)

    @register_to_config
    def __init__(
        self,
        sample_size: int | tuple[int, int] | None = None,
        in_channels: int = 4,
        out_channels: int = 4,
        center_input_sample: bool = False,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        down_block_types: Sequence[str] = (
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        mid_block_type: str | None = "UNetMidBlock2DCrossAttn",
        up_block_types: Sequence[str] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        only_cross_attention: bool | Sequence[bool] = False,
        block_out_channels: Sequence[int] = (320, 640, 1280, 1280),
        layers_per_block: int | Sequence[int] = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1,
        dropout: float = 0.0,
        act_fn: str = "silu",
        norm_num_groups: int | None = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int | Sequence[int] = 1280,
        transformer_layers_per_block: int | Sequence[int] | Sequence[Sequence[int]] = 1,
        reverse_transformer_layers_per_block: Sequence[Sequence[int]] | None = None,
        encoder_hid_dim: int | None = None,
        encoder_hid_dim_type: str | None = None,
        attention_head_dim: int | Sequence[int] = 8,
        num_attention_heads: int | Sequence[int] | None = None,
        dual_cross_attention: bool = False,
        use_linear_projection: bool = False,
        class_embed_type: str | None = None,
        addition_embed_type: str | None = None,
        addition_time_embed_dim: int | None = None,
        num_class_embeds: int | None = None,
        upcast_attention: bool = False,
        resnet_time_scale_shift: str = "default",
        resnet_skip_time_act: bool = False,
        resnet_out_scale_factor: float = 1.0,
        time_embedding_type: str = "positional",
        time_embedding_dim: int | None = None,
        time_embedding_act_fn: str | None = None,
        timestep_post_act: str | None = None,
        time_cond_proj_dim: int | None = None,
        conv_in_kernel: int = 3,
        conv_out_kernel: int = 3,
        projection_class_embeddings_input_dim: int | None = None,
        attention_type: str = "default",
        class_embeddings_concat: bool = False,
        mid_block_only_cross_attention: bool | None = None,
        cross_attention_norm: str | None = None,
        addition_embed_type_num_heads: int = 64,
    ):
        super().__init__()
        self.sample_size = sample_size
        n = len(down_block_types)

        # ---- refuse what is out of scope, naming the key
        if num_attention_heads is not None:  # diffusers refuses it too (its issue #2011: the names are swapped)
            raise ValueError(
                "UNet2DConditionModel: num_attention_heads cannot be set for this model (as in diffusers); "
                "give the number of heads per block in attention_head_dim instead"
            )
        if addition_embed_type not in (None, "text_time"):
            _refuse("addition_embed_type", addition_embed_type, "only SDXL's 'text_time'; Kandinsky's are not "
                    "implemented")
        if addition_embed_type == "text_time" and (addition_time_embed_dim is None or
                                                   projection_class_embeddings_input_dim is None):
            raise ValueError("addition_embed_type='text_time' (SDXL) needs addition_time_embed_dim and "
                             "projection_class_embeddings_input_dim (pooled text width + 6 * addition_time_embed_dim)")
        for key, value in (("encoder_hid_dim", encoder_hid_dim), ("encoder_hid_dim_type", encoder_hid_dim_type)):
            if value is not None:
                _refuse(key, value, "projection of encoder_hidden_states (Kandinsky, IP-Adapter)")
        if dual_cross_attention:
            _refuse("dual_cross_attention", dual_cross_attention, "DualTransformer2DModel")
        if attention_type != "default":
            _refuse("attention_type", attention_type, "only 'default' attention; GLIGEN is not implemented")
        if not (len(up_block_types) == n == len(block_out_channels)):
            raise ValueError(
                "down_block_types, up_block_types and block_out_channels must have the same length, got "
                f"{n}, {len(up_block_types)} and {len(block_out_channels)}"
            )

        # ---- per-block settings (diffusers: "attention_head_dim" holds the head count of these blocks)
        heads = _per_block("attention_head_dim", attention_head_dim, n)
        context_dims = _per_block("cross_attention_dim", cross_attention_dim, n)
        layers = _per_block("layers_per_block", layers_per_block, n)
        cross_only = _per_block("only_cross_attention", only_cross_attention, n)
        # diffusers indexes these lists without checking their length: a longer one is accepted, and then the mid
        # block takes the *last* entry and the up blocks the reversed whole list, as there
        depth = _per_block("transformer_layers_per_block", transformer_layers_per_block, n, longer_ok=True)
        if reverse_transformer_layers_per_block is not None:
            up_depth = _per_block(
                "reverse_transformer_layers_per_block", reverse_transformer_layers_per_block, n, longer_ok=True
            )
        elif any(isinstance(d, (list, tuple)) for d in depth):
            raise ValueError(
                "transformer_layers_per_block gives per-layer lists (an asymmetric UNet): "
                "reverse_transformer_layers_per_block is required too"
            )
        else:
            up_depth = depth[::-1]

        # ---- input and time embedding
        width = block_out_channels[0]
        self.conv_in = nn.Conv2d(in_channels, width, conv_in_kernel, padding=(conv_in_kernel - 1) // 2)
        if time_embedding_type == "positional":
            time_embed_dim = time_embedding_dim or width * 4
            self.time_proj = Timesteps(width, flip_sin_to_cos, freq_shift)
            time_features = width
        elif time_embedding_type == "fourier":
            time_embed_dim = time_embedding_dim or width * 2
            if time_embed_dim % 2:
                raise ValueError(f"time_embedding_type='fourier' needs an even time_embedding_dim: {time_embed_dim}")
            self.time_proj = GaussianFourierProjection(
                time_embed_dim // 2, set_W_to_weight=False, log=False, flip_sin_to_cos=flip_sin_to_cos
            )
            time_features = time_embed_dim
        else:
            raise ValueError(f"unknown time_embedding_type {time_embedding_type!r}; expected 'positional' or 'fourier'")
        self.time_embedding = TimestepEmbedding(  # (+ cond_proj: LCM's guidance-scale embedding)
            time_features, time_embed_dim, act_fn, post_act_fn=timestep_post_act, cond_proj_dim=time_cond_proj_dim
        )

        # ---- class embedding (summed with, or concatenated to, the time embedding)
        if class_embed_type is None and num_class_embeds is None:
            self.class_embedding = None
        elif class_embed_type is None:  # a learned table of num_class_embeds labels
            self.class_embedding = nn.Embedding(num_class_embeds, time_embed_dim)
        elif class_embed_type == "timestep":  # labels go through time_proj first
            self.class_embedding = TimestepEmbedding(time_features, time_embed_dim, act_fn=act_fn)
        elif class_embed_type == "identity":  # labels are embeddings already
            self.class_embedding = nn.Identity()
        elif class_embed_type in ("projection", "simple_projection"):
            if projection_class_embeddings_input_dim is None:
                raise ValueError(f"class_embed_type={class_embed_type!r} needs projection_class_embeddings_input_dim")
            if class_embed_type == "projection":  # an MLP over arbitrary vectors (act fixed to silu, as diffusers)
                self.class_embedding = TimestepEmbedding(projection_class_embeddings_input_dim, time_embed_dim)
            else:
                self.class_embedding = nn.Linear(projection_class_embeddings_input_dim, time_embed_dim)
        else:
            raise ValueError(
                f"unknown class_embed_type {class_embed_type!r}; expected None, 'timestep', 'identity', "
                "'projection' or 'simple_projection'"
            )
        # ---- SDXL's added embedding: pooled text + sinusoidal features of the size/crop (or aesthetic) time ids
        if addition_embed_type == "text_time":
            self.add_time_proj = Timesteps(addition_time_embed_dim, flip_sin_to_cos, freq_shift)
            self.add_embedding = TimestepEmbedding(projection_class_embeddings_input_dim, time_embed_dim)
        self.time_embed_act = get_activation(time_embedding_act_fn) if time_embedding_act_fn is not None else None
        blocks_temb = time_embed_dim * 2 if class_embeddings_concat else time_embed_dim

        # ---- blocks: keywords every block gets (unet_blocks' call convention) + the cross-attention ones
        common = dict(
            temb_channels=blocks_temb,
            resnet_eps=norm_eps,
            resnet_act_fn=act_fn,
            resnet_groups=norm_num_groups,
            resnet_time_scale_shift=resnet_time_scale_shift,
            dropout=dropout,
            use_linear_projection=use_linear_projection,
            upcast_attention=upcast_attention,
        )
        self._context_dims: set[int] = set()  # widths the cross-attention blocks expect

        def block_class(kind: str, name: str, key: str, context_dim: int) -> type:
            name = name[len("UNetRes"):] if name.startswith("UNetRes") else name  # diffusers' alias prefix
            cls = get_block(kind, name, key)
            if cls.has_cross_attention:
                self._context_dims.add(context_dim)
            return cls

        self.down_blocks = nn.ModuleList()
        self.up_blocks = nn.ModuleList()  # filled below; registered here, as diffusers
        for i, name in enumerate(down_block_types):
            out_ch = block_out_channels[i]
            self.down_blocks.append(
                block_class("down", name, f"down_block_types[{i}]", context_dims[i])(
                    in_channels=block_out_channels[max(i - 1, 0)],
                    out_channels=out_ch,
                    num_layers=layers[i],
                    add_downsample=i < n - 1,
                    attention_head_dim=heads[i] if heads[i] is not None else out_ch,
                    downsample_padding=downsample_padding,
                    num_attention_heads=heads[i],
                    cross_attention_dim=context_dims[i],
                    transformer_layers_per_block=depth[i],
                    only_cross_attention=cross_only[i],
                    **common,
                )
            )

        if mid_block_type is None:
            self.mid_block = None
        else:
            mid_cls = block_class("mid", mid_block_type, "mid_block_type", context_dims[-1])
            cross = mid_cls.has_cross_attention
            self.mid_block = mid_cls(
                in_channels=block_out_channels[-1],
                num_layers=1 if cross else 0,  # diffusers' plain UNetMidBlock2D here: one resnet, no attention
                attention_head_dim=heads[-1],
                output_scale_factor=mid_block_scale_factor,
                add_attention=cross,
                num_attention_heads=heads[-1],
                cross_attention_dim=context_dims[-1],
                transformer_layers_per_block=depth[-1],
                **common,
            )

        # up: mirrors down; layer i of up block k eats the skips of down block n-1-k (one extra layer per block)
        rev_channels, rev_heads, rev_layers = block_out_channels[::-1], heads[::-1], layers[::-1]
        rev_context, rev_cross_only = context_dims[::-1], cross_only[::-1]
        self.num_upsamplers = n - 1
        for i, name in enumerate(up_block_types):
            out_ch = rev_channels[i]
            self.up_blocks.append(
                block_class("up", name, f"up_block_types[{i}]", rev_context[i])(
                    in_channels=rev_channels[min(i + 1, n - 1)],  # width of the deepest skip it consumes
                    prev_output_channel=rev_channels[max(i - 1, 0)],
                    out_channels=out_ch,
                    num_layers=rev_layers[i] + 1,
                    add_upsample=i < n - 1,
                    attention_head_dim=rev_heads[i] if rev_heads[i] is not None else out_ch,
                    resolution_idx=i,
                    num_attention_heads=rev_heads[i],
                    cross_attention_dim=rev_context[i],
                    transformer_layers_per_block=up_depth[i],
                    only_cross_attention=rev_cross_only[i],
                    **common,
                )
            )

        # ---- output
        if norm_num_groups is not None:
            self.conv_norm_out = GroupNorm(norm_num_groups, width, eps=norm_eps)
            self.conv_act = get_activation(act_fn)
        else:
            self.conv_norm_out = None
            self.conv_act = None
        self.conv_out = nn.Conv2d(width, out_channels, conv_out_kernel, padding=(conv_out_kernel - 1) // 2)

    def set_attn_processor(self, processor: Any) -> None:
        raise NotImplementedError(
            "UNet2DConditionModel.set_attn_processor: diffusekit has no attention-processor classes (one SDPA code "
            "path); use set_attention_slice() for sliced attention"
        )

    def set_default_attn_processor(self) -> None:
        """A no-op: the default attention (SDPA) is the only one."""

    def enable_freeu(self, s1: float, s2: float, b1: float, b2: float) -> None:
        """FreeU (diffusers' API): at up stages 0 / 1, the first half of the backbone channels times ``b1`` / ``b2``
        and the skip features' lowest frequencies times ``s1`` / ``s2``; see ``models/freeu.py``. diffusers' example
        for SD 1.5: ``s1=0.9, s2=0.2, b1=1.5, b2=1.6`` (the FreeU repository lists values per model). Unlike
        diffusers, a factor of 0 is applied, not read as "off"."""
        for name, value in (("s1", s1), ("s2", s2), ("b1", b1), ("b2", b2)):
            if not isinstance(value, numbers.Real) or isinstance(value, bool):
                raise ValueError(f"UNet2DConditionModel.enable_freeu: {name} must be a number, got {value!r} (use "
                                 "disable_freeu() to turn FreeU off)")
        for block in self.up_blocks:
            set_factors(block, (s1, s2, b1, b2))

    def disable_freeu(self) -> None:
        """Turn FreeU off (every up block's ``s1``, ``s2``, ``b1``, ``b2`` back to ``None``)."""
        for block in self.up_blocks:
            set_factors(block, (None,) * 4)

    def fuse_qkv_projections(self) -> None:
        """diffusers' API: every attention layer computes q, k, v (k, v for cross-attention) in one matrix product;
        no fused copy of the weights is kept (``models/attention.py``)."""
        fuse_qkv_projections(self, True)

    def unfuse_qkv_projections(self) -> None:
        """Undo :meth:`fuse_qkv_projections`."""
        fuse_qkv_projections(self, False)

    def set_attention_slice(self, slice_size: str | int | list[int | None] | None = "auto") -> None:
        """Sliced attention (diffusers' API): ``"auto"`` halves each layer's heads, ``"max"`` runs one (batch, head)
        pair at a time, an int is the pairs per slice for every layer, a list gives one per attention layer, ``None``
        turns it off. Results equal unsliced attention; see ``models.attention.set_attention_slice``."""
        set_attention_slice(self, slice_size)

    # ------------------------------------------------------------------ forward helpers

    def _timesteps(self, timestep: torch.Tensor | float | int, sample: torch.Tensor) -> torch.Tensor:
        """A python number, a 0-d or a 1-d tensor -> a 1-d tensor of length B on the sample's device."""
        batch = sample.shape[0]
        if not torch.is_tensor(timestep):
            is_int = isinstance(timestep, numbers.Integral)
            if sample.device.type == "mps":  # no float64 / int64 there
                dtype = torch.int32 if is_int else torch.float32
            else:
                dtype = torch.int64 if is_int else torch.float64
            timestep = torch.tensor([timestep], dtype=dtype, device=sample.device)
        timestep = timestep.reshape(-1).to(sample.device) if timestep.ndim == 0 else timestep.to(sample.device)
        if timestep.ndim != 1 or timestep.shape[0] not in (1, batch):
            raise ValueError(
                f"timestep has shape {tuple(timestep.shape)} for a batch of {batch}: pass a number, a 0-d tensor, "
                "or a 1-d tensor with one entry or one per sample"
            )
        return timestep.expand(batch)

    def _check_context(self, encoder_hidden_states: torch.Tensor | None) -> None:
        if not self._context_dims:
            return  # no cross-attention anywhere: the text states are not used
        expected = sorted(self._context_dims)
        if encoder_hidden_states is None:
            raise ValueError(f"encoder_hidden_states is required: (batch, tokens, cross_attention_dim={expected[0]})")
        if encoder_hidden_states.ndim != 3 or len(expected) > 1 or encoder_hidden_states.shape[-1] != expected[0]:
            raise ValueError(
                f"encoder_hidden_states has shape {tuple(encoder_hidden_states.shape)}, expected "
                f"(batch, tokens, cross_attention_dim={expected[0] if len(expected) == 1 else expected}): "
                "the text encoder does not match this UNet's cross_attention_dim"
            )

    def _embedding(self, sample, timestep, timestep_cond, class_labels, added_cond_kwargs=None) -> torch.Tensor:
        """Time (+ guidance condition, + class) embedding: (B, time_embed_dim) or (B, 2 * time_embed_dim)."""
        timesteps = self._timesteps(timestep, sample)  # (B,)
        t_features = self.time_proj(timesteps).to(sample.dtype)  # (B, time_features), float32 maths, then cast
        emb = self.time_embedding(t_features, timestep_cond)  # (B, time_embed_dim)

        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError(
                    f"this UNet is class-conditional (class_embed_type={self.config.class_embed_type!r}, "
                    f"num_class_embeds={self.config.num_class_embeds}): pass class_labels"
                )
            if self.config.class_embed_type == "timestep":
                class_labels = self.time_proj(class_labels).to(sample.dtype)
            class_emb = self.class_embedding(class_labels).to(sample.dtype)  # (B, time_embed_dim)
            emb = torch.cat([emb, class_emb], dim=-1) if self.config.class_embeddings_concat else emb + class_emb

        if self.config.addition_embed_type == "text_time":
            emb = emb + self._text_time_embedding(added_cond_kwargs, emb.dtype)

        if self.time_embed_act is not None:
            emb = self.time_embed_act(emb)
        return emb

    def _text_time_embedding(self, added_cond_kwargs: dict[str, torch.Tensor] | None,
                             dtype: torch.dtype) -> torch.Tensor:
        """SDXL: ``add_embedding(cat(text_embeds (B, P), sinusoids of time_ids (B, K) -> (B, K * D)))``."""
        missing = [k for k in ("text_embeds", "time_ids") if k not in (added_cond_kwargs or {})]
        if missing:
            raise ValueError(f"this UNet has addition_embed_type='text_time' (SDXL): pass added_cond_kwargs with "
                             f"{missing} (the pooled text embeddings (B, P) and the size / crop time ids (B, K))")
        text_embeds, time_ids = added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]
        time_embeds = self.add_time_proj(time_ids.flatten()).reshape(text_embeds.shape[0], -1)  # (B, K * D)
        return self.add_embedding(torch.cat([text_embeds, time_embeds], dim=-1).to(dtype))  # (B, temb)

    # ------------------------------------------------------------------ feature caching (DeepCache)

    @property
    def _num_skips(self) -> int:
        return 1 + sum(skip_layers(block) for block in self.down_blocks)

    @property
    def num_deep_cache_branches(self) -> int:
        """How many ``cache_branch_id`` values feature caching can use (0 to this - 1): one per skip connection
        (SD 1.x / 2.x: 12, SDXL: 9); 0 when a block of this UNet cannot run part of its layers."""
        blocks = [*self.down_blocks, *self.up_blocks]
        return self._num_skips if all(getattr(b, "runs_layer_ranges", False) for b in blocks) else 0

    def _check_deep_cache(self, step: DeepCacheStep, adapters: bool) -> None:
        branches = self.num_deep_cache_branches
        if not branches:
            kinds = sorted({type(b).__name__ for b in [*self.down_blocks, *self.up_blocks]
                            if not getattr(b, "runs_layer_ranges", False)})
            raise ValueError(f"deep_cache: this UNet's blocks {kinds} cannot run part of their layers; feature "
                             "caching needs the SD / SDXL block types")
        if not isinstance(step.branch, int) or not 0 <= step.branch < branches:
            raise ValueError(f"deep_cache: cache_branch_id must be an int from 0 to {branches - 1} (this UNet's skip "
                             f"connections, shallowest first), got {step.branch!r}")
        if adapters:
            raise ValueError("deep_cache: ControlNet / T2I-Adapter residuals cannot be combined with feature "
                             "caching (the cached steps skip the layers they are added to)")

    def _up_block(self, block, sample, res, emb, context, upsample_size, **part) -> torch.Tensor:
        if block.has_cross_attention:
            return block(sample, res, emb, upsample_size=upsample_size, **context, **part)
        return block(sample, res, emb, upsample_size=upsample_size, **part)

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        down_block_additional_residuals: Sequence[torch.Tensor] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
        down_intrablock_additional_residuals: Sequence[torch.Tensor] | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
        deep_cache: DeepCacheStep | None = None,
    ) -> UNet2DConditionOutput | tuple[torch.Tensor]:
        """Predict from a noisy latent.

        Args:
            sample: (B, in_channels, H, W). H and W need not be multiples of the total downsampling factor.
            timestep: a number, a 0-d tensor, or a (B,) / (1,) tensor.
            encoder_hidden_states: (B, S, cross_attention_dim) text states.
            class_labels: (B,) labels or (B, D) vectors for the class embedding, when the config has one.
            timestep_cond: (B, time_cond_proj_dim) guidance embedding of LCM models.
            attention_mask: keep-mask (1 keep, 0 drop) for the self-attentions, as diffusers (rarely useful).
            encoder_attention_mask: (B, S) keep-mask over the text tokens, for the cross-attentions.
            cross_attention_kwargs: accepted for compatibility; there are no attention processors, so its keys
                are ignored (with a warning).
            added_cond_kwargs: SDXL UNets (``addition_embed_type="text_time"``): ``text_embeds`` (B, P) pooled text
                embeddings and ``time_ids`` (B, K) size / crop (or aesthetic score) ids; unused otherwise.
            down_block_additional_residuals, mid_block_additional_residual: ControlNet outputs, added to the skip
                tensors (one per skip) and to the mid block output. Down residuals without a mid residual are
                T2I-Adapter features (diffusers' deprecated spelling of ``down_intrablock_additional_residuals``).
            down_intrablock_additional_residuals: T2I-Adapter features, added inside the down path.
            return_dict: ``False`` returns ``(sample,)``.
            deep_cache: diffusekit's, not diffusers': this call's part in DeepCache-style feature reuse
                (:class:`~diffusekit.models.deep_cache.DeepCacheStep`; the pipelines' ``enable_deep_cache`` passes
                it): a full step records the feature entering the branch's up layer, a cached step runs only the
                layers shallower than the branch and continues from the recorded feature.
        """
        if cross_attention_kwargs:
            unused = sorted(k for k in cross_attention_kwargs if k != "scale")
            if unused:
                logger.warning("UNet2DConditionModel: ignoring cross_attention_kwargs %s (no processors)", unused)
        self._check_context(encoder_hidden_states)

        # 0. sizes not divisible by 2**num_upsamplers: upsample to the skip tensors' sizes instead of exactly 2x
        factor = 2**self.num_upsamplers
        forward_upsample_size = any(s % factor for s in sample.shape[-2:])

        # masks: keep-masks (B, K) -> additive biases (B, 1, K)
        attention_mask = mask_to_bias(attention_mask, sample.dtype)
        encoder_attention_mask = mask_to_bias(encoder_attention_mask, sample.dtype)
        context = dict(
            encoder_hidden_states=encoder_hidden_states,
            attention_mask=attention_mask,
            encoder_attention_mask=encoder_attention_mask,
        )

        if self.config.center_input_sample:
            sample = 2 * sample - 1.0

        # 1. embedding: (B, temb)
        emb = self._embedding(sample, timestep, timestep_cond, class_labels, added_cond_kwargs)

        # adapter residuals: ControlNet gives both down and mid; down alone is the T2I-Adapter spelling
        is_controlnet = down_block_additional_residuals is not None and mid_block_additional_residual is not None
        intrablock = down_intrablock_additional_residuals
        if intrablock is None and not is_controlnet:
            intrablock = down_block_additional_residuals
        intrablock = None if intrablock is None else list(intrablock)  # a copy: popped below
        if deep_cache is not None:
            self._check_deep_cache(deep_cache, adapters=intrablock is not None or is_controlnet)
        reuse = deep_cache is not None and deep_cache.reuse

        # 2. down: collect the skip tensors, (B, C0, H, W) first; a cached step stops after branch k's
        sample = self.conv_in(sample)  # (B, C0, H, W)
        skips: tuple[torch.Tensor, ...] = (sample,)
        todo = deep_cache.branch if reuse else None  # skip tensors past conv_in's still to compute
        for block in self.down_blocks:
            part = {}
            if todo is not None:
                if todo == 0:
                    break
                part = {"stop": min(todo, skip_layers(block))}
                todo -= part["stop"]
            if block.has_cross_attention:
                extra = intrablock.pop(0) if intrablock else None
                sample, res = block(sample, emb, additional_residuals=extra, **context, **part)
            else:
                sample, res = block(sample, emb, **part)
                if intrablock:  # added to the block output, which is also its last skip tensor
                    sample = sample + intrablock.pop(0)
                    res = res[:-1] + (sample,)
            skips += res

        if is_controlnet:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(
                    f"down_block_additional_residuals has {len(down_block_additional_residuals)} tensors; "
                    f"this UNet has {len(skips)} skip connections"
                )
            skips = tuple(s + r for s, r in zip(skips, down_block_additional_residuals))

        # 3. mid: (B, C_last, H / factor, W / factor)
        if self.mid_block is not None and not reuse:
            if self.mid_block.has_cross_attention:
                sample = self.mid_block(sample, emb, **context)
            else:
                sample = self.mid_block(sample, emb)
            if intrablock and sample.shape == intrablock[0].shape:
                sample = sample + intrablock.pop(0)
        if is_controlnet:
            sample = sample + mid_block_additional_residual

        # 4. up: each block consumes one skip per resnet, deepest first. With deep_cache, the up layer eating
        # branch k's skip (``entry`` among all up layers) starts from the cached feature on a cached step (the
        # layers before it are skipped); a full step records the feature entering it.
        upsample_size = None
        entry = None if deep_cache is None else self._num_skips - 1 - deep_cache.branch
        first = 0  # the block's first layer among all up layers
        for i, block in enumerate(self.up_blocks):
            k = len(block.resnets)
            split = entry - first if entry is not None and first <= entry < first + k else None
            first += k
            if reuse and split is None and first <= entry:
                continue  # deeper than the branch: its output is part of the cached feature
            if split is not None:
                if reuse:
                    sample = deep_cache.cached
                else:  # the block's layers before the entry, then record what enters it
                    if split:
                        skips, res = skips[:-split], skips[-split:]
                        sample = self._up_block(block, sample, res, emb, context, None, stop=split)
                    deep_cache.feature = sample
            start = split or 0
            skips, res = skips[: start - k], skips[start - k:]
            if forward_upsample_size and i < len(self.up_blocks) - 1:
                upsample_size = skips[-1].shape[2:]
            part = {"start": start} if start else {}
            sample = self._up_block(block, sample, res, emb, context, upsample_size, **part)

        # 5. out: (B, out_channels, H, W)
        if self.conv_norm_out is not None:
            sample = self.conv_act(self.conv_norm_out(sample))
        sample = self.conv_out(sample)

        if not return_dict:
            return (sample,)
        return UNet2DConditionOutput(sample=sample)
