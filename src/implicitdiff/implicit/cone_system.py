r"""A structured factorization of the derivative matrix of a cone program's residual map.

:mod:`.cone` needs solves with (and the transpose of) the ``(n + m + 1)`` square matrix

    M = [[0, AᵀD, c + x], [−A, I − D, b + y], [−cᵀ, −bᵀD, 1]]

(the residual map's derivative with ``ℓ = (x, y, 1)`` added to its last column, which makes it
nonsingular and picks the solution with ``ẇ = 0``; see :mod:`.cone`), ``D = DΠ_{K*}(y − s)``.
A dense LU costs ``(n + m + 1)³``.  This module solves it in ``O(m·n² + (n + p)³)`` instead:

1. **Frame.**  ``D = U diag(λ) Uᵀ`` (:mod:`.cone_frame`, ``U`` block-diagonal orthogonal,
   ``0 ≤ λ ≤ 1``).  With ``T = diag(I, U, 1)``, ``Tᵀ M T`` is ``M`` with ``A → Ã = UᵀA``,
   ``b → b̃ = Uᵀb``, ``y → ỹ = Uᵀy``, ``D → diag(λ)``: one scalar per row, like an LP.
2. **Elimination.**  Rows with ``λᵢ < 1 − τ`` ("eliminated", ``E``) have ``1 − λᵢ > τ``: their
   equation ``(1 − λᵢ) ṽᵢ − ãᵢᵀu = gᵢ`` gives ``ṽᵢ``, and they enter the first block row as
   ``ÃᵀW Ã`` with ``W = diag(λ/(1 − λ))`` on ``E`` (``0 ≤ W ≤ (1 − τ)/τ``).  The ``p`` rows with
   ``λᵢ ≥ 1 − τ`` ("kept", ``K``: equalities, active rows, the boundary ray of a second-order
   cone, the range of a PSD dual…) stay unknowns.  The ``(n + p)`` system

       [[ÃᵀWÃ, Ã_Kᵀ diag(λ_K)], [−Ã_K, diag(1 − λ_K)]]

   is the ``(n + m)`` leading block of ``Tᵀ M T`` with ``E`` eliminated — exactly, for any ``τ``
   (``τ`` only trades the size ``p`` against the weights; ``τ = 10⁻³``).  Its transpose gives the
   adjoint solves with the same LU.  ``p`` differs per batch element: every element is padded to
   the largest ``p`` with decoupled identity rows.
3. **Border.**  The last row and column (rank 2) by block elimination: two right-hand sides.
4. **Shift and refinement.**  The LU is of the ``(n + p)`` matrix plus ``δI`` (``δ = √eps·max``),
   nonsingular where ``M`` is singular (a solution that is not unique, e.g. an auxiliary
   variable of an inactive constraint); iterative refinement against the exact ``M`` (a
   structured mat-vec, ``O(m·n)``) then converges to the exact solution of a nonsingular
   system, and to a solution of a consistent singular one (iterated Tikhonov), which gives the
   exact derivative of every unique part.  Elements where refinement does not converge are
   solved again with a dense shifted LU of ``M`` (a safety net; counted in ``fallbacks``).  If
   that leaves a residual above ``SINGULAR_RTOL·‖g‖`` the system is singular *and inconsistent*
   (the derivative asked for does not exist: the solution is not unique along it); such elements
   are marked in ``singular`` (with the relative residual in ``relres``) for the caller to report.

Elements that are not ``ok`` get zero solutions.

Speed (each in one function, named there): the **shared-A second-order Gram** (:func:`_gram`);
**zero-weight rows skipped** in ``ÃᵀWÃ`` (:func:`_weighted_gram`: canonical programs have many, e.g.
an exponential cone's normal directions); the reduced matrix **filled block by block** with its shift
added on the diagonal in place and ``max|K|`` read from its blocks (:class:`_Factor`: a full-size
temporary of ``K`` costs about as much as the Gram); ``max|·|`` as ``max(max, −min)`` (:func:`~implicitdiff.linalg.kkt.absmax`);
the **LU of the transpose in place** (:func:`_shifted_lu`): a row-major ``K`` read column-major is
``Kᵀ``, which LAPACK factors where it lies (``out=`` itself), skipping the column-major copy of
``K`` (docs/benchmarks.md); solves use it with ``adjoint`` flipped
(:class:`~implicitdiff.linalg.lu.LUTransposed`; partial pivoting on ``Kᵀ``, as stable).
"""

