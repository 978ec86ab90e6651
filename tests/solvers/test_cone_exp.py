"""The exponential cone's block of the interior point (float64): the closed-form Cholesky factor of
the barrier's Hessian, the scaled-frame products, the step (inside both cones and the central-path
neighbourhood, the boundary found to its stated precision), and exp-cone programs against Clarabel,
degenerate ones included."""

import math

import pytest
import torch

from implicitdiff import Status
from implicitdiff.linalg.cone_spec import parse_cones
from implicitdiff.solvers import cone_exp, cone_gram
from implicitdiff.solvers.cone_exp import ExpCone, _boundary, _chol, _dense, _grad_hess, _in_dual, _in_primal, _near
from implicitdiff.solvers.cone_gram import DataMatrix, NormalMatrix, contiguous
from implicitdiff.solvers.cone_ipm import _CONES, ConeInteriorPoint
from implicitdiff.solvers.cone_sparse import SparseGram

F64 = torch.float64


def _F(t):
    x, y, z = t.unbind(-1)
    return (-torch.log(y * torch.log(z / y) - x) - torch.log(y) - torch.log(z)).sum()


def _primal_points(g, shape, psi):
    """Interior points of K with ``ψ = y log(z/y) − x`` given (``psi`` broadcast)."""
    y = torch.rand(shape, generator=g, dtype=F64) * 2 + 0.05
    z = torch.rand(shape, generator=g, dtype=F64) * 2 + 0.05
    x = y * torch.log(z / y) - psi
    return torch.stack([x, y, z], -1)


def _dual_points(g, shape, phi):
    """Interior points of K* with ``φ = v − u − u log(−w/u)`` given."""
    u = -(torch.rand(shape, generator=g, dtype=F64) * 2 + 0.05)
    w = torch.rand(shape, generator=g, dtype=F64) * 2 + 0.05
    v = phi + u + u * torch.log(-w / u)
    return torch.stack([u, v, w], -1)


def test_membership_tests():
    g = torch.Generator().manual_seed(0)
    s = _primal_points(g, (50,), 1e-3)
    assert _in_primal(s).all() and not _in_primal(_primal_points(g, (50,), -1e-3)).any()
    y = _dual_points(g, (50,), 1e-3)
    assert _in_dual(y).all() and not _in_dual(_dual_points(g, (50,), -1e-3)).any()
    # the faces: y = 0 (primal), u = 0 (dual) and sign errors are outside the open cones
    assert not _in_primal(torch.tensor([[-1.0, 0.0, 1.0], [0.0, -1.0, 1.0], [0.0, 1.0, -1.0]], dtype=F64)).any()
    assert not _in_dual(torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 1.0], [-1.0, 1.0, 0.0]], dtype=F64)).any()
    assert (_in_primal(s) == (s[..., 1] * torch.exp(s[..., 0] / s[..., 1]) < s[..., 2])).all()
    # the definitions, on points of every sign: K with y > 0, K* with u < 0
    p = torch.randn(2000, 3, generator=g, dtype=F64)
    x, yy, z = p.unbind(-1)
    assert (_in_primal(p) == ((yy > 0) & (yy * torch.exp(x / yy) < z))).all()
    assert (_in_dual(p) == ((x < 0) & (-x * torch.exp(yy / x) < math.e * z))).all()
    assert 0 < int(_in_primal(p).sum()) < 1000 and 0 < int(_in_dual(p).sum()) < 1000


