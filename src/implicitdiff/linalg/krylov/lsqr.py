"""LSQR: min-norm least squares for any shape and rank, batched (Paige & Saunders 1982)."""

from __future__ import annotations

import torch

from ._common import Iteration, KrylovResult, col, normalize, norm, run, safe, where_active

__all__ = ["lsqr", "LeastSquaresIteration"]


class LeastSquaresIteration(Iteration):
    """Shared by LSQR and LSMR: Golub–Kahan bidiagonalization of ``A M`` and the stopping rule.

    The iterate is ``x = x₀ + M y`` with ``y`` in ``range((A M)ᵀ)``, so from ``x₀ = 0`` (and
    ``M = I``) it converges to the minimum-norm least-squares solution ``A⁺ b``.  An element
    stops when ``‖r‖ ≤ max(rtol ‖b‖, atol)`` (a solution) or ``‖(AM)ᵀ r‖ ≤ rtol ‖AM‖_F ‖r‖``
    (a least-squares solution of an inconsistent system), with ``‖AM‖_F`` estimated from
    the bidiagonalization.  ``anorm`` persists across residual replacements.
    """

    anorm = None
    can_break = False

    def _mv(self, y):
        M = self.prob.M
        return self.prob.mv(y if M is None else M(y))

    def _rmv(self, u):
        M = self.prob.M
        v = self.prob.rmv(u)
        return v if M is None else M(v)

    def _bidiag_start(self, x):
        # β₁ u₁ = b − A x₀,   α₁ v₁ = (AM)ᵀ u₁
        self.x0 = x
        u = self.prob.b - self.prob.mv(x)
        beta = norm(u)
        u = u / col(safe(beta))
        v = self._rmv(u)
        alfa = norm(v)
        v = v / col(safe(alfa))
        if self.anorm is None:
            self.anorm = torch.zeros_like(beta)
        self.y = torch.zeros_like(x)
        return u, beta, v, alfa

    def _bidiag_step(self, u, alfa, v):
        # β₊ u₊ = A M v − α u,   α₊ v₊ = (AM)ᵀ u₊ − β₊ v
        u = self._mv(v) - col(alfa) * u
        beta = norm(u)
        u = u / col(safe(beta))
        v = self._rmv(u) - col(beta) * v
        alfa2 = norm(v)
        v = v / col(safe(alfa2))
        return u, beta, v, alfa2

    def converged(self):
        return ~(self.rnorm > self.prob.tol) | (self.arnorm <= self.prob.rtol * self.anorm * self.rnorm)

    def verify(self, x):
        r = self.prob.b - self.prob.mv(x)
        rn = norm(r)
        arn = norm(self._rmv(r))
        ok = (rn <= self.prob.tol) | (arn <= self.prob.rtol * self.anorm * rn)
        return ok, rn / safe(self.prob.bnorm)

    def solution(self):
        M = self.prob.M
        return self.x0 + (self.y if M is None else M(self.y))


class _LSQR(LeastSquaresIteration):
    # Paige & Saunders' recurrences (damp = 0): a Givens rotation (cs, sn) on [ρ̄ β₊] gives
    #   θ = sn α₊, ρ̄ ← −cs α₊, φ = cs φ̄, φ̄ ← sn φ̄,  y ← y + (φ/ρ) w,  w ← v − (θ/ρ) w,
    # with ‖r‖ = |φ̄| and ‖(AM)ᵀ r‖ = α₊ |sn φ|.  Frozen lanes: the y update is masked.

    def init(self, x):
        self.u, beta, self.v, self.alfa = self._bidiag_start(x)
        self.w = self.v
        self.rhobar, self.phibar = self.alfa, beta
        self.rnorm = beta
        self.arnorm = self.alfa * beta
        self.broken = torch.zeros_like(beta, dtype=torch.bool)

    def step(self, active):
        self.u, beta, self.v, alfa = self._bidiag_step(self.u, self.alfa, self.v)
        self.anorm = where_active(active, (self.anorm ** 2 + self.alfa ** 2 + beta ** 2).sqrt(), self.anorm)
        self.alfa = alfa
        rho = torch.hypot(self.rhobar, beta)
        cs, sn = self.rhobar / safe(rho), beta / safe(rho)
        theta = sn * alfa
        self.rhobar = -cs * alfa
        phi = cs * self.phibar
        self.phibar = sn * self.phibar
        t1 = where_active(active, phi / safe(rho), torch.zeros_like(phi))
        self.y = torch.addcmul(self.y, col(t1), self.w)
        self.w = torch.addcmul(self.v, col(theta / safe(rho)), self.w, value=-1)
        self.rnorm = where_active(active, self.phibar.abs(), self.rnorm)
        self.arnorm = where_active(active, alfa * (sn * phi).abs(), self.arnorm)


