"""Exponential moving average of model weights (the weights a diffusion model is usually sampled with)."""

from __future__ import annotations

import torch


class EMA:
    """``shadow = decay_t * shadow + (1 - decay_t) * param`` after every optimizer step.

    ``decay_t = min(decay, (1 + n) / (10 + n))`` with ``n`` the number of updates so far: early on the average
    follows the fast-changing weights closely instead of holding on to the random initialisation. Buffers (none in
    diffusekit's models) are copied, not averaged. The shadow is kept in float32 whatever the model's dtype.
    """

    def __init__(self, model: torch.nn.Module, decay: float = 0.999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.shadow = {name: p.detach().float().clone() for name, p in model.state_dict().items()}

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        decay = self.current_decay()
        params = dict(model.named_parameters())
        for name, value in model.state_dict().items():
            shadow = self.shadow[name]
            if name in params and value.dtype.is_floating_point:
                shadow.lerp_(value.detach().float(), 1.0 - decay)
            else:
                shadow.copy_(value)
        self.num_updates += 1

    def copy_to(self, model: torch.nn.Module) -> None:
        """Load the averaged weights into ``model`` (cast to its dtypes)."""
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in self.shadow.items()})

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        if set(state["shadow"]) != set(self.shadow):
            missing = sorted(set(self.shadow) - set(state["shadow"]))[:5]
            unexpected = sorted(set(state["shadow"]) - set(self.shadow))[:5]
            raise ValueError(f"EMA state does not match the model (missing {missing}, unexpected {unexpected})")
        self.decay = state["decay"]
        self.num_updates = state["num_updates"]
        self.shadow = {k: v.detach().float().clone() for k, v in state["shadow"].items()}
