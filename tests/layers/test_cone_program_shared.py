"""cone_program with an A shared by the batch (kept (m, n) through ConeFn, the refinement and the
backward): the same x, y, s and gradients as the same A batched, the shared gradient against finite
differences, and the vmap / jvp / double-backward paths (float64)."""

import pytest
import torch

import implicitdiff as idf

from ._cone_cases import CASES, case

RTOL = 1e-10
B = 3


def _solve(A, b, c, cones, **kw):
    kw.setdefault("rtol", RTOL)
    return idf.cone_program(A, b, c, cones, **kw)


def _batch(name, seed=0):
    A, b, c, cones = case(name, seed)
    g = torch.Generator().manual_seed(7)
    bb = b + 0.05 * torch.rand(B, b.shape[0], generator=g, dtype=b.dtype)
    cb = c + 0.1 * torch.randn(B, c.shape[0], generator=g, dtype=c.dtype)
    return A, bb, cb, cones


def _weights(shapes, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]


def _loss(out, w):
    return sum((wi * t).sum() for wi, t in zip(w, out))


@pytest.mark.parametrize("name", sorted(CASES))
def test_shared_equals_batched(name):
    A, bb, cb, cones = _batch(name)
    As = A.clone().requires_grad_()
    Ab = A.expand(B, *A.shape).clone().requires_grad_()   # a real per-element copy
    Ae = A.clone().requires_grad_()                        # a stride-0 expand of it, passed as (B, m, n)
    b1, b2, b3 = (bb.clone().requires_grad_() for _ in range(3))
    c1, c2, c3 = (cb.clone().requires_grad_() for _ in range(3))
    out_s = _solve(As, b1, c1, cones)
    out_b = _solve(Ab, b2, c2, cones)
    out_e = _solve(Ae.expand(B, *A.shape), b3, c3, cones)
    w = _weights([t.shape for t in out_s])
    tol = 1e-9 if name == "exp" else 1e-11  # the exp-cone projection's bisection amplifies rounding
    for ts, tb, te in zip(out_s, out_b, out_e):
        assert torch.allclose(ts, tb, atol=tol, rtol=0) and torch.allclose(te, tb, atol=tol, rtol=0)
    gs = torch.autograd.grad(_loss(out_s, w), (As, b1, c1))
    gb = torch.autograd.grad(_loss(out_b, w), (Ab, b2, c2))
    ge = torch.autograd.grad(_loss(out_e, w), (Ae, b3, c3))
    assert gs[0].shape == A.shape
    gtol = 1e-7 if name == "exp" else 1e-9
    assert torch.allclose(gs[0], gb[0].sum(0), atol=gtol, rtol=0)       # the sum over the batch
    assert torch.allclose(ge[0], gb[0].sum(0), atol=gtol, rtol=0)
    for x, y, z in zip(gs[1:], gb[1:], ge[1:]):
        assert torch.allclose(x, y, atol=gtol, rtol=0) and torch.allclose(z, y, atol=gtol, rtol=0)


@pytest.mark.parametrize("name", ["lp", "socp", "sdp"])
def test_shared_A_gradient_matches_finite_differences(name):
    A, bb, cb, cones = _batch(name)
    Ar = A.clone().requires_grad_()
    out = _solve(Ar, bb, cb, cones)
    w = _weights([t.shape for t in out])
    (gA,) = torch.autograd.grad(_loss(out, w), Ar)
    (dA,) = _weights([A.shape], seed=11)
    dA = dA * (A != 0)  # keep the structure
    h = 1e-5
    f = lambda t: float(_loss(_solve(A + t * dA, bb, cb, cones), w))  # noqa: E731
    fd = (f(h) - f(-h)) / (2 * h)
    an = float((gA * dA).sum())
    assert abs(an - fd) <= 1e-6 * max(1.0, abs(fd)), (an, fd)
    # forward mode with a shared tangent on A: <w, J dA> = <Jᵀw, dA>
    _, tang = torch.func.jvp(lambda A_: _solve(A_, bb, cb, cones), (A,), (dA,))
    assert abs(float(_loss(tang, w)) - an) <= 1e-8 * max(1.0, abs(an))


def test_vmap_over_shared_A_and_over_b():
    A, bb, cb, cones = _batch("socp")
    # vmap over b with A shared (A stays (m, n) inside)
    b2 = torch.stack([bb, bb + 0.01])
    xv = torch.func.vmap(lambda b_: _solve(A, b_, cb, cones)[0])(b2)
    for i in range(2):
        assert torch.allclose(xv[i], _solve(A, b2[i], cb, cones)[0], atol=1e-11)
    # vmap over A (a different shared A per vmapped index)
    As = torch.stack([A, 1.01 * A])
    xa = torch.func.vmap(lambda A_: _solve(A_, bb, cb, cones)[0])(As)
    for i in range(2):
        assert torch.allclose(xa[i], _solve(As[i], bb, cb, cones)[0], atol=1e-11)
    # jacrev / jacfwd with respect to the shared A agree with the reverse-mode Jacobian
    mask = A != 0
    f = lambda A_: _solve(A_, bb, cb, cones)[0]  # noqa: E731
    J = torch.autograd.functional.jacobian(f, A)
    assert torch.allclose(torch.func.jacrev(f)(A), J, atol=1e-10)
    assert torch.allclose(torch.func.jacfwd(f)(A) * mask, J * mask, atol=1e-8)


