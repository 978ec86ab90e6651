"""The structured solve of the cone derivative system (:mod:`implicitdiff.implicit.cone_system`) against
the dense matrix, on every cone and at degenerate points; the double backward against finite
differences of the gradient (float64)."""

import pytest
import torch

import implicitdiff as idf
from implicitdiff.implicit.cone_frame import dual_projection_frame, from_frame, to_frame
from implicitdiff.implicit.cone_projection import dual_projection_jacobian, project_dual
from implicitdiff.implicit.cone_system import ConeSystem, dense_system
from implicitdiff.linalg.cone_spec import parse_cones

from ._cone_cases import CASES, case

F64 = torch.float64


def _dense_solve(M, g, adjoint):
    Mo = M.mT if adjoint else M
    return torch.linalg.solve(Mo, g[..., None])[..., 0]


def _check(A, b, c, x, y, s, ok, spec, tol=1e-10, seed=0):
    S = ConeSystem(A, b, c, x, y, s, ok, spec)
    M = dense_system(A, b, c, x, y, s, ok, spec)
    regular = torch.linalg.cond(M) < 1e8  # (a random point can make M singular: no unique answer)
    assert int(regular.sum()) >= min(3, len(regular))
    g = torch.randn(M.shape[:2], generator=torch.Generator().manual_seed(seed), dtype=F64)
    for adjoint in (False, True):
        z = S.solve(g, adjoint=adjoint)[regular]
        ref = _dense_solve(M[regular], torch.where(ok[:, None], g, torch.zeros_like(g))[regular], adjoint)
        err = ((z - ref).abs().amax(-1) / ref.abs().amax(-1).clamp(min=1)).max()
        assert float(err) < tol, (adjoint, float(err))
    return S


@pytest.mark.parametrize("cones", [{"z": 2, "l": 3, "q": [4, 3, 1, 2], "s": [3, 2]},
                                   {"z": 2, "l": 3, "q": [4, 3, 1, 2, 4], "s": [3, 2, 3]}])
def test_frame_diagonalizes_the_projection_jacobian(cones):
    # (the second layout has groups of same-size blocks that are not consecutive rows)
    spec = parse_cones(cones)
    g = torch.Generator().manual_seed(0)
    v = torch.randn(6, spec.m, generator=g, dtype=F64)
    v[0, 5] = v[0, 6:9].norm() + 0.5      # a second-order block inside K*
    v[1, 5] = -v[1, 6:9].norm() - 0.5     # … and one in the polar
    y = project_dual(spec, v, None, None)
    s = y - v
    F = dual_projection_frame(spec, y, s)
    eye = torch.eye(spec.m, dtype=F64).expand(6, -1, -1)
    U = from_frame(F, eye)
    assert torch.allclose(U.mT @ U, eye, atol=1e-13)
    assert torch.allclose(to_frame(F, eye), U.mT, atol=1e-13)
    # the PSD blocks' columns: shared by the batch (eye expanded) above, per element and a few here
    assert torch.allclose(to_frame(F, eye.contiguous()), U.mT, atol=1e-13)
    assert torch.allclose(to_frame(F, eye[..., :3]), U.mT[..., :3], atol=1e-13)
    assert torch.allclose(to_frame(F, v), (U.mT @ v[..., None])[..., 0], atol=1e-13)
    assert torch.allclose(U @ torch.diag_embed(F.lam) @ U.mT, dual_projection_jacobian(spec, y, s), atol=1e-13)
    assert bool(((F.lam >= 0) & (F.lam <= 1)).all())


@pytest.mark.parametrize("name", sorted(CASES))
def test_structured_equals_dense_at_the_solution(name):
    A, b, c, cones = case(name, 0)
    x, y, s = idf.cone_program(A, b, c, cones, rtol=1e-10)
    ok = torch.ones(1, dtype=torch.bool)
    S = _check(*(t[None] for t in (A, b, c, x, y, s)), ok, parse_cones(cones))
    assert S.fallbacks == 0


