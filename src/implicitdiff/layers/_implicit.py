"""Shared plumbing of the implicit layers: validate, build the problem, pick the strategy.

``root``, ``fixed_point``, ``argmin`` and ``custom_root`` differ only in their
optimality condition ``F`` and their default forward solver; this module turns
those into a :class:`~implicitdiff.implicit.root.RootProblem` and applies it.
"""

from __future__ import annotations

from typing import Callable


from .._core.errors import InputError
from .._core.failure import apply_on_failure, check_on_failure, nan_where_failed
from .._core.status import SolveInfo, Status
from .._core.tree import flatten
from .._core.validate import as_float_tensor, check_finite, is_vmapped
from ..implicit.adjoint import Unroll, check_adjoint
from ..implicit.krylov_adapter import krylov_solve
from ..implicit.root import RootFn, RootProblem, may_speculate
from ..implicit.unroll import unrolled_newton, unrolled_picard

__all__ = ["solve_implicit", "forward_solver", "FORWARD_HINTS"]

FORWARD_HINTS = {
    Status.MAX_ITERATIONS: "raise max_iter, loosen rtol/atol, start closer (y0), or try another solver",
    Status.NONFINITE: "the iteration produced NaN/Inf: check F for overflow, scale the problem, or damp the solver",
    Status.DIVERGED: "the iteration diverged: try solver='newton' with line search, or a damped fixed-point solver",
    Status.SINGULAR: "Newton met a singular Jacobian: start elsewhere (y0), regularize F, or use solver='broyden'",
    Status.BREAKDOWN: "the line search stalled (the tolerance may be below rounding): loosen rtol or pass atol",
}


def solve_implicit(F: Callable, y0, params: tuple, *, solve: Callable, adjoint, batch_dims: int, on_failure: str,
                   return_info: bool, what: str, symmetric: bool = False, definite: bool = False,
                   neumann_alpha: float = 1.0,
                   unroll: str = "newton", rtol=None, atol=0.0, max_iter=None, krylov: Callable = krylov_solve):
    """Solve ``F(y, *params) = 0`` from ``y0`` with ``solve`` and attach gradients by ``adjoint``.

    ``krylov(name, mv, R, *, rtol, atol, max_iter) -> (x, info)`` solves the matrix-free
    adjoint systems (default: the Krylov methods of :mod:`implicitdiff.linalg.krylov`).
    """
    check_on_failure(on_failure)
    adjoint = check_adjoint(adjoint)
    y0 = as_float_tensor("y0", y0)
    if int(batch_dims) < 0 or int(batch_dims) > y0.dim():
        raise InputError(f"batch_dims must be in [0, y0.ndim={y0.dim()}], got {batch_dims}")
    check_finite("y0", y0)
    leaves, tree = flatten(params)
    for i, leaf in enumerate(leaves):
        if leaf.is_floating_point() and leaf.dtype != y0.dtype:
            raise InputError(
                f"parameter leaf {i} has dtype {leaf.dtype} but y0 has {y0.dtype}; convert one of them"
            )
        if leaf.device != y0.device:
            raise InputError(f"parameter leaf {i} is on {leaf.device} but y0 is on {y0.device}; move them together")

    if isinstance(adjoint, Unroll):
        F_p = lambda y: F(y, *params)  # noqa: E731
        n_iter = adjoint.max_iter or max_iter or (500 if unroll == "picard" else 50)
        run = unrolled_picard if unroll == "picard" else unrolled_newton
        y, info = run(F_p, y0.detach(), batch_dims=batch_dims, rtol=rtol, atol=atol, max_iter=n_iter)
        y = _policy(y, info, on_failure, what)
        return (y, info) if return_info else y

    problem = RootProblem(F=F, solve=solve, tree=tree, batch_dims=int(batch_dims), adjoint=adjoint,
                          symmetric=symmetric, definite=definite, neumann_alpha=neumann_alpha, on_failure=on_failure, what=what,
                          hints=FORWARD_HINTS, krylov=krylov,
                          recorded=[] if may_speculate(adjoint, y0, leaves, int(batch_dims)) else None)
    y, status, residual, iterations, *_ = RootFn.apply(problem, y0, *leaves)
    info = SolveInfo(status, residual, iterations)
    return (y, info) if return_info else y


def _policy(y, info, on_failure, what):
    if is_vmapped(info.status):
        return nan_where_failed(y, info.ok)
    return apply_on_failure(y, info, on_failure, what, FORWARD_HINTS)


def forward_solver(name_or_fn, *, registry: Callable, rtol, atol, max_iter, options: dict | None):
    """Wrap a solver name (looked up in ``registry``) or a user callable as ``solve(F, y0, params, batch_dims)``."""
    options = dict(options or {})
    kw = {"rtol": rtol, "atol": atol}
    if max_iter is not None:
        kw["max_iter"] = max_iter
    if callable(name_or_fn):
        fn = name_or_fn
    else:
        fn = registry(name_or_fn)

    def solve(F, y0, params, batch_dims):
        return fn(F, y0, params, batch_dims=batch_dims, **kw, **options)

    return solve
