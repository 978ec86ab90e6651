"""Gradients of a sparse direct solve ``x = A⁻¹ b`` by SciPy's SuperLU — one factorization.

Derivation.  ``x`` solves ``A x = b`` (``A`` square, sparse, nonsingular).  Differentiating::

    A dx = db − dA x

Reverse mode: with ``u = A⁻ᵀ x̄`` (``Aᵀ u = x̄``, the SAME SuperLU factors solved with
``trans="T"``), ``⟨x̄, dx⟩ = ⟨u, db⟩ − ⟨u, dA x⟩ = ⟨u, db⟩ − Σ_ij dA_ij u_i x_j``, so::

    b̄ = u,        Ā_ij = −u_i x_j   (summed over right-hand sides)

Only the stored entries of a sparse ``A`` are parameters, so ``Ā`` is evaluated on A's pattern
alone (O(nnz), never densified) and returned with A's layout and indices.  The factors
(a ``scipy.sparse.linalg.SuperLU`` object, not a tensor) are kept on ``ctx`` for the backward.

First order only.  The backward is SciPy (not torch ops), so it has no graph of its own; under
``create_graph=True`` its outputs are linked to what they depend on by :class:`_FirstOrderOnly`,
whose backward raises an :class:`~implicitdiff.InputError` naming the fix, so a second derivative
fails clearly instead of with torch's generic message (or a silently missing term).

SciPy is an optional dependency: it is imported when a solve runs, not when this module is.
"""

from __future__ import annotations

import torch

from .._core.defaults import rank_rtol
from .._core.errors import InputError
from .._core.status import SolveInfo, Status
from .._core.validate import as_float_tensor, check_same_dtype_device, is_vmapped
from ..linalg.selection import consistency_rtol
from .iterative import _sparse_outer

__all__ = ["SpluSolveFn", "splu_solve"]

_NEEDS_SCIPY = "solver='splu' needs SciPy: pip install scipy"


def _scipy():
    """``(numpy, scipy.sparse, scipy.sparse.linalg)``, imported on first use (optional dependencies)."""
    try:
        import numpy
        import scipy.sparse
        import scipy.sparse.linalg
    except ImportError:  # an optional dependency: the message says how to get it
        raise InputError(_NEEDS_SCIPY) from None
    return numpy, scipy.sparse, scipy.sparse.linalg


def _to_scipy_csc(A: torch.Tensor):
    """The 2-D sparse ``A`` (COO or CSR, CPU) as a SciPy CSC matrix (one copy of the values)."""
    _, sparse, _ = _scipy()
    A = A.detach()
    if A.layout == torch.sparse_csr:
        crow, col, val = A.crow_indices(), A.col_indices(), A.values()
        M = sparse.csr_matrix((val.numpy(), col.numpy(), crow.numpy()), shape=tuple(A.shape))
    else:
        A = A.coalesce()  # duplicates are summed, as in torch
        idx, val = A.indices(), A.values()
        M = sparse.coo_matrix((val.numpy(), (idx[0].numpy(), idx[1].numpy())), shape=tuple(A.shape))
    return M.tocsc(), M


