r"""``qp``: a batched, differentiable convex quadratic program (OptNet) as a layer.

The layer validates its inputs, hands the problem to the interior-point solver of
:mod:`implicitdiff.solvers.qp_ipm` (forward) through :class:`~implicitdiff.implicit.qp.QPFn`
(gradients of the KKT conditions), and applies the failure policy.

Under ``torch.compile``, ``qp`` runs eagerly: :func:`~implicitdiff._core.torch_private.eager_under_compile`
(why: docs/architecture.md, "Under torch.compile").
"""

from __future__ import annotations

import torch

from .._core.errors import InputError
from .._core.failure import ON_FAILURE, apply_on_failure, nan_where_failed
from .._core.options import check_bool, check_choice, check_int, check_real
from .._core.status import SolveInfo, Status
from .._core.torch_private import eager_under_compile
from .._core.validate import as_float_tensor, check_same_dtype_device, is_vmapped
from .._core.validate import check_finite as _check_finite
from ..implicit.qp import QPSpec, qp_solve
from ..linalg.kkt import absmax
from ..solvers.qp_ipm import QPInteriorPoint

__all__ = ["qp"]

_HINTS = {
    Status.INFEASIBLE: "No z satisfies Gz ≤ h and Az = b: check h and b (a feasible z₀ and s ≥ 0 give "
                       "h = G z₀ + s, b = A z₀)",
    Status.UNBOUNDED: "The objective decreases without bound on the feasible set (Q is singular along a "
                      "feasible direction): add bounds or a ridge to Q",
    Status.MAX_ITERATIONS: "Raise max_iter, loosen rtol, or rescale the problem (entries of order 1)",
    Status.NONFINITE: "Check the inputs for NaN, Inf or extreme values",
    Status.NONCONVEX: "Q must be positive semidefinite (λ_min ≥ −1e-8·max|Qᵢⱼ| in float64, −1e-5 in float32) on "
                      "the null space of A: check its sign, or add a ridge (Q + εI)",
}


def _shape_error(name, t, expected):
    return InputError(f"{name} has shape {tuple(t.shape)} but must be {expected} (leading batch dims broadcast); "
                      f"fix its shape")


def _prepare(Q, p, G, h, A, b):
    p = as_float_tensor("p", p)
    if p.dim() < 1:
        raise InputError("p must have shape (*, n), got a scalar; pass a vector of the linear costs")
    n = p.shape[-1]
    if Q is None:
        Q = p.new_zeros(n, n)
    Q = as_float_tensor("Q", Q, like=p)
    if Q.dim() < 2 or Q.shape[-2:] != (n, n):
        raise _shape_error("Q", Q, f"(*, {n}, {n}) to match p of shape (*, {n})")
    if (G is None) != (h is None):
        raise InputError("G and h come together: pass both (inequalities Gz ≤ h) or neither")
    if (A is None) != (b is None):
        raise InputError("A and b come together: pass both (equalities Az = b) or neither")
    G = p.new_zeros(0, n) if G is None else as_float_tensor("G", G, like=p)
    h = p.new_zeros(0) if h is None else as_float_tensor("h", h, like=p)
    A = p.new_zeros(0, n) if A is None else as_float_tensor("A", A, like=p)
    b = p.new_zeros(0) if b is None else as_float_tensor("b", b, like=p)
    for name, M in (("G", G), ("A", A)):
        if M.dim() < 2 or M.shape[-1] != n:
            raise _shape_error(name, M, f"(*, rows, {n}) to match p of shape (*, {n})")
    for name, v, M, mname in (("h", h, G, "G"), ("b", b, A, "A")):
        if v.dim() < 1 or v.shape[-1] != M.shape[-2]:
            raise _shape_error(name, v, f"(*, {M.shape[-2]}) to match {mname} of shape {tuple(M.shape)}")
    check_same_dtype_device("p", p, Q=Q, G=G, h=h, A=A, b=b)
    if p.device.type == "meta":
        raise InputError("p is a meta tensor (no data); qp must read its inputs: pass tensors on a real device")
    ts = dict(Q=Q, p=p, G=G, h=h, A=A, b=b)
    cores = dict(Q=2, p=1, G=2, h=1, A=2, b=1)
    try:
        return (Q, p, G, h, A, b), torch.broadcast_shapes(*(t.shape[: t.dim() - cores[k]] for k, t in ts.items()))
    except RuntimeError:
        dims = ", ".join(f"{k}: {tuple(t.shape[: t.dim() - cores[k]])}" for k, t in ts.items())
        raise InputError(f"the batch dims of the QP parameters do not broadcast ({dims}); give each either the "
                         "common batch shape or none") from None


