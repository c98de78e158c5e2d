"""CPU offload of a pipeline's models onto an accelerator, without ``accelerate`` (plain torch module hooks).

* **Model offload** (``enable_model_cpu_offload``): every model lives in CPU memory; when one is called it moves to the
  accelerator whole, and the model that ran before it moves back. Peak accelerator memory: the largest model.
* **Sequential offload** (``enable_sequential_cpu_offload``): every leaf module (a conv, a linear, a norm ...) moves
  to the accelerator for its own forward and back afterwards. Peak accelerator memory: the largest layer; slow.

Both also move the tensors passed to a model onto the accelerator, so callers may pass CPU tensors.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

_INSTALLED = "_diffusekit_offload_handles"


def find_accelerator() -> torch.device | None:
    """The first accelerator torch can use here (CUDA/ROCm, XPU, MPS), or None on a CPU-only machine."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        return torch.device("xpu")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return None


def offload_device(method: str, gpu_id: int | None, device: torch.device | str | None) -> torch.device:
    """Resolve ``gpu_id`` / ``device`` as diffusers does; a clear error when there is no accelerator."""
    if device is None:
        device = find_accelerator()
        if device is None:
            raise RuntimeError(
                f"{method} needs an accelerator (CUDA, ROCm, XPU or MPS) and torch finds none on this machine. On a "
                "CPU-only machine the models already run from CPU memory: do not call it (diffusers raises here too)"
            )
    device = torch.device(device)
    if gpu_id is not None and device.index is not None:
        raise ValueError(f"{method}: pass either gpu_id={gpu_id} or a device with an index ({device}), not both")
    if device.type == "cpu":
        return device
    return torch.device(device.type, gpu_id if gpu_id is not None else (device.index or 0))


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def _inputs_to(device: torch.device):
    def hook(module, args, kwargs):
        return _to_device(args, device), _to_device(kwargs, device)

    return hook


def _keep(module: torch.nn.Module, *handles) -> None:
    module.__dict__.setdefault(_INSTALLED, []).extend(handles)


def remove_hooks(modules: Iterable[torch.nn.Module]) -> None:
    """Remove the offload hooks from ``modules`` and everything below them."""
    for top in modules:
        for module in top.modules():
            for handle in module.__dict__.pop(_INSTALLED, ()):
                handle.remove()


class ModelOffload:
    """Moves one whole model at a time onto ``device``: the one being called; the previous one goes back to CPU."""

    def __init__(self, models: list[torch.nn.Module], device: torch.device):
        self.device = device
        self.models = models
        self.active: torch.nn.Module | None = None
        for model in models:
            model.to("cpu")
            # the direct children too: methods such as vae.decode / vae.encode run children, not model.forward
            hook = self._hook(model)
            for module in (model, *model.children()):
                _keep(module, module.register_forward_pre_hook(hook, with_kwargs=True, prepend=True))

    def _hook(self, model: torch.nn.Module):
        move_inputs = _inputs_to(self.device)

        def hook(module, args, kwargs):
            if self.active is not model:
                if self.active is not None:
                    self.active.to("cpu")
                model.to(self.device)
                self.active = model
            return move_inputs(module, args, kwargs)

        return hook

    def free(self) -> None:
        """Move the model still on the accelerator back to CPU (diffusers' ``maybe_free_model_hooks``)."""
        if self.active is not None:
            self.active.to("cpu")
            self.active = None


def _is_leaf(module: torch.nn.Module) -> bool:
    return not any(True for _ in module.children())


def sequential_offload(model: torch.nn.Module, device: torch.device) -> None:
    """Each module visits ``device`` for its own forward only. A block takes its leaf children along (its forward
    may read a child's weight directly, e.g. ``self.position_embedding.weight``), and every leaf also moves itself
    when called, since not every caller's forward runs: ``attn.forward`` calls ``attn.to_out[0]`` (ModuleList has
    no forward) and ``vae.decode`` calls ``vae.post_quant_conv`` (``vae.forward`` never runs)."""
    model.to("cpu")
    _keep(model, model.register_forward_pre_hook(_inputs_to(device), with_kwargs=True, prepend=True))
    for module in model.modules():
        holders = [module] if _is_leaf(module) else [module, *(c for c in module.children() if _is_leaf(c))]
        tensors_of = [h for h in holders if any(True for _ in h.parameters(recurse=False))
                      or any(True for _ in h.buffers(recurse=False))]
        if not tensors_of:
            continue

        def before(mod, args, holders=tensors_of):
            for holder in holders:
                _move_own(holder, device)

        def after(mod, args, output, holders=tensors_of):
            for holder in holders:
                _move_own(holder, torch.device("cpu"))

        _keep(module, module.register_forward_pre_hook(before), module.register_forward_hook(after))


def _move_own(module: torch.nn.Module, device: torch.device) -> None:
    # only this module's own tensors; parameters keep their identity (tied weights, optimiser references)
    for param in module.parameters(recurse=False):
        if param.device != device:
            param.data = param.data.to(device)
    for name, buf in list(module._buffers.items()):
        if buf is not None and buf.device != device:
            module._buffers[name] = buf.to(device)
