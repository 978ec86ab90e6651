"""Adversarial inputs to ``qp`` and ``nn.QPLayer``: every case states its acceptable outcome.

Either a correct result, checked against an independent reference (cvxpy + Clarabel at tight
tolerances, or a closed form), or a named error (``InputError`` naming the argument,
``SolveError`` naming the status).  Nothing may come back as a wrong answer with SUCCESS.
"""

import math

import numpy as np
import pytest
import torch

import implicitdiff as idf
from implicitdiff import InputError, SolveError
from implicitdiff._core.status import Status
from implicitdiff.nn import QPLayer

F64 = torch.float64


def _problem(seed=0, n=5, m=8, k=2, B=None):
    g = torch.Generator().manual_seed(seed)
    lead = () if B is None else (B,)
    L = torch.randn(*lead, n, n, generator=g, dtype=F64)
    Q = L @ L.mT + 0.1 * torch.eye(n, dtype=F64)
    p = torch.randn(*lead, n, generator=g, dtype=F64)
    G = torch.randn(*lead, m, n, generator=g, dtype=F64)
    z0 = torch.randn(*lead, n, generator=g, dtype=F64)
    h = (G @ z0.unsqueeze(-1)).squeeze(-1) + torch.rand(*lead, m, generator=g, dtype=F64)
    A = torch.randn(*lead, k, n, generator=g, dtype=F64)
    b = (A @ z0.unsqueeze(-1)).squeeze(-1)
    return Q, p, G, h, A, b


