"""The symmetric part of a (batch of) square matrices, at the cost of one copy.

``(M + Mᵀ)/2`` written as ``M + Mᵀ`` reads one operand transposed, element by element, which
on CPU is several times slower than materializing ``Mᵀ`` first (a blocked copy) and adding in
place.

Example:
    >>> import torch
    >>> from implicitdiff.linalg.symmetric import symmetric_part
    >>> symmetric_part(torch.tensor([[1.0, 2.0], [0.0, 1.0]]))
    tensor([[1., 1.],
            [1., 1.]])
"""

from __future__ import annotations

import torch

__all__ = ["symmetric_part"]


def symmetric_part(M: torch.Tensor) -> torch.Tensor:
    """``(M + Mᵀ) / 2`` for ``M (*, n, n)``, a new tensor, contiguous when ``M`` is (differentiable)."""
    if M.requires_grad and torch.is_grad_enabled():
        return 0.5 * (M + M.mT)
    return torch.add(M, M.mT).mul_(0.5)  # a new tensor (laid out as M), exactly symmetric: a + b = b + a