class SpluSolveFn(torch.autograd.Function):
    """``X = A⁻¹ B`` for a 2-D sparse ``A`` and a dense ``B`` of shape ``(n, K)``.

    Returns ``(X, status, residual, cond, factors)``; only ``X`` is differentiable (wrt ``A``'s stored values
    and ``B``).  A singular ``A`` gives ``X = NaN`` with status SINGULAR and sends no gradient.
    """

    @staticmethod
    def forward(A, B):
        np, _, linalg = _scipy()
        csc, M = _to_scipy_csc(A)
        Bn = B.detach().numpy()
        try:
            lu = linalg.splu(csc)
        except RuntimeError as e:  # SuperLU: "Factor is exactly singular"
            if "singular" not in str(e):
                raise
            nan = torch.full_like(B, float("nan"))
            inf = torch.tensor(float("inf"), dtype=B.dtype)
            return nan, torch.tensor(int(Status.SINGULAR)), inf, inf, None
        X = torch.from_numpy(lu.solve(Bn)).to(B.dtype).reshape(B.shape)
        # Relative backward error ‖B − A X‖ / (‖A‖_F ‖X‖ + ‖B‖), O(nnz): near eps for a sound LU; a large
        # value means the factors are useless (reported SINGULAR), never a silently wrong X.
        Xn = X.numpy()
        # the norms as max|v| · ‖v / max|v|‖ (no overflow at |x| ~ 1e300, no underflow at 1e-300),
        # the ratio as a product of ratios
        (na, sa), (nx, sx), (nb, sb) = (_scaled_norm(np, v) for v in (csc.data, Xn, Bn))
        nr, sr = _scaled_norm(np, Bn - M @ Xn)
        den = na * nx * (sa * sx / sr) + nb * (sb / sr) if sr > 0 else 1.0
        residual = float(nr / den) if sr > 0 and den > 0 else 0.0
        # A backward-stable LU has a small backward error even for a nearly singular A, so a tiny pivot is
        # detected from U's diagonal: the pivot ratio max|u_ii| / min|u_ii| (a cheap condition indicator, not a
        # bound) above 1 / rank_rtol = 1 / (eps · n).
        piv = np.abs(lu.U.diagonal())
        cond = float(piv.max() / piv.min()) if piv.size and piv.min() > 0 else float("inf")
        if not bool(torch.isfinite(X).all()):
            status = Status.NONFINITE
        elif cond * rank_rtol(B.dtype, *A.shape) >= 1.0 or residual > consistency_rtol(B.dtype):
            status = Status.SINGULAR
        else:
            status = Status.SUCCESS
        return (X, torch.tensor(int(status)), torch.tensor(residual, dtype=B.dtype), torch.tensor(cond, dtype=B.dtype),
                lu)

    @staticmethod
    def setup_context(ctx, inputs, output):
        A, _B = inputs
        X, status, residual, cond, lu = output
        ctx.mark_non_differentiable(status, residual, cond)
        ctx.set_materialize_grads(False)
        ctx.lu = lu  # the SuperLU factors: not a tensor, reused by the transpose solve
        ctx.save_for_backward(A, X)

    @staticmethod
    def backward(ctx, gX, *_):
        if gX is None or ctx.lu is None:  # no cotangent, or a singular A (X is NaN, nothing to send)
            return None, None
        A, X = ctx.saved_tensors
        with torch.no_grad():
            gA, gB = SpluSolveFn._vjp(ctx, A, X, gX)
        # what gA, gB depend on: gX always, A and X through gA only (gB = A⁻ᵀ gX uses the factors, not A's graph)
        deps = [t for t, used in ((gX, True), (A, True), (X, ctx.needs_input_grad[0])) if used and t.requires_grad]
        if torch.is_grad_enabled() and deps:  # create_graph=True: a second derivative must fail clearly
            return _FirstOrderOnly.apply(len(deps), *deps, gA, gB)
        return gA, gB

    @staticmethod
    def _vjp(ctx, A, X, gX):
        # u = A⁻ᵀ x̄ with the forward's factors
        U = torch.from_numpy(ctx.lu.solve(gX.detach().contiguous().numpy(), trans="T")).to(X.dtype)
        U = U.reshape(X.shape)
        gB = U if ctx.needs_input_grad[1] else None
        # Ā_ij = −Σ_k u_ik x_jk on the stored (i, j) only: A's layout and indices
        gA = _sparse_outer(A, -U.mT, X.mT) if ctx.needs_input_grad[0] else None
        return gA, gB

    @staticmethod
    def jvp(ctx, *tangents):
        raise InputError("forward mode (jvp) is not implemented for solver='splu'; use reverse mode, or "
                         "solver='lu' on a dense A")


class _FirstOrderOnly(torch.autograd.Function):
    """``_FirstOrderOnly.apply(d, *deps, *outs)`` returns copies of ``outs`` (tensors or None) linked to
    the ``d`` tensors ``deps``; differentiating them raises :class:`~implicitdiff.InputError`."""

    @staticmethod
    def forward(ctx, d, *args):
        return tuple(None if t is None else t.clone() for t in args[d:])

    @staticmethod
    def backward(ctx, *_):
        raise InputError("solver='splu' is differentiable once (reverse mode, first order): a second derivative "
                         "(a gradient of its gradient, create_graph=True) is not available; use solver='lu' on "
                         "the dense A (A.to_dense()) or an iterative solver ('gmres', 'cg', ...) for higher orders")


def _scaled_norm(np, v):
    """``(‖v/s‖, s)`` with ``s = max|v|`` (``(0, 0)`` for a zero or empty ``v``): ``‖v‖ = s · ‖v/s‖``."""
    s = float(np.abs(v).max()) if v.size else 0.0
    if not s > 0 or not np.isfinite(s):
        return (float(np.linalg.norm(v)) if v.size else 0.0), (1.0 if s == 0 or not v.size else s)
    return float(np.linalg.norm(v / s)), s


