"""LU with partial pivoting for square ``A``: ``A = P L U``."""

from __future__ import annotations

import torch

from .._core.torch_private import solve_factorizes_transpose
from .._core.validate import is_vmapped
from .._core.defaults import eps
from .factorization import Factorization, register, screened_rcond

__all__ = ["LU", "LUTransposed"]


def _permute(B: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of ``B`` (``(*, n, k)``) gathered by ``index`` (``(*, n)``), batch dims broadcast."""
    batch = torch.broadcast_shapes(index.shape[:-1], B.shape[:-2])
    n, k = B.shape[-2:]
    return torch.gather(B.expand(*batch, n, k), -2, index.unsqueeze(-1).expand(*batch, n, k))


@register
class LU(Factorization):
    """Pivoted LU of a square ``(*, n, n)`` matrix; ``solve(B, adjoint=True)`` reuses it for ``A⁻ᵀ B``.

    Outside ``vmap`` a solve is ``torch.linalg.lu_solve``.  Under ``vmap`` it is a
    gather by the row permutation and two triangular solves, because in torch
    2.13 ``lu_solve``'s batching rule returns wrong results when the factors and
    the right-hand side are batched by different ``vmap`` levels (as in
    ``vmap(jacrev(...))``).
    """

    kind = "lu"

    def __init__(self, LU: torch.Tensor, pivots: torch.Tensor):
        self.LU, self.pivots = LU, pivots

    @classmethod
    def factor(cls, A: torch.Tensor, *, allow_transposed: bool = False, screen: bool = False,
               doubt: float | None = None) -> tuple["LU", torch.Tensor]:
        """Factorize ``A``; returns ``(lu, rcond)`` with a 1-norm reciprocal condition estimate
        (zero for an exactly singular element).

        The estimate is Hager's (:func:`~.factorization.hager_inv_norm1`).  With ``screen`` it runs
        only for the batch elements' sake when a cheap bound (the pivots and one solve,
        :func:`~.factorization.screened_rcond`) is below ``doubt`` (default ``sqrt(eps)``); a
        well-conditioned matrix then gets a looser (larger) estimate, never a smaller one.

        With ``allow_transposed`` (for callers that keep the factorization's
        ``kind``), ``A`` is factorized as ``torch.linalg.solve`` factorizes it: as ``Aᵀ``
        (a row-major ``A`` is the column-major view ``Aᵀ``, which LAPACK takes without a copy)
        in torch releases that do so, solved with the adjoint flag flipped
        (:class:`LUTransposed`), else as ``A`` — so that the eager path of ``linear_solve``
        (torch's own solve) and this one give the same bits.
        """
        if (allow_transposed and cls is LU and A.dim() >= 2 and A.shape[-1] > 1 and not is_vmapped(A)
                and solve_factorizes_transpose(A)):
            LU_, piv, info = torch.linalg.lu_factor_ex(A.mT)
            fact = LUTransposed(LU_, piv)
        else:
            LU_, piv, info = torch.linalg.lu_factor_ex(A)
            fact = cls(LU_, piv)
        norm_a = A.abs().sum(dim=-2).amax(dim=-1)
        doubt = eps(A.dtype) ** 0.5 if doubt is None else doubt
        rcond = screened_rcond(fact.solve, norm_a, LU_.diagonal(dim1=-2, dim2=-1), info == 0, doubt, full=not screen)
        return fact, rcond

    def _perm(self) -> torch.Tensor:
        # A = P L U and (PᵀB)_i = B_perm[i]; perm_i = Σ_j j P_ji (exact in floating point for n < 2^24)
        P = torch.lu_unpack(self.LU, self.pivots, unpack_data=False)[0]
        n = P.shape[-1]
        return (torch.arange(n, dtype=P.dtype, device=P.device) @ P).round().long()

    def solve(self, B, adjoint=False):
        LU = self.LU
        if not (is_vmapped(LU) or is_vmapped(B)):
            return torch.linalg.lu_solve(LU, self.pivots, B, adjoint=adjoint)
        perm = self._perm()
        if not adjoint:  # A⁻¹B = U⁻¹ L⁻¹ Pᵀ B
            Z = torch.linalg.solve_triangular(LU, _permute(B, perm), upper=False, unitriangular=True)
            return torch.linalg.solve_triangular(LU, Z, upper=True)
        # A⁻ᵀB = P L⁻ᵀ U⁻ᵀ B
        Z = torch.linalg.solve_triangular(LU.mT, B, upper=False)
        Z = torch.linalg.solve_triangular(LU.mT, Z, upper=True, unitriangular=True)
        return _permute(Z, torch.argsort(perm, dim=-1))

    def tensors(self):
        return (self.LU, self.pivots)

    @classmethod
    def from_tensors(cls, tensors):
        return cls(*tensors)


@register
class LUTransposed(LU):
    """Pivoted LU of ``Aᵀ`` standing for ``A``: ``A⁻¹B`` is its adjoint solve and vice versa."""

    kind = "lu_t"

    def solve(self, B, adjoint=False):
        return LU.solve(self, B, not adjoint)
