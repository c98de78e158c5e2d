"""The exact CPU path's float32 matrix products on oneDNN (``diffusekit.cpu_matmul``, op ``diffusekit::linear``).

The op against float64; its refusals; the graph rewrite on a traced graph (which products it takes, which it leaves,
the same numbers after); and where ``optimize()`` adds it. That a compiled UNet really calls it is checked in
test_optimize.py (the package's list of extern calls).
"""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from diffusekit import cpu_attention, cpu_matmul
from diffusekit import optimize as opt

needs_library = pytest.mark.skipif(cpu_attention.unavailable_reason() is not None,
                                   reason=f"diffusekit's CPU kernel library: {cpu_attention.unavailable_reason()}")


def _rel(actual: torch.Tensor, exact: torch.Tensor) -> float:
    return ((actual.double() - exact).abs().max() / exact.abs().max()).item()


@needs_library
def test_linear_matches_float64_plain_batched_and_strided():
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(67, 300, generator=g), torch.randn(45, 300, generator=g), torch.randn(45, generator=g)
    exact = x.double() @ w.double().t() + b.double()
    assert _rel(cpu_matmul.linear(x, w, b), exact) < 2e-6
    assert _rel(cpu_matmul.linear(x, w), exact - b.double()) < 2e-6
    # strided operands (the transposes a graph hands over) give the same numbers
    strided = cpu_matmul.linear(x.t().contiguous().t(), w.t().contiguous().t(), b)
    torch.testing.assert_close(strided, cpu_matmul.linear(x, w, b), rtol=1e-6, atol=1e-5)
    xs, ws = torch.randn(3, 20, 64, generator=g), torch.randn(3, 33, 64, generator=g)
    batched = cpu_matmul.linear(xs, ws)
    assert batched.shape == (3, 20, 33) and _rel(batched, xs.double() @ ws.double().transpose(1, 2)) < 2e-6
    # empty matrices (oneDNN takes none): an empty result, or the bias alone when K is 0
    assert cpu_matmul.linear(x[:0], w, b).shape == (0, 45) and cpu_matmul.linear(xs[:, :0], ws).shape == (3, 0, 33)
    torch.testing.assert_close(cpu_matmul.linear(x[:, :0], w[:, :0], b), b.expand(67, 45))


@needs_library
def test_linear_refuses_what_it_cannot_compute():
    x, w = torch.randn(4, 8), torch.randn(5, 8)
    with pytest.raises(RuntimeError, match="float32 tensors expected"):
        cpu_matmul.linear(x.double(), w.double())
    with pytest.raises(RuntimeError, match=r"x \[M, K\] with w \[N, K\]"):
        cpu_matmul.linear(x, torch.randn(5, 7))
    with pytest.raises(RuntimeError, match=r"the bias must be float32 \[N\] with N = 5"):
        cpu_matmul.linear(x, w, torch.randn(1))
    with pytest.raises(RuntimeError, match="one w per x and no bias"):
        cpu_matmul.linear(x[None], w[None], torch.randn(5))
    with pytest.raises(RuntimeError, match="one w per x"):
        cpu_matmul.linear(x.expand(2, 4, 8), w.expand(3, 5, 8))


def _products(a, b, bias, batch, c, d):
    return (torch.mm(a, b), torch.addmm(bias, a, b), torch.addmm(bias, a, b, beta=2.0), torch.addmm(c, a, b),
            torch.addmm(bias[:1], a, b), torch.bmm(batch, batch.transpose(1, 2)), torch.mm(d, d.t()))


@needs_library
def test_rewrite_takes_float32_products_and_keeps_the_numbers():
    g = torch.Generator().manual_seed(1)
    args = (torch.randn(6, 10, generator=g), torch.randn(10, 7, generator=g), torch.randn(7, generator=g),
            torch.randn(2, 5, 10, generator=g), torch.randn(6, 7, generator=g), torch.randn(4, 3).double())
    traced = make_fx(_products)(*args)
    before = traced(*args)
    # a product whose operands are passed by name is not the form inductor's graphs use: left alone
    named = next(node for node in traced.graph.nodes if node.target is torch.ops.aten.mm.default)
    named.args, named.kwargs = (), {"self": named.args[0], "mat2": named.args[1]}
    assert cpu_matmul.rewrite(traced.graph) == 2 and named.target is torch.ops.aten.mm.default
    named.args, named.kwargs = (named.kwargs["self"], named.kwargs["mat2"]), {}
    assert cpu_matmul.rewrite(traced.graph) == 1
    # taken: mm, addmm with a 1-D bias, bmm; left alone: a scaled addmm, a 2-D addend, a broadcast (1,) bias, a
    # float64 product
    traced.recompile()
    targets = [node.target for node in traced.graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.diffusekit.linear.default) == 3
    assert targets.count(torch.ops.aten.addmm.default) == 3 and targets.count(torch.ops.aten.mm.default) == 1
    after = traced(*args)
    for new, old in zip(after, before):
        torch.testing.assert_close(new, old, rtol=1e-6, atol=1e-6)


def test_optimize_adds_the_pass_only_where_mkl_is_slow(monkeypatch, tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4)).eval()
    monkeypatch.setattr(cpu_matmul, "cpu_vendor", lambda: "GenuineIntel")
    assert "MKL runs its own kernels on this CPU (GenuineIntel)" in cpu_matmul.unavailable_reason()
    opt.optimize_module(model, cache_dir=tmp_path)
    assert "post_grad_custom_post_pass" not in (opt.compiled_call(model).options or {})
    monkeypatch.setattr(cpu_matmul, "cpu_vendor", lambda: "AuthenticAMD")
    if cpu_attention.unavailable_reason() is not None:
        assert "kernel library is unavailable" in cpu_matmul.unavailable_reason()
        return
    assert cpu_matmul.unavailable_reason() is None
    opt.optimize_module(model, cache_dir=tmp_path)
    assert opt.compiled_call(model).options["post_grad_custom_post_pass"] is cpu_matmul.graph_pass()
    assert cpu_matmul.graph_pass().uuid() == cpu_matmul.graph_pass().uuid()  # a stable key for inductor's caches
    opt.optimize_module(model, cache_dir=tmp_path, options={"post_grad_custom_post_pass": None})  # MKL, by choice
    assert "post_grad_custom_post_pass" not in (opt.compiled_call(model).options or {})


@needs_library
def test_the_pass_runs_inside_inductor_whatever_the_vendor(tmp_path, monkeypatch):
    # optimize() adds it on AMD CPUs only (test above); here inductor runs it on any CPU the library loads on
    from torch._inductor.utils import run_and_get_code

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    g = torch.Generator().manual_seed(2)
    args = (torch.randn(6, 10, generator=g), torch.randn(10, 7, generator=g), torch.randn(7, generator=g),
            torch.randn(2, 5, 10, generator=g), torch.randn(6, 7, generator=g), torch.randn(4, 3).double())
    expected = _products(*args)
    torch._dynamo.reset()
    with torch._inductor.config.patch(post_grad_custom_post_pass=cpu_matmul.graph_pass()):
        compiled = torch.compile(_products, dynamic=False)
        actual, (code, *_) = run_and_get_code(compiled, *args)
    torch._dynamo.reset()
    assert code.count("diffusekit.linear") >= 3, code
    for new, old in zip(actual, expected):
        torch.testing.assert_close(new, old, rtol=1e-6, atol=1e-6)
