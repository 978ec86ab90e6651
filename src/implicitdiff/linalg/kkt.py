r"""The KKT systems of a quadratic program: a reusable factorization and the backward's contract.

A QP ``min ½zᵀQz + pᵀz  s.t.  Gz ≤ h, Az = b`` is solved (interior point) and differentiated
(active set) through systems of the form

    [ Q + δI   Gᵀ              Aᵀ  ] [x]   [r₁]
    [ G        −diag(1/winv)   0   ] [y] = [r₂]
    [ A        0               −δI ] [v]   [r₃]

:class:`KKTFactorization` factors it in one of two condensed forms, both symmetric positive
definite by construction and factored by Cholesky (never an unpivoted LU):

* ``"primal"`` (any ``Q ⪰ 0``): one Cholesky of ``H̃ = Q + δI + Gᵀ diag(winv) G + AᵀA/δ``
  (size ``n``; the equality block eliminated by ``v = (Ax − r₃)/δ``, see :func:`kkt_factor`);
* ``"dual"`` (``Q`` positive definite): ``z`` eliminated through ``Q = LQ LQᵀ``, and the Schur
  complement ``S = C Q⁻¹ Cᵀ + diag(1/winv, δ)`` with ``C = [G; A]``, its equality block eliminated
  once, so only the rows of active inequalities are factored (size ≤ ``m``).

:func:`kkt_apply` multiplies by the *exact* (unregularized) KKT matrix and :func:`kkt_refine`
removes the regularization by iterative refinement against it.

:class:`ActiveSetKKT` is what a QP forward solver hands to the backward: the active set at the
solution and the factorization of the active-set KKT matrix; its :meth:`~ActiveSetKKT.solve`
is the backward's one linear solve (refinement with that factorization, residual checked); with a
bound-row split (:func:`_bound_rows`) its products with ``diag(active) G`` use the factor's split rows.

Memory passes (CPU, the batches are larger than the caches): every matrix factored here is a scratch
buffer, factored in its own memory (:func:`cholesky_lower_`); the interior-point loops build and factor
every iteration's matrix in one buffer (:func:`kkt_factor`'s ``out``, the dual loop's ``M + W``): a fresh
10 MB tensor per iteration costs its page faults; and ``W = LQ⁻¹Cᵀ`` is solved in the memory of ``C``
(``C.mT`` is column-major: ``solve_triangular(..., out=)`` its own input, no copy).

Shapes: ``Q (B|1, n, n)``, ``G (B|1, m, n)``, ``A (B|1, k, n)``, right-hand sides ``(B, ·)``.
Failure mode: a Cholesky that fails in rounding gives non-finite factors (``cholesky_ex``, no
raise); the solver reports them as ``NONFINITE``, the backward's residual check as ``SINGULAR``.

Example:
    >>> import torch
    >>> from implicitdiff.linalg.kkt import kkt_factor, kkt_precompute
    >>> Q = torch.eye(2, dtype=torch.float64)[None]; G = torch.ones(1, 1, 2, dtype=torch.float64)
    >>> A = Q.new_zeros(1, 0, 2); delta = torch.tensor(1e-9, dtype=torch.float64)
    >>> f = kkt_factor("primal", kkt_precompute("primal", Q, G, A), Q, G, A, Q.new_ones(1, 1), delta)
    >>> x, y, v = f.solve(G, A, Q.new_ones(1, 2), Q.new_zeros(1, 1), Q.new_zeros(1, 0))
    >>> x  # [[I, 1], [1ᵀ, −1]] (x, y) = (1, 0): x = 1/3
    tensor([[0.3333, 0.3333]], dtype=torch.float64)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

__all__ = ["KKTFactorization", "ActiveSetKKT", "KKTProducts", "kkt_precompute", "kkt_factor", "kkt_solve_reg",
           "kkt_apply", "kkt_refine", "bmv", "brmv", "chol_solve", "tri_solve", "take_rows", "put_rows", "absmax",
           "cholesky_lower", "cholesky_lower_"]

# the factor tensors that differ per element after a polish (the others are the shared precomputation)
_PER_ELEMENT = {"dual": (4, 5, 6, 7), "primal": (0, 1, 4, 6)}


def _pad_active(ta, tb):
    """Two dual factor tuples with their active blocks ``(L, idx)`` padded to the same size."""
    a, b = ta[4].shape[-1], tb[4].shape[-1]
    if a == b:
        return ta, tb

    def pad(t, size):
        L, idx = t[4], t[5]
        B, s, m = L.shape[0], L.shape[-1], t[6].shape[-1]
        Lp = torch.eye(size, dtype=L.dtype, device=L.device).repeat(B, 1, 1)
        Lp[:, :s, :s] = L
        ip = torch.cat([idx, idx.new_full((B, size - s), m)], dim=-1)
        return t[:4] + (Lp, ip) + t[6:]
    size = max(a, b)
    return (pad(ta, size) if a < size else ta), (pad(tb, size) if b < size else tb)


def take_rows(t, idx):
    """Rows ``idx`` of a per-element tensor; a shared one (``(1, …)``, 0-d) as is."""
    return t[idx] if t.dim() and t.shape[0] > 1 else t


def put_rows(full, part, idx):
    """Rows ``idx`` of ``full`` replaced by ``part``, in place (a 0-d ``full`` is left as is)."""
    if full.dim() == 0:
        return full
    if full.shape[0] == 1:  # a batch of one: idx = [0]
        return part
    return full.index_copy_(0, idx, part.expand(idx.shape[0], *part.shape[1:]))


@dataclass(frozen=True)
class KKTFactorization:
    """Factors of the regularized KKT system (a ``linalg`` factorization: factor once, solve many).

    ``"primal"`` (any ``Q ⪰ 0``): ``tensors = (LH, winv, δ) + rows`` — Cholesky of
    ``H̃ = Q + δI + Gᵀ diag(winv) G + AᵀA/δ`` ``(B, n, n)``, the inverse ``(2,2)``-block weights
    ``(B, m)``, ``δ`` ``()`` and the bound-row split of ``G`` (:func:`_bound_rows`, masked) or ``()``.

    ``"dual"`` (``Q`` positive definite, cheaper when ``m + k`` is small against ``n``):
    ``tensors = (LQ, W, LA, X, L, idx, active, w, δ)`` — Cholesky ``Q = LQ LQᵀ`` ``(B|1, n, n)``
    (``Q`` is not regularized), ``W = LQ⁻¹Cᵀ`` with ``C = [G; A]`` ``(B|1, n, m + k)``, the
    equality block eliminated once (``LA``, ``X`` of :func:`kkt_precompute`), and the Cholesky
    ``L`` ``(B, a, a)`` of the Schur complement ``M + diag(w)`` restricted to the active rows
    ``idx`` ``(B, a)`` (``a``: the largest active set of the batch; padding rows are the identity,
    padding index ``m``), the mask ``active`` ``(B, m)`` (inactive rows are decoupled: their
    ``G`` row is dropped), the weights ``w = 1/winv`` ``(B, m)`` and ``δ``.
    """

    kind: str
    tensors: tuple

    @property
    def masks_rows(self) -> bool:
        """Whether the solves mask the rows of ``G`` themselves (the dual kind, and the primal kind with a
        bound-row split): then they read only ``G``'s shape, and ``G`` is passed unmasked."""
        return self.kind == "dual" or len(self.tensors) > 3

    def solve(self, G, A, r1, r2, r3):
        """The regularized inverse applied to ``(r1, r2, r3)`` (``G`` as factorized, masked rows)."""
        return kkt_solve_reg(self, G, A, r1, r2, r3)

    def take(self, idx) -> "KKTFactorization":
        """The factorization of the elements ``idx``."""
        return KKTFactorization(self.kind, tuple(take_rows(t, idx) for t in self.tensors))

    def put(self, part: "KKTFactorization", idx) -> "KKTFactorization":
        """This factorization with the elements ``idx`` replaced by ``part`` (in place where per element)."""
        own = _PER_ELEMENT[self.kind]
        mine, theirs = self.tensors, part.tensors
        if self.kind == "dual":  # the factored active blocks may differ in size: pad the smaller
            mine, theirs = _pad_active(mine, theirs)
        return KKTFactorization(self.kind, tuple(put_rows(a, b, idx) if i in own else a
                                                 for i, (a, b) in enumerate(zip(mine, theirs))))


