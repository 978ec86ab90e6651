"""Conjugate gradients for symmetric positive definite operators, batched."""

from __future__ import annotations

import torch

from ._common import Iteration, KrylovResult, and_active, col, dot, normalize, norm, run

__all__ = ["cg"]


class _CG(Iteration):
    # Preconditioned CG (Hestenes–Stiefel), with z = M r:
    #   α = rᵀz / pᵀAp,  x ← x + α p,  r ← r − α A p,  β = r₊ᵀz₊ / rᵀz,  p ← z₊ + β p.
    # A frozen lane gets α = β = 0, so its x and r do not move (no vector-sized torch.where).
    # Breakdown: pᵀAp ≤ 0 (A not positive definite along p) or rᵀz < 0 (M not positive definite).
    # Without M, rᵀz = ‖r‖², so the stopping rule is tested as ‖r‖² ≤ tol² (no extra reduction).

    def init(self, x):
        prob = self.prob
        self.x = x
        self.r = prob.b - prob.mv(x)
        z = self.r if prob.M is None else prob.M(self.r)
        self.p = z
        self.rz = dot(self.r, z)
        self.tol2 = prob.tol ** 2
        self.broken = self.rz < 0

    @property
    def rnorm(self):
        return self.rz.clamp(min=0).sqrt() if self.prob.M is None else norm(self.r)

    def converged(self):
        if self.prob.M is None:
            return ~(self.rz > self.tol2)  # NaN stops as well (reported NONFINITE, or BREAKDOWN on finite data)
        return ~(norm(self.r) > self.prob.tol)

    def step(self, active):
        mv, M = self.prob.mv, self.prob.M
        p, rz = self.p, self.rz
        Ap = mv(p)
        pAp = dot(p, Ap)
        go = and_active(active, pAp > 0)
        if active is None:  # one active system: only the breakdown needs a guard
            alpha = col(torch.where(go, rz / pAp, 0.0))
        else:
            alpha = col(torch.where(go, rz, 0.0) / torch.where(go, pAp, 1.0))
        self.x = torch.addcmul(self.x, alpha, p)
        r = self.r = torch.addcmul(self.r, alpha, Ap, value=-1)
        z = r if M is None else M(r)
        rz_new = dot(r, z)
        # rᵀz > 0 on an active lane (else it would have converged or broken down)
        beta = rz_new / rz if active is None else torch.where(go, rz_new, 0.0) / torch.where(go, rz, 1.0)
        self.p = torch.addcmul(z, col(beta), p)
        self.rz = rz_new
        self.broken = pAp <= 0 if M is None else (pAp <= 0) | (rz_new < 0)

    def solution(self):
        return self.x


def cg(A, b, x0=None, *, rtol=None, atol=0.0, max_iter=None, M=None, callback=None,
       check_every=None) -> KrylovResult:
    r"""Solve ``A x = b`` for a symmetric positive definite ``A`` by (preconditioned) conjugate gradients.

    Stopping rule, per batch element: ``‖b − A x‖ ≤ max(rtol · ‖b‖, atol)``, tested on
    the recursive residual and confirmed on the true residual (see
    :mod:`implicitdiff.linalg.krylov`).

    Args:
        A: ``(*, n, n)`` dense tensor (batch dims broadcast with ``b``), 2-D ``torch.sparse``
            COO/CSR tensor, :class:`~implicitdiff.linalg.LinearOperator`, or a callable
            ``x -> A x`` on ``(..., n)``. Must be symmetric positive definite.
        b: ``(*, n)``; leading dims are independent systems, each converging on its own.
        x0: initial guess ``(*, n)`` (default zeros).
        rtol, atol: tolerances of the stopping rule; ``rtol`` defaults to
            ``default_rtol(dtype)`` (1e-6 in float32, 1e-10 in float64).
        max_iter: iteration limit (default ``10 n``).
        M: preconditioner ``r -> M r ≈ A⁻¹ r`` (callable on ``(..., n)``, LinearOperator or
            tensor), symmetric positive definite, e.g. :func:`implicitdiff.linalg.jacobi`.
        callback: called as ``callback(x)`` after every iteration (forces a host sync).
        check_every: read the global "all converged" flag every this many iterations
            (default 1 on CPU, 10 on CUDA); converged elements stay frozen meanwhile.

    Returns:
        :class:`KrylovResult` ``(x, info)``: ``x`` of shape ``(*, n)``; ``info.status`` is
        ``SUCCESS``, ``MAX_ITERATIONS`` or ``BREAKDOWN`` per element, ``info.residual`` the
        true ``‖b − A x‖ / ‖b‖``, ``info.iterations`` the iterations each element used.

    Failure modes (reported, never raised): ``BREAKDOWN`` when ``pᵀAp ≤ 0`` (``A`` is not
    positive definite — use :func:`minres` for symmetric indefinite ``A``) or ``rᵀMr < 0``
    (``M`` is not positive definite), when the true residual stagnates, or when the iterates overflow
    on finite data (a singular ``A`` with ``b`` outside its range: CG divides by a vanishing curvature);
    ``MAX_ITERATIONS``; ``NONFINITE`` (NaN/Inf in ``b``, ``x0``, ``A`` or ``M``). Bad shapes/dtypes raise :class:`~implicitdiff.InputError`.

    Example:
        >>> import torch
        >>> from implicitdiff.linalg.krylov import cg
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> x, info = cg(A, torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=torch.float64))
        >>> torch.allclose(A @ x[0], torch.tensor([1.0, 2.0], dtype=torch.float64)), info.status.tolist()
        (True, [0, 0])
    """
    prob = normalize(A, b, x0, rtol=rtol, atol=atol, max_iter=max_iter, M=M, callback=callback,
                     check_every=check_every, solver="cg")
    return run(_CG(prob))
