"""Gradients of an iterative (Krylov) solve ``x = A(p)⁻¹ b`` — one adjoint solve, O(1) memory.

Derivation.  ``x`` solves ``A(p) x = b``.  Differentiating the equation (not the iterations)::

    A dx = db − dA x            dA x := ∂/∂p [A(p) x] · dp   (x held fixed)

Reverse mode: with ``u = A⁻ᵀ x̄`` (ONE adjoint Krylov solve, ``Aᵀ u = x̄``),
``⟨x̄, dx⟩ = ⟨u, db⟩ − ⟨u, dA x⟩``, so::

    b̄ = u,        p̄ = −(∂/∂p [A(p) x])ᵀ u = −vjp(p ↦ A(p) x)(u)

For a dense ``A`` that is ``Ā = −u xᵀ``; for a sparse ``A`` only the stored entries are
parameters, so ``Ā_ij = −u_i x_j`` on the pattern (a sparse gradient of the same layout).
Forward mode solves ``A ẋ = ḃ − Ȧ x`` with the same solver.  Only ``x``, the parameters (and
``b`` for least squares) are saved: the backward's memory does not depend on the number of
forward iterations.

Least squares (``lsqr``/``lsmr``, ``x = A⁺ b``, any shape and rank).  The adjoint solve is
``u = (Aᵀ)⁺ x̄ = A⁺ᵀ x̄`` by the same solver on ``Aᵀ``, and ``b̄ = u`` is exact.  A changing
``A`` moves range(A) and null(A) too (Golub & Pereyra 1973; see ``implicit/linear.py``)::

    Ā = −u xᵀ + r (A⁺u)ᵀ + (A⁺ᵀx)(P x̄)ᵀ,     r = b − A x,  P = I − A⁺A

The second term vanishes for a consistent system (``r = 0``), the third when ``x̄`` has no
component in null(A) (full column rank).  Each is the vjp of ``p ↦ A(p) v`` at a cotangent
(``v = A⁺u`` at ``r``; ``v = P x̄`` at ``A⁺ᵀx``); they cost up to three extra solves and are
skipped when ``‖r‖`` (resp. ``‖P x̄‖``) is below the solve tolerance.
"""

from __future__ import annotations

import copy
from typing import Any, NamedTuple, Optional

import torch

from .._core.defaults import default_rtol
from .._core.errors import InputError
from .._core.failure import apply_on_failure, nan_where_failed
from .._core.status import SolveInfo, Status
from .._core.validate import is_vmapped
from ..linalg.krylov import bicgstab, cg, gmres, lsmr, lsqr, minres
from ..linalg.krylov._common import fast_csr, quiet_sparse
from ..linalg.operator import LinearOperator, aslinearoperator

__all__ = ["IterativeSpec", "IterativeSolveFn", "iterative_solve", "SOLVERS", "CSRFromValues", "csr_from_values"]

SOLVERS = {"cg": cg, "minres": minres, "gmres": gmres, "bicgstab": bicgstab, "lsqr": lsqr, "lsmr": lsmr}
_LEAST_SQUARES = ("lsqr", "lsmr")


class IterativeSpec(NamedTuple):
    """Static options of a differentiable iterative solve (passed through ``autograd.Function``)."""

    solver: str
    rtol: Optional[float]
    atol: float
    max_iter: Optional[int]
    M: Any
    adjoint_rtol: Optional[float]
    adjoint_max_iter: Optional[int]
    adjoint_x0: Any
    kind: str  # "dense" | "sparse" | "matvec": how the parameters enter A

    def adjoint(self) -> "IterativeSpec":
        """The spec of the adjoint (and tangent) solves."""
        M = self.M.T if isinstance(self.M, LinearOperator) else self.M
        rtol = self.rtol if self.adjoint_rtol is None else self.adjoint_rtol
        max_iter = self.max_iter if self.adjoint_max_iter is None else self.adjoint_max_iter
        return self._replace(rtol=rtol, max_iter=max_iter, M=M)