def _amax(x):
    return x.abs().amax(-1) if x.shape[-1] else x.new_zeros(x.shape[:-1])


@dataclass(frozen=True)
class ActiveSetKKT:
    r"""The contract between a QP forward solver and the backward: the KKT system at the solution.

    With the active set ``𝒜`` (``M = diag(active)``, ``E = I − M``) the solution solves, locally,

        K = [ Q    (MG)ᵀ  Aᵀ ]
            [ MG   −E     0  ]
            [ A    0      0  ]

    ``factor`` factors ``K`` regularized (``δ``), with ``Q + ρAᵀA`` in place of ``Q`` where
    ``rho`` is given (``Q`` indefinite but convex on the null space of ``A``: the solver
    convexified it, which changes neither ``z`` nor the multipliers); ``refine_steps`` rounds of
    refinement against the exact ``K`` remove the regularization.

    Attributes:
        active: ``(B, m)`` 1.0 where the constraint is active, else 0.0.
        factor: the :class:`KKTFactorization` of the regularized active-set system.
        refine_steps: refinement rounds of a solve.
        rho: ``(B,)`` the augmented-Lagrangian weight per element, or ``None`` (all zero).
    """

    active: torch.Tensor
    factor: KKTFactorization
    refine_steps: int
    rho: Optional[torch.Tensor] = None

    def flatten(self):
        """``(static, tensors)``: the tensors to save or return from an autograd Function."""
        rho = () if self.rho is None else (self.rho,)
        return (self.factor.kind, self.refine_steps, len(rho)), (self.active,) + tuple(self.factor.tensors) + rho

    @classmethod
    def unflatten(cls, static, tensors) -> "ActiveSetKKT":
        kind, steps, nrho = static
        active, rest = tensors[0], tuple(tensors[1:])
        factors, rho = (rest[:-1], rest[-1]) if nrho else (rest, None)
        return cls(active, KKTFactorization(kind, factors), steps, rho)

    def matvec(self, Q, G, A, x, y, v):
        """``K (x, y, v)`` (with ``Q + ρAᵀA`` where ``rho`` is given); only ``Q``'s symmetric part enters, as
        ``(Qx + Qᵀx)/2`` (two passes over ``Q``, cheaper than symmetrizing a copy first)."""
        act = self.active
        Qx = 0.5 * (bmv(Q, x) + brmv(Q, x))
        if self.rho is not None:
            Qx = Qx + self.rho.unsqueeze(-1) * brmv(A, bmv(A, x))
        rows = self.factor.tensors[3:] if self.factor.kind == "primal" else ()
        if rows:  # the factor's bound-row split of MG (masked by the active set): G's bound rows not read densely
            return Qx + grmv(G, rows, y) + brmv(A, v), gmv(G, rows, x) - (1 - act) * y, bmv(A, x)
        return Qx + brmv(G, act * y) + brmv(A, v), act * bmv(G, x) - (1 - act) * y, bmv(A, x)

    def solve(self, Q, G, A, r):
        """Solve ``K x = r`` (``r = (r₁, r₂, r₃)``) by refinement with ``factor``; returns ``(x, relres)``.
        ``Q`` need not be symmetric: its symmetric part is used (:meth:`matvec`).

        With ``rho``: ``K x = r`` ⟺ ``K_ρ x = r + (ρAᵀr₃, 0, 0)`` (the third row gives ``Ax = r₃``),
        and ``K_ρ`` is what was factored.
        """
        act = self.active
        r = tuple(r)
        if self.rho is not None:
            r = (r[0] + self.rho.unsqueeze(-1) * brmv(A, r[2]), r[1], r[2])
        GM = G if self.factor.masks_rows else G * act.unsqueeze(-1)
        x = self.factor.solve(GM, A, *r)
        for _ in range(self.refine_steps):
            k = self.matvec(Q, G, A, *x)
            d = self.factor.solve(GM, A, *(ri - ki for ri, ki in zip(r, k)))
            x = tuple(xi + di for xi, di in zip(x, d))
        k = self.matvec(Q, G, A, *x)
        num = torch.stack([_amax(ri - ki) for ri, ki in zip(r, k)]).amax(0)
        den = torch.stack([_amax(ri) for ri in r]).amax(0)
        return x, num / torch.where(den > 0, den, torch.ones_like(den))


