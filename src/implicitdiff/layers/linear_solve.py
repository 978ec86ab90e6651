"""``linear_solve``: a differentiable solve of ``A y = b`` with an explicit solution map.

The layer validates its inputs, turns a selection into a factorization and a
solve (:mod:`implicitdiff.implicit.linear` owns the gradients), and applies
the failure policy.  :class:`~implicitdiff.Nearest` and
:class:`~implicitdiff.Pinned` are reduced to minimum-norm and square solves by
differentiable changes of variables, so their gradients come from the same
place.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .._core.errors import InputError
from .._core.options import check_bool, check_real
from .._core.failure import apply_on_failure, check_on_failure, nan_where_failed
from .._core.status import SolveInfo, Status
from .._core.validate import FLOAT_DTYPES, as_float_tensor, check_finite, check_same_dtype_device, in_transform, is_vmapped
from ..implicit.iterative import iterative_solve
from ..implicit.linear import SolveSpec, fast_square_solve, solve
from ..implicit.sparse_direct import splu_solve
from ..linalg.operator import LinearOperator, aslinearoperator
from ..linalg.selection import Nearest, Pinned, consistency_rtol, not_symmetric, resolve_selection
from ..linalg.solvers import Solver, as_solver, is_matrix_free

__all__ = ["linear_solve", "linear_solve_ex", "ambiguity"]

_HINTS = {
    Status.SINGULAR: ("A is singular: use selection='min_norm' with solver='auto' or 'svd' (pseudo-inverse), or a "
                      "Pinned/Nearest selection; under solver='cholesky' A may instead be not positive definite "
                      "or not symmetric (use solver='lu')"),
    Status.INCONSISTENT: "b is not in the range of A: use selection='least_squares' or 'min_norm'",
    Status.RANK_DEFICIENT: ("use selection='min_norm' with solver='auto' or 'svd' for the minimum-norm "
                            "least-squares solution"),
    Status.NONFINITE: "check A and b for extreme values or use solver='svd'",
}


class _Problem(NamedTuple):
    A: torch.Tensor
    B: torch.Tensor
    vector: bool


def _prepare(A, b) -> _Problem:
    if isinstance(A, LinearOperator):
        if A.is_dense:
            A = A.matrix
        elif A.is_sparse:
            A = A.matrix.to_dense()  # direct solve of a sparse matrix: dense factors
        else:  # unreachable from linear_solve (matrix-free operators take the iterative path)
            raise InputError("a matrix-free LinearOperator needs an iterative solver: pass solver='cg', 'minres', "
                             "'gmres', 'bicgstab', 'lsqr' or 'lsmr'")
    elif isinstance(A, torch.Tensor) and A.layout != torch.strided:
        A = A.to_dense()
    A = as_float_tensor("A", A)
    if A.dim() < 2:
        raise InputError(f"A must have shape (*, m, n), got {tuple(A.shape)}")
    _no_meta("A", A)
    b = as_float_tensor("b", b, like=A)
    check_same_dtype_device("A", A, b=b)
    m = A.shape[-2]
    vector = _is_vector(b, A)
    B = b.unsqueeze(-1) if vector else b
    if B.dim() < 2 or B.shape[-2] != m:
        batch_of_vectors = f", {tuple(A.shape[:-1])}" if A.dim() > 2 else ""
        rows = (f"; if b holds right-hand sides as rows (last dim {m}), pass b[..., None] (one ({m}, 1) right-hand "
                f"side per row: y is (*, n, 1)) or b.mT (the rows as the columns of b)"
                if b.dim() >= 2 and b.shape[-1] == m else "")
        raise InputError(f"b has shape {tuple(b.shape)} but A has shape {tuple(A.shape)}: b must be ({m},)"
                         f"{batch_of_vectors} or (*, {m}, k){rows}")
    try:
        torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
    except RuntimeError:
        raise InputError(
            f"the batch dims of A {tuple(A.shape[:-2])} and b {tuple(B.shape[:-2])} do not broadcast"
        ) from None
    return _Problem(A, B, vector)


def _no_meta(name, t):
    if isinstance(t, torch.Tensor) and t.device.type == "meta":
        raise InputError(f"{name} is a meta tensor (shapes only, no values): a solve needs values; "
                         f"create it on 'cpu' or 'cuda'")


def _is_vector(b: torch.Tensor, A) -> bool:
    # torch.linalg.solve's rule: b is a (batch of) vector(s) iff it is 1-D or has A's shape less the last dim
    shape = (tuple(A.batch_shape) + A.shape) if isinstance(A, LinearOperator) else tuple(A.shape)
    return b.dim() == 1 or (b.dim() == len(shape) - 1 and tuple(b.shape) == shape[:-1])


def _as_solution_shape(name, t, like: torch.Tensor, vector: bool) -> torch.Tensor:
    """A tensor given in the solution's shape (``(*, n)`` or ``(*, n, k)``) as ``(*, n, k)``."""
    t = as_float_tensor(name, t, like=like)
    check_same_dtype_device("A", like, **{name: t})
    return t.unsqueeze(-1) if (vector or t.dim() == 1) else t


