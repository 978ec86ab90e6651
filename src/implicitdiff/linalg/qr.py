"""Thin QR for full-rank non-square (or square) ``A``.

Tall ``A`` (``m ≥ n``, full column rank): ``A = Q R``, so
``A⁺ B = R⁻¹ Qᵀ B`` (the least-squares solution) and ``A⁺ᵀ B = Q R⁻ᵀ B``.

Wide ``A`` (``m < n``, full row rank): factor ``Aᵀ = Q R``, so ``A = Rᵀ Qᵀ``,
``A⁺ B = Q R⁻ᵀ B`` (the minimum-norm solution) and ``A⁺ᵀ B = R⁻¹ Qᵀ B``.

Unpivoted QR does not reveal rank by itself; :meth:`QR.factor` returns a
reciprocal condition estimate of ``R`` (Hager's 1-norm estimator on the
triangular factor) so that the caller can fall back to :class:`~.svd.SVD`.
"""

from __future__ import annotations

import torch

from .factorization import Factorization, hager_inv_norm1, register

__all__ = ["QR", "QRTransposed"]


def _tri(R, B, transpose):
    if transpose:
        return torch.linalg.solve_triangular(R.mT, B, upper=False)
    return torch.linalg.solve_triangular(R, B, upper=True)


def _factor(cls, M):
    Q, R = torch.linalg.qr(M, mode="reduced")
    fact = cls(Q, R)
    n = R.shape[-1]
    norm_r = R.abs().sum(dim=-2).amax(dim=-1)
    inv_norm = hager_inv_norm1(lambda X, adj: _tri(R, X, adj), n, R.shape[:-2], R.dtype, R.device)
    rcond = 1.0 / (norm_r * inv_norm)
    rcond = torch.where(torch.isfinite(rcond), rcond, torch.zeros_like(rcond))
    return fact, rcond


@register
class QR(Factorization):
    """QR of a tall full-column-rank ``A`` (``m ≥ n``): the least-squares solution map."""

    kind = "qr"
    full_row_rank = False
    full_col_rank = True

    def __init__(self, Q, R):
        self.Q, self.R = Q, R

    @classmethod
    def factor(cls, A):
        """Returns ``(qr, rcond)``: ``rcond`` estimates ``1/cond(A)`` (small means rank-deficient)."""
        return _factor(cls, A)

    def solve(self, B, adjoint=False):
        if adjoint:  # A⁺ᵀ B = Q R⁻ᵀ B
            return self.Q @ _tri(self.R, B, True)
        return _tri(self.R, self.Q.mT @ B, False)  # R⁻¹ Qᵀ B

    def tensors(self):
        return (self.Q, self.R)

    @classmethod
    def from_tensors(cls, tensors):
        return cls(*tensors)


@register
class QRTransposed(QR):
    """QR of ``Aᵀ`` for a wide full-row-rank ``A`` (``m < n``): the minimum-norm solution map."""

    kind = "qr_t"
    full_row_rank = True
    full_col_rank = False

    @classmethod
    def factor(cls, A):
        return _factor(cls, A.mT)

    def solve(self, B, adjoint=False):
        return QR.solve(self, B, not adjoint)
