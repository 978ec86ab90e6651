"""Restarted GMRES for square operators, batched (Saad & Schultz 1986), right-preconditioned."""

from __future__ import annotations

import torch

from ..._core.defaults import eps
from ..._core.errors import InputError
from ._common import Iteration, KrylovResult, and_active, col, normalize, norm, run, safe, where_active

__all__ = ["gmres"]


class _GMRES(Iteration):
    # One step = one Arnoldi step on A M (right preconditioning, so the residual GMRES
    # minimizes is the true one):  w = A M v_j,  h = Vᵀw (classical Gram–Schmidt run twice,
    # "CGS2": two batched matmuls, as stable as modified G–S),  v_{j+1} = w/‖w‖.
    # The Hessenberg column is reduced by the previous Givens rotations and a new one, so
    # |g_{j+1}| is the residual norm of the least-squares problem  min ‖β e₁ − H y‖ — the
    # residual of x₀ + M V y — without forming x.  An element that converges at step j keeps
    # k = j columns: its x uses only y₁..y_k (a masked triangular solve at the cycle's end).
    # After `restart` steps: x ← x₀ + M V_k y, and a new cycle starts from the true residual.
    # Stagnation: a full cycle that does not reduce the residual → BREAKDOWN.

    def __init__(self, prob, restart):
        super().__init__(prob)
        self.restart = restart
        batch, n = prob.x0.shape[:-1], prob.x0.shape[-1]
        like = prob.x0
        self.V = like.new_zeros(*batch, restart + 1, n)
        self.R = like.new_zeros(*batch, restart, restart)
        self.g = like.new_zeros(*batch, restart + 1)
        self.cs = like.new_zeros(*batch, restart)
        self.sn = like.new_zeros(*batch, restart)

    def init(self, x):
        prob = self.prob
        self.x = x
        r = prob.b - prob.mv(x)
        beta = norm(r)
        self.V[..., 0, :] = r / col(safe(beta))
        self.g.zero_()
        self.g[..., 0] = beta
        self.j = 0
        self.k = torch.zeros(beta.shape, dtype=torch.int64, device=x.device)
        self.rnorm = beta
        self.cycle_start = beta
        self.broken = torch.zeros_like(beta, dtype=torch.bool)

    def step(self, active):
        prob, j = self.prob, self.j
        v = self.V[..., j, :]
        w = prob.mv(v if prob.M is None else prob.M(v))
        Vj = self.V[..., : j + 1, :]
        h = (Vj @ w.unsqueeze(-1)).squeeze(-1)
        w = w - (h.unsqueeze(-2) @ Vj).squeeze(-2)
        h2 = (Vj @ w.unsqueeze(-1)).squeeze(-1)  # second Gram–Schmidt pass
        w = w - (h2.unsqueeze(-2) @ Vj).squeeze(-2)
        h = h + h2
        hn = norm(w)
        self.V[..., j + 1, :] = w / col(safe(hn))
        hs = list(h.unbind(-1))
        for i in range(j):  # previous rotations
            c, s = self.cs[..., i], self.sn[..., i]
            hs[i], hs[i + 1] = c * hs[i] + s * hs[i + 1], c * hs[i + 1] - s * hs[i]
        rho = torch.hypot(hs[j], hn)
        c, s = hs[j] / safe(rho), hn / safe(rho)
        hs[j] = rho
        self.cs[..., j], self.sn[..., j] = c, s
        gj = self.g[..., j]
        self.g[..., j + 1] = -s * gj
        self.g[..., j] = c * gj
        self.R[..., : j + 1, j] = torch.stack(hs, -1)
        self.k = where_active(active, torch.full_like(self.k, j + 1), self.k)
        self.rnorm = where_active(active, self.g[..., j + 1].abs(), self.rnorm)
        broken = and_active(active, rho == 0)  # H singular: no progress possible in this space
        self.j = j + 1
        if self.j == self.restart:
            start, ran = self.cycle_start, self.k > 0
            self.init(self.solution())
            broken = broken | (ran & (self.rnorm > (1 - 10 * eps(start.dtype)) * start) & (self.rnorm > prob.tol))
        self.broken = broken

    def solution(self):
        j = self.j
        if j == 0:
            return self.x
        # y solves R[:k, :k] y = g[:k]; columns ≥ k (per element) are replaced by the identity.
        keep = torch.arange(j, device=self.k.device) < self.k.unsqueeze(-1)  # (*batch, j)
        R = self.R[..., :j, :j]
        eye = torch.eye(j, dtype=R.dtype, device=R.device)
        mask = keep.unsqueeze(-1) & keep.unsqueeze(-2)
        R = torch.where(mask, R, eye)
        diag = R.diagonal(dim1=-2, dim2=-1)
        R = R + torch.diag_embed(torch.where(diag == 0, torch.ones_like(diag), torch.zeros_like(diag)))
        g = torch.where(keep, self.g[..., :j], torch.zeros_like(self.g[..., :j]))
        y = torch.linalg.solve_triangular(R, g.unsqueeze(-1), upper=True).squeeze(-1)
        dx = (y.unsqueeze(-2) @ self.V[..., :j, :]).squeeze(-2)
        return self.x + (dx if self.prob.M is None else self.prob.M(dx))