def test_double_backward_shared_A_matches_batched():
    A, bb, cb, cones = _batch("socp")
    w = None
    grads = []
    for shared in (True, False):
        Ar = A.clone().requires_grad_()
        Ain = Ar if shared else Ar.expand(B, *A.shape).clone()
        br = bb.clone().requires_grad_()
        out = _solve(Ain, br, cb, cones)
        w = w if w is not None else _weights([t.shape for t in out])
        (gb,) = torch.autograd.grad(_loss(out, w), br, create_graph=True)
        grads.append(torch.autograd.grad((gb * gb).sum(), Ar))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-8, rtol=0)


def test_double_backward_shared_A_matches_finite_differences():
    A, bb, cb, cones = _batch("lp")
    w = _weights([(B, A.shape[1]), (B, A.shape[0]), (B, A.shape[0])])

    def first(A_):  # φ(A) = ‖∂L/∂b‖² at A
        br = bb.clone().requires_grad_()
        (gb,) = torch.autograd.grad(_loss(_solve(A_, br, cb, cones), w), br, create_graph=True)
        return (gb * gb).sum()

    Ar = A.clone().requires_grad_()
    (gA,) = torch.autograd.grad(first(Ar), Ar)
    (dA,) = _weights([A.shape], seed=13)
    dA = dA * (A != 0)
    h = 1e-5
    fd = (float(first(A + h * dA).detach()) - float(first(A - h * dA).detach())) / (2 * h)
    an = float((gA * dA).sum())
    assert abs(an - fd) <= 1e-5 * max(1.0, abs(fd)), (an, fd)


def test_shared_second_order_gram_equals_the_direct_form():
    # the reduced Gram ÃᵀWÃ of cone_system: the shared-A second-order form vs the direct product,
    # at random points (second-order blocks inside, in the polar and in general position)
    from implicitdiff.implicit.cone_frame import dual_projection_frame, to_frame
    from implicitdiff.implicit.cone_system import TAU, _gram
    from implicitdiff.linalg.cone_spec import parse_cones
    spec = parse_cones({"z": 1, "l": 3, "q": [5, 5, 3, 2, 1], "s": [3]})
    g = torch.Generator().manual_seed(2)
    m, n, Bn = spec.m, 6, 5
    A = torch.randn(m, n, generator=g, dtype=torch.float64)
    y = torch.randn(Bn, m, generator=g, dtype=torch.float64)
    s = torch.randn(Bn, m, generator=g, dtype=torch.float64)
    y[0, 4:9] = torch.tensor([3.0, 0.1, 0.2, 0.3, 0.1], dtype=torch.float64)   # v inside K*
    s[0, 4:9] = 0
    y[1, 4:9] = 0
    s[1, 4:9] = torch.tensor([3.0, -0.1, 0.2, 0.3, 0.1], dtype=torch.float64)  # v in the polar
    frame = dual_projection_frame(spec, y, s)
    At = to_frame(frame, A.expand(Bn, m, n))
    lam = frame.lam
    W = torch.where(lam >= 1 - TAU, torch.zeros_like(lam), lam / (1 - lam).clamp(min=TAU))
    direct = At.mT @ (W[..., None] * At)
    shared = _gram(A, At, W, frame)
    assert torch.allclose(shared, direct, atol=1e-12 * float(direct.abs().max()), rtol=0)
    batched = _gram(A.expand(Bn, m, n), At, W, frame)  # batched A: the direct form (zero-weight rows skipped)
    assert torch.allclose(batched, direct, atol=1e-12 * float(direct.abs().max()), rtol=0)


def test_gram_skipping_zero_weight_rows_equals_the_full_product():
    # _weighted_gram gathers the rows with W > 0 (a different count per element, padded) when they are
    # at most half: the same Gram as the product over all rows, with and without a matrix to add to
    from implicitdiff.implicit.cone_system import _weighted_gram
    g = torch.Generator().manual_seed(5)
    Bn, r, n = 4, 40, 7
    At = torch.randn(Bn, r, n, generator=g, dtype=torch.float64)
    W = torch.rand(Bn, r, generator=g, dtype=torch.float64)
    W[W < 0.6] = 0                       # about 40 % of the rows weighted, a different set per element
    W[3] = 0                             # an element with no weighted row at all
    assert 2 * int((W > 0).sum(-1).max()) <= r
    full = At.mT @ (W[..., None] * At)
    G0 = torch.randn(Bn, n, n, generator=g, dtype=torch.float64)
    assert torch.allclose(_weighted_gram(At, W), full, atol=1e-13, rtol=0)
    assert torch.allclose(_weighted_gram(At, W, G0), G0 + full, atol=1e-13, rtol=0)
    assert torch.equal(_weighted_gram(At, W)[3], torch.zeros(n, n, dtype=torch.float64))
    Wd = W.clone()
    Wd[:, : r // 2 + 1] = 1.0            # more than half weighted: the direct product
    assert torch.allclose(_weighted_gram(At, Wd), At.mT @ (Wd[..., None] * At), atol=1e-13, rtol=0)


def test_a_third_derivative_is_refused_with_a_clear_error():
    # twice differentiable (double backward, tested above); building the third derivative raises
    A, bb, cb, cones = _batch("lp")
    w = _weights([(B, A.shape[1]), (B, A.shape[0]), (B, A.shape[0])])
    br = bb.clone().requires_grad_()
    (gb,) = torch.autograd.grad(_loss(_solve(A, br, cb, cones), w), br, create_graph=True)
    (hb,) = torch.autograd.grad((gb * gb).sum(), br, create_graph=True)
    with pytest.raises(NotImplementedError, match="differentiable twice"):
        torch.autograd.grad(hb.sum(), br)
