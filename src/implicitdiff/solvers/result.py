"""What every nonlinear forward solver returns."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch

from .._core.status import SolveInfo
from ..linalg.factorization import Factorization

__all__ = ["SolverResult"]


class SolverResult(NamedTuple):
    """The outcome of a forward solve (no gradients attached).

    Attributes:
        y: the last iterate, shape of ``y0``.  Elements whose status is not
            ``SUCCESS`` hold the last finite iterate, *not* a solution.
        info: :class:`~implicitdiff.SolveInfo` with tensors of the batch shape
            ``y0.shape[:batch_dims]``: ``status`` (:class:`~implicitdiff.Status`
            codes), ``residual`` (``‖F(y)‖ / max(‖F(y0)‖, tiny)``; for L-BFGS the
            gradient norm), ``iterations`` (per element); Newton also fills
            ``cond`` (1-norm condition estimate of the returned Jacobian).
        jacobian: Newton only: :class:`~implicitdiff.linalg.LU` of the
            per-element Jacobian ``∂F/∂y`` of the flattened residual *at the
            returned* ``y``, shape ``(*batch, n, n)`` with
            ``n = prod(y0.shape[batch_dims:])``; the backward reuses it.
        trace: with ``trace=True``, the residual norms ``‖F(y_k)‖`` (absolute,
            not divided by ``‖F(y0)‖``), shape ``(k_max + 1, *batch)``: row 0 is
            the initial point, row ``k`` after the ``k``-th loop iteration
            (frozen elements repeat their final value).
        recording: what a ``recorder`` passed to the solver took at the returned ``y``
            (:class:`~implicitdiff.implicit.speculation.Recorder`; Picard and Anderson), else ``None``.
    """

    y: torch.Tensor
    info: SolveInfo
    jacobian: Optional[Factorization] = None
    trace: Optional[torch.Tensor] = None
    recording: Any = None
