"""LoRA for the Stable Diffusion pipelines: ``pipe.load_lora_weights(...)``, ``set_adapters``, ``fuse_lora`` ...,
with diffusers' public methods and numbers, without peft.

How it works: a LoRA adds ``scale * up(down(x))`` to the output of a ``Linear`` or ``Conv2d`` layer of the UNet or
the text encoder. Each targeted layer gets one forward hook (:class:`LoraHook`) that holds the loaded adapters'
``down`` / ``up`` weights; nothing is registered as a submodule, so the models' module paths and ``state_dict()``
keys stay exactly those of the checkpoint (``save_pretrained`` writes the base weights). ``scale`` is
``adapter weight (set_adapters) * alpha / rank * call scale``, the call scale coming from
``cross_attention_kwargs={"scale": s}`` (UNet) / ``lora_scale`` (text encoder), as in diffusers.

File formats (the key tables below are the only place names are converted):

* kohya / A1111: ``lora_unet_<module path with _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``,
  ``lora_te_...`` (text encoder; ``lora_te1_`` / ``lora_te2_`` in SDXL files). Linear layers and conv layers
  (LoCon: a ``k x k`` down conv with the layer's stride and padding, then a ``1 x 1`` up conv).
* LyCORIS (kohya / A1111 files, same prefixes and layer names): LoCon's CP middle (``.lora_mid.weight``), LoHa
  (``.hada_w1_a`` ... ``.hada_t2``), LoKr
  (``.lokr_w1`` ... ``.lokr_t2``), "full" (``.diff`` / ``.diff_b``), (IA)³ (``.weight`` / ``.on_input``), trained
  norm layers (``.w_norm`` / ``.b_norm`` on GroupNorm / LayerNorm), OFT and BOFT (``.oft_blocks`` / ``.rescale``,
  the older ``.oft_diag``), GLoRA (``.a1.weight`` ... ``.bm.weight``) and DoRA's ``.dora_scale``; their deltas are
  built in
  :mod:`diffusekit.loaders.lora_layers` (one class per adapter kind, chosen from the parts a layer has).
* diffusers / PEFT: ``unet.<module path>.lora_A.weight`` / ``.lora_B.weight`` (``text_encoder.``...), the older
  ``.lora.down.weight`` / ``.lora.up.weight`` and attention-processor spellings, optional ``.alpha`` keys, and
  the ``lora_adapter_metadata`` (``lora_alpha``, ``alpha_pattern``) diffusers writes into safetensors files.

A kohya name is matched against the model's own module paths with ``.`` written as ``_`` (the rule kohya's
trainer uses), so every layer of our models is addressable and anything else is an error naming the file and key.
Without an alpha, alpha = rank (scale 1), as kohya and diffusers do.

``fuse_lora`` keeps a copy of each weight it changes and ``unfuse_lora`` puts that copy back: unfusing restores
the weights bit for bit (peft subtracts the delta again, which is exact only up to rounding). The copies cost the
memory of the fused layers until ``unfuse_lora`` or ``unload_lora_weights``; ``unload_lora_weights`` after
``fuse_lora`` keeps the fused weights, as in diffusers.

Threads: which adapters run, at what weights, is one immutable :class:`AdapterChoice` per model, replaced whole
(under the model's lock) by ``set_adapters`` / ``enable_lora`` / ``disable_lora``; each forward pass of the UNet or
a text encoder takes the choice current when it starts and keeps it to its end. So switching adapters on one
thread while another runs the model is safe: that forward pass runs wholly with the old choice, the next one with
the new (never a mix of layers, never an error). The methods that change weights or hooks (``load_lora_weights``,
``fuse_lora``, ``unfuse_lora``, ``delete_adapters``, ``unload_lora_weights``) take the same lock among themselves
but must not run while another thread runs the model (diffusers / peft make no promise for any of them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import threading
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .lora_layers import BUILDERS, KIND_LAYERS, KIND_NAMES, LINEAR_OR_CONV, LayerAdapter, LoraError
from .lora_layers import LoraWeights  # noqa: F401 (re-exported)

LORA_WEIGHT_NAME = "pytorch_lora_weights.bin"
LORA_WEIGHT_NAME_SAFE = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"

# ---------------------------------------------------------------------------------------------------- key tables

#: kohya / A1111 key prefix -> pipeline component
KOHYA_PREFIXES: dict[str, str] = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
    "oft_unet_": "unet",  # kohya's own OFT (sd-scripts networks/oft.py), which A1111 reads as LyCORIS's
}
#: kohya key suffix -> part (LyCORIS LoHa / LoKr files use the same prefixes and layer names)
KOHYA_SUFFIXES: dict[str, str] = {
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
    ".lora_mid.weight": "mid",  # LyCORIS LoCon with a CP / Tucker middle on convolutions
    ".alpha": "alpha",
    ".dora_scale": "dora_scale",
    ".hada_w1_a": "hada_w1_a",
    ".hada_w1_b": "hada_w1_b",
    ".hada_w2_a": "hada_w2_a",
    ".hada_w2_b": "hada_w2_b",
    ".hada_t1": "hada_t1",
    ".hada_t2": "hada_t2",
    ".lokr_w1": "lokr_w1",
    ".lokr_w1_a": "lokr_w1_a",
    ".lokr_w1_b": "lokr_w1_b",
    ".lokr_w2": "lokr_w2",
    ".lokr_w2_a": "lokr_w2_a",
    ".lokr_w2_b": "lokr_w2_b",
    ".lokr_t2": "lokr_t2",
    ".diff": "diff",  # LyCORIS "full"
    ".diff_b": "diff_b",
    ".on_input": "on_input",  # (IA)³
    ".w_norm": "w_norm",  # LyCORIS trained norm layers
    ".b_norm": "b_norm",
    ".oft_blocks": "oft_blocks",  # LyCORIS diag-OFT (3-d) and BOFT (4-d)
    ".oft_diag": "oft_diag",  # LyCORIS 2.0 / 2.1 OFT: the rotations themselves
    ".rescale": "rescale",
    ".a1.weight": "a1",  # LyCORIS GLoRA
    ".a2.weight": "a2",
    ".b1.weight": "b1",
    ".b2.weight": "b2",
    ".bm.weight": "bm",
    ".weight": "ia3_weight",  # (IA)³'s vector: matched last, after every longer ``.….weight`` above
}
#: part -> adapter kind it belongs to (parts not listed, ``alpha`` and ``dora_scale``, go with any kind)
PART_KINDS: dict[str, str] = {
    "down": "lora", "up": "lora", "mid": "lora",
    "hada_w1_a": "loha", "hada_w1_b": "loha", "hada_w2_a": "loha", "hada_w2_b": "loha", "hada_t1": "loha",
    "hada_t2": "loha",
    "lokr_w1": "lokr", "lokr_w1_a": "lokr", "lokr_w1_b": "lokr", "lokr_w2": "lokr", "lokr_w2_a": "lokr",
    "lokr_w2_b": "lokr", "lokr_t2": "lokr",
    "diff": "full", "diff_b": "full", "ia3_weight": "ia3", "on_input": "ia3", "w_norm": "norm", "b_norm": "norm",
    "oft_blocks": "oft", "oft_diag": "oft", "rescale": "oft",
    "a1": "glora", "a2": "glora", "b1": "glora", "b2": "glora", "bm": "glora",
}
#: diffusers / PEFT key prefix -> pipeline component
DIFFUSERS_PREFIXES: dict[str, str] = {
    "unet.": "unet",
    "text_encoder.": "text_encoder",
    "text_encoder_2.": "text_encoder_2",
}
#: diffusers / PEFT key suffix -> part (longest first when matching)
DIFFUSERS_SUFFIXES: dict[str, str] = {
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora.down.weight": "down",
    ".lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down",
    ".lora_linear_layer.up.weight": "up",
    "_lora.down.weight": "down",  # attention-processor spelling: ...attn1.processor.to_q_lora.down.weight
    "_lora.up.weight": "up",
    ".alpha": "alpha",
    ".lora_magnitude_vector": "magnitude",  # PEFT's DoRA
}
#: older diffusers module spellings -> module paths of the models (applied to the path part of a key)
DIFFUSERS_PATH_RENAMES: dict[str, str] = {
    ".processor.to_q": ".to_q",
    ".processor.to_k": ".to_k",
    ".processor.to_v": ".to_v",
    ".processor.to_out": ".to_out.0",
    ".self_attn.to_q": ".self_attn.q_proj",  # text encoder, old diffusers
    ".self_attn.to_k": ".self_attn.k_proj",
    ".self_attn.to_v": ".self_attn.v_proj",
    ".self_attn.to_out": ".self_attn.out_proj",
}
#: key fragments of other adapter kinds, refused with a clear message. ``lokr_t1`` (a Tucker core for LoKr's first
#: factor) is a name LyCORIS lists but has never built or saved, and that neither LyCORIS, A1111 nor ComfyUI applies:
#: there is no formula to follow.
UNSUPPORTED_KINDS: dict[str, str] = {
    "lokr_t1": "LoKr with a Tucker-decomposed first factor (a key no LyCORIS release writes, which LyCORIS, A1111 "
               "and ComfyUI do not apply either)",
    "lora_B.bias": "LoRA with bias",
}


# ---------------------------------------------------------------------------------------------------- per-call scale

_CALL = threading.local()


def current_scale() -> float:
    """The LoRA scale of the forward pass running in this thread (1.0 outside any scaled call)."""
    return getattr(_CALL, "scale", 1.0)


@contextlib.contextmanager
def lora_scale_context(scale: float | None):
    """Run the enclosed forward passes with LoRA outputs multiplied by ``scale`` (``None``: unchanged)."""
    if scale is None:
        yield
        return
    before = current_scale()
    _CALL.scale = float(scale)
    try:
        yield
    finally:
        _CALL.scale = before


def _unet_scale_pre_hook(module, args, kwargs):
    """UNet forward pre-hook: ``cross_attention_kwargs={"scale": s}`` scales the UNet's LoRA layers (diffusers)."""
    scale = (kwargs.get("cross_attention_kwargs") or {}).get("scale")
    stack = module.__dict__.setdefault("_lora_scale_stack", threading.local())
    stack.__dict__.setdefault("previous", []).append(current_scale())
    if scale is not None:
        _CALL.scale = float(scale)


