"""The training loop shared by every ``diffusekit train`` command: steps, EMA, checkpoints, resume, progress, plot.

Determinism: the batch of step ``s`` is a pure function of ``(seed, s)`` (:class:`~.data.EpochSampler`) and all
other randomness (noise, timesteps, caption dropout) comes from one ``torch.Generator`` whose state is checkpointed
with the weights, the EMA, the optimizer, the global torch / numpy / python RNG states and the step. A run resumed
from a checkpoint therefore continues exactly as the uninterrupted run would have (bitwise, on the same machine and
thread count).

Checkpoints are one file, ``<output_dir>/checkpoint.pt``, replaced atomically (temp file + rename), so a run killed
at any moment leaves either the previous or the next checkpoint, never a torn one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .._io import atomic_write, atomic_write_text
from .ema import EMA
from .plot import plot_losses

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_VERSION = 2  # 2: numpy's RNG state stored as tensors + plain values, so resume never unpickles objects


def bf16_supported(device: torch.device) -> bool:
    """bf16 autocast is worth it on CUDA with bf16 support and on CPUs with native bf16 instructions."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None) or getattr(torch.cpu, "_is_amx_tile_supported", None)
        return bool(probe and probe())
    return False


def autocast_context(device: torch.device, bf16: bool):
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def lr_at(step: int, base_lr: float, warmup: int, total: int, schedule: str) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then constant or cosine to 10 %."""
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule == "constant":
        return base_lr
    if schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return base_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    raise ValueError(f"lr schedule must be 'constant' or 'cosine', got {schedule!r}")


class TrainLoop:
    """Owns the trainable modules, their optimizer and EMAs, the RNG and the step counter.

    ``modules``: name -> module trained together (one AdamW over all their parameters). ``ema_names``: which of them
    keep an EMA. ``config``: the run's settings that decide the result (saved in the checkpoint; a resume with
    different settings is refused, listing the differences). ``total_steps`` may grow on resume.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        modules: dict[str, torch.nn.Module],
        *,
        config: dict[str, Any],
        lr: float,
        total_steps: int,
        warmup_steps: int = 0,
        lr_schedule: str = "constant",
        weight_decay: float = 0.0,
        grad_clip: float | None = 1.0,
        ema_decay: float | None = 0.999,
        ema_names: tuple[str, ...] | None = None,
        seed: int = 0,
        device: str | torch.device = "cpu",
        bf16: bool = False,
        gradient_checkpointing: bool = False,
        checkpoint_every: int = 500,
        time_limit_minutes: float | None = None,
        stop_after: int | None = None,
        progress: bool = True,
        description: str = "train",
    ):
        self.output_dir = Path(output_dir)
        self.device = torch.device(device)
        self.modules = {name: m.to(self.device).train() for name, m in modules.items()}
        self.config = json.loads(json.dumps(config))  # plain JSON types, comparable after a round trip
        self.lr, self.total_steps, self.warmup_steps = lr, total_steps, warmup_steps
        self.lr_schedule, self.grad_clip = lr_schedule, grad_clip
        self.checkpoint_every, self.time_limit_minutes = checkpoint_every, time_limit_minutes
        self.stop_after = stop_after
        self.progress, self.description = progress, description
        if bf16 and not bf16_supported(self.device):
            logger.warning("bf16 autocast requested but %s has no native bf16: training in float32", self.device)
            bf16 = False
        self.bf16 = bf16
        # recompute block activations in the backward pass (models that support it: the UNets and the VAE)
        self.gradient_checkpointing = gradient_checkpointing
        for module in self.modules.values():
            if gradient_checkpointing and getattr(module, "_supports_gradient_checkpointing", False):
                module.enable_gradient_checkpointing()
        params = [p for m in self.modules.values() for p in m.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        names = tuple(self.modules) if ema_names is None else ema_names
        self.emas = {n: EMA(self.modules[n], ema_decay) for n in names} if ema_decay is not None else {}
        self.seed = seed
        self.generator = torch.Generator("cpu").manual_seed(seed)
        self.step = 0
        self.losses: list[float] = []
        self.train_seconds = 0.0

    # ------------------------------------------------------------------ state

    @property
    def checkpoint_path(self) -> Path:
        return self.output_dir / CHECKPOINT_NAME

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": CHECKPOINT_VERSION,
            "config": self.config,
            "step": self.step,
            "losses": list(self.losses),
            "train_seconds": self.train_seconds,
            "modules": {n: m.state_dict() for n, m in self.modules.items()},
            "ema": {n: e.state_dict() for n, e in self.emas.items()},
            "optimizer": self.optimizer.state_dict(),
            "rng": {
                "generator": self.generator.get_state(),
                "torch": torch.get_rng_state(),
                "numpy": _numpy_state_to_plain(np.random.get_state()),
                "python": random.getstate(),
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"checkpoint version {state.get('version')} is not {CHECKPOINT_VERSION}")
        diffs = _config_diff(state["config"], self.config)
        if diffs:
            raise ValueError(
                f"{self.checkpoint_path} was made with other settings; resume with the same ones or use a new "
                "--output-dir (or --no-resume to start over). Differences (checkpoint -> now): " + "; ".join(diffs)
            )
        for name, module in self.modules.items():
            module.load_state_dict(state["modules"][name])
        for name, ema in self.emas.items():
            ema.load_state_dict(state["ema"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        rng = state["rng"]
        self.generator.set_state(rng["generator"])
        torch.set_rng_state(rng["torch"])
        np.random.set_state(_numpy_state_from_plain(rng["numpy"]))
        random.setstate(rng["python"])
        self.step = int(state["step"])
        self.losses = list(state["losses"])
        self.train_seconds = float(state.get("train_seconds", 0.0))

    def save_checkpoint(self) -> Path:
        state = self.state_dict()
        atomic_write(self.checkpoint_path, lambda tmp: torch.save(state, tmp))
        return self.checkpoint_path

    def resume(self) -> bool:
        """Load ``checkpoint.pt`` from the output folder if there is one; True when it did."""
        if not self.checkpoint_path.is_file():
            return False
        import pickle

        try:  # tensors and plain containers only: a checkpoint file never runs code
            state = torch.load(self.checkpoint_path, map_location=self.device, weights_only=True)
        except pickle.UnpicklingError as err:
            raise ValueError(
                f"{self.checkpoint_path} holds objects other than tensors and plain values "
                f"({str(err).splitlines()[0]}); it is not loaded (an older diffusekit's checkpoint, or not one at "
                "all): start over with --no-resume or a new --output-dir"
            ) from None
        self.load_state_dict(state)
        logger.info("resumed from %s at step %d", self.checkpoint_path, self.step)
        return True

    def ema_copy(self, name: str, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` (a model like ``modules[name]``) with the EMA weights of ``name`` loaded (or the raw ones)."""
        if name in self.emas:
            self.emas[name].copy_to(module)
        else:
            module.load_state_dict(self.modules[name].state_dict())
        return module.eval()

    # ------------------------------------------------------------------ loop

    def run(self, loss_fn: Callable[[int], torch.Tensor]) -> None:
        """Train from ``self.step`` to ``total_steps``; ``loss_fn(step)`` returns the scalar loss of that step's batch.

        Saves a checkpoint every ``checkpoint_every`` steps, at the end, on a time limit, after ``stop_after`` steps
        of this call and on Ctrl-C.
        """
        from tqdm.auto import tqdm

        self.output_dir.mkdir(parents=True, exist_ok=True)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        start = time.monotonic()
        seconds_before = self.train_seconds
        first_step = self.step
        bar = tqdm(total=self.total_steps, initial=self.step, desc=self.description, disable=not self.progress,
                   dynamic_ncols=True, smoothing=0.05)
        try:
            while self.step < self.total_steps:
                lr = lr_at(self.step, self.lr, self.warmup_steps, self.total_steps, self.lr_schedule)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                with autocast_context(self.device, self.bf16):
                    loss = loss_fn(self.step)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if self.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
                self.optimizer.step()
                for name, ema in self.emas.items():
                    ema.update(self.modules[name])
                self.losses.append(float(loss.detach()))
                if not math.isfinite(self.losses[-1]):
                    raise FloatingPointError(f"loss is {self.losses[-1]} at step {self.step}; lower --lr")
                self.step += 1
                self.train_seconds = seconds_before + time.monotonic() - start
                bar.update(1)
                window = self.losses[-50:]
                bar.set_postfix(loss=f"{sum(window) / len(window):.4f}", lr=f"{lr:.2e}", refresh=False)
                if self.checkpoint_every and self.step % self.checkpoint_every == 0:
                    self.save_checkpoint()
                if self.time_limit_minutes is not None and self.train_seconds > 60 * self.time_limit_minutes:
                    logger.warning("time limit of %.1f min reached at step %d", self.time_limit_minutes, self.step)
                    print(f"time limit reached at step {self.step}; stopping (resume continues from here)")
                    break
                if self.stop_after is not None and self.step - first_step >= self.stop_after:
                    break
        except KeyboardInterrupt:
            print(f"\ninterrupted at step {self.step}; saving a checkpoint (rerun the same command to resume)")
            self.save_checkpoint()
            raise
        finally:
            bar.close()
        self.save_checkpoint()

    def write_report(self, extra: dict[str, Any] | None = None) -> None:
        """``loss.png`` and ``train_log.json`` (settings, steps, time, final loss) in the output folder."""
        plot_losses(self.output_dir / "loss.png", self.losses, title=f"{self.description} loss")
        tail = self.losses[-200:]
        log = {
            "config": self.config,
            "steps": self.step,
            "train_seconds": round(self.train_seconds, 1),
            "final_loss_mean_last_200": sum(tail) / len(tail) if tail else None,
            "threads": torch.get_num_threads(),
            "device": str(self.device),
            "bf16": self.bf16,
            "gradient_checkpointing": self.gradient_checkpointing,
            "torch": torch.__version__,
            **(extra or {}),
        }
        atomic_write_text(self.output_dir / "train_log.json", json.dumps(log, indent=2) + "\n")


def _numpy_state_to_plain(state: tuple) -> tuple:
    """numpy's legacy RNG state with its key array as a tensor (``weights_only`` loads refuse numpy arrays)."""
    name, keys, pos, has_gauss, cached = state
    return (name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached))


def _numpy_state_from_plain(state: tuple) -> tuple:
    name, keys, pos, has_gauss, cached = state
    return (name, keys.numpy().astype(np.uint32), pos, has_gauss, cached)


def _config_diff(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def replace_folder(tmp: Path, final: Path) -> None:
    """Move a fully written folder into place (the old one, if any, is removed first)."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
