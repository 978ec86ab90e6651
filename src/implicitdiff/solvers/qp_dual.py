"""The dual-space Mehrotra loop of :class:`~implicitdiff.solvers.qp_ipm.QPInteriorPoint` (``Q`` positive definite).

``z`` is eliminated exactly, ``z(y) = −Q⁻¹(p + Cᵀy)`` with ``C = [G; A]`` and ``y = (λ, ν)``,
so an iteration factors one Schur complement of size ``m`` (see :func:`interior_point_dual`), in one
scratch buffer for the whole loop (a fresh batch of matrices per iteration costs its page faults).
Forward only; shapes as in :mod:`implicitdiff.solvers.qp_ipm` (one batch dim, ``1`` when shared).
"""

from __future__ import annotations

import torch

from .._core.status import Status
from ..linalg.kkt import bmv, brmv, chol_solve, cholesky_lower_, tri_solve
from .qp_steps import amax, balanced_start, initial_shift, max_step, update_status

__all__ = ["interior_point_dual", "dual_z"]


def dual_z(pre, p, lam, nu):
    """``z(y) = −Q⁻¹(p + Cᵀy)`` for ``y = (λ, ν)``, the primal point of a dual iterate (``pre``: the ``"dual"``
    precomputation of :func:`~implicitdiff.linalg.kkt.kkt_precompute`)."""
    LQ, Wc = pre[0], pre[1]
    return -tri_solve(LQ, tri_solve(LQ, p) + bmv(Wc, torch.cat([lam, nu], dim=-1)), adjoint=True)