@pytest.mark.parametrize("seed", range(3))
def test_structured_equals_dense_at_random_points_of_every_cone(seed):
    # random v (not a solution: M is merely some matrix of the family), every kind of block,
    # second-order blocks inside, in the polar and on the boundary; one failed element
    cones = {"z": 2, "l": 4, "q": [5, 3, 1], "s": [3, 2], "ep": 2}
    spec = parse_cones(cones)
    g = torch.Generator().manual_seed(seed)
    B, m, n = 5, spec.m, 12
    A = torch.randn(B, m, n, generator=g, dtype=F64)
    b, c = torch.randn(B, m, generator=g, dtype=F64), torch.randn(B, n, generator=g, dtype=F64)
    x = torch.randn(B, n, generator=g, dtype=F64)
    v = torch.randn(B, m, generator=g, dtype=F64)
    v[0, 6] = v[0, 7:11].norm() + 0.3
    v[1, 6] = -v[1, 7:11].norm() - 0.3
    # exponential blocks: y on the dual cone's boundary, s on the primal one (complementary pair)
    r = torch.rand(B, 2, generator=g, dtype=F64) + 0.2
    q = torch.randn(B, 2, generator=g, dtype=F64).clamp(-1, 1)
    e = m - 6
    s_exp = torch.stack([q, torch.ones_like(q), torch.exp(q)], -1) * r[..., None]   # (q, 1, e^q)·r ∈ ∂K_exp
    y_exp = torch.stack([-torch.ones_like(q), 1 - q, torch.exp(-q)], -1)           # ∂K_exp*, ⟂ s
    v[:, e:] = (y_exp - s_exp).reshape(B, 6)
    y = project_dual(spec, v, torch.zeros_like(v), torch.zeros_like(v))
    y[:, e:] = y_exp.reshape(B, 6)
    s = y - v
    ok = torch.tensor([True, True, True, False, True])
    S = _check(A, b, c, x, y, s, ok, spec, tol=1e-9, seed=seed)
    z = S.solve(torch.randn(B, n + m + 1, generator=g, dtype=F64))
    assert bool((z[3] == 0).all())  # a failed element: zero


def _degenerate():
    # min cᵀx over the box −1 ≤ x ≤ 0.5 (a vertex is optimal), with ‖x‖ ≤ t ≤ 2: t ∈ [‖x*‖, 2] is not
    # unique (an auxiliary variable of an inactive constraint), so M is singular; x* is unique.
    # variables (x₁, x₂, t); rows: t ≤ 2 and the box (l 5), then (t, x) ∈ SOC (q 3)
    A = torch.tensor([[0, 0, 1], [1, 0, 0], [0, 1, 0], [-1, 0, 0], [0, -1, 0],
                      [0, 0, -1], [-1, 0, 0], [0, -1, 0]], dtype=F64)
    b = torch.tensor([2, 0.5, 0.5, 1, 1, 0, 0, 0], dtype=F64)
    c = torch.tensor([-1.0, -2.0, 0.0], dtype=F64)
    return A, b, c, {"l": 5, "q": [3]}


def test_degenerate_point_gives_the_exact_derivative_of_the_unique_part():
    A, b, c, cones = _degenerate()
    br = b.clone().requires_grad_()
    x, y, s = idf.cone_program(A, br, c, cones, rtol=1e-10)
    assert torch.allclose(x[:2], torch.tensor([0.5, 0.5], dtype=F64), atol=1e-7)
    M = dense_system(*(t[None] for t in (A, b, c, x.detach(), y.detach(), s.detach())),
                     torch.ones(1, dtype=torch.bool), parse_cones(cones))
    assert float(torch.linalg.svdvals(M[0])[-1]) < 1e-6  # singular indeed
    (gb,) = torch.autograd.grad(x[0] + 3 * x[1], br)
    # x₁ = b₁, x₂ = b₂ (upper box bounds): the exact gradient
    expected = torch.zeros_like(b)
    expected[1], expected[2] = 1.0, 3.0
    assert torch.allclose(gb, expected, atol=1e-7), gb
    # and forward mode
    _, dx = torch.func.jvp(lambda b_: idf.cone_program(A, b_, c, cones, rtol=1e-10)[0], (b,), (expected,))
    assert torch.allclose(dx[:2], torch.tensor([1.0, 3.0], dtype=F64), atol=1e-7)


