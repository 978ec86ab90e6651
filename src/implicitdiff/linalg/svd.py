"""Rank-revealing pseudo-inverse by the thin SVD ``A = U diag(s) Vᵀ``.

``A⁺ B = V diag(s⁺) Uᵀ B`` and ``A⁺ᵀ B = U diag(s⁺) Vᵀ B`` where ``s⁺ = 1/s``
for ``s > rtol · s_max`` and ``0`` otherwise.  The default
``rtol = eps · max(m, n)`` is that of ``torch.linalg.pinv`` and NumPy; each batch
element gets its own numerical rank, with no host sync.
"""

from __future__ import annotations

import torch

from .._core.defaults import rank_rtol
from .factorization import Factorization, register

__all__ = ["SVD"]


@register
class SVD(Factorization):
    """Thin SVD with truncated reciprocal singular values: the minimum-norm least-squares map."""

    kind = "svd"
    full_row_rank = False
    full_col_rank = False

    def __init__(self, U, s_inv, Vh):
        self.U, self.s_inv, self.Vh = U, s_inv, Vh

    @classmethod
    def factor(cls, A, rtol: float | None = None, full_cond: bool = False):
        """Returns ``(svd, rank, cond)``: numerical rank and ``s_max / s_min`` over the kept values (the
        pseudo-inverse's condition), or with ``full_cond`` over all values (A's own condition, ``inf`` for
        a zero singular value: what a failed "exact"/"least_squares" solve reports)."""
        m, n = A.shape[-2:]
        tol = rank_rtol(A.dtype, m, n) if rtol is None else rtol
        U, s, Vh = torch.linalg.svd(A, full_matrices=False)
        smax = s[..., :1]
        keep = s > tol * smax
        s_inv = torch.where(keep, 1.0 / torch.where(keep, s, torch.ones_like(s)), torch.zeros_like(s))
        rank = keep.sum(-1)
        if full_cond:
            smin = s.amin(-1)
            cond = torch.where(smin > 0, smax[..., 0] / smin, float("inf"))
        else:
            cond = smax[..., 0] / torch.where(keep, s, float("inf")).amin(-1)
        return cls(U, s_inv, Vh), rank, cond

    def solve(self, B, adjoint=False):
        if adjoint:
            return self.U @ (self.s_inv[..., :, None] * (self.Vh @ B))
        return self.Vh.mT @ (self.s_inv[..., :, None] * (self.U.mT @ B))

    def tensors(self):
        return (self.U, self.s_inv, self.Vh)

    @classmethod
    def from_tensors(cls, tensors):
        return cls(*tensors)