# Passes over a batch of matrices.  On CPU a reduction that writes no temporary streams the data once:
# t.amax(dims) and t.sum(dims) are much cheaper than t.abs().amax(dims) or torch.isfinite(t).all(dims),
# which materialize an |t| or a bool tensor (and isfinite several) of the (B, n, n) matrices of a QP batch.
# absmax is the one place of that trick for max|t| (qp_screen._sizes also reads the finiteness of Q, G, A off it).
def absmax(t, dims):
    """``max |t|`` over ``dims`` (a tuple of dims), as ``max(amax, −amin)``: no temporary ``|t|``."""
    return torch.maximum(t.amax(dim=dims), -t.amin(dim=dims))


def cholesky_lower(S):
    """``(L, info)`` with ``S = L Lᵀ`` for a symmetric ``S (*, n, n)`` (``torch.linalg.cholesky_ex``).

    Computed as the transpose of the *upper* factor, a view: on CPU, ``cholesky_ex`` copies the input's
    triangle into its column-major output first, and its ``triu`` copy is cheaper than the ``tril`` copy
    of ``upper=False`` (measured on a QP batch; docs/benchmarks.md).  The
    factor is the same up to rounding (``S`` symmetric); the view is row-major, which the triangular solves
    take without a copy."""
    U, info = torch.linalg.cholesky_ex(S, upper=True)
    return U.mT, info