def _reference(Q, p, G=None, h=None, A=None, b=None):
    """cvxpy + Clarabel at tolerance 1e-12 (an independent interior point), one problem."""
    cp = pytest.importorskip("cvxpy")
    Qn = 0.5 * (Q + Q.T).numpy()
    z = cp.Variable(p.shape[-1])
    cons = []
    if G is not None and G.shape[0]:
        cons.append(G.numpy() @ z <= h.numpy())
    if A is not None and A.shape[0]:
        cons.append(A.numpy() @ z == b.numpy())
    prob = cp.Problem(cp.Minimize(0.5 * cp.quad_form(z, cp.psd_wrap(Qn)) + p.numpy() @ z), cons)
    prob.solve(solver="CLARABEL", tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
    assert prob.status == "optimal"
    return torch.from_numpy(np.asarray(z.value))


# ----------------------------------------------------------------------------- non-convex Q

def test_saddle_is_not_reported_as_solved():
    """The issue's example: Q = diag(1, −1) in a box has a saddle at 0 → NONCONVEX, never SUCCESS."""
    Q = torch.diag(torch.tensor([1.0, -1.0], dtype=F64))
    G = torch.cat([torch.eye(2, dtype=F64), -torch.eye(2, dtype=F64)])
    with pytest.raises(SolveError, match="NONCONVEX") as e:
        idf.qp(Q, torch.zeros(2, dtype=F64), G, torch.ones(4, dtype=F64))
    assert e.value.status == Status.NONCONVEX
    z, info = idf.qp(Q, torch.zeros(2, dtype=F64), G, torch.ones(4, dtype=F64), on_failure="nan", return_info=True)
    assert int(info.status) == Status.NONCONVEX and int(info.iterations) == 0 and bool(z.isnan().all())


@pytest.mark.parametrize("eig", [-1e-3, -1e-6])
def test_slightly_indefinite_q_is_named(eig):
    """λ_min = −1e-6·max|Q| is beyond the stated tolerance (1e-8 relative): NONCONVEX."""
    Q = torch.diag(torch.tensor([1.0, 2.0, eig], dtype=F64))
    G = torch.cat([torch.eye(3, dtype=F64), -torch.eye(3, dtype=F64)])
    _, info = idf.qp(Q, torch.ones(3, dtype=F64), G, torch.ones(6, dtype=F64), on_failure="nan", return_info=True)
    assert int(info.status) == Status.NONCONVEX


def test_semidefinite_within_tolerance_is_solved():
    """λ_min = −1e-12·max|Q| (rounding of a singular Q) is accepted and solved correctly."""
    Q = torch.diag(torch.tensor([1.0, -1e-12], dtype=F64))
    G = torch.cat([torch.eye(2, dtype=F64), -torch.eye(2, dtype=F64)])
    p = torch.tensor([0.5, 1.0], dtype=F64)
    z = idf.qp(Q, p, G, torch.ones(4, dtype=F64))
    torch.testing.assert_close(z, torch.tensor([-0.5, -1.0], dtype=F64), atol=1e-9, rtol=0)


def test_indefinite_but_convex_on_equalities_is_solved_with_exact_gradients():
    """Q = diag(1, −1) is convex on {0.3 z₁ + z₂ = 0.5}: solved (closed form), gradients pass gradcheck."""
    Q = torch.diag(torch.tensor([1.0, -1.0], dtype=F64)).requires_grad_()
    p = torch.tensor([1.0, 0.2], dtype=F64, requires_grad=True)
    A = torch.tensor([[0.3, 1.0]], dtype=F64, requires_grad=True)
    b = torch.tensor([0.5], dtype=F64, requires_grad=True)
    z = idf.qp(Q, p, None, None, A, b)
    z1 = -(0.3 * 0.5 + 1.0 - 0.2 * 0.3) / (1 - 0.09)  # stationarity on the line z₂ = 0.5 − 0.3 z₁
    torch.testing.assert_close(z.detach(), torch.tensor([z1, 0.5 - 0.3 * z1], dtype=F64), atol=1e-10, rtol=0)
    assert torch.autograd.gradcheck(lambda *a: idf.qp(*a), (Q, p, torch.eye(2, dtype=F64), 3 * torch.ones(2, dtype=F64),
                                                            A, b))


def test_indefinite_on_the_null_space_is_named():
    """Q = diag(−1, 1) with the equality z₂ = 0 is concave on the feasible line: NONCONVEX."""
    Q = torch.diag(torch.tensor([-1.0, 1.0], dtype=F64))
    G = torch.cat([torch.eye(2, dtype=F64), -torch.eye(2, dtype=F64)])
    _, info = idf.qp(Q, torch.zeros(2, dtype=F64), G, torch.ones(4, dtype=F64), torch.tensor([[0.0, 1.0]], dtype=F64),
                     torch.zeros(1, dtype=F64), on_failure="nan", return_info=True)
    assert int(info.status) == Status.NONCONVEX


def test_one_nonconvex_element_leaves_the_batch_and_shared_gradients_intact():
    """Element 1 is non-convex: it is NaN/NONCONVEX; the others match cvxpy and the shared h's gradient is
    the gradient of the good elements alone."""
    Q, p, G, h, A, b = _problem(1, B=3, k=0)
    Q = Q.clone()
    Q[1] = -Q[1]
    h = h[0].clone().requires_grad_()  # shared by the batch
    z, info = idf.qp(Q, p, G, h, on_failure="nan", return_info=True)
    assert info.status.tolist() == [Status.SUCCESS, Status.NONCONVEX, Status.SUCCESS]
    for i in (0, 2):
        torch.testing.assert_close(z[i].detach(), _reference(Q[i], p[i], G[i], h.detach()), atol=1e-7, rtol=0)
    (gh,) = torch.autograd.grad(z[[0, 2]].sum(), h)
    h2 = h.detach().clone().requires_grad_()
    (want,) = torch.autograd.grad(idf.qp(Q[[0, 2]], p[[0, 2]], G[[0, 2]], h2).sum(), h2)
    assert torch.isfinite(gh).all()
    torch.testing.assert_close(gh, want, atol=1e-10, rtol=0)


# ----------------------------------------------------------------------------- scale

@pytest.mark.parametrize("scale", [1e-150, 1e-10, 1e10, 1e150])
def test_scaled_problem_has_the_same_solution(scale):
    """Every entry × c leaves z unchanged (and λ, ν unchanged too): solved to full accuracy, not
    declared converged on an absolute residual."""
    Q, p, G, h, A, b = _problem(2)
    z, lam, nu = idf.qp(Q, p, G, h, A, b, return_duals=True)
    zs, ls, ns, info = idf.qp(*(t * scale for t in (Q, p, G, h, A, b)), return_duals=True, return_info=True)
    assert int(info.status) == Status.SUCCESS
    torch.testing.assert_close(zs, z, atol=1e-8, rtol=0)
    torch.testing.assert_close(ls, lam, atol=1e-7, rtol=1e-7)
    torch.testing.assert_close(ns, nu, atol=1e-7, rtol=1e-7)
    torch.testing.assert_close(z, _reference(Q, p, G, h, A, b), atol=1e-7, rtol=0)


def test_badly_scaled_rows_and_objective_match_the_reference():
    """Rows of G scaled by 1e±8, the objective by 1e-9: same solution as the reference of the unscaled problem."""
    Q, p, G, h, A, b = _problem(3)
    r = torch.logspace(-8, 8, G.shape[0], dtype=F64)
    z = idf.qp(Q * 1e-9, p * 1e-9, G * r[:, None], h * r, A * 1e6, b * 1e6)
    torch.testing.assert_close(z, _reference(Q, p, G, h, A, b), atol=1e-7, rtol=0)


def test_scaled_gradients_match_finite_differences():
    """The equilibration is part of the differentiated function: gradcheck (central differences, float64)
    of z and of the multipliers at a scale far from one."""
    Q, p, G, h, A, b = _problem(4, n=4, m=6, k=1)
    ins = tuple((t * 1e-3).requires_grad_() for t in (Q, p, G, h, A, b))

    def f(*a):
        z, lam, nu = idf.qp(*a, return_duals=True)
        return z, lam, nu
    assert torch.autograd.gradcheck(f, ins, atol=1e-6)


# ----------------------------------------------------------------------------- options

@pytest.mark.parametrize("kw, name", [
    (dict(rtol=-1), "rtol"), (dict(rtol=0.0), "rtol"), (dict(rtol=float("nan")), "rtol"), (dict(rtol="1e-8"), "rtol"),
    (dict(rtol=2.0), "rtol"), (dict(max_iter=0), "max_iter"), (dict(max_iter=-1), "max_iter"),
    (dict(max_iter=1.5), "max_iter"), (dict(max_iter=True), "max_iter"), (dict(on_failure="ignore"), "on_failure"),
    (dict(return_info="yes"), "return_info"), (dict(return_duals=1), "return_duals"),
    (dict(check_finite=1), "check_finite"), (dict(warm_start="z"), "warm_start"),
    (dict(warm_start=torch.ones(3, dtype=F64)), "warm_start"),
    (dict(warm_start=torch.full((5,), float("nan"), dtype=F64)), "warm_start"),
])
def test_bad_options_are_input_errors_not_failed_solves(kw, name):
    Q, p, G, h, A, b = _problem(5)
    with pytest.raises(InputError, match=name):
        idf.qp(Q, p, G, h, A, b, **kw)


@pytest.mark.parametrize("kw, name", [
    (dict(rtol=-1.0), "rtol"), (dict(max_iter=0), "max_iter"), (dict(on_failure="x"), "on_failure"),
    (dict(q_ridge=float("nan")), "q_ridge"), (dict(learn="Ab"), "learn"), (dict(n_ineq=-1), "n_ineq"),
    (dict(learn=("Z",)), "learn"),
])
def test_qplayer_validates_its_options_at_construction(kw, name):
    with pytest.raises(InputError, match=name):
        QPLayer(3, **{"n_ineq": 2, "n_eq": 1, **kw})


def test_qplayer_learned_q_must_be_positive_definite():
    with pytest.raises(InputError, match="positive definite"):
        QPLayer(2, learn=("Q",), Q=torch.diag(torch.tensor([1.0, -1.0], dtype=F64)))


# ----------------------------------------------------------------------------- dtypes, shapes, devices

@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex128, torch.float16,
                                   torch.bfloat16])