_HINTS = {
    Status.MAX_ITERATIONS: "Raise adjoint_max_iter (default: max_iter), loosen adjoint_rtol, or pass a "
                           "preconditioner M",
    Status.BREAKDOWN: "The transposed operator broke the solver: for cg the operator must be symmetric positive "
                      "definite; try solver='gmres' or 'minres'",
    Status.NONFINITE: "The adjoint solve produced NaN/Inf: check the operator and the incoming gradient",
}


def _kind(op: LinearOperator) -> str:
    if op.matrix is not None and len(op.params) == 1 and op.params[0] is op.matrix:
        return "dense" if op.is_dense else "sparse"
    return "matvec"


def _transpose(op: LinearOperator) -> LinearOperator:
    if op.symmetric:
        return op
    if op.is_sparse:  # a transposed CSR copy: CSR matvecs are fast, dense @ sparse is not
        return LinearOperator.from_sparse(fast_csr(op.matrix.t()))
    return op.T


def _checked(spec: IterativeSpec, op: LinearOperator, rhs, x0, what: str):
    """A differentiable solve ``op x = rhs`` whose failure raises :class:`SolveError` (never a silent
    wrong gradient): the adjoint and tangent solves of the backward and the jvp."""
    spec = spec._replace(kind=_kind(op))
    x, status, residual, iters = IterativeSolveFn.apply(spec, op, rhs, x0, *op.params)
    # An element whose right-hand side is exactly zero has the solution 0, whatever its operator: a
    # failed element of a batch (zero cotangent, maybe NaN data) must not fail the others' backward.
    trivial = (rhs == 0).all(-1).expand(status.shape)
    x = torch.where(trivial.unsqueeze(-1), torch.zeros((), dtype=x.dtype, device=x.device), x)
    status = torch.where(trivial, int(Status.SUCCESS), status)
    residual = torch.where(trivial, torch.zeros((), dtype=residual.dtype, device=residual.device), residual)
    return _raise_if_failed(x, SolveInfo(status, residual, iters), spec, what)


def _raise_if_failed(x, info: SolveInfo, spec: IterativeSpec, what: str):
    """Raise :class:`SolveError` for failed elements; under ``vmap`` (nothing can be raised from
    data) the failed elements become NaN instead — never a silently wrong value."""
    if is_vmapped(info.status):
        return nan_where_failed(x, info.ok)
    rtol = default_rtol(x.dtype) if spec.rtol is None else spec.rtol
    max_iter = f"{spec.max_iter}" if spec.max_iter is not None else "10·n"
    return apply_on_failure(x, info, "raise", f"{what} (solver={spec.solver!r}, rtol={rtol:g}, max_iter={max_iter})",
                            _HINTS, policy_hint=False)


def _adjoint_x0(spec: IterativeSpec, op: LinearOperator, g):
    """Warm start of the adjoint solve ``Aᵀ u = g`` (``u`` in ``R^m``, ``g`` in ``R^n``)."""
    a = spec.adjoint_x0
    if isinstance(a, str):
        if a == "cotangent" and op.shape[0] == op.shape[1]:
            return g.detach()
        return None
    if isinstance(a, torch.Tensor):
        return a.detach()
    return a(g.detach())


def _vjp_params(kind: str, op: LinearOperator, params, v, cot, needs):
    """Cotangents of ``p ↦ A(p) v`` at ``cot`` (``(*batch, m)``), one per parameter."""
    if kind == "dense":
        (A,) = params
        g = cot.unsqueeze(-1) * v.unsqueeze(-2) if A.dim() > 2 else cot.reshape(-1, A.shape[-2]).mT @ v.reshape(
            -1, A.shape[-1])
        return (g.sum_to_size(A.shape),)
    if kind == "sparse":
        (A,) = params
        return (_sparse_outer(A, cot, v),)
    idx = [i for i, p in enumerate(params) if needs[i] and isinstance(p, torch.Tensor) and p.is_floating_point()]
    out = [None] * len(params)
    if idx:
        def f(*ps):
            full = list(params)
            for i, p in zip(idx, ps):
                full[i] = p
            return op.mv(v, *full)

        _, vjp_fn = torch.func.vjp(f, *(params[i] for i in idx))
        for i, g in zip(idx, vjp_fn(cot)):
            out[i] = g
    return tuple(out)


