r"""A batched primal-dual interior point for cone programs on the homogeneous self-dual embedding.

Solves ``min cᵀx  s.t.  Ax + s = b,  s ∈ K`` and its dual ``max −bᵀy  s.t.  Aᵀy + c = 0,
y ∈ K*`` for a batch at once (``A`` ``(B, m, n)``), with ``K`` a product of zero,
nonnegative, second-order, PSD and exponential cones (:mod:`~implicitdiff.linalg.cone_spec`).

The embedding (Ye, Todd, Mizuno; as in ECOS and Clarabel) adds ``τ, κ ≥ 0``:

    Aᵀy + cτ = 0,   Ax + s − bτ = 0,   cᵀx + bᵀy + κ = 0,   s ∈ K, y ∈ K*, τκ = 0 = sᵀy

and is always solvable: ``τ > 0`` gives the solution ``(x, y, s)/τ``; ``κ > 0`` a certificate
(``bᵀy < 0`` with ``Aᵀy = 0``: primal infeasible; ``cᵀx < 0`` with ``Ax + s = 0``: unbounded).

Each iteration is Mehrotra's predictor–corrector.  A Newton step solves

    [0  Aᵀ] [Δx]   [r₁]          Δs = −d_s − H Δy   (per cone, see cone_symmetric / cone_exp)
    [A −H ] [Δy] = [r₂] − Δτ [c; −b],   Δκ = −(d_κ + κΔτ)/τ

with ``H = WᵀW`` the block-diagonal scaling (zero on the zero cone's rows).  The cone rows
are eliminated *in the scaled frame* (``Ã = W⁻ᵀA_c``, ``Δỹ = WΔy_c = ÃΔx − W⁻ᵀr₂``; ``H`` is
never formed: its condition number grows like ``1/μ²``, ``W``'s like ``1/μ``), leaving the
``(n + z)`` system ``[[ÃᵀÃ, A_zᵀ], [A_z, 0]]`` — one batched factorization per iteration
(Cholesky without a zero cone, else LU; a ``eps^¾`` shift) used for three solves (the ``Δτ``
column, the predictor, the corrector), each polished by one step of iterative refinement.
``Δs = Wᵀ(−d̃ − Δỹ)`` comes from the scaled complementarity rows.  An element that stops
progressing (step ``≤ 1e-8``) is reported ``BREAKDOWN``, and a failed element returns its
best iterate (smallest residual).

Stopping rule (per element, ``x̂ = x/τ`` etc.):
``‖Ax̂ + ŝ − b‖∞ ≤ rtol (1 + max(‖b‖∞, ‖Ax̂‖∞, ‖ŝ‖∞))``,
``‖Aᵀŷ + c‖∞ ≤ rtol (1 + max(‖c‖∞, ‖Aᵀŷ‖∞))`` and
``|cᵀx̂ + bᵀŷ| ≤ rtol (1 + min(|cᵀx̂|, |bᵀŷ|))``.  Certificates are accepted at the same
``rtol``, scaled by the data (``‖Aᵀy‖∞ ‖b‖∞ ≤ rtol·(−bᵀy)·‖A‖∞`` and its dual).
Converged elements are frozen while the others go on; the loop's only host sync is the
"all done?" test.  Forward only: no gradients here.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .._core.status import Status
from ..linalg.cone_spec import ConeSpec
from .cone_exp import ExpCone
from .cone_symmetric import PSD, Nonneg, SecondOrder

__all__ = ["ConeInteriorPoint", "ConeResult"]


def _mv(M, v):
    """``M v`` for ``M (B, p, q)``, ``v (B, q)`` (a row-vector product: much faster than ``M @ v[..., None]``)."""
    return (v[:, None, :] @ M.mT)[:, 0]


def _rmv(M, v):
    """``Mᵀ v`` for ``M (B, p, q)``, ``v (B, p)``."""
    return (v[:, None, :] @ M)[:, 0]

_CONES = {"l": Nonneg, "q": SecondOrder, "s": PSD, "ep": ExpCone}


class _Rows(NamedTuple):
    """A group's rows when they are one contiguous range: read and written as views."""

    start: int
    stop: int
    shape: tuple


def _fast(idx):
    flat = idx.reshape(-1).cpu()
    start = int(flat[0])
    if torch.equal(flat, torch.arange(start, start + flat.numel())):
        return _Rows(start, start + flat.numel(), tuple(idx.shape))
    return idx


