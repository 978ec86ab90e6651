"""cone_program on the probe's findings (float64): the exponential cone's face ``{v₁ ≥ 0, v₂ ≥ 0}``,
a non-unique solution, batch size 0, meta tensors."""

import pytest
import torch

import implicitdiff as idf
from implicitdiff import InputError, SolveError, Status
from implicitdiff.implicit.cone_projection import _exp, _exp_kkt, _exp_project_dual

F64 = torch.float64


def _proj_exp_reference(w):
    """``Π_K(w)`` onto the exponential cone by Clarabel (an independent solver, ~1e-8)."""
    cp = pytest.importorskip("cvxpy")
    p = cp.Variable(3)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(p - w.numpy())), [cp.constraints.ExpCone(p[0], p[1], p[2])])
    prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
    return torch.as_tensor(p.value, dtype=F64)


@pytest.mark.parametrize("v", [(0.7, 1.3, 0.4), (0.7, 1.3, -0.4), (2.0, 0.5, 0.01), (1e-3, 3.0, -2.0)])
def test_exponential_dual_projection_on_the_face(v):
    # s = Π_K(−v) on K's face p₂ = 0 (with p₁ < 0), y = Π_{K*}(v) on K*'s face q₁ = 0: the Newton of
    # the smooth boundary met 0/0 there (p₂ = 0) and the derivative's eigh got NaN
    v = torch.tensor([v], dtype=F64)
    ref = v[0] + _proj_exp_reference(-v[0])                               # Moreau
    y = ref[None].clone()
    s = y - v
    assert torch.allclose(_exp_project_dual(v, s, y), ref, atol=1e-7)
    D = _exp(s, y)[0]
    assert torch.isfinite(D).all()
    h = 1e-6
    for j in range(3):
        e = torch.zeros(1, 3, dtype=F64)
        e[0, j] = h
        fd = (_exp_project_dual(v + e, s, y) - _exp_project_dual(v - e, s, y))[0] / (2 * h)
        assert torch.allclose(D[:, j], fd, atol=1e-7), (j, D, fd)
    # the closed form agrees with the independent projection near the face too
    for dv in (torch.tensor([[0.05, -0.02, 0.03]], dtype=F64), torch.tensor([[-0.01, 0.04, -0.05]], dtype=F64)):
        w = v + dv
        if w[0, 0] >= 0 and w[0, 1] >= 0:
            assert torch.allclose(_exp_project_dual(w, s, y)[0], w[0] + _proj_exp_reference(-w[0]), atol=1e-7)


def test_exponential_kkt_is_finite_near_the_face():
    # p₂ → 0 with p₁ < 0: e/p₂ and ρe/p₂ → 0 (were 0/0 = NaN once p₂² underflowed)
    for q in (1e-3, 1e-100, 1e-200, 0.0):
        p = torch.tensor([[-0.5, q, 0.0]], dtype=F64)
        g, grad, K = _exp_kkt(p, torch.tensor([2.0], dtype=F64))
        assert torch.isfinite(K).all() and torch.isfinite(grad).all(), q
    # and it is the Hessian: against autograd at a regular point
    p = torch.tensor([[-0.3, 0.4, 0.2]], dtype=F64)
    _, _, K = _exp_kkt(p, torch.tensor([1.0], dtype=F64))
    H = torch.autograd.functional.hessian(lambda t: t[1] * torch.exp(t[0] / t[1]) - t[2], p[0])
    assert torch.allclose(K[0, :3, :3], torch.eye(3, dtype=F64) + H, atol=1e-12)


def _face_problem():
    """The probe's r1: an {"l": 2, "ep": 1} program whose exponential slack sits on the face (u < 0, 0, w > 0)."""
    A = torch.tensor([[-1.1948, 0.0250], [-0.7627, 1.3969], [-0.3245, 0.2879], [1.0579, 0.9621],
                      [0.3935, 1.1322]], dtype=F64)
    b = torch.tensor([1.1514, -1.9509, -0.3992, -1.6419, -0.9860], dtype=F64)
    c = torch.tensor([0.7774, -2.8180], dtype=F64)
    return A, b, c, {"l": 2, "ep": 1}


