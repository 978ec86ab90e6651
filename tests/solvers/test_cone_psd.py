"""The PSD cone of the interior point (cone_symmetric.PSD), float64: its NT scaling, its congruences
(one vector and a block of columns) and its step against dense references built independently
(explicit ``k × k`` products per column, eigenvalues of the moved point), and the SDP solved end to
end (the layer: solution and gradient) against its closed form."""

import math

import pytest
import torch

from implicitdiff.layers.cone_program import cone_program
from implicitdiff.linalg.cone_spec import parse_cones, smat, svec
from implicitdiff.solvers.cone_ipm import ConeInteriorPoint
from implicitdiff.linalg.congruence import COLUMNS_MIN, congruence_columns
from implicitdiff.solvers.cone_symmetric import PSD

F64 = torch.float64


def _psd(g, shape, k, floor=1e-3, spread=1.0):
    M = torch.randn(*shape, k, k, generator=g, dtype=F64) * spread
    return svec(M @ M.mT + floor * torch.eye(k, dtype=F64))


def _dense_congruence(P, V, k):
    """``svec(P smat(vⱼ) Pᵀ)`` one column at a time (the reference)."""
    V = V.expand(P.shape[:-2] + V.shape[-2:])
    return torch.stack([svec(P @ smat(V[..., j], k) @ P.mT) for j in range(V.shape[-1])], -1)


@pytest.mark.parametrize("k", [1, 2, 5, 10])
@pytest.mark.parametrize("shared", [False, True])
def test_congruence_of_columns_matches_one_column_at_a_time(k, shared):
    g = torch.Generator().manual_seed(k)
    B, nb, r, d = 3, 2, COLUMNS_MIN + 1, k * (k + 1) // 2
    P = torch.randn(B, nb, k, k, generator=g, dtype=F64)
    V = torch.randn(1 if shared else B, nb, d, r, generator=g, dtype=F64)  # shared: the rows of a shared A
    ref = _dense_congruence(P, V, k)
    assert torch.allclose(congruence_columns(P, V, k), ref, rtol=1e-13, atol=1e-13)
    # a stride-0 batch (the rows of a shared A expanded) is read as shared
    assert torch.allclose(congruence_columns(P, V[:1].expand(B, -1, -1, -1), k), _dense_congruence(P, V[:1], k),
                          rtol=1e-13, atol=1e-13)
    # W⁻ᵀ = R⁻¹ · R⁻ᵀ on a block of columns, on fewer than COLUMNS_MIN (at once) and on one column
    s, y = _psd(g, (B, nb), k), _psd(g, (B, nb), k)
    st = PSD.scale(s, y)
    ref = _dense_congruence(st[1], V, k)
    assert torch.allclose(PSD.winv_t(st, V), ref, rtol=1e-12, atol=1e-12)
    for j in (1, COLUMNS_MIN - 1):
        assert torch.allclose(PSD.winv_t(st, V[..., :j]), ref[..., :j], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["winv", "w_t"])
