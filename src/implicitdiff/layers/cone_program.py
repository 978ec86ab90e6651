r"""``cone_program``: a batched, differentiable convex cone program (the SCS / diffcp convention).

The layer validates its inputs, solves with the homogeneous-embedding interior point of
:mod:`implicitdiff.solvers.cone_ipm` and differentiates the solution map through
:class:`~implicitdiff.implicit.cone.ConeFn`.

**Scaling** (:func:`_scales`).  The solver's stopping rule measures residuals and the gap
against ``1 +`` the data's size, which is relative only for data of order one: with a tiny ``c``
(``‖c‖∞ ≈ 1e-5`` at ``rtol = 1e-5``) a point far from optimal passes the gap and dual
tests, and with a huge ``c`` the diffcp residual map of the refinement and the derivative (which
adds ``y`` and ``−s``) loses ``s``'s digits to ``y``'s.  So the problem is solved, refined and
differentiated on normalized data ``(A/α, b/β, c/γ)``, with ``α, β, γ`` the ∞-norms of ``A, b, c``
per batch element rounded to powers of two (scaling by them is exact; ``1`` for an all-zero one).
``α`` is ``1`` also where ``‖A‖∞`` is within a factor :data:`LEAVE_WITHIN` of one (the rule is
then relative to within that factor: the objective and ``y`` scale like ``1/α``): normalizing
such an ``A`` changes the interior point's path (it starts at the cone's unit point) and cost
the bench's SOCP (``‖A‖∞ ≈ 5``) 15 % more iterations, while normalizing ``b`` and ``c`` saved
2 % (SOCP) to 20 % (SDP) of them.  ``β`` (``γ``) divides ``b`` (``c``) by at most
:data:`SHRINK_AT_MOST` × ``max(1, its smallest nonzero |entry|)``: rows of very different sizes (a budget
``Σx ≤ 1e5`` beside the constant ``1`` that cvxpy writes into each exponential cone) would otherwise
shrink the small ones below the rule's ``1 +`` (an ``x`` 4e-4 off with SUCCESS at ``1e5``).
The solution map is covariant, ``x = (β/α) x̃``, ``y = (γ/α) ỹ``, ``s = β s̃`` for all positive
``α, β, γ``, so mapping the normalized solution back with the scales held constant gives the
solution and, through autograd, its exact derivative.  Certificates of infeasibility are
invariant under the scaling.  Only a uniform scale per element is corrected: rows or columns
of very different sizes remain the caller's to equilibrate.
"""

from __future__ import annotations

import torch

from .._core.errors import InputError
from .._core.failure import apply_on_failure, check_on_failure, nan_where_failed
from .._core.options import check_bool, check_int, check_real
from .._core.status import SolveInfo, Status
from .._core.torch_private import eager_under_compile
from .._core.validate import as_float_tensor, check_finite, check_same_dtype_device, is_vmapped
from ..implicit.cone import ConeFn, ConeProblem
from ..linalg.cone_spec import parse_cones
from ..solvers.cone_ipm import ConeInteriorPoint

__all__ = ["cone_program"]

SHRINK_AT_MOST = 16.0  # b, c: divided by ‖·‖∞, but by at most this × max(1, their smallest nonzero |entry|)
LEAVE_WITHIN = 16.0  # an A whose ∞-norm is within this factor of 1 is not normalized (module docstring, "Scaling")

_HINTS = {
    Status.INFEASIBLE: "No x has Ax + s = b with s in the cone (a certificate y with Aᵀy = 0, bᵀy < 0 was "
                       "found; the residual is the certificate's test, ‖Aᵀy‖∞‖b‖∞ / (−bᵀy·‖A‖∞) ≤ rtol): check b "
                       "and the cone sizes",
    Status.UNBOUNDED: "The objective cᵀx decreases without bound (a direction with Ax + s = 0, s in the cone, "
                      "cᵀx < 0 was found; the residual is the certificate's test, ‖Ax + s‖∞‖c‖∞ / (−cᵀx·‖A‖∞) ≤ "
                      "rtol): add constraints or check c's sign (cone_program minimizes)",
    Status.MAX_ITERATIONS: "Raise max_iter, loosen rtol, or rescale the problem (entries of order 1)",
    Status.BREAKDOWN: "The interior point stopped making progress (ill-conditioned or nearly infeasible "
                      "data): loosen rtol or rescale the problem",
    Status.NONFINITE: "Check the inputs for extreme values",
}