def cholesky_lower_(S):
    """:func:`cholesky_lower` computed in ``S``'s own memory: ``S`` is overwritten by the factor.

    The speed trick (one place): a symmetric row-major ``S`` read column-major (``S.mT``) is the same
    matrix, so ``cholesky_ex`` factors it where it lies (``out=`` the input itself) and skips the
    triangle copy into a new column-major output — on CPU that copy costs as much as a third of a
    batched factorization at ``n = 100``. ``S`` must be a contiguous ``(*, n, n)`` tensor not needed
    afterwards and not requiring grad; anything else takes :func:`cholesky_lower` (a copy)."""
    if not S.is_contiguous() or S.requires_grad or S.dim() < 2:
        return cholesky_lower(S)
    U = S.mT
    info = torch.empty(S.shape[:-2], dtype=torch.int32, device=S.device)
    torch.linalg.cholesky_ex(U, upper=True, out=(U, info))
    return S, info


def bmv(M, x):
    """``M x`` for ``M (B|1, r, c)``, ``x (B, c)`` -> ``(B, r)``."""
    if M.shape[0] == 1:
        return x @ M[0].mT
    return (x.unsqueeze(-2) @ M.mT).squeeze(-2)  # a row-vector bmm: 4x faster than M @ x[..., None] on CPU


def brmv(M, y):
    """``Mᵀ y`` for ``M (B|1, r, c)``, ``y (B, r)`` -> ``(B, c)``."""
    if M.shape[0] == 1:
        return y @ M[0]
    return (y.unsqueeze(-2) @ M).squeeze(-2)


def chol_solve(L, R):
    """``(L Lᵀ)⁻¹ R`` with two triangular solves (faster than ``cholesky_solve`` on CPU)."""
    return torch.linalg.solve_triangular(L.mT, torch.linalg.solve_triangular(L, R, upper=False), upper=True)


