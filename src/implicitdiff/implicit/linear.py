"""Gradients of ``X = A⁺ B`` under a solution map — the one place they are defined.

Two ``autograd.Function``\\ s:

* :class:`SolveFn` factorizes ``A`` for a selection, solves, reports a status per
  batch element and hands its factors to the backward;
* :class:`FactoredSolveFn` applies ``A⁺`` or ``A⁺ᵀ`` with given factors.  Both
  differentiate with the formulas below, written with ``FactoredSolveFn``
  itself, so that every derivative order reuses the one factorization.

Derivation (the seed note, generalized; cf. Golub & Pereyra 1973).  For
``X = A⁺ B`` with ``A`` of locally constant rank, write ``R = B − A X`` (the
least-squares residual) and ``P = I − A⁺A`` (the projector onto null(A)).
Differentiating ``A⁺`` gives::

    dX = A⁺ (dB − dA X)                 # the square-invertible part: A dX = dB − dA X
       + A⁺ A⁺ᵀ dAᵀ R                   # range(A) moves, B is not in it (least squares)
       + P dAᵀ A⁺ᵀ X                    # null(A) moves (minimum norm)

The second term vanishes when ``A`` has full row rank (``R = 0``), the third
when it has full column rank (``P = 0``); for a square invertible ``A`` only
``dX = A⁻¹(dB − dA X)`` remains, the seed's ``A dy/dx = I``.  Transposing,
with ``U = A⁺ᵀ X̄``::

    B̄ = U
    Ā = −U Xᵀ + R (A⁺ U)ᵀ + (A⁺ᵀ X)(P X̄)ᵀ

``A⁺ᵀ B`` is ``(Aᵀ)⁺ B``: the adjoint apply uses the same formulas with ``A``
replaced by ``Aᵀ`` (rows and columns, so the two rank flags swap).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .._core.status import Status
from ..linalg.factorization import from_tensors, rank_flags as _flags
from ..linalg.selection import consistency_rtol, factorize

__all__ = ["SolveSpec", "SolveFn", "FactoredSolveFn", "solve"]


class SolveSpec(NamedTuple):
    """Static options of a solve (hashable, passed through ``autograd.Function``)."""

    selection: str  # concrete: "exact" | "min_norm" | "least_squares"
    solver: str = "auto"
    rank_rtol: Optional[float] = None
    rtol: Optional[float] = None  # consistency tolerance of "exact" on non-square systems
    residual: bool = True  # measure ‖AX − B‖ even when nothing needs it (return_info)


def _apply(kind, adjoint, A, V, factors):
    """``A⁺ V`` (``adjoint``: ``A⁺ᵀ V``), differentiable in ``A`` and ``V`` when grad mode is on.

    Inside a first-order backward (grad mode off) the factors are applied
    directly: no graph is recorded, so the Function's bookkeeping is not needed.
    """
    if torch.is_grad_enabled():
        return FactoredSolveFn.apply(kind, adjoint, A, V, *factors)
    return from_tensors(kind, factors).solve(V, adjoint)


def _vjp(kind, adjoint, A, B, X, gX, factors, need_A, need_B):
    """Cotangents ``(Ā, B̄)`` of ``X = M B`` with ``M = A⁺`` (or ``A⁺ᵀ`` if ``adjoint``)."""
    row, col = _flags(kind)
    if adjoint:
        row, col = col, row
    Am = A.mT if adjoint else A
    U = _apply(kind, not adjoint, A, gX, factors)  # Mᵀ X̄
    gA = None
    if need_A:
        gAm = -U @ X.mT
        if not row:
            R = B - Am @ X
            gAm = gAm + R @ _apply(kind, adjoint, A, U, factors).mT
        if not col:
            W = _apply(kind, not adjoint, A, X, factors)
            PgX = gX - _apply(kind, adjoint, A, Am @ gX, factors)
            gAm = gAm + W @ PgX.mT
        gA = gAm.mT if adjoint else gAm
        gA = gA.sum_to_size(A.shape)
    gB = U.sum_to_size(B.shape) if need_B else None
    return gA, gB


def _jvp(kind, adjoint, A, B, X, dA, dB, factors):
    """Tangent ``dX`` of ``X = M B`` (``M = A⁺`` or ``A⁺ᵀ``)."""
    row, col = _flags(kind)
    if adjoint:
        row, col = col, row
    rhs = torch.zeros_like(X[..., :1, :]) if dB is None else dB
    Am = A.mT if adjoint else A
    if dA is not None:
        dAm = dA.mT if adjoint else dA
        rhs = rhs - dAm @ X
    dX = _apply(kind, adjoint, A, rhs, factors)
    if dA is not None:
        if not row:
            R = B - Am @ X
            dX = dX + _apply(kind, adjoint, A, _apply(kind, not adjoint, A, dAm.mT @ R, factors), factors)
        if not col:
            v = dAm.mT @ _apply(kind, not adjoint, A, X, factors)
            dX = dX + v - _apply(kind, adjoint, A, Am @ v, factors)
    return dX


def _move_front(x, bdim, logical_batch, total_batch):
    """Move a vmapped dim to the front and pad the logical batch dims to ``total_batch``."""
    if bdim is None:
        return x
    x = x.movedim(bdim, 0)
    pad = total_batch - logical_batch
    return x.reshape(x.shape[:1] + (1,) * pad + x.shape[1:])


class FactoredSolveFn(torch.autograd.Function):
    """``X = A⁺ B`` (or ``A⁺ᵀ B``) with precomputed factors of ``A``; differentiable at every order."""

    generate_vmap_rule = True

    @staticmethod
    def forward(kind, adjoint, A, B, *factors):
        return from_tensors(kind, factors).solve(B, adjoint)

    @staticmethod
    def setup_context(ctx, inputs, output):
        kind, adjoint, A, B, *factors = inputs
        ctx.kind, ctx.adjoint = kind, adjoint
        ctx.save_for_backward(A, B, output, *factors)
        ctx.save_for_forward(A, B, output, *factors)

    @staticmethod
    def backward(ctx, gX):
        A, B, X, *factors = ctx.saved_tensors
        gA, gB = _vjp(ctx.kind, ctx.adjoint, A, B, X, gX, factors, ctx.needs_input_grad[2], ctx.needs_input_grad[3])
        return (None, None, gA, gB) + (None,) * len(factors)

    @staticmethod
    def jvp(ctx, _k, _a, dA, dB, *_f):
        A, B, X, *factors = ctx.saved_tensors
        return _jvp(ctx.kind, ctx.adjoint, A, B, X, dA, dB, factors)


class SolveFn(torch.autograd.Function):
    """Factorize ``A`` (``(*, m, n)``) for a selection and solve ``A X = B`` (``B``: ``(*, m, k)``).

    Returns ``(X, status, residual, rank, cond, kind, *factors)``; only ``X`` is
    differentiable.  ``residual`` is ``‖A X − B‖_F / ‖B‖_F`` per element (NaN, "not
    measured", when ``spec.residual`` is off and nothing failed).
    """

    @staticmethod
    def forward(spec, A, B):
        # The layer validates its inputs; under vmap (or with check_finite=False) it cannot look at the data: an element with
        # NaN/Inf is reported NONFINITE below and set to NaN by the failure policy (the SVD path
        # zeroes such entries before LAPACK sees them).  A sum is non-finite iff an entry is (or
        # the sum overflows, which is reported the same way).
        finite_A = torch.isfinite(A.sum(dim=(-2, -1)))  # NaN/Inf propagate through a sum (±Inf: NaN)
        finite_B = torch.isfinite(B.sum(dim=(-2, -1)))
        fact, status, rank, cond = factorize(A, spec.selection, spec.solver, spec.rank_rtol)
        X = fact.solve(B)
        batch = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
        status = status.expand(batch)
        consistency = spec.selection == "exact" and A.shape[-2] != A.shape[-1]
        if spec.residual or consistency or bool((status != 0).any()):
            # ‖AX − B‖ costs a matrix product: measured when reported or needed (one host read)
            R = A @ X - B
            rnorm = torch.linalg.matrix_norm(R)
            bnorm = torch.linalg.matrix_norm(B)
            residual = rnorm / torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm))
        else:
            residual = torch.full(batch, float("nan"), dtype=X.dtype, device=X.device)  # not measured
        if consistency:
            tol = consistency_rtol(A.dtype) if spec.rtol is None else spec.rtol
            anorm = torch.linalg.matrix_norm(A)
            xnorm = torch.linalg.matrix_norm(X)
            inconsistent = rnorm > tol * (anorm * xnorm + bnorm)
            status = torch.where(inconsistent & (status == 0), int(Status.INCONSISTENT), status)
        status = torch.where(torch.isfinite(X).flatten(-2).all(-1) | (status != 0), status, int(Status.NONFINITE))
        status = torch.where(finite_A & finite_B, status, int(Status.NONFINITE))
        return (X, status, residual, rank.expand(batch), cond.expand(batch), fact.kind) + tuple(fact.tensors())

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, A, B = inputs
        X, status, residual, rank, cond, kind, *factors = output
        ctx.mark_non_differentiable(status, residual, rank, cond, *factors)
        ctx.set_materialize_grads(False)  # no zero cotangents for the factor outputs (an n × n LU)
        ctx.kind = kind
        ctx.save_for_backward(A, B, X, *factors)
        ctx.save_for_forward(A, B, X, *factors)

    @staticmethod
    def backward(ctx, gX, *_):
        A, B, X, *factors = ctx.saved_tensors
        if gX is None:
            return None, None, None
        gA, gB = _vjp(ctx.kind, False, A, B, X, gX, factors, ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        return None, gA, gB

    @staticmethod
    def jvp(ctx, _s, dA, dB):
        A, B, X, *factors = ctx.saved_tensors
        dX = _jvp(ctx.kind, False, A, B, X, dA, dB, factors)
        return (dX, None, None, None, None, None) + (None,) * len(factors)

    @staticmethod
    def vmap(info, in_dims, spec, A, B):
        _, da, db = in_dims
        la = A.dim() - 2 - (da is not None)
        lb = B.dim() - 2 - (db is not None)
        L = max(la, lb)
        A_ = _move_front(A, da, la, L)
        B_ = _move_front(B, db, lb, L)
        out = SolveFn.apply(spec, A_, B_)
        nfact = len(out) - 6
        fdim = 0 if da is not None else None
        return out, (0, 0, 0, 0, 0, None) + (fdim,) * nfact


def solve(spec: SolveSpec, A: torch.Tensor, B: torch.Tensor):
    """Differentiable ``X = A⁺ B`` under ``spec``; returns ``(X, status, residual, rank, cond)``."""
    X, status, residual, rank, cond, _kind, *_ = SolveFn.apply(spec, A, B)
    return X, status, residual, rank, cond
