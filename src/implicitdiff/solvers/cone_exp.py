r"""The exponential cone in the interior point, with primal barrier scaling; batched over blocks.

``K = cl{(x, y, z) : y > 0, y·exp(x/y) ≤ z}`` (SCS's ordering) and its dual
``K* = cl{(u, v, w) : u < 0, −u·exp(v/u) ≤ e·w}``.  The cone is not symmetric, so there is no
NT point; the block linearizes the central path ``y = −μ∇F(s)`` of the primal barrier
``F(s) = −log(y log(z/y) − x) − log y − log z`` (a 3-self-concordant barrier, closed form):

    Δy + μ∇²F(s) Δs = −y − σμ ∇F(s),   i.e.   Δs + HΔy = −d_s,   H = (μ∇²F(s))⁻¹

With ``μ∇²F(s) = L Lᵀ`` the scaling is ``W = L⁻¹`` (``WᵀW = H``), so the block fits the
interior point's scaled frame like the symmetric cones (``W⁻ᵀ = Lᵀ``, ``W⁻¹ = L``,
``Wᵀ = L⁻ᵀ``, ``d̃ = W⁻ᵀd_s = L⁻¹(y + σμ∇F(s))``); Mehrotra's corrector does not apply and
is left out for these blocks.  The step to the boundary has no closed form: it is the largest
``α`` of a geometric grid keeping ``s + αΔs`` and ``y + αΔy`` strictly inside their cones *and*
the pair inside a neighbourhood of the central path,
``‖y + μ_b∇F(s)‖_{∇²F(s)⁻¹} ≤ β μ_b`` with the block's ``μ_b = sᵀy/3`` — the safeguard that
keeps a primal-scaled method from stalling at the boundary (Skajaa & Ye 2015, §3;
Serrano 2015, ch. 8).  Forward only, no gradients.
"""

from __future__ import annotations

import torch

__all__ = ["ExpCone"]

# the central point s = y = −∇F(s) of this barrier (Newton's method), inside both K and K*
_CENTRAL = (-0.8278383990656786, 0.8051020015847954, 1.290927709856958)
_GRID = 0.8 ** torch.arange(0, 100, dtype=torch.float64)  # interior-step candidates, 1 down to ~2e-10
_BACK = 0.9 ** torch.arange(0, 12, dtype=torch.float64)   # then the neighbourhood's backtracking
_BETA = 2.0


def _psi(s):
    x, y, z = s.unbind(-1)
    return y * torch.log(z / y) - x


def _in_primal(s):
    x, y, z = s.unbind(-1)
    ok = (y > 0) & (z > 0)
    ys, zs = torch.where(ok, y, torch.ones_like(y)), torch.where(ok, z, torch.ones_like(z))
    return ok & (ys * torch.log(zs / ys) - x > 0)


def _in_dual(v):
    u, vv, w = v.unbind(-1)
    ok = (u < 0) & (w > 0)
    us, ws = torch.where(ok, u, -torch.ones_like(u)), torch.where(ok, w, torch.ones_like(w))
    return ok & (1 + torch.log(ws) - torch.log(-us) - vv / us > 0)


def _grad_hess(s):
    """``∇F(s)`` ``(*, 3)`` and ``∇²F(s)`` ``(*, 3, 3)``."""
    x, y, z = s.unbind(-1)
    psi = _psi(s)
    dpsi = torch.stack([-torch.ones_like(x), torch.log(z / y) - 1, y / z], -1)
    g = -dpsi / psi[..., None] - torch.stack([torch.zeros_like(x), 1 / y, 1 / z], -1)
    H = dpsi[..., :, None] * dpsi[..., None, :] / (psi ** 2)[..., None, None]
    d2 = torch.zeros(s.shape + (3,), dtype=s.dtype, device=s.device)
    d2[..., 1, 1] = -1 / y
    d2[..., 1, 2] = d2[..., 2, 1] = 1 / z
    d2[..., 2, 2] = -y / z ** 2
    H = H - d2 / psi[..., None, None]
    H[..., 1, 1] += 1 / y ** 2
    H[..., 2, 2] += 1 / z ** 2
    return g, H