def test_exponential_face_solution_and_gradient():
    A, b, c, cones = _face_problem()
    x, y, s, info = idf.cone_program(A, b, c, cones, return_info=True)
    assert int(info.status) == Status.SUCCESS
    assert abs(float(s[3])) < 1e-9 and float(s[2]) < 0 < float(s[4])          # on the face
    assert torch.allclose(A @ x + s, b, atol=1e-9) and torch.allclose(A.T @ y + c, torch.zeros_like(c), atol=1e-9)
    assert abs(float(s @ y)) < 1e-9
    # gradients against central differences (the face point is regular: y₂ > 0, s₃ > 0)
    g = torch.Generator().manual_seed(0)
    wx, wy = torch.randn(2, generator=g, dtype=F64), torch.randn(5, generator=g, dtype=F64)

    def f(bb, cc):
        xx, yy, _ = idf.cone_program(A, bb, cc, cones)
        return (wx * xx).sum() + (wy * yy).sum()
    bb, cc = b.clone().requires_grad_(), c.clone().requires_grad_()
    gb, gc = torch.autograd.grad(f(bb, cc), (bb, cc))
    h = 1e-6
    for t, grad, other in ((b, gb, "b"), (c, gc, "c")):
        d = torch.randn(t.shape, generator=g, dtype=F64)
        tp, tm = t + h * d, t - h * d
        fd = ((f(tp, c) - f(tm, c)) if other == "b" else (f(b, tp) - f(b, tm))) / (2 * h)
        assert abs(float(grad @ d) - float(fd)) < 1e-6 * (1 + abs(float(fd))), (other, float(grad @ d), float(fd))
    # the batch with on_failure="nan" is solved whole (the crash killed it)
    b2 = torch.stack([b, b + torch.tensor([0, 0, 0, 0, 5.0], dtype=F64)])
    x2, _, _, info2 = idf.cone_program(A, b2, c, cones, on_failure="nan", return_info=True)
    assert info2.status.tolist() == [0, 0] and torch.allclose(x2[0], x, atol=1e-9)


def test_entropy_at_the_domain_boundary_does_not_crash():
    # max entr(x₁) + entr(x₂), x₁ + x₂ = 1, x₁ ≤ 0: the dual is not attained (y → ∞ as the gap → 0); the
    # refinement's Newton on the exponential projection started far from it and crashed in eigh
    cp = pytest.importorskip("cvxpy")
    xv = cp.Variable(2)
    prob = cp.Problem(cp.Maximize(cp.sum(cp.entr(xv))), [cp.sum(xv) == 1, xv[0] <= 0])
    data, _, _ = prob.get_problem_data(cp.SCS)
    A = torch.as_tensor(data["A"].toarray(), dtype=F64)
    b, c = torch.as_tensor(data["b"], dtype=F64), torch.as_tensor(data["c"], dtype=F64)
    cones = {"z": data["dims"].zero, "l": data["dims"].nonneg, "ep": data["dims"].exp}
    x, y, s, info = idf.cone_program(A, b, c, cones, on_failure="nan", return_info=True)
    assert int(info.status) == Status.SUCCESS
    assert torch.allclose(A @ x + s, b, atol=1e-6)
    prob.solve(solver=cp.CLARABEL)
    assert abs(float(c @ x) + prob.value) < 1e-6      # the optimum (cone_program minimizes −Σ entr)


def _lp_with_a_face_of_optima():
    # min x₁ + x₂  s.t.  x₁ + x₂ ≥ 1, x ≥ 0: every point of the segment x₁ + x₂ = 1 is optimal
    A = torch.tensor([[-1.0, -1.0], [-1.0, 0.0], [0.0, -1.0]], dtype=F64)
    return A, torch.tensor([-1.0, 0.0, 0.0], dtype=F64), torch.tensor([1.0, 1.0], dtype=F64), {"l": 3}


