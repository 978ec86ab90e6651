"""Newton's method with a per-element backtracking line search; returns the LU of the final Jacobian."""

from __future__ import annotations

from typing import Callable

import torch

from .._core.status import Status
from .._core.jacobian import batch_jacobian
from ..linalg.lu import LU
from ._loop import flatten_root, iterate, options, where
from .result import SolverResult

__all__ = ["newton", "batch_jacobian"]  # batch_jacobian re-exported from _core.jacobian

_ARMIJO = 1e-4       # sufficient decrease constant c
_MIN_STEP = 1e-10    # line search gives up (BREAKDOWN) below this step length


def newton(F: Callable, y0: torch.Tensor, params: tuple = (), *, rtol=None, atol=0.0, max_iter: int = 50,
           batch_dims: int = 0, line_search: bool = True, check_every=None, trace: bool = False,
           callback=None, differentiable: bool = False) -> SolverResult:
    """Solve ``F(y, *params) = 0`` by Newton's method, batched, each element on its own.

    Each element ``b`` of the batch is a problem of size ``n = prod(y0.shape[batch_dims:])``
    (``y`` flattened).  A new direction solves ``J d = −F(y)`` with the LU of the
    per-element Jacobian ``J = ∂F/∂y`` (``(*batch, n, n)``, formed with ``n``
    vector-Jacobian products for the whole batch).  With ``line_search`` the trial
    ``y + α d`` (``α = 1`` first) is accepted when ``‖F(y + α d)‖² ≤ (1 − 2cα) ‖F(y)‖²``
    (Armijo on ``‖F‖²``, ``c = 1e-4``; non-finite trials are rejected); otherwise
    ``α`` shrinks by safeguarded quadratic interpolation (to within ``[0.1α, 0.5α]``).
    Every trial is one iteration, so backtracking runs without a host sync and
    each element backtracks on its own; the Jacobian is only recomputed after
    an accepted step.  At the end the Jacobian at the *returned* ``y`` is
    factorized once more, for the backward to reuse.

    Args:
        F: residual, ``F(y, *params)`` returns a tensor of ``y``'s shape, acting
            on the batch elements independently; must be differentiable by
            ``torch.func.vjp`` (no in-place ops on inputs, no ``.item()``).
        y0: starting point, any shape (0-d included), float32/float64.
        params: tuple of extra arguments of ``F`` (used detached).
        rtol, atol: stopping rule, per element ``i`` (norms over the non-batch
            dims): ``‖F(y_i)‖ ≤ atol + rtol · ‖F(y0_i)‖``; ``rtol`` defaults to
            1e-10 in float64 and 1e-6 in float32.
        max_iter: iteration limit (one ``F`` evaluation per iteration; an
            iteration that starts a new direction also forms a Jacobian).
        batch_dims: leading dims of ``y0`` that index independent problems.
        line_search: backtrack (default) or always take the full Newton step.
        check_every, trace, callback, differentiable: as in :func:`~implicitdiff.solvers.picard.picard`
            (``differentiable``: no Jacobian factorization is returned).

    Returns:
        :class:`SolverResult` ``(y, info, jacobian, trace)`` with ``jacobian`` the
        :class:`~implicitdiff.linalg.LU` of ``∂F/∂y`` at the returned ``y``
        (``(*batch, n, n)``) and ``info.cond`` its 1-norm condition estimate
        (``inf`` where singular).  Failure modes per element: ``SINGULAR``
        (a Jacobian could not be inverted), ``BREAKDOWN`` (the line search
        stalled: no decrease of ``‖F‖²`` before the step became too small to
        change ``y`` or below 1e-10 — e.g. the tolerance is below the
        attainable accuracy, or a local minimum of ``‖F‖``), ``MAX_ITERATIONS``, ``NONFINITE``, and without line search ``DIVERGED``
        (``‖F‖`` grew past ``1e8 · ‖F(y0)‖``).  Never raises on
        non-convergence; raises :class:`InputError` for malformed input.

    Example:
        >>> import torch
        >>> from implicitdiff.solvers.newton import newton
        >>> theta = torch.tensor([8.0, 27.0], dtype=torch.float64)
        >>> res = newton(lambda y, t: y ** 3 - t, torch.ones(2, dtype=torch.float64), (theta,), batch_dims=1)
        >>> res.info.status.tolist(), bool(torch.allclose(res.y, torch.tensor([2.0, 3.0], dtype=torch.float64)))
        ([0, 0], True)
    """
    opts = options(y0, params, rtol=rtol, atol=atol, max_iter=max_iter, batch_dims=batch_dims,
                   check_every=check_every, callback=callback, differentiable=differentiable)
    line_search = bool(line_search)
    on_cpu = opts.y0.device.type == "cpu"
    with torch.set_grad_enabled(torch.is_grad_enabled() and differentiable):
        fun, y, f, *_ = flatten_root(F, opts)
        batch = opts.batch_shape
        no_code = torch.zeros(batch, dtype=torch.int64, device=y.device)

        def step(k, y, f, extra, active):
            d, alpha, need = extra
            code = no_code
            # a new Newton direction where the last trial was accepted (on CPU, skip the
            # Jacobian when every running element is backtracking; on CUDA that test
            # would sync, so the Jacobian is formed anyway and discarded)
            if not on_cpu or bool((need & active).any()):
                J = batch_jacobian(fun, y)
                LU_, piv, info = torch.linalg.lu_factor_ex(J)
                d_new = -torch.linalg.lu_solve(LU_, piv, f.unsqueeze(-1)).squeeze(-1)
                singular = (info != 0) | ~torch.isfinite(d_new).all(-1)
                code = torch.where(need & singular, int(Status.SINGULAR), code)
                d = where(need, d_new, d)
                alpha = torch.where(need, torch.ones_like(alpha), alpha)
            y_t = y + alpha.unsqueeze(-1) * d
            f_t = fun(y_t)
            if not line_search:
                return y_t, f_t, (d, alpha, torch.ones_like(need)), code
            # Armijo on φ(α) = ‖F(y + αd)‖²: φ'(0) = 2 Fᵀ J d = −2 φ(0) for the Newton direction,
            # so sufficient decrease reads φ(α) ≤ (1 − 2cα) φ(0).
            phi0 = (f * f).sum(-1)
            phi = (f_t * f_t).sum(-1)
            accept = torch.isfinite(phi) & torch.isfinite(y_t).all(-1) & (phi <= (1 - 2 * _ARMIJO * alpha) * phi0)
            # Quadratic model through φ(0), φ'(0) = −2φ(0) and φ(α):
            #   q(t) = φ0 − 2φ0 t + K t²,  K = (φ − φ0 + 2φ0 α)/α²  (> 0 whenever Armijo fails),
            # minimized at t* = φ0 α² / (φ − φ0 + 2φ0 α); keep t* in [0.1α, 0.5α].
            t_star = phi0 * alpha * alpha / (phi - phi0 + 2 * phi0 * alpha)
            t_star = torch.where(torch.isfinite(t_star), t_star, 0.1 * alpha)
            shrunk = torch.minimum(torch.maximum(t_star, 0.1 * alpha), 0.5 * alpha)
            # stagnation: the next trial could not move y (or α is negligible), or a trial was
            # "accepted" only because (1 − 2cα) rounded to 1 — ‖F‖ sits at its rounding floor
            tiny_step = (y + shrunk.unsqueeze(-1) * d == y).all(-1) | (shrunk < _MIN_STEP)
            stalled = (~accept & tiny_step) | (accept & (phi >= phi0))
            code = torch.where(stalled & (code == 0), int(Status.BREAKDOWN), code)
            y_next = where(accept, y_t, y)
            f_next = where(accept, f_t, f)
            alpha = torch.where(accept, alpha, shrunk)
            return y_next, f_next, (d, alpha, accept), code

        extra = (torch.zeros_like(y), torch.ones(batch, dtype=y.dtype, device=y.device),
                 torch.ones(batch, dtype=torch.bool, device=y.device))
        out = iterate(step, y, f, extra, opts, trace=trace, callback=callback,
                      unflatten=lambda t: t.reshape(opts.y0.shape), divergence=not line_search)
        if differentiable:
            return SolverResult(out.y.reshape(opts.y0.shape), out.info, None, out.trace)
        # the Jacobian at the returned y, factorized once for the backward
        lu, rcond = LU.factor(batch_jacobian(fun, out.y))
        cond = torch.where(rcond > 0, 1.0 / rcond, torch.full_like(rcond, float("inf")))
    info = out.info._replace(cond=cond)
    return SolverResult(out.y.reshape(opts.y0.shape), info, lu, out.trace)