def tri_solve(L, r, adjoint=False):
    """``L⁻¹ r`` (``adjoint``: ``L⁻ᵀ r``) for a lower-triangular ``L (B|1, n, n)`` and ``r (B, n)``."""
    L = L.expand(r.shape[0], *L.shape[1:])
    M = L.mT if adjoint else L
    return torch.linalg.solve_triangular(M, r.unsqueeze(-1), upper=adjoint).squeeze(-1)


def kkt_precompute(kind, Q, G, A, LQ=None, delta=None):
    """What the ``"dual"`` factorization shares across iterations: ``(LQ, W, K, LA, X, M)`` with
    ``Q = LQ LQᵀ``, ``W = LQ⁻¹ Cᵀ`` ``(B|1, n, m + k)``, ``K = WᵀW = C Q⁻¹ Cᵀ`` (``C = [G; A]``), and the
    equality block eliminated once: ``LA LAᵀ = K_AA + δI`` ``(B|1, k, k)``, ``X = LA⁻¹ K_AG`` ``(B|1, k, m)``
    and ``M = K_GG − XᵀX`` ``(B|1, m, m)`` (the Schur complement every dual system is built on)."""
    if kind == "primal":
        return _bound_rows(G)
    if LQ is None:
        LQ, _ = cholesky_lower(Q)
    m, k = G.shape[-2], A.shape[-2]
    Bc = max(G.shape[0], A.shape[0], LQ.shape[0])
    C = torch.cat([G.expand(Bc, *G.shape[1:]), A.expand(Bc, *A.shape[1:])], dim=-2)
    W = C.mT  # solved in C's own memory (column-major: the solve's out= its input, no copy)
    torch.linalg.solve_triangular(LQ.expand(Bc, *LQ.shape[1:]), W, upper=False, out=W)
    K = W.mT @ W
    if k:
        LA = cholesky_lower_(K[:, m:, m:] + delta * torch.eye(k, dtype=K.dtype, device=K.device))[0]
        X = torch.linalg.solve_triangular(LA, K[:, m:, :m], upper=False)
        M = torch.baddbmm(K[:, :m, :m], X.mT, X, alpha=-1)
    else:
        LA, X, M = K.new_zeros(Bc, 0, 0), K.new_zeros(Bc, 0, m), K
    return LQ, W, K, LA, X, M


def _bound_rows(G):
    """The ``"primal"`` precomputation: rows of ``G`` with one nonzero (bounds, ``±zⱼ ≤ hᵢ``) add to the
    diagonal of ``GᵀWG`` only, so when at least a quarter of the rows are such, the product is formed
    from the other rows alone: ``(dense (B|1, r), Gd (B|1, r, n), col (B|1, m), gv (B|1, m))`` — the
    indices of the ``r`` rows multiplied densely (every row with two or more nonzeros, padded with bound
    rows to the largest count of the batch), those rows, and each row's column and value
    (``gv = 0`` for the dense rows); :func:`gmv` and :func:`grmv` multiply with it.  ``()`` when
    there are too few bound rows to pay."""
    m = G.shape[-2]
    if m == 0:
        return ()
    single = torch.linalg.vector_norm(G, ord=0, dim=-1) == 1  # the count of nonzeros, one pass
    r = int((~single).sum(-1).max())  # one sync per solve
    if (m - r) * 4 < m:
        return ()
    dense = torch.argsort(single.to(torch.int8), dim=-1, stable=True)[:, :r]
    Gd = torch.gather(G, 1, dense.unsqueeze(-1).expand(*dense.shape, G.shape[-1]))
    diag = torch.ones_like(single, dtype=G.dtype).scatter(1, dense, 0.0)
    gv = G.sum(-1) * diag
    # the column of a bound row's nonzero g is (Σⱼ j·Gᵢⱼ)/g = j·g/g, which rounds to j (one product instead
    # of an argmax over a bool copy of G, a few times slower); checked by G[i, col] = g
    bound = (gv != 0) & torch.isfinite(gv)  # the bound rows not multiplied densely (the others: col = 0)
    n = G.shape[-1]
    col = torch.where(bound, (G @ torch.arange(n, dtype=G.dtype, device=G.device)) / gv, 0)
    col = col.round().clamp(0, n - 1).long()
    if not bool(((torch.gather(G, -1, col.unsqueeze(-1)).squeeze(-1) == gv) | ~bound).all()):  # g subnormal, huge
        col = (G != 0).to(torch.int8).argmax(-1)
    return dense, Gd, col, gv


