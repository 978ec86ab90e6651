r"""The cone interior point's data matrix and its normal matrix ``A_cᵀ H⁻¹ A_c``, per cone, batched.

:class:`DataMatrix` holds ``A`` either *shared* by the batch (``(m, n)``: every product with it is
one matrix product for the whole batch, never an expanded ``(B, m, n)`` copy) or batched
``(B, m, n)``; an input ``(B, m, n)`` expanded from one matrix (stride 0 on the batch) is
recognized as shared; a batched one with few nonzeros multiplies from its nonzeros only
(:class:`~.cone_sparse.SparseProducts`).  **A dense block**: a batched ``A`` whose rows with many
nonzeros (more than :data:`~.cone_sparse.SPARSE_PRODUCTS` of ``n``) cover, on their columns, at
most :data:`DENSE_BLOCK_BELOW` of it (cvxpy's canonical programs: a data matrix next to rows with
one ``±1`` each) keeps that block as its own ``(B, rows, columns)`` copy and the other rows' few
nonzeros as :class:`~.cone_sparse.SparseProducts`: a product reads the block, not all of ``A``
(each product is bound by reading ``A``).  So a subset of the batch (the interior point drops its
finished elements) with a block or sparse products copies the block and the nonzeros, and ``A``
itself only where it is read (:meth:`DataMatrix.subset`; it reads the root ``A`` through a composed
index, so a chain of subsets keeps no parent alive).

:class:`NormalMatrix` forms ``N = Σ_cones A_kᵀ W_k⁻¹ W_k⁻ᵀ A_k`` (``H = WᵀW`` the scaling of the
interior point) — the matrix of the interior point's reduced Newton system — one term per group
of blocks of one kind and size:

* **second-order cones** of size ``k ≥`` :data:`SOC_STRUCTURED_MIN` (the structured Gram):
  with NT scaling ``W = ηW̄``, ``W̄² = 2wwᵀ − J`` (``J = diag(1, −1, …, −1)``, ``W̄⁻¹ = JW̄J``)
  the inverse scaling is ``W⁻¹W⁻ᵀ = η⁻²(2(Jw)(Jw)ᵀ − J)``, so

      A_kᵀ W_k⁻² A_k = η⁻² (P_k + 2 v vᵀ),   P_k = A_kᵀ(−J)A_k = A_kᵀA_k − 2a₀a₀ᵀ,   v = A_kᵀJw

  (``a₀`` the block's first row).  ``P_k`` depends on ``A`` only and is formed once per solve
  (:meth:`NormalMatrix.__init__`); each iteration costs one product ``A_kᵀ(Jw)`` per block (with
  a batched ``A`` and at most :data:`RIDE_ALONG_MAX` blocks, made by the interior point as extra
  columns of an ``Aᵀ`` product it makes anyway: :meth:`NormalMatrix.columns`; ``A_k`` is then not
  kept), a weighted sum of the ``P_k`` (a ``P_k`` that ``A``'s pattern makes sparse, e.g. diagonal for
  ``‖x‖ ≤ t`` on a variable, formed from each row's own nonzeros and added on its nonzeros only) and
  one rank-``(blocks)`` update — instead of forming
  ``W⁻ᵀA_k`` (``k·n`` entries through ``W``) and its ``k·n²`` Gram.  Rounding: both forms carry
  an absolute error ``~eps·η⁻²‖w‖²‖A_k‖²``, the size of the largest term (the normal matrix's
  usual ill-conditioning as ``μ → 0``); the interior point refines its solves against the
  unreduced system, which is formed without ``N``.
* **every other cone** (nonnegative, PSD, exponential, small second-order blocks): the generic
  form ``ÃᵀÃ`` with ``Ã = W⁻ᵀA_k`` built by the cone's ``winv_t(state, rows)`` — the seam a
  new cone needs (``cone_exp.ExpCone`` uses it unchanged).  With ``A`` shared, ``winv_t``
  receives the block's rows with a leading dimension of 1 and broadcasts.
* **any group whose blocks touch few columns** of ``A`` (its zero pattern, shared by the batch):
  the same generic term on each block's nonzero columns only (:mod:`~.cone_sparse`), where it
  costs at most half the form above (cvxpy's canonical exponential-cone programs).

A structured term whose group touches few columns is formed on those columns only.  The first
dense term writes ``N``; the others and the sparse terms add into it in place — into the compact
layout of the elimination below where there is one (:class:`~.cone_sparse.Elimination`).  Without a zero
cone, :func:`factor_normal` eliminates ``N``'s private columns first where their blocks are small
(``NormalMatrix.elimination``, found from the pattern and passed to :func:`factor_normal`; :mod:`~.cone_sparse`).

**In place** (the speed trick of :class:`NormalMatrix` and :func:`factor_normal`, one place): ``N`` is
written into one buffer reused by every iteration (a fresh ``(B, n, n)`` tensor costs as much in page
faults as the pass that writes it), a scratch that the dense Cholesky overwrites
(:func:`~implicitdiff.linalg.kkt.cholesky_lower_`: no triangle copy); with a zero cone
``[[N, A_zᵀ], [A_z, −δI]]`` is assembled in a column-major buffer that the LU factors where it lies
(no ``cat`` copies, no copy into the LU's own column-major output); ``N``, symmetric, goes in as
``Nᵀ``: a straight copy of its row-major memory, where a transposing one took about twice as long.

Forward only: no gradients here.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..linalg.kkt import absmax, chol_solve, cholesky_lower_
from .cone_sparse import (SCATTER_COST, SPARSE_PRODUCTS, SparseGram, SparseProducts, elimination, sparse_gram,
                          support_columns)

__all__ = ["DataMatrix", "NormalMatrix", "Rows", "contiguous", "take", "put", "factor_normal", "solve_normal",
           "SOC_STRUCTURED_MIN"]

SOC_STRUCTURED_MIN = 8  # smaller second-order blocks: the generic form (a k·n² Gram is cheap there)
_STRUCTURED_BYTES = 1 << 28  # the P_k of one group above this size: the generic form (memory)
DENSE_BLOCK_BELOW = 0.75  # a batched A's dense rows on their columns at most this part of it: products on them
RIDE_ALONG_MAX = 2  # at most this many structured blocks: their A_kᵀ(Jw) in the interior point's Aᵀ product


class Rows(NamedTuple):
    """A group's rows when they are one contiguous range: read and written as views."""

    start: int
    stop: int
    shape: tuple


