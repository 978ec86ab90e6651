"""The cone interior point's parts: cone layout, svec, NT scaling, steps, the exponential cone's
barrier, and the solver's statuses (float64)."""

import math

import pytest
import torch

from implicitdiff import InputError, Status
from implicitdiff.linalg.cone_spec import parse_cones, smat, svec
from implicitdiff.solvers.cone_exp import ExpCone, _grad_hess, _in_dual, _in_primal
from implicitdiff.solvers.cone_ipm import ConeInteriorPoint
from implicitdiff.solvers.cone_symmetric import PSD, SecondOrder

F64 = torch.float64


def _soc_point(g, k):
    v = torch.randn(2, 3, k, generator=g, dtype=F64)
    v[..., 0] = v[..., 1:].norm(dim=-1) + torch.rand(2, 3, generator=g, dtype=F64) + 0.1
    return v


def _psd_point(g, k):
    M = torch.randn(2, 3, k, k, generator=g, dtype=F64)
    return svec(M @ M.mT + 0.1 * torch.eye(k, dtype=F64))


def test_svec_matches_scs_convention_and_round_trips():
    X = torch.tensor([[1.0, 2.0], [2.0, 3.0]], dtype=F64)
    assert torch.allclose(svec(X), torch.tensor([1.0, 2 * math.sqrt(2), 3.0], dtype=F64))
    g = torch.Generator().manual_seed(0)
    A = torch.randn(4, 4, generator=g, dtype=F64)
    A, B = A + A.T, A @ A.T
    assert torch.allclose(smat(svec(A), 4), A)
    assert torch.allclose(svec(A) @ svec(B), torch.trace(A @ B))  # an isometry


def test_cone_spec_groups_follow_scs_row_order():
    spec = parse_cones({"z": 1, "l": 2, "q": [3, 2, 3], "s": [2], "ep": 1})
    assert spec.m == 1 + 2 + 8 + 3 + 3 and spec.degree == 2 + 3 + 2 + 3
    groups = {(k, size): idx.tolist() for k, size, idx in spec.groups()}
    assert groups[("l", 2)] == [1, 2]
    assert groups[("q", 3)] == [[3, 4, 5], [8, 9, 10]]
    assert groups[("q", 2)] == [[6, 7]]
    assert groups[("s", 2)] == [[11, 12, 13]]
    assert groups[("ep", 3)] == [[14, 15, 16]]
    with pytest.raises(InputError, match="power cones"):
        parse_cones({"p": [0.5]})


@pytest.mark.parametrize("cone, point, k", [(SecondOrder, _soc_point, 4), (PSD, _psd_point, 3)])
def test_nt_scaling_identities_and_step_to_boundary(cone, point, k):
    g = torch.Generator().manual_seed(1)
    s, y = point(g, k), point(g, k)
    st = cone.scale(s, y)
    ls, ly = cone.scaled(st, s, y)  # W⁻ᵀs and Wy: both equal λ
    assert torch.allclose(ls, ly, atol=1e-12)
    assert torch.allclose(cone.w_t(st, ls), s, atol=1e-12)      # Wᵀ(W⁻ᵀ s) = s
    assert torch.allclose(cone.winv(st, ly), y, atol=1e-12)     # W⁻¹(W y) = y
    V = torch.randn(s.shape + (2,), generator=g, dtype=F64)
    col = cone.winv_t(st, V)[..., 0]
    assert torch.allclose(col, cone.scaled(st, V[..., 0], V[..., 0])[0], atol=1e-12)
    ds, dy = (torch.randn(s.shape, generator=g, dtype=F64) for _ in range(2))
    alpha = cone.step(st, ds, dy)                                 # (2,): per batch row

    def margin(v):
        if cone is SecondOrder:
            return (v[..., 0] - v[..., 1:].norm(dim=-1)).amin(-1)
        return torch.linalg.eigvalsh(smat(v, k))[..., 0].amin(-1)
    a = alpha[:, None, None]
    on_boundary = torch.minimum(margin(s + a * ds), margin(y + a * dy))
    assert torch.allclose(on_boundary, torch.zeros_like(on_boundary), atol=1e-9)
    assert (torch.minimum(margin(s + 0.99 * a * ds), margin(y + 0.99 * a * dy)) > 0).all()


