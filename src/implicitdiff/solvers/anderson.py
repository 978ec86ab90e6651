"""Anderson mixing (type II, Walker–Ni) with a regularized, safeguarded least-squares step."""

from __future__ import annotations

import math
from typing import Callable

import torch

from .._core.options import check_int, check_real
from ._loop import fixed_point_step, flatten_root, iterate, options
from .result import SolverResult

__all__ = ["anderson"]


def anderson(F: Callable, y0: torch.Tensor, params: tuple = (), *, rtol=None, atol=0.0, max_iter: int = 100,
             batch_dims: int = 0, m: int = 5, beta: float = 1.0, lam: float = 1e-4, start_rate: float = 0.0,
             check_every=None, trace: bool = False, callback=None, freeze: bool = True, recorder=None) -> SolverResult:
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

    Lazy start (``start_rate = ρ > 0``): while the worst running element's ``‖g‖ / tol`` shrinks
    by ``ρ²`` every two steps, the iteration takes the plain step ``y + β g`` and keeps no history
    (the one loop, :func:`~implicitdiff.solvers._loop.iterate`, with the plain step and its
    ``rate`` stop); mixing starts, its history seeded with the last plain step, at the first check
    where it shrank less (or an element became NaN), or once half of ``max_iter`` is spent.  A fast
    contraction — a deep equilibrium cell with ``ρ(∂f/∂z) ≈ 0.35`` — thus costs Picard's iteration
    and no mixing, which on such cells (eigenvalues of ``∂f/∂z`` filling a disk) saves no
    evaluation of ``F`` anyway; a slow or non-contractive one gets Anderson.  ``start_rate = 0``
    (default) mixes from the first step, as above.

    Cost per iteration, beyond the one evaluation of ``F``: two passes over
    ``ΔG`` (the new row of ``ΔGᵀΔG``, updated in place rather than recomputed,
    and ``ΔGᵀg``), one over ``ΔY + βΔG`` (kept instead of ``ΔY``), an ``m × m``
    Cholesky, and about 25 small tensor operations (about half a cell evaluation of
    the DEQ in ``benchmarks/deq.py``; figures in ``docs/benchmarks.md``).

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
        start_rate: lazy start ``0 ≤ ρ < 1``: plain steps while every running element's residual
            shrinks by this factor per step (checked over two steps, above); 0 mixes from the first step.
        check_every, trace, callback: as in :func:`~implicitdiff.solvers.picard.picard`.
        recorder: as in :func:`~implicitdiff.solvers.picard.picard`.
        freeze: as in :func:`~implicitdiff.solvers.picard.picard` (the freeze policy of the one loop,
            :func:`~implicitdiff.solvers._loop.iterate`), for the lazy start's plain steps and the mixing
            alike: with ``False`` the batch steps without masks, one host read per step, until every
            element meets the tolerance.  After a lazy start, mixing starts from where the plain
            steps stopped, their last step the first column of its history.

    Returns:
        :class:`SolverResult` ``(y, info, None, trace, recording)``.  Failure modes per
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
    m = check_int("m", m, low=1, allow_none=False)
    beta = check_real("beta", beta, low=0.0, low_open=True, allow_none=False)
    lam = check_real("lam", lam, low=0.0, allow_none=False)
    start_rate = check_real("start_rate (the per-step residual reduction below which mixing starts)", start_rate,
                            low=0.0, high=1.0, high_open=True, allow_none=False)
    with torch.no_grad():
        fun, y, g, tmap, record = flatten_root(F, opts, recorder=recorder)
        batch, n = opts.batch_shape, opts.n
        nb = math.prod(batch)                                     # the batch, flattened (1 if none)
        tiny = torch.finfo(y.dtype).tiny
        eye = torch.eye(m, dtype=y.dtype, device=y.device)

        # State (batch flattened, 3-d for bmm): X = y + β g, the plain step from the current
        # iterate; U = ΔX = ΔY + β ΔG and ΔG, (m, nb, n): column j of the maths is the
        # contiguous block j here, the newest overwriting the oldest in place (the least-squares
        # step does not depend on the order of the columns; bmm reads the permuted views
        # (nb, h, n) without a copy); the Gram matrix G = ΔG ΔGᵀ (nb, m, m) and the
        # right-hand side r = ΔG g (nb, h, 1), kept up to date by two (1, n) @ (n, h) products
        # per iteration instead of being recomputed (rows of ΔG that did not change keep their
        # inner products).  Before the history is full only its first h = k rows exist and are
        # used (the buffers start uninitialized: no zero fill, no reads of garbage).
        def mix(X, U, G, r, h, shape):
            """``y + β g − (ΔY + β ΔG) γ`` from the ``h ≥ 1`` history rows in use."""
            Gh = G[:, :h, :h]
            # Normal equations of the regularized least squares, λ = lam · max_j ‖ΔG_j‖² + tiny
            reg = torch.diagonal(Gh, dim1=-2, dim2=-1).amax(-1, keepdim=True).mul_(lam).add_(tiny)
            L, info = torch.linalg.cholesky_ex(torch.addcmul(Gh, reg.unsqueeze(-1), eye[:h, :h]))
            gamma = torch.cholesky_solve(r, L)                    # (nb, h, 1)
            # safeguard: a failed factorization or a non-finite γ takes the plain step γ = 0
            # (|Σγ| < inf is False for NaN and ±Inf)
            ok = (info == 0) & (gamma.sum((-2, -1)).abs() < math.inf)
            gamma = torch.where(ok[:, None, None], gamma, 0.0)
            # as a (1, h) @ (h, n) product: on CPU a batched (n, h) @ (h, 1) product is several
            # times slower
            return torch.baddbmm(X.reshape(nb, 1, n), gamma.mT, U[:h].transpose(0, 1), alpha=-1).view(shape)

        def step(k, y, g, state, active, ev=None):
            X, U, dG, G, r, k0 = state                            # k0: the step the history started at
            h = min(k - k0, m)                                    # rows in use
            y_new = X if h == 0 else mix(X, U, G, r, h, y.shape)  # empty history: γ = 0
            g_new = (ev or fun)(y_new)
            X_new = torch.add(y_new, g_new, alpha=beta)
            kk = k - k0
            j = kk % m
            torch.sub(X_new.reshape(nb, n), X.reshape(nb, n), out=U[j])
            torch.sub(g_new.reshape(nb, n), g.reshape(nb, n), out=dG[j])
            # the new row (= column) of G and the next right-hand side, from the rows in use
            dGh = dG[:min(kk + 1, m)].permute(1, 2, 0)            # (nb, n, h')
            row = torch.bmm(dG[j].unsqueeze(1), dGh)             # (nb, 1, h')
            G[:, j:j + 1, :row.shape[-1]] = row
            G[:, :row.shape[-1], j:j + 1] = row.mT
            r = torch.bmm(g_new.reshape(nb, 1, n), dGh).mT           # (nb, h', 1)
            return y_new, g_new, (X_new, U, dG, G, r, k0), None

        unflatten = lambda t: t.reshape(opts.y0.shape)  # noqa: E731
        first = None
        if start_rate > 0.0:  # the lazy start: plain steps while the residuals contract fast, for half the budget
            plain, extra = fixed_point_step(fun, beta, tmap, y, g)
            first = iterate(plain, y, g, extra, opts._replace(max_iter=opts.max_iter // 2), trace=trace,
                            callback=callback, freeze=freeze, rate=start_rate, record=record, unflatten=unflatten)
            y, g = first.y, first.f
            if first.done:                                # every element converged in the plain steps
                y = y.reshape(opts.y0.shape)
                return SolverResult(y, first.info, None, first.trace, None if recorder is None else recorder.take(y))
        state = (torch.add(y, g, alpha=beta), y.new_empty(m, nb, n), y.new_empty(m, nb, n), y.new_empty(nb, m, m),
                 None, 0)
        if first is not None and first.f_prev is not None:
            # the last plain step is the first history column (ΔX = X_k − X_{k−1} = β g_k, since
            # X_{k−1} = y_k; ΔG = g_k − g_{k−1}): the mixing starts at once
            X, U, dG, G, _, _ = state
            torch.mul(g.reshape(nb, n), beta, out=U[0])
            torch.sub(g.reshape(nb, n), first.f_prev.reshape(nb, n), out=dG[0])
            G[:, :1, :1] = torch.bmm(dG[0].unsqueeze(1), dG[0].unsqueeze(2))
            r = torch.bmm(g.reshape(nb, 1, n), dG[0].unsqueeze(2))      # (nb, 1, 1)
            state = (X, U, dG, G, r, -1)                                # k0 = −1: one row in use at k = 0
        out = iterate(step, y, g, state, opts, trace=trace, callback=callback, freeze=freeze, record=record,
                      unflatten=unflatten, resume=first)
    y = out.y.reshape(opts.y0.shape)
    return SolverResult(y, out.info, None, out.trace, None if recorder is None else recorder.take(y))
