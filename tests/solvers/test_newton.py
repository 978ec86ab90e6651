"""Newton: closed forms and scipy references, per-element independence, statuses, the returned LU."""

import pytest
import torch

import solver_problems
from solver_problems import scipy_root, tanh_map
from implicitdiff import InputError, Status
from implicitdiff.solvers.newton import batch_jacobian, newton

F64, F32 = torch.float64, torch.float32
DTYPES = [F64, F32]


def _gen():
    return torch.Generator().manual_seed(7)


def cube(y, theta):
    return y ** 3 - theta


def tanh_problem(g, batch, n, dtype, norm=0.8):
    return solver_problems.tanh_problem(g, batch, n, dtype, norm)


def tol(dtype):
    return 1e-10 if dtype == F64 else 1e-4


@pytest.mark.parametrize("dtype", DTYPES)
def test_cube_root_batched_and_0d(dtype):
    theta = torch.tensor([0.5, 8.0, 27.0, 1e3], dtype=dtype)
    res = newton(cube, torch.ones(4, dtype=dtype), (theta,), batch_dims=1)
    assert res.info.status.tolist() == [Status.SUCCESS] * 4
    assert torch.allclose(res.y, theta ** (1 / 3), rtol=tol(dtype), atol=0)
    assert (res.info.residual <= (1e-10 if dtype == F64 else 1e-6)).all()
    assert res.y.dtype == dtype and res.info.residual.dtype == dtype
    scalar = newton(cube, torch.tensor(1.0, dtype=dtype), (torch.tensor(5.0, dtype=dtype),))
    assert scalar.y.shape == () and scalar.info.status.shape == () and scalar.info.status == Status.SUCCESS
    assert torch.allclose(scalar.y, torch.tensor(5.0, dtype=dtype) ** (1 / 3), rtol=tol(dtype))
    assert scalar.jacobian.LU.shape == (1, 1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_system_with_event_dims_one_step(dtype):
    g = _gen()
    A = (torch.randn(3, 6, 6, generator=g, dtype=F64) + 4 * torch.eye(6, dtype=F64)).to(dtype)
    b = torch.randn(3, 2, 3, generator=g, dtype=F64).to(dtype)

    def F(y, A, b):   # y (3, 2, 3): each element is a 2x3 unknown acted on by a 6x6 matrix
        return (A @ y.reshape(3, 6, 1)).reshape(3, 2, 3) - b

    res = newton(F, torch.zeros(3, 2, 3, dtype=dtype), (A, b), batch_dims=1)
    expected = torch.linalg.solve(A.double(), b.double().reshape(3, 6)).reshape(3, 2, 3)
    assert res.info.status.tolist() == [Status.SUCCESS] * 3
    assert res.info.iterations.tolist() == [1, 1, 1]      # exact Newton on a linear F: one step
    assert torch.allclose(res.y.double(), expected, atol=tol(dtype) * 10, rtol=0)
    assert res.jacobian.LU.shape == (3, 6, 6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tanh_fixed_point_against_scipy(dtype):
    W, x = tanh_problem(_gen(), (4,), 5, dtype)
    res = newton(tanh_map, torch.zeros(4, 5, dtype=dtype), (W, x), batch_dims=1)
    assert res.info.status.tolist() == [Status.SUCCESS] * 4
    ref = torch.stack([scipy_root(W[i], x[i]) for i in range(4)])
    assert torch.allclose(res.y.double(), ref, atol=tol(dtype), rtol=0)


def _true_jacobian(W, x, y):
    return torch.stack([torch.autograd.functional.jacobian(lambda v: tanh_map(v, W[i], x[i]), y[i])
                        for i in range(y.shape[0])])


def test_returned_lu_is_the_jacobian_at_y():
    W, x = tanh_problem(_gen(), (3,), 4, F64)
    res = newton(tanh_map, torch.zeros(3, 4, dtype=F64), (W, x), batch_dims=1)
    J = _true_jacobian(W, x, res.y)
    B = torch.randn(3, 4, 2, generator=_gen(), dtype=F64)
    LU_, piv = torch.linalg.lu_factor(J)
    for adjoint in (False, True):
        ours = res.jacobian.solve(B, adjoint=adjoint)
        ref = torch.linalg.lu_solve(LU_, piv, B, adjoint=adjoint)
        assert torch.allclose(ours, ref, atol=1e-12, rtol=0)
    cond = torch.linalg.cond(J, p=1)
    # Hager's estimate is a lower bound, usually within a factor 3
    assert ((res.info.cond <= cond * (1 + 1e-10)) & (res.info.cond >= cond / 3)).all()


def test_batch_jacobian_matches_autograd_per_element():
    W, x = tanh_problem(_gen(), (2, 3), 4, F64)
    y = torch.randn(2, 3, 4, generator=_gen(), dtype=F64)
    J = batch_jacobian(lambda v: tanh_map(v, W, x), y)
    ref = _true_jacobian(W.reshape(6, 4, 4), x.reshape(6, 4), y.reshape(6, 4)).reshape(2, 3, 4, 4)
    assert torch.allclose(J, ref, atol=1e-14, rtol=0)


def test_elements_are_independent():
    theta = torch.tensor([1.5, 1e4, 2.0, 1e-3], dtype=F64)
    y0 = torch.tensor([1.0, 1.0, 1.3, 2.0], dtype=F64)
    res = newton(cube, y0, (theta,), batch_dims=1)
    assert len(set(res.info.iterations.tolist())) > 2          # different iteration counts...
    for i in range(4):                                           # ...each exactly as when solved alone
        alone = newton(cube, y0[i], (theta[i],))
        assert alone.info.iterations == res.info.iterations[i] and alone.info.status == res.info.status[i]
        assert torch.allclose(alone.y, res.y[i], rtol=1e-14, atol=0)


def test_nan_parameter_poisons_only_its_element():
    theta = torch.tensor([2.0, float("nan"), 3.0], dtype=F64)
    res = newton(cube, torch.ones(3, dtype=F64), (theta,), batch_dims=1)
    assert res.info.status.tolist() == [Status.SUCCESS, Status.NONFINITE, Status.SUCCESS]
    assert torch.allclose(res.y[[0, 2]], theta[[0, 2]] ** (1 / 3), rtol=1e-12)
    assert torch.isfinite(res.y).all()


def test_max_iterations_reports_its_residual():
    theta = torch.tensor([1e6, 1.0], dtype=F64)
    res = newton(cube, torch.tensor([1.0, 1.0], dtype=F64), (theta,), batch_dims=1, max_iter=2)
    assert res.info.status.tolist() == [Status.MAX_ITERATIONS, Status.SUCCESS]
    assert res.info.iterations.tolist() == [2, 0]
    r = (res.y[0] ** 3 - theta[0]).abs() / (1 - theta[0]).abs()
    assert torch.isclose(res.info.residual[0], r) and r > 1e-3


def test_line_search_rescues_arctan():
    # full Newton on atan(y) = 0 from |y0| > 1.39 overshoots and diverges
    y0 = torch.tensor([3.0, -2.0, 0.5], dtype=F64)
    res = newton(lambda y: torch.atan(y), y0, batch_dims=1)
    assert res.info.status.tolist() == [Status.SUCCESS] * 3
    assert (res.y.abs() <= 1e-10 * torch.atan(y0).abs()).all()     # the stopping rule, as atan(y) ≈ y
    plain = newton(lambda y: torch.atan(y), y0, batch_dims=1, line_search=False)
    assert plain.info.status[0] != Status.SUCCESS and plain.info.status[2] == Status.SUCCESS


def test_singular_jacobian_and_stagnation_statuses():
    # F = y² + 1 has no root: Newton lands on y = 0 where the Jacobian vanishes
    res = newton(lambda y: y ** 2 + 1, torch.tensor(1.0, dtype=F64))
    assert res.info.status == Status.SINGULAR and torch.isinf(res.info.cond)
    # a tolerance below the rounding floor: BREAKDOWN, not a silent success or a long stall
    g = _gen()
    M = torch.randn(6, 6, generator=g, dtype=F32)
    A, b = M @ M.T + torch.eye(6), torch.randn(6, generator=g, dtype=F32)
    stuck = newton(lambda y: A @ y - b, torch.zeros(6), rtol=1e-15)
    assert stuck.info.status == Status.BREAKDOWN and stuck.info.iterations < 20
    assert stuck.info.residual < 1e-5


def test_trace_and_callback():
    seen = []
    res = newton(cube, torch.ones(2, dtype=F64), (torch.tensor([8.0, 27.0], dtype=F64),), batch_dims=1,
                 trace=True, callback=lambda k, y, r: seen.append(k))
    k = int(res.info.iterations.max())
    assert res.trace.shape == (k + 1, 2) and seen == list(range(1, k + 1))
    assert torch.allclose(res.trace[0], torch.tensor([7.0, 26.0], dtype=F64))
    assert torch.allclose(res.trace[-1] / res.trace[0], res.info.residual)


def test_bad_params_argument():
    with pytest.raises(InputError, match="params must be a tuple"):
        newton(cube, torch.ones(2, dtype=F64), torch.ones(2, dtype=F64))
