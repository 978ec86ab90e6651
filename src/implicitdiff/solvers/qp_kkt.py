r"""The regularized KKT systems of :mod:`implicitdiff.solvers.qp_ipm`: factorization and solves.

One Newton step of the interior point, and the final active-set solve, need

    [ Q + δI   Gᵀ              Aᵀ  ] [x]   [r₁]
    [ G        −diag(1/winv)   0   ] [y] = [r₂]
    [ A        0               −δI ] [v]   [r₃]

factored in one of two condensed forms, both symmetric positive definite by
construction and factored by Cholesky (never an unpivoted LU); see :class:`KKTFactor`:

* ``"primal"`` (any ``Q ⪰ 0``): ``H = Q + δI + Gᵀ diag(winv) G`` (size ``n``) and
  ``S = A H⁻¹ Aᵀ + δI`` (size ``k``);
* ``"dual"`` (``Q`` positive definite): ``z`` eliminated through ``Q = LQ LQᵀ``, and the Schur
  complement ``S = C Q⁻¹ Cᵀ + diag(1/winv, δ)`` with ``C = [G; A]`` (size ``m + k``).

:func:`kkt_apply` multiplies by the *exact* (unregularized) KKT matrix and :func:`kkt_refine`
removes the regularization by iterative refinement against it.

Shapes: ``Q (B|1, n, n)``, ``G (B|1, m, n)``, ``A (B|1, k, n)``, right-hand sides ``(B, ·)``.
Failure mode: a Cholesky that fails in rounding gives non-finite factors (``cholesky_ex``, no
raise); the caller reports them as ``NONFINITE``.

Example:
    >>> import torch
    >>> from implicitdiff.solvers.qp_kkt import kkt_factor, kkt_precompute, kkt_solve_reg
    >>> Q = torch.eye(2, dtype=torch.float64)[None]; G = torch.ones(1, 1, 2, dtype=torch.float64)
    >>> A = Q.new_zeros(1, 0, 2); delta = torch.tensor(1e-9, dtype=torch.float64)
    >>> f = kkt_factor("primal", kkt_precompute("primal", Q, G, A), Q, G, A, Q.new_ones(1, 1), delta)
    >>> x, y, v = kkt_solve_reg(f, G, A, Q.new_ones(1, 2), Q.new_zeros(1, 1), Q.new_zeros(1, 0))
    >>> x  # [[I, 1], [1ᵀ, −1]] (x, y) = (1, 0): x = 1/3
    tensor([[0.3333, 0.3333]], dtype=torch.float64)
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["KKTFactor", "kkt_precompute", "kkt_factor", "kkt_solve_reg", "kkt_apply", "kkt_refine"]


class KKTFactor(NamedTuple):
    """Factors of the regularized KKT system: ``kind`` and a tuple of tensors.

    ``"primal"`` (any ``Q ⪰ 0``): ``(LH, LS, HiAt, winv, δ)`` — Cholesky of
    ``H = Q + δI + Gᵀ diag(winv) G`` ``(B, n, n)``, of ``S = A H⁻¹ Aᵀ + δI`` ``(B, k, k)``,
    ``H⁻¹Aᵀ`` ``(B, n, k)``, the inverse ``(2,2)``-block weights ``(B, m)`` and ``δ`` ``()``.

    ``"dual"`` (``Q`` positive definite, cheaper when ``m + k`` is small against ``n``):
    ``(LQ, W, LS, rowmask, δ)`` — Cholesky ``Q = LQ LQᵀ`` ``(B|1, n, n)`` (``Q`` is not
    regularized), ``W = LQ⁻¹Cᵀ`` with ``C = [G; A]`` ``(B|1, n, m + k)``, Cholesky of the Schur
    complement ``S = R C Q⁻¹ Cᵀ R + diag(1/winv, δ)`` ``(B, m + k, m + k)`` with
    ``R = diag(rowmask)`` (zero rows: constraints dropped from the active set), the mask and ``δ``.
    """

    kind: str
    tensors: tuple


def _mv(M, x):
    """``M x`` for ``M (B|1, r, c)``, ``x (B, c)`` -> ``(B, r)``."""
    if M.shape[0] == 1:
        return x @ M[0].mT
    return (x.unsqueeze(-2) @ M.mT).squeeze(-2)  # a row-vector bmm: 4x faster than M @ x[..., None] on CPU


def _rmv(M, y):
    """``Mᵀ y`` for ``M (B|1, r, c)``, ``y (B, r)`` -> ``(B, c)``."""
    if M.shape[0] == 1:
        return y @ M[0]
    return (y.unsqueeze(-2) @ M).squeeze(-2)


def _tri_solve(L, R):
    """``(L Lᵀ)⁻¹ R`` with two triangular solves (faster than ``cholesky_solve`` on CPU)."""
    return torch.linalg.solve_triangular(L.mT, torch.linalg.solve_triangular(L, R, upper=False), upper=True)


def _lsolve(L, r, adjoint=False):
    """``L⁻¹ r`` (``adjoint``: ``L⁻ᵀ r``) for a lower-triangular ``L (B|1, n, n)`` and ``r (B, n)``."""
    L = L.expand(r.shape[0], *L.shape[1:])
    M = L.mT if adjoint else L
    return torch.linalg.solve_triangular(M, r.unsqueeze(-1), upper=adjoint).squeeze(-1)


def kkt_precompute(kind, Q, G, A, LQ=None):
    """What the ``"dual"`` factorization shares across iterations: ``(LQ, W, K)`` with ``Q = LQ LQᵀ``,
    ``W = LQ⁻¹ Cᵀ`` ``(B|1, n, m + k)`` and ``K = WᵀW = C Q⁻¹ Cᵀ``, ``C = [G; A]``."""
    if kind == "primal":
        return ()
    if LQ is None:
        LQ, _ = torch.linalg.cholesky_ex(Q)
    Bc = max(G.shape[0], A.shape[0], LQ.shape[0])
    C = torch.cat([G.expand(Bc, *G.shape[1:]), A.expand(Bc, *A.shape[1:])], dim=-2)
    W = torch.linalg.solve_triangular(LQ.expand(Bc, *LQ.shape[1:]), C.mT, upper=False)
    return LQ, W, W.mT @ W


def kkt_factor(kind, pre, Q, G, A, winv, delta, rowmask=None) -> KKTFactor:
    """Factorize ``[[Q + δI, Gᵀ, Aᵀ], [G, −diag(1/winv), 0], [A, 0, −δI]]`` (see :class:`KKTFactor`).

    Symmetric positive definite by construction (``Q ⪰ 0``, ``winv > 0``, ``δ > 0``); a
    Cholesky that fails in rounding gives non-finite factors, reported as ``NONFINITE``.
    """
    n, k = Q.shape[-1], A.shape[-2]
    B = winv.shape[0]
    dt, dev = Q.dtype, Q.device
    if kind == "dual":
        LQ, Wc, K = pre
        w = torch.cat([1 / winv, delta.expand(B, k)], dim=-1)
        if rowmask is None:
            S = K.expand(B, *K.shape[1:]).clone()
        else:
            S = K * (rowmask.unsqueeze(-1) * rowmask.unsqueeze(-2))
        S.diagonal(dim1=-2, dim2=-1).add_(w)
        LS, _ = torch.linalg.cholesky_ex(S)
        rm = torch.ones_like(w) if rowmask is None else rowmask
        return KKTFactor("dual", (LQ, Wc, LS, rm, delta))
    H = Q + delta * torch.eye(n, dtype=dt, device=dev)
    if G.shape[-2]:
        H = torch.baddbmm(H, (G * winv.unsqueeze(-1)).mT, G.expand(B, *G.shape[1:]))
    LH, _ = torch.linalg.cholesky_ex(H.expand(B, n, n))
    if k:
        HiAt = _tri_solve(LH, A.mT.expand(B, n, k))
        LS, _ = torch.linalg.cholesky_ex(A @ HiAt + delta * torch.eye(k, dtype=dt, device=dev))
    else:
        HiAt, LS = Q.new_zeros(B, n, 0), Q.new_zeros(B, 0, 0)
    return KKTFactor("primal", (LH, LS, HiAt, winv, delta))


def kkt_solve_reg(f: KKTFactor, G, A, r1, r2, r3):
    """Solve the regularized system of :func:`kkt_factor` for right-hand sides ``(r1, r2, r3)``.

    primal: row 2 gives ``y = winv ∘ (Gx − r2)``; substituting, ``H x + Aᵀ v = r1 + Gᵀ(winv ∘ r2)``
    and ``A x − δ v = r3``, so ``S v = A H⁻¹ r1' − r3`` and ``x = H⁻¹ r1' − H⁻¹Aᵀ v``.
    dual: ``x = Q⁻¹(r1 − Cᵀ u)`` and ``C x − W u = (r2, r3)`` give ``S u = C Q⁻¹ r1 − (r2, r3)``.
    """
    m = G.shape[-2]
    if f.kind == "dual":
        LQ, Wc, LS, rm, _ = f.tensors
        t = _lsolve(LQ, r1)  # LQ⁻¹ r1
        rhs = rm * _rmv(Wc, t) - torch.cat([r2, r3], dim=-1)  # C Q⁻¹ r1 − (r2, r3)
        u = _tri_solve(LS, rhs.unsqueeze(-1)).squeeze(-1)
        x = _lsolve(LQ, t - _mv(Wc, rm * u), adjoint=True)
        return x, u[..., :m], u[..., m:]
    LH, LS, HiAt, winv, _ = f.tensors
    r1p = r1 + _rmv(G, winv * r2) if m else r1
    x = _tri_solve(LH, r1p.unsqueeze(-1)).squeeze(-1)
    if A.shape[-2]:
        v = _tri_solve(LS, (_mv(A, x) - r3).unsqueeze(-1)).squeeze(-1)
        x = x - _mv(HiAt, v)
    else:
        v = r3
    y = winv * (_mv(G, x) - r2) if m else r2
    return x, y, v


class _Products(NamedTuple):
    """``Q (B|1, n, n)``, ``G (B|1, m, n)``, ``A (B|1, k, n)`` and the products the interior point needs
    (kept apart: a stacked copy saves no memory traffic, each product streams its matrix once)."""

    Q: torch.Tensor
    G: torch.Tensor
    A: torch.Tensor

    @classmethod
    def build(cls, Q, G, A):
        return cls(Q, G, A)

    def forward(self, x):
        """``(Qx, Gx, Ax)``."""
        return _mv(self.Q, x), _mv(self.G, x), _mv(self.A, x)

    def adjoint(self, lam, nu):
        """``Gᵀλ + Aᵀν``."""
        return _rmv(self.G, lam) + _rmv(self.A, nu)


def kkt_apply(P: _Products, w, x, y, v, mask=None):
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
