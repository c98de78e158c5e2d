"""``AutoencoderKL``: the KL-regularised VAE of latent diffusion (Stable Diffusion's image <-> latent codec).

Reads and writes diffusers' ``AutoencoderKL`` checkpoints (same config keys, defaults and module paths).

    image (B, 3, H, W) ─encoder─► moments (B, 2L, H/f, W/f) ─quant_conv─► DiagonalGaussianDistribution(mean, logvar)
    latent (B, L, H/f, W/f) ─post_quant_conv─► decoder ─► image (B, 3, H, W)          f = 2 ** (len(blocks) - 1)

``enable_slicing()`` runs the batch one image at a time; ``enable_tiling()`` runs large inputs in overlapping tiles
(``tile_sample_min_size`` pixels / ``tile_latent_min_size`` latents, overlap ``tile_overlap_factor``) and blends the
seams linearly, giving the same numbers as diffusers' tiled VAE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..configuration import register_to_config
from ..modeling import ModelMixin, StateDict
from ..outputs import BaseOutput
from ..single_file.loading import FromOriginalModelMixin
from ..random import randn_tensor
from . import unet_blocks  # noqa: F401  (registers the block classes)
from .attention import fuse_qkv_projections, rename_legacy_attention_keys
from .registry import get_block
from .unet_blocks import UNetMidBlock2D
from .normalization import GroupNorm

_VAE_EPS = 1e-6  # GroupNorm epsilon of every VAE layer (not configurable in diffusers either)


class DiagonalGaussianDistribution:
    """A diagonal Gaussian over latents, from ``parameters`` = ``cat([mean, logvar], dim=1)``.

    ``logvar`` is clamped to [-30, 20]. ``sample(generator)`` draws ``mean + std * noise`` with the noise made like
    diffusers' ``randn_tensor`` (on the generator's device, in the parameters' dtype), so a seed gives the same
    latents in both libraries. ``deterministic=True`` gives zero variance.
    """

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        self.parameters = parameters  # (B, 2L, h, w)
        self.mean, logvar = parameters.chunk(2, dim=1)  # (B, L, h, w) each
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.deterministic = deterministic
        if deterministic:
            self.std = self.var = torch.zeros_like(self.mean)
        else:
            self.std = torch.exp(0.5 * self.logvar)
            self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        noise = randn_tensor(self.mean.shape, generator, device=self.parameters.device, dtype=self.parameters.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> torch.Tensor:
        """KL(self || other) per batch item (``other=None``: the standard normal)."""
        if self.deterministic:
            return torch.zeros(1)
        if other is None:
            terms = self.mean.pow(2) + self.var - 1.0 - self.logvar
        else:
            ratio = self.var / other.var
            terms = (self.mean - other.mean).pow(2) / other.var + ratio - 1.0 - self.logvar + other.logvar
        return 0.5 * terms.sum(dim=[1, 2, 3])

    def nll(self, sample: torch.Tensor, dims: tuple[int, ...] = (1, 2, 3)) -> torch.Tensor:
        """Negative log-likelihood of ``sample``, summed over ``dims``."""
        if self.deterministic:
            return torch.zeros(1)
        log_two_pi = 1.8378770664093453  # log(2 pi)
        return 0.5 * (log_two_pi + self.logvar + (sample - self.mean).pow(2) / self.var).sum(dim=list(dims))


@dataclass
class AutoencoderKLOutput(BaseOutput):
    """``latent_dist``: the posterior over latents."""

    latent_dist: DiagonalGaussianDistribution


@dataclass
class DecoderOutput(BaseOutput):
    """``sample``: the decoded images ``(B, C, H, W)``. ``commit_loss`` is always ``None`` here (VQ models only)."""

    sample: torch.Tensor
    commit_loss: torch.Tensor | None = None


class Encoder(nn.Module):
    """conv_in -> down blocks (stride 2 but the last) -> mid block (resnet/attention/resnet) -> norm/act/conv_out."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        down_block_types: tuple[str, ...],
        block_out_channels: tuple[int, ...],
        layers_per_block: int,
        norm_num_groups: int,
        act_fn: str,
        double_z: bool = True,
        mid_block_add_attention: bool = True,
    ):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], kernel_size=3, stride=1, padding=1)
        n = len(block_out_channels)
        common = dict(
            temb_channels=None,
            num_layers=layers_per_block,
            resnet_eps=_VAE_EPS,
            resnet_act_fn=act_fn,
            resnet_groups=norm_num_groups,
            resnet_time_scale_shift="default",
            dropout=0.0,
        )
        self.down_blocks = nn.ModuleList(
            get_block("down", name, f"down_block_types[{i}]")(
                in_channels=block_out_channels[max(i - 1, 0)],
                out_channels=block_out_channels[i],
                add_downsample=i < n - 1,
                downsample_padding=0,
                attention_head_dim=block_out_channels[i],
                **common,
            )
            for i, name in enumerate(down_block_types)
        )
        width = block_out_channels[-1]
        self.mid_block = UNetMidBlock2D(
            in_channels=width,
            temb_channels=None,
            resnet_eps=_VAE_EPS,
            resnet_act_fn=act_fn,
            resnet_groups=norm_num_groups,
            attention_head_dim=width,
            add_attention=mid_block_add_attention,
        )
        self.conv_norm_out = GroupNorm(num_groups=norm_num_groups, num_channels=width, eps=_VAE_EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(width, 2 * out_channels if double_z else out_channels, kernel_size=3, padding=1)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        sample = self.conv_in(sample)  # (B, C0, H, W)
        for block in self.down_blocks:
            sample = block(sample)  # (B, Ci, H/2**i, W/2**i)
        sample = self.mid_block(sample)
        return self.conv_out(self.conv_act(self.conv_norm_out(sample)))  # (B, 2L, H/f, W/f)


class Decoder(nn.Module):
    """conv_in -> mid block -> up blocks (2x each but the last) -> norm/act/conv_out."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        up_block_types: tuple[str, ...],
        block_out_channels: tuple[int, ...],
        layers_per_block: int,
        norm_num_groups: int,
        act_fn: str,
        mid_block_add_attention: bool = True,
    ):
        super().__init__()
        width = block_out_channels[-1]
        self.conv_in = nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1)
        self.up_blocks = nn.ModuleList()  # filled after the mid block (diffusers' registration and init order)
        self.mid_block = UNetMidBlock2D(
            in_channels=width,
            temb_channels=None,
            resnet_eps=_VAE_EPS,
            resnet_act_fn=act_fn,
            resnet_groups=norm_num_groups,
            attention_head_dim=width,
            add_attention=mid_block_add_attention,
        )
        reversed_channels = list(reversed(block_out_channels))
        n = len(block_out_channels)
        self.up_blocks.extend(
            get_block("up", name, f"up_block_types[{i}]")(
                in_channels=reversed_channels[max(i - 1, 0)],
                prev_output_channel=reversed_channels[max(i - 1, 0)],
                out_channels=reversed_channels[i],
                temb_channels=None,
                num_layers=layers_per_block + 1,
                add_upsample=i < n - 1,
                resnet_eps=_VAE_EPS,
                resnet_act_fn=act_fn,
                resnet_groups=norm_num_groups,
                attention_head_dim=reversed_channels[i],
                resnet_time_scale_shift="default",
                dropout=0.0,
            )
            for i, name in enumerate(up_block_types)
        )
        self.conv_norm_out = GroupNorm(num_groups=norm_num_groups, num_channels=block_out_channels[0], eps=_VAE_EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(block_out_channels[0], out_channels, kernel_size=3, padding=1)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        sample = self.conv_in(sample)  # (B, C_last, h, w)
        sample = self.mid_block(sample)
        for block in self.up_blocks:
            sample = block(sample)  # doubles H and W (but the last)
        return self.conv_out(self.conv_act(self.conv_norm_out(sample)))  # (B, out_channels, H, W)


def _blend(previous: torch.Tensor, current: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
    """Cross-fade the last ``extent`` rows/cols (``dim`` 2/3) of ``previous`` into the first ones of ``current``."""
    extent = min(previous.shape[dim], current.shape[dim], extent)
    if extent == 0:
        return current
    shape = [1, 1, 1, 1]
    shape[dim] = extent
    ramp = (torch.arange(extent, dtype=torch.float64) / extent).reshape(shape)  # 0, 1/e, ..., (e-1)/e
    w_cur = ramp.to(current.dtype).to(current.device)
    w_prev = (1 - ramp).to(current.dtype).to(current.device)
    head = previous.narrow(dim, previous.shape[dim] - extent, extent) * w_prev + current.narrow(dim, 0, extent) * w_cur
    return torch.cat([head, current.narrow(dim, extent, current.shape[dim] - extent)], dim=dim)


class AutoencoderKL(ModelMixin, FromOriginalModelMixin):
    """Variational autoencoder with a diagonal-Gaussian latent (diffusers' config keys and defaults).

    ``scaling_factor`` (and ``shift_factor``, ``latents_mean``/``latents_std``) describe how pipelines normalise
    latents; ``force_upcast`` tells pipelines to run the VAE in float32. The model itself does not apply them.
    """

    _supports_gradient_checkpointing = True  # enable_gradient_checkpointing(): recompute block layers
    _optimize_targets = ("encoder", "decoder")  # optimize(): the parts encode() / decode() run

    _single_file_kind = "vae"  # from_single_file / save_single_file: docs/SINGLE_FILE.md

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",),
        up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",),
        block_out_channels: tuple[int, ...] = (64,),
        layers_per_block: int = 1,
        act_fn: str = "silu",
        latent_channels: int = 4,
        norm_num_groups: int = 32,
        sample_size: int | tuple[int, int] = 32,
        scaling_factor: float = 0.18215,
        shift_factor: float | None = None,
        latents_mean: tuple[float, ...] | None = None,
        latents_std: tuple[float, ...] | None = None,
        force_upcast: bool = True,
        use_quant_conv: bool = True,
        use_post_quant_conv: bool = True,
        mid_block_add_attention: bool = True,
    ):
        super().__init__()
        if not (len(down_block_types) == len(up_block_types) == len(block_out_channels)):
            raise ValueError(
                "down_block_types, up_block_types and block_out_channels must have the same length, got "
                f"{len(down_block_types)}, {len(up_block_types)} and {len(block_out_channels)}"
            )
        self.encoder = Encoder(
            in_channels, latent_channels, down_block_types, block_out_channels, layers_per_block, norm_num_groups,
            act_fn, double_z=True, mid_block_add_attention=mid_block_add_attention,
        )  # fmt: skip
        self.decoder = Decoder(
            latent_channels, out_channels, up_block_types, block_out_channels, layers_per_block, norm_num_groups,
            act_fn, mid_block_add_attention=mid_block_add_attention,
        )  # fmt: skip
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1) if use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1) if use_post_quant_conv else None

        self.use_slicing = False
        self.use_tiling = False
        size = sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size
        self.tile_sample_min_size = int(size)  # pixels per tile
        self.tile_latent_min_size = int(size / 2 ** (len(block_out_channels) - 1))  # latents per tile
        self.tile_overlap_factor = 0.25

    @classmethod
    def _adapt_state_dict(cls, state_dict: StateDict) -> StateDict:
        # pre-0.14 VAE checkpoints: mid_block.attentions.0.{query,key,value,proj_attn} -> to_q/to_k/to_v/to_out.0
        return rename_legacy_attention_keys(state_dict)

    # ------------------------------------------------------------------ memory savers

    def enable_slicing(self) -> None:
        """Encode / decode one batch item at a time."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def enable_tiling(self, use_tiling: bool = True) -> None:
        """Encode / decode inputs larger than a tile in overlapping tiles blended at the seams."""
        self.use_tiling = use_tiling

    def disable_tiling(self) -> None:
        self.use_tiling = False

    def fuse_qkv_projections(self) -> None:
        """diffusers' API: the mid-block attention computes q, k, v in one matrix product (``models/attention.py``)."""
        fuse_qkv_projections(self, True)

    def unfuse_qkv_projections(self) -> None:
        """Undo :meth:`fuse_qkv_projections`."""
        fuse_qkv_projections(self, False)

    # ------------------------------------------------------------------ encode

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> moments (B, 2L, H/f, W/f)."""
        if self.use_tiling and max(x.shape[-2:]) > self.tile_sample_min_size:
            return self._tiled(x, self._encode_tile, self.tile_sample_min_size, self.tile_latent_min_size)
        return self._encode_tile(x)

    def _encode_tile(self, x: torch.Tensor) -> torch.Tensor:
        moments = self.encoder(x)
        return self.quant_conv(moments) if self.quant_conv is not None else moments

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple:
        """Images in [-1, 1] ``(B, C, H, W)`` -> ``AutoencoderKLOutput(latent_dist)``."""
        if self.use_slicing and x.shape[0] > 1:
            moments = torch.cat([self._encode(item) for item in x.split(1)])
        else:
            moments = self._encode(x)
        posterior = DiagonalGaussianDistribution(moments)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def tiled_encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple:
        """Encode in tiles regardless of the input size."""
        moments = self._tiled(x, self._encode_tile, self.tile_sample_min_size, self.tile_latent_min_size)
        posterior = DiagonalGaussianDistribution(moments)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    # ------------------------------------------------------------------ decode

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, L, h, w) -> images (B, C, h*f, w*f)."""
        if self.use_tiling and max(z.shape[-2:]) > self.tile_latent_min_size:
            return self._tiled(z, self._decode_tile, self.tile_latent_min_size, self.tile_sample_min_size)
        return self._decode_tile(z)

    def _decode_tile(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator=None) -> DecoderOutput | tuple:
        """Latents ``(B, L, h, w)`` (unscaled: divide by ``scaling_factor`` first) -> ``DecoderOutput(sample)``."""
        if self.use_slicing and z.shape[0] > 1:
            decoded = torch.cat([self._decode(item) for item in z.split(1)])
        else:
            decoded = self._decode(z)
        return DecoderOutput(sample=decoded) if return_dict else (decoded,)

    def tiled_decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple:
        """Decode in tiles regardless of the input size."""
        decoded = self._tiled(z, self._decode_tile, self.tile_latent_min_size, self.tile_sample_min_size)
        return DecoderOutput(sample=decoded) if return_dict else (decoded,)

    def _tiled(
        self, x: torch.Tensor, run: Callable[[torch.Tensor], torch.Tensor], tile_in: int, tile_out: int
    ) -> torch.Tensor:
        """Run ``run`` on overlapping ``tile_in`` tiles of ``x``; blend and crop the ``tile_out`` results.

        Tiles start every ``tile_in * (1 - overlap)`` pixels. Each result is cross-faded with its (already blended)
        upper and left neighbours over ``tile_out * overlap`` rows / columns, then cropped to
        ``tile_out - blend`` so that the pieces tile the output exactly.
        """
        stride = int(tile_in * (1 - self.tile_overlap_factor))
        blend = int(tile_out * self.tile_overlap_factor)
        keep = tile_out - blend
        height, width = x.shape[-2:]
        grid = [
            [run(x[:, :, top : top + tile_in, left : left + tile_in]) for left in range(0, width, stride)]
            for top in range(0, height, stride)
        ]
        rows = []
        for i, row in enumerate(grid):
            pieces = []
            for j, tile in enumerate(row):
                if i > 0:
                    tile = _blend(grid[i - 1][j], tile, blend, dim=2)
                if j > 0:
                    tile = _blend(row[j - 1], tile, blend, dim=3)
                row[j] = tile  # later neighbours blend with the blended tile
                pieces.append(tile[:, :, :keep, :keep])
            rows.append(torch.cat(pieces, dim=3))
        return torch.cat(rows, dim=2)

    # ------------------------------------------------------------------ full pass

    def forward(
        self,
        sample: torch.Tensor,
        sample_posterior: bool = False,
        return_dict: bool = True,
        generator: torch.Generator | None = None,
    ) -> DecoderOutput | tuple:
        """Encode then decode; ``sample_posterior`` draws the latent (with ``generator``) instead of its mean."""
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        decoded = self.decode(z).sample
        return DecoderOutput(sample=decoded) if return_dict else (decoded,)
