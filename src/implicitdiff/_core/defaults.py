"""Defaults of the solvers and strategies, in one place so every solver agrees: tolerances, limits, thresholds."""

from __future__ import annotations

import torch

__all__ = ["eps", "default_rtol", "rank_rtol", "SOLVER_MAX_ITER", "DENSE_MAX", "DEQ_ANDERSON_START_RATE",
           "ADJOINT_PICARD_MAX_ITER", "ADJOINT_RICHARDSON_MAX_ITER"]


def eps(dtype: torch.dtype) -> float:
    """Machine epsilon of a floating dtype."""
    return torch.finfo(dtype).eps


def default_rtol(dtype: torch.dtype) -> float:
    """Default relative tolerance of iterative solvers: 1e-6 in float32, 1e-10 in float64."""
    return 1e-6 if dtype == torch.float32 else 1e-10


def rank_rtol(dtype: torch.dtype, m: int, n: int) -> float:
    """Default rank tolerance ``eps * max(m, n)`` (as ``torch.linalg.pinv`` and NumPy).

    A singular value ``s`` counts as zero when ``s <= rank_rtol * s_max``; a square
    matrix counts as singular when its reciprocal condition estimate is below it.
    """
    return eps(dtype) * max(m, n, 1)


#: Iteration limits of the forward solvers when ``max_iter`` is not given (per solver name).
SOLVER_MAX_ITER = {"newton": 50, "broyden": 100, "anderson": 100, "picard": 200, "lbfgs": 200}

#: ``Implicit(solver="auto")``: the per-element size up to which the adjoint is solved densely (LU).
DENSE_MAX = 200

#: The DEQ's Anderson starts mixing only when the plain steps stop contracting by this factor per step.
DEQ_ANDERSON_START_RATE = 0.8

#: Iteration limit of :class:`~implicitdiff.FixedPointAdjoint`'s Picard loop.
ADJOINT_PICARD_MAX_ITER = 200

#: Iteration limit of ``Implicit(solver="richardson")`` when its ``max_iter`` is not given.
ADJOINT_RICHARDSON_MAX_ITER = 1000