def contiguous(idx):
    """``idx`` as :class:`Rows` when its rows are one contiguous range, else ``idx``."""
    flat = idx.reshape(-1).cpu()
    start = int(flat[0])
    if torch.equal(flat, torch.arange(start, start + flat.numel())):
        return Rows(start, start + flat.numel(), tuple(idx.shape))
    return idx


def take(v, g):
    """``v[:, g]`` (a view for :class:`Rows`)."""
    if isinstance(g, Rows):
        return v[:, g.start:g.stop].reshape((v.shape[0],) + g.shape + v.shape[2:])
    return v[:, g]


def put(out, g, val):
    """``out[:, g] = val``."""
    if isinstance(g, Rows):
        out[:, g.start:g.stop] = val.reshape((val.shape[0], g.stop - g.start) + val.shape[1 + len(g.shape):])
    else:
        out[:, g] = val


class DataMatrix:
    """``A`` shared ``(m, n)`` or batched ``(B, m, n)``, with the products the interior point needs."""

    def __init__(self, A: torch.Tensor, pattern=None, sparse=None, block=None, norm=None, zero_columns=None):
        if A.dim() == 3 and A.stride(0) == 0:  # expanded from one matrix
            A = A[0]
        self._A, self._lazy = A, None  # _lazy: a subset's A, made on first use (see subset)
        self._root = self._index = None  # a lazy subset's source: root A and its batch index
        self.shared = A.dim() == 2
        self.shape, self.dtype, self.device = A.shape[-2:], A.dtype, A.device  # (m, n)
        if pattern is None:  # (a subset is given its parent's pattern, layout and norms)
            # A's zero pattern, shared by the batch (a batched A: the union over its elements, as a sum of
            # |A| that is zero only where every entry is: faster than (A != 0).any(0), a bool temporary),
            # and max |A| and the zero columns per element from the same |A|
            if self.shared:
                pattern, norm = A != 0, absmax(A, (-2, -1))
                zero_columns = ~pattern.any(0)
            else:
                pattern, norm, zero_columns = _pattern_and_norm(A)
                if int(pattern.sum()) <= SPARSE_PRODUCTS * pattern.numel():
                    sparse = SparseProducts(A, pattern)
                else:
                    block = _dense_block(A, pattern)
        self.pattern = pattern
        self.sparse = sparse
        self.block = block  # (rows, columns, A on them, the other rows' SparseProducts or None); or None
        self.norm = norm  # max |A|: () shared, (B,) batched
        self.zero_columns = zero_columns  # A's columns that are zero: (n,) shared, (B, n) batched

    @property
    def A(self):
        """``A`` (``(m, n)`` shared, ``(B, m, n)`` batched)."""
        if self._lazy is not None:
            self._A, self._lazy, self._root, self._index = self._lazy(), None, None, None
        return self._A

    def subset(self, keep):
        """The matrix of the batch elements ``keep`` (a shared one is kept as it is).  With a dense block or
        sparse products, the products do not read ``A`` itself: its elements ``keep`` are copied on first
        use only (:meth:`rows`, for a generic normal-matrix term or the zero cone's rows), not here."""
        if self.shared:
            return self
        block = None
        if self.block is not None:
            rows, cols, Ab, rest = self.block
            block = (rows, cols, Ab.index_select(0, keep), None if rest is None else rest.subset(keep))
        norm, zero_columns = self.norm.index_select(0, keep), self.zero_columns.index_select(0, keep)
        if block is None and self.sparse is None:
            return DataMatrix(self.A.index_select(0, keep), self.pattern, None, None, norm, zero_columns)
        out = DataMatrix.__new__(DataMatrix)
        out.__dict__.update(self.__dict__)
        out.sparse = None if self.sparse is None else self.sparse.subset(keep)
        out.block, out.norm, out.zero_columns = block, norm, zero_columns
        # the root A and the composed index, not ``self``: a chain of subsets keeps no parent alive
        base, idx = (self._root, self._index.index_select(0, keep)) if self._lazy is not None else (self._A, keep)
        out._A, out._root, out._index = None, base, idx
        out._lazy = lambda: base.index_select(0, idx)
        return out

    def mv(self, v):
        """``A v`` for ``v (B, n)`` → ``(B, m)``, or each of ``r`` columns ``v (B, r, n)`` → ``(B, r, m)``."""
        if self.block is not None:
            rows, cols, Ab, rest = self.block
            out = v.new_zeros(v.shape[:-1] + self.shape[:1]) if rest is None else rest.mv(v)
            return _add_last(out, rows, _rowmul(_take_last(v, cols), Ab.mT))
        if self.sparse is not None:
            return self.sparse.mv(v)
        if self.shared:
            return v @ self.A.mT
        return _rowmul(v, self.A.mT)

    def rmv(self, u):
        """``Aᵀ u`` for ``u (B, m)`` → ``(B, n)``, or ``(B, r, m)`` → ``(B, r, n)``."""
        if self.block is not None:
            rows, cols, Ab, rest = self.block
            out = u.new_zeros(u.shape[:-1] + self.shape[1:]) if rest is None else rest.rmv(u)
            return _add_last(out, cols, _rowmul(_take_last(u, rows), Ab))
        if self.sparse is not None:
            return self.sparse.rmv(u)
        if self.shared:
            return u @ self.A
        return _rowmul(u, self.A)

    def rows(self, idx):
        """The rows ``idx`` (a ``long`` tensor ``(*s)`` or :class:`Rows`) as ``(1 or B, *s, n)``."""
        return take(self.A[None] if self.shared else self.A, idx)