@eager_under_compile
def qp(Q, p, G=None, h=None, A=None, b=None, *, rtol=None, max_iter=50, on_failure="raise", return_duals=False,
       return_info=False, warm_start=None, check_finite=None):
    r"""Solve ``z* = argmin_z ½ zᵀQz + pᵀz  s.t.  Gz ≤ h,  Az = b``, batched and differentiably.

    Args:
        Q: ``(*, n, n)`` symmetric positive *semi*definite (only its symmetric part is used);
            ``None`` or zeros for a linear program (then bounded constraints are needed).
        p: ``(*, n)`` linear costs.
        G, h: ``(*, m, n)`` and ``(*, m)`` inequalities ``Gz ≤ h``, or ``None``.
        A, b: ``(*, k, n)`` and ``(*, k)`` equalities ``Az = b``, or ``None``.
            Any parameter may carry leading batch dims or none (shared): the batch dims
            broadcast, and a shared parameter's gradient is the *sum* over the batch.
        rtol: relative KKT residual (stationarity, feasibility, complementarity) at which
            a solution is accepted; default ``1e-10`` (float64) / ``1e-7`` (float32).
        max_iter: interior-point iteration limit (equality-only problems take one direct
            solve, no iterations).
        on_failure: ``"raise"`` (default), ``"warn"`` or ``"nan"`` (failed batch elements
            become NaN; the others are unaffected, gradients included).
        return_duals: also return the multipliers ``λ`` ``(*, m)`` (``≥ 0``) and ``ν``
            ``(*, k)`` (differentiable, as ``z``).
        return_info: also return a :class:`~implicitdiff.SolveInfo` (status, residual,
            iterations per batch element) — no host sync.
        warm_start: ``z₀`` ``(*, n)`` or a tuple ``(z₀, λ₀, ν₀)`` (entries may be ``None``)
            to start the interior point from.
        check_finite: ``True``: raise :class:`~implicitdiff.InputError` on NaN/Inf (one sync);
            ``False``: an element with NaN/Inf data gets the status ``NONFINITE`` (the others are
            solved); ``None`` (default): ``True`` under ``on_failure="raise"``, else ``False``.

    Every tolerance is relative to the data's scale: the solver sees the problem equilibrated
    (:func:`equilibrate`).  ``Q`` must be positive semidefinite on the null space of ``A``
    (``λ_min ≥ −1e-8·max|Qᵢⱼ|``; ``1e-5`` for float32 data), else the status is ``NONCONVEX``.

    Returns:
        ``z`` of shape ``(*batch, n)`` (``(n,)`` when nothing is batched); with
        ``return_duals`` ``(z, λ, ν)``; with ``return_info`` the info is appended.

    The forward is a primal-dual interior point (Mehrotra predictor-corrector) for the
    whole batch, finished by an active-set solve; the backward differentiates the KKT
    conditions on the active set, reusing the forward's final factorization, so gradients
    are exact (not blended by the barrier) — see :mod:`implicitdiff.implicit.qp`.  Works
    under ``backward``, ``torch.func.jvp``/``jacfwd``, ``vmap`` and ``jacrev``.  float32
    inputs are solved in float64 internally and rounded back.

    Raises:
        InputError: a missing partner (``G`` without ``h``), wrong shapes (naming the
            parameter and the expected shape), mixed dtypes/devices, NaN/Inf.
        SolveError: a non-convex (``NONCONVEX``), infeasible (``INFEASIBLE``) or unbounded (``UNBOUNDED``) problem,
            or no convergence, naming the status per batch element; in backward, a
            non-unique solution (singular active-set KKT system).

    Example (projection of ``x`` onto the probability simplex):
        >>> import torch, implicitdiff as idf
        >>> x = torch.tensor([0.5, 1.2, -0.3], dtype=torch.float64, requires_grad=True)
        >>> n = 3
        >>> z = idf.qp(torch.eye(n, dtype=torch.float64), -x, -torch.eye(n, dtype=torch.float64),
        ...            torch.zeros(n, dtype=torch.float64), torch.ones(1, n, dtype=torch.float64),
        ...            torch.ones(1, dtype=torch.float64))
        >>> [round(v, 4) + 0.0 for v in z.tolist()]
        [0.15, 0.85, 0.0]
        >>> z[0].backward()
        >>> [round(v, 4) + 0.0 for v in x.grad.tolist()]
        [0.5, -0.5, 0.0]
    """
    check_choice("on_failure", on_failure, ON_FAILURE)
    rtol = check_real("rtol", rtol, low=0.0, high=1.0, low_open=True, high_open=True)
    max_iter = check_int("max_iter", max_iter, low=1, allow_none=False)
    check_bool("return_duals", return_duals)
    check_bool("return_info", return_info)
    if check_finite is not None:
        check_bool("check_finite", check_finite)
    (Q, p, G, h, A, b), batch = _prepare(Q, p, G, h, A, b)
    if any(d == 0 for d in batch):  # an empty batch: empty results (connected to the inputs, zero gradients)
        return _empty(batch, Q, p, G, h, A, b, return_duals, return_info)
    maxima = _maxima(Q, G, A)
    if check_finite or (check_finite is None and on_failure == "raise"):
        _check_all_finite((Q, p, G, h, A, b), maxima)
    if rtol is None:
        rtol = 1e-10 if p.dtype == torch.float64 else 1e-7
    psd_tol = 1e-8 if p.dtype == torch.float64 else 1e-5
    spec = QPSpec(QPInteriorPoint.for_dtype(torch.float64, rtol=rtol, max_iter=max_iter, psd_tol=psd_tol),
                  torch.float64)
    warm = _warm(warm_start, p)
    z, lam, nu, status, residual, iters = qp_solve(spec, Q, p, G, h, A, b, warm, equilibrate(p, maxima))
    info = SolveInfo(status, residual, iters)
    if is_vmapped(status):
        z, lam, nu = (nan_where_failed(t, info.ok) for t in (z, lam, nu))  # nothing can be raised under vmap
    else:
        z = apply_on_failure(z, info, on_failure, "qp", _HINTS)
        if on_failure != "raise":
            lam, nu = nan_where_failed(lam, info.ok), nan_where_failed(nu, info.ok)
    out = (z, lam, nu) if return_duals else (z,)
    if return_info:
        out = out + (info,)
    return out if len(out) > 1 else out[0]


