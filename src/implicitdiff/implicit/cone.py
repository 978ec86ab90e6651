r"""Gradients of a cone program's solution map — the one place they are defined.

:class:`ConeFn` solves ``min cᵀx s.t. Ax + s = b, s ∈ K`` with a forward solver it is *given*
(this package never imports ``solvers/``) and differentiates the solution map as diffcp does
(Agrawal, Barratt, Boyd, Moursi, Busseti, 2019, "Differentiating through a cone program").

Derivation.  With ``Q = [[0, Aᵀ, c], [−A, 0, b], [−cᵀ, −bᵀ, 0]]`` (skew) and
``Π = Π_{ℝⁿ × K* × ℝ₊}``, a point ``z = (u, v, w)`` with ``w > 0`` solves the homogeneous
embedding iff the residual map ``N(z) = ((Q − I) Π + I)(z / w)`` vanishes, and then
``(x, y, s) = (u, Π_{K*}(v), Π_{K*}(v) − v) / w``.  At the solution take ``w = 1``,
``u = x``, ``v = y − s``; ``Π(z) = (x, y, 1)``.  Differentiating ``N(z; Q) = 0``:

    M ż = −Q̇ (x, y, 1),   M = (Q − I) DΠ(z) + I,   DΠ(z) = diag(I, DΠ_{K*}(v), 1)

    ẋ = u̇ − x ẇ,   ẏ = DΠ_{K*} v̇ − y ẇ,   ṡ = DΠ_{K*} v̇ − v̇ − s ẇ.

Reverse mode: the cotangents ``(x̄, ȳ, s̄)`` pull back to
``ḡ = (x̄, DΠᵀ(ȳ + s̄) − s̄, −xᵀx̄ − yᵀȳ − sᵀs̄)``; one transposed solve ``r = −M⁻ᵀ ḡ`` and,
reading ``rᵀ Q̇ (x, y, 1)`` off per block,

    Ā = y r_uᵀ − r_v xᵀ,   b̄ = r_v − r_w y,   c̄ = r_u − r_w x.

``M`` is ``(n + m + 1)`` square; one batched LU serves the reverse (``adjoint=True``) and
forward (:meth:`ConeFn.jvp`) solves.  ``DΠ_{K*}`` is in :mod:`.cone_projection`, with the
convention at non-differentiable points.  Elements whose forward failed get ``M = I`` and
zero cotangents (no NaN reaches a shared input's gradient).  A singular ``M`` means the
solution is not unique (common in modelling-tool output: an auxiliary variable of an inactive
constraint, e.g. ``t`` in ``‖x‖ ≤ t ≤ 1``); the solves use a shifted LU with iterative
refinement, which converges to a solution of a consistent singular system, so every unique
part of the solution gets its exact derivative (diffcp uses LSQR for the same reason).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch.autograd.function import once_differentiable

from .._core.status import Status
from .._core.validate import is_vmapped
from ..linalg.cone_spec import ConeSpec
from .cone_projection import apply_block_diagonal, dual_projection_jacobian, project_dual

__all__ = ["ConeFn", "ConeProblem"]


def _mv(M, v):
    """``M v`` for ``M (B, p, q)``, ``v (B, q)`` (a row-vector product: much faster than ``M @ v[..., None]``)."""
    return (v[:, None, :] @ M.mT)[:, 0]


def _rmv(M, v):
    """``Mᵀ v`` for ``M (B, p, q)``, ``v (B, p)``."""
    return (v[:, None, :] @ M)[:, 0]


class ConeProblem(NamedTuple):
    """Static part of a call: the cone layout, a solver with ``solve(A, b, c, spec)`` returning
    ``(x, y, s, status, residual, iterations)`` for ``A (B, m, n)``, ``b (B, m)``, ``c (B, n)``,
    and the number of Newton refinement steps on the residual map (:func:`refine`)."""

    spec: ConeSpec
    solver: Any
    refine: int = 1


def _system(A, b, c, x, y, s, ok, spec):
    """``M`` (with ``I`` for failed elements) and ``DΠ_{K*}``."""
    B, m, n = A.shape
    N = n + m + 1
    D = dual_projection_jacobian(spec, y, s)
    # M = Q·DΠ − DΠ + I.  Q's u- and w-columns meet the identity blocks of DΠ; its v-columns are
    # (Aᵀ, 0, −bᵀ), so they become (AᵀD, I − D, −bᵀD) with D = DΠ_{K*} symmetric block-diagonal.
    DA = apply_block_diagonal(spec, D, torch.cat([A, b[..., None]], -1))
    M = A.new_zeros(B, N, N)
    M[:, :n, n:n + m] = DA[..., :n].mT
    M[:, -1, n:n + m] = -DA[..., n]
    M[:, n:n + m, n:n + m] = torch.eye(m, dtype=A.dtype, device=A.device) - D
    M[:, :n, -1] = c
    M[:, n:n + m, :n] = -A
    M[:, n:n + m, -1] = b
    M[:, -1, :n] = -c
    # M is singular: N is homogeneous of degree 0, so M z = N(z) = 0, and Mᵀℓ = 0 for ℓ = Π(z) =
    # (x, y, 1).  The null direction z changes (ẋ, ẏ, ṡ) by nothing, and every right-hand side
    # Q̇ℓ is consistent (ℓᵀQ̇ℓ = 0, Q̇ skew).  Adding ℓ e_wᵀ makes M nonsingular and picks the
    # solution with ẇ = 0 (an LU of M itself would return a huge multiple of z whose cancellation
    # in ẋ = u̇ − xẇ loses the digits).
    M[:, :, -1] += torch.cat([x, y, torch.ones_like(x[:, :1])], -1)
    eye = torch.eye(N, dtype=A.dtype, device=A.device)
    M = torch.where(ok[:, None, None], M, eye)
    return M, D


def _shifted_lu(M):
    """LU of ``M + δI``, ``δ = √eps·max|M|``: nonsingular even where ``M`` is singular (a solution
    that is not unique), and a Newton / refinement step with it differs from one with ``M`` by a
    factor ``1 + O(δ‖M⁻¹‖)``."""
    delta = torch.finfo(M.dtype).eps ** 0.5 * M.abs().amax((-2, -1)).clamp(min=1.0)
    eye = torch.eye(M.shape[-1], dtype=M.dtype, device=M.device)
    LU, piv, _ = torch.linalg.lu_factor_ex(M + delta[:, None, None] * eye)
    return LU, piv


def _solve(M, g, adjoint=False, fac=None, steps=4):
    """``M⁻¹ g`` (``M⁻ᵀ g`` with ``adjoint``) by iterative refinement with a shifted LU.

    ``fac``: the shifted LU of a nearby matrix (the last refinement step's, a Newton step away);
    where refinement with it does not converge, a fresh shifted LU of ``M``.  Where ``M`` is
    singular (a non-unique solution) and the system consistent, the iteration converges to one
    of its solutions (iterated Tikhonov), which gives the derivative of every unique part of
    the solution; an inconsistent system (a cotangent on a non-unique part) gets a bounded,
    regularized answer."""
    Mo = M.mT if adjoint else M

    def run(LU, piv):
        sol = torch.linalg.lu_solve(LU, piv, g[..., None], adjoint=adjoint)[..., 0]
        for _ in range(steps):
            res = g - _mv(Mo, sol)
            sol = sol + torch.linalg.lu_solve(LU, piv, res[..., None], adjoint=adjoint)[..., 0]
        res = g - _mv(Mo, sol)
        scale = g.abs().amax(-1) + Mo.abs().amax((-2, -1)) * sol.abs().amax(-1)
        return sol, res.abs().amax(-1) / scale.clamp(min=torch.finfo(M.dtype).tiny)

    if fac is not None and not (is_vmapped(M) or is_vmapped(g)):  # (the test below reads data)
        sol, rel = run(*fac)
        if bool((rel <= torch.finfo(M.dtype).eps ** 0.75).all()):
            return sol
    sol, _ = run(*_shifted_lu(M))
    return sol


def _residual_map(A, b, c, u, v, spec, s, y):
    """``N(z) = (Q − I)Π(z) + z`` at ``z = (u, v, 1)``, with ``Π_{K*}(v)`` (``(s, y)``: a nearby
    solution pair, the start of the exponential cone's projection)."""
    yv = project_dual(spec, v, s, y)
    qx = _rmv(A, yv) + c
    qy = -_mv(A, u) + b
    qt = -(c * u).sum(-1) - (b * yv).sum(-1)
    # (Q − I)Π(z) + z: the u- and w-parts of Π(z) are u and 1
    return torch.cat([qx, qy - yv + v, qt[:, None]], -1), yv


def refine(A, b, c, x, y, s, ok, spec, steps):
    """Newton steps on the residual map, ``z ← z − M⁻¹N(z)`` (Busseti, Moursi, Boyd 2019,
    "Solution refinement at regular points of conic problems"), for the elements ``ok``.

    An interior point stops at a small duality gap, but on a curved cone (second-order, PSD) the
    gap is quadratic in the distance along the cone's boundary: its ``x`` is only about ``√gap``
    accurate.  Newton on ``N`` converges quadratically at a regular solution; a step is kept only
    where it decreases ``‖N‖``.  Returns the refined ``(x, y, s)`` and the last step's LU of
    ``M`` (``(None, None)`` without steps), which the derivative reuses.
    """
    n = x.shape[-1]
    u, v = x.clone(), y - s
    res, yv = _residual_map(A, b, c, u, v, spec, s, y)
    nrm = res.abs().amax(-1)
    LU = piv = None
    for _ in range(steps):
        M, _ = _system(A, b, c, u, yv, yv - v, ok, spec)
        LU, piv = _shifted_lu(M)
        dz = torch.linalg.lu_solve(LU, piv, res[..., None])[..., 0]
        un, vn = u - dz[:, :n], v - dz[:, n:-1]
        wn = 1 - dz[:, -1:]
        un, vn = un / wn, vn / wn
        rn, yn = _residual_map(A, b, c, un, vn, spec, yv - v, yv)
        nn = rn.abs().amax(-1)
        better = (ok & (nn < nrm) & torch.isfinite(nn))[:, None]
        u, v, yv = (torch.where(better, a, b_) for a, b_ in ((un, u), (vn, v), (yn, yv)))
        res = torch.where(better, rn, res)
        nrm = torch.where(better[:, 0], nn, nrm)
    okc = ok[:, None]
    return (torch.where(okc, u, x), torch.where(okc, yv, y), torch.where(okc, yv - v, s)), (LU, piv)


def unfold_lu(t, V):
    return t.reshape((V, t.shape[0] // V) + t.shape[1:])


class ConeFn(torch.autograd.Function):
    """``(x, y, s, status, residual, iterations, LU, pivots) = ConeFn.apply(A, b, c, problem)``.

    ``A (B, m, n)``, ``b (B, m)``, ``c (B, n)`` batched (the caller expands shared inputs, so
    autograd sums their gradients); outputs ``x (B, n)``, ``y, s (B, m)`` differentiable.
    """

    @staticmethod
    def forward(A, b, c, problem):
        x, y, s, status, residual, iters = problem.solver.solve(A, b, c, problem.spec)
        LU = piv = None
        if problem.refine:
            (x, y, s), (LU, piv) = refine(A, b, c, x, y, s, status == Status.SUCCESS, problem.spec,
                                          problem.refine)
        if LU is None:  # no refinement: the derivative factorizes its own M
            LU, piv = A.new_zeros(0), torch.zeros(0, dtype=torch.int32, device=A.device)
        return x, y, s, status, residual, iters, LU, piv

    @staticmethod
    def setup_context(ctx, inputs, output):
        A, b, c, problem = inputs
        x, y, s, status, residual, iters, LU, piv = output
        ctx.mark_non_differentiable(status, residual, iters, LU, piv)
        ctx.set_materialize_grads(False)
        ctx.spec = problem.spec
        ctx.save_for_backward(A, b, c, x, y, s, status, LU, piv)
        ctx.save_for_forward(A, b, c, x, y, s, status, LU, piv)

    @staticmethod
    def vmap(info, in_dims, A, b, c, problem):
        # the function is batched already: fold the vmapped dim into the batch, solve, unfold
        V = info.batch_size
        flat = []
        for t, d in zip((A, b, c), in_dims[:3]):
            t = t.unsqueeze(0).expand((V,) + t.shape) if d is None else t.movedim(d, 0)
            flat.append(t.reshape((-1,) + t.shape[2:]))
        out = ConeFn.apply(*flat, problem)
        unfold = [t.reshape((V, t.shape[0] // V) + t.shape[1:]) for t in out[:6]]
        LU, piv = out[6:]
        if LU.numel():
            return tuple(unfold) + (unfold_lu(LU, V), unfold_lu(piv, V)), (0,) * 8
        return tuple(unfold) + (LU, piv), (0,) * 6 + (None, None)

    @staticmethod
    def _unpack(ctx):
        A, b, c, x, y, s, status, LU, piv = ctx.saved_tensors
        ok = status == Status.SUCCESS
        z = torch.zeros_like
        x, y, s = (torch.where(ok[:, None], t, z(t)) for t in (x, y, s))
        M, D = _system(A, b, c, x, y, s, ok, ctx.spec)
        fac = (LU, piv) if LU.numel() else None
        return A, b, c, x, y, s, ok, M, D, fac

    @staticmethod
    @once_differentiable
    def backward(ctx, gx, gy, gs, *_):
        A, b, c, x, y, s, ok, M, D, fac = ConeFn._unpack(ctx)
        B, m, n = A.shape
        gx = torch.zeros_like(x) if gx is None else gx
        gy = torch.zeros_like(y) if gy is None else gy
        gs = torch.zeros_like(s) if gs is None else gs
        okc = ok[:, None]
        gx, gy, gs = (torch.where(okc, t, torch.zeros_like(t)) for t in (gx, gy, gs))
        gv = apply_block_diagonal(ctx.spec, D, (gy + gs)[..., None])[..., 0] - gs  # D symmetric
        gw = -(x * gx).sum(-1) - (y * gy).sum(-1) - (s * gs).sum(-1)
        g = torch.cat([gx, gv, gw[:, None]], -1)
        r = -_solve(M, g, adjoint=True, fac=fac)
        ru, rv, rw = r[:, :n], r[:, n:n + m], r[:, -1:]
        gA = y[:, :, None] * ru[:, None, :] - rv[:, :, None] * x[:, None, :]
        gb = rv - rw * y
        gc = ru - rw * x
        return gA, gb, gc, None

    @staticmethod
    def jvp(ctx, dA, db, dc, _):
        A, b, c, x, y, s, ok, M, D, fac = ConeFn._unpack(ctx)
        B, m, n = A.shape
        dA = torch.zeros_like(A) if dA is None else dA
        db = torch.zeros_like(b) if db is None else db
        dc = torch.zeros_like(c) if dc is None else dc
        g = torch.cat([_rmv(dA, y) + dc,
                       -_mv(dA, x) + db,
                       (-(dc * x).sum(-1) - (db * y).sum(-1))[:, None]], -1)
        g = torch.where(ok[:, None], g, torch.zeros_like(g))
        dz = -_solve(M, g, fac=fac)
        du, dv, dw = dz[:, :n], dz[:, n:n + m], dz[:, -1:]
        Ddv = apply_block_diagonal(ctx.spec, D, dv[..., None])[..., 0]
        dx = du - x * dw
        dy = Ddv - y * dw
        ds = Ddv - dv - s * dw
        return dx, dy, ds, None, None, None, None, None