def gmres(A, b, x0=None, *, rtol=None, atol=0.0, max_iter=None, M=None, callback=None, restart=None,
          check_every=None) -> KrylovResult:
    r"""Solve ``A x = b`` for a square, possibly non-symmetric ``A`` by restarted GMRES(``restart``).

    Each cycle minimizes ``‖b − A x‖`` over ``x₀ + M K_j(A M, r₀)``. Stopping rule, per batch
    element: ``‖b − A x‖ ≤ max(rtol · ‖b‖, atol)`` (the Arnoldi residual estimate, which is the
    true residual in exact arithmetic; confirmed on the true residual).

    Args:
        A: ``(*, n, n)`` dense tensor, 2-D ``torch.sparse`` tensor, LinearOperator, or callable
            ``x -> A x`` on ``(..., n)``.
        b: ``(*, n)``, independent systems in the leading dims.
        x0, rtol, atol, callback, check_every: as in :func:`cg`.
        max_iter: limit on the total number of Arnoldi steps (applies of ``A``), default
            ``10 n``. (SciPy's ``maxiter`` counts restart cycles instead.)
        M: right preconditioner ``r -> M r ≈ A⁻¹ r``.
        restart: Krylov dimension of a cycle, default ``min(20, n)``; memory
            ``(restart + 1) · n`` per element.

    Returns:
        :class:`KrylovResult` ``(x, info)``.

    Failure modes (reported): ``BREAKDOWN`` when a full cycle makes no progress (stagnation,
    e.g. a singular ``A`` with ``b`` outside its range, or a too small ``restart``) or the
    Hessenberg matrix is singular; ``MAX_ITERATIONS``; ``NONFINITE``.

    Example:
        >>> import torch
        >>> from implicitdiff.linalg.krylov import gmres
        >>> A = torch.tensor([[3.0, 1.0], [-1.0, 2.0]], dtype=torch.float64)
        >>> x, info = gmres(A, torch.tensor([4.0, 1.0], dtype=torch.float64))
        >>> torch.allclose(x, torch.ones(2, dtype=torch.float64)), int(info.status)
        (True, 0)
    """
    prob = normalize(A, b, x0, rtol=rtol, atol=atol, max_iter=max_iter, M=M, callback=callback,
                     check_every=check_every, solver="gmres")
    n = prob.x0.shape[-1]
    restart = min(20, max(n, 1)) if restart is None else restart
    if not isinstance(restart, int) or isinstance(restart, bool) or restart < 1:
        raise InputError(f"gmres: restart must be a positive int (the Krylov dimension per cycle), got {restart!r}")
    return run(_GMRES(prob, min(restart, max(n, 1))))
