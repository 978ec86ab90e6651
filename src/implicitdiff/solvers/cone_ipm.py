r"""A batched primal-dual interior point for cone programs on the homogeneous self-dual embedding.

Solves ``min cᵀx  s.t.  Ax + s = b,  s ∈ K`` and its dual ``max −bᵀy  s.t.  Aᵀy + c = 0,
y ∈ K*`` for a batch at once (``A`` ``(B, m, n)``, or ``(m, n)`` shared by the batch), with ``K``
a product of zero, nonnegative, second-order, PSD and exponential cones (:mod:`~implicitdiff.linalg.cone_spec`).

The embedding (Ye, Todd, Mizuno; as in ECOS and Clarabel) adds ``τ, κ ≥ 0``:

    Aᵀy + cτ = 0,   Ax + s − bτ = 0,   cᵀx + bᵀy + κ = 0,   s ∈ K, y ∈ K*, τκ = 0 = sᵀy

and is always solvable: ``τ > 0`` gives the solution ``(x, y, s)/τ``; ``κ > 0`` a certificate
(``bᵀy < 0`` with ``Aᵀy = 0``: primal infeasible; ``cᵀx < 0`` with ``Ax + s = 0``: unbounded).

Each iteration is Mehrotra's predictor–corrector.  A Newton step solves

    [0  Aᵀ] [Δx]   [r₁]          Δs = −d_s − H Δy   (per cone, see cone_symmetric / cone_exp)
    [A −H ] [Δy] = [r₂] − Δτ [c; −b],   Δκ = −(d_κ + κΔτ)/τ

with ``H = WᵀW`` the block-diagonal scaling (zero on the zero cone's rows).  The cone rows
are eliminated *in the scaled frame* (``Δỹ = WΔy_c = W⁻ᵀ(A_cΔx) − W⁻ᵀr₂``), leaving the ``(n + z)``
system ``[[N, A_zᵀ], [A_z, 0]]`` with the normal matrix ``N = A_cᵀH⁻¹A_c`` — one batched
factorization per iteration (Cholesky without a zero cone, else LU; a ``eps^¾`` shift) used for
three solves (the ``Δτ`` column, the predictor, the corrector).  ``N`` is formed per cone by
:class:`~.cone_gram.NormalMatrix`: structured for large second-order cones (``A_kᵀA_k`` once per
solve, a rank-one update per block and iteration), else ``(W⁻ᵀA_k)ᵀ(W⁻ᵀA_k)`` from the cone's
``winv_t`` — **the seam for a cone**: a cone class gives ``unit, scale, winv_t, winv, w_t, scaled,
rhs, step`` (``cone_symmetric``, ``cone_exp``; ``winv`` and ``w_t`` broadcast the state over a
leading column dimension; optionally ``step_scaled``, the step's test on the predictor's scaled
directions, which the loop computes once for that test and Mehrotra's corrector) and gets the
generic normal-matrix term; a structured term is optional and lives in ``cone_gram``.  Where ``A`` has zeros shared by the batch
(cvxpy's canonical programs), groups of small blocks are formed from their own columns and ``N`` is
factored with each block's private columns eliminated first (:mod:`~.cone_sparse`), transparently
to this loop.  ``A`` is used only through products
(:class:`~.cone_gram.DataMatrix`: one matrix product for the batch when ``A`` is shared) and ``W``
only on vectors, so ``H`` (condition number ``~1/μ²``) is never formed.  Once some element's ``μ``
is below :data:`REFINE_BELOW_MU` each solve is polished by one step of iterative refinement
against the unreduced system.  ``Δs = Wᵀ(−d̃ − Δỹ)`` comes from the scaled complementarity rows.
An element that stops progressing (step ``≤ 1e-8``, or a direction that is not finite: the scaling
at the limit of the arithmetic) is reported ``BREAKDOWN``, and a failed element returns its best
iterate (smallest residual).

**Products with A** (with ``A`` batched each reads all of it, the costliest small step; ``r``
columns cost about one): four per iteration, eight with refinement.  (1) One ``Aᵀ`` product
serves the residual ``Aᵀy``, both cone-row columns of the first solve and the structured
normal matrix's products (:meth:`~.cone_gram.NormalMatrix.columns`), so the scaling is
computed before the stopping test.  (2) ``Ax`` is not formed at the top: ``x`` rides along
as a column in the first solve's ``A`` product, and the next round's ``Ax`` is that exact
product plus ``α·AΔx`` (``AΔx = Ap₁ + Δτ·Ap₂`` from the solves) — one rounding step from a
fresh product, never an accumulated recurrence.  (3) Cone maps take the ``r`` columns at once
(the seam: ``winv`` and ``w_t`` broadcast the state over a leading column dimension).

Stopping rule (per element, ``x̂ = x/τ`` etc.):
``‖Ax̂ + ŝ − b‖∞ ≤ rtol (1 + max(‖b‖∞, ‖Ax̂‖∞, ‖ŝ‖∞))``,
``‖Aᵀŷ + c‖∞ ≤ rtol (1 + max(‖c‖∞, ‖Aᵀŷ‖∞))`` and
``|cᵀx̂ + bᵀŷ| ≤ rtol (1 + min(|cᵀx̂|, |bᵀŷ|))``.  Certificates are accepted at the same
``rtol``, scaled by the data (``‖Aᵀy‖∞ ‖b‖∞ ≤ rtol·(−bᵀy)·‖A‖∞`` and its dual; ``1`` for ``‖A‖∞``
where ``A`` is all zero, below), and the residual reported with ``INFEASIBLE`` or ``UNBOUNDED`` is that
ratio.  The rule's ``1`` is the unit of the data: it is relative only
for data of order one, which :func:`~implicitdiff.cone_program` ensures by normalizing ``b``, ``c``
and a far-from-unit ``A`` per element (:mod:`implicitdiff.layers.cone_program`, "Scaling").

**Zero columns** (a variable in no constraint: ``Aᵀy + c = 0`` is infeasible where its ``cⱼ ≠ 0``).
Column ``j`` of ``N`` is zero too, so the shifted system's x-row ``j`` reads ``δΔxⱼ = r₁ⱼ`` (``δ = eps^¾``,
the factorization's shift): ``p₂ⱼ = −cⱼ/δ``, whose term ``cⱼp₂ⱼ = −δp₂ⱼ²`` the identity
``cᵀp₂ + bᵀq₂ = −‖Δỹ₂‖²`` (``Δτ``'s denominator) misses; without it ``Δτ`` overflows (``BREAKDOWN``).  Where
some element has such a column (``c`` on its zero columns, found once per solve) the denominator
takes that term, and ``Δτ`` is the Newton step's: ``τ → 0``, the unboundedness certificate.  An
all-zero ``A`` scales the certificate tests by ``1`` (by ``‖A‖∞ = 0`` its certificate, ``s = bτ → 0``,
is never accepted).  With ``cⱼ = 0`` the variable is free: ``r₁ⱼ = 0``, so ``xⱼ`` stays ``0``, one
of the solutions.

Converged elements are frozen while the others go on; the loop's host syncs are the "all done?"
test, whether to refine, whether a Cholesky factorization failed (then shifted by ``√eps``
of its diagonal), and two in the cones: ``PSD.scale``'s spread test (float64, PSD blocks) and
``ExpCone.step``'s boundary shortcut and one per neighbourhood candidate tried.  Forward only: no gradients here.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .._core.status import Status
from ..linalg.cone_spec import ConeSpec
from .cone_exp import ExpCone
from .cone_gram import DataMatrix, NormalMatrix, Rows, contiguous, factor_normal, put, solve_normal, take
from .cone_symmetric import PSD, Nonneg, SecondOrder

__all__ = ["ConeInteriorPoint", "ConeResult"]


_CONES = {"l": Nonneg, "q": SecondOrder, "s": PSD, "ep": ExpCone}
COMPACT_BELOW = 0.85  # work on the running elements only once at most this fraction of the batch runs
# (copying them costs about one product with A, a fraction of an iteration; 0.85 against 0.75: measured
# in docs/benchmarks.md, eighth session)
REFINE_BELOW_MU = 1e-5  # refine the Newton solves once some element's μ (1 at the start) is below this


class ConeResult(NamedTuple):
    x: torch.Tensor          # (B, n)
    y: torch.Tensor          # (B, m)
    s: torch.Tensor          # (B, m)
    status: torch.Tensor     # (B,) int64
    residual: torch.Tensor   # (B,)
    iterations: torch.Tensor  # (B,) int64


def _take_last(v, g):
    """The rows ``g`` (:class:`~.cone_gram.Rows` or indices) of ``v``'s last dimension (a view for ``Rows``)."""
    if isinstance(g, Rows):
        return v[..., g.start:g.stop].reshape(v.shape[:-1] + g.shape)
    return v[..., g]


