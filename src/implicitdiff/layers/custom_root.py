"""``custom_root`` / ``custom_fixed_point``: implicit gradients for any user solver (the JAXopt contract)."""

from __future__ import annotations

import functools
import inspect
from typing import Callable, Optional

import torch

from .._core.errors import InputError
from .._core.failure import check_on_failure
from .._core.options import check_callable, check_int, check_real
from .._core.status import SolveInfo, Status
from ..implicit.adjoint import Implicit, check_adjoint
from ..solvers.result import SolverResult
from ._implicit import solve_implicit
from .fixed_point import fixed_point_residual

__all__ = ["custom_root", "custom_fixed_point", "default_check_rtol"]


def _wrap_user_solver(solver: Callable, check_rtol: Optional[float], what: str, user_batch_dims: int):
    def solve(F, y0, params, batch_dims):
        out = solver(y0, *params)
        y = out.y if isinstance(out, SolverResult) else out
        if not isinstance(y, torch.Tensor):
            raise InputError(f"the solver of {what} must return a tensor (or a SolverResult) of y0's shape "
                             f"{tuple(y0.shape)} and dtype {y0.dtype}, got {type(y).__name__}")
        if y.shape != y0.shape or y.dtype != y0.dtype or y.device != y0.device:
            raise InputError(f"the solver of {what} returned a tensor of shape {tuple(y.shape)}, {y.dtype} on "
                             f"{y.device}; it must return y0's shape {tuple(y0.shape)}, {y0.dtype} on {y0.device}")
        if isinstance(out, SolverResult):
            _check_info(out.info, y0, batch_dims, what, batch_dims - user_batch_dims)
            return out
        rtol = check_rtol if check_rtol is not None else default_check_rtol(y.dtype)
        bd = batch_dims
        r, r0 = (_residual_norm(F, v, params, bd, what) for v in (y, y0))
        rel = r / torch.clamp(r0, min=torch.finfo(r.dtype).tiny)
        status = torch.where(torch.isfinite(y.reshape(*y.shape[:bd], -1)).all(-1), int(Status.SUCCESS),
                             int(Status.NONFINITE)).to(torch.int64)
        # y0 already a root (‖F(y0)‖ = 0): a y within rounding of it is one too
        floor = torch.finfo(y.dtype).eps ** 0.5 * torch.clamp(y.reshape(*y.shape[:bd], -1).norm(dim=-1), min=1.0)
        accept = (rel <= rtol) | ((r0 == 0) & (r <= floor))
        status = torch.where((status == 0) & ~accept, int(Status.MAX_ITERATIONS), status)
        return SolverResult(y, SolveInfo(status, rel, torch.zeros_like(status)))
    return solve


def _check_info(info: SolveInfo, y0: torch.Tensor, batch_dims: int, what: str, vmapped: int) -> None:
    """A returned ``SolverResult``'s info holds one entry per batch element (``y0.shape[:batch_dims]``);
    ``vmapped``: how many leading batch dims ``torch.func.vmap`` added to the user's ``batch_dims``."""
    batch_shape = y0.shape[:batch_dims]
    for field in ("status", "residual", "iterations"):
        t = getattr(info, field)
        if not isinstance(t, torch.Tensor) or t.shape != batch_shape:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            under_vmap = "" if not vmapped else (
                f". Under torch.func.vmap the solver is called once on the whole vmapped batch: y0 (here of shape "
                f"{tuple(y0.shape)}) and the vmapped parameters carry {vmapped} more leading dim(s) than "
                f"batch_dims={batch_dims - vmapped}; build the info's shape from y0's, as "
                f"y0.shape[:y0.dim() - {y0.dim() - batch_dims}], not from the shapes of one call without vmap")
            raise InputError(f"the solver of {what} returned a SolverResult whose info.{field} has shape {got}; "
                             f"it must have the batch shape {tuple(batch_shape)} (y0.shape[:batch_dims]){under_vmap}")


