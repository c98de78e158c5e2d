"""Timestep embeddings: sinusoidal features, Gaussian Fourier features, and the MLP that follows them."""

from __future__ import annotations

import math

import torch
from torch import nn

from .resnet import get_activation


def timestep_embedding(
    timesteps: torch.Tensor,
    dim: int,
    flip_sin_to_cos: bool = False,
    downscale_freq_shift: float = 1,
    scale: float = 1,
    max_period: int = 10000,
) -> torch.Tensor:
    """Sinusoidal features of (possibly fractional) timesteps, as in DDPM: ``(N,) -> (N, dim)`` float32.

    Frequencies are ``max_period ** (-i / (dim // 2 - downscale_freq_shift))`` for ``i < dim // 2``; the output is
    ``[sin, cos]`` (``[cos, sin]`` with ``flip_sin_to_cos``) of ``scale * t * freq``, zero-padded to an odd ``dim``.
    """
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be a 1-d tensor, got shape {tuple(timesteps.shape)}")
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=timesteps.device) * -math.log(max_period)
    freqs = torch.exp(exponent / (half - downscale_freq_shift))  # (half,)
    args = scale * (timesteps[:, None].float() * freqs[None, :])  # (N, half)
    sin, cos = torch.sin(args), torch.cos(args)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)  # (N, 2 * half)
    if dim % 2 == 1:
        emb = nn.functional.pad(emb, (0, 1))
    return emb


get_timestep_embedding = timestep_embedding  # diffusers' name


class Timesteps(nn.Module):
    """Weightless module around :func:`timestep_embedding`."""

    def __init__(self, num_channels: int, flip_sin_to_cos: bool, downscale_freq_shift: float, scale: float = 1):
        super().__init__()
        self.num_channels = num_channels
        self.flip_sin_to_cos = flip_sin_to_cos
        self.downscale_freq_shift = downscale_freq_shift
        self.scale = scale

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timestep_embedding(
            timesteps, self.num_channels, self.flip_sin_to_cos, self.downscale_freq_shift, scale=self.scale
        )


class GaussianFourierProjection(nn.Module):
    """Random Fourier features of a noise level (score-SDE / NCSN++): ``(N,) -> (N, 2 * embedding_size)``.

    ``weight`` (a frozen parameter, saved in checkpoints) holds the random frequencies. With ``log=True`` the input
    is ``log(sigma)``. The output is ``[sin, cos]`` of ``2 pi x w`` (``[cos, sin]`` with ``flip_sin_to_cos``).
    ``set_W_to_weight`` (diffusers' flag) only changes which random draw a seeded init keeps (diffusers draws twice
    with it); the parameter is always named ``weight``.
    """

    def __init__(
        self,
        embedding_size: int = 256,
        scale: float = 1.0,
        set_W_to_weight: bool = True,
        log: bool = True,
        flip_sin_to_cos: bool = False,
    ):
        super().__init__()
        if set_W_to_weight:  # diffusers draws the frequencies twice then and keeps the second draw: same seeds, same W
            torch.randn(embedding_size)
        self.weight = nn.Parameter(torch.randn(embedding_size) * scale, requires_grad=False)
        self.log = log
        self.flip_sin_to_cos = flip_sin_to_cos

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.log:
            x = torch.log(x)
        x_proj = x[:, None] * self.weight[None, :] * (2 * math.pi)  # (N, embedding_size)
        sin, cos = torch.sin(x_proj), torch.cos(x_proj)
        return torch.cat([cos, sin] if self.flip_sin_to_cos else [sin, cos], dim=-1)


class TimestepEmbedding(nn.Module):
    """Two-layer MLP on timestep features: ``linear_1 -> act -> linear_2 (-> post_act)``.

    ``cond_proj_dim`` adds ``cond_proj`` (no bias), whose projection of ``condition`` is added to the input (LCM's
    guidance embedding). ``sample_proj_bias`` sets the bias of both linears.
    """

    def __init__(
        self,
        in_channels: int,
        time_embed_dim: int,
        act_fn: str = "silu",
        out_dim: int | None = None,
        post_act_fn: str | None = None,
        cond_proj_dim: int | None = None,
        sample_proj_bias: bool = True,
    ):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim, bias=sample_proj_bias)
        self.cond_proj = nn.Linear(cond_proj_dim, in_channels, bias=False) if cond_proj_dim is not None else None
        self.act = get_activation(act_fn)
        self.linear_2 = nn.Linear(time_embed_dim, out_dim or time_embed_dim, bias=sample_proj_bias)
        self.post_act = get_activation(post_act_fn) if post_act_fn is not None else None

    def forward(self, sample: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        if condition is not None:
            if self.cond_proj is None:
                raise ValueError("TimestepEmbedding got a condition but was built without cond_proj_dim")
            sample = sample + self.cond_proj(condition)
        sample = self.linear_2(self.act(self.linear_1(sample)))  # (N, out_dim)
        if self.post_act is not None:
            sample = self.post_act(sample)
        return sample
