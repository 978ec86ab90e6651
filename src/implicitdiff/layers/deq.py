r"""Deep equilibrium layers: ``z* = f(z*, x; θ)`` for an ``nn.Module`` cell ``f``.

A deep equilibrium model (Bai, Kolter & Koltun, 2019) is the fixed point of one
cell.  Memory is constant in the "depth" (the solver's iterations) because the
gradient comes from the implicit function theorem at ``z*``, not from the
iterations.  With ``T(z) = f(z, x; θ)`` and the residual ``F(z) = T(z) − z``::

    (I − ∂f/∂z)ᵀ v = z̄,        θ̄ = (∂f/∂θ)ᵀ v,   x̄ = (∂f/∂x)ᵀ v

(the adjoint system of :func:`~implicitdiff.fixed_point`, ``v = −u``).  This
module lifts the cell's parameters with ``torch.func.functional_call`` so that
they are explicit inputs of the implicit mechanism and every one of them
receives its gradient (a parameter captured by a closure would silently get
none).

Choice of the adjoint solver (``benchmarks/deq.py``: width 256, batch 64,
float64, one thread; every solver needs 12–13 iterations to 1e-6 there).  The
adjoint is a fixed point of the same contraction as the forward, so
:data:`DEFAULT_ADJOINT` ``= FixedPointAdjoint()`` iterates it by Picard: 0.61 ms
per iteration (one 0.33 ms VJP of the cell plus 0.27 ms of loop), GMRES only
for samples where that fails.  ``Implicit(solver="gmres")`` takes as many
iterations at 1.08 ms each (its batched Arnoldi step costs twice a VJP);
``Implicit(solver="auto")`` — dense LU, the mechanism's default at this size —
first builds each sample's 256 × 256 Jacobian from 256 VJPs: ~17× the whole
forward solve.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple, Optional

import torch

from .._core.defaults import default_rtol
from .._core.errors import InputError
from .._core.status import SolveInfo, Status
from ..implicit.adjoint import Implicit, Neumann, Unroll
from ..linalg.krylov import gmres
from ..solvers.registry import get_root_solver
from ._implicit import forward_solver, solve_implicit
from .fixed_point import fixed_point_residual

__all__ = ["deq", "jacobian_penalty", "DEQInfo", "FixedPointAdjoint", "DEFAULT_ADJOINT"]


@dataclass(frozen=True)
class FixedPointAdjoint:
    r"""Exact implicit gradients, the adjoint system solved as a fixed point (DEQ only).

    The adjoint of ``z* = f(z*)`` is itself a fixed point::

        v = (∂f/∂z)ᵀ v + z̄          (⇔ (I − ∂f/∂z)ᵀ v = z̄)

    solved by a forward solver of :mod:`implicitdiff.solvers` — one
    vector-Jacobian product of the cell per iteration, and little else — to
    the per-sample stopping rule ``‖(I − ∂f/∂z)ᵀ v − z̄‖ ≤ atol + rtol ‖z̄‖``.
    It converges at the rate of the forward Picard iteration (the spectral
    radius of ``∂f/∂z`` at ``z*``), so it suits the contractive cells DEQs
    are trained to be.  Samples where it fails (``MAX_ITERATIONS``, or
    ``DIVERGED`` when that spectral radius is ≥ 1) are re-solved by GMRES
    (``fallback="gmres"``, warm-started where the iteration got); a sample
    that still fails, or any failure with ``fallback=None``, raises
    :class:`~implicitdiff.SolveError` with its residual — never a silently
    wrong gradient.  The same solve serves forward-mode tangents.  Under
    ``create_graph=True`` (higher-order derivatives) the adjoint is iterated
    by differentiable Picard steps instead (memory then grows with its
    iterations; ``Implicit(solver="lu")`` is the exact alternative).

    Args:
        solver: ``"picard"`` (default), ``"anderson"`` or ``"broyden"``.
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
        run = get_root_solver(self.solver)
        kw = dict(self.solver_options or {})
        if self.max_iter is not None:
            kw["max_iter"] = self.max_iter

        def solve(_name, mv, R, *, rtol=None, atol=0.0, max_iter=None):
            if torch.is_grad_enabled():  # create_graph=True, or a jvp that may be differentiated again
                return _differentiable_picard(lambda x: mv(x) - R, R, rtol=self.rtol, atol=self.atol,
                                              max_iter=kw.get("max_iter", 200))
            res = run(lambda x: mv(x) - R, torch.zeros_like(R), (), batch_dims=R.dim() - 1, rtol=self.rtol,
                      atol=self.atol, **kw)
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


