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

Choice of the adjoint solver (measured in ``benchmarks/deq.py``, width 256):
``Implicit(solver="auto")`` would build the per-sample ``n × n`` Jacobian
(``n`` vector-Jacobian products) and LU-factorize it — exact but ``O(n³)`` per
sample.  ``I − ∂f/∂z`` of a contractive cell is well conditioned, so GMRES
converges in about as many steps as the forward solver, each one
vector-Jacobian product: :data:`DEFAULT_ADJOINT` is ``Implicit(solver="gmres")``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .._core.errors import InputError
from .._core.status import SolveInfo
from ..implicit.adjoint import Implicit, Unroll
from ..solvers.registry import get_root_solver
from ._implicit import forward_solver, solve_implicit
from .fixed_point import fixed_point_residual

__all__ = ["deq", "jacobian_penalty", "DEQInfo", "DEFAULT_ADJOINT"]

#: The DEQ's default gradient: exact, matrix-free (one VJP of the cell per GMRES step).
DEFAULT_ADJOINT = Implicit(solver="gmres")


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


def _recording(solve, trace: bool, record: dict):
    """Wrap a forward ``solve`` so that its residual trace is kept in ``record["trace"]``.

    The implicit mechanism keeps only ``(y, info)`` of the forward solve; the
    trace is a by-product of the same run (no second solve), taken here.
    """
    def run(F, y0, params, batch_dims):
        res = solve(F, y0, params, batch_dims)
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
        adjoint: :data:`DEFAULT_ADJOINT` ``= Implicit(solver="gmres")`` (exact,
            matrix-free); ``Implicit(solver="lu")`` (dense per-sample Jacobian,
            small cells only); ``Neumann(k)`` (phantom gradient: the truncated
            series ``v = Σ_{i<k} (∂f/∂z)ᵀⁱ z̄``, approximate, unchecked);
            ``Unroll()`` (autograd through Picard iterations; memory grows).
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
    options = dict(solver_options or {})
    if trace and not isinstance(adjoint, Unroll) and not callable(solver):
        options["trace"] = True
    record: dict = {"trace": None}
    solve = forward_solver(solver, registry=get_root_solver, rtol=rtol, atol=atol, max_iter=max_iter,
                           options=options)
    z, info = solve_implicit(fixed_point_residual(_cell_map(cell)), z0, (_lifted(cell), x),
                             solve=_recording(solve, trace, record), adjoint=adjoint, batch_dims=1,
                             on_failure=on_failure, return_info=True, what="deq (the fixed point z = f(z, x))",
                             neumann_alpha=-1.0, unroll="picard", rtol=rtol, atol=atol, max_iter=max_iter)
    if not return_info:
        return z
    return z, _info(info, record["trace"])


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