def linear_solve(A, b, *, selection="auto", solver="auto", on_failure="raise", return_info=False,
                 check_finite=True, rank_rtol=None, rtol=None, atol=None, max_iter=None, M=None, x0=None,
                 adjoint_rtol=None, adjoint_max_iter=None):
    r"""Solve ``A y = b`` for ``y``, differentiably, under an explicit solution map.

    Args:
        A: ``(*, m, n)`` dense tensor, a ``torch.sparse`` matrix, or a
            :class:`~implicitdiff.linalg.LinearOperator`; batch dims broadcast with ``b``.
        b: ``(m,)``, ``A.shape[:-1]`` (a batch of vectors, the rule of
            ``torch.linalg.solve``) or ``(*, m, k)`` (``k`` right-hand sides).
        selection: which solution when there are many or none — ``"auto"``
            (square: ``"exact"``; wide: ``"min_norm"``; tall: ``"least_squares"``),
            ``"exact"``, ``"min_norm"``, ``"least_squares"``,
            :class:`~implicitdiff.Nearest` or :class:`~implicitdiff.Pinned`.
        solver: a solver object of :mod:`implicitdiff.linalg` carrying its options
            (``LU()``, ``Cholesky()``, ``QR()``, ``SVD(rank_rtol=)``, ``CG(rtol=, atol=,
            max_iter=, M=, x0=)``, ``MINRES``, ``GMRES``, ``BiCGStab``, ``LSQR``, ``LSMR``,
            ``SPLU()``), or its name as shorthand with the options as keywords here
            (``solver="cg", rtol=1e-8`` is ``solver=CG(rtol=1e-8)``; a keyword the solver
            does not take raises :class:`~implicitdiff.InputError`).  Names:
            direct — ``"auto"``, ``"lu"``, ``"cholesky"`` (declares ``A``
            symmetric positive definite; symmetry is checked), ``"qr"`` or ``"svd"`` (rank-revealing);
            iterative (matrix-free, :mod:`implicitdiff.linalg.krylov`) — ``"cg"``,
            ``"minres"``, ``"gmres"``, ``"bicgstab"``, ``"lsqr"``, ``"lsmr"``;
            sparse direct — ``"splu"`` (a square 2-D sparse COO/CSR ``A`` on the CPU,
            SciPy's SuperLU factorized once; the backward reuses it, ``Ā`` stays on
            A's pattern; reverse mode only, no vmap; ``b`` is ``(n,)`` or ``(*, n, k)``).
            ``"auto"``: a dense ``A`` (or a sparse one with at most
            ``linalg.solvers.SPARSE_DENSE_MAX`` columns) is factorized — Cholesky for a
            ``LinearOperator`` tagged ``positive_definite``; a matrix-free or
            large sparse ``A`` goes to CG (tagged positive definite), MINRES
            (tagged symmetric), GMRES (square) or LSMR (non-square, ``"min_norm"``).
            An iterative backward is one adjoint Krylov solve, its residual checked.
            :func:`implicitdiff.linalg.auto_solver` returns the object ``"auto"`` picks.
        ``rank_rtol`` (direct solvers): rank tolerance; a singular value ``s ≤ rank_rtol · s_max`` (or a
            reciprocal condition estimate below it) counts as zero. Default
            ``eps · max(m, n)``.
        rank_rtol, rtol, atol, max_iter, M, x0, adjoint_rtol, adjoint_max_iter: shorthand
            options of the named solver (see :mod:`implicitdiff.linalg.solvers`).
            ``rtol``: relative residual tolerance. Iterative solvers stop at
            ``‖b − A y‖ ≤ max(rtol ‖b‖, atol)`` (default 1e-10 in float64, 1e-6 in
            float32); direct solvers under ``"exact"`` on non-square systems fail
            if ``‖Ay − b‖ > rtol (‖A‖‖y‖ + ‖b‖)`` (default ``sqrt(eps)``).
        atol, max_iter, M, x0: iterative solvers only: absolute tolerance,
            iteration limit (default ``10 n``), preconditioner (an operator or
            callable, e.g. :func:`implicitdiff.linalg.jacobi`), warm start.
        adjoint_rtol, adjoint_max_iter: tolerance and limit of the backward's
            adjoint Krylov solve (default: the forward's).
        on_failure: ``"raise"`` (default) raises :class:`~implicitdiff.SolveError`;
            ``"warn"`` warns and sets failed batch elements to NaN; ``"nan"`` sets
            them to NaN silently.  The other elements keep their values and gradients
            (a failed element sends no NaN into tensors shared across the batch).
        return_info: also return a :class:`~implicitdiff.SolveInfo`.
        check_finite: raise :class:`~implicitdiff.InputError` on NaN/Inf inputs (one sync).

    Returns:
        ``y`` of shape ``(*, n)`` or ``(*, n, k)``; with ``return_info``, ``(y, info)``.

    Gradients flow to ``A`` and ``b`` (and to the tensors of ``Nearest``/``Pinned``),
    in reverse and forward mode, at any order, and under ``torch.func.vmap``,
    ``jacrev`` and ``jacfwd``.  The backward reuses the forward factorization
    (LU, Cholesky, QR or SVD): it costs triangular solves.

    Raises:
        InputError: malformed shapes, dtypes, devices, NaN/Inf, unknown options.
        SolveError: a singular square ``A`` under ``"exact"``, an inconsistent
            system under ``"exact"``, a rank-deficient ``A`` under
            ``"least_squares"`` — with the condition estimate or residual and a hint.

    Example (the seed note: ``x = a₁y₁ + a₂y₂`` has many solutions):
        >>> import torch, implicitdiff as idf
        >>> A = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
        >>> x = torch.tensor([3.0], dtype=torch.float64, requires_grad=True)
        >>> y = idf.linear_solve(A, x)                       # min-norm: y = A⁺x
        >>> y.detach()
        tensor([0.6000, 1.2000], dtype=torch.float64)
        >>> y_pinned = idf.linear_solve(A, x, selection=idf.Pinned([0], 0.0))
        >>> y_pinned.detach()                               # y₁ = 0, y₂ = x / a₂
        tensor([0.0000, 1.5000], dtype=torch.float64)
    """
    check_on_failure(on_failure)
    check_bool("return_info", return_info)
    check_bool("check_finite", check_finite)
    if (solver == "auto" and selection == "auto" and not return_info and rank_rtol is None and rtol is None
            and atol is None and max_iter is None and M is None and x0 is None and adjoint_rtol is None
            and adjoint_max_iter is None):  # the common call: try the eager square path first
        y = _eager_square(A, b, None)
        if y is not None:
            return y
    opts = dict(rank_rtol=rank_rtol, rtol=rtol, atol=atol, max_iter=max_iter, M=M, x0=x0,
                adjoint_rtol=adjoint_rtol, adjoint_max_iter=adjoint_max_iter)
    _no_meta("A", A)
    _no_meta("b", b)
    if not isinstance(A, (torch.Tensor, LinearOperator)):
        raise InputError(f"A must be a torch.Tensor (dense or sparse) or an implicitdiff.linalg.LinearOperator, "
                         f"got {type(A).__name__}")
    slv = as_solver(solver, A, selection, **opts)
    if slv.family == "sparse":
        return _sparse_direct(A, b, selection, on_failure, return_info, check_finite)
    if slv.family == "krylov":
        return _iterative(A, b, selection, slv, on_failure, return_info, check_finite)
    if is_matrix_free(A) and isinstance(A, LinearOperator) and A.matrix is None:
        raise InputError(f"solver={slv.name!r} factorizes a matrix: a matrix-free LinearOperator needs an "
                         f"iterative solver; pass ('cg', 'minres', 'gmres', 'bicgstab', 'lsqr', 'lsmr') or 'auto'")
    if slv.name == "lu" and not return_info and isinstance(selection, str) and selection in ("auto", "exact"):
        y = _eager_square(A, b, slv.rank_rtol)
        if y is not None:
            return y
    # "auto" keeps its LU/QR → SVD fallback for rank-deficient min-norm elements (linalg.selection.factorize)
    solver = "auto" if (solver == "auto" and slv.name in ("lu", "qr")) else slv.name
    rank_rtol, rtol = slv.rank_rtol, getattr(slv, "rtol", None)
    prob = _prepare(A, b)
    if check_finite:
        check_finite_(prob)
    if solver == "cholesky" and on_failure == "raise" and not is_vmapped(prob.A) and prob.A.shape[-1] == prob.A.shape[-2]:
        # a broken structural promise is an input error when raising; otherwise (a batch kept under
        # on_failure="nan"/"warn", or vmap) the element is reported SINGULAR and set to NaN
        if bool(not_symmetric(prob.A).any()):
            raise InputError("solver='cholesky' needs a symmetric positive definite A, but A is not symmetric "
                             "(|A − Aᵀ| > sqrt(eps)·max|A|); use solver='lu'")
    m, n = prob.A.shape[-2:]
    safe = on_failure != "raise"  # failed elements are kept (as NaN): shield the others' gradients
    if isinstance(selection, Nearest):
        Y, info = _nearest(prob, selection, solver, rank_rtol, rtol, safe, return_info)
    elif isinstance(selection, Pinned):
        Y, info = _pinned(prob, selection, solver, rank_rtol, rtol, safe, return_info)
    else:
        sel = resolve_selection(selection, m, n)
        if prob.A.numel() == 0 or prob.B.numel() == 0:
            Y, info = _empty(prob, sel)
        else:
            Y, info = _solve(SolveSpec(sel, solver, rank_rtol, rtol, residual=return_info), prob.A, prob.B, safe)
    if is_vmapped(info.status):
        Y = nan_where_failed(Y, info.ok)  # nothing can be raised from data under vmap
    else:
        Y = apply_on_failure(Y, info, on_failure, "linear_solve", _HINTS)
    y = Y.squeeze(-1) if prob.vector else Y
    return (y, info) if return_info else y