def _pattern_and_norm(A):
    """A batched ``A``'s pattern (shared by the batch), ``max |A|`` and the zero columns per element, from
    one ``|A|`` (freed on return)."""
    absA = A.abs()
    return absA.sum(0) != 0, absA.amax((-2, -1)), absA.sum(-2) == 0  # (a sum: twice as fast as amax(-2))


def _rowmul(v, M):
    """``v M`` per batch element for ``v (B, r, p)`` or ``(B, p)`` (a row-vector product: much faster than
    ``Mᵀ @ v[..., None]``) and ``M (B, p, q)``."""
    return v @ M if v.dim() == 3 else (v[:, None, :] @ M)[:, 0]


def _dense_block(A, pattern):
    """``(rows, columns, A on them, rest)`` for a batched ``A`` whose rows with more than
    :data:`SPARSE_PRODUCTS` of ``n`` nonzeros cover at most :data:`DENSE_BLOCK_BELOW` of it on their
    columns (``rest``: the other rows' :class:`~.cone_sparse.SparseProducts`, ``None`` without a
    nonzero); else ``None``."""
    m, n = pattern.shape
    dense = pattern.sum(1) > SPARSE_PRODUCTS * n
    rows = dense.nonzero()[:, 0]
    cols = pattern[rows].any(0).nonzero()[:, 0]
    if rows.numel() == 0 or rows.numel() * cols.numel() > DENSE_BLOCK_BELOW * m * n:
        return None
    rest = pattern & ~dense[:, None]
    rows, cols = _range(rows), _range(cols)
    Ab = _take_last(_take_last(A.mT, rows).mT, cols).contiguous()
    return rows, cols, Ab, SparseProducts(A, rest) if bool(rest.any()) else None