def test_exponential_cone_barrier_and_central_point():
    e = ExpCone.unit(torch.zeros(1, 1, 3, dtype=F64))
    assert _in_primal(e).all() and _in_dual(e).all()
    grad, _ = _grad_hess(e)
    assert torch.allclose(-grad, e, atol=1e-9)  # the central point: s = −∇F(s)
    s = torch.tensor([[[0.3, 0.7, 2.0]]], dtype=F64, requires_grad=True)

    def F(t):
        x, y, z = t.unbind(-1)
        return (-torch.log(y * torch.log(z / y) - x) - torch.log(y) - torch.log(z)).sum()
    g_auto = torch.autograd.grad(F(s), s)[0]
    H_auto = torch.autograd.functional.hessian(F, s.detach())[0, 0, :, 0, 0, :]
    g, H = _grad_hess(s.detach())
    assert torch.allclose(g, g_auto, atol=1e-12) and torch.allclose(H[0, 0], H_auto, atol=1e-10)


def _lp_batch():
    # element 0 feasible (min x, x ≥ 1), 1 infeasible (x ≥ 1, x ≤ 0), 2 unbounded (min −x, x ≥ 0)
    A = torch.tensor([[[-1.0], [0.0]], [[-1.0], [1.0]], [[-1.0], [0.0]]], dtype=F64)
    b = torch.tensor([[-1.0, 1.0], [-1.0, 0.0], [0.0, 1.0]], dtype=F64)
    c = torch.tensor([[1.0], [1.0], [-1.0]], dtype=F64)
    return A, b, c


def test_statuses_per_element_with_certificates():
    A, b, c = _lp_batch()
    r = ConeInteriorPoint(rtol=1e-9, max_iter=50).solve(A, b, c, parse_cones({"l": 2}))
    assert r.status.tolist() == [Status.SUCCESS, Status.INFEASIBLE, Status.UNBOUNDED]
    assert torch.allclose(r.x[0], torch.ones(1, dtype=F64), atol=1e-8)
    r = ConeInteriorPoint(rtol=1e-9, max_iter=2).solve(A[:1], b[:1], c[:1], parse_cones({"l": 2}))
    assert r.status.tolist() == [Status.MAX_ITERATIONS] and torch.isfinite(r.residual).all()


def test_batch_equals_single_solves():
    g = torch.Generator().manual_seed(3)
    B, n = 4, 3
    A = torch.cat([torch.eye(n, dtype=F64)[None].expand(B, n, n),                # x ≤ 1 (l)
                   torch.zeros(B, 1, n, dtype=F64), -torch.eye(n, dtype=F64)[None].expand(B, n, n)], 1)  # ‖x‖ ≤ 2 (q)
    b = torch.cat([torch.ones(B, n, dtype=F64), 2 * torch.ones(B, 1, dtype=F64), torch.zeros(B, n, dtype=F64)], 1)
    c = torch.randn(B, n, generator=g, dtype=F64)
    spec = parse_cones({"l": n, "q": [n + 1]})
    solver = ConeInteriorPoint(rtol=1e-10)
    r = solver.solve(A, b, c, spec)
    for i in range(B):
        ri = solver.solve(A[i:i + 1], b[i:i + 1], c[i:i + 1], spec)
        assert torch.allclose(ri.x[0], r.x[i], atol=1e-8) and ri.status[0] == r.status[i] == Status.SUCCESS