def _eager_square(A, b, rank_rtol):
    """The fast path of a square dense solve outside ``torch.func`` transforms (None: take the general
    path, which validates, reports and raises; see :func:`implicitdiff.implicit.linear.fast_square_solve`).

    Only the plain case is taken: dense tensors of one floating dtype and device, ``b`` with ``A``'s
    batch shape (no broadcasting), nothing empty.  The checks read shapes once (they are part of the
    time of a small solve)."""
    if not (isinstance(A, torch.Tensor) and isinstance(b, torch.Tensor)):
        return None
    sa, sb = A.shape, b.shape
    if (len(sa) < 2 or sa[-1] != sa[-2] or A.dtype not in FLOAT_DTYPES or b.dtype != A.dtype
            or A.layout != torch.strided or b.layout != torch.strided or A.is_meta or b.device != A.device
            or b.numel() == 0):
        return None
    if sb == sa[:-1]:  # torch.linalg.solve's rule: a (batch of) vector(s)
        vector = True
    elif len(sb) == len(sa) and sb[:-1] == sa[:-1]:  # (*, n, k)
        vector = False
    else:
        return None
    if in_transform():
        return None
    return fast_square_solve(A, b, vector, rank_rtol)


def _empty(prob: _Problem, sel: str):
    """A system with no entries (``m = 0``, ``n = 0``, ``k = 0`` or an empty batch): ``y = 0`` of the
    solution's shape (the minimum-norm solution; empty when ``n = 0``), differentiable (zero gradient)."""
    A, B = prob.A, prob.B
    batch = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
    Y = torch.zeros(*batch, A.shape[-1], B.shape[-1], dtype=A.dtype, device=A.device)
    Y = Y + 0 * (A.sum() + B.sum())  # connected to the inputs: backward gives zero gradients
    zeros = torch.zeros(batch, dtype=torch.int64, device=A.device)
    return Y, SolveInfo(zeros, torch.zeros(batch, dtype=A.dtype, device=A.device), zeros)


