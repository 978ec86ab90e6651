"""Matrix-free adjoint and tangent solves: ``J x = r`` with ``J`` given by Jacobian-vector products."""

from __future__ import annotations

from typing import Callable

import torch

from ..linalg import krylov

__all__ = ["krylov_solve"]


def krylov_solve(name: str, mv: Callable, R: torch.Tensor, *, rtol=None, atol=0.0, max_iter=None):
    """Solve ``mv(x) = R`` (``R``: ``(*batch, n)``) with the Krylov method ``name``; returns ``(x, info)``."""
    fn = {"cg": krylov.cg, "minres": krylov.minres, "gmres": krylov.gmres, "bicgstab": krylov.bicgstab}[name]
    res = fn(mv, R, rtol=rtol, atol=atol, max_iter=max_iter)
    return res.x, res.info