def _as_dense(name, t):
    if isinstance(t, torch.Tensor) and t.layout != torch.strided:
        return t.to_dense()
    return t


def _empty(A, b, c, return_info):
    zero = sum((t.sum() * 0 for t in (A, b, c) if t.requires_grad), c.new_zeros(()))
    m, n = A.shape[-2:]
    out = tuple(c.new_zeros(0, d) + zero for d in (n, m, m))
    if return_info:
        long = torch.zeros(0, dtype=torch.long, device=c.device)
        out = out + (SolveInfo(long, c.new_zeros(0), long.clone()),)
    return out


def _scales(A, b, c):
    """``(α, β, γ)`` of the module docstring ("Scaling"), constants (no gradient): ``α`` a scalar for a
    shared ``A (m, n)``, else ``(B, 1, 1)``; ``β, γ`` ``(B, 1)``."""
    lo, hi = torch.aminmax(A.detach().flatten(-2), dim=-1)  # ‖A‖∞ without an |A| temporary (A is the largest input)
    alpha = _pow2(torch.maximum(hi, -lo), LEAVE_WITHIN)
    alpha = alpha[..., None, None] if A.dim() == 3 else alpha
    return alpha, _vector_scale(b), _vector_scale(c)


def _pow2(t, band=1.0):
    """The power of two nearest ``t`` (in log scale), ``1`` where ``t`` is ``0`` or within ``band`` of ``1``."""
    t = torch.where((t > 0) & ((t < 1 / band) | (t > band)), t, 1.0)
    return torch.exp2(torch.round(torch.log2(t)))


def _vector_scale(v):
    """``β`` or ``γ`` of the module docstring ("Scaling") for ``v`` ``(B, k)``: ``(B, 1)``."""
    t = v.detach().abs()
    small = torch.where(t > 0, t, torch.inf).amin(-1, keepdim=True)  # inf for an all-zero v: then big = 0 wins
    return _pow2(torch.minimum(t.amax(-1, keepdim=True), SHRINK_AT_MOST * torch.clamp(small, min=1.0)))


