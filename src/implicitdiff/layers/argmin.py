"""``argmin``: ``y* = argmin_y f(y, θ)``, reduced to the root of ``∇_y f``."""

from __future__ import annotations

from typing import Callable

import torch
from torch.autograd import forward_ad

from .._core.defaults import DENSE_MAX, default_rtol
from .._core.errors import InputError
from .._core.failure import apply_on_failure, check_on_failure
from .._core.options import check_bool, check_callable
from .._core.status import Status
from .._core.validate import in_transform
from ..implicit.adjoint import Implicit
from ..implicit.root import GivenVJPFn
from ..solvers._loop import options
from ..solvers.lbfgs import HISTORY
from ..solvers.lbfgs_compiled import compiled_adjoint, compiled_lbfgs
from ..solvers.objects import LBFGS, Newton, as_solver
from ._implicit import check_leaves, solve_implicit

__all__ = ["argmin", "gradient_residual", "ARGMIN_HINTS"]

_UNBOUNDED = ("if the gradient norm grew (see the residual), f may be unbounded below, so no minimizer exists: "
              "add a regularizer or constraints (see qp for bounds); else raise max_iter, loosen rtol, or, if y* is "
              "far from unit scale (L-BFGS's first step has unit length), rescale y or use solver='newton'")
#: Hints of a failed argmin: a minimum that does not exist comes first.
ARGMIN_HINTS = {Status.MAX_ITERATIONS: _UNBOUNDED, Status.DIVERGED: _UNBOUNDED,
                Status.NONFINITE: "the objective or its gradient became NaN/Inf: f may be unbounded below "
                                  "(no minimizer), or overflow: scale the problem",
                Status.BREAKDOWN: "the line search stalled: f may be unbounded below or non-smooth, rtol may be "
                                  "below rounding (loosen rtol or pass atol), or y* is far from unit scale "
                                  "(rescale y, or use solver='newton')"}
#: Hints of a failed adjoint CG of ``argmin(compiled=True)`` (no LU or MINRES on that path).
_COMPILED_ADJOINT_HINTS = {
    Status.MAX_ITERATIONS: "raise Implicit(max_iter=...), or use compiled=False",
    Status.BREAKDOWN: "the Hessian is not positive definite along a CG direction, or singular (the CG iterates "
                      "overflowed along a flat direction): y* is not a strict minimum; use compiled=False, whose "
                      "Implicit() falls back to MINRES or LU and reports a singular Hessian",
    Status.NONFINITE: "the cotangent of y or a Hessian-vector product is NaN/Inf"}


def gradient_residual(f: Callable, batch_dims: int = 0) -> Callable:
    """The optimality condition of a minimum: ``F(y, *params) = ∇_y f(y, *params)``.

    ``f`` returns one value per batch element (a scalar when ``batch_dims = 0``);
    the gradient of the sum gives every element's gradient at once.
    """
    def F(y, *params):
        return torch.func.grad(lambda yy: f(yy, *params).sum())(y)
    return F


def argmin(f: Callable, y0, *params, solver="lbfgs", adjoint=Implicit(), rtol=None, atol=None, max_iter=None,
           batch_dims=0, on_failure="raise", return_info=False, solver_options=None, compiled=False):
    r"""Find ``y* = argmin_y f(y, *params)`` from ``y0``; gradients through ``∇_y f(y*, θ) = 0``.

    The adjoint system is ``∇²_yy f · u = ȳ`` (symmetric: Hessian-vector
    products, MINRES when matrix-free), and ``θ̄ = −∇²_θy f · u``.

    Args:
        f: ``f(y, *params)`` returning a scalar (or one value per batch element).
        y0: starting point (no gradient).
        solver: ``LBFGS(...)`` (default ``"lbfgs"``; under ``torch.func.vmap`` Newton on ``∇f``
            is used, as the objective is not vmapped), ``Newton(...)`` (on ``∇f``, its Hessian
            factorization is reused by the backward), any root solver object or name, or a callable.
        compiled: run L-BFGS and the adjoint conjugate gradients with each iteration one call
            compiled by Inductor (:mod:`implicitdiff.solvers.lbfgs_compiled`: what it needs, what
            it caches); for one small problem on the CPU, where eager per-operation overhead
            dominates.  The first call per ``f`` and shapes compiles (seconds).  The adjoint is
            conjugate gradients there: ``Implicit()`` (or ``Implicit(solver="cg")``) with its
            ``rtol``/``atol``/``max_iter``, no LU and no MINRES retry (``dense_max`` raises).
        Other arguments as :func:`implicitdiff.root`; the stopping rule is
        ``‖∇f(y)‖ ≤ atol + rtol ‖∇f(y0)‖``.

    Example (ridge regression: ``y* = (XᵀX + λI)⁻¹ Xᵀt``):
        >>> import torch, implicitdiff as idf
        >>> g = torch.Generator().manual_seed(0)
        >>> X = torch.randn(20, 3, generator=g, dtype=torch.float64)
        >>> t = torch.randn(20, generator=g, dtype=torch.float64)
        >>> lam = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
        >>> f = lambda w, lam: 0.5 * ((X @ w - t) ** 2).sum() + 0.5 * lam * (w ** 2).sum()
        >>> w = idf.argmin(f, torch.zeros(3, dtype=torch.float64), lam)
        >>> closed = torch.linalg.solve(X.T @ X + lam * torch.eye(3, dtype=torch.float64), X.T @ t)
        >>> bool(torch.allclose(w, closed, atol=1e-8))
        True
    """
    if check_bool("compiled", compiled):
        return _argmin_compiled(f, y0, params, solver, adjoint, rtol, atol, max_iter, batch_dims, on_failure,
                                return_info, solver_options)
    F = gradient_residual(f, batch_dims)
    solve = as_solver(solver, rtol=rtol, atol=atol, max_iter=max_iter, solver_options=solver_options,
                      allowed=("lbfgs", "newton", "broyden", "anderson", "picard"))
    if isinstance(solve, LBFGS):
        lb = solve

        def solve(F_, y0_, params, bd, **call):
            if bd != batch_dims:
                # under vmap the mechanism hands over a vmapped gradient F_ (and one more batch dim);
                # the objective itself is not vmapped, so solve ∇f = 0 by Newton on F_ instead
                return Newton(rtol=lb.rtol, atol=lb.atol, max_iter=lb.max_iter)(F_, y0_, params, bd)
            return lb(f, y0_, params, bd, **call)
    return solve_implicit(F, y0, params, solve=solve, adjoint=adjoint, batch_dims=batch_dims,
                          on_failure=on_failure, return_info=return_info, what="argmin", symmetric=True, definite=True,
                          hints=ARGMIN_HINTS,
                          unroll="newton", rtol=rtol, atol=atol, max_iter=max_iter)


