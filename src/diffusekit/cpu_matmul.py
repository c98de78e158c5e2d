"""The exact CPU path's float32 matrix products on oneDNN instead of MKL, where MKL is slow.

torch's float32 ``mm`` / ``addmm`` / ``bmm`` on the CPU call MKL. MKL picks its code path by CPU vendor: on a
non-Intel CPU it does not run its AVX-512 kernels, and on this project's AMD EPYC machines (2 cores, AVX-512) it
reached 47-70 GMAC/s on the SD 1.5 UNet's products with their weights out of cache, against 81-100 GMAC/s for
oneDNN's matmul on the same calls (the FMA peak is 117 GMAC/s; docs/PERFORMANCE.md). oneDNN chooses its kernels by
the CPU's feature flags. inductor calls oneDNN's matmul only for frozen (constant) weights; the exact path's graphs
take the live weights as inputs.

So ``optimize()`` of a float model on such a CPU adds :func:`graph_pass` to inductor's settings
(``post_grad_custom_post_pass``). After inductor's own passes it rewrites every float32 CPU ``mm(a, b)``,
``addmm(bias, a, b)`` (a 1-D bias, no scaling) and ``bmm(a, b)`` into ``diffusekit::linear(a, bᵀ, bias)``, which
calls oneDNN's matmul (``cpu_linear.cpp``, in diffusekit's CPU kernel library). The products and sums are float32
in both libraries; only their order differs. Against float64, oneDNN's relative error on the UNet's shapes is
6e-7-1.4e-6 of the output's largest value, and MKL's is 3e-7-5e-7.

Eager calls never change: the rewrite exists only inside compiled graphs. ``optimize(options={
"post_grad_custom_post_pass": None})`` keeps MKL, as does ``torch.backends.mkldnn.enabled = False`` set before it.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import torch

from ._native import cpu_vendor

#: CPU vendors (``/proc/cpuinfo``'s ``vendor_id``) whose MKL runs its slower, non-AVX-512 code path. Measured on
#: AMD EPYC (Zen 4 and Zen 5). Intel CPUs get MKL's own AVX-512 kernels and keep them (not measured here).
SLOW_MKL_VENDORS = ("AuthenticAMD", "HygonGenuine")
_OP_SOURCE = Path(__file__).with_name("cpu_linear.cpp")


def unavailable_reason() -> str | None:
    """Why the products stay on MKL here (``None``: :func:`graph_pass` applies): MKL runs its own fast path on
    this CPU, or diffusekit's CPU kernel library, which holds the op, cannot run."""
    vendor = cpu_vendor()
    if vendor not in SLOW_MKL_VENDORS:
        return f"MKL runs its own kernels on this CPU ({vendor or 'unknown vendor'})"
    if not torch.backends.mkldnn.is_available():
        return "this torch is built without oneDNN"
    if not torch.backends.mkldnn.enabled:
        return "oneDNN is turned off (torch.backends.mkldnn.enabled)"
    from . import cpu_attention

    reason = cpu_attention.unavailable_reason()
    return None if reason is None else f"diffusekit's CPU kernel library is unavailable: {reason}"


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` on oneDNN: ``x (M, K)``, ``weight (N, K)``, ``bias (N)``; or batched, ``x (B, M, K)``
    with ``weight (B, N, K)`` and no bias. float32 CPU tensors; the library must be loaded (see
    :func:`unavailable_reason`)."""
    return torch.ops.diffusekit.linear(x, weight, bias)


def rewrite(graph: torch.fx.Graph) -> int:
    """Replace the float32 CPU matrix products of a post-grad ``graph`` with :func:`linear`; returns how many."""
    aten = torch.ops.aten
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (aten.mm.default, aten.addmm.default, aten.bmm.default):
            continue
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor) or value.dtype != torch.float32 or value.device.type != "cpu":
            continue
        operands = 3 if node.target is aten.addmm.default else 2
        if len(node.args) != operands or any(k not in ("beta", "alpha") for k in node.kwargs):
            continue  # operands passed by name: not the form inductor's graphs use, left alone
        if node.target is aten.addmm.default:
            bias, a, b = node.args
            if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
                continue
            bias_value = getattr(bias, "meta", {}).get("val")
            if not (isinstance(bias_value, torch.Tensor) and bias_value.dim() == 1
                    and bias_value.shape[0] == value.shape[-1]):
                continue  # a 2-D or broadcast addend is not a linear layer's bias
        else:
            (a, b), bias = node.args, None
        if not all(isinstance(getattr(arg, "meta", {}).get("val"), torch.Tensor) for arg in (a, b)):
            continue  # operands the graph does not describe: left to inductor
        with graph.inserting_before(node):
            weight = graph.call_function(aten.permute.default, (b, [1, 0] if value.dim() == 2 else [0, 2, 1]))
            product = graph.call_function(torch.ops.diffusekit.linear.default, (a, weight, bias))
        product.meta.update(node.meta)
        weight.meta["val"] = b.meta["val"].transpose(-1, -2)
        node.replace_all_uses_with(product)
        graph.erase_node(node)
        count += 1
    return count


@functools.cache
def graph_pass():
    """The inductor pass (one per process; its ``uuid`` hashes this file and the op's C++ source, for inductor's
    caches)."""
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class OneDNNProducts(CustomGraphPass):
        """diffusekit: float32 matrix products on oneDNN (``diffusekit.cpu_matmul.rewrite``)."""

        def __call__(self, graph: torch.fx.Graph) -> None:
            rewrite(graph)

        def uuid(self) -> str:  # the rewrite and the op it calls (its schema is in the C++ source)
            return hashlib.sha256(Path(__file__).read_bytes() + _OP_SOURCE.read_bytes()).hexdigest()

    return OneDNNProducts()
