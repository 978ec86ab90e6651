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

Defaults (measured in ``benchmarks/deq.py``, figures in ``docs/benchmarks.md``).  On a
typical contractive cell every method needs about the same number of iterations: the
eigenvalues of ``∂f/∂z`` fill a disk, on which neither Anderson mixing nor a Krylov method
converges faster than Picard.

* Forward: :data:`DEFAULT_SOLVER` ``= Anderson(start_rate=0.8, freeze=False)``: plain steps
  ``z ← f(z, x)`` while the worst sample's residual shrinks by ≥ 20 % per step; mixing only
  where it does not — slowly or non-contracting cells, where it saves evaluations.  The
  plain steps run the whole batch without masks (``freeze=False``): a sample that has
  converged keeps iterating while others run — on a contraction it only gets more accurate —
  and a step costs the cell plus one norm and one host read.  Its ``iterations`` count the
  steps it needed; ``solver=Anderson(start_rate=0.8, freeze=True)`` stops each sample where it
  converged (its result then does not depend on the batch); ``solver="anderson"`` is
  ``Anderson()``, the same algorithm as :func:`~implicitdiff.fixed_point`'s.
* The last evaluation is recorded: when the residual trend predicts that the next step meets
  the tolerance, that cell evaluation runs with autograd recording
  (:class:`~implicitdiff.implicit.speculation.Recorder`), and the backward takes its products from
  that graph instead of evaluating the cell again at ``z*``.  The graph is kept until the
  backward: what torchdeq keeps too (the cell's saved tensors at ``z*``).
* Backward: :data:`DEFAULT_ADJOINT` ``= FixedPointAdjoint()`` iterates the adjoint fixed point
  by Picard in a dedicated loop (:mod:`implicitdiff.implicit.fixed_point_adjoint`): its first
  step is free, then one VJP of the cell per step; GMRES only for samples where that fails.
  ``Implicit(solver="gmres")`` takes as many iterations, each about twice a VJP (the batched
  Arnoldi step); ``Implicit(solver="auto")`` — dense LU, the mechanism's default at small
  width — first builds each sample's Jacobian from one VJP per row.
* Higher-order derivatives (double backward, ``jacrev``) go through the library's
  differentiable GMRES over the cell's products: matrix-free, whatever the adjoint.
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple, Optional

import torch

from .._core.errors import InputError
from .._core.failure import check_on_failure
from .._core.defaults import DEQ_ANDERSON_START_RATE
from .._core.options import check_bool
from .._core.status import Status
from .._core.validate import as_float_tensor, check_same_dtype_device, in_transform
from ..implicit.adjoint import Implicit, Neumann, Unroll
from ..solvers.objects import Anderson, Solver, as_solver
from ..implicit.fixed_point_adjoint import DEFAULT_ADJOINT, FixedPointAdjoint
from ._implicit import solve_implicit
from .fixed_point import FixedPointResidual

__all__ = ["deq", "jacobian_penalty", "DEQInfo", "FixedPointAdjoint", "DEFAULT_ADJOINT", "DEFAULT_SOLVER",
           "ANDERSON_START_RATE",
           "DEQ_HINTS", "check_deq_options"]


class DEQInfo(NamedTuple):
    """Per-sample convergence report of a DEQ forward solve (no host sync to build it).

    Attributes:
        status: ``(B,)`` int64 :class:`~implicitdiff.Status` codes.
        residual: ``(B,)`` relative residual ``‖f(z) − z‖ / ‖f(z0) − z0‖``.
        iterations: ``(B,)`` forward iterations used by each sample.
        trace: ``(k + 1, B)`` absolute residuals ``‖f(z_j) − z_j‖`` of every
            iteration (row 0: ``z0``; in the plain steps every sample moves on
            until all have converged, in the masked loop a stopped sample
            repeats its last value),
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
    # dtypes and devices named here (the mechanism would name its own y0 and "parameter leaf i")
    x = as_float_tensor("x", x)
    check_same_dtype_device("x", x, z0=z0)
    for name, p in cell.named_parameters():
        if p.is_floating_point() and (p.dtype != x.dtype or p.device != x.device):
            raise InputError(f"the DEQ cell's parameter {name!r} is {p.dtype} on {p.device} but x is {x.dtype} on "
                             f"{x.device}; convert x (e.g. x.to({p.dtype})) or the cell (cell.to(x.dtype))")
    return z0


def deq(cell: torch.nn.Module, x: torch.Tensor, z0: Optional[torch.Tensor] = None, *, solver=None,
        adjoint=DEFAULT_ADJOINT, rtol=None, atol=None, max_iter=None, on_failure="raise", return_info=False,
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
        solver: forward solver: ``None`` is :data:`DEFAULT_SOLVER`
            ``= Anderson(start_rate=0.8, freeze=False)`` (Anderson mixing with a
            regularized, safeguarded least-squares step, started lazily: plain
            Picard steps while every sample's residual shrinks at least by the
            factor ``0.8`` per step, and at most for half of ``max_iter``; a
            converged sample keeps stepping while others run — see the module
            docstring); any solver object (``Anderson(...)``, ``Broyden(...)``,
            ``Picard(...)``, ``Newton(...)``), its name (``"anderson"`` is
            ``Anderson()``, the same algorithm as :func:`~implicitdiff.fixed_point`'s)
            or a callable (see :func:`~implicitdiff.root`).
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
        solver_options: removed (raises ``InputError``): options live on the solver object.
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
    check_bool("return_info", return_info)
    check_bool("trace", trace)
    # the solver and its options are validated here, the adjoint and the policy by solve_implicit
    solve = as_solver(DEFAULT_SOLVER if solver is None else solver, rtol=rtol, atol=atol, max_iter=max_iter,
                      solver_options=solver_options)
    records = isinstance(solve, Solver) and solve.records
    if isinstance(solve, Solver):
        rtol, atol, max_iter = solve.rtol, solve.atol, solve.max_iter
    if isinstance(adjoint, FixedPointAdjoint) and adjoint.rtol is None and rtol is not None:
        adjoint = replace(adjoint, rtol=rtol)  # the gradient as accurate as the forward solve
    traces: list = []
    if trace and isinstance(solve, Solver) and not isinstance(adjoint, Unroll):
        solve = _keeping_trace(solve, traces)
    # T(z, params, x) = cell(z, x) with the parameters explicit (functional_call); every parameter is lifted
    # (buffers are not: functional_call takes them from the module; tied parameters appear once and are re-tied)
    F = FixedPointResidual(lambda z, params, x: torch.func.functional_call(cell, params, (z, x)), _CELL)
    # the forward iterations call the cell directly (functional_call costs about a small cell evaluation): the
    # lifted parameters *are* the module's own tensors — except under torch.func transforms, which hand the
    # mechanism other tensors (RootProblem.direct)
    direct = None if in_transform() else FixedPointResidual(lambda z, _params, x: cell(z, x), _CELL)
    z, info = solve_implicit(F, z0, (dict(cell.named_parameters()), x), solve=solve, adjoint=adjoint, batch_dims=1,
                             on_failure=on_failure, return_info=True, what=_WHAT, hints=DEQ_HINTS, neumann_alpha=-1.0,
                             unroll="picard", rtol=rtol, atol=atol, max_iter=max_iter, records=records, direct=direct)
    if not return_info:
        return z
    trace = traces[-1] if traces else None
    return z, DEQInfo(info.status.detach(), info.residual.detach(), info.iterations.detach(),
                      None if trace is None else trace.detach())


def _keeping_trace(solve, traces: list):
    """``solve`` with ``trace=True``, its residual trace appended to ``traces`` (the mechanism keeps only
    ``(y, info)``): ``deq(trace=True)`` needs no second solve."""
    def run(F, y0, params, batch_dims, **call):
        res = solve(F, y0, params, batch_dims, trace=True, **call)
        traces.append(res.trace)
        return res
    return run


_WHAT = "deq (the fixed point z = f(z, x))"
_CELL = "the DEQ cell, called as cell(z, x),"

_NOT_CONTRACTION = ("the cell may not be a contraction at this input (its fixed point is unstable or absent): "
                    "train with Jacobian regularization (DEQ(jac_reg=1), adding layer.jac_loss to the loss), "
                    "spectral-normalize its weights (torch.nn.utils.parametrizations.spectral_norm), "
                    "or try solver='broyden'; raising max_iter helps only a slow contraction")
#: Hints of a failed DEQ forward solve: every way it fails points at the cell's contractivity.
DEQ_HINTS = {Status.MAX_ITERATIONS: _NOT_CONTRACTION, Status.DIVERGED: _NOT_CONTRACTION,
             Status.NONFINITE: "the iteration produced NaN/Inf: check x for NaN/Inf and the cell for overflow; "
                               + _NOT_CONTRACTION}


def check_deq_options(*, solver, adjoint, rtol, atol, max_iter, on_failure, solver_options) -> None:
    """Validate the options of :func:`deq` / :class:`~implicitdiff.nn.DEQ` (at construction, not at the solve)."""
    as_solver(DEFAULT_SOLVER if solver is None else solver, rtol=rtol, atol=atol, max_iter=max_iter,
              solver_options=solver_options)
    if not isinstance(adjoint, (FixedPointAdjoint, Implicit, Unroll, Neumann)):
        raise InputError("adjoint must be FixedPointAdjoint(...), implicitdiff.Implicit(...), "
                         f"implicitdiff.Neumann(k) or implicitdiff.Unroll(), got {adjoint!r}")
    check_on_failure(on_failure)


#: The DEQ's forward solver: Anderson started lazily (plain steps while every sample's residual
#: shrinks by ``start_rate`` per step), whole-batch plain steps (``freeze=False``; module docstring).
DEFAULT_SOLVER = Anderson(start_rate=DEQ_ANDERSON_START_RATE, freeze=False)

#: Anderson's lazy start in a DEQ (:data:`DEFAULT_SOLVER`'s ``start_rate``).
ANDERSON_START_RATE = DEQ_ANDERSON_START_RATE


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