def _differentiable_picard(G, R, *, rtol, atol, max_iter):
    """``x ← x + G(x)`` from 0 with autograd recording, to ``‖G(x)‖ ≤ atol + rtol ‖R‖``: ``(x, info)``.

    For higher-order derivatives through the equilibrium: differentiating the
    iterates of a contraction converges to the derivative of its fixed point at
    the same rate as the iterates themselves (memory grows with the iterations;
    one host sync per iteration).
    """
    rtol = default_rtol(R.dtype) if rtol is None else rtol
    r0 = torch.linalg.vector_norm(R, dim=-1).detach()
    tol = atol + rtol * r0
    x = torch.zeros_like(R)
    its = torch.zeros(r0.shape, dtype=torch.int64, device=R.device)
    for _ in range(max_iter + 1):
        g = G(x)
        rn = torch.linalg.vector_norm(g, dim=-1).detach()
        done = rn <= tol
        if bool(done.all()) or int(its.max()) >= max_iter:
            break
        x = x + torch.where(done.unsqueeze(-1), torch.zeros_like(g), g)  # converged samples stay put
        its = its + (~done).to(torch.int64)
    status = torch.where(done, int(Status.SUCCESS), torch.where(torch.isfinite(rn), int(Status.MAX_ITERATIONS),
                                                                int(Status.NONFINITE)))
    return x, SolveInfo(status.to(torch.int64), rn / torch.clamp(r0, min=torch.finfo(rn.dtype).tiny), its)


#: The DEQ's default gradient (see the module docstring for the measurements behind it).
DEFAULT_ADJOINT = FixedPointAdjoint()


class DEQInfo(NamedTuple):
    """Per-sample convergence report of a DEQ forward solve (no host sync to build it).

    Attributes:
        status: ``(B,)`` int64 :class:`~implicitdiff.Status` codes.
        residual: ``(B,)`` relative residual ``‖f(z) − z‖ / ‖f(z0) − z0‖``.
        iterations: ``(B,)`` forward iterations used by each sample.
        trace: ``(k + 1, B)`` absolute residuals ``‖f(z_j) − z_j‖`` of every
            iteration (row 0: ``z0``; a stopped sample repeats its last value),
            or ``None`` unless ``trace=True`` (and always ``None`` under
            ``Unroll()`` or for a solver that keeps no trace).
    """

    status: torch.Tensor
    residual: torch.Tensor
    iterations: torch.Tensor
    trace: Optional[torch.Tensor] = None

    @property
    def ok(self) -> torch.Tensor:
        return self.status == 0


def _cell_map(cell: torch.nn.Module):
    """``T(z, params, x) = cell(z, x)`` with the parameters as an explicit argument."""
    def T(z, params, x):
        return torch.func.functional_call(cell, params, (z, x))
    return T


def _lifted(cell: torch.nn.Module) -> dict:
    """The cell's parameters by name: the tensors the implicit gradient flows to.

    Buffers are not lifted: ``functional_call`` takes them from the module
    (they receive no gradient).  Tied parameters appear once (``named_parameters``
    removes duplicates; ``functional_call`` re-ties them).
    """
    return dict(cell.named_parameters())


def _check(cell, x, z0):
    if not isinstance(cell, torch.nn.Module):
        raise InputError(f"cell must be a torch.nn.Module called as cell(z, x), got {type(cell).__name__}; "
                         f"wrap a function in an nn.Module so that its parameters can be lifted")
    if not isinstance(x, torch.Tensor):
        raise InputError(f"x must be a torch.Tensor (the input injection, shape (B, ...)), got {type(x).__name__}")
    z0 = torch.zeros_like(x) if z0 is None else z0
    if not isinstance(z0, torch.Tensor) or z0.dim() < 1:
        raise InputError(f"z0 must be a tensor of shape (B, ...) with the batch first, got "
                         f"{getattr(z0, 'shape', type(z0).__name__)}")
    if x.dim() < 1 or z0.shape[0] != x.shape[0]:
        raise InputError(f"z0 and x must share the batch dimension (dim 0): z0 {tuple(z0.shape)}, "
                         f"x {tuple(x.shape)}; pass z0 of shape (B, ...) or leave it None for zeros like x")
    return z0


def _forward_solve(solve, cell, F, trace: bool, record: dict):
    """The forward ``solve`` as the mechanism calls it, with two DEQ specifics.

    * The iterations call the cell directly, not through ``functional_call``
      (which costs about as much as a small cell evaluation): the lifted
      parameters *are* the module's own tensors, checked by identity.  Under
      ``torch.func`` transforms or ``vmap`` the mechanism hands over other
      tensors or another ``F``, and the functional form is kept.
    * The residual trace of the run is kept in ``record["trace"]`` (the
      mechanism keeps only ``(y, info)``): no second solve.

    (A failed sample does not poison the others' gradients: the mechanism keeps
    its last finite iterate for the backward and gives it no cotangent.)
    """
    def direct(z, params, x):
        return cell(z, x) - z

    def run(F_, y0, params, batch_dims):
        lifted = params[0]
        own = F_ is F and all(lifted.get(k) is p for k, p in cell.named_parameters()) \
            and len(lifted) == len(dict(cell.named_parameters()))
        res = solve(direct if own else F_, y0, params, batch_dims)
        record["trace"] = getattr(res, "trace", None) if trace else None
        return res
    return run