from __future__ import annotations

import torch

from .._core.validate import is_vmapped
from ..linalg.cone_spec import ConeSpec
from ..linalg.kkt import absmax
from ..linalg.lu import LUTransposed
from .cone_frame import dual_projection_frame, from_frame, to_frame
from .cone_projection import apply_block_diagonal, dual_projection_jacobian

__all__ = ["ConeSystem", "dense_system"]

TAU = 1e-3  # rows with λ ≥ 1 − τ stay unknowns of the reduced system (see the module docstring)
SINGULAR_RTOL = 1e-6  # a fallback solve left with ‖g − Mz‖ > this·‖g‖: inconsistent (module docstring)


def _mv(M, v):
    """``M v`` for ``M (B, p, q)`` or a shared ``(p, q)`` (one matmul), ``v (B, q)`` (a row-vector product:
    much faster than ``M @ v[..., None]``)."""
    return v @ M.mT if M.dim() == 2 else (v[:, None, :] @ M.mT)[:, 0]


def _rmv(M, v):
    """``Mᵀ v`` for ``M (B, p, q)`` or a shared ``(p, q)``, ``v (B, p)``."""
    return v @ M if M.dim() == 2 else (v[:, None, :] @ M)[:, 0]


def dense_system(A, b, c, x, y, s, ok, spec):
    """The dense ``M`` above (``I`` for elements that are not ``ok``), for checks and the fallback."""
    B, m, n = A.shape
    N = n + m + 1
    D = dual_projection_jacobian(spec, y, s)
    DA = apply_block_diagonal(spec, D, torch.cat([A, b[..., None]], -1))
    M = A.new_zeros(B, N, N)
    M[:, :n, n:n + m] = DA[..., :n].mT
    M[:, -1, n:n + m] = -DA[..., n]
    M[:, n:n + m, n:n + m] = torch.eye(m, dtype=A.dtype, device=A.device) - D
    M[:, :n, -1] = c + x
    M[:, n:n + m, :n] = -A
    M[:, n:n + m, -1] = b + y
    M[:, -1, :n] = -c
    M[:, -1, -1] = 1.0
    eye = torch.eye(N, dtype=A.dtype, device=A.device)
    return torch.where(ok[:, None, None], M, eye)


def _shifted_lu(K, kmax):
    """LU of ``(K + δI)ᵀ``, ``δ = √eps·max(kmax, 1)`` for ``kmax = max|K|`` per element, for
    :class:`~implicitdiff.linalg.lu.LUTransposed` (``K`` is overwritten: the factor of the transpose is
    computed in its memory, module doc; a ``K`` that requires grad or is vmapped is copied — defensive,
    as :func:`~implicitdiff.linalg.kkt.cholesky_lower_`: the derivative's ``K`` is neither today)."""
    delta = torch.finfo(K.dtype).eps ** 0.5 * kmax.clamp(min=1.0)
    K.diagonal(dim1=-2, dim2=-1).add_(delta[:, None])
    Kt = K.mT
    if not K.is_contiguous() or K.requires_grad or is_vmapped(K):
        LU, piv, _ = torch.linalg.lu_factor_ex(Kt)
        return LU, piv
    piv = torch.empty(K.shape[:-1], dtype=torch.int32, device=K.device)
    torch.linalg.lu_factor_ex(Kt, out=(Kt, piv, torch.empty(K.shape[:-2], dtype=torch.int32, device=K.device)))
    return Kt, piv