def _iterative(A, b, selection, slv: Solver, on_failure, return_info, check_finite_values):
    """The matrix-free path: a Krylov solve whose backward is one adjoint Krylov solve."""
    op = aslinearoperator(A)
    m, n = op.shape
    if isinstance(selection, (Nearest, Pinned)):
        raise InputError("Nearest and Pinned selections need a direct solver (a dense A); with a matrix-free "
                         "operator use selection='min_norm' (LSQR/LSMR) or 'exact'")
    sel = resolve_selection(selection, m, n)
    solver, rtol, x0 = slv.name, slv.rtol, slv.x0
    if m != n and solver not in ("lsqr", "lsmr"):
        raise InputError(f"solver={solver!r} needs a square operator, got shape ({m}, {n}); use 'lsqr' or 'lsmr'")
    b = as_float_tensor("b", b)
    if op.dtype is not None and b.dtype != op.dtype:
        raise InputError(f"b has dtype {b.dtype} but A has {op.dtype}; convert one of them")
    if b.dim() == 0 or b.shape[-1 if _is_vector(b, op) else -2] != m:
        vectors = f", {tuple(op.batch_shape) + (m,)}" if len(op.batch_shape) else ""
        # the rule of the dense path (torch.linalg.solve's): a (*, m) b is read as vectors only with A's batch
        # shape, since a (m, m) b must keep meaning m right-hand sides as columns
        rows = (f"; if b holds right-hand sides as rows (last dim {m}), pass b.mT (and take y.mT)"
                if b.dim() >= 2 and b.shape[-1] == m else "")
        raise InputError(f"b has shape {tuple(b.shape)} but A has shape {tuple(op.batch_shape) + (m, n)}: b must be "
                         f"({m},){vectors} or (*, {m}, k){rows}")
    if check_finite_values:
        if op.matrix is not None:  # a matrix-free operator's data are the user's: its matvec is checked
            mat = op.matrix
            check_finite("A", mat.detach().coalesce() if mat.layout == torch.sparse_coo else mat)
        check_finite("b", b)
    vector = _is_vector(b, op)
    rhs = b if vector else b.mT  # Krylov solvers take a batch of vectors (*, m)
    x0_ = None if x0 is None else (x0 if vector else x0.mT)
    y, info = iterative_solve(op, rhs, solver=solver, rtol=rtol, atol=0.0 if slv.atol is None else slv.atol,
                              max_iter=slv.max_iter, M=slv.M, x0=x0_, adjoint_rtol=slv.adjoint_rtol,
                              adjoint_max_iter=slv.adjoint_max_iter)
    if sel == "exact" and solver in ("lsqr", "lsmr"):
        # LSQR/LSMR return A⁺b; "exact" also demands that it solves the system (relative residual)
        tol = consistency_rtol(y.dtype) if rtol is None else max(float(rtol), consistency_rtol(y.dtype))
        bad = (info.status == Status.SUCCESS) & (info.residual > tol)
        info = info._replace(status=torch.where(bad, int(Status.INCONSISTENT), info.status))
    if is_vmapped(info.status):
        y = nan_where_failed(y, info.ok)
    else:
        hints = {Status.MAX_ITERATIONS: "raise max_iter, loosen rtol/atol, or pass a preconditioner M",
                 Status.INCONSISTENT: "b is not in the range of A: use selection='min_norm' (least squares)",
                 Status.BREAKDOWN: f"{solver} broke down: check the operator's tags (symmetric / positive "
                                   f"definite), or use solver='gmres' (square) or 'lsmr'"}
        y = apply_on_failure(y, info, on_failure, f"linear_solve(solver={solver!r})", hints)
    y = y if vector else y.mT
    return (y, info) if return_info else y