def deq(cell: torch.nn.Module, x: torch.Tensor, z0: Optional[torch.Tensor] = None, *, solver="anderson",
        adjoint=DEFAULT_ADJOINT, rtol=None, atol=0.0, max_iter=None, on_failure="raise", return_info=False,
        solver_options=None, trace=False):
    r"""The equilibrium ``z* = cell(z*, x)``, per sample; gradients to ``x`` and every cell parameter.

    The forward solve runs under ``no_grad`` on detached tensors; the backward
    solves the adjoint system ``(I − ∂f/∂z)ᵀ v = z̄`` at ``z*`` (module
    docstring), so memory does not depend on the number of iterations.

    Args:
        cell: an ``nn.Module`` called as ``cell(z, x)`` returning a tensor of
            ``z``'s shape. Samples (dim 0) must be independent (no batch
            statistics in the cell, e.g. BatchNorm in training mode).
        x: input injection, ``(B, ...)``; receives a gradient.
        z0: initial state ``(B, ...)`` (no gradient), default zeros shaped like ``x``.
        solver: forward solver: ``"anderson"`` (default; Anderson mixing with a
            regularized, safeguarded least-squares step), ``"broyden"``,
            ``"picard"``, ``"newton"`` or a callable (see :func:`~implicitdiff.root`).
        adjoint: :data:`DEFAULT_ADJOINT` ``= FixedPointAdjoint()`` (exact:
            the adjoint fixed point by Picard to the forward's ``rtol``, GMRES
            where that fails); ``Implicit(solver="gmres")`` (exact,
            matrix-free); ``Implicit(solver="lu")`` (dense per-sample Jacobian:
            small cells, higher-order derivatives, ``vmap``); ``Neumann(k)``
            (phantom gradient: the truncated series
            ``v = Σ_{i<k} (∂f/∂z)ᵀⁱ z̄``, approximate, unchecked); ``Unroll()``
            (autograd through Picard iterations; memory grows).
        rtol, atol, max_iter: per-sample stopping rule
            ``‖f(z) − z‖ ≤ atol + rtol ‖f(z0) − z0‖`` (rtol default 1e-10 in
            float64, 1e-6 in float32).
        on_failure: ``"raise"`` (default) | ``"warn"`` | ``"nan"`` for samples
            that did not converge: a failed sample is never returned as if it
            had converged.
        return_info: also return a :class:`DEQInfo`.
        solver_options: extra keyword arguments of the forward solver (e.g.
            ``{"m": 5, "beta": 1.0}`` for Anderson).
        trace: keep the residual of every forward iteration in ``DEQInfo.trace``.

    Returns:
        ``z*`` of ``z0``'s shape, and the :class:`DEQInfo` with ``return_info``.

    Raises:
        InputError: a malformed argument.
        SolveError: forward non-convergence under ``on_failure="raise"`` (status,
            relative residual, iterations), or in the backward when the adjoint
            solve fails (with its residual).

    Example:
        >>> import torch
        >>> from implicitdiff.layers.deq import deq
        >>> class Cell(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.lin = torch.nn.Linear(3, 3, dtype=torch.float64)
        ...         torch.nn.init.normal_(self.lin.weight, std=0.1)
        ...     def forward(self, z, x):
        ...         return torch.tanh(self.lin(z) + x)
        >>> cell, x = Cell(), torch.randn(2, 3, dtype=torch.float64)
        >>> z, info = deq(cell, x, return_info=True)
        >>> bool(torch.allclose(z, cell(z, x), atol=1e-8)), info.status.tolist()
        (True, [0, 0])
        >>> z.sum().backward()
        >>> all(p.grad is not None for p in cell.parameters())
        True
    """
    z0 = _check(cell, x, z0)
    if not isinstance(adjoint, FixedPointAdjoint):
        if not isinstance(adjoint, (Implicit, Unroll, Neumann)):
            raise InputError("adjoint must be FixedPointAdjoint(...), implicitdiff.Implicit(...), "
                             f"implicitdiff.Neumann(k) or implicitdiff.Unroll(), got {adjoint!r}")
    options = dict(solver_options or {})
    if trace and not isinstance(adjoint, Unroll) and not callable(solver):
        options["trace"] = True
    if isinstance(adjoint, FixedPointAdjoint) and adjoint.rtol is None and rtol is not None:
        adjoint = replace(adjoint, rtol=rtol)  # the gradient as accurate as the forward solve
    record: dict = {"trace": None}
    solve = forward_solver(solver, registry=get_root_solver, rtol=rtol, atol=atol, max_iter=max_iter,
                           options=options)
    F = fixed_point_residual(_cell_map(cell))
    lifted = _lifted(cell)
    z, info = _solve(F, z0, (lifted, x), solve=_forward_solve(solve, cell, F, trace, record),
                     adjoint=adjoint, on_failure=on_failure, rtol=rtol, atol=atol, max_iter=max_iter)
    if not return_info:
        return z
    return z, _info(info, record["trace"])


