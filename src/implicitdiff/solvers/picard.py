"""Picard (damped fixed-point) iteration ``y ← y + β F(y)``."""

from __future__ import annotations

from typing import Callable

import torch

from .._core.errors import InputError
from .._core.options import check_real
from ._loop import fixed_point_step, flatten_root, iterate, options
from .result import SolverResult

__all__ = ["picard"]


def picard(F: Callable, y0: torch.Tensor, params: tuple = (), *, rtol=None, atol=0.0, max_iter: int = 200,
           batch_dims: int = 0, beta: float = 1.0, check_every=None, trace: bool = False,
           callback=None, freeze: bool = True, recorder=None, differentiable: bool = False) -> SolverResult:
    """Solve ``F(y, *params) = 0`` by the damped iteration ``y_{k+1} = y_k + β F(y_k)``.

    For a fixed point ``y = T(y)`` pass ``F(y) = T(y) − y``: with ``β = 1`` this
    is plain fixed-point iteration ``y ← T(y)``.  It converges linearly when
    ``y ↦ y + β F(y)`` is a contraction (rate ``‖I + β ∂F/∂y‖``), e.g. for
    ``T`` with Lipschitz constant < 1.

    Args:
        F: residual, ``F(y, *params)`` returns a tensor of ``y``'s shape;
            it must act on each of the ``batch_dims`` leading batch elements
            independently (it is called on the whole batch at once).
        y0: starting point, any shape (0-d included), float32/float64.
        params: tuple of extra arguments of ``F`` (used detached).
        rtol, atol: stopping rule, per element ``i`` (norms over the non-batch
            dims): ``‖F(y_i)‖ ≤ atol + rtol · ‖F(y0_i)‖``; ``rtol`` defaults to
            1e-10 in float64 and 1e-6 in float32.
        max_iter: iteration limit (one ``F`` evaluation per iteration).
        batch_dims: leading dims of ``y0`` that index independent problems.
        beta: damping ``β > 0``.
        check_every: read "all stopped?" on the host every this many
            iterations (default 1 on CPU, 8 on CUDA).
        trace: also return the residual norms of every iteration.
        callback: ``callback(iteration, y, residual_norms)`` after each iteration.
        freeze: ``True`` (default): an element that has converged is frozen, its
            ``y`` never updated again.  ``False``: the whole batch iterates until
            every element has converged, with one host read per iteration and
            no masks (cheaper per step; on a contraction an element only gets
            more accurate, its ``iterations`` count the steps it needed; on a
            map that is not a contraction an element may leave the tolerance
            again, and is reported as it ends); a NaN/Inf or diverging element
            hands the batch over to the masked loop.  Only where ``check_every = 1`` (CPU), ``batch_dims ≥ 1`` and
            no ``callback``.
        recorder: a :class:`~implicitdiff.implicit.speculation.Recorder`: with ``freeze=False`` the loop evaluates
            its predicted last step through it, and ``SolverResult.recording`` is what it took at
            the returned ``y`` (the implicit mechanism's backward reuses it).
        differentiable: run with autograd on — ``params`` not detached, every step recorded — so that
            the result is differentiable through the iterations (``Unroll()``; memory grows with them).

    Returns:
        :class:`SolverResult` ``(y, info, None, trace, recording)``.  Failure modes, per
        element, as ``info.status``: ``MAX_ITERATIONS``; ``NONFINITE`` (NaN/Inf:
        the element keeps its last finite iterate); ``DIVERGED`` (``‖F‖`` grew
        past ``1e8 · ‖F(y0)‖``).  Never raises on non-convergence; raises
        :class:`InputError` for malformed input.

    Example:
        >>> import torch
        >>> from implicitdiff.solvers.picard import picard
        >>> x = torch.tensor([0.5, -1.0], dtype=torch.float64)
        >>> res = picard(lambda y, x: torch.cos(y) * 0.5 + x - y, torch.zeros(2, dtype=torch.float64), (x,))
        >>> bool((res.info.status == 0).all()), bool(torch.allclose(res.y, 0.5 * torch.cos(res.y) + x))
        (True, True)
    """
    if differentiable and recorder is not None:
        raise InputError("recorder= records the last step for the implicit backward; it does not apply with "
                         "differentiable=True (the gradient runs through the iterations): pass one or the other")
    opts = options(y0, params, rtol=rtol, atol=atol, max_iter=max_iter, batch_dims=batch_dims,
                   check_every=check_every, callback=callback, differentiable=differentiable)
    beta = check_real("beta", beta, low=0.0, low_open=True, allow_none=False)
    with torch.set_grad_enabled(torch.is_grad_enabled() and differentiable):
        fun, y, f, tmap, record = flatten_root(F, opts, recorder=recorder)
        step, extra = fixed_point_step(fun, beta, tmap, y, f)
        out = iterate(step, y, f, extra, opts, trace=trace, callback=callback, freeze=freeze,
                      record=record, unflatten=lambda t: t.reshape(opts.y0.shape))
    y = out.y.reshape(opts.y0.shape)
    return SolverResult(y, out.info, None, out.trace, None if recorder is None else recorder.take(y))
