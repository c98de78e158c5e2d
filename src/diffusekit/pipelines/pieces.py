"""The pieces every latent-diffusion pipeline (SD 1.x/2.x, SDXL; text-to-image, img2img, inpaint, depth) is made of.

A pipeline class is a short composition: it encodes the prompt (one or two text encoders), builds its conditioning
extras, prepares the starting latents (noise, a noised image, or image + mask), runs :meth:`LatentDiffusionMixin.denoise`
and decodes. This module holds the parts that do not depend on the text encoders:

- per-call state that callbacks read and write (``pipe.guidance_scale``, ``pipe.num_timesteps``, ``pipe.interrupt``,
  ``pipe._interrupt = True`` ...), kept per thread so two threads calling one pipeline never see each other's values;
- schedules: custom ``timesteps`` / ``sigmas``, ``strength`` and ``denoising_start`` / ``denoising_end`` cut-offs;
- the one denoising loop (classifier-free guidance, ``guidance_rescale``, UNet extras, callbacks, interrupt);
- noise latents, VAE encoding and decoding (scaling, shift, mean/std, the fp16 upcast some VAEs ask for).

docs/PIPELINES.md has a table of which pipeline uses which piece.
"""

from __future__ import annotations

import copy
import logging
import numbers
import threading
from typing import Any, Callable, Mapping, Sequence

import torch

from ..random import Generator, randn_tensor
from .checks import excerpt
from .deep_cache import DeepCacheConfig, DeepCacheRun, deep_cache_config
from .image_processor import VaeImageProcessor, check_output_type

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------- per-call state


class CallState:
    """A pipeline attribute whose value belongs to the calling thread (diffusers keeps these on ``self``).

    ``pipe._guidance_scale = 0.0`` inside a ``callback_on_step_end`` changes that call only; another thread running
    the same pipeline at the same time keeps its own value. After a call the values stay readable in the thread that
    made it (``pipe.num_timesteps``), as in diffusers.
    """

    def __init__(self, default: Any = None):
        self.default = default

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @staticmethod
    def _local(instance: Any) -> threading.local:
        # dict.setdefault is atomic under the GIL: two threads racing here get the same object
        return instance.__dict__.setdefault("_call_state", threading.local())

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self
        return getattr(self._local(instance), self.name, self.default)

    def __set__(self, instance: Any, value: Any) -> None:
        setattr(self._local(instance), self.name, value)


