"""``UNet2DModel``: the unconditional (optionally class-conditional) image UNet of DDPM / score-SDE.

Reads and writes diffusers' ``UNet2DModel`` checkpoints: config keys, defaults and module paths are diffusers'.

    sample (B, in, H, W) ──conv_in──► down blocks ──► mid block ──► up blocks ──► norm/act/conv_out ──► (B, out, H, W)
                                          │ skip tensors ──────────────────▲
    timestep ──time_proj (sinusoidal / Fourier / learned)──► time_embedding MLP (+ class embedding) ──► every resnet

H and W must be multiples of ``2 ** (len(block_out_channels) - 1)``.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
from torch import nn

from ..configuration import register_to_config
from ..modeling import ModelMixin, StateDict
from ..outputs import BaseOutput
from . import unet_blocks  # noqa: F401  (registers the block classes)
from .attention import rename_legacy_attention_keys
from .embeddings import GaussianFourierProjection, TimestepEmbedding, Timesteps
from .registry import get_block
from .normalization import GroupNorm


@dataclass
class UNet2DOutput(BaseOutput):
    """``sample``: the model output, ``(B, out_channels, H, W)``."""

    sample: torch.Tensor


class UNet2DModel(ModelMixin):
    """A 2D UNet mapping a noisy sample and a timestep to a sample-shaped output (noise / x0 / v prediction).

    Config (diffusers' names and defaults): ``block_out_channels`` widths of the stages; ``down_block_types`` /
    ``up_block_types`` registered block names (``DownBlock2D``, ``AttnDownBlock2D``, ``UpBlock2D``,
    ``AttnUpBlock2D``); ``mid_block_type`` (``"UNetMidBlock2D"`` or ``None``); ``layers_per_block`` resnets per down
    stage (one more per up stage); ``time_embedding_type`` ``"positional"`` (sinusoidal, ``flip_sin_to_cos``,
    ``freq_shift``), ``"fourier"`` (Gaussian Fourier features of ``log(sigma)``; the output is divided by sigma) or
    ``"learned"`` (an ``nn.Embedding`` of ``num_train_timesteps``); ``attention_head_dim`` channels per head
    (``None``: one head over all channels); ``class_embed_type`` ``None`` (with ``num_class_embeds``: a learned
    table), ``"timestep"`` (class labels embedded like timesteps) or ``"identity"`` (labels are embeddings already).
    """

    _supports_gradient_checkpointing = True  # enable_gradient_checkpointing(): recompute block layers

    @register_to_config
    def __init__(
        self,
        sample_size: int | tuple[int, int] | None = None,
        in_channels: int = 3,
        out_channels: int = 3,
        center_input_sample: bool = False,
        time_embedding_type: str = "positional",
        time_embedding_dim: int | None = None,
        freq_shift: int = 0,
        flip_sin_to_cos: bool = True,
        down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        mid_block_type: str | None = "UNetMidBlock2D",
        up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        block_out_channels: tuple[int, ...] = (224, 448, 672, 896),
        layers_per_block: int = 2,
        mid_block_scale_factor: float = 1,
        downsample_padding: int = 1,
        downsample_type: str = "conv",
        upsample_type: str = "conv",
        dropout: float = 0.0,
        act_fn: str = "silu",
        attention_head_dim: int | None = 8,
        norm_num_groups: int | None = 32,
        attn_norm_num_groups: int | None = None,
        norm_eps: float = 1e-5,
        resnet_time_scale_shift: str = "default",
        add_attention: bool = True,
        class_embed_type: str | None = None,
        num_class_embeds: int | None = None,
        num_train_timesteps: int | None = None,
    ):
        super().__init__()
        if not (len(down_block_types) == len(up_block_types) == len(block_out_channels)):
            raise ValueError(
                "down_block_types, up_block_types and block_out_channels must have the same length, got "
                f"{len(down_block_types)}, {len(up_block_types)} and {len(block_out_channels)}"
            )
        self.sample_size = sample_size
        width = block_out_channels[0]
        time_embed_dim = time_embedding_dim or width * 4

        self.conv_in = nn.Conv2d(in_channels, width, kernel_size=3, padding=1)

        # time: features (time_proj) then MLP (time_embedding)
        if time_embedding_type == "positional":
            self.time_proj = Timesteps(width, flip_sin_to_cos, freq_shift)
            time_features = width
        elif time_embedding_type == "fourier":
            self.time_proj = GaussianFourierProjection(embedding_size=width, scale=16)
            time_features = 2 * width
        elif time_embedding_type == "learned":
            if num_train_timesteps is None:
                raise ValueError("time_embedding_type='learned' needs num_train_timesteps in the config")
            self.time_proj = nn.Embedding(num_train_timesteps, width)
            time_features = width
        else:
            raise ValueError(
                f"unknown time_embedding_type {time_embedding_type!r}; expected 'positional', 'fourier' or 'learned'"
            )
        self.time_embedding = TimestepEmbedding(time_features, time_embed_dim)

        if class_embed_type is None:
            self.class_embedding = nn.Embedding(num_class_embeds, time_embed_dim) if num_class_embeds else None
        elif class_embed_type == "timestep":
            self.class_embedding = TimestepEmbedding(time_features, time_embed_dim)
        elif class_embed_type == "identity":
            self.class_embedding = nn.Identity()
        else:
            raise ValueError(f"unknown class_embed_type {class_embed_type!r}; expected None, 'timestep' or 'identity'")

        # keywords every block gets (see unet_blocks' call convention); head dim None -> one head per block
        common = dict(
            temb_channels=time_embed_dim,
            resnet_eps=norm_eps,
            resnet_act_fn=act_fn,
            resnet_groups=norm_num_groups,
            resnet_time_scale_shift=resnet_time_scale_shift,
            dropout=dropout,
        )
        n = len(block_out_channels)

        self.down_blocks = nn.ModuleList()
        self.up_blocks = nn.ModuleList()  # filled below; registered here, as diffusers
        for i, name in enumerate(down_block_types):
            block_cls = get_block("down", name, f"down_block_types[{i}]")
            out_ch = block_out_channels[i]
            self.down_blocks.append(
                block_cls(
                    in_channels=block_out_channels[max(i - 1, 0)],
                    out_channels=out_ch,
                    num_layers=layers_per_block,
                    add_downsample=i < n - 1,
                    attention_head_dim=attention_head_dim if attention_head_dim is not None else out_ch,
                    downsample_padding=downsample_padding,
                    downsample_type=downsample_type,
                    **common,
                )
            )

        if mid_block_type is None:
            self.mid_block = None
        else:
            mid_cls = get_block("mid", mid_block_type, "mid_block_type")
            self.mid_block = mid_cls(
                in_channels=block_out_channels[-1],
                num_layers=1,
                attention_head_dim=attention_head_dim if attention_head_dim is not None else block_out_channels[-1],
                output_scale_factor=mid_block_scale_factor,
                attn_groups=attn_norm_num_groups,
                add_attention=add_attention,
                **common,
            )

        reversed_channels = list(reversed(block_out_channels))
        for i, name in enumerate(up_block_types):
            block_cls = get_block("up", name, f"up_block_types[{i}]")
            out_ch = reversed_channels[i]
            self.up_blocks.append(
                block_cls(
                    in_channels=reversed_channels[min(i + 1, n - 1)],  # width of the deepest skip it consumes
                    prev_output_channel=reversed_channels[max(i - 1, 0)],
                    out_channels=out_ch,
                    num_layers=layers_per_block + 1,
                    add_upsample=i < n - 1,
                    attention_head_dim=attention_head_dim if attention_head_dim is not None else out_ch,
                    upsample_type=upsample_type,
                    **common,
                )
            )

        out_groups = norm_num_groups if norm_num_groups is not None else min(width // 4, 32)
        self.conv_norm_out = GroupNorm(num_groups=out_groups, num_channels=width, eps=norm_eps)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(width, out_channels, kernel_size=3, padding=1)

    @classmethod
    def _adapt_state_dict(cls, state_dict: StateDict) -> StateDict:
        # old hub checkpoints (google/ddpm-*): attentions.N.{query,key,value,proj_attn} -> to_q/to_k/to_v/to_out.0
        return rename_legacy_attention_keys(state_dict)

    def _timesteps(self, timestep: torch.Tensor | float | int, sample: torch.Tensor) -> torch.Tensor:
        """A python number, a 0-d or a 1-d tensor -> a 1-d tensor of length B on the sample's device."""
        if not torch.is_tensor(timestep):
            dtype = torch.long if isinstance(timestep, numbers.Integral) else torch.float32
            timestep = torch.tensor([timestep], dtype=dtype, device=sample.device)
        timestep = timestep.reshape(-1).to(sample.device)
        batch = sample.shape[0]
        if timestep.shape[0] not in (1, batch):
            raise ValueError(f"got {timestep.shape[0]} timesteps for a batch of {batch}: pass one, or one per sample")
        return timestep.expand(batch)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> UNet2DOutput | tuple[torch.Tensor]:
        """``sample`` (B, C, H, W), ``timestep`` (number, 0-d or (B,) tensor), ``class_labels`` (B,) -> UNet2DOutput."""
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0

        # 1. time (+ class) embedding: (B, time_embed_dim)
        timesteps = self._timesteps(timestep, sample)  # (B,)
        emb = self.time_embedding(self.time_proj(timesteps).to(self.dtype))
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("this UNet is class-conditional: pass class_labels")
            if self.config.class_embed_type == "timestep":
                class_labels = self.time_proj(class_labels).to(self.dtype)
            emb = emb + self.class_embedding(class_labels).to(self.dtype)
        elif class_labels is not None:
            raise ValueError("class_labels given, but this UNet has no class embedding (set num_class_embeds)")

        # 2. down: collect the skip tensors
        sample = self.conv_in(sample)  # (B, C0, H, W)
        skips: tuple[torch.Tensor, ...] = (sample,)
        for block in self.down_blocks:
            sample, res = block(sample, emb)
            skips += res

        # 3. mid: (B, C_last, H / 2**(n-1), W / 2**(n-1))
        if self.mid_block is not None:
            sample = self.mid_block(sample, emb)

        # 4. up: each block consumes one skip per resnet, deepest first
        for block in self.up_blocks:
            k = len(block.resnets)
            skips, res = skips[:-k], skips[-k:]
            sample = block(sample, res, emb)

        # 5. out: (B, out_channels, H, W)
        sample = self.conv_out(self.conv_act(self.conv_norm_out(sample)))
        if self.config.time_embedding_type == "fourier":
            sample = sample / timesteps.reshape(-1, 1, 1, 1)  # score-SDE models predict score * sigma

        if not return_dict:
            return (sample,)
        return UNet2DOutput(sample=sample)
