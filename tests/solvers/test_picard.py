"""Picard: references, damping, divergence, independence, statuses."""

import math

import numpy as np
import pytest
import scipy.optimize
import torch

import solver_problems
from solver_problems import scipy_root, tanh_map
from implicitdiff import InputError, Status
from implicitdiff.solvers.picard import picard

F64, F32 = torch.float64, torch.float32
DTYPES = [F64, F32]


def tanh_problem(batch, n, dtype, norm=0.5):
    return solver_problems.tanh_problem(torch.Generator().manual_seed(3), batch, n, dtype, norm)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tanh_fixed_point_against_scipy(dtype):
    W, x = tanh_problem((3,), 6, dtype)
    res = picard(tanh_map, torch.zeros(3, 6, dtype=dtype), (W, x), batch_dims=1)
    assert res.info.status.tolist() == [Status.SUCCESS] * 3
    ref = torch.stack([scipy_root(W[i], x[i]) for i in range(3)])
    # ‖y − y*‖ ≤ ‖F(y)‖ / (1 − L) with Lipschitz constant L ≤ 0.5 of the map
    bound = 2 * res.info.residual * tanh_map(torch.zeros(3, 6, dtype=dtype), W, x).norm(dim=-1)
    assert ((res.y.double() - ref).norm(dim=-1) <= bound.double() + (1e-5 if dtype == F32 else 1e-14)).all()
    # linear convergence at rate ≤ 0.5: at most log2(1/rtol) + 1 iterations
    rtol = 1e-10 if dtype == F64 else 1e-6
    assert (res.info.iterations <= math.ceil(math.log2(1 / rtol)) + 1).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_0d(dtype):
    dottie = scipy.optimize.brentq(lambda v: np.cos(v) - v, 0.0, 1.0, xtol=1e-15)
    res = picard(lambda y: torch.cos(y) - y, torch.tensor(0.0, dtype=dtype), beta=0.6)
    assert res.y.shape == () and res.info.status == Status.SUCCESS
    assert abs(float(res.y) - dottie) < (1e-9 if dtype == F64 else 1e-5)


def test_damping_turns_an_oscillation_into_convergence():
    # y ← y + β·(−2)(y − c): β = 1 flips y ↦ 2c − y forever, β = 0.5 lands on c in one step
    c = torch.tensor([1.0, -2.0], dtype=F64)
    F = lambda y: -2.0 * (y - c)  # noqa: E731
    stuck = picard(F, torch.zeros(2, dtype=F64), max_iter=25)
    assert stuck.info.status == Status.MAX_ITERATIONS and stuck.info.iterations == 25
    assert torch.isclose(stuck.info.residual, torch.tensor(1.0, dtype=F64))
    damped = picard(F, torch.zeros(2, dtype=F64), beta=0.5)
    assert damped.info.status == Status.SUCCESS and damped.info.iterations == 1 and torch.equal(damped.y, c)


def test_divergence_is_reported():
    # y ← 2y − 1 from y0 = 2: ‖F(y_k)‖ = 2^k, diverged once 2^k > 1e8
    res = picard(lambda y: y - 1.0, torch.tensor([2.0, 1.0], dtype=F64), batch_dims=1)
    assert res.info.status.tolist() == [Status.DIVERGED, Status.SUCCESS]
    assert res.info.iterations.tolist() == [math.ceil(math.log2(1e8)), 0]


def test_elements_are_independent_and_nan_is_contained():
    W, x = tanh_problem((4,), 5, F64)
    W = W * torch.tensor([0.1, 1.0, 1.8, 1.0], dtype=F64).reshape(4, 1, 1)
    x = x.clone()
    x[3, 0] = float("nan")
    res = picard(tanh_map, torch.zeros(4, 5, dtype=F64), (W, x), batch_dims=1)
    assert res.info.status.tolist() == [Status.SUCCESS] * 3 + [Status.NONFINITE]
    assert len(set(res.info.iterations[:3].tolist())) == 3
    for i in range(3):
        alone = picard(tanh_map, torch.zeros(5, dtype=F64), (W[i], x[i]))
        assert alone.info.iterations == res.info.iterations[i]
        assert torch.allclose(alone.y, res.y[i], atol=1e-14, rtol=0)   # batched matmul may round differently


def test_max_iterations_and_bad_input():
    W, x = tanh_problem((2,), 4, F64)
    res = picard(tanh_map, torch.zeros(2, 4, dtype=F64), (W, x), batch_dims=1, max_iter=2)
    assert res.info.status.tolist() == [Status.MAX_ITERATIONS] * 2 and res.info.iterations.tolist() == [2, 2]
    with pytest.raises(InputError, match="beta"):
        picard(tanh_map, torch.zeros(2, 4, dtype=F64), (W, x), batch_dims=1, beta=-1.0)
    with pytest.raises(InputError, match=r"F\(y, \*params\) must return a tensor of y's shape \(4,\), got \(2,\)"):
        picard(lambda y: y[:2], torch.zeros(4, dtype=F64))
    with pytest.raises(InputError, match="y0 has dtype torch.int64"):
        picard(lambda y: y, torch.zeros(4, dtype=torch.int64))


def test_differentiable_run_keeps_no_graph_in_info_and_refuses_a_recorder():
    # Unroll's solve (differentiable=True) is differentiable through y; its info holds plain numbers
    from implicitdiff.implicit.speculation import Recorder

    x = torch.tensor([0.5, -1.0], dtype=torch.float64, requires_grad=True)
    res = picard(lambda y, x: 0.5 * torch.cos(y) + x - y, torch.zeros(2, dtype=torch.float64), (x,),
                 batch_dims=1, differentiable=True)
    assert res.y.requires_grad and not res.info.residual.requires_grad
    with pytest.raises(InputError, match="recorder= .* does not apply with differentiable=True"):
        picard(lambda y, x: 0.5 * torch.cos(y) + x - y, torch.zeros(2, dtype=torch.float64), (x,),
               differentiable=True, recorder=Recorder(None, ()))