@pytest.mark.parametrize("compact", [0.0, 1.0])
def test_dropping_finished_elements_changes_nothing(monkeypatch, compact):
    # COMPACT_BELOW = 1: the loop works on the running elements only, from the first finished one on;
    # 0: never.  Elements finish at different iterations with different statuses; shared and batched A.
    import implicitdiff.solvers.cone_ipm as ipm

    A, b, c = _lp_batch()
    A, b, c = torch.cat([A, A[:1] * 2.0]), torch.cat([b, b[:1] * 3.0]), torch.cat([c, c[:1] * 0.5])
    spec = parse_cones({"l": 2})
    ref = ConeInteriorPoint(rtol=1e-9).solve(A, b, c, spec)
    monkeypatch.setattr(ipm, "COMPACT_BELOW", compact)
    r = ConeInteriorPoint(rtol=1e-9).solve(A, b, c, spec)
    assert r.status.tolist() == [Status.SUCCESS, Status.INFEASIBLE, Status.UNBOUNDED, Status.SUCCESS]
    assert r.iterations.tolist() == ref.iterations.tolist() and len(set(r.iterations.tolist())) > 1
    for u, v in zip(r, ref):
        assert torch.allclose(u, v, rtol=0, atol=1e-12)
    for A_, b_, c_ in ((A, b, c), (A[0], b[[0, 3]], c[[0, 3]])):  # batched; shared by the batch
        r = ConeInteriorPoint(rtol=1e-9).solve(A_, b_, c_, spec)
        for i in range(b_.shape[0]):  # each element alone
            Ai = A_[i:i + 1] if A_.dim() == 3 else A_
            one = ConeInteriorPoint(rtol=1e-9).solve(Ai, b_[i:i + 1], c_[i:i + 1], spec)
            assert one.status[0] == r.status[i] and one.iterations[0] == r.iterations[i]
            assert torch.allclose(one.x[0], r.x[i], rtol=0, atol=1e-10)


def _interior_pair(spec, g, B):
    """An interior ``(s, y)`` of every cone of ``spec`` (zero on the zero cone's rows), ``(B, m)``."""
    from implicitdiff.solvers.cone_gram import put, take
    from implicitdiff.solvers.cone_ipm import _CONES

    out = []
    for _ in range(2):
        v = torch.zeros(B, spec.m, dtype=F64)
        for kind, _, idx in spec.groups():
            u = _CONES[kind].unit(take(v, idx))
            put(v, idx, u + 0.05 * torch.randn(u.shape, generator=g, dtype=F64))
        out.append(v)
    return out


def test_cone_maps_take_the_columns_at_once():
    # every cone kind: _map / _scale on (B, r, m) equal the cone's own map applied column by column
    from implicitdiff.solvers.cone_gram import take
    from implicitdiff.solvers.cone_ipm import _CONES

    g = torch.Generator().manual_seed(5)
    spec = parse_cones({"z": 1, "l": 3, "q": [4, 3, 4], "s": [3], "ep": 2})
    B, r = 3, 4
    s, y = _interior_pair(spec, g, B)
    groups = list(spec.groups())
    states = [_CONES[k].scale(take(s, idx), take(y, idx), torch.ones(B, dtype=F64)) for k, _, idx in groups]
    v = torch.randn(B, r, spec.m, generator=g, dtype=F64)
    for method in ("winv", "w_t", "winv_t"):
        ref = torch.zeros_like(v)
        for j in range(r):
            for (kind, _, idx), st in zip(groups, states):
                vj = take(v[:, j], idx)
                out = (getattr(_CONES[kind], method)(st, vj[..., None])[..., 0] if method == "winv_t"
                       else getattr(_CONES[kind], method)(st, vj))
                ref[:, j, idx] = out
        got = (ConeInteriorPoint._scale(v, groups, states) if method == "winv_t"
               else ConeInteriorPoint._map(method, v, groups, states))
        assert torch.allclose(got, ref, rtol=1e-13, atol=1e-13), method
        one = (ConeInteriorPoint._scale(v[:, 1], groups, states) if method == "winv_t"
               else ConeInteriorPoint._map(method, v[:, 1], groups, states))
        assert torch.allclose(one, ref[:, 1], rtol=1e-13, atol=1e-13), method