class PerCallStateMixin:
    """diffusers' per-call pipeline properties, read by callbacks: set by :meth:`begin_call` at the start of each
    ``__call__``; ``callback_on_step_end`` may set ``pipe._interrupt = True`` (the remaining steps are skipped and the
    current latents decoded) or ``pipe._guidance_scale`` (read again at every step, so guidance can be switched off
    half-way, as in diffusers' dynamic-CFG example)."""

    _guidance_scale = CallState(None)
    _guidance_rescale = CallState(0.0)
    _clip_skip = CallState(None)
    _cross_attention_kwargs = CallState(None)
    _denoising_start = CallState(None)
    _denoising_end = CallState(None)
    _num_timesteps = CallState(None)
    _interrupt = CallState(False)
    _guidance_interval = CallState(None)
    _deep_cache = CallState(None)  # this call's DeepCacheConfig (None: off)
    _deep_cache_run = CallState(None)  # this call's DeepCacheRun: the cached features, which steps ran in full

    def begin_call(self, *, guidance_scale: float = 1.0, guidance_rescale: float = 0.0, clip_skip: int | None = None,
                   cross_attention_kwargs: dict[str, Any] | None = None, denoising_start: float | None = None,
                   denoising_end: float | None = None,
                   guidance_interval: tuple[float, float] | None = None, deep_cache: Any = None) -> None:
        """Reset this thread's per-call state (and clear ``interrupt``) for a new call."""
        self._guidance_interval = check_guidance_interval(guidance_interval)
        self._deep_cache = self._checked_deep_cache(deep_cache_config(deep_cache, self.deep_cache))
        self._deep_cache_run = None
        self._guidance_scale = guidance_scale
        self._guidance_rescale = guidance_rescale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._denoising_start = denoising_start
        self._denoising_end = denoising_end
        self._num_timesteps = None
        self._interrupt = False

    guidance_scale = property(lambda self: self._guidance_scale, doc="This call's guidance scale.")
    guidance_rescale = property(lambda self: self._guidance_rescale, doc="This call's guidance_rescale.")
    clip_skip = property(lambda self: self._clip_skip, doc="This call's clip_skip.")
    cross_attention_kwargs = property(lambda self: self._cross_attention_kwargs,
                                      doc="This call's cross_attention_kwargs (passed to the UNet).")
    denoising_start = property(lambda self: self._denoising_start, doc="This call's denoising_start (SDXL).")
    denoising_end = property(lambda self: self._denoising_end, doc="This call's denoising_end (SDXL).")
    num_timesteps = property(lambda self: self._num_timesteps,
                             doc="Steps this thread's current (or last) call runs: set once its schedule is known.")
    interrupt = property(lambda self: self._interrupt,
                         doc="True once a callback set ``pipe._interrupt = True``: the remaining steps are skipped.")
    guidance_interval = property(lambda self: self._guidance_interval,
                                 doc="This call's guidance_interval (None: guidance on every step).")

    # ------------------------------------------------------------------ feature caching

    def enable_deep_cache(self, cache_interval: int = 3, cache_branch_id: int = 0, skip_mode: str = "uniform",
                          center: float | None = None, pow: float = 1.4) -> None:
        """DeepCache-style feature reuse for the following calls (opt-in; :mod:`diffusekit.pipelines.deep_cache`):
        every ``cache_interval``-th step runs the whole UNet, the steps between run only the layers shallower than
        skip branch ``cache_branch_id`` (0: the shallowest, fastest) on the deep features of the last full step.
        ``skip_mode="non-uniform"`` clusters the full steps around ``center`` (a fraction of the schedule).
        A call's ``deep_cache=`` argument overrides this for that call. diffusekit's, not diffusers'."""
        self._deep_cache_default = self._checked_deep_cache(DeepCacheConfig(
            cache_interval=cache_interval, cache_branch_id=cache_branch_id, skip_mode=skip_mode, center=center,
            pow=pow))

    def disable_deep_cache(self) -> None:
        """Every step runs the whole UNet again (the default)."""
        self.__dict__.pop("_deep_cache_default", None)

    @property
    def deep_cache(self) -> DeepCacheConfig | None:
        """The feature-caching settings of ``enable_deep_cache`` (None: off)."""
        return self.__dict__.get("_deep_cache_default")

    def _checked_deep_cache(self, config: DeepCacheConfig | None) -> DeepCacheConfig | None:
        if config is None:
            return None
        unet = getattr(self, "unet", None)
        branches = getattr(unet, "num_deep_cache_branches", 0)
        if not branches:
            raise ValueError(f"deep cache: {type(unet).__name__} cannot run part of its layers (feature caching "
                             "needs a UNet2DConditionModel with the SD / SDXL block types)")
        if config.cache_branch_id >= branches:
            raise ValueError(f"cache_branch_id must be below {branches} for this UNet (one branch per skip "
                             f"connection, 0 the shallowest), got {config.cache_branch_id}")
        return config

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Guidance needs a scale above 1; guidance-distilled UNets (``time_cond_proj_dim``) take the scale as input."""
        scale = self._guidance_scale
        return scale is not None and scale > 1 and self.unet.config.time_cond_proj_dim is None


# ---------------------------------------------------------------------------------------------------- schedules


def custom_schedule(timesteps, sigmas) -> dict[str, Any]:
    """``set_timesteps`` keywords for user-given ``timesteps`` or ``sigmas`` (at most one)."""
    if timesteps is not None and sigmas is not None:
        raise ValueError("pass at most one of timesteps and sigmas")
    if timesteps is not None:
        return {"timesteps": list(timesteps)}
    if sigmas is not None:
        return {"sigmas": list(sigmas)}
    return {}


def check_strength(strength: float) -> None:
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be a number in [0, 1] (1: start from noise), got {strength!r}")


def is_fraction(value: Any) -> bool:
    """diffusers' test for ``denoising_start`` / ``denoising_end``: a float strictly between 0 and 1 (else ignored)."""
    return isinstance(value, float) and 0 < value < 1