# A dense block's rows and columns are a slice where they are one range (cvxpy's canonical programs):
# index_select on the last dimension is several times slower than the slice's copy
def _range(idx):
    """``idx`` (sorted) as a ``slice`` where it is one contiguous range, else ``idx``."""
    lo = int(idx[0])
    return slice(lo, lo + idx.numel()) if int(idx[-1]) - lo + 1 == idx.numel() else idx


def _take_last(v, ix):
    return v[..., ix] if isinstance(ix, slice) else v.index_select(-1, ix)


def _add_last(out, ix, val):
    if isinstance(ix, slice):
        out[..., ix] += val
        return out
    return out.index_add_(-1, ix, val)


class NormalMatrix:
    """``N(states) = Σ_groups A_kᵀ W_k⁻¹W_k⁻ᵀ A_k`` for the cone groups ``[(kind, size, idx), …]``.

    ``cones`` maps a kind to its class (``winv_t`` is the only method used, for the generic form);
    the structured second-order-cone terms ``P_k`` and the generic groups' :class:`~.cone_sparse.SparseGram`
    (from ``A``'s zero pattern, where it pays) are formed here, once.
    """

    def __init__(self, data: DataMatrix, groups, cones, eliminate: bool = True):
        self.data, self.groups, self.cones = data, groups, cones
        self.pre = []
        self._buf = None  # N's memory, reused by every call (see "In place" above)
        n = data.A.shape[-1]
        lead = 1 if data.shared else data.A.shape[0]
        pattern = data.pattern
        supports = []  # the columns of each block
        for kind, size, idx in groups:
            rows = take(pattern[None], idx)[0]
            supports.append(rows if rows.dim() == 2 else rows.any(-2))
            nb = idx.shape[0] if len(idx.shape) == 2 else 1
            structured = (kind == "q" and size >= SOC_STRUCTURED_MIN
                          and lead * nb * n * n * data.A.element_size() <= _STRUCTURED_BYTES)
            sparse = sparse_gram(data.rows(idx), rows, n,
                                 nb * (n + size) * n if structured else None)
            if sparse is None and structured:
                cols = support_columns(supports[-1].any(0))
                Ak = _columns(data.rows(idx), cols)                     # (S, nb, k, n or s)
                self.pre.append((Ak,) + _soc_p(Ak, cols, rows, n))
            else:
                self.pre.append(sparse)
        # the riding groups' A_k are not read again (their products come from the interior point's Aᵀ product)
        for i in self._riding():
            self.pre[i] = (None,) + self.pre[i][1:]
        # N's factorization order (None: dense), for factor_normal; only a Cholesky (no zero cone) uses it
        self.elimination = plan = elimination(supports, n) if eliminate else None
        if plan is not None:  # N in the plan's compact layout: the terms on few columns add straight into it
            self.pre = [pre.onto(plan) if isinstance(pre, SparseGram) else
                        pre if pre is None or pre[2] is None else pre[:2] + ((pre[2][0], plan.slot[pre[2][1]]),)
                        for pre in self.pre]

    def subset(self, data: DataMatrix, keep):
        """The normal matrix of the batch elements ``keep`` (``data``: their :class:`DataMatrix`)."""
        out = NormalMatrix.__new__(NormalMatrix)
        out.data, out.groups, out.cones, out.elimination = data, self.groups, self.cones, self.elimination
        out._buf = None
        out.pre = [pre if pre is None or self.data.shared else pre.subset(keep) if isinstance(pre, SparseGram)
                   else (None if pre[0] is None else pre[0].index_select(0, keep), pre[1].index_select(0, keep)) + pre[2:]
                   for pre in self.pre]
        return out

    def _riding(self):
        """The dense structured groups whose products ``A_kᵀ(Jw)`` ride along in the interior point's first
        ``Aᵀ`` product (a batched ``A``, at most :data:`RIDE_ALONG_MAX` blocks in all; else ``[]``)."""
        if self.data.shared:
            return []
        dense = [i for i, pre in enumerate(self.pre) if isinstance(pre, tuple) and pre[2] is None]
        return dense if sum(_blocks(self.groups[i][2]) for i in dense) <= RIDE_ALONG_MAX else []

    def columns(self, states, m):
        """``(B, j, m)``: the vectors ``Jw`` of the riding blocks (:meth:`_riding`), each on its block's rows
        and zero elsewhere, whose ``Aᵀ`` products :meth:`__call__` takes as ``v``; ``None`` without."""
        ride = self._riding()
        if not ride:
            return None
        cols = []
        for i in ride:
            idx, w = self.groups[i][2], states[i][0]                 # w (B, nb, k)
            rows = (torch.arange(idx.start, idx.stop, device=w.device).view(idx.shape)
                    if isinstance(idx, Rows) else idx).reshape(-1, w.shape[-1])
            cols.append(w.new_zeros(w.shape[0], w.shape[1], m).scatter_(2, rows.expand(w.shape), _jw(w)))
        return torch.cat(cols, 1)

    def __call__(self, states, B, v=None):
        """``N (B, n, n)``, written into memory that the next call overwrites, or ``(B, size + 1)`` in the
        compact layout of :attr:`elimination` where there is one; ``v``: the products ``Aᵀ`` :meth:`columns`
        (``(B, j, n)``) where the caller made them."""
        ride = self._riding() if v is not None else []
        v = {i: t for i, t in zip(ride, v.split([_blocks(self.groups[i][2]) for i in ride], 1))} if ride else {}
        data, plan = self.data, self.elimination
        n = data.shape[-1]
        if self._buf is None or self._buf.shape[0] != B:
            self._buf = torch.empty(B, n, n, dtype=data.dtype, device=data.device)
        out = self._buf
        N = None  # the first dense term writes it (into out); the terms on few columns are added into it below
        Us = []  # the dense structured terms' rank updates, applied together: one pass over N
        on_nonzeros = []  # the weighted sums of the structured terms whose P_k is sparse
        for i, ((kind, _, idx), st, pre) in enumerate(zip(self.groups, states, self.pre)):
            if isinstance(pre, SparseGram) or (pre is not None and pre[2] is not None):
                continue
            if pre is None:  # generic: (W⁻ᵀA_k)ᵀ(W⁻ᵀA_k)
                At = self.cones[kind].winv_t(st, data.rows(idx)).reshape(B, -1, n)
                N = torch.bmm(At.mT, At, out=out) if N is None else N.baddbmm_(At.mT, At)
                continue
            e2, P2, U = self._soc(pre, st, B, v.get(i), idx)
            Us.append(U)
            if pre[3] is None:
                N = _add_weighted(N, e2, P2, B, n, out)
            else:
                on_nonzeros.append((pre[3], e2, P2))
        if N is None and (Us or plan is None):
            N = out.zero_()
        if Us:
            U = torch.cat(Us, 1) if len(Us) > 1 else Us[0]
            N.baddbmm_(U.mT, U)
        for flat, e2, P2 in on_nonzeros:
            N.view(B, n * n).index_add_(1, flat, _weighted(e2, P2).reshape(B, -1))
        if plan is not None:
            N = plan.zeros(B, data.norm) if N is None else plan.compact(N)
        for (kind, _, _), st, pre in zip(self.groups, states, self.pre):
            if isinstance(pre, SparseGram):
                pre(self.cones[kind].winv_t, st, N)
            elif pre is not None and pre[2] is not None:  # structured on the group's s columns
                e2, P2, U = self._soc(pre, st, B)
                s = U.shape[-1]
                T = _add_weighted(None, e2, P2, B, s).baddbmm_(U.mT, U)
                N.view(B, -1).index_add_(1, pre[2][1], T.reshape(B, s * s))
        return N

    def _soc(self, pre, st, B, v=None, idx=None):
        """A structured group's ``Σ_k e_k P_k`` as the product ``e2 @ P2`` and ``U`` (its rank update ``UᵀU``);
        ``v``: its products ``A_kᵀ(Jw)`` ``(B, nb, n)`` where the caller made them (a riding group's ``A_k`` is not
        kept: without ``v`` it is read from ``A``, rows ``idx``)."""
        Ak, P = pre[:2]
        w, eta = st[0], st[1]                                          # (B, nb, k), (B, nb)
        e = eta.reciprocal().square()
        nb = w.shape[1]
        if self.data.shared:  # one batched product over blocks: (nb, B, k) @ (nb, k, s)
            v = (_jw(w).transpose(0, 1) @ Ak[0]).transpose(0, 1)       # (B, nb, s)
            e2, P2 = e[None], P[0].reshape(1, nb, -1)                  # (1, B, nb) @ (1, nb, s² or nnz)
        else:
            if v is None:
                Ak = self.data.rows(idx) if Ak is None else Ak
                v = (_jw(w)[..., None, :] @ Ak)[..., 0, :]             # (B, nb, s)
            e2, P2 = e[:, None, :], P.reshape(B, nb, -1)               # (B, 1, nb) @ (B, nb, s² or nnz)
        return e2, P2, v * (2 * e).sqrt()[..., None]


