"""Per-element Jacobians of batch-independent functions — shared by the solvers and the adjoints."""

from __future__ import annotations

import math
from typing import Callable

import torch

__all__ = ["batch_jacobian"]


def batch_jacobian(F: Callable, y: torch.Tensor, batch_dims: int | None = None) -> torch.Tensor:
    """Per-element Jacobians ``∂F_b/∂y_b`` of a batch-independent ``F``, shape ``(*batch, n, n)``.

    ``y`` has ``batch_dims`` leading batch dims (default: all but the last) and
    any event shape (``n`` its size); ``J[b, i, j] = ∂F_{b,i}/∂y_{b,j}`` on the
    flattened events.

    The "sum over the batch" trick: ``F`` acts on every element independently,
    so the derivative of ``G(y) = Σ_b F(y)_b`` with respect to ``y_b`` is
    ``∂F_b/∂y_b`` (the cross terms vanish).  ``G`` has ``n`` outputs, so all the
    blocks cost ``n`` vector-Jacobian products whatever the batch size: one
    linearization, and the cotangents ``e_i`` pushed back at once under vmap.
    """
    if batch_dims is None:
        batch_dims = y.dim() - 1
    batch = y.shape[:batch_dims]
    n = math.prod(y.shape[batch_dims:])

    def summed(yy):
        out = F(yy).reshape(*batch, n)
        return out.sum(dim=tuple(range(batch_dims))) if batch_dims else out  # (n,)

    _, vjp = torch.func.vjp(summed, y)
    eye = torch.eye(n, dtype=y.dtype, device=y.device)
    (rows,) = torch.func.vmap(vjp)(eye)  # (n, *batch, *event): rows[i, b] = ∂F_{b,i}/∂y_b
    return rows.reshape(n, *batch, n).movedim(0, -2)
