"""Dtype-aware default tolerances, in one place so every solver agrees."""

from __future__ import annotations

import torch

__all__ = ["eps", "default_rtol", "rank_rtol"]


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