@pytest.mark.parametrize("which", range(6))
def test_non_float_dtypes_are_named(dtype, which):
    names = ("Q", "p", "G", "h", "A", "b")
    args = list(_problem(6))
    args[which] = args[which].to(dtype)
    with pytest.raises(InputError, match=rf"\b{names[which]}\b"):
        idf.qp(*args)


def test_mixed_float_dtypes_are_named():
    Q, p, G, h, A, b = _problem(6)
    with pytest.raises(InputError, match=r"\bh\b"):
        idf.qp(Q, p, G, h.float(), A, b)


@pytest.mark.parametrize("which, bad, name", [
    (0, torch.eye(4, dtype=F64), "Q"), (0, torch.ones(5, dtype=F64), "Q"), (2, torch.ones(8, 4, dtype=F64), "G"),
    (3, torch.ones(7, dtype=F64), "h"), (4, torch.ones(2, 6, dtype=F64), "A"), (5, torch.ones(3, dtype=F64), "b"),
    (1, torch.tensor(1.0, dtype=F64), "p"), (3, torch.ones(3, 8, dtype=F64), "batch"),
])
def test_wrong_shapes_are_named(which, bad, name):
    args = list(_problem(7))
    if name == "batch":
        args[1] = args[1].expand(2, -1)
    args[which] = bad
    with pytest.raises(InputError, match=name):
        idf.qp(*args)


