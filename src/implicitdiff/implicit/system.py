"""The linear system of an implicit gradient, ``J x = r`` with ``J = ∂F/∂y`` at the solution — as a type.

A backward solves ``Jᵀ u = ȳ``, a forward-mode tangent ``J ẏ = −∂F/∂θ θ̇``.  A
:class:`JacobianSystem` holds what both need (``F``, the point, the parameters, the forward's
factorization, a recorded linearization) and offers the ways to solve it; the adjoint
strategies (:mod:`.adjoint`, :mod:`.fixed_point_adjoint`) each pick one in their ``solve``:

* :meth:`JacobianSystem.dense` — the per-element Jacobian, LU (the forward's factors reused);
* :meth:`JacobianSystem.krylov` — a matrix-free Krylov solve on products of ``F`` (first order);
* :meth:`JacobianSystem.differentiable` — the library's differentiable Krylov solve over the
  matrix-free :func:`jacobian_operator`, so double backward, ``jvp`` and ``jacrev`` stay
  matrix-free;
* :meth:`JacobianSystem.route` — which of these a differentiable or transformed call needs.

Every solve is checked (:meth:`JacobianSystem.check`): a failed one raises ``SolveError`` with its
residual, never a silent wrong gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional

import torch

from .._core.engine import vjp_fn as engine_vjp_fn
from .._core.failure import apply_on_failure, nan_where_failed
from .._core.jacobian import batch_jacobian
from .._core.status import SolveInfo, Status
from .._core.validate import in_transform, is_vmapped, tracks_grad
from ..linalg.factorization import from_tensors
from ..linalg.operator import LinearOperator
from .iterative import iterative_solve
from .krylov_adapter import krylov_solve
from .linear import FactoredSolveFn, SolveSpec, solve as linear_solve_fn

__all__ = ["JacobianSystem", "Products", "jacobian_operator", "jvp_by_vjp", "flat"]

_SINGULAR_HINT = ("∂F/∂y is singular at the solution, so the implicit function theorem does not apply; "
                  "check that the root is isolated (or regularize F)")


def flat(y, bd):
    """``(*batch, n)`` view of ``y`` with ``bd`` batch dims."""
    return y.reshape(*y.shape[:bd], -1)


def _expand(mask, like):
    return mask.reshape(mask.shape + (1,) * (like.dim() - mask.dim()))


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


class Products(NamedTuple):
    """Matrix-free products of the system on flat ``(*batch, n)`` vectors.

    ``mv(v)``: ``J v`` (``Jᵀ v`` for a transposed system).  ``map_mv``: for the adjoint of a
    fixed-point residual ``F = T − id`` recorded by the forward, ``(∂T/∂y)ᵀ v`` (so
    ``mv(v) = map_mv(v) − v``) — the adjoint fixed-point iteration's own product; else ``None``.
    """

    mv: Callable
    map_mv: Optional[Callable] = None


def _leading(fn: Callable, bd: int) -> Callable:
    """``fn(x, *p)`` on ``(*batch, n)`` vectors, extended to extra leading dims of ``x`` (a vmapped
    right-hand side moved into the batch by the Krylov solve's vmap rule) by ``torch.func.vmap``."""
    def mv(x, *p):
        g = fn
        for _ in range(x.dim() - (bd + 1)):
            g = torch.func.vmap(g, in_dims=(0,) + (None,) * len(p))
        return g(x, *p)
    return mv


def jacobian_operator(F: Callable, unflatten: Callable, y, leaves, bd: int, transpose: bool,
                      symmetric: bool) -> LinearOperator:
    """``(∂F/∂y)ᵀ`` (``transpose``) or ``∂F/∂y`` at ``y`` as a matrix-free, differentiable operator.

    Its parameters are ``(y, *leaves)`` (``F(y, *unflatten(leaves))``): the library's
    differentiable Krylov solve (:func:`~implicitdiff.implicit.iterative.iterative_solve`) then
    differentiates the solve itself — through ``y`` and ``θ`` — with products of ``F`` only.
    ``(∂F/∂y)ᵀ v`` is one reverse pass, ``(∂F/∂y) v`` two (:func:`jvp_by_vjp`).  Within one
    forward Krylov solve (grad mode off, the same parameter tensors) ``F`` is linearized once.
    """
    n = math.prod(y.shape[bd:])
    cache: list = []

    def linearized(yy, lv):
        if not torch.is_grad_enabled() and cache and cache[0] is yy and all(a is b for a, b in zip(cache[1], lv)):
            return cache[2]
        _, f = torch.func.vjp(lambda z: F(z, *unflatten(list(lv))), yy)
        if not torch.is_grad_enabled():
            cache[:] = [yy, lv, f]
        return f

    def vjp_F(x, yy, *lv):
        return flat(linearized(yy, lv)(x.reshape(yy.shape))[0], bd)

    def jvp_F(x, yy, *lv):
        _, t = jvp_by_vjp(lambda z: F(z, *unflatten(list(lv))), (yy,), (x.reshape(yy.shape),))
        return flat(t, bd)

    A, At = (vjp_F, jvp_F) if transpose else (jvp_F, vjp_F)
    return LinearOperator.from_matvec(_leading(A, bd), (n, n), y, *leaves, rmatvec=_leading(At, bd),
                                      symmetric=symmetric)


@dataclass(eq=False)
class JacobianSystem:
    """``J x = r`` (``transpose``: ``Jᵀ x = r``) with ``J = ∂F/∂y`` at ``y``; ``r`` of ``y``'s shape.

    ``problem``: the :class:`~implicitdiff.implicit.root.RootProblem` (``F``, ``tree``,
    ``batch_dims``, ``symmetric``, ``definite``, ``neumann_alpha``, ``what``); ``factors``: the
    forward solver's LU of ``J`` at ``y`` (or ``()``); ``skip``: batch mask of elements whose
    forward failed (their ``x`` is 0, unchecked); ``lin``: the
    :class:`~implicitdiff.implicit.root.Linearization` recorded at ``y`` (first-order, transposed).
    """

    problem: Any
    y: torch.Tensor
    leaves: tuple
    transpose: bool = True
    factors: tuple = ()
    skip: Optional[torch.Tensor] = None
    lin: Any = None

    @property
    def bd(self) -> int:
        return self.problem.batch_dims

    @property
    def n(self) -> int:
        return math.prod(self.y.shape[self.bd:])

    @property
    def what(self) -> str:
        return f"the {'adjoint' if self.transpose else 'tangent'} solve of {self.problem.what}"

    def _F_y(self):
        params = self.problem.tree.unflatten(self.leaves)
        return lambda yy: self.problem.F(yy, *params)

    # ------------------------------------------------------------------ which way
    def route(self, r: torch.Tensor) -> str:
        """How a matrix-free strategy must solve: ``"plain"`` (first order: any loop),
        ``"differentiable"`` (double backward, an autograd jvp, ``jacrev``, ``torch.func.grad`` and
        grad-of-grad: the differentiable Krylov solve), ``"dense"`` (``vmap`` over the problem's own
        data, or a tangent solve under ``vmap`` inside a ``torch.func`` transform).
        A tangent inside ``torch.func.jvp`` is ``"plain"`` (first order) unless autograd records
        the system beneath the jvp's wrappers (a backward through the jvp: ``"differentiable"``)."""
        if not (is_vmapped(r) or torch.is_grad_enabled()):
            return "plain"
        if is_vmapped(self.y) or any(is_vmapped(leaf) for leaf in self.leaves):
            return "dense"
        if not in_transform() or self.transpose:
            return "differentiable"
        if is_vmapped(r):
            return "dense"
        recorded = any(tracks_grad(t) for t in (r, self.y, *self.leaves))
        return "differentiable" if recorded else "plain"

    # ------------------------------------------------------------------ products
    def products(self) -> Products:
        """Matrix-free products at ``y``: from the recorded linearization where there is one
        (one reverse pass in ``y`` per product), else from ``torch.func.vjp`` of ``F`` (differentiable)."""
        y, bd, lin = self.y, self.bd, self.lin
        if lin is not None and self.transpose:
            def rmv(v):
                return flat(lin.rmv(v.reshape(y.shape)), bd)
            if not lin.fixed:
                return Products(rmv)
            if y.dim() == bd + 1:  # y already flat (a DEQ's (B, n)): the engine closure, no reshapes
                return Products(rmv, engine_vjp_fn(lin.out, lin.yr))
            return Products(rmv, lambda v: flat(lin.map_vjp(v.reshape(y.shape)), bd))
        out, vjp = torch.func.vjp(self._F_y(), y)
        if self.transpose:
            return Products(lambda v: flat(vjp(v.reshape(y.shape))[0], bd))

        def mv(v):
            v = v.reshape(y.shape)
            return flat(torch.func.grad(lambda u: (vjp(u)[0] * v).sum())(torch.zeros_like(out)), bd)
        return Products(mv)

    # ------------------------------------------------------------------ solves
    def check(self, x, info: SolveInfo, r_shape, solver: str) -> torch.Tensor:
        """``x`` reshaped to ``r``'s shape after checking ``info`` of the solve by ``solver`` (raise
        ``SolveError`` on failure, with the strategy's hints for that solver; under ``vmap`` failed
        elements become NaN); skipped elements are 0."""
        status, out = info.status, x
        if self.skip is not None:
            status = torch.where(self.skip, 0, status)
            out = torch.where(_expand(self.skip, out), torch.zeros_like(out), out)
        info = SolveInfo(status, info.residual, info.iterations)
        if is_vmapped(status):
            out = nan_where_failed(out, info.ok)
        else:
            hints = {Status.SINGULAR: _SINGULAR_HINT, **self.problem.adjoint.hints(solver)}
            out = apply_on_failure(out, info, "raise", self.what, hints, policy_hint=False)
        return out.reshape(r_shape)

    def dense(self, r: torch.Tensor) -> torch.Tensor:
        """LU of the per-element Jacobian (the forward's factors where it has them); differentiable."""
        R = flat(r, self.bd).unsqueeze(-1)
        factors = self.factors
        if factors and not torch.is_grad_enabled():  # first order: reuse the forward's factorization
            X = from_tensors("lu", factors).solve(R, adjoint=self.transpose)
            status = torch.where(~torch.isfinite(X).flatten(-2).all(-1), int(Status.SINGULAR), 0).to(torch.int64)
            residual = torch.zeros(status.shape, dtype=X.dtype, device=X.device)
        else:
            J = batch_jacobian(self._F_y(), self.y, self.bd)
            if factors:
                X = FactoredSolveFn.apply("lu", self.transpose, J, R, *factors)
                status = torch.where(~torch.isfinite(X).flatten(-2).all(-1), int(Status.SINGULAR), 0).to(torch.int64)
                residual = torch.zeros(status.shape, dtype=X.dtype, device=X.device)
            else:
                X, status, residual, _, _ = linear_solve_fn(SolveSpec("exact"), J.mT if self.transpose else J, R)
        zeros = torch.zeros_like(status)
        return self.check(X.squeeze(-1), SolveInfo(status, residual, zeros), r.shape, "lu")

    def krylov(self, name: str, r, *, rtol=None, atol=0.0, max_iter=None, retry_minres: bool = False,
               products: Optional[Products] = None):
        """``(x, info, name)`` by the first-order matrix-free Krylov method ``name`` (unchecked, flat);
        CG that meets ``pᵀHp ≤ 0`` is retried with MINRES when ``retry_minres`` (then ``name`` is
        ``"minres"``: the failure hints name the solver that ran)."""
        mv = (products or self.products()).mv
        R = flat(r, self.bd)
        x, info = krylov_solve(name, mv, R, rtol=rtol, atol=atol, max_iter=max_iter)
        if retry_minres and name == "cg" and bool((info.status == Status.BREAKDOWN).any()):
            x, info = krylov_solve("minres", mv, R, rtol=rtol, atol=atol, max_iter=max_iter)
            name = "minres"
        return x, info, name

    def differentiable(self, name: str, r, *, rtol=None, atol=0.0, max_iter=None, retry_minres: bool = False):
        """The differentiable matrix-free solve (checked, ``r``'s shape): ``name`` one of cg, minres,
        gmres, bicgstab; CG that meets ``pᵀHp ≤ 0`` is retried with MINRES when ``retry_minres``."""
        p = self.problem
        op = jacobian_operator(p.F, p.tree.unflatten, self.y, self.leaves, self.bd, self.transpose, p.symmetric)
        R = flat(r, self.bd)
        x, info = iterative_solve(op, R, solver=name, rtol=rtol, atol=atol, max_iter=max_iter)
        if retry_minres and name == "cg" and not is_vmapped(info.status) \
                and bool((info.status == Status.BREAKDOWN).any()):
            x, info = iterative_solve(op, R, solver="minres", rtol=rtol, atol=atol, max_iter=max_iter)
            name = "minres"
        return self.check(x, info, r.shape, name)
