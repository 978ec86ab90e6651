"""cone_program: solutions against Clarabel, gradients against finite differences, batching,
certificates, input validation (float64 unless stated)."""

import pytest
import torch

import implicitdiff as idf
from implicitdiff import InputError, SolveError, Status

from ._cone_cases import CASES, case, clarabel_solve

pytest.importorskip("clarabel")

RTOL = 1e-10


def _solve(A, b, c, cones, **kw):
    kw.setdefault("rtol", RTOL)
    kw.setdefault("on_failure", "raise")
    return idf.cone_program(A, b, c, cones, **kw)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_clarabel(name, seed):
    A, b, c, cones = case(name, seed)
    x, y, s, info = _solve(A, b, c, cones, return_info=True)
    assert int(info.status) == Status.SUCCESS
    xc, yc, sc, st = clarabel_solve(A, b, c, cones, tol=1e-12)  # its x is only ~√tol accurate
    assert st in ("Solved", "AlmostSolved")
    for ours, ref in ((x, xc), (y, yc), (s, sc)):
        assert torch.allclose(ours, torch.as_tensor(ref), rtol=1e-6, atol=1e-6), (ours, ref)
    # optimality conditions of our own answer
    assert torch.allclose(A @ x + s, b, atol=1e-8)
    assert torch.allclose(A.T @ y + c, torch.zeros_like(c), atol=1e-8)
    assert abs(float(c @ x + b @ y)) < 1e-8


def _directional_fd(A, b, c, cones, w, d, h):
    def f(t):
        x, y, s = _solve(A + t * d[0], b + t * d[1], c + t * d[2], cones, rtol=1e-10)
        return (w[0] * x).sum() + (w[1] * y).sum() + (w[2] * s).sum()
    return (f(h) - f(-h)) / (2 * h)


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradients_match_finite_differences(name):
    A, b, c, cones = case(name, 0)
    g = torch.Generator().manual_seed(1)
    Ar, br, cr = (t.clone().requires_grad_() for t in (A, b, c))
    x, y, s = _solve(Ar, br, cr, cones)
    w = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in (x, y, s)]
    loss = sum((wi * t).sum() for wi, t in zip(w, (x, y, s)))
    gA, gb, gc = torch.autograd.grad(loss, (Ar, br, cr))
    d = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in (A, b, c)]
    d[0] = d[0] * (A != 0)  # keep the sparsity (and the problem's structure)
    fd = _directional_fd(A, b, c, cones, w, d, 1e-4)
    an = (gA * d[0]).sum() + (gb * d[1]).sum() + (gc * d[2]).sum()
    assert abs(float(an - fd)) <= 1e-6 * max(1.0, abs(float(fd))), (float(an), float(fd))
    # forward mode agrees with reverse mode: <w, J d> = <Jᵀw, d>
    _, tangents = torch.func.jvp(lambda A_, b_, c_: _solve(A_, b_, c_, cones), (A, b, c), tuple(d))
    jvp = sum((wi * t).sum() for wi, t in zip(w, tangents))
    assert abs(float(jvp - an)) <= 1e-8 * max(1.0, abs(float(an)))


def test_sdp_derivative_matches_closed_form():
    # min tr(CX) s.t. tr X = 1, X ⪰ −B (the PSD rows read svec X + b_s ⪰ 0), two inactive bounds:
    # X* = (1 + b₀ + tr B) vvᵀ − B with v the bottom eigenvector of C, so
    # dX = (db₀ + tr dB) vvᵀ − dB, linear in the data (the IPM's X is only ~√gap accurate for an
    # SDP, so finite differences of it would test the forward's bias, not the derivative)
    from implicitdiff.linalg.cone_spec import smat, svec
    A, b, c, cones = case("sdp", 0)
    g = torch.Generator().manual_seed(1)
    db = torch.randn(b.shape, generator=g, dtype=b.dtype)
    db[1:3] = 0
    f = lambda b_: _solve(A, b_, c, cones)[0]
    _, dx = torch.func.jvp(f, (b,), (db,))
    v = torch.linalg.eigh(smat(c, 3))[1][:, 0]
    dB = smat(db[3:], 3)
    expected = svec((db[0] + torch.trace(dB)) * torch.outer(v, v) - dB)
    assert torch.allclose(dx, expected, atol=1e-6)
    w = torch.randn(dx.shape, generator=g, dtype=dx.dtype)
    br = b.clone().requires_grad_()
    (gb,) = torch.autograd.grad((w * f(br)).sum(), br)
    assert abs(float((gb * db).sum() - (w * expected).sum())) < 1e-6


def test_batch_equals_elements_and_shared_gradient_sums():
    A, b, c, cones = case("socp", 0)
    B = 3
    g = torch.Generator().manual_seed(0)
    bb = b + 0.1 * torch.randn(B, b.shape[0], generator=g, dtype=b.dtype).abs()
    cb = c + 0.1 * torch.randn(B, c.shape[0], generator=g, dtype=c.dtype)
    Ar = A.clone().requires_grad_()
    x, y, s = _solve(Ar, bb, cb, cones)
    x.sum().backward()
    total = torch.zeros_like(A)
    for i in range(B):
        Ai = A.clone().requires_grad_()
        xi, yi, si = _solve(Ai, bb[i], cb[i], cones)
        assert torch.allclose(xi, x[i], atol=1e-9) and torch.allclose(yi, y[i], atol=1e-9)
        xi.sum().backward()
        total += Ai.grad
    assert torch.allclose(Ar.grad, total, atol=1e-8)


