r"""Nesterov–Todd scaling of the symmetric cones (nonnegative, second-order, PSD), batched.

For a primal slack ``s`` and dual ``y`` in the interior of a symmetric cone the NT scaling ``W``
maps both to one point ``λ = W⁻ᵀ s = W y``.  The interior point linearizes the centrality
condition ``λ ∘ λ = σμ e`` in that frame (``∘`` the Jordan product), which gives, with the
scaled directions ``Δs̃ = W⁻ᵀΔs`` and ``Δỹ = WΔy``,

    Δs̃ + Δỹ = −d̃,   d̃ = λ \ (λ∘λ + (W⁻ᵀΔs_a)∘(WΔy_a) − σμ e)

(the second term is Mehrotra's corrector, absent in the predictor).  Every cone here offers
``scale(s, y, μ) → state`` (``μ`` unused here: only the exponential cone's scaling reads it),
``winv_t(state, V)`` (``W⁻ᵀ`` on a block of rows ``V``, to scale ``A``), ``winv``/``w_t`` (to unscale ``Δỹ`` and ``Δs̃``), ``scaled(state, Δs, Δy)``,
``rhs(state, σμ, corr)`` (``d̃``) and ``step(state, Δs, Δy)`` (the largest step keeping both
in the cone, computed in the scaled frame where it is the same test for ``s`` and ``y``); the
cones also offer that test on directions already scaled, ``step_scaled(state, W⁻ᵀΔs, WΔy)``: the
interior point scales the predictor once, for its step and for Mehrotra's corrector (for PSD blocks
the test is then ``I + αΛ^{-1/2}XΛ^{-1/2} ⪰ 0``, no congruence).  Each works on all blocks of one
size at once: the nonnegative cone on ``(B, rows)``, the others on ``(B, blocks, size)``.  Forward
only, no gradients.

**PSD blocks: congruences by the ``k × k`` factors.**  Every PSD map is ``X ↦ P X Pᵀ`` with ``P`` one of
``R, R⁻¹`` (and transposes), applied to ``k × k`` matrices, never as a ``(d, d)`` matrix in svec coordinates
(``d = k(k+1)/2``); ``W⁻ᵀ`` on the block's rows of ``A`` (``n`` columns, for the normal matrix) column by
column (:func:`~implicitdiff.linalg.congruence.congruence_columns`, where that speed trick is documented).

**PSD scaling: one symmetric eigendecomposition, not an SVD** (:meth:`PSD.scale`).  CVXOPT's NT scaling
takes ``U, Λ, V`` from the SVD ``L_yᵀL_s = U Λ Vᵀ``; here ``V`` comes from ``eigh(MᵀM)`` (``M = L_yᵀL_s``),
then ``UΛ = MV``, ``λ`` its column norms (not the square roots of ``MᵀM``'s eigenvalues: a norm keeps
the small ``λ`` to relative accuracy) and ``R⁻¹ = Λ^{-1/2}Uᵀ L_yᵀ = Λ^{-3/2}(MV)ᵀL_yᵀ``.  LAPACK's batched
``eigh`` of small matrices costs less than ``svd`` (docs/benchmarks.md, eighth session); the identities
``RᵀYR = Λ = R⁻¹SR⁻ᵀ`` hold to the same rounding (``eps·κ(M)²`` against ``eps·κ(M)``, where ``κ(M)``
is ``√`` of the spread of ``SY``'s eigenvalues: near 1 on the central path; tests check both far from
it and at the end of a solve against the SVD).  Where some ``λ_min/λ_max`` is below ``eps^{1/8}``
(:data:`_EIGH_SPREAD`; far from the central path) the batch takes the SVD: past that spread the squared
form would lose more than a factor ``eps^{-1/8}`` (about 90) against it.  Float64 only: in float32 that
spread (0.14) is common, and the SVD is taken directly (no test, no host read).

References: Vandenberghe, "The CVXOPT linear and quadratic cone program solvers" (2010), §4.
"""

from __future__ import annotations

import math

import torch

from ..linalg.cone_spec import smat, svec
from ..linalg.congruence import congruence, congruence_columns