def gmv(G, rows, x):
    """``G x`` (``(B, m)``), through the bound-row split ``rows`` of :func:`_bound_rows` when given."""
    if not rows:
        return bmv(G, x)
    dense, Gd, col, gv = rows
    B = x.shape[0]
    y = gv * torch.gather(x, 1, col.expand(B, -1))
    return y.scatter(1, dense.expand(B, -1), bmv(Gd, x))


def grmv(G, rows, y):
    """``Gᵀ y`` (``(B, n)``), through the bound-row split ``rows`` when given."""
    if not rows:
        return brmv(G, y)
    dense, Gd, col, gv = rows
    B = y.shape[0]
    out = y.new_zeros(B, Gd.shape[-1]).scatter_add_(1, col.expand(B, -1), gv * y)
    return out + brmv(Gd, torch.gather(y, 1, dense.expand(B, -1)))


def _gather_active(M, w, active):
    """Cholesky of ``M[𝒜, 𝒜] + diag(w_𝒜)`` per element, ``𝒜`` the active rows first, padded to the
    largest active set of the batch with identity rows: ``(L (B, a, a), idx (B, a))``, padding index ``m``."""
    B, m = w.shape
    on = active > 0
    a = int(on.sum(-1).max()) if m else 0  # one sync
    idx = torch.argsort((~on).to(torch.int8), dim=-1, stable=True)[:, :a]
    valid = torch.gather(on, 1, idx)
    idx = torch.where(valid, idx, m)
    safe = idx.clamp(max=max(m - 1, 0))
    flat = (safe.unsqueeze(-1) * m + safe.unsqueeze(-2)).view(B, a * a)  # one gather of the (i, j) entries
    S = torch.gather(M.reshape(M.shape[0], m * m).expand(B, m * m), 1, flat).view(B, a, a)
    vm = valid.to(S.dtype)
    S.mul_(vm.unsqueeze(-1)).mul_(vm.unsqueeze(-2))
    S.diagonal(dim1=-2, dim2=-1).add_(torch.where(valid, torch.gather(w, 1, safe), torch.ones_like(vm)))
    return cholesky_lower_(S)[0], idx


