"""MINRES for symmetric (possibly indefinite) operators, batched (Paige & Saunders 1975)."""

from __future__ import annotations

import torch

from ._common import Iteration, KrylovResult, col, dot, normalize, norm, run, safe, where_active

__all__ = ["minres"]


class _MINRES(Iteration):
    # Lanczos on A (preconditioned: on M^{1/2} A M^{1/2}) builds T_k, tridiagonal; a QR
    # factorization of T_k by Givens rotations (cs, sn) is updated one column at a time and
    # x_k minimizes ‖r‖_{M} over x0 + K_k.  phibar is that residual norm; without M it is the
    # 2-norm, with M the 2-norm residual is carried explicitly: r ← r − φ A w, where
    # A w = (A v − ε_old A w₁ − δ A w₂)/γ follows the same recurrence as w.
    # A frozen lane keeps x (and r) through torch.where; every division is guarded so that a
    # finished lane's recurrences stay finite.

    def init(self, x):
        prob = self.prob
        self.x = x
        r1 = prob.b - prob.mv(x)
        y = r1 if prob.M is None else prob.M(r1)
        beta1sq = dot(r1, y)
        beta1 = beta1sq.clamp(min=0).sqrt()
        zeros = torch.zeros_like(beta1)
        self.r1, self.r2, self.y = r1, r1, y
        self.beta, self.oldb, self.dbar, self.epsln = beta1, zeros, zeros, zeros
        self.phibar, self.cs, self.sn = beta1, -torch.ones_like(beta1), zeros
        self.w = torch.zeros_like(x)
        self.w2 = torch.zeros_like(x)
        self.itn = 0
        if prob.M is not None:
            self.r = r1
            self.Aw = torch.zeros_like(x)
            self.Aw2 = torch.zeros_like(x)
            self.rnorm = norm(r1)
        else:
            self.rnorm = beta1
        self.broken = beta1sq < 0

    def step(self, active):
        prob = self.prob
        self.itn += 1
        inv_beta = 1.0 / safe(self.beta)
        v = self.y * col(inv_beta)
        Av = prob.mv(v)
        y = Av
        if self.itn >= 2:
            y = torch.addcmul(y, col(self.beta / safe(self.oldb)), self.r1, value=-1)
        alfa = dot(v, y)
        y = torch.addcmul(y, col(alfa * inv_beta), self.r2, value=-1)
        self.r1, self.r2 = self.r2, y
        self.y = y if prob.M is None else prob.M(y)
        self.oldb = self.beta
        betasq = dot(self.r2, self.y)
        bad = betasq < 0  # M is not positive definite
        self.beta = betasq.clamp(min=0).sqrt()
        # apply the previous rotation:  [δ ε₊; γ̄ δ̄₊] = [cs sn; sn −cs] [δ̄ 0; α β₊]
        oldeps = self.epsln
        delta = self.cs * self.dbar + self.sn * alfa
        gbar = self.sn * self.dbar - self.cs * alfa
        self.epsln = self.sn * self.beta
        self.dbar = -self.cs * self.beta
        # the next rotation annihilates β₊ below γ̄
        gamma = torch.hypot(gbar, self.beta)
        singular = gamma == 0  # T_k singular and Lanczos exhausted: b is not in range(A)
        gamma = safe(gamma)
        self.cs, self.sn = gbar / gamma, self.beta / gamma
        phi = where_active(active, self.cs * self.phibar, torch.zeros_like(gamma))
        self.phibar = self.sn * self.phibar
        w1, self.w2 = self.w2, self.w
        w = torch.addcmul(v, col(oldeps), w1, value=-1)
        w = torch.addcmul(w, col(delta), self.w2, value=-1) / col(gamma)
        self.w = w
        self.x = torch.addcmul(self.x, col(phi), w)
        if prob.M is not None:
            Aw1, self.Aw2 = self.Aw2, self.Aw
            Aw = torch.addcmul(Av, col(oldeps), Aw1, value=-1)
            self.Aw = torch.addcmul(Aw, col(delta), self.Aw2, value=-1) / col(gamma)
            self.r = torch.addcmul(self.r, col(phi), self.Aw, value=-1)
            self.rnorm = norm(self.r)
        else:
            self.rnorm = self.phibar.abs()
        self.broken = bad | singular

    def solution(self):
        return self.x


def minres(A, b, x0=None, *, rtol=None, atol=0.0, max_iter=None, M=None, callback=None,
           check_every=None) -> KrylovResult:
    r"""Solve ``A x = b`` for a symmetric, possibly indefinite ``A`` by MINRES.

    ``x_k`` minimizes ``‖b − A x‖`` (``‖·‖_M`` with a preconditioner) over ``x0 + K_k(A, r0)``.
    Stopping rule, per batch element: ``‖b − A x‖ ≤ max(rtol · ‖b‖, atol)`` — the 2-norm,
    also with a preconditioner (SciPy tests ``‖r‖ / (‖A‖ ‖x‖)``; pass the same ``rtol`` and
    compare ``info.residual``). Tested on the recursive estimate, confirmed on the true residual.

    Args:
        A: ``(*, n, n)`` dense tensor, 2-D ``torch.sparse`` tensor, LinearOperator, or callable
            ``x -> A x`` on ``(..., n)``; must be symmetric (not checked here; see
            ``LinearOperator.check_tags``).
        b: ``(*, n)``, independent systems in the leading dims.
        x0, rtol, atol, max_iter, callback, check_every: as in :func:`cg`.
        M: symmetric positive definite preconditioner ``r -> M r ≈ A⁻¹ r``.

    Returns:
        :class:`KrylovResult` ``(x, info)`` with per-element status, true relative residual
        and iterations.

    Failure modes (reported): ``BREAKDOWN`` when ``M`` is not positive definite
    (``rᵀ M r < 0``), when the tridiagonal ``T_k`` is singular at Lanczos exhaustion (``b``
    not in the range of a singular ``A``), or on stagnation; ``MAX_ITERATIONS``; ``NONFINITE``.

    Example:
        >>> import torch
        >>> from implicitdiff.linalg.krylov import minres
        >>> A = torch.tensor([[1.0, 2.0], [2.0, -1.0]], dtype=torch.float64)   # indefinite
        >>> x, info = minres(A, torch.tensor([3.0, 1.0], dtype=torch.float64))
        >>> torch.allclose(x, torch.ones(2, dtype=torch.float64)), int(info.status)
        (True, 0)
    """
    prob = normalize(A, b, x0, rtol=rtol, atol=atol, max_iter=max_iter, M=M, callback=callback,
                     check_every=check_every, solver="minres")
    return run(_MINRES(prob))
