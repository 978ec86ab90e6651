r"""A cone group's normal-matrix term ``Σ_b (W_b⁻ᵀA_b)ᵀ(W_b⁻ᵀA_b)`` from the zero pattern of ``A``.

**The trick** (:class:`SparseGram`, used by :class:`~.cone_gram.NormalMatrix` for a generic
group when it pays).  ``W_b⁻ᵀ`` mixes only the rows of its block ``b``, so ``Ã_b = W_b⁻ᵀA_b`` is
zero outside the columns ``S_b`` where ``A_b`` has a nonzero (the pattern of ``A``, shared by the
batch: a batched ``A``'s union over the batch; computed once per solve), and the block's term
``Ã_bᵀÃ_b`` lives on ``S_b × S_b``.  Canonical cone programs (cvxpy's) have many such blocks:
an exponential block of a logistic regression touches the weights and two columns of its own.
The columns are split once per solve into

* **shared** columns ``D``: in more than :data:`PRIVATE_MAX_BLOCKS` blocks of the group, and
* each block's **private** columns ``P_b = S_b \ D`` (padded to the group's largest count ``p``
  with entries set to zero),

and ``A``'s rows are gathered once onto the ``d + p`` columns ``[D, P_b]`` of each block.  Per
iteration the cone's ``winv_t`` scales these ``d + p`` columns instead of ``n``, and

    N_DD        += X_DᵀX_D            (one batched Gram over the rows of the blocks that touch D)
    N_{P_b, ·}  += Ã_b[:, P_b]ᵀ Ã_b   (on [D, P_b] for blocks that touch D, on P_b for the others)
    N_{D, P_b}  += its transpose

are added into ``N`` by an ``index_add_`` each over indices formed once per solve (padding columns
add exact zeros).  **The per-block product** ``Ã_b[:, P_b]ᵀ Ã_b`` (``k × p`` by ``k × (d + p)``) of
blocks of few rows is a sum of ``k`` outer products, each one elementwise op on all blocks
(:func:`_block_tmul`): ATen's batched ``bmm`` multiplies matrices with ``k·p·(d + p)`` below
:data:`BMM_NAIVE_BELOW` by a naive loop per matrix, about twice as slow here (an exp block of a
logistic regression: ``k = 3``, ``p = 2``, ``d + p = 52``); it keeps ``bmm`` beyond that size or
:data:`OUTER_MAX_ROWS` rows.  The blocks that touch ``D`` and the others are taken as views where
each is one range of blocks (cvxpy's canonical programs: :func:`_span`), not copied per iteration.
**The shared columns through one row**: where every block meets ``D`` in one of its rows ``j_b`` (an
exp block of a logistic regression: the weights enter its first coordinate only), ``A_b`` on ``D`` is
``e_j v_bᵀ``, so ``Ã_b`` on ``D`` is the rank-one ``u_b v_bᵀ`` with ``u_b = W_b⁻ᵀe_j`` (``winv_t`` on one
column) and the block's terms are ``N_DD += ‖u_b‖² v_b v_bᵀ`` (a Gram over one row per block, not
``k``), ``N_{P_b, D} += (Ã_b[:, P_b]ᵀu_b) v_bᵀ``; ``winv_t`` scales the ``p`` private columns only
(not ``d + p``; the blocks off ``D`` no longer carry ``d`` zero columns): the bench's exp case,
forward + backward 0.93× (docs/benchmarks.md).  The terms ``‖u_b‖v_b`` and ``N_{P_b, D}`` are written
into memory that the next call reuses (fresh memory costs its page faults: see the compact layout
below), and a term whose place in the compact layout is one range (``N_DD``) is added there as a
view, not by ``index_add_``.  The sum is the dense ``ÃᵀÃ`` up to rounding (the same
products, summed in another order).  A group is formed this way only when :func:`sparse_gram` estimates it at most
half the cost of the form it replaces (:data:`SCATTER_COST`): the dense Gram, or for large
second-order blocks the structured term (``~n²`` per block, see :mod:`~.cone_gram`).  A structured
group kept as such is formed on its columns ``S`` only (``|S| × |S|``, scattered) where
:func:`support_columns` finds ``S`` small enough.

**Products with a batched sparse** ``A`` (:class:`SparseProducts`, used by
:class:`~.cone_gram.DataMatrix` when at most :data:`SPARSE_PRODUCTS` of the pattern's entries are
nonzero): ``A``'s values on the pattern ``(B, nnz)``, gathered once into block-diagonal CSR matrices
``diag(A_1, …, A_B)`` and ``diag(A_1ᵀ, …, A_Bᵀ)``; ``Av`` and ``Aᵀu`` (``r`` columns each) are one
sparse-dense product ``(B·m, B·n) × (B·n, r)`` — ``nnz`` instead of ``m·n`` multiply-adds, and ``A``
itself (``B·m·n`` entries) is not read per product (a gather/multiply/``index_add_`` over the entries
costs several times more on CPU with ``r = 2, 3``: docs/benchmarks.md).  The indices are ``int32``
where they fit: a product reads a value and a column index per entry, 12 bytes instead of 16
(1.4 × faster at the bench's exp case).  A shared ``A`` keeps its one matrix product.

**The Cholesky factor of** ``N`` **by eliminating private columns first** (:class:`Elimination`,
used by :func:`~.cone_gram.factor_normal` without a zero cone).  ``N``'s pattern is the union of
the blocks' ``S_b × S_b``.  With ``D`` the columns in more than :data:`PRIVATE_MAX_BLOCKS` blocks
(over all groups) and ``P`` the others, ``N_PP`` often splits into many small diagonal blocks
(a logistic regression: one ``3 × 3`` block per sample); then, ordering ``P`` first,

    N_PP = L_P L_Pᵀ (blockwise, batched),  W = L_P⁻¹ N_PD,  N_DD − WᵀW = L_D L_Dᵀ

is the Cholesky factorization of the symmetrically permuted ``N`` (as stable as the dense one),
for ``~c³/3`` per block of size ``c`` and ``d³/3`` instead of ``n³/3``; a solve is two small
blockwise and two ``d × d`` triangular solves.  **The compact layout**: the factorization reads
``N_PP``'s blocks, ``N_PD`` and ``N_DD`` only, so the normal matrix is formed straight into them
(``B·(ncomp·c² + ncomp·c·d + d²)`` entries, not ``B·n²``): the terms' flat indices into ``N`` are
mapped there once per solve (:attr:`Elimination.slot`), and a dense term, where a group has one,
is gathered there; it is one buffer zeroed and reused by every iteration, and the factorization
computes ``W = L_P⁻¹N_PD``, the only part of it that it keeps, where ``N_PD`` lies: fresh memory costs
its page faults, about 3 × the zeroing (a 10 MB buffer; docs/benchmarks.md).
**The blocks' triangular solves** with ``L_P`` are substitutions row by row,
each step one elementwise op on all ``B·ncomp`` blocks (:func:`_substitute_`): LAPACK takes one
call per block, whose overhead dominates for blocks of at most :data:`SUBSTITUTE_MAX` columns
(docs/benchmarks.md); larger blocks take LAPACK's batched solve.  Used when the blocks have at most
:data:`ELIM_MAX_BLOCK` columns and the estimate is at most half the dense factorization's.
Forward only.
"""

