"""L-BFGS: closed forms and scipy references, independence, statuses, input checks."""

import numpy as np
import pytest
import scipy.optimize
import torch

from implicitdiff import InputError, Status
from implicitdiff.solvers.lbfgs import lbfgs

F64, F32 = torch.float64, torch.float32
DTYPES = [F64, F32]


def _gen():
    return torch.Generator().manual_seed(2)


def quadratic(y, A, b):
    """``½ yᵀAy − bᵀy`` per element: ``(*batch, n) -> (*batch,)``."""
    return 0.5 * (y * (A @ y.unsqueeze(-1)).squeeze(-1)).sum(-1) - (b * y).sum(-1)


def rosenbrock(y, a):
    """Minimum at ``(a, a²)``."""
    return (a - y[..., 0]) ** 2 + 100 * (y[..., 1] - y[..., 0] ** 2) ** 2


def rtol(dtype):
    return 1e-10 if dtype == F64 else 1e-6


@pytest.mark.parametrize("dtype", DTYPES)
def test_quadratic_batched(dtype):
    g = _gen()
    M = torch.randn(3, 6, 6, generator=g, dtype=F64)
    A = (M @ M.mT + torch.eye(6, dtype=F64)).to(dtype)
    b = torch.randn(3, 6, generator=g, dtype=F64).to(dtype)
    res = lbfgs(quadratic, torch.zeros(3, 6, dtype=dtype), (A, b), batch_dims=1)
    assert res.info.status.tolist() == [Status.SUCCESS] * 3
    assert (res.info.residual <= rtol(dtype)).all()
    exact = torch.linalg.solve(A.double(), b.double())
    # ‖y − y*‖ ≤ ‖∇f(y)‖ / λ_min(A), and ‖∇f(y0)‖ = ‖b‖
    lam_min = torch.linalg.eigvalsh(A.double())[..., 0]
    bound = res.info.residual.double() * b.double().norm(dim=-1) / lam_min
    slack = 1e-13 if dtype == F64 else 1e-4
    assert ((res.y.double() - exact).norm(dim=-1) <= bound * (1 + 1e-6) + slack).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_rosenbrock_batched(dtype):
    a = torch.tensor([1.0, 2.0, -1.0], dtype=dtype)
    y0 = torch.tensor([-1.2, 1.0], dtype=dtype).expand(3, 2).clone()
    res = lbfgs(rosenbrock, y0, (a,), batch_dims=1)
    assert res.info.status.tolist() == [Status.SUCCESS] * 3
    expected = torch.stack([a, a ** 2], dim=-1)
    assert torch.allclose(res.y, expected, atol=1e-7 if dtype == F64 else 2e-3)


def test_logistic_regression_against_scipy():
    g = _gen()
    X = torch.randn(40, 5, generator=g, dtype=F64)
    t = (torch.rand(40, generator=g, dtype=F64) < 0.5).to(F64)
    lams = torch.tensor([0.1, 1.0, 10.0], dtype=F64)

    def f(w, lam):   # w (3, 5): one problem per regularization strength
        z = w @ X.T
        return torch.nn.functional.softplus(z).sum(-1) - (z * t).sum(-1) + 0.5 * lam * (w ** 2).sum(-1)

    res = lbfgs(f, torch.zeros(3, 5, dtype=F64), (lams,), batch_dims=1)
    assert res.info.status.tolist() == [Status.SUCCESS] * 3
    Xn, tn = X.numpy(), t.numpy()
    for i, lam in enumerate(lams.tolist()):
        def obj(w):
            z = Xn @ w
            return np.logaddexp(0, z).sum() - z @ tn + 0.5 * lam * w @ w, Xn.T @ (1 / (1 + np.exp(-z)) - tn) + lam * w
        ref = scipy.optimize.minimize(obj, np.zeros(5), jac=True, method="BFGS", options={"gtol": 1e-12})
        w = ref.x
        for _ in range(3):  # BFGS may stop at "precision loss" near 1e-9: Newton polishes the reference
            p = 1 / (1 + np.exp(-(Xn @ w)))
            H = Xn.T @ (Xn * (p * (1 - p))[:, None]) + lam * np.eye(5)
            w = w - np.linalg.solve(H, obj(w)[1])
        assert np.abs(obj(w)[1]).max() < 1e-12
        assert torch.allclose(res.y[i], torch.from_numpy(w), atol=1e-8)