def test_second_order_scaling_products_match_the_dense_matrix():
    # W̄ = [[w₀, w₁ᵀ], [w₁, I + w₁w₁ᵀ/(1 + w₀)]] and W̄⁻¹ = JW̄J, on columns that w broadcasts over
    g = torch.Generator().manual_seed(6)
    k = 5
    s, y = _soc_point(g, k), _soc_point(g, k)
    w = SecondOrder.scale(s, y)[0]                                  # (2, 3, k), ‖w‖_J = 1
    w0, w1 = w[..., :1], w[..., 1:]
    Wb = torch.cat([torch.cat([w0[..., None], w1[..., None, :]], -1),
                    torch.cat([w1[..., :, None], torch.eye(k - 1, dtype=F64) + w1[..., :, None] * w1[..., None, :]
                               / (1 + w0[..., None])], -1)], -2)
    J = torch.diag(torch.tensor([1.0] + [-1.0] * (k - 1), dtype=F64))
    v = torch.randn(4, 2, 3, k, generator=g, dtype=F64)            # 4 leading columns
    assert torch.allclose(SecondOrder._wbar(w, v), (Wb @ v[..., None])[..., 0], rtol=1e-13, atol=1e-13)
    assert torch.allclose(SecondOrder._wbar_inv(w, v), (J @ Wb @ J @ v[..., None])[..., 0], rtol=1e-13, atol=1e-13)
    assert torch.allclose(SecondOrder._wbar(w, SecondOrder._wbar_inv(w, v)), v, atol=1e-12)


@pytest.mark.parametrize("shared", [False, True])
def test_success_meets_the_stopping_rule_on_fresh_products(shared):
    # the loop carries Ax (module docstring, "products with A"); the residuals of the returned
    # solution, recomputed here from scratch, must meet the stopping rule it reported
    g = torch.Generator().manual_seed(7)
    spec = parse_cones({"z": 1, "l": 5, "q": [6, 4]})
    B, n = 6, 5
    A = torch.randn(1 if shared else B, spec.m, n, generator=g, dtype=F64).expand(B, spec.m, n)
    s0, y0 = _interior_pair(spec, g, B)
    y0[:, 0] = torch.randn(B, generator=g, dtype=F64)               # the zero cone's dual is free
    x0 = torch.randn(B, n, generator=g, dtype=F64)
    b = (A @ x0[..., None])[..., 0] + s0
    c = -(A.mT @ y0[..., None])[..., 0]
    rtol = 1e-9
    r = ConeInteriorPoint(rtol=rtol).solve(A, b, c, spec)
    assert (r.status == Status.SUCCESS).all() and (r.iterations > 3).all()
    Ax = (A @ r.x[..., None])[..., 0]
    Aty = (A.mT @ r.y[..., None])[..., 0]
    inf = lambda v: v.abs().amax(-1)  # noqa: E731
    pres = inf(Ax + r.s - b) / (1 + torch.maximum(inf(b), torch.maximum(inf(Ax), inf(r.s))))
    dres = inf(Aty + c) / (1 + torch.maximum(inf(c), inf(Aty)))
    ctx, bty = (c * r.x).sum(-1), (b * r.y).sum(-1)
    gap = (ctx + bty).abs() / (1 + torch.minimum(ctx.abs(), bty.abs()))
    assert (pres <= 1.01 * rtol).all() and (dres <= 1.01 * rtol).all() and (gap <= 1.01 * rtol).all()
    assert torch.allclose(torch.maximum(pres, torch.maximum(dres, gap)), r.residual, rtol=1e-3, atol=1e-15)


def test_second_order_step_on_edge_directions_matches_bisection():
    # SecondOrder._step divides unguarded (a root q/a or c/q with a zero divisor is ±inf or NaN, and
    # only a positive finite root limits the step): directions with a = 0 (on the cone's boundary),
    # d₀ = 0, d = 0, d = ±λ and d = Jλ against bisection on the margin t − ‖x‖ (inf: no limit)
    g = torch.Generator().manual_seed(12)
    k, B = 5, 8
    lam = _soc_point(g, k)[0, :1].expand(B, 1, k).clone()
    d = torch.randn(B, 1, k, generator=g, dtype=F64)
    d[0, :, 0] = d[0, :, 1:].norm(dim=-1)         # on the boundary, pointing in: no limit
    d[1, :, 0] = -d[1, :, 1:].norm(dim=-1)        # on the boundary of −K: a limit
    d[2, :, 0] = 0.0
    d[3] = 0.0
    d[4], d[5] = lam[4], -lam[5]
    d[6] = lam[6] * torch.tensor([-1.0] + [1.0] * (k - 1), dtype=F64)
    alpha = SecondOrder._step(lam, d)

    def margin(a):
        v = lam + a[:, None, None] * d
        return (v[..., 0] - v[..., 1:].norm(dim=-1))[:, 0]
    big = torch.full((B,), 1e8, dtype=F64)
    unbounded = margin(big) >= 0
    lo, hi = torch.zeros(B, dtype=F64), big.clone()
    for _ in range(200):
        mid = (lo + hi) / 2
        inside = margin(mid) >= 0
        lo, hi = torch.where(inside, mid, lo), torch.where(inside, hi, mid)
    assert unbounded[[0, 3, 4]].all() and not unbounded[[1, 2, 5, 6, 7]].any()
    assert torch.isinf(alpha[unbounded]).all()
    assert torch.allclose(alpha[~unbounded], lo[~unbounded], rtol=1e-9)


