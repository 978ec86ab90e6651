r"""Derivatives of the projection onto the dual cone ``K*``, at a point whose projection is known.

The derivative of a cone program's solution (:mod:`implicitdiff.implicit.cone`) needs
``DΠ_{K*}(v)`` at ``v = y − s`` for the solution's dual ``y`` and slack ``s``; there
``Π_{K*}(v) = y`` and (Moreau) ``Π_K(−v) = s``, so no projection has to be computed.
:func:`dual_projection_jacobian` returns the ``(B, m, m)`` block-diagonal matrix, one block per
cone (built per group of same-size blocks):

- zero cone: ``K* = ℝ``, ``DΠ = I``;
- nonnegative: ``DΠ = diag(1[vᵢ > 0])``;
- second-order, ``v = (t, x)``: ``I`` if ``‖x‖ ≤ t``, ``0`` if ``‖x‖ ≤ −t``, else
  ``½ [[1, x̂ᵀ], [x̂, (1 + t/‖x‖) I − (t/‖x‖) x̂x̂ᵀ]]`` with ``x̂ = x/‖x‖``;
- PSD, ``V = U diag(λ) Uᵀ``: ``DΠ[Ḋ] = U (Γ ∘ (Uᵀ Ḋ U)) Uᵀ`` with
  ``Γᵢⱼ = (λᵢ⁺ − λⱼ⁺)/(λᵢ − λⱼ)`` (``1[λᵢ > 0]`` when ``λᵢ = λⱼ``), written in svec coordinates;
- exponential: ``DΠ_{K*}(v) = I − DΠ_K(−v)`` (Moreau).  If ``p = Π_K(−v) = s`` lies on the
  boundary ``g(p) = p₂ exp(p₁/p₂) − p₃ = 0`` with ``s ≠ 0 ≠ y``, the projection's optimality
  conditions ``p − (−v) + μ∇g(p) = 0``, ``g(p) = 0`` (``μ = y₃``) differentiate to
  ``[[I + μ∇²g, ∇g], [∇gᵀ, 0]] [ṗ; μ̇] = [v̇; 0]`` — a 4×4 solve; ``DΠ_K = I`` when ``y ≈ 0``
  (``−v`` inside ``K``) and ``0`` when ``s ≈ 0`` (``−v`` in the polar cone).  On the face
  ``{v₁ ≥ 0, v₂ ≥ 0}`` (``s = (s₁, 0, s₃)`` on ``K``'s face ``p₂ = 0``, ``y = (0, y₂, y₃)`` on
  ``K*``'s face ``q₁ = 0``) the projection is in closed form, ``Π_{K*}(v) = (0, v₂, v₃⁺)`` (Friberg
  2021, "Projection onto the exponential cone", case 3), so ``DΠ_{K*} = diag(0, 1, 1[v₃ > 0])``
  (taken within a rounding band of the face: there ``g`` is not the active constraint, and its
  curvature ``e/p₂`` is unbounded).

:func:`projection_pair` projects ``v`` exactly (the exponential cone by its univariate root, Friberg
2021): :func:`~.cone._exact_problem` takes the derivative of a program with exponential cones at the
exact projection pair of ``v = y − s`` rather than at an interior point's pair.

Non-differentiable points (a zero eigenvalue of ``v``: a constraint both active and with a zero
multiplier) take the one-sided value written above (``1[vᵢ > 0]``): the derivative for the
perturbations that keep the multiplier at zero.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..linalg.cone_spec import ConeSpec, smat, svec

__all__ = ["dual_projection_jacobian", "project_dual", "projection_pair", "apply_block_diagonal", "psd_gamma"]


def _soc(v):
    t, x = v[..., 0], v[..., 1:]
    nx = x.norm(dim=-1)
    k = v.shape[-1]
    eye = torch.eye(k, dtype=v.dtype, device=v.device)
    xh = x / nx.clamp(min=torch.finfo(v.dtype).tiny)[..., None]
    r = (t / nx.clamp(min=torch.finfo(v.dtype).tiny))[..., None, None]
    D = torch.zeros(v.shape[:-1] + (k, k), dtype=v.dtype, device=v.device)
    D[..., 0, 0] = 1.0
    D[..., 0, 1:] = xh
    D[..., 1:, 0] = xh
    D[..., 1:, 1:] = (1 + r) * eye[1:, 1:] - r * xh[..., :, None] * xh[..., None, :]
    D = 0.5 * D
    inside = (nx <= t)[..., None, None]
    polar = (nx <= -t)[..., None, None]
    return torch.where(inside, eye, torch.where(polar, torch.zeros_like(D), D))


def psd_gamma(lam):
    """``Γᵢⱼ = (λᵢ⁺ − λⱼ⁺)/(λᵢ − λⱼ)`` (``(*, k, k)``) for the eigenvalues ``lam (*, k)`` of ``smat(v)``;
    on (numerically) equal eigenvalues ``1[λᵢ > 0 and λⱼ > 0] + ½·1[exactly one > 0]``."""
    lp = lam.clamp(min=0)
    dl = lam[..., :, None] - lam[..., None, :]
    same = dl.abs() <= 1e3 * torch.finfo(lam.dtype).eps * lam.abs().amax(-1, keepdim=True)[..., None].clamp(min=1)
    safe = torch.where(same, torch.ones_like(dl), dl)
    return torch.where(same, ((lam[..., :, None] > 0) & (lam[..., None, :] > 0)).to(lam.dtype)
                       + 0.5 * ((lam[..., :, None] > 0) ^ (lam[..., None, :] > 0)).to(lam.dtype),
                       (lp[..., :, None] - lp[..., None, :]) / safe)


def _psd(v, k):
    lam, U = torch.linalg.eigh(smat(v, k))
    G = psd_gamma(lam)
    d = v.shape[-1]
    basis = smat(torch.eye(d, dtype=v.dtype, device=v.device), k)               # (d, k, k)
    Ue = U[..., None, :, :]
    inner = Ue.mT @ basis @ Ue                                                   # (*, d, k, k)
    out = svec(Ue @ (G[..., None, :, :] * inner) @ Ue.mT)                        # (*, d(col), d)
    return out.mT


def _band(t):
    """The exponential cone's relative rounding band ``10³√eps``: the tolerance of its case tests
    (``y ≈ 0``, ``s ≈ 0``, the face) and of the projection's Newton."""
    return 1e3 * torch.finfo(t.dtype).eps ** 0.5


