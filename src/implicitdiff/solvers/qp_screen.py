r"""Screening of a batch of QPs before the interior point: non-finite data and non-convex ``Q``.

An element whose data holds NaN/Inf, or whose ``Q`` is not positive semidefinite where it
matters, is not solved: it gets the status ``NONFINITE`` or ``NONCONVEX`` and its data is
replaced by a benign problem (``Q = I``, ``p = 0``, ``G = 0``, ``h = 1``, ``A = 0``, ``b = 0``)
so that nothing it holds can reach the other elements of the batch (a shared scale, a shared
factorization, a NaN in a reduction).

**The convexity test.**  ``Q`` is accepted when

    λ_min(Zᵀ Q Z) ≥ −psd_tol · max|Qᵢⱼ|,

with ``Z`` an orthonormal basis of the null space of ``A`` (``Z = I`` without equalities):
the objective is convex on the feasible set exactly when the reduced Hessian is positive
semidefinite.  The common case costs one batched Cholesky of ``Q``, which the ``"dual"``
factorization reuses: a Cholesky that succeeds proves ``Q ≻ 0``.  Only where it fails is
``Q + psd_tol·max|Qᵢⱼ|·I`` factored, and only where that fails too (a clearly indefinite
``Q``, or an indefinite ``Q`` that equalities may make convex) is the reduced Hessian's
smallest eigenvalue computed, element by element.  An element whose ``Q`` is indefinite but
whose reduced Hessian is semidefinite is solved as the equivalent convex problem
``½zᵀ(Q + ρAᵀA)z + (p − ρAᵀb)ᵀz`` (the same on the feasible set: same ``z``, ``λ``, ``ν``);
``ρ`` is returned so that the backward solves with the matrix that was factored.
``psd_tol`` is ``1e-8`` for float64 data,
``1e-5`` for float32 data (rounding of a singular ``LLᵀ`` in float32 gives eigenvalues of a
few ``1e-7·‖Q‖``).

Shapes as in :mod:`implicitdiff.solvers.qp_ipm` (one batch dim, ``1`` when shared).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .._core.status import Status
from ..linalg.kkt import absmax, cholesky_lower

__all__ = ["Screened", "screen"]


class Screened(NamedTuple):
    """The data to solve (bad elements replaced), their verdicts and the Cholesky of ``Q`` when it
    succeeded for every element (``None`` otherwise)."""

    data: tuple  # (Q, p, G, h, A, b)
    status: Optional[torch.Tensor]  # (B,) int64: -1 where the element is to be solved; None: all are
    LQ: Optional[torch.Tensor]
    rho: Optional[torch.Tensor] = None  # (B,): Q + ρAᵀA, p − ρAᵀb replaced Q, p (0: unchanged); None: all 0


def _finite(t, core, exact):
    """Whether each element of ``t`` is finite over its ``core`` dims.  Not ``exact``: a NaN or Inf entry
    makes its sum non-finite, so a finite sum proves the entries finite (one pass, no temporary of
    ``t``'s size); a non-finite sum (possibly an overflow of finite entries) needs the ``exact`` check."""
    dims = tuple(range(t.dim() - core, t.dim()))
    if t.numel() == 0:
        return torch.ones(t.shape[: t.dim() - core], dtype=torch.bool, device=t.device)
    if not dims:
        return torch.isfinite(t)
    return torch.isfinite(t).all(dim=dims) if exact else torch.isfinite(t.sum(dim=dims))


def _all_finite(data, exact):
    fin = _finite(*data[0], exact)
    for t, core in data[1:]:
        fin = fin & _finite(t, core, exact)
    return fin


def _replace(t, bad, value):
    """``t`` with the elements ``bad`` (``(B,)`` bool) set to ``value`` (broadcast over the core dims)."""
    B = bad.shape[0]
    t = t.expand(B, *t.shape[1:])
    mask = bad.reshape(B, *([1] * (t.dim() - 1)))
    return torch.where(mask, value.to(t.dtype) if torch.is_tensor(value) else torch.full_like(t, value), t)


def _reduced_min_eig(Q, A):
    """Smallest eigenvalue of ``Q`` (``(n, n)``) on the null space of ``A`` (``(k, n)``) (``inf`` if it is
    ``{0}``) and the smallest nonzero singular value of ``A``."""
    smin = 1.0
    if A.shape[0]:
        _, S, Vh = torch.linalg.svd(A, full_matrices=True)
        tol = (S.amax() if S.numel() else 0.0) * max(A.shape) * torch.finfo(A.dtype).eps
        r = int((S > tol).sum())
        smin = float(S[r - 1]) if r else 1.0
        Z = Vh[r:].mT
        if Z.shape[1] == 0:
            return float("inf"), smin
        Q = Z.mT @ Q @ Z
    return float(torch.linalg.eigvalsh(Q)[0]), smin


def _convexify(Q, A, tol, lam, smin):
    """The smallest ``ρ`` tried (×10 from ``(‖Q‖ + |λ_min|)/σ_min(A)²``) with ``Q + ρAᵀA ⪰ −tol``; ``None``: none."""
    AtA = A.mT @ A
    rho = (float(Q.abs().amax()) + abs(lam)) / smin ** 2
    for _ in range(8):
        if float(torch.linalg.eigvalsh(Q + rho * AtA)[0]) >= -tol:
            return rho
        rho *= 10
    return None


def screen(Q, p, G, h, A, b, psd_tol: float) -> Screened:
    """Find the elements that cannot be solved (see the module docstring) and neutralize them."""
    B = max(t.shape[0] for t in (Q, p, G, h, A, b))
    dev = p.device
    data = ((Q, 2), (p, 1), (G, 2), (h, 1), (A, 2), (b, 1))
    status = None
    if not bool(_all_finite(data, exact=False).all()):  # one sync
        bad = ~_all_finite(data, exact=True).expand(B)
        status = torch.where(bad, int(Status.NONFINITE), -1)
        Q, p, G, h, A, b = _neutralize(bad, Q, p, G, h, A, b)
    qs = absmax(Q, (-2, -1))
    if not bool(qs.any()):  # Q = 0 (LPs): semidefinite, nothing to factor
        return Screened((Q, p, G, h, A, b), status, None)
    LQ, info = cholesky_lower(Q)
    if bool((info == 0).all()):
        return Screened((Q, p, G, h, A, b), status, LQ)
    # Q is not positive definite somewhere: is it (within psd_tol) semidefinite where it matters?
    eye = torch.eye(Q.shape[-1], dtype=Q.dtype, device=dev)
    _, info2 = torch.linalg.cholesky_ex(Q + (psd_tol * qs)[:, None, None] * eye)
    cand = (info != 0) & (info2 != 0) & (qs > 0)
    if bool(cand.any()):
        cand = cand.expand(B)
        nonconvex = torch.zeros(B, dtype=torch.bool, device=dev)
        rho = torch.zeros(B, dtype=Q.dtype, device=dev)
        for i in torch.nonzero(cand).reshape(-1).tolist():
            Qi = Q[i if Q.shape[0] > 1 else 0]
            Ai = A[i if A.shape[0] > 1 else 0]
            tol = psd_tol * float(qs[i if qs.shape[0] > 1 else 0])
            lam, smin = _reduced_min_eig(Qi, Ai)
            if lam < -tol:
                nonconvex[i] = True
            elif Ai.shape[0]:  # indefinite, convex on null(A): minimize ½zᵀ(Q + ρAᵀA)z + (p − ρAᵀb)ᵀz instead
                r = _convexify(Qi, Ai, tol, float(torch.linalg.eigvalsh(Qi)[0]), smin)
                nonconvex[i] = r is None
                rho[i] = 0.0 if r is None else r
        if bool(nonconvex.any()):
            new = torch.where(nonconvex, int(Status.NONCONVEX), -1)
            status = new if status is None else torch.where(status >= 0, status, new)
            Q, p, G, h, A, b = _neutralize(nonconvex, Q, p, G, h, A, b)
        if bool((rho > 0).any()):
            AtA = A.mT @ A
            Q = Q + rho[:, None, None] * AtA
            p = p - rho[:, None] * (b.unsqueeze(-2) @ A).squeeze(-2)
            return Screened((Q, p, G, h, A, b), status, None, rho)
    return Screened((Q, p, G, h, A, b), status, None)


def _neutralize(bad, Q, p, G, h, A, b):
    n = Q.shape[-1]
    eye = torch.eye(n, dtype=Q.dtype, device=Q.device)
    return (_replace(Q, bad, eye), _replace(p, bad, 0.0), _replace(G, bad, 0.0), _replace(h, bad, 1.0),
            _replace(A, bad, 0.0), _replace(b, bad, 0.0))
