"""Properties of ``root`` / ``fixed_point`` / ``argmin`` gradients on random problems drawn by hypothesis.

* ``Unroll()`` (autograd through the iterations) and ``Implicit()`` (the IFT) give the same
  gradient, and their gap shrinks as the forward tolerance tightens — on random contractive
  fixed points and random strongly convex (non-quadratic) ridge-type problems;
* on a random invertible *linear* ``F(y, θ) = A y + B θ − c`` the gradient equals the closed
  form ``dy/dθ = −J⁻¹ ∂F/∂θ = −A⁻¹ B`` (and ``Ā = −A⁻ᵀ ȳ yᵀ``) for every adjoint solver;
* a forward solve that did not converge never yields a gradient: ``SolveError`` (status,
  iterations, residual) with ``on_failure="raise"``; so does a non-converged adjoint solve.

Small sizes, float64, ≤ 25 examples each, derandomized (reproducible in CI).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import implicitdiff as idf

D = torch.float64
SETTINGS = settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
seeds = st.integers(0, 2**31 - 1)
sizes = st.integers(1, 5)


def _contractive(g, n, rate):
    """``T(z; A, U, x) = rate · tanh(A z + U x)`` with ``‖A‖₂ = 1``: a contraction of factor ``≤ rate``."""
    A = torch.randn(n, n, generator=g, dtype=D)
    A = A / torch.linalg.matrix_norm(A, ord=2)
    U = torch.randn(n, 2, generator=g, dtype=D)
    x = torch.randn(2, generator=g, dtype=D)
    return A, U, x


def _gap(ga, gb):
    return max(float((a - b).abs().max()) for a, b in zip(ga, gb))


def _scale(gs):
    return max(1.0, max(float(t.abs().max()) for t in gs))


# ----------------------------------------------------------------------------- (a) Unroll vs Implicit


@SETTINGS
@given(seed=seeds, n=sizes, rate=st.floats(0.2, 0.8))
def test_fixed_point_unroll_and_implicit_agree_as_tolerance_tightens(seed, n, rate):
    g = torch.Generator().manual_seed(seed)
    A, U, x = (t.requires_grad_(True) for t in _contractive(g, n, rate))
    cot = torch.randn(n, generator=g, dtype=D)

    def T(z, A, U, x):
        return rate * torch.tanh(A @ z + U @ x)

    def grads(adjoint, rtol):
        z = idf.fixed_point(T, torch.zeros(n, dtype=D), A, U, x, adjoint=adjoint, rtol=rtol, max_iter=2000)
        return torch.autograd.grad((z * cot).sum(), (A, U, x))

    gaps = {}
    for rtol in (1e-2, 1e-12):
        gi, gu = grads(idf.Implicit(), rtol), grads(idf.Unroll(max_iter=2000), rtol)
        gaps[rtol] = _gap(gi, gu) / _scale(gi)
    assert gaps[1e-12] <= 1e-9, gaps
    assert gaps[1e-12] <= gaps[1e-2] + 1e-10, gaps


@SETTINGS
@given(seed=seeds, n=sizes, c=st.floats(0.1, 2.0), lam=st.floats(0.05, 2.0))
def test_argmin_unroll_and_implicit_agree_as_tolerance_tightens(seed, n, c, lam):
    # strongly convex, not quadratic (so Newton takes several steps):
    # f(w) = ½‖Xw − t‖² + ½λ‖w‖² + c Σ log cosh(w − w₀)
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(2 * n + 1, n, generator=g, dtype=D)
    t = torch.randn(2 * n + 1, generator=g, dtype=D).requires_grad_(True)
    w0 = (3 * torch.randn(n, generator=g, dtype=D)).requires_grad_(True)
    log_lam = torch.tensor(float(torch.tensor(lam).log()), dtype=D, requires_grad=True)
    cot = torch.randn(n, generator=g, dtype=D)

    def f(w, log_lam, t, w0):
        return 0.5 * ((X @ w - t) ** 2).sum() + 0.5 * log_lam.exp() * (w * w).sum() + c * torch.log(
            torch.cosh(w - w0)).sum()

    def grads(adjoint, rtol, solver):
        w = idf.argmin(f, torch.zeros(n, dtype=D), log_lam, t, w0, adjoint=adjoint, rtol=rtol, solver=solver)
        return torch.autograd.grad((w * cot).sum(), (log_lam, t, w0))

    gaps = {}
    for rtol in (1e-2, 1e-12):
        gi = grads(idf.Implicit(), rtol, "lbfgs")
        gu = grads(idf.Unroll(), rtol, "lbfgs")
        gaps[rtol] = _gap(gi, gu) / _scale(gi)
    assert gaps[1e-12] <= 1e-7, gaps
    assert gaps[1e-12] <= gaps[1e-2] + 1e-9, gaps


@SETTINGS
@given(seed=seeds, n=sizes, lam=st.floats(0.01, 10.0), adjoint=st.sampled_from(["auto", "cg", "minres"]))
def test_ridge_argmin_matches_closed_form_and_unroll(seed, n, lam, adjoint):
    # a strongly convex quadratic: Unroll (one exact Newton step), Implicit and the closed form all agree
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(3 * n, n, generator=g, dtype=D)
    t = torch.randn(3 * n, generator=g, dtype=D)
    Xv, tv = torch.randn(4, n, generator=g, dtype=D), torch.randn(4, generator=g, dtype=D)
    log_lam = torch.tensor(float(torch.tensor(lam).log()), dtype=D, requires_grad=True)

    def f(w, log_lam):
        return 0.5 * ((X @ w - t) ** 2).sum() + 0.5 * log_lam.exp() * (w * w).sum()

    def hypergrad(w):
        return torch.autograd.grad(((Xv @ w - tv) ** 2).sum(), log_lam)[0]

    w_closed = torch.linalg.solve(X.T @ X + log_lam.exp() * torch.eye(n, dtype=D), X.T @ t)
    g_closed = hypergrad(w_closed)
    g_imp = hypergrad(idf.argmin(f, torch.zeros(n, dtype=D), log_lam, rtol=1e-12,
                                 adjoint=idf.Implicit(solver=adjoint, rtol=1e-12)))
    g_unr = hypergrad(idf.argmin(f, torch.zeros(n, dtype=D), log_lam, rtol=1e-12, adjoint=idf.Unroll()))
    scale = max(1.0, float(g_closed.abs()))
    assert float((g_imp - g_closed).abs()) <= 1e-7 * scale
    assert float((g_unr - g_closed).abs()) <= 1e-7 * scale


# ----------------------------------------------------------------------------- (b) linear F: closed form


@SETTINGS
@given(seed=seeds, n=sizes, k=st.integers(1, 4), adjoint=st.sampled_from(["auto", "lu", "gmres", "bicgstab"]))
def test_linear_root_gradient_is_minus_J_inverse_dF_dtheta(seed, n, k, adjoint):
    g = torch.Generator().manual_seed(seed)
    # eigenvalues in the disc |z − 2| ≤ 1: invertible and well conditioned, not symmetric
    A = (2 * torch.eye(n, dtype=D) + torch.randn(n, n, generator=g, dtype=D) / (2 * n ** 0.5)).requires_grad_(True)
    B = torch.randn(n, k, generator=g, dtype=D).requires_grad_(True)
    theta = torch.randn(k, generator=g, dtype=D).requires_grad_(True)
    c = torch.randn(n, generator=g, dtype=D)
    cot = torch.randn(n, generator=g, dtype=D)

    def F(y, A, B, theta):
        return A @ y + B @ theta - c

    y = idf.root(F, torch.zeros(n, dtype=D), A, B, theta, adjoint=idf.Implicit(solver=adjoint, rtol=1e-13))
    gA, gB, gth = torch.autograd.grad((y * cot).sum(), (A, B, theta))
    with torch.no_grad():
        y_exact = torch.linalg.solve(A, c - B @ theta)
        dy_dtheta = -torch.linalg.solve(A, B)                      # −J⁻¹ ∂F/∂θ
        u = torch.linalg.solve(A.T, cot)                           # Jᵀu = ȳ
    torch.testing.assert_close(y.detach(), y_exact, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(gth, dy_dtheta.T @ cot, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(gB, -torch.outer(u, theta.detach()), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(gA, -torch.outer(u, y_exact), rtol=1e-8, atol=1e-10)


# ----------------------------------------------------------------------------- (c) failures raise


@SETTINGS
@given(seed=seeds, n=sizes, layer=st.sampled_from(["root", "fixed_point", "argmin"]))
def test_nonconverged_forward_never_gives_a_gradient(seed, n, layer):
    g = torch.Generator().manual_seed(seed)
    A, U, x = (t.requires_grad_(True) for t in _contractive(g, n, 0.9))
    z0 = 5 * torch.randn(n, generator=g, dtype=D)

    def T(z, A, U, x):
        return 0.9 * torch.tanh(A @ z + U @ x)

    if layer == "root":
        call = lambda: idf.root(lambda z, A, U, x: T(z, A, U, x) - z + 0.1 * z ** 3, z0, A, U, x,  # noqa: E731
                                solver="broyden", rtol=1e-14, max_iter=1)
    elif layer == "fixed_point":
        call = lambda: idf.fixed_point(T, z0, A, U, x, solver="picard", rtol=1e-14, max_iter=1)  # noqa: E731
    else:
        call = lambda: idf.argmin(lambda z, A, U, x: ((z - T(z, A, U, x)) ** 2).sum() + (z ** 4).sum(),  # noqa: E731
                                  z0, A, U, x, rtol=1e-14, max_iter=1)
    with pytest.raises(idf.SolveError, match="MAX_ITERATIONS") as e:
        z = call()
        torch.autograd.grad(z.sum(), (A, U, x))  # never reached: the failure is reported before a gradient exists
    assert e.value.status == idf.Status.MAX_ITERATIONS
    assert e.value.iterations == 1 and e.value.residual > 1e-14


@SETTINGS
@given(seed=seeds, n=st.integers(3, 6))
def test_nonconverged_adjoint_solve_raises_in_backward(seed, n):
    g = torch.Generator().manual_seed(seed)
    A = (2 * torch.eye(n, dtype=D) + torch.randn(n, n, generator=g, dtype=D) / n ** 0.5).requires_grad_(True)
    b = torch.randn(n, generator=g, dtype=D).requires_grad_(True)
    y = idf.root(lambda y, A, b: A @ y - b + 0.1 * torch.sin(y), torch.zeros(n, dtype=D), A, b,
                 adjoint=idf.Implicit(solver="gmres", rtol=1e-14, max_iter=1))
    cot = torch.randn(n, generator=g, dtype=D)
    with pytest.raises(idf.SolveError) as e:
        torch.autograd.grad((y * cot).sum(), (A, b))
    assert e.value.status in (idf.Status.MAX_ITERATIONS, idf.Status.BREAKDOWN)