def test_maps_on_leading_columns_match_one_column_at_a_time(method):
    # the seam: the interior point's _map hands r columns at once, as a leading dimension (r, B, …)
    g = torch.Generator().manual_seed(3)
    k, B, nb, r = 4, 3, 2, 5
    st = PSD.scale(_psd(g, (B, nb), k), _psd(g, (B, nb), k))
    v = torch.randn(r, B, nb, k * (k + 1) // 2, generator=g, dtype=F64)
    f = getattr(PSD, method)
    P = st[1].mT if method == "winv" else st[0]  # W⁻¹(X) = R⁻ᵀ X R⁻¹, Wᵀ(X) = R X Rᵀ
    for j in range(r):
        ref = svec(P @ smat(v[j], k) @ P.mT)
        assert torch.allclose(f(st, v)[j], ref, rtol=1e-13, atol=1e-13)
        assert torch.allclose(f(st, v[j]), ref, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("k", [1, 3, 10])
def test_nt_scaling_identities(k):
    g = torch.Generator().manual_seed(10 + k)
    # far from the central path (a wide spread of eigenvalues), as near a solution
    s, y = _psd(g, (4, 2), k, floor=1e-6, spread=3.0), _psd(g, (4, 2), k, floor=1e-6)
    R, Rinv, lam, _, ok = PSD.scale(s, y)
    assert ok.all()
    eye = torch.eye(k, dtype=F64)
    assert torch.allclose(Rinv @ R, eye.expand_as(R), atol=1e-9)
    # Rᵀ Y R = Λ = R⁻¹ S R⁻ᵀ, with Λ the NT point λ (relative to its size)
    L = torch.diag_embed(lam)
    scale_ = lam.amax(-1)[..., None, None]
    assert torch.allclose(R.mT @ smat(y, k) @ R / scale_, L / scale_, atol=1e-10)
    assert torch.allclose(Rinv @ smat(s, k) @ Rinv.mT / scale_, L / scale_, atol=1e-10)
    st = (R, Rinv, lam, k, ok)
    ls, ly = PSD.scaled(st, s, y)
    assert torch.allclose(PSD.w_t(st, ls), s, atol=1e-9 * s.abs().amax())   # Wᵀ(W⁻ᵀ s) = s
    assert torch.allclose(PSD.winv(st, ly), y, atol=1e-9 * y.abs().amax())  # W⁻¹(W y) = y


def test_step_is_the_largest_in_both_cones_and_zero_outside():
    g = torch.Generator().manual_seed(5)
    k, B = 4, 6
    s, y = _psd(g, (B, 1), k), _psd(g, (B, 1), k)
    ds, dy = torch.randn(B, 1, 10, generator=g, dtype=F64), torch.randn(B, 1, 10, generator=g, dtype=F64)
    ds[0] = s[0]  # element 0: s stays in the cone along ds (its limit comes from y)
    st = PSD.scale(s, y)
    alpha = PSD.step(st, ds, dy)

    def least_eig(v):
        return torch.linalg.eigvalsh(smat(v, k))[..., 0].amin(-1)

    # the reference: each of s + αds and y + αdy reaches the boundary where its least eigenvalue
    # (a function of α) changes sign: bisection on it
    def boundary(v, dv):
        lo, hi = torch.zeros(B, dtype=F64), torch.full((B,), 1e6, dtype=F64)
        for _ in range(200):
            mid = (lo + hi) / 2
            inside = least_eig(v + mid[:, None, None] * dv) > 0
            lo, hi = torch.where(inside, mid, lo), torch.where(inside, hi, mid)
        return lo
    ref = torch.minimum(boundary(s, ds), boundary(y, dy))
    assert torch.allclose(alpha, ref, rtol=1e-8)
    # the same test on the scaled directions (the predictor's: no congruence), and on the generic path
    assert torch.allclose(PSD.step_scaled(st, *PSD.scaled(st, ds, dy)), ref, rtol=1e-8)
    assert torch.allclose(PSD.step_scaled(st, *PSD.scaled(st, ds, dy)), alpha, rtol=1e-12)
    # an iterate outside the cone (not positive definite): no step, not a NaN
    s_bad = s.clone()
    s_bad[1] = svec(-torch.eye(k, dtype=F64))
    st = PSD.scale(s_bad, y)
    for alpha in (PSD.step(st, ds, dy), PSD.step_scaled(st, *PSD.scaled(st, ds, dy))):
        assert alpha[1] == 0 and torch.isfinite(alpha).all() and (alpha[[0, 2, 3, 4, 5]] > 0).all()


def _spectraplex_projection(P):
    """The nearest density matrix to symmetric ``P`` (Frobenius): its eigenvalues projected onto the simplex."""
    lam, V = torch.linalg.eigh(P)
    u = lam.flip(-1)
    css = u.cumsum(-1) - 1
    idx = torch.arange(1, lam.shape[-1] + 1, dtype=F64)
    rho = ((u - css / idx) > 0).sum(-1, keepdim=True)
    theta = css.gather(-1, rho - 1) / rho
    return (V * (lam - theta).clamp(min=0)[..., None, :]) @ V.mT


def _density_program(k):
    """``(A, c, b(P))`` of ``min ‖X − P‖²_F s.t. X ⪰ 0, tr X = 1`` as a cone program in ``(svec X, t)``:
    ``min t  s.t.  tr X = 1 (z), ‖(t − 1, 2 svec(X − P))‖ ≤ t + 1 (q), X ⪰ 0 (s)``."""
    d, n = k * (k + 1) // 2, k * (k + 1) // 2 + 1
    A = torch.zeros(1 + (d + 2) + d, n, dtype=F64)
    A[0, :d] = svec(torch.eye(k, dtype=F64))
    A[1, d], A[2, d] = -1.0, -1.0
    A[3:3 + d, :d] = -2 * torch.eye(d, dtype=F64)
    A[3 + d:, :d] = -torch.eye(d, dtype=F64)
    c = torch.zeros(n, dtype=F64)
    c[d] = 1.0

    def rhs(P):
        return torch.cat([torch.tensor([1.0, 1.0, -1.0], dtype=F64).expand(P.shape[0], 3), -2 * svec(P),
                          torch.zeros(P.shape[0], d, dtype=F64)], 1)
    return A, c, rhs


def test_nearest_density_matrix_and_its_gradient_match_the_closed_form():
    g = torch.Generator().manual_seed(7)
    k, B = 6, 8
    d = k * (k + 1) // 2
    Q = (torch.randn(B, k, k, generator=g, dtype=F64) / math.sqrt(k)).requires_grad_()
    W = torch.randn(B, k, k, generator=g, dtype=F64)
    A, c, rhs = _density_program(k)

    def solve(Q):
        x, _, _, info = cone_program(A, rhs((Q + Q.mT) / 2), c, {"z": 1, "q": [d + 2], "s": [k]}, return_info=True)
        assert (info.status == 0).all()
        return smat(x[:, :d], k)
    X = solve(Q)
    X_ref = _spectraplex_projection((Q + Q.mT) / 2)
    assert torch.allclose(X, X_ref, atol=1e-8)
    grad, = torch.autograd.grad((W * X).sum(), Q)
    grad_ref, = torch.autograd.grad((W * X_ref).sum(), Q)
    assert torch.allclose(grad, grad_ref, atol=1e-7)


def test_nt_scaling_at_the_end_of_a_solve_matches_the_svd_of_ly_t_ls():
    # PSD.scale takes Λ and V from one eigh of MᵀM (M = L_yᵀL_s), not from an SVD of M: at a solution,
    # where s and y are nearly complementary (λ ~ √μ, S's and Y's eigenvalues spread over ~1/μ), it
    # gives the SVD's λ and the (unique) NT scaling R Rᵀ, and its inverse, to rounding
    g = torch.Generator().manual_seed(11)
    k, B = 10, 16
    d = k * (k + 1) // 2
    A, c, rhs = _density_program(k)
    P = torch.randn(B, k, k, generator=g, dtype=F64)
    res = ConeInteriorPoint(rtol=1e-9).solve(A, rhs((P + P.mT) / 2), c.expand(B, -1),
                                              parse_cones({"z": 1, "q": [d + 2], "s": [k]}))
    assert (res.status == 0).all()
    s, y = res.s[:, None, -d:], res.y[:, None, -d:]
    R, Rinv, lam, _, ok = PSD.scale(s, y)
    assert ok.all()
    Ls, Ly = torch.linalg.cholesky(smat(s, k)), torch.linalg.cholesky(smat(y, k))
    U, lam_ref, Vh = torch.linalg.svd(Ly.mT @ Ls)
    ev = torch.linalg.eigvalsh(smat(s, k))
    assert (ev[..., -1] / ev[..., 0] > 1e6).all()  # near complementarity: S nearly singular
    R_ref = (Ls @ Vh.mT) * lam_ref.rsqrt()[..., None, :]
    Rinv_ref = lam_ref.rsqrt()[..., :, None] * (U.mT @ Ly.mT)
    assert torch.allclose(lam.sort(-1).values, lam_ref.sort(-1).values, rtol=1e-10, atol=0)
    for G, G_ref in ((R @ R.mT, R_ref @ R_ref.mT), (Rinv.mT @ Rinv, Rinv_ref.mT @ Rinv_ref)):
        assert torch.allclose(G, G_ref, rtol=0, atol=1e-10 * G_ref.abs().amax())


def test_nt_scaling_far_from_the_central_path_keeps_the_svd_accuracy():
    # λ spread ~1e-7 (far from the central path): the squared form eigh(MᵀM) would lose ~1e-4 in
    # R⁻¹SR⁻ᵀ = Λ; PSD.scale takes the SVD there, whose identities hold to ~1e-8 relative per column
    k = 3
    Q = torch.linalg.qr(torch.randn(k, k, dtype=F64, generator=torch.Generator().manual_seed(0)))[0]
    Q2 = torch.linalg.qr(torch.randn(k, k, dtype=F64, generator=torch.Generator().manual_seed(1)))[0]
    S = Q @ torch.diag(torch.tensor([1.0, 1e-6, 1e-9], dtype=F64)) @ Q.mT
    Y = Q2 @ torch.diag(torch.tensor([1.0, 1e-3, 1e-6], dtype=F64)) @ Q2.mT
    R, Rinv, lam, _, ok = PSD.scale(svec(S)[None, None], svec(Y)[None, None])
    assert ok.all() and lam.amin() < 1e-6 * lam.amax()
    torch.testing.assert_close(Rinv @ R, torch.eye(k, dtype=F64).expand_as(R), rtol=0, atol=1e-12)
    for G in (Rinv @ S @ Rinv.mT, R.mT @ Y @ R):
        assert ((G - torch.diag_embed(lam)).abs() / lam[..., None, :]).max() < 1e-6
