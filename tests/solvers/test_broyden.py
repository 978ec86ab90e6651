"""Broyden: scipy/closed-form references, dense vs low-rank storage, independence, statuses."""

import importlib

import numpy as np
import pytest
import scipy.optimize
import torch

import solver_problems
from solver_problems import scipy_root, tanh_map
from implicitdiff import Status
from implicitdiff.solvers.broyden import broyden

F64, F32 = torch.float64, torch.float32
DTYPES = [F64, F32]
broyden_module = importlib.import_module("implicitdiff.solvers.broyden")


def _gen():
    return torch.Generator().manual_seed(11)


def tanh_problem(g, batch, n, dtype, norm=0.8):
    return solver_problems.tanh_problem(g, batch, n, dtype, norm)


def tol(dtype):
    return 1e-9 if dtype == F64 else 1e-4


@pytest.mark.parametrize("dtype", DTYPES)
def test_tanh_fixed_point_against_scipy(dtype):
    W, x = tanh_problem(_gen(), (4,), 8, dtype)
    res = broyden(tanh_map, torch.zeros(4, 8, dtype=dtype), (W, x), batch_dims=1)
    assert res.info.status.tolist() == [Status.SUCCESS] * 4
    assert (res.info.residual <= (1e-10 if dtype == F64 else 1e-6)).all()
    ref = torch.stack([scipy_root(W[i], x[i]) for i in range(4)])
    assert torch.allclose(res.y.double(), ref, atol=tol(dtype), rtol=0)
    # superlinear: far fewer iterations than the Picard contraction rate would need
    assert res.info.iterations.max() < 30


@pytest.mark.parametrize("dtype", DTYPES)
def test_scalar_and_0d(dtype):
    theta = torch.tensor([0.5, 3.0, 20.0], dtype=dtype)
    res = broyden(lambda y, t: y ** 3 - t, torch.ones(3, dtype=dtype), (theta,), batch_dims=1)
    assert res.info.status.tolist() == [Status.SUCCESS] * 3
    assert torch.allclose(res.y, theta ** (1 / 3), rtol=tol(dtype))
    # 0-d: the Dottie number, cos(y) = y
    dottie = scipy.optimize.brentq(lambda v: np.cos(v) - v, 0.0, 1.0, xtol=1e-15)
    res0 = broyden(lambda y: torch.cos(y) - y, torch.tensor(0.0, dtype=dtype))
    assert res0.y.shape == () and res0.info.status == Status.SUCCESS
    assert abs(float(res0.y) - dottie) < tol(dtype)


def test_linear_system():
    g = _gen()
    A = torch.randn(2, 5, 5, generator=g, dtype=F64) + 4 * torch.eye(5, dtype=F64)
    b = torch.randn(2, 5, generator=g, dtype=F64)
    res = broyden(lambda y, A, b: (A @ y.unsqueeze(-1)).squeeze(-1) - b, torch.zeros(2, 5, dtype=F64), (A, b),
                  batch_dims=1)
    assert res.info.status.tolist() == [Status.SUCCESS] * 2
    assert torch.allclose(res.y, torch.linalg.solve(A, b), atol=1e-9)
    # Broyden's method is exact on linear problems after at most 2n steps (Gay, 1979)
    assert res.info.iterations.max() <= 2 * 5 + 1


def test_low_rank_storage_gives_the_same_iterates(monkeypatch):
    W, x = tanh_problem(_gen(), (3,), 6, F64)
    dense = broyden(tanh_map, torch.zeros(3, 6, dtype=F64), (W, x), batch_dims=1, trace=True)
    monkeypatch.setattr(broyden_module, "_DENSE_MAX", 0)
    low = broyden(tanh_map, torch.zeros(3, 6, dtype=F64), (W, x), batch_dims=1, trace=True)
    assert torch.equal(dense.info.iterations, low.info.iterations)
    assert torch.allclose(dense.y, low.y, atol=1e-13, rtol=0)
    assert torch.allclose(dense.trace, low.trace, rtol=1e-6, atol=1e-13)


def test_elements_are_independent():
    W, x = tanh_problem(_gen(), (4,), 5, F64)
    W = W * torch.tensor([0.1, 1.0, 0.5, 1.2], dtype=F64).reshape(4, 1, 1)   # different difficulty
    res = broyden(tanh_map, torch.zeros(4, 5, dtype=F64), (W, x), batch_dims=1)
    assert len(set(res.info.iterations.tolist())) > 1
    for i in range(4):
        alone = broyden(tanh_map, torch.zeros(5, dtype=F64), (W[i], x[i]))
        assert alone.info.iterations == res.info.iterations[i] and alone.info.status == res.info.status[i]
        assert torch.allclose(alone.y, res.y[i], atol=1e-13, rtol=0)


def test_nan_parameter_poisons_only_its_element():
    W, x = tanh_problem(_gen(), (3,), 4, F64)
    x = x.clone()
    x[1, 2] = float("nan")
    res = broyden(tanh_map, torch.zeros(3, 4, dtype=F64), (W, x), batch_dims=1)
    assert res.info.status.tolist() == [Status.SUCCESS, Status.NONFINITE, Status.SUCCESS]
    for i in (0, 2):
        assert torch.allclose(res.y[i], scipy_root(W[i], x[i]), atol=1e-9)


def test_max_iterations_and_divergence():
    W, x = tanh_problem(_gen(), (2,), 4, F64)
    res = broyden(tanh_map, torch.zeros(2, 4, dtype=F64), (W, x), batch_dims=1, max_iter=2)
    assert res.info.status.tolist() == [Status.MAX_ITERATIONS] * 2
    assert res.info.iterations.tolist() == [2, 2]
    assert torch.allclose(res.info.residual, tanh_map(res.y, W, x).norm(dim=-1) / tanh_map(
        torch.zeros(2, 4, dtype=F64), W, x).norm(dim=-1))
    # y² + 1 = 0 has no real root (‖F‖ ≥ 1): whatever the iterates do, never a success
    bad = broyden(lambda y: y ** 2 + 1, torch.tensor([1.0, 3.0], dtype=F64), batch_dims=1, max_iter=60)
    assert set(bad.info.status.tolist()) <= {Status.MAX_ITERATIONS, Status.DIVERGED, Status.NONFINITE}
    assert (bad.info.residual >= 0.09).all()        # ‖F(y)‖ ≥ 1 and ‖F(y0)‖ ≤ 10


def test_trace():
    W, x = tanh_problem(_gen(), (2,), 4, F64)
    res = broyden(tanh_map, torch.zeros(2, 4, dtype=F64), (W, x), batch_dims=1, trace=True)
    assert res.trace.shape == (int(res.info.iterations.max()) + 1, 2)
    assert torch.allclose(res.trace[-1] / res.trace[0], res.info.residual)
