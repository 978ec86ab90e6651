"""``entr`` at its bound (probe3 item 1): the gradient of a cone program's solution where an
exponential cone sits at its degenerate face (``x₀ ≤ q`` active at ``q → 0``, whose dual runs off to
infinity), against the closed form and one-sided finite differences; and the pieces of the fix —
the exponential cone's projection by its univariate root, the derivative at the exactly solved
nearby problem, and the derivative system's solve on a near-singular ``M`` — against references."""

import math

import pytest
import torch

from implicitdiff.implicit import cone as cone_mod
from implicitdiff.implicit import cone_system
from implicitdiff.implicit.cone_projection import _exp_project_dual, _exp_project_root

cp = pytest.importorskip("cvxpy")

F64 = torch.float64
W = torch.tensor([1.0, 2.0, 3.0], dtype=F64)


def entr_layer():
    from implicitdiff.nn import CvxpyLayer
    x = cp.Variable(3)
    q = cp.Parameter()
    prob = cp.Problem(cp.Maximize(cp.sum(cp.entr(x))), [cp.sum(x) == 1, x[0] <= q])
    return CvxpyLayer(prob, [q], [x])


def value_and_grad(layer, qv, rtol):
    """``wᵀx(q)`` and its gradient: ``x = (q, (1 − q)/2, (1 − q)/2)`` for ``q ≥ 0``, so ``−1.5``."""
    q = torch.tensor(qv, dtype=F64, requires_grad=True)
    x = layer(q, solver_args={"eps": rtol})[0]
    g, = torch.autograd.grad(x @ W, q)
    return float((x @ W).detach()), float(g)


@pytest.mark.parametrize("rtol", [1e-8, 1e-9, 1e-10])
@pytest.mark.parametrize("qv", [0.0, 1e-10, 1e-8])
def test_entr_gradient_at_its_bound(qv, rtol):
    layer = entr_layer()
    f0, g = value_and_grad(layer, qv, rtol)
    assert abs(g - (-1.5)) < 1e-4, g                       # the closed form (was −1.84 … −4.40)
    h = 1e-4                                                # one-sided: q < 0 is infeasible
    f1, _ = value_and_grad(layer, qv + h, rtol)
    fd = (f1 - f0) / h
    assert abs(fd - (-1.5)) < 1e-3, fd                      # the finite difference agrees …
    assert abs(g - fd) < 2e-3, (g, fd)                      # … and so does the gradient


def _in_k(p, tol):
    """``p`` on or in the exponential cone ``{y exp(x/y) ≤ z, y > 0} ∪ {x ≤ 0, y = 0, z ≥ 0}``."""
    x, y, z = p.unbind(-1)
    yy = y.clamp(min=1e-300)
    return ((y > 0) & (yy * torch.exp((x / yy).clamp(max=700)) <= z + tol)) | ((y.abs() <= tol) & (x <= tol) & (z >= -tol))


def test_exp_projection_root_is_a_projection_pair():
    """Moreau: ``w = −v = p − q`` with ``p ∈ K``, ``q ∈ K*``, ``pᵀq = 0`` (which characterizes the
    projections), over points of every case (inside ``K``, in the polar, on the face, generic, near
    the face with a huge ``ρ``)."""
    torch.manual_seed(0)
    v = torch.randn(2000, 3, dtype=F64) * torch.exp(2 * torch.randn(2000, 1, dtype=F64))
    special = torch.tensor([[-1.0, 25.058, -1.0], [-1.0, 20.3, -1.0], [0.5, 0.5, 0.5], [0.0, 1.0, 1.0],
                            [-1.0, -1.0, -1.0], [2.0, -3.0, 0.0], [-1.0, 0.0, 0.0]], dtype=F64)
    v = torch.cat([v, special])
    q, p = _exp_project_root(v)
    assert ((p - q + v).abs() <= 1e-12 * (1 + v.abs())).all()   # Moreau: −v = p − q
    scale = 1 + v.abs().amax(-1)
    assert torch.isfinite(q).all()
    assert ((p * q).sum(-1).abs() <= 1e-9 * scale ** 2).all()
    assert _in_k(p, 1e-9 * scale).all()
    # q ∈ K* ⟺ (−q₁ ... ) : K* = {(u, v, w): u < 0, −u exp(v/u) ≤ e·w} ∪ {u = 0, v ≥ 0, w ≥ 0}
    u = q[:, 0].clamp(max=-1e-300)
    dual = ((q[:, 0] < 0) & (-u * torch.exp((q[:, 1] / u).clamp(max=700)) <= math.e * q[:, 2] + 1e-9 * scale)) | (
        (q[:, 0].abs() <= 1e-9 * scale) & (q[:, 1] >= -1e-9 * scale) & (q[:, 2] >= -1e-9 * scale))
    assert dual.all()
    # the projection is the nearest point: no other point of K on a grid of perturbations is nearer
    w = -v
    for d in (torch.tensor([1e-3, 0, 0]), torch.tensor([0, 1e-3, 0]), torch.tensor([0, 0, 1e-3])):
        other = p + d.to(F64) * scale[:, None]
        feasible = _in_k(other, 0.0)
        nearer = (other - w).norm(dim=-1) < (p - w).norm(dim=-1) - 1e-12 * scale
        assert not (feasible & nearer).any()


