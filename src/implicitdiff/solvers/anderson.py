"""Anderson mixing (type II, Walker–Ni) with a regularized, safeguarded least-squares step."""

from __future__ import annotations

from typing import Callable

import torch

from ._loop import float_option, int_option, flatten_root, iterate, options, where
from .result import SolverResult

__all__ = ["anderson"]


def anderson(F: Callable, y0: torch.Tensor, params: tuple = (), *, rtol=None, atol=0.0, max_iter: int = 100,
             batch_dims: int = 0, m: int = 5, beta: float = 1.0, lam: float = 1e-4, check_every=None,
             trace: bool = False, callback=None) -> SolverResult:
    """Solve ``F(y, *params) = 0`` by Anderson mixing on the fixed-point map ``y ↦ y + F(y)``.

    For a fixed point ``y = T(y)`` pass ``F(y) = T(y) − y``.  With ``g_k = F(y_k)``
    and the last ``m`` differences ``ΔY = [y_{j+1} − y_j]``, ``ΔG = [g_{j+1} − g_j]``
    (``n × m_k`` per element, ``m_k = min(k, m)``)::

        γ = argmin_γ ‖g_k − ΔG γ‖² + λ ‖γ‖²,      λ = lam · max_j ‖ΔG_j‖²
        y_{k+1} = y_k + β g_k − (ΔY + β ΔG) γ

    (``m_k = 0``: the damped Picard step ``y + β g``).  The regularization is
    relative to the largest column of ``ΔG``, so ``lam`` is scale-free and the
    normal matrix ``ΔGᵀΔG + λI`` has condition number at most about ``1 + 1/lam``.
    It is solved by a batched Cholesky (``cholesky_ex``: never raises); an
    element whose factorization fails or whose ``γ`` is not finite takes the
    plain Picard step instead, so a rank-deficient history (repeated
    directions, a stalled element) cannot crash or poison the batch.

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
        m: history length (``m ≥ 1``); memory ``2 m n`` per element.
        beta: mixing (damping) ``β > 0``.
        lam: relative Tikhonov regularization ``≥ 0`` of the least-squares step.
        check_every, trace, callback: as in :func:`~implicitdiff.solvers.picard.picard`.

    Returns:
        :class:`SolverResult` ``(y, info, None, trace)``.  Failure modes per
        element: ``MAX_ITERATIONS``, ``NONFINITE`` (the element keeps its last
        finite iterate), ``DIVERGED`` (``‖F‖`` grew past ``1e8 · ‖F(y0)‖``).
        Never raises on non-convergence; raises :class:`InputError` for
        malformed input.

    Example:
        >>> import torch
        >>> from implicitdiff.solvers.anderson import anderson
        >>> W = torch.tensor([[0.3, -0.4], [0.2, 0.1]], dtype=torch.float64)
        >>> x = torch.tensor([1.0, -0.5], dtype=torch.float64)
        >>> T = lambda y, W, x: torch.tanh(W @ y + x)
        >>> res = anderson(lambda y, W, x: T(y, W, x) - y, torch.zeros(2, dtype=torch.float64), (W, x))
        >>> int(res.info.status), bool(torch.allclose(res.y, T(res.y, W, x), atol=1e-9))
        (0, True)
    """
    opts = options(y0, params, rtol=rtol, atol=atol, max_iter=max_iter, batch_dims=batch_dims,
                   check_every=check_every, callback=callback)
    m = int_option("m", m, 1)
    beta = float_option("beta", beta, 0.0, strict=True)
    lam = float_option("lam", lam)
    with torch.no_grad():
        fun, y, g = flatten_root(F, opts)
        batch, n = opts.batch_shape, opts.n
        tiny = torch.finfo(y.dtype).tiny
        eye = torch.eye(m, dtype=y.dtype, device=y.device)

        def step(k, y, g, hist, active):
            dY, dG = hist                                        # (*batch, m, n), zero rows unused
            # Normal equations of the regularized least squares; unused (zero) rows of ΔG
            # give zero rows/columns in ΔGΔGᵀ, so their diagonal is λ > 0 and their γ is 0.
            gram = dG @ dG.mT                                     # (*batch, m, m)
            rhs = dG @ g.unsqueeze(-1)                            # (*batch, m, 1)
            reg = lam * torch.diagonal(gram, dim1=-2, dim2=-1).amax(-1) + tiny
            L, info = torch.linalg.cholesky_ex(gram + reg[..., None, None] * eye)
            gamma = torch.cholesky_solve(rhs, L).squeeze(-1)      # (*batch, m)
            fallback = (info != 0) | ~torch.isfinite(gamma).all(-1)
            gamma = where(fallback, torch.zeros_like(gamma), gamma)
            y_new = y + beta * g - ((dY + beta * dG).mT @ gamma.unsqueeze(-1)).squeeze(-1)
            g_new = fun(y_new)
            # the newest difference overwrites the oldest, in place (the least-squares step does
            # not depend on the order of the columns)
            dY[..., k % m, :] = y_new - y
            dG[..., k % m, :] = g_new - g
            return y_new, g_new, (dY, dG), None

        hist = (y.new_zeros(*batch, m, n), y.new_zeros(*batch, m, n))
        out = iterate(step, y, g, hist, opts, trace=trace, callback=callback,
                      unflatten=lambda t: t.reshape(opts.y0.shape))
    return SolverResult(out.y.reshape(opts.y0.shape), out.info, None, out.trace)
