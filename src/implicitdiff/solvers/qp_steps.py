"""Shared pieces of the batched QP interior point: the result type, the KKT residual, step
lengths, statuses, the initial shift, and the batch-subset helpers (solve some elements again
and merge them back).  Shapes as in :mod:`implicitdiff.solvers.qp_ipm`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .._core.status import Status

__all__ = ["QPResult", "amax", "kkt_residual", "max_step", "update_status", "initial_shift", "take", "merge"]
from ..linalg.kkt import ActiveSetKKT, KKTProducts, bmv, put_rows, take_rows


class QPResult(NamedTuple):
    """What :meth:`~implicitdiff.solvers.qp_ipm.QPInteriorPoint.solve` returns, per batch element."""

    z: torch.Tensor  # (B, n)
    lam: torch.Tensor  # (B, m)
    nu: torch.Tensor  # (B, k)
    status: torch.Tensor  # (B,) int64
    residual: torch.Tensor  # (B,)
    iterations: torch.Tensor  # (B,) int64
    kkt: ActiveSetKKT  # the active set and the factorization of its KKT system: the backward's input


def amax(x):
    return x.abs().amax(-1) if x.shape[-1] else x.new_zeros(x.shape[:-1])


def kkt_residual(P, p, h, b, z, s, lam, nu, Gz=None):
    """Relative KKT residual: max of stationarity, feasibility and complementarity (per element);
    ``Gz``: the product ``Gz`` when the caller has it."""
    Qz, Gz, Az = P.forward(z) if Gz is None else (bmv(P.Q, z), Gz, bmv(P.A, z))
    GAy = P.adjoint(lam, nu)
    rd = Qz + p + GAy
    rp = Gz + s - h
    re = Az - b
    pz = p.expand_as(z)
    res_d = amax(rd) / (1 + torch.stack([amax(Qz), amax(pz), amax(GAy)]).amax(0))
    hh, bb = h.expand_as(s), b.expand_as(re)
    res_p = torch.maximum(amax(rp), amax(re)) / (
        1 + torch.stack([amax(Gz), amax(s), amax(hh), amax(Az), amax(bb)]).amax(0))
    obj = (pz * z).sum(-1) + 0.5 * (z * Qz).sum(-1)
    gap = (s * lam).sum(-1).abs() / (1 + obj.abs())
    return torch.maximum(torch.maximum(res_d, res_p), gap), (rd, rp, re, Qz, Gz, Az, GAy)


def max_step(x, dx):
    """Largest ``α ≥ 0`` with ``x + α dx ≥ 0`` (per element; ``inf`` when unlimited)."""
    if x.shape[-1] == 0:
        return x.new_full(x.shape[:-1], float("inf"))
    ratio = torch.where(dx < 0, -x / dx, torch.full_like(x, float("inf")))
    return ratio.amin(-1)


def update_status(r, infeas, unbnd, rtol, status, done, stall, best, floor=None):
    """One iteration's verdicts; an element stops at its first one (no host sync).

    Stagnation counts only near ``floor`` (the solver's final tolerance, default ``rtol``): a loop
    that stops early at a loose ``rtol`` must not call slow early progress a stall."""
    floor = rtol if floor is None else floor
    # stagnation near the tolerance (the rounding floor): no 10% gain on the best residual for 5 iterations
    stall = torch.where((r < 0.9 * best) | (best > 1e4 * floor), 0, stall + 1)
    best = torch.minimum(best, r)
    new = torch.where(~torch.isfinite(r), int(Status.NONFINITE),
          torch.where(r <= rtol, int(Status.SUCCESS),
          torch.where(infeas, int(Status.INFEASIBLE),
          torch.where(unbnd, int(Status.UNBOUNDED),
          torch.where(stall >= 5, int(Status.MAX_ITERATIONS), -1)))))  # noqa: E128
    stop = (new >= 0) & ~done
    return torch.where(stop, new, status), done | stop, stall, best


def initial_shift(s, lam):
    """Mehrotra's shift into the interior, balanced so that neither ``s`` nor ``λ`` starts tiny."""
    s = s + (-1.5 * s.amin(-1, keepdim=True)).clamp(min=0)
    lam = lam + (-1.5 * lam.amin(-1, keepdim=True)).clamp(min=0)
    sl = (s * lam).sum(-1, keepdim=True)
    return (s + 0.5 * sl / lam.sum(-1, keepdim=True).clamp(min=1e-30) + 1e-3,
            lam + 0.5 * sl / s.sum(-1, keepdim=True).clamp(min=1e-30) + 1e-3)


def balanced_start(s, lam, mu0):
    """A cold start's ``(s, λ)``: :func:`initial_shift`, then each pair rebalanced to ``s/λ = μ₀`` with ``s∘λ``
    at 0.3 of the shifted product (the shift overshoots the scale of the solution's multipliers).  The
    first iteration's weights are then ``μ₀`` (to rounding), those of the system the start solved: it
    reuses that factorization."""
    s, lam = initial_shift(s, lam)
    lam = (0.3 * s * lam / mu0).sqrt()
    return mu0 * lam, lam


def take(t, idx):
    """Rows ``idx`` of a per-element tensor (or of :class:`KKTProducts`); a shared one (``(1, …)``, 0-d) as is."""
    if isinstance(t, KKTProducts):
        return t.take(idx)
    return take_rows(t, idx)


def merge(out: QPResult, sub: QPResult, idx) -> QPResult:
    """``out`` with the elements ``idx`` replaced by those of ``sub`` (solved again on their own)."""
    kkt = ActiveSetKKT(put_rows(out.kkt.active, sub.kkt.active, idx), out.kkt.factor.put(sub.kkt.factor, idx),
                       out.kkt.refine_steps)
    return QPResult(*(put_rows(a, b, idx) for a, b in zip(out[:6], sub[:6])), kkt)