def _gram(A, At, W, frame):
    """``ÃᵀWÃ`` (``B·m·n²``).  **Shared-A second-order Gram**: for a shared ``A (m, n)`` each
    second-order block's share is formed from a Gram matrix of ``A`` computed once for the batch.
    In the frame a block's rows are ``e₁`` (``λ = 1``: kept, ``W = 0``), ``e₀`` (``λ = 0``, ``W = 0``)
    and the ``k − 2`` rows ``(0, w)``, ``w ⟂ x̂``, all with one weight ``ω`` (and ``ω = 0`` inside
    ``K*`` or its polar), so with ``A_x`` the block's rows ``1…`` and ``p = A_xᵀx̂``:

        Σ_block Wᵢ ãᵢãᵢᵀ = ω A_xᵀ(I − x̂x̂ᵀ)A_x = ω (A_xᵀA_x − p pᵀ),

    ``A_xᵀA_x`` once, then ``n²`` per element and block instead of ``k·n²``.  Rounding: an
    absolute ``eps·ω‖A_x‖²``, the size of the direct form's; the factorization is a preconditioner
    refined against the exact ``M`` (:class:`ConeSystem`)."""
    B, m, n = At.shape
    soc = [(idx, data) for kind, k, idx, data in frame.parts if kind == "q" and data is not None and k > 2]
    if A.dim() != 2 or not soc:
        return _weighted_gram(At, W)
    rest = torch.ones(m, dtype=torch.bool, device=A.device)
    G = A.new_zeros(B, n, n)
    for idx, (xh, _) in soc:
        nb = idx.shape[0]
        rest[idx.reshape(-1)] = False
        Ax = A[idx[:, 1:]]                                           # (nb, k − 1, n), shared
        P0 = Ax.mT @ Ax                                              # once for the batch
        p = (xh.transpose(0, 1) @ Ax).transpose(0, 1)                # (B, nb, n)
        om = W[:, idx[:, 2]]                                         # (B, nb): the ⟂ rows' weight
        G = torch.addmm(G.reshape(B, n * n), om, P0.reshape(nb, n * n)).reshape(B, n, n)
        U = p * om.sqrt()[..., None]
        G = torch.baddbmm(G, U.mT, U, alpha=-1)
    r = rest.nonzero()[:, 0]
    return _weighted_gram(At[:, r], W[:, r], G)


def _weighted_gram(At, W, G=None):
    """``G + Σᵢ Wᵢ ãᵢãᵢᵀ`` over the rows of ``At (B, r, n)``, ``W (B, r) ≥ 0``.  **Zero-weight rows
    skipped**: rows with ``Wᵢ = 0`` (kept rows and ``λ = 0``: every nonnegative row, two of three per
    exponential cone) add nothing; when at most half the rows are left they are gathered (padded to
    the batch's largest count with rows of weight 0) and the product runs on them only."""
    nz = W > 0
    q = int(nz.sum(-1).max()) if W.numel() else 0
    if 2 * q <= W.shape[-1]:
        rows = torch.sort((~nz).to(torch.int8), dim=-1, stable=True).indices[:, :q]
        At, W = At.gather(1, rows[..., None].expand(-1, -1, At.shape[-1])), W.gather(1, rows)
    WA = W[..., None] * At
    return At.mT @ WA if G is None else torch.baddbmm(G, At.mT, WA)