from __future__ import annotations

import warnings

import torch

from ..linalg.kkt import cholesky_lower_

__all__ = ["SparseGram", "sparse_gram", "support_columns", "SparseProducts", "Elimination", "elimination",
           "PRIVATE_MAX_BLOCKS", "SCATTER_COST", "SPARSE_PRODUCTS", "ELIM_MAX_BLOCK"]

PRIVATE_MAX_BLOCKS = 2  # a column in more blocks of a group than this is shared (a dense Gram block)
SCATTER_COST = 4.0      # an entry added by index_add_ costs about this many multiply-adds (measured, CPU)
SPARSE_PRODUCTS = 0.25  # a batched A with at most this fraction of nonzeros: SparseProducts
ELIM_MAX_BLOCK = 16     # N_PP's diagonal blocks larger than this: the dense Cholesky
SUBSTITUTE_MAX = 4      # blocks of N_PP with more columns: LAPACK's triangular solves, not substitution
BMM_NAIVE_BELOW = 400   # ATen's CPU bmm multiplies (p×k)(k×q) matrices with k·p·q below this by a naive loop
OUTER_MAX_ROWS = 4      # blocks of more rows: SparseGram's per-block product by bmm, not outer products


def support_columns(sup):
    """``(S, flat)`` for a term that lives on the columns ``S`` of ``sup (n,)`` (bool), with ``flat`` the
    indices of ``S × S`` in ``N (n·n)``; ``None`` where ``S`` is too large for the scatter to pay."""
    n = sup.numel()
    S = sup.nonzero()[:, 0]
    if 2 * SCATTER_COST * S.numel() ** 2 > n * n:
        return None
    return S, (S[:, None] * n + S).reshape(-1)