def _unet_scale_post_hook(module, args, kwargs, output):
    _CALL.scale = module.__dict__["_lora_scale_stack"].previous.pop()
    return output


# ---------------------------------------------------------------------------------------------------- the layer


class LoraHook:
    """The forward hook on one ``Linear`` / ``Conv2d``: adds each active adapter's output delta (for LoRA
    ``up(down(x)) * scale``; the other kinds apply their weight delta with the layer's own operation)."""

    def __init__(self, state: "LoraState", path: str):
        self.state = state
        self.path = path
        self.adapters: dict[str, LayerAdapter] = {}

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        state = self.state
        choice = state.current()  # the choice this forward pass started with
        if not choice.enabled or not choice.active:
            return output
        x = args[0]
        call_scale = current_scale()
        for name, weight in choice.active.items():
            adapter = self.adapters.get(name)
            if adapter is None or name in choice.fused:
                continue
            adapter.to(x)
            base = None
            if adapter.needs_base:  # DoRA reads the layer's weight as it was before any fuse_lora
                base = state.originals.get(self.path, module.weight).detach()
            output = output + adapter.forward_delta(module, x, base, weight * call_scale)
        return output


@dataclasses.dataclass(frozen=True)
class AdapterChoice:
    """Which adapters of one model run, at what weights: never changed in place, only replaced whole
    (:meth:`LoraState.choose`), so a forward pass that holds one sees it unchanged to its end."""

    active: Mapping[str, float] = dataclasses.field(default_factory=lambda: MappingProxyType({}))  # name -> weight
    enabled: bool = True
    fused: frozenset[str] = frozenset()  # adapters in the weights (fuse_lora): their hooks stay idle


