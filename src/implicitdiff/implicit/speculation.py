"""The speculative recording: the forward solver's last evaluation of ``F``, reused by the backward.

A first-order, matrix-free backward needs ``F`` (or a fixed point's map ``T``) evaluated once at
``y*`` with a graph: its adjoint products ``(∂F/∂y)ᵀ v`` and the parameter VJP come from that
one recording (:class:`Linearization`).  The forward solver evaluates ``F`` at its last iterate
anyway, without a graph.  The speculation: the solver evaluates the step it *predicts* to be its
last through a :class:`Recorder` (grad mode on, in the original — differentiable — parameters),
and returns the recording in ``SolverResult.recording`` when the prediction held, i.e. when the
recorded iterate is the very one it returns.  A wrong guess costs one recorded evaluation, never a
gradient at the wrong point; a miss costs one evaluation more in the backward (:func:`record`).

The pieces and where they meet (nothing else travels between forward and backward):

* :class:`~implicitdiff.implicit.root.RootFn` hands ``recorder=Recorder(problem, leaves)`` to a
  solver that takes one (``Solver.records``: Picard and Anderson, whose loop predicts its
  last step, :func:`~implicitdiff.solvers._loop.iterate` with ``freeze=False``), and returns the solver's
  ``recording`` as a non-tensor output that its ``setup_context`` keeps for the backward;
* the solver calls :meth:`Recorder.record` instead of ``F`` for the predicted step, and
  :meth:`Recorder.take` on the iterate it returns;
* ``nn.DEQ`` records its cell called directly (``RootProblem.direct``).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

from .._core.engine import vjp as engine_vjp
from .._core.residual import FixedPointResidual

__all__ = ["Linearization", "record", "Recorder"]


class Linearization(NamedTuple):
    """``F`` recorded once at ``y`` for a first-order, matrix-free backward.

    The adjoint products ``(∂F/∂y)ᵀ v`` (one reverse pass in ``y``: the θ branches of the
    graph are pruned) and the parameter VJP ``(∂F/∂θ)ᵀ u`` share one evaluation of ``F``
    (``torch.func.vjp`` evaluates ``F`` once for each, and costs more per product).  For a
    fixed-point residual ``F = T − id`` (a :class:`~implicitdiff._core.residual.FixedPointResidual`)
    ``T`` is recorded instead: ``(∂F/∂y)ᵀ v = (∂T/∂y)ᵀ v − v``, ``∂F/∂θ = ∂T/∂θ``, and
    :meth:`map_vjp` gives the adjoint fixed-point iteration its products without the ``− v``.
    """

    yr: torch.Tensor        # the point, a leaf requiring grad
    out: torch.Tensor       # F(yr) — or T(yr) for a fixed-point residual — with its graph
    fixed: bool             # whether ``out`` is the map T of F = T − id

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


def record(problem, y, leaves, F: Optional[Callable] = None, params=None) -> Linearization:
    """A :class:`Linearization` of ``F`` (default ``problem.F``) at ``y`` (grad mode on, ``y`` a fresh leaf);
    of its map ``T`` for a :class:`~implicitdiff._core.residual.FixedPointResidual` ``F = T − id``.

    ``params``: ``leaves`` already unflattened."""
    params = problem.tree.unflatten(list(leaves)) if params is None else params
    F = problem.F if F is None else F
    with torch.enable_grad():
        yr = y.detach().requires_grad_()
        if isinstance(F, FixedPointResidual):
            return Linearization(yr, F.map(yr, *params), True)
        return Linearization(yr, F(yr, *params), False)


class Recorder:
    """Records ``F`` at the iterate a forward solver predicts to be its last (module docstring).

    ``record(y)`` returns ``F(y)`` (detached) and keeps its :class:`Linearization` in the
    *original* leaves (the solver's own parameters are detached copies); ``take(y)`` hands it over
    only if it was taken at the very iterate ``y`` (same storage, shape and version), else ``None``.
    """

    def __init__(self, problem, leaves, F: Optional[Callable] = None):
        # ``F``: the residual the solver iterates, when not ``problem.F`` (``RootProblem.direct``)
        self.problem, self.leaves, self.F = problem, leaves, F
        self._last = None
        self._params = None                              # the leaves unflattened, once

    def record(self, y):
        """``F(y)``, recorded."""
        if self._params is None:
            self._params = self.problem.tree.unflatten(list(self.leaves))
        lin = record(self.problem, y, self.leaves, self.F, self._params)
        self._last = (lin, y.data_ptr(), y.shape, y._version)
        value = lin.out.detach()
        return value - y if lin.fixed else value

    def take(self, y) -> Optional[Linearization]:
        """The recording made at ``y``, or ``None`` (no recording, or one at another iterate)."""
        last, self._last = self._last, None
        if last is None:
            return None
        lin, ptr, shape, version = last
        return lin if (y.data_ptr() == ptr and y.shape == shape and y._version == version) else None