def sparse_gram(rows, pattern, n, cost=None):
    """A :class:`SparseGram` for a group's rows ``(1 or B, *s, n)`` of ``A`` (``s = (rows,)``: blocks
    of one row; ``(blocks, k)``) with ``pattern (*s, n)`` (bool), or ``None`` where it would cost
    more than half of ``cost`` (multiply-adds per batch element; default: the dense Gram's)."""
    sup = pattern if pattern.dim() == 2 else pattern.any(-2)   # (nb, n): S_b
    k = 1 if pattern.dim() == 2 else pattern.shape[-2]
    nb = sup.shape[0]
    shared = sup.sum(0) > PRIVATE_MAX_BLOCKS
    D = shared.nonzero()[:, 0]
    priv = sup & ~shared
    p = int(priv.sum(1).max())
    d = D.numel()
    touch = sup[:, D].any(1)                                   # blocks that touch D
    nd = int(touch.sum())
    dense = nb * k * n * n if cost is None else cost
    entries = d * d + nd * p * (2 * d + p) + (nb - nd) * p * p
    flops = nd * k * d * d + nd * k * p * (d + p) + (nb - nd) * k * p * p
    if flops + SCATTER_COST * entries > 0.5 * dense:
        return None
    return SparseGram(rows, pattern, sup, D, priv, p, k)