@dataclasses.dataclass
class LoraState:
    """Everything LoRA on one model (UNet or text encoder), kept outside its modules and state dict."""

    hooks: dict[str, LoraHook] = dataclasses.field(default_factory=dict)  # module path -> hook
    handles: dict[str, Any] = dataclasses.field(default_factory=dict)
    adapters: list[str] = dataclasses.field(default_factory=list)  # in load order
    choice: AdapterChoice = dataclasses.field(default_factory=AdapterChoice)
    originals: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # weights before fuse_lora
    bias_originals: dict[str, torch.Tensor | None] = dataclasses.field(default_factory=dict)  # biases, likewise
    scale_handles: list[Any] = dataclasses.field(default_factory=list)  # the model's own forward hooks
    lock: Any = dataclasses.field(default_factory=threading.RLock)  # held by every change, never by a forward
    running: threading.local = dataclasses.field(default_factory=threading.local)  # per thread: forwards' choices

    @property
    def active(self) -> Mapping[str, float]:
        return self.choice.active

    @property
    def enabled(self) -> bool:
        return self.choice.enabled

    @property
    def fused(self) -> frozenset[str]:
        return self.choice.fused

    def choose(self, **changes) -> None:
        """Replace the choice with one where ``changes`` (``active``, ``enabled``, ``fused``) differ."""
        if "active" in changes:
            changes["active"] = MappingProxyType(dict(changes["active"]))
        if "fused" in changes:
            changes["fused"] = frozenset(changes["fused"])
        with self.lock:
            self.choice = dataclasses.replace(self.choice, **changes)

    def current(self) -> AdapterChoice:
        """The choice of the forward pass of this model running in this thread (the latest one outside any)."""
        stack = getattr(self.running, "stack", None)
        return stack[-1] if stack else self.choice