def _sparse_direct(A, b, selection, on_failure, return_info, check_finite_values):
    """solver="splu": a square sparse ``A`` factorized once by SuperLU (:mod:`implicitdiff.implicit.sparse_direct`)."""
    if isinstance(A, LinearOperator):
        if not A.is_sparse:
            raise InputError("solver='splu' needs a sparse A (a torch.sparse COO/CSR matrix); use solver='lu' for a "
                             "dense A or an iterative solver for a matrix-free operator")
        A = A.matrix
    if isinstance(selection, (Nearest, Pinned)) or selection not in ("auto", "exact"):
        raise InputError(f"solver='splu' solves a square system exactly: selection must be 'auto' or 'exact', got "
                         f"{selection!r}; use solver='lsmr' for 'min_norm'/'least_squares'")
    if check_finite_values and isinstance(A, torch.Tensor) and not is_vmapped(A):
        # check_finite reads .values(), which an uncoalesced COO tensor refuses
        check_finite("A", A.detach().coalesce() if A.layout == torch.sparse_coo else A)
    if check_finite_values and isinstance(b, torch.Tensor) and not is_vmapped(b):
        check_finite("b", b)
    y, info = splu_solve(A, b)
    hints = {Status.SINGULAR: "A is singular: use solver='lsmr' or selection='min_norm' (a dense A)",
             Status.NONFINITE: "check A and b for extreme values"}
    y = apply_on_failure(y, info, on_failure, "linear_solve(solver='splu')", hints)
    return (y, info) if return_info else y