def _jw(w):
    """``J w`` (``J = diag(1, −1, …, −1)``) for ``w (…, k)``."""
    return torch.cat([w[..., :1], -w[..., 1:]], -1)


def _blocks(idx):
    """The number of blocks of a group's rows ``idx`` (``(nb, k)``, or ``(rows,)``: one)."""
    shape = idx.shape if isinstance(idx, Rows) else tuple(idx.shape)
    return shape[0] if len(shape) == 2 else 1


def _add_weighted(N, e2, P2, B, n, out=None):
    """``N + e2 @ P2`` in place (``N`` ``None``: written into ``out`` or a new ``(B, n, n)``), the weighted
    sum ``Σ_k e_k P_k`` of a structured group."""
    if N is None:
        return _weighted(e2, P2, None if out is None else out.view(e2.shape[0], -1, n * n)).view(B, n, n)
    Nv = N.view(e2.shape[0], -1, n * n)
    if P2.shape[-2] == 1:
        Nv.addcmul_(e2, P2)
    else:
        Nv.baddbmm_(e2, P2)
    return N


def _weighted(e2, P2, out=None):
    """``e2 @ P2``; with one block (``P2 (·, 1, ·)``) an elementwise product (a matrix product with an
    inner dimension of 1 is several times slower)."""
    return torch.mul(e2, P2, out=out) if P2.shape[-2] == 1 else torch.bmm(e2, P2, out=out)