def _sparse_outer(A, u, x):
    """``Σ_batch u_i x_j`` on the stored pattern of the 2-D sparse ``A`` (same layout and indices)."""
    m, n = A.shape
    U, X = u.reshape(-1, m), x.reshape(-1, n)
    if A.layout == torch.sparse_csr:
        crow, cols = A.crow_indices(), A.col_indices()
        rows = torch.repeat_interleave(torch.arange(m, device=A.device), crow.diff())
        vals = (U[:, rows] * X[:, cols]).sum(0)
        with quiet_sparse():
            return torch.sparse_csr_tensor(crow, cols, vals, A.shape, check_invariants=False)
    idx = A._indices()
    vals = (U[:, idx[0]] * X[:, idx[1]]).sum(0)
    return torch.sparse_coo_tensor(idx, vals, A.shape, is_coalesced=A.is_coalesced(), check_invariants=False)


def _jvp_params(kind: str, op: LinearOperator, params, v, tangents):
    """``Ȧ v`` := ∂/∂p [A(p) v] · ṗ (``None`` when every tangent is ``None``)."""
    if all(t is None for t in tangents):
        return None
    if kind == "dense":
        return LinearOperator.from_dense(tangents[0]).mv(v)
    if kind == "sparse":
        raise InputError("forward mode wrt a sparse matrix is not supported (torch.func has no sparse "
                         "tensors); use reverse mode, or a matvec operator of the values")
    idx = [i for i, t in enumerate(tangents) if t is not None]

    def f(*ps):
        full = list(params)
        for i, p in zip(idx, ps):
            full[i] = p
        return op.mv(v, *full)

    prim = tuple(params[i] for i in idx)
    tang = tuple(tangents[i] for i in idx)
    try:
        return torch.func.jvp(f, prim, tang)[1]
    except RuntimeError as e:  # under torch.autograd.forward_ad: no nested forward AD; use a double vjp
        if "Nested forward mode" not in str(e):
            raise
        cot = torch.zeros_like(f(*prim))
        _, vjp_fn = torch.func.vjp(f, *prim)
        return torch.func.vjp(lambda c: vjp_fn(c), cot)[1](tang)[0]


def _finite(t):
    """``t`` with NaN/Inf entries replaced by 0 (differentiable where finite)."""
    if t is None:
        return None
    return torch.where(torch.isfinite(t), t, torch.zeros((), dtype=t.dtype, device=t.device))


