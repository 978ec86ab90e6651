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
* ``"primal"`` (any ``Q ⪰ 0``, e.g. an LP): ``H̃ = Q + δI + Gᵀ(W + δI)⁻¹G + AᵀA/δ`` (size ``n``;
  the equalities eliminated first, ``dν = (A dz − r₃)/δ``, which keeps ``H̃`` within ``cond ~ 1/δ``
  where ``H`` alone reaches ``1/δ²`` at the end of an LP); the regularization ``δ`` (relative
  ``10⁻⁹``) makes ``Q = 0`` and redundant equalities need no special case — the *system* is regularized, not the
  problem — and one step of iterative refinement against the exact matrix removes it.

Elements leave the working batch as they converge (a gather once a quarter of it is done,
decided on the convergence test's one host read: every iteration on CPU, every fourth on CUDA).

**Starts and LPs.**  A cold start solves the system with ``W = I`` (primal) or ``W = μ₀I`` (dual) and
balances ``(s, λ)`` to ``s/λ = 1`` or ``μ₀`` (:func:`~implicitdiff.solvers.qp_steps.balanced_start`), so
the first iteration reuses that factorization.  An LP (``Q = 0``) keeps one shared zero ``Q`` for the
products and passes ``Q = None`` to the factorizations (no ``Q`` term to add to ``GᵀWG``).

**Early stop, then the active set.**  The interior point stops at a loose tolerance
(``early_rtol = 10⁻³``; the primal loop at ``rtol``) and the active set is read off its last
step by Tapia's indicator — constraint ``i`` is active when its slack falls faster than its
multiplier, ``s⁺ᵢ/sᵢ < λ⁺ᵢ/λᵢ`` (scale-free: a small multiplier of an active constraint does
not hide it, as a threshold on ``λᵢ`` would; ``λᵢ > sᵢ`` before any step, and in the primal
loop).  The *active-set* system

    [ Q    G_𝒜ᵀ  Aᵀ ] [z ]   [−p ]
    [ G_𝒜  0     0  ] [λ𝒜] = [h𝒜]        (inactive: λᵢ = 0)
    [ A    0     0  ] [ν ]   [ b ]

is then factorized (the dual kind factors only the rows of its active constraints, gathered and
padded to the largest active set of the batch, with the equality block eliminated once) and
solved by refinement ("polishing", as OSQP does), which gives the
solution to rounding when the guess is right.  The guess is corrected as in an active-set
method, for the elements that need it only: constraints the polished point violates are
added, those whose multiplier comes out negative *or zero* (weakly active, ``λᵢ = 0 = sᵢ``:
counted inactive, so the gradient is the one-sided derivative that relaxes them) dropped,
and the system solved again (≤ 3 rounds).  The polished solution replaces the interior-point
one when its KKT residual is no larger; an element whose polish still misses ``rtol``
resumes the interior point from where it stopped, to ``rtol``, and is polished again.  On
the OptNet instances this saves a quarter of the factorizations of running to ``rtol``.  The
backward pass reuses the final factorization: it is the exact Jacobian of the KKT conditions
on the active set.

**Memory passes** (the batches outgrow the caches): an exactly symmetric ``Q`` (one comparison pass) is
used as is, not symmetrized (two passes); the primal loop builds and factors every iteration's ``H̃`` in one
scratch buffer (:func:`~implicitdiff.linalg.kkt.kkt_factor`'s ``out``; fresh memory costs page faults).

**Screening** (:mod:`~implicitdiff.solvers.qp_screen`) runs first: an element with non-finite
data gets ``NONFINITE`` and one whose ``Q`` is not positive semidefinite on the null space of
``A`` (beyond ``psd_tol``) gets ``NONCONVEX``; neither is solved, and neither can affect the
others.  The tolerances are relative: the layer hands the solver equilibrated data (the scales
from :func:`implicitdiff.layers.qp.equilibrate`, applied by :class:`~implicitdiff.implicit.qp.QPFn`).

**Statuses** per element: ``SUCCESS`` when the relative KKT residual (stationarity,
feasibility, complementarity) is ``≤ rtol``; ``INFEASIBLE`` when the iterate is a
Farkas certificate ``λ ≥ 0``, ``‖Gᵀλ + Aᵀν‖∞ ≤ ε (−hᵀλ − bᵀν)``; ``UNBOUNDED`` when
``z`` or the step ``dz`` is a recession certificate ``‖Qx‖∞, ‖Ax‖∞, max(Gx)₊ ≤ ε (−pᵀx)``
(both never fire on a problem with a primal-dual solution of 1-norm ``< 1/ε``);
``NONFINITE``; ``NONCONVEX``; ``MAX_ITERATIONS`` (also when the residual stagnates near the tolerance).
The status is decided on the full KKT residual of the returned point.  Equality-only
problems take one direct solve (no iterations).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .._core.status import Status
from ..linalg.symmetric import symmetric_part
from .qp_dual import dual_z, interior_point_dual
from .qp_screen import screen
from ..linalg.kkt import (ActiveSetKKT, KKTProducts, kkt_factor, kkt_precompute, kkt_refine, kkt_solve_reg,
                          put_rows)
from .qp_steps import (QPResult, amax, balanced_start, initial_shift, kkt_residual, max_step, merge, take,
                       update_status)

__all__ = ["QPInteriorPoint", "QPResult"]


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
                 kkt: str = "auto", psd_tol: float = 1e-8):
        self.rtol, self.max_iter, self.reg, self.refine, self.cert_tol = rtol, max_iter, reg, refine, cert_tol
        self.kkt, self.psd_tol = kkt, psd_tol
        self.ipm_refine = 0  # refinements of the primal loop's corrector against the regularization
        self.polish_rounds = 3
        self.early_rtol = 1e-3  # where the dual loop stops to polish (see solve)

    @classmethod
    def for_dtype(cls, dtype, *, rtol=None, max_iter=50, kkt="auto", psd_tol=None) -> "QPInteriorPoint":
        """Defaults: float64 ``rtol = 1e-10``, ``psd_tol = 1e-8``; float32 ``rtol = 1e-5``, ``psd_tol = 1e-5``."""
        if dtype == torch.float64:
            return cls(rtol=1e-10 if rtol is None else rtol, max_iter=max_iter, reg=1e-9, refine=2, cert_tol=1e-8,
                       kkt=kkt, psd_tol=1e-8 if psd_tol is None else psd_tol)
        return cls(rtol=1e-5 if rtol is None else rtol, max_iter=max_iter, reg=1e-5, refine=5, cert_tol=1e-4, kkt=kkt,
                   psd_tol=1e-5 if psd_tol is None else psd_tol)

    def __repr__(self):
        return f"QPInteriorPoint(rtol={self.rtol}, max_iter={self.max_iter}, kkt={self.kkt!r})"

    def _choose_kind(self, Q, n, m, k, delta, scale, L=None):
        """``"dual"`` when ``Q`` is well-conditioned positive definite and ``S`` is the smaller system
        (``L``: the Cholesky of ``Q`` when the screening found it positive definite)."""
        if self.kkt != "auto":
            return self.kkt, None
        if m + k == 0 or (m + k) ** 3 / 3 >= 2 * m * n * n + n ** 3 / 3:
            return "primal", None
        if L is None:
            return "primal", None
        info = torch.zeros(1, dtype=torch.int32, device=L.device)
        d = L.diagonal(dim1=-2, dim2=-1)
        # min(diag L)² ≥ λ_min(Q): a cheap screen against a (near-)singular Q; refinement absorbs the rest
        ok = (info == 0).all() & (d.amin(-1) ** 2 > self.reg ** 0.5 * scale).all()
        return ("dual", L) if bool(ok) else ("primal", None)

    def _polish(self, kind, pre, P, Q, G, A, p, h, b, active, delta):
        """Factor and solve the equality-constrained KKT system on ``active`` (see the module docstring)."""
        # the dual kind and a bound-row split (pre) mask the rows themselves (rowmask): G is read for its shape
        GM = G if kind == "dual" or pre else G * active.unsqueeze(-1)
        winv = active / delta + (1 - active)
        fact = kkt_factor(kind, pre, Q, GM, A, winv, delta, active)
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
        # only the symmetric part enters the objective; an exactly symmetric Q (the common case: one
        # comparison pass) is used as is, never written to (symmetric_part would return it exactly)
        Q = Q if torch.equal(Q, Q.mT) else symmetric_part(Q)
        screened = screen(Q, p, G, h, A, b, self.psd_tol)
        out = self._solve(*screened.data, screened.LQ, screened.scale, warm_start)
        if screened.rho is not None:  # the backward solves with the convexified matrix that was factored
            out = out._replace(kkt=dataclasses.replace(out.kkt, rho=screened.rho))
        if screened.status is None:
            return out
        bad = screened.status >= 0
        return out._replace(status=torch.where(bad, screened.status, out.status),
                            residual=torch.where(bad, torch.full_like(out.residual, float("inf")), out.residual),
                            iterations=torch.where(bad, 0, out.iterations))

    def _solve(self, Q, p, G, h, A, b, LQ, scale, warm_start) -> QPResult:
        """``scale``: 1 + the largest |entry| of ``Q``, ``G``, ``A`` (the screen's)."""
        B = max(t.shape[0] for t in (Q, p, G, h, A, b))
        n, m, k = p.shape[-1], h.shape[-1], b.shape[-1]
        dt, dev = p.dtype, p.device
        delta = torch.tensor(self.reg * scale, dtype=dt, device=dev)
        kind, LQ = self._choose_kind(Q, n, m, k, delta, scale, LQ)
        lp = kind == "primal" and not bool(Q.any())
        if lp:
            Q = Q[:1]  # an LP: one shared zero Q (its products are one matrix product, not a batch of them)
        Qf = None if lp else Q  # what the factorizations add (an LP's H̃ has no Q term to add)
        pre = kkt_precompute(kind, Q, G, A, LQ, delta)
        P = KKTProducts.build(Q, G, A, pre if kind == "primal" else ())
        pB, hB, bB = p.expand(B, n), h.expand(B, m), b.expand(B, k)
        if not m:  # equality-only: one direct solve
            loop = (p.new_zeros(B, n), p.new_zeros(B, 0), p.new_zeros(B, 0), p.new_zeros(B, k),
                    torch.full((B,), int(Status.MAX_ITERATIONS), dtype=torch.long, device=dev),
                    torch.zeros(B, dtype=torch.long, device=dev), torch.full((B,), float("inf"), dtype=dt, device=dev))
            guess = p.new_zeros(B, 0, dtype=torch.bool)
            return self._finish(kind, pre, P, Qf, G, A, pB, hB, bB, delta, loop + (guess,))
        if kind == "primal":
            # (stopping early and polishing saves nothing here: on LPs the guess λ > s of a loose iterate is
            # wrong too often)
            loop = self._interior_point(P, Qf, pB, G, hB, A, bB, kind, pre, delta, warm_start, rtol=self.rtol)
            return self._finish(kind, pre, P, Qf, G, A, pB, hB, bB, delta, loop + (loop[2] > loop[1],))  # λ > s
        # The dual loop stops early, at ``early_rtol``: the polish on the active set it identifies then
        # gives the solution to rounding (saving the last interior-point iterations); elements whose
        # polish fails to reach ``rtol`` (a wrong active set) resume the interior point to ``rtol``.
        loose = max(self.rtol, self.early_rtol)
        loop = self._interior_point_dual(P, pB, G, hB, A, bB, pre, delta, warm_start, rtol=loose)
        out = self._finish(kind, pre, P, Q, G, A, pB, hB, bB, delta, loop)
        if loose <= self.rtol:
            return out
        retry = (out.status == Status.MAX_ITERATIONS) & (loop[4] == Status.SUCCESS)
        if not bool(retry.any()):  # one sync
            return out
        idx = torch.nonzero(retry).squeeze(-1)
        Ps, ps, hs, bs = (take(t, idx) for t in (P, pB, hB, bB))
        Qs, Gs, As = Ps.Q, Ps.G, Ps.A  # P holds the same Q, G, A: gathered once
        pres = tuple(take(t, idx) for t in pre)
        s, lam, nu = (loop[i][idx] for i in (1, 2, 3))
        budget = self.max_iter - int(out.iterations[idx].max())  # no element goes past max_iter in all
        loop2 = self._interior_point_dual(Ps, ps, Gs, hs, As, bs, pres, delta, None, rtol=self.rtol,
                                          init=(torch.cat([lam, nu], dim=-1), s), max_iter=budget)
        sub = self._finish(kind, pres, Ps, Qs, Gs, As, ps, hs, bs, delta, loop2)
        sub = sub._replace(iterations=sub.iterations + out.iterations[idx])
        return merge(out, sub, idx)

    def _finish(self, kind, pre, P, Q, G, A, pB, hB, bB, delta, loop) -> QPResult:
        """Polish the interior point's result on its active set and decide the statuses (``Q``: what the
        factorizations add, ``None`` for an LP).

        The active-set ("polished") solve; for ``m = 0`` it is the whole (direct) solve.  Start from
        the strongly active constraints (weakly active ones, ``λᵢ ≈ 0 ≈ sᵢ``, are left out), then
        correct the guess like an active-set method: add the constraints the polished point
        violates, drop those whose multiplier came out negative, and solve again — only the elements
        whose guess changed, at most ``polish_rounds`` times.
        """
        z, s, lam, nu, status, iters, res, guess = loop
        m, dt = hB.shape[-1], pB.dtype
        active = guess.to(dt)
        fact, zp, lp, np_ = self._polish(kind, pre, P, Q, G, A, pB, hB, bB, active, delta)
        Gz = P.gx(zp)  # kept current: only the rows of the elements solved again are recomputed
        for _ in range(1, self.polish_rounds if m else 1):
            tol_p = self.rtol * (1 + torch.maximum(amax(Gz), amax(hB))).unsqueeze(-1)
            tol_d = self.rtol * (1 + torch.maximum(amax(lp), amax(pB))).unsqueeze(-1)
            fix = (active == 0) & (Gz - hB > tol_p)
            drop = (active == 1) & (lp < tol_d)  # a negative or (weakly active) zero multiplier
            redo = (fix | drop).any(-1)
            if not bool(redo.any()):  # one sync per round (free on CPU)
                break
            active = torch.where(fix, 1.0, torch.where(drop, 0.0, active)).to(dt)
            idx = torch.nonzero(redo).squeeze(-1)
            Ps = take(P, idx)
            Qs = None if Q is None else Ps.Q
            pres = Ps.rows if kind == "primal" else tuple(take(t, idx) for t in pre)  # (P holds the split)
            f2, z2, l2, n2 = self._polish(kind, pres, Ps, Qs, Ps.G, Ps.A,
                                          *(take(t, idx) for t in (pB, hB, bB)), active[idx], delta)
            zp, lp, np_ = put_rows(zp, z2, idx), put_rows(lp, l2, idx), put_rows(np_, n2, idx)
            Gz = put_rows(Gz, Ps.gx(z2), idx)
            fact = fact.put(f2, idx)
        lp = lp.clamp(min=0) * active
        sp = (hB - Gz).clamp(min=0)
        res_p, (_, _, re, *_) = kkt_residual(P, pB, hB, bB, zp, sp, lp, np_, Gz=Gz)
        res_p = torch.where(torch.isfinite(res_p), res_p, torch.full_like(res_p, float("inf")))
        open_ = (status == Status.SUCCESS) | (status == Status.MAX_ITERATIONS)
        # the dual loop defers z = z(y) and the full residual of its iterate: needed only where the polish failed
        if res is None:
            res = torch.zeros_like(res_p)
            if bool((open_ & ~(res_p <= self.rtol)).any()):
                z = dual_z(pre, pB, lam, nu)
                res, _ = kkt_residual(P, pB, hB, bB, z, s, lam, nu)
        polished = open_ & (res_p <= torch.clamp(res, min=self.rtol))
        if z is None:
            z = zp if bool(polished.all()) else dual_z(pre, pB, lam, nu)
        z = torch.where(polished[:, None], zp, z)
        lam = torch.where(polished[:, None], lp, lam)
        nu = torch.where(polished[:, None], np_, nu)
        res = torch.where(polished, res_p, res)
        # success is decided on the full KKT residual of what is returned, whatever the loop said
        status = torch.where(open_, torch.where(res <= self.rtol, int(Status.SUCCESS), int(Status.MAX_ITERATIONS)),
                             status)
        if not m:  # a direct solve: no certificate, tell the two failures apart by the residuals
            infeasible = amax(re) > self.rtol * (1 + amax(bB) + amax(P.forward(z)[2]))
            status = torch.where(res <= self.rtol, int(Status.SUCCESS),
                                 torch.where(infeasible, int(Status.INFEASIBLE), int(Status.UNBOUNDED)))
        finite = torch.isfinite(z).all(-1) & torch.isfinite(lam).all(-1) & torch.isfinite(nu).all(-1)
        status = torch.where(finite | (status != Status.SUCCESS), status, int(Status.NONFINITE))
        return QPResult(z, lam, nu, status, res, iters, ActiveSetKKT(active, fact, self.refine_steps(kind)))

    def _interior_point(self, P, Q, p, G, h, A, b, kind, pre, delta, warm_start, rtol):
        """The primal loop (``Q``: what the factorizations add, ``None`` for an LP; ``P`` multiplies)."""
        B, n = p.shape
        m, k = h.shape[-1], b.shape[-1]
        dt, dev = p.dtype, p.device
        eps_c = self.cert_tol
        ones = p.new_ones(B, m)
        # every iteration's H̃ is built and factored here (kkt_factor's out: the primal kind only)
        scratch = p.new_empty(B, n, n) if kind == "primal" else None
        first = None  # the factorization for the first iteration, when the start already made it
        if warm_start is None:
            # Start (as CVXOPT): solve the KKT system with W = I, i.e. the least-squares-slack
            # problem min ½zᵀQz + pᵀz + ½‖h − Gz‖², Az = b; then s = h − Gz, λ = −s, shifted inside and
            # balanced to s = λ, so the first iteration reuses this factorization (LP, n = 100, m = 250,
            # B = 128, seeds 0-3, and n = 50: 118 factorizations instead of 128)
            first = kkt_factor(kind, pre, Q, G, A, ones, delta, out=scratch)
            z, lam, nu = kkt_solve_reg(first, G, A, -p, h, b)
            s, lam = balanced_start(-lam, lam, 1.0)
        else:
            z = warm_start[0].expand(B, n).clone()
            s = h - P.gx(z)
            lam = warm_start[1].expand(B, m).clone() if warm_start[1] is not None else ones.clone()
            nu = warm_start[2].expand(B, k).clone() if warm_start[2] is not None else p.new_zeros(B, k)
            s, lam = initial_shift(s, lam)
        status = torch.full((B,), int(Status.MAX_ITERATIONS), dtype=torch.long, device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        iters = torch.zeros(B, dtype=torch.long, device=dev)
        res = torch.full((B,), float("inf"), dtype=dt, device=dev)
        best = res.clone()
        stall = torch.zeros(B, dtype=torch.long, device=dev)
        check_every = 1 if dev.type == "cpu" else 4  # a host sync on CPU costs nothing
        # converged elements leave the working batch once a quarter of it is done (as in the dual loop):
        # every per-element tensor below has idx.numel() rows, outs holds the full batch
        idx, outs = torch.arange(B, device=dev), None

        def write_back():
            for o, t in zip(outs, (z, s, lam, nu, status, iters, res)):
                o.index_copy_(0, idx, t)
        for it in range(self.max_iter + 1):
            r, (rd, rp, re, Qz, Gz, Az, GAy) = kkt_residual(P, p, h, b, z, s, lam, nu)
            res = torch.where(done, res, r)
            # certificates (see the module docstring)
            c = (h * lam).sum(-1) + (b * nu).sum(-1)
            infeas = (c < 0) & (amax(GAy) <= eps_c * (-c))
            pz = -(p * z).sum(-1)
            viol = torch.stack([amax(Qz), amax(Az), Gz.clamp(min=0).amax(-1)]).amax(0)
            unbnd = (pz > 0) & (viol <= eps_c * pz)
            status, done, stall, best = update_status(r, infeas, unbnd, rtol, status, done, stall, best,
                                                      floor=self.rtol)
            if it == self.max_iter:
                break
            if it % check_every == 0:
                nb, ndone = idx.numel(), int(done.sum())  # one host read for both decisions
                if ndone == nb:
                    break
                if nb >= 16 and ndone * 4 >= nb:
                    if outs is None:
                        outs = [t.clone() for t in (z, s, lam, nu, status, iters, res)]
                    else:
                        write_back()
                    keep = torch.nonzero(~done).squeeze(-1)
                    idx = idx[keep]
                    z, s, lam, nu, status, iters, res, best, stall, done, p, h, b, rd, rp, re = (
                        t[keep] for t in (z, s, lam, nu, status, iters, res, best, stall, done, p, h, b, rd, rp, re))
                    P = take(P, keep)
                    G, A, Q = P.G, P.A, None if Q is None else P.Q  # the same tensors: gathered once
                    pre = P.rows if kind == "primal" else tuple(take(t, keep) for t in pre)  # (P holds the split)
                    first = None  # (a shrink before the first step: factor the remaining elements anew)
            iters = iters + (~done).long()
            # --- Mehrotra predictor-corrector step, all elements at once ---
            mu = (s * lam).sum(-1, keepdim=True) / m
            w = s / lam
            # the factorization regularizes the (2,2) block to −(W + δI) (bounded condition number);
            # the corrector's refinement is against the exact W
            buf = None if scratch is None else scratch[: p.shape[0]]
            f = kkt_factor(kind, pre, Q, G, A, lam / (s + delta * lam), delta, out=buf) if first is None else first
            first = None
            # affine (predictor): complementarity target 0, r_c = s∘λ, so r₂ = −r_p + r_c/λ = −r_p + s
            dz, dl, dn = kkt_solve_reg(f, G, A, -rd, -rp + s, -re)
            ds = -s - w * dl
            a_aff = torch.minimum(max_step(s, ds), max_step(lam, dl)).clamp(max=1.0).unsqueeze(-1)
            mu_aff = ((s + a_aff * ds) * (lam + a_aff * dl)).sum(-1, keepdim=True) / m
            sigma = (mu_aff / mu).clamp(0, 1) ** 3
            # corrector: r_c = s∘λ + ds_aff∘dλ_aff − σμ; then ds = −(r_c + s∘dλ)/λ
            rc = s * lam + ds * dl - sigma * mu
            dz, dl, dn = kkt_refine(f, P, G, A, w, (-rd, -rp + rc / lam, -re), self.ipm_refine)
            ds = -(rc + s * dl) / lam
            # fraction to the boundary → 1 as μ → 0, so the end game is not capped at 100× per step
            eta = 1 - mu.squeeze(-1).sqrt().clamp(1e-4, 1e-2)
            alpha = (eta * torch.minimum(max_step(s, ds), max_step(lam, dl))).clamp(max=1.0)
            # a converged element keeps its iterate: its step (factored with ever larger weights) may not
            # even be finite, and 0 · NaN would poison it.  An element whose step is not finite (the
            # regularized factorization broke down near the solution) stops where it is, as a stall:
            # the active-set polish finishes it and its status is decided on the polished residual
            bad = ~(torch.isfinite(alpha) & torch.isfinite(dz).all(-1) & torch.isfinite(dl).all(-1)
                    & torch.isfinite(ds).all(-1) & torch.isfinite(dn).all(-1)) & ~done
            status = torch.where(bad, int(Status.MAX_ITERATIONS), status)
            done = done | bad
            alpha = alpha.unsqueeze(-1)
            keep = done.unsqueeze(-1)
            z, s = torch.where(keep, z, z + alpha * dz), torch.where(keep, s, s + alpha * ds)
            lam, nu = torch.where(keep, lam, lam + alpha * dl), torch.where(keep, nu, nu + alpha * dn)
        if outs is None:
            return z, s, lam, nu, status, iters, res
        write_back()
        return tuple(outs)

    _interior_point_dual = interior_point_dual