class SparseGram:
    """One generic group's term from ``A``'s pattern (module doc); ``__call__(winv_t, state, N)``
    adds it into ``N (B, n, n)`` in place, or into an :class:`Elimination`'s compact layout (:meth:`onto`)."""

    def __init__(self, rows, pattern, sup, D, priv, p, k):
        nb, n = sup.shape
        d = D.numel()
        # each block's private columns first; the padding repeats the first one, its entries set to zero below
        P = torch.sort(priv.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :p]   # (nb, p)
        real = priv.gather(1, P)
        P = torch.where(real, P, P[:, :1])
        cols = torch.cat([D.expand(nb, d), P], 1)                   # (nb, d + p)
        keep = torch.cat([torch.ones(nb, d, dtype=torch.bool, device=P.device), real], 1)
        if rows.dim() == 4:                                         # blocks of k rows
            gcols, keep = cols[:, None, :].expand(nb, k, d + p), keep[:, None, :]
        else:
            gcols = cols
        self.rows = rows.gather(-1, gcols.expand(rows.shape[:1] + gcols.shape)) * keep  # (1 or B, *s, d + p)
        self.shape, self.d, self.p = (nb, k, d + p), d, p
        touch = sup[:, D].any(1)
        on_d = pattern[..., D].any(-1) if k > 1 else None           # (nb, k): each block's rows on D
        # blocks that touch D (their Gram on [D, P_b]) and the others (on P_b): None for all blocks
        self.touch = None if bool(touch.all()) else _span(touch.nonzero()[:, 0])
        self.other = None if not bool(touch.any()) else _span((~touch).nonzero()[:, 0])
        # flat indices into N (n·n) of the terms N_DD, N_{P_b, [D, P_b]} (blocks on D), N_{P_b, P_b} (the
        # others) and the transpose N_{D, P_b} (the last: onto may leave it out)
        Pt, Ct, Po = _blocks(P, self.touch), _blocks(cols, self.touch), _blocks(P, self.other)
        self.index = [(D[:, None] * n + D).reshape(-1), (Pt[:, :, None] * n + Ct[:, None, :]).reshape(-1),
                      (Po[:, :, None] * n + Po[:, None, :]).reshape(-1),
                      (D[None, :, None] * n + Pt[:, None, :]).reshape(-1)]
        self.unit = self.vD = None
        self._scratch = {}  # the one-row path's terms' memory, reused by every call (_buffer)
        if on_d is not None and bool(touch.any()) and bool((on_d.sum(1) <= 1).all()):
            # the shared columns through one row (module doc): the terms N_DD, N_{P_b, D} (blocks on D),
            # N_{P_b, P_b} (every block) and N_{D, P_b}; the rows kept on P_b only
            row = on_d.to(torch.int8).argmax(1)                                    # (nb,): the row on D
            self.unit = torch.nn.functional.one_hot(row, k).to(rows.dtype)[None, ..., None]   # (1, nb, k, 1)
            row = _blocks(row, self.touch)
            self.vD = _blocks(self.rows, self.touch, 1)[..., :d].gather(
                2, row[None, :, None, None].expand(self.rows.shape[0], -1, 1, d))[:, :, 0]   # (1 or B, nd, d)
            self.rows = self.rows[..., d:].contiguous()                            # (1 or B, nb, k, p)
            self.index = [self.index[0], (Pt[:, :, None] * n + D).reshape(-1),
                          (P[:, :, None] * n + P[:, None, :]).reshape(-1), self.index[3]]

    def subset(self, keep):
        """The same plan for the batch elements ``keep`` of a batched ``A``."""
        out = SparseGram.__new__(SparseGram)
        out.__dict__.update(self.__dict__)
        out.rows = self.rows.index_select(0, keep)
        out.vD = None if self.vD is None else self.vD.index_select(0, keep)
        out._scratch = {}
        return out

    def onto(self, plan):
        """The same term added into ``plan``'s compact layout (an :class:`Elimination`); the transposed
        part ``N_{D, P_b}`` is left out where the layout has none of it."""
        out = SparseGram.__new__(SparseGram)
        out.__dict__.update(self.__dict__)
        out.index = [plan.slot[ix] for ix in self.index]
        if bool((out.index[3] == sum(plan.sizes)).all()):
            out.index = out.index[:3]
        out.index = [_as_slice(ix) for ix in out.index]  # a range (N_DD where D is the plan's): added as a view
        return out

    def __call__(self, winv_t, st, N):
        B, d = N.shape[0], self.d
        flat = N.view(B, -1)
        if self.vD is not None:                                     # the shared columns through one row
            AP = winv_t(st, self.rows)                              # (B, nb, k, p): Ã on P_b
            u = _blocks(winv_t(st, self.unit), self.touch, 1)       # (B, nd, k, 1): W⁻ᵀ's column of that row
            g = u.square().sum(-2).sqrt()                           # (B, nd, 1): ‖u‖
            X = torch.mul(g, self.vD, out=self._buffer("X", (B,) + self.vD.shape[1:], g))      # ‖u‖ v_D
            R = _block_tmul(_blocks(AP, self.touch, 1), u)          # (B, nd, p, 1), times v_D: (B, nd, p, d)
            R = torch.mul(R, self.vD[:, :, None, :], out=self._buffer("R", R.shape[:3] + (d,), R))
            terms = (X.mT @ X, R, _block_tmul(AP, AP), R.mT)
        else:
            At = winv_t(st, self.rows).reshape((B,) + self.shape)  # (B, nb, k, d + p)
            At_t, Y = _blocks(At, self.touch, 1), _blocks(At[..., d:], self.other, 1)
            X = At_t[..., :d].flatten(1, 2)                         # (B, nd·k, d)
            R = _block_tmul(At_t[..., d:], At_t)                    # (B, nd, p, d + p)
            terms = (X.mT @ X, R, _block_tmul(Y, Y), R[..., :d].mT)
        for ix, v in zip(self.index, terms):                        # (the transpose: where indexed)
            if isinstance(ix, slice):                               # one range of the compact layout
                flat[:, ix] += v.reshape(B, -1)
            else:
                flat.index_add_(1, ix, v.reshape(B, -1))
        return N

    def _buffer(self, name, shape, like):
        """Memory for the term ``name``, reused by the next call (module doc: the one-row path)."""
        buf = self._scratch.get(name)
        if buf is None or buf.shape != shape:
            buf = self._scratch[name] = like.new_empty(shape)
        return buf


def _as_slice(ix):
    """The indices ``ix`` as a ``slice`` where they are one ascending range, else ``ix``."""
    lo = int(ix[0]) if ix.numel() else 0
    return slice(lo, lo + ix.numel()) if torch.equal(ix, torch.arange(lo, lo + ix.numel(), device=ix.device)) else ix


def _block_tmul(P, V):
    """``Pᵀ V`` per block for ``P (*, k, p)`` and ``V (*, k, q)``: a sum of ``k`` outer products, each one
    elementwise op on all blocks (module doc), where ATen's ``bmm`` takes its naive loop; else ``bmm``."""
    (k, p), q = P.shape[-2:], V.shape[-1]
    if k > OUTER_MAX_ROWS or k * p * q >= BMM_NAIVE_BELOW:
        return P.mT @ V
    R = P[..., 0, :, None] * V[..., 0, None, :]
    for i in range(1, k):
        R.addcmul_(P[..., i, :, None], V[..., i, None, :])
    return R


