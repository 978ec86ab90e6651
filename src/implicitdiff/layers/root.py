"""``root``: solve ``F(y, θ) = 0`` and differentiate the equation, not the solver."""

from __future__ import annotations

from typing import Callable

from ..implicit.adjoint import Implicit
from ..solvers.objects import as_solver
from ._implicit import solve_implicit

__all__ = ["root"]


def root(F: Callable, y0, *params, solver="newton", adjoint=Implicit(), rtol=None, atol=None, max_iter=None,
         batch_dims=0, on_failure="raise", return_info=False, solver_options=None):
    r"""Find ``y*`` with ``F(y*, *params) = 0`` from ``y0``; gradients flow to ``params`` by the IFT.

    ``dy*/dθ = −(∂F/∂y)⁻¹ ∂F/∂θ``: reverse mode solves ``(∂F/∂y)ᵀ u = ȳ`` and
    returns ``θ̄ = −(∂F/∂θ)ᵀ u``; forward mode solves ``∂F/∂y ẏ = −∂F/∂θ θ̇``.
    Memory does not grow with the solver's iterations.

    Args:
        F: ``F(y, *params)`` returning a tensor of ``y``'s shape; a pure function
            of its arguments (``torch.func`` transforms it). Differentiable
            tensors must be passed in ``params``, not captured by the closure.
            For an ``nn.Module``, pass ``dict(module.named_parameters())`` and
            call ``torch.func.functional_call(module, p, (y,))`` inside ``F``.
        y0: starting point, any shape (a 0-d tensor included). Gets no gradient.
        *params: tensors or pytrees of tensors (gradients flow to every tensor).
        solver: a solver object carrying its options — ``Newton(...)``
            (default; its Jacobian factorization at the solution is reused by the
            backward), ``Broyden(...)``, ``Anderson(...)``, ``Picard(...)``
            (:mod:`implicitdiff.solvers`) — or its name (``"newton"``, …: the class
            with its defaults), or a callable ``solver(F, y0, params, *, batch_dims,
            rtol, atol, max_iter) -> SolverResult``.
        adjoint: ``Implicit(...)`` (default), ``Unroll()`` or ``Neumann(k)``.
        rtol, atol, max_iter: forward stopping rule ``‖F(y)‖ ≤ atol + rtol ‖F(y0)‖``
            per batch element (defaults: rtol 1e-10 in float64, 1e-6 in float32, atol 0);
            shorthand for the solver object's options (``solver="newton", rtol=r`` is
            ``solver=Newton(rtol=r)``; set on both, one option raises).
        batch_dims: leading dims of ``y`` that index independent problems.
        on_failure: ``"raise"`` | ``"warn"`` | ``"nan"`` for non-converged elements.
        return_info: also return the :class:`~implicitdiff.SolveInfo`.
        solver_options: removed (raises ``InputError``): options live on the solver object.

    Raises:
        SolveError: the forward solve did not converge (status, residual,
            iterations, hint), or the adjoint solve failed (singular ``∂F/∂y``,
            non-converged Krylov solve) — never a silent zero or NaN gradient.

    Example:
        >>> import torch, implicitdiff as idf
        >>> theta = torch.tensor(8.0, dtype=torch.float64, requires_grad=True)
        >>> y = idf.root(lambda y, t: y ** 3 - t, torch.tensor(1.0, dtype=torch.float64), theta)
        >>> y.backward()
        >>> round(float(y.detach()), 6), round(float(theta.grad), 6)   # y = θ^(1/3), dy/dθ = 1/(3 y²)
        (2.0, 0.083333)
    """
    solve = as_solver(solver, rtol=rtol, atol=atol, max_iter=max_iter, solver_options=solver_options)
    return solve_implicit(F, y0, params, solve=solve, adjoint=adjoint, batch_dims=batch_dims,
                          on_failure=on_failure, return_info=return_info, what="root", unroll="newton",
                          rtol=rtol, atol=atol, max_iter=max_iter)
