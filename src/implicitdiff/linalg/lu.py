"""LU with partial pivoting for square ``A``: ``A = P L U``."""

from __future__ import annotations

import torch

from .factorization import Factorization, hager_inv_norm1, register

__all__ = ["LU"]


def _permute(B: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of ``B`` (``(*, n, k)``) gathered by ``index`` (``(*, n)``), batch dims broadcast."""
    batch = torch.broadcast_shapes(index.shape[:-1], B.shape[:-2])
    n, k = B.shape[-2:]
    return torch.gather(B.expand(*batch, n, k), -2, index.unsqueeze(-1).expand(*batch, n, k))


@register
class LU(Factorization):
    """Pivoted LU of a square ``(*, n, n)`` matrix; ``solve(B, adjoint=True)`` reuses it for ``A⁻ᵀ B``.

    Stored as the packed factors and the row permutation as an index (``PᵀB =
    B[perm]``); a solve is a gather and two triangular solves.  (Not
    ``torch.linalg.lu_solve``: in torch 2.13 its batching rule returns wrong
    results when the factors and the right-hand side are batched by different
    ``vmap`` levels, as in ``vmap(jacrev(...))``.)
    """

    kind = "lu"

    def __init__(self, LU: torch.Tensor, perm: torch.Tensor):
        self.LU, self.perm = LU, perm

    @classmethod
    def factor(cls, A: torch.Tensor) -> tuple["LU", torch.Tensor]:
        """Factorize ``A``; returns ``(lu, rcond)`` with a 1-norm reciprocal condition estimate
        (zero for an exactly singular element)."""
        LU_, piv, info = torch.linalg.lu_factor_ex(A)
        P = torch.lu_unpack(LU_, piv, unpack_data=False)[0]
        fact = cls(LU_, P.argmax(dim=-2))  # A = P L U, (PᵀB)_i = B_perm[i]
        n = A.shape[-1]
        norm_a = A.abs().sum(dim=-2).amax(dim=-1)
        inv_norm = hager_inv_norm1(fact.solve, n, A.shape[:-2], A.dtype, A.device)
        rcond = 1.0 / (norm_a * inv_norm)
        rcond = torch.where((info == 0) & torch.isfinite(rcond), rcond, torch.zeros_like(rcond))
        return fact, rcond

    def solve(self, B, adjoint=False):
        LU = self.LU
        if not adjoint:  # A⁻¹B = U⁻¹ L⁻¹ Pᵀ B
            Z = torch.linalg.solve_triangular(LU, _permute(B, self.perm), upper=False, unitriangular=True)
            return torch.linalg.solve_triangular(LU, Z, upper=True)
        # A⁻ᵀB = P L⁻ᵀ U⁻ᵀ B
        Z = torch.linalg.solve_triangular(LU.mT, B, upper=False)
        Z = torch.linalg.solve_triangular(LU.mT, Z, upper=True, unitriangular=True)
        return _permute(Z, torch.argsort(self.perm, dim=-1))

    def tensors(self):
        return (self.LU, self.perm)

    @classmethod
    def from_tensors(cls, tensors):
        return cls(*tensors)