def _span(ix):
    """The block indices ``ix`` (sorted) as ``(start, length)`` where they are one range, else ``ix``."""
    if ix.numel() == 0:
        return ix
    lo = int(ix[0])
    return (lo, ix.numel()) if int(ix[-1]) - lo + 1 == ix.numel() else ix


def _blocks(v, ix, dim=0):
    """The blocks ``ix`` of ``v`` along ``dim`` (``None``: all of them; a range: a view, not a copy)."""
    if ix is None:
        return v
    return v.narrow(dim, *ix) if isinstance(ix, tuple) else v.index_select(dim, ix)


class SparseProducts:
    """``Av`` and ``Aᵀu`` for a batched ``A (B, m, n)`` from its values on the ``pattern (m, n)``."""

    def __init__(self, A, pattern):
        m, n = self.shape = A.shape[-2:]
        self.row, self.col = pattern.nonzero().unbind(1)           # sorted by row, then column
        self.tperm = torch.argsort(self.col * m + self.row)         # the same entries sorted by column, then row
        self._values(A[:, self.row, self.col])

    def _values(self, vals):
        """The batch's values ``(B, nnz)`` on the pattern, and ``A``, ``Aᵀ`` as block-diagonal CSR matrices."""
        (m, n), t = self.shape, self.tperm
        self.vals = vals
        self.a = _block_diagonal(vals, self.row, self.col, m, n)
        self.at = _block_diagonal(vals[:, t], self.col[t], self.row[t], n, m)

    def subset(self, keep):
        out = SparseProducts.__new__(SparseProducts)
        out.shape, out.row, out.col, out.tperm = self.shape, self.row, self.col, self.tperm
        out._values(self.vals.index_select(0, keep))
        return out

    def mv(self, v):
        """``A v``: ``(B, n)`` → ``(B, m)`` or ``(B, r, n)`` → ``(B, r, m)``."""
        return _block_product(self.a, v, self.shape[0])

    def rmv(self, u):
        """``Aᵀ u``: ``(B, m)`` → ``(B, n)`` or ``(B, r, m)`` → ``(B, r, n)``."""
        return _block_product(self.at, u, self.shape[1])


def _block_diagonal(vals, row, col, m, n):
    """The ``(B·m, B·n)`` CSR matrix with the ``B`` blocks whose values ``vals (B, nnz)`` lie at ``(row, col)``
    (sorted by row, then column) on its diagonal."""
    B = vals.shape[0]
    counts = torch.bincount(row, minlength=m).repeat(B)
    crow = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    cols = (torch.arange(B, device=col.device)[:, None] * n + col).reshape(-1)
    if max(B * max(m, n), vals.numel()) < 2 ** 31:  # int32 indices: a product reads 12 bytes per entry, not 16
        crow, cols = crow.int(), cols.int()
    with warnings.catch_warnings():  # torch's notice that its CSR support is in beta (the product used here is not)
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, cols, vals.reshape(-1), (B * m, B * n), check_invariants=False)


def _block_product(M, v, size):
    """``M``'s blocks times ``v (B, c)`` or ``(B, r, c)``: one sparse product, the columns ``r`` of each block last."""
    cols = v.mT if v.dim() == 3 else v[..., None]                  # (B, c, r)
    B, r = cols.shape[0], cols.shape[-1]
    out = (M @ cols.reshape(-1, r)).view(B, size, r)
    return out.mT.contiguous() if v.dim() == 3 else out[..., 0]