def _positional(signature, args: tuple, kwargs: dict, what: str) -> tuple:
    """``(y0, *params)`` of a call of the decorated solver, keyword arguments placed by its signature."""
    if args and not kwargs:
        return args
    if signature is None:
        raise InputError(f"{what} was called with keyword arguments {sorted(kwargs)}, but the solver's signature "
                         f"cannot be read to place them: pass y0 and the parameters positionally")
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as e:
        raise InputError(f"{what}: {e}") from e
    if not bound.args:
        raise InputError(f"{what} takes y0 as its first argument")
    if bound.kwargs:
        kinds = signature.parameters
        only = sorted(k for k in bound.kwargs if kinds[k].kind is inspect.Parameter.KEYWORD_ONLY)
        if only:
            raise InputError(f"{what} passes its parameters to F(y, *params) by position, so the solver's "
                             f"keyword-only arguments {only} cannot be given: bind them with functools.partial")
        missing = [k for k, v in kinds.items() if k not in bound.arguments and v.kind is not v.KEYWORD_ONLY]
        raise InputError(f"{what} passes its parameters to F(y, *params) by position: {sorted(bound.kwargs)} follow "
                         f"{missing}, which were not given; pass those too (or every parameter up to the last given)")
    return bound.args


def _residual_norm(F, y, params, bd, what):
    f = F(y, *params)
    if not isinstance(f, torch.Tensor) or f.shape != y.shape:
        got = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
        raise InputError(f"the optimality condition of {what} must return a tensor of y's shape {tuple(y.shape)}, "
                         f"got {got}")
    return f.reshape(*y.shape[:bd], -1).norm(dim=-1)


def default_check_rtol(dtype: torch.dtype) -> float:
    """The default acceptance test of a user solver's ``y``: ``‖F(y)‖ ≤ eps^(1/3) ‖F(y0)‖``
    (6e-6 in float64, 5e-3 in float32): loose enough for any solver that converged, tight enough
    that a solver returning a non-solution is never taken for one."""
    return torch.finfo(dtype).eps ** (1.0 / 3.0)


def custom_root(F: Callable, *, adjoint=Implicit(), batch_dims: int = 0, on_failure: str = "raise",
                check_rtol: Optional[float] = None, _kind: str = "custom_root"):
    r"""Decorator: give ``solver(y0, *params) -> y`` implicit gradients through ``F(y, *params) = 0``.

    ``custom_root(F)(solver)`` returns a function with ``solver``'s signature (parameters
    passed by keyword are placed in ``solver``'s order, as ``F`` takes them by position)
    whose output is differentiable in ``params`` (never in ``y0``); ``solver``
    itself need not be differentiable (it runs under ``torch.no_grad``).  It may
    return a tensor of ``y0``'s shape and dtype or a :class:`~implicitdiff.solvers.SolverResult`
    whose info has the batch shape ``y0.shape[:batch_dims]`` (anything else raises
    :class:`~implicitdiff.InputError`).  A returned ``y`` whose relative
    residual ``‖F(y)‖/‖F(y0)‖`` exceeds ``check_rtol`` (default
    :func:`default_check_rtol`: ``eps^(1/3)``) is a failure (``on_failure``), and so is a
    non-finite one: a solver that did not solve is never taken for one that did.

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
    check_callable(f"{_kind}'s optimality condition", F)
    check_adjoint(adjoint)
    batch_dims = check_int("batch_dims", batch_dims, low=0)
    check_on_failure(on_failure)
    check_rtol = check_real("check_rtol", check_rtol, low=0.0, allow_inf=True)

    def decorator(solver: Callable):
        check_callable(f"the solver decorated by {_kind}", solver)
        what = f"{_kind}({getattr(solver, '__name__', type(solver).__name__)})"
        solve = _wrap_user_solver(solver, check_rtol, what, batch_dims)
        try:
            signature = inspect.signature(solver)
        except (TypeError, ValueError):                 # a builtin or a callable without one
            signature = None

        @functools.wraps(solver)
        def wrapped(*args, **kwargs):
            y0, *params = _positional(signature, args, kwargs, what)
            return solve_implicit(F, y0, tuple(params), solve=solve, adjoint=adjoint, batch_dims=batch_dims,
                                  on_failure=on_failure, return_info=False, what=what, hints=_HINTS)
        return wrapped
    return decorator


_HINTS = {
    Status.MAX_ITERATIONS: "the decorated solver returned a y whose relative residual ‖F(y)‖/‖F(y0)‖ exceeds "
                           "check_rtol (default eps^(1/3), default_check_rtol): make it solve more accurately, or "
                           "pass a looser check_rtol if this accuracy is intended",
    Status.NONFINITE: "the decorated solver returned NaN/Inf: check it and its inputs",
}


def custom_fixed_point(T: Callable, **kwargs):
    """Decorator: as :func:`custom_root` with the optimality condition ``T(z, *params) − z = 0``."""
    check_callable("custom_fixed_point's map T", T)
    return custom_root(fixed_point_residual(T), _kind="custom_fixed_point", **kwargs)
