"""The gradient strategy of an implicit layer, as a value.

Each strategy owns its solve: ``strategy.solve(system, r) -> x`` for the linear system
``J x = r`` (:class:`~implicitdiff.implicit.system.JacobianSystem`, ``J = ∂F/∂y`` or its
transpose at the solution); :class:`~implicitdiff.implicit.fixed_point_adjoint.FixedPointAdjoint`
is the fourth.

``adjoint=Implicit(...)`` (the default) differentiates the optimality condition
``F(y*, θ) = 0``: reverse mode solves ``(∂F/∂y)ᵀ u = ȳ`` and returns
``θ̄ = −(∂F/∂θ)ᵀ u``; forward mode solves ``∂F/∂y · ẏ = −∂F/∂θ · θ̇``.
``Unroll()`` backpropagates through the iterations of a differentiable solver
(memory grows with the iterations; for checking).  ``Neumann(k)`` replaces the
adjoint solve by ``k`` Richardson steps (a cheap approximation, as phantom
gradients for deep-equilibrium models).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .._core.defaults import ADJOINT_RICHARDSON_MAX_ITER, DENSE_MAX
from .._core.errors import InputError
from .._core.options import check_int, check_real
from .._core.status import Status
from .fixed_point_adjoint import picard_adjoint
from .system import JacobianSystem, flat

__all__ = ["Implicit", "Unroll", "Neumann", "ADJOINT_SOLVERS", "check_adjoint"]

ADJOINT_SOLVERS = ("auto", "lu", "cg", "minres", "gmres", "bicgstab", "richardson")


@dataclass(frozen=True)
class Implicit:
    """Exact implicit gradients through one adjoint linear solve.

    Args:
        solver: ``"auto"`` (materialize the per-element Jacobian with
            ``torch.func.jacrev`` and LU-factorize it when it has at most
            ``dense_max`` rows, else go matrix-free with GMRES, or CG for
            ``argmin``'s Hessian — positive definite at a strict minimum; MINRES
            if CG meets ``pᵀHp ≤ 0``), ``"lu"`` (always dense),
            ``"cg"``, ``"minres"``, ``"gmres"``, ``"bicgstab"`` (matrix-free, with
            vector-Jacobian products), ``"richardson"`` (the adjoint fixed-point
            iteration ``v ← (∂T/∂z)ᵀ v + z̄`` for ``fixed_point``, one product a
            step; ``u ← u + (ȳ − Jᵀu)`` for roots).  Where the forward solver factorized the
            Jacobian at the solution (Newton), ``"auto"``/``"lu"`` reuse it.
        rtol, atol, max_iter: tolerances of a matrix-free adjoint solve (its
            residual is always checked: a failure raises ``SolveError``).
        dense_max: the size threshold of ``"auto"``.
    """

    solver: str = "auto"
    rtol: Optional[float] = None
    atol: float = 0.0
    max_iter: Optional[int] = None
    dense_max: int = DENSE_MAX

    def __post_init__(self):
        if not isinstance(self.solver, str) or self.solver not in ADJOINT_SOLVERS:
            raise InputError(f"Implicit(solver=...) must be one of {ADJOINT_SOLVERS}, got {self.solver!r}")
        check_real("Implicit(rtol=...)", self.rtol, low=0.0)
        check_real("Implicit(atol=...)", self.atol, low=0.0, allow_none=False)
        check_int("Implicit(max_iter=...)", self.max_iter, low=1)
        check_int("Implicit(dense_max=...)", self.dense_max, low=0, allow_none=False)

    def resolve(self, n: int, factors=(), *, symmetric: bool = False, definite: bool = False) -> str:
        """The linear solver, ``"auto"`` resolved: LU where the forward factorized ``J`` (Newton) or
        ``n ≤ dense_max``, else CG (``definite``), MINRES (``symmetric``) or GMRES."""
        if self.solver != "auto":
            return self.solver
        if factors or n <= self.dense_max:
            return "lu"
        return "cg" if definite else "minres" if symmetric else "gmres"

    def wants_linearization(self, n: int, factors=(), problem=None) -> bool:
        """Whether a first-order backward takes its products from a recorded linearization
        (a matrix-free solve), so the forward may record its last evaluation."""
        sym, pd = (problem.symmetric, problem.definite) if problem is not None else (False, False)
        return self.resolve(n, factors, symmetric=sym, definite=pd) != "lu"

    def solve(self, system: JacobianSystem, r: torch.Tensor) -> torch.Tensor:
        """``x`` with ``J x = r`` (or ``Jᵀ x = r``), checked: LU, a Krylov method or Richardson;
        differentiable and matrix-free under double backward, ``jvp`` and ``jacrev``."""
        p = system.problem
        name = self.resolve(system.n, system.factors, symmetric=p.symmetric, definite=p.definite)
        kw = dict(rtol=self.rtol, atol=self.atol, max_iter=self.max_iter, retry_minres=self.solver == "auto")
        if name != "lu":
            route = system.route(r)
            if route == "differentiable":
                return system.differentiable("gmres" if name == "richardson" else name, r, **kw)
            if route == "dense":
                name = "lu"
        if name == "lu":
            return system.dense(r)
        if name == "richardson":
            x, info = picard_adjoint(system.products().mv, flat(r, system.bd), alpha=p.neumann_alpha,
                                     rtol=self.rtol, atol=self.atol,
                                     max_iter=ADJOINT_RICHARDSON_MAX_ITER if self.max_iter is None else self.max_iter)
        else:
            x, info, name = system.krylov(name, r, **kw)
        return system.check(x, info, r.shape, name)

    def hints(self, solver: str) -> dict:
        """The hints of a failed adjoint (or tangent) solve by ``solver`` (this strategy's, resolved)."""
        other = "Implicit(solver='lu')" if solver == "gmres" else "Implicit(solver='gmres') or 'lu'"
        return {
            Status.MAX_ITERATIONS: f"raise Implicit(max_iter=...) or loosen Implicit(rtol=...), or use {other}",
            Status.BREAKDOWN: f"the adjoint's {solver} broke down (∂F/∂y may be singular, or indefinite for CG): "
                              f"use {other}",
            Status.DIVERGED: f"the adjoint's {solver} iteration diverged: it converges only where I − ∂F/∂y (for a "
                             f"fixed point, ∂T/∂z) has spectral radius below 1; use {other}",
        }


@dataclass(frozen=True)
class Unroll:
    """Backpropagate through the solver's iterations (memory O(iterations); for checking).

    The iterations are differentiable Newton steps for ``root``/``argmin`` and
    Picard steps for ``fixed_point``, from ``y0``, until the forward tolerance
    or ``max_iter``.
    """

    max_iter: Optional[int] = None

    def __post_init__(self):
        check_int("Unroll(max_iter=...)", self.max_iter, low=1)

    def wants_linearization(self, n: int, factors=(), problem=None) -> bool:
        return False


@dataclass(frozen=True)
class Neumann:
    """Approximate the adjoint solve ``Jᵀu = ȳ`` by ``k`` Richardson steps ``u ← u + α(ȳ − Jᵀu)``.

    For ``fixed_point`` (``J = ∂T/∂z − I``) the default ``α = −1`` gives the
    truncated Neumann series ``u = −Σᵢ₌₀ᵏ⁻¹ (∂T/∂z)ᵀⁱ ȳ``; ``k = 1`` is the
    one-step ("Jacobian-free") gradient.  For ``root``/``argmin`` the default is
    ``α = 1``.  Approximate by design: no residual check.
    """

    k: int = 5
    alpha: Optional[float] = None

    def __post_init__(self):
        check_int("Neumann(k)", self.k, low=1, allow_none=False)
        check_real("Neumann(alpha=...)", self.alpha)
        if self.alpha == 0:
            raise InputError("Neumann(alpha=...) must be nonzero (the step of u ← u + α(ȳ − Jᵀu)); leave it None "
                             "for the default")

    def wants_linearization(self, n: int, factors=(), problem=None) -> bool:
        return False

    def solve(self, system: JacobianSystem, r: torch.Tensor) -> torch.Tensor:
        """``k`` Richardson steps from 0 (unchecked: approximate by design); differentiable."""
        alpha = system.problem.neumann_alpha if self.alpha is None else self.alpha
        mv = system.products().mv
        R = flat(r, system.bd)
        x = torch.zeros_like(R)
        for _ in range(int(self.k)):
            x = x + alpha * (R - mv(x))
        return x.reshape(r.shape)


def check_adjoint(adjoint, *, fixed_point: bool = False):
    """``adjoint`` if it is a strategy the layer takes (``FixedPointAdjoint`` only for fixed points)."""
    from .fixed_point_adjoint import FixedPointAdjoint

    kinds = (Implicit, Unroll, Neumann, FixedPointAdjoint) if fixed_point else (Implicit, Unroll, Neumann)
    if not isinstance(adjoint, kinds):
        extra = ", implicitdiff.FixedPointAdjoint(...)" if fixed_point else ""
        hint = "" if fixed_point or not isinstance(adjoint, FixedPointAdjoint) else \
            " (FixedPointAdjoint solves the adjoint of a fixed point: use it with fixed_point or nn.DEQ)"
        raise InputError(
            f"adjoint must be implicitdiff.Implicit(...), implicitdiff.Unroll(), implicitdiff.Neumann(k){extra}, "
            f"got {adjoint!r}{hint}"
        )
    return adjoint