def elimination(supports, n):
    """An :class:`Elimination` for ``N (n, n)`` from the blocks' column supports (``(nb, n)`` bool per
    group), or ``None`` where ``N_PP`` has a block above :data:`ELIM_MAX_BLOCK` or the dense
    factorization is cheaper."""
    sup = torch.cat(supports)
    shared = sup.sum(0) > PRIVATE_MAX_BLOCKS
    D, P = shared.nonzero()[:, 0], (~shared).nonzero()[:, 0]
    if P.numel() == 0:
        return None
    # N_PP's blocks: the connected components of the graph linking each block's private columns
    # (a chain per block), by label propagation; one of more than ELIM_MAX_BLOCK columns has a
    # path longer than ELIM_MAX_BLOCK, so it does not settle within that many rounds
    nz = (sup & ~shared).nonzero()                              # (block, column), sorted by block
    link = nz[1:, 0] == nz[:-1, 0]
    src, dst = nz[:-1, 1][link], nz[1:, 1][link]
    lab = torch.arange(n, device=sup.device)
    for _ in range(ELIM_MAX_BLOCK):
        new = lab.scatter_reduce(0, dst, lab[src], "amin").scatter_reduce(0, src, lab[dst], "amin")
        if torch.equal(new, lab):
            break
        lab = new
    else:
        return None
    _, comp_of, counts = torch.unique(lab[P], return_inverse=True, return_counts=True)
    c, d = int(counts.max()), D.numel()
    if c > ELIM_MAX_BLOCK or (counts.numel() * (c ** 3 / 3 + c * c * d + c * d * d) + d ** 3 / 3) > n ** 3 / 6:
        return None
    order = torch.argsort(comp_of, stable=True)
    slot = torch.arange(P.numel(), device=P.device) - (torch.cumsum(counts, 0) - counts)[comp_of[order]]
    comp = torch.full((counts.numel(), c), -1, dtype=torch.long, device=P.device)
    comp[comp_of[order], slot] = P[order]
    return Elimination(D, comp, n)


