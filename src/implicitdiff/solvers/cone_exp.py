r"""The exponential cone in the interior point, with primal barrier scaling; batched over blocks.

``K = cl{(x, y, z) : y > 0, y·exp(x/y) ≤ z}`` (SCS's ordering) and its dual
``K* = cl{(u, v, w) : u < 0, −u·exp(v/u) ≤ e·w}``.  The cone is not symmetric, so there is no
NT point; the block linearizes the central path ``y = −μ∇F(s)`` of the primal barrier
``F(s) = −log(y log(z/y) − x) − log y − log z`` (a 3-self-concordant barrier, closed form):

    Δy + μ∇²F(s) Δs = −y − σμ ∇F(s),   i.e.   Δs + HΔy = −d_s,   H = (μ∇²F(s))⁻¹

With ``μ∇²F(s) = L Lᵀ`` the scaling is ``W = L⁻¹`` (``WᵀW = H``), so the block fits the
interior point's scaled frame like the symmetric cones (``W⁻ᵀ = Lᵀ``, ``W⁻¹ = L``,
``Wᵀ = L⁻ᵀ``, ``d̃ = W⁻ᵀd_s = L⁻¹(y + σμ∇F(s))``); Mehrotra's corrector does not apply and
is left out for these blocks.

**Closed forms.**  With ``ψ = y log(z/y) − x`` and ``ℓ = log(z/y)``, the Cholesky factor of
``∇²F(s)`` is, entry by entry (no LAPACK call, no cancellation: the Schur complements
simplify exactly, so it is accurate up to the boundary, where ``∇ψ∇ψᵀ/ψ²`` dominates)::

    L̂₀₀ = 1/ψ            L̂₁₁ = √((y+ψ)/ψ) / y
    L̂₁₀ = (1−ℓ)/ψ        L̂₂₁ = −(y/z) / √(ψ(y+ψ))
    L̂₂₀ = −(y/z)/ψ       L̂₂₂ = √((2y+ψ)/(y+ψ)) / z

and ``∇F(s) = (L̂₀₀, L̂₁₀ − 1/y, L̂₂₀ − 1/z)``.  The scaling factors ``μ∇²F(s) + δI`` with a
shift ``δ = _SHIFT·eps·tr(μ∇²F(s))`` (:func:`_chol_shifted`, also free of cancellation; ``δ = 0``
would give ``L = √μ·L̂``): near the end of a solve it bounds the scaling's condition number,
without which the last directions lose accuracy and the step collapses (``BREAKDOWN`` on
logistic regressions at ``rtol = 1e-10``).  Products with ``L``, ``Lᵀ`` and their inverses are
elementwise on the blocks (triangular 3 × 3); ``W⁻ᵀ = Lᵀ`` on many columns (the rows of ``A`` in
the normal matrix) is a batched matmul, which BLAS does faster than the 6 elementwise products,
but ATen multiplies ``3 × 3`` by ``3 × r`` with ``9r`` below
:data:`~.cone_sparse.BMM_NAIVE_BELOW` by a naive loop per block, slower than them.

**The step** is the largest ``α ≤ 1`` keeping ``s + αΔs`` and ``y + αΔy`` strictly inside their
cones *and* the pair inside a neighbourhood of the central path,
``‖y + μ_b∇F(s)‖_{∇²F(s)⁻¹} ≤ β μ_b`` with the block's ``μ_b = sᵀy/3`` — the safeguard that
keeps a primal-scaled method from stalling at the boundary (Skajaa & Ye 2015, §3;
Serrano 2015, ch. 8).  It is found in two vectorized passes:
(1) the boundary: both feasible sets are intervals ``[0, α_b)`` (the cones are convex), so
``min_b α_b`` is bisected (one membership test for both cones: ``(u, v, w) ∈ int K*`` iff
``(u − v, −u, w) ∈ int K``) in ``log α`` on ``[1e-12, 1]`` (``_BISECT`` halvings: within
``0.7 %`` of the boundary), every block and batch element at once — where every element is inside
at the fourth halving's midpoint (``α = 1e-12^(1/16) ≈ 0.18``; most steps are longer), so is it at
the first three (smaller steps: the interval), and one test replaces their four (10 instead of 14,
the same ``α``); (2) the neighbourhood:
the candidates ``α_in·0.9ᵏ`` (``k ∈ {1, 2, 3, 4, 5, 7, 9, 12}``): the largest whose blocks all
pass is taken (the smallest when none does).  (1) has one host sync (the shortcut's test); (2)
checks the candidates largest first, each for the whole batch, until every element has passed one —
a host sync per candidate tried, for ``1/K`` of the cost of checking all ``K`` at once where the first
suffices (most steps: docs/benchmarks.md).  Forward only, no gradients.
"""

