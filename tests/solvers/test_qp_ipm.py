"""The batched interior-point QP solver on its own: statuses, both KKT condensations, the
active-set finish and the factorization it hands to the backward (float64)."""

import numpy as np
import pytest
import torch

from implicitdiff._core.status import Status
from implicitdiff.solvers.qp_ipm import QPInteriorPoint
from implicitdiff.linalg.kkt import kkt_apply, KKTProducts as _Products

F64 = torch.float64


def random_qp(g, B, n, m, k, *, cond_spread=False):
    def r(*s):
        return torch.randn(*s, generator=g, dtype=F64)
    L = r(B, n, n)
    ridge = torch.logspace(-3, 0, B, dtype=F64) if cond_spread else torch.full((B,), 0.3, dtype=F64)
    Q = L @ L.mT / n + ridge[:, None, None] * torch.eye(n, dtype=F64)
    G, z0 = r(B, m, n), r(B, n)
    h = (G @ z0[..., None])[..., 0] + torch.rand(B, m, generator=g, dtype=F64) * (torch.rand(B, m, generator=g) > 0.5)
    A = r(B, k, n)
    b = (A @ z0[..., None])[..., 0]
    return Q, r(B, n), G, h, A, b


def kkt_residuals(Q, p, G, h, A, b, z, lam, nu):
    """Absolute stationarity, feasibility and complementarity of one batch."""
    stat = (Q @ z[..., None])[..., 0] + p + (G.mT @ lam[..., None])[..., 0] + (A.mT @ nu[..., None])[..., 0]
    slack = h - (G @ z[..., None])[..., 0]
    return stat.abs().amax(-1), (-slack).clamp(min=0).amax(-1), (A @ z[..., None])[..., 0].sub(b).abs().amax(-1), \
        (slack * lam).abs().amax(-1), lam.amin(-1)


@pytest.mark.parametrize("kkt", ["primal", "dual"])
def test_both_condensations_solve_to_the_kkt_conditions(g, kkt):
    P = random_qp(g, 6, 8, 10, 2)
    res = QPInteriorPoint.for_dtype(F64, kkt=kkt).solve(*P)
    assert (res.status == Status.SUCCESS).all() and (res.residual <= 1e-10).all()
    stat, infeas, eq, comp, lam_min = kkt_residuals(*P, res.z, res.lam, res.nu)
    assert stat.max() < 1e-10 and infeas.max() < 1e-10 and eq.max() < 1e-10 and comp.max() < 1e-10
    assert lam_min.min() >= 0
    other = QPInteriorPoint.for_dtype(F64, kkt="dual" if kkt == "primal" else "primal").solve(*P)
    torch.testing.assert_close(res.z, other.z, atol=1e-10, rtol=0)


def test_active_set_finish_gives_exact_complementarity(g):
    """The polished multipliers are exactly zero off the active set and the active rows hold with equality."""
    P = random_qp(g, 4, 6, 8, 1)
    res = QPInteriorPoint.for_dtype(F64).solve(*P)
    act = res.kkt.active.bool()
    assert (res.lam[~act] == 0).all()
    slack = P[3] - (P[2] @ res.z[..., None])[..., 0]
    assert slack[act].abs().max() < 1e-12 and (slack[~act] > 0).all()


@pytest.mark.parametrize("kkt", ["dual", "primal"])
def test_batch_compaction_does_not_change_any_element(g, kkt):
    """Elements leave the working batch as they converge; each result equals its own solve."""
    P = random_qp(g, 20, 6, 8, 2, cond_spread=True)
    solver = QPInteriorPoint.for_dtype(F64, kkt=kkt)
    res = solver.solve(*P)
    assert res.kkt.factor.kind == kkt and bool((res.status == Status.SUCCESS).all())
    assert len(set(res.iterations.tolist())) > 1  # elements converged at different iterations
    for i in (0, 7, 19):
        one = solver.solve(*(t[i:i + 1] for t in P))
        torch.testing.assert_close(res.z[i], one.z[0], atol=1e-11, rtol=0)
        assert res.iterations[i] == one.iterations[0]


