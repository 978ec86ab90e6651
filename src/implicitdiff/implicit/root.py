"""Implicit gradients of ``y*(θ)`` defined by ``F(y*, θ) = 0`` — one ``autograd.Function`` for every layer.

Differentiating the equation (the seed note's step, for a nonlinear ``F``)::

    ∂F/∂y · dy/dθ + ∂F/∂θ = 0

* reverse mode: solve the adjoint system ``(∂F/∂y)ᵀ u = ȳ``, then
  ``θ̄ = −(∂F/∂θ)ᵀ u`` (one vector-Jacobian product of ``F`` in ``θ``);
* forward mode: ``ẇ = ∂F/∂θ · θ̇`` (one Jacobian-vector product), then solve
  ``∂F/∂y · ẏ = −ẇ``.

The forward solver is passed in (``implicit/`` never imports ``solvers/``) and
runs on detached tensors; memory does not grow with its iterations.  The
linear solve belongs to the adjoint strategy: ``problem.adjoint.solve(system, r)``
on a :class:`~implicitdiff.implicit.system.JacobianSystem` (:mod:`.adjoint`,
:mod:`.fixed_point_adjoint`); it is differentiable (the library's own linear
solves), so double backward and ``torch.func`` transforms compose — matrix-free
when the strategy is.  Under ``vmap`` the rule below moves the
vmapped dimension into the problem's batch and ``vmap``\\ s ``F`` over it, so
the solver sees one batched problem with per-element convergence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

import torch

from .._core.defaults import default_rtol, eps
from .._core.failure import apply_on_failure
from .._core.status import Status
from .._core.tree import Tree
from .._core.validate import in_transform, is_vmapped
from .adjoint import Implicit
from .speculation import Linearization, Recorder, record
from .system import JacobianSystem, jvp_by_vjp

__all__ = ["RootProblem", "RootFn", "GivenVJPFn", "Linearization", "record", "may_speculate", "isolate"]


@dataclass(frozen=True, eq=False)
class RootProblem:
    """Everything static about ``F(y, *params) = 0`` (not tensors).

    ``solve(F, y0, params, batch_dims) -> SolverResult`` is the forward solver (``y``, ``info``,
    optional ``jacobian`` factorization at ``y``); ``batch_dims`` leading dims of
    ``y`` are independent problems; ``symmetric`` declares ``∂F/∂y`` symmetric
    (argmin's Hessian), ``definite`` also positive definite (a strict minimum: CG applies); ``neumann_alpha`` is the default step of :class:`Neumann`.
    ``speculative``: hand the forward solver a :class:`~implicitdiff.implicit.speculation.Recorder`
    (``solve(..., recorder=)``); the :class:`Linearization` it returns in ``SolverResult.recording``
    goes to the backward as a (non-tensor) output of :class:`RootFn`.
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
    # a BREAKDOWN (stalled line search) whose relative residual exceeds max(10 · rtol, √eps) (``stall_rtol``:
    # the solve's rtol, None for the dtype's default) gets ``stall_hint`` instead of hints[BREAKDOWN]:
    # ‖F‖ stagnates far above the tolerance, not at rounding level
    stall_rtol: Optional[float] = None
    stall_hint: Optional[str] = None
    # the forward solver is handed a :class:`~implicitdiff.implicit.speculation.Recorder` (it takes ``recorder=``)
    speculative: bool = False
    # the same residual as ``F`` at the problem's own parameters, evaluated more cheaply (a DEQ cell called
    # directly rather than through ``functional_call``): the forward solve iterates it and the recorder records
    # it.  Set only outside ``torch.func`` transforms; ``RootFn.vmap`` drops it
    direct: Optional[Callable] = None

    def residual(self, y, leaves):
        return self.F(y, *self.tree.unflatten(leaves))


def may_speculate(adjoint, y0, leaves, batch_dims: int) -> bool:
    """Whether a forward solve should record its last evaluation for the backward: a first-order
    backward will want a :class:`Linearization` (grad mode on, a leaf requiring grad, no
    ``torch.func`` transform, a matrix-free :class:`Implicit` adjoint)."""
    if not torch.is_grad_enabled() or in_transform():
        return False
    if not any(isinstance(l, torch.Tensor) and l.requires_grad for l in leaves):
        return False
    return adjoint.wants_linearization(math.prod(y0.shape[batch_dims:]))


def _linearization(problem: RootProblem, y, leaves, gy, factors, recorded=None) -> Optional[Linearization]:
    """A :class:`Linearization` for a first-order, matrix-free backward — ``recorded`` by the
    forward solve if it has one — else ``None``: not under ``create_graph`` (grad mode on),
    ``vmap`` or ``torch.func`` transforms, nor with the forward's factorization or a dense
    adjoint, where the functional products are kept.
    """
    if torch.is_grad_enabled() or factors or is_vmapped(gy) or in_transform():
        return None
    if recorded is not None:          # the forward recorded it: its adjoint wanted one (may_speculate)
        return recorded
    if not problem.adjoint.wants_linearization(math.prod(y.shape[problem.batch_dims:]), factors, problem):
        return None
    return record(problem, y, leaves)


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


def _hints(problem: RootProblem, info) -> Optional[dict]:
    """The hints of a failed forward: a BREAKDOWN far above the tolerance (any element's relative
    residual above ``max(10 · rtol, √eps)``) reads as a non-zero local minimum of ``‖F‖``, not rounding."""
    if is_vmapped(info.status):
        return problem.hints
    dtype, rtol = info.residual.dtype, problem.stall_rtol
    far = max(10 * (default_rtol(dtype) if rtol is None else float(rtol)), math.sqrt(eps(dtype)))
    stalled = (info.status == Status.BREAKDOWN) & (info.residual > far)
    if not bool(stalled.any()):
        return problem.hints
    return {**(problem.hints or {}), Status.BREAKDOWN: problem.stall_hint}


def _expand(mask, like):
    """A batch-shaped mask broadcast against ``like`` (batch dims first)."""
    return mask.reshape(mask.shape + (1,) * (like.dim() - mask.dim()))


class GivenVJPFn(torch.autograd.Function):
    """``y*`` solved outside autograd, with its backward given: ``apply(vjp, y, *params)``, where
    ``vjp(ȳ, *params)`` returns one gradient (or ``None``) per parameter — a compiled implicit
    backward (:mod:`implicitdiff.solvers.lbfgs_compiled`).  When the backward is itself
    differentiated (``create_graph=True``: grad mode is on in it), ``vjp`` must return gradients
    differentiable in ``ȳ`` and ``params`` (those passed to it); no forward mode."""

    @staticmethod
    def forward(ctx, vjp, y, *params):
        ctx.vjp = vjp
        ctx.save_for_backward(*params)
        return y.clone()

    @staticmethod
    def backward(ctx, gy):
        return (None, None) + tuple(ctx.vjp(gy, *ctx.saved_tensors))


class RootFn(torch.autograd.Function):
    """``y* = root of F(·, θ)`` from ``y0``; outputs
    ``(y*, status, residual, iterations, y_raw, recording, *jacobian_factors)``.

    Only ``y*`` is differentiable; ``y0`` gets no gradient (the root does not
    depend on the starting point).
    """

    @staticmethod
    def forward(problem: RootProblem, y0, *leaves):
        params = problem.tree.unflatten(leaves)
        F = problem.F if problem.direct is None else problem.direct
        with torch.no_grad():
            if problem.speculative:
                res = problem.solve(F, y0.detach(), params, problem.batch_dims,
                                    recorder=Recorder(problem, leaves, F))
            else:
                res = problem.solve(F, y0.detach(), params, problem.batch_dims)
        y, info = res.y, res.info
        recording = res.recording if problem.speculative else None
        factors = tuple(res.jacobian.tensors()) if res.jacobian is not None else ()
        failed = problem.stall_hint is not None and not bool((info.status == 0).all())
        hints = _hints(problem, info) if failed else problem.hints
        y_out = apply_on_failure(y, info, problem.on_failure, problem.what, hints)
        # the raw last iterate is kept for the backward where it differs from y_out: a failed element
        # (NaN in y_out under on_failure="nan") must not turn the gradients of the others into NaN.
        # Otherwise an empty placeholder (returning y itself twice would make y_out non-differentiable)
        y_raw = y.new_empty(0) if y_out is y else y
        return (y_out, info.status, info.residual, info.iterations, y_raw, recording) + factors

    @staticmethod
    def setup_context(ctx, inputs, output):
        problem, _, *leaves = inputs
        y, status, residual, iterations, y_raw, recording, *factors = output
        ctx.mark_non_differentiable(status, residual, iterations, y_raw, *factors)
        ctx.set_materialize_grads(False)  # no zero cotangents for y_raw and Newton's factors
        ctx.problem = problem
        ctx.recorded = recording
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
        system = JacobianSystem(problem, y, leaves, True, factors, None if ok is None else ~ok, lin)
        u = problem.adjoint.solve(system, gy)
        # θ̄ = −(∂F/∂θ)ᵀ u
        wanted, sub = [], []                 # the leaves that need a gradient
        for i in range(nleaves):
            if ctx.needs_input_grad[2 + i]:
                wanted.append(i)
                sub.append(leaves[i])
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
                    return (torch.full_like(y, float("nan")),) + (None,) * (5 + ctx.nfactors)
                y = ys
            _, w = jvp_by_vjp(F_theta, tuple(leaves[i] for i in idx), tuple(dleaves[i] for i in idx))
            system = JacobianSystem(problem, y, leaves, False, factors, None if ok is None else ~ok)
            dy = problem.adjoint.solve(system, -w)
            if ok is not None:
                dy = torch.where(_expand(ok, dy), dy, torch.full_like(dy, float("nan")))
        return (dy,) + (None,) * (5 + ctx.nfactors)

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

        new = replace(problem, F=F_v, batch_dims=bd + 1, direct=None)
        out = RootFn.apply(new, y0m, *leaves_m)
        nf = len(out) - 6
        raw_dim = 0 if out[4].numel() else None  # the empty placeholder of a y_raw equal to y has no batch dim
        return out, (0, 0, 0, 0, raw_dim, None) + (0,) * nf


def _leaves_of(tree: Tree, params) -> tuple:
    from .._core.torch_private import pytree

    leaves, _ = pytree.tree_flatten(tuple(params))
    return tuple(leaves[i] for i in tree.tensor_slots)
