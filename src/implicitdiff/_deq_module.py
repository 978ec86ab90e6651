"""``DEQ``: a deep equilibrium layer as an ``nn.Module`` (to be re-exported as ``implicitdiff.nn.DEQ``).

A thin wrapper of :func:`implicitdiff.layers.deq.deq`: it holds the cell and
the options, keeps the per-sample convergence report of the last call, and
computes the Jacobian regularization term when asked.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._core.errors import InputError
from .layers.deq import DEFAULT_ADJOINT, DEQInfo, deq, jacobian_penalty

__all__ = ["DEQ"]


class DEQ(torch.nn.Module):
    r"""Deep equilibrium layer ``z* = cell(z*, x)`` with implicit gradients to every cell parameter.

    The forward pass solves the fixed point per sample under ``no_grad``
    (Anderson by default; Broyden, Picard); the backward solves the adjoint
    system ``(I − ∂f/∂z)ᵀ v = z̄`` at ``z*`` and returns ``θ̄ = (∂f/∂θ)ᵀ v``
    for every parameter of the cell (lifted with ``torch.func.functional_call``)
    and ``x̄ = (∂f/∂x)ᵀ v``.  Memory is independent of the forward iterations.

    Args:
        cell: any ``nn.Module`` called as ``cell(z, x)`` and returning a tensor
            of ``z``'s shape; samples (dim 0) must not interact.
        solver: forward solver ``"anderson"`` (default) | ``"broyden"`` |
            ``"picard"`` | ``"newton"`` | a callable.
        adjoint: the gradient: :data:`~implicitdiff.layers.deq.DEFAULT_ADJOINT`
            (exact: the adjoint fixed point by Picard, GMRES where that fails),
            ``Implicit(solver="gmres" | "lu" | ...)`` (exact),
            ``Neumann(k)`` (phantom gradient, ``k`` terms) or ``Unroll()``.
        rtol, atol, max_iter: per-sample forward stopping rule
            ``‖f(z) − z‖ ≤ atol + rtol ‖f(z0) − z0‖`` (rtol default 1e-10 in
            float64, 1e-6 in float32).
        on_failure: ``"raise"`` (default) | ``"warn"`` | ``"nan"`` for samples
            whose forward solve fails (their status is in :attr:`last_info`).
        jac_reg: number of Hutchinson probes of the Jacobian regularization
            ``‖∂f/∂z‖_F² / dim(z)`` at ``z*`` (0: off), over the converged
            samples.  In training mode the estimate is left in
            :attr:`jac_loss` (differentiable, double backward included) for
            the user to add to the loss with a weight.
        solver_options: extra keyword arguments of the forward solver.
        track_trace: keep the residual of every forward iteration in
            ``last_info.trace`` (from the same solve, no extra cost but memory
            ``(iterations + 1) × B``).

    Attributes:
        last_info: :class:`~implicitdiff.layers.deq.DEQInfo` of the last call:
            per-sample ``status``, relative ``residual``, ``iterations`` and
            ``trace`` (tensors of shape ``(B,)``, trace ``(k + 1, B)``).
        jac_loss: the Jacobian penalty of the last training call, or ``None``.

    Shapes:
        ``x``: ``(B, ...)``; ``z0``: ``(B, ...)`` (default zeros like ``x``);
        output: ``z0``'s shape.

    Example:
        >>> import torch
        >>> from implicitdiff._deq_module import DEQ
        >>> class Cell(torch.nn.Module):
        ...     def __init__(self, n):
        ...         super().__init__()
        ...         self.lin = torch.nn.Linear(n, n)
        ...         torch.nn.init.normal_(self.lin.weight, std=0.2 / n ** 0.5)
        ...     def forward(self, z, x):
        ...         return torch.tanh(self.lin(z) + x)
        >>> layer = DEQ(Cell(8), jac_reg=1)
        >>> z = layer(torch.randn(4, 8))
        >>> (z.square().sum() + 0.1 * layer.jac_loss).backward()
        >>> layer.last_info.status.tolist(), layer.cell.lin.weight.grad.shape
        ([0, 0, 0, 0], torch.Size([8, 8]))
    """

    def __init__(self, cell: torch.nn.Module, *, solver="anderson", adjoint=DEFAULT_ADJOINT, rtol=None, atol=0.0,
                 max_iter=None, on_failure="raise", jac_reg: int = 0, solver_options: Optional[dict] = None,
                 track_trace: bool = False):
        super().__init__()
        if not isinstance(cell, torch.nn.Module):
            raise InputError(f"cell must be a torch.nn.Module called as cell(z, x), got {type(cell).__name__}")
        if isinstance(jac_reg, bool) or not isinstance(jac_reg, int) or jac_reg < 0:
            raise InputError(f"jac_reg must be an integer ≥ 0 (Hutchinson probes; 0 turns it off), got {jac_reg!r}")
        self.cell = cell
        self.solver = solver
        self.adjoint = adjoint
        self.rtol = rtol
        self.atol = atol
        self.max_iter = max_iter
        self.on_failure = on_failure
        self.jac_reg = jac_reg
        self.solver_options = solver_options
        self.track_trace = bool(track_trace)
        self.last_info: Optional[DEQInfo] = None
        self.jac_loss: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor, z0: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self._forward(x, z0)

    # Under torch.compile the layer runs eagerly (a graph break): the solver's loop stops on data
    # (a host sync per iteration), which dynamo would otherwise retrace iteration by iteration —
    # seconds of compilation per call shape for nothing it can fuse.  The modules around it compile.
    @torch.compiler.disable
    def _forward(self, x, z0):
        z, info = deq(self.cell, x, z0, solver=self.solver, adjoint=self.adjoint, rtol=self.rtol, atol=self.atol,
                      max_iter=self.max_iter, on_failure=self.on_failure, return_info=True,
                      solver_options=self.solver_options, trace=self.track_trace)
        self.last_info = info
        self.jac_loss = None
        if self.jac_reg and self.training and torch.is_grad_enabled():
            zj, xj = z, x
            if not bool(info.ok.all()):  # on_failure="nan"/"warn": measure at the converged samples only
                zj, xj = z[info.ok], x[info.ok]
            self.jac_loss = (jacobian_penalty(self.cell, zj, xj, samples=self.jac_reg) if len(zj)
                             else z.new_zeros(()))
        return z

    def extra_repr(self) -> str:
        return (f"solver={self.solver!r}, adjoint={self.adjoint!r}, rtol={self.rtol}, max_iter={self.max_iter}, "
                f"on_failure={self.on_failure!r}, jac_reg={self.jac_reg}")
