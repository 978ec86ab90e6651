"""argmin(compiled=True): the compiled L-BFGS and adjoint against the eager path, finite differences and
closed forms.

Each compile costs seconds on the CPU: one small non-quadratic ridge problem, one objective (module
level, so that every test finds the compiled functions in the cache), few compiles in all.
"""

import dataclasses
import os
import shutil
from collections import OrderedDict

import pytest
import torch
from torch.autograd import forward_ad

import implicitdiff as idf
from implicitdiff.solvers import lbfgs_compiled

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                                reason="compiled=True needs a C++ compiler (Inductor's CPU backend)")

D = torch.float64
N, M = 6, 30
LBFGS3 = idf.solvers.LBFGS(history=3)
CG = idf.Implicit(solver="cg", rtol=1e-12)


HALF = torch.tensor(0.5, dtype=D)                                    # a tensor f closes over


def ridge(w, theta, X, t):
    """Ridge regression plus a quartic term: the Hessian depends on w (a CG at the wrong point is wrong)."""
    r = X @ w - t
    return HALF * (r * r).sum() / X.shape[0] + 0.5 * (theta.exp() * w * w).sum() + 0.05 * (w ** 4).sum()


def data(n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(M, n, generator=g, dtype=D)
    t = torch.randn(M, generator=g, dtype=D)
    Xv, tv = torch.randn(10, n, generator=g, dtype=D), torch.randn(10, generator=g, dtype=D)
    theta = torch.log(torch.linspace(0.05, 0.5, n, dtype=D))
    return theta, X, t, Xv, tv


def solve(compiled, theta, X, t, **kw):
    return idf.argmin(ridge, torch.zeros(theta.shape[0], dtype=D), theta, X, t, rtol=1e-12, solver=LBFGS3,
                      compiled=compiled, **kw)


def hypergrads(compiled, theta, X, t, Xv, tv):
    theta, t = theta.clone().requires_grad_(), t.clone().requires_grad_()
    w, info = solve(compiled, theta, X, t, return_info=True, adjoint=CG)
    return w.detach(), torch.autograd.grad(((Xv @ w - tv) ** 2).mean(), (theta, t)), info


@pytest.fixture(scope="module")
def compiled_run():
    problem = data()
    return problem, hypergrads(True, *problem)


def test_compiled_equals_the_eager_path_and_finite_differences(compiled_run):
    problem, (w, grads, info) = compiled_run
    theta, X, t, Xv, tv = problem
    w_e, grads_e, info_e = hypergrads(False, *problem)
    assert int(info.status) == 0 and 0 < int(info.iterations) <= int(info_e.iterations) + 2
    assert float(info.residual) <= 1e-12
    torch.testing.assert_close(w, w_e, rtol=0, atol=1e-12)          # the same rules, up to rounding
    for g, g_e in zip(grads, grads_e):                                # θ̄ and t̄: two parameters' mixed products
        torch.testing.assert_close(g, g_e, rtol=1e-9, atol=1e-12)

    def loss(theta, t):                                               # the compiled forward, from the cache
        return float(((Xv @ solve(True, theta, X, t) - tv) ** 2).mean())

    g = torch.Generator().manual_seed(5)
    eps = 1e-5
    for i, (g_p, p) in enumerate(zip(grads, (theta, t))):            # central differences along a direction
        d = torch.randn(p.shape, generator=g, dtype=D)
        args = lambda s: [theta + s * d, t] if i == 0 else [theta, t + s * d]  # noqa: E731
        fd = (loss(*args(eps)) - loss(*args(-eps))) / (2 * eps)
        assert abs(float(g_p @ d) - fd) <= 1e-8 * abs(fd), (i, float(g_p @ d), fd)


def test_a_transposed_parameter_is_taken_as_its_values(compiled_run):
    (theta, X, t, _, _), (w, _, _) = compiled_run
    Xt = X.T.contiguous().T                                          # the same values, another layout
    assert Xt.stride() != X.stride()
    cached = len(lbfgs_compiled._CACHE)
    torch.testing.assert_close(solve(True, theta, Xt, t), w, rtol=0, atol=1e-12)
    assert len(lbfgs_compiled._CACHE) == cached                       # made contiguous: no compile of its own


def rows(W, s):
    """Minimized by W = s / (k + 1) in every entry, k = W.shape[-1]: y's shape changes the answer."""
    return 0.5 * ((W.sum(-1) - s) ** 2).sum() + 0.5 * (W * W).sum()


def test_another_shape_compiles_again_in_float32():
    s = torch.tensor(1.5, dtype=torch.float32, requires_grad=True)
    for shape in ((2, 3), (3, 2)):                                    # the same flat size, another answer
        W = idf.argmin(rows, torch.zeros(shape), s, solver=LBFGS3, compiled=True)
        assert W.dtype == torch.float32 and W.shape == shape
        k = shape[1]
        torch.testing.assert_close(W.detach(), torch.full(shape, 1.5 / (k + 1)), rtol=0, atol=1e-4)
        (g,) = torch.autograd.grad(W.sum(), s)                       # dW/ds = 1 / (k + 1) in every entry
        torch.testing.assert_close(g, torch.tensor(W.numel() / (k + 1)), rtol=0, atol=1e-4)


def test_the_adjoint_scales_the_cotangent(compiled_run):
    theta, X, t = (p.clone().requires_grad_() for p in compiled_run[0][:3])
    w = solve(True, theta, X, t, adjoint=CG)
    gy = torch.randn(N, generator=torch.Generator().manual_seed(3), dtype=D)
    grads = torch.autograd.grad(w, (theta, t), gy, retain_graph=True)
    tiny = torch.autograd.grad(w, (theta, t), gy * 1e-170, retain_graph=True)   # rᵀr would underflow
    for g, g_tiny in zip(grads, tiny):
        assert g.abs().max() > 1e-3
        torch.testing.assert_close(g_tiny * 1e170, g, rtol=1e-9, atol=0)
    with pytest.raises(idf.SolveError, match="NONFINITE.*NaN/Inf"):
        torch.autograd.grad(w, (theta, t), torch.full_like(gy, float("nan")), retain_graph=True)


def test_a_failed_adjoint_is_reported_with_its_residual_and_hints(compiled_run):
    theta, X, t = (p.clone().requires_grad_() for p in compiled_run[0][:3])
    w = solve(True, theta, X, t, adjoint=idf.Implicit(solver="cg", rtol=1e-12, max_iter=1))
    with pytest.raises(idf.SolveError, match=r"MAX_ITERATIONS.*residual.*Implicit\(max_iter=...\)") as err:
        torch.autograd.grad(w.sum(), (theta, t))
    assert err.value.residual > 1e-12


def test_a_failed_solve_is_reported_with_its_residual(compiled_run):
    problem, _ = compiled_run
    theta, X, t = problem[:3]
    call = dict(max_iter=2)
    with pytest.raises(idf.SolveError, match="MAX_ITERATIONS.*residual") as err:
        solve(True, theta, X, t, **call)
    assert err.value.residual > 1e-12
    theta = theta.clone().requires_grad_()
    for compiled in (True, False):                                    # no gradient from a failed forward, as eager
        y, info = solve(compiled, theta, X, t, on_failure="nan", return_info=True, **call)
        assert int(info.status) == int(idf.Status.MAX_ITERATIONS) and int(info.iterations) == 2 and y.isnan().all()
        assert torch.autograd.grad(y.sum(), theta, allow_unused=True) == (None,)


def test_what_it_cannot_run_is_a_clear_error():
    theta, X, t = data()[:3]
    y0 = torch.zeros(N, dtype=D)
    cases = [(dict(solver="newton", compiled=True), "solver='lbfgs'"),
             (dict(solver=idf.solvers.LBFGS(check_every=2), compiled=True), "solver='lbfgs'"),
             (dict(adjoint=idf.Implicit(solver="lu"), compiled=True), "Implicit"),
             (dict(adjoint=idf.Implicit(dense_max=5), compiled=True), "no dense_max"),
             (dict(compiled="yes"), "compiled")]
    for kw, match in cases:
        with pytest.raises(idf.InputError, match=match):
            idf.argmin(ridge, y0, theta, X, t, **kw)
    with pytest.raises(idf.InputError, match="f must be callable"):
        idf.argmin(3.0, y0, theta, compiled=True)
    with pytest.raises(idf.InputError, match="batch_dims=0"):
        idf.argmin(lambda w, th: (th * w * w).sum(-1), torch.zeros(2, N, dtype=D), theta, batch_dims=1,
                   compiled=True)
    with pytest.raises(idf.InputError, match="one objective"):         # checked before any compile
        idf.argmin(lambda w, th: th * w * w, y0 + 1, theta, compiled=True)
    with pytest.raises(idf.InputError, match="tensors"):
        idf.argmin(lambda w, th, c: c * (th * w * w).sum(), y0, theta, 2.0, compiled=True)
    with pytest.raises(idf.InputError, match="torch.func"):
        torch.func.vmap(lambda th: idf.argmin(ridge, y0, th, X, t, compiled=True))(theta.expand(2, N))
    with pytest.raises(idf.InputError, match="could not compile f"):      # Python branching on a value
        idf.argmin(lambda w, th: ((w - 1) ** 2).sum() if float(th[0]) > 0 else (w ** 2).sum(), y0 + 1, theta,
                   compiled=True)


def test_the_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(lbfgs_compiled, "_CACHE", OrderedDict())      # the real cache keeps its entries
    monkeypatch.setattr(lbfgs_compiled, "inductor_compile", lambda fn, examples: fn)
    x = torch.zeros(2)
    for i in range(lbfgs_compiled.CACHE_SIZE + 1):
        assert lbfgs_compiled._compiled("k", ridge, lambda: i, (x,), i) == i
    assert len(lbfgs_compiled._CACHE) == lbfgs_compiled.CACHE_SIZE
    assert ("k", ridge, 0, ((2,), (1,), torch.float32, x.device)) not in lbfgs_compiled._CACHE
    assert ("k", ridge, 1, ((2,), (1,), torch.float32, x.device)) in lbfgs_compiled._CACHE


def test_second_derivatives_equal_the_eager_path_and_finite_differences(compiled_run):
    """create_graph=True: the compiled backward hands over to the eager implicit backward (differentiable)."""
    (theta, X, t, Xv, tv), _ = compiled_run
    g = torch.Generator().manual_seed(7)
    v, d = torch.randn(N, generator=g, dtype=D), torch.randn(N, generator=g, dtype=D)

    def hypergrad(compiled, theta, create_graph=False):
        theta = theta.clone().requires_grad_()
        w = solve(compiled, theta, X, t, adjoint=CG)
        (h,) = torch.autograd.grad(((Xv @ w - tv) ** 2).mean(), theta, create_graph=create_graph)
        return theta, h

    hv = {}
    for compiled in (True, False):                                    # ∂²L/∂θ² · v, through the backward
        theta_c, h = hypergrad(compiled, theta, create_graph=True)
        (hv[compiled],) = torch.autograd.grad(h @ v, theta_c)
    assert hv[True].abs().max() > 1e-3
    torch.testing.assert_close(hv[True], hv[False], rtol=1e-8, atol=1e-12)
    eps = 1e-5                                                        # central differences of the first order
    fd = float((hypergrad(True, theta + eps * d)[1] - hypergrad(True, theta - eps * d)[1]) @ v) / (2 * eps)
    assert abs(float(hv[True] @ d) - fd) <= 1e-8 * abs(fd), (float(hv[True] @ d), fd)


def test_forward_mode_is_a_clear_error(compiled_run):
    (theta, X, t, _, _), _ = compiled_run
    with forward_ad.dual_level():                                     # no silent loss of the tangent
        dual = forward_ad.make_dual(theta, torch.ones_like(theta))
        with pytest.raises(idf.InputError, match=r"forward-mode tangents.*compiled=False"):
            solve(True, dual, X, t)


def test_strided_and_expanded_inputs_are_taken_as_their_values(compiled_run):
    (theta, X, t, Xv, tv), (w, grads, _) = compiled_run
    theta_s = torch.stack([theta, theta], -1)[:, 0].requires_grad_()  # stride 2: not dense
    t_s = torch.stack([t, t], -1)[:, 1].requires_grad_()
    X_s = torch.stack([X, X], -1)[..., 0]
    y0 = torch.zeros(1, dtype=D).expand(N)                            # stride 0
    assert theta_s.stride() == (2,) and X_s.stride() == (2 * N, 2) and y0.stride() == (0,)
    cached = len(lbfgs_compiled._CACHE)
    w_s = idf.argmin(ridge, y0, theta_s, X_s, t_s, rtol=1e-12, solver=LBFGS3, compiled=True, adjoint=CG)
    torch.testing.assert_close(w_s.detach(), w, rtol=0, atol=1e-12)
    assert len(lbfgs_compiled._CACHE) == cached
    for g_s, g in zip(torch.autograd.grad(((Xv @ w_s - tv) ** 2).mean(), (theta_s, t_s)), grads):
        torch.testing.assert_close(g_s, g, rtol=1e-9, atol=1e-12)


def test_a_parameter_of_another_dtype_is_a_clear_error(compiled_run):
    (theta, X, t, _, _), _ = compiled_run
    with pytest.raises(idf.InputError, match="parameter leaf 1 has dtype torch.float32 but y0 has torch.float64"):
        solve(True, theta, X.float(), t)


@pytest.fixture
def uncompiled(monkeypatch):
    """The compiled path's functions run as plain Python (no seconds per compile), in a cache of their own;
    returns the list of what was compiled."""
    compiles = []
    monkeypatch.setattr(lbfgs_compiled, "_CACHE", OrderedDict())
    monkeypatch.setattr(lbfgs_compiled, "inductor_compile", lambda fn, examples: compiles.append(fn) or fn)
    return compiles


@dataclasses.dataclass
class Penalized:
    """A callable dataclass, not frozen: unhashable."""
    lam: float

    def __call__(self, y, a):
        return ((y - a) ** 2).sum() + self.lam * (y ** 4).sum()


def test_an_unhashable_f_is_cached_by_identity(uncompiled):
    a, y0 = torch.tensor([0.5, 1.5], dtype=D), torch.zeros(2, dtype=D)
    f = Penalized(0.25)
    with pytest.raises(TypeError):
        hash(f)
    torch.testing.assert_close(idf.argmin(f, y0, a, compiled=True), idf.argmin(f, y0, a), rtol=0, atol=1e-12)
    compiled = len(uncompiled)
    idf.argmin(f, y0, a, compiled=True)
    assert len(uncompiled) == compiled                                # the same object: found again
    other = Penalized(1.0)
    torch.testing.assert_close(idf.argmin(other, y0, a, compiled=True), idf.argmin(other, y0, a), rtol=0,
                               atol=1e-12)
    assert len(uncompiled) == 2 * compiled
    f.lam = 1.0                                                       # rebound: the old value is a constant
    idf.argmin(f, y0, a, compiled=True)                               # of the compiled code, so compile again
    assert len(uncompiled) == 3 * compiled


def test_a_singular_hessian_is_a_breakdown_of_the_adjoint(uncompiled):
    """Flat in y[1]: CG divides by a vanishing curvature and its iterates overflow, with finite Hessian products."""
    a = torch.tensor([1.0, 2.0], dtype=D, requires_grad=True)
    y = idf.argmin(lambda y, a: (y[0] - a[0]) ** 2 + 0 * y[1] ** 2 + (y[2] - a[1]) ** 4, torch.zeros(3, dtype=D),
                   a, compiled=True)
    with pytest.raises(idf.SolveError, match=r"BREAKDOWN.*residual.*singular.*compiled=False") as err:
        y.sum().backward()
    assert not err.value.residual < 1
