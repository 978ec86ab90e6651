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

:func:`fast_square_solve`, the eager path of a square dense solve, has no Function of its own (its
docstring says why).  Its screen is a string of small ops, two of them arranged for speed:

* the scalars are read by :func:`_read`: an ``item()`` each on the CPU, where a read is no sync
  and four ``item()`` calls cost less than ``stack`` + ``tolist`` (at small ``n`` each op dropped
  shows), one stacked read (one sync) on other devices;
* ``‖A‖_F`` is taken before the solve, not after: the solve's copy of ``A`` (LAPACK factorizes a
  copy) then reads ``A`` from cache, where after the factorization ``A`` has left it — a large
  ``A`` is read from memory once instead of twice (docs/benchmarks.md, eighth session).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from .._core.defaults import eps
from .._core.status import Status
from .._core.torch_private import solve_keeping_lu
from ..linalg.factorization import from_tensors, rank_flags as _flags
from ..linalg.selection import consistency_rtol, factorize

__all__ = ["SolveSpec", "SolveFn", "FactoredSolveFn", "solve", "fast_square_solve"]


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
        # the cheap screened condition estimate unless the caller reports it (return_info)
        fact, status, rank, cond = factorize(A, spec.selection, spec.solver, spec.rank_rtol, screen=not spec.residual)
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


# ----------------------------------------------------------------------------- the eager fast path
_GENERIC: dict = {}


def _generic_vector(n, dtype, device):
    """``(z, ‖z‖₁, eps)``: a fixed vector with no structure (cos of the golden angle × i), cached per size."""
    key = (n, dtype, device)
    z = _GENERIC.get(key)
    if z is None:
        z = torch.cos(torch.arange(n, dtype=dtype, device=device) * 2.399963229728653).unsqueeze(-1)
        _GENERIC[key] = z = (z, float(z.abs().sum()), eps(dtype))
    return z


def fast_square_solve(A: torch.Tensor, b: torch.Tensor, vector: bool, rank_rtol: float | None = None):
    """``y = A⁻¹ b`` for a square dense ``A`` that is clearly nonsingular, or ``None`` when in doubt.

    The eager path of ``linear_solve`` (outside ``torch.func`` transforms; ``b`` is ``(*, n)`` when
    ``vector``, else ``(*, n, k)``, with ``A``'s batch shape).  The solve is ``torch.linalg.solve``'s
    own op (:func:`~implicitdiff._core.torch_private.solve_keeping_lu`; a large row-major ``A`` goes
    in as the transposed system, so that LAPACK factorizes ``Aᵀ`` without copying ``A``): one LU,
    one solve, and torch's compiled autograd formulas — ``B̄ = A⁻ᵀ Ȳ`` with the same LU,
    ``Ā = −B̄ Yᵀ``; forward mode; a double backward differentiates that formula (factorizing ``A``
    once more), whereas the general path (:class:`SolveFn`) reuses its factors at every order.  A
    Python ``autograd.Function`` costs more than the whole solve at ``n ≲ 100`` (binding, a Python
    backward): that is why this path has none.

    What this path adds is the screen, read with at most one host sync.  Two lower bounds on ``‖A⁻¹‖₁``:
    the LU's pivots (``max 1/|u_ii| ≤ n ‖A⁻¹‖₁``, as
    :func:`implicitdiff.linalg.factorization.screened_rcond`) and ``‖A⁻¹ z̃‖₁ / ‖z̃‖₁`` for a
    generic vector: with ``A = P L U`` it is ``z̃ = P z`` and ``A⁻¹ z̃ = U⁻¹ L⁻¹ z`` — two triangular
    solves with the factors, no permutation (``lu_solve`` would also check the pivots, a third of
    the screen's time at small ``n``); with the LU of ``Aᵀ``, ``‖A⁻¹ z‖₁ = ‖L⁻ᵀ U⁻ᵀ z‖₁``.  The
    pivots alone miss a matrix whose pivots are all 1 but whose condition is ~2ⁿ (the ill
    conditioning is in ``L``); the solve does not.  ``‖A‖_F`` and the sum of ``y`` are finite iff
    the data are.  It returns ``y`` only when the bound on the reciprocal condition number is above
    ``sqrt(rank_rtol)`` (a margin of about 10⁷ in float64 over the singularity threshold
    ``rank_rtol``) and everything is finite; otherwise ``None``, and the caller takes the general
    path, which estimates, reports and raises.
    """
    # ‖A‖_F / √n ≤ ‖A‖₁, so the bound below stays an upper bound on rcond (looser by ≤ n, which the
    # margin absorbs); NaN/Inf iff A has them (or ‖A‖_F overflows: then the general path runs).  The
    # 2-norm is torch's fastest full reduction (max|a_ij| by vector_norm(inf) or amax is slower).
    # Taken before the solve, whose copy of A then finds it in cache (the module docstring).
    A_ = A.detach()
    fro = torch.linalg.vector_norm(A_) if A.dim() == 2 else torch.linalg.vector_norm(A_.flatten(-2), dim=-1)
    X, LU_, _, _, transposed = solve_keeping_lu(A, b, vector)
    if transposed is None:  # an LU this torch lays out otherwise: no screen, so no fast path
        return None
    n = A.shape[-1]
    z, zsum, eps_ = _generic_vector(n, A.dtype, A.device)
    tol = eps_ * n if rank_rtol is None else rank_rtol
    if transposed:  # LU_ factorizes Aᵀ: A⁻¹z = P L⁻ᵀ U⁻ᵀ z
        F = LU_.mT
        W = torch.linalg.solve_triangular(F, torch.linalg.solve_triangular(F, z, upper=False), upper=True,
                                          unitriangular=True)
    else:  # A⁻¹(P z) = U⁻¹ L⁻¹ z
        W = torch.linalg.solve_triangular(LU_, torch.linalg.solve_triangular(LU_, z, upper=False,
                                                                           unitriangular=True), upper=True)
    if LU_.dim() == 2:  # one system: four scalars, the arithmetic in Python
        e, d, a, xsum = _read(torch.linalg.vector_norm(W, 1), torch.linalg.vector_norm(LU_.diagonal(), -math.inf),
                              fro, X.detach().sum())
        # rcond ≤ min(‖z‖₁ / ‖A⁻¹z‖₁, n·min|u_ii|) / (‖A‖_F/√n)  (lower bounds on ‖A⁻¹‖₁ and ‖A‖₁)
        worst = min(zsum / e if e > 0 else math.inf, n * d) * n ** 0.5 / a if a > 0 else 0.0
    else:
        est = torch.linalg.vector_norm(W, 1, dim=(-2, -1))
        dmin = torch.linalg.vector_norm(LU_.diagonal(dim1=-2, dim2=-1), -math.inf, dim=-1)
        bound = torch.minimum(zsum / est, n * dmin) / fro
        worst, xsum = _read(bound.amin() * n ** 0.5, X.detach().sum())
    if not (worst >= max(tol ** 0.5, tol) and math.isfinite(worst) and math.isfinite(xsum)):
        return None
    return X


def _read(*scalars: torch.Tensor) -> list:
    """The values of 0-dim tensors as Python floats: an ``item()`` each on the CPU, one stacked read elsewhere."""
    return [t.item() for t in scalars] if scalars[0].is_cpu else torch.stack(scalars).tolist()