def _take(v, g):
    """``v[:, g]`` (a view for contiguous rows)."""
    if isinstance(g, _Rows):
        return v[:, g.start:g.stop].reshape((v.shape[0],) + g.shape + v.shape[2:])
    return v[:, g]


def _put(out, g, val):
    """``out[:, g] = val``."""
    if isinstance(g, _Rows):
        out[:, g.start:g.stop] = val.reshape((val.shape[0], g.stop - g.start) + val.shape[1 + len(g.shape):])
    else:
        out[:, g] = val


class ConeResult(NamedTuple):
    x: torch.Tensor          # (B, n)
    y: torch.Tensor          # (B, m)
    s: torch.Tensor          # (B, m)
    status: torch.Tensor     # (B,) int64
    residual: torch.Tensor   # (B,)
    iterations: torch.Tensor  # (B,) int64


def _inf_norm(v):
    return v.abs().amax(dim=-1) if v.shape[-1] else v.new_zeros(v.shape[:-1])


class ConeInteriorPoint:
    """Options of the cone interior point: ``rtol`` (stopping rule above), ``max_iter``."""

    def __init__(self, rtol: float = 1e-8, max_iter: int = 100):
        self.rtol = rtol
        self.max_iter = max_iter

    # -- the Newton system, in the scaled frame -------------------------------------------------
    # Cone rows: with Ã = W⁻ᵀA_c, r̃ = W⁻ᵀr₂ and Δỹ = WΔy_c the rows A_cΔx − HΔy_c = r₂ read
    # ÃΔx − Δỹ = r̃, so Δỹ = ÃΔx − r̃ and the x-rows become (ÃᵀÃ)Δx + A_zᵀΔy_z = r₁ + Ãᵀr̃.
    # H = WᵀW is never formed: its condition number grows like 1/μ², W's like 1/μ.
    def _scale_rows(self, V, groups, states):
        out = torch.zeros_like(V)
        vec = V.dim() == 2
        for (kind, _, idx), st in zip(groups, states):
            blk = _take(V, idx)
            _put(out, idx, _CONES[kind].winv_t(st, blk[..., None])[..., 0] if vec
                 else _CONES[kind].winv_t(st, blk))
        return out

    def _factor(self, A, spec, groups, states):
        B, m, n = A.shape
        z = spec.z
        At = self._scale_rows(A, groups, states)
        Mn = At.mT @ At
        delta = A.new_full((B, 1), torch.finfo(A.dtype).eps ** 0.75)
        if z == 0:
            L, _ = torch.linalg.cholesky_ex(Mn + torch.diag_embed(delta.expand(B, n)))
            return ("chol", L, At)
        Az = A[:, :z]
        K = torch.cat([torch.cat([Mn + torch.diag_embed(delta.expand(B, n)), Az.mT], -1),
                       torch.cat([Az, -torch.diag_embed(delta.expand(B, z))], -1)], -2)
        LU, piv, _ = torch.linalg.lu_factor_ex(K)
        return ("lu", (LU, piv), At)

    def _solve_once(self, fac, A, z, r1, r2z, rt):
        """``(Δx, Δy_z, Δỹ)`` for the x-rows ``r₁``, zero rows ``r₂z`` and scaled cone rows ``r̃``."""
        kind, F, At = fac
        rhs1 = r1 + _rmv(At, rt)
        if kind == "chol":
            p = torch.cholesky_solve(rhs1[..., None], F)[..., 0]
            qz = rhs1[:, :0]
        else:
            sol = torch.linalg.lu_solve(F[0], F[1], torch.cat([rhs1, r2z], -1)[..., None])[..., 0]
            p, qz = sol[:, : A.shape[-1]], sol[:, A.shape[-1]:]
        yt = _mv(At, p) - rt
        return p, qz, yt

    def _solve(self, fac, A, z, r1, r2z, rt, refine=1):
        """Solve, then refine against the unregularized system (its scaled cone rows hold exactly)."""
        At = fac[2]
        p, qz, yt = self._solve_once(fac, A, z, r1, r2z, rt)
        for _ in range(refine):
            e1 = r1 - _rmv(A[:, :z], qz) - _rmv(At, yt)
            e2 = r2z - _mv(A[:, :z], p)
            dp, dqz, dyt = self._solve_once(fac, A, z, e1, e2, torch.zeros_like(rt))
            p, qz, yt = p + dp, qz + dqz, yt + dyt
        return p, qz, yt

    def _unscale(self, method, v, groups, states):
        out = torch.zeros_like(v)
        for (kind, _, idx), st in zip(groups, states):
            _put(out, idx, getattr(_CONES[kind], method)(st, _take(v, idx)))
        return out

    # -- the iteration ------------------------------------------------------------------------
    def solve(self, A, b, c, spec: ConeSpec) -> ConeResult:
        """``A (B, m, n)``, ``b (B, m)``, ``c (B, n)`` of one dtype and device."""
        B, m, n = A.shape
        z, dt, dev = spec.z, A.dtype, A.device
        groups = [(k, size, _fast(idx)) for k, size, idx in spec.groups(dev)]
        nu = spec.degree
        x = A.new_zeros(B, n)
        s = A.new_zeros(B, m)
        for kind, _, idx in groups:
            _put(s, idx, _CONES[kind].unit(_take(s, idx)))
        y = s.clone()
        tau = A.new_ones(B)
        kappa = A.new_ones(B)
        status = torch.full((B,), -1, dtype=torch.int64, device=dev)
        residual = A.new_full((B,), float("inf"))
        iters = torch.zeros(B, dtype=torch.int64, device=dev)
        nA = A.abs().amax(dim=(-2, -1)).clamp(min=torch.finfo(dt).tiny)
        nb, nc = _inf_norm(b), _inf_norm(c)
        rtol = self.rtol
        stalled = torch.zeros(B, dtype=torch.bool, device=dev)
        best = [x, y, s, tau, residual]
        for it in range(self.max_iter + 1):
            # residuals of the embedding and the stopping rule ------------------------------
            Aty = _rmv(A, y)
            Ax = _mv(A, x)
            ctx, bty = (c * x).sum(-1), (b * y).sum(-1)
            rx = Aty + c * tau[:, None]
            rz = Ax + s - b * tau[:, None]
            rt = kappa + ctx + bty
            it_ = 1.0 / tau
            pres = _inf_norm(rz) * it_ / (1 + torch.maximum(nb, torch.maximum(_inf_norm(Ax), _inf_norm(s)) * it_))
            dres = _inf_norm(rx) * it_ / (1 + torch.maximum(nc, _inf_norm(Aty) * it_))
            gap = (ctx + bty).abs() * it_ / (1 + torch.minimum(ctx.abs(), bty.abs()) * it_)
            res = torch.maximum(pres, torch.maximum(dres, gap))
            ok = (pres <= rtol) & (dres <= rtol) & (gap <= rtol)
            pinf = (bty < 0) & (_inf_norm(Aty) * nb <= -bty * rtol * nA)
            dinf = (ctx < 0) & (_inf_norm(Ax + s) * nc <= -ctx * rtol * nA)
            bad = ~(torch.isfinite(res) & torch.isfinite(x).all(-1) & torch.isfinite(y).all(-1)
                    & torch.isfinite(s).all(-1) & torch.isfinite(tau) & torch.isfinite(kappa))
            new = status < 0
            better = new & (res < best[4])
            best = [torch.where(better.reshape((-1,) + (1,) * (v.dim() - 1)), v, bv)
                    for v, bv in zip((x, y, s, tau, res), best)]
            code = torch.where(ok, Status.SUCCESS, torch.where(pinf, Status.INFEASIBLE, torch.where(
                dinf, Status.UNBOUNDED, torch.where(bad, Status.NONFINITE, torch.where(
                    stalled, Status.BREAKDOWN, -1)))))
            status = torch.where(new & (code >= 0), code, status)
            residual = torch.where(new, torch.where(pinf | dinf, torch.zeros_like(res), res), residual)
            iters = torch.where(new, torch.full_like(iters, it), iters)
            running = status < 0
            if it == self.max_iter or not bool(running.any()):
                break
            # one Newton system per iteration ---------------------------------------------------
            mu = ((s[:, z:] * y[:, z:]).sum(-1) + tau * kappa) / (nu + 1)
            states = [_CONES[k].scale(_take(s, idx), _take(y, idx), mu) for k, _, idx in groups]
            fac = self._factor(A, spec, groups, states)
            p2, qz2, yt2 = self._solve(fac, A, z, -c, b[:, :z], self._scale_rows(b, groups, states))
            # cᵀp₂ + bᵀq₂ = −q₂ᵀHq₂ = −‖Δỹ₂‖² ≤ 0 exactly; computed this way it has no cancellation
            den = -(yt2 * yt2).sum(-1) - kappa / tau
            rz_t = self._scale_rows(rz, groups, states)
            q2 = torch.cat([qz2, self._unscale("winv", yt2, groups, states)[:, z:]], -1)

            def direction(eta, dt_rhs, dk):
                # x-rows −ηr_x; cone rows (scaled) −ηW⁻ᵀr_z + d̃; zero rows −ηr_z
                p1, qz1, yt1 = self._solve(fac, A, z, -eta[:, None] * rx, -eta[:, None] * rz[:, :z],
                                           -eta[:, None] * rz_t + dt_rhs)
                q1 = torch.cat([qz1, self._unscale("winv", yt1, groups, states)[:, z:]], -1)
                rhs_t = -eta * rt + dk / tau
                dtau = (rhs_t - (c * p1).sum(-1) - (b * q1).sum(-1)) / den
                dx = p1 + dtau[:, None] * p2
                dy = q1 + dtau[:, None] * q2
                # Δs̃ = −d̃ − Δỹ (complementarity, in the scaled frame), Δs = WᵀΔs̃
                ds = self._unscale("w_t", -dt_rhs - (yt1 + dtau[:, None] * yt2), groups, states)
                dkap = -(dk + kappa * dtau) / tau
                return dx, dy, ds, dtau, dkap

            def max_step(ds, dy, dtau, dkap):
                alpha = torch.full_like(tau, float("inf"))
                for (kind, _, idx), st in zip(groups, states):
                    alpha = torch.minimum(alpha, _CONES[kind].step(st, _take(ds, idx), _take(dy, idx)))
                for v, dv in ((tau, dtau), (kappa, dkap)):
                    alpha = torch.where(dv < 0, torch.minimum(alpha, -v / dv), alpha)
                return alpha

            def rhs_s(sigma_mu, corr):  # d̃ per cone (zero on the zero cone's rows)
                out = torch.zeros_like(s)
                for (kind, _, idx), st in zip(groups, states):
                    cr = None if corr is None else (_take(corr[0], idx), _take(corr[1], idx))
                    _put(out, idx, _CONES[kind].rhs(st, sigma_mu, cr))
                return out

            zero = torch.zeros_like(tau)
            # predictor (affine scaling)
            dxa, dya, dsa, dta, dka = direction(torch.ones_like(tau), rhs_s(zero, None), tau * kappa)
            alpha_a = max_step(dsa, dya, dta, dka).clamp(max=1.0)
            sigma = (1 - alpha_a) ** 3
            # corrector (Mehrotra)
            corr_s, corr_y = torch.zeros_like(s), torch.zeros_like(s)
            for (kind, _, idx), st in zip(groups, states):
                a_, b_ = _CONES[kind].scaled(st, _take(dsa, idx), _take(dya, idx))
                _put(corr_s, idx, a_)
                _put(corr_y, idx, b_)
            dk = tau * kappa + dta * dka - sigma * mu
            dx, dy, ds, dtau, dkap = direction(1 - sigma, rhs_s(sigma * mu, (corr_s, corr_y)), dk)
            alpha = (0.99 * max_step(ds, dy, dtau, dkap)).clamp(max=1.0)
            alpha = torch.where(running & torch.isfinite(alpha), alpha, zero)
            stalled = running & ~(alpha > 1e-8)  # no progress: reported next round (BREAKDOWN)
            move = alpha > 0  # (a NaN direction times a zero step would still be NaN)
            a1, m1 = alpha[:, None], move[:, None]
            x, y, s = (torch.where(m1, v + a1 * dv, v) for v, dv in ((x, dx), (y, dy), (s, ds)))
            tau = torch.where(move, tau + alpha * dtau, tau)
            kappa = torch.where(move, kappa + alpha * dkap, kappa)
        status = torch.where(status < 0, torch.full_like(status, Status.MAX_ITERATIONS), status)
        # a failed element returns its best iterate (smallest residual), not its last
        failed = (status != Status.SUCCESS) & (status != Status.INFEASIBLE) & (status != Status.UNBOUNDED)
        f1 = failed[:, None]
        x, y, s = (torch.where(f1, bv, v) for v, bv in zip((x, y, s), best[:3]))
        tau = torch.where(failed, best[3], tau)
        residual = torch.where(failed, best[4], residual)
        t = tau[:, None]
        return ConeResult(x / t, y / t, s / t, status, residual, iters)
