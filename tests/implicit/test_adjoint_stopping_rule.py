"""One stopping rule for the adjoint linear solves: ``‖residual‖ ≤ max(rtol ‖R‖, atol)``, per element.

Picard on the adjoint fixed point (``FixedPointAdjoint``), Richardson (``Implicit(solver="richardson")``,
``Neumann``'s steps) and the Krylov methods (GMRES, the fallback) stop by the same rule: with
``atol = rtol ‖R‖`` the sum rule ``atol + rtol ‖R‖`` would stop at twice that residual.
"""

import torch

from implicitdiff.implicit.fixed_point_adjoint import picard_adjoint
from implicitdiff.linalg.krylov import gmres

D = torch.float64


def _system(seed=0, n=20, batch=3):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(batch, n, n, generator=g, dtype=D)
    A = 0.9 * A / torch.linalg.matrix_norm(A, 2).reshape(batch, 1, 1)    # a contraction: ‖∂T/∂z‖ = 0.9
    R = torch.randn(batch, n, generator=g, dtype=D) * torch.tensor([[1.0], [1e-3], [10.0]], dtype=D)
    tm = lambda x: (A.mT @ x.unsqueeze(-1)).squeeze(-1)   # noqa: E731   (∂T/∂z)ᵀ x
    return tm, (lambda x: tm(x) - x), R, A.mT - torch.eye(n, dtype=D)


def test_picard_richardson_and_gmres_stop_by_the_same_rule():
    tm, mv, R, M = _system()
    rtol = 1e-6
    atol = float(rtol * R.norm(dim=-1)[0])      # the first element: atol = rtol ‖R‖; the others: one term dominates
    bound = torch.clamp(rtol * R.norm(dim=-1), min=atol)
    x_exact = torch.linalg.solve(M, R.unsqueeze(-1)).squeeze(-1)
    for name, (x, info) in {
        "picard": picard_adjoint(mv, R, rtol=rtol, atol=atol, max_iter=500),
        "picard_map": picard_adjoint(mv, R, rtol=rtol, atol=atol, max_iter=500, map_mv=tm),
        "richardson": picard_adjoint(lambda x: -mv(x), -R, alpha=0.5, rtol=rtol, atol=atol, max_iter=500),
    }.items():
        res = (mv(x) - R).norm(dim=-1)
        assert bool(info.ok.all()), name
        assert bool((res <= bound * (1 + 1e-6)).all()), (name, res / bound)
        # the sum rule would allow 2·atol on the first element: the iteration went on below atol
        assert float(res[0]) <= atol * (1 + 1e-6), name
        # ‖x − x*‖ ≤ ‖(∂T/∂z − I)⁻ᵀ‖ ‖residual‖ ≤ 10 ‖residual‖ (a contraction by 0.9)
        assert bool(((x - x_exact).norm(dim=-1) <= 10 * bound * (1 + 1e-6)).all()), name
    res = gmres(mv, R, rtol=rtol, atol=atol)
    assert bool(res.info.ok.all()) and bool(((mv(res.x) - R).norm(dim=-1) <= bound * (1 + 1e-6)).all())


class _Stub:
    """The part of a ``JacobianSystem`` that ``FixedPointAdjoint.solve`` uses, for a given ``mv``."""

    def __init__(self, mv):
        from implicitdiff.implicit.system import Products
        self.bd, self._products = 1, Products(mv)

    def route(self, r):
        return "plain"

    def products(self):
        return self._products

    def check(self, x, info, shape, solver):
        assert bool(info.ok.all())
        return x.reshape(shape)


def test_fixed_point_adjoint_with_anderson_or_broyden_stops_by_the_same_rule():
    """``FixedPointAdjoint(solver="anderson" | "broyden")`` runs the forward loop (rule ``atol + rtol ‖F(0)‖``) on
    the system scaled by its tolerance, so that it stops by the adjoint rule ``max(rtol ‖R‖, atol)`` too: with
    ``atol = rtol ‖R_0‖`` the first element's residual ends below ``atol``, not ``2 atol``."""
    from implicitdiff.implicit.fixed_point_adjoint import FixedPointAdjoint
    from implicitdiff.solvers.registry import get_root_solver

    tm, mv, R, M = _system(seed=1)
    rtol = 1e-6
    atol = float(rtol * R.norm(dim=-1)[0])
    bound = torch.clamp(rtol * R.norm(dim=-1), min=atol)
    x_exact = torch.linalg.solve(M, R.unsqueeze(-1)).squeeze(-1)
    for name in ("anderson", "broyden"):
        adj = FixedPointAdjoint(solver=name, rtol=rtol, atol=atol, fallback=None, iterate=get_root_solver(name))
        x = adj.solve(_Stub(mv), R)
        res = (mv(x) - R).norm(dim=-1)
        assert bool((res <= bound * (1 + 1e-6)).all()), (name, res / bound)
        assert float(res[0]) <= atol * (1 + 1e-6), name
        assert bool(((x - x_exact).norm(dim=-1) <= 10 * bound * (1 + 1e-6)).all()), name