class _Factor:
    """The shifted reduced LU of ``M`` at one point, in that point's frame (the preconditioner)."""

    def __init__(self, A, b, c, x, y, frame, ok):
        B, (m, n) = b.shape[0], A.shape[-2:]
        self.n, self.frame = n, frame
        lam = frame.lam
        self.lam = lam
        At = to_frame(frame, A.expand(B, m, n))  # per element even for a shared A (the frame is)
        self.At = At
        bt = to_frame(frame, b)
        kept = lam >= 1 - TAU
        self.kept = kept
        one_m = (1 - lam).clamp(min=TAU)
        self.W = torch.where(kept, torch.zeros_like(lam), lam / one_m)
        self.R = torch.where(kept, torch.zeros_like(lam), 1 / one_m)
        count = kept.sum(-1)
        P = int(count.max()) if B else 0
        order = torch.sort((~kept).to(torch.int8), dim=-1, stable=True).indices[:, :P]
        valid = torch.arange(P, device=A.device) < count[:, None]
        self.idx, self.valid, self.P = order, valid, P
        AK = At.gather(1, order[..., None].expand(B, P, n)) * valid[..., None]
        lamK = lam.gather(1, order) * valid
        G = _gram(A, At, self.W, frame)
        # K filled block by block (no full-size temporaries: at n + p ≈ 350 each costs as much as the
        # Gram); max|K| from its first block and last rows (|λ_K Ã_K| ≤ |Ã_K|), the same value as a pass over K
        K = A.new_empty(B, n + P, n + P)
        K[:, :n, :n] = G
        torch.mul(AK.mT, lamK[:, None, :], out=K[:, :n, n:])
        torch.neg(AK, out=K[:, n:, :n])
        K[:, n:, n:] = torch.diag_embed(1 - lamK)
        kmax = absmax(G, (-2, -1))
        if P:
            kmax = torch.maximum(kmax, absmax(K[:, n:], (-2, -1)))
        if not bool(ok.all()):
            K[~ok] = torch.eye(n + P, dtype=A.dtype, device=A.device)
            kmax = torch.where(ok, kmax, torch.ones_like(kmax))
        self.lu = LUTransposed(*_shifted_lu(K, kmax))
        # the border: column (c + x, b̃ + ỹ), row (−c, −λb̃), corner 1
        self.col = torch.cat([c + x, bt + to_frame(frame, y)], -1)
        self.row = torch.cat([-c, -lam * bt], -1)

    def _solve0(self, g, adjoint):
        """``M₀⁻¹ g`` (``M₀⁻ᵀ g``) in the frame, ``M₀`` the leading ``(n + m)`` block, ``g (B, n + m, r)``."""
        n, P = self.n, self.P
        g1, g2 = g[:, :n], g[:, n:]
        At, idx, valid = self.At, self.idx, self.valid
        r = g.shape[-1]
        B = g.shape[0]
        # (row-vector products: Ãᵀv as vᵀÃ, much faster than Ãᵀ @ v for a few columns)
        if adjoint:
            rhs1 = g1 + ((self.R[..., None] * g2).mT @ At).mT
        else:
            rhs1 = g1 - ((self.W[..., None] * g2).mT @ At).mT
        rhs2 = g2.gather(1, idx[..., None].expand(B, P, r)) * valid[..., None]
        sol = self.lu.solve(torch.cat([rhs1, rhs2], 1), adjoint)
        u, vK = sol[:, :n], sol[:, n:] * valid[..., None]
        Au = (u.mT @ At.mT).mT
        elim = (g2 - self.lam[..., None] * Au) if adjoint else (g2 + Au)
        elim = self.R[..., None] * elim
        kept = torch.zeros_like(g2).scatter(1, idx[..., None].expand(B, P, r), vK)
        return torch.cat([u, torch.where(self.kept[..., None], kept, elim)], 1)

    def apply(self, g, adjoint):
        """The bordered solve with the shifted reduced LU, ``g (B, n + m + 1)`` in the original
        coordinates (moved to the frame and back)."""
        n = self.n
        g = torch.cat([g[:, :n], to_frame(self.frame, g[:, n:-1]), g[:, -1:]], -1)
        first, second = (self.row, self.col) if adjoint else (self.col, self.row)
        z = self._solve0(torch.stack([g[:, :-1], first], -1), adjoint)
        zg, zc = z[..., 0], z[..., 1]
        den = 1 - (second * zc).sum(-1)
        tiny = torch.finfo(den.dtype).tiny
        den = torch.where(den.abs() < tiny, torch.full_like(den, tiny), den)
        w = (g[:, -1] - (second * zg).sum(-1)) / den
        z = zg - w[:, None] * zc
        return torch.cat([z[:, :n], from_frame(self.frame, z[:, n:]), w[:, None]], -1)


