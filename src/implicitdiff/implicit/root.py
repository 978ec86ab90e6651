"""Implicit gradients of ``y*(θ)`` defined by ``F(y*, θ) = 0`` — one ``autograd.Function`` for every layer.

Differentiating the equation (the seed note's step, for a nonlinear ``F``)::

    ∂F/∂y · dy/dθ + ∂F/∂θ = 0

* reverse mode: solve the adjoint system ``(∂F/∂y)ᵀ u = ȳ``, then
  ``θ̄ = −(∂F/∂θ)ᵀ u`` (one vector-Jacobian product of ``F`` in ``θ``);
* forward mode: ``ẇ = ∂F/∂θ · θ̇`` (one Jacobian-vector product), then solve
  ``∂F/∂y · ẏ = −ẇ``.

The forward solver is passed in (``implicit/`` never imports ``solvers/``) and
runs on detached tensors; memory does not grow with its iterations.  The
backward is written with differentiable operations (``torch.func`` products,
the differentiable linear solves of :mod:`.linear`), so double backward and
``torch.func`` transforms compose.  Under ``vmap`` the rule below moves the
vmapped dimension into the problem's batch and ``vmap``\\ s ``F`` over it, so
the solver sees one batched problem with per-element convergence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

import torch

from .._core.defaults import default_rtol
from .._core.engine import vjp as engine_vjp, vjp_fn as engine_vjp_fn
from .._core.errors import SolveError
from .._core.jacobian import batch_jacobian
from .._core.failure import apply_on_failure, nan_where_failed
from .._core.status import SolveInfo, Status
from .._core.tree import Tree
from .._core.validate import in_transform, is_vmapped
from ..linalg.factorization import from_tensors
from .adjoint import Implicit, Neumann
from .linear import FactoredSolveFn, SolveSpec, solve as linear_solve_fn

__all__ = ["RootProblem", "RootFn", "batch_jacobian", "adjoint_solve", "tangent_solve", "jvp_by_vjp", "Linearization",
           "Speculation", "record", "may_speculate", "isolate"]


@dataclass(frozen=True, eq=False)
class RootProblem:
    """Everything static about ``F(y, *params) = 0`` (not tensors).

    ``solve(F, y0, params, batch_dims) -> SolverResult`` is the forward solver (``y``, ``info``,
    optional ``jacobian`` factorization at ``y``); ``batch_dims`` leading dims of
    ``y`` are independent problems; ``symmetric`` declares ``∂F/∂y`` symmetric
    (argmin's Hessian), ``definite`` also positive definite (a strict minimum: CG applies); ``neumann_alpha`` is the default step of :class:`Neumann`.
    ``krylov(name)`` returns a matrix-free solver ``(A, b, x0, rtol, atol, max_iter) -> (x, info)``.
    ``recorded``: a list (fresh per solve) when the forward solver should be handed a
    :class:`Speculation`, whose recording then goes to the backward through it.
    """

    F: Callable
    solve: Callable
    tree: Tree
    batch_dims: int = 0
    adjoint: Any = Implicit()
    symmetric: bool = False
    definite: bool = False
    neumann_alpha: float = 1.0
    on_failure: str = "raise"
    what: str = "root"
    hints: Optional[dict] = None
    krylov: Optional[Callable] = None
    # a list when the forward should speculate (:class:`Speculation`): it passes the recording to the backward
    recorded: Optional[list] = None

    def residual(self, y, leaves):
        return self.F(y, *self.tree.unflatten(leaves))


def _flat(y, bd):
    return y.reshape(*y.shape[:bd], -1)


def jvp_by_vjp(f: Callable, primals: tuple, tangents: tuple):
    """``(f(primals), ∂f · tangents)`` from two reverse passes (the "double-vjp" trick).

    ``u ↦ ⟨vjpᵤ, t⟩`` is linear in ``u`` with gradient ``J t``.  Used instead of
    forward-mode AD because an ``autograd.Function``'s ``jvp`` already runs
    inside a forward-AD level, and PyTorch does not nest those.
    """
    out, vjp = torch.func.vjp(f, *primals)

    def pairing(u):
        return sum((a * b).sum() for a, b in zip(vjp(u), tangents))

    return out, torch.func.grad(pairing)(torch.zeros_like(out))


def _linear_map(F_y: Callable, y: torch.Tensor, bd: int, transpose: bool):
    """``v -> (∂F/∂y) v`` or ``(∂F/∂y)ᵀ v`` at ``y``, on flattened ``(*batch, n)`` vectors.

    One forward evaluation of ``F`` is linearized once; each product is then one
    reverse pass (two for ``J v``, by the double-vjp trick).
    """
    out, vjp = torch.func.vjp(F_y, y)

    def rmv(v):
        return _flat(vjp(v.reshape(y.shape))[0], bd)

    def mv(v):
        v = v.reshape(y.shape)
        pairing = lambda u: (vjp(u)[0] * v).sum()  # noqa: E731
        return _flat(torch.func.grad(pairing)(torch.zeros_like(out)), bd)

    return rmv if transpose else mv


class Linearization:
    """``F`` recorded once at ``y`` for a first-order, matrix-free backward.

    The adjoint products ``(∂F/∂y)ᵀ v`` (one reverse pass in ``y``: the θ branches of the
    graph are pruned) and the parameter VJP ``(∂F/∂θ)ᵀ u`` share one evaluation of ``F``
    (``torch.func.vjp`` evaluates ``F`` once for each, and costs more per product).  For a
    fixed-point residual ``F = T − id`` (``F.map = T``, :func:`~implicitdiff.fixed_point_residual`)
    ``T`` is recorded instead: ``(∂F/∂y)ᵀ v = (∂T/∂y)ᵀ v − v``, ``∂F/∂θ = ∂T/∂θ``, and
    :meth:`map_vjp` gives the adjoint fixed-point iteration its products without the ``− v``.
    """

    def __init__(self, yr: torch.Tensor, out: torch.Tensor, fixed: bool):
        self.yr, self.out, self.fixed = yr, out, fixed

    def map_vjp(self, v):
        """``(∂T/∂y)ᵀ v`` for a fixed-point residual, else ``(∂F/∂y)ᵀ v``; ``v`` of ``y``'s shape."""
        g = engine_vjp(self.out, (self.yr,), v)[0]
        return torch.zeros_like(v) if g is None else g

    def rmv(self, v):
        """``(∂F/∂y)ᵀ v``."""
        g = self.map_vjp(v)
        return g - v if self.fixed else g

    def theta_vjp(self, u, leaves):
        """``−(∂F/∂θ)ᵀ u`` for each of ``leaves`` (``None`` where ``F`` does not depend on it)."""
        return engine_vjp(self.out, leaves, -u, retain_graph=False)


def record(problem: RootProblem, y, leaves, T: Optional[Callable] = None, params=None) -> Linearization:
    """A :class:`Linearization` of ``problem.F`` at ``y`` (grad mode on, ``y`` a fresh leaf).

    ``T``: the fixed-point map to record (``F = T − id``), when it is not ``problem.F.map``
    (a cheaper way to evaluate the same map, e.g. a DEQ cell called directly); ``params``:
    ``leaves`` already unflattened."""
    params = problem.tree.unflatten(list(leaves)) if params is None else params
    T = getattr(problem.F, "map", None) if T is None else T
    with torch.enable_grad():
        yr = y.detach().requires_grad_()
        if T is not None:
            return Linearization(yr, T(yr, *params), True)
        return Linearization(yr, problem.F(yr, *params), False)


class Speculation:
    """The residual handed to the forward solver when the backward may reuse one of its evaluations.

    Called as ``F``; its ``speculate(y, *params)`` (see
    :func:`~implicitdiff.solvers._loop.speculative`) returns ``F(y)`` too, but recorded as a
    :class:`Linearization` in the *original* (differentiable) leaves — the solver's own
    ``params`` are detached copies, and are ignored.  A solver calls it for the evaluation it
    expects to be its last; :meth:`take` hands the recording over only if it was taken at the
    very iterate the solver returned (same storage, shape and version), so a wrong guess costs
    one recorded evaluation, never a gradient at the wrong point.
    """

    def __init__(self, problem: RootProblem, leaves):
        self.problem, self.leaves = problem, leaves
        self.F = problem.F
        self.map = getattr(problem.F, "map", None)       # a fixed-point residual's map, for the solver's steps
        self._last = None
        self._params = None                              # the leaves unflattened, once

    def __call__(self, y, *params):
        return self.F(y, *params)

    def speculate(self, y, *params, map: Optional[Callable] = None):
        """``F(y)``, recorded; ``map``: the fixed-point map to record instead of ``F``'s (see :func:`record`),
        called with the original parameters."""
        if self._params is None:
            self._params = self.problem.tree.unflatten(list(self.leaves))
        lin = record(self.problem, y, self.leaves, map, self._params)
        self._last = (lin, y.data_ptr(), y.shape, y._version)
        value = lin.out.detach()
        return value - y if lin.fixed else value

    def take(self, y) -> Optional[Linearization]:
        last, self._last = self._last, None
        if last is None:
            return None
        lin, ptr, shape, version = last
        return lin if (y.data_ptr() == ptr and y.shape == shape and y._version == version) else None


def may_speculate(adjoint, y0, leaves, batch_dims: int) -> bool:
    """Whether a forward solve should record its last evaluation for the backward: a first-order
    backward will want a :class:`Linearization` (grad mode on, a leaf requiring grad, no
    ``torch.func`` transform, a matrix-free :class:`Implicit` adjoint)."""
    if not (torch.is_grad_enabled() and isinstance(adjoint, Implicit)) or in_transform():
        return False
    if not any(isinstance(l, torch.Tensor) and l.requires_grad for l in leaves):
        return False
    n = math.prod(y0.shape[batch_dims:])
    return adjoint.solver != "lu" and (adjoint.solver != "auto" or n > adjoint.dense_max)


def _linearization(problem: RootProblem, y, leaves, gy, factors, recorded=None) -> Optional[Linearization]:
    """A :class:`Linearization` for a first-order, matrix-free backward — ``recorded`` by the
    forward solve if it has one — else ``None``: not under ``create_graph`` (grad mode on),
    ``vmap`` or ``torch.func`` transforms, nor with the forward's factorization or a dense
    adjoint, where the functional products are kept.
    """
    if (torch.is_grad_enabled() or factors or is_vmapped(gy) or not isinstance(problem.adjoint, Implicit)
            or in_transform()):
        return None
    if _adjoint_solver(problem, math.prod(y.shape[problem.batch_dims:]), factors) == "lu":
        return None
    return recorded if recorded is not None else record(problem, y, leaves)


def _adjoint_solver(problem: RootProblem, n: int, factors) -> str:
    """The linear solver of an :class:`Implicit` adjoint, ``"auto"`` resolved."""
    adj = problem.adjoint
    if adj.solver != "auto":
        return adj.solver
    dense = bool(factors) or n <= adj.dense_max or problem.krylov is None  # Newton's LU is free to reuse
    return "lu" if dense else ("cg" if problem.definite else "minres" if problem.symmetric else "gmres")


def _check_linear(status, residual, what, on_failure, out, info_iters=None, skip=None):
    if skip is not None:  # elements whose forward failed: no gradient to check (their rhs is zero)
        status = torch.where(skip, 0, status)
        out = torch.where(_expand(skip, out), torch.zeros_like(out), out)
    info = SolveInfo(status, residual, torch.zeros_like(status) if info_iters is None else info_iters)
    if is_vmapped(status):
        return nan_where_failed(out, info.ok)
    hints = {
        Status.SINGULAR: "∂F/∂y is singular at the solution, so the implicit function theorem does not apply; "
                         "check that the root is isolated (or regularize F)",
        Status.MAX_ITERATIONS: "raise Implicit(max_iter=...) or loosen Implicit(rtol=...), or use Implicit(solver='lu')",
        Status.BREAKDOWN: "the adjoint Krylov solver broke down: use Implicit(solver='gmres') or 'lu'",
    }
    return apply_on_failure(out, info, "raise", what, hints, policy_hint=False)


def _solve_jacobian(problem: RootProblem, y, leaves, rhs, factors, transpose: bool, skip=None, lin=None):
    """Solve ``J x = rhs`` (``transpose``: ``Jᵀ x = rhs``) at ``y``; ``rhs`` of y's shape.

    ``lin``: a :func:`_linearization` of ``F`` at ``y`` for the transposed products, or ``None``.
    """
    bd = problem.batch_dims
    adj = problem.adjoint
    params = problem.tree.unflatten(leaves)
    F_y = lambda yy: problem.F(yy, *params)  # noqa: E731
    n = math.prod(y.shape[bd:])
    what = f"the {'adjoint' if transpose else 'tangent'} solve of {problem.what}"
    R = _flat(rhs, bd)

    if isinstance(adj, Neumann):
        alpha = problem.neumann_alpha if adj.alpha is None else adj.alpha
        mv = _linear_map(F_y, y, bd, transpose)
        x = torch.zeros_like(R)
        for _ in range(int(adj.k)):
            x = x + alpha * (R - mv(x))
        return x.reshape(rhs.shape)

    solver = _adjoint_solver(problem, n, factors)
    if solver != "lu" and (is_vmapped(R) or torch.is_grad_enabled()):
        # The Krylov and Richardson loops decide convergence on the host and update buffers in
        # place: under vmap (jacrev, vmap(grad)) and in a differentiable backward (double
        # backward) the adjoint is solved with the dense per-element Jacobian instead.
        solver = "lu"
    if solver == "lu":
        if factors and not torch.is_grad_enabled():
            # first order: reuse the forward solver's factorization of J at y
            X = from_tensors("lu", factors).solve(R.unsqueeze(-1), adjoint=transpose)
            bad = ~torch.isfinite(X).flatten(-2).all(-1)
            status = torch.where(bad, int(Status.SINGULAR), 0).to(torch.int64)
            X = _check_linear(status, torch.zeros(status.shape, dtype=X.dtype, device=X.device), what, "raise", X,
                              skip=skip)
            return X.squeeze(-1).reshape(rhs.shape)
        J = batch_jacobian(F_y, y, bd)
        if factors:
            X = FactoredSolveFn.apply("lu", transpose, J, R.unsqueeze(-1), *factors)
            status = torch.where(~torch.isfinite(X).flatten(-2).all(-1), int(Status.SINGULAR), 0).to(torch.int64)
            residual = torch.zeros(status.shape, dtype=X.dtype, device=X.device)
        else:
            A = J.mT if transpose else J
            X, status, residual, _, _ = linear_solve_fn(SolveSpec("exact"), A, R.unsqueeze(-1))
        X = _check_linear(status, residual, what, "raise", X, skip=skip)
        return X.squeeze(-1).reshape(rhs.shape)

    if lin is not None and transpose:  # the recorded linearization: one reverse pass in y per product
        def linear_map(*_):
            def rmv(v):
                return _flat(lin.rmv(v.reshape(y.shape)), bd)
            # a fixed-point residual's (∂T/∂y)ᵀ, for the adjoint fixed-point iteration (FixedPointAdjoint);
            # y already flat (a DEQ's (B, n)): the engine closure itself, no reshapes per product
            if not lin.fixed:
                rmv.map_vjp = None
            elif y.dim() == bd + 1:
                rmv.map_vjp = engine_vjp_fn(lin.out, lin.yr)
            else:
                rmv.map_vjp = lambda v: _flat(lin.map_vjp(v.reshape(y.shape)), bd)
            return rmv
    else:
        linear_map = _linear_map

    if solver == "richardson":
        alpha = problem.neumann_alpha
        mv = linear_map(F_y, y, bd, transpose)
        X, info = _richardson(mv, R, alpha, adj)
        X = _check_linear(info.status, info.residual, what, "raise", X, info.iterations, skip=skip)
        return X.reshape(rhs.shape)

    if problem.krylov is None:
        raise SolveError(f"matrix-free adjoint solver {solver!r} is unavailable; use Implicit(solver='lu')")
    mv = linear_map(F_y, y, bd, transpose)
    X, info = problem.krylov(solver, mv, R, rtol=adj.rtol, atol=adj.atol, max_iter=adj.max_iter)
    if solver == "cg" and adj.solver == "auto" and bool((info.status == Status.BREAKDOWN).any()):
        # CG met pᵀHp ≤ 0: not a strict minimum after all (a saddle, or a flat direction): MINRES needs symmetry only
        X, info = problem.krylov("minres", mv, R, rtol=adj.rtol, atol=adj.atol, max_iter=adj.max_iter)
    X = _check_linear(info.status, info.residual, what, "raise", X, info.iterations, skip=skip)
    return X.reshape(rhs.shape)


def _richardson(mv, R, alpha, adj: Implicit, check_every: int = 5):
    """``x ← x + α (R − J x)`` from 0 until ``‖R − J x‖ ≤ max(rtol ‖R‖, atol)`` per element.

    For a fixed point (``J = ∂T/∂z − I``, ``α = −1``) this is the adjoint fixed-point
    iteration ``x ← (∂T/∂z)ᵀ x − ȳ``: one vector-Jacobian product per step,
    convergent when ``T`` is a contraction at ``z*``.
    """
    rtol = default_rtol(R.dtype) if adj.rtol is None else adj.rtol
    max_iter = 1000 if adj.max_iter is None else int(adj.max_iter)
    rnorm0 = R.norm(dim=-1)
    tol = torch.clamp(rtol * rnorm0, min=adj.atol)
    x = torch.zeros_like(R)
    it = torch.zeros(rnorm0.shape, dtype=torch.int64, device=R.device)
    for k in range(max_iter + 1):
        r = R - mv(x)
        rn = r.norm(dim=-1)
        done = rn <= tol
        if k == max_iter or (k % check_every == 0 and bool(done.all())):
            break
        x = torch.where(done.unsqueeze(-1), x, x + alpha * r)
        it = it + (~done).to(torch.int64)
    status = torch.where(done, int(Status.SUCCESS), torch.where(torch.isfinite(rn), int(Status.MAX_ITERATIONS),
                                                                int(Status.NONFINITE))).to(torch.int64)
    residual = rn / torch.clamp(rnorm0, min=torch.finfo(rn.dtype).tiny)
    return x, SolveInfo(status, residual, it)


def adjoint_solve(problem, y, leaves, gy, factors=(), skip=None, lin=None):
    """``u`` with ``(∂F/∂y)ᵀ u = ȳ`` at ``y`` (checked; raises ``SolveError`` on failure).

    ``skip`` (batch shape) marks elements whose forward failed: their ``u`` is 0, unchecked.
    ``lin``: a :func:`_linearization` at ``y`` to take the products from (or ``None``).
    """
    return _solve_jacobian(problem, y, leaves, gy, factors, transpose=True, skip=skip, lin=lin)


def tangent_solve(problem, y, leaves, rhs, factors=(), skip=None):
    """``ẏ`` with ``(∂F/∂y) ẏ = rhs`` at ``y``."""
    return _solve_jacobian(problem, y, leaves, rhs, factors, transpose=False, skip=skip)


def isolate(bd: int, ok: torch.Tensor, y: torch.Tensor, leaves: tuple):
    """``(y, leaves)`` with the failed elements' data replaced by a converged element's, for the backward.

    A failed element gets a zero cotangent, but ``0 · NaN = NaN``: its NaN data would still poison the
    gradient of a tensor the batch shares (``θ̄ = Σ_b (∂F_b/∂θ)ᵀ u_b``).  So the backward evaluates
    ``F`` where every failed element's ``y`` — and, in each leaf with the batch shape leading, every
    failed row holding NaN/Inf — is replaced by the first converged element's (the "double where" of a
    masked division).  The converged elements see their own data, so their gradients are unchanged;
    the substituted rows carry zero cotangents, so nothing flows back through them.  Only non-finite
    rows of leaves are replaced: a shared tensor whose shape happens to start with the batch shape is
    left alone unless it holds NaN/Inf (then no element can have converged anyway).  Returns
    ``(None, leaves)`` when no element converged; unchanged under ``vmap`` (no host read possible).
    """
    if is_vmapped(ok):
        return y, leaves
    flat_ok = ok.reshape(-1)
    good = torch.nonzero(flat_ok).reshape(-1)
    if good.numel() == 0:
        return None, leaves
    k = int(good[0])
    batch = ok.shape

    def substitute(t, mask):
        rows = t.reshape(-1, *t.shape[bd:])
        with torch.enable_grad():  # a leaf stays a differentiable function of the original (recorded backward)
            return torch.where(_expand(mask, t), rows[k].expand_as(t), t)

    y = substitute(y, ~ok)
    out = []
    for leaf in leaves:
        if (isinstance(leaf, torch.Tensor) and leaf.is_floating_point() and leaf.dim() >= bd
                and leaf.shape[:bd] == batch):
            bad = ~ok & ~torch.isfinite(leaf.reshape(*batch, -1)).all(-1) if leaf.dim() > bd else \
                ~ok & ~torch.isfinite(leaf)
            if bool(bad.any()):
                leaf = substitute(leaf, bad)
        out.append(leaf)
    return y, tuple(out)


def _expand(mask, like):
    """A batch-shaped mask broadcast against ``like`` (batch dims first)."""
    return mask.reshape(mask.shape + (1,) * (like.dim() - mask.dim()))


class RootFn(torch.autograd.Function):
    """``y* = root of F(·, θ)`` from ``y0``; outputs ``(y*, status, residual, iterations, *jacobian_factors)``.

    Only ``y*`` is differentiable; ``y0`` gets no gradient (the root does not
    depend on the starting point).
    """

    @staticmethod
    def forward(problem: RootProblem, y0, *leaves):
        params = problem.tree.unflatten(leaves)
        F = Speculation(problem, leaves) if problem.recorded is not None else problem.F
        with torch.no_grad():
            res = problem.solve(F, y0.detach(), params, problem.batch_dims)
        y, info = res.y, res.info
        if problem.recorded is not None:
            problem.recorded[:] = [F.take(y)]
        factors = tuple(res.jacobian.tensors()) if res.jacobian is not None else ()
        y_out = apply_on_failure(y, info, problem.on_failure, problem.what, problem.hints)
        # the raw last iterate is kept for the backward where it differs from y_out: a failed element
        # (NaN in y_out under on_failure="nan") must not turn the gradients of the others into NaN.
        # Otherwise an empty placeholder (returning y itself twice would make y_out non-differentiable)
        y_raw = y.new_empty(0) if y_out is y else y
        return (y_out, info.status, info.residual, info.iterations, y_raw) + factors

    @staticmethod
    def setup_context(ctx, inputs, output):
        problem, _, *leaves = inputs
        y, status, residual, iterations, y_raw, *factors = output
        ctx.mark_non_differentiable(status, residual, iterations, y_raw, *factors)
        ctx.set_materialize_grads(False)  # no zero cotangents for y_raw and Newton's factors
        ctx.problem = problem
        ctx.recorded = problem.recorded.pop() if problem.recorded else None
        ctx.nfactors = len(factors)
        # every element converged (y_raw is the empty placeholder): the statuses are not needed
        status_saved = status if y_raw.numel() else y_raw
        ctx.save_for_backward(y, status_saved, y_raw, *leaves, *factors)
        ctx.save_for_forward(y, status_saved, y_raw, *leaves, *factors)

    @staticmethod
    def _unpack(ctx):
        """``(y, ok, leaves, factors)``; failed elements of ``y`` replaced by their last finite iterate."""
        saved = ctx.saved_tensors
        k = ctx.nfactors
        y, status, y_raw = saved[:3]
        leaves = saved[3:len(saved) - k] if k else saved[3:]
        factors = saved[len(saved) - k:] if k else ()
        if not y_raw.numel():  # the forward returned the raw iterate: every element converged
            return y, None, tuple(leaves), tuple(factors)
        ok = status == Status.SUCCESS
        if not is_vmapped(ok) and bool(ok.all()):
            return y, None, tuple(leaves), tuple(factors)
        if y_raw.numel():  # else y_out is the raw iterate itself
            y = torch.where(_expand(ok, y), y, y_raw)
        return y, ok, tuple(leaves), tuple(factors)

    @staticmethod
    def backward(ctx, gy, *_):
        problem = ctx.problem
        y, ok, leaves, factors = RootFn._unpack(ctx)
        nleaves = len(leaves)
        if gy is None or not any(ctx.needs_input_grad[2:]):
            return (None, None) + (None,) * nleaves
        if ok is not None:  # failed elements carry no gradient (their outputs are NaN)
            gy = torch.where(_expand(ok, gy), gy, torch.zeros_like(gy))
            y, leaves = isolate(problem.batch_dims, ok, y, leaves)
            if y is None:  # no element converged: no gradient at all
                return (None, None) + (None,) * nleaves
        lin = _linearization(problem, y, leaves, gy, factors, recorded=ctx.recorded if ok is None else None)
        ctx.recorded = None  # its graph is freed (a second backward records afresh)
        u = adjoint_solve(problem, y, leaves, gy, factors, skip=None if ok is None else ~ok, lin=lin)
        # θ̄ = −(∂F/∂θ)ᵀ u
        wanted = [i for i in range(nleaves) if ctx.needs_input_grad[2 + i]]
        sub = [leaves[i] for i in wanted]
        out = [None] * nleaves
        if lin is not None:  # from the same evaluation of F as the adjoint products
            for i, g in zip(wanted, lin.theta_vjp(u, sub)):
                out[i] = g
            return (None, None) + tuple(out)

        def F_theta(*ts):
            full = list(leaves)
            for i, t in zip(wanted, ts):
                full[i] = t
            return problem.residual(y, full)

        _, vjp = torch.func.vjp(F_theta, *sub)
        grads = vjp(-u)
        for i, g in zip(wanted, grads):
            out[i] = g
        return (None, None) + tuple(out)

    @staticmethod
    def jvp(ctx, _p, _y0, *dleaves):
        problem = ctx.problem
        y, ok, leaves, factors = RootFn._unpack(ctx)
        idx = [i for i, d in enumerate(dleaves) if d is not None]
        if not idx:
            dy = torch.zeros_like(y)
        else:
            def F_theta(*ts):
                full = list(leaves)
                for i, t in zip(idx, ts):
                    full[i] = t
                return problem.residual(y, full)

            if ok is not None:
                ys, leaves = isolate(problem.batch_dims, ok, y, leaves)
                if ys is None:  # no element converged: every tangent is NaN
                    return (torch.full_like(y, float("nan")), None, None, None, None) + (None,) * ctx.nfactors
                y = ys
            _, w = jvp_by_vjp(F_theta, tuple(leaves[i] for i in idx), tuple(dleaves[i] for i in idx))
            dy = tangent_solve(problem, y, leaves, -w, factors, skip=None if ok is None else ~ok)
            if ok is not None:
                dy = torch.where(_expand(ok, dy), dy, torch.full_like(dy, float("nan")))
        return (dy, None, None, None, None) + (None,) * ctx.nfactors

    @staticmethod
    def vmap(info, in_dims, problem: RootProblem, y0, *leaves):
        size = info.batch_size
        _, d_y0, *d_leaves = in_dims
        bd = problem.batch_dims
        y0m = y0.movedim(d_y0, 0) if d_y0 is not None else y0.expand(size, *y0.shape)
        leaves_m = tuple(l.movedim(d, 0) if d is not None else l for l, d in zip(leaves, d_leaves))
        leaf_dims = tuple(0 if d is not None else None for d in d_leaves)
        tree, F = problem.tree, problem.F

        def F_v(y, *params):
            lv = _leaves_of(tree, params)
            return torch.func.vmap(lambda yy, *ll: F(yy, *tree.unflatten(ll)), in_dims=(0,) + leaf_dims)(y, *lv)

        new = replace(problem, F=F_v, batch_dims=bd + 1)
        out = RootFn.apply(new, y0m, *leaves_m)
        nf = len(out) - 5
        raw_dim = 0 if out[4].numel() else None  # the empty placeholder of a y_raw equal to y has no batch dim
        return out, (0, 0, 0, 0, raw_dim) + (0,) * nf


def _leaves_of(tree: Tree, params) -> tuple:
    from .._core.torch_private import pytree

    leaves, _ = pytree.tree_flatten(tuple(params))
    return tuple(leaves[i] for i in tree.tensor_slots)