def check_finite_(prob: _Problem) -> None:
    check_finite("A", prob.A)
    check_finite("b", prob.B)


def linear_solve_ex(A, b, **kwargs):
    """As :func:`linear_solve` with ``return_info=True`` and ``on_failure="nan"``: returns
    ``(y, info)`` and does not raise for failed solves (bad inputs still raise)."""
    kwargs.setdefault("on_failure", "nan")
    return linear_solve(A, b, return_info=True, **kwargs)


def _solve(spec, A, B, safe=False):
    X, status, residual, rank, cond = solve(spec, A, B)
    info = SolveInfo(status, residual, torch.zeros_like(status), rank, cond)
    if safe and not is_vmapped(status) and bool((status != Status.SUCCESS).any()):
        # The "double where": a failed element keeps NaN/Inf factors, and its zero cotangent
        # times an infinite A⁻ᵀ is NaN, which would reach every tensor shared across the batch
        # (a broadcast A, a parameter A was built from).  Re-solve with the failed elements
        # replaced by a benign full-rank system (I, 0) so every derivative of the kept elements
        # is that of their own solve; the caller sets the failed elements to NaN.  Costs a second
        # solve only when an element failed under on_failure="nan" / "warn".
        ok = (status == Status.SUCCESS)[..., None, None]
        eye = torch.eye(*A.shape[-2:], dtype=A.dtype, device=A.device)
        X = solve(spec, torch.where(ok, A, eye), torch.where(ok, B, torch.zeros_like(B)))[0]
    return X, info