def _infeasible_and_unbounded():
    # x ≥ 1 and x ≤ 0 (infeasible); min −x s.t. x ≥ 0 (unbounded); min x s.t. x ≥ 1 (fine)
    A = torch.tensor([[[-1.0], [1.0]], [[-1.0], [0.0]], [[-1.0], [0.0]]], dtype=torch.float64)
    b = torch.tensor([[-1.0, 0.0], [0.0, 1.0], [-1.0, 1.0]], dtype=torch.float64)
    c = torch.tensor([[1.0], [-1.0], [1.0]], dtype=torch.float64)
    return A, b, c, {"l": 2}


def test_infeasible_and_unbounded_are_named_and_do_not_poison():
    A, b, c, cones = _infeasible_and_unbounded()
    cr = c.clone().requires_grad_()
    shared = torch.ones((), dtype=torch.float64, requires_grad=True)
    x, y, s, info = idf.cone_program(A, b * shared, cr, cones, on_failure="nan", return_info=True)
    assert info.status.tolist() == [Status.INFEASIBLE, Status.UNBOUNDED, Status.SUCCESS]
    assert torch.isnan(x[:2]).all() and torch.allclose(x[2], torch.ones(1, dtype=torch.float64))
    x[2].sum().backward()
    assert torch.isfinite(shared.grad) and torch.isfinite(cr.grad).all()
    with pytest.raises(SolveError, match="INFEASIBLE"):
        idf.cone_program(A[0], b[0], c[0], cones)
    with pytest.raises(SolveError, match="UNBOUNDED"):
        idf.cone_program(A[1], b[1], c[1], cones)


def test_float32():
    A, b, c, cones = case("lp", 0)
    x64, _, _ = _solve(A, b, c, cones)
    x32, y32, s32 = idf.cone_program(A.float(), b.float(), c.float(), cones)
    assert x32.dtype == torch.float32
    assert torch.allclose(x32.double(), x64, atol=1e-4)


@pytest.mark.parametrize("kw, match", [
    (dict(cones={"l": 3}), "rows but cones"),
    (dict(cones={"x": 3}), "unsupported key"),
    (dict(cones={"q": [0]}), r"cones\['q'\]"),
    (dict(cones=[3]), "must be a dict"),
    (dict(rtol=-1.0), "rtol"),
    (dict(rtol=float("nan")), "rtol"),
    (dict(max_iter=0), "max_iter"),
    (dict(on_failure="ignore"), "on_failure"),
    (dict(b=torch.zeros(5, dtype=torch.float64)), "b has shape"),
    (dict(c=torch.zeros(7, dtype=torch.float64)), "c has shape"),
    (dict(A=torch.zeros(2, 2, dtype=torch.int64)), "dtype"),
    (dict(A=torch.full((19, 5), float("nan"), dtype=torch.float64)), "NaN"),
])
def test_bad_inputs_raise(kw, match):
    A, b, c, cones = case("lp", 0)
    args = dict(A=A, b=b, c=c, cones=cones)
    args.update(kw)
    with pytest.raises(InputError, match=match):
        idf.cone_program(args.pop("A"), args.pop("b"), args.pop("c"), args.pop("cones"), **args)


def test_sparse_A_equals_dense():
    A, b, c, cones = case("socp", 0)
    x, y, s = _solve(A, b, c, cones)
    As = A.to_sparse().requires_grad_()
    xs, ys, ss = _solve(As, b, c, cones)
    assert torch.allclose(xs, x, atol=1e-10) and torch.allclose(ys, y, atol=1e-10)
    xs.sum().backward()
    assert As.grad is not None and torch.isfinite(As.grad.to_dense()).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", sorted(CASES))
def test_cuda_matches_cpu(name):
    A, b, c, cones = case(name, 0)
    x, y, s = _solve(A, b, c, cones)
    Ag = A.cuda().requires_grad_()
    xg, yg, sg = _solve(Ag, b.cuda(), c.cuda(), cones)
    assert torch.allclose(xg.cpu(), x, atol=1e-7) and torch.allclose(yg.cpu(), y, atol=1e-7)
    (xg.sum() + yg.sum()).backward()
    Ac = A.clone().requires_grad_()
    xc, yc, _ = _solve(Ac, b, c, cones)
    (xc.sum() + yc.sum()).backward()
    assert torch.allclose(Ag.grad.cpu(), Ac.grad, atol=1e-6)


def test_vmap_over_b_equals_the_batch():
    A, b, c, cones = case("lp", 0)
    g = torch.Generator().manual_seed(5)
    bb = b + 0.1 * torch.rand(3, b.shape[0], generator=g, dtype=b.dtype)
    x_batch, _, _ = _solve(A, bb, c, cones)
    x_vmap = torch.func.vmap(lambda b_: _solve(A, b_, c, cones)[0])(bb)
    assert torch.allclose(x_vmap, x_batch, atol=1e-10)


def test_jacrev_and_jacfwd_match_the_reverse_jacobian():
    A, b, c, cones = case("socp", 0)
    f = lambda b_: _solve(A, b_, c, cones)[0]  # noqa: E731
    J = torch.autograd.functional.jacobian(f, b)
    assert torch.allclose(torch.func.jacrev(f)(b), J, atol=1e-10)
    assert torch.allclose(torch.func.jacfwd(f)(b), J, atol=1e-10)
