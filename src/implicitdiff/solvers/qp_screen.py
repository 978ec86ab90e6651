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
from ..linalg.kkt import absmax, cholesky_lower_

__all__ = ["Screened", "screen"]


class Screened(NamedTuple):
    """The data to solve (bad elements replaced), their verdicts and the Cholesky of ``Q`` when it
    succeeded for every element (``None`` otherwise)."""

    data: tuple  # (Q, p, G, h, A, b)
    status: Optional[torch.Tensor]  # (B,) int64: -1 where the element is to be solved; None: all are
    LQ: Optional[torch.Tensor]
    scale: float  # 1 + the largest |entry| of the returned Q, G, A over the batch
    rho: Optional[torch.Tensor] = None  # (B,): Q + ρAᵀA, p − ρAᵀb replaced Q, p (0: unchanged); None: all 0


def _sizes(Q, G, A):
    """``max |entry|`` of ``Q``, ``G`` and ``A`` per element (``(B|1,)`` each, 0 for an empty block).

    One pass each (:func:`~implicitdiff.linalg.kkt.absmax`), and they also decide finiteness exactly:
    ``amax``/``amin`` propagate NaN and ±Inf, so a finite size proves the matrix finite (no separate pass)."""
    return tuple(absmax(t, (-2, -1)) if t.numel() else t.new_zeros(t.shape[:-2]) for t in (Q, G, A))


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
    status = None
    sizes = _sizes(Q, G, A)
    fin = torch.isfinite(p).all(-1) & torch.isfinite(h).all(-1) & torch.isfinite(b).all(-1)
    for t in sizes:
        fin = fin & torch.isfinite(t)
    if not bool(fin.all()):  # one sync
        bad = ~fin.expand(B)
        status = torch.where(bad, int(Status.NONFINITE), -1)
        Q, p, G, h, A, b = _neutralize(bad, Q, p, G, h, A, b)
        sizes = tuple(torch.where(bad, float(v), t.expand(B)) for t, v in zip(sizes, (1, 0, 0)))  # Q = I, G = A = 0
    qs = sizes[0]
    qmax, scale = _top(sizes)
    if qmax == 0:  # Q = 0 (LPs): semidefinite, nothing to factor
        return Screened((Q, p, G, h, A, b), status, None, scale)
    LQ, info = cholesky_lower_(Q.clone(memory_format=torch.contiguous_format))  # (cheaper than its triangle copy)
    if bool((info == 0).all()):
        return Screened((Q, p, G, h, A, b), status, LQ, scale)
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
        convexified = bool((rho > 0).any())
        if convexified:
            AtA = A.mT @ A
            Q = Q + rho[:, None, None] * AtA
            p = p - rho[:, None] * (b.unsqueeze(-2) @ A).squeeze(-2)
        scale = _top(_sizes(Q, G, A))[1]  # of the data as changed
        if convexified:
            return Screened((Q, p, G, h, A, b), status, None, scale, rho)
    return Screened((Q, p, G, h, A, b), status, None, scale)


def _top(sizes):
    """``(max |Qᵢⱼ|, 1 + max |entry| of Q, G, A)`` over the batch, in one host read."""
    top = torch.stack([t.amax() for t in sizes]).tolist()
    return top[0], 1 + max(top)


def _neutralize(bad, Q, p, G, h, A, b):
    n = Q.shape[-1]
    eye = torch.eye(n, dtype=Q.dtype, device=Q.device)
    return (_replace(Q, bad, eye), _replace(p, bad, 0.0), _replace(G, bad, 0.0), _replace(h, bad, 1.0),
            _replace(A, bad, 0.0), _replace(b, bad, 0.0))
