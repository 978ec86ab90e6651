"""argmin(compiled=True): the compiled L-BFGS and adjoint against the eager path and the closed form.

Each compile costs seconds on the CPU: one small ridge problem, one objective (module level, so
that every test finds the compiled functions in the cache), few compiles in all.
"""

import os
import shutil

import pytest
import torch

import implicitdiff as idf
from implicitdiff.solvers import lbfgs_compiled

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                                reason="compiled=True needs a C++ compiler (Inductor's CPU backend)")

D = torch.float64
N, M = 6, 30


HALF = torch.tensor(0.5, dtype=D)                                    # a tensor f closes over


def ridge(w, theta, X, t):
    r = X @ w - t
    return HALF * (r * r).sum() / X.shape[0] + 0.5 * (theta.exp() * w * w).sum()


def data(n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(M, n, generator=g, dtype=D)
    t = torch.randn(M, generator=g, dtype=D)
    Xv, tv = torch.randn(10, n, generator=g, dtype=D), torch.randn(10, generator=g, dtype=D)
    theta = torch.log(torch.linspace(0.05, 0.5, n, dtype=D))
    return theta, X, t, Xv, tv


def hypergrads(compiled, theta, X, t, Xv, tv, **kw):
    theta, t = theta.clone().requires_grad_(), t.clone().requires_grad_()
    w, info = idf.argmin(ridge, torch.zeros(theta.shape[0], dtype=D), theta, X, t, rtol=1e-12, return_info=True,
                         adjoint=idf.Implicit(solver="cg", rtol=1e-12), compiled=compiled, **kw)
    return w.detach(), torch.autograd.grad(((Xv @ w - tv) ** 2).mean(), (theta, t)), info


def closed_form(theta, X, t, Xv, tv):
    theta, t = theta.clone().requires_grad_(), t.clone().requires_grad_()
    w = torch.linalg.solve(X.T @ X / M + torch.diag(theta.exp()), X.T @ t / M)
    return w.detach(), torch.autograd.grad(((Xv @ w - tv) ** 2).mean(), (theta, t))


@pytest.fixture(scope="module")
def compiled_run():
    problem = data()
    return problem, hypergrads(True, *problem, solver=idf.solvers.LBFGS(history=3))


def test_compiled_equals_the_eager_path_and_the_closed_form(compiled_run):
    problem, (w, grads, info) = compiled_run
    w_e, grads_e, info_e = hypergrads(False, *problem, solver=idf.solvers.LBFGS(history=3))
    w_c, grads_c = closed_form(*problem)
    assert int(info.status) == 0 and 0 < int(info.iterations) <= int(info_e.iterations) + 2
    assert float(info.residual) <= 1e-12
    torch.testing.assert_close(w, w_e, rtol=0, atol=1e-12)          # the same rules, up to rounding
    for g, g_e, g_c in zip(grads, grads_e, grads_c):                  # θ̄ and t̄: two parameters' mixed products
        torch.testing.assert_close(g, g_e, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(g, g_c, rtol=1e-8, atol=1e-11)


def test_another_shape_compiles_again(compiled_run):
    theta, X, t, _, _ = data(n=N + 1, seed=1)                        # the forward alone: one more compile
    w = idf.argmin(ridge, torch.zeros(N + 1, dtype=D), theta, X, t, rtol=1e-12, solver=idf.solvers.LBFGS(history=3),
                   compiled=True)
    w_c = torch.linalg.solve(X.T @ X / M + torch.diag(theta.exp()), X.T @ t / M)
    torch.testing.assert_close(w, w_c, rtol=0, atol=1e-10)


def test_a_failed_solve_is_reported_with_its_residual(compiled_run):
    problem, _ = compiled_run
    theta, X, t = problem[:3]
    call = dict(rtol=1e-12, max_iter=2, solver=idf.solvers.LBFGS(history=3), compiled=True)
    with pytest.raises(idf.SolveError, match="MAX_ITERATIONS.*residual") as err:
        idf.argmin(ridge, torch.zeros(N, dtype=D), theta, X, t, **call)
    assert err.value.residual > 1e-12
    theta = theta.clone().requires_grad_()
    y, info = idf.argmin(ridge, torch.zeros(N, dtype=D), theta, X, t, on_failure="nan", return_info=True, **call)
    assert int(info.status) == int(idf.Status.MAX_ITERATIONS) and int(info.iterations) == 2 and y.isnan().all()
    (g,) = torch.autograd.grad(y.sum(), theta)
    assert g.isnan().all()


def test_what_it_cannot_run_is_a_clear_error(compiled_run):
    problem, _ = compiled_run
    theta, X, t = problem[:3]
    y0 = torch.zeros(N, dtype=D)
    cases = [(dict(solver="newton", compiled=True), "solver='lbfgs'"),
             (dict(solver=idf.solvers.LBFGS(check_every=2), compiled=True), "solver='lbfgs'"),
             (dict(adjoint=idf.Implicit(solver="lu"), compiled=True), "Implicit"),
             (dict(compiled="yes"), "compiled")]
    for kw, match in cases:
        with pytest.raises(idf.InputError, match=match):
            idf.argmin(ridge, y0, theta, X, t, **kw)
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


def test_the_cache_is_bounded():
    assert len(lbfgs_compiled._CACHE) <= lbfgs_compiled.CACHE_SIZE
