"""``argmin``: ``y* = argmin_y f(y, θ)``, reduced to the root of ``∇_y f``."""

from __future__ import annotations

from typing import Callable

import torch

from .._core.status import Status
from ..implicit.adjoint import Implicit
from ..solvers.objects import LBFGS, Newton, as_solver
from ._implicit import solve_implicit

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


def gradient_residual(f: Callable, batch_dims: int = 0) -> Callable:
    """The optimality condition of a minimum: ``F(y, *params) = ∇_y f(y, *params)``.

    ``f`` returns one value per batch element (a scalar when ``batch_dims = 0``);
    the gradient of the sum gives every element's gradient at once.
    """
    def F(y, *params):
        return torch.func.grad(lambda yy: f(yy, *params).sum())(y)
    return F


def argmin(f: Callable, y0, *params, solver="lbfgs", adjoint=Implicit(), rtol=None, atol=None, max_iter=None,
           batch_dims=0, on_failure="raise", return_info=False, solver_options=None):
    r"""Find ``y* = argmin_y f(y, *params)`` from ``y0``; gradients through ``∇_y f(y*, θ) = 0``.

    The adjoint system is ``∇²_yy f · u = ȳ`` (symmetric: Hessian-vector
    products, MINRES when matrix-free), and ``θ̄ = −∇²_θy f · u``.

    Args:
        f: ``f(y, *params)`` returning a scalar (or one value per batch element).
        y0: starting point (no gradient).
        solver: ``LBFGS(...)`` (default ``"lbfgs"``; under ``torch.func.vmap`` Newton on ``∇f``
            is used, as the objective is not vmapped), ``Newton(...)`` (on ``∇f``, its Hessian
            factorization is reused by the backward), any root solver object or name, or a callable.
        Other arguments as :func:`implicitdiff.root`; the stopping rule is
        ``‖∇f(y)‖ ≤ atol + rtol ‖∇f(y0)‖``.

    Example (ridge regression: ``y* = (XᵀX + λI)⁻¹ Xᵀt``):
        >>> import torch, implicitdiff as idf
        >>> g = torch.Generator().manual_seed(0)
        >>> X = torch.randn(20, 3, generator=g, dtype=torch.float64); t = torch.randn(20, generator=g, dtype=torch.float64)
        >>> lam = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
        >>> f = lambda w, lam: 0.5 * ((X @ w - t) ** 2).sum() + 0.5 * lam * (w ** 2).sum()
        >>> w = idf.argmin(f, torch.zeros(3, dtype=torch.float64), lam)
        >>> closed = torch.linalg.solve(X.T @ X + lam * torch.eye(3, dtype=torch.float64), X.T @ t)
        >>> bool(torch.allclose(w, closed, atol=1e-8))
        True
    """
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