def test_non_unique_solution_is_reported_not_differentiated():
    # the probe's c16: dx₁/dc came out as ±1.6e8 with SUCCESS (finite differences: ±5e5 at h = 1e-6, no limit)
    A, b, c, cones = _lp_with_a_face_of_optima()
    bb, cc = b.clone().requires_grad_(), c.clone().requires_grad_()
    x, _, _ = idf.cone_program(A, bb, cc, cones)
    with pytest.raises(SolveError, match="not unique") as err:
        torch.autograd.grad(x[0], (bb, cc))
    assert err.value.status == Status.SINGULAR and err.value.residual > 1e-3
    with pytest.raises(SolveError, match="not unique"):
        torch.func.jvp(lambda t: idf.cone_program(A, b, t, cones)[0], (c,), (torch.tensor([1.0, 0.0], dtype=F64),))
    # the unique part, x₁ + x₂ = −b₁, keeps its exact derivative
    x, _, _ = idf.cone_program(A, bb, cc, cones)
    gb, gc = torch.autograd.grad(x.sum(), (bb, cc))
    assert torch.allclose(gb, torch.tensor([-1.0, 0.0, 0.0], dtype=F64), atol=1e-7), gb
    assert torch.allclose(gc, torch.zeros(2, dtype=F64), atol=1e-7), gc


def test_auxiliary_variable_of_an_inactive_constraint_is_reported():
    # ‖x‖ ≤ t ≤ 2 over a box: t ∈ [‖x*‖, 2] is not unique (x* is: its gradient is tested in
    # test_cone_program_structured.py); dt/db came out as a finite number with SUCCESS
    A = torch.tensor([[0, 0, 1], [1, 0, 0], [0, 1, 0], [-1, 0, 0], [0, -1, 0],
                      [0, 0, -1], [-1, 0, 0], [0, -1, 0]], dtype=F64)
    b = torch.tensor([2, 0.5, 0.5, 1, 1, 0, 0, 0], dtype=F64, requires_grad=True)
    c = torch.tensor([-1.0, -2.0, 0.0], dtype=F64)
    x, _, _ = idf.cone_program(A, b, c, {"l": 5, "q": [3]}, rtol=1e-10)
    with pytest.raises(SolveError, match="singular and inconsistent"):
        torch.autograd.grad(x[2], b)


def _disc():
    A = torch.tensor([[0.0, 0.0], [-1.0, 0.0], [0.0, -1.0]], dtype=F64)
    return A, torch.tensor([1.0, 0.0, 0.0], dtype=F64), torch.ones(2, dtype=F64), {"q": [3]}


@pytest.mark.parametrize("which", ["b", "A", "c"])
def test_empty_batch_gives_empty_results(which):
    # was IndexError from the solver; qp, linear_solve and DEQ return empty results
    A, b, c, cones = _disc()
    A = A.expand(0, 3, 2) if which == "A" else A
    b = b.expand(0, 3) if which == "b" else b
    c = (c.expand(0, 2) if which == "c" else c).clone().requires_grad_()
    x, y, s, info = idf.cone_program(A, b, c, cones, return_info=True)
    assert (x.shape, y.shape, s.shape) == ((0, 2), (0, 3), (0, 3))
    assert info.status.shape == info.residual.shape == info.iterations.shape == (0,)
    (gc,) = torch.autograd.grad(x.sum() + y.sum(), c)
    assert gc.shape == c.shape and bool((gc == 0).all())
    with pytest.raises(InputError, match="b has shape"):   # the checks still run first
        idf.cone_program(A, torch.ones(0, 4, dtype=F64), c, cones)


def test_meta_tensors_get_a_clear_error():
    A, b, c, cones = _disc()
    with pytest.raises(InputError, match="meta tensors"):
        idf.cone_program(A.to("meta"), b.to("meta"), c.to("meta"), cones)