def check_denoising_fractions(denoising_start: Any, denoising_end: Any) -> None:
    for name, value in (("denoising_start", denoising_start), ("denoising_end", denoising_end)):
        if value is not None and not (isinstance(value, numbers.Real) and not isinstance(value, bool)):
            raise ValueError(f"{name} must be a float in (0, 1) (the fraction of the schedule), got {value!r}")
    if is_fraction(denoising_start) and is_fraction(denoising_end) and denoising_start >= denoising_end:
        raise ValueError(f"denoising_start ({denoising_start}) must be below denoising_end ({denoising_end}): the "
                         "steps from start to end would be empty")


def timestep_cutoff(scheduler, fraction: float) -> int:
    """The training timestep at ``fraction`` of the way from pure noise (0) to clean (1)."""
    train = scheduler.config.num_train_timesteps
    return int(round(train - fraction * train))


def set_strength_schedule(scheduler, num_inference_steps: int, strength: float, device: torch.device,
                          timesteps: Sequence[int] | None = None, sigmas: Sequence[float] | None = None,
                          denoising_start: float | None = None) -> tuple[torch.Tensor, int]:
    """Build the schedule on ``scheduler`` and keep its last ``int(steps * strength)`` steps (at least one), or, with
    ``denoising_start`` (SDXL's refiner hand-over; ``strength`` is then ignored), the steps below that fraction.

    Returns ``(timesteps to run, number of steps)``; the scheduler's begin index is set to the first kept step, so
    ``add_noise`` and ``step`` of sigma schedulers start from the right place. With custom ``timesteps`` /
    ``sigmas`` the step count is their length, as in diffusers.
    """
    custom = custom_schedule(timesteps, sigmas)
    scheduler.set_timesteps(None if custom else num_inference_steps, device=device, **custom)
    if is_fraction(denoising_start):
        kept = int((scheduler.timesteps < timestep_cutoff(scheduler, denoising_start)).sum())
        if scheduler.order == 2 and kept % 2 == 0:  # end after a second-order step's second half, as diffusers
            kept += 1
        start = len(scheduler.timesteps) - kept
        scheduler.set_begin_index(start)
        return scheduler.timesteps[start:], kept
    steps = len(scheduler.timesteps) if custom else num_inference_steps
    kept = max(min(int(steps * strength), steps), 1)
    start = (steps - kept) * scheduler.order
    scheduler.set_begin_index(start)
    return scheduler.timesteps[start:], kept


def cut_at_denoising_end(scheduler, timesteps: torch.Tensor, denoising_end: float | None) -> torch.Tensor:
    """Drop the steps below the ``denoising_end`` fraction (SDXL's base half of base + refiner)."""
    if not is_fraction(denoising_end):
        return timesteps
    cutoff = timestep_cutoff(scheduler, denoising_end)
    return timesteps[: int((timesteps >= cutoff).sum())]


def check_guidance_interval(interval: Any) -> tuple[float, float] | None:
    """``guidance_interval`` as ``(lo, hi)`` floats with ``0 <= lo <= hi <= 1`` (or None)."""
    if interval is None:
        return None
    try:
        lo, hi = interval
        valid = all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in (lo, hi)) and 0 <= lo <= hi <= 1
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise ValueError("guidance_interval must be a pair (lo, hi) with 0 <= lo <= hi <= 1: the fractions of the "
                         f"steps run with guidance (step i of n is guided when lo <= i / n < hi), got {interval!r}")
    return float(lo), float(hi)