#: PSD.scale's eigh path (float64) only while every λ_min/λ_max ≥ eps^{1/8} (module docstring), else the SVD
_EIGH_SPREAD = torch.finfo(torch.float64).eps ** 0.125

__all__ = ["Nonneg", "SecondOrder", "PSD"]

_INF = float("inf")


def _max_step_from_eig(e: torch.Tensor) -> torch.Tensor:
    """Largest α with ``1 + α e ≥ 0`` for all entries of ``e`` along the last dims, per batch row."""
    worst = e.reshape(e.shape[0], -1).min(dim=1).values
    return torch.where(worst < 0, -1.0 / worst.clamp(max=-1e-300), torch.full_like(worst, _INF))


class Nonneg:
    """``s ≥ 0`` elementwise; ``W = diag(√(s/y))``, ``λ = √(sy)``."""

    @staticmethod
    def unit(s):
        return torch.ones_like(s)

    @staticmethod
    def scale(s, y, mu=None):
        w = torch.sqrt(s / y)
        return (w, torch.sqrt(s * y))

    @staticmethod
    def winv_t(st, V):  # W⁻ᵀ on the rows of V (B, rows, r)
        return V / st[0][..., None]

    @staticmethod
    def winv(st, v):
        return v / st[0]

    @staticmethod
    def w_t(st, v):
        return v * st[0]

    @staticmethod
    def scaled(st, ds, dy):
        return ds / st[0], dy * st[0]

    @staticmethod
    def rhs(st, sigma_mu, corr):
        w, lam = st
        t = lam * lam - sigma_mu[:, None]
        if corr is not None:
            t = t + corr[0] * corr[1]
        return t / lam

    @staticmethod
    def step(st, ds, dy):
        return Nonneg.step_scaled(st, *Nonneg.scaled(st, ds, dy))

    @staticmethod
    def step_scaled(st, a, b):
        lam = st[1]
        return _max_step_from_eig(torch.cat([a / lam, b / lam], dim=1))