def _soc_p(Ak, cols, pattern, n):
    """``(P, cols, flat)``: a dense structured group's ``P_k = A_kᵀ(−J)A_k``.  On the entries that its rows'
    ``pattern (nb, k, n)`` can make nonzero (two columns in one row; the others are sums of exact zeros), their
    places ``flat`` in ``N``'s ``n²``, where adding them costs at most half of a dense pass
    (:data:`~.cone_sparse.SCATTER_COST`; an SOC ``‖x‖ ≤ t`` on a variable's rows: ``P_k`` diagonal), formed there
    from each row's own nonzeros (:func:`_p_on_pattern`); else ``(P, cols, None)``, ``P`` ``(S, nb, n, n)`` from
    one Gram of the block (on its columns ``cols`` where given)."""
    if cols is None:
        pat = pattern.reshape(-1, pattern.shape[-2], n)
        pf = pat.to(Ak.dtype)
        nz = ((pf.mT @ pf) != 0).any(0).reshape(-1)
        if SCATTER_COST * pat.shape[0] * int(nz.sum()) <= n * n / 2:
            flat = nz.nonzero()[:, 0]
            return _p_on_pattern(Ak, pat, flat, n), cols, flat
    a0 = Ak[..., :1, :].reshape(-1, 1, Ak.shape[-1])
    P = Ak[..., 1:, :].mT @ Ak[..., 1:, :]                 # A_kᵀ(−J)A_k, the a₀ term in place:
    P.view(-1, *P.shape[-2:]).baddbmm_(a0.mT, a0, alpha=-1)
    return P, cols, None