# -- zero columns of A (a variable absent from every constraint) ----------------------------------------------
# min cᵀx s.t. Ax + s = b: a zero column j with cⱼ ≠ 0 makes the dual Aᵀy + c = 0 infeasible (UNBOUNDED
# where the primal is feasible, else INFEASIBLE); with cⱼ = 0 the variable is free (any xⱼ is optimal).
# Statuses as Clarabel reports them on the same data (checked by hand, cvxpy-free).
_ZERO_COLUMN_CASES = [  # (A, b, c, cones, status)
    ([[0.0]], [1.0], [1.0], {"l": 1}, Status.UNBOUNDED),                      # all-zero A
    ([[0.0]], [1.0], [-1.0], {"l": 1}, Status.UNBOUNDED),
    ([[0.0, 0.0], [0.0, 0.0]], [0.0, 0.0], [1.0, -2.0], {"l": 2}, Status.UNBOUNDED),  # and b = 0
    ([[0.0]], [-1.0], [1.0], {"l": 1}, Status.INFEASIBLE),                    # b ∉ K: both infeasible
    ([[0.0, 0.0]] * 3, [0.0, 1.0, 0.0], [1.0, 1.0], {"q": [3]}, Status.INFEASIBLE),
    ([[0.0, 0.0]] * 3, [1.0, 0.0, 0.0], [1.0, 1.0], {"q": [3]}, Status.UNBOUNDED),
    ([[1.0, 0.0], [-1.0, 0.0]], [1.0, 1.0], [1.0, 1.0], {"l": 2}, Status.UNBOUNDED),  # one zero column
    ([[1.0, 0.0], [-1.0, 0.0]], [-1.0, -1.0], [1.0, 1.0], {"l": 2}, Status.INFEASIBLE),
    ([[1.0, 0.0], [1.0, 0.0]], [1.0, 2.0], [1.0, 1.0], {"z": 1, "l": 1}, Status.UNBOUNDED),  # with a zero cone
    ([[0.0, 0.0], [-1.0, 0.0], [0.0, 0.0]], [1.0, 0.0, 0.0], [1.0, 1.0], {"q": [3]}, Status.UNBOUNDED),
]


@pytest.mark.parametrize("A, b, c, cones, expected", _ZERO_COLUMN_CASES)
def test_zero_columns_give_the_certificate_status(A, b, c, cones, expected):
    # an all-zero A made the certificate tests (scaled by ‖A‖) unreachable, and a zero column made the
    # Newton step's Δτ blow up (BREAKDOWN): the status now agrees with Clarabel's, with a valid certificate
    A, b, c = (torch.tensor(v, dtype=F64) for v in (A, b, c))
    r = ConeInteriorPoint().solve(A, b[None], c[None], parse_cones(cones))
    assert r.status.item() == expected
    x, y, s = r.x[0], r.y[0], r.s[0]
    if expected == Status.UNBOUNDED:  # cᵀx < 0, Ax + s ≈ 0 (relative to the ray's size)
        ctx = c @ x
        assert ctx < 0 and (A @ x + s).abs().max() <= 1e-8 * (-ctx) / c.abs().max() * max(A.abs().max(), 1.0)
    else:  # bᵀy < 0, Aᵀy = 0
        bty = b @ y
        assert bty < 0 and (A.mT @ y).abs().max() <= 1e-8 * (-bty)