class SecondOrder:
    """``(t, x)`` with ``‖x‖ ≤ t``; ``W = η W̄`` with ``W̄`` a hyperbolic rotation (``W̄² = 2w̄w̄ᵀ − J``)."""

    @staticmethod
    def unit(s):
        e = torch.zeros_like(s)
        e[..., 0] = 1.0
        return e

    @staticmethod
    def _jnorm(u):
        r = u[..., 1:].norm(dim=-1)
        return torch.sqrt(((u[..., 0] - r) * (u[..., 0] + r)).clamp(min=0))

    @staticmethod
    def scale(s, y, mu=None):
        ns, ny = SecondOrder._jnorm(s), SecondOrder._jnorm(y)
        sb, yb = s / ns[..., None], y / ny[..., None]
        gamma = torch.sqrt((1 + (sb * yb).sum(-1)) / 2)
        w = sb - yb
        w[..., 0] = sb[..., 0] + yb[..., 0]
        w = w / (2 * gamma[..., None])
        eta = torch.sqrt(ns / ny)
        lam = SecondOrder._wbar(w, y) * eta[..., None]
        return (w, eta, lam)

    @staticmethod
    def _wbar(w, v):
        """``W̄ v`` for ``W̄ = [[w₀, w₁ᵀ], [w₁, I + w₁w₁ᵀ/(1 + w₀)]]`` (``v`` may carry leading column
        dimensions that ``w`` broadcasts over); row 0 is written over the axpy's (no concatenation)."""
        w0, v0 = w[..., :1], v[..., :1]
        d = (w[..., 1:] * v[..., 1:]).sum(-1, keepdim=True)
        out = v + (v0 + d / (1 + w0)) * w
        out[..., :1] = w0 * v0 + d
        return out

    @staticmethod
    def _wbar_inv(w, v):
        """``W̄⁻¹ v = J W̄ J v``, expanded: the same roundings as :meth:`_wbar` on ``Jv``, negated."""
        w0, v0 = w[..., :1], v[..., :1]
        d = (w[..., 1:] * v[..., 1:]).sum(-1, keepdim=True)
        out = v - (v0 - d / (1 + w0)) * w
        out[..., :1] = w0 * v0 - d
        return out

    @staticmethod
    def winv_t(st, V):  # W is symmetric: W⁻¹ on the columns of V (B, nb, k, r)
        w, eta, _ = st
        return (SecondOrder._wbar_inv(w[..., None, :], V.mT) / eta[..., None, None]).mT

    @staticmethod
    def winv(st, v):
        w, eta, _ = st
        return SecondOrder._wbar_inv(w, v) / eta[..., None]

    @staticmethod
    def w_t(st, v):
        w, eta, _ = st
        return SecondOrder._wbar(w, v) * eta[..., None]

    @staticmethod
    def scaled(st, ds, dy):
        w, eta, _ = st
        return SecondOrder._wbar_inv(w, ds) / eta[..., None], SecondOrder._wbar(w, dy) * eta[..., None]

    @staticmethod
    def _jprod(u, v):
        out = u[..., :1] * v + v[..., :1] * u
        out[..., :1] = (u * v).sum(-1, keepdim=True)
        return out

    @staticmethod
    def _jdiv(lam, r):
        """``x`` with ``λ ∘ x = r``."""
        l0, l1 = lam[..., :1], lam[..., 1:]
        det = l0 * l0 - (l1 * l1).sum(-1, keepdim=True)
        x0 = (l0 * r[..., :1] - (l1 * r[..., 1:]).sum(-1, keepdim=True)) / det
        out = (r - x0 * lam) / l0
        out[..., :1] = x0
        return out

    @staticmethod
    def rhs(st, sigma_mu, corr):
        w, eta, lam = st
        t = SecondOrder._jprod(lam, lam)
        t[..., 0] -= sigma_mu[:, None]
        if corr is not None:
            t = t + SecondOrder._jprod(corr[0], corr[1])
        return SecondOrder._jdiv(lam, t)

    @staticmethod
    def _step(lam, d):
        """Largest α with ``λ + α d`` in the cone (``λ`` interior), per batch row (``d`` may carry
        leading dimensions that ``λ`` broadcasts over)."""
        l0, l1, d0, d1 = lam[..., 0], lam[..., 1:], d[..., 0], d[..., 1:]
        a = d0 * d0 - (d1 * d1).sum(-1)
        b = 2 * (l0 * d0 - (l1 * d1).sum(-1))
        c = (l0 * l0 - (l1 * l1).sum(-1)).clamp(min=0)
        disc = b * b - 4 * a * c
        sq = torch.sqrt(disc.clamp(min=0))
        q = -0.5 * (b + torch.where(b >= 0, sq, -sq))
        # the roots q/a and c/q, unguarded: a division by zero gives ±inf or NaN, and the tests `> 0`
        # take +inf (no limit) and drop the others, as a guarded division's inf would be
        real = disc >= 0
        r1, r2, r3 = q / a, c / q, -l0 / d0
        alpha = torch.where((r1 > 0) & real, r1, _INF)
        alpha = torch.where((r2 > 0) & real, torch.minimum(alpha, r2), alpha)
        # the t-component must stay nonnegative too (the other nappe of the quadric)
        alpha = torch.where(d0 < 0, torch.minimum(alpha, r3), alpha)
        return alpha.amin(-1)

    @staticmethod
    def step(st, ds, dy):
        return SecondOrder.step_scaled(st, *SecondOrder.scaled(st, ds, dy))

    @staticmethod
    def step_scaled(st, a, b):
        return SecondOrder._step(st[2], torch.stack([a, b])).amin(0)  # both directions in one pass


