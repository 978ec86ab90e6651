"""L-BFGS minimization, batched, with a per-element backtracking line search."""

from __future__ import annotations

from typing import Callable

import torch

from .._core.errors import InputError
from .._core.status import Status
from ._loop import int_option, iterate, norm, options, where
from .result import SolverResult

__all__ = ["lbfgs"]

_ARMIJO = 1e-4       # sufficient decrease constant c
_MIN_STEP = 1e-10    # line search gives up (BREAKDOWN) below this step length (relative to the first trial)


def _two_loop(g, S, Yv, rho, h0):
    """``−H g`` for the L-BFGS inverse Hessian ``H`` built from pairs ``(S_j, Yv_j)``.

    ``S, Yv``: ``(*batch, m, n)`` oldest first; ``rho = 1/(sᵀy)`` (0 for unused
    slots, which makes them no-ops); ``h0``: ``(*batch,)`` scale of ``H₀ = h0 I``.
    """
    # Nocedal & Wright, Algorithm 7.4, batched over the leading dims; the Python loop
    # runs over the history (m terms), not over the batch.
    m = S.shape[-2]
    q = g
    a = [None] * m
    for i in reversed(range(m)):
        a[i] = rho[..., i] * (S[..., i, :] * q).sum(-1)
        q = q - a[i].unsqueeze(-1) * Yv[..., i, :]
    r = h0.unsqueeze(-1) * q
    for i in range(m):
        b = rho[..., i] * (Yv[..., i, :] * r).sum(-1)
        r = r + (a[i] - b).unsqueeze(-1) * S[..., i, :]
    return -r