@pytest.mark.parametrize("dtype", DTYPES)
def test_0d(dtype):
    t = torch.tensor(1.7, dtype=dtype)
    res = lbfgs(lambda y, t: torch.cosh(y - t), torch.tensor(-0.5, dtype=dtype), (t,))
    assert res.y.shape == () and res.info.status == Status.SUCCESS and res.info.status.shape == ()
    # ∇f = sinh(y − t) ≈ y − t: the stopping rule bounds the error
    slack = 0.0 if dtype == F64 else 1e-6
    assert abs(float(res.y - t)) <= rtol(dtype) * float(torch.sinh(t + 0.5)) * 1.01 + slack


def test_elements_are_independent_and_nan_is_contained():
    a = torch.tensor([1.0, float("nan"), 0.5, 3.0], dtype=F64)
    y0 = torch.tensor([[-1.2, 1.0], [0.0, 0.0], [0.4, 0.3], [2.0, 2.0]], dtype=F64)
    res = lbfgs(rosenbrock, y0, (a,), batch_dims=1)
    assert res.info.status.tolist() == [Status.SUCCESS, Status.NONFINITE, Status.SUCCESS, Status.SUCCESS]
    assert len(set(res.info.iterations[[0, 2, 3]].tolist())) == 3
    assert torch.isfinite(res.y).all()
    for i in (0, 2, 3):
        alone = lbfgs(rosenbrock, y0[i], (a[i],))
        assert alone.info.iterations == res.info.iterations[i]
        # the unbatched host path rounds the m × m algebra differently: same steps, iterates to rounding
        assert torch.allclose(alone.y, res.y[i], atol=1e-11, rtol=0)


def test_max_iterations_breakdown_and_trace():
    a = torch.tensor([1.0, 2.0], dtype=F64)
    y0 = torch.tensor([-1.2, 1.0], dtype=F64).expand(2, 2).clone()
    res = lbfgs(rosenbrock, y0, (a,), batch_dims=1, max_iter=5, trace=True)
    assert res.info.status.tolist() == [Status.MAX_ITERATIONS] * 2 and res.info.iterations.tolist() == [5, 5]
    grad0 = torch.func.vmap(torch.func.grad(rosenbrock))(y0, a)
    assert torch.allclose(res.trace[0], grad0.norm(dim=-1))      # the residual is the gradient norm
    assert torch.allclose(res.trace[-1] / res.trace[0], res.info.residual)
    # a gradient tolerance below float32 rounding: reported as BREAKDOWN, quickly
    g = _gen()
    M = torch.randn(6, 6, generator=g)
    A, b = M @ M.T + torch.eye(6), torch.randn(6, generator=g)
    stuck = lbfgs(lambda y: 0.5 * y @ A @ y - b @ y, torch.zeros(6), rtol=1e-15)
    assert stuck.info.status == Status.BREAKDOWN and stuck.info.iterations < 150
    assert stuck.info.residual < 1e-5


def test_bad_input():
    y0 = torch.zeros(3, 2, dtype=F64)
    with pytest.raises(InputError, match=r"one objective per batch element, shape \(3,\) \(batch_dims=1\), got \(\)"):
        lbfgs(lambda y: (y ** 2).sum(), y0, batch_dims=1)
    with pytest.raises(InputError, match=r"shape \(\) \(batch_dims=0\), got \(3,\)"):
        lbfgs(lambda y: (y ** 2).sum(-1), y0)
    with pytest.raises(InputError, match="history"):
        lbfgs(lambda y: (y ** 2).sum(), y0, history=0)
    with pytest.raises(InputError, match="f must be a callable"):
        lbfgs(None, y0)


