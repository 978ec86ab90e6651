r"""The cone interior point's data matrix and its normal matrix ``A_cᵀ H⁻¹ A_c``, per cone, batched.

:class:`DataMatrix` holds ``A`` either *shared* by the batch (``(m, n)``: every product with it is
one matrix product for the whole batch, never an expanded ``(B, m, n)`` copy) or batched
``(B, m, n)``; an input ``(B, m, n)`` expanded from one matrix (stride 0 on the batch) is
recognized as shared; a batched one with few nonzeros multiplies from its nonzeros only
(:class:`~.cone_sparse.SparseProducts`).

:class:`NormalMatrix` forms ``N = Σ_cones A_kᵀ W_k⁻¹ W_k⁻ᵀ A_k`` (``H = WᵀW`` the scaling of the
interior point) — the matrix of the interior point's reduced Newton system — one term per group
of blocks of one kind and size:

* **second-order cones** of size ``k ≥`` :data:`SOC_STRUCTURED_MIN` (the structured Gram):
  with NT scaling ``W = ηW̄``, ``W̄² = 2wwᵀ − J`` (``J = diag(1, −1, …, −1)``, ``W̄⁻¹ = JW̄J``)
  the inverse scaling is ``W⁻¹W⁻ᵀ = η⁻²(2(Jw)(Jw)ᵀ − J)``, so

      A_kᵀ W_k⁻² A_k = η⁻² (P_k + 2 v vᵀ),   P_k = A_kᵀ(−J)A_k = A_kᵀA_k − 2a₀a₀ᵀ,   v = A_kᵀJw

  (``a₀`` the block's first row).  ``P_k`` depends on ``A`` only and is formed once per solve
  (:meth:`NormalMatrix.__init__`); each iteration costs one product ``A_kᵀ(Jw)`` per block, a
  weighted sum of the ``P_k`` and one rank-``(blocks)`` update — instead of forming
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

Forward only: no gradients here.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..linalg.kkt import chol_solve, cholesky_lower
from .cone_sparse import SPARSE_PRODUCTS, SparseGram, SparseProducts, elimination, sparse_gram, support_columns

__all__ = ["DataMatrix", "NormalMatrix", "Rows", "contiguous", "take", "put", "factor_normal", "solve_normal",
           "SOC_STRUCTURED_MIN"]

SOC_STRUCTURED_MIN = 8  # smaller second-order blocks: the generic form (a k·n² Gram is cheap there)
_STRUCTURED_BYTES = 1 << 28  # the P_k of one group above this size: the generic form (memory)


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

    def __init__(self, A: torch.Tensor, pattern=None, sparse=None):
        if A.dim() == 3 and A.stride(0) == 0:  # expanded from one matrix
            A = A[0]
        self.A = A
        self.shared = A.dim() == 2
        # A's zero pattern, shared by the batch (a batched A: the union over its elements)
        self.pattern = pattern if pattern is not None else (A != 0) if self.shared else (A != 0).any(0)
        if sparse is None and not self.shared and int(self.pattern.sum()) <= SPARSE_PRODUCTS * self.pattern.numel():
            sparse = SparseProducts(A, self.pattern)
        self.sparse = sparse

    def subset(self, keep):
        """The matrix of the batch elements ``keep`` (a shared one is kept as it is)."""
        if self.shared:
            return self
        return DataMatrix(self.A.index_select(0, keep), self.pattern,
                          None if self.sparse is None else self.sparse.subset(keep))

    def mv(self, v):
        """``A v`` for ``v (B, n)`` → ``(B, m)``, or each of ``r`` columns ``v (B, r, n)`` → ``(B, r, m)``."""
        if self.sparse is not None:
            return self.sparse.mv(v)
        if self.shared or v.dim() == 3:
            return v @ self.A.mT
        return (v[:, None, :] @ self.A.mT)[:, 0]  # a row-vector product: much faster than A @ v[..., None]

    def rmv(self, u):
        """``Aᵀ u`` for ``u (B, m)`` → ``(B, n)``, or ``(B, r, m)`` → ``(B, r, n)``."""
        if self.sparse is not None:
            return self.sparse.rmv(u)
        if self.shared or u.dim() == 3:
            return u @ self.A
        return (u[:, None, :] @ self.A)[:, 0]

    def rows(self, idx):
        """The rows ``idx`` (a ``long`` tensor ``(*s)`` or :class:`Rows`) as ``(1 or B, *s, n)``."""
        return take(self.A[None] if self.shared else self.A, idx)


class NormalMatrix:
    """``N(states) = Σ_groups A_kᵀ W_k⁻¹W_k⁻ᵀ A_k`` for the cone groups ``[(kind, size, idx), …]``.

    ``cones`` maps a kind to its class (``winv_t`` is the only method used, for the generic form);
    the structured second-order-cone terms ``P_k`` and the generic groups' :class:`~.cone_sparse.SparseGram`
    (from ``A``'s zero pattern, where it pays) are formed here, once.
    """

    def __init__(self, data: DataMatrix, groups, cones, eliminate: bool = True):
        self.data, self.groups, self.cones = data, groups, cones
        self.pre = []
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
                a0 = Ak[..., :1, :]
                P = Ak[..., 1:, :].mT @ Ak[..., 1:, :] - a0.mT @ a0    # A_kᵀ(−J)A_k
                self.pre.append((Ak, P, cols))
            else:
                self.pre.append(sparse)
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
        out.pre = [pre if pre is None or self.data.shared else pre.subset(keep) if isinstance(pre, SparseGram)
                   else (_columns(data.rows(idx), pre[2]), pre[1].index_select(0, keep), pre[2])
                   for (_, _, idx), pre in zip(self.groups, self.pre)]
        return out

    def __call__(self, states, B):
        """``N (B, n, n)``, or ``(B, size + 1)`` in the compact layout of :attr:`elimination` where there is one."""
        data, plan = self.data, self.elimination
        n = data.A.shape[-1]
        N = None  # the first dense term writes it; the terms on few columns are added into it below
        for (kind, _, idx), st, pre in zip(self.groups, states, self.pre):
            if isinstance(pre, SparseGram) or (pre is not None and pre[2] is not None):
                continue
            if pre is None:  # generic: (W⁻ᵀA_k)ᵀ(W⁻ᵀA_k)
                At = self.cones[kind].winv_t(st, data.rows(idx)).reshape(B, -1, n)
                N = At.mT @ At if N is None else N.baddbmm_(At.mT, At)
                continue
            e2, P2, U = self._soc(pre, st, B)
            if N is None:
                N = (e2 @ P2).reshape(B, n, n)
            else:
                N.view(e2.shape[0], -1, n * n).baddbmm_(e2, P2)
            N.baddbmm_(U.mT, U)
        if plan is not None:
            N = plan.zeros(B, data.A) if N is None else plan.compact(N)
        elif N is None:
            N = data.A.new_zeros(B, n, n)
        for (kind, _, _), st, pre in zip(self.groups, states, self.pre):
            if isinstance(pre, SparseGram):
                pre(self.cones[kind].winv_t, st, N)
            elif pre is not None and pre[2] is not None:  # structured on the group's s columns
                e2, P2, U = self._soc(pre, st, B)
                s = U.shape[-1]
                T = (e2 @ P2).reshape(B, s, s).baddbmm_(U.mT, U)
                N.view(B, -1).index_add_(1, pre[2][1], T.reshape(B, s * s))
        return N

    def _soc(self, pre, st, B):
        """A structured group's ``Σ_k e_k P_k`` as the product ``e2 @ P2`` and ``U`` (its rank update ``UᵀU``)."""
        Ak, P, _ = pre
        w, eta = st[0], st[1]                                          # (B, nb, k), (B, nb)
        e = eta.reciprocal().square()
        Jw = torch.cat([w[..., :1], -w[..., 1:]], -1)                  # J w
        nb, s = w.shape[1], Ak.shape[-1]
        if self.data.shared:  # one batched product over blocks: (nb, B, k) @ (nb, k, s)
            v = (Jw.transpose(0, 1) @ Ak[0]).transpose(0, 1)           # (B, nb, s)
            e2, P2 = e[None], P[0].reshape(1, nb, s * s)               # (1, B, nb) @ (1, nb, s²)
        else:
            v = (Jw[..., None, :] @ Ak)[..., 0, :]                     # (B, nb, s)
            e2, P2 = e[:, None, :], P.reshape(B, nb, s * s)            # (B, 1, nb) @ (B, nb, s²)
        return e2, P2, v * (2 * e).sqrt()[..., None]


def _columns(Ak, cols):
    """``Ak`` on the columns ``cols`` (``None``: all)."""
    return Ak if cols is None else Ak.index_select(-1, cols[0])


def factor_normal(N, data, z, plan=None):
    """The factorization of the reduced Newton system ``[[N, A_zᵀ], [A_z, 0]]`` (``z`` zero-cone rows):
    Cholesky of ``N + eps^¾ I`` without a zero cone (dense, or with the private columns of ``plan``,
    :attr:`NormalMatrix.elimination`, eliminated first: :class:`~.cone_sparse.Elimination`), else an
    LU of the quasi-definite matrix regularized by ``±eps^¾``.  ``N`` is :class:`NormalMatrix`'s:
    ``(B, n, n)``, or in ``plan``'s compact layout; it is overwritten (its diagonal shifted in place: no copy)."""
    B, n = N.shape[0], N.shape[-1]
    eps = torch.finfo(N.dtype).eps
    delta = eps ** 0.75
    diags = (N.diagonal(dim1=-2, dim2=-1),) if plan is None else plan.diagonals(N)
    for diag in diags:
        diag.add_(delta)
    if z == 0:
        chol = _dense_cholesky if plan is None else plan.cholesky
        F, info = chol(N)
        if bool((info > 0).any()):  # rounding made N indefinite: a shift relative to its diagonal
            big = eps ** 0.5 * torch.stack([dg.abs().flatten(1).amax(-1) for dg in diags]).amax(0).clamp(min=1.0)
            for diag in diags:
                diag.add_((big - delta).reshape((-1,) + (1,) * (diag.dim() - 1)))
            F2, _ = chol(N)
            F = tuple(torch.where((info > 0).reshape((-1,) + (1,) * (f.dim() - 1)), f2, f) for f, f2 in zip(F, F2))
        return ("chol", (plan, F))
    Az = data.rows(Rows(0, z, (z,))).expand(B, z, n)
    K = torch.cat([torch.cat([N, Az.mT], -1),
                   torch.cat([Az, -delta * torch.eye(z, dtype=N.dtype, device=N.device).expand(B, z, z)], -1)], -2)
    LU, piv, _ = torch.linalg.lu_factor_ex(K)
    return ("lu", (LU, piv))


def _dense_cholesky(N):
    L, info = cholesky_lower(N)
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