def _nearest(prob: _Problem, sel: Nearest, solver, rank_rtol, rtol, safe=False, return_info=True):
    # y = y0 + S z,  z = (A S)⁺ (b − A y0):  the minimum-‖S⁻¹(y − y0)‖ least-squares solution,
    # with S = W^{-1/2} (diagonal weight) or S = L⁻ᵀ (W = L Lᵀ).
    A, B = prob.A, prob.B
    n = A.shape[-1]
    Y0 = _as_solution_shape("Nearest.y0", sel.y0, A, prob.vector)
    if Y0.shape[-2] != n:
        raise InputError(f"Nearest.y0 must have the solution's shape (*, {n}) or (*, {n}, k), got {tuple(sel.y0.shape)}")
    check_finite("Nearest.y0", Y0)
    w = sel.weight
    if w is None:
        AS, scale = A, None
    else:
        w = as_float_tensor("Nearest.weight", w, like=A)
        check_same_dtype_device("A", A, **{"Nearest.weight": w})
        check_finite("Nearest.weight", w)
        if w.dim() >= 2 and w.shape[-2:] == (n, n):
            asym = (w - w.mT).abs().amax(dim=(-2, -1)) > (torch.finfo(w.dtype).eps ** 0.5) * w.abs().amax(dim=(-2, -1))
            if not is_vmapped(asym) and bool(asym.any()):
                raise InputError("Nearest.weight must be symmetric positive definite, but it is not symmetric "
                                 "(|W − Wᵀ| > sqrt(eps)·max|W|); pass (W + W.mT) / 2 if that is what you mean")
            L, info = torch.linalg.cholesky_ex(w)
            if not is_vmapped(info) and bool((info != 0).any()):
                raise InputError("Nearest.weight must be symmetric positive definite (Cholesky failed)")
            L = torch.where((info == 0)[..., None, None], L, float("nan"))  # under vmap: reported NONFINITE
            Linv_T = torch.linalg.solve_triangular(L.mT, torch.eye(n, dtype=A.dtype, device=A.device), upper=True)
            AS, scale = A @ Linv_T, ("matrix", Linv_T)
        elif w.shape[-1] == n:
            if not is_vmapped(w) and bool((w <= 0).any()):
                raise InputError("Nearest.weight must be positive (a diagonal weight); got a value ≤ 0")
            s = w.rsqrt()
            AS, scale = A * s.unsqueeze(-2), ("diag", s)
        else:
            raise InputError(f"Nearest.weight must be (*, {n}) or (*, {n}, {n}), got {tuple(w.shape)}")
    spec = SolveSpec("min_norm", solver, rank_rtol, rtol, residual=return_info)
    Z, info = _solve(spec, AS, B - A @ Y0, safe)
    if scale is not None:
        Z = scale[1] @ Z if scale[0] == "matrix" else scale[1].unsqueeze(-1) * Z
    return Y0 + Z, info


def _pinned(prob: _Problem, sel: Pinned, solver, rank_rtol, rtol, safe=False, return_info=True):
    # y[index] = values;  A[:, free] y[free] = b − A[:, index] values   (square, nonsingular)
    A, B = prob.A, prob.B
    m, n = A.shape[-2:]
    idx = torch.as_tensor(sel.index, dtype=torch.long, device="cpu").reshape(-1)  # metadata: index on the host
    p = idx.numel()
    if p and (bool((idx < 0).any()) or bool((idx >= n).any()) or idx.unique().numel() != p):
        raise InputError(f"Pinned.index must hold distinct coordinates in [0, {n}), got {idx.tolist()}")
    if n - p != m:
        raise InputError(
            f"Pinned needs exactly n − m = {n - m} pinned coordinates for A of shape ({m}, {n}) so that the rest "
            f"is a square system, got {p}"
        )
    keep = torch.ones(n, dtype=torch.bool)
    keep[idx] = False
    free = torch.nonzero(keep).reshape(-1)
    k = B.shape[-1]
    vals = as_float_tensor("Pinned.values", sel.values, like=A)
    check_same_dtype_device("A", A, **{"Pinned.values": vals})
    check_finite("Pinned.values", vals)
    if vals.dim() == 0:
        V = vals.expand(p, k)
    elif prob.vector or vals.dim() == 1:
        if vals.shape[-1] != p:
            raise InputError(f"Pinned.values must have {p} entries (one per index) in its last dim, got {tuple(vals.shape)}")
        V = vals.unsqueeze(-1).expand(*vals.shape, k)
    else:
        if vals.shape[-2] != p:
            raise InputError(f"Pinned.values must be (*, {p}) or (*, {p}, {k}), got {tuple(vals.shape)}")
        V = vals
    idx, free = idx.to(A.device), free.to(A.device)
    A_pin, A_free = A.index_select(-1, idx), A.index_select(-1, free)
    spec = SolveSpec("exact", solver, rank_rtol, rtol, residual=return_info)
    Yf, info = _solve(spec, A_free, B - A_pin @ V, safe)
    batch = torch.broadcast_shapes(V.shape[:-2], Yf.shape[:-2])
    Y = torch.cat([V.expand(*batch, p, k), Yf.expand(*batch, m, k)], dim=-2)
    order = torch.argsort(torch.cat([idx, free]))
    return Y.index_select(-2, order), info


