"""BiCGSTAB for non-symmetric square operators, batched (van der Vorst 1992), right-preconditioned."""

from __future__ import annotations

import torch

from ..._core.defaults import eps
from ._common import Iteration, KrylovResult, and_active, col, dot, normalize, norm, run, safe

__all__ = ["bicgstab"]


class _BiCGSTAB(Iteration):
    can_stall = True

    # With the shadow residual r̂ = r₀ and right preconditioning (x = x₀ + M y):
    #   ρ = r̂ᵀr,  β = (ρ/ρ_old)(α/ω),  p ← r + β (p − ω v),  p̂ = M p,  v = A p̂,
    #   α = ρ / r̂ᵀv,  s = r − α v,  ŝ = M s,  t = A ŝ,  ω = tᵀs / tᵀt,
    #   x ← x + α p̂ + ω ŝ,  r ← s − ω t.
    # An element whose ‖s‖ already meets the tolerance takes the half step (ω = 0).
    # Breakdown: |ρ| ≤ eps ‖r̂‖‖r‖ (r̂ ⟂ r) or |r̂ᵀv| ≤ eps ‖r̂‖‖v‖ — the lane stalls and is restarted with
    # r̂ = r (a new shadow residual) by the loop; |tᵀs| ≤ eps ‖t‖‖s‖ (A ŝ ⟂ s, ω = 0) is final.
    # Frozen or stalled lanes get α = ω = 0, so x and r stay.

    def init(self, x):
        prob = self.prob
        self.x = x
        self.r = prob.b - prob.mv(x)
        self.rhat = self.r
        self.rhat_norm = norm(self.rhat)
        ones = torch.ones_like(self.rhat_norm)
        self.rho_old, self.alpha, self.omega = ones, ones, ones
        self.p = torch.zeros_like(self.r)
        self.v = torch.zeros_like(self.r)
        self.rnorm = self.rhat_norm
        self.broken = torch.zeros_like(ones, dtype=torch.bool)
        self.stall = self.broken

    def step(self, active):
        prob = self.prob
        zero = torch.zeros_like(self.rnorm)
        rho = dot(self.rhat, self.r)
        tiny = eps(rho.dtype)
        bad_rho = rho.abs() <= tiny * self.rhat_norm * self.rnorm
        beta = (rho / safe(self.rho_old)) * (self.alpha / safe(self.omega))
        self.p = torch.addcmul(self.r, col(beta), torch.addcmul(self.p, col(self.omega), self.v, value=-1))
        phat = self.p if prob.M is None else prob.M(self.p)
        self.v = prob.mv(phat)
        rv = dot(self.rhat, self.v)
        bad_v = rv.abs() <= tiny * self.rhat_norm * norm(self.v)
        go = and_active(active, ~bad_rho & ~bad_v)
        alpha = torch.where(go, rho / safe(rv), zero)
        s = torch.addcmul(self.r, col(alpha), self.v, value=-1)
        snorm = norm(s)
        early = snorm <= prob.tol
        shat = s if prob.M is None else prob.M(s)
        t = prob.mv(shat)
        tt, ts = dot(t, t), dot(t, s)
        bad_omega = go & ~early & (ts.abs() <= tiny * tt.sqrt() * snorm)
        omega = torch.where(go & ~early & ~bad_omega, ts / safe(tt), zero)
        self.x = torch.addcmul(torch.addcmul(self.x, col(alpha), phat), col(omega), shat)
        self.r = torch.addcmul(s, col(omega), t, value=-1)
        self.rnorm = norm(self.r)
        self.rho_old, self.alpha, self.omega = rho, alpha, omega
        self.stall = bad_rho | bad_v
        self.broken = bad_omega

    def solution(self):
        return self.x


def bicgstab(A, b, x0=None, *, rtol=None, atol=0.0, max_iter=None, M=None, callback=None,
             check_every=None) -> KrylovResult:
    r"""Solve ``A x = b`` for a square, possibly non-symmetric ``A`` by BiCGSTAB.

    Stopping rule, per batch element: ``‖b − A x‖ ≤ max(rtol · ‖b‖, atol)`` (tested on the
    recursive residual, also after the half step, and confirmed on the true residual).
    One iteration costs two applies of ``A`` (and of ``M``).

    Args:
        A: ``(*, n, n)`` dense tensor, 2-D ``torch.sparse`` tensor, LinearOperator, or callable
            ``x -> A x`` on ``(..., n)``.
        b: ``(*, n)``, independent systems in the leading dims.
        x0, rtol, atol, max_iter, callback, check_every: as in :func:`cg`.
        M: right preconditioner ``r -> M r ≈ A⁻¹ r`` (any invertible operator).

    Returns:
        :class:`KrylovResult` ``(x, info)``.

    Failure modes (reported): a shadow-residual breakdown (``|r̂ᵀr| ≤ eps ‖r̂‖ ‖r‖`` or
    ``|r̂ᵀAp̂| ≤ eps ‖r̂‖‖Ap̂‖``) restarts the element with ``r̂ = r``; ``BREAKDOWN`` when that does not help
    (no halving of the residual across restarts, e.g. a skew-symmetric ``A``) or ``ω ≈ 0``
    — try :func:`gmres`; ``MAX_ITERATIONS``; ``NONFINITE``.

    Example:
        >>> import torch
        >>> from implicitdiff.linalg.krylov import bicgstab
        >>> A = torch.tensor([[3.0, 1.0], [-1.0, 2.0]], dtype=torch.float64)
        >>> x, info = bicgstab(A, torch.tensor([4.0, 1.0], dtype=torch.float64))
        >>> torch.allclose(x, torch.ones(2, dtype=torch.float64)), int(info.status)
        (True, 0)
    """
    prob = normalize(A, b, x0, rtol=rtol, atol=atol, max_iter=max_iter, M=M, callback=callback,
                     check_every=check_every, solver="bicgstab")
    return run(_BiCGSTAB(prob))
