"""Preconditioners for the Krylov solvers: ``M ≈ A⁻¹`` as a :class:`LinearOperator`."""

from __future__ import annotations

import torch

from .._core.errors import InputError
from .operator import LinearOperator

__all__ = ["jacobi", "matrix_diagonal"]


def matrix_diagonal(A) -> torch.Tensor:
    """The diagonal of a square ``A``: ``(*, n)`` for a dense ``(*, n, n)`` tensor, ``(n,)`` for a
    2-D sparse COO/CSR tensor (summing duplicate entries), or a matrix-backed LinearOperator.

    A matrix-free :class:`LinearOperator` has no cheap diagonal: pass it yourself,
    ``jacobi(diagonal=d)``.
    """
    if isinstance(A, LinearOperator):
        if A.matrix is None:
            raise InputError("jacobi: a matrix-free LinearOperator has no stored diagonal; pass it with "
                             "jacobi(diagonal=d), d of shape (*, n)")
        A = A.matrix
    if not isinstance(A, torch.Tensor) or A.dim() < 2 or A.shape[-1] != A.shape[-2]:
        got = tuple(A.shape) if isinstance(A, torch.Tensor) else type(A).__name__
        raise InputError(f"jacobi: A must be a square (*, n, n) tensor or LinearOperator, got {got}")
    if A.layout == torch.strided:
        return A.diagonal(dim1=-2, dim2=-1)
    n = A.shape[-1]
    if A.layout == torch.sparse_csr:
        crow, cols, vals = A.crow_indices(), A.col_indices(), A.values()
        rows = torch.repeat_interleave(torch.arange(n, device=A.device), crow.diff())
    elif A.layout == torch.sparse_coo:
        A = A.coalesce()
        (rows, cols), vals = A.indices(), A.values()
    else:
        raise InputError(f"jacobi: unsupported layout {A.layout}; use a dense, COO or CSR matrix")
    on = rows == cols
    return torch.zeros(n, dtype=vals.dtype, device=vals.device).index_add_(0, rows[on], vals[on])


def _scale(x, dinv):
    return x * dinv


def jacobi(A=None, *, diagonal: torch.Tensor | None = None) -> LinearOperator:
    r"""The Jacobi (diagonal) preconditioner ``M = diag(A)⁻¹``, for the ``M=`` of any Krylov solver.

    Args:
        A: a dense ``(*, n, n)`` tensor, a 2-D sparse COO/CSR tensor or a matrix-backed
            :class:`LinearOperator`.
        diagonal: the diagonal ``(*, n)`` itself (for a matrix-free operator), instead of ``A``.

    Returns:
        A symmetric :class:`LinearOperator` ``r ↦ r / d`` on ``(..., n)`` (tagged positive definite
        when every ``d > 0`` — then it suits :func:`cg` and :func:`minres`).

    Raises:
        InputError: neither or both of ``A`` and ``diagonal``; a zero, NaN or Inf diagonal entry
            (one host sync).

    Example:
        >>> import torch
        >>> from implicitdiff.linalg.preconditioner import jacobi
        >>> M = jacobi(torch.tensor([[4.0, 1.0], [1.0, 2.0]]))
        >>> M.mv(torch.tensor([4.0, 4.0]))
        tensor([1., 2.])
    """
    if (A is None) == (diagonal is None):
        raise InputError("jacobi: pass exactly one of A (a matrix) or diagonal= (its diagonal, (*, n))")
    d = matrix_diagonal(A) if A is not None else diagonal
    if not isinstance(d, torch.Tensor) or d.dim() < 1 or d.dtype not in (torch.float32, torch.float64):
        raise InputError("jacobi: the diagonal must be a float32/float64 tensor of shape (*, n)")
    if not bool((torch.isfinite(d) & (d != 0)).all()):
        raise InputError("jacobi: the diagonal has a zero, NaN or Inf entry, so diag(A)⁻¹ does not exist; "
                         "use another preconditioner or shift A")
    dinv = d.reciprocal()
    n = d.shape[-1]
    return LinearOperator(_scale, (n, n), (dinv,), rmatvec=_scale, dtype=d.dtype, device=d.device,
                          symmetric=True, positive_definite=bool((d > 0).all()), batch_shape=d.shape[:-1])
