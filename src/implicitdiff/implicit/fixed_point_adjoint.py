r"""``FixedPointAdjoint``: the adjoint of a fixed point ``z* = f(z*)`` solved as a fixed point itself.

At the equilibrium, with ``J = ∂f/∂z`` and the cotangent ``z̄``, the adjoint ``v`` solves::

    v = Jᵀ v + z̄          (⇔ (I − J)ᵀ v = z̄)

a fixed point of the same contraction as the forward iteration, so iterating it costs one
vector-Jacobian product (VJP) per step and converges at the forward's rate.  In the mechanism's
terms (:class:`~implicitdiff.implicit.system.JacobianSystem`, ``F = f − id``) the system is
``mv(x) = (∂F/∂z)ᵀ x = Jᵀ x − x = R`` with ``x = −v``, ``R = z̄``, iterated as
``x ← x + (mv(x) − R) = Jᵀ x − R``.

:func:`picard_adjoint` spends, besides its VJP, a few small tensor operations and one host read
per step, and no VJP for the first step (``mv(0) = 0``: ``x₁ = −R`` is known); the general
solvers (``solver="anderson"``/``"broyden"``, supplied by the layer from
:mod:`implicitdiff.solvers`) keep per-sample masks, statuses and their own state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .._core.defaults import ADJOINT_PICARD_MAX_ITER, default_rtol
from .._core.errors import InputError
from .._core.options import check_int, check_real
from .._core.status import SolveInfo, Status
from ..linalg.krylov import gmres
from .system import JacobianSystem, flat

__all__ = ["FixedPointAdjoint", "DEFAULT_ADJOINT", "picard_adjoint"]

# ‖residual‖ past this multiple of ‖R‖: the adjoint iteration is declared DIVERGED
_DIVERGENCE = 1e8


@dataclass(frozen=True)
class FixedPointAdjoint:
    r"""Exact implicit gradients, the adjoint system solved as a fixed point (``nn.DEQ``, ``fixed_point``).

    The adjoint of ``z* = f(z*)`` is itself a fixed point::

        v = (∂f/∂z)ᵀ v + z̄          (⇔ (I − ∂f/∂z)ᵀ v = z̄)

    iterated from ``v = z̄`` — one vector-Jacobian product of the cell per
    iteration, and little else — to the per-sample stopping rule
    ``‖(I − ∂f/∂z)ᵀ v − z̄‖ ≤ max(rtol ‖z̄‖, atol)``.  It converges at the rate of the
    forward Picard iteration (the spectral radius of ``∂f/∂z`` at ``z*``), so it
    suits the contractive cells DEQs are trained to be.  Samples where it fails
    (``MAX_ITERATIONS``, ``NONFINITE``, or ``DIVERGED`` when that spectral radius
    is ≥ 1) are re-solved by GMRES (``fallback="gmres"``, warm-started where the
    iteration got); a sample that still fails, or any failure with
    ``fallback=None``, raises :class:`~implicitdiff.SolveError` with its residual
    — never a silently wrong gradient.  The same solve serves forward-mode
    tangents.  Under ``create_graph=True`` (higher-order derivatives) and ``jacrev``
    the mechanism solves the adjoint by the library's differentiable GMRES over
    the cell's vector-Jacobian products instead (matrix-free, exact, memory
    independent of its iterations).

    Args:
        solver: ``"picard"`` (default: a dedicated loop, see the module
            docstring), ``"anderson"`` or ``"broyden"`` (the solvers of
            :mod:`implicitdiff.solvers`; worth it only when ``∂f/∂z`` has a few
            eigenvalues near 1 that Picard resolves slowly).
        rtol, atol, max_iter: the adjoint's stopping rule (``rtol`` default:
            the forward solve's ``rtol``, else 1e-10 in float64 and 1e-6 in
            float32 — the gradient as accurate as the equilibrium it is taken
            at; ``max_iter`` the solver's default, 200 for Picard).
        fallback: ``"gmres"`` (default) or ``None``.
        solver_options: extra keyword arguments of the solver (e.g. ``{"m": 5}``).

    Example:
        >>> from implicitdiff import FixedPointAdjoint
        >>> FixedPointAdjoint(solver="anderson", fallback=None).solver
        'anderson'
    """

    solver: str = "picard"
    rtol: Optional[float] = None
    atol: float = 0.0
    max_iter: Optional[int] = None
    fallback: Optional[str] = "gmres"
    solver_options: Optional[dict] = None
    #: the forward solver function of ``solver="anderson"``/``"broyden"``, supplied by the layer
    #: (``implicit/`` does not import ``solvers/``)
    iterate: Optional[Callable] = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.solver not in ("anderson", "picard", "broyden"):
            raise InputError(f"FixedPointAdjoint(solver=...) must be 'anderson', 'picard' or 'broyden', "
                             f"got {self.solver!r}")
        if self.fallback not in ("gmres", None):
            raise InputError(f"FixedPointAdjoint(fallback=...) must be 'gmres' or None, got {self.fallback!r}")
        check_real("FixedPointAdjoint(rtol=...)", self.rtol, low=0.0)
        check_real("FixedPointAdjoint(atol=...)", self.atol, low=0.0, allow_none=False)
        check_int("FixedPointAdjoint(max_iter=...)", self.max_iter, low=1)
        if self.solver_options is not None and not isinstance(self.solver_options, dict):
            raise InputError("FixedPointAdjoint(solver_options=...) must be a dict of keyword arguments of the "
                             f"solver, got {type(self.solver_options).__name__}")
        if self.solver == "picard" and self.solver_options:
            raise InputError(f"FixedPointAdjoint(solver='picard') takes no solver_options, got "
                             f"{sorted(self.solver_options)}; use rtol/atol/max_iter")

    def wants_linearization(self, n: int, factors=(), problem=None) -> bool:
        return True

    def solve(self, system: JacobianSystem, r: torch.Tensor) -> torch.Tensor:
        """``x`` with ``mv(x) = r`` (checked): the adjoint fixed point by Picard (or the supplied
        solver), GMRES where that fails; the differentiable GMRES under double backward and ``jacrev``."""
        route = system.route(r)
        if route == "differentiable":
            return system.differentiable("gmres", r, rtol=self.rtol, atol=self.atol, max_iter=self.max_iter)
        if route == "dense":
            return system.dense(r)
        products = system.products()
        R = flat(r, system.bd)
        steps = ADJOINT_PICARD_MAX_ITER if self.max_iter is None else self.max_iter
        if self.solver == "picard":
            x, info = picard_adjoint(products.mv, R, rtol=self.rtol, atol=self.atol, max_iter=steps,
                                     map_mv=products.map_mv)
        else:
            if self.iterate is None:
                raise InputError(f"FixedPointAdjoint(solver={self.solver!r}) is resolved by the layer that uses it "
                                 "(fixed_point or nn.DEQ)")
            kw = dict(self.solver_options or {})
            if self.max_iter is not None:
                kw["max_iter"] = self.max_iter
            # the one stopping rule, ‖mv(x) − R‖ ≤ tol = max(rtol ‖R‖, atol), handed to the forward loop
            # (whose rule is ‖F‖ ≤ atol + rtol ‖F(0)‖) as atol = 1 on the system scaled by it: x = tol ξ,
            # mv(ξ) = R / tol (mv is linear; the iterates are those of the unscaled system, times 1 / tol)
            rtol = default_rtol(R.dtype) if self.rtol is None else self.rtol
            tol = torch.clamp(rtol * torch.linalg.vector_norm(R, dim=-1, keepdim=True),
                              min=max(self.atol, torch.finfo(R.dtype).tiny))
            Rs = R / tol
            res = self.iterate(lambda xi: products.mv(xi) - Rs, torch.zeros_like(R), (), batch_dims=R.dim() - 1,
                               rtol=0.0, atol=1.0, **kw)
            x, info = res.y * tol, res.info
        if self.fallback is not None and not bool(info.ok.all()):      # one host sync per backward
            # GMRES for the whole batch, warm-started: the converged samples already meet the
            # tolerance (it stops them at once), those out of iterations go on from their iterate,
            # diverged or non-finite ones restart from zero
            keep = info.ok | (info.status == Status.MAX_ITERATIONS)
            x0 = torch.where(keep.unsqueeze(-1), x, torch.zeros_like(x))
            res = gmres(products.mv, R, x0, rtol=self.rtol, atol=self.atol)
            return system.check(res.x, res.info, r.shape, "fallback")
        return system.check(x, info, r.shape, self.solver)

    def hints(self, solver: str) -> dict:
        """The hints of a failed adjoint solve by ``solver`` (``"fallback"``: the GMRES fallback)."""
        exact = "or use adjoint=Implicit(solver='lu') (exact, dense)"
        if solver == "fallback":
            return dict.fromkeys((Status.MAX_ITERATIONS, Status.BREAKDOWN, Status.DIVERGED),
                                 f"its GMRES fallback failed too (I − ∂T/∂z may be singular or badly conditioned at "
                                 f"the fixed point): loosen FixedPointAdjoint(rtol=...), {exact}")
        fallback = f"keep FixedPointAdjoint(fallback='gmres') (the default), {exact}"
        return {
            Status.MAX_ITERATIONS: f"raise FixedPointAdjoint(max_iter=...) or loosen FixedPointAdjoint(rtol=...), "
                                   f"{fallback}",
            Status.BREAKDOWN: f"the adjoint's {solver} iteration broke down: {fallback}",
            Status.DIVERGED: f"the adjoint's {solver} iteration diverged (∂T/∂z has spectral radius ≥ 1 at the "
                             f"fixed point, it is not a contraction there): {fallback}",
        }


def picard_adjoint(mv, R, *, rtol, atol=0.0, max_iter, map_mv=None, alpha: float = -1.0):
    r"""The adjoint loop: ``x ← x + α (R − mv(x))`` from 0 to ``‖mv(x) − R‖ ≤ max(rtol ‖R‖, atol)`` per
    sample (the rule of its GMRES fallback and of every adjoint linear solve): ``(x, info)``.

    ``α = −1`` (default) is the adjoint fixed point ``x ← x + (mv(x) − R)``; another ``α`` is
    Richardson's iteration for a root's adjoint (``Implicit(solver="richardson")``).

    ``R`` is ``(*batch, n)``, ``mv`` linear; ``map_mv``, where given, is the fixed-point map's
    ``x ↦ (∂f/∂z)ᵀ x`` (:class:`~implicitdiff.implicit.system.Products`), which the steps then use.
    The first step from ``x = 0`` needs no product
    (``mv(0) = 0``, so ``x₁ = −R``); each further step is one ``mv`` (one VJP), a subtraction,
    the per-sample norm, and one host read of ``q = max_i ‖G_i‖ / tol_i`` — ``≤ 1`` when every
    sample has converged, NaN/Inf when one is not finite; a sample may have diverged
    (``‖G_i‖ > 1e8 ‖R_i‖``) only when ``q`` exceeds ``min_i 1e8 ‖R_i‖ / tol_i``, which a second
    read then settles.  The batch runs until all have converged (an early sample keeps
    iterating: it only gets more accurate on a contraction, and its status is that of the
    iterate returned); the statuses are those of the returned iterate's residual ``G(x)``:
    ``SUCCESS``, ``NONFINITE``, ``DIVERGED`` (``> 1e8 ‖R‖``) or ``MAX_ITERATIONS`` (out of
    steps, or stopped unconverged because another sample diverged or went non-finite: the
    caller's GMRES fallback goes on from there).  ``info.iterations`` counts the products of ``mv``.
    """
    rtol = default_rtol(R.dtype) if rtol is None else rtol
    atol = 0.0 if atol is None else atol
    tiny = torch.finfo(R.dtype).tiny
    r0 = torch.linalg.vector_norm(R, dim=-1)
    tol = torch.clamp(rtol * r0, min=max(atol, tiny))     # ‖R‖ = 0: x = 0 is exact, 0 ≤ tiny
    limit = _DIVERGENCE * torch.clamp(r0, min=tiny)
    # below this max_i ‖G_i‖ / tol_i no sample can have diverged (R_i = 0 stays at x_i = 0 exactly)
    safe = float(torch.where(r0 > 0, limit / tol, math.inf).min()) if r0.numel() else math.inf
    # with the map's own transposed products ``tm(x) = (∂f/∂z)ᵀ x`` (mv(x) = tm(x) − x), the next
    # iterate is ``tm(x) − R`` and the residual the difference of two iterates: no ``− x`` in the VJP
    tm = map_mv if alpha == -1.0 else None
    # In float64 the residual follows its own recursion: G(x_{k+1}) = G(x_k) + (∂f/∂z)ᵀ G(x_k) − G(x_k)
    # = (∂f/∂z)ᵀ G(x_k), and x_{k+1} = x_k + G(x_k) — one product, one norm and one addition per step.
    # The additions' rounding (≤ 2 k eps ‖x‖ on the residual, ‖x‖ ≲ k ‖R‖ / ln(1/rtol) after k steps of
    # a contraction that meets rtol) then stays below rtol / 100 for any k ≤ max_iter; in float32 it
    # would not, and the residual is taken as the difference of two iterates instead.
    eps = torch.finfo(R.dtype).eps
    recursion = tm is not None and 0.0 < rtol < 1.0 and 200 * max_iter ** 2 * eps <= rtol * math.log(1 / rtol)
    itol = 1.0 / tol
    x = -R if alpha == -1.0 else alpha * R               # the first step from 0 needs no product
    k = 0
    g = tm(x) if recursion else None                      # G(−R) = (∂f/∂z)ᵀ(−R)
    while True:
        if recursion:
            if k:
                g = tm(g)
        elif tm is not None:
            x_next = torch.sub(tm(x), R)
            g = x_next - x                                # G(x): the residual of the current iterate
        else:
            g = mv(x) - R
        gn = torch.linalg.vector_norm(g, dim=-1)
        k += 1
        q = float((gn * itol).amax()) if gn.numel() else 0.0  # the one host read per step
        if q <= 1.0 or k >= max_iter or not q < math.inf:  # converged; out of steps; NaN/Inf
            break
        if q > safe and bool((gn > limit).any()):          # a sample diverged
            break
        x = x_next if tm is not None and not recursion else torch.add(x, g, alpha=-alpha)
    if q <= 1.0:                                          # every sample converged
        status = torch.zeros(r0.shape, dtype=torch.int64, device=R.device)
    else:
        status = torch.where(gn <= tol, int(Status.SUCCESS),
                             torch.where(~torch.isfinite(gn), int(Status.NONFINITE),
                                         torch.where(gn > limit, int(Status.DIVERGED), int(Status.MAX_ITERATIONS))))
    its = torch.full(r0.shape, k, dtype=torch.int64, device=R.device)
    return x, SolveInfo(status.to(torch.int64), gn / torch.clamp(r0, min=tiny), its)


#: The DEQ's default gradient (measurements in ``docs/benchmarks.md``).
DEFAULT_ADJOINT = FixedPointAdjoint()