def _add(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def _bound(spec: IterativeSpec, op: LinearOperator, params) -> LinearOperator:
    """``op`` on ``params``, the tensors its function was given or saved: functorch may wrap them, and
    ``op.params`` (those of the call) may belong to a transform level that has exited when the backward
    runs (an autograd backward through ``torch.func.hessian``)."""
    if all(p is q for p, q in zip(params, op.params)):
        return op
    op = copy.copy(op)
    op.params = tuple(params)
    op.matrix = params[0] if spec.kind != "matvec" else op.matrix
    return op


class IterativeSolveFn(torch.autograd.Function):
    """``x = A(params)⁻¹ b`` by a Krylov solver; inputs ``(spec, op, b, x0, *params)``.

    Returns ``(x, status, residual, iterations)``; only ``x`` is differentiable (wrt ``b`` and
    ``params``, the tensors ``op.mv`` depends on).  ``x0`` is a warm start, not differentiated.
    """

    @staticmethod
    def forward(spec, op, b, x0, *params):
        op = _bound(spec, op, params)
        x, info = SOLVERS[spec.solver](op, b, x0, rtol=spec.rtol, atol=spec.atol, max_iter=spec.max_iter, M=spec.M)
        return x, info.status, info.residual, info.iterations

    @staticmethod
    def setup_context(ctx, inputs, output):
        spec, op, b, _x0, *params = inputs
        x, *rest = output
        ctx.mark_non_differentiable(*rest)
        ctx.set_materialize_grads(False)
        ctx.spec, ctx.op = spec, op
        ctx.b_shape = b.shape
        keep_b = b if spec.solver in _LEAST_SQUARES else None
        ctx.save_for_backward(x, keep_b, *params)
        ctx.save_for_forward(x, keep_b, *params)

    @staticmethod
    def backward(ctx, gx, *_):
        nparams = len(ctx.needs_input_grad) - 4
        if gx is None:
            return (None,) * (4 + nparams)
        x, b, *params = ctx.saved_tensors
        # A failed element's NaN/Inf solution (or data) would reach every shared parameter as 0 · NaN
        # in p̄ = −vjp(p ↦ A(p) x)(u): zeroed (its own cotangent is zero once masked by the caller).
        x, b = _finite(x), _finite(b)
        spec, op = ctx.spec, _bound(ctx.spec, ctx.op, params)
        aspec = spec.adjoint()
        opT = _transpose(op)
        what = "the adjoint solve Aᵀu = x̄ in the backward of iterative_solve"
        u = _checked(aspec, opT, gx, _adjoint_x0(aspec, op, gx), what)
        gb = u.sum_to_size(ctx.b_shape) if ctx.needs_input_grad[2] else None
        needs = ctx.needs_input_grad[4:]
        gparams = (None,) * nparams
        if any(needs):
            gparams = _vjp_params(spec.kind, op, params, x, -u, needs)
            if spec.solver in _LEAST_SQUARES:
                gparams = _least_squares_terms(spec, op, opT, params, b, x, gx, u, needs, gparams)
        return (None, None, gb, None) + tuple(g if n else None for g, n in zip(gparams, needs))

    @staticmethod
    def jvp(ctx, _spec, _op, db, _dx0, *dparams):
        x, b, *params = ctx.saved_tensors
        spec, op = ctx.spec, _bound(ctx.spec, ctx.op, params)
        aspec = spec.adjoint()
        if spec.solver in _LEAST_SQUARES and any(t is not None for t in dparams):
            raise InputError("forward-mode derivatives wrt the operator's parameters are not implemented for "
                             "lsqr/lsmr (only wrt b); use reverse mode")
        rhs = db
        Adot_x = _jvp_params(spec.kind, op, params, x, dparams)
        if Adot_x is not None:
            rhs = -Adot_x if rhs is None else rhs - Adot_x
        if rhs is None:
            dx = torch.zeros_like(x)
        else:
            rhs = rhs.expand(*x.shape[:-1], rhs.shape[-1])
            dx = _checked(aspec, op, rhs, None, "the tangent solve A ẋ = ḃ − Ȧx in the jvp of iterative_solve")
        return dx, None, None, None

    @staticmethod
    def vmap(info, in_dims, spec, op, b, x0, *params):
        # The solvers batch natively: a vmapped dim of b (or x0) becomes a leading batch dim.
        _, _, db, dx0, *dps = in_dims
        if any(d is not None for d in dps):
            raise InputError("torch.func.vmap over the operator's parameters is not supported by iterative_solve: "
                             "vmap over b only, or batch a dense operator as a (*, m, n) matrix")
        b = b if db is None else b.movedim(db, 0)
        if x0 is not None and dx0 is not None:
            x0 = x0.movedim(dx0, 0)
        if db is None:  # only x0 is batched: give b the same leading dim
            b = b.expand(x0.shape[0], *b.shape)
        elif x0 is not None and dx0 is None:
            x0 = x0.expand(b.shape[0], *x0.shape)
        out = IterativeSolveFn.apply(spec, op, b, x0, *params)
        return out, (0, 0, 0, 0)


def _least_squares_terms(spec, op, opT, params, b, x, gx, u, needs, gparams):
    # p̄ += vjp(p ↦ A(p) A⁺u)(r) + vjp(p ↦ A(p) P x̄)(A⁺ᵀ x)   — see the module docstring.
    aspec = spec.adjoint()
    r = b.expand(*x.shape[:-1], b.shape[-1]) - op.mv(x)
    tol = aspec.rtol if aspec.rtol is not None else default_rtol(x.dtype)

    def small(t, ref):  # skip a term only when it is known to vanish (never under vmap: no data access)
        if is_vmapped(t):
            return False
        return bool((torch.linalg.vector_norm(t, dim=-1) <= tol * torch.linalg.vector_norm(ref, dim=-1)).all())

    what = "an extra least-squares solve in the backward of iterative_solve (lsqr/lsmr)"
    if not small(r, b.expand_as(r)):
        w = _checked(aspec, op, u, None, what)  # A⁺ u
        extra = _vjp_params(spec.kind, op, params, w, r, needs)
        gparams = tuple(_add(g, h) for g, h in zip(gparams, extra))
    Pgx = gx - _checked(aspec, op, op.mv(gx), None, what)  # (I − A⁺A) x̄
    if not small(Pgx, gx):
        z = _checked(aspec, opT, x, None, what)  # A⁺ᵀ x
        extra = _vjp_params(spec.kind, op, params, Pgx, z, needs)
        gparams = tuple(_add(g, h) for g, h in zip(gparams, extra))
    return gparams


def iterative_solve(op, b, *, solver="cg", rtol=None, atol=0.0, max_iter=None, M=None, x0=None,
                    adjoint_rtol=None, adjoint_max_iter=None, adjoint_x0="zero"):
    r"""Solve ``A x = b`` with a Krylov method, differentiably: the backward is one adjoint solve.

    Args:
        op: a :class:`~implicitdiff.linalg.LinearOperator` (or a dense / 2-D sparse tensor).
            Gradients flow to its ``params`` — a dense matrix, a sparse matrix's values (on its
            pattern; the gradient is sparse with the same layout and indices, never densified),
            or the tensors a matvec takes.
        b: ``(*, m)``; the leading dims are independent systems.
        solver: ``"cg"`` (symmetric positive definite), ``"minres"`` (symmetric),
            ``"gmres"``, ``"bicgstab"`` (square), ``"lsqr"``, ``"lsmr"`` (any shape and rank:
            ``x = A⁺ b``).
        rtol, atol, max_iter, M: the forward solve's options (see :mod:`implicitdiff.linalg.krylov`;
            stopping rule ``‖b − A x‖ ≤ max(rtol ‖b‖, atol)``).
        x0: warm start of the forward solve (not differentiated).
        adjoint_rtol, adjoint_max_iter: options of the adjoint solve ``Aᵀ u = x̄`` (default: the
            forward's ``rtol`` and ``max_iter``); the adjoint uses ``M.T`` for a LinearOperator ``M``.
        adjoint_x0: warm start of the adjoint solve: ``"zero"``, ``"cotangent"`` (``u₀ = x̄``, good
            for near-identity operators), a tensor, or a callable ``x̄ ↦ u₀``.

    Returns:
        ``(x, info)``: ``x`` of shape ``(*, n)`` and a :class:`~implicitdiff.SolveInfo` per element.
        The forward does not raise on non-convergence: apply the caller's policy with
        :func:`implicitdiff._core.failure.apply_on_failure`.

    The adjoint solve uses the same solver: on ``A`` itself when ``op`` is tagged symmetric, else
    on ``Aᵀ`` (``op.rmv``, derived by ``torch.func.vjp`` of the matvec when absent; a transposed
    CSR copy for a sparse ``A``).  Forward mode (``torch.func.jvp``) solves ``A ẋ = ḃ − Ȧ x``;
    for ``lsqr``/``lsmr`` it is implemented wrt ``b`` only, and not wrt a sparse matrix.
    ``torch.func.vmap`` (and ``jacrev``/``jacfwd``) work over ``b`` and ``x0`` (the vmapped dim
    becomes a batch dim of the solve), not over the operator's parameters; under ``vmap`` a failed
    adjoint solve gives NaN instead of raising.  Double backward works (the backward is itself
    built from differentiable solves).

    Raises:
        InputError: bad shapes, dtypes, an unknown solver.
        SolveError: in the backward (or jvp), when the adjoint (tangent) solve does not converge —
            with its status, residual and iterations — never a silently wrong gradient.

    Example:
        >>> import torch
        >>> from implicitdiff.implicit.iterative import iterative_solve
        >>> from implicitdiff.linalg.operator import LinearOperator
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64, requires_grad=True)
        >>> b = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
        >>> x, info = iterative_solve(LinearOperator.from_dense(A, positive_definite=True), b, solver="cg")
        >>> x.sum().backward()
        >>> torch.allclose(b.grad, torch.linalg.solve(A.detach().mT, torch.ones(2, dtype=torch.float64)))
        True
    """
    if solver not in SOLVERS:
        raise InputError(f"solver must be one of {tuple(SOLVERS)}, got {solver!r}")
    op = aslinearoperator(op)
    if not (adjoint_x0 in ("zero", "cotangent") or isinstance(adjoint_x0, torch.Tensor) or callable(adjoint_x0)):
        raise InputError(f"adjoint_x0 must be 'zero', 'cotangent', a tensor or a callable; got {adjoint_x0!r}")
    spec = IterativeSpec(solver, rtol, atol, max_iter, M, adjoint_rtol, adjoint_max_iter, adjoint_x0, _kind(op))
    x, status, residual, iters = IterativeSolveFn.apply(spec, op, b, x0, *op.params)
    return x, SolveInfo(status, residual, iters)


class CSRFromValues(torch.autograd.Function):
    """A CSR matrix from ``(crow, col, values)``, differentiable in ``values`` in O(nnz).

    ``torch.sparse_csr_tensor``'s own backward densifies its gradient (``grad.to_dense()``, PyTorch
    gh-107381): n² memory for an n × n matrix.  Here the gradient of ``values`` is read off a CSR
    gradient on the same pattern (what :func:`iterative_solve` returns) or gathered from a dense one.
    """

    @staticmethod
    def forward(crow, col, values, shape):
        with quiet_sparse():
            return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)

    @staticmethod
    def setup_context(ctx, inputs, output):
        crow, col, _values, _shape = inputs
        ctx.save_for_backward(crow, col)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, g):
        if g is None:
            return None, None, None, None
        crow, col = ctx.saved_tensors
        if g.layout == torch.sparse_csr and g.col_indices().shape == col.shape and bool(
                (g.col_indices() == col).all()) and bool((g.crow_indices() == crow).all()):
            return None, None, g.values(), None
        if g.layout != torch.strided:  # another pattern: the entries on ours (densifies, rare)
            g = g.to_dense()
        rows = torch.repeat_interleave(torch.arange(crow.numel() - 1, device=col.device), crow.diff())
        return None, None, g[rows, col.long()], None


def csr_from_values(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape) -> torch.Tensor:
    """``torch.sparse_csr_tensor(crow, col, values, shape)`` whose gradient wrt ``values`` costs O(nnz).

    E.g. ``iterative_solve(LinearOperator.from_sparse(csr_from_values(crow, col, v, (n, n))), b)``
    then ``backward()``: ``v.grad`` is ``−u_i x_j`` on the pattern, never an n × n tensor.  (A leaf
    CSR tensor with ``requires_grad_()`` works too: its ``.grad`` is a CSR on its own pattern.)
    """
    return CSRFromValues.apply(crow, col, values, tuple(shape))