_WHAT = "deq (the fixed point z = f(z, x))"


def _solve(F, z0, params, *, solve, adjoint, on_failure, rtol, atol, max_iter):
    """``(z*, SolveInfo)`` by :func:`~implicitdiff.layers._implicit.solve_implicit`.

    A :class:`FixedPointAdjoint` is passed to the mechanism as an ``Implicit``
    value whose matrix-free linear solver is the adjoint fixed-point iteration
    (``solver="gmres"`` only routes the adjoint to that solver; the name is
    ignored there).
    """
    krylov = {}
    if isinstance(adjoint, FixedPointAdjoint):
        krylov = {"krylov": adjoint.linear_solver()}
        adjoint = Implicit(solver="gmres", rtol=adjoint.rtol, atol=adjoint.atol, max_iter=adjoint.max_iter)
    return solve_implicit(F, z0, params, solve=solve, adjoint=adjoint, batch_dims=1, on_failure=on_failure,
                          return_info=True, what=_WHAT, neumann_alpha=-1.0, unroll="picard", rtol=rtol,
                          atol=atol, max_iter=max_iter, **krylov)


def _info(info: SolveInfo, trace) -> DEQInfo:
    return DEQInfo(info.status.detach(), info.residual.detach(), info.iterations.detach(),
                   None if trace is None else trace.detach())


def jacobian_penalty(cell: torch.nn.Module, z: torch.Tensor, x: torch.Tensor, *, samples: int = 1,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    r"""Hutchinson estimate of ``‖∂f/∂z‖_F² / dim(z)`` at ``z``, averaged over the batch; differentiable.

    For ``ε ~ N(0, I)``, ``E ‖εᵀ J‖² = ‖J‖_F²``, so with ``k = samples`` probes
    per sample ``b`` (``J_b = ∂f(z_b, x_b)/∂z_b``, ``d = dim(z_b)``)::

        penalty = (1 / (k B d)) Σ_b Σ_{i<k} ‖ε_{b,i}ᵀ J_b‖²

    Penalizing it keeps the equilibrium well conditioned and the solver fast
    (Bai, Koltun & Kolter, 2021).  ``z`` is detached: the penalty trains the
    cell's parameters (and ``x``), not the state.  The probes are one batched
    vector-Jacobian product (``torch.func.vmap`` over the ``k`` probes), so the
    penalty is an ordinary differentiable tensor: its gradient is a
    Hessian-vector product, and double backward works.

    Args:
        cell: the DEQ cell, ``cell(z, x)``.
        z: ``(B, ...)`` the state at which to measure (usually ``z*``).
        x: ``(B, ...)`` the input injection.
        samples: number ``k ≥ 1`` of Gaussian probes per sample.
        generator: random generator of the probes (default: the global one).

    Returns:
        A 0-d tensor.

    Example:
        >>> import torch
        >>> from implicitdiff.layers.deq import jacobian_penalty
        >>> class Scale(torch.nn.Module):      # f(z, x) = a z + x: ‖J‖_F² / d = a²
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.a = torch.nn.Parameter(torch.tensor(0.5, dtype=torch.float64))
        ...     def forward(self, z, x):
        ...         return self.a * z + x
        >>> z = torch.zeros(4000, 8, dtype=torch.float64)
        >>> p = jacobian_penalty(Scale(), z, z, generator=torch.Generator().manual_seed(0))
        >>> p.requires_grad, abs(float(p.detach()) - 0.25) < 0.01
        (True, True)
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise InputError(f"samples must be an integer ≥ 1 (Hutchinson probes per sample), got {samples!r}")
    zd = z.detach()
    _, vjp = torch.func.vjp(lambda zz: cell(zz, x), zd)
    eps = torch.randn((samples, *zd.shape), dtype=zd.dtype, device=zd.device, generator=generator)
    if samples == 1:
        g = vjp(eps[0])[0].unsqueeze(0)
    else:
        g = torch.func.vmap(lambda e: vjp(e)[0])(eps)
    return g.pow(2).sum() / (samples * zd.numel())