def guided_step(interval: tuple[float, float] | None, i: int, n: int) -> bool:
    """Whether step ``i`` of ``n`` runs the unconditional branch: ``lo <= i / n < hi`` (every step without an
    interval)."""
    return interval is None or interval[0] <= i / n < interval[1]


# ---------------------------------------------------------------------------------------------------- prompts


def warn_truncation(tokenizer, prompts: Sequence[str]) -> None:
    """Log the part of each prompt that CLIP's token limit cuts off."""
    limit = tokenizer.model_max_length
    for prompt in prompts:
        ids = tokenizer(prompt).input_ids
        if len(ids) > limit:
            dropped = tokenizer.decode(ids[limit - 1 : -1])
            logger.warning("prompt truncated to %d CLIP tokens; dropped: %r", limit, excerpt(dropped))


# ---------------------------------------------------------------------------------------------------- guidance


def rescale_noise_cfg(noise_cfg: torch.Tensor, noise_pred_text: torch.Tensor, guidance_rescale: float) -> torch.Tensor:
    """Rescale guided noise to the text branch's std (Lin et al. 2023, sec. 3.4), mixed by ``guidance_rescale``."""
    dims = list(range(1, noise_pred_text.ndim))
    std_text = noise_pred_text.std(dim=dims, keepdim=True)
    std_cfg = noise_cfg.std(dim=dims, keepdim=True)
    rescaled = noise_cfg * (std_text / std_cfg)
    return guidance_rescale * rescaled + (1 - guidance_rescale) * noise_cfg


