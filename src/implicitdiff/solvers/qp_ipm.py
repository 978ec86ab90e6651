r"""Batched primal-dual interior point for convex QPs (Mehrotra predictor-corrector).

Solves, for every batch element at once,

    minimize ½ zᵀQz + pᵀz   subject to   Gz ≤ h,  Az = b

with ``Q`` symmetric positive *semi*definite (``Q = 0``: a linear program).
Forward only: no autograd here; :mod:`implicitdiff.implicit.qp` differentiates.

Shapes (flattened by the caller, one batch dim, ``1`` for a shared parameter):
``Q (B|1, n, n)``, ``p (B|1, n)``, ``G (B|1, m, n)``, ``h (B|1, m)``,
``A (B|1, k, n)``, ``b (B|1, k)``; ``m = 0`` or ``k = 0`` for absent blocks.

**The Newton system.**  With slacks ``s = h − Gz ≥ 0`` and multipliers ``λ ≥ 0``, ``ν``,
one step solves the linearized KKT conditions; eliminating ``ds`` leaves

    [ Q   Gᵀ   Aᵀ ] [dz]   [ r₁ ]
    [ G   −W   0  ] [dλ] = [ r₂ ]        W = diag(s/λ)
    [ A   0    0  ] [dν]   [ r₃ ]

It is factorized in one of two condensed forms, both symmetric positive definite by
construction and factored by Cholesky (never an unpivoted LU):

* ``"dual"`` (``Q`` positive definite and ``m + k`` not much above ``n``): ``z`` is eliminated
  exactly, ``z(y) = −Q⁻¹(p + Cᵀy)`` with ``C = [G; A]``, ``y = (λ, ν)``; the iteration runs in
  the dual space and each step factors ``S = C Q⁻¹ Cᵀ + diag(W, δ)`` — OptNet's Schur
  complement, here with Cholesky — whose equality block is eliminated once per solve, so an
  iteration costs one Cholesky of size ``m``.
* ``"primal"`` (any ``Q ⪰ 0``, e.g. an LP): ``H = Q + δI + Gᵀ(W + δI)⁻¹G`` (size ``n``) and
  ``S = A H⁻¹ Aᵀ + δI`` (size ``k``); the regularization ``δ`` (relative ``10⁻⁹``) makes ``Q = 0``
  and redundant equalities need no special case — the *system* is regularized, not the
  problem — and one step of iterative refinement against the exact matrix removes it.

Elements leave the working batch as they converge (a gather, no host sync on CPU; on CUDA
the convergence test syncs every fourth iteration).

**The final factorization** is that of the *active-set* system: constraints with
``λᵢ > max(sᵢ, 10 √μ)`` are active (weakly active ones, ``λᵢ ≈ 0``, are not), and

    [ Q    G_𝒜ᵀ  Aᵀ ] [z ]   [−p ]
    [ G_𝒜  0     0  ] [λ𝒜] = [h𝒜]        (inactive: λᵢ = 0)
    [ A    0     0  ] [ν ]   [ b ]

is solved by refinement ("polishing", as OSQP does).  The guess is then corrected as in
an active-set method — constraints the polished point violates are added, those whose
multiplier comes out negative dropped, and the system solved again (≤ 3 rounds; a
strongly active constraint with a tiny multiplier, ``λᵢ ≈ 10√μ``, is caught this way).
The polished solution replaces the interior-point one when its KKT residual is no
larger.  The backward pass reuses this factorization: it is the exact Jacobian of the
KKT conditions on the active set.

**Statuses** per element: ``SUCCESS`` when the relative KKT residual (stationarity,
feasibility, complementarity) is ``≤ rtol``; ``INFEASIBLE`` when the iterate is a
Farkas certificate ``λ ≥ 0``, ``‖Gᵀλ + Aᵀν‖∞ ≤ ε (−hᵀλ − bᵀν)``; ``UNBOUNDED`` when
``z`` or the step ``dz`` is a recession certificate ``‖Qx‖∞, ‖Ax‖∞, max(Gx)₊ ≤ ε (−pᵀx)``
(both never fire on a problem with a primal-dual solution of 1-norm ``< 1/ε``);
``NONFINITE``; ``MAX_ITERATIONS`` (also when the residual stagnates near the tolerance).
The status is decided on the full KKT residual of the returned point.  Equality-only
problems take one direct solve (no iterations).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .._core.status import Status
from .qp_kkt import (KKTFactor, _Products, _lsolve, _mv, _rmv, _tri_solve, kkt_apply,  # noqa: F401
                     kkt_factor, kkt_precompute, kkt_refine, kkt_solve_reg)

__all__ = ["QPInteriorPoint", "QPResult", "KKTFactor", "kkt_factor", "kkt_solve_reg", "kkt_apply"]


class QPResult(NamedTuple):
    z: torch.Tensor  # (B, n)
    lam: torch.Tensor  # (B, m)
    nu: torch.Tensor  # (B, k)
    status: torch.Tensor  # (B,) int64
    residual: torch.Tensor  # (B,)
    iterations: torch.Tensor  # (B,) int64
    active: torch.Tensor  # (B, m) 1.0 for active constraints
    factor: KKTFactor  # of the active-set system


def _amax(x):
    return x.abs().amax(-1) if x.shape[-1] else x.new_zeros(x.shape[:-1])


def _kkt_residual(P, p, h, b, z, s, lam, nu):
    """Relative KKT residual: max of stationarity, feasibility and complementarity (per element)."""
    Qz, Gz, Az = P.forward(z)
    GAy = P.adjoint(lam, nu)
    rd = Qz + p + GAy
    rp = Gz + s - h
    re = Az - b
    pz = p.expand_as(z)
    res_d = _amax(rd) / (1 + torch.stack([_amax(Qz), _amax(pz), _amax(GAy)]).amax(0))
    hh, bb = h.expand_as(s), b.expand_as(re)
    res_p = torch.maximum(_amax(rp), _amax(re)) / (
        1 + torch.stack([_amax(Gz), _amax(s), _amax(hh), _amax(Az), _amax(bb)]).amax(0))
    obj = (pz * z).sum(-1) + 0.5 * (z * Qz).sum(-1)
    gap = (s * lam).sum(-1).abs() / (1 + obj.abs())
    return torch.maximum(torch.maximum(res_d, res_p), gap), (rd, rp, re, Qz, Gz, Az, GAy)


def _max_step(x, dx):
    """Largest ``α ≥ 0`` with ``x + α dx ≥ 0`` (per element; ``inf`` when unlimited)."""
    if x.shape[-1] == 0:
        return x.new_full(x.shape[:-1], float("inf"))
    ratio = torch.where(dx < 0, -x / dx, torch.full_like(x, float("inf")))
    return ratio.amin(-1)


def _update_status(r, infeas, unbnd, rtol, status, done, stall, best):
    """One iteration's verdicts; an element stops at its first one (no host sync)."""
    # stagnation near the tolerance (the rounding floor): no 10% gain on the best residual for 5 iterations
    stall = torch.where((r < 0.9 * best) | (best > 1e4 * rtol), 0, stall + 1)
    best = torch.minimum(best, r)
    new = torch.where(~torch.isfinite(r), int(Status.NONFINITE),
          torch.where(r <= rtol, int(Status.SUCCESS),
          torch.where(infeas, int(Status.INFEASIBLE),
          torch.where(unbnd, int(Status.UNBOUNDED),
          torch.where(stall >= 5, int(Status.MAX_ITERATIONS), -1)))))  # noqa: E128
    stop = (new >= 0) & ~done
    return torch.where(stop, new, status), done | stop, stall, best


