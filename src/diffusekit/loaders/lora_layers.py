"""The weight deltas of the adapter kinds the LoRA loader takes, one class per kind, built from a file's parts
(already grouped per layer by :func:`diffusekit.loaders.lora.parse_lora`), every factor's shape checked.

Kinds (the formulas are those of kohya / LyCORIS / A1111, ``W`` of shape (out, in[, k, k])):

* LoRA / LoCon: ``ΔW = up @ down``, scale ``alpha / rank`` (``rank = down.shape[0]``). LyCORIS's CP / Tucker LoCon
  adds ``lora_mid`` (r, r, k, k) between a 1x1 ``down`` and ``up``: ``ΔW = Σ_nm up[o, n] · mid[n, m] · down[m, c]``.
* LoHa (LyCORIS ``hada_``): ``ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b)``; ``w*_a`` (out, r), ``w*_b`` (r, in·k·k). With the
  CP / Tucker convolution form (``hada_t1`` / ``hada_t2`` (r, r, k, k), ``w*_a`` (r, out), ``w*_b`` (r, in)) each
  factor is ``t ×₀ w*_a ×₁ w*_b``: ``Σ_ij t[i, j] · w_a[i, o] · w_b[j, c]``. Scale ``alpha / rank``
  (``rank = hada_w1_b.shape[0]``).
* LoKr (LyCORIS ``lokr_``): ``ΔW = kron(w1, w2)`` reshaped to the layer's weight; ``w1`` (a, c) is ``lokr_w1`` or
  ``lokr_w1_a @ lokr_w1_b``, ``w2`` (b, d[, k, k]) is ``lokr_w2``, ``lokr_w2_a @ lokr_w2_b`` (``w2_b`` (r, d·k·k)) or
  the Tucker form ``lokr_t2`` (r, r, k, k) with ``lokr_w2_a`` (r, b), ``lokr_w2_b`` (r, d); ``a·b = out``,
  ``c·d = in``. The scale ``alpha / rank`` applies only when a factor is low-rank (``rank`` from ``lokr_w2_b``, else
  ``lokr_w1_b``); two full factors are used as they are (LyCORIS writes ``alpha = rank`` for them, A1111 ignores it).
* full (LyCORIS ``diff`` / ``diff_b``): ``ΔW = diff``, ``Δb = diff_b``, no scale (A1111 ignores an alpha here).
* (IA)³ (LyCORIS ``weight`` + ``on_input``): ``ΔW = W ⊙ w`` per output row (per input column ``on_input``), so the
  weight becomes ``W ⊙ (1 + m·w)``; the bias is kept (LyCORIS's and A1111's merge).
* trained norms (LyCORIS ``w_norm`` / ``b_norm`` on GroupNorm / LayerNorm): ``Δw = w_norm``, ``Δb = b_norm``.
* OFT (LyCORIS ``oft_blocks`` (k, n, n), ``alpha`` the constraint, optional ``rescale``): each block of ``n`` output
  rows rotated by the Cayley transform of ``B − Bᵀ`` (:class:`OftWeights`); ``ΔW = rescale ⊙ R_mᵀW − W`` with
  ``R_m = m·R + (1 − m)·I``. LyCORIS 2.0's ``oft_diag`` holds ``R`` itself.
* BOFT (LyCORIS ``oft_blocks`` (levels, k, n, n)): ``levels`` butterfly stages of block rotations over the output
  rows (:class:`BoftWeights`), each stage blended with the identity at ``m``; not linear in ``m``.
* GLoRA (LyCORIS ``a1`` / ``a2`` / ``b1`` / ``b2`` [/ ``bm``] ``.weight``): ``ΔW = alpha/rank · (W ×ᵢ a_up·a_down +
  b_up·b_down)`` (:class:`GloraWeights`), reading the layer's weight.

``m`` is the adapter weight times the call scale; every delta (and bias delta) is multiplied by it (OFT and BOFT
blend their rotations with it instead, as LyCORIS does).
Without an ``alpha`` key the scale is 1, as in kohya, LyCORIS and A1111.

DoRA (``dora_scale``, kohya / LyCORIS "weight decompose", any kind): the layer's weight becomes
``W + m · (d ⊙ (W + sΔW) / ‖W + sΔW‖ − W)`` with ``s`` the kind's scale and ``m`` the adapter weight times the
call's scale, as A1111 applies it. ``d`` of shape (1, in[, 1, 1]) holds column norms (LyCORIS's default layout,
the norm taken over the output and kernel dimensions); (out, 1[, 1, 1]) holds row norms (LyCORIS ``wd_on_out``;
so a (1, 1) ``d`` on a layer with one output row and several input columns is a row norm).
``W`` is the layer's weight before any ``fuse_lora``.

PEFT's DoRA (diffusers keys, ``lora_magnitude_vector``: one magnitude per output row, also on a layer with a
single output row) scales inside, as peft does: the layer's weight becomes ``m_r · (W + sΔW) / ‖W + sΔW‖_rows``
with ``s = alpha / rank`` times the adapter weight and the call scale. Both use one formula (:class:`Dora`), told
which way the norms run when the file is read.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

Found = Mapping[str, tuple[str, torch.Tensor]]  # part -> (key in the file, tensor)


class LoraError(ValueError):
    """A LoRA file or argument that cannot be used (the message names the file and key)."""


def _layer_op(module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The layer's own operation with ``weight`` and no bias (stride, padding, dilation and groups of a conv)."""
    if isinstance(module, nn.Conv2d):
        return F.conv2d(x, weight, None, module.stride, module.padding, module.dilation, module.groups)
    return F.linear(x, weight)