def _exp_cases(s, y):
    """Which exponential-cone blocks have ``y ≈ 0`` (``s − y`` inside ``K``), ``s ≈ 0`` (in the polar)
    or ``v = y − s`` on the face ``{v₁ ≥ 0, v₂ ≥ 0}`` (closed form, module docstring), each within
    the same rounding band."""
    ns, ny = s.norm(dim=-1), y.norm(dim=-1)
    scale = torch.maximum(ns, ny).clamp(min=torch.finfo(s.dtype).tiny)
    band = _band(s) * scale
    v = y - s
    face = (v[..., 0] >= -band) & (v[..., 1] >= -band)
    return ny <= band, ns <= band, face


def _exp_kkt(p, mu):
    """``g(p) = p₂ exp(p₁/p₂) − p₃``, ``∇g`` and the 4×4 matrix ``[[I + μ∇²g, ∇g], [∇gᵀ, 0]]``.

    With ``ρ = p₁/p₂``: ``∇²g = (e/p₂) [[1, −ρ], [−ρ, ρ²]]`` on ``(p₁, p₂)``, ``e = exp(ρ)``, and ``e/p₂`` is
    formed as ``exp(ρ − log p₂)``, so a ``p₂`` near 0 (``p₂²`` underflowing) gives 0, never ``0/0``
    (``ρ`` is bounded below at −2000, where ``exp`` of both is exactly 0: no ``−∞·0``; and above at
    700, beyond which ``p₃ = p₂eᵖ`` overflows: no point of ``K``'s boundary, only a far Newton iterate)."""
    dt = p.dtype
    r, q = p[..., 0], p[..., 1].clamp(min=torch.finfo(dt).tiny)
    rho = (r / q).clamp(min=-2000.0, max=700.0)
    e = torch.exp(rho)
    eq = torch.exp(rho - torch.log(q))
    g = q * e - p[..., 2]
    grad = torch.stack([e, e * (1 - rho), -torch.ones_like(e)], -1)
    hess = torch.zeros(p.shape[:-1] + (3, 3), dtype=dt, device=p.device)
    hess[..., 0, 0] = eq
    hess[..., 0, 1] = hess[..., 1, 0] = -rho * eq
    hess[..., 1, 1] = rho * rho * eq
    K = torch.zeros(p.shape[:-1] + (4, 4), dtype=dt, device=p.device)
    K[..., :3, :3] = torch.eye(3, dtype=dt, device=p.device) + mu[..., None, None] * hess
    K[..., :3, 3] = grad
    K[..., 3, :3] = grad
    return g, grad, K