def ambiguity(A, cotangent, *, rank_rtol=None) -> torch.Tensor:
    r"""How much a gradient through ``A y = b`` depends on the chosen solution map.

    Every valid selection ``y(b)`` satisfies ``A dy/db = I``; two of them differ
    by ``dy/db = ... + N dz/db`` with ``N`` spanning null(A), so their ``b̄``
    differ by ``(dz/db)ᵀ Nᵀ ȳ``.  The selection-independent part is measured by

    ``ambiguity(A, ȳ) = ‖P_null(A) ȳ‖ / ‖ȳ‖``

    which is zero iff every selection gives the same ``b̄`` (``A`` of full column
    rank, or ``ȳ`` orthogonal to null(A)).

    Args:
        A: ``(*, m, n)`` (dense, sparse or a dense ``LinearOperator``).
        cotangent: ``ȳ`` of the solution's shape, ``(*, n)`` or ``(*, n, k)``.
        rank_rtol: rank tolerance of the SVD (default ``eps · max(m, n)``).

    Returns:
        A tensor of the batch shape, values in ``[0, 1]`` (0 for a zero cotangent).

    Example:
        >>> import torch, implicitdiff as idf
        >>> A = torch.tensor([[1.0, 1.0]])
        >>> round(float(idf.ambiguity(A, torch.tensor([1.0, 1.0]))), 6)   # ȳ ⟂ null(A): selections agree
        0.0
        >>> round(float(idf.ambiguity(A, torch.tensor([1.0, 0.0]))), 4)
        0.7071
    """
    if isinstance(A, LinearOperator):
        A = A.to_dense()
    elif isinstance(A, torch.Tensor) and A.layout != torch.strided:
        A = A.to_dense()
    A = as_float_tensor("A", A)
    if A.dim() < 2:
        raise InputError(f"A must have shape (*, m, n), got {tuple(A.shape)}")
    _no_meta("A", A)
    g = as_float_tensor("cotangent", cotangent, like=A)
    _no_meta("cotangent", g)
    check_same_dtype_device("A", A, cotangent=g)
    rank_rtol = check_real("rank_rtol", rank_rtol, low=0.0, high=1.0)
    check_finite("A", A)
    check_finite("cotangent", g)
    n = A.shape[-1]
    vector = g.dim() == 1 or (g.dim() == A.dim() - 1 and g.shape[:-1] == A.shape[:-2])
    G = g.unsqueeze(-1) if vector else g
    if G.shape[-2] != n:
        raise InputError(f"cotangent must have the solution's shape (*, {n}) or (*, {n}, k), got {tuple(g.shape)}")
    from .._core.defaults import rank_rtol as default_tol

    tol = default_tol(A.dtype, *A.shape[-2:]) if rank_rtol is None else rank_rtol
    if G.numel() == 0:  # nothing to measure (n = 0, k = 0 or an empty batch)
        return torch.zeros(torch.broadcast_shapes(A.shape[:-2], G.shape[:-2]), dtype=A.dtype, device=A.device)
    # The ratio is scale invariant: scale ȳ by a power of two near max|ȳ| (exact) so that ‖ȳ‖² neither
    # underflows (ȳ·1e-170) nor overflows.
    gmax = G.detach().abs().amax(dim=(-2, -1), keepdim=True)
    _, e = torch.frexp(gmax)
    G = G / torch.where(gmax > 0, torch.ldexp(torch.ones_like(gmax), e), torch.ones_like(gmax))
    _, s, Vh = torch.linalg.svd(A, full_matrices=False)
    keep = (s > tol * s[..., :1]).to(A.dtype)
    Vr = Vh.mT * keep.unsqueeze(-2)  # columns spanning the row space
    proj_null = G - Vr @ (Vr.mT @ G)
    num = torch.linalg.matrix_norm(proj_null)
    den = torch.linalg.matrix_norm(G)
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(den))