@dataclasses.dataclass
class Dora:
    """DoRA's magnitude on one layer: ``magnitude`` (1, in[, 1, 1]) column norms or (out, 1[, 1, 1]) row norms,
    ``rows`` saying which (stated, not guessed from the shape: a layer with one output row or one input column has
    a (1, 1) magnitude either way), ``scale_inside`` (peft: the adapter weight and call scale multiply ``ΔW`` inside
    the norm; kohya / A1111: they multiply DoRA's whole change)."""

    magnitude: torch.Tensor
    rows: bool
    scale_inside: bool = False

    def change(self, base: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """DoRA's change to ``base`` for a scaled ``delta``: ``magnitude · (base + delta) / ‖base + delta‖ − base``,
        the norm over every dimension but the one the magnitude runs along (output rows or input columns)."""
        merged = base + delta
        keep = 0 if self.rows else 1
        dims = [d for d in range(merged.ndim) if d != keep]
        return merged * (self.magnitude / torch.linalg.vector_norm(merged, dim=dims, keepdim=True)) - base


@dataclasses.dataclass
class LayerAdapter:
    """One adapter on one layer: the unscaled ``delta_weight()`` of its kind, ``alpha_scale``, optional DoRA."""

    alpha_scale: float
    dora: Dora | None

    def delta_weight(self) -> torch.Tensor:  # pragma: no cover - every kind defines it
        raise NotImplementedError

    @property
    def needs_base(self) -> bool:
        """Whether :meth:`weight_delta` reads the layer's weight (DoRA)."""
        return self.dora is not None

    def weight_delta(self, base: torch.Tensor | None, multiplier: float) -> torch.Tensor:
        """What this adapter adds to the layer's weight ``base`` at ``multiplier`` (adapter weight × call scale);
        ``base`` is read only with DoRA."""
        if self.dora is None:
            return self.delta_weight() * (self.alpha_scale * multiplier)
        if self.dora.scale_inside:
            return self.dora.change(base, self.delta_weight() * (self.alpha_scale * multiplier))
        return self.dora.change(base, self.delta_weight() * self.alpha_scale) * multiplier

    def bias_delta(self, multiplier: float) -> torch.Tensor | None:
        """What this adapter adds to the layer's bias (None: nothing; LyCORIS "full" and norm layers have one)."""
        return None

    def forward_delta(self, module: nn.Module, x: torch.Tensor, base: torch.Tensor | None,
                      multiplier: float) -> torch.Tensor:
        """What this adapter adds to the layer's output for input ``x``."""
        out = _layer_op(module, x, self.weight_delta(base, multiplier))
        bias = self.bias_delta(multiplier)
        if bias is None:
            return out
        return out + (bias.reshape(-1, *[1] * (out.ndim - 2)) if isinstance(module, nn.Conv2d) else bias)

    def to(self, like: torch.Tensor) -> None:
        """Move every tensor to ``like``'s device and dtype (once; later calls are free)."""
        for holder in (self, self.dora) if self.dora is not None else (self,):
            for field in dataclasses.fields(holder):
                value = getattr(holder, field.name)
                if isinstance(value, torch.Tensor) and (value.device != like.device or value.dtype != like.dtype):
                    setattr(holder, field.name, value.to(like.device, like.dtype))


def _up_down(up: torch.Tensor, down: torch.Tensor, mid: torch.Tensor | None) -> torch.Tensor:
    """``up @ down`` (or ``up · mid · down``) in the shape of the layer's weight: ``up`` (out, r[, 1, 1]), ``down``
    (r, in[, k, k]), or with a CP ``mid`` (r, r, k, k) a (r, in[, 1, 1]) ``down``."""
    up2 = up.reshape(up.shape[0], -1)  # (out, r)
    down2 = down.reshape(down.shape[0], -1)  # (r, in * k * k), or (r, in) with a mid
    if mid is not None:
        return torch.einsum("nmkl,on,mc->ockl", mid, up2, down2)  # (out, in, k, k)
    return (up2 @ down2).reshape(up.shape[0], *down.shape[1:])


@dataclasses.dataclass
class LoraWeights(LayerAdapter):
    """LoRA / LoCon: ``down`` (r, in[, k, k]), ``up`` (out, r[, 1, 1]); with a CP ``mid`` (r, r, k, k) the
    ``down`` is (r, in, 1, 1)."""

    down: torch.Tensor = None
    up: torch.Tensor = None
    mid: torch.Tensor | None = None

    def delta_weight(self) -> torch.Tensor:
        return _up_down(self.up, self.down, self.mid)

    def forward_delta(self, module, x, base, multiplier):
        if self.needs_base:
            return super().forward_delta(module, x, base, multiplier)
        if self.mid is not None:  # 1x1 down, the k x k middle with the layer's stride and padding, 1x1 up
            hidden = F.conv2d(F.conv2d(x, self.down), self.mid, None, module.stride, module.padding, module.dilation)
            delta = F.conv2d(hidden, self.up)
        elif isinstance(module, nn.Conv2d):  # low rank all the way: never builds the (out, in, k, k) delta
            delta = F.conv2d(F.conv2d(x, self.down, None, module.stride, module.padding, module.dilation), self.up)
        else:
            delta = F.linear(F.linear(x, self.down), self.up)
        return delta * (self.alpha_scale * multiplier)


def _tucker(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """LyCORIS's CP / Tucker rebuild: ``t`` (r1, r2, k, k), ``wa`` (r1, out), ``wb`` (r2, in) -> (out, in, k, k)."""
    return torch.einsum("ijkl,ip,jq->pqkl", t, wa, wb)


@dataclasses.dataclass
class LohaWeights(LayerAdapter):
    """LoHa: the Hadamard product of two low-rank (or CP-decomposed) factors, in the layer's ``shape``."""

    shape: tuple[int, ...] = ()
    w1_a: torch.Tensor = None
    w1_b: torch.Tensor = None
    w2_a: torch.Tensor = None
    w2_b: torch.Tensor = None
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None

    def delta_weight(self) -> torch.Tensor:
        if self.t1 is not None:
            return _tucker(self.t1, self.w1_a, self.w1_b) * _tucker(self.t2, self.w2_a, self.w2_b)
        return ((self.w1_a @ self.w1_b) * (self.w2_a @ self.w2_b)).reshape(self.shape)


@dataclasses.dataclass
class LokrWeights(LayerAdapter):
    """LoKr: the Kronecker product of a small factor ``w1`` and a large one ``w2``, in the layer's ``shape``."""

    shape: tuple[int, ...] = ()
    w1: torch.Tensor | None = None
    w1_a: torch.Tensor | None = None
    w1_b: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    w2_a: torch.Tensor | None = None
    w2_b: torch.Tensor | None = None
    t2: torch.Tensor | None = None

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``w1`` (a, c) and ``w2`` as (b, d·k·k)."""
        w1 = self.w1 if self.w1 is not None else self.w1_a @ self.w1_b
        if self.w2 is not None:
            w2 = self.w2
        elif self.t2 is not None:
            w2 = _tucker(self.t2, self.w2_a, self.w2_b)
        else:
            w2 = self.w2_a @ self.w2_b.reshape(self.w2_b.shape[0], -1)
        return w1, w2.reshape(w2.shape[0], -1)

    def delta_weight(self) -> torch.Tensor:
        # kron((a, c), (b, d·k·k)) is (a·b, c·d·k·k): row i·b + j, column m·d·k·k + n·k·k + p·k + q holds
        # w1[i, m] · w2[j, n, p, q], which is (out, in, k, k) element [i·b + j, m·d + n, p, q] after the reshape
        return torch.kron(*self.factors()).reshape(self.shape)


@dataclasses.dataclass
class FullWeights(LayerAdapter):
    """LyCORIS "full": the weight difference itself, ``diff`` in the layer's shape, and optionally the bias
    difference ``diff_b`` (out,); no alpha (A1111 and LyCORIS use them as they are)."""

    diff: torch.Tensor = None
    diff_b: torch.Tensor | None = None

    def delta_weight(self) -> torch.Tensor:
        return self.diff

    def bias_delta(self, multiplier):
        return None if self.diff_b is None else self.diff_b * multiplier


@dataclasses.dataclass
class Ia3Weights(LayerAdapter):
    """(IA)³ (LyCORIS ``ia3``): the layer's weight scaled per output row (or per input column, ``on_input``) by
    ``1 + m·w``, i.e. ``ΔW = m · W ⊙ w``; ``w`` is reshaped at build time to broadcast against ``W`` (out, 1[, 1, 1])
    or (1, in[, 1, 1]). The bias is left alone, as LyCORIS and A1111 merge it (peft's (IA)³ on an output scales
    the bias too)."""

    scale: torch.Tensor = None

    @property
    def needs_base(self) -> bool:
        return True

    def weight_delta(self, base, multiplier):
        return base * self.scale * multiplier


@dataclasses.dataclass
class NormWeights(LayerAdapter):
    """LyCORIS's trained norm layers (``w_norm`` / ``b_norm`` on a GroupNorm or LayerNorm): differences of the
    layer's affine weight and bias. The norm is affine in them, so unfused the delta is the same norm with
    ``(m·w_norm, m·b_norm)`` as its weight and bias."""

    w_norm: torch.Tensor = None
    b_norm: torch.Tensor = None

    def delta_weight(self) -> torch.Tensor:
        return self.w_norm

    def bias_delta(self, multiplier):
        return self.b_norm * multiplier

    def forward_delta(self, module, x, base, multiplier):
        weight, bias = self.w_norm * multiplier, self.b_norm * multiplier
        if isinstance(module, nn.GroupNorm):
            return F.group_norm(x, module.num_groups, weight, bias, module.eps)
        return F.layer_norm(x, module.normalized_shape, weight, bias, module.eps)


@dataclasses.dataclass
class OftWeights(LayerAdapter):
    """OFT (LyCORIS ``diag-oft``: ``oft_blocks`` (k, n, n) with ``k·n = out``): each block of ``n`` output rows is
    rotated by the Cayley transform ``R = (I + Q)(I − Q)⁻¹`` of ``Q = B − Bᵀ``, ``Q`` first scaled down to norm
    ``constraint`` (``alpha · out``) when that is above 0 and ``‖Q‖`` exceeds it. At multiplier ``m`` the rotation
    is blended with the identity, ``R_m = m·R + (1 − m)·I``, and the weight becomes ``rescale ⊙ R_mᵀ W`` per block
    (LyCORIS's ``make_weight``). The bias is kept.

    LyCORIS's older layout (``oft_diag``, LyCORIS 2.0 / 2.1) stores ``R`` itself (``rotation_given``), applied the
    same way, without a constraint.

    Where the references differ, LyCORIS is followed: A1111 merges ``W + m·(rescale ⊙ RᵀW − W)``, the same without a
    ``rescale``; with one, LyCORIS keeps the full ``rescale`` at any ``m`` (at ``m = 0`` only the rescale applies)
    where A1111 scales it with the rotation. A1111 clips ``‖Q‖`` by ``(min(‖Q‖, c) + ε) / (‖Q‖ + ε)``, LyCORIS by
    ``c / (‖Q‖ + ε)`` only above ``c`` (the same up to ``ε = 1e-8``)."""

    blocks: torch.Tensor = None
    constraint: float = 0.0
    rescale: torch.Tensor | None = None
    rotation_given: bool = False

    @property
    def needs_base(self) -> bool:
        return True

    def rotation(self) -> torch.Tensor:
        """``R`` per block, (k, n, n) (BOFT: (levels, k, n, n)), in float32 (as LyCORIS inverts)."""
        blocks = self.blocks.float()
        if self.rotation_given:
            return blocks
        q = blocks - blocks.transpose(-1, -2)
        if self.constraint > 0:
            norm = torch.linalg.vector_norm(q) + 1e-8
            q = q * torch.where(norm > self.constraint, self.constraint / norm, torch.ones_like(norm))
        eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
        return (eye + q) @ torch.linalg.inv(eye - q)

    def rotate(self, base: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
        """``base`` (out, ...) with each block of ``n`` output rows multiplied by its ``Rᵀ``."""
        k, n = rotations.shape[:2]
        rotated = torch.einsum("knm,kn...->km...", rotations, base.reshape(k, n, *base.shape[1:]))
        return rotated.reshape(base.shape)

    def weight_delta(self, base, multiplier):
        rotations = self.rotation()
        if multiplier != 1:
            eye = torch.eye(rotations.shape[-1], dtype=rotations.dtype, device=rotations.device)
            rotations = rotations * multiplier + eye * (1 - multiplier)
        original = base.float()
        merged = self.rotate(original, rotations)
        if self.rescale is not None:
            merged = self.rescale.float() * merged
        return (merged - original).to(base.dtype)


@dataclasses.dataclass
class BoftWeights(OftWeights):
    """BOFT (LyCORIS ``boft``, butterfly OFT: ``oft_blocks`` (levels, k, n, n), ``k·n = out``, ``n`` even, ``k``
    divisible by ``2^(levels − 1)``): the weight's output rows go through ``levels`` butterfly stages; stage ``i``
    pairs each row with the one ``2^i · n/2`` rows away, takes the pairs as consecutive blocks of ``n`` rows,
    multiplies each block by its ``R`` (``R``, not diag-OFT's ``Rᵀ``, as LyCORIS does), and puts the rows back.
    ``R`` is OFT's Cayley transform, the norm of all stages' ``Q`` together constrained to ``alpha · out``. At
    multiplier ``m`` every stage's ``R`` is blended, ``m·R + (1 − m)·I``, then the ``rescale`` applies in full
    (LyCORIS's ``make_weight``): unlike the other kinds the change is not linear in ``m``.

    The references differ when ``m ≠ 1``: LyCORIS (followed here) blends every stage; A1111 applies the stages
    unblended and multiplies the change, ``W + m·(rescale ⊙ B(W) − W)``; ComfyUI blends every stage and multiplies
    the change by ``m`` once more. ComfyUI also takes ``alpha`` itself as the constraint (LyCORIS and A1111:
    ``alpha · out``). All agree at ``m = 1`` (up to the constraint)."""

    def rotate(self, base, rotations):
        levels, count, size = rotations.shape[:3]
        rest = base.shape[1:]
        rows = base
        for level in range(levels):
            stride = (size // 2) << level
            # rows (c, 2, stride) -> (c, stride, 2): rows `stride` apart become neighbours, in blocks of `size`
            rows = rows.reshape(-1, 2, stride, *rest).transpose(1, 2).reshape(count, size, *rest)
            rows = torch.einsum("bij,bj...->bi...", rotations[level], rows)
            rows = rows.reshape(-1, stride, 2, *rest).transpose(1, 2).reshape(base.shape)
        return rows


@dataclasses.dataclass
class GloraWeights(LayerAdapter):
    """GLoRA (LyCORIS ``glora``): ``ΔW = s · (W ×ᵢ A + B)`` with ``A = a_up @ a_down`` (in, in) acting on the
    layer's input channels (``(W ×ᵢ A)[o, j, …] = Σ_i W[o, i, …] · A[i, j]``, a 1×1 map on a conv) and
    ``B = b_up @ b_down`` (or ``b_up · mid · b_down`` with LyCORIS's Tucker ``bm``) a LoRA / LoCon delta;
    ``s = alpha / rank`` (1 without an alpha or with alpha 0, as LyCORIS); linear in the multiplier. ``W`` is the
    layer's weight before any ``fuse_lora`` (LyCORIS reads the weight as it is at the time).

    Key layouts, told apart by their shapes: LyCORIS ≥ 3.0 writes ``a2`` (r, in) → ``a1`` (in, r) and ``b2``
    (r, in[, k, k]) → ``b1`` (out, r[, 1, 1]), or ``bm`` (r, r, k, k) between a 1×1 ``b2`` and ``b1``; LyCORIS ≤ 2.2
    wrote the same maps with the names swapped, ``a1`` (r, in) → ``a2`` (in, r) and ``b1`` (r, in) → ``b2``
    (out, r). A1111 reads only the older layout and ignores ``alpha`` (scale 1); LyCORIS and ComfyUI use
    ``alpha / rank``, as here (ComfyUI reads both layouts and drops ``bm``)."""

    a_down: torch.Tensor = None
    a_up: torch.Tensor = None
    b_down: torch.Tensor = None
    b_up: torch.Tensor = None
    b_mid: torch.Tensor | None = None

    @property
    def needs_base(self) -> bool:
        return True

    def weight_delta(self, base, multiplier):
        mix = self.a_up @ self.a_down  # (in, in)
        delta = torch.einsum("oi...,ij->oj...", base, mix) + _up_down(self.b_up, self.b_down, self.b_mid)
        return delta * (self.alpha_scale * multiplier)


# ---------------------------------------------------------------------------------------------------- building


def _fan(module: nn.Module) -> tuple[int, int, tuple[int, ...]]:
    """``(out, in · k · k, kernel)`` of the layer's weight (``in`` per group for a grouped conv)."""
    shape = tuple(module.weight.shape)
    return shape[0], math.prod(shape[1:]), shape[2:]


def _tensor(found: Found, part: str) -> torch.Tensor | None:
    return found[part][1].detach().float() if part in found else None


def _key(found: Found, part: str) -> str:
    return found[part][0]


def _need(found: Found, parts: tuple[str, ...], origin: str, kind: str) -> None:
    missing = [p for p in parts if p not in found]
    if missing:
        have = next(iter(found.values()))[0]
        raise LoraError(f"{origin}: key {have!r} ({kind}) has no matching {' / '.join(missing)} weight for its layer")


def _want(ok: bool, found: Found, part: str, tensor: torch.Tensor, want: str, origin: str) -> None:
    if not ok:
        raise LoraError(f"{origin}: key {_key(found, part)!r} has shape {tuple(tensor.shape)}, the layer needs "
                        f"{want} (a file for another model?)")


def _same_rank(found: Found, first: str, second: str, a: int, b: int, origin: str) -> None:
    if a != b:
        raise LoraError(f"{origin}: wrong ranks: {_key(found, first)!r} has rank {a} but {_key(found, second)!r} has "
                        f"rank {b}")


def _scale(alpha: float | None, rank: int | None) -> float:
    return 1.0 if alpha is None or not rank else alpha / rank


def _dora(module: nn.Module, found: Found, origin: str) -> Dora | None:
    """kohya / LyCORIS ``dora_scale`` as (1, in[, 1, 1]) column norms (checked first, as LyCORIS's default) or
    (out, 1[, 1, 1]) row norms (LyCORIS ``wd_on_out``)."""
    scale = _tensor(found, "dora_scale")
    if scale is None:
        return None
    weight = module.weight
    ones = [1] * (weight.ndim - 2)
    out, fan_in = weight.shape[0], weight.shape[1]
    if scale.numel() == fan_in and scale.shape[0] == 1:
        return Dora(scale.reshape(1, fan_in, *ones), rows=False)
    if scale.numel() == out and (scale.ndim == 1 or scale.shape[1:].numel() == 1):
        return Dora(scale.reshape(out, 1, *ones), rows=True)
    raise LoraError(f"{origin}: key {_key(found, 'dora_scale')!r} has shape {tuple(scale.shape)}; DoRA needs "
                    f"(1, {fan_in}{', 1, 1' if ones else ''}) (column norms) or ({out}, 1"
                    f"{', 1, 1' if ones else ''}) (row norms) for this layer")


def build_lora(module: nn.Module, found: Found, alpha: float | None, origin: str) -> LoraWeights:
    if "down" not in found or "up" not in found:
        have, missing = next(iter(found.values()))[0], "up" if "up" not in found else "down"
        raise LoraError(f"{origin}: key {have!r} has no matching {missing} weight")
    mid = None
    if "mid" in found:
        down, mid, up = _cp_shapes(module, found, origin)
    else:
        down, up = _lora_shapes(module, found, origin)
    rank = down.shape[0]
    alpha = float(rank) if alpha is None else alpha
    magnitude = _tensor(found, "magnitude")
    if magnitude is None:
        return LoraWeights(alpha / rank, _dora(module, found, origin), down, up, mid)
    out = module.weight.shape[0]  # peft's DoRA: one magnitude per output row, whatever the shapes
    _want(magnitude.numel() == out and "dora_scale" not in found, found, "magnitude", magnitude,
          f"{out} values, one per output row (and no dora_scale beside it)", origin)
    dora = Dora(magnitude.reshape(out, *[1] * (module.weight.ndim - 1)), rows=True, scale_inside=True)
    return LoraWeights(alpha / rank, dora, down, up, mid)


def _cp_shapes(module: nn.Module, found: Found, origin: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoCon with a CP middle: ``down`` (r, in, 1, 1), ``mid`` (r, r, k, k), ``up`` (out, r, 1, 1)."""
    down, mid, up = (_tensor(found, p) for p in ("down", "mid", "up"))
    if not isinstance(module, nn.Conv2d) or module.groups != 1:
        raise LoraError(f"{origin}: key {_key(found, 'mid')!r} (a CP-decomposed LoCon middle) is for a convolution; "
                        f"the layer is a {type(module).__name__}" + (" with groups" if isinstance(module, nn.Conv2d)
                                                                        else ""))
    kernel = tuple(module.kernel_size)
    down = down[:, :, None, None] if down.ndim == 2 else down
    up = up[:, :, None, None] if up.ndim == 2 else up
    _want(down.ndim == 4 and down.shape[1] == module.in_channels and tuple(down.shape[2:]) == (1, 1), found, "down",
          down, f"(rank, {module.in_channels}, 1, 1) beside a lora_mid", origin)
    _want(mid.ndim == 4 and tuple(mid.shape[2:]) == kernel, found, "mid", mid,
          f"(rank, rank, {kernel[0]}, {kernel[1]})", origin)
    _want(up.ndim == 4 and up.shape[0] == module.out_channels and tuple(up.shape[2:]) == (1, 1), found, "up", up,
          f"({module.out_channels}, rank, 1, 1)", origin)
    _same_rank(found, "mid", "down", mid.shape[1], down.shape[0], origin)
    _same_rank(found, "up", "mid", up.shape[1], mid.shape[0], origin)
    return down, mid, up


def _lora_shapes(module: nn.Module, found: Found, origin: str) -> tuple[torch.Tensor, torch.Tensor]:
    down, up = _tensor(found, "down"), _tensor(found, "up")
    if isinstance(module, nn.Linear):
        if down.ndim == 4 and down.shape[2:] == (1, 1):
            down = down[:, :, 0, 0]
        if up.ndim == 4 and up.shape[2:] == (1, 1):
            up = up[:, :, 0, 0]
        want_down, want_up = f"(rank, {module.in_features})", f"({module.out_features}, rank)"
        ok_down = down.ndim == 2 and down.shape[1] == module.in_features
        ok_up = up.ndim == 2 and up.shape[0] == module.out_features
    else:
        kernel = tuple(module.kernel_size)
        if down.ndim == 2:
            down = down[:, :, None, None]
        if up.ndim == 2:
            up = up[:, :, None, None]
        want_down = f"(rank, {module.in_channels}, {kernel[0]}, {kernel[1]}) or (rank, {module.in_channels}, 1, 1)"
        want_up = f"({module.out_channels}, rank, 1, 1)"
        ok_down = down.ndim == 4 and down.shape[1] == module.in_channels and \
            tuple(down.shape[2:]) in (kernel, (1, 1)) and module.groups == 1
        ok_up = up.ndim == 4 and up.shape[0] == module.out_channels and tuple(up.shape[2:]) == (1, 1)
        if ok_down and tuple(down.shape[2:]) != kernel:  # a 1x1 down on a kxk layer: pad to the layer's kernel
            if module.padding != tuple(k // 2 for k in kernel) or module.stride != (1, 1):
                ok_down = False
            else:
                padded = down.new_zeros(down.shape[0], down.shape[1], *kernel)
                padded[:, :, kernel[0] // 2, kernel[1] // 2] = down[:, :, 0, 0]
                down = padded
    _want(ok_down, found, "down", down, want_down, origin)
    _want(ok_up, found, "up", up, want_up, origin)
    _same_rank(found, "down", "up", down.shape[0], up.shape[1], origin)
    return down, up


def build_loha(module: nn.Module, found: Found, alpha: float | None, origin: str) -> LohaWeights:
    _need(found, ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"), origin, "LoHa")
    out, fan_in, kernel = _fan(module)
    tucker = "hada_t1" in found or "hada_t2" in found
    factors: dict[str, torch.Tensor] = {}
    if tucker:
        _need(found, ("hada_t1", "hada_t2"), origin, "LoHa with CP-decomposed convolutions")
        in_channels = module.weight.shape[1]
        for i in ("1", "2"):
            t, a, b = (_tensor(found, f"hada_{p}") for p in (f"t{i}", f"w{i}_a", f"w{i}_b"))
            _want(t.ndim == 2 + len(kernel) and tuple(t.shape[2:]) == kernel and len(kernel) > 0, found,
                  f"hada_t{i}", t, f"(rank, rank, {', '.join(map(str, kernel)) or 'k, k'})", origin)
            _want(a.ndim == 2 and a.shape[1] == out, found, f"hada_w{i}_a", a, f"(rank, {out})", origin)
            _want(b.ndim == 2 and b.shape[1] == in_channels, found, f"hada_w{i}_b", b, f"(rank, {in_channels})",
                  origin)
            _same_rank(found, f"hada_t{i}", f"hada_w{i}_a", t.shape[0], a.shape[0], origin)
            _same_rank(found, f"hada_t{i}", f"hada_w{i}_b", t.shape[1], b.shape[0], origin)
            factors |= {f"t{i}": t, f"w{i}_a": a, f"w{i}_b": b}
    else:
        for i in ("1", "2"):
            a, b = _tensor(found, f"hada_w{i}_a"), _tensor(found, f"hada_w{i}_b")
            a = a.reshape(a.shape[0], -1) if a.ndim > 2 and a.shape[2:].numel() == 1 else a
            b = b.reshape(b.shape[0], -1)
            _want(a.ndim == 2 and a.shape[0] == out, found, f"hada_w{i}_a", a, f"({out}, rank)", origin)
            _want(b.shape[1] == fan_in, found, f"hada_w{i}_b", b, f"(rank, {fan_in})", origin)
            _same_rank(found, f"hada_w{i}_a", f"hada_w{i}_b", a.shape[1], b.shape[0], origin)
            factors |= {f"w{i}_a": a, f"w{i}_b": b}
    rank = factors["w1_b"].shape[0]
    return LohaWeights(_scale(alpha, rank), _dora(module, found, origin), tuple(module.weight.shape),
                       **factors)


def _need_factor(found: Found, name: str, origin: str) -> None:
    """A LoKr factor is ``name`` itself or the pair ``name_a`` / ``name_b``."""
    pair = (f"{name}_a", f"{name}_b")
    if not any(p in found for p in pair):
        _need(found, (f"{name} (or {name}_a and {name}_b)",), origin, "LoKr")
    _need(found, pair, origin, "LoKr")


def build_lokr(module: nn.Module, found: Found, alpha: float | None, origin: str) -> LokrWeights:
    out, fan_in, kernel = _fan(module)
    factors: dict[str, torch.Tensor] = {}
    rank = None
    if "lokr_w1" in found:
        factors["w1"] = w1 = _tensor(found, "lokr_w1")
        _want(w1.ndim == 2, found, "lokr_w1", w1, "a 2-d factor (a, c)", origin)
    else:
        _need_factor(found, "lokr_w1", origin)
        a, b = _tensor(found, "lokr_w1_a"), _tensor(found, "lokr_w1_b")
        _want(a.ndim == 2, found, "lokr_w1_a", a, "a 2-d factor (a, rank)", origin)
        _want(b.ndim == 2, found, "lokr_w1_b", b, "a 2-d factor (rank, c)", origin)
        _same_rank(found, "lokr_w1_a", "lokr_w1_b", a.shape[1], b.shape[0], origin)
        factors |= {"w1_a": a, "w1_b": b}
        rank = b.shape[0]
    if "lokr_w2" in found:
        factors["w2"] = w2 = _tensor(found, "lokr_w2")
        _want(w2.ndim in (2, 2 + len(kernel)) and (w2.ndim == 2 or tuple(w2.shape[2:]) == kernel), found,
              "lokr_w2", w2, f"(b, d{''.join(f', {k}' for k in kernel)})", origin)
    else:
        _need_factor(found, "lokr_w2", origin)
        a, b = _tensor(found, "lokr_w2_a"), _tensor(found, "lokr_w2_b")
        if "lokr_t2" in found:
            t = _tensor(found, "lokr_t2")
            _want(len(kernel) > 0 and t.ndim == 2 + len(kernel) and tuple(t.shape[2:]) == kernel, found, "lokr_t2",
                  t, f"(rank, rank, {', '.join(map(str, kernel)) or 'k, k'}) on a convolution", origin)
            _want(a.ndim == 2, found, "lokr_w2_a", a, "(rank, b)", origin)
            _want(b.ndim == 2, found, "lokr_w2_b", b, "(rank, d)", origin)
            _same_rank(found, "lokr_t2", "lokr_w2_a", t.shape[0], a.shape[0], origin)
            _same_rank(found, "lokr_t2", "lokr_w2_b", t.shape[1], b.shape[0], origin)
            factors["t2"] = t
        else:
            _want(a.ndim == 2, found, "lokr_w2_a", a, "(b, rank)", origin)
            _same_rank(found, "lokr_w2_a", "lokr_w2_b", a.shape[1], b.shape[0], origin)
        factors |= {"w2_a": a, "w2_b": b}
        rank = b.shape[0]
    adapter = LokrWeights(_scale(alpha, rank), _dora(module, found, origin), tuple(module.weight.shape),
                          **factors)
    w1, w2 = adapter.factors()
    if (w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1]) != (out, fan_in):
        keys = [found[p][0] for p in found if p.startswith("lokr_")]
        raise LoraError(f"{origin}: LoKr keys {keys} give a ({w1.shape[0] * w2.shape[0]}, "
                        f"{w1.shape[1] * w2.shape[1]}) weight, the layer needs ({out}, {fan_in}) (out, in·k·k): a "
                        "file for another model?")
    return adapter


def _no_dora(found: Found, origin: str, kind: str) -> None:
    if "dora_scale" in found:
        raise LoraError(f"{origin}: key {_key(found, 'dora_scale')!r}: DoRA beside {kind} is not supported")


def build_full(module: nn.Module, found: Found, alpha: float | None, origin: str) -> FullWeights:
    _need(found, ("diff",), origin, "LyCORIS full")
    diff, diff_b = _tensor(found, "diff"), _tensor(found, "diff_b")
    weight = module.weight
    _want(diff.numel() == weight.numel() and (diff.shape == weight.shape or diff.ndim == 2), found, "diff", diff,
          str(tuple(weight.shape)), origin)
    if diff_b is not None:
        _want(diff_b.numel() == weight.shape[0], found, "diff_b", diff_b, f"({weight.shape[0]},)", origin)
        diff_b = diff_b.reshape(-1)
    return FullWeights(1.0, _dora(module, found, origin), diff.reshape(weight.shape), diff_b)


def build_ia3(module: nn.Module, found: Found, alpha: float | None, origin: str) -> Ia3Weights:
    _need(found, ("ia3_weight",), origin, "(IA)³")
    _no_dora(found, origin, "(IA)³")
    w = _tensor(found, "ia3_weight")
    on_input = "on_input" in found and bool(found["on_input"][1].reshape(-1)[0].item())
    weight = module.weight
    ones = [1] * (weight.ndim - 2)
    size = weight.shape[1] if on_input else weight.shape[0]
    side = "input column" if on_input else "output row"
    _want(w.numel() == size, found, "ia3_weight", w, f"{size} values, one per {side} (on_input={int(on_input)})",
          origin)
    scale = w.reshape(1, size, *ones) if on_input else w.reshape(size, 1, *ones)
    return Ia3Weights(1.0, None, scale)


def build_norm(module: nn.Module, found: Found, alpha: float | None, origin: str) -> NormWeights:
    _need(found, ("w_norm", "b_norm"), origin, "trained norm layer")
    _no_dora(found, origin, "a trained norm layer")
    if module.weight is None or module.bias is None:
        raise LoraError(f"{origin}: key {_key(found, 'w_norm')!r} trains the affine weight and bias of a norm layer "
                        "without them")
    w, b = _tensor(found, "w_norm"), _tensor(found, "b_norm")
    _want(w.shape == module.weight.shape, found, "w_norm", w, str(tuple(module.weight.shape)), origin)
    _want(b.shape == module.bias.shape, found, "b_norm", b, str(tuple(module.bias.shape)), origin)
    return NormWeights(1.0, None, w, b)


def build_oft(module: nn.Module, found: Found, alpha: float | None, origin: str) -> OftWeights:
    """diag-OFT (3-d ``oft_blocks``), BOFT (4-d ``oft_blocks``) or LyCORIS 2.0's ``oft_diag`` (the rotations)."""
    if "oft_blocks" in found and "oft_diag" in found:
        raise LoraError(f"{origin}: keys {_key(found, 'oft_blocks')!r} and {_key(found, 'oft_diag')!r} are two OFT "
                        "layouts for one layer; a LyCORIS file has one of them")
    part = "oft_diag" if "oft_diag" in found else "oft_blocks"
    _need(found, (part,), origin, "OFT")
    _no_dora(found, origin, "OFT")
    blocks, rescale = _tensor(found, part), _tensor(found, "rescale")
    out = module.weight.shape[0]
    if rescale is not None:
        _want(rescale.numel() == out, found, "rescale", rescale, f"{out} values, one per output row", origin)
        rescale = rescale.reshape(out, *[1] * (module.weight.ndim - 1))
    constraint = 0.0 if alpha is None or alpha <= 0 else alpha * out
    if blocks.ndim == 4 and part == "oft_blocks":  # BOFT
        levels, count, size = blocks.shape[:3]
        _want(levels >= 1 and size == blocks.shape[3] and count * size == out and size % 2 == 0
              and count % (1 << (levels - 1)) == 0, found, part, blocks,
              f"(levels, blocks, size, size) with blocks · size = {out}, an even size and blocks divisible by "
              "2^(levels − 1) (LyCORIS BOFT)", origin)
        return BoftWeights(1.0, None, blocks, constraint, rescale)
    _want(blocks.ndim == 3 and blocks.shape[1] == blocks.shape[2] and blocks.shape[0] * blocks.shape[1] == out,
          found, part, blocks, f"(blocks, size, size) with blocks · size = {out}", origin)
    if part == "oft_diag":  # LyCORIS 2.0 / 2.1 saved R itself (its constraint already applied)
        return OftWeights(1.0, None, blocks, 0.0, rescale, rotation_given=True)
    return OftWeights(1.0, None, blocks, constraint, rescale)


def _matrix(found: Found, part: str, origin: str) -> torch.Tensor:
    """A 2-d factor, also written as a 1×1 convolution's (x, y, 1, 1) weight."""
    tensor = _tensor(found, part)
    if tensor.ndim > 2 and tensor.shape[2:].numel() == 1:
        tensor = tensor.reshape(tensor.shape[0], tensor.shape[1])
    _want(tensor.ndim == 2, found, part, tensor, "a 2-d factor (or a 1×1 convolution's weight)", origin)
    return tensor


def build_glora(module: nn.Module, found: Found, alpha: float | None, origin: str) -> GloraWeights:
    """GLoRA in LyCORIS ≥ 3.0's layout or, where only it fits the layer, LyCORIS ≤ 2.2's (:class:`GloraWeights`)."""
    _need(found, ("a1", "a2", "b1", "b2"), origin, "GLoRA")
    _no_dora(found, origin, "GLoRA")
    a1, a2 = _matrix(found, "a1", origin), _matrix(found, "a2", origin)
    b1, b2 = _tensor(found, "b1"), _tensor(found, "b2")
    out, fan_in = module.weight.shape[0], module.weight.shape[1]
    if a1.shape[0] == fan_in and a2.shape[1] == fan_in and b1.shape[0] == out:  # a2 -> a1, b2 -> b1
        (down, a_down), (up, a_up), b_parts = ("a2", a2), ("a1", a1), {"down": "b2", "up": "b1", "mid": "bm"}
    elif a1.shape[1] == fan_in and a2.shape[0] == fan_in and b2.shape[0] == out and "bm" not in found:
        (down, a_down), (up, a_up), b_parts = ("a1", a1), ("a2", a2), {"down": "b1", "up": "b2"}
    else:
        shapes = ", ".join(f"{_key(found, p)!r} {tuple(found[p][1].shape)}" for p in ("a1", "a2", "b1", "b2"))
        raise LoraError(f"{origin}: GLoRA keys {shapes} do not fit the layer (out {out}, in {fan_in}): LyCORIS "
                        f"writes a1 ({fan_in}, rank), a2 (rank, {fan_in}), b1 ({out}, rank), b2 (rank, {fan_in}[, k, "
                        f"k]); its versions up to 2.2 a1 (rank, {fan_in}), a2 ({fan_in}, rank), b1 (rank, {fan_in}), "
                        f"b2 ({out}, rank). A file for another model?")
    _same_rank(found, up, down, a_up.shape[1], a_down.shape[0], origin)
    lora_parts = {part: found[key] for part, key in b_parts.items() if key in found}
    if "mid" in lora_parts:
        b_down, b_mid, b_up = _cp_shapes(module, lora_parts, origin)
    else:
        (b_down, b_up), b_mid = _lora_shapes(module, lora_parts, origin), None
    _same_rank(found, down, b_parts["down"], a_down.shape[0], b_down.shape[0], origin)
    rank = a_down.shape[0]
    scale = 1.0 if not alpha else alpha / rank  # LyCORIS: no alpha or alpha 0 is alpha = rank
    return GloraWeights(scale, None, a_down, a_up, b_down, b_up, b_mid)


#: adapter kind -> builder ``(layer, parts found, alpha or None, origin) -> LayerAdapter``
BUILDERS: dict[str, Callable[[nn.Module, Found, float | None, str], LayerAdapter]] = {
    "lora": build_lora,
    "loha": build_loha,
    "lokr": build_lokr,
    "full": build_full,
    "ia3": build_ia3,
    "norm": build_norm,
    "oft": build_oft,
    "glora": build_glora,
}
#: adapter kind -> its name in messages
KIND_NAMES: dict[str, str] = {"lora": "LoRA", "loha": "LoHa (LyCORIS)", "lokr": "LoKr (LyCORIS)",
                              "full": "full weight difference (LyCORIS)", "ia3": "(IA)³ (LyCORIS)",
                              "norm": "trained norm layer (LyCORIS)", "oft": "OFT / BOFT (LyCORIS)",
                              "glora": "GLoRA (LyCORIS)"}
#: adapter kind -> the layer types it applies to
LINEAR_OR_CONV = (nn.Linear, nn.Conv2d)
KIND_LAYERS: dict[str, tuple[type, ...]] = {"norm": (nn.GroupNorm, nn.LayerNorm)}
