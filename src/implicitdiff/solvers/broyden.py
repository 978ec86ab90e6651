"""Broyden's ("good") quasi-Newton method with an inverse-Jacobian approximation per element."""

from __future__ import annotations

import math
from typing import Callable

import torch

from ._loop import flatten_root, iterate, norm, options, where
from .result import SolverResult

__all__ = ["broyden"]

# per-element size above which H is never stored as a dense (*batch, n, n) matrix but as
# h I plus the rank-one updates (O(k n) memory and work at iteration k)
_DENSE_MAX = 2000


def _mv(H, x):
    return (H @ x.unsqueeze(-1)).squeeze(-1)


def _rmv(H, x):
    return (x.unsqueeze(-2) @ H).squeeze(-2)


def _initial_scale(fun: Callable, y: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """``h = fᵀ J f / ‖J f‖²`` per element (``−1`` where unusable): ``H₀ = h I``."""
    # J f by a forward difference along f, one F evaluation for the whole batch (F acts on
    # the elements independently), with the step ε ‖f‖ = √eps (1 + ‖y‖) of relative size √eps:
    # accurate to ~√eps, plenty for a scale, and it asks no derivatives of F (Broyden stays
    # derivative-free).
    dtype = y.dtype
    fn = norm(f)
    eps = math.sqrt(torch.finfo(dtype).eps) * (1 + norm(y))
    step = eps / torch.clamp(fn, min=torch.finfo(dtype).tiny)
    Jf = (fun(y + step.unsqueeze(-1) * f) - f) / step.unsqueeze(-1)
    h = (f * Jf).sum(-1) / (Jf * Jf).sum(-1)
    return torch.where(torch.isfinite(h) & (h != 0), h, -torch.ones_like(h))


def broyden(F: Callable, y0: torch.Tensor, params: tuple = (), *, rtol=None, atol=0.0, max_iter: int = 100,
            batch_dims: int = 0, check_every=None, trace: bool = False, callback=None) -> SolverResult:
    """Solve ``F(y, *params) = 0`` by Broyden's good method, batched, each element on its own.

    ``H ≈ (∂F/∂y)⁻¹`` (per element, ``n × n`` on the flattened ``y``) gives the
    step ``s = −H F(y)``; ``y ← y + s`` (full step, no line search) and, with
    ``δ = F(y + s) − F(y)``, the secant update that changes ``H`` least in the
    sense of Broyden's good method (Sherman–Morrison of ``J ← J + (δ − J s) sᵀ / sᵀs``)::

        H ← H + (s − H δ) (sᵀ H) / (sᵀ H δ)

    skipped for an element whose ``|sᵀ H δ|`` is at rounding level.  One ``F``
    evaluation per iteration (plus one at the start), no derivatives of ``F``.

    ``H₀ = h I`` with the scalar ``h = F₀ᵀ J F₀ / ‖J F₀‖²`` (``F₀ = F(y0)``,
    ``J = ∂F/∂y`` at ``y0``) that best fits ``J⁻¹`` along ``F₀`` in least
    squares, with ``J F₀`` taken by a forward difference: one extra ``F``
    evaluation and no derivatives of ``F`` (forming ``J`` would cost ``n``
    Jacobian-vector products, more than the whole solve at a DEQ's size).
    For a fixed-point residual ``F(y) = T(y) − y`` with a weak ``T``,
    ``J ≈ −I`` and ``h ≈ −1`` (the first step is then ``y ← T(y)``); for a
    scalar problem the first step is a secant step.  Where the probe is not
    finite or zero, ``h = −1``.  With a Jacobian whose eigenvalues differ widely
    in sign or size, the first steps may be poor and nothing guards them (no
    line search): prefer :func:`~implicitdiff.solvers.newton.newton` for hard
    root problems.
    ``H`` is dense ``(*batch, n, n)`` when ``n ≤ min(2000, 2 max_iter)`` and kept
    as ``h I`` plus the rank-one terms otherwise (the same iterates in exact
    arithmetic; ``2 max_iter n`` memory per element, ``O(k n)`` work at
    iteration ``k``).  The state is updated in place.

    Args:
        F: residual, ``F(y, *params)`` returns a tensor of ``y``'s shape, acting
            on the batch elements independently.
        y0: starting point, any shape (0-d included), float32/float64.
        params: tuple of extra arguments of ``F`` (used detached).
        rtol, atol: stopping rule, per element ``i`` (norms over the non-batch
            dims): ``‖F(y_i)‖ ≤ atol + rtol · ‖F(y0_i)‖``; ``rtol`` defaults to
            1e-10 in float64 and 1e-6 in float32.
        max_iter: iteration limit (one ``F`` evaluation per iteration).
        batch_dims: leading dims of ``y0`` that index independent problems.
        check_every, trace, callback: as in :func:`~implicitdiff.solvers.picard.picard`.

    Returns:
        :class:`SolverResult` ``(y, info, None, trace)``.  Failure modes per
        element: ``MAX_ITERATIONS``, ``NONFINITE`` (the element keeps its last
        finite iterate), ``DIVERGED`` (``‖F‖`` grew past ``1e8 · ‖F(y0)‖``).
        Never raises on non-convergence; raises :class:`InputError` for
        malformed input.

    Example:
        >>> import torch
        >>> from implicitdiff.solvers.broyden import broyden
        >>> W = torch.tensor([[0.3, -0.4], [0.2, 0.1]], dtype=torch.float64)
        >>> x = torch.tensor([1.0, -0.5], dtype=torch.float64)
        >>> T = lambda y, W, x: torch.tanh(W @ y + x)
        >>> res = broyden(lambda y, W, x: T(y, W, x) - y, torch.zeros(2, dtype=torch.float64), (W, x))
        >>> int(res.info.status), bool(torch.allclose(res.y, T(res.y, W, x), atol=1e-9))
        (0, True)
    """
    opts = options(y0, params, rtol=rtol, atol=atol, max_iter=max_iter, batch_dims=batch_dims,
                   check_every=check_every, callback=callback)
    with torch.no_grad():
        fun, y, f, *_ = flatten_root(F, opts)
        batch, n = opts.batch_shape, opts.n
        eps = torch.finfo(y.dtype).eps
        # dense H costs n² per element and per product, the low-rank form 2 k n at iteration
        # k ≤ max_iter: dense only when it is the smaller one (same iterates either way)
        dense = n <= min(_DENSE_MAX, 2 * opts.max_iter)
        h0 = _initial_scale(fun, y, f)

        # H is updated in place: a fresh (*batch, n, n) tensor per iteration costs more than
        # the matrix-vector products on CPU (page faults); the loop never reads the state of
        # stopped elements, so updating them too is harmless.
        if dense:
            def matvec(H, x, k):
                return _mv(H[0], x)

            def rmatvec(H, x, k):
                return _rmv(H[0], x)

            def update(k, H, u, v):
                # H ← H + u vᵀ
                H[0].view(-1, n, n).baddbmm_(u.reshape(-1, n, 1), v.reshape(-1, 1, n))

            eye = torch.eye(n, dtype=y.dtype, device=y.device)
            H0 = (h0[..., None, None] * eye,)
        else:
            # after k updates, H = h I + Σ_{j<k} u_j v_jᵀ = h I + Uᵀ V over the first k rows
            def matvec(H, x, k):
                h, U, V = H
                return h.unsqueeze(-1) * x + _rmv(U[..., :k, :], _mv(V[..., :k, :], x))

            def rmatvec(H, x, k):
                h, U, V = H
                return h.unsqueeze(-1) * x + _rmv(V[..., :k, :], _mv(U[..., :k, :], x))

            def update(k, H, u, v):
                _, U, V = H
                U[..., k, :] = u
                V[..., k, :] = v

            H0 = (h0, y.new_zeros(*batch, max(opts.max_iter, 1), n), y.new_zeros(*batch, max(opts.max_iter, 1), n))

        def step(k, y, f, state, active):
            # state = (H f, *H): carrying H f saves one product per iteration, since
            # H_new f_new = H f_new + u (vᵀ f_new)
            Hf, H = state[0], state[1:]
            s = -Hf
            y_new = y + s
            f_new = fun(y_new)
            delta = f_new - f
            H_fnew = matvec(H, f_new, k)
            H_delta = H_fnew - Hf
            sH = rmatvec(H, s, k)                           # sᵀH
            denom = (sH * delta).sum(-1)                    # sᵀ H δ
            # skip the update where the denominator is at rounding level (it would blow H up)
            ok = torch.isfinite(denom) & (denom.abs() > eps * norm(s) * norm(H_delta))
            safe = torch.where(ok, denom, torch.ones_like(denom))
            u = where(ok, (s - H_delta) / safe.unsqueeze(-1), torch.zeros_like(s))
            update(k, H, u, sH)
            Hf_new = H_fnew + u * (sH * f_new).sum(-1, keepdim=True)
            return y_new, f_new, (Hf_new, *H), None

        out = iterate(step, y, f, (h0.unsqueeze(-1) * f, *H0), opts, trace=trace, callback=callback,
                      unflatten=lambda t: t.reshape(opts.y0.shape))
    return SolverResult(out.y.reshape(opts.y0.shape), out.info, None, out.trace)