def _empty(batch, Q, p, G, h, A, b, return_duals, return_info):
    zero = sum((t.sum() * 0 for t in (Q, p, G, h, A, b) if t.requires_grad), p.new_zeros(()))
    out = tuple(p.new_zeros(batch + (d,)) + zero for d in (p.shape[-1], h.shape[-1], b.shape[-1]))
    out = out if return_duals else out[:1]
    if return_info:
        long = torch.zeros(batch, dtype=torch.long, device=p.device)
        out = out + (SolveInfo(long, p.new_zeros(batch), long.clone()),)
    return out if len(out) > 1 else out[0]


def _neutral(s):
    """``s``, with 1 where it is 0 or not finite (a neutral scale)."""
    return torch.where(torch.isfinite(s) & (s > 0), s, torch.ones_like(s))


def _absmax(t, dims):
    """``max |t|`` over ``dims`` (detached; NaN or Inf where ``t`` holds one: amax/amin propagate them); 1 if empty."""
    return absmax(t.detach(), dims) if t.numel() else t.detach().new_ones(t.shape[: t.dim() - len(dims)])


def _maxima(Q, G, A):
    """What :func:`equilibrate` reads: ``max |Qᵢⱼ|`` per element (0 if ``Q`` is empty) and the largest entry of each
    row of ``G`` and ``A``, raw (non-finite where the data is)."""
    qmax = _absmax(Q, (-2, -1)) if Q.numel() else Q.detach().new_zeros(Q.shape[:-2])
    return qmax, _absmax(G, (-1,)), _absmax(A, (-1,))