def kkt_factor(kind, pre, Q, G, A, winv, delta, rowmask=None, out=None) -> "KKTFactorization":
    """Factorize ``[[Q + δI, Gᵀ, Aᵀ], [G, −diag(1/winv), 0], [A, 0, −δI]]`` (see :class:`KKTFactorization`).

    Symmetric positive definite by construction (``Q ⪰ 0``, ``winv > 0``, ``δ > 0``); a
    Cholesky that fails in rounding gives non-finite factors, reported as ``NONFINITE``.
    ``rowmask`` (``"dual"`` only, ``(B, m)``): the active set; rows outside it are decoupled
    (``G`` replaced by ``diag(rowmask) G``), and only the active rows are factored.  ``Q = None``
    (``"primal"`` only): ``Q = 0``, an LP (no term to add to the product).  ``out`` (``"primal"`` only): a
    contiguous ``(B, n, n)`` scratch buffer to build and factor ``H̃`` in (the factor then lives there: a loop
    reuses one buffer instead of page-faulting a fresh one per iteration).
    """
    n, k = A.shape[-1], A.shape[-2]
    B = winv.shape[0]
    dt, dev = winv.dtype, winv.device
    if kind == "dual":
        LQ, Wc, _, LA, X, M = pre
        w = 1 / winv
        active = torch.ones_like(w) if rowmask is None else rowmask
        L, idx = _gather_active(M, w, active)
        return KKTFactorization("dual", (LQ, Wc, LA, X, L, idx, active, w, delta))
    if pre:  # bound rows on the diagonal, the others by a product (see _bound_rows); rowmask: G's masked rows
        dense, Gd, col, gv = pre
        we = winv if rowmask is None else winv * rowmask
        d = torch.zeros(B, n, dtype=dt, device=dev).scatter_add_(1, col.expand(B, -1), we * gv * gv)
        wd = torch.gather(we, 1, dense.expand(B, -1))
        GdW, GdB = (Gd * wd.unsqueeze(-1)).mT, Gd.expand(B, *Gd.shape[1:])
        H = torch.bmm(GdW, GdB, out=out) if Q is None else torch.baddbmm(Q, GdW, GdB, out=out)
        H.diagonal(dim1=-2, dim2=-1).add_(d + delta)
    else:
        H = delta * torch.eye(n, dtype=dt, device=dev).expand(1, n, n)
        H = H if Q is None else Q + H
        if G.shape[-2]:
            H = torch.baddbmm(H, (G * winv.unsqueeze(-1)).mT, G.expand(B, *G.shape[1:]), out=out)
    if k:
        # The equality block is eliminated first, v = (Ax − r₃)/δ, which leaves H̃ = H + AᵀA/δ.  Not the Schur
        # complement S = A H⁻¹ Aᵀ + δI: at the end of an LP, H has eigenvalues ~1/δ along the active rows and
        # only δ along the directions the equalities pin, cond(H) ~ 1/δ² > 1/eps, and H⁻¹Aᵀ came out wrong in
        # every digit (elements stalled at a residual of ~1, depending on the rounding of their batch).  H̃ has
        # the large entries in every direction a unique solution pins: cond ~ 1/δ.
        H = torch.baddbmm(H.expand(B, n, n), (A / delta).mT.expand(B, n, k), A.expand(B, k, n), out=out)
    LH, _ = cholesky_lower_(H.expand(B, n, n))  # H is a new tensor or out (a shared one is copied)
    rows = ()
    if pre:  # the split of the (masked) G the solves multiply with
        rows = pre if rowmask is None else (dense, Gd * torch.gather(rowmask, 1, dense.expand(B, -1)).unsqueeze(-1),
                                            col, gv * rowmask)
    return KKTFactorization("primal", (LH, winv, delta) + rows)