@pytest.mark.parametrize("psi", [1.0, 1e-2, 1e-6])
def test_closed_form_cholesky_equals_the_hessian(psi):
    """``L̂L̂ᵀ = ∇²F`` (autograd), ``∇F`` too; away from the boundary ``L̂`` is LAPACK's factor."""
    g = torch.Generator().manual_seed(1)
    s = _primal_points(g, (20,), psi)
    le, grad = _chol(s)
    L = _dense(le)
    for i in range(s.shape[0]):
        si = s[i].clone().requires_grad_()
        g_auto = torch.autograd.grad(_F(si), si)[0]
        H = torch.autograd.functional.hessian(_F, s[i])
        assert torch.allclose(grad[i], g_auto, rtol=1e-10, atol=0)
        assert torch.allclose(L[i] @ L[i].T, H, rtol=1e-9, atol=1e-12 * float(H.abs().max()))
        if psi == 1.0:
            assert torch.allclose(L[i], torch.linalg.cholesky(H), rtol=1e-9, atol=1e-12)
    assert (L.diagonal(dim1=-2, dim2=-1) > 0).all()
    g2, H2 = _grad_hess(s)
    assert torch.allclose(g2, grad) and torch.allclose(H2, L @ L.mT)


def _state(g, B=3, nb=4, psi=0.3, phi=0.4):
    s = _primal_points(g, (B, nb), psi)
    y = _dual_points(g, (B, nb), phi)
    mu = torch.rand(B, generator=g, dtype=F64) + 0.1
    return s, y, mu, ExpCone.scale(s, y, mu)


def test_scaled_frame_products():
    """``W⁻ᵀ = Lᵀ``, ``W⁻¹ = L``, ``Wᵀ = L⁻ᵀ`` with ``LLᵀ = μ∇²F(s)``; ``d̃ = L⁻¹(y + σμ∇F(s))``."""
    g = torch.Generator().manual_seed(2)
    s, y, mu, st = _state(g)
    L = st[4]
    H = torch.stack([torch.stack([mu[b] * torch.autograd.functional.hessian(_F, s[b, k]) for k in range(s.shape[1])])
                     for b in range(s.shape[0])])
    assert torch.allclose(L @ L.mT, H, rtol=1e-9, atol=1e-10)
    v = torch.randn(s.shape, generator=g, dtype=F64)
    w_inv_t, w = ExpCone.scaled(st, v, v)
    assert torch.allclose(w_inv_t, (L.mT @ v[..., None])[..., 0], atol=1e-12)
    assert torch.allclose(w, torch.linalg.solve(L, v[..., None])[..., 0], atol=1e-10)
    assert torch.allclose(ExpCone.w_t(st, w_inv_t), v, atol=1e-10)       # Wᵀ W⁻ᵀ = I
    assert torch.allclose(ExpCone.winv(st, w), v, atol=1e-10)            # W⁻¹ W = I
    V = torch.randn(s.shape + (5,), generator=g, dtype=F64)
    assert torch.allclose(ExpCone.winv_t(st, V)[..., 2], ExpCone.scaled(st, V[..., 2], V[..., 2])[0], atol=1e-12)
    sm = 0.3 * mu
    d = ExpCone.rhs(st, sm, None)
    assert torch.allclose((L @ d[..., None])[..., 0], y + sm[:, None, None] * st[3], atol=1e-10)
    # an element with a block outside its cone gets ok = False and a zero step
    s_bad = s.clone()
    s_bad[1, 2, 1] = -1.0
    st_bad = ExpCone.scale(s_bad, y, mu)
    assert st_bad[5].tolist() == [[True] * 4, [True, True, False, True], [True] * 4]
    alpha = ExpCone.step(st_bad, v, v)
    assert alpha[1] == 0 and (alpha[[0, 2]] > 0).all()


def _dense_near(s, y):
    """The neighbourhood test of the module doc, with a dense solve."""
    mub = (s * y).sum(-1) / 3
    grad, H = _grad_hess(s)
    r = y + mub[..., None] * grad
    d = (r * torch.linalg.solve(H, r[..., None])[..., 0]).sum(-1)
    return d, (cone_exp._BETA * mub) ** 2