class Elimination:
    """The Cholesky factorization of ``N`` with the private columns' blocks ``comp (ncomp, c)``
    (padded with ``−1``) eliminated first, onto the shared columns ``D`` (module doc).

    It reads ``N`` in its own *compact layout* ``(B, size + 1)``: ``N_PP``'s blocks ``(ncomp, c, c)``,
    ``N_PD (ncomp, c, d)`` and ``N_DD (d, d)`` one after the other, then one discarded slot; the entries
    on the padding are zero (never added to, or set so by :meth:`compact`).
    :attr:`slot` maps each entry of ``N (n·n)`` to its place there; the entries the factorization
    does not read (``N_DP``, ``N_PD``'s transpose) map to the discarded slot, so a term given as
    values and flat indices into ``N`` is added into the layout by one ``index_add_`` on
    ``slot[indices]``, and ``N`` (``n²`` entries) is never formed where every term is."""

    def __init__(self, D, comp, n):
        self.D, self.valid = D, comp >= 0
        self._zeros = None  # the compact N's memory, reused by every call of zeros
        self.comp = torch.where(self.valid, comp, comp[:, :1])    # padding: the block's first column
        self.pad = self.valid[:, :, None] & self.valid[:, None, :]
        cf = self.comp.reshape(-1)
        (nc, c), d = comp.shape, D.numel()
        # N_PP, N_PD, N_DD's entries in N (n·n): the compact layout
        cp = self.comp
        self.flat = torch.cat([(cp[:, :, None] * n + cp[:, None, :]).reshape(-1), (cf[:, None] * n + D).reshape(-1),
                               (D[:, None] * n + D).reshape(-1)])
        self.sizes = [nc * c * c, nc * c * d, d * d]
        size = sum(self.sizes)
        real = torch.cat([self.pad.reshape(-1), self.valid[:, :, None].expand(nc, c, d).reshape(-1),
                          torch.ones(d * d, dtype=torch.bool, device=D.device)])
        self.slot = torch.full((n * n,), size, dtype=torch.long, device=D.device)
        self.slot[self.flat[real]] = real.nonzero()[:, 0]
        self.padding = (~real).nonzero()[:, 0]  # the layout's entries on padding: kept zero
        # each column's place in [x_P (padded), x_D]
        self.place = torch.empty(n, dtype=torch.long, device=D.device)
        self.place[cf[self.valid.reshape(-1)]] = self.valid.reshape(-1).nonzero()[:, 0]
        self.place[D] = cf.numel() + torch.arange(D.numel(), device=D.device)

    def zeros(self, B, like):
        """A zero ``N`` in the compact layout ``(B, size + 1)`` (``like``'s dtype and device): one buffer,
        zeroed and returned again by the next call (module doc)."""
        shape = (B, sum(self.sizes) + 1)
        if self._zeros is None or self._zeros.shape != shape or self._zeros.dtype != like.dtype:
            self._zeros = like.new_zeros(shape)
            return self._zeros
        return self._zeros.zero_()

    def compact(self, N):
        """A dense ``N (B, n, n)`` in the compact layout (the padding zero, the discarded slot: any value)."""
        return N.view(N.shape[0], -1).index_select(1, torch.cat([self.flat, self.flat[:1]])).index_fill_(
            1, self.padding, 0)

    def _blocks(self, G):
        """``(N_PP (B, ncomp, c, c), N_PD (B, ncomp, c, d), N_DD (B, d, d))``: views of ``G`` (compact)."""
        B, (nc, c), d = G.shape[0], self.comp.shape, self.D.numel()
        NPP, NPD, NDD, _ = G.split(self.sizes + [1], 1)
        return NPP.view(B, nc, c, c), NPD.view(B, nc, c, d), NDD.view(B, d, d)

    def diagonals(self, G):
        """``N``'s diagonal in ``G`` (compact) as two views, ``(B, ncomp, c)`` and ``(B, d)`` (shifted in place)."""
        NPP, _, NDD = self._blocks(G)
        return NPP.diagonal(dim1=-2, dim2=-1), NDD.diagonal(dim1=-2, dim2=-1)

    def cholesky(self, G):
        """``((L_P, X, L_D), info)`` for ``N`` in the compact layout ``G``: ``L_P (B, ncomp, c, c)``
        (identity on the padding), ``X (B, ncomp·c, d)`` the rows of ``W = L_P⁻¹N_PD (B, ncomp, c, d)``
        computed where ``N_PD`` lies in ``G`` (overwritten; module doc), ``L_D (B, d, d)``; ``info > 0``
        where ``N`` is not positive definite."""
        NPP, NPD, NDD = self._blocks(G)
        c = NPP.shape[-1]
        eye = torch.eye(c, dtype=G.dtype, device=G.device)
        LP, info_p = torch.linalg.cholesky_ex(torch.where(self.pad, NPP, eye))
        X = _substitute_(LP, NPD).flatten(1, 2)    # W's rows (B, nc·c, d); zero on the padding, as N_PD
        LD, info_d = cholesky_lower_(torch.baddbmm(NDD, X.mT, X, alpha=-1))
        return (LP, X, LD), torch.maximum(info_p.amax(-1), info_d)

    def solve(self, F, R):
        """``N⁻¹ R`` for ``R (B, r, n)``, from :meth:`cholesky`'s factor ``F``."""
        LP, X, LD = F
        B, r = R.shape[:2]
        nc, c = self.comp.shape
        RP = R.index_select(-1, self.comp.reshape(-1)).view(B, r, nc, c).permute(0, 2, 3, 1) * self.valid[..., None]
        YP = _substitute_(LP, RP)                                                       # (B, nc, c, r)
        # the products with X as row-vector products, (B, r, ·) @ X (1.4 × faster than X @ (B, ·, r))
        YD = (R.index_select(-1, self.D) - YP.permute(0, 3, 1, 2).reshape(B, r, nc * c) @ X).mT
        YD = torch.linalg.solve_triangular(LD, YD, upper=False)
        XD = torch.linalg.solve_triangular(LD.mT, YD, upper=True)                      # (B, d, r)
        XP = _substitute_(LP, YP - (XD.mT @ X.mT).view(B, r, nc, c).permute(0, 2, 3, 1), transpose=True)
        return torch.cat([XP.flatten(1, 2), XD], 1).index_select(1, self.place).mT


def _substitute_(L, X, transpose=False):
    """``L⁻¹X`` (``L⁻ᵀX`` with ``transpose``) in ``X``'s memory for the small lower-triangular blocks
    ``L (*, c, c)`` and ``X (*, c, r)``: substitution row by row, each step one elementwise op on all
    blocks at once — LAPACK's triangular solve is one call per ``c × c`` block, whose overhead
    dominates at this size (B·ncomp calls per solve; the same arithmetic, so the same backward stability)."""
    c = L.shape[-1]
    if c > SUBSTITUTE_MAX:  # c(c+1)/2 elementwise steps cost more than LAPACK's calls
        return X.copy_(torch.linalg.solve_triangular(L.mT if transpose else L, X, upper=transpose))
    for i in (reversed(range(c)) if transpose else range(c)):
        xi = X[..., i, :]
        for j in (range(i + 1, c) if transpose else range(i)):
            xi.addcmul_(L[..., j, i, None] if transpose else L[..., i, j, None], X[..., j, :], value=-1)
        xi.div_(L[..., i, i, None])
    return X
