"""``fixed_point``: ``z* = T(z*, θ)``, reduced to the root of ``T(z) − z``."""

from __future__ import annotations

from typing import Callable

from .._core.residual import FixedPointResidual
from ..implicit.adjoint import Implicit
from ..solvers.objects import as_solver
from ._implicit import solve_implicit

__all__ = ["fixed_point", "fixed_point_residual", "FixedPointResidual"]


def fixed_point_residual(T: Callable, name: str = "T") -> FixedPointResidual:
    """``F(z, *params) = T(z, *params) − z`` as a :class:`FixedPointResidual` (``F.map`` is ``T``)."""
    return FixedPointResidual(T, name)


def fixed_point(T: Callable, z0, *params, solver="anderson", adjoint=Implicit(), rtol=None, atol=None,
                max_iter=None, batch_dims=0, on_failure="raise", return_info=False, solver_options=None):
    r"""Find ``z* = T(z*, *params)`` from ``z0``; gradients by the implicit function theorem.

    The root of ``F(z) = T(z) − z``: the adjoint system is
    ``(I − ∂T/∂z)ᵀ v = z̄`` (with ``u = −v``), so ``θ̄ = (∂T/∂θ)ᵀ v``.
    ``Neumann(k)`` truncates ``v = Σᵢ (∂T/∂z)ᵀⁱ z̄`` after ``k`` terms.

    Args:
        T: ``T(z, *params)`` returning a tensor of ``z``'s shape (pure function).
        z0: starting point (no gradient).
        solver: ``Anderson(...)`` (default ``"anderson"``: ``Anderson()``), ``Picard(...)``,
            ``Broyden(...)``, ``Newton(...)``, their names, or a callable.
        adjoint: ``Implicit(...)`` (default), ``FixedPointAdjoint(...)`` (the adjoint
            fixed point ``v = (∂T/∂z)ᵀ v + z̄`` iterated), ``Neumann(k)`` or ``Unroll()``.
        Other arguments as :func:`implicitdiff.root`; the stopping rule is
        ``‖T(z) − z‖ ≤ atol + rtol ‖T(z0) − z0‖``.

    Example:
        >>> import torch, implicitdiff as idf
        >>> a = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
        >>> z = idf.fixed_point(lambda z, a: a * z + 1.0, torch.tensor(0.0, dtype=torch.float64), a)
        >>> z.backward()                      # z* = 1/(1 − a) = 2, dz*/da = 1/(1 − a)² = 4
        >>> round(float(z.detach()), 8), round(float(a.grad), 6)
        (2.0, 4.0)
    """
    solve = as_solver(solver, rtol=rtol, atol=atol, max_iter=max_iter, solver_options=solver_options)
    return solve_implicit(fixed_point_residual(T), z0, params, solve=solve, adjoint=adjoint,
                          batch_dims=batch_dims, on_failure=on_failure, return_info=return_info,
                          what="fixed_point", neumann_alpha=-1.0, unroll="picard", rtol=rtol, atol=atol,
                          max_iter=max_iter)