def test_zero_column_with_zero_cost_is_a_free_variable_and_batches_element_wise():
    # min x₁ s.t. −1 ≤ x₁ ≤ 1 (x₂ in no constraint, c₂ = 0): x = (−1, any); batched with an unbounded element
    # (zero column, c₂ ≠ 0) and a normal one whose result must not depend on its neighbours
    A = torch.tensor([[[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]]], dtype=F64).repeat(3, 1, 1)
    A[:2, 2] = 0.0
    b = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [1.0, 1.0, 2.0]], dtype=F64)
    c = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, -1.0]], dtype=F64)
    r = ConeInteriorPoint().solve(A, b, c, parse_cones({"l": 3}))
    assert r.status.tolist() == [Status.SUCCESS, Status.UNBOUNDED, Status.SUCCESS]
    assert torch.allclose(r.x[0, 0], torch.tensor(-1.0, dtype=F64), atol=1e-7) and r.x[0, 1].isfinite()
    assert torch.allclose(r.x[2], torch.tensor([-1.0, 2.0], dtype=F64), atol=1e-7)
    alone = ConeInteriorPoint().solve(A[2:], b[2:], c[2:], parse_cones({"l": 3}))
    assert torch.allclose(r.x[2], alone.x[0], rtol=0, atol=1e-12) and r.iterations[2] == alone.iterations[0]


def test_cone_program_reports_an_all_zero_A_as_unbounded():
    from implicitdiff import SolveError, cone_program
    with pytest.raises(SolveError, match="(?i)unbounded") as err:
        cone_program(torch.zeros(1, 1, dtype=F64), torch.ones(1, dtype=F64), torch.ones(1, dtype=F64), {"l": 1})
    assert err.value.status == Status.UNBOUNDED


def test_free_variable_keeps_the_exact_gradient_of_the_unique_part():
    # min x₁ s.t. x₁ ≤ b₁, −x₁ ≤ b₂, x₁ ≤ b₃ (x₂ in no constraint, c₂ = 0): x₁ = −b₂, y = (0, c₁, 0);
    # the documented promise for a non-unique solution: the unique parts' derivatives are exact
    from implicitdiff import cone_program
    A = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0]], dtype=F64)
    b = torch.tensor([1.0, 0.5, 3.0], dtype=F64, requires_grad=True)
    c = torch.tensor([2.0, 0.0], dtype=F64, requires_grad=True)
    x, y, _, info = cone_program(A, b, c, {"l": 3}, return_info=True)
    assert info.status == Status.SUCCESS and torch.isfinite(x).all()
    assert torch.allclose(x[0], -b[1], atol=1e-9)
    assert torch.allclose(y, torch.tensor([0.0, 2.0, 0.0], dtype=F64), atol=1e-9)
    gb, gc = torch.autograd.grad(x[0] + 3 * y[1], (b, c))
    assert torch.allclose(gb, torch.tensor([0.0, -1.0, 0.0], dtype=F64), atol=1e-9)
    assert torch.allclose(gc, torch.tensor([3.0, 0.0], dtype=F64), atol=1e-9)


def test_data_matrix_finds_each_elements_zero_columns_through_subsets():
    from implicitdiff.solvers.cone_gram import DataMatrix
    g = torch.Generator().manual_seed(3)
    A = torch.randn(4, 6, 5, generator=g, dtype=F64)
    A[0, :, 1] = 0.0
    A[2, :, [0, 4]] = 0.0
    A[:, 3, 2] = 0.0  # a zero entry, not a zero column
    expected = (A == 0).all(-2)
    sparse = A * (torch.arange(30).reshape(6, 5) % 7 == 0)  # few nonzeros: the sparse products
    block = A.clone()
    block[:, 2:] = torch.eye(4, 5, dtype=F64)  # dense rows next to one-entry rows: a dense block
    for M, layout in ((A, None), (sparse, "sparse"), (block, "block")):
        data, want = DataMatrix(M), (M == 0).all(-2)
        assert want.any() and (layout is None or getattr(data, layout) is not None)
        assert torch.equal(data.zero_columns, want)
        keep = torch.tensor([2, 0])
        assert torch.equal(data.subset(keep).zero_columns, want[keep])
    assert expected[0].tolist() == [False, True, False, False, False] and expected[2, [0, 4]].all()
    assert torch.equal(DataMatrix(A[2]).zero_columns, expected[2])  # shared