def _exp_project_dual(v, s, y, steps=8):
    """``Π_{K*}(v)`` for blocks near a known solution pair (``s ≈ Π_K(−v)``, ``y ≈ Π_{K*}(v)``):
    on the face ``{v₁ ≥ 0, v₂ ≥ 0}`` the closed form ``(0, v₂, v₃⁺)``; elsewhere Newton on the
    projection's optimality conditions ``p + v + μ∇g(p) = 0, g(p) = 0`` from ``(p, μ) = (s, y₃)``,
    then ``Π_{K*}(v) = v + Π_K(−v)`` (Moreau).  Where Newton does not converge (its optimality
    residual not within the rounding band of :func:`_exp_cases`, or ``μ < 0``: a start far from the
    projection) the result is the hint ``y`` itself, so a caller (:func:`~.cone.refine`, which keeps
    a step only where it lowers the residual) never meets a point outside ``K*``."""
    y_zero, s_zero, _ = _exp_cases(s, y)
    p, mu = s.clone(), y[..., 2].clone()
    for i in range(steps + 1):
        g, grad, K = _exp_kkt(p, mu)
        F = torch.cat([p + v + mu[..., None] * grad, g[..., None]], -1)
        if i == steps:  # the residual at the last iterate
            break
        d = torch.linalg.solve_ex(K, F[..., None])[0][..., 0]
        d = torch.where(torch.isfinite(d), d, torch.zeros_like(d))
        p, mu = p - d[..., :3], mu - d[..., 3]
        p = torch.cat([p[..., :1], p[..., 1:2].clamp(min=torch.finfo(v.dtype).tiny), p[..., 2:]], -1)
    band = _band(v) * (1 + v.abs().amax(-1))
    converged = (F.abs().amax(-1) <= band) & (mu >= -band)
    out = torch.where(converged[..., None], v + p, y)
    out = torch.where(y_zero[..., None], torch.zeros_like(v), out)
    out = torch.where(s_zero[..., None], v, out)
    face = (v[..., 0] >= 0) & (v[..., 1] >= 0)  # exact here: the closed form holds on the whole face
    closed = torch.stack([torch.zeros_like(v[..., 0]), v[..., 1], v[..., 2].clamp(min=0)], -1)
    return torch.where(face[..., None], closed, out)