def _initial_shift(s, lam):
    """Mehrotra's shift into the interior, balanced so that neither ``s`` nor ``λ`` starts tiny."""
    s = s + (-1.5 * s.amin(-1, keepdim=True)).clamp(min=0)
    lam = lam + (-1.5 * lam.amin(-1, keepdim=True)).clamp(min=0)
    sl = (s * lam).sum(-1, keepdim=True)
    return (s + 0.5 * sl / lam.sum(-1, keepdim=True).clamp(min=1e-30) + 1e-3,
            lam + 0.5 * sl / s.sum(-1, keepdim=True).clamp(min=1e-30) + 1e-3)


class QPInteriorPoint:
    """The batched interior-point QP solver (final; a hashable value passed to the layer).

    Args:
        rtol: relative KKT residual at which an element has converged.
        max_iter: iteration limit.
        reg: relative regularization ``δ`` of the KKT factorization.
        refine: refinement steps of each KKT solve with the active-set factorization.
        cert_tol: the ``ε`` of the infeasibility/unboundedness certificates.
    """

    def __init__(self, *, rtol: float, max_iter: int = 50, reg: float, refine: int, cert_tol: float,
                 kkt: str = "auto"):
        self.rtol, self.max_iter, self.reg, self.refine, self.cert_tol = rtol, max_iter, reg, refine, cert_tol
        self.kkt = kkt
        self.ipm_refine = 1  # the primal loop's corrector: one refinement against the regularization
        self.polish_rounds = 3

    @classmethod
    def for_dtype(cls, dtype, *, rtol=None, max_iter=50, kkt="auto") -> "QPInteriorPoint":
        """Defaults: float64 ``rtol = 1e-10``; float32 ``rtol = 1e-5``."""
        if dtype == torch.float64:
            return cls(rtol=1e-10 if rtol is None else rtol, max_iter=max_iter, reg=1e-9, refine=2, cert_tol=1e-8,
                       kkt=kkt)
        return cls(rtol=1e-5 if rtol is None else rtol, max_iter=max_iter, reg=1e-5, refine=5, cert_tol=1e-4, kkt=kkt)

    def __repr__(self):
        return f"QPInteriorPoint(rtol={self.rtol}, max_iter={self.max_iter}, kkt={self.kkt!r})"

    @staticmethod
    def solve_factored(kind, tensors, G, A, r1, r2, r3):
        """Apply the regularized inverse of a :class:`KKTFactor` (``kind``, ``tensors``) — the
        preconditioner a backward pass refines with.  ``G`` as factorized (masked rows)."""
        return kkt_solve_reg(KKTFactor(kind, tuple(tensors)), G, A, r1, r2, r3)

    def _choose_kind(self, Q, n, m, k, delta, scale):
        """``"dual"`` when ``Q`` is well-conditioned positive definite and ``S`` is the smaller system."""
        if self.kkt != "auto":
            return self.kkt, None
        if m + k == 0 or (m + k) ** 3 / 3 >= 2 * m * n * n + n ** 3 / 3:
            return "primal", None
        L, info = torch.linalg.cholesky_ex(Q)
        d = L.diagonal(dim1=-2, dim2=-1)
        # min(diag L)² ≥ λ_min(Q): a cheap screen against a (near-)singular Q; refinement absorbs the rest
        ok = (info == 0).all() & (d.amin(-1) ** 2 > self.reg ** 0.5 * scale).all()
        return ("dual", L) if bool(ok) else ("primal", None)

    def _polish(self, kind, pre, P, Q, G, A, p, h, b, active, delta):
        """Factor and solve the equality-constrained KKT system on ``active`` (see the module docstring)."""
        B, k = p.shape[0], b.shape[-1]
        GM = G * active.unsqueeze(-1)
        winv = active / delta + (1 - active)
        rowmask = torch.cat([active, active.new_ones(B, k)], dim=-1)
        fact = kkt_factor(kind, pre, Q, GM, A, winv, delta, rowmask)
        zp, lp, np_ = kkt_refine(fact, P, GM, A, 1 - active, (-p, active * h, b), self.refine_steps(kind), mask=active)
        return fact, zp, lp, np_

    def refine_steps(self, kind):
        """Refinement steps of a solve with the final factorization: the dual kind regularizes only the
        (2,2) block by ``δ`` and converges in one; the primal kind also shifts ``Q``."""
        return max(1, self.refine - 1) if kind == "dual" else self.refine

    def solve(self, Q, p, G, h, A, b, warm_start: Optional[tuple] = None) -> QPResult:
        """Solve a batch of QPs; see the module docstring.  Returns a :class:`QPResult`.

        ``warm_start``: ``(z, λ, ν)`` (``λ``, ``ν`` may be ``None``) to start the interior
        point from; the slacks and multipliers are moved inside the positive orthant.
        """
        Q = 0.5 * (Q + Q.mT)  # only the symmetric part enters the objective
        B = max(t.shape[0] for t in (Q, p, G, h, A, b))
        n, m, k = p.shape[-1], h.shape[-1], b.shape[-1]
        dt, dev = p.dtype, p.device
        scale = 1 + max(float(t.abs().max()) if t.numel() else 0.0 for t in (Q, G, A))
        delta = torch.tensor(self.reg * scale, dtype=dt, device=dev)
        kind, LQ = self._choose_kind(Q, n, m, k, delta, scale)
        pre = kkt_precompute(kind, Q, G, A, LQ)
        P = _Products.build(Q, G, A)
        pB, hB, bB = p.expand(B, n), h.expand(B, m), b.expand(B, k)
        z = p.new_zeros(B, n)
        s, lam, nu = p.new_zeros(B, m), p.new_zeros(B, m), p.new_zeros(B, k)
        status = torch.full((B,), int(Status.MAX_ITERATIONS), dtype=torch.long, device=dev)
        iters = torch.zeros(B, dtype=torch.long, device=dev)
        res = torch.full((B,), float("inf"), dtype=dt, device=dev)
        if m and kind == "dual":
            z, s, lam, nu, status, iters, res = self._interior_point_dual(P, pB, G, hB, A, bB, pre, delta,
                                                                          warm_start)
        elif m:
            z, s, lam, nu, status, iters, res = self._interior_point(P, pB, G, hB, A, bB, kind, pre, delta,
                                                                     warm_start)
        # The active-set ("polished") solve; for m = 0 it is the whole (direct) solve.  Start from the
        # strongly active constraints (weakly active ones, λᵢ ≈ 0 ≈ sᵢ, are left out), then correct the
        # guess like an active-set method: add the constraints the polished point violates, drop those
        # whose multiplier came out negative, and solve again (at most ``polish_rounds`` times).
        mu = (s * lam).sum(-1, keepdim=True) / max(m, 1)
        active = (lam > torch.maximum(s, 10 * mu.sqrt())).to(dt)
        for round_ in range(self.polish_rounds if m else 1):
            fact, zp, lp, np_ = self._polish(kind, pre, P, Q, G, A, pB, hB, bB, active, delta)
            if not m or round_ == self.polish_rounds - 1:
                break
            Gz = P.forward(zp)[1]
            tol_p = self.rtol * (1 + torch.maximum(_amax(Gz), _amax(hB))).unsqueeze(-1)
            tol_d = self.rtol * (1 + torch.maximum(_amax(lp), _amax(pB))).unsqueeze(-1)
            fix = (active == 0) & (Gz - hB > tol_p)
            drop = (active == 1) & (lp < -tol_d)
            if not bool((fix | drop).any()):  # one sync per round (free on CPU)
                break
            active = torch.where(fix, 1.0, torch.where(drop, 0.0, active)).to(dt)
        lp = lp.clamp(min=0) * active
        sp = (hB - P.forward(zp)[1]).clamp(min=0)
        res_p, (_, _, re, *_) = _kkt_residual(P, pB, hB, bB, zp, sp, lp, np_)
        res_p = torch.where(torch.isfinite(res_p), res_p, torch.full_like(res_p, float("inf")))
        open_ = (status == Status.SUCCESS) | (status == Status.MAX_ITERATIONS)
        if res is None:  # the dual loop defers the full residual of its iterate: needed only where the polish failed
            res = torch.zeros_like(res_p)
            if bool((open_ & ~(res_p <= self.rtol)).any()):
                res, _ = _kkt_residual(P, pB, hB, bB, z, s, lam, nu)
        take = open_ & (res_p <= torch.clamp(res, min=self.rtol))
        z = torch.where(take[:, None], zp, z)
        lam = torch.where(take[:, None], lp, lam)
        nu = torch.where(take[:, None], np_, nu)
        res = torch.where(take, res_p, res)
        # success is decided on the full KKT residual of what is returned, whatever the loop said
        status = torch.where(open_, torch.where(res <= self.rtol, int(Status.SUCCESS), int(Status.MAX_ITERATIONS)),
                             status)
        if not m:  # a direct solve: no certificate, tell the two failures apart by the residuals
            infeasible = _amax(re) > self.rtol * (1 + _amax(bB) + _amax(P.forward(z)[2]))
            status = torch.where(res <= self.rtol, int(Status.SUCCESS),
                                 torch.where(infeasible, int(Status.INFEASIBLE), int(Status.UNBOUNDED)))
        finite = torch.isfinite(z).all(-1) & torch.isfinite(lam).all(-1) & torch.isfinite(nu).all(-1)
        status = torch.where(finite | (status != Status.SUCCESS), status, int(Status.NONFINITE))
        return QPResult(z, lam, nu, status, res, iters, active, fact)

    def _interior_point(self, P, p, G, h, A, b, kind, pre, delta, warm_start):
        B, n = p.shape
        m, k = h.shape[-1], b.shape[-1]
        dt, dev = p.dtype, p.device
        rtol, eps_c = self.rtol, self.cert_tol
        ones = p.new_ones(B, m)
        if warm_start is None:
            # Start (as CVXOPT): solve the KKT system with W = I, i.e. the least-squares-slack
            # problem min ½zᵀQz + pᵀz + ½‖h − Gz‖², Az = b; then s = h − Gz, λ = −s, shifted inside.
            f0 = kkt_factor(kind, pre, P.KA[:, :n], G, A, ones, delta)
            z, lam, nu = kkt_solve_reg(f0, G, A, -p, h, b)
            s = -lam
        else:
            z = warm_start[0].expand(B, n).clone()
            s = h - P.forward(z)[1]
            lam = warm_start[1].expand(B, m).clone() if warm_start[1] is not None else ones.clone()
            nu = warm_start[2].expand(B, k).clone() if warm_start[2] is not None else p.new_zeros(B, k)
        s, lam = _initial_shift(s, lam)
        status = torch.full((B,), int(Status.MAX_ITERATIONS), dtype=torch.long, device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        iters = torch.zeros(B, dtype=torch.long, device=dev)
        res = torch.full((B,), float("inf"), dtype=dt, device=dev)
        best = res.clone()
        stall = torch.zeros(B, dtype=torch.long, device=dev)
        check_every = 1 if dev.type == "cpu" else 4  # a host sync on CPU costs nothing
        for it in range(self.max_iter + 1):
            r, (rd, rp, re, Qz, Gz, Az, GAy) = _kkt_residual(P, p, h, b, z, s, lam, nu)
            res = torch.where(done, res, r)
            # certificates (see the module docstring)
            c = (h * lam).sum(-1) + (b * nu).sum(-1)
            infeas = (c < 0) & (_amax(GAy) <= eps_c * (-c))
            pz = -(p * z).sum(-1)
            viol = torch.stack([_amax(Qz), _amax(Az), Gz.clamp(min=0).amax(-1)]).amax(0)
            unbnd = (pz > 0) & (viol <= eps_c * pz)
            status, done, stall, best = _update_status(r, infeas, unbnd, rtol, status, done, stall, best)
            if it == self.max_iter or (it % check_every == 0 and bool(done.all())):
                break
            iters = iters + (~done).long()
            # --- Mehrotra predictor-corrector step, all elements at once ---
            mu = (s * lam).sum(-1, keepdim=True) / m
            w = s / lam
            # the factorization regularizes the (2,2) block to −(W + δI) (bounded condition number);
            # the corrector's refinement is against the exact W
            f = kkt_factor(kind, pre, P.KA[:, :n], G, A, lam / (s + delta * lam), delta)
            # affine (predictor): complementarity target 0, r_c = s∘λ, so r₂ = −r_p + r_c/λ = −r_p + s
            dz, dl, dn = kkt_solve_reg(f, G, A, -rd, -rp + s, -re)
            ds = -s - w * dl
            a_aff = torch.minimum(_max_step(s, ds), _max_step(lam, dl)).clamp(max=1.0).unsqueeze(-1)
            mu_aff = ((s + a_aff * ds) * (lam + a_aff * dl)).sum(-1, keepdim=True) / m
            sigma = (mu_aff / mu).clamp(0, 1) ** 3
            # corrector: r_c = s∘λ + ds_aff∘dλ_aff − σμ; then ds = −(r_c + s∘dλ)/λ
            rc = s * lam + ds * dl - sigma * mu
            dz, dl, dn = kkt_refine(f, P, G, A, w, (-rd, -rp + rc / lam, -re), self.ipm_refine)
            ds = -(rc + s * dl) / lam
            # fraction to the boundary → 1 as μ → 0, so the end game is not capped at 100× per step
            eta = 1 - mu.squeeze(-1).sqrt().clamp(1e-4, 1e-2)
            alpha = (eta * torch.minimum(_max_step(s, ds), _max_step(lam, dl))).clamp(max=1.0)
            alpha = torch.where(done, torch.zeros_like(alpha), alpha).unsqueeze(-1)
            z, s, lam, nu = z + alpha * dz, s + alpha * ds, lam + alpha * dl, nu + alpha * dn
        return z, s, lam, nu, status, iters, res

    def _interior_point_dual(self, P, p, G, h, A, b, pre, delta, warm_start):
        """The same Mehrotra iteration with ``z`` eliminated (``Q`` positive definite).

        ``z(y) = −Q⁻¹(p + Cᵀy)`` satisfies stationarity by construction, so every quantity
        lives in the ``(m + k)``-dimensional dual space ``y = (λ, ν)``:
        ``Cz = −c₀ − Ky`` with ``K = C Q⁻¹ Cᵀ`` and ``c₀ = C Q⁻¹ p``, and the Newton step is
        ``(K + diag(W, δ)) dy = (r_p − r_c/λ, r_e)``, ``ds = −(r_c + s∘dλ)/λ`` — one Cholesky
        of size ``m`` (the equalities are eliminated once) and no ``n``-dimensional product per
        iteration.  Converged elements
        leave the working batch once a quarter of it is done (one gather, no sync on CPU).
        """
        B, n = p.shape
        m, k = h.shape[-1], b.shape[-1]
        dt, dev = p.dtype, p.device
        LQ, Wc, K = pre
        p0, h0, b0 = p, h, b
        Lp = _lsolve(LQ, p)  # LQ⁻¹ p
        c0 = _rmv(Wc, Lp)  # C Q⁻¹ p
        pQp = (Lp * Lp).sum(-1)
        hb = torch.cat([h, b], dim=-1)
        # ‖Cᵀy‖₂² ≤ ‖Q‖₂ · yᵀKy: a certificate test without an n-dimensional product
        qnorm = p.new_tensor(float(torch.linalg.matrix_norm(P.KA[:, :n]).amax()))  # ‖Q‖_F ≥ ‖Q‖₂

        # The equality block is eliminated once: with K = [[K_GG, K_GA], [K_AG, K_AA]], L_A L_Aᵀ = K_AA + δI
        # and X = L_A⁻¹ K_AG, the Newton matrix K + diag(W, δI) is [[M + W, ·], [·, K_AA + δI]] with the
        # fixed Schur complement M = K_GG − XᵀX: each iteration factors M + W (size m, not m + k).
        if k:
            LA = torch.linalg.cholesky_ex(K[:, m:, m:] + delta * torch.eye(k, dtype=dt, device=dev))[0]
            X = torch.linalg.solve_triangular(LA, K[:, m:, :m], upper=False)
            MG = K[:, :m, :m] - X.mT @ X
        else:
            LA, X, MG = None, None, K

        def factor(MG, w):
            S = MG.expand(w.shape[0], m, m).clone()
            S.diagonal(dim1=-2, dim2=-1).add_(w)
            return torch.linalg.cholesky_ex(S)[0]

        def solve(LG, LA, X, r):
            """``(K + diag(W, δI))⁻¹ r`` by the block elimination above."""
            if not k:
                return _tri_solve(LG, r.unsqueeze(-1)).squeeze(-1)
            t = _lsolve(LA, r[:, m:])
            uG = _tri_solve(LG, (r[:, :m] - _rmv(X, t)).unsqueeze(-1)).squeeze(-1)
            return torch.cat([uG, _lsolve(LA, t - _mv(X, uG), adjoint=True)], dim=-1)

        if warm_start is None:
            # the W = μ₀I system, then s = −μ₀λ, both shifted inside.  μ₀ = max(1, mean diag K/10)
            # matches the weight to the scale of K (multipliers → constraint values): on the OptNet
            # instances it saves ~15% of the iterations over μ₀ = 1 (CVXOPT's choice, the primal loop's)
            mu0 = (0.1 * K.diagonal(dim1=-2, dim2=-1)[..., :m].mean(-1, keepdim=True)).clamp(min=1).expand(B, m)
            y = solve(factor(MG, mu0), LA, X, -c0 - hb)
            s = -mu0 * y[:, :m]
        else:
            z0 = warm_start[0].expand(B, n)
            s = h - _mv(G, z0)
            lam0 = warm_start[1].expand(B, m) if warm_start[1] is not None else p.new_ones(B, m)
            nu0 = warm_start[2].expand(B, k) if warm_start[2] is not None else p.new_zeros(B, k)
            y = torch.cat([lam0, nu0], dim=-1)
        s, lam = _initial_shift(s, y[:, :m])
        y = torch.cat([lam, y[:, m:]], dim=-1)
        out_y, out_s = y.clone(), s.clone()
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
            out_status.index_copy_(0, idx, status)
            out_iters.index_copy_(0, idx, iters)

        for it in range(self.max_iter + 1):
            lam = y[:, :m]
            Ky = _mv(Kw, y)
            g = -c0 - Ky  # C z(y)
            rp, re = g[:, :m] + s - h, g[:, m:] - b
            res_p = torch.maximum(_amax(rp), _amax(re)) / (1 + torch.stack([_amax(g), _amax(s), _amax(hb)]).amax(0))
            yKy = (y * Ky).sum(-1)
            obj = 0.5 * (yKy - pQp)
            r = torch.maximum(res_p, (s * lam).sum(-1).abs() / (1 + obj.abs()))
            c = (hb * y).sum(-1)
            infeas = (c < 0) & ((qnorm * yKy.clamp(min=0)).sqrt() <= self.cert_tol * (-c))
            status, done, stall, best = _update_status(r, infeas, torch.zeros_like(done), self.rtol, status, done,
                                                       stall, best)
            if it == self.max_iter or (it % check_every == 0 and bool(done.all())):
                break
            nb = idx.numel()
            if it % check_every == 0 and nb >= 16 and int(done.sum()) * 4 >= nb:
                write_back()
                keep = torch.nonzero(~done).squeeze(-1)
                idx = idx[keep]
                y, s, c0, pQp, h, b, hb = (t[keep] for t in (y, s, c0, pQp, h, b, hb))
                status, iters, done, best, stall = (t[keep] for t in (status, iters, done, best, stall))
                Kw, MG, LA, X = (t[keep] if t is not None and t.shape[0] > 1 else t for t in (Kw, MG, LA, X))
                lam, rp, re = y[:, :m], rp[keep], re[keep]
            iters = iters + (~done).long()
            mu = (s * lam).sum(-1, keepdim=True) / m
            w = s / lam
            LS = factor(MG, w)
            # affine: r_c = s∘λ
            dy = solve(LS, LA, X, torch.cat([rp - s, re], dim=-1))
            dl = dy[:, :m]
            ds = -s - w * dl
            a_aff = torch.minimum(_max_step(s, ds), _max_step(lam, dl)).clamp(max=1.0).unsqueeze(-1)
            mu_aff = ((s + a_aff * ds) * (lam + a_aff * dl)).sum(-1, keepdim=True) / m
            sigma = (mu_aff / mu).clamp(0, 1) ** 3
            # corrector: r_c = s∘λ + ds_aff∘dλ_aff − σμ
            rc = s * lam + ds * dl - sigma * mu
            dy = solve(LS, LA, X, torch.cat([rp - rc / lam, re], dim=-1))
            dl = dy[:, :m]
            ds = -(rc + s * dl) / lam
            eta = 1 - mu.squeeze(-1).sqrt().clamp(1e-4, 1e-2)
            alpha = (eta * torch.minimum(_max_step(s, ds), _max_step(lam, dl))).clamp(max=1.0)
            alpha = torch.where(done, torch.zeros_like(alpha), alpha).unsqueeze(-1)
            y, s = y + alpha * dy, s + alpha * ds
        write_back()
        y, s = out_y, out_s
        z = -_lsolve(LQ, _lsolve(LQ, p0) + _mv(Wc, y), adjoint=True)
        lam, nu = y[:, :m], y[:, m:]
        # the full residual (with Q, G, A), not the dual-space one, is computed by the caller if needed
        return z, s, lam, nu, out_status, out_iters, None