def test_shared_parameters_broadcast(g):
    Q, p, G, h, A, b = random_qp(g, 3, 5, 6, 1)
    res = QPInteriorPoint.for_dtype(F64).solve(Q[:1], p, G[:1], h[:1].expand(3, 6), A[:1], b[:1])
    for i in range(3):
        one = QPInteriorPoint.for_dtype(F64).solve(Q[:1], p[i:i + 1], G[:1], h[:1], A[:1], b[:1])
        torch.testing.assert_close(res.z[i], one.z[0], atol=1e-11, rtol=0)


def test_linear_program_with_equalities_matches_cvxpy(g):
    cp = pytest.importorskip("cvxpy")
    n = 5
    G = torch.cat([torch.eye(n, dtype=F64), -torch.eye(n, dtype=F64)])
    h = torch.ones(2 * n, dtype=F64)
    A = torch.randn(2, n, generator=g, dtype=F64)
    b = A @ (0.2 * torch.randn(n, generator=g, dtype=F64))
    p = torch.randn(n, generator=g, dtype=F64)
    res = QPInteriorPoint.for_dtype(F64).solve(torch.zeros(1, n, n, dtype=F64), p[None], G[None], h[None], A[None],
                                               b[None])
    assert res.status.item() == Status.SUCCESS and res.kkt.factor.kind == "primal"
    z = cp.Variable(n)
    cp.Problem(cp.Minimize(p.numpy() @ z), [G.numpy() @ z <= h.numpy(), A.numpy() @ z == b.numpy()]).solve(
        solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
    np.testing.assert_allclose(res.z[0].numpy(), z.value, atol=1e-8)


@pytest.mark.parametrize("kkt", ["primal", "dual"])
def test_infeasible_certificate(kkt):
    one = torch.ones(1, 1, 1, dtype=F64)
    res = QPInteriorPoint.for_dtype(F64, kkt=kkt).solve(one, torch.zeros(1, 1, dtype=F64),
                                                        torch.tensor([[[1.0], [-1.0]]], dtype=F64),
                                                        torch.tensor([[-1.0, -1.0]], dtype=F64),
                                                        torch.zeros(1, 0, 1, dtype=F64), torch.zeros(1, 0, dtype=F64))
    assert res.status.item() == Status.INFEASIBLE


def test_infeasible_with_equalities_and_unbounded_lp():
    T = lambda x: torch.tensor(x, dtype=F64)  # noqa: E731
    s = QPInteriorPoint.for_dtype(F64)
    inf = s.solve(T([[[1.0, 0], [0, 1]]]), T([[0.0, 0]]), T([[[1.0, 0], [0, 1]]]), T([[1.0, 1]]), T([[[1.0, 1]]]),
                  T([[3.0]]))
    assert inf.status.item() == Status.INFEASIBLE
    unb = s.solve(torch.zeros(1, 2, 2, dtype=F64), T([[-1.0, -1]]), T([[[-1.0, 0], [0, -1]]]), T([[0.0, 0]]),
                  torch.zeros(1, 0, 2, dtype=F64), torch.zeros(1, 0, dtype=F64))
    assert unb.status.item() == Status.UNBOUNDED


def test_iteration_limit_is_reported(g):
    # large enough that the active-set polish after one step cannot guess its way to the solution
    P = random_qp(g, 3, 30, 40, 0)
    res = QPInteriorPoint.for_dtype(F64, max_iter=1).solve(*P)
    assert (res.status == Status.MAX_ITERATIONS).all() and (res.residual > 1e-10).all()


def test_warm_start_from_the_solution_needs_fewer_iterations(g):
    P = random_qp(g, 3, 8, 10, 2)
    s = QPInteriorPoint.for_dtype(F64)
    cold = s.solve(*P)
    warm = s.solve(*P, warm_start=(cold.z, cold.lam.clamp(min=1e-4), cold.nu))
    torch.testing.assert_close(warm.z, cold.z, atol=1e-10, rtol=0)
    assert warm.iterations.sum() < cold.iterations.sum()


@pytest.mark.parametrize("kkt", ["primal", "dual"])
def test_final_factorization_solves_the_active_set_kkt_system(g, kkt):
    """Refining with the exposed factorization solves K x = r for the exact active-set matrix K."""
    Q, p, G, h, A, b = random_qp(g, 3, 5, 6, 1)
    s = QPInteriorPoint.for_dtype(F64, kkt=kkt)
    _kkt_oracle_check(s, s.solve(Q, p, G, h, A, b), Q, G, A, g)


# ----------------------------------------------------------------------------- early stop, Tapia guess, re-rounds

def _kkt_oracle_check(s, res, Q, G, A, g):
    """The factor ``res`` exposes solves the exact active-set KKT system of every element (dense oracle)."""
    B, n, m, k = Q.shape[0], Q.shape[-1], G.shape[-2], A.shape[-2]
    act = res.kkt.active
    GM = G * act[..., None]
    r = tuple(torch.randn(B, d, generator=g, dtype=F64) for d in (n, m, k))
    x = res.kkt.factor.solve(GM, A, *r)
    P = _Products.build(0.5 * (Q + Q.mT), G, A)
    for _ in range(3):
        kx = kkt_apply(P, 1 - act, *x, mask=act)
        d = res.kkt.factor.solve(GM, A, *(ri - ki for ri, ki in zip(r, kx)))
        x = tuple(xi + di for xi, di in zip(x, d))
    for i in range(B):
        a = act[i].bool()
        K = torch.zeros(n + m + k, n + m + k, dtype=F64)
        K[:n, :n] = 0.5 * (Q[i] + Q[i].T)
        K[n:n + m, :n], K[:n, n:n + m] = GM[i], GM[i].T
        K[n:n + m, n:n + m] = torch.diag((~a).to(F64) * -1.0)
        K[n + m:, :n], K[:n, n + m:] = A[i], A[i].T
        want = torch.linalg.solve(K, torch.cat([ri[i] for ri in r]))
        torch.testing.assert_close(torch.cat([xi[i] for xi in x]), want, atol=1e-9, rtol=1e-9)


def _count_batches(monkeypatch, name):
    """Record the batch size of every call of ``QPInteriorPoint.<name>(…, P, p, …)``."""
    sizes = []
    orig = getattr(QPInteriorPoint, name)
    at = 7 if name == "_polish" else 2  # position of p after self

    def spy(self, *args, **kw):
        sizes.append(args[at - 1].shape[0])
        return orig(self, *args, **kw)
    monkeypatch.setattr(QPInteriorPoint, name, spy)
    return sizes


@pytest.mark.parametrize("early", [1e-3, 0.3])
def test_early_stop_gives_the_full_accuracy_solution_and_a_consistent_factor(g, monkeypatch, early):
    """Stopping the dual loop early (then polish; re-rounds on a subset; resume where the polish misses) gives
    the same solution as running to rtol, to rounding, and the merged factor solves each element's KKT system.
    ``early = 0.3`` stops after a step or two, so guesses are wrong and elements resume."""
    Q, p, G, h, A, b = random_qp(g, 12, 12, 18, 2, cond_spread=True)
    full = QPInteriorPoint.for_dtype(F64)
    full.early_rtol = 0.0
    want = full.solve(Q, p, G, h, A, b)
    s = QPInteriorPoint.for_dtype(F64)
    s.early_rtol = early
    sizes = _count_batches(monkeypatch, "_polish")
    loops = _count_batches(monkeypatch, "_interior_point_dual")
    got = s.solve(Q, p, G, h, A, b)
    assert (got.status == Status.SUCCESS).all() and (want.status == Status.SUCCESS).all()
    assert (got.residual <= 1e-10).all() and (got.iterations <= s.max_iter).all()
    torch.testing.assert_close(got.z, want.z, atol=1e-9, rtol=0)
    torch.testing.assert_close(got.lam, want.lam, atol=1e-9, rtol=0)
    torch.testing.assert_close(got.nu, want.nu, atol=1e-9, rtol=0)
    assert torch.equal(got.kkt.active, want.kkt.active)
    if early == 0.3:  # some elements were polished again on their own (a subset of the batch)
        assert any(sz < 12 for sz in sizes[1:]), sizes
        assert len(loops) == 2 and 0 < loops[1] < 12, loops  # and some resumed the interior point
        assert got.iterations.sum() <= want.iterations.sum() + 12 * 3
    _kkt_oracle_check(s, got, Q, G, A, g)


def test_tapia_guess_keeps_an_active_constraint_with_a_tiny_multiplier():
    """min ½‖z − a‖² s.t. z₁ ≤ 1 with a₁ = 1 + 1e-7: λ = 1e-7, active.  A threshold on λ at the early stop
    (μ ≫ λ²) would call it inactive; the solution and the gradient dz₁/da₁ = 0 must be exact."""
    I2 = torch.eye(2, dtype=F64)[None]
    a = torch.tensor([[1.0 + 1e-7, 2.0]], dtype=F64)
    G, h = torch.tensor([[[1.0, 0.0]]], dtype=F64), torch.ones(1, 1, dtype=F64)
    A, b = torch.zeros(1, 0, 2, dtype=F64), torch.zeros(1, 0, dtype=F64)
    res = QPInteriorPoint.for_dtype(F64).solve(I2, -a, G, h, A, b)
    assert int(res.status[0]) == Status.SUCCESS
    torch.testing.assert_close(res.z, torch.tensor([[1.0, 2.0]], dtype=F64), atol=1e-14, rtol=0)
    torch.testing.assert_close(res.lam, torch.tensor([[1e-7]], dtype=F64), atol=1e-14, rtol=0)
    assert res.kkt.active.tolist() == [[1.0]]


def test_batched_lp_with_bounds_matches_cvxpy_and_its_own_solves(g):
    """A batch of LPs with box rows (the bound-row split of G, a shared zero Q, converged elements
    leaving the primal loop): every element solves to the KKT conditions, equals its own solve and
    cvxpy's solution."""
    cp = pytest.importorskip("cvxpy")
    B, n, m = 24, 6, 4
    eye = torch.eye(n, dtype=F64).expand(B, n, n)
    G = torch.cat([eye, -eye, torch.randn(B, m, n, generator=g, dtype=F64)], dim=1)
    z0 = 0.3 * torch.randn(B, n, generator=g, dtype=F64)
    h = (G @ z0[..., None])[..., 0] + 0.5 + torch.rand(B, 2 * n + m, generator=g, dtype=F64)
    A = torch.randn(B, 1, n, generator=g, dtype=F64)
    b = (A @ z0[..., None])[..., 0]
    p = torch.randn(B, n, generator=g, dtype=F64)
    Q = torch.zeros(B, n, n, dtype=F64)
    solver = QPInteriorPoint.for_dtype(F64)
    res = solver.solve(Q, p, G, h, A, b)
    assert bool((res.status == Status.SUCCESS).all()) and res.kkt.factor.kind == "primal"
    assert len(set(res.iterations.tolist())) > 1
    stat, infeas, eq, comp, lmin = kkt_residuals(Q, p, G, h, A, b, res.z, res.lam, res.nu)
    assert float(torch.stack([stat, infeas, eq, comp]).max()) < 1e-9 and float(lmin.min()) >= 0
    for i in (0, 11, 23):
        one = solver.solve(*(t[i:i + 1] for t in (Q, p, G, h, A, b)))
        torch.testing.assert_close(res.z[i], one.z[0], atol=1e-10, rtol=0)
        z = cp.Variable(n)
        cp.Problem(cp.Minimize(p[i].numpy() @ z), [G[i].numpy() @ z <= h[i].numpy(),
                                                   A[i].numpy() @ z == b[i].numpy()]).solve(
            solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
        np.testing.assert_allclose(res.z[i].numpy(), z.value, atol=1e-7)


def test_primal_loop_first_step_reuses_the_start_factorization(g, monkeypatch):
    """A cold start of the primal loop (an LP) balances s = λ, so its first step's Newton matrix is the
    start's (W = I) and is not factored again: factorizations = loop steps + polishes, and the LP is solved."""
    import implicitdiff.solvers.qp_ipm as qp_ipm
    B, n = 8, 6
    eye = torch.eye(n, dtype=F64).expand(B, n, n)
    G = torch.cat([eye, -eye, torch.randn(B, 3, n, generator=g, dtype=F64)], dim=1)
    z0 = 0.3 * torch.rand(B, n, generator=g, dtype=F64)  # feasible: inside the box and the random rows
    h = torch.cat([torch.ones(B, 2 * n, dtype=F64), (G[:, 2 * n:] @ z0[..., None])[..., 0] + 0.1], dim=1)
    Q, p = torch.zeros(B, n, n, dtype=F64), torch.randn(B, n, generator=g, dtype=F64)
    A = torch.randn(B, 1, n, generator=g, dtype=F64)
    b = (A @ z0[..., None])[..., 0]
    calls = []
    orig = qp_ipm.kkt_factor
    monkeypatch.setattr(qp_ipm, "kkt_factor", lambda *a, **k: calls.append(1) or orig(*a, **k))
    polishes = _count_batches(monkeypatch, "_polish")
    res = QPInteriorPoint.for_dtype(F64, kkt="primal").solve(Q, p, G, h, A, b)
    assert (res.status == Status.SUCCESS).all() and (res.residual <= 1e-10).all()
    stat, feas, _, comp, lam_min = kkt_residuals(Q, p, G, h, A, b, res.z, res.lam, res.nu)
    assert float(stat.max()) < 1e-9 and float(feas.max()) < 1e-9 and float(comp.max()) < 1e-9
    assert float(lam_min.min()) >= 0
    assert len(calls) == int(res.iterations.max()) + len(polishes), (len(calls), res.iterations, polishes)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("which", range(6))
def test_a_nonfinite_entry_makes_its_element_nonfinite_and_leaves_the_others_alone(g, which, value):
    """The screen reads the finiteness of Q, G, A off their max |entry| (amax/amin propagate NaN and ±Inf)."""
    P = random_qp(g, 3, 5, 4, 1)
    ref = QPInteriorPoint.for_dtype(F64).solve(*P)
    bad = [t.clone() for t in P]
    bad[which][1].view(-1)[-1] = value
    res = QPInteriorPoint.for_dtype(F64).solve(*bad)
    assert res.status.tolist() == [Status.SUCCESS, Status.NONFINITE, Status.SUCCESS]
    torch.testing.assert_close(res.z[[0, 2]], ref.z[[0, 2]], atol=1e-9, rtol=0)


@pytest.mark.parametrize("kkt", ["primal", "dual"])
def test_a_symmetric_q_is_used_as_is_and_a_nonsymmetric_one_by_its_symmetric_part(g, kkt):
    P = random_qp(g, 4, 6, 5, 1)
    Q0 = P[0].clone()
    ref = QPInteriorPoint.for_dtype(F64, kkt=kkt).solve(*P)
    assert torch.equal(P[0], Q0)  # the caller's (symmetric) Q is not written to
    R = torch.randn(4, 6, 6, generator=g, dtype=F64)
    res = QPInteriorPoint.for_dtype(F64, kkt=kkt).solve(P[0] + R - R.mT, *P[1:])
    assert (res.status == Status.SUCCESS).all()
    torch.testing.assert_close(res.z, ref.z, atol=1e-9, rtol=0)