def _exp_project_root(v, steps=64):
    """``(Π_{K*}(v), Π_K(−v))`` for exponential-cone blocks ``(*, 3)`` without a hint (Friberg 2021, "Projection onto
    the exponential cone: a univariate root-finding problem").  With ``w = −v`` (Moreau: ``w = p − q``,
    ``p = Π_K(w)``, ``q = Π_{K*}(v)``): ``w ∈ K`` gives ``q = 0``; ``v ∈ K*`` gives ``q = v``; the face
    ``w₁ ≤ 0, w₂ ≤ 0`` gives ``q = (0, v₂, v₃⁺)``; otherwise ``p = a(ρ, 1, eᵖ)``, ``q = b(−1, ρ − 1, e⁻ᵖ)``
    with ``a = ((ρ − 1)w₁ + w₂)/(ρ² − ρ + 1) > 0``, ``b = (w₁ − ρw₂)/(ρ² − ρ + 1) > 0`` and ``ρ`` the root
    of the increasing ``h(ρ) = a eᵖ − b e⁻ᵖ − w₃`` on the interval where ``a, b > 0`` (an infinite end
    cut 750 from the finite one; ``h`` and ``q₃ = b e⁻ᵖ = p₃ − w₃`` are formed with ``e^{−|ρ|}`` only,
    so nothing overflows), found by ``steps`` bisections: to the last
    bit of ``ρ``, so ``q`` and ``p`` are a projection pair (``pᵀq = 0``, both on their cones'
    boundaries) to rounding — unlike an interior point's pair, or Newton from it; both are returned,
    as the smaller one's digits would be lost in ``q − v``."""
    w1, w2, w3 = (-v).unbind(-1)
    one = torch.ones_like(w1)
    lo = 1 - w2 / torch.where(w1 > 0, w1, one)          # a > 0 (w₁ > 0)
    hi = w1 / torch.where(w2 > 0, w2, one)              # b > 0 (w₂ > 0)
    lo, hi = torch.where(w1 > 0, lo, hi - 750), torch.where(w2 > 0, hi, lo + 750)

    def ab(r):
        den = r * r - r + 1
        return ((r - 1) * w1 + w2) / den, (w1 - r * w2) / den

    def below(r):  # h(r) < 0, scaled by e^{−|r|}: no exp of a positive argument
        a, b = ab(r)
        e = torch.exp(-r.abs())
        return torch.where(r >= 0, a - b * e * e < w3 * e, a * e * e - b < w3 * e)

    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        up = below(mid)
        lo, hi = torch.where(up, mid, lo), torch.where(up, hi, mid)
    r = 0.5 * (lo + hi)
    a, b = ab(r)
    e = torch.exp(-r.abs())
    pos = r >= 0
    # ρ ≥ 0: q₃ = b e⁻ᵖ, p₃ = w₃ + q₃, and a = p₃e⁻ᵖ where that sum has no cancellation (w₃ > 0: the
    # formula's a, tiny near the face p₂ = 0, has lost its digits); ρ < 0 mirrored
    q3 = torch.where(pos, b * e, a * e - w3)
    p3 = torch.where(pos, w3 + b * e, a * e)
    a = torch.where(pos & (w3 > 0), p3 * e, a)
    b = torch.where(~pos & (w3 < 0), q3 * e, b)
    q = torch.stack([-b, b * (r - 1), q3], -1)
    p = torch.stack([a * r, a, p3], -1)
    q2 = w2.clamp(min=torch.finfo(v.dtype).tiny)
    in_k = ((w2 > 0) & (q2 * torch.exp((w1 / q2).clamp(max=700.0)) <= w3)) | ((w1 <= 0) & (w2 == 0) & (w3 >= 0))
    u = v[..., 0].clamp(max=-torch.finfo(v.dtype).tiny)
    in_dual = ((v[..., 0] < 0) & (-u * torch.exp((v[..., 1] / u).clamp(max=700.0)) <= math.e * v[..., 2])) | (
        (v[..., 0] == 0) & (v[..., 1] >= 0) & (v[..., 2] >= 0))
    face = ((w1 <= 0) & (w2 <= 0))[..., None]
    q = torch.where(face, torch.stack([torch.zeros_like(w1), v[..., 1], v[..., 2].clamp(min=0)], -1), q)
    p = torch.where(face, torch.stack([w1, torch.zeros_like(w1), w3.clamp(min=0)], -1), p)
    q = torch.where(in_k[..., None], torch.zeros_like(v), torch.where(in_dual[..., None], v, q))
    p = torch.where(in_k[..., None], -v, torch.where(in_dual[..., None], torch.zeros_like(v), p))
    return q, p


def _exp(s, y):
    """``DΠ_{K*}(y − s)`` for exponential-cone blocks ``(*, 3)`` (SCS ordering ``(x, y, z)``)."""
    dt = s.dtype
    eye = torch.eye(3, dtype=dt, device=s.device)
    # y ≈ 0: DΠ_K = I, DΠ_{K*} = 0;  s ≈ 0: DΠ_{K*} = I;  the face: DΠ_{K*} = diag(0, 1, 1[v₃ > 0])
    y_zero, s_zero, face = _exp_cases(s, y)
    _, _, K = _exp_kkt(s, y[..., 2].clamp(min=0))
    generic = ~(y_zero | s_zero | face)
    K = torch.where(generic[..., None, None], K, torch.eye(4, dtype=dt, device=s.device))
    Dk = torch.linalg.solve(K, torch.eye(4, dtype=dt, device=s.device)[:, :3].expand(K.shape[:-2] + (4, 3)))[..., :3, :]
    on_face = torch.stack([torch.zeros_like(s[..., 0]), torch.ones_like(s[..., 0]),
                           (y[..., 2] - s[..., 2] > 0).to(dt)], -1)
    D = torch.where(face[..., None, None], torch.diag_embed(on_face), eye - Dk)
    return torch.where(y_zero[..., None, None], torch.zeros_like(D), torch.where(s_zero[..., None, None], eye, D))


