r"""A sparse linear map applied to a batch, as a differentiable, vmappable function (both AD modes).

``SparseAffineFn.apply(p, M, Mᵀ)`` is ``p Mᵀ`` for a dense batch ``p (B, width)`` and a sparse ``M``
— the parameter map of :class:`~implicitdiff.nn.CvxpyLayer`.  Sparse products have no ``vmap``
rule, hence this function.
"""

from __future__ import annotations

import torch

__all__ = ["SparseAffineFn"]


class SparseAffineFn(torch.autograd.Function):
    """``out = p Mᵀ`` for ``p (B, width)`` and a sparse COO ``M (size, width)`` (coalesced; ``transposed``
    its coalesced transpose): one gather of ``p``'s columns and one ``index_add`` into the
    batch-major ``(B, size)`` output (no ``(size, B)`` intermediate to transpose).  The backward is
    the same map with ``Mᵀ`` (so it is differentiable again), the forward-mode ``jvp`` the same map
    with ``M`` applied to ``p``'s tangent (the map is linear in ``p``); under ``vmap`` the vmapped
    dimension is folded into the batch.

    Example:
        >>> import torch
        >>> M = torch.sparse_coo_tensor([[0, 1, 1], [0, 0, 2]], [2.0, 1.0, -1.0], (2, 3),
        ...                             check_invariants=True).coalesce()
        >>> p = torch.tensor([[1.0, 5.0, 3.0]])
        >>> SparseAffineFn.apply(p, M, M.t().coalesce())
        tensor([[ 2., -2.]])
    """

    @staticmethod
    def forward(p, matrix, transposed):
        target, source = matrix.indices()
        out = p.new_zeros(p.shape[0], matrix.shape[0])
        return out.index_add_(1, target, p.index_select(1, source).mul_(matrix.values()))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.matrices = inputs[1:]

    @staticmethod
    def backward(ctx, grad):
        matrix, transposed = ctx.matrices
        return SparseAffineFn.apply(grad, transposed, matrix), None, None

    @staticmethod
    def jvp(ctx, p_dot, matrix_dot, transposed_dot):
        matrix, transposed = ctx.matrices
        return SparseAffineFn.apply(p_dot, matrix, transposed)

    @staticmethod
    def vmap(info, in_dims, p, matrix, transposed):
        V = info.batch_size
        p = p.unsqueeze(0).expand((V,) + p.shape) if in_dims[0] is None else p.movedim(in_dims[0], 0)
        out = SparseAffineFn.apply(p.reshape((-1,) + p.shape[2:]), matrix, transposed)
        return out.reshape((V, -1) + out.shape[1:]), 0