def lbfgs(f: Callable, y0: torch.Tensor, params: tuple = (), *, rtol=None, atol=0.0, max_iter: int = 200,
          batch_dims: int = 0, history: int = 10, check_every=None, trace: bool = False,
          callback=None) -> SolverResult:
    """Minimize ``f(y, *params)`` by L-BFGS, batched, each element on its own.

    ``f`` returns one objective per batch element (shape ``y0.shape[:batch_dims]``;
    a scalar when ``batch_dims = 0``) and must not couple the elements.  The
    gradients ``∇f`` of every element come from one ``torch.func.grad`` of
    ``f(...).sum()``.  The direction ``d = −H ∇f`` uses the last ``history``
    pairs ``s = Δy, r = Δ∇f`` (two-loop recursion, ``H₀ = (sᵀr / rᵀr) I`` from the
    newest pair; the first direction is ``−∇f / ‖∇f‖``); a pair with
    ``sᵀr ≤ eps‖s‖‖r‖`` (no positive curvature) is not stored.  The trial
    ``y + α d`` (``α = 1`` first) is accepted on the Armijo condition
    ``f(y + αd) ≤ f(y) + c α ∇fᵀd`` (``c = 1e-4``) or, when ``f`` has stopped
    changing above rounding (``f(y + αd) ≤ f(y) + 1e4·eps·|f(y)|``), on the
    derivative form of it for a quadratic (Hager–Zhang's approximate Wolfe,
    ``∇f(y + αd)ᵀd ≤ (1 − 2c) |∇fᵀd|``), which lets L-BFGS reach gradient
    tolerances far below what ``f``'s rounding can resolve.  A rejected trial
    shrinks ``α`` by safeguarded quadratic interpolation (into ``[0.1α, 0.5α]``);
    every trial is one iteration, so each element backtracks on its own with no
    host sync.

    Stopping rule, per element ``i`` (norms over the non-batch dims)::

        ‖∇f(y_i)‖ ≤ atol + rtol · ‖∇f(y0_i)‖        rtol default: 1e-10 float64, 1e-6 float32

    Args:
        f: objective, ``f(y, *params)`` -> tensor of the batch shape;
            differentiable by ``torch.func.grad``.
        y0: starting point, ``(*batch, *event)``, float32/float64.
        params: tuple of extra arguments of ``f`` (used detached).
        rtol, atol: the stopping rule above.
        max_iter: iteration limit (one ``f`` and gradient evaluation each).
        batch_dims: leading dims of ``y0`` that index independent problems.
        history: number of stored pairs (``≥ 1``); memory ``2 · history · n`` per element.
        check_every, trace, callback: as in :func:`~implicitdiff.solvers.picard.picard`
            (with the gradient norm as the residual).

    Returns:
        :class:`SolverResult` ``(y, info, None, trace)``; ``info.residual`` is
        ``‖∇f(y)‖ / ‖∇f(y0)‖``.  Failure modes per element: ``MAX_ITERATIONS``,
        ``NONFINITE`` (the element keeps its last finite iterate),
        ``BREAKDOWN`` (no acceptable step before the step became too small to
        change ``y`` or ``α < 1e-10``: the gradient tolerance is below the
        attainable accuracy, or ``f`` is not smooth).
        An objective unbounded below shows as ``MAX_ITERATIONS`` or
        ``NONFINITE``.  Never raises on non-convergence; raises
        :class:`InputError` for malformed input.

    Example:
        >>> import torch
        >>> from implicitdiff.solvers.lbfgs import lbfgs
        >>> rosen = lambda y: (1 - y[0]) ** 2 + 100 * (y[1] - y[0] ** 2) ** 2
        >>> res = lbfgs(rosen, torch.tensor([-1.2, 1.0], dtype=torch.float64))
        >>> int(res.info.status), bool(torch.allclose(res.y, torch.ones(2, dtype=torch.float64)))
        (0, True)
    """
    opts = options(y0, params, rtol=rtol, atol=atol, max_iter=max_iter, batch_dims=batch_dims,
                   check_every=check_every, callback=callback)
    history = int_option("history", history, 1)
    if not callable(f):
        raise InputError(f"f must be a callable f(y, *params) -> objective per batch element, got {f!r}")
    shape, batch, n, params = opts.y0.shape, opts.batch_shape, opts.n, opts.params
    flat = (*batch, n)

    def total(yf):
        v = f(yf.reshape(shape), *params)
        return v.sum(), v

    value_and_grad = torch.func.grad_and_value(total, has_aux=True)

    def evaluate(yf):
        g, (_, v) = value_and_grad(yf)
        return v, g

    with torch.no_grad():
        v0 = f(opts.y0, *params)
        if not isinstance(v0, torch.Tensor) or v0.shape != batch:
            got = tuple(v0.shape) if isinstance(v0, torch.Tensor) else type(v0).__name__
            raise InputError(f"f(y, *params) must return one objective per batch element, shape {tuple(batch)} "
                             f"(batch_dims={len(batch)}), got {got}; sum or select the objective per element")
        if v0.dtype != opts.y0.dtype:
            raise InputError(f"f(y, *params) returned {v0.dtype} for y of {opts.y0.dtype}; make f keep y's dtype")
        y = opts.y0.reshape(flat)
        v, g = evaluate(y)
        eps = torch.finfo(y.dtype).eps
        h_first = 1.0 / torch.clamp(norm(g), min=torch.finfo(y.dtype).tiny)

        def step(k, y, g, state, active):
            v, d, alpha, need, S, Yv, rho, h0 = state
            # a new direction where the last trial was accepted (the two-loop is cheap: always formed)
            d_new = _two_loop(g, S, Yv, rho, h0)
            slope_new = (g * d_new).sum(-1)
            descent = torch.isfinite(slope_new) & (slope_new < 0)
            d_new = where(descent, d_new, -h0.unsqueeze(-1) * g)     # safeguard: scaled steepest descent
            d = where(need, d_new, d)
            alpha = torch.where(need, torch.ones_like(alpha), alpha)
            slope = (g * d).sum(-1)                                    # φ'(0) = ∇fᵀd < 0
            y_t = y + alpha.unsqueeze(-1) * d
            v_t, g_t = evaluate(y_t)
            finite = torch.isfinite(v_t) & torch.isfinite(g_t).all(-1) & torch.isfinite(y_t).all(-1)
            armijo = v_t <= v + _ARMIJO * alpha * slope
            flat_f = v_t <= v + 1e4 * eps * v.abs()
            approx_wolfe = flat_f & ((g_t * d).sum(-1) <= (1 - 2 * _ARMIJO) * slope.abs())
            accept = finite & (armijo | approx_wolfe)
            # quadratic through φ(0), φ'(0), φ(α): minimizer t* = −φ'(0) α² / (2 (φ(α) − φ(0) − φ'(0) α))
            t_star = -slope * alpha * alpha / (2 * (v_t - v - slope * alpha))
            t_star = torch.where(torch.isfinite(t_star) & (t_star > 0), t_star, 0.1 * alpha)
            shrunk = torch.minimum(torch.maximum(t_star, 0.1 * alpha), 0.5 * alpha)
            # stagnation: the next trial could not move y (or α is negligible), or an accepted
            # step left y unchanged — ∇f sits at its rounding floor
            tiny_step = (y + shrunk.unsqueeze(-1) * d == y).all(-1) | (shrunk < _MIN_STEP)
            stalled = (~accept & tiny_step) | (accept & (y_t == y).all(-1))
            code = torch.where(stalled, int(Status.BREAKDOWN), 0)
            # store the pair (s, r) of an accepted step with positive curvature
            s = alpha.unsqueeze(-1) * d
            r = g_t - g
            sr = (s * r).sum(-1)
            curv = accept & torch.isfinite(sr) & (sr > eps * norm(s) * norm(r))
            safe_sr = torch.where(curv, sr, torch.ones_like(sr))
            S = where(curv, torch.cat([S[..., 1:, :], s.unsqueeze(-2)], -2), S)
            Yv = where(curv, torch.cat([Yv[..., 1:, :], r.unsqueeze(-2)], -2), Yv)
            rho = where(curv, torch.cat([rho[..., 1:], (1 / safe_sr).unsqueeze(-1)], -1), rho)
            h0 = torch.where(curv, sr / torch.where(curv, (r * r).sum(-1), torch.ones_like(sr)), h0)
            alpha = torch.where(accept, alpha, shrunk)
            y_next, g_next, v_next = where(accept, y_t, y), where(accept, g_t, g), torch.where(accept, v_t, v)
            return y_next, g_next, (v_next, d, alpha, accept, S, Yv, rho, h0), code

        state = (v, torch.zeros_like(y), torch.ones_like(v), torch.ones(batch, dtype=torch.bool, device=y.device),
                 y.new_zeros(*batch, history, n), y.new_zeros(*batch, history, n), y.new_zeros(*batch, history),
                 h_first)
        out = iterate(step, y, g, state, opts, trace=trace, callback=callback,
                      unflatten=lambda t: t.reshape(shape), divergence=False)
    return SolverResult(out.y.reshape(shape), out.info, None, out.trace)