from __future__ import annotations

import math

import torch

from .cone_sparse import BMM_NAIVE_BELOW

__all__ = ["ExpCone"]

# the central point s = y = −∇F(s) of this barrier (Newton's method), inside both K and K*
_CENTRAL = (-0.8278383990656786, 0.8051020015847954, 1.290927709856958)
_FLOOR = 1e-12     # the smallest step the boundary search resolves (below it: a zero step)
_BISECT = 12       # halvings of log α on [_FLOOR, 1]: α_in within 0.7 % of the boundary
_SKIP = 4          # the first halvings, skipped where every element is inside at their last mid (α = 0.18)
# the neighbourhood's candidates α_in·0.9ᵏ: most steps take the first or second; starting at
# 0.9·α_in, not at α_in, keeps degenerate problems from stalling at the boundary (measured)
_BACK = 0.9 ** torch.tensor([1, 2, 3, 4, 5, 7, 9, 12], dtype=torch.float64)
_BETA = 2.0
_SHIFT = 4.0       # the scaling's diagonal shift δ = _SHIFT·eps·tr(μ∇²F(s)) (see _chol_shifted)


def _in_primal(s):
    return _psi_positive(s)


def _in_dual(v):
    return _psi_positive(_to_primal(v))


def _chol(s):
    """``(L̂₀₀, L̂₁₀, L̂₂₀, L̂₁₁, L̂₂₁, L̂₂₂)`` with ``∇²F(s) = L̂L̂ᵀ`` (closed form, module doc), and ``∇F(s)``."""
    x, y, z = s.unbind(-1)
    lg = torch.log(z / y)
    psi = y * lg - x
    ip = 1 / psi
    yz = y / z
    yp = y + psi
    l00, l10, l20 = ip, (1 - lg) * ip, -yz * ip
    l11 = torch.sqrt(yp * ip) / y
    l21 = -yz * torch.rsqrt(psi * yp)
    l22 = torch.sqrt((y + yp) / yp) / z
    g = torch.stack([l00, l10 - 1 / y, l20 - 1 / z], -1)
    return (l00, l10, l20, l11, l21, l22), g


def _chol_shifted(s, mu):
    """The Cholesky factor of ``μ∇²F(s) + δI``, ``δ = _SHIFT·eps·tr(μ∇²F(s))``, entry by entry.

    With ``h = μ∇²F``, ``v = (h₁₀, h₂₀)`` and ``S⁰`` the exact Schur complement of ``h₀₀``
    (``S⁰₁₁ = μ(y+ψ)/(y²ψ)``, ``S⁰₂₁ = −μ/(zψ)``, ``S⁰₂₂ = μ(y+ψ)/(z²ψ)``, ``det S⁰ =
    μ²(2y+ψ)/(y²z²ψ)``), the shifted complement is ``S = S⁰ + δI + κvvᵀ``, ``κ = δ/(h₀₀(h₀₀+δ))``,
    and ``det S = det S⁰ + δ² + δκ‖v‖² + δ tr S⁰ + κ vᵀadj(S⁰)v``: sums of nonnegative terms,
    so no entry is computed by cancellation (LAPACK's ``a₁₁ − l₁₀²`` loses everything near the
    boundary, where ``h₀₀ ≈ μ/ψ²`` dominates).  ``δ = 0`` gives ``√μ·L̂``."""
    x, y, z = s.unbind(-1)
    mu = mu[:, None]
    lg = torch.log(z / y)
    psi = y * lg - x
    ip = 1 / psi
    yz = y / z
    yp = y + psi
    h00 = mu * ip * ip
    h10 = (1 - lg) * h00
    h20 = -yz * h00
    s11 = mu * yp * ip / (y * y)
    s21 = -mu * ip / z
    s22 = mu * yp * ip / (z * z)
    det0 = mu * mu * (y + yp) * ip / (y * y * z * z)
    delta = _SHIFT * torch.finfo(s.dtype).eps * (h00 + s11 + s22 + (h10 * h10 + h20 * h20) / h00)
    a00 = h00 + delta
    kap = delta / (h00 * a00)
    quad = (s22 * h10 * h10 - 2 * s21 * h10 * h20 + s11 * h20 * h20).clamp(min=0)
    det = det0 + delta * delta + delta * kap * (h10 * h10 + h20 * h20) + delta * (s11 + s22) + kap * quad
    l00 = torch.sqrt(a00)
    S11 = s11 + delta + kap * h10 * h10
    l11 = torch.sqrt(S11)
    l21 = (s21 + kap * h10 * h20) / l11
    l22 = torch.sqrt(det / S11)
    g = torch.stack([ip, (1 - lg) * ip - 1 / y, -yz * ip - 1 / z], -1)
    return (l00, h10 / l00, h20 / l00, l11, l21, l22), g