class PSD:
    """Symmetric PSD matrices in svec form; ``W y = Rᵀ Y R``, ``W⁻ᵀ s = R⁻¹ S R⁻ᵀ = Λ`` diagonal
    (``R = L_s V Λ^{-1/2}``, ``R⁻¹ = Λ^{-1/2} Uᵀ L_yᵀ`` from ``L_yᵀ L_s = U Λ Vᵀ``, as in CVXOPT; ``U, Λ, V``
    from one ``eigh``: module docstring)."""

    @staticmethod
    def unit(s):
        k = int(round((math.sqrt(8 * s.shape[-1] + 1) - 1) / 2))
        e = torch.eye(k, dtype=s.dtype, device=s.device)
        return svec(e).expand_as(s).clone()

    @staticmethod
    def scale(s, y, mu=None):
        d = s.shape[-1]
        k = int(round((math.sqrt(8 * d + 1) - 1) / 2))
        L, info = torch.linalg.cholesky_ex(smat(torch.stack([s, y]), k))
        # an iterate that rounding pushed out of the cone: unit scaling, and step() returns 0
        ok = (info == 0).all(0)
        Ls, Ly = torch.where(ok[..., None, None], L, torch.eye(k, dtype=s.dtype, device=s.device))
        M = Ly.mT @ Ls                                             # L_yᵀ L_s = U Λ Vᵀ (module docstring)
        if M.dtype == torch.float64:
            V = torch.linalg.eigh(M.mT @ M).eigenvectors
            MV = M @ V                                             # U Λ
            lam = torch.linalg.vector_norm(MV, dim=-2)
        if M.dtype != torch.float64 or bool((lam.amin(-1) < _EIGH_SPREAD * lam.amax(-1)).any()):
            U, lam, Vh = torch.linalg.svd(M)                       # far from the central path, or float32
            V, MV = Vh.mT, U * lam[..., None, :]
        isq = lam.rsqrt()
        R = (Ls @ V) * isq[..., None, :]                           # R = L_s V Λ^{-1/2}
        Rinv = (isq / lam)[..., :, None] * (MV.mT @ Ly.mT)         # R⁻¹ = Λ^{-1/2} Uᵀ L_yᵀ
        return (R, Rinv, lam, k, ok)

    @staticmethod
    def winv_t(st, V):  # W⁻ᵀ(X) = R⁻¹ X R⁻ᵀ on the columns of V (B, nb, d, r)
        return congruence_columns(st[1], V, st[3])

    @staticmethod
    def winv(st, v):  # W⁻¹(X) = R⁻ᵀ X R⁻¹
        return congruence(st[1].mT, v, st[3])

    @staticmethod
    def w_t(st, v):  # Wᵀ(X) = R X Rᵀ
        return congruence(st[0], v, st[3])

    @staticmethod
    def scaled(st, ds, dy):
        R, Rinv, lam, k, _ = st
        return congruence(Rinv, ds, k), congruence(R.mT, dy, k)

    @staticmethod
    def rhs(st, sigma_mu, corr):
        R, Rinv, lam, k, _ = st
        T = torch.diag_embed(lam * lam - sigma_mu[:, None, None])
        if corr is not None:
            XY = smat(corr[0], k) @ smat(corr[1], k)
            T = T + 0.5 * (XY + XY.mT)                                 # X ∘ Y, with YX = (XY)ᵀ
        return svec(2 * T / (lam[..., :, None] + lam[..., None, :]))  # λ \ T : Λ X + X Λ = 2T

    @staticmethod
    def step(st, ds, dy):
        # λ + α W⁻ᵀΔs ⪰ 0  ⇔  I + α Λ^{-1/2} R⁻¹ ΔS R⁻ᵀ Λ^{-1/2} ⪰ 0 (and Δy with Rᵀ for R⁻¹)
        R, Rinv, lam, k, ok = st
        isq = lam.rsqrt()[..., :, None]
        P = torch.stack([isq * Rinv, isq * R.mT])
        return PSD._step(st, P @ smat(torch.stack([ds, dy]), k) @ P.mT)

    @staticmethod
    def step_scaled(st, a, b):
        # the same test on the scaled directions a = W⁻ᵀΔs, b = WΔy: I + α Λ^{-1/2} smat(·) Λ^{-1/2} ⪰ 0
        isq = st[2].rsqrt()
        return PSD._step(st, smat(torch.stack([a, b]), st[3]) * (isq[..., :, None] * isq[..., None, :]))

    @staticmethod
    def _step(st, X):
        """Largest α with ``I + αX ⪰ 0`` for both of ``X (2, B, nb, k, k)``, per batch row; 0 where the
        iterate was out of the cone (``st``'s ``ok``)."""
        ok = st[4]
        X = torch.nan_to_num(X, nan=0.0, posinf=0.0, neginf=0.0)
        alpha = _max_step_from_eig(torch.linalg.eigvalsh(X).transpose(0, 1))  # both directions in one call
        return torch.where(ok.reshape(ok.shape[0], -1).all(-1), alpha, torch.zeros_like(alpha))