def test_missing_partner_and_meta_are_named():
    Q, p, G, h, A, b = _problem(7)
    with pytest.raises(InputError, match="G and h"):
        idf.qp(Q, p, G, None)
    with pytest.raises(InputError, match="A and b"):
        idf.qp(Q, p, None, None, None, b)
    with pytest.raises(InputError, match="meta"):
        idf.qp(Q.to("meta"), p.to("meta"))


def test_empty_batch_gives_empty_results_and_zero_gradients():
    Q, p, G, h, A, b = _problem(8)
    Q = Q.clone().requires_grad_()
    z, lam, nu, info = idf.qp(Q, p.expand(0, -1), G, h, A, b, return_duals=True, return_info=True)
    assert z.shape == (0, 5) and lam.shape == (0, 8) and nu.shape == (0, 2) and info.status.shape == (0,)
    z.sum().backward()
    assert torch.equal(Q.grad, torch.zeros_like(Q))


def test_non_contiguous_and_stride_zero_inputs_give_the_same_result():
    Q, p, G, h, A, b = _problem(9, B=3)
    want = idf.qp(Q, p, G, h, A, b)
    Qt = Q.mT.contiguous().mT  # same values (Q symmetric), transposed strides
    Gn = torch.cat([G, G], dim=-1)[..., ::2] * 0 + G  # a non-contiguous view holding G
    Gs = G[..., ::1]
    got = idf.qp(Qt, p, Gn, h, A.mT.contiguous().mT, b)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    # stride 0: one problem broadcast to a batch of 3
    one = idf.qp(Q[0], p[0], Gs[0], h[0], A[0], b[0])
    got = idf.qp(Q[0].expand(3, -1, -1), p[0].expand(3, -1), G[0].expand(3, -1, -1), h[0].expand(3, -1),
                 A[0].expand(3, -1, -1), b[0].expand(3, -1))
    torch.testing.assert_close(got, one.expand(3, -1), atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------- NaN / Inf

@pytest.mark.parametrize("which", range(6))
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_data_is_an_input_error_by_default(which, value):
    names = ("Q", "p", "G", "h", "A", "b")
    args = [t.clone() for t in _problem(10)]
    args[which].view(-1)[0] = value
    with pytest.raises(InputError, match=rf"\b{names[which]}\b"):
        idf.qp(*args)


def test_one_nan_element_is_isolated_under_on_failure_nan():
    """Element 0 has a NaN in p: it becomes NaN (NONFINITE); the others are solved, and the gradient of the
    shared G (and Q) stays finite and equals that of the good elements alone."""
    Q, p, G, h, A, b = _problem(11, B=3)
    Qs, Gs = Q[0].clone().requires_grad_(), G[0].clone().requires_grad_()
    h, b = torch.rand_like(h) + 0.1, torch.zeros_like(b)  # z = 0 is feasible for the shared G
    p = p.clone()
    p[0, 1] = float("nan")
    z, info = idf.qp(Qs, p, Gs, h, A, b, on_failure="nan", return_info=True)
    assert info.status.tolist() == [Status.NONFINITE, Status.SUCCESS, Status.SUCCESS]
    assert bool(z[0].isnan().all()) and bool(torch.isfinite(z[1:]).all())
    gQ, gG = torch.autograd.grad(z[1:].sum(), (Qs, Gs))
    Q2, G2 = Qs.detach().clone().requires_grad_(), Gs.detach().clone().requires_grad_()
    wQ, wG = torch.autograd.grad(idf.qp(Q2, p[1:], G2, h[1:], A[1:], b[1:]).sum(), (Q2, G2))
    torch.testing.assert_close(gQ, wQ, atol=1e-10, rtol=0)
    torch.testing.assert_close(gG, wG, atol=1e-10, rtol=0)


def test_one_infeasible_element_does_not_poison_shared_gradients():
    Q, p, G, h, A, b = _problem(12, B=3, k=0)
    h = h.clone()
    h[2] = -10.0 - h[2].abs()  # with G rows ±: infeasible together with the next rows
    G = G.clone()
    G[2, 1] = -G[2, 0]
    Qs = Q[0].clone().requires_grad_()
    z, info = idf.qp(Qs, p, G, h, on_failure="nan", return_info=True)
    assert int(info.status[2]) == Status.INFEASIBLE and info.status[:2].tolist() == [0, 0]
    (g,) = torch.autograd.grad(z[:2].sum(), Qs)
    assert torch.isfinite(g).all()


# ----------------------------------------------------------------------------- infeasible, unbounded

def test_infeasible_and_unbounded_are_named():
    I2 = torch.eye(2, dtype=F64)
    G = torch.cat([I2, -I2])
    with pytest.raises(SolveError, match="INFEASIBLE"):
        idf.qp(I2, torch.ones(2, dtype=F64), G, torch.tensor([-1.0, 0, 0, 0], dtype=F64))
    with pytest.raises(SolveError, match="UNBOUNDED"):
        idf.qp(None, torch.ones(2, dtype=F64), -I2[:1], torch.zeros(1, dtype=F64))
    with pytest.raises(SolveError, match="INFEASIBLE"):  # equality-only and inconsistent
        idf.qp(I2, torch.ones(2, dtype=F64), None, None, torch.ones(2, 2, dtype=F64), torch.tensor([0.0, 1.0],
                                                                                                   dtype=F64))


# ----------------------------------------------------------------------------- qpth's generator

def _qpth_instances(seed, B, n=100, m=100, k=20):
    """qpth's own test generator: L uniform in [0, 1), Q = LLᵀ + 1e-3 I, feasible by construction."""
    rng = np.random.RandomState(seed)
    L = rng.rand(B, n, n)
    Q = L @ L.transpose(0, 2, 1) + 1e-3 * np.eye(n)
    G, A = rng.randn(B, m, n), rng.randn(B, k, n)
    z0, s0, p = rng.randn(B, n), rng.rand(B, m), rng.randn(B, n)
    h = (G @ z0[..., None])[..., 0] + s0
    b = (A @ z0[..., None])[..., 0]
    return tuple(torch.from_numpy(x) for x in (Q, p, G, h, A, b))


def test_qpth_generator_every_element_is_solved():
    """Seed 1 of qpth's generator (batch 128) had element 28 stopped as MAX_ITERATIONS "after 5 iterations"
    (a stagnation rule firing far from the tolerance).  On 16 elements around it: all solved, the one
    checked against cvxpy agrees, and each element reports the iterations it takes when solved alone."""
    Q, p, G, h, A, b = (t[20:36] for t in _qpth_instances(1, 128))
    z, info = idf.qp(Q, p, G, h, A, b, on_failure="nan", return_info=True)
    assert info.status.tolist() == [Status.SUCCESS] * 16
    assert int(info.iterations.max()) < 50
    i = 8  # element 28 of the original batch
    torch.testing.assert_close(z[i], _reference(Q[i], p[i], G[i], h[i], A[i], b[i]), atol=1e-6, rtol=0)
    _, alone = idf.qp(Q[i], p[i], G[i], h[i], A[i], b[i], return_info=True)
    assert int(alone.iterations) == int(info.iterations[i]) and int(alone.iterations) > 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float32_scaled_problem(dtype):
    Q, p, G, h, A, b = _problem(13)
    want = _reference(Q, p, G, h, A, b)
    for scale in (1e-20, 1e20):
        z = idf.qp(*((t * scale).to(dtype) for t in (Q, p, G, h, A, b)))
        tol = 1e-8 if dtype == F64 else 1e-3
        assert float((z.double() - want).abs().max()) < tol * max(1.0, float(want.abs().max()))
        assert not math.isnan(float(z.sum()))
