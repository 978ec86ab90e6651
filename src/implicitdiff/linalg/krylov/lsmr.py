"""LSMR: min-norm least squares with monotone ‖Aᵀr‖, batched (Fong & Saunders 2011)."""

from __future__ import annotations

import torch

from ._common import KrylovResult, col, normalize, run, safe, where_active
from .lsqr import LeastSquaresIteration

__all__ = ["lsmr"]


def _rot(a, b):
    # Givens rotation [c s; −s c] [a; b] = [r; 0] with r = hypot(a, b) ≥ 0 (c = 1, s = 0 at a = b = 0).
    r = torch.hypot(a, b)
    rs = safe(r)
    return torch.where(r == 0, torch.ones_like(r), a / rs), b / rs, r


class _LSMR(LeastSquaresIteration):
    # Fong & Saunders' recurrences with damp = 0: MINRES applied to the normal equations
    # (AM)ᵀ(AM) y = (AM)ᵀ r₀ through the same bidiagonalization as LSQR, so ‖(AM)ᵀ r‖ = |ζ̄|
    # decreases monotonically; ‖r‖ is estimated by a second QR (the "tilde" rotations).

    def init(self, x):
        self.u, beta, self.v, self.alpha = self._bidiag_start(x)
        zeros, ones = torch.zeros_like(beta), torch.ones_like(beta)
        self.zetabar = self.alpha * beta
        self.alphabar = self.alpha
        self.rho, self.rhobar, self.cbar, self.sbar = ones, ones, ones, zeros
        self.h = self.v
        self.hbar = torch.zeros_like(self.v)
        self.betadd, self.betad, self.rhodold = beta, zeros, ones
        self.tautildeold, self.thetatilde, self.zeta = zeros, zeros, zeros
        self.normA2 = self.alpha ** 2
        self.anorm = torch.maximum(self.anorm, self.normA2.sqrt())
        self.rnorm = beta
        self.arnorm = self.zetabar.abs()
        self.broken = torch.zeros_like(beta, dtype=torch.bool)

    def step(self, active):
        self.u, beta, self.v, alpha = self._bidiag_step(self.u, self.alpha, self.v)
        self.alpha = alpha
        # rotation P: [ᾱ β₊] → ρ (with damp = 0 the rotation Q̂ is the identity)
        rhoold = self.rho
        c, s, self.rho = _rot(self.alphabar, beta)
        thetanew = s * alpha
        self.alphabar = c * alpha
        # rotation P̄: [c̄ρ θ_new] → ρ̄
        rhobarold, zetaold = self.rhobar, self.zeta
        thetabar = self.sbar * self.rho
        self.cbar, self.sbar, self.rhobar = _rot(self.cbar * self.rho, thetanew)
        self.zeta = self.cbar * self.zetabar
        self.zetabar = -self.sbar * self.zetabar
        # h̄ ← h − (θ̄ρ/(ρ_old ρ̄_old)) h̄,  y ← y + (ζ/(ρ ρ̄)) h̄,  h ← v − (θ_new/ρ) h
        self.hbar = torch.addcmul(self.h, col(thetabar * self.rho / safe(rhoold * rhobarold)), self.hbar, value=-1)
        step = where_active(active, self.zeta / safe(self.rho * self.rhobar), torch.zeros_like(self.zeta))
        self.y = torch.addcmul(self.y, col(step), self.hbar)
        self.h = torch.addcmul(self.v, col(thetanew / safe(self.rho)), self.h, value=-1)
        # ‖r‖ estimate: apply the previous rotations to β̈ and a rotation P̃ to [ρ̇_old θ̄]
        betaacute = self.betadd
        betahat = c * betaacute
        self.betadd = -s * betaacute
        thetatildeold = self.thetatilde
        ctildeold, stildeold, rhotildeold = _rot(self.rhodold, thetabar)
        self.thetatilde = stildeold * self.rhobar
        self.rhodold = ctildeold * self.rhobar
        self.betad = -stildeold * self.betad + ctildeold * betahat
        self.tautildeold = (zetaold - thetatildeold * self.tautildeold) / safe(rhotildeold)
        taud = (self.zeta - self.thetatilde * self.tautildeold) / safe(self.rhodold)
        rnorm = ((self.betad - taud) ** 2 + self.betadd ** 2).sqrt()
        self.normA2 = self.normA2 + beta ** 2
        self.anorm = where_active(active, torch.maximum(self.anorm, self.normA2.sqrt()), self.anorm)
        self.normA2 = self.normA2 + alpha ** 2
        self.rnorm = where_active(active, rnorm, self.rnorm)
        self.arnorm = where_active(active, self.zetabar.abs(), self.arnorm)


def lsmr(A, b, x0=None, *, rtol=None, atol=0.0, max_iter=None, M=None, callback=None,
         check_every=None) -> KrylovResult:
    r"""Minimum-norm least-squares solution of ``A x = b`` for any ``(m, n)`` operator by LSMR.

    Same problem, arguments, stopping rule and result as :func:`lsqr` (``‖r‖ ≤ max(rtol ‖b‖,
    atol)`` or ``‖Aᵀ r‖ ≤ rtol · ‖A‖_F · ‖r‖``); LSMR is MINRES on the normal equations, so
    ``‖Aᵀ r‖`` decreases monotonically and it can stop earlier on inconsistent systems.
    From ``x0 = 0`` it converges to ``A⁺ b``. One iteration applies ``A`` and ``Aᵀ`` once.

    Failure modes (reported): ``MAX_ITERATIONS``; ``BREAKDOWN`` on stagnation of the true
    residual; ``NONFINITE``.

    Example:
        >>> import torch
        >>> from implicitdiff.linalg.krylov import lsmr
        >>> A = torch.tensor([[1.0], [1.0]], dtype=torch.float64)      # inconsistent: x = mean(b)
        >>> x, info = lsmr(A, torch.tensor([1.0, 3.0], dtype=torch.float64))
        >>> torch.allclose(x, torch.tensor([2.0], dtype=torch.float64)), int(info.status)
        (True, 0)
    """
    prob = normalize(A, b, x0, rtol=rtol, atol=atol, max_iter=max_iter, M=M, callback=callback,
                     check_every=check_every, solver="lsmr", square=False, need_rmv=True)
    return run(_LSMR(prob))
