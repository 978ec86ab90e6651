"""_core.engine.vjp: one reverse pass through the autograd engine, equal to torch.autograd.grad."""

import pytest
import torch

from implicitdiff._core import torch_private
from implicitdiff._core.engine import vjp

D = torch.float64


def _graph(seed=0):
    """``out = tanh(A x) · b + sin(x)ᵀ...``: a small graph in two leaves ``x, b`` and an intermediate ``h``."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(4, 3, generator=g, dtype=D)
    x = torch.randn(3, generator=g, dtype=D, requires_grad=True)
    b = torch.randn(4, generator=g, dtype=D, requires_grad=True)
    h = torch.tanh(A @ x)
    out = h * b + torch.sin(x).sum()
    v = torch.randn(4, generator=g, dtype=D)
    return out, x, b, h, A, v


def test_equals_autograd_grad():
    """The products in leaves and in an intermediate equal torch.autograd.grad's (and the closed form), and
    nothing is accumulated into .grad."""
    out, x, b, h, A, v = _graph()
    got = vjp(out, (x, b, h), v)
    ref = torch.autograd.grad(out, (x, b, h), v, retain_graph=True)
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r, rtol=0.0, atol=0.0)
    # closed form: ∂/∂x = Aᵀ ((1 − h²) · b · v) + cos(x) Σv, ∂/∂b = h · v, ∂/∂h = b · v
    hd = h.detach()
    torch.testing.assert_close(got[0], A.mT @ ((1 - hd ** 2) * b.detach() * v) + torch.cos(x.detach()) * v.sum(),
                               rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(got[1], hd * v, rtol=0.0, atol=0.0)
    torch.testing.assert_close(got[2], b.detach() * v, rtol=0.0, atol=0.0)
    assert x.grad is None and b.grad is None
    assert not any(a.requires_grad for a in got)


def test_unused_input_gives_none():
    """An input that requires grad but does not reach the output: None in its slot, the others as usual."""
    out, x, b, _, _, v = _graph()
    unused = torch.ones(2, dtype=D, requires_grad=True)
    gx, gu, gb = vjp(out, (x, unused, b), v)
    assert gu is None
    torch.testing.assert_close(gb, torch.autograd.grad(out, b, v, retain_graph=True)[0], rtol=0.0, atol=0.0)
    assert gx is not None


def test_retain_graph():
    """retain_graph=True (default) keeps the graph for further products (linear in the cotangent);
    retain_graph=False frees it: a second pass raises."""
    out, x, b, _, _, v = _graph(1)
    g1 = vjp(out, (x,), v)[0]
    g2 = vjp(out, (x,), 2 * v)[0]
    torch.testing.assert_close(g2, 2 * g1, rtol=1e-15, atol=0.0)
    g3 = vjp(out, (x,), v, retain_graph=False)[0]
    torch.testing.assert_close(g3, g1, rtol=0.0, atol=0.0)
    with pytest.raises(RuntimeError, match="second time|freed"):
        vjp(out, (x,), v)


def test_fallback_without_the_engine_entry_point(monkeypatch):
    """Where the engine's entry point is missing, the same results (and None for an unused input) through
    torch.autograd.grad."""
    out, x, b, h, _, v = _graph(2)
    direct = vjp(out, (x, b), v)
    monkeypatch.setattr(torch_private, "_run_backward", None)
    unused = torch.ones(2, dtype=D, requires_grad=True)
    fallback = vjp(out, (x, b, unused), v, retain_graph=False)
    assert fallback[2] is None
    for a, r in zip(fallback[:2], direct):
        torch.testing.assert_close(a, r, rtol=0.0, atol=0.0)
    with pytest.raises(RuntimeError):
        vjp(out, (x,), v)


def test_input_not_requiring_grad_raises():
    """An input outside autograd altogether is an error, as in torch.autograd.grad (not a silent None)."""
    out, _, _, _, A, v = _graph(3)
    with pytest.raises(RuntimeError, match="does not require grad"):
        vjp(out, (A,), v)
