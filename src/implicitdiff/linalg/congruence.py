r"""Congruences ``X ↦ P X Pᵀ`` of symmetric matrices in svec form (:mod:`.cone_spec`), on many svec columns at
once: the PSD maps of the cone interior point (:mod:`~implicitdiff.solvers.cone_symmetric`: the scaling
``W⁻ᵀ`` on the rows of ``A``) and of the cone derivative (:mod:`~implicitdiff.implicit.cone_frame`: the
eigen-frame ``Qᵀ · Q`` on the rows of ``A``).  Forward only (no gradients).

**By the ``k × k`` factors, column by column** (:func:`congruence_columns`).  The map is applied to
``k × k`` matrices, never as a ``(d, d)`` matrix in svec coordinates (``d = k(k+1)/2``).  On many
columns (the rows of ``A``: ``n`` columns): column ``c`` of the lower triangle of ``P Xⱼ Pᵀ`` is
``P[c:] (P Xⱼ)[c]ᵀ`` and row ``c`` of ``P Xⱼ``, for all ``j`` at once, is one product of ``P``'s row ``c``
with ``[X₁ … X_n]``; so every intermediate is about ``1/k`` of the result, instead of building the
``(d, d)`` matrix (``d²`` gathered entries per element, in fresh memory) and multiplying by it
(measured in docs/benchmarks.md, sixth session), or one ``k × k`` congruence per column (the
derivative's frame of a shared ``A`` that way: 6× slower, 10 × 10 blocks, B = 128).  The
rows of ``P`` are first copied to contiguous memory (one ``k × k`` copy per element): a product with a
strided row (stride ``k``) was much slower than with a contiguous one (docs/benchmarks.md).  The ``k``
columns are concatenated once (assigning each into a slice of the result, strided over the batch, took
longer: docs/benchmarks.md, eighth session).  Columns shared by the batch (the rows of a shared ``A``,
given with a leading dimension of 1 or expanded) are multiplied blocks first, one product per block for
the whole batch.  Fewer than :data:`COLUMNS_MIN` columns (right-hand sides) take one congruence with the
columns as a leading dimension instead: there the loop over ``k`` costs more than the work.
"""

from __future__ import annotations

import torch

from .._core.validate import is_vmapped
from .cone_spec import _gathers, smat, svec

__all__ = ["COLUMNS_MIN", "congruence", "congruence_columns"]

COLUMNS_MIN = 8  # at least this many columns: column by column, else one congruence with the columns leading


def congruence(P, v, k):
    """``svec(P smat(v) Pᵀ)`` for ``v (*, d)`` and ``P (*, k, k)``."""
    return svec(P @ smat(v, k) @ P.mT)


def congruence_columns(P, V, k):
    """``svec(P smat(v) Pᵀ)`` for each column ``v`` of ``V (1 or B, nb, d, r)`` (``1`` or a stride-0 batch: shared),
    ``P (B, nb, k, k)`` → ``(B, nb, d, r)`` (module docstring)."""
    r = V.shape[-1]
    if r < COLUMNS_MIN:
        return congruence(P[..., None, :, :], V.mT, k).mT
    if V.shape[0] > 1 and not is_vmapped(V) and V.stride(0) == 0:  # expanded from one element: shared
        V = V[:1]
    _, scale, pos, unscale = _gathers(k, V.device, V.dtype)
    X = (V.index_select(-2, pos) * unscale[:, None]).reshape(V.shape[:-2] + (k, k * r))  # [a, (b, j)] = Xⱼ[a, b]
    # shared X: blocks first, (nb, B), so that row c of P Xⱼ is one product per block for the whole batch
    shared = X.shape[0] == 1
    if shared:
        P = P.transpose(0, 1).contiguous()
        rows = P.movedim(-2, 0).contiguous()  # rows[c] = P[..., c, :] (module docstring)
    cols = []  # svec's columns, concatenated once (writing each into a slice of the result cost more)
    for c in range(k):
        PXc = rows[c] @ X[0] if shared else P[..., c:c + 1, :] @ X                      # (P Xⱼ)[c, b]
        cols.append(P[..., c:, :] @ PXc.reshape(P.shape[:2] + (k, r)))
    out = torch.cat(cols, -2).mul_(scale[:, None])
    return out.transpose(0, 1) if shared else out