def lsqr(A, b, x0=None, *, rtol=None, atol=0.0, max_iter=None, M=None, callback=None,
         check_every=None) -> KrylovResult:
    r"""Minimum-norm least-squares solution of ``A x = b`` for any ``(m, n)`` operator by LSQR.

    From ``x0 = 0`` the iterates stay in ``range(Aᵀ)``, so the limit is ``A⁺ b`` — the
    solution of a consistent system with the smallest norm, or the least-squares solution
    with the smallest norm (rank-deficient ``A``); from ``x0 ≠ 0`` it is ``x0 + A⁺(b − A x0)``.

    Stopping rule, per batch element (SciPy-like, in terms of the family's ``rtol``/``atol``)::

        ‖r‖ ≤ max(rtol · ‖b‖, atol)            (a solution: consistent systems)
        or  ‖Aᵀ r‖ ≤ rtol · ‖A‖_F · ‖r‖         (a least-squares solution: inconsistent systems)

    with ``r = b − A x`` and ``‖A‖_F`` estimated by the bidiagonalization. For an inconsistent
    system ``info.status`` is ``SUCCESS`` by the second test while ``info.residual``
    (``‖b − A x‖/‖b‖``) stays large.

    Args:
        A: ``(*, m, n)`` dense tensor, 2-D ``torch.sparse`` tensor, LinearOperator (``Aᵀ`` from
            its ``rmv``, derived with ``torch.func.vjp`` when it has none) or a callable
            ``x -> A x`` (square unless ``x0`` gives ``n``; ``Aᵀ`` by ``vjp``).
        b: ``(*, m)``; x0: ``(*, n)``.
        rtol, atol, max_iter, callback, check_every: as in :func:`cg` (``max_iter`` default
            ``10 n``; each iteration applies ``A`` and ``Aᵀ`` once).
        M: symmetric invertible right preconditioner on ``R^n`` (column scaling, e.g. Jacobi of
            ``AᵀA``): solves ``min ‖A M y − b‖`` and returns ``x = x0 + M y`` — then the norm
            minimized is ``‖M⁻¹(x − x0)‖``, not ``‖x − x0‖``.

    Returns:
        :class:`KrylovResult` ``(x, info)``.

    Failure modes (reported): ``MAX_ITERATIONS`` (ill-conditioned ``A``: precondition);
    ``BREAKDOWN`` on stagnation of the true residual; ``NONFINITE``.

    Example:
        >>> import torch
        >>> from implicitdiff.linalg.krylov import lsqr
        >>> A = torch.tensor([[1.0, 2.0]], dtype=torch.float64)     # one equation, two unknowns
        >>> x, info = lsqr(A, torch.tensor([5.0], dtype=torch.float64))
        >>> x                                                         # A⁺ b
        tensor([1., 2.], dtype=torch.float64)
    """
    prob = normalize(A, b, x0, rtol=rtol, atol=atol, max_iter=max_iter, M=M, callback=callback,
                     check_every=check_every, solver="lsqr", square=False, need_rmv=True)
    return run(_LSQR(prob))
