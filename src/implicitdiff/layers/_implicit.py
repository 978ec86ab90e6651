"""Shared plumbing of the implicit layers: validate, build the problem, pick the strategy.

``root``, ``fixed_point``, ``argmin`` and ``custom_root`` differ only in their
optimality condition ``F`` and their default forward solver; this module turns
those into a :class:`~implicitdiff.implicit.root.RootProblem` and applies it.  Under
``torch.compile`` the solve runs eagerly: :func:`~implicitdiff._core.torch_private.eager_under_compile`
(why: docs/architecture.md, "Under torch.compile").
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch

from .._core.errors import InputError
from .._core.failure import apply_on_failure, check_on_failure, nan_where_failed
from .._core.options import check_bool, check_int
from .._core.status import SolveInfo, Status
from .._core.torch_private import eager_under_compile
from .._core.tree import flatten
from .._core.validate import as_float_tensor, check_finite, is_vmapped
from ..implicit.adjoint import Unroll, check_adjoint
from ..implicit.fixed_point_adjoint import FixedPointAdjoint
from ..implicit.root import RootFn, RootProblem, may_speculate
from ..solvers.objects import Newton, Picard, Solver
from ..solvers.registry import get_root_solver

__all__ = ["solve_implicit", "check_leaves", "FORWARD_HINTS"]

FORWARD_HINTS = {
    Status.MAX_ITERATIONS: "raise max_iter, loosen rtol/atol, start closer (y0), or try another solver; if the "
                           "residual stalls far from 0, F may have no root (check that a solution exists)",
    Status.NONFINITE: "the iteration produced NaN/Inf: check F for overflow, scale the problem, or damp the solver",
    Status.DIVERGED: "the iteration diverged: F may have no root near y0 (check that a solution exists), or the "
                     "solver overshoots: try solver='newton' with line search, or a damped fixed-point solver",
    Status.SINGULAR: "Newton met a singular Jacobian: F may have no root (a residual stuck away from 0 at a "
                     "minimum of ‖F‖), or a flat direction; start elsewhere (y0), regularize F, or use solver='broyden'",
    Status.BREAKDOWN: "the line search stalled near the tolerance (it may be below rounding): loosen rtol or "
                      "pass atol",
}

#: The hint of a stalled line search far above the tolerance (a relative residual above ``max(10 · rtol, √eps)``).
STALL_HINT = ("the residual stagnates at a non-zero local minimum of ‖F‖ (the line search found no decrease): "
              "a root may not exist — check that F(y) = 0 has a solution, or start elsewhere (y0)")


@eager_under_compile
def solve_implicit(F: Callable, y0, params: tuple, *, solve: Callable, adjoint, batch_dims: int, on_failure: str,
                   return_info: bool, what: str, symmetric: bool = False, definite: bool = False,
                   neumann_alpha: float = 1.0, hints: dict | None = None,
                   unroll: str = "newton", rtol=None, atol=0.0, max_iter=None, records=None,
                   direct=None):
    """Solve ``F(y, *params) = 0`` from ``y0`` with ``solve`` and attach gradients by ``adjoint``.

    ``adjoint``: the strategy, which owns the backward's linear solve (a ``FixedPointAdjoint``
    only where ``F`` is a fixed-point residual, ``neumann_alpha = −1``).
    ``hints``: status → hint of a failed forward solve (default :data:`FORWARD_HINTS`).
    ``records``: whether ``solve`` takes ``recorder=`` (default: a solver object's ``records``);
    ``direct``: ``F`` evaluated more cheaply at these very parameters (``RootProblem.direct``).
    """
    check_on_failure(on_failure)
    check_bool("return_info", return_info)
    adjoint = check_adjoint(adjoint, fixed_point=neumann_alpha == -1.0)
    if isinstance(adjoint, FixedPointAdjoint) and adjoint.solver != "picard" and adjoint.iterate is None:
        adjoint = replace(adjoint, iterate=get_root_solver(adjoint.solver))  # implicit/ does not import solvers/
    batch_dims = check_int("batch_dims", batch_dims, low=0)
    y0 = as_float_tensor("y0", y0)
    if batch_dims > y0.dim():
        raise InputError(f"batch_dims must be in [0, y0.ndim={y0.dim()}], got {batch_dims}")
    leaves, tree = flatten(params)
    check_leaves(y0, leaves)
    if y0.device.type == "meta":
        raise InputError("y0 is a meta tensor: it has a shape but no values to solve from; "
                         "pass a tensor on a real device (cpu or cuda)")
    check_finite("y0", y0)
    if y0.numel() == 0:
        # nothing to solve: the empty solution, connected to the parameters (zero gradients)
        y = y0.detach().clone()
        for leaf in leaves:
            if leaf.requires_grad and leaf.is_floating_point():
                y = y + leaf.sum() * 0
        info = _empty_info(y0, batch_dims)
        return (y, info) if return_info else y
    # a caller's own BREAKDOWN hint (argmin's: ‖∇f‖ is no residual of a root) replaces the stall hint too
    stall_hint = STALL_HINT if hints is None or Status.BREAKDOWN not in hints else None
    hints = FORWARD_HINTS if hints is None else {**FORWARD_HINTS, **hints}

    if isinstance(adjoint, Unroll):
        if isinstance(solve, Solver):  # the stopping rule of the solver object
            rtol, atol, max_iter = solve.rtol, solve.atol, solve.max_iter
        atol = 0.0 if atol is None else atol
        # the same solver with autograd on: Picard for a fixed point, plain Newton for a root
        n_iter = adjoint.max_iter or max_iter or (500 if unroll == "picard" else 50)
        unrolled = Picard(rtol=rtol, atol=atol, max_iter=n_iter) if unroll == "picard" else \
            Newton(rtol=rtol, atol=atol, max_iter=n_iter, line_search=False)
        res = unrolled(F, y0.detach(), params, batch_dims, differentiable=True)
        y, info = res.y, res.info
        y = _policy(y, info, on_failure, what, hints)
        return (y, info) if return_info else y

    problem = RootProblem(F=F, solve=solve, tree=tree, batch_dims=int(batch_dims), adjoint=adjoint,
                          symmetric=symmetric, definite=definite, neumann_alpha=neumann_alpha, on_failure=on_failure, what=what,
                          hints=hints, stall_rtol=solve.rtol if isinstance(solve, Solver) else rtol,
                          stall_hint=stall_hint, direct=direct,
                          speculative=(isinstance(solve, Solver) and solve.records if records is None else records)
                          and may_speculate(adjoint, y0, leaves, int(batch_dims)))
    y, status, residual, iterations, *_ = RootFn.apply(problem, y0, *leaves)
    info = SolveInfo(status, residual, iterations)
    return (y, info) if return_info else y


def _policy(y, info, on_failure, what, hints):
    if is_vmapped(info.status):
        return nan_where_failed(y, info.ok)
    return apply_on_failure(y, info, on_failure, what, hints)


def _empty_info(y0, batch_dims):
    shape = y0.shape[:batch_dims]
    z = torch.zeros(shape, dtype=torch.int64, device=y0.device)
    return SolveInfo(z, torch.zeros(shape, dtype=y0.dtype, device=y0.device), z.clone())


def check_leaves(y0: torch.Tensor, leaves) -> None:
    """The parameters' rule: a floating leaf has ``y0``'s dtype, and every leaf is on ``y0``'s device."""
    for i, leaf in enumerate(leaves):
        if leaf.is_floating_point() and leaf.dtype != y0.dtype:
            raise InputError(f"parameter leaf {i} has dtype {leaf.dtype} but y0 has {y0.dtype}; convert one of them")
        if leaf.device != y0.device:
            raise InputError(f"parameter leaf {i} is on {leaf.device} but y0 is on {y0.device}; move them together")
