r"""The DEQ's default gradient: the adjoint system of ``z* = f(z*)`` solved as a fixed point.

At the equilibrium, with ``J = ∂f/∂z`` and the cotangent ``z̄``, the adjoint ``v`` solves::

    v = Jᵀ v + z̄          (⇔ (I − J)ᵀ v = z̄)

a fixed point of the same contraction as the forward iteration, so iterating it costs one
vector-Jacobian product (VJP) per step and converges at the forward's rate.  The mechanism
(:func:`~implicitdiff.layers._implicit.solve_implicit`) hands its linear solver
``mv(x) = (∂F/∂z)ᵀ x = Jᵀ x − x`` (``F = f − id``) and asks for ``mv(x) = R``, i.e.
``x = Jᵀ x − R`` with ``x = −v``, ``R = z̄``.

Cost (``benchmarks/deq.py``: width 256, batch 64, float64, one thread; a VJP 0.27–0.33 ms):
:func:`_picard_adjoint` spends, besides its VJP, four small tensor operations and one host read
per step (≈ 0.04 ms), and no VJP for the first step (``mv(0) = 0``: ``x₁ = −R`` is known).  The
general solvers of :mod:`implicitdiff.solvers` (``solver="anderson"``/``"broyden"``) keep
per-sample masks, statuses and their own state (Anderson: ≈ 0.35 ms more per step), and start
with a VJP of ``0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .._core.defaults import default_rtol
from .._core.errors import InputError
from .._core.status import SolveInfo, Status
from ..linalg.krylov import gmres
from ..solvers.registry import get_root_solver

__all__ = ["FixedPointAdjoint", "DEFAULT_ADJOINT"]

# ‖residual‖ past this multiple of ‖R‖: the adjoint iteration is declared DIVERGED
_DIVERGENCE = 1e8


@dataclass(frozen=True)
class FixedPointAdjoint:
    r"""Exact implicit gradients, the adjoint system solved as a fixed point (DEQ only).

    The adjoint of ``z* = f(z*)`` is itself a fixed point::

        v = (∂f/∂z)ᵀ v + z̄          (⇔ (I − ∂f/∂z)ᵀ v = z̄)

    iterated from ``v = z̄`` — one vector-Jacobian product of the cell per
    iteration, and little else — to the per-sample stopping rule
    ``‖(I − ∂f/∂z)ᵀ v − z̄‖ ≤ atol + rtol ‖z̄‖``.  It converges at the rate of the
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
        >>> from implicitdiff.layers.deq import FixedPointAdjoint
        >>> FixedPointAdjoint(solver="anderson", fallback=None).solver
        'anderson'
    """

    solver: str = "picard"
    rtol: Optional[float] = None
    atol: float = 0.0
    max_iter: Optional[int] = None
    fallback: Optional[str] = "gmres"
    solver_options: Optional[dict] = None

    def __post_init__(self):
        if self.solver not in ("anderson", "picard", "broyden"):
            raise InputError(f"FixedPointAdjoint(solver=...) must be 'anderson', 'picard' or 'broyden', "
                             f"got {self.solver!r}")
        if self.fallback not in ("gmres", None):
            raise InputError(f"FixedPointAdjoint(fallback=...) must be 'gmres' or None, got {self.fallback!r}")

    def linear_solver(self):
        """``(name, mv, R, *, rtol, atol, max_iter) -> (x, info)`` solving ``mv(x) = R``.

        The mechanism hands over ``mv(x) = (∂F/∂z)ᵀ x`` with ``F = f − id``, i.e.
        ``mv(x) = (∂f/∂z)ᵀ x − x`` (or ``∂F/∂z`` itself for a tangent); ``mv(x) = R``
        is the root of ``G(x) = mv(x) − R``, whose fixed-point map
        ``x + G(x) = (∂f/∂z)ᵀ x − R`` is the adjoint iteration above (``x = −v``).
        """
        kw = dict(self.solver_options or {})
        if self.max_iter is not None:
            kw["max_iter"] = self.max_iter
        lean = self.solver == "picard" and set(kw) <= {"max_iter"}   # the dedicated loop (module docstring)
        steps = kw.get("max_iter", 200)

        def solve(_name, mv, R, *, rtol=None, atol=0.0, max_iter=None):  # the adjoint's own rule, not these
            if lean:
                x, info = _picard_adjoint(mv, R, rtol=self.rtol, atol=self.atol, max_iter=steps)
            else:
                res = get_root_solver(self.solver)(lambda x: mv(x) - R, torch.zeros_like(R), (),
                                                   batch_dims=R.dim() - 1, rtol=self.rtol, atol=self.atol, **kw)
                x, info = res.y, res.info
            if self.fallback is None or bool(info.ok.all()):      # one host sync per backward
                return x, info
            # GMRES for the whole batch, warm-started: the converged samples already meet the
            # tolerance (it stops them at once), those out of iterations go on from their iterate,
            # diverged or non-finite ones restart from zero
            keep = info.ok | (info.status == Status.MAX_ITERATIONS)
            x0 = torch.where(keep.unsqueeze(-1), x, torch.zeros_like(x))
            return gmres(mv, R, x0, rtol=self.rtol, atol=self.atol)

        return solve


def _picard_adjoint(mv, R, *, rtol, atol, max_iter):
    r"""``x ← x + (mv(x) − R)`` to ``‖mv(x) − R‖ ≤ atol + rtol ‖R‖`` per sample: ``(x, info)``.

    ``R`` is ``(*batch, n)``, ``mv`` linear; ``mv.map_vjp``, where present, is the fixed-point map's
    ``x ↦ (∂f/∂z)ᵀ x`` (:class:`~implicitdiff.implicit.root.Linearization`), which the steps then use.
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
    tiny = torch.finfo(R.dtype).tiny
    r0 = torch.linalg.vector_norm(R, dim=-1)
    tol = torch.clamp(atol + rtol * r0, min=tiny)         # ‖R‖ = 0: x = 0 is exact, 0 ≤ tiny
    limit = _DIVERGENCE * torch.clamp(r0, min=tiny)
    # below this max_i ‖G_i‖ / tol_i no sample can have diverged (R_i = 0 stays at x_i = 0 exactly)
    safe = float(torch.where(r0 > 0, limit / tol, math.inf).min()) if r0.numel() else math.inf
    # with the map's own transposed products ``tm(x) = (∂f/∂z)ᵀ x`` (mv(x) = tm(x) − x), the next
    # iterate is ``tm(x) − R`` and the residual the difference of two iterates: no ``− x`` in the VJP
    tm = getattr(mv, "map_vjp", None)
    # In float64 the residual follows its own recursion: G(x_{k+1}) = G(x_k) + (∂f/∂z)ᵀ G(x_k) − G(x_k)
    # = (∂f/∂z)ᵀ G(x_k), and x_{k+1} = x_k + G(x_k) — one product, one norm and one addition per step.
    # The additions' rounding (≤ 2 k eps ‖x‖ on the residual, ‖x‖ ≲ k ‖R‖ / ln(1/rtol) after k steps of
    # a contraction that meets rtol) then stays below rtol / 100 for any k ≤ max_iter; in float32 it
    # would not, and the residual is taken as the difference of two iterates instead.
    eps = torch.finfo(R.dtype).eps
    recursion = tm is not None and 0.0 < rtol < 1.0 and 200 * max_iter ** 2 * eps <= rtol * math.log(1 / rtol)
    itol = 1.0 / tol
    x = -R
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
        x = x_next if tm is not None and not recursion else x + g
    if q <= 1.0:                                          # every sample converged
        status = torch.zeros(r0.shape, dtype=torch.int64, device=R.device)
    else:
        status = torch.where(gn <= tol, int(Status.SUCCESS),
                             torch.where(~torch.isfinite(gn), int(Status.NONFINITE),
                                         torch.where(gn > limit, int(Status.DIVERGED), int(Status.MAX_ITERATIONS))))
    its = torch.full(r0.shape, k, dtype=torch.int64, device=R.device)
    return x, SolveInfo(status.to(torch.int64), gn / torch.clamp(r0, min=tiny), its)


#: The DEQ's default gradient (see the module docstring for the measurements behind it).
DEFAULT_ADJOINT = FixedPointAdjoint()