def _p_on_pattern(Ak, pat, flat, n):
    """``P_k = Σ_rows ±a_r a_rᵀ`` (``−`` for the block's first row) at the places ``flat`` of its possible nonzeros,
    ``(S, nb, flat.numel())``, from the products of each row's ``c`` nonzeros (``pat (nb, k, n)``; ``c²`` per row,
    at most ``flat.numel()`` — not the block's dense ``k·n²`` Gram)."""
    nb, k, _ = pat.shape
    count = pat.sum(-1)                                                     # (nb, k)
    c = max(int(count.max()), 1)
    col = torch.sort((~pat).to(torch.int8), dim=-1, stable=True).indices[..., :c]  # each row's nonzero columns first
    sign = torch.ones(k, dtype=Ak.dtype, device=Ak.device)
    sign[0] = -1.0
    a = Ak.gather(-1, col.expand(Ak.shape[:-1] + (c,)))                     # (S, nb, k, c)
    a_signed = a * ((torch.arange(c, device=Ak.device) < count[..., None]) * sign[:, None])  # (padding: 0)
    slot = torch.zeros(n * n, dtype=torch.long, device=Ak.device)
    slot[flat] = torch.arange(flat.numel(), device=Ak.device)
    place = slot[col[..., :, None] * n + col[..., None, :]]                 # (nb, k, c, c); padding: any (adds 0)
    place = place + flat.numel() * torch.arange(nb, device=Ak.device)[:, None, None, None]
    out = Ak.new_zeros(Ak.shape[0], nb * flat.numel())
    out.index_add_(1, place.reshape(-1), (a_signed[..., :, None] * a[..., None, :]).reshape(Ak.shape[0], -1))
    return out.view(Ak.shape[0], nb, flat.numel())


def _columns(Ak, cols):
    """``Ak`` on the columns ``cols`` (``None``: all)."""
    return Ak if cols is None else Ak.index_select(-1, cols[0])


