r"""Gradients of a cone program's solution map — the one place they are defined.

:class:`ConeFn` solves ``min cᵀx s.t. Ax + s = b, s ∈ K`` with a forward solver it is *given*
(this package never imports ``solvers/``) and differentiates the solution map as diffcp does
(Agrawal, Barratt, Boyd, Moursi, Busseti, 2019, "Differentiating through a cone program").

Derivation.  With ``Q = [[0, Aᵀ, c], [−A, 0, b], [−cᵀ, −bᵀ, 0]]`` (skew) and
``Π = Π_{ℝⁿ × K* × ℝ₊}``, a point ``z = (u, v, w)`` with ``w > 0`` solves the homogeneous
embedding iff the residual map ``N(z) = ((Q − I) Π + I)(z / w)`` vanishes, and then
``(x, y, s) = (u, Π_{K*}(v), Π_{K*}(v) − v) / w``.  At the solution take ``w = 1``,
``u = x``, ``v = y − s``; ``Π(z) = (x, y, 1)``.  Differentiating ``N(z; Q) = 0``:

    M ż = −Q̇ (x, y, 1),   M = (Q − I) DΠ(z) + I,   DΠ(z) = diag(I, DΠ_{K*}(v), 1)

    ẋ = u̇ − x ẇ,   ẏ = DΠ_{K*} v̇ − y ẇ,   ṡ = DΠ_{K*} v̇ − v̇ − s ẇ.

Reverse mode: the cotangents ``(x̄, ȳ, s̄)`` pull back to
``ḡ = (x̄, DΠᵀ(ȳ + s̄) − s̄, −xᵀx̄ − yᵀȳ − sᵀs̄)``; one transposed solve ``r = −M⁻ᵀ ḡ`` and,
reading ``rᵀ Q̇ (x, y, 1)`` off per block,

    Ā = y r_uᵀ − r_v xᵀ,   b̄ = r_v − r_w y,   c̄ = r_u − r_w x.

``M`` is ``(n + m + 1)`` square; :class:`~.cone_system.ConeSystem` solves it (and its
transpose) without a dense LU: in the eigen-frame of ``DΠ_{K*}`` (:mod:`.cone_frame`) the
rows with ``λ < 1 − τ`` are eliminated into an ``n × n`` Gram matrix and the others stay
unknowns of an ``(n + p)`` system, the last row and column are bordered out, and iterative
refinement against the exact ``M`` makes the answer exact (derivation there).  The forward's
refinement (:func:`refine`), the backward and :meth:`ConeFn.jvp` all use it.  ``DΠ_{K*}`` is
in :mod:`.cone_projection`, with the convention at non-differentiable points.  Elements whose
forward failed get zero cotangents (no NaN reaches a shared input's gradient).  A singular
``M`` means the solution is not unique (common in modelling-tool output: an auxiliary variable
of an inactive constraint, e.g. ``t`` in ``‖x‖ ≤ t ≤ 1``); ``M`` is taken with ``ℓ = (x, y, 1)``
added to its last column (the solution with ``ẇ = 0``) and the reduced system with a small
shift, and refinement converges to a solution of a consistent singular system, so every
unique part of the solution gets its exact derivative (diffcp uses LSQR for the same reason).
An *inconsistent* singular system means the derivative asked for does not exist (a part of the
solution that is not unique, e.g. ``x`` of an LP with a face of optima, is differentiated):
:func:`_check_unique` raises :class:`~implicitdiff.SolveError` ``SINGULAR`` there, as the QP
layer does for its singular KKT system (under ``jacrev``/``jacfwd``, whose batched cotangents skip
the solve's check, it cannot be detected; ``vmap`` of ``grad`` folds the batch and is checked).
At a ``tight`` point (an exponential cone near its degenerate face, :mod:`.cone_system`), whose
elements need that check, batched cotangents and tangents are folded into the batch as well
(:func:`_unchecked_tight`), so ``jacrev``/``jacfwd`` there equal ``grad``.

Double backward: the backward is written in differentiable operations; its one linear solve
is :class:`_AdjointSolve`, whose own backward is one solve with ``M`` and a vjp of a differentiable
mat-vec with ``Mᵀ`` (``D`` from :func:`dual_projection_jacobian`), and whose ``jvp`` is one more
solve with ``Mᵀ`` (forward over reverse: ``torch.func.hessian``, ``jacfwd(grad(f))``).  That backward
is itself a function (:class:`_AdjointSolveBackward`) whose backward, a third derivative, raises:
``torch.func`` builds a graph on every backward, so "grad enabled" does not mean a third derivative.
Both second-derivative routes raise at a ``tight`` point, where they came out wrong (:func:`_refuse_tight`).
The backward takes this differentiable route when a ``torch.func`` derivative level encloses it
(:func:`~.._core.torch_private.in_derivative_transform`), and plain ``jacrev``'s batched cotangents the one multi-RHS solve.

``vmap``: :meth:`ConeFn.vmap` folds the vmapped dimension into the batch (:func:`_fold`).  Under
``vmap`` over ``grad`` / ``vjp`` / ``jvp`` the saved solution is itself vmapped, which the batched
derivative code (in-place writes, sizes read from data) cannot take: the derivative then goes
through :class:`_Derivative`, whose ``vmap`` rule folds the same way.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch

from .._core.errors import SolveError
from .._core.status import Status
from .._core.torch_private import in_derivative_transform
from .._core.validate import is_vmapped
from ..linalg.cone_spec import ConeSpec
from .cone_projection import apply_block_diagonal, dual_projection_jacobian, project_dual, projection_pair
from .cone_system import ConeSystem, _mv, _rmv

__all__ = ["ConeFn", "ConeProblem"]


class ConeProblem(NamedTuple):
    """Static part of a call: the cone layout, a solver with ``solve(A, b, c, spec)`` returning
    ``(x, y, s, status, residual, iterations)`` for ``A (B, m, n)``, ``b (B, m)``, ``c (B, n)``
    and its tolerance ``rtol`` (of :func:`stopping_residual`, which the refined point must meet),
    the number of Newton refinement steps on the residual map (:func:`refine`), and ``cache``: a
    fresh ``dict`` per call through which the last step's factorization reaches the derivative
    (``None``: the derivative factorizes its own)."""

    spec: ConeSpec
    solver: Any
    refine: int = 1
    cache: Optional[dict] = None


def stopping_residual(b, c, x, y, s, Ax, Aty):
    """The interior point's stopping rule (:mod:`implicitdiff.solvers.cone_ipm`) as one number per
    element: the largest of ``‖Ax + s − b‖∞ / (1 + max(‖b‖∞, ‖Ax‖∞, ‖s‖∞))``,
    ``‖Aᵀy + c‖∞ / (1 + max(‖c‖∞, ‖Aᵀy‖∞))`` and ``|cᵀx + bᵀy| / (1 + min(|cᵀx|, |bᵀy|))``."""
    def inf(t):
        return t.abs().amax(-1)
    pres = inf(Ax + s - b) / (1 + torch.maximum(inf(b), torch.maximum(inf(Ax), inf(s))))
    dres = inf(Aty + c) / (1 + torch.maximum(inf(c), inf(Aty)))
    cx, by = (c * x).sum(-1), (b * y).sum(-1)
    gap = (cx + by).abs() / (1 + torch.minimum(cx.abs(), by.abs()))
    return torch.maximum(pres, torch.maximum(dres, gap))


def _residual_map(A, b, c, u, v, spec, s, y):
    """``N(z) = (Q − I)Π(z) + z`` at ``z = (u, v, 1)``, with ``Π_{K*}(v)`` (``(s, y)``: a nearby
    solution pair, the start of the exponential cone's projection); also ``Π_{K*}(v)`` and the
    :func:`stopping_residual` of the point ``(u, Π_{K*}(v), Π_{K*}(v) − v)``."""
    yv = project_dual(spec, v, s, y)
    Aty, Au = _rmv(A, yv), _mv(A, u)
    qt = -(c * u).sum(-1) - (b * yv).sum(-1)
    # (Q − I)Π(z) + z: the u- and w-parts of Π(z) are u and 1
    res = torch.cat([Aty + c, b - Au - yv + v, qt[:, None]], -1)
    return res, yv, stopping_residual(b, c, u, yv, yv - v, Au, Aty)


def refine(A, b, c, x, y, s, ok, spec, steps, rtol):
    """Newton steps on the residual map, ``z ← z − M⁻¹N(z)`` (Busseti, Moursi, Boyd 2019,
    "Solution refinement at regular points of conic problems"), for the elements ``ok``.

    An interior point stops at a small duality gap, but on a curved cone (second-order, PSD) the
    gap is quadratic in the distance along the cone's boundary: its ``x`` is only about ``√gap``
    accurate.  Newton on ``N`` converges quadratically at a regular solution.  Each step factorizes
    ``M`` with :class:`ConeSystem` (its shifted reduced LU, no refinement: a Newton step needs no
    more) and is followed by a chord step with the same factorization (one more solve: from an
    interior point at ``rtol = 1e-8`` a Newton step leaves the bench's SOCP at residuals up to
    ``1.2e-8``, the chord step at ``4e-13``).  The iterate moves where a step lowers ``‖N‖``; the
    point returned is the interior point's ``(x, y, s)`` until an iterate's :func:`stopping_residual`
    meets ``rtol`` (or is below the interior point's, where that is above ``rtol``).  Far from the
    solution (a loose ``rtol``) or at a degenerate one, a step can lower ``‖N‖`` (measured from
    ``Π_{K*}(y − s)``, which moves ``y`` and ``s`` by about ``√μ``) and raise the residuals the
    stopping rule measures; and the interior point's own residual is no bar to beat: it understates
    its error (``x`` ~1000x less accurate than a Newton iterate's of twice its residual, on that SOCP).
    Returns ``(x, y, s)``, their :func:`stopping_residual` (``ok`` elements; the others' are
    meaningless) and the last system factorized (``None`` without steps), whose factorization the
    derivative reuses.
    """
    n = x.shape[-1]
    resid = stopping_residual(b, c, x, y, s, _mv(A, x), _rmv(A, y))
    bar = torch.clamp(resid, min=rtol)
    u, v = x.clone(), y - s
    res, yv, _ = _residual_map(A, b, c, u, v, spec, s, y)
    res = torch.where(ok[:, None], res, torch.zeros_like(res))
    nrm = res.abs().amax(-1)
    system = None
    for _ in range(steps):
        system = ConeSystem(A, b, c, u, yv, yv - v, ok, spec)
        for _ in range(2):  # the Newton step, then the chord step
            dz = system.solve(res, steps=0, check=False)
            un, vn = u - dz[:, :n], v - dz[:, n:-1]
            wn = 1 - dz[:, -1:]
            un, vn = un / wn, vn / wn
            rn, yn, rs = _residual_map(A, b, c, un, vn, spec, yv - v, yv)
            nn = rn.abs().amax(-1)
            move = ok & (nn < nrm)  # (NaN compares False)
            keep = (move & (rs <= bar))[:, None]
            x, y, s = (torch.where(keep, a, b_) for a, b_ in ((un, x), (yn, y), (yn - vn, s)))
            resid = torch.where(keep[:, 0], rs, resid)
            m1 = move[:, None]
            u, v, yv, res = (torch.where(m1, a, b_) for a, b_ in ((un, u), (vn, v), (yn, yv), (rn, res)))
            nrm = torch.where(move, nn, nrm)
    return (x, y, s), resid, system


def _exact_problem(A, b, c, x, y, s, spec):
    """``(b', c', y', s')`` of the problem that the returned point solves exactly, at which the
    derivative is taken when ``spec`` has exponential cones: ``y' = Π_{K*}(y − s)``, ``s' = Π_K(s − y)``
    (exactly, the exponential cone's by its univariate root), ``b' = Ax + s'``, ``c' = −Aᵀy'`` (as
    constants: the derivative's own dependence on ``b, c, y, s``, which double backward reads, is kept).

    An interior point's exponential-cone pair is not a projection pair (``s`` and ``y`` inside their
    cones, ``sᵀy`` at the gap), and near the face ``s₂ = 0`` (``entr``/``log`` at a bound, where the
    dual runs off to infinity) ``DΠ_{K*}`` has an eigenvalue ``1 − δ`` with ``δ ≈ s₂ρ²`` (``ρ = s₁/s₂``)
    far below the residual: ``M`` is then within ``δ`` of singular and the forward's residual,
    amplified by ``1/δ``, made the gradient of ``x`` wrong by tens of percent (``entr`` at ``x ≤ 0``:
    −1.84 … −4.40 instead of −1.5).  At the exact pair and data ``M`` is the Jacobian at a solution,
    so only rounding is amplified.  The change of data is the forward's residual (``rtol``), as is
    that of the returned point; other cones, whose ``DΠ`` depends on ``y − s`` alone and has no such
    near-singular eigenvalue, keep the returned pair and data."""
    # the corrections are constants, for forward-mode tangents too (no_grad does not stop those; detach does):
    # the derivative's own dependence on (b, c, y, s) stays
    with torch.no_grad():
        yp, sp = projection_pair(spec, y - s)
        db, dc, dy, ds = (t.detach() for t in (_mv(A, x) + sp - b, -_rmv(A, yp) - c, yp - y, sp - s))
    return b + db, c + dc, y + dy, s + ds


def _check_unique(system, what):
    """Raise ``SINGULAR`` where the last solve of ``system`` met an inconsistent singular ``M``
    (:mod:`.cone_system`): the solution is not unique along the derivative asked for."""
    if not system.fallbacks:  # ``singular`` is only ever set by the dense fallback
        return
    bad = system.singular
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        rel = float(system.relres[i])
        raise SolveError(
            f"cone_program {what} failed in {int(bad.sum())} of {bad.numel()} batch elements (first: {i}): "
            f"the derivative system is singular and inconsistent (relative residual {rel:.3e}), so the solution "
            "is not unique along the requested derivative (e.g. an LP with a face of optima) and has no "
            "derivative there. Make the solution unique (e.g. add a small ε‖x‖² to the objective: a second-order "
            "cone) or differentiate only the parts of the solution that are unique; or the forward's answer is too "
            "inaccurate for a derivative (badly scaled data, e.g. rows of very different sizes): tighten rtol or "
            "rescale the data.",
            status=Status.SINGULAR, residual=rel)


def _refuse_tight(system):
    """Raise where a ``tight`` element of ``system`` (an exponential cone near its degenerate face:
    :mod:`.cone_system`) is asked for a second derivative: ``M`` is near-singular there, and the second
    derivative's terms (the derivative of ``M`` itself) came out wildly wrong (``φ''`` of ``entr`` at its
    bound: 653 for 4.5), where the first derivative, at the exact projection pair, is right."""
    bad = system.tight & system.ok
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise SolveError(
            f"cone_program second derivative refused in {int(bad.sum())} of {bad.numel()} batch elements (first: {i}): "
            "a second derivative at a point where the exponential cone's derivative is near-singular (e.g. entr/log "
            "at its bound, where the dual runs off to infinity) is not supported. Take the first derivative there, or "
            "move the point off the bound.", status=Status.SINGULAR)


def _pullback_rhs(spec, D, x, y, s, gx, gy, gs):
    """``ḡ = (x̄, DΠᵀ(ȳ + s̄) − s̄, −xᵀx̄ − yᵀȳ − sᵀs̄)`` (``D`` dense block-diagonal, symmetric)."""
    gv = apply_block_diagonal(spec, D, (gy + gs)[..., None])[..., 0] - gs
    gw = -(x * gx).sum(-1) - (y * gy).sum(-1) - (s * gs).sum(-1)
    return torch.cat([gx, gv, gw[:, None]], -1)


def _transposed_matvec(A, b, c, x, y, s, ok, spec, r):
    """``Mᵀ r`` with ``M`` of :mod:`.cone_system` built from differentiable ops (``D`` from
    :func:`dual_projection_jacobian`), zero for elements that are not ``ok``."""
    n, m = x.shape[-1], y.shape[-1]
    ru, rv, rw = r[:, :n], r[:, n:n + m], r[:, -1:]
    D = dual_projection_jacobian(spec, y, s)
    # Mᵀ = [[0, −Aᵀ, −c], [DA, I − D, −Db], [(c + x)ᵀ, (b + y)ᵀ, 1]]
    t1 = -_rmv(A, rv) - c * rw
    t2 = apply_block_diagonal(spec, D, (_mv(A, ru) - rv - b * rw)[..., None])[..., 0] + rv
    t3 = ((c + x) * ru).sum(-1, keepdim=True) + ((b + y) * rv).sum(-1, keepdim=True) + rw
    out = torch.cat([t1, t2, t3], -1)
    return torch.where(ok[:, None], out, torch.zeros_like(out))


def _fold(info, in_dims, tensors, n_a, keep_shared):
    """Fold ``vmap``'s dimension into the batch: each tensor becomes ``(V·B, …)``.  The first ``n_a`` are
    ``A``-like (``(B, m, n)`` or a shared ``(m, n)``, which stays shared when ``keep_shared`` and not
    vmapped, else one copy per element), the others ``(B, …)``; ``None`` stays ``None``."""
    V = info.batch_size
    t, d = tensors[n_a], in_dims[n_a]  # a batch-leading tensor: B
    B = t.shape[0] if d is None else t.shape[1 if d == 0 else 0]
    flat = []
    for i, (t, d) in enumerate(zip(tensors, in_dims)):
        if t is None or (i < n_a and d is None and t.dim() == 2 and keep_shared):
            flat.append(t)
            continue
        t = t.unsqueeze(0).expand((V,) + t.shape) if d is None else t.movedim(d, 0)
        if i < n_a and t.dim() == 3:  # a shared A: one matrix per element
            t = t.unsqueeze(1).expand(V, B, *t.shape[1:])
        flat.append(t.reshape((V * B,) + t.shape[2:]))
    return flat


def _unfold(info, t):
    """``(V·B, …)`` back to ``(V, B, …)``."""
    return t.reshape((info.batch_size, t.shape[0] // info.batch_size) + t.shape[1:])


def _unchecked_tight(system, *t):
    """Whether a solve with the batched (vmapped: ``jacrev``/``jacfwd``) ``t`` would skip the check that a
    ``tight`` element of ``system`` needs (:mod:`.cone_system`: refined to rounding or the fallback);
    ``tight`` is of the unbatched point, read on the host."""
    return (any(is_vmapped(v) for v in t) and not is_vmapped(system.tight)
            and bool((system.tight & system.ok).any()))


def _vjp(A, b, c, x, y, s, ok, gx, gy, gs, spec, reuse):
    """``(Ā, b̄, c̄)`` (module docstring), not differentiable; ``Ā`` summed over the batch for a shared ``A``.
    Batched cotangents at a ``tight`` point go through :class:`_Derivative`, which folds them into the
    batch, so that every one is solved with the check, as ``grad`` is (:func:`_unchecked_tight`)."""
    system = ConeSystem(A, b, c, x, y, s, ok, spec, reuse=reuse)
    if _unchecked_tight(system, gx, gy, gs):
        return _Derivative.apply("vjp", spec, None, A, None, b, c, x, y, s, ok, gx, gy, gs)
    gv = system.apply_D(gy + gs) - gs
    gw = -(x * gx).sum(-1) - (y * gy).sum(-1) - (s * gs).sum(-1)
    r = -system.solve(torch.cat([gx, gv, gw[:, None]], -1), adjoint=True)
    _check_unique(system, "backward")
    return _gradients(A, x, y, r)


def _gradients(A, x, y, r):
    """``(Ā, b̄, c̄)`` from ``r = −M⁻ᵀḡ`` (module docstring)."""
    n, m = x.shape[-1], y.shape[-1]
    ru, rv, rw = r[:, :n], r[:, n:n + m], r[:, -1:]
    # Ā = y r_uᵀ − r_v xᵀ as one product of rank 2 (shared A: the sum over the batch, rank 2B)
    if A.dim() == 2:
        gA = torch.cat([y, -rv], 0).mT @ torch.cat([ru, x], 0)
    else:
        gA = torch.stack([y, -rv], -1) @ torch.stack([ru, x], 1)
    return gA, rv - rw * y, ru - rw * x


def _jvp(A, b, c, x, y, s, ok, dA, db, dc, spec, reuse):
    """``(ẋ, ẏ, ṡ)`` (module docstring), not differentiable; batched tangents at a ``tight`` point as in :func:`_vjp`."""
    n, m = x.shape[-1], y.shape[-1]
    g = torch.cat([_rmv(dA, y) + dc,
                   -_mv(dA, x) + db,
                   (-(dc * x).sum(-1) - (db * y).sum(-1))[:, None]], -1)
    system = ConeSystem(A, b, c, x, y, s, ok, spec, reuse=reuse)
    if _unchecked_tight(system, g):
        return _Derivative.apply("jvp", spec, None, A, dA, b, c, x, y, s, ok, None, db, dc)
    dz = -system.solve(g)
    _check_unique(system, "forward-mode derivative (jvp)")
    du, dv, dw = dz[:, :n], dz[:, n:n + m], dz[:, -1:]
    Ddv = system.apply_D(dv)
    return du - x * dw, Ddv - y * dw, Ddv - dv - s * dw


class _Derivative(torch.autograd.Function):
    """:func:`_vjp` (``mode="vjp"``, ``(t₁, t₂, t₃) = (x̄, ȳ, s̄)``) or :func:`_jvp` (``"jvp"``, ``(Ȧ, ḃ, ċ)``)
    as a function whose ``vmap`` rule folds the vmapped dimension into the batch, as :meth:`ConeFn.vmap`
    does: used where the saved solution itself is vmapped (``vmap`` over ``grad``, ``vjp``, ``jvp``),
    which the batched code (in-place writes, data-dependent sizes) cannot take.  Not differentiable."""

    @staticmethod
    def forward(mode, spec, reuse, A, dA, b, c, x, y, s, ok, t1, t2, t3):
        if mode == "jvp":
            return _jvp(A, b, c, x, y, s, ok, dA, t2, t3, spec, reuse)
        return _vjp(A, b, c, x, y, s, ok, t1, t2, t3, spec, reuse)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError("cone_program under vmap over grad / vjp / jvp is differentiable once; a second "
                                  "derivative there is not supported: take it outside vmap")

    jvp = backward  # forward mode over it (vmap(hessian(f))): the same refusal

    @staticmethod
    def vmap(info, in_dims, mode, spec, reuse, A, dA, b, c, x, y, s, ok, t1, t2, t3):
        flat = _fold(info, in_dims[3:], (A, dA, b, c, x, y, s, ok, t1, t2, t3), 2, keep_shared=False)
        out = [_unfold(info, t) for t in _Derivative.apply(mode, spec, reuse, *flat)]
        if mode == "vjp" and A.dim() - (in_dims[3] is not None) == 2:  # a shared A: Ā summed over the batch
            out[0] = out[0].sum(1)
        return tuple(out), (0, 0, 0)


class _Holder:
    """Carries a system into and out of :class:`_AdjointSolve` (an object, not a list: ``torch.func``
    rebuilds pytree containers between ``forward`` and ``setup_context``)."""

    def __init__(self, system):
        self.system = system


class _AdjointSolve(torch.autograd.Function):
    """``r = −M⁻ᵀ ḡ`` as a differentiable function of ``ḡ`` and of ``(A, b, c, x, y, s)`` (through
    ``M``), for the double backward.  Forward: the structured solve.  Backward (``Mᵀr = −ḡ``):
    ``ḡ`` gets ``−M⁻¹ r̄``, and ``θ ∈ (A, b, c, x, y, s)`` gets ``∂_θ ⟨−M⁻¹ r̄, Mᵀ(θ) r⟩`` — one
    solve with ``M`` and one autograd pass through :func:`_transposed_matvec`."""

    @staticmethod
    def forward(g, A, b, c, x, y, s, ok, spec, holder):
        # holder: a nearby system to reuse (or None) in, this system out (read by setup_context)
        holder.system = ConeSystem(A, b, c, x, y, s, ok, spec, reuse=holder.system)
        r = -holder.system.solve(g, adjoint=True)
        _check_unique(holder.system, "backward")
        return r

    @staticmethod
    def setup_context(ctx, inputs, output):
        g, A, b, c, x, y, s, ok, spec, holder = inputs
        ctx.system, ctx.spec = holder.system, spec
        ctx.save_for_backward(A, b, c, x, y, s, ok, output)
        ctx.save_for_forward(A, b, c, x, y, s, ok, output)

    @staticmethod
    def backward(ctx, gr):
        A, b, c, x, y, s, ok, r = ctx.saved_tensors
        return _AdjointSolveBackward.apply(gr, A, b, c, x, y, s, ok, r, ctx.system, ctx.spec) + (None, None, None)

    @staticmethod
    def jvp(ctx, dg, dA, db, dc, dx, dy, ds, *_):
        # Mᵀr = −g:  ṙ = −M⁻ᵀ(ġ + Ṁᵀr), Ṁᵀr the derivative of the differentiable mat-vec along the tangents,
        # as the transpose of its (linear) vjp: the projection's Jacobian builds blocks in place, which
        # forward mode cannot take under jacfwd's vmap of the tangents
        _refuse_tight(ctx.system)
        A, b, c, x, y, s, ok, r = ctx.saved_tensors
        prim = (A, b, c, x, y, s)
        tang = tuple(torch.zeros_like(p) if t is None else t for p, t in zip(prim, (dA, db, dc, dx, dy, ds)))
        pull = torch.func.vjp(lambda *p: _transposed_matvec(*p, ok, ctx.spec, r), *prim)[1]
        dMr = torch.func.vjp(pull, torch.zeros_like(r))[1](tang)[0]
        rhs = dMr if dg is None else dg + dMr
        dr = -ctx.system.solve(rhs, adjoint=True)
        _check_unique(ctx.system, "forward-mode second derivative")
        return dr

    @staticmethod
    def vmap(info, in_dims, g, A, b, c, x, y, s, ok, spec, holder):
        # fold the vmapped dim into the batch (the system is factored for every element), solve, unfold
        flat = _fold(info, in_dims[1:8] + in_dims[:1], (A, b, c, x, y, s, ok, g), 1, keep_shared=True)
        return _unfold(info, _AdjointSolve.apply(flat[-1], *flat[:-1], spec, _Holder(None))), 0


class _AdjointSolveBackward(torch.autograd.Function):
    """:class:`_AdjointSolve`'s backward as a function (``torch.func`` runs every backward with a graph:
    nothing of the solve may be recorded), whose own backward, a third derivative of the solution, raises."""

    generate_vmap_rule = True

    @staticmethod
    def forward(gr, A, b, c, x, y, s, ok, r, system, spec):
        _refuse_tight(system)
        lam = -system.solve(gr)
        _check_unique(system, "double backward")
        grads = torch.func.vjp(lambda *p: _transposed_matvec(*p, ok, spec, r), A, b, c, x, y, s)[1](lam)
        return (lam,) + tuple(grads)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError("cone_program's solution is differentiable twice (double backward, "
                                  "torch.func.hessian, jacrev(grad(f)), torch.autograd.functional.hessian); a third "
                                  "derivative is not supported")


class ConeFn(torch.autograd.Function):
    """``(x, y, s, status, residual, iterations) = ConeFn.apply(A, b, c, problem)``.

    ``A (B, m, n)`` or shared ``(m, n)`` (kept unexpanded throughout: every product with it is one
    matmul for the batch, and its gradient is the sum over the batch, formed as one product
    ``yᵀr_u − r_vᵀx``), ``b (B, m)``, ``c (B, n)`` batched (the caller expands shared ``b``, ``c``, so
    autograd sums their gradients); outputs ``x (B, n)``, ``y, s (B, m)`` differentiable.  The
    backward is differentiable (double backward: :class:`_AdjointSolve`).
    """

    @staticmethod
    def forward(A, b, c, problem):
        Ab = A.expand(b.shape[:1] + A.shape[-2:])  # the solver reads a stride-0 expand as shared
        x, y, s, status, residual, iters = problem.solver.solve(Ab, b, c, problem.spec)
        if problem.refine:
            ok = status == Status.SUCCESS
            (x, y, s), res, system = refine(A, b, c, x, y, s, ok, problem.spec, problem.refine,
                                               problem.solver.rtol)
            # the residual reported is the returned point's; SUCCESS only where it meets rtol
            residual = torch.where(ok, res, residual)
            status = torch.where(ok & ~(res <= problem.solver.rtol), Status.BREAKDOWN, status)
            if problem.cache is not None:
                problem.cache["system"] = system
        return x, y, s, status, residual, iters

    @staticmethod
    def setup_context(ctx, inputs, output):
        A, b, c, problem = inputs
        x, y, s, status, residual, iters = output
        ctx.mark_non_differentiable(status, residual, iters)
        ctx.set_materialize_grads(False)
        ctx.spec = problem.spec
        ctx.reuse = problem.cache.pop("system", None) if problem.cache is not None else None
        ctx.save_for_backward(A, b, c, x, y, s, status)
        ctx.save_for_forward(A, b, c, x, y, s, status)

    @staticmethod
    def vmap(info, in_dims, A, b, c, problem):
        # the function is batched already: fold the vmapped dim into the batch, solve, unfold
        out = ConeFn.apply(*_fold(info, in_dims[:3], (A, b, c), 1, keep_shared=True), problem)
        return tuple(_unfold(info, t) for t in out), (0,) * 6

    @staticmethod
    def _unpack(ctx):
        A, b, c, x, y, s, status = ctx.saved_tensors
        ok = status == Status.SUCCESS
        x, y, s = (torch.where(ok[:, None], t, torch.zeros_like(t)) for t in (x, y, s))
        if ctx.spec.ep:
            b, c, y, s = _exact_problem(A, b, c, x, y, s, ctx.spec)
        return A, b, c, x, y, s, ok

    @staticmethod
    def backward(ctx, gx, gy, gs, *_):
        A, b, c, x, y, s, ok = ConeFn._unpack(ctx)
        gx = torch.zeros_like(x) if gx is None else gx
        gy = torch.zeros_like(y) if gy is None else gy
        gs = torch.zeros_like(s) if gs is None else gs
        okc = ok[:, None]
        gx, gy, gs = (torch.where(okc, t, torch.zeros_like(t)) for t in (gx, gy, gs))
        spec = ctx.spec
        if is_vmapped(x):  # vmap over grad / vjp: the state itself is batched
            return _Derivative.apply("vjp", spec, ctx.reuse, A, None, b, c, x, y, s, ok, gx, gy, gs) + (None,)
        if torch.is_grad_enabled() and (in_derivative_transform() or not any(is_vmapped(t) for t in (gx, gy, gs))):
            # create_graph, or a torch.func derivative of this backward (hessian): every step differentiable,
            # the solve through _AdjointSolve (plain jacrev's batched cotangents: one multi-RHS _vjp)
            D = dual_projection_jacobian(spec, y, s)
            g = _pullback_rhs(spec, D, x, y, s, gx, gy, gs)
            r = _AdjointSolve.apply(g, A, b, c, x, y, s, ok, spec, _Holder(ctx.reuse))
            return _gradients(A, x, y, r) + (None,)
        return _vjp(A, b, c, x, y, s, ok, gx, gy, gs, spec, ctx.reuse) + (None,)

    @staticmethod
    def jvp(ctx, dA, db, dc, _):
        A, b, c, x, y, s, ok = ConeFn._unpack(ctx)
        dA = torch.zeros_like(A) if dA is None else dA
        db = torch.zeros_like(b) if db is None else db
        dc = torch.zeros_like(c) if dc is None else dc
        if is_vmapped(x):  # vmap over jvp: the state itself is batched
            out = _Derivative.apply("jvp", ctx.spec, ctx.reuse, A, dA, b, c, x, y, s, ok, None, db, dc)
        else:
            out = _jvp(A, b, c, x, y, s, ok, dA, db, dc, ctx.spec, ctx.reuse)
        return out + (None, None, None)