def guidance_scale_embedding(w: torch.Tensor, embedding_dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sinusoidal embedding of guidance scales (B,) -> (B, embedding_dim), for UNets with ``time_cond_proj_dim``."""
    w = w * 1000.0
    half = embedding_dim // 2
    freqs = torch.exp(torch.arange(half, dtype=dtype) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    angles = w.to(dtype)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return torch.nn.functional.pad(emb, (0, embedding_dim % 2))


def callback_tensor_names(callback: Any, names: Sequence[str]) -> Sequence[str]:
    """diffusers' ``PipelineCallback`` objects name their tensors themselves (``callback.tensor_inputs``)."""
    own = getattr(callback, "tensor_inputs", None)
    return list(own) if own is not None and not isinstance(callback, type) else names


# ---------------------------------------------------------------------------------------------------- the mixin


class LatentDiffusionMixin(PerCallStateMixin):
    """Latent preparation, the denoising loop and decoding, shared by every SD-family pipeline.

    Needs ``self.unet`` and ``self.vae``. ``upcast_vae_when_forced``: run the VAE in float32 when it is float16 and
    its config says ``force_upcast`` (SDXL pipelines, as diffusers'; the SD 1.x/2.x pipelines of diffusers do not).
    Every pipeline built on it takes one call argument diffusers does not: ``guidance_interval`` (see :meth:`denoise`).
    """

    upcast_vae_when_forced = False
    #: tensors a ``callback_on_step_end`` may ask for (and replace)
    _callback_tensor_inputs: tuple[str, ...] = ("latents",)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def check_callback_inputs(self, names: Sequence[str]) -> None:
        if not set(names) <= set(self._callback_tensor_inputs):
            raise ValueError(f"callback_on_step_end_tensor_inputs must be among {list(self._callback_tensor_inputs)}"
                             f", got {list(names)}")

    def guidance_condition(self, guidance_scale: float, batch: int, device: torch.device,
                           dtype: torch.dtype) -> torch.Tensor | None:
        """The guidance-scale embedding a guidance-distilled UNet (``time_cond_proj_dim``) takes; None otherwise."""
        dim = self.unet.config.time_cond_proj_dim
        if dim is None:
            return None
        w = torch.tensor(guidance_scale - 1).repeat(batch)
        return guidance_scale_embedding(w, dim).to(device, dtype)

    def enable_freeu(self, s1: float, s2: float, b1: float, b2: float) -> None:
        """FreeU on the UNet (diffusers' API): ``pipe.unet.enable_freeu(s1, s2, b1, b2)``; see
        :meth:`UNet2DConditionModel.enable_freeu`."""
        self.unet.enable_freeu(s1=s1, s2=s2, b1=b1, b2=b2)

    def disable_freeu(self) -> None:
        """Turn FreeU off: ``pipe.unet.disable_freeu()``."""
        self.unet.disable_freeu()

    fusing_unet = False  # diffusers' flags: which models fuse_qkv_projections() fused
    fusing_vae = False

    def fuse_qkv_projections(self, unet: bool = True, vae: bool = True) -> None:
        """Fused q/k/v projections in the UNet and / or the VAE (diffusers' API; same numbers, one matrix product
        where there were three; ``models/attention.py``)."""
        self.fusing_unet = self.fusing_vae = False
        if unet:
            self.unet.fuse_qkv_projections()
            self.fusing_unet = True
        if vae:
            self.vae.fuse_qkv_projections()
            self.fusing_vae = True

    def unfuse_qkv_projections(self, unet: bool = True, vae: bool = True) -> None:
        """Undo :meth:`fuse_qkv_projections`; a model that was not fused is left as it is, with a warning."""
        for name, chosen in (("unet", unet), ("vae", vae)):
            if not chosen:
                continue
            if not getattr(self, f"fusing_{name}"):
                logger.warning("%s.unfuse_qkv_projections: the %s was not fused; nothing to undo",
                               type(self).__name__, name)
                continue
            getattr(self, name).unfuse_qkv_projections()
            setattr(self, f"fusing_{name}", False)

    # ------------------------------------------------------------------ the start of a call

    def check_call(self, call) -> None:
        """The argument checks of this pipeline class (each class says what it needs)."""

    def encode_call(self, call, device: torch.device) -> tuple:
        """The prompt embeddings of this pipeline family for ``call`` (``encode_prompt`` with the call's arguments)."""
        raise NotImplementedError

    def prepare_call(self, call) -> tuple[torch.device, Any, tuple]:
        """What every call starts with: checks (``output_type`` normalised, :meth:`check_call`, callback tensor
        names), this thread's per-call state, a private scheduler and the prompt embeddings. Returns
        ``(device, scheduler, embeddings)``; ``call`` is a :class:`.call_signatures.Call`."""
        call.output_type = check_output_type(call.output_type)
        self.check_call(call)
        self.check_callback_inputs(call.callback_on_step_end_tensor_inputs)
        self.begin_call(guidance_scale=call.guidance_scale, guidance_rescale=call.get("guidance_rescale", 0.0),
                        clip_skip=call.clip_skip, cross_attention_kwargs=call.cross_attention_kwargs,
                        denoising_start=call.get("denoising_start"), denoising_end=call.get("denoising_end"),
                        guidance_interval=call.get("guidance_interval"), deep_cache=call.get("deep_cache"))
        device = self.device
        return device, self._fresh_scheduler(), self.encode_call(call, device)

    def denoise_call(self, call, scheduler, timesteps: torch.Tensor, tensors: dict[str, Any], batch: int,
                     device: torch.device, **loop: Any) -> torch.Tensor:
        """:meth:`denoise` with the call's sampling arguments (generator, eta, guidance embedding, callbacks)."""
        return self.denoise(
            scheduler, timesteps, tensors, generator=call.generator, eta=call.eta,
            timestep_cond=self.guidance_condition(call.guidance_scale, batch, device, tensors["latents"].dtype),
            callback_on_step_end=call.callback_on_step_end,
            callback_on_step_end_tensor_inputs=call.callback_on_step_end_tensor_inputs, **loop,
        )

    # ------------------------------------------------------------------ latents

    def prepare_latents(self, batch: int, height: int, width: int, dtype: torch.dtype, device: torch.device,
                        generator: Generator, latents: torch.Tensor | None, init_noise_sigma: float) -> torch.Tensor:
        """Noise latents (B, C, H / f, W / f) scaled by the scheduler's ``init_noise_sigma`` (or the given ones)."""
        shape = (batch, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for {batch} images: pass one generator per image")
        if latents is None:
            latents = randn_tensor(shape, generator, device, dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} for this size and batch, got {tuple(latents.shape)}")
        return latents.to(device) * init_noise_sigma

    # ------------------------------------------------------------------ VAE

    def _vae_for(self, dtype: torch.dtype) -> torch.nn.Module:
        """The VAE to run: a float32 copy when it is float16 and asks for upcasting (the shared one stays as it is,
        so concurrent calls never see it change dtype)."""
        vae = self.vae
        if self.upcast_vae_when_forced and vae.dtype == torch.float16 and vae.config.get("force_upcast", False):
            return copy.deepcopy(vae).to(torch.float32)
        return vae

    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        config = self.vae.config
        if config.get("latents_mean") is None or config.get("latents_std") is None:
            return None
        shape = (1, len(config.latents_mean), 1, 1)
        mean = torch.tensor(config.latents_mean).view(shape).to(like.device, like.dtype)
        std = torch.tensor(config.latents_std).view(shape).to(like.device, like.dtype)
        return mean, std

    def encode_vae_image(self, image: torch.Tensor, generator: Generator) -> torch.Tensor:
        """Pixels (B, 3, H, W) in [-1, 1] -> latents (B, 4, h, w) sampled from the VAE posterior and normalised
        (``scaling_factor``, and ``shift_factor`` or ``latents_mean`` / ``latents_std`` when the config has them);
        with a list of generators, image ``i`` is sampled with ``generator[i]``."""
        config = self.vae.config
        vae = self._vae_for(image.dtype)
        image = image.to(device=vae.device, dtype=vae.dtype)
        if isinstance(generator, (list, tuple)):
            latents = torch.cat([vae.encode(image[i : i + 1]).latent_dist.sample(generator[i])
                                 for i in range(image.shape[0])])
        else:
            latents = vae.encode(image).latent_dist.sample(generator)
        stats = self._latent_stats(latents)
        if stats is not None:
            return (latents - stats[0]) * config.scaling_factor / stats[1]
        if config.get("shift_factor") is not None:
            latents = latents - config.shift_factor
        return latents * config.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, 4, h, w) -> images (B, 3, H, W) in about [-1, 1]."""
        config = self.vae.config
        vae = self._vae_for(latents.dtype)
        stats = self._latent_stats(latents)
        if stats is not None:
            latents = latents * stats[1] / config.scaling_factor + stats[0]
        else:
            latents = latents / config.scaling_factor
            if config.get("shift_factor") is not None:
                latents = latents + config.shift_factor
        return vae.decode(latents.to(vae.dtype), return_dict=False)[0]

    # ------------------------------------------------------------------ the loop

    def loop_tensors(self, latents: torch.Tensor, prompt_embeds: torch.Tensor,
                     negative_prompt_embeds: torch.Tensor | None, **extra: torch.Tensor | None) -> dict[str, Any]:
        """The loop's named tensors: ``prompt_embeds`` becomes ``cat([negative, positive])`` under guidance, as in
        diffusers (a callback that switches guidance off keeps the second half)."""
        if self.do_classifier_free_guidance:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])  # (2B, L, D)
        return {"latents": latents, "prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_prompt_embeds,
                **extra}

    def denoise(
        self,
        scheduler,
        timesteps: torch.Tensor,
        tensors: dict[str, torch.Tensor | None],
        *,
        generator: Generator = None,
        eta: float = 0.0,
        timestep_cond: torch.Tensor | None = None,
        callback_on_step_end: Callable[..., Mapping[str, Any]] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        concat: Sequence[str] = (),
        added_cond: Mapping[str, str] | None = None,
        after_step: Callable[..., torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The sampling loop of every SD-family pipeline; returns the final latents.

        ``tensors`` holds the loop's named tensors as diffusers' loops hold them in locals: ``latents``,
        ``prompt_embeds`` (already ``cat([negative, positive])`` under guidance), and whatever else the pipeline has
        (``negative_prompt_embeds``, inpainting's ``mask`` / ``masked_image_latents``, depth2img's ``depth_mask``,
        SDXL's ``add_text_embeds`` / ``add_time_ids``). For each ``t``: the UNet on the latents (doubled while
        ``self.do_classifier_free_guidance``, read every step), with the tensors named in ``concat`` concatenated to
        the scaled input along the channels and ``added_cond`` (UNet keyword -> tensor name) as
        ``added_cond_kwargs``; guidance and ``guidance_rescale``; ``scheduler.step``; ``after_step(i, t, latents,
        tensors)`` (inpainting with an ordinary UNet puts back the kept region); then ``callback_on_step_end(pipe,
        i, t, {name: tensor})`` for the names asked for, whose returned tensors replace the loop's. A step starts
        only while ``self.interrupt`` is False.

        ``self.guidance_interval`` ``(lo, hi)`` (opt-in; Kynkäänniemi et al. 2024, "Applying guidance in a limited
        interval"): under guidance, step ``i`` of the ``n`` run is guided only when ``lo <= i / n < hi``; the other
        steps run the UNet on the conditional half of every doubled tensor only (batch B instead of 2B) and use its
        prediction as it is, exactly as a step with guidance off (``guidance_scale=1``).

        ``self._deep_cache`` (``enable_deep_cache`` or the call's ``deep_cache``; :mod:`.deep_cache`): the steps
        between full ones run the UNet's shallow layers on the last full step's deep features (step 0 is full).
        """
        step_kwargs: dict[str, Any] = {"generator": generator}  # every scheduler's step takes generator=
        if getattr(scheduler, "accepts_eta", False):
            step_kwargs["eta"] = eta
        callback_names = callback_tensor_names(callback_on_step_end, callback_on_step_end_tensor_inputs)
        self.check_callback_inputs(callback_names)
        self._num_timesteps = len(timesteps)
        cache = DeepCacheRun(self._deep_cache, len(timesteps)) if self._deep_cache is not None else None
        self._deep_cache_run = cache
        for i, t in enumerate(self.progress_bar(timesteps)):
            if self.interrupt:
                continue
            latents = tensors["latents"]
            cfg = self.do_classifier_free_guidance
            # the UNet's conditioning: (2B, ...) [negative, positive] under guidance; the positive half on a step
            # outside the guidance interval
            half = cfg and not guided_step(self.guidance_interval, i, len(timesteps))
            cond = (lambda x: x.chunk(2)[1]) if half else (lambda x: x)
            cfg = cfg and not half
            model_input = torch.cat([latents] * 2) if cfg else latents  # (2B or B, C, h, w)
            model_input = scheduler.scale_model_input(model_input, t)
            if concat:
                model_input = torch.cat([model_input, *(cond(tensors[name]) for name in concat)], dim=1)
            extras = {key: cond(tensors[name]) for key, name in added_cond.items()} if added_cond else None
            reuse = {"deep_cache": cache.step(i, doubled=cfg)} if cache is not None else {}
            noise_pred = self.unet(model_input, t, encoder_hidden_states=cond(tensors["prompt_embeds"]),
                                   timestep_cond=timestep_cond, cross_attention_kwargs=self.cross_attention_kwargs,
                                   added_cond_kwargs=extras, return_dict=False, **reuse)[0]
            if cache is not None:
                cache.keep(reuse["deep_cache"], doubled=cfg)
            if cfg:
                noise_uncond, noise_text = noise_pred.chunk(2)
                noise_pred = noise_uncond + self.guidance_scale * (noise_text - noise_uncond)
                if self.guidance_rescale > 0.0:
                    noise_pred = rescale_noise_cfg(noise_pred, noise_text, self.guidance_rescale)
            latents = scheduler.step(noise_pred, t, latents, return_dict=False, **step_kwargs)[0]
            if after_step is not None:
                latents = after_step(i, t, latents, tensors)
            tensors["latents"] = latents
            if callback_on_step_end is not None:
                returned = callback_on_step_end(self, i, t, {k: tensors[k] for k in callback_names})
                tensors.update({k: v for k, v in (returned or {}).items() if k in tensors})
        if cache is not None:
            cache.feature = None  # the call is over: do not hold its features until the thread's next call
        return tensors["latents"]


class ImageToImageMixin:
    """Starting latents from a user's image: preprocessing, the image's clean latents (or latents passed as they
    are) one row per output image, and noising them to the first step run (img2img, depth2img, SDXL's refiner)."""

    @property
    def image_processor(self) -> VaeImageProcessor:
        return VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_convert_rgb=True,
                                 vae_latent_channels=self.vae.config.latent_channels)

    # ------------------------------------------------------------------ image latents

    def _is_latents(self, image: torch.Tensor) -> bool:
        return image.shape[1] == self.vae.config.latent_channels

    def check_image_batch(self, image: torch.Tensor, batch: int, num_images_per_prompt: int, what: str = "image"):
        prompts = batch // num_images_per_prompt
        if image.shape[0] not in (1, prompts):
            raise ValueError(f"got {image.shape[0]} {what}s for {prompts} prompt(s): pass one {what}, or one "
                             "per prompt")

    def image_latents(self, image: torch.Tensor, batch: int, num_images_per_prompt: int, generator: Generator,
                      dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Clean latents of ``image`` (pixels, or latents passed as they are), one row per output image."""
        self.check_image_batch(image, batch, num_images_per_prompt)
        if isinstance(generator, (list, tuple)) and len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for {batch} images: pass one generator per image")
        repeat = batch // image.shape[0]
        image = image.to(device=device, dtype=dtype)
        if self._is_latents(image):
            return image.repeat_interleave(repeat, dim=0)
        if isinstance(generator, (list, tuple)):  # each output image gets its own posterior sample
            return self.encode_vae_image(image.repeat_interleave(repeat, dim=0), generator).to(dtype)
        return self.encode_vae_image(image, generator).to(dtype).repeat_interleave(repeat, dim=0)

    def check_image_call(self, call) -> None:
        if call.image is None:
            raise ValueError("image is required: the picture (or latents) to start from (PIL, numpy, torch, or a list)")
        check_strength(call.strength)

    def image_start(self, call, scheduler, pixels: torch.Tensor, batch: int, dtype: torch.dtype,
                    device: torch.device, add_noise: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """``(timesteps to run, starting latents)`` of an image-to-image call: the ``strength`` (or
        ``denoising_start``) schedule, and the image's latents noised to its first step (``call.latents`` when
        given; not noised with ``add_noise=False``)."""
        run, _ = set_strength_schedule(scheduler, call.num_inference_steps, call.strength, device,
                                       call.get("timesteps"), call.get("sigmas"), call.get("denoising_start"))
        latents = call.get("latents")
        if latents is None:
            latents = self.image_latents(pixels, batch, call.num_images_per_prompt, call.generator, dtype, device)
            if add_noise:
                latents, _ = self.noised_latents(scheduler, latents, run[:1], call.generator)
        return run, latents

    def noised_latents(self, scheduler, latents: torch.Tensor, timestep: torch.Tensor,
                       generator: Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``(latents noised to timestep, the noise)``."""
        noise = randn_tensor(latents.shape, generator, latents.device, latents.dtype)
        return scheduler.add_noise(latents, noise, timestep.repeat(latents.shape[0])), noise