def _put_last(out, g, val):
    """``out[..., g] = val``."""
    if isinstance(g, Rows):
        out[..., g.start:g.stop] = val.reshape(out.shape[:-1] + (g.stop - g.start,))
    else:
        out[..., g] = val


def _subset(state, keep):
    """A cone's scaling state (tensors with the batch first, nested tuples, other values) for the elements ``keep``."""
    if torch.is_tensor(state):
        return state.index_select(0, keep)
    return tuple(_subset(t, keep) for t in state) if isinstance(state, tuple) else state


def _inf_norm(v):
    return v.abs().amax(dim=-1) if v.shape[-1] else v.new_zeros(v.shape[:-1])


class ConeInteriorPoint:
    """Options of the cone interior point: ``rtol`` (stopping rule above), ``max_iter``."""

    def __init__(self, rtol: float = 1e-8, max_iter: int = 100):
        self.rtol = rtol
        self.max_iter = max_iter

    # -- the Newton system, in the scaled frame -------------------------------------------------
    # Cone rows: with Ã = W⁻ᵀA_c, r̃ = W⁻ᵀr₂ and Δỹ = WΔy_c the rows A_cΔx − HΔy_c = r₂ read
    # ÃΔx − Δỹ = r̃, so Δỹ = ÃΔx − r̃ and the x-rows become NΔx + A_zᵀΔy_z = r₁ + A_cᵀW⁻¹r̃ with
    # N = ÃᵀÃ = A_cᵀH⁻¹A_c (cone_gram.NormalMatrix; structured per cone).  Products are with A
    # itself (shared by the batch where it is) and W acts on vectors only: H is never formed
    # (its condition number grows like 1/μ², W's like 1/μ).
    @staticmethod
    def _map(method, v, groups, states):
        """A per-cone map on the cone rows of ``v (B, m)`` or ``(B, r, m)`` (zero on the zero cone's rows).

        The ``r`` columns go to each cone in one call, as a leading dimension ``(r, B, …)`` that its
        state (``(B, …)``) broadcasts over (the seam: every cone's ``winv`` and ``w_t`` do)."""
        cols = v.transpose(0, 1) if v.dim() == 3 else v
        out = torch.zeros_like(cols)
        for (kind, _, idx), st in zip(groups, states):
            _put_last(out, idx, getattr(_CONES[kind], method)(st, _take_last(cols, idx)))
        return out.transpose(0, 1) if v.dim() == 3 else out

    @staticmethod
    def _scale(v, groups, states):
        """``W⁻ᵀ v`` on the cone rows of ``v (B, m)`` or ``(B, r, m)`` (zero on the zero cone's rows):
        the cone's ``winv_t`` on its rows with the ``r`` columns last."""
        cols = v.mT if v.dim() == 3 else v[..., None]  # (B, m, r)
        out = torch.zeros_like(cols)
        for (kind, _, idx), st in zip(groups, states):
            put(out, idx, _CONES[kind].winv_t(st, take(cols, idx)))
        return out.mT if v.dim() == 3 else out[..., 0]

    def _fold(self, data, r1, rt, groups, states):
        """The x-rows' right-hand side with the scaled cone rows folded in: ``r₁ + A_cᵀW⁻¹r̃``."""
        return r1 + data.rmv(self._map("winv", rt, groups, states))

    def _solve_once(self, fac, data, rhs1, r2z, rt, groups, states, extra=None):
        """``(Δx, Δy_z, Δỹ, AΔx, A·extra)`` for the folded x-rows ``rhs1`` (:meth:`_fold`), zero rows
        ``r₂z`` and scaled cone rows ``r̃`` (``None``: zero), each with ``r`` columns (``(B, r, ·)``:
        one product with ``A`` and one triangular solve for all of them); the columns ``extra``
        ``(B, j, n)`` ride along in the product."""
        p, qz = solve_normal(fac, rhs1, r2z)
        Ap = data.mv(p if extra is None else torch.cat([p, extra], 1))
        Ap, Ae = Ap[:, :p.shape[1]], Ap[:, p.shape[1]:]
        yt = self._scale(Ap, groups, states)
        return p, qz, (yt if rt is None else yt - rt), Ap, Ae

    def _solve(self, fac, data, z, rhs1, r1, r2z, rt, groups, states, refine, extra=None):
        """Solve, then refine against the unregularized system (its scaled cone rows hold exactly).

        Returns ``(Δx, Δy, Δỹ, AΔx, A·extra)`` with ``Δy = (Δy_z, W⁻¹Δỹ)``."""
        p, qz, yt, Ap, Ae = self._solve_once(fac, data, rhs1, r2z, rt, groups, states, extra)
        q = self._map("winv", yt, groups, states)
        q[..., :z] = qz
        for _ in range(refine):
            e1 = r1 - data.rmv(q)
            e2 = r2z - Ap[..., :z]
            dp, dqz, dyt, dAp, _ = self._solve_once(fac, data, e1, e2, None, groups, states)
            p, yt, Ap = p + dp, yt + dyt, Ap + dAp
            q = q + self._map("winv", dyt, groups, states)
            q[..., :z] += dqz
        return p, q, yt, Ap, Ae

    @staticmethod
    def _states(s, y, mu, groups):
        return [_CONES[k].scale(take(s, idx), take(y, idx), mu) for k, _, idx in groups]

    @staticmethod
    def _rhs_s(s, sigma_mu, corr, groups, states):
        """``d̃`` per cone (zero on the zero cone's rows); ``corr``: Mehrotra's ``(W⁻ᵀΔs_a, WΔy_a)``."""
        out = torch.zeros_like(s)
        for (kind, _, idx), st in zip(groups, states):
            cr = None if corr is None else (take(corr[0], idx), take(corr[1], idx))
            put(out, idx, _CONES[kind].rhs(st, sigma_mu, cr))
        return out

    # -- the iteration ------------------------------------------------------------------------
    def solve(self, A, b, c, spec: ConeSpec) -> ConeResult:
        """``A (B, m, n)`` (or ``(m, n)`` shared by the batch; an expanded one is read as shared),
        ``b (B, m)``, ``c (B, n)`` of one dtype and device."""
        B, (m, n) = b.shape[0], A.shape[-2:]
        z, dev = spec.z, A.device
        data = DataMatrix(A)
        groups = [(k, size, contiguous(idx)) for k, size, idx in spec.groups(dev)]
        normal = NormalMatrix(data, groups, _CONES, eliminate=z == 0)
        nu = spec.degree
        x = b.new_zeros(B, n)
        s = b.new_zeros(B, m)
        for kind, _, idx in groups:
            put(s, idx, _CONES[kind].unit(take(s, idx)))
        y = s.clone()
        tau = b.new_ones(B)
        kappa = b.new_ones(B)
        status = torch.full((B,), -1, dtype=torch.int64, device=dev)
        residual = b.new_full((B,), float("inf"))
        iters = torch.zeros(B, dtype=torch.int64, device=dev)
        nA = torch.where(data.norm > 0, data.norm, 1.0).expand(B)  # an all-zero A: 1 (see "zero columns")
        nb, nc = _inf_norm(b), _inf_norm(c)
        cz = torch.where(data.zero_columns, c, 0.0)  # c on A's zero columns (see "zero columns")
        cz = cz if bool(cz.any()) else None
        rtol = self.rtol
        stalled = torch.zeros(B, dtype=torch.bool, device=dev)
        best = [x, y, s, tau, residual]
        # the whole batch's results; the loop works on the elements `ids` (see COMPACT_BELOW)
        ids = torch.arange(B, device=dev)
        full = [x.clone(), y.clone(), s.clone(), tau.clone(), status.clone(), residual.clone(), iters.clone()]
        full_best = [v.clone() for v in best]
        Ax = b.new_zeros(B, m)  # A x, carried (see "products with A" in the module docstring)

        def flush():  # write the working elements' state into the whole batch's
            for f, v in zip(full + full_best, (x, y, s, tau, status, residual, iters) + tuple(best)):
                f.index_copy_(0, ids, v)

        for it in range(self.max_iter + 1):
            # the scaling, and one product with Aᵀ for the residual Aᵀy and the first solve's cone rows
            rz = Ax + s - b * tau[:, None]
            mu = ((s[:, z:] * y[:, z:]).sum(-1) + tau * kappa) / (nu + 1)
            states = self._states(s, y, mu, groups)
            bt, rz_t = self._scale(torch.stack([b, rz], 1), groups, states).unbind(1)
            dt_aff = self._rhs_s(s, torch.zeros_like(tau), None, groups, states)
            # the Δτ column (x-rows −c, rows b) and the predictor's (η = 1), solved together
            rt1 = torch.stack([bt, -rz_t + dt_aff], 1)
            # (and the normal matrix's products A_kᵀ(Jw), where it has them: NormalMatrix.columns)
            ride = normal.columns(states, m)
            AtV = data.rmv(torch.cat([y[:, None], self._map("winv", rt1, groups, states)]
                                     + ([] if ride is None else [ride]), 1))
            Aty = AtV[:, 0]
            # residuals of the embedding and the stopping rule ------------------------------
            ctx, bty = (c * x).sum(-1), (b * y).sum(-1)
            rx = Aty + c * tau[:, None]
            rt = kappa + ctx + bty
            it_ = 1.0 / tau
            pres = _inf_norm(rz) * it_ / (1 + torch.maximum(nb, torch.maximum(_inf_norm(Ax), _inf_norm(s)) * it_))
            dres = _inf_norm(rx) * it_ / (1 + torch.maximum(nc, _inf_norm(Aty) * it_))
            gap = (ctx + bty).abs() * it_ / (1 + torch.minimum(ctx.abs(), bty.abs()) * it_)
            res = torch.maximum(pres, torch.maximum(dres, gap))
            ok = (pres <= rtol) & (dres <= rtol) & (gap <= rtol)
            pres_cert = _inf_norm(Aty) * nb / (-bty * nA)  # the certificates' tests, ≤ rtol (positive where
            dres_cert = _inf_norm(Ax + s) * nc / (-ctx * nA)  # bᵀy < 0, cᵀx < 0)
            pinf = (bty < 0) & (pres_cert <= rtol)
            dinf = (ctx < 0) & (dres_cert <= rtol)
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
            residual = torch.where(new, torch.where(ok, res, torch.where(pinf, pres_cert, torch.where(
                dinf, dres_cert, res))), residual)
            iters = torch.where(new, torch.full_like(iters, it), iters)
            running = status < 0
            n_run = int(running.sum())
            if it == self.max_iter or n_run == 0:
                break
            if n_run <= COMPACT_BELOW * running.numel():
                # drop the finished elements from the work (their results are final): an iteration's
                # cost is proportional to the batch, and copying the running elements' data costs
                # about one product with A
                flush()
                keep = running.nonzero()[:, 0]
                ids = ids.index_select(0, keep)
                x, y, s, tau, kappa, status, residual, iters, stalled, b, c, nb, nc, nA = (
                    v.index_select(0, keep) for v in (x, y, s, tau, kappa, status, residual, iters, stalled,
                                                      b, c, nb, nc, nA))
                best = [v.index_select(0, keep) for v in best]
                cz = None if cz is None else cz.index_select(0, keep)
                Ax, rx, rz, rt, running, mu, rz_t, dt_aff, rt1, AtV = (
                    v.index_select(0, keep) for v in (Ax, rx, rz, rt, running, mu, rz_t, dt_aff, rt1, AtV))
                states = [_subset(st, keep) for st in states]
                data = data.subset(keep)
                normal = normal.subset(data, keep)
                B = n_run
            # one Newton system per iteration ---------------------------------------------------
            fac = factor_normal(lambda: normal(states, B, None if ride is None else AtV[:, 3:]), data, z,
                                normal.elimination)
            # iterative refinement pays once the normal matrix is ill-conditioned (cond ~ 1/μ²)
            refine = int(bool((torch.where(running, mu, torch.ones_like(mu)) < REFINE_BELOW_MU).any()))

            def direction(eta, dt_rhs, dk, sol=None):
                # x-rows −ηr_x; cone rows (scaled) −ηW⁻ᵀr_z + d̃; zero rows −ηr_z
                if sol is None:
                    e1 = eta[:, None, None]
                    r1, rt_ = -e1 * rx[:, None], (-eta[:, None] * rz_t + dt_rhs)[:, None]
                    sol = self._solve(fac, data, z, self._fold(data, r1, rt_, groups, states), r1,
                                      -e1 * rz[:, None, :z], rt_, groups, states, refine)
                    sol = tuple(t[:, 0] for t in sol[:4])
                p1, q1, yt1, Ap1 = sol
                rhs_t = -eta * rt + dk / tau
                dtau = (rhs_t - (c * p1).sum(-1) - (b * q1).sum(-1)) / den
                dy = q1 + dtau[:, None] * q2
                # Δs̃ = −d̃ − Δỹ (complementarity, in the scaled frame), Δs = WᵀΔs̃
                ds = self._map("w_t", -dt_rhs - (yt1 + dtau[:, None] * yt2), groups, states)
                dkap = -(dk + kappa * dtau) / tau
                return dy, ds, dtau, dkap, p1, Ap1  # Δx = p₁ + Δτ p₂ (the corrector's only)

            def max_step(ds, dy, dtau, dkap, scaled=None):
                # scaled: the cones' (W⁻ᵀΔs, WΔy), for those that test the step on them (step_scaled)
                alpha = torch.full_like(tau, float("inf"))
                for i, ((kind, _, idx), st) in enumerate(zip(groups, states)):
                    cone = _CONES[kind]
                    if scaled is not None and hasattr(cone, "step_scaled"):
                        a = cone.step_scaled(st, *scaled[i])
                    else:
                        a = cone.step(st, take(ds, idx), take(dy, idx))
                    alpha = torch.minimum(alpha, a)
                for v, dv in ((tau, dtau), (kappa, dkap)):
                    alpha = torch.where(dv < 0, torch.minimum(alpha, -v / dv), alpha)
                return alpha

            r1 = torch.stack([-c, -rx], 1)
            # x rides along in the first solve's product: A x exact, the base of next round's A x
            P, Q, YT, AP, Ax = self._solve(fac, data, z, r1 + AtV[:, 1:3], r1,
                                           torch.stack([b[:, :z], -rz[:, :z]], 1), rt1, groups, states, refine,
                                           x[:, None])
            p2, q2, yt2, Ap2, Ax = P[:, 0], Q[:, 0], YT[:, 0], AP[:, 0], Ax[:, 0]
            # cᵀp₂ + bᵀq₂ = −q₂ᵀHq₂ = −‖Δỹ₂‖² ≤ 0 exactly (but on A's zero columns); computed this way it
            # has no cancellation
            den = -(yt2 * yt2).sum(-1) - kappa / tau
            if cz is not None:  # a zero column's cⱼp₂ⱼ, which that identity misses (see "zero columns")
                den = den + (cz * p2).sum(-1)

            # predictor (affine scaling)
            dya, dsa, dta, dka, _, _ = direction(torch.ones_like(tau), dt_aff, tau * kappa,
                                                 (P[:, 1], Q[:, 1], YT[:, 1], AP[:, 1]))
            # its directions scaled once: the step's test and Mehrotra's corrector
            scaled = [_CONES[kind].scaled(st, take(dsa, idx), take(dya, idx))
                      for (kind, _, idx), st in zip(groups, states)]
            alpha_a = max_step(dsa, dya, dta, dka, scaled).clamp(max=1.0)
            sigma = (1 - alpha_a) ** 3
            # corrector (Mehrotra)
            corr_s, corr_y = torch.zeros_like(s), torch.zeros_like(s)
            for (kind, _, idx), (a_, b_) in zip(groups, scaled):
                put(corr_s, idx, a_)
                put(corr_y, idx, b_)
            dk = tau * kappa + dta * dka - sigma * mu
            dy, ds, dtau, dkap, p1, Ap1 = direction(1 - sigma, self._rhs_s(s, sigma * mu, (corr_s, corr_y), groups,
                                                                           states), dk)
            dx, Adx = p1 + dtau[:, None] * p2, Ap1 + dtau[:, None] * Ap2
            alpha = (0.99 * max_step(ds, dy, dtau, dkap)).clamp(max=1.0)
            # a direction with a NaN or Inf (the scaling at the limit of the arithmetic, e.g. a slack that
            # rounding put on the cone's boundary) is not taken: the element stalls and is reported
            finite = (torch.isfinite(dx).all(-1) & torch.isfinite(dy).all(-1) & torch.isfinite(ds).all(-1)
                      & torch.isfinite(dtau) & torch.isfinite(dkap))
            alpha = torch.where(running & finite & torch.isfinite(alpha), alpha, torch.zeros_like(tau))
            stalled = running & ~(alpha > 1e-8)  # no progress: reported next round (BREAKDOWN)
            move = alpha > 0  # (a NaN direction times a zero step would still be NaN)
            a1, m1 = alpha[:, None], move[:, None]
            x, y, s, Ax = (torch.where(m1, v + a1 * dv, v) for v, dv in ((x, dx), (y, dy), (s, ds), (Ax, Adx)))
            tau = torch.where(move, tau + alpha * dtau, tau)
            kappa = torch.where(move, kappa + alpha * dkap, kappa)
        flush()
        x, y, s, tau, status, residual, iters = full
        best = full_best
        status = torch.where(status < 0, torch.full_like(status, Status.MAX_ITERATIONS), status)
        # a failed element returns its best iterate (smallest residual), not its last
        failed = (status != Status.SUCCESS) & (status != Status.INFEASIBLE) & (status != Status.UNBOUNDED)
        f1 = failed[:, None]
        x, y, s = (torch.where(f1, bv, v) for v, bv in zip((x, y, s), best[:3]))
        tau = torch.where(failed, best[3], tau)
        residual = torch.where(failed, best[4], residual)
        t = tau[:, None]
        return ConeResult(x / t, y / t, s / t, status, residual, iters)