class ConeSystem:
    """``M`` at ``(A, b, c, x, y, s)`` (``(B, m, n)`` or a shared ``(m, n)``, ``(B, m)``, ``(B, n)``;
    ``ok (B,)`` the elements to solve) and its structured factorization: :meth:`solve` applies ``M⁻¹`` or ``M⁻ᵀ``.

    Cost: the frame, ``Ã = UᵀA`` (``O(m·n)`` for zero, nonnegative and second-order cones),
    ``ÃᵀWÃ`` (``B·m·n²``) and one LU of ``n + p`` (``p`` the kept rows) per element.
    ``reuse``: the :class:`ConeSystem` of a nearby point (the forward's last Newton step) whose
    factorization preconditions the refinement here instead of a new one; where refinement with
    it does not converge, this point is factorized after all.
    """

    def __init__(self, A, b, c, x, y, s, ok, spec: ConeSpec, reuse=None):
        okc = ok[:, None]
        x, y, s = (torch.where(okc, t, torch.zeros_like(t)) for t in (x, y, s))
        self.A, self.b, self.c, self.x, self.y, self.s, self.ok, self.spec = A, b, c, x, y, s, ok, spec
        self.n, self.m = A.shape[-1], A.shape[-2]
        self.frame = dual_projection_frame(spec, y, s)
        self.lam = self.frame.lam
        # a kept row with 1 − λ above rounding (an exponential cone near its degenerate face: 1 − λ ≈ 1e-7
        # … 1e-11) may make M near-singular (with another row on the same variable): near the LU's shift,
        # refinement gains little on it per step, and its residual, ~(1 − λ)·error, passes the usual
        # backward-error test (an O(1) error seen): such elements must refine to rounding or take the fallback,
        # rounding of ‖g‖ alone (a backward error relative to ‖z‖·scale, 8e-14 there, left 5e-6 in a gradient)
        eps = torch.finfo(self.lam.dtype).eps
        self.tight = ((self.lam < 1 - 64 * eps) & (self.lam >= 1 - TAU)).any(-1)
        # the backward error's scale (max|A| read from a reused system of the same A: one pass less)
        amax = reuse.amax if reuse is not None and reuse.A is A else absmax(A, (-2, -1))  # () if A is shared
        self.amax = amax
        self.scale = 1 + amax + (c + x).abs().amax(-1) + (b + y).abs().amax(-1)
        self.factor = reuse.factor if reuse is not None else None
        self.fallbacks = 0
        self.refactored = 0
        self.singular = torch.zeros_like(ok)             # of the last solve (module docstring, step 4)
        self.relres = torch.zeros_like(self.scale)

    def _own_factor(self):
        return _Factor(self.A, self.b, self.c, self.x, self.y, self.frame, self.ok)

    def apply_D(self, v):
        """``DΠ v`` (``DΠ`` the dual projection's derivative at the solution, symmetric), through the frame."""
        return from_frame(self.frame, self.lam * to_frame(self.frame, v))

    def _matvec(self, z, adjoint):
        """``M z`` (``Mᵀ z``), exactly, in the original coordinates."""
        n = self.n
        u, v, w = z[:, :n], z[:, n:-1], z[:, -1:]
        A, b, c = self.A, self.b, self.c
        if adjoint:  # Mᵀ = [[0, −Aᵀ, −c], [DA, I − D, −Db], [(c + x)ᵀ, (b + y)ᵀ, 1]]
            r1 = -_rmv(A, v) - c * w
            r2 = self.apply_D(_mv(A, u) - v - b * w) + v
            r3 = ((c + self.x) * u).sum(-1, keepdim=True) + ((b + self.y) * v).sum(-1, keepdim=True) + w
        else:  # M = [[0, AᵀD, c + x], [−A, I − D, b + y], [−cᵀ, −bᵀD, 1]]
            Dv = self.apply_D(v)
            r1 = _rmv(A, Dv) + (c + self.x) * w
            r2 = -_mv(A, u) + v - Dv + (b + self.y) * w
            r3 = -(c * u).sum(-1, keepdim=True) - (b * Dv).sum(-1, keepdim=True) + w
        return torch.cat([r1, r2, r3], -1)

    # ------------------------------------------------------------------ public
    def solve(self, g, adjoint=False, steps=4, check=True):
        """``M⁻¹ g`` (``M⁻ᵀ g``) for ``g (B, n + m + 1)``; zero for elements that are not ``ok``.

        Up to ``steps`` refinement steps, stopping once every backward error is at rounding level;
        with ``check`` (skipped under vmap, where ``steps`` steps are taken: the test reads data),
        elements whose backward error is still above ``eps^¾`` are solved again: with this
        point's own factorization if a nearby one was reused, else with a dense shifted LU."""
        okc = self.ok[:, None]
        g = torch.where(okc, g, torch.zeros_like(g))
        self.singular = torch.zeros_like(self.ok)
        if self.factor is None:
            self.factor = self._own_factor()
        check = check and not is_vmapped(g)
        sol, bad = self._refine(self.factor, g, adjoint, steps, check)
        if bad is not None and bool(bad.any()) and self.factor.frame is not self.frame:
            self.refactored += 1
            self.factor = self._own_factor()
            sol2, bad = self._refine(self.factor, g, adjoint, steps, check)
            sol = torch.where(okc, sol2, sol)
        if bad is not None and bool(bad.any()):
            sol = self._fallback(g, sol, bad, adjoint)
        return torch.where(okc, sol, torch.zeros_like(sol))

    def _refine(self, factor, g, adjoint, steps, check):
        sol = factor.apply(g, adjoint)
        eps = torch.finfo(g.dtype).eps
        tol = torch.where(self.tight, 64 * eps, eps ** 0.75)
        bad = None
        for i in range(steps + 1):
            if not check and i == steps:  # the residual would not be read
                break
            res = g - self._matvec(sol, adjoint)
            if check:  # refine to a backward error of rounding; accept eps^¾ after the last step (not if tight:
                # rounding, relative to ‖g‖ alone, see __init__)
                err = res.abs().amax(-1) / (g.abs().amax(-1) + sol.abs().amax(-1) * self.scale * ~self.tight)
                bad = self.ok & ~(err <= tol)
                if not bool((self.ok & ~(err <= 64 * eps)).any()):
                    break
            if i < steps:
                sol = sol + factor.apply(res, adjoint)
        return sol, bad

    def _fallback(self, g, sol, bad, adjoint):
        """Dense shifted LU with refinement of ``M`` for the elements ``bad``; where the residual stays above
        rounding (``eps^¾·‖g‖``), an unshifted LU with refinement once more, taken where its residual is
        lower (a nonsingular but ill-conditioned ``M``, past ``cond ≈ 1/√eps``, defeats the shifted
        refinement: its small residual, e.g. 3e-10, hides an O(1) error along the near-null vector);
        those still above ``SINGULAR_RTOL·‖g‖`` are marked ``singular`` (an inconsistent singular system)."""
        i = bad.nonzero()[:, 0]
        self.fallbacks += int(i.numel())
        M = dense_system(self.A.expand(self.b.shape[:1] + self.A.shape[-2:])[i], self.b[i], self.c[i], self.x[i], self.y[i], self.s[i], self.ok[i], self.spec)
        Mo = M.mT if adjoint else M
        lu = LUTransposed(*_shifted_lu(M.clone(), absmax(M, (-2, -1))))
        gi = g[i]
        gmax = gi.abs().amax(-1).clamp(min=torch.finfo(gi.dtype).tiny)

        def relres(x):
            return (gi - _mv(Mo, x)).abs().amax(-1) / gmax

        x = lu.solve(gi[..., None], adjoint)[..., 0]
        for _ in range(6):
            x = x + lu.solve((gi - _mv(Mo, x))[..., None], adjoint)[..., 0]
        rel = relres(x)
        retry = ~(rel <= torch.finfo(gi.dtype).eps ** 0.75)  # not at rounding (the refinement's target)
        if bool(retry.any()):
            LU, piv, info = torch.linalg.lu_factor_ex(Mo)
            x2 = torch.linalg.lu_solve(LU, piv, gi[..., None])[..., 0]
            for _ in range(3):
                x2 = x2 + torch.linalg.lu_solve(LU, piv, (gi - _mv(Mo, x2))[..., None])[..., 0]
            rel2 = relres(x2)
            take = retry & (info == 0) & (rel2 < rel)  # NaN/Inf (an exactly singular M) fail
            x = torch.where(take[:, None], x2, x)
            rel = torch.where(take, rel2, rel)
        sol = sol.clone()
        sol[i] = x
        self.relres = self.relres.clone()
        self.relres[i] = rel
        self.singular = self.singular.clone()
        self.singular[i] = ~(rel <= SINGULAR_RTOL)
        return sol