def _grad_hess(s):
    """``∇F(s)`` ``(*, 3)`` and ``∇²F(s)`` ``(*, 3, 3)``."""
    le, g = _chol(s)
    return g, _dense(le) @ _dense(le).mT


def _dense(le):
    l00, l10, l20, l11, l21, l22 = le
    o = torch.zeros_like(l00)
    return torch.stack([torch.stack([l00, o, o], -1), torch.stack([l10, l11, o], -1),
                        torch.stack([l20, l21, l22], -1)], -2)


def _lmul(le, v):  # L v
    l00, l10, l20, l11, l21, l22 = le
    v0, v1, v2 = v.unbind(-1)
    return torch.stack([l00 * v0, l10 * v0 + l11 * v1, l20 * v0 + l21 * v1 + l22 * v2], -1)


def _ltmul(le, v):  # Lᵀ v
    l00, l10, l20, l11, l21, l22 = le
    v0, v1, v2 = v.unbind(-1)
    return torch.stack([l00 * v0 + l10 * v1 + l20 * v2, l11 * v1 + l21 * v2, l22 * v2], -1)


def _lsolve(le, v):  # L⁻¹ v
    l00, l10, l20, l11, l21, l22 = le
    v0, v1, v2 = v.unbind(-1)
    u0 = v0 / l00
    u1 = (v1 - l10 * u0) / l11
    return torch.stack([u0, u1, (v2 - l20 * u0 - l21 * u1) / l22], -1)


def _ltsolve(le, v):  # L⁻ᵀ v
    l00, l10, l20, l11, l21, l22 = le
    v0, v1, v2 = v.unbind(-1)
    u2 = v2 / l22
    u1 = (v1 - l21 * u2) / l11
    return torch.stack([(v0 - l10 * u1 - l20 * u2) / l00, u1, u2], -1)


def _to_primal(v):
    """``(u, v, w) ∈ int K*  ⟺  (u − v, −u, w) ∈ int K`` (``φ = ψ(u − v, −u, w)``): one test for both."""
    u, vv, w = v.unbind(-1)
    return torch.stack([u - vv, -u, w], -1)


def _psi_positive(p):
    """``p ∈ int K`` for points ``(*, 3)``; where ``y ≤ 0`` or ``z ≤ 0`` the log makes ``ψ`` NaN or
    ``−∞`` (so the comparison is False) except for ``y, z < 0``, excluded by ``y > 0``."""
    x, y, z = p.unbind(-1)
    return (y > 0) & (y * torch.log(z / y) - x > 0)


def _boundary(s, y, ds, dy):
    """The largest ``α ≤ 1`` (to ``0.7 %``) with ``s + αΔs ∈ int K`` and ``y + αΔy ∈ int K*`` on every
    block, per batch element: bisection of ``log α`` on ``[_FLOOR, 1]``; ``0`` below ``_FLOOR``."""
    B = s.shape[0]
    P = torch.cat([s, _to_primal(y)], 1)          # both cones' blocks, as points of K
    D = torch.cat([ds, _to_primal(dy)], 1)

    def inside(a):
        return _psi_positive(torch.addcmul(P, a[:, None, None], D)).all(-1)
    full = inside(s.new_ones(B))
    lo = s.new_full((B,), math.log(_FLOOR))
    hi = s.new_zeros(B)
    halvings = _BISECT
    start = lo * 0.5 ** _SKIP  # the bisection's lo after _SKIP halvings that all stay inside (exact)
    if bool(inside(torch.exp(start)).all()):  # (module doc: so are the smaller steps, the floor included)
        lo, halvings, floor_ok = start, _BISECT - _SKIP, torch.ones_like(full)
    else:
        floor_ok = inside(s.new_full((B,), _FLOOR))
    for _ in range(halvings):
        mid = 0.5 * (lo + hi)
        ins = inside(torch.exp(mid))
        lo, hi = torch.where(ins, mid, lo), torch.where(ins, hi, mid)
    return torch.where(full, torch.ones_like(lo), torch.where(floor_ok, torch.exp(lo), torch.zeros_like(lo)))