def test_neighbourhood_test_equals_the_dense_formula():
    g = torch.Generator().manual_seed(3)
    s = _primal_points(g, (400,), torch.rand(400, generator=g, dtype=F64) * 0.5 + 1e-3)
    y = -(torch.rand(400, generator=g, dtype=F64)[:, None] + 0.2) * _grad_hess(s)[0]   # on the central path …
    y = y + 0.8 * torch.randn(400, 3, generator=g, dtype=F64) * y.abs()                 # … and off it
    keep = _in_dual(y)
    s, y = s[keep], y[keep]
    d, bound = _dense_near(s, y)
    fast = _near(*s.unbind(-1), *y.unbind(-1))
    clear = (d - bound).abs() > 1e-8 * bound                                             # not a rounding tie
    assert 0 < int((d <= bound).sum()) < s.shape[0]                                      # both outcomes occur
    assert (fast[clear] == (d <= bound)[clear]).all()


def _random_steps(seed, B=64, nb=6, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    s = _primal_points(g, (B, nb), torch.rand(B, nb, generator=g, dtype=F64) * 0.5 + 1e-2)
    y = -(torch.rand(B, nb, generator=g, dtype=F64)[..., None] + 0.5) * _grad_hess(s)[0]
    y = y * (1 + 0.05 * torch.randn(B, nb, 3, generator=g, dtype=F64))
    keep = _in_dual(y).all(-1)
    s, y = s[keep], y[keep]
    mu = (s * y).sum((-1, -2)) / (3 * nb)
    ds = scale * torch.randn(s.shape, generator=g, dtype=F64) * s.abs()
    dy = scale * torch.randn(s.shape, generator=g, dtype=F64) * y.abs()
    return s, y, mu, ds, dy


@pytest.mark.parametrize("seed, scale", [(0, 1.0), (1, 10.0), (2, 0.1), (3, 1e4)])
def test_boundary_search_is_inside_and_within_its_precision(seed, scale):
    s, y, mu, ds, dy = _random_steps(seed, scale=scale)
    a = _boundary(s, y, ds, dy)
    assert (a > 0).all() and (a <= 1).all()
    a3 = a[:, None, None]
    assert (_in_primal(s + a3 * ds) & _in_dual(y + a3 * dy)).all()
    # 1 % further some block is outside (the bisection's precision is 0.7 %), unless the full step is taken
    b3 = 1.01 * a3
    out = ~(_in_primal(s + b3 * ds) & _in_dual(y + b3 * dy)).all(-1)
    assert (out | (a == 1)).all()
    assert (a < 1).any()
    # a fine brute-force grid (ratio 1.001) agrees: its largest interior point is within 1 % of ours
    grid = 1.001 ** -torch.arange(0, 20000, dtype=F64)
    for i in range(0, s.shape[0], 8):
        pts_in = (_in_primal(s[i] + grid[:, None, None] * ds[i]) & _in_dual(y[i] + grid[:, None, None] * dy[i])).all(-1)
        best = grid[pts_in.nonzero()[0, 0]]
        assert best / 1.01 <= a[i] <= best * 1.002


def test_boundary_search_floor_and_full_step():
    s, y, mu, ds, dy = _random_steps(4)
    assert (_boundary(s, y, 0 * ds, 0 * dy) == 1).all()                         # no motion: the full step
    assert (_boundary(s, y, s, y) == 1).all()                                   # along the point itself: inside
    a = _boundary(s, y, -1e15 * s, dy)                                          # out at once: below the floor
    assert (a == 0).all()


@pytest.mark.parametrize("seed, scale", [(0, 1.0), (2, 0.1), (5, 0.3)])
def test_boundary_shortcut_gives_the_full_bisection(seed, scale, monkeypatch):
    # where every element is inside at the fourth halving's midpoint (α ≈ 0.18) the first four halvings are
    # skipped: the same α, bit for bit, as the bisection from the start (_SKIP = 0), on the batch (some
    # step shorter: no shortcut) and on its elements with longer steps (the shortcut)
    s, y, mu, ds, dy = _random_steps(seed, scale=scale)
    a = _boundary(s, y, ds, dy)
    longer = (a > 0.25).nonzero()[:, 0]
    assert float(a.min()) < math.exp(math.log(cone_exp._FLOOR) / 16) and longer.numel() > 1
    for idx in (torch.arange(a.numel()), longer):
        got = _boundary(s[idx], y[idx], ds[idx], dy[idx])
        monkeypatch.setattr(cone_exp, "_SKIP", 0)
        want = _boundary(s[idx], y[idx], ds[idx], dy[idx])
        monkeypatch.undo()
        assert torch.equal(got, want)


@pytest.mark.parametrize("seed, scale", [(5, 1.0), (6, 10.0), (7, 0.3)])
def test_step_is_inside_both_cones_and_the_neighbourhood(seed, scale):
    """The old grid step's guarantee: ``s + αΔs ∈ int K``, ``y + αΔy ∈ int K*`` and every block in the
    neighbourhood (or the last candidate when none is); and the step is the first candidate that is."""
    s, y, mu, ds, dy = _random_steps(seed, scale=scale)
    st = ExpCone.scale(s, y, mu)
    alpha = ExpCone.step(st, ds, dy)
    a_in = _boundary(s, y, ds, dy)
    cands = a_in[:, None] * cone_exp._BACK
    a3 = alpha[:, None, None]
    sa, ya = s + a3 * ds, y + a3 * dy
    assert (alpha > 0).all() and (_in_primal(sa) & _in_dual(ya)).all()
    d, bound = _dense_near(sa, ya)
    near = (d <= bound * (1 + 1e-9)).all(-1)
    last = torch.isclose(alpha, cands[:, -1], rtol=1e-14)
    assert (near | last).all() and near.float().mean() > 0.5
    assert int((alpha < cands[:, 0] * (1 - 1e-14)).sum()) >= 3    # (later candidates tried: step's loop)
    # no larger candidate is in the neighbourhood
    for i in range(s.shape[0]):
        for c in cands[i]:
            if c <= alpha[i] * (1 + 1e-14):
                break
            dc, bc = _dense_near(s[i] + c * ds[i], y[i] + c * dy[i])
            assert not (dc <= bc * (1 - 1e-9)).all()


def test_step_not_shorter_than_the_old_grid_step():
    """The old search took the first point of the grid 0.8ʲ inside both cones, then 0.9ᵏ backtracking
    into the neighbourhood (its first candidate 0.8–1 × the boundary); ours starts at 0.9 × the
    boundary (found to 0.7 %): never shorter by more than the old grid's ratio, as long on average."""
    s, y, mu, ds, dy = _random_steps(8, scale=3.0)
    st = ExpCone.scale(s, y, mu)
    alpha = ExpCone.step(st, ds, dy)
    grid = 0.8 ** torch.arange(0, 100, dtype=F64)
    inside = (_in_primal(s[:, None] + grid[:, None, None] * ds[:, None])
              & _in_dual(y[:, None] + grid[:, None, None] * dy[:, None])).all(-1)
    a_grid = grid[torch.where(inside, torch.arange(100), 100).amin(-1)]
    old = torch.zeros_like(a_grid)
    for i in range(s.shape[0]):
        for f in 0.9 ** torch.arange(12, dtype=F64):
            d, bound = _dense_near(s[i] + a_grid[i] * f * ds[i], y[i] + a_grid[i] * f * dy[i])
            old[i] = a_grid[i] * f
            if (d <= bound).all():
                break
    assert (alpha >= 0.8 * old).all() and alpha.mean() >= 0.95 * old.mean()


# ---------------------------------------------------------------------------------------- programs
def _logistic(g, d=3, N=6, lam=0.1):
    """ℓ2-regularized logistic regression as a cone program: min Σ tᵢ/N + λ‖β‖² with
    tᵢ ≥ log(1 + exp(−zᵢᵀβ)) (two exp cones per sample: u₁ + u₂ ≤ 1, (−t, 1, u₁), (−zᵢᵀβ − t, 1, u₂)),
    the square by one second-order cone ((1 + r, 1 − r, 2β) ∈ Q: ‖β‖² ≤ r)."""
    Z = torch.randn(N, d, generator=g, dtype=F64)
    n = d + N + 2 * N + 1                       # β, t, u, r
    it, iu, ir = d, d + N, d + 3 * N
    rows, b = [], []

    def row(coef, rhs):
        a = torch.zeros(n, dtype=F64)
        for j, v in coef:
            a[j] += v
        rows.append(a)
        b.append(rhs)
    for i in range(N):                          # l: u₁ + u₂ ≤ 1
        row([(iu + 2 * i, 1.0), (iu + 2 * i + 1, 1.0)], 1.0)
    row([(ir, -1.0)], 1.0)                      # q: (1 + r, 1 − r, 2β)
    row([(ir, 1.0)], 1.0)
    for j in range(d):
        row([(j, -2.0)], 0.0)
    for i in range(N):                          # ep: s = b − a x
        row([(it + i, 1.0)], 0.0)
        row([], 1.0)
        row([(iu + 2 * i, -1.0)], 0.0)
        row([(j, float(Z[i, j])) for j in range(d)] + [(it + i, 1.0)], 0.0)
        row([], 1.0)
        row([(iu + 2 * i + 1, -1.0)], 0.0)
    A = torch.stack(rows)
    c = torch.zeros(n, dtype=F64)
    c[it:it + N] = 1.0 / N
    c[ir] = lam
    return A, torch.tensor(b, dtype=F64), c, {"l": N, "q": [d + 2], "ep": 2 * N}


def _degenerate(name):
    """Exp-cone programs whose solution sits where the cone is not smooth or complementarity is
    not strict."""
    T = lambda v: torch.tensor(v, dtype=F64)  # noqa: E731
    if name == "y=0 face":        # min z s.t. (−1, y, z) ∈ K: y = z = 0 (both blocks on the boundary)
        return T([[0.0, 0.0], [-1.0, 0.0], [0.0, -1.0]]), T([-1.0, 0.0, 0.0]), T([0.0, 1.0]), {"ep": 1}
    if name == "x=y=0":           # max x s.t. (x, y, 1) ∈ K, y ≤ 0: x = y = 0
        return (T([[0.0, 1.0], [-1.0, 0.0], [0.0, -1.0], [0.0, 0.0]]), T([0.0, 0.0, 0.0, 1.0]),
                T([-1.0, 0.0]), {"l": 1, "ep": 1})
    # entropy maximization with one probability pinned to zero by an equality: (t₁, 0, 1) on the y = 0 face
    k = 3
    A = torch.zeros(2 + 3 * k, 2 * k, dtype=F64)
    b = torch.zeros(2 + 3 * k, dtype=F64)
    A[0, :k], b[0], A[1, 0] = 1.0, 1.0, 1.0
    for i in range(k):
        r = 2 + 3 * i
        A[r, k + i], A[r + 1, i], b[r + 2] = -1.0, -1.0, 1.0
    c = -torch.cat([T([0.3, -0.2, 0.1]), torch.ones(k, dtype=F64)])
    return A, b, c, {"z": 2, "ep": k}


def _check_optimal(A, b, c, x, y, s, tol):
    assert torch.allclose(A @ x + s, b, atol=tol)
    assert torch.allclose(A.T @ y + c, torch.zeros_like(c), atol=tol)
    assert abs(float(c @ x + b @ y)) < tol


def _clarabel(A, b, c, cones, tol=1e-12):
    """Clarabel on a program with zero, nonnegative, second-order and exponential cones (its row
    order and conventions are SCS's for these)."""
    clarabel = pytest.importorskip("clarabel")
    import numpy as np
    import scipy.sparse as sp
    cl = [clarabel.ZeroConeT(cones["z"])] if cones.get("z") else []
    cl += [clarabel.NonnegativeConeT(cones["l"])] if cones.get("l") else []
    cl += [clarabel.SecondOrderConeT(k) for k in cones.get("q", [])]
    cl += [clarabel.ExponentialConeT() for _ in range(cones.get("ep", 0))]
    st = clarabel.DefaultSettings()
    st.verbose = False
    st.tol_gap_abs = st.tol_gap_rel = st.tol_feas = tol
    st.tol_ktratio = 1e-9
    n = A.shape[1]
    sol = clarabel.DefaultSolver(sp.csc_matrix((n, n)), c.numpy(), sp.csc_matrix(A.numpy()), b.numpy(), cl, st).solve()
    return np.array(sol.x), np.array(sol.z), np.array(sol.s), str(sol.status)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_logistic_regression_matches_clarabel(seed):
    g = torch.Generator().manual_seed(seed)
    A, b, c, cones = _logistic(g)
    r = ConeInteriorPoint(rtol=1e-10).solve(A[None], b[None], c[None], parse_cones(cones))
    assert r.status.tolist() == [Status.SUCCESS]
    xc, yc, sc, st = _clarabel(A, b, c, cones)
    assert st in ("Solved", "AlmostSolved")
    for ours, ref in ((r.x[0], xc), (r.y[0], yc), (r.s[0], sc)):
        assert torch.allclose(ours, torch.as_tensor(ref), rtol=1e-6, atol=1e-6)
    _check_optimal(A, b, c, r.x[0], r.y[0], r.s[0], 1e-8)


@pytest.mark.parametrize("name", ["y=0 face", "x=y=0", "pinned entropy"])
def test_degenerate_exp_programs_converge(name):
    A, b, c, cones = _degenerate(name)
    r = ConeInteriorPoint(rtol=1e-9).solve(A[None], b[None], c[None], parse_cones(cones))
    assert r.status.tolist() == [Status.SUCCESS], (r.status, r.residual)
    x, y, s = r.x[0], r.y[0], r.s[0]
    _check_optimal(A, b, c, x, y, s, 1e-7)
    if name == "y=0 face":
        assert abs(float(c @ x)) < 1e-7            # the optimal value 0
    elif name == "x=y=0":
        assert abs(float(x[0])) < 1e-7 and abs(float(x[1])) < 1e-7
    else:
        q = torch.tensor([-0.2, 0.1], dtype=F64)   # p₂, p₃ ∝ exp(qᵢ − 1) on the simplex, p₁ = 0
        p = torch.softmax(q, 0)
        assert abs(float(x[0])) < 1e-7 and torch.allclose(x[1:3], p, atol=1e-7)


def _complementary_pair(kind, g):
    """``(s, y)`` with ``s ∈ K``, ``y ∈ K*``, ``sᵀy = 0``: strictly complementary on the curved
    boundary, or degenerate (one of them zero, both at an apex, on the ``y = 0`` / ``u = 0`` faces)."""
    r = float(torch.rand((), generator=g)) + 0.2
    if kind == "strict":             # y* = t∇ψ(s) is the normal of K at s
        v, u = r, float(torch.randn((), generator=g))
        z = v * math.exp(u / v)
        return torch.tensor([u, v, z]), (float(torch.rand((), generator=g)) + 0.2) * torch.tensor([-1.0, u / v - 1, v / z])
    if kind == "s inside":
        return torch.tensor([-r, r, 2 + r]), torch.zeros(3)
    if kind == "y inside":
        return torch.zeros(3), torch.tensor([-r, r, 2 + r])
    if kind == "apex":
        return torch.zeros(3), torch.zeros(3)
    if kind == "faces":
        return r * torch.tensor([-1.0, 0.0, 1.0]), r * torch.tensor([0.0, 1.0, 0.0])
    return r * torch.tensor([0.0, 0.0, 1.0]), r * torch.tensor([0.0, 1.0, 0.0])   # "z axis"


def _planted(B, seed, nb=5, nl=5, n=8):
    """Programs with a planted primal-dual solution: ``b = Ax* + s*``, ``c = −Aᵀy*``."""
    kinds = ["strict", "s inside", "y inside", "apex", "faces", "z axis"]
    g = torch.Generator().manual_seed(seed)
    m = nl + 3 * nb
    A = torch.randn(B, m, n, generator=g, dtype=F64)
    S, Y = torch.zeros(B, m, dtype=F64), torch.zeros(B, m, dtype=F64)
    for i in range(B):
        on = torch.rand(nl, generator=g) < 0.5
        S[i, :nl] = torch.where(on, torch.rand(nl, generator=g, dtype=F64) + 0.1, 0.0)
        Y[i, :nl] = torch.where(on, 0.0, torch.rand(nl, generator=g, dtype=F64) + 0.1)
        for k in range(nb):
            s, y = _complementary_pair(kinds[int(torch.randint(len(kinds), (), generator=g))], g)
            S[i, nl + 3 * k:nl + 3 * k + 3], Y[i, nl + 3 * k:nl + 3 * k + 3] = s, y
    x = torch.randn(B, n, generator=g, dtype=F64)
    return A, (A @ x[..., None])[..., 0] + S, -(A.mT @ Y[..., None])[..., 0], {"l": nl, "ep": nb}


def _residual(A, b, c, x, y, s):
    """The interior point's stopping measure (cone_ipm's module doc) at a returned ``(x, y, s)``."""
    Ax, Aty = (A @ x[..., None])[..., 0], (A.mT @ y[..., None])[..., 0]
    inf = lambda v: v.abs().amax(-1)  # noqa: E731
    pres = inf(Ax + s - b) / (1 + torch.maximum(inf(b), torch.maximum(inf(Ax), inf(s))))
    dres = inf(Aty + c) / (1 + torch.maximum(inf(c), inf(Aty)))
    ctx, bty = (c * x).sum(-1), (b * y).sum(-1)
    gap = (ctx + bty).abs() / (1 + torch.minimum(ctx.abs(), bty.abs()))
    return torch.maximum(pres, torch.maximum(dres, gap))


@pytest.mark.parametrize("seed", [0, 1])
def test_degenerate_planted_programs_solve_or_report_their_residual(seed):
    """Random programs whose exp-cone blocks sit at degenerate points (apexes, the y = 0 face, the z
    axis; strict complementarity failing). Most converge; one that does not is reported with a failure
    status and the true residual of the iterate it returns, never as solved, infeasible or unbounded."""
    A, b, c, cones = _planted(32, seed)
    rtol = 1e-9
    r = ConeInteriorPoint(rtol=rtol).solve(A, b, c, parse_cones(cones))
    res = _residual(A, b, c, r.x, r.y, r.s)
    ok = r.status == Status.SUCCESS
    assert set(r.status.tolist()) <= {Status.SUCCESS, Status.BREAKDOWN, Status.MAX_ITERATIONS}
    assert ok.float().mean() >= 0.6
    assert (res[ok] <= rtol * (1 + 1e-6)).all()
    assert torch.allclose(r.residual[~ok], res[~ok], rtol=1e-6) and (res[~ok] > rtol).all()


def test_logistic_regression_gradients_match_finite_differences():
    """Through ``cone_program`` (its backward differentiates the solution the exp blocks converged to)."""
    import implicitdiff as idf
    g = torch.Generator().manual_seed(4)
    A, b, c, cones = _logistic(g)

    def solve(A_, b_, c_):
        return idf.cone_program(A_, b_, c_, cones, rtol=1e-10)
    Ar, br, cr = (t.clone().requires_grad_() for t in (A, b, c))
    x, y, s = solve(Ar, br, cr)
    w = [torch.randn(t.shape, generator=g, dtype=F64) for t in (x, y, s)]
    loss = sum((wi * t).sum() for wi, t in zip(w, (x, y, s)))
    grads = torch.autograd.grad(loss, (Ar, br, cr))
    d = [torch.randn(t.shape, generator=g, dtype=F64) for t in (A, b, c)]
    d[0] = d[0] * (A != 0)

    def f(h):
        out = solve(A + h * d[0], b + h * d[1], c + h * d[2])
        return sum((wi * t).sum() for wi, t in zip(w, out))
    h = 1e-4
    fd = (f(h) - f(-h)) / (2 * h)
    an = sum((gi * di).sum() for gi, di in zip(grads, d))
    assert abs(float(an - fd)) <= 1e-6 * max(1.0, abs(float(fd))), (float(an), float(fd))


def test_float32_logistic_regression():
    import implicitdiff as idf
    A, b, c, cones = _logistic(torch.Generator().manual_seed(0))
    x64 = idf.cone_program(A, b, c, cones, rtol=1e-10)[0]
    x32, _, _, info = idf.cone_program(A.float(), b.float(), c.float(), cones, return_info=True)
    assert x32.dtype == torch.float32 and int(info.status) == Status.SUCCESS
    assert torch.allclose(x32.double(), x64, atol=1e-4)


def test_logistic_regression_sparse_normal_matrix_equals_the_dense_one(monkeypatch):
    # the exp, second-order and nonnegative groups of a logistic regression take the normal matrix
    # from A's zero pattern and factor it by eliminating the private columns first (cone_sparse); the
    # same solves with the dense forms: same iterations, same solutions (up to rounding), on a batch
    # with one A per element
    g = torch.Generator().manual_seed(7)
    progs = [_logistic(g, d=5, N=20) for _ in range(3)]
    A = torch.stack([p[0] for p in progs])
    b, c, cones = progs[0][1].expand(3, -1), torch.stack([p[2] for p in progs]), progs[0][3]
    spec = parse_cones(cones)
    groups = [(k, size, contiguous(idx)) for k, size, idx in spec.groups()]
    normal = NormalMatrix(DataMatrix(A), groups, _CONES)
    kinds = [kind for (kind, _, _), pre in zip(groups, normal.pre) if isinstance(pre, SparseGram)]
    assert kinds == ["l", "q", "ep"] and normal.elimination.comp.shape[1] == 3    # (t_i, u_i1, u_i2)
    solver = ConeInteriorPoint(rtol=1e-10)
    sparse = solver.solve(A, b, c, spec)
    monkeypatch.setattr(cone_gram, "sparse_gram", lambda *a: None)
    monkeypatch.setattr(cone_gram, "elimination", lambda *a: None)
    dense = solver.solve(A, b, c, spec)
    assert sparse.status.tolist() == dense.status.tolist() == [Status.SUCCESS] * 3
    assert sparse.iterations.tolist() == dense.iterations.tolist()
    for a, d in zip(sparse[:3], dense[:3]):
        assert torch.allclose(a, d, rtol=0, atol=1e-8 * (1 + float(d.abs().max())))
    for i in range(3):
        _check_optimal(A[i], b[i], c[i], sparse.x[i], sparse.y[i], sparse.s[i], 1e-8)


@pytest.mark.parametrize("r", [1, 2, 44, 45, 60])
def test_winv_t_on_few_and_many_columns_equals_the_dense_product(r):
    # elementwise below ATen's naive-bmm size (9r < 400), a batched matmul beyond: both Lᵀ V, on a
    # strided V (the interior point's columns come transposed)
    g = torch.Generator().manual_seed(r)
    s, y, mu, st = _state(g)
    V = torch.randn((s.shape[0], r) + s.shape[1:], generator=g, dtype=F64).permute(0, 2, 3, 1)
    ref = torch.einsum("bkji,bkjr->bkir", st[4], V)
    got = ExpCone.winv_t(st, V)
    assert got.shape == V.shape and float((got - ref).abs().max()) <= 1e-14 * float(ref.abs().max())