class ExpCone:
    """Blocks of shape ``(B, nb, 3)``; the state is ``(s, y, μ, ∇F(s), L)``."""

    @staticmethod
    def unit(s):
        return torch.tensor(_CENTRAL, dtype=s.dtype, device=s.device).expand_as(s).clone()

    @staticmethod
    def scale(s, y, mu):
        g, H = _grad_hess(s)
        Hm = mu[:, None, None, None] * H
        # near the boundary ∇²F ≈ ∇ψ∇ψᵀ/ψ² dominates by ~1/ψ²: a relative jitter keeps the
        # Cholesky factor of the (positive definite) matrix computable
        jitter = 16 * torch.finfo(s.dtype).eps * Hm.diagonal(dim1=-2, dim2=-1).sum(-1)
        L, info = torch.linalg.cholesky_ex(Hm + jitter[..., None, None] * torch.eye(3, dtype=s.dtype, device=s.device))
        ok = (info == 0) & _in_primal(s) & _in_dual(y)
        L = torch.where(ok[..., None, None], L, torch.eye(3, dtype=s.dtype, device=s.device))
        return (s, y, mu, g, L, ok)

    @staticmethod
    def winv_t(st, V):  # W⁻ᵀ = Lᵀ on the rows of V (B, nb, 3, r)
        return st[4].mT @ V

    @staticmethod
    def winv(st, v):
        return (st[4] @ v[..., None])[..., 0]

    @staticmethod
    def w_t(st, v):  # Wᵀ = L⁻ᵀ
        return torch.linalg.solve_triangular(st[4].mT, v[..., None], upper=True)[..., 0]

    @staticmethod
    def scaled(st, ds, dy):  # (W⁻ᵀΔs, WΔy); only used by the symmetric cones' corrector
        return ExpCone.winv_t(st, ds[..., None])[..., 0], torch.linalg.solve_triangular(
            st[4], dy[..., None], upper=False)[..., 0]

    @staticmethod
    def rhs(st, sigma_mu, corr):  # d̃ = L⁻¹(y + σμ∇F(s)); no corrector
        s, y, mu, g, L, ok = st
        r = y + sigma_mu[:, None, None] * g
        return torch.linalg.solve_triangular(L, r[..., None], upper=False)[..., 0]

    @staticmethod
    def step(st, ds, dy):
        s, y, mu, g, L, ok = st
        # 1) the largest step of a geometric grid that stays strictly inside both cones
        a = _GRID.to(dtype=s.dtype, device=s.device)
        J = torch.arange(a.numel(), device=s.device)
        inside = (_in_primal(s[..., None, :] + a[:, None] * ds[..., None, :])
                  & _in_dual(y[..., None, :] + a[:, None] * dy[..., None, :])).all(dim=1)   # (B, J)
        first = torch.where(inside, J, a.numel()).amin(-1)
        a_in = torch.where(first < a.numel(), a[first.clamp(max=a.numel() - 1)], torch.zeros_like(a[:1]))
        # 2) backtrack from there until the pair is in the central-path neighbourhood (one
        # candidate at a time: the first is usually accepted); if none is, the last candidate
        alpha = a_in.clone()
        pending = torch.ones_like(a_in, dtype=torch.bool)
        for k, f in enumerate(_BACK.tolist()):
            b = a_in * f
            sa = s + b[:, None, None] * ds
            ya = y + b[:, None, None] * dy
            mub = (sa * ya).sum(-1) / 3
            ga, Ha = _grad_hess(sa)
            r = ya + mub[..., None] * ga
            Hr = torch.linalg.solve_ex(Ha, r[..., None])[0][..., 0]
            near = (((r * Hr).sum(-1) <= (_BETA * mub) ** 2) & torch.isfinite(Hr).all(-1)).all(-1)
            take = pending & (near | (k == _BACK.numel() - 1))
            alpha = torch.where(take, b, alpha)
            pending = pending & ~take
            if not bool(pending.any()):
                break
        return torch.where(ok.all(-1), alpha, torch.zeros_like(alpha))