def _choice_pre_hook(state: LoraState):
    def hook(module, args):
        stack = state.running.__dict__.setdefault("stack", [])
        stack.append(state.choice)  # one attribute read: a whole choice, old or new
    return hook


def _choice_post_hook(state: LoraState):
    def hook(module, args, output):
        state.running.stack.pop()
    return hook


_STATE_ATTR = "_diffusekit_lora"


def _state(model: nn.Module, create: bool = False) -> LoraState | None:
    state = model.__dict__.get(_STATE_ATTR)
    if state is None and create:
        state = LoraState()
        model.__dict__[_STATE_ATTR] = state  # a plain attribute: not a submodule, not in the state dict
    return state


# ---------------------------------------------------------------------------------------------------- reading


def _read_lora_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    from ..modeling import CheckpointError, read_weights

    metadata = None
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(os.fspath(path), framework="pt", device="cpu") as handle:
                raw = (handle.metadata() or {}).get(METADATA_KEY)
        except Exception:  # damaged header: read_weights reports it with the file's name
            raw = None
        if raw:
            try:
                metadata = json.loads(raw)
            except ValueError:
                raise LoraError(f"{path}: its '{METADATA_KEY}' metadata is not valid JSON") from None
    try:
        return read_weights(path), metadata
    except CheckpointError as err:
        raise LoraError(str(err)) from None


def _resolve(source, weight_name: str | None, hub_kwargs: dict[str, Any]) -> Path:
    from ..hub import resolve_weights_file

    names = [weight_name] if weight_name else [LORA_WEIGHT_NAME_SAFE, LORA_WEIGHT_NAME]
    try:
        return resolve_weights_file(source, names, hub_kwargs, "LoRA weights")
    except FileNotFoundError as err:
        raise LoraError(str(err)) from None


def _split_key(key: str) -> tuple[str, str, str, str] | None:
    """``(format, component, module name as written, part)`` of a key; None when no table knows it."""
    for prefix, component in KOHYA_PREFIXES.items():
        if key.startswith(prefix):
            for suffix, part in KOHYA_SUFFIXES.items():
                name = key[len(prefix):-len(suffix)]
                if key.endswith(suffix) and "." not in name:  # kohya layer names have no dots
                    return "kohya", component, name, part
            return None
    for prefix, component in DIFFUSERS_PREFIXES.items():
        if key.startswith(prefix):
            for suffix, part in sorted(DIFFUSERS_SUFFIXES.items(), key=lambda kv: -len(kv[0])):
                if key.endswith(suffix):
                    return "diffusers", component, key[len(prefix):-len(suffix)], part
            return None
    return None


