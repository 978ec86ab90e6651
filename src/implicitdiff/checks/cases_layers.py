"""Self-check cases of the other layers: ``qp``, ``cone_program``, ``CvxpyLayer``, ``deq`` and the projections.

Each case has a closed form (or the unrolled iteration) as its reference, valid near the
case's data: a QP or a projection is smooth where its active set does not change, so the
data keep every constraint clearly active or clearly inactive (the reference fixes that
active set and checks its value against the layer's).  The ``CvxpyLayer`` case is registered
only where ``cvxpy`` is installed (an optional dependency).
"""

from __future__ import annotations

import importlib.util

import torch

from ..layers.cone_program import cone_program
from ..layers.deq import deq
from ..layers.projections import project_box, project_l2_ball, project_simplex
from ..layers.qp import qp
from ..implicit.adjoint import Unroll
from .selfcheck import register_case


def _t(data, device, dtype):
    return torch.tensor(data, device=device, dtype=dtype)


# -- qp -----------------------------------------------------------------------------------------------------


@register_case("qp/active_inequality_and_equality", layer="qp")
def _qp(device, dtype):
    # min ½zᵀQz + pᵀz  s.t.  z ≤ h,  1ᵀz = b: at these data z₀ ≤ h₀ is active (multiplier ≈ 3.5) and the
    # other two inequalities are inactive by 0.65 or more, so near them z solves the KKT system of the
    # active rows (the reference) — the same map by one dense solve.
    Q = _t([[2.0, 0.5, 0.0], [0.5, 1.5, 0.2], [0.0, 0.2, 1.0]], device, dtype)
    p = _t([-3.0, 1.0, 0.5], device, dtype)
    h = _t([0.2, 1.0, 1.0], device, dtype)
    b = _t([0.3], device, dtype)
    G = torch.eye(3, device=device, dtype=dtype)
    A = torch.ones(1, 3, device=device, dtype=dtype)

    def fn(Q, p, h, b):
        return qp(Q, p, G.to(p.dtype), h, A.to(p.dtype), b)

    def reference(Q, p, h, b):  # [[Q, Cᵀ], [C, 0]] [z; μ] = [−p; d] with C = [G₀; A] the active rows
        C = torch.cat([G[:1], A]).to(p.dtype)
        K = torch.cat([torch.cat([0.5 * (Q + Q.mT), C.mT], 1), torch.cat([C, C.new_zeros(2, 2)], 1)])
        return torch.linalg.solve(K, torch.cat([-p, h[:1], b]))[:3]

    return fn, (Q, p, h, b), reference


# -- cone_program -------------------------------------------------------------------------------------------


@register_case("cone_program/second_order_cone", layer="cone_program")
def _socp(device, dtype):
    # min cᵀx  s.t.  ‖b₁: + x‖ ≤ b₀ (A = [0; −I], the slack s = b − Ax in the cone of size 3):
    # x* = −b₁: − b₀ c/‖c‖ in closed form
    A = torch.cat([torch.zeros(1, 2), -torch.eye(2)]).to(device=device, dtype=dtype)
    b = _t([1.5, 0.3, -0.2], device, dtype)
    c = _t([1.0, -2.0], device, dtype)

    def fn(b, c):
        return cone_program(A.to(b.dtype), b, c, {"q": [3]})[0]

    return fn, (b, c), (lambda b, c: -b[1:] - b[0] * c / torch.linalg.vector_norm(c))


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


if _has("cvxpy"):
    @register_case("CvxpyLayer/simplex_projection", layer="CvxpyLayer")
    def _cvxpy(device, dtype):
        # argmin ‖x − q‖² over the probability simplex, written in cvxpy; the reference is project_simplex
        import cvxpy as cp

        from ..nn import CvxpyLayer

        x, q = cp.Variable(3), cp.Parameter(3)
        problem = cp.Problem(cp.Minimize(cp.sum_squares(x - q)), [cp.sum(x) == 1, x >= 0])
        layer = CvxpyLayer(problem, parameters=[q], variables=[x])
        return (lambda q: layer(q)[0]), (_t([0.6, 0.3, -0.5], device, dtype),), project_simplex


# -- deq ----------------------------------------------------------------------------------------------------


class _Cell(torch.nn.Module):
    """``tanh(W z + x)`` with ``‖W‖₂ = 0.5``: a contraction, so the fixed point is unique and smooth."""

    def __init__(self, W):
        super().__init__()
        self.W = W

    def forward(self, z, x):
        return torch.tanh(z @ self.W.mT + x)


@register_case("deq/tanh_cell_vs_unroll", layer="deq")
def _deq(device, dtype):
    W = torch.randn(4, 4, dtype=torch.float64)
    W = (0.5 * W / torch.linalg.matrix_norm(W, 2)).to(device=device, dtype=dtype)
    x = torch.randn(2, 4, dtype=torch.float64).to(device=device, dtype=dtype)
    rtol = 1e-13 if dtype == torch.float64 else 1e-6

    def fn(x):
        return deq(_Cell(W.to(x.dtype)), x, rtol=rtol)

    def unrolled(x):  # autograd through the iterations instead of the implicit adjoint
        return deq(_Cell(W.to(x.dtype)), x, rtol=rtol, adjoint=Unroll())

    return fn, (x,), unrolled


# -- projections --------------------------------------------------------------------------------------------


@register_case("projections/simplex", layer="projections")
def _simplex(device, dtype):
    # support S = {0, 1} (x₂ is 0.85 below the threshold τ = 0.05): z_S = x_S − (Σ x_S − r)/|S|, zero elsewhere
    x, r = _t([0.9, 0.4, -0.8], device, dtype), _t(1.2, device, dtype)

    def reference(x, r):
        zs = x[:2] - (x[:2].sum() - r) / 2
        return torch.cat([zs, torch.zeros_like(x[2:])])

    return project_simplex, (x, r), reference


@register_case("projections/l2_ball", layer="projections")
def _l2_ball(device, dtype):
    x, r = _t([3.0, -4.0, 1.0], device, dtype), _t(2.0, device, dtype)  # ‖x‖ ≈ 5.1 > r: on the sphere
    return project_l2_ball, (x, r), (lambda x, r: r * x / torch.linalg.vector_norm(x))


@register_case("projections/box", layer="projections")
def _box(device, dtype):
    # x₀ below, x₁ inside, x₂ above its bounds (by 0.5 or more): z = (lower₀, x₁, upper₂)
    x = _t([-1.0, 0.3, 2.0], device, dtype)
    lower, upper = _t([0.0, -1.0, 0.0], device, dtype), _t([1.0, 1.0, 1.5], device, dtype)
    return project_box, (x, lower, upper), (lambda x, lower, upper: torch.stack([lower[0], x[1], upper[2]]))
