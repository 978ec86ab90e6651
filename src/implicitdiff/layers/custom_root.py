"""``custom_root`` / ``custom_fixed_point``: implicit gradients for any user solver (the JAXopt contract)."""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch

from .._core.status import SolveInfo, Status
from ..implicit.adjoint import Implicit
from ..solvers.result import SolverResult
from ._implicit import solve_implicit
from .fixed_point import fixed_point_residual

__all__ = ["custom_root", "custom_fixed_point"]


def _wrap_user_solver(solver: Callable, check_rtol: Optional[float]):
    def solve(F, y0, params, batch_dims):
        out = solver(y0, *params)
        if isinstance(out, SolverResult):
            return out
        y = out
        bd = batch_dims
        r = F(y, *params).reshape(*y.shape[:bd], -1).norm(dim=-1)
        r0 = F(y0, *params).reshape(*y.shape[:bd], -1).norm(dim=-1)
        rel = r / torch.clamp(r0, min=torch.finfo(r.dtype).tiny)
        status = torch.where(torch.isfinite(y.reshape(*y.shape[:bd], -1)).all(-1), int(Status.SUCCESS),
                             int(Status.NONFINITE)).to(torch.int64)
        if check_rtol is not None:
            status = torch.where((status == 0) & (rel > check_rtol), int(Status.MAX_ITERATIONS), status)
        return SolverResult(y, SolveInfo(status, rel, torch.zeros_like(status)))
    return solve


def custom_root(F: Callable, *, adjoint=Implicit(), batch_dims: int = 0, on_failure: str = "raise",
                check_rtol: Optional[float] = None):
    r"""Decorator: give ``solver(y0, *params) -> y`` implicit gradients through ``F(y, *params) = 0``.

    ``custom_root(F)(solver)`` returns a function with ``solver``'s signature
    whose output is differentiable in ``params`` (never in ``y0``); ``solver``
    itself need not be differentiable (it runs under ``torch.no_grad``).  It may
    return a tensor or a :class:`~implicitdiff.solvers.SolverResult`.  With
    ``check_rtol``, a returned ``y`` whose relative residual
    ``‖F(y)‖/‖F(y0)‖`` exceeds it is a failure (``on_failure``); non-finite
    solutions always are.

    Example:
        >>> import torch, implicitdiff as idf
        >>> F = lambda y, a: y ** 2 - a
        >>> @idf.custom_root(F)
        ... def sqrt(y0, a):                  # any solver: here a few Newton steps by hand
        ...     y = y0.clone()
        ...     for _ in range(30):
        ...         y = 0.5 * (y + a / y)
        ...     return y
        >>> a = torch.tensor(9.0, dtype=torch.float64, requires_grad=True)
        >>> y = sqrt(torch.tensor(1.0, dtype=torch.float64), a)
        >>> y.backward()
        >>> float(y.detach()), round(float(a.grad), 6)   # d√a/da = 1/(2√a)
        (3.0, 0.166667)
    """
    def decorator(solver: Callable):
        solve = _wrap_user_solver(solver, check_rtol)

        @functools.wraps(solver)
        def wrapped(y0, *params):
            return solve_implicit(F, y0, params, solve=solve, adjoint=adjoint, batch_dims=batch_dims,
                                  on_failure=on_failure, return_info=False, what=f"custom_root({solver.__name__})")
        return wrapped
    return decorator


def custom_fixed_point(T: Callable, **kwargs):
    """Decorator: as :func:`custom_root` with the optimality condition ``T(z, *params) − z = 0``."""
    return custom_root(fixed_point_residual(T), **kwargs)