def _check_all_finite(data, maxima):
    """:func:`check_finite` of ``(Q, p, G, h, A, b)``; a matrix whose maxima are finite is finite (they propagate
    NaN and Inf), so only the vectors, and a matrix that fails, are read again (to name the fault)."""
    qmax, gmax, amax = maxima
    for name, t, mx in zip(("Q", "p", "G", "h", "A", "b"), data, (qmax, None, gmax, None, amax, None)):
        if mx is None or is_vmapped(mx) or not bool(torch.isfinite(mx).all()):
            _check_finite(name, t)


def equilibrate(p, maxima):
    r"""The scales ``(σ_Q, σ, d_G, d_A)`` with which the layer solves the same QP with data of order one,
    ``(Q/σ_Q, p/σ, D_G⁻¹G, D_G⁻¹h, D_A⁻¹A, D_A⁻¹b)`` (the scaling is applied, and differentiated, by
    :class:`~implicitdiff.implicit.qp.QPFn`).

    ``σ_Q = max|Qᵢⱼ|`` and ``σ = σ_Q`` (``max|pᵢ|`` for an LP, ``Q = 0``) scale the objective and ``d_G``,
    ``d_A`` are the largest entries of each constraint row (1 where that is 0 or not finite): none changes the
    solution ``z``, and the multipliers of the original problem are ``λ = σ λ' / d_G``, ``ν = σ ν' / d_A``.
    The scales are constants (detached): the gradient of ``z`` is exact for every positive scale.  Each scale
    keeps the batch dims of the tensors it is read from: a shared ``Q`` stays shared.  With it, the solver's
    relative tests (feasibility, optimality, convergence, convexity) are relative to the data's scale.
    ``maxima``: :func:`_maxima` of ``(Q, G, A)``.
    """
    qmax, gmax, amax = maxima
    sq = _neutral(qmax)
    sigma = torch.where(qmax > 0, sq, _neutral(_absmax(p, (-1,))))
    return sq, sigma, _neutral(gmax), _neutral(amax)


def _warm(warm_start, p):
    if warm_start is None:
        return (None, None, None)
    if isinstance(warm_start, torch.Tensor):
        warm_start = (warm_start, None, None)
    if not isinstance(warm_start, (tuple, list)) or len(warm_start) != 3:
        raise InputError("warm_start must be a tensor z0 of shape (*, n) or a tuple (z0, lam0, nu0)")
    z0, l0, n0 = (None if t is None else as_float_tensor(f"warm_start[{i}]", t, like=p).detach()
                  for i, t in enumerate(warm_start))
    if z0 is None:
        raise InputError("warm_start needs z0 (its first entry)")
    if z0.shape[-1] != p.shape[-1]:
        raise InputError(f"warm_start z0 has shape {tuple(z0.shape)}; it must be (*, {p.shape[-1]}) like p")
    for i, t in enumerate((z0, l0, n0)):
        if t is not None:
            _check_finite(f"warm_start[{i}]", t)
    return z0, l0, n0
