"""The ``Unroll()`` strategy: differentiable iterations, autograd through every step.

Memory grows with the number of iterations; it exists to check the implicit
gradient (the two agree as the forward tolerance tightens) and for problems
where the iterations themselves are the model.
"""

from __future__ import annotations

import torch

from .._core.defaults import default_rtol
from .._core.status import SolveInfo, Status
from .._core.jacobian import batch_jacobian
from .system import flat as _flat

__all__ = ["unrolled_newton", "unrolled_picard"]


def _norm(r, bd):
    return _flat(r, bd).norm(dim=-1)


def _loop(step, F, y0, bd, rtol, atol, max_iter):
    y = y0
    r = F(y)
    r0 = _norm(r, bd).detach()
    tol = atol + (default_rtol(y0.dtype) if rtol is None else rtol) * r0
    it = torch.zeros(r0.shape, dtype=torch.int64, device=y0.device)
    for _ in range(max_iter):
        done = _norm(r, bd).detach() <= tol
        if bool(done.all()):
            break
        y = step(y, r)
        it = it + (~done).to(torch.int64)
        r = F(y)
    rn = _norm(r, bd).detach()
    ok = rn <= tol
    status = torch.where(ok, int(Status.SUCCESS), torch.where(torch.isfinite(rn), int(Status.MAX_ITERATIONS),
                                                              int(Status.NONFINITE)))
    return y, SolveInfo(status.to(torch.int64), rn / torch.clamp(r0, min=torch.finfo(rn.dtype).tiny), it)


def unrolled_newton(F, y0, *, batch_dims=0, rtol=None, atol=0.0, max_iter=50):
    """Differentiable Newton iterations ``y ← y − J(y)⁻¹ F(y)`` from ``y0``; returns ``(y, info)``."""

    def step(y, r):
        J = batch_jacobian(F, y, batch_dims)
        dy = torch.linalg.solve(J, _flat(r, batch_dims).unsqueeze(-1)).squeeze(-1)
        return y - dy.reshape(y.shape)

    return _loop(step, F, y0, batch_dims, rtol, atol, max_iter)


def unrolled_picard(F, y0, *, batch_dims=0, rtol=None, atol=0.0, max_iter=500):
    """Differentiable Picard iterations ``y ← y + F(y)`` (``= T(y)`` for ``F = T − id``)."""
    return _loop(lambda y, r: y + r, F, y0, batch_dims, rtol, atol, max_iter)
