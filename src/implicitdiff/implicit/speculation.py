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
  solver that takes one (``Solver.records``: Picard and Anderson, whose plain phase predicts its
  last step, :func:`~implicitdiff.solvers._loop.plain_phase`), and returns the solver's
  ``recording`` as a non-tensor output that its ``setup_context`` keeps for the backward;
* the solver calls :meth:`Recorder.record` instead of ``F`` for the predicted step, and
  :meth:`Recorder.take` on the iterate it returns;
* ``nn.DEQ`` records its cell called directly (``RootProblem.record_map``).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .._core.engine import vjp as engine_vjp

__all__ = ["Linearization", "record", "Recorder"]


class Linearization:
    """``F`` recorded once at ``y`` for a first-order, matrix-free backward.

    The adjoint products ``(∂F/∂y)ᵀ v`` (one reverse pass in ``y``: the θ branches of the
    graph are pruned) and the parameter VJP ``(∂F/∂θ)ᵀ u`` share one evaluation of ``F``
    (``torch.func.vjp`` evaluates ``F`` once for each, and costs more per product).  For a
    fixed-point residual ``F = T − id`` (``F.map = T``, :func:`~implicitdiff.fixed_point_residual`)
    ``T`` is recorded instead: ``(∂F/∂y)ᵀ v = (∂T/∂y)ᵀ v − v``, ``∂F/∂θ = ∂T/∂θ``, and
    :meth:`map_vjp` gives the adjoint fixed-point iteration its products without the ``− v``.
    """

    def __init__(self, yr: torch.Tensor, out: torch.Tensor, fixed: bool):
        self.yr, self.out, self.fixed = yr, out, fixed

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


def record(problem, y, leaves, T: Optional[Callable] = None, params=None) -> Linearization:
    """A :class:`Linearization` of ``problem.F`` at ``y`` (grad mode on, ``y`` a fresh leaf).

    ``T``: the fixed-point map to record (``F = T − id``), when it is not ``problem.F.map``
    (a cheaper way to evaluate the same map, e.g. a DEQ cell called directly); ``params``:
    ``leaves`` already unflattened."""
    params = problem.tree.unflatten(list(leaves)) if params is None else params
    T = getattr(problem.F, "map", None) if T is None else T   # a FixedPointResidual knows its map
    with torch.enable_grad():
        yr = y.detach().requires_grad_()
        if T is not None:
            return Linearization(yr, T(yr, *params), True)
        return Linearization(yr, problem.F(yr, *params), False)


class Recorder:
    """Records ``F`` at the iterate a forward solver predicts to be its last (module docstring).

    ``record(y)`` returns ``F(y)`` (detached) and keeps its :class:`Linearization` in the
    *original* leaves (the solver's own parameters are detached copies); ``take(y)`` hands it over
    only if it was taken at the very iterate ``y`` (same storage, shape and version), else ``None``.
    """

    def __init__(self, problem, leaves, map: Optional[Callable] = None):
        # ``map``: the fixed-point map to record, when not ``problem.F``'s (a DEQ cell called directly)
        self.problem, self.leaves, self.map = problem, leaves, map
        self._last = None
        self._params = None                              # the leaves unflattened, once

    def record(self, y):
        """``F(y)``, recorded."""
        if self._params is None:
            self._params = self.problem.tree.unflatten(list(self.leaves))
        lin = record(self.problem, y, self.leaves, self.map, self._params)
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