def reference_lbfgs(fun, y0, iters, m):
    """The documented algorithm for one element with the two-loop recursion (Nocedal & Wright,
    Algorithm 7.4) instead of the compact form; the iterate after each iteration (trial)."""
    eps = torch.finfo(y0.dtype).eps

    def value_grad(y):
        y = y.detach().requires_grad_()
        v = fun(y)
        return v.detach(), torch.autograd.grad(v, y)[0]

    y = y0.clone()
    v, g = value_grad(y)
    S, R, h0 = [], [], 1 / g.norm()
    need, out = True, []
    for _ in range(iters):
        if need:
            q, a = g.clone(), []
            for s, r in reversed(list(zip(S, R))):
                a.append((s @ q) / (s @ r))
                q = q - a[-1] * r
            z = h0 * q
            for (s, r), ai in zip(zip(S, R), reversed(a)):
                z = z + (ai - (r @ z) / (s @ r)) * s
            d, alpha = -z, 1.0
            if not g @ d < 0:
                d = -h0 * g
        slope = g @ d
        yt = y + alpha * d
        vt, gt = value_grad(yt)
        armijo = vt <= v + 1e-4 * alpha * slope
        wolfe = vt <= v + 1e4 * eps * abs(v) and gt @ d <= (1 - 2e-4) * abs(slope)
        if armijo or wolfe:
            s, r = alpha * d, gt - g
            if s @ r > eps * s.norm() * r.norm():
                S, R, h0 = (S + [s])[-m:], (R + [r])[-m:], (s @ r) / (r @ r)
            y, g, v, need = yt, gt, vt, True
        else:
            t = -slope * alpha ** 2 / (2 * (vt - v - slope * alpha))
            t = t if torch.isfinite(t) and t > 0 else 0.1 * alpha
            alpha, need = min(max(float(t), 0.1 * alpha), 0.5 * alpha), False
        out.append(y)
    return torch.stack(out)


@pytest.mark.parametrize("history", [1, 3, 10])
def test_iterates_match_the_two_loop_recursion(history):
    # compact representation, ring of pairs (past its wrap-around), skipped trials and the unbatched
    # host path against the two-loop formula: Rosenbrock backtracks, the logistic loss does not
    a = torch.tensor([1.0, 2.0], dtype=F64)
    y0 = torch.tensor([[-1.2, 1.0], [0.5, -0.3]], dtype=F64)
    seen = []
    lbfgs(rosenbrock, y0, (a,), batch_dims=1, history=history, rtol=0.0, max_iter=16,
          callback=lambda k, y, r: seen.append(y.clone()))
    for i in range(2):
        ref = reference_lbfgs(lambda y: rosenbrock(y, a[i]), y0[i], 16, history)
        assert torch.allclose(torch.stack(seen)[:, i], ref, atol=1e-10, rtol=1e-8)
        alone = []
        lbfgs(rosenbrock, y0[i], (a[i],), history=history, rtol=0.0, max_iter=16,
              callback=lambda k, y, r: alone.append(y.clone()))
        assert torch.allclose(torch.stack(alone), ref, atol=1e-10, rtol=1e-8)
    g = _gen()
    X = torch.randn(30, 8, generator=g, dtype=F64)
    t = (torch.rand(30, generator=g, dtype=F64) < 0.5).to(F64)

    def loss(w):
        z = w @ X.T
        return torch.nn.functional.softplus(z).sum(-1) - (z * t).sum(-1) + 0.05 * (w ** 2).sum(-1)

    seen = []
    lbfgs(loss, torch.zeros(8, dtype=F64), history=history, rtol=0.0, max_iter=12,
          callback=lambda k, y, r: seen.append(y.clone()))
    assert torch.allclose(torch.stack(seen), reference_lbfgs(loss, torch.zeros(8, dtype=F64), 12, history),
                          atol=1e-11, rtol=1e-9)