def _kohya_index(model: nn.Module, component: str) -> dict[str, str]:
    """kohya layer name -> module path for every layer of the model: ``down_blocks_0_attentions_0_proj_in`` ->
    ``down_blocks.0.attentions.0.proj_in``; for a UNet also the original (LDM / sgm) names kohya writes for SDXL and
    older trainers for SD 1.x (``input_blocks_4_1_proj_in``), from the single-file key tables (``keymaps.UNET``)."""
    paths = [path for path, module in model.named_modules()
             if isinstance(module, (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm))]
    index = {path.replace(".", "_"): path for path in paths}
    if component == "unet" and "down_block_types" in getattr(model, "config", {}):
        from ..single_file.layout import original_ref

        for path in paths:
            try:
                original = original_ref("unet", f"{path}.weight", model.config).key
            except NotImplementedError:  # a layer the original layout does not have (e.g. SDXL's add_embedding)
                continue
            index.setdefault(original[: -len(".weight")].replace(".", "_"), path)
    return index


def _diffusers_path(name: str) -> str:
    for old, new in DIFFUSERS_PATH_RENAMES.items():
        if name.endswith(old) or old + "." in name:
            name = name.replace(old, new)
    return name


def _alpha_from_metadata(metadata: Mapping[str, Any] | None, component: str, path: str) -> float | None:
    if not metadata:
        return None
    patterns = metadata.get(f"{component}.alpha_pattern") or {}
    for pattern, alpha in patterns.items():
        if path == pattern or path.endswith("." + pattern):
            return float(alpha)
    alpha = metadata.get(f"{component}.lora_alpha")
    return None if alpha is None else float(alpha)


def parse_lora(state_dict: Mapping[str, torch.Tensor], components: Mapping[str, nn.Module], origin: str,
               metadata: Mapping[str, Any] | None = None) -> dict[str, dict[str, LayerAdapter]]:
    """A LoRA state dict -> ``{component: {module path: LoraWeights}}``, every key and shape checked."""
    for key in state_dict:
        for fragment, kind in UNSUPPORTED_KINDS.items():
            if fragment in key:
                raise LoraError(f"{origin}: key {key!r} belongs to {kind}, which diffusekit does not load (LoRA, "
                                "LoCon, LyCORIS LoHa / LoKr / full / (IA)³ / norm layers / OFT / BOFT / GLoRA, and "
                                "DoRA)")
    parts: dict[tuple[str, str], dict[str, tuple[str, torch.Tensor]]] = {}
    indexes: dict[str, dict[str, str]] = {}
    for key, tensor in state_dict.items():
        split = _split_key(key)
        if split is None:
            known = ", ".join([*KOHYA_PREFIXES, *DIFFUSERS_PREFIXES])
            raise LoraError(f"{origin}: key {key!r} is not a LoRA key diffusekit knows (prefixes {known}; suffixes "
                            "lora_down/lora_up/alpha, LyCORIS hada_*/lokr_*/oft_*/a1.weight.../dora_scale, or "
                            "lora_A/lora_B)")
        fmt, component, name, part = split
        model = components.get(component)
        if model is None:
            raise LoraError(f"{origin}: key {key!r} is for the pipeline's {component}, which this pipeline does not "
                            "have (a LoRA for another model, e.g. SDXL?)")
        if fmt == "kohya":
            index = indexes.setdefault(component, _kohya_index(model, component))
            path = index.get(name)
        else:
            path = _diffusers_path(name)
            if not isinstance(_get_module(model, path), (nn.Linear, nn.Conv2d)):
                # transformers 5 writes CLIP text-model paths without the ``text_model.`` level
                path = "text_model." + path if component.startswith("text_encoder") and isinstance(
                    _get_module(model, "text_model." + path), nn.Linear) else None
        if path is None:
            raise LoraError(f"{origin}: key {key!r} names a layer {name!r} that the {component} "
                            f"({type(model).__name__}) does not have: a LoRA for another model?")
        parts.setdefault((component, path), {})[part] = (key, tensor)

    out: dict[str, dict[str, LayerAdapter]] = {}
    for (component, path), found in parts.items():
        kinds = sorted({PART_KINDS[part] for part in found if part in PART_KINDS})
        if len(kinds) != 1:
            keys = [key for key, _ in found.values()]
            raise LoraError(f"{origin}: keys {keys} are for one layer but " + (
                f"mix {' and '.join(KIND_NAMES[k] for k in kinds)} weights" if kinds
                else "hold no adapter weights (only alpha / dora_scale)"))
        module = _get_module(components[component], path)
        layers = KIND_LAYERS.get(kinds[0], LINEAR_OR_CONV)
        if not isinstance(module, layers):
            keys = [key for key, _ in found.values()]
            raise LoraError(f"{origin}: keys {keys} hold {KIND_NAMES[kinds[0]]} weights for {component}.{path}, a "
                            f"{type(module).__name__}; that kind applies to {' / '.join(t.__name__ for t in layers)}"
                            " layers")
        if "alpha" in found:
            alpha = float(found["alpha"][1].float().reshape(-1)[0])
        else:
            alpha = _alpha_from_metadata(metadata, component, path)
        out.setdefault(component, {})[path] = BUILDERS[kinds[0]](module, found, alpha, origin)
    return out


