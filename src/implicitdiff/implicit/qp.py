r"""Gradients of a batched QP solution — the one place they are defined.

:class:`QPFn` solves ``z* = argmin ½ zᵀQz + pᵀz  s.t.  Gz ≤ h, Az = b`` with a forward
solver it is *given* (``spec.solver``; this package never imports ``solvers/``) and
differentiates the KKT conditions at the solution.

Derivation.  With the active set 𝒜 (``M = diag(1_𝒜)``, ``E = I − M``) the solution and its
multipliers solve, locally, the equality-constrained KKT system

    K x = r:   [ Q    (MG)ᵀ  Aᵀ ] [z]   [ −p ]
               [ MG   −E     0  ] [λ] = [ Mh ]          (inactive rows: λᵢ = 0)
               [ A    0      0  ] [ν]   [  b ]

``K`` is symmetric, so for cotangents ``x̄ = (z̄, λ̄, ν̄)`` one solve ``K u = x̄`` gives
``r̄ = u`` and ``K̄ = −u xᵀ``; reading off the blocks (``Q`` enters only through its
symmetric part)::

    p̄ = −u_z     h̄ = M u_λ     b̄ = u_ν
    Q̄ = −½ (u_z zᵀ + z u_zᵀ)
    Ḡ = −M (u_λ zᵀ + λ u_zᵀ)
    Ā = −(u_ν zᵀ + ν u_zᵀ)

and forward mode solves ``K ẋ = ṙ − K̇ x``.  This is OptNet's differential (Amos & Kolter,
2017, eq. 8) taken at the limit of the interior point, where the complementarity rows
``λᵢ(Gz − h)ᵢ = 0`` become exactly "``Gᵢz = hᵢ``" or "``λᵢ = 0``": the gradient is exact
instead of blended by a residual ``s/λ``.  A weakly active constraint (``λᵢ = 0 = sᵢ``)
counts as inactive: the gradient is then the one-sided derivative for perturbations that
relax it (the derivative does not exist there).

``K u = x̄`` is solved by :meth:`~implicitdiff.linalg.kkt.ActiveSetKKT.solve`: iterative
refinement with the forward solver's final factorization of the *regularized* ``K`` (``δ`` on
the diagonal), so a backward costs triangular solves and a few products, never a
factorization.  The refined residual is checked: a system ``K u = x̄`` with no solution raises
``SINGULAR`` (a non-unique solution ``z``, e.g. a degenerate LP).

Dependent active constraints (a row repeated; three constraints active at a vertex in 2-D) make
``K`` singular with a *consistent* reverse system: its null space is ``(0, w, 0)`` with
``G_𝒜ᵀ w_G + Aᵀ w_A = 0``, orthogonal to ``x̄ = (z̄, 0, 0)``.  ``z`` is unique but has a kink in
``h`` (and ``G``, ``b``, ``A``) there.  The factorization regularizes every active row alike
(``−δ``, the polish's ``winv = 1/δ``), so each refinement step's multiplier part is
``(G_𝒜 x − r₂)/δ``, in the row space of the active constraints when ``r₂`` is: it returns the one solution
whose multiplier part ``u_λ, u_ν`` lies there, the minimum-norm one (of the row-equilibrated
problem): ``u_z`` is unique, so ``p̄`` and ``Q̄`` are exact; ``h̄ = M u_λ``, ``b̄ = u_ν`` are an
element of the generalized (Clarke) gradient (``k`` copies of a row get ``1/k`` each); ``Ḡ, Ā``
multiply it with the forward's multipliers, also not unique there.  This is documented in
``docs/qp.md``.  Forward mode and a cotangent on ``λ, ν`` see the null space: a tangent that moves
dependent constraints apart, or a cotangent not orthogonal to ``(0, w, 0)``, leaves ``K x = r``
without a solution and raises ``SINGULAR``.

The contract with the forward solver is a type: its result carries the
:class:`~implicitdiff.linalg.kkt.ActiveSetKKT` at the solution (``result.kkt``), which this
module flattens into the autograd Function's outputs and rebuilds in the backward.

Scaling.  :class:`QPFn` takes the layer's equilibration scales (``σ_Q``, ``σ``, ``d_G``, ``d_A``, constants)
with the raw data and solves ``(Q/σ_Q, p/σ, D_G⁻¹G, D_G⁻¹h, D_A⁻¹A, D_A⁻¹b)``: the same ``z``, multipliers
``λ = σλ'/d_G``, ``ν = σν'/d_A``.  The system above is that of the scaled problem, and the chain rule
through the scaling is folded into the gradients' products (``Q̄ = Q̄'/σ_Q`` is the ``−½/σ_Q`` of one
bmm, ``Ḡ = D_G⁻¹Ḡ'`` scales its left factor): no division of a gradient matrix, and no autograd node
per scaled tensor (each would read and write a batch of matrices again).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch

from .._core.errors import SolveError
from .._core.status import Status
from .._core.validate import is_vmapped
from ..linalg.kkt import ActiveSetKKT

__all__ = ["QPSpec", "QPFn", "qp_solve"]

_CORE = (2, 1, 2, 1, 2, 1, 1, 1, 1, 0, 0, 1, 1)  # core dims of Q, p, G, h, A, b, z0, λ0, ν0, σ_Q, σ, d_G, d_A
_N_OUT = 7  # z, λ, ν, status, residual, iterations, the static part of the ActiveSetKKT — then the scaled
# Q, G, A and the ActiveSetKKT's tensors


class QPSpec(NamedTuple):
    """Static options of :class:`QPFn`.

    ``solver``: a forward solver, ``solver.solve(Q, p, G, h, A, b, warm_start)`` returning a result
    with ``z, lam, nu, status, residual, iterations`` (per element, flattened batch) and ``kkt``,
    an :class:`~implicitdiff.linalg.kkt.ActiveSetKKT` (the backward's only input from it).
    ``dtype``: the dtype the solve and its gradients run in (float64 for float32 inputs).
    ``backward_rtol``: the relative residual a backward solve must reach (default ``1e-6``)."""

    solver: Any
    dtype: torch.dtype = torch.float64
    backward_rtol: Optional[float] = None


def _flat(t, core, batch, B):
    """``t`` (``(*b, *core)``, ``b`` broadcastable to ``batch``) as ``(B, *core)`` or ``(1, *core)``."""
    lead = t.shape[: t.dim() - core]
    if all(d == 1 for d in lead):
        return t.reshape((1,) + t.shape[t.dim() - core:])
    return t.expand(batch + t.shape[t.dim() - core:]).reshape((B,) + t.shape[t.dim() - core:])


def _flat_scales(scales, batch, B, dt):
    """The scales ``(σ_Q, σ, d_G, d_A)`` flattened like the data: ``(B|1,)``, ``(B|1,)``, ``(B|1, m)``, ``(B|1, k)``."""
    return tuple(_flat(t, c, batch, B).to(dt) for t, c in zip(scales, _CORE[9:]))


def _mv(M, x):
    return (x.unsqueeze(-2) @ M.mT).squeeze(-2)


def _rmv(M, y):
    return (y.unsqueeze(-2) @ M).squeeze(-2)


def _check_backward(relres, ok, spec, grad_like):
    """Backward solves check their residual: raise (or NaN under vmap) on a singular ``K``."""
    tol = spec.backward_rtol if spec.backward_rtol is not None else 1e-6
    bad = ok & ~(relres <= tol)
    if is_vmapped(grad_like) or is_vmapped(relres):
        return bad
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0, 0])
        raise SolveError(
            f"qp backward failed in {int(bad.sum())} of {bad.numel()} batch elements (first: flat index {i}): "
            f"the active-set KKT system is singular (relative residual {float(relres[i]):.3e}), so the QP "
            "solution is not unique or the active constraints are linearly dependent and the gradient is "
            "undefined. Add a small ridge to Q (Q + εI) or remove redundant constraints.",
            status=Status.SINGULAR, residual=float(relres[i]))
    return bad


class QPFn(torch.autograd.Function):
    """``(z, λ, ν, status, residual, iterations, static, Q', G', A', *kkt_tensors) = QPFn.apply(spec, Q, p,
    G, h, A, b, z0, λ0, ν0, σ_Q, σ, d_G, d_A)``.

    Shapes ``Q (*, n, n)``, ``p (*, n)``, ``G (*, m, n)``, ``h (*, m)``, ``A (*, k, n)``,
    ``b (*, k)`` (``m``/``k`` may be 0), leading dims broadcast; warm starts may be ``None``; the
    scales (see the module docstring, constants) ``σ_Q (*)``, ``σ (*)``, ``d_G (*, m)``, ``d_A (*, k)``.
    ``z, λ, ν`` are ``(*batch, ·)`` and differentiable; the rest is not.  The scaled ``Q', G', A'`` and
    the factor tensors are flattened to ``(B, …)`` (``(1, …)`` when shared) for the backward.
    """

    @staticmethod
    def forward(spec, Q, p, G, h, A, b, z0, l0, n0, sq, sg, dG, dA):
        ins = (Q, p, G, h, A, b)
        batch = torch.broadcast_shapes(*(t.shape[: t.dim() - c] for t, c in zip(ins, _CORE)))
        B = 1
        for d in batch:
            B *= d
        dt = spec.dtype
        Qf, pf, Gf, hf, Af, bf = (_flat(t, c, batch, B).to(dt) for t, c in zip(ins, _CORE))
        sq, sg, dG, dA = _flat_scales((sq, sg, dG, dA), batch, B, dt)
        Qs, Gs, As = Qf / sq[:, None, None], Gf / dG.unsqueeze(-1), Af / dA.unsqueeze(-1)
        warm = None
        if z0 is not None:
            z0, l0, n0 = (None if t is None else _flat(t, 1, batch, B).to(dt) for t in (z0, l0, n0))
            warm = (z0, None if l0 is None else l0 * dG / sg[:, None], None if n0 is None else n0 * dA / sg[:, None])
        r = spec.solver.solve(Qs, pf / sg[:, None], Gs, hf / dG, As, bf / dA, warm)
        static, tensors = r.kkt.flatten()
        out_dt = p.dtype

        def out(t):
            return t.reshape(batch + t.shape[1:]).to(out_dt if t.is_floating_point() else t.dtype)

        lam, nu = r.lam * (sg[:, None] / dG), r.nu * (sg[:, None] / dA)
        return (out(r.z), out(lam), out(nu), out(r.status), out(r.residual), out(r.iterations),
                static, Qs, Gs, As) + tensors

    @staticmethod
    def setup_context(ctx, inputs, output):
        spec, Q, p, G, h, A, b = inputs[:7]
        scales = inputs[10:]
        z, lam, nu, status, residual, iters, static, *tensors = output
        ctx.mark_non_differentiable(status, residual, iters, *tensors)
        ctx.set_materialize_grads(False)  # no zero cotangents for the (large) factor outputs
        ctx.spec, ctx.static, ctx.nf = spec, static, len(tensors)
        ctx.shapes = tuple(t.shape for t in (Q, p, G, h, A, b))
        ctx.in_dtype = p.dtype
        ctx.save_for_backward(Q, G, A, *scales, z, lam, nu, status, *tensors)
        ctx.save_for_forward(Q, G, A, *scales, z, lam, nu, status, *tensors)

    @staticmethod
    def _unpack(ctx):
        """The scaled problem's ``Q', G', A'``, ``z``, ``λ'``, ``ν'``, the status, factor and flat scales."""
        Q, G, A, sq, sg, dG, dA, z, lam, nu, status, Qs, Gs, As, *tensors = ctx.saved_tensors
        batch = z.shape[:-1]
        B = z[..., 0].numel()
        dt = ctx.spec.dtype
        sq, sg, dG, dA = _flat_scales((sq, sg, dG, dA), batch, B, dt)
        if torch.is_grad_enabled():  # create_graph: the scaled matrices as a function of the inputs
            Qs, Gs, As = (_flat(t, 2, batch, B).to(dt) / s for t, s in
                          zip((Q, G, A), (sq[:, None, None], dG.unsqueeze(-1), dA.unsqueeze(-1))))
        zf, lf, nf = (t.reshape(B, t.shape[-1]).to(dt) for t in (z, lam, nu))
        lf, nf = lf * (dG / sg[:, None]), nf * (dA / sg[:, None])
        ok = (status.reshape(B) == Status.SUCCESS)
        kkt = ActiveSetKKT.unflatten(ctx.static, tensors)
        return Qs, Gs, As, zf, lf, nf, ok, kkt, batch, B, (sq, sg, dG, dA)

    @staticmethod
    def backward(ctx, gz, gl, gn, *_):
        Qf, Gf, Af, zf, lf, nf, ok, kkt, batch, B, (sq, sg, dG, dA) = QPFn._unpack(ctx)
        act = kkt.active
        dt = ctx.spec.dtype
        okc = ok.unsqueeze(-1)
        rhs = []
        # the cotangents of the scaled problem's λ' = λ d_G/σ and ν' = ν d_A/σ
        for g, like, s in ((gz, zf, None), (gl, lf, dG), (gn, nf, dA)):
            g = torch.zeros_like(like) if g is None else g.reshape(B, like.shape[-1]).to(dt)
            g = g if s is None else g * (sg[:, None] / s)
            rhs.append(torch.where(okc, g, torch.zeros_like(g)))  # failed elements: no gradient, no NaN
        (uz, ul, un), relres = kkt.solve(Qf, Gf, Af, rhs)
        bad = _check_backward(relres, ok, ctx.spec, rhs[0])
        keep = (okc & ~bad.unsqueeze(-1))
        uz, ul, un = (torch.where(keep, u, torch.zeros_like(u)) for u in (uz, ul, un))
        zs, ls, ns = (torch.where(keep, t, torch.zeros_like(t)) for t in (zf, lf, nf))
        # a singular K under vmap (no raise there): NaN gradients for those elements
        vmapped = is_vmapped(rhs[0]) or is_vmapped(relres)
        nan = torch.where(bad, float("nan"), 0.0).to(dt) if vmapped else None

        def outer2(a, b, c, d, alpha):
            """``alpha (a bᵀ + c dᵀ)`` as one bmm, ``(B, r) (B, c)`` -> ``(B, r, c)`` (one pass over the result)."""
            out = torch.bmm(torch.stack([a, c], -1).mul_(alpha), torch.stack([b, d], -2))
            return out if nan is None else out + nan[:, None, None]

        def vec(v):
            return v if nan is None else v + nan[:, None]

        # the scaled problem's gradients, mapped to the inputs' by the chain rule through the scaling
        sG, sA = act / dG, 1 / dA
        grads = (
            lambda: outer2(uz, zs, zs, uz, (-0.5 / sq)[:, None, None]),
            lambda: vec(-uz / sg[:, None]),
            lambda: outer2(sG * ul, zs, sG * ls, uz, -1.0),
            lambda: vec(sG * ul),
            lambda: outer2(sA * un, zs, sA * ns, uz, -1.0),
            lambda: vec(sA * un),
        )
        res = []
        for g, shape, need in zip(grads, ctx.shapes, ctx.needs_input_grad[1:7]):
            if not need:
                res.append(None)
                continue
            g = g()
            g = g.reshape(batch + g.shape[1:]).to(ctx.in_dtype)
            res.append(g.sum_to_size(shape))
        return (None, *res) + (None,) * 7

    @staticmethod
    def jvp(ctx, _spec, dQ, dp, dG, dh, dA, db, *_warm_and_scales):
        Qf, Gf, Af, zf, lf, nf, ok, kkt, batch, B, (sq, sg, sG, sA) = QPFn._unpack(ctx)  # sG, sA: d_G, d_A
        act = kkt.active
        dt = ctx.spec.dtype
        n, m, k = zf.shape[-1], lf.shape[-1], nf.shape[-1]

        def flat(t, c, scale):
            """The tangent of a scaled parameter: the input's, flattened and divided by its scale."""
            if t is None:
                return None
            return (_flat(t, c, batch, B).to(dt) / scale).expand((B,) + t.shape[t.dim() - c:])

        dQ, dG, dA = flat(dQ, 2, sq[:, None, None]), flat(dG, 2, sG.unsqueeze(-1)), flat(dA, 2, sA.unsqueeze(-1))
        dp, dh, db = flat(dp, 1, sg[:, None]), flat(dh, 1, sG), flat(db, 1, sA)
        # ṙ − K̇ x
        r1 = -dp if dp is not None else zf.new_zeros(B, n)
        r2 = act * dh if dh is not None else lf.new_zeros(B, m)
        r3 = db.clone() if db is not None else nf.new_zeros(B, k)
        if dQ is not None:
            r1 = r1 - 0.5 * (_mv(dQ, zf) + _rmv(dQ, zf))
        if dG is not None:
            r1 = r1 - _rmv(dG, act * lf)
            r2 = r2 - act * _mv(dG, zf)
        if dA is not None:
            r1 = r1 - _rmv(dA, nf)
            r3 = r3 - _mv(dA, zf)
        okc = ok.unsqueeze(-1)
        r = [torch.where(okc, t, torch.zeros_like(t)) for t in (r1, r2, r3)]
        (dz, dl, dn), relres = kkt.solve(Qf, Gf, Af, r)
        bad = _check_backward(relres, ok, ctx.spec, r1)
        keep = okc & ~bad.unsqueeze(-1)
        dl, dn = dl * (sg[:, None] / sG), dn * (sg[:, None] / sA)  # λ = σλ'/d_G, ν = σν'/d_A
        outs = []
        for t, like in ((dz, ctx.saved_tensors[7]), (dl, ctx.saved_tensors[8]), (dn, ctx.saved_tensors[9])):
            t = torch.where(keep, t, torch.full_like(t, float("nan")))
            outs.append(t.reshape(like.shape).to(like.dtype))
        return (*outs, None, None, None, None) + (None,) * ctx.nf

    @staticmethod
    def vmap(info, in_dims, spec, Q, p, G, h, A, b, z0, l0, n0, sq, sg, dG, dA):
        ins = (Q, p, G, h, A, b, z0, l0, n0, sq, sg, dG, dA)
        dims = in_dims[1:]
        logical = [None if t is None else t.dim() - c - (d is not None) for t, c, d in zip(ins, _CORE, dims)]
        L = max(x for x in logical if x is not None)
        moved = []
        for t, d, lg in zip(ins, dims, logical):
            if t is None or d is None:
                moved.append(t)
                continue
            t = t.movedim(d, 0)
            moved.append(t.reshape(t.shape[:1] + (1,) * (L - lg) + t.shape[1:]))
        out = QPFn.apply(spec, *moved)
        V = info.batch_size
        Bi = out[0][..., 0].numel()
        factors = []
        fdims = []
        for f in out[_N_OUT:]:
            if f.dim() and f.shape[0] == Bi:
                factors.append(f.reshape((V, Bi // V) + f.shape[1:]))
                fdims.append(0)
            else:
                factors.append(f)
                fdims.append(None)
        return tuple(out[:_N_OUT]) + tuple(factors), (0, 0, 0, 0, 0, 0, None) + tuple(fdims)


def qp_solve(spec: QPSpec, Q, p, G, h, A, b, warm, scales):
    """Differentiable ``(z, λ, ν)`` plus ``(status, residual, iterations)`` of a batch of QPs, solved scaled by
    ``scales = (σ_Q, σ, d_G, d_A)`` (constants; see the module docstring)."""
    z, lam, nu, status, residual, iters, *_ = QPFn.apply(spec, Q, p, G, h, A, b, *warm, *scales)
    return z, lam, nu, status, residual, iters
