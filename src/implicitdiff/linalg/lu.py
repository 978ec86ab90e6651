"""LU with partial pivoting for square ``A``: ``A = P L U``."""

from __future__ import annotations

import torch

from .factorization import Factorization, hager_inv_norm1, register

__all__ = ["LU"]


@register
class LU(Factorization):
    """Pivoted LU of a square ``(*, n, n)`` matrix; ``solve(B, adjoint=True)`` reuses it for ``A⁻ᵀ B``."""

    kind = "lu"

    def __init__(self, LU: torch.Tensor, pivots: torch.Tensor):
        self.LU, self.pivots = LU, pivots

    @classmethod
    def factor(cls, A: torch.Tensor) -> tuple["LU", torch.Tensor]:
        """Factorize ``A``; returns ``(lu, rcond)`` with a 1-norm reciprocal condition estimate
        (zero for an exactly singular element)."""
        LU_, piv, info = torch.linalg.lu_factor_ex(A)
        fact = cls(LU_, piv)
        n = A.shape[-1]
        norm_a = A.abs().sum(dim=-2).amax(dim=-1)
        inv_norm = hager_inv_norm1(fact.solve, n, A.shape[:-2], A.dtype, A.device)
        rcond = 1.0 / (norm_a * inv_norm)
        rcond = torch.where((info == 0) & torch.isfinite(rcond), rcond, torch.zeros_like(rcond))
        return fact, rcond

    def solve(self, B, adjoint=False):
        return torch.linalg.lu_solve(self.LU, self.pivots, B, adjoint=adjoint)

    def tensors(self):
        return (self.LU, self.pivots)

    @classmethod
    def from_tensors(cls, tensors):
        return cls(*tensors)