@pytest.mark.parametrize("name", ["lp", "socp", "sdp", "exp"])
def test_vmap_over_grad_jvp_and_vjp_equals_the_loop(name):
    # vmap over a derivative transform: the saved solution itself is vmapped (was "inplace arithmetic" /
    # ".item()" errors from the batched code); it must equal the derivative taken element by element
    from ._cone_cases import case
    A, b, c, cones = case(name, 0)
    g = torch.Generator().manual_seed(1)
    C = c + 0.1 * torch.randn(3, c.shape[0], generator=g, dtype=F64)
    Bs = b + 0.01 * torch.randn(3, b.shape[0], generator=g, dtype=F64)
    wx, wy = torch.randn(c.shape, generator=g, dtype=F64), torch.randn(b.shape, generator=g, dtype=F64)

    def f(A_, b_, c_):
        x, y, _ = idf.cone_program(A_, b_, c_, cones, rtol=1e-10)
        return (wx * x).sum() + (wy * y).sum()
    grad = torch.func.grad(f, argnums=(0, 1, 2))
    As = A + 0.01 * torch.randn(3, *A.shape, generator=g, dtype=F64) * (A != 0)
    # vmapped c (A shared: its gradient is per vmapped index), then vmapped b, then vmapped A
    for (vm, loop) in ((torch.func.vmap(grad, in_dims=(None, None, 0))(A, b, C), [grad(A, b, ci) for ci in C]),
                       (torch.func.vmap(grad, in_dims=(None, 0, None))(A, Bs, c), [grad(A, bi, c) for bi in Bs]),
                       (torch.func.vmap(grad, in_dims=(0, None, None))(As, b, c), [grad(Ai, b, c) for Ai in As])):
        for k in range(3):
            ref = torch.stack([r[k] for r in loop])
            assert torch.allclose(vm[k], ref, atol=1e-8, rtol=1e-7), (k, (vm[k] - ref).abs().max())
    # forward mode: vmap over jvp, and vmap over vjp
    d = torch.randn(c.shape, generator=g, dtype=F64)
    sol = lambda c_: idf.cone_program(A, b, c_, cones, rtol=1e-10)[0]  # noqa: E731
    vm = torch.func.vmap(lambda c_: torch.func.jvp(sol, (c_,), (d,))[1])(C)
    ref = torch.stack([torch.func.jvp(sol, (ci,), (d,))[1] for ci in C])
    assert torch.allclose(vm, ref, atol=1e-8, rtol=1e-7)
    vm = torch.func.vmap(lambda c_: torch.func.vjp(sol, c_)[1](wx)[0])(C)
    ref = torch.stack([torch.func.vjp(sol, ci)[1](wx)[0] for ci in C])
    assert torch.allclose(vm, ref, atol=1e-8, rtol=1e-7)


@pytest.mark.parametrize("eps", [1e-7, 1e-8])
def test_a_unique_but_ill_conditioned_vertex_is_differentiated_not_reported_singular(eps):
    # two nearly parallel constraints meet at a unique, strictly complementary vertex (y = (1, 1)):
    # M is nonsingular with cond ~ 1/eps, past what the shifted refinement converges on; the unshifted
    # retry solves it, and the gradient is the closed form dx₀/db = (A⁻¹)₀ (was SINGULAR, or 56 % off)
    A = -torch.tensor([[1.0, 1.0], [1.0, 1.0 + eps]], dtype=F64)
    b = (-torch.tensor([1.0, 1.0 + eps / 2], dtype=F64)).requires_grad_()
    c = torch.tensor([2.0, 2.0 + eps], dtype=F64)
    x, _, _ = idf.cone_program(A, b, c, {"l": 2})
    (g,) = torch.autograd.grad(x[0], b)
    torch.testing.assert_close(g, torch.linalg.inv(A)[0], rtol=1e-4, atol=0)
