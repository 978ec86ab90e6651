"""Anderson mixing: references, acceleration over Picard, rank-deficient histories, independence, statuses."""

import numpy as np
import pytest
import scipy.optimize
import torch

import solver_problems
from solver_problems import scipy_root, tanh_map
from implicitdiff import InputError, Status
from implicitdiff.solvers.anderson import anderson
from implicitdiff.solvers.picard import picard

F64, F32 = torch.float64, torch.float32
DTYPES = [F64, F32]


def _gen():
    return torch.Generator().manual_seed(5)


def tanh_problem(g, batch, n, dtype, norm=0.9):
    return solver_problems.tanh_problem(g, batch, n, dtype, norm)


def tol(dtype):
    return 1e-9 if dtype == F64 else 1e-4


@pytest.mark.parametrize("dtype", DTYPES)
def test_tanh_fixed_point_against_scipy(dtype):
    W, x = tanh_problem(_gen(), (4,), 8, dtype)
    res = anderson(tanh_map, torch.zeros(4, 8, dtype=dtype), (W, x), batch_dims=1)
    assert res.info.status.tolist() == [Status.SUCCESS] * 4
    assert (res.info.residual <= (1e-10 if dtype == F64 else 1e-6)).all()
    ref = torch.stack([scipy_root(W[i], x[i]) for i in range(4)])
    assert torch.allclose(res.y.double(), ref, atol=tol(dtype), rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_0d(dtype):
    dottie = scipy.optimize.brentq(lambda v: np.cos(v) - v, 0.0, 1.0, xtol=1e-15)
    res = anderson(lambda y: torch.cos(y) - y, torch.tensor(0.0, dtype=dtype))
    assert res.y.shape == () and res.info.status == Status.SUCCESS
    assert abs(float(res.y) - dottie) < tol(dtype)


def test_accelerates_a_slow_linear_contraction():
    # y = M y + c with spectral radius 0.95: Picard needs ~ log(1e-10)/log(0.95) ≈ 450 steps
    g = _gen()
    Q, _ = torch.linalg.qr(torch.randn(10, 10, generator=g, dtype=F64))
    M = Q @ torch.diag(torch.linspace(-0.95, 0.95, 10, dtype=F64)) @ Q.T
    c = torch.randn(10, generator=g, dtype=F64)
    F = lambda y: M @ y + c - y  # noqa: E731
    exact = torch.linalg.solve(torch.eye(10, dtype=F64) - M, c)
    fast = anderson(F, torch.zeros(10, dtype=F64), m=10, max_iter=200)
    slow = picard(F, torch.zeros(10, dtype=F64), max_iter=2000)
    assert fast.info.status == Status.SUCCESS and slow.info.status == Status.SUCCESS
    assert torch.allclose(fast.y, exact, atol=1e-8) and torch.allclose(slow.y, exact, atol=1e-8)
    assert fast.info.iterations * 10 < slow.info.iterations


@pytest.mark.parametrize("lam", [1e-4, 0.0])
def test_rank_deficient_history_does_not_crash(lam, monkeypatch):
    # F(y) = (c − y) φ(‖c − y‖) keeps every iterate on the segment y0 → c, so all differences
    # in the history are parallel (rank one); one element starts at its solution (zero history)
    failures = []
    cholesky_ex = torch.linalg.cholesky_ex

    def counting(A):
        L, info = cholesky_ex(A)
        failures.append(int((info != 0).sum()))
        return L, info

    monkeypatch.setattr(torch.linalg, "cholesky_ex", counting)
    g = _gen()
    c = torch.randn(3, 6, generator=g, dtype=F64)
    y0 = torch.zeros(3, 6, dtype=F64)
    y0[2] = c[2]

    def F(y, c):
        r = c - y
        return r * 0.5 * (1 + 0.5 * torch.sin(r.norm(dim=-1, keepdim=True)))

    res = anderson(F, y0, (c,), batch_dims=1, m=5, lam=lam)
    assert res.info.status.tolist() == [Status.SUCCESS] * 3
    assert res.info.iterations[2] == 0
    assert torch.allclose(res.y, c, atol=1e-9)
    if lam == 0.0:     # unregularized: the singular normal equations fail and the Picard fallback runs
        assert sum(failures) > 0
    else:              # regularized: the normal matrix is always positive definite
        assert sum(failures) == 0
    # a rank-one linear part repeated in every coordinate
    A = torch.ones(6, 6, dtype=F64) / 6
    res2 = anderson(lambda y: -(y + A @ y) + 1.0, torch.zeros(6, dtype=F64), m=5, lam=lam)
    assert res2.info.status == Status.SUCCESS
    assert torch.allclose(res2.y, torch.linalg.solve(torch.eye(6, dtype=F64) + A, torch.ones(6, dtype=F64)),
                          atol=1e-9)


def test_damping_and_short_history():
    W, x = tanh_problem(_gen(), (2,), 5, F64)
    for m, beta in [(1, 1.0), (3, 0.5)]:
        res = anderson(tanh_map, torch.zeros(2, 5, dtype=F64), (W, x), batch_dims=1, m=m, beta=beta)
        assert res.info.status.tolist() == [Status.SUCCESS] * 2
        assert torch.allclose(res.y, torch.stack([scipy_root(W[i], x[i]) for i in range(2)]), atol=1e-9)


def test_elements_are_independent():
    W, x = tanh_problem(_gen(), (4,), 5, F64)
    W = W * torch.tensor([0.05, 1.0, 0.5, 1.05], dtype=F64).reshape(4, 1, 1)
    res = anderson(tanh_map, torch.zeros(4, 5, dtype=F64), (W, x), batch_dims=1)
    assert len(set(res.info.iterations.tolist())) > 1
    for i in range(4):
        alone = anderson(tanh_map, torch.zeros(5, dtype=F64), (W[i], x[i]))
        assert alone.info.iterations == res.info.iterations[i] and alone.info.status == res.info.status[i]
        assert torch.allclose(alone.y, res.y[i], atol=1e-13, rtol=0)


def test_nan_parameter_poisons_only_its_element():
    W, x = tanh_problem(_gen(), (3,), 4, F32)
    W = W.clone()
    W[0, 1, 1] = float("inf")
    res = anderson(tanh_map, torch.zeros(3, 4), (W, x), batch_dims=1)
    assert res.info.status.tolist() == [Status.NONFINITE, Status.SUCCESS, Status.SUCCESS]
    for i in (1, 2):
        assert torch.allclose(res.y[i].double(), scipy_root(W[i], x[i]), atol=1e-4)


def test_max_iterations_and_options():
    W, x = tanh_problem(_gen(), (2,), 4, F64)
    res = anderson(tanh_map, torch.zeros(2, 4, dtype=F64), (W, x), batch_dims=1, max_iter=3)
    assert res.info.status.tolist() == [Status.MAX_ITERATIONS] * 2 and res.info.iterations.tolist() == [3, 3]
    assert (res.info.residual > 1e-10).all()
    for bad, match in [(dict(m=0), "m must"), (dict(beta=0.0), "beta"), (dict(lam=-1.0), "lam")]:
        with pytest.raises(InputError, match=match):
            anderson(tanh_map, torch.zeros(2, 4, dtype=F64), (W, x), batch_dims=1, **bad)


def reference_anderson(F, y0, iters, m, beta, lam):
    """Anderson type II from its definition, one element, the last m differences as columns."""
    y, g = y0.clone(), F(y0)
    dY, dG, out = [], [], []
    for _ in range(iters):
        if dG:
            Gm, Ym = torch.stack(dG, -1), torch.stack(dY, -1)                  # (n, m_k)
            A = Gm.T @ Gm
            A = A + (lam * A.diagonal().max() + torch.finfo(y.dtype).tiny) * torch.eye(A.shape[0], dtype=y.dtype)
            gamma = torch.linalg.solve(A, Gm.T @ g)
            y_new = y + beta * g - (Ym + beta * Gm) @ gamma
        else:
            y_new = y + beta * g
        g_new = F(y_new)
        dY, dG = (dY + [y_new - y])[-m:], (dG + [g_new - g])[-m:]
        y, g = y_new, g_new
        out.append(y)
    return torch.stack(out)


@pytest.mark.parametrize("m, beta", [(3, 1.0), (2, 0.7), (6, 1.0)])
def test_iterates_match_the_definition(m, beta):
    # the incremental Gram matrix, the ring of differences and the partial history before it is
    # full give the iterates of the textbook formula (past the wrap-around of the ring)
    W, x = tanh_problem(_gen(), (3,), 6, F64, norm=1.4)       # not a contraction: Anderson does the work
    seen = []
    anderson(tanh_map, torch.zeros(3, 6, dtype=F64), (W, x), batch_dims=1, m=m, beta=beta, rtol=0.0,
             max_iter=12, callback=lambda k, y, r: seen.append(y.clone()))
    assert len(seen) == 12
    for i in range(3):
        ref = reference_anderson(lambda y: tanh_map(y, W[i], x[i]), torch.zeros(6, dtype=F64), 12, m, beta, 1e-4)
        assert torch.allclose(torch.stack(seen)[:, i], ref, atol=1e-11, rtol=1e-9)
        alone = []
        anderson(tanh_map, torch.zeros(6, dtype=F64), (W[i], x[i]), m=m, beta=beta, rtol=0.0, max_iter=12,
                 callback=lambda k, y, r: alone.append(y.clone()))
        assert torch.allclose(torch.stack(alone), ref, atol=1e-11, rtol=1e-9)


def _slow_linear(seed=5, n=10, rho=0.95):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    M = Q @ torch.diag(torch.linspace(-rho, rho, n, dtype=F64)) @ Q.T
    c = torch.randn(n, generator=g, dtype=F64)
    return M, c


def test_lazy_start_is_picard_on_a_fast_contraction():
    # every step shrinks the residual by ≤ 0.5 (‖W‖ = 0.3, |tanh′| ≤ 1): no mixing, Picard's iterates
    W, x = tanh_problem(_gen(), (3,), 6, F64, norm=0.3)
    lazy, plain = [], []
    res = anderson(tanh_map, torch.zeros(3, 6, dtype=F64), (W, x), batch_dims=1, start_rate=0.5,
                   callback=lambda k, y, r: lazy.append(y.clone()))
    ref = picard(tanh_map, torch.zeros(3, 6, dtype=F64), (W, x), batch_dims=1,
                 callback=lambda k, y, r: plain.append(y.clone()))
    assert res.info.status.tolist() == [Status.SUCCESS] * 3
    assert res.info.iterations.tolist() == ref.info.iterations.tolist()
    assert torch.equal(torch.stack(lazy), torch.stack(plain))
    # eager mixing (the default) takes other iterates to the same root
    eager = anderson(tanh_map, torch.zeros(3, 6, dtype=F64), (W, x), batch_dims=1)
    assert not torch.equal(eager.y, res.y) and torch.allclose(eager.y, res.y, atol=1e-9)


@pytest.mark.parametrize("batched", [False, True])
def test_lazy_start_mixes_on_a_slow_contraction(batched):
    # the residual shrinks by 0.86–0.95 per step, above start_rate = 0.9 within a few steps: then
    # mixing starts and converges about as fast as eager Anderson, ≥ 10× faster than Picard
    M, c = _slow_linear()
    F = lambda y: y @ M.T + c - y  # noqa: E731
    y0 = torch.zeros((2, 10) if batched else (10,), dtype=F64)
    kw = dict(batch_dims=1) if batched else {}
    lazy = anderson(F, y0, m=10, max_iter=200, start_rate=0.9, **kw)
    eager = anderson(F, y0, m=10, max_iter=200, **kw)
    slow = picard(F, y0, max_iter=2000, **kw)
    exact = torch.linalg.solve(torch.eye(10, dtype=F64) - M, c)
    for res in (lazy, eager, slow):
        assert bool((res.info.status == Status.SUCCESS).all())
        assert torch.allclose(res.y, exact.expand_as(res.y), atol=1e-8)
    assert bool((lazy.info.iterations <= eager.info.iterations + 4).all())
    assert bool((lazy.info.iterations * 10 < slow.info.iterations).all())


def test_lazy_start_zero_is_eager_and_bad_values_raise():
    W, x = tanh_problem(_gen(), (2,), 5, F64, norm=1.2)
    a = anderson(tanh_map, torch.zeros(2, 5, dtype=F64), (W, x), batch_dims=1, rtol=0.0, max_iter=9)
    b = anderson(tanh_map, torch.zeros(2, 5, dtype=F64), (W, x), batch_dims=1, rtol=0.0, max_iter=9, start_rate=0.0)
    assert torch.equal(a.y, b.y)
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(InputError, match="start_rate"):
            anderson(tanh_map, torch.zeros(2, 5, dtype=F64), (W, x), batch_dims=1, start_rate=bad)


def test_lazy_start_mixes_once_half_the_budget_is_spent():
    # per-step rate ≤ 0.78 (below start_rate = 0.8, so the rate never starts the mixing), rtol 1e-13:
    # Picard needs ~120 steps, more than max_iter = 100; the lazy start mixes from step 50 on
    M, c = _slow_linear(seed=7, rho=0.78)
    F = lambda y: M @ y + c - y  # noqa: E731
    y0 = torch.zeros(10, dtype=F64)
    assert picard(F, y0, rtol=1e-13, max_iter=100).info.status == Status.MAX_ITERATIONS
    seen = []
    lazy = anderson(F, y0, m=5, rtol=1e-13, max_iter=100, start_rate=0.8,
                    callback=lambda k, y, r: seen.append(y.clone()))
    assert lazy.info.status == Status.SUCCESS and 50 < lazy.info.iterations < 100
    torch.testing.assert_close(lazy.y, torch.linalg.solve(torch.eye(10, dtype=F64) - M, c), rtol=0, atol=1e-11)
    plain = []
    picard(F, y0, rtol=0.0, max_iter=50, callback=lambda k, y, r: plain.append(y.clone()))
    assert torch.equal(torch.stack(seen[:50]), torch.stack(plain))  # Picard's iterates up to there
