"""Cholesky for symmetric positive definite ``A = L Lᵀ`` (reads the lower triangle)."""

from __future__ import annotations

import torch

from .factorization import Factorization, hager_inv_norm1, register

__all__ = ["Cholesky"]


@register
class Cholesky(Factorization):
    """Cholesky of a symmetric positive definite ``(*, n, n)`` matrix; ``A⁻ᵀ = A⁻¹``."""

    kind = "cholesky"

    def __init__(self, L: torch.Tensor):
        self.L = L

    @classmethod
    def factor(cls, A: torch.Tensor) -> tuple["Cholesky", torch.Tensor]:
        """Factorize ``A``; returns ``(chol, rcond)``; ``rcond`` is zero where ``A`` is not
        positive definite."""
        L, info = torch.linalg.cholesky_ex(A)
        fact = cls(L)
        n = A.shape[-1]
        norm_a = torch.linalg.vector_norm(A, 1, dim=-2).amax(dim=-1)
        inv_norm = hager_inv_norm1(fact.solve, n, A.shape[:-2], A.dtype, A.device)
        rcond = 1.0 / (norm_a * inv_norm)
        rcond = torch.where((info == 0) & torch.isfinite(rcond), rcond, torch.zeros_like(rcond))
        return fact, rcond

    def solve(self, B, adjoint=False):
        return torch.cholesky_solve(B, self.L)

    def tensors(self):
        return (self.L,)

    @classmethod
    def from_tensors(cls, tensors):
        return cls(*tensors)