def _near(x, y, z, u, v, w):
    """``‖r‖²_{∇²F(s)⁻¹} ≤ (βμ_b)²`` with ``r = y + μ_b∇F(s)``, ``μ_b = sᵀy/3`` (``s = (x, y, z)``, dual
    ``(u, v, w)``, inside their cones): ``‖L̂⁻¹r‖²`` by forward substitution on :func:`_chol`'s entries."""
    mub = (x * u + y * v + z * w) / 3
    lg = torch.log(z / y)
    psi = y * lg - x
    ip = 1 / psi
    yp = y + psi
    yz = y / z
    l10 = (1 - lg) * ip
    r0 = u + mub * ip
    r1 = v + mub * (l10 - 1 / y)
    r2 = w - mub * (yz * ip + 1 / z)
    q0 = r0 * psi                                     # r₀ / L̂₀₀
    q1 = (r1 - l10 * q0) * y * torch.sqrt(psi / yp)   # / L̂₁₁
    q2 = (r2 + yz * ip * q0 + yz * torch.rsqrt(psi * yp) * q1) * z * torch.sqrt(yp / (y + yp))  # / L̂₂₂
    d = q0 * q0 + q1 * q1 + q2 * q2
    return (d <= (_BETA * mub) ** 2) & torch.isfinite(d)


class ExpCone:
    """Blocks of shape ``(B, nb, 3)``; the state is ``(s, y, μ, ∇F(s), L, ok, L's entries)``."""

    @staticmethod
    def unit(s):
        return torch.tensor(_CENTRAL, dtype=s.dtype, device=s.device).expand_as(s).clone()

    @staticmethod
    def scale(s, y, mu):
        le, g = _chol_shifted(s, mu)
        ok = (_in_primal(s) & _in_dual(y) & torch.stack(le, -1).isfinite().all(-1)
              & (le[0] > 0) & (le[3] > 0) & (le[5] > 0))
        one, zero = torch.ones_like(le[0]), torch.zeros_like(le[0])
        le = tuple(torch.where(ok, v, e) for v, e in zip(le, (one, zero, zero, one, zero, one)))
        return (s, y, mu, g, _dense(le), ok, le)

    @staticmethod
    def winv_t(st, V):  # W⁻ᵀ = Lᵀ on the rows of V (B, nb, 3, r) (module doc: few columns, elementwise)
        if 9 * V.shape[-1] >= BMM_NAIVE_BELOW:
            return st[4].mT @ V
        return _ltmul(tuple(e[..., None] for e in st[6]), V.mT).mT

    @staticmethod
    def winv(st, v):
        return _lmul(st[6], v)

    @staticmethod
    def w_t(st, v):  # Wᵀ = L⁻ᵀ
        return _ltsolve(st[6], v)

    @staticmethod
    def scaled(st, ds, dy):  # (W⁻ᵀΔs, WΔy): Mehrotra's corrector term, which rhs leaves out for these blocks
        return _ltmul(st[6], ds), _lsolve(st[6], dy)

    @staticmethod
    def rhs(st, sigma_mu, corr):  # d̃ = L⁻¹(y + σμ∇F(s)); no corrector
        s, y, mu, g = st[:4]
        return _lsolve(st[6], y + sigma_mu[:, None, None] * g)

    @staticmethod
    def step(st, ds, dy):
        s, y, ok = st[0], st[1], st[5]
        a_in = _boundary(s, y, ds, dy)
        # the neighbourhood at the candidates a_in·0.9ᵏ, largest first, each for the whole batch,
        # until every element has one that passes (module doc: almost always the first)
        cand = a_in[:, None] * _BACK.to(dtype=s.dtype, device=s.device)
        K = cand.shape[1]
        first = torch.full_like(ok[:, 0], K - 1, dtype=torch.long)
        found = ~ok.all(-1) | (a_in == 0)  # their step is 0 whichever candidate: nothing to search
        for k in range(K - 1):
            c = cand[:, k, None]
            near = _near(*(torch.addcmul(v, c, dv) for v, dv in zip(s.unbind(-1) + y.unbind(-1),
                                                                 ds.unbind(-1) + dy.unbind(-1)))).all(-1)
            first = torch.where(near & ~found, k, first)
            found = found | near
            if bool(found.all()):
                break
        alpha = cand.gather(1, first[:, None])[:, 0]
        return torch.where(ok.all(-1), alpha, torch.zeros_like(alpha))