def kkt_solve_reg(f: "KKTFactorization", G, A, r1, r2, r3):
    """Solve the regularized system of :func:`kkt_factor` for right-hand sides ``(r1, r2, r3)``.

    primal: row 2 gives ``y = winv ∘ (Gx − r2)``; substituting, ``H x + Aᵀ v = r1 + Gᵀ(winv ∘ r2) = r1'``
    and ``A x − δ v = r3``, so ``v = (Ax − r3)/δ`` and ``(H + AᵀA/δ) x = r1' + Aᵀ r3/δ``.
    dual: ``x = Q⁻¹(r1 − Cᵀ u)`` and ``C x − W u = (r2, r3)`` give ``S u = C Q⁻¹ r1 − (r2, r3)``.
    """
    m = G.shape[-2]
    if f.kind == "dual":
        # rhs = R C Q⁻¹ r₁ − (r₂, r₃); S = [[R K_GG R + W, R K_GA], [K_AG R, K_AA + δ]] is solved by eliminating
        # the equality block (LA, X of kkt_precompute): uG solves (R M R + W) uG = rhs_G − R Xᵀ LA⁻¹ rhs_A,
        # whose inactive rows are diagonal and whose active rows were factored (gathered by idx), then
        # uA = LA⁻ᵀ (LA⁻¹ rhs_A − X R uG); finally x = Q⁻¹(r₁ − Cᵀ R u).
        LQ, Wc, LA, X, L, idx, act, w, _ = f.tensors
        t = tri_solve(LQ, r1)  # LQ⁻¹ r1
        c = brmv(Wc, t)  # C Q⁻¹ r1
        rG = act * c[:, :m] - r2
        if A.shape[-2]:
            tA = tri_solve(LA, c[:, m:] - r3)
            rG = rG - act * brmv(X, tA)
        uG = rG / w
        if idx.shape[-1]:
            ext = torch.cat([rG, rG.new_zeros(rG.shape[0], 1)], dim=-1)
            ua = chol_solve(L, torch.gather(ext, 1, idx).unsqueeze(-1)).squeeze(-1)
            uG = torch.cat([uG, uG.new_zeros(uG.shape[0], 1)], dim=-1).scatter(1, idx, ua)[:, :m]
        uA = tri_solve(LA, tA - bmv(X, act * uG), adjoint=True) if A.shape[-2] else r3[:, :0]
        x = tri_solve(LQ, t - bmv(Wc, torch.cat([act * uG, uA], dim=-1)), adjoint=True)
        return x, uG, uA
    LH, winv, delta = f.tensors[:3]
    rows = f.tensors[3:]
    r1p = r1 + grmv(G, rows, winv * r2) if m else r1
    if A.shape[-2]:
        x = chol_solve(LH, (r1p + brmv(A, r3 / delta)).unsqueeze(-1)).squeeze(-1)
        v = (bmv(A, x) - r3) / delta
    else:
        x = chol_solve(LH, r1p.unsqueeze(-1)).squeeze(-1)
        v = r3
    y = winv * (gmv(G, rows, x) - r2) if m else r2
    return x, y, v


class KKTProducts(NamedTuple):
    """``Q (B|1, n, n)``, ``G (B|1, m, n)``, ``A (B|1, k, n)`` and the products the interior point needs
    (kept apart: a stacked copy saves no memory traffic, each product streams its matrix once)."""

    Q: torch.Tensor
    G: torch.Tensor
    A: torch.Tensor
    rows: tuple = ()  # the bound-row split of G (kkt_precompute("primal", ...)), or ()

    @classmethod
    def build(cls, Q, G, A, rows=()):
        return cls(Q, G, A, rows)

    def take(self, idx) -> "KKTProducts":
        """The products of the elements ``idx``."""
        return KKTProducts(*(take_rows(u, idx) for u in self[:3]), tuple(take_rows(u, idx) for u in self.rows))

    def forward(self, x):
        """``(Qx, Gx, Ax)``."""
        return bmv(self.Q, x), gmv(self.G, self.rows, x), bmv(self.A, x)

    def gx(self, x):
        """``Gx`` alone."""
        return gmv(self.G, self.rows, x)

    def adjoint(self, lam, nu):
        """``Gᵀλ + Aᵀν``."""
        return grmv(self.G, self.rows, lam) + brmv(self.A, nu)


def kkt_apply(P: "KKTProducts", w, x, y, v, mask=None):
    """The exact KKT matrix ``[[Q, Gᵀ, Aᵀ], [G, −diag(w), 0], [A, 0, 0]]`` times ``(x, y, v)``;
    with ``mask``, ``G`` is replaced by ``diag(mask) G`` (the active-set system)."""
    Qx, Gx, Ax = P.forward(x)
    if mask is None:
        return Qx + P.adjoint(y, v), Gx - w * y, Ax
    return Qx + P.adjoint(y * mask, v), Gx * mask - w * y, Ax


def kkt_refine(f, P, G, A, w, r, steps, mask=None):
    """Solve the exact system (weights ``w``) by ``steps`` rounds of refinement with ``f``."""
    x = kkt_solve_reg(f, G, A, *r)
    for _ in range(steps):
        k = kkt_apply(P, w, *x, mask=mask)
        d = kkt_solve_reg(f, G, A, *(ri - ki for ri, ki in zip(r, k)))
        x = tuple(xi + di for xi, di in zip(x, d))
    return x