def dual_projection_jacobian(spec: ConeSpec, y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``DΠ_{K*}(y − s)`` as a dense ``(B, m, m)`` block-diagonal matrix (``y, s`` ``(B, m)``)."""
    B, m = y.shape
    v = y - s
    D = y.new_zeros(B, m, m)
    z = spec.z
    if z:
        ar = torch.arange(z, device=y.device)
        D[:, ar, ar] = 1.0
    for kind, k, idx in spec.groups(y.device):
        if kind == "l":
            D[:, idx, idx] = (v[:, idx] > 0).to(y.dtype)
            continue
        if kind == "q":
            blk = _soc(v[:, idx])
        elif kind == "s":
            blk = _psd(v[:, idx], k)
        else:
            blk = _exp(s[:, idx], y[:, idx])
        D[:, idx[:, :, None], idx[:, None, :]] = blk
    return D


def projection_pair(spec: ConeSpec, v: torch.Tensor) -> tuple:
    """``(Π_{K*}(v), Π_K(−v))`` for ``v (B, m)``, exactly (to rounding): the exponential-cone blocks by
    their univariate root (:func:`_exp_project_root`, 64 bisections), the others in closed form."""
    q = project_dual(spec, v)
    p = q - v
    for kind, _, idx in spec.groups(v.device):
        if kind == "ep":
            q[:, idx], p[:, idx] = _exp_project_root(v[:, idx])
    return q, p


def project_dual(spec: ConeSpec, v: torch.Tensor, s: Optional[torch.Tensor] = None,
                 y: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``Π_{K*}(v)`` for ``v (B, m)``; the exponential-cone blocks (no closed form) by Newton from a nearby
    solution pair ``(s, y)`` (:func:`_exp_project_dual`); without one they are left as ``v`` (for
    :func:`projection_pair`)."""
    out = v.clone()  # zero cone: K* = ℝ
    for kind, k, idx in spec.groups(v.device):
        blk = v[:, idx]
        if kind == "l":
            out[:, idx] = blk.clamp(min=0)
        elif kind == "q":
            t, x = blk[..., 0], blk[..., 1:]
            nx = x.norm(dim=-1)
            half = 0.5 * (t + nx)
            edge = torch.cat([half[..., None], half[..., None] * x / nx.clamp(min=torch.finfo(v.dtype).tiny)[..., None]], -1)
            out[:, idx] = torch.where((nx <= t)[..., None], blk,
                                      torch.where((nx <= -t)[..., None], torch.zeros_like(blk), edge))
        elif kind == "s":
            lam, U = torch.linalg.eigh(smat(blk, k))
            out[:, idx] = svec((U * lam.clamp(min=0)[..., None, :]) @ U.mT)
        elif s is not None:
            out[:, idx] = _exp_project_dual(blk, s[:, idx], y[:, idx])
    return out


def apply_block_diagonal(spec: ConeSpec, D: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``D V`` for the block-diagonal ``D (B, m, m)`` of :func:`dual_projection_jacobian` and
    ``V (B, m, r)``, block by block (``O(m·k·r)`` instead of ``O(m²r)``)."""
    out = torch.empty_like(V)
    z = spec.z
    out[:, :z] = V[:, :z]
    for kind, k, idx in spec.groups(V.device):
        if kind == "l":
            out[:, idx] = D[:, idx, idx][..., None] * V[:, idx]
        else:
            out[:, idx] = D[:, idx[:, :, None], idx[:, None, :]] @ V[:, idx]
    return out