def _get_module(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


# ---------------------------------------------------------------------------------------------------- the mixin


class StableDiffusionLoraLoaderMixin:
    """diffusers' LoRA methods for pipelines with a ``unet`` and a ``text_encoder``."""

    _lora_components: tuple[str, ...] = ("unet", "text_encoder")

    def _lora_models(self) -> dict[str, nn.Module]:
        return {name: model for name in self._lora_components
                if isinstance(model := getattr(self, name, None), nn.Module)}

    def _lora_states(self, components: Sequence[str]):
        """``(component, model, state)`` for each of ``components`` that is loaded and has LoRA state."""
        models = self._lora_models()
        for component in components:
            model = models.get(component)
            state = _state(model) if model is not None else None
            if state is not None:
                yield component, model, state

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name: str | None = None, *,
                          weight_name: str | None = None, **hub_kwargs) -> None:
        """Load a LoRA (file, folder, hub repo or state dict; kohya/A1111 or diffusers/PEFT keys) as an adapter.

        ``adapter_name`` defaults to ``default_<n>``. As in diffusers, the new adapter becomes the active one (weight
        1) on the components it touches; :meth:`set_adapters` runs several together.
        """
        source = pretrained_model_name_or_path_or_dict
        metadata = None
        if isinstance(source, Mapping):
            state_dict, origin = dict(source), "the LoRA state dict passed"
        else:
            path = _resolve(source, weight_name, dict(hub_kwargs))
            state_dict, metadata = _read_lora_file(path)
            origin = str(path)
        if not state_dict:
            raise LoraError(f"{origin}: no LoRA weights in it")
        models = self._lora_models()
        existing = self.get_list_adapters()
        taken = {name for names in existing.values() for name in names}
        if adapter_name is None:
            adapter_name = f"default_{len(taken)}"
            while adapter_name in taken:
                adapter_name += "_"
        elif adapter_name in taken:
            raise LoraError(f"adapter name {adapter_name!r} is already loaded; pick another adapter_name or "
                            "delete_adapters() it first")
        parsed = parse_lora(state_dict, models, origin, metadata)
        for component, layers in parsed.items():
            model = models[component]
            state = _state(model, create=True)
            with state.lock:
                if not state.scale_handles:  # each forward pass keeps the choice it starts with
                    state.scale_handles = [model.register_forward_pre_hook(_choice_pre_hook(state)),
                                           model.register_forward_hook(_choice_post_hook(state), always_call=True)]
                    if component == "unet":
                        state.scale_handles += [
                            model.register_forward_pre_hook(_unet_scale_pre_hook, with_kwargs=True),
                            model.register_forward_hook(_unet_scale_post_hook, with_kwargs=True, always_call=True),
                        ]
                for path, lora in layers.items():
                    module = model.get_submodule(path)
                    hook = state.hooks.get(path)
                    if hook is None:
                        hook = state.hooks[path] = LoraHook(state, path)
                        state.handles[path] = module.register_forward_hook(hook)
                    lora.to(module.weight.detach())
                    hook.adapters[adapter_name] = lora
                state.adapters.append(adapter_name)
                state.choose(active={adapter_name: 1.0})  # as diffusers: the adapter loaded last is the active one

    # ------------------------------------------------------------------ choosing adapters

    def get_list_adapters(self) -> dict[str, list[str]]:
        """``{component: [adapter names]}`` for the components that have LoRA layers."""
        return {name: list(state.adapters) for name, model in self._lora_models().items()
                if (state := _state(model)) is not None and state.adapters}

    def get_active_adapters(self) -> list[str]:
        names: list[str] = []
        for model in self._lora_models().values():
            state = _state(model)
            if state is not None and state.enabled:
                names += [n for n in state.active if n not in names]
        return names

    def set_adapters(self, adapter_names: str | Sequence[str],
                     adapter_weights: float | dict | Sequence[float | dict | None] | None = None) -> None:
        """Make exactly ``adapter_names`` active, with ``adapter_weights`` (one number for all, one per adapter, or
        per adapter a dict ``{"unet": w, "text_encoder": w}``; default 1)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if adapter_weights is None or isinstance(adapter_weights, (int, float, dict)):
            weights = [adapter_weights] * len(names)
        else:
            weights = list(adapter_weights)
        if len(weights) != len(names):
            raise LoraError(f"got {len(weights)} adapter_weights for {len(names)} adapters: give one per adapter")
        known = {n for ns in self.get_list_adapters().values() for n in ns}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise LoraError(f"adapter(s) {unknown} are not loaded; loaded: {sorted(known)}")
        for weight, name in zip(weights, names):
            if isinstance(weight, dict) and (set(weight) - set(self._lora_components)
                                             or any(isinstance(v, dict) for v in weight.values())):
                raise LoraError(f"adapter_weights for {name!r}: per-component numbers only "
                                f"({list(self._lora_components)}); per-block weights are not supported")
        for component, model in self._lora_models().items():
            state = _state(model)
            if state is None:
                continue
            with state.lock:  # the new choice is built whole, then swapped in: a running forward keeps the old
                active = {}
                for name, weight in zip(names, weights):
                    if name not in state.adapters:
                        continue
                    if isinstance(weight, dict):
                        weight = weight.get(component, 1.0)
                    active[name] = 1.0 if weight is None else float(weight)
                state.choose(active=active, enabled=True)

    def disable_lora(self) -> None:
        for model in self._lora_models().values():
            if (state := _state(model)) is not None:
                state.choose(enabled=False)

    def enable_lora(self) -> None:
        for model in self._lora_models().values():
            if (state := _state(model)) is not None:
                state.choose(enabled=True)

    def delete_adapters(self, adapter_names: str | Sequence[str]) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for model in self._lora_models().values():
            state = _state(model)
            if state is None:
                continue
            with state.lock:
                for name in names:
                    if name in state.fused:
                        raise LoraError(f"adapter {name!r} is fused: unfuse_lora() before deleting it")
                    if name in state.adapters:
                        state.adapters.remove(name)
                    state.choose(active={n: w for n, w in state.active.items() if n != name})
                    for hook in state.hooks.values():
                        hook.adapters.pop(name, None)
                for path in [p for p, hook in state.hooks.items() if not hook.adapters]:
                    state.handles.pop(path).remove()
                    del state.hooks[path]

    # ------------------------------------------------------------------ fusing

    def fuse_lora(self, components: Sequence[str] = ("unet", "text_encoder"), lora_scale: float = 1.0,
                  safe_fusing: bool = False, adapter_names: Sequence[str] | None = None) -> None:
        """Add the active adapters (or ``adapter_names``) into the weights: ``W += lora_scale * weight * alpha/r *
        up @ down``. The fused adapters stop running as hooks; ``unfuse_lora`` restores the weights exactly.
        ``safe_fusing`` refuses weights that come out non-finite."""
        for component, model, state in self._lora_states(components):
            with state.lock:
                self._fuse_one(component, model, state, lora_scale, safe_fusing, adapter_names)

    def _fuse_one(self, component: str, model: nn.Module, state: LoraState, lora_scale: float, safe_fusing: bool,
                  adapter_names: Sequence[str] | None) -> None:
        names = list(adapter_names) if adapter_names is not None else list(state.active)
        names = [n for n in names if n in state.adapters and n not in state.fused]
        with torch.no_grad():
            for path, hook in state.hooks.items():
                chosen = [(n, hook.adapters[n]) for n in names if n in hook.adapters]
                if not chosen:
                    continue
                module = model.get_submodule(path)
                weight = module.weight
                if path not in state.originals:
                    state.originals[path] = weight.detach().clone()
                fused = weight.detach().clone()
                original = state.originals[path]
                bias = None  # LyCORIS full / norm layers change the bias too
                for name, adapter in chosen:
                    adapter.to(fused)
                    multiplier = state.active.get(name, 1.0) * lora_scale
                    fused = fused + adapter.weight_delta(original, multiplier)
                    if (extra := adapter.bias_delta(multiplier)) is not None:
                        bias = extra if bias is None else bias + extra
                if safe_fusing and not (torch.isfinite(fused).all() and (bias is None or torch.isfinite(bias).all())):
                    raise LoraError(f"fusing {names} into {component}.{path} gives non-finite weights")
                weight.copy_(fused)
                if bias is not None:
                    if path not in state.bias_originals:  # None: the layer had no bias (A1111 gives it one)
                        state.bias_originals[path] = None if module.bias is None else module.bias.detach().clone()
                    if module.bias is None:
                        module.bias = nn.Parameter(bias.to(weight.dtype), requires_grad=weight.requires_grad)
                    else:
                        module.bias.copy_(module.bias.detach() + bias)
        state.choose(fused=state.fused | set(names))

    def unfuse_lora(self, components: Sequence[str] = ("unet", "text_encoder")) -> None:
        """Put back the weights saved by :meth:`fuse_lora` (bit for bit); the adapters run as hooks again."""
        for component, model, state in self._lora_states(components):
            with state.lock, torch.no_grad():
                for path, original in state.originals.items():
                    model.get_submodule(path).weight.copy_(original)
                for path, bias in state.bias_originals.items():
                    module = model.get_submodule(path)
                    if bias is None:
                        module.bias = None  # the bias fusing added goes again
                    else:
                        module.bias.copy_(bias)
                state.originals.clear()
                state.bias_originals.clear()
                state.choose(fused=())

    def unload_lora_weights(self) -> None:
        """Remove every adapter and hook. Weights fused with :meth:`fuse_lora` stay fused (as in diffusers)."""
        for model in self._lora_models().values():
            state = _state(model)
            if state is None:
                continue
            with state.lock:
                for handle in [*state.handles.values(), *state.scale_handles]:
                    handle.remove()
                del model.__dict__[_STATE_ATTR]

    # ------------------------------------------------------------------ scales

    def _text_encoder_lora_scale(self, lora_scale: float | None):
        """Context for encoding the prompt with ``lora_scale`` (or this call's ``cross_attention_kwargs['scale']``)."""
        if lora_scale is None:
            lora_scale = (getattr(self, "cross_attention_kwargs", None) or {}).get("scale")
        return lora_scale_context(lora_scale)


class StableDiffusionXLLoraLoaderMixin(StableDiffusionLoraLoaderMixin):
    """The LoRA methods for SDXL pipelines: the UNet and both text encoders (kohya ``lora_te1_`` / ``lora_te2_``,
    diffusers ``text_encoder.`` / ``text_encoder_2.``)."""

    _lora_components = ("unet", "text_encoder", "text_encoder_2")