def _argmin_compiled(f, y0, params, solver, adjoint, rtol, atol, max_iter, batch_dims, on_failure, return_info,
                     solver_options):
    """``argmin(..., compiled=True)``: what it cannot run raises :class:`InputError` (see the module
    docstring of :mod:`implicitdiff.solvers.lbfgs_compiled`)."""
    check_on_failure(on_failure)
    check_bool("return_info", return_info)
    lb = as_solver(solver, rtol=rtol, atol=atol, max_iter=max_iter, solver_options=solver_options,
                   allowed=("lbfgs", "newton", "broyden", "anderson", "picard"))
    need = "argmin(compiled=True) needs "
    if not isinstance(lb, LBFGS) or set(lb.options) - {"history"}:
        raise InputError(need + f"solver='lbfgs' (an LBFGS with at most history=), got {solver!r}")
    if not isinstance(adjoint, Implicit) or adjoint.solver not in ("auto", "cg") or adjoint.dense_max != DENSE_MAX:
        raise InputError(need + f"adjoint=Implicit() or Implicit(solver='cg') with rtol/atol/max_iter at most "
                                f"(its CG is compiled: no LU, so no dense_max), got {adjoint!r}")
    if in_transform():
        raise InputError(need + "to run outside torch.func transforms (vmap, grad, jacrev): use compiled=False")
    check_callable("f", f)
    kw = lb.keywords()
    opts = options(y0, params, rtol=kw.get("rtol"), atol=kw.get("atol", 0.0), batch_dims=batch_dims,
                   check_every=None, callback=None, max_iter=kw["max_iter"])
    if batch_dims != 0:
        raise InputError(need + f"one problem (batch_dims=0), got batch_dims={batch_dims}: use compiled=False")
    if not all(isinstance(p, torch.Tensor) for p in params):
        raise InputError(need + "params that are all tensors (pass constants inside f)")
    if any(forward_ad.unpack_dual(p).tangent is not None for p in params):
        raise InputError(need + "params without forward-mode tangents (torch.autograd.forward_ad): its backward is "
                                "reverse mode only; use compiled=False")
    if any(t.device.type != "cpu" for t in (opts.y0,) + tuple(params)):
        raise InputError(need + "y0 and params on the CPU (Inductor's C++ backend): use compiled=False")
    check_leaves(opts.y0, params)  # the eager path's rule (a mixed-dtype f fails inside the compiled code)
    res = compiled_lbfgs(f, opts.y0, opts.params, rtol=opts.rtol, atol=opts.atol, max_iter=opts.max_iter,
                         history=kw.get("history", HISTORY))
    y = apply_on_failure(res.y, res.info, on_failure, "argmin", ARGMIN_HINTS)
    which = tuple(i for i, p in enumerate(params) if p.requires_grad)
    if which and torch.is_grad_enabled():
        cg = dict(rtol=default_rtol(opts.y0.dtype) if adjoint.rtol is None else adjoint.rtol, atol=adjoint.atol,
                  max_iter=adjoint.max_iter if adjoint.max_iter is not None else 10 * opts.n)
        solved = int(res.info.status) == Status.SUCCESS

        def vjp(gy, *leaves):
            out = [None] * len(params)
            if not solved:  # a failed forward kept under on_failure="nan"/"warn": no gradient, as the eager path
                return out
            if torch.is_grad_enabled():
                # the backward is differentiated again (create_graph=True): the compiled CG is not
                # differentiable, so the eager implicit backward at the y* at hand (its "solver"
                # returns the compiled forward's result; y0 a copy: an input is no output)
                y_eager = argmin(f, res.y.clone(), *leaves, solver=lambda *_, **__: res, adjoint=adjoint)
                grads = torch.autograd.grad(y_eager, [leaves[i] for i in which], gy, create_graph=True,
                                            allow_unused=True)
            else:
                grads, info = compiled_adjoint(f, res.y, opts.params, gy, which, **cg)
                apply_on_failure(res.y, info, "raise", "argmin's adjoint (compiled CG)", _COMPILED_ADJOINT_HINTS)
            for i, g in zip(which, grads):
                out[i] = g
            return out

        y = GivenVJPFn.apply(vjp, y, *params)
    return (y, res.info) if return_info else y
