"""Thin QR for full-rank non-square (or square) ``A``.

Tall ``A`` (``m ≥ n``, full column rank): ``A = Q R``, so
``A⁺ B = R⁻¹ Qᵀ B`` (the least-squares solution) and ``A⁺ᵀ B = Q R⁻ᵀ B``.

Wide ``A`` (``m < n``, full row rank): factor ``Aᵀ = Q R``, so ``A = Rᵀ Qᵀ``,
``A⁺ B = Q R⁻ᵀ B`` (the minimum-norm solution) and ``A⁺ᵀ B = R⁻¹ Qᵀ B``.

The factors are kept in LAPACK's compact Householder form (``torch.geqrf``) and
``Q`` / ``Qᵀ`` are applied with ``torch.ormqr``: forming ``Q`` explicitly costs
more than the factorization itself.

Unpivoted QR does not reveal rank by itself; :meth:`QR.factor` returns a
reciprocal condition estimate of ``R`` (Hager's 1-norm estimator on the
triangular factor) so that the caller can fall back to :class:`~.svd.SVD`.
"""

from __future__ import annotations

import torch

from .._core.validate import is_vmapped
from .factorization import Factorization, hager_inv_norm1, register

__all__ = ["QR", "QRTransposed"]


def _tri(R, B, transpose):
    if transpose:
        return torch.linalg.solve_triangular(R.mT, B, upper=False)
    return torch.linalg.solve_triangular(R, B, upper=True)


def _apply_q(a, tau, B, transpose):
    """``Qᵀ B`` (first ``n`` rows) or ``Q [B; 0]`` for the full ``Q`` of ``geqrf``'s ``(a, tau)``."""
    m, n = a.shape[-2:]
    if is_vmapped(a) or is_vmapped(B):  # ormqr has no batching rule: form the thin Q instead
        Q = torch.linalg.householder_product(a, tau)
        return Q.mT @ B if transpose else Q @ B
    batch = torch.broadcast_shapes(a.shape[:-2], B.shape[:-2])
    k = B.shape[-1]
    a_, tau_ = a.expand(*batch, m, n), tau.expand(*batch, tau.shape[-1])
    if transpose:
        return torch.ormqr(a_, tau_, B.expand(*batch, m, k), left=True, transpose=True)[..., :n, :]
    padded = torch.cat([B.expand(*batch, n, k), B.new_zeros(*batch, m - n, k)], dim=-2)
    return torch.ormqr(a_, tau_, padded, left=True, transpose=False)


def _factor(cls, M):
    a, tau = torch.geqrf(M)
    fact = cls(a, tau)
    n = M.shape[-1]
    R = a[..., :n, :n]  # solve_triangular reads the upper triangle only
    # ‖R‖₁ of the upper triangle: below it geqrf stores the (scale-free) Householder vectors
    norm_r = torch.linalg.vector_norm(R.triu(), 1, dim=-2).amax(dim=-1)
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

    def __init__(self, a, tau):
        self.a, self.tau = a, tau

    @classmethod
    def factor(cls, A):
        """Returns ``(qr, rcond)``: ``rcond`` estimates ``1/cond(A)`` (small means rank-deficient)."""
        return _factor(cls, A)

    def solve(self, B, adjoint=False):
        n = self.a.shape[-1]
        R = self.a[..., :n, :n]
        if adjoint:  # A⁺ᵀ B = Q R⁻ᵀ B
            return _apply_q(self.a, self.tau, _tri(R, B, True), transpose=False)
        return _tri(R, _apply_q(self.a, self.tau, B, transpose=True), False)  # R⁻¹ Qᵀ B

    def tensors(self):
        return (self.a, self.tau)

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