def cone_program(A, b, c, cones, *, rtol=None, max_iter=100, on_failure="raise", return_info=False):
    r"""Solve ``min cᵀx  s.t.  Ax + s = b,  s ∈ K`` (and its dual), batched and differentiably.

    The dual is ``max −bᵀy  s.t.  Aᵀy + c = 0,  y ∈ K*``.  ``K`` is a product of cones in
    SCS's order, given by ``cones``, a dict with keys ``"z"`` (number of zero-cone rows:
    ``s = 0``, i.e. equalities), ``"l"`` (nonnegative rows), ``"q"`` (list of second-order
    cone sizes, ``(t, x)`` with ``‖x‖ ≤ t``), ``"s"`` (list of PSD side lengths ``k``, each
    block the ``k(k+1)/2`` entries of SCS's scaled lower triangle: column-major, off-diagonals
    ×√2) and ``"ep"`` (number of exponential cones ``(x, y, z)``, ``y·exp(x/y) ≤ z``); this is
    the data ``cvxpy``'s ``problem.get_problem_data(cp.SCS)`` returns.

    Args:
        A: ``(m, n)`` or ``(B, m, n)`` (dense, or a torch sparse matrix — densified).
        b: ``(m,)`` or ``(B, m)``.
        c: ``(n,)`` or ``(B, n)``.  Unbatched inputs are shared by the batch (their gradient
            is the sum over it).
        cones: the cone layout above; its rows must add up to ``m``.
        rtol: relative tolerance of the stopping rule (primal and dual residuals relative
            to ``1 + ‖b‖, ‖c‖``, duality gap relative to ``1 + |objective|``, on the data
            normalized to unit size: module docstring; see
            :mod:`implicitdiff.solvers.cone_ipm`); default ``1e-8``, for float32 inputs too:
            the solve runs in float64 either way, and at ``1e-5`` a float32 answer could be
            ``1e-3`` off (docs/cone_program.md, "Tolerance and residual").  The residual
            reported is that of the point returned (after the Newton polish below).
        max_iter: interior-point iteration limit.
        on_failure: ``"raise"`` (default), ``"warn"`` or ``"nan"`` (failed elements become
            NaN; the others and their gradients are unaffected).
        return_info: also return a :class:`~implicitdiff.SolveInfo` (status, residual,
            iterations per batch element).  An empty batch (``B = 0``) gives empty results.

    Returns:
        ``(x, y, s)`` of shapes ``(*, n)``, ``(*, m)``, ``(*, m)`` (``*`` = the batch, or
        nothing), then the info if ``return_info``.  All three are differentiable with
        respect to ``A``, ``b`` and ``c``: reverse mode, ``torch.func.jvp``, ``vmap``, ``jacrev``,
        ``jacfwd``, ``vmap`` over ``grad`` / ``vjp`` / ``jvp`` (a vmapped call folds into the batch),
        and twice (the backward is differentiable).

    Statuses per element: ``SUCCESS``; ``INFEASIBLE`` (primal infeasible, with a dual
    certificate) and ``UNBOUNDED`` (dual infeasible) from the homogeneous embedding;
    ``MAX_ITERATIONS``; ``BREAKDOWN`` (no progress); ``NONFINITE``.

    The interior point's answer is polished by one Newton step on diffcp's residual map and a
    chord step (on a curved cone an interior point's ``x`` is only about ``√gap`` accurate; the
    steps make it accurate to rounding at a regular solution), kept only where the polished point
    meets ``rtol`` (:func:`implicitdiff.implicit.cone.refine`); those steps and the derivative solve with the
    structured factorization of :mod:`implicitdiff.implicit.cone_system` (an ``n + p`` LU,
    ``p`` the rows where the projection's derivative is ~1, instead of ``n + m + 1``).
    Gradients are the exact derivative of the solution map (diffcp's residual map, see
    :mod:`implicitdiff.implicit.cone`).  At a non-differentiable point (a constraint active
    with a zero multiplier) the one-sided value of :mod:`implicitdiff.implicit.cone_projection`
    is used; where the solution is not unique (e.g. an auxiliary variable of an inactive
    constraint in a modelling tool's output) the derivative's singular system is solved by a
    shifted factorization with iterative refinement, which gives the exact derivative of every
    unique part of the solution; differentiating a part that is not unique (an inconsistent
    singular system) raises :class:`~implicitdiff.SolveError` ``SINGULAR`` in the backward or
    ``jvp`` (not detected under ``jacrev``/``jacfwd``: docs/cone_program.md).

    Example (``min x₁ + x₂`` over the unit disc: ``x = −(1, 1)/√2``):
        >>> import torch, implicitdiff as idf
        >>> A = torch.tensor([[0., 0.], [-1., 0.], [0., -1.]], dtype=torch.float64)
        >>> b = torch.tensor([1., 0., 0.], dtype=torch.float64)
        >>> c = torch.ones(2, dtype=torch.float64, requires_grad=True)
        >>> x, y, s = idf.cone_program(A, b, c, {"q": [3]})
        >>> [round(v, 6) for v in x.tolist()]
        [-0.707107, -0.707107]
    """
    check_on_failure(on_failure)
    check_bool("return_info", return_info)
    max_iter = check_int("max_iter", max_iter, low=1, allow_none=False)
    spec = parse_cones(cones)
    A = as_float_tensor("A", _as_dense("A", A))
    b = as_float_tensor("b", b, like=A)
    c = as_float_tensor("c", c, like=A)
    check_same_dtype_device("A", A, b=b, c=c)
    if A.dim() not in (2, 3):
        raise InputError(f"A must have shape (m, n) or (B, m, n), got {tuple(A.shape)}")
    m, n = A.shape[-2:]
    if m != spec.m:
        raise InputError(f"A has {m} rows but cones describes {spec.m} (z={spec.z}, l={spec.l}, q={list(spec.q)}, "
                         f"s={list(spec.s)} → k(k+1)/2 rows each, ep={spec.ep} → 3 rows each); make them agree")
    if n == 0:
        raise InputError("A has no columns; a cone program needs at least one variable")
    if b.dim() not in (1, 2) or b.shape[-1] != m:
        raise InputError(f"b has shape {tuple(b.shape)} but must be ({m},) or (B, {m}) to match A {tuple(A.shape)}")
    if c.dim() not in (1, 2) or c.shape[-1] != n:
        raise InputError(f"c has shape {tuple(c.shape)} but must be ({n},) or (B, {n}) to match A {tuple(A.shape)}")
    batch = [t.shape[0] for t in (A, b, c) if t.dim() == (3 if t is A else 2)]
    if len(set(batch)) > 1:
        raise InputError(f"the batch sizes of A, b, c differ ({batch}); give each the same leading size or none")
    if A.device.type == "meta":
        raise InputError("A, b, c are meta tensors (shapes only, no values): cone_program must read their values; "
                         "pass tensors on a real device (e.g. .to('cpu'))")
    for name, t in (("A", A), ("b", b), ("c", c)):
        check_finite(name, t)
    dtype = A.dtype
    if rtol is None:
        rtol = 1e-8
    rtol = check_real("rtol", rtol, low=0.0, low_open=True, high=1.0, high_open=True, allow_none=False)
    batched = bool(batch)
    B = batch[0] if batched else 1
    if B == 0:  # an empty batch: empty results (connected to the inputs, zero gradients), as qp
        return _empty(A, b, c, return_info)
    if A.dim() == 3 and A.stride(0) == 0:  # a stride-0 expand of one matrix: shared (gradient summed by the expand)
        A = A[0]
    A64 = A.to(torch.float64)
    # a shared A stays (m, n) through ConeFn: one matmul per product, its gradient the sum over the batch
    b64 = b.to(torch.float64).expand(B, m)
    c64 = c.to(torch.float64).expand(B, n)
    problem = ConeProblem(spec, ConeInteriorPoint(rtol=rtol, max_iter=max_iter), cache={})
    alpha, beta, gamma = _scales(A64, b64, c64)
    if is_vmapped(alpha) or bool((alpha != 1).any()):  # (else no pass over A: the common case, LEAVE_WITHIN)
        A64 = A64 / alpha
    x, y, s, status, residual, iters = ConeFn.apply(A64, b64 / beta, c64 / gamma, problem)
    alpha = alpha.reshape(-1, 1)  # (B, 1) or (1, 1), as beta and gamma
    x, y, s = ((t * f).to(dtype) for t, f in ((x, beta / alpha), (y, gamma / alpha), (s, beta)))
    # a solution that does not fit the dtype (float32 overflow) is not a SUCCESS
    fits = torch.isfinite(x).all(-1) & torch.isfinite(y).all(-1) & torch.isfinite(s).all(-1)
    status = torch.where((status == Status.SUCCESS) & ~fits, int(Status.NONFINITE), status)
    info = SolveInfo(status, residual.to(dtype), iters)
    if is_vmapped(status):  # nothing can be raised from data under vmap: failed elements are NaN
        x = nan_where_failed(x, info.ok)
    else:
        x = apply_on_failure(x, info, on_failure, "cone_program", _HINTS)
    y, s = nan_where_failed(y, info.ok), nan_where_failed(s, info.ok)
    if not batched:
        x, y, s = x[0], y[0], s[0]
        info = SolveInfo(*(t[0] for t in info[:3]))
    return (x, y, s, info) if return_info else (x, y, s)


cone_program = eager_under_compile(cone_program)  # docs/architecture.md, "Under torch.compile"