def splu_solve(A: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, SolveInfo]:
    r"""Solve ``A x = b`` for a square ``torch.sparse`` ``A`` by a sparse LU (SciPy's SuperLU).

    ``A`` is factorized once (``scipy.sparse.linalg.splu``, CSC, column ordering COLAMD); the
    backward reuses the factors for ``u = A⁻ᵀ x̄`` and returns::

        b̄ = u,        Ā_ij = −u_i x_j  on A's stored entries only

    as a sparse tensor with ``A``'s layout and indices (never densified).

    Args:
        A: ``(n, n)`` sparse COO or CSR matrix on the CPU, float32 or float64.
        b: ``(n,)`` (one right-hand side) or ``(*, n, k)`` (``k`` right-hand sides, any batch of
            them; ``A`` is shared).  ``b`` is a vector iff ``b.ndim == 1``.

    Returns:
        ``(x, info)``: ``x`` of ``b``'s shape; ``info`` a :class:`~implicitdiff.SolveInfo` of 0-d
        tensors (status, relative backward error ``‖b − Ax‖ / (‖A‖_F‖x‖ + ‖b‖)``, zero iterations,
        ``cond`` = the pivot ratio ``max|u_ii| / min|u_ii|``, a cheap condition indicator).
        A singular ``A`` — an exactly zero pivot (then ``x = NaN``), a pivot ratio above
        ``1 / (eps · n)`` or a backward error above ``sqrt(eps)`` — gives status SINGULAR;
        nothing is raised here; see
        :func:`~implicitdiff.linear_solve` for the failure policy.

    Reverse mode, first order only; forward mode, ``torch.func.vmap`` and a second derivative
    (differentiating the gradient) raise :class:`~implicitdiff.InputError`.

    Raises:
        InputError: ``A`` not a square 2-D sparse COO/CSR matrix on the CPU, ``b`` of the wrong shape,
            dtype or device, SciPy missing, or a ``vmap``.

    Example:
        >>> import torch
        >>> from implicitdiff.implicit.sparse_direct import splu_solve
        >>> A = torch.tensor([[4.0, 1.0], [0.0, 2.0]], dtype=torch.float64).to_sparse_coo()
        >>> x, info = splu_solve(A, torch.tensor([6.0, 4.0], dtype=torch.float64))
        >>> x, int(info.status)
        (tensor([1., 2.], dtype=torch.float64), 0)
    """
    if not isinstance(A, torch.Tensor) or A.layout not in (torch.sparse_coo, torch.sparse_csr):
        raise InputError("solver='splu' needs A as a torch.sparse COO or CSR matrix (e.g. A.to_sparse_csr()); "
                         "for a dense A use solver='lu'")
    A = as_float_tensor("A", A)
    b = as_float_tensor("b", b, like=A)
    if is_vmapped(A) or is_vmapped(b):
        raise InputError("solver='splu' does not support torch.func.vmap; pass k right-hand sides as b of "
                         "shape (n, k) instead, or use solver='lu' on a dense A")
    if A.dim() != 2 or A.shape[0] != A.shape[1]:
        raise InputError(f"solver='splu' needs a square 2-D sparse A (no batch), got shape {tuple(A.shape)}; "
                         "use solver='lsmr' for a non-square A")
    if A.device.type != "cpu":
        raise InputError(f"solver='splu' runs on the CPU (SciPy) but A is on {A.device}: move A and b with "
                         ".cpu(), or use solver='cg'/'gmres' on the device")
    check_same_dtype_device("A", A, b=b)
    n = A.shape[0]
    vector = b.dim() == 1
    if b.dim() == 0 or b.shape[0 if vector else -2] != n:
        raise InputError(f"b has shape {tuple(b.shape)} but A is {n} × {n}: b must be ({n},) or (*, {n}, k)")
    # (*, n, k) -> (n, *·k): every right-hand side is a column of one SuperLU solve
    B = b.unsqueeze(-1) if vector else b
    if n == 0 or B.numel() == 0:  # nothing to factorize: the (empty or zero) solution, zero gradients
        zero = torch.zeros((), dtype=torch.int64)
        x = torch.zeros(b.shape[:-2] + (n, b.shape[-1]) if not vector else (n,), dtype=b.dtype) + 0 * b.sum()
        return x, SolveInfo(zero, torch.zeros((), dtype=b.dtype), zero, cond=torch.ones((), dtype=b.dtype))
    batch, k = B.shape[:-2], B.shape[-1]
    B2 = B.movedim(-2, 0).reshape(n, -1)
    X2, status, residual, cond, _lu = SpluSolveFn.apply(A, B2)
    X = X2.reshape(n, *batch, k).movedim(0, -2)
    x = X.squeeze(-1) if vector else X
    return x, SolveInfo(status, residual, torch.zeros_like(status), cond=cond)
