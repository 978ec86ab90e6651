"""The gradient strategy of an implicit layer, as a value.

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

from .._core.errors import InputError
from .._core.options import check_int, check_real

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
    dense_max: int = 200

    def __post_init__(self):
        if not isinstance(self.solver, str) or self.solver not in ADJOINT_SOLVERS:
            raise InputError(f"Implicit(solver=...) must be one of {ADJOINT_SOLVERS}, got {self.solver!r}")
        check_real("Implicit(rtol=...)", self.rtol, low=0.0)
        check_real("Implicit(atol=...)", self.atol, low=0.0, allow_none=False)
        check_int("Implicit(max_iter=...)", self.max_iter, low=1)
        check_int("Implicit(dense_max=...)", self.dense_max, low=0, allow_none=False)


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


def check_adjoint(adjoint):
    if not isinstance(adjoint, (Implicit, Unroll, Neumann)):
        raise InputError(
            "adjoint must be implicitdiff.Implicit(...), implicitdiff.Unroll() or implicitdiff.Neumann(k), "
            f"got {adjoint!r}"
        )
    return adjoint