def test_exp_projection_root_matches_newton_from_a_near_pair():
    """The hint-free root and the refinement's Newton (started from the exact pair) agree."""
    torch.manual_seed(1)
    v = torch.randn(500, 3, dtype=F64)
    q, p = _exp_project_root(v)
    qn = _exp_project_dual(v, p, q)
    assert torch.allclose(q, qn, atol=1e-10, rtol=1e-8)


def _entr_state(qv, rtol):
    """``(A, b, c, x, y, s, spec)`` of the ``entr`` problem's cone program as the forward returns it."""
    cap = {}
    orig = cone_mod.ConeFn.forward

    def fwd(A, b, c, problem):
        out = orig(A, b, c, problem)
        cap.update(A=A.detach(), b=b.detach(), c=c.detach(), out=[t.detach() for t in out[:3]], spec=problem.spec)
        return out

    cone_mod.ConeFn.forward = staticmethod(fwd)
    try:
        entr_layer()(torch.tensor(qv, dtype=F64), solver_args={"eps": rtol})
    finally:
        cone_mod.ConeFn.forward = staticmethod(orig)
    A = cap["A"] if cap["A"].dim() == 3 else cap["A"].expand(1, *cap["A"].shape)
    return (A, cap["b"], cap["c"], *cap["out"], cap["spec"])


@pytest.mark.parametrize("rtol", [1e-8, 1e-10])
def test_exact_problem_is_solved_exactly_by_the_point(rtol):
    """``(b', c', y', s')``: the returned ``x`` with ``y', s'`` solves ``b', c'`` to rounding
    (``Ax + s' = b'``, ``Aᵀy' + c' = 0``, ``s'ᵀy' = 0``) and ``b', c'`` are within the forward's accuracy."""
    A, b, c, x, y, s, spec = _entr_state(0.0, rtol)
    b2, c2, y2, s2 = cone_mod._exact_problem(A, b, c, x, y, s, spec)
    assert ((A @ x[..., None])[..., 0] + s2 - b2).abs().max() < 1e-14
    assert ((A.mT @ y2[..., None])[..., 0] + c2).abs().max() < 1e-14
    assert (s2 * y2).sum(-1).abs().max() < 1e-12
    assert (b2 - b).abs().max() < 100 * rtol and (c2 - c).abs().max() < 100 * rtol


def test_near_singular_solve_matches_dense():
    """At the degenerate point ``M`` is within ~1e-11 of singular: the structured solve (its tight test
    and the fallback's unshifted LU) gives the dense LU's answer, forward and adjoint."""
    A, b, c, x, y, s, spec = _entr_state(0.0, 1e-10)
    b, c, y, s = cone_mod._exact_problem(A, b, c, x, y, s, spec)
    ok = torch.ones(1, dtype=torch.bool)
    M = cone_system.dense_system(A, b, c, x, y, s, ok, spec)
    torch.manual_seed(2)
    g = torch.randn(1, M.shape[-1], dtype=F64)
    for adjoint in (False, True):
        system = cone_system.ConeSystem(A[0], b, c, x, y, s, ok, spec)
        assert bool(system.tight.all())
        z = system.solve(g, adjoint=adjoint)
        ref = torch.linalg.solve(M.mT if adjoint else M, g[..., None])[..., 0]
        n = x.shape[-1]
        assert torch.allclose(z[:, :n], ref[:, :n], atol=1e-4 * (1 + ref.abs().max()))
        assert torch.allclose(z, ref, atol=1e-3 * (1 + ref.abs().max()), rtol=1e-3)