def test_unbatched_host_path_equals_the_masked_path():
    # check_every = 2 runs the masked (batched) step on the unbatched problem: the same decisions, so the
    # same iteration count and iterates equal up to the rounding of the host path's m × m algebra
    A = torch.tensor([[3.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.5, 1.0]], dtype=F64)
    f = lambda y: 0.25 * (y ** 4).sum() + 0.5 * y @ A @ y - y.sum()  # noqa: E731
    host = lbfgs(f, torch.zeros(3, dtype=F64), trace=True)
    masked = lbfgs(f, torch.zeros(3, dtype=F64), trace=True, check_every=2)
    assert host.info.status == masked.info.status == Status.SUCCESS
    assert host.info.iterations == masked.info.iterations
    assert torch.allclose(host.y, masked.y, atol=1e-14, rtol=0)
    assert torch.allclose(host.trace, masked.trace[:host.trace.shape[0]], atol=1e-13, rtol=1e-6)


def test_objective_called_inside_torch_func_transforms():
    # under torch.func.grad the gradients come from torch.func (requires_grad_ is refused there)
    A = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=F64)
    f = lambda y, t: 0.5 * y @ A @ y - t @ y + 0.1 * (y ** 4).sum()  # noqa: E731
    t0 = torch.tensor([1.0, -2.0], dtype=F64)
    plain = lbfgs(f, torch.zeros(2, dtype=F64), (t0,))

    def outer(t):
        res = lbfgs(f, torch.zeros(2, dtype=F64), (t,))
        assert res.info.status == Status.SUCCESS
        return (res.y * t).sum()          # res.y carries no gradient: d/dt = res.y

    grad = torch.func.grad(outer)(t0)
    assert torch.allclose(grad, plain.y, atol=1e-12, rtol=0)
    # the objective is found flat where it does not depend on y: ∇f = 0 at y0, nothing to do
    flat = lbfgs(lambda y: torch.tensor(3.0, dtype=F64), torch.ones(2, dtype=F64))
    assert flat.info.status == Status.SUCCESS and flat.info.iterations == 0


def test_host_path_backtracks_from_nan_and_reports_a_nan_start():
    # unbatched (the host loop) and masked: a trial where f is NaN is backtracked, not accepted
    def f(y):
        inside = y <= 1.2                                # f NaN past 1.2 (its gradient there: 0)
        return torch.where(inside, (torch.where(inside, y, 0.0) - 1) ** 2, torch.nan).sum()

    y0 = torch.tensor([0.9], dtype=F64)
    host = lbfgs(f, y0, trace=True)
    masked = lbfgs(f, y0, trace=True, check_every=2)
    for res in (host, masked):
        assert res.info.status == Status.SUCCESS and res.info.iterations >= 2
        assert torch.allclose(res.y, torch.ones(1, dtype=F64), atol=1e-12, rtol=0)
        assert torch.isfinite(res.trace).all()       # the NaN trial never became the iterate
    assert host.info.iterations == masked.info.iterations
    for check_every in (1, 2):
        start = lbfgs(lambda y: (torch.nan * y).sum(), torch.tensor([2.0], dtype=F64), check_every=check_every)
        assert start.info.status == Status.NONFINITE and start.info.iterations == 0


@pytest.mark.parametrize("batch", [(), (3,)])
def test_nan_objective_with_zero_gradient_is_nonfinite(batch):
    # f(y0) is NaN but its gradient is finite and zero: the gradient test alone would say SUCCESS
    from implicitdiff._core.status import Status
    from implicitdiff.solvers.lbfgs import lbfgs

    def f(y):
        return (y * 0.0).sum(-1) + float("nan")

    y0 = torch.ones(*batch, 2, dtype=torch.float64)
    res = lbfgs(f, y0, batch_dims=len(batch))
    assert (res.info.status == int(Status.NONFINITE)).all()
