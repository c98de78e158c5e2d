"""Cheap previews of the latents at every sampling step: a linear latent -> RGB projection per VAE.

A latent pixel of an SD-family VAE decodes, to a good approximation, to a colour that is an affine function of its
channels. The projection is fitted, once per VAE, from the VAE itself: a few smooth random colour images are
encoded (giving latents like real ones, scaled by ``scaling_factor`` as the pipeline holds them) and decoded, the
decoded images average-pooled down to the latent grid, and least squares gives ``rgb = latents · W + b``.
(Pure Gaussian latents are a poor sample: they lie off the latents images produce, and the fit made from them
did not predict real images' colours.) That costs one small decode at model load (milliseconds for the
bundled VAE) and one (C × 3) matrix product per step afterwards. Fits are cached per VAE weights file.
Pipelines without a VAE sample in pixel space; their preview is the sample itself.
"""

from __future__ import annotations

import dataclasses
import io
import threading
from typing import Any

_CACHE: dict[tuple, "LatentPreview"] = {}
_CACHE_LOCK = threading.Lock()


@dataclasses.dataclass(frozen=True)
class LatentPreview:
    """``rgb = latents · weight + bias`` per latent pixel; ``weight`` is (C, 3), ``bias`` (3,), in [-1, 1] units."""

    weight: Any  # torch.Tensor (C, 3)
    bias: Any  # torch.Tensor (3,)
    r2: float = 1.0  # fraction of the pooled decoded colours' variance the fit explains

    def rgb(self, latents):
        """(B, C, h, w) latents -> (B, 3, h, w) colours in [-1, 1]."""
        import torch

        lat = latents.detach().to("cpu", torch.float32)
        out = torch.einsum("bchw,cr->brhw", lat, self.weight) + self.bias[None, :, None, None]
        return out.clamp(-1, 1)

    def image(self, latents, index: int = 0):
        """A PIL image of latent ``index`` at the latent grid's resolution."""
        from PIL import Image

        rgb = self.rgb(latents[index : index + 1])[0]
        array = ((rgb + 1) * 127.5).round().to(dtype=__import__("torch").uint8).permute(1, 2, 0).numpy()
        return Image.fromarray(array, "RGB")

    def png(self, latents, index: int = 0, size: tuple[int, int] | None = None) -> bytes:
        from PIL import Image

        image = self.image(latents, index)
        if size is not None and image.size != size:
            image = image.resize(size, Image.NEAREST)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()


def identity_preview(channels: int) -> LatentPreview:
    """For pixel-space pipelines: the sample is the image (grey from one channel)."""
    import torch

    weight = torch.eye(3) if channels == 3 else torch.ones(channels, 3) / channels
    return LatentPreview(weight, torch.zeros(3))


def fit_vae_preview(vae, *, samples: int = 16, size: int = 8, seed: int = 0) -> LatentPreview:
    """Least-squares fit of pooled decoded colours on latents, for ``vae`` (an ``AutoencoderKL``)."""
    import torch
    import torch.nn.functional as F

    config = vae.config
    channels = config.latent_channels
    factor = 2 ** (len(config.block_out_channels) - 1)
    pixels = size * factor
    generator = torch.Generator("cpu").manual_seed(seed)
    # smooth random colour fields in [-1, 1] (a few colour patches each), encoded: latents like real ones
    coarse = torch.rand(samples, 3, 3, 3, generator=generator) * 2 - 1  # (N, 3, 3, 3)
    images = F.interpolate(coarse, size=(pixels, pixels), mode="bilinear", align_corners=False)  # (N, 3, H, W)
    # half of them: colour shapes on a black ground (typical of object photos and of the bundled model's data)
    shapes = F.interpolate(torch.rand(samples, 1, 4, 4, generator=generator), size=(pixels, pixels),
                           mode="bilinear", align_corners=False) > 0.5  # (N, 1, H, W)
    images = torch.where(shapes | (torch.arange(samples) % 2 == 0)[:, None, None, None], images, -1.0)
    param = next(vae.parameters())
    with torch.no_grad():
        posterior = vae.encode(images.to(param.device, param.dtype)).latent_dist
        latents = posterior.mean.float().cpu()  # (N, C, h, w)
        if config.get("shift_factor") is not None:
            latents = latents - config.shift_factor
        latents = latents * config.scaling_factor  # as the pipeline holds them
        decode_in = latents / config.scaling_factor
        if config.get("shift_factor") is not None:
            decode_in = decode_in + config.shift_factor
        decoded = vae.decode(decode_in.to(param.device, param.dtype), return_dict=False)[0]  # (N, 3, H, W)
    pooled = F.avg_pool2d(decoded.float().cpu(), factor)  # (N, 3, h, w)
    x = latents.permute(0, 2, 3, 1).reshape(-1, channels).double()
    x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)  # (N*h*w, C+1)
    y = pooled.permute(0, 2, 3, 1).reshape(-1, 3).double()  # (N*h*w, 3)
    solution = torch.linalg.lstsq(x, y).solution  # (C+1, 3)
    residual = y - x @ solution
    r2 = float(1 - residual.pow(2).sum() / (y - y.mean(0)).pow(2).sum())
    return LatentPreview(solution[:-1].float(), solution[-1].float(), r2)


def preview_for(pipe, entry=None) -> LatentPreview:
    """The preview projection for a loaded pipeline (fitted once per VAE weights file, then cached)."""
    vae = getattr(pipe, "vae", None)
    if vae is None:
        return identity_preview(pipe.unet.config.in_channels)
    key = None
    if entry is not None:
        for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
            weights = entry.folder / "vae" / name
            if weights.is_file():
                stat = weights.stat()
                key = (str(weights.resolve()), stat.st_size, stat.st_mtime_ns)
                break
    with _CACHE_LOCK:
        if key is not None and key in _CACHE:
            return _CACHE[key]
    preview = fit_vae_preview(vae)
    if key is not None:
        with _CACHE_LOCK:
            _CACHE[key] = preview
    return preview