def _entr_program():
    """The ``entr`` problem as ``cone_program`` data, ``b = b₀ + q·db``, and ``f(q) = wᵀx(q)``."""
    from implicitdiff import cone_program
    x, q = cp.Variable(3), cp.Parameter()
    prob = cp.Problem(cp.Maximize(cp.sum(cp.entr(x))), [cp.sum(x) == 1, x[0] <= q])
    q.value = 0.0
    data = prob.get_problem_data(cp.SCS)[0]
    q.value = 1.0
    db = torch.tensor(prob.get_problem_data(cp.SCS)[0]["b"]) - torch.tensor(data["b"])
    A, b0, c = (torch.tensor(data[k].toarray() if k == "A" else data[k]) for k in ("A", "b", "c"))
    cones = {"z": data["dims"].zero, "l": data["dims"].nonneg, "ep": data["dims"].exp}

    def f(qv):
        return cone_program(A, b0 + qv * db, c, cones)[0][3:] @ W
    return f


@pytest.mark.parametrize("qv", [0.0, 1e-10, 1e-8, 1e-7])
def test_entr_jacrev_jacfwd_equal_grad_at_its_bound(qv):
    """Batched cotangents/tangents skip the solve's check: the tight elements must still be solved to
    rounding (they took −1.514 instead of −1.5 at ``q = 0``); and a tight element's backward error is
    measured against ``g`` alone (``grad`` was 5e-6 off at ``q = 1e-8``, 3e-7 at ``1e-7``)."""
    from torch.func import grad, jacfwd, jacrev, jvp, vjp, vmap
    f = _entr_program()
    q = torch.tensor(qv, dtype=F64)
    g = float(grad(f)(q))
    assert abs(g - (-1.5)) < 1e-7, g                       # the closed form
    assert abs(float(jvp(f, (q,), (torch.ones_like(q),))[1]) - g) < 1e-8
    assert abs(float(jacrev(f)(q)) - g) < 1e-8
    assert abs(float(jacfwd(f)(q)) - g) < 1e-8
    pull = vjp(f, q)[1]
    gv = vmap(pull)(torch.tensor([1.0, -2.0], dtype=F64))[0]
    assert torch.allclose(gv, torch.tensor([g, -2 * g], dtype=F64), rtol=0, atol=1e-8)


@pytest.mark.parametrize("qv", [0.0, 1e-8])
def test_entr_second_derivative_at_its_bound_raises(qv):
    """``φ = (wᵀx)²`` has ``φ'' = 4.5`` for ``q > 0``; at the bound the second derivative came out as
    653 (double backward) or −4.5e6 (``hessian``) with no error: both routes now refuse."""
    from implicitdiff import SolveError
    f = _entr_program()

    def phi(qv):
        return f(qv) ** 2
    q = torch.tensor(qv, dtype=F64, requires_grad=True)
    g, = torch.autograd.grad(phi(q), q, create_graph=True)
    assert abs(float(g.detach()) - 2 * (2.5 - 1.5 * qv) * (-1.5)) < 1e-6    # the first derivative still works
    with pytest.raises(SolveError, match="second derivative at a point where the exponential cone"):
        torch.autograd.grad(g, q)                          # double backward: _AdjointSolveBackward
    with pytest.raises(SolveError, match="second derivative at a point where the exponential cone"):
        torch.func.hessian(phi)(q.detach())                # forward over reverse: _AdjointSolve.jvp


def test_entr_second_derivative_off_its_bound():
    """Off the bound (no tight element) the second derivative is taken, and is the closed form's 4.5."""
    f = _entr_program()
    q = torch.tensor(1e-3, dtype=F64)
    assert abs(float(torch.func.hessian(lambda t: f(t) ** 2)(q)) - 4.5) < 1e-6