def factor_normal(make_N, data, z, plan=None):
    """The factorization of the reduced Newton system ``[[N, A_zᵀ], [A_z, 0]]`` (``z`` zero-cone rows):
    Cholesky of ``N + eps^¾ I`` without a zero cone (dense, or with the private columns of ``plan``,
    :attr:`NormalMatrix.elimination`, eliminated first: :class:`~.cone_sparse.Elimination`), else an
    LU of the quasi-definite matrix regularized by ``±eps^¾``.

    ``make_N()`` returns a fresh ``N`` (:class:`NormalMatrix`'s: ``(B, n, n)``, or in ``plan``'s compact
    layout): a scratch buffer, its diagonal shifted in place; the Cholesky factorizations and the LU
    factor it where it lies (:func:`~implicitdiff.linalg.kkt.cholesky_lower_`, the elimination's ``N_PD``
    in place, and the LU in the column-major buffer it is assembled in), so none copies it.  It is called
    a second time only where a Cholesky fails."""
    N = make_N()
    B, n = N.shape[0], N.shape[-1]
    eps = torch.finfo(N.dtype).eps
    delta = eps ** 0.75
    if z == 0:
        chol = _dense_cholesky if plan is None else plan.cholesky
        diags = (N.diagonal(dim1=-2, dim2=-1),) if plan is None else plan.diagonals(N)
        for diag in diags:
            diag.add_(delta)
        F, info = chol(N)
        if bool((info > 0).any()):  # rounding made N indefinite: a shift relative to its diagonal
            F = tuple(f.clone() for f in F)  # the factor lies (in part) in N's memory: keep it, build N again
            N = make_N()
            diags = (N.diagonal(dim1=-2, dim2=-1),) if plan is None else plan.diagonals(N)
            big = eps ** 0.5 * torch.stack([dg.abs().flatten(1).amax(-1) for dg in diags]).amax(0).clamp(min=1.0)
            for diag in diags:
                diag.add_(big.reshape((-1,) + (1,) * (diag.dim() - 1)))
            F2, _ = chol(N)
            F = tuple(torch.where((info > 0).reshape((-1,) + (1,) * (f.dim() - 1)), f2, f) for f, f2 in zip(F, F2))
        return ("chol", (plan, F))
    K = N.new_empty(B, n + z, n + z).mT  # column-major, as the LU works: factored where it lies
    K.mT[:, :n, :n] = N  # N is symmetric: Nᵀ, a straight copy (module docstring)
    Az = data.rows(Rows(0, z, (z,)))
    K[:, n:, :n] = Az
    K[:, :n, n:] = Az.mT
    K[:, n:, n:] = -delta * torch.eye(z, dtype=N.dtype, device=N.device)
    K.diagonal(dim1=-2, dim2=-1)[:, :n].add_(delta)
    piv = torch.empty(B, n + z, dtype=torch.int32, device=N.device)
    torch.linalg.lu_factor_ex(K, out=(K, piv, torch.empty(B, dtype=torch.int32, device=N.device)))
    return ("lu", (K, piv))


def _dense_cholesky(N):
    L, info = cholesky_lower_(N)
    return (L,), info


def solve_normal(fac, rhs1, r2z):
    """``(p, q_z)`` solving the factored system for the x-rows ``rhs1 (B, r, n)`` and zero-cone rows
    ``r2z (B, r, z)``: two triangular solves for a Cholesky factor (much faster than
    ``cholesky_solve`` on the CPU), ``lu_solve`` for the LU."""
    kind, F = fac
    if kind == "chol":
        plan, F = F
        return (chol_solve(F[0], rhs1.mT).mT if plan is None else plan.solve(F, rhs1)), rhs1[..., :0]
    n = rhs1.shape[-1]
    sol = torch.linalg.lu_solve(F[0], F[1], torch.cat([rhs1, r2z], -1).mT).mT
    return sol[..., :n], sol[..., n:]