def interior_point_dual(ipm, P, p, G, h, A, b, pre, delta, warm_start, *, rtol, init=None, max_iter=None):
    """The same Mehrotra iteration with ``z`` eliminated (``Q`` positive definite).

    ``z(y) = −Q⁻¹(p + Cᵀy)`` satisfies stationarity by construction, so every quantity
    lives in the ``(m + k)``-dimensional dual space ``y = (λ, ν)``:
    ``Cz = −c₀ − Ky`` with ``K = C Q⁻¹ Cᵀ`` and ``c₀ = C Q⁻¹ p``, and the Newton step is
    ``(K + diag(W, δ)) dy = (r_p − r_c/λ, r_e)``, ``ds = −(r_c + s∘dλ)/λ`` — one Cholesky
    of size ``m`` (the equalities are eliminated once) and no ``n``-dimensional product per
    iteration.  Converged elements leave the working batch once a quarter of it is done (one
    gather, no sync on CPU).

    ``ipm`` is the :class:`~implicitdiff.solvers.qp_ipm.QPInteriorPoint` (its ``max_iter``,
    ``cert_tol``); the loop stops at ``rtol`` (the solver's early tolerance, then its own on a
    resume); ``init = (y, s)`` resumes from an interior iterate as is (no initial point, no
    shift); ``max_iter`` overrides the solver's limit.  Returns ``(None, s, λ, ν, status,
    iterations, None, active guess)``: ``z`` (:func:`dual_z`) and the full residual are left to the
    caller (the polish usually replaces the iterate), the guess is Tapia's indicator of the last
    step (``(B, m)`` bool).
    """
    B, n = p.shape
    m, k = h.shape[-1], b.shape[-1]
    dt, dev = p.dtype, p.device
    LQ, Wc, K, LA, X, MG = pre
    Lp = tri_solve(LQ, p)  # LQ⁻¹ p
    c0 = brmv(Wc, Lp)  # C Q⁻¹ p
    pQp = (Lp * Lp).sum(-1)
    hb = torch.cat([h, b], dim=-1)
    # ‖Cᵀy‖₂² ≤ ‖Q‖₂ · yᵀKy: a certificate test without an n-dimensional product
    Qf = P.Q.reshape(P.Q.shape[0], 1, -1)
    qnorm = p.new_tensor(float((Qf @ Qf.mT).amax().sqrt()))  # ‖Q‖_F ≥ ‖Q‖₂ (a dot product: one pass over Q)

    # The equality block is eliminated once (kkt_precompute): with K = [[K_GG, K_GA], [K_AG, K_AA]],
    # L_A L_Aᵀ = K_AA + δI and X = L_A⁻¹ K_AG, the Newton matrix K + diag(W, δI) is [[M + W, ·], [·, K_AA + δI]]
    # with the fixed Schur complement M = K_GG − XᵀX: each iteration factors M + W (size m, not m + k).

    scratch = p.new_empty(B, m, m)

    def factor(MG, w):
        """Cholesky of ``M + diag(w)``, factored in ``scratch`` (:func:`cholesky_lower_`; one buffer for the whole
        loop, fresh memory costs page faults): the factor lives until the next call, one iteration."""
        S = scratch[: w.shape[0]]
        S.copy_(MG.expand(w.shape[0], m, m))
        S.diagonal(dim1=-2, dim2=-1).add_(w)
        return cholesky_lower_(S)[0]

    # With Z = L_A⁻ᵀ X = (K_AA + δI)⁻¹ K_AG (once per call), a right-hand side (r_G, r_A) gives
    # u_G = (M + W)⁻¹ (r_G − Zᵀ r_A) and u_A = (K_AA + δI)⁻¹ r_A − Z u_G: the r_A parts are computed once per
    # iteration (the predictor and the corrector share r_A = r_e), each solve adds one product with Z.
    Z = torch.linalg.solve_triangular(LA.mT, X, upper=True) if k else None

    def eq_part(rA):
        """``(Zᵀ r_A, (K_AA + δI)⁻¹ r_A)``: what the equality rows contribute to a solve (``None`` if ``k = 0``)."""
        return (brmv(Z, rA), chol_solve(LA, rA.unsqueeze(-1)).squeeze(-1)) if k else None

    def solve(LG, rG, eq):
        """``(K + diag(W, δI))⁻¹ (r_G, r_A)`` by the block elimination above (``eq = eq_part(r_A)``)."""
        if not k:
            return chol_solve(LG, rG.unsqueeze(-1)).squeeze(-1)
        uG = chol_solve(LG, (rG - eq[0]).unsqueeze(-1)).squeeze(-1)
        return torch.cat([uG, eq[1] - bmv(Z, uG)], dim=-1)

    first = None  # the factorization of M + W for the first iteration, when the start already made it
    if init is not None:  # resume where an earlier run stopped: y = (λ, ν) and s, already interior
        y, s = init
    elif warm_start is None:
        # The W = μ₀I system, then s = −μ₀λ, shifted inside (Mehrotra's shift), and each pair rebalanced to
        # s/λ = μ₀ with s∘λ at 0.3 of the shifted product (the shift overshoots the scale of the solution's
        # multipliers): the first iteration's Newton matrix is then M + μ₀I again (to rounding) and reuses
        # this factorization.  μ₀ = max(1, 0.03 · mean diag K) matches the weight to the scale of K
        # (multipliers → constraint values).  On the OptNet instances (n = 100, m = 100, k = 20, batch 128,
        # seeds 0-2 and 5-7) this start takes 6.0 factorizations where μ₀ = mean diag K/10 with the plain
        # shift took 7.6.
        mu0 = (0.03 * K.diagonal(dim1=-2, dim2=-1)[..., :m].mean(-1, keepdim=True)).clamp(min=1).expand(B, m)
        first = factor(MG, mu0)
        r0 = -c0 - hb
        y = solve(first, r0[:, :m], eq_part(r0[:, m:]))
        s, lam = balanced_start(-mu0 * y[:, :m], y[:, :m], mu0)
        y = torch.cat([lam, y[:, m:]], dim=-1)
    else:
        z0 = warm_start[0].expand(B, n)
        s = h - bmv(G, z0)
        lam0 = warm_start[1].expand(B, m) if warm_start[1] is not None else p.new_ones(B, m)
        nu0 = warm_start[2].expand(B, k) if warm_start[2] is not None else p.new_zeros(B, k)
        s, lam = initial_shift(s, lam0)
        y = torch.cat([lam, nu0], dim=-1)
    out_y, out_s = y.clone(), s.clone()
    tap = y[:, :m] > s  # the active-set guess (Tapia's indicator once a step is taken)
    out_tap = tap.clone()
    out_status = torch.full((B,), int(Status.MAX_ITERATIONS), dtype=torch.long, device=dev)
    out_iters = torch.zeros(B, dtype=torch.long, device=dev)
    # the working batch: every per-element tensor below has idx.numel() rows
    idx = torch.arange(B, device=dev)
    status, iters = out_status.clone(), out_iters.clone()
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    best = torch.full((B,), float("inf"), dtype=dt, device=dev)
    stall = torch.zeros(B, dtype=torch.long, device=dev)
    Kw = K
    check_every = 1 if dev.type == "cpu" else 4

    def write_back():
        out_y.index_copy_(0, idx, y)
        out_s.index_copy_(0, idx, s)
        out_tap.index_copy_(0, idx, tap)
        out_status.index_copy_(0, idx, status)
        out_iters.index_copy_(0, idx, iters)

    max_iter = ipm.max_iter if max_iter is None else max_iter
    for it in range(max_iter + 1):
        lam = y[:, :m]
        Ky = bmv(Kw, y)
        g = -c0 - Ky  # C z(y)
        rp, re = g[:, :m] + s - h, g[:, m:] - b
        res_p = torch.maximum(amax(rp), amax(re)) / (1 + torch.stack([amax(g), amax(s), amax(hb)]).amax(0))
        yKy = (y * Ky).sum(-1)
        obj = 0.5 * (yKy - pQp)
        r = torch.maximum(res_p, (s * lam).sum(-1).abs() / (1 + obj.abs()))
        c = (hb * y).sum(-1)
        infeas = (c < 0) & ((qnorm * yKy.clamp(min=0)).sqrt() <= ipm.cert_tol * (-c))
        status, done, stall, best = update_status(r, infeas, torch.zeros_like(done), rtol, status, done,
                                                   stall, best, floor=ipm.rtol)
        if it == max_iter:
            break
        if it % check_every == 0:
            nb, ndone = idx.numel(), int(done.sum())  # one host read for both decisions
            if ndone == nb:
                break
            if nb >= 16 and ndone * 4 >= nb:
                write_back()
                keep = torch.nonzero(~done).squeeze(-1)
                idx = idx[keep]
                y, s, c0, pQp, h, b, hb = (t[keep] for t in (y, s, c0, pQp, h, b, hb))
                status, iters, done, best, stall, tap = (t[keep] for t in (status, iters, done, best, stall, tap))
                Kw, MG, LA, Z = (t[keep] if t is not None and t.shape[0] > 1 else t for t in (Kw, MG, LA, Z))
                first = None if first is None else first[keep]
                lam, rp, re = y[:, :m], rp[keep], re[keep]
        iters = iters + (~done).long()
        mu = (s * lam).sum(-1, keepdim=True) / m
        w = s / lam
        LS = factor(MG, w) if first is None else first
        first = None
        eq = eq_part(re)
        # affine: r_c = s∘λ
        dy = solve(LS, rp - s, eq)
        dl = dy[:, :m]
        ds = -s - w * dl
        a_aff = torch.minimum(max_step(s, ds), max_step(lam, dl)).clamp(max=1.0).unsqueeze(-1)
        mu_aff = ((s + a_aff * ds) * (lam + a_aff * dl)).sum(-1, keepdim=True) / m
        sigma = (mu_aff / mu).clamp(0, 1) ** 3
        # corrector: r_c = s∘λ + ds_aff∘dλ_aff − σμ
        rc = s * lam + ds * dl - sigma * mu
        dy = solve(LS, rp - rc / lam, eq)
        dl = dy[:, :m]
        ds = -(rc + s * dl) / lam
        eta = 1 - mu.squeeze(-1).sqrt().clamp(1e-4, 1e-2)
        alpha = (eta * torch.minimum(max_step(s, ds), max_step(lam, dl))).clamp(max=1.0)
        alpha = alpha.unsqueeze(-1)
        # a converged element keeps its iterate (its step may not be finite: 0 · NaN would poison it)
        y_new = torch.where(done.unsqueeze(-1), y, y + alpha * dy)
        s_new = torch.where(done.unsqueeze(-1), s, s + alpha * ds)
        # Tapia's indicator: an active constraint's slack falls faster than its multiplier, an
        # inactive one's multiplier faster than its slack (s⁺/s < λ⁺/λ), whatever their scales
        tap = torch.where(done.unsqueeze(-1), tap, s_new * lam < y_new[:, :m] * s)
        y, s = y_new, s_new
    write_back()
    # z(y) (dual_z) and the full residual (with Q, G, A), not the dual-space one, are computed by the caller if needed
    return None, out_s, out_y[:, :m], out_y[:, m:], out_status, out_iters, None, out_tap