@pytest.mark.parametrize("name", ["socp", "sdp", "exp"])
def test_double_backward_matches_finite_differences_of_the_gradient(name):
    A, b, c, cones = case(name, 0)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(A.shape[1], generator=g, dtype=F64)
    wy = torch.randn(A.shape[0], generator=g, dtype=F64)

    def grad_of(A_, b_, c_, create_graph=False):
        x, y, _ = idf.cone_program(A_, b_, c_, cones, rtol=1e-10)
        return torch.autograd.grad((w * x).sum() + (wy * y).sum(), (A_, b_, c_), create_graph=create_graph)

    Ar, br, cr = (t.clone().requires_grad_() for t in (A, b, c))
    gA, gb, gc = grad_of(Ar, br, cr, create_graph=True)
    u = [torch.randn(t.shape, generator=g, dtype=F64) for t in (A, b, c)]
    u[0] = u[0] * (A != 0)
    d = [torch.randn(t.shape, generator=g, dtype=F64) for t in (A, b, c)]
    d[0] = d[0] * (A != 0)
    inner = (gA * u[0]).sum() + (gb * u[1]).sum() + (gc * u[2]).sum()
    hA, hb, hc = torch.autograd.grad(inner, (Ar, br, cr))
    an = float((hA * d[0]).sum() + (hb * d[1]).sum() + (hc * d[2]).sum())
    h = 1e-4

    def inner_at(t):
        args = [(p + t * dp).requires_grad_() for p, dp in zip((A, b, c), d)]
        return sum(float((gi * ui).sum()) for gi, ui in zip(grad_of(*args), u))
    fd = (inner_at(h) - inner_at(-h)) / (2 * h)
    assert abs(an - fd) <= 1e-6 * max(1.0, abs(fd)), (an, fd)


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_reused_nearby_factorization_gives_the_same_solves(name):
    A, b, c, cones = case(name, 0)
    spec = parse_cones(cones)
    x, y, s = (t[None] for t in idf.cone_program(A, b, c, cones, rtol=1e-10))
    A, b, c = A[None], b[None], c[None]
    ok = torch.ones(1, dtype=torch.bool)
    g = torch.randn(1, A.shape[1] + A.shape[2] + 1, generator=torch.Generator().manual_seed(4), dtype=F64)
    fresh = ConeSystem(A, b, c, x, y, s, ok, spec)
    near = ConeSystem(A, b, c, x * (1 + 1e-6), y * (1 - 1e-6), s * (1 + 1e-6), ok, spec)  # a nearby point
    far = ConeSystem(A, b, c, torch.zeros_like(x), y.flip(-1), s.flip(-1), ok, spec)       # an unrelated one
    for other, refactored in ((near, 0), (far, None)):
        reused = ConeSystem(A, b, c, x, y, s, ok, spec, reuse=other)
        for adjoint in (False, True):
            assert torch.allclose(reused.solve(g, adjoint=adjoint), fresh.solve(g, adjoint=adjoint), rtol=0, atol=1e-11)
        if refactored is not None:
            assert reused.refactored == refactored
        assert reused.fallbacks == 0


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_shifted_lu_of_the_transpose_solves_both_ways(layout):
    # the factor of (K + δI)ᵀ, computed in K's memory (contiguous) or copied (any other K): solves with
    # K + δI and its transpose against a dense solve
    from implicitdiff.implicit.cone_system import _shifted_lu
    from implicitdiff.linalg.lu import LUTransposed
    g = torch.Generator().manual_seed(3)
    K = torch.randn(3, 9, 9, generator=g, dtype=F64)
    kmax = K.abs().amax((-2, -1))
    shifted = K + (torch.finfo(F64).eps ** 0.5 * kmax.clamp(min=1.0))[:, None, None] * torch.eye(9, dtype=F64)
    work = K.clone() if layout == "contiguous" else K.mT.contiguous().mT
    LU, piv = _shifted_lu(work, kmax)
    assert (LU.data_ptr() == work.data_ptr()) == (layout == "contiguous")
    rhs = torch.randn(3, 9, 2, generator=g, dtype=F64)
    for adjoint in (False, True):
        ref = torch.linalg.solve(shifted.mT if adjoint else shifted, rhs)
        assert torch.allclose(LUTransposed(LU, piv).solve(rhs, adjoint), ref, rtol=0, atol=1e-12 * float(ref.abs().max()))
