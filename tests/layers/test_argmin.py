"""argmin: ridge regression and logistic regression hypergradients against closed forms and FD."""

import pytest
import torch

import implicitdiff as idf

D = torch.float64


def ridge_data(m=30, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(m, n, generator=g, dtype=D)
    t = torch.randn(m, generator=g, dtype=D)
    Xv = torch.randn(10, n, generator=g, dtype=D)
    tv = torch.randn(10, generator=g, dtype=D)
    return X, t, Xv, tv


def ridge(w, lam, X, t):
    return 0.5 * ((X @ w - t) ** 2).sum() + 0.5 * lam * (w ** 2).sum()


@pytest.mark.parametrize("solver", ["lbfgs", "newton"])
@pytest.mark.parametrize("adjoint", [idf.Implicit(), idf.Implicit(solver="cg"), idf.Implicit(solver="minres")])
def test_ridge_hypergradient_closed_form(solver, adjoint):
    X, t, Xv, tv = ridge_data()
    lam = torch.tensor(0.7, dtype=D, requires_grad=True)
    w = idf.argmin(ridge, torch.zeros(5, dtype=D), lam, X, t, solver=solver, adjoint=adjoint, rtol=1e-12)
    val = ((Xv @ w - tv) ** 2).sum()
    (g,) = torch.autograd.grad(val, lam)
    lam_c = lam.detach().clone().requires_grad_()
    wc = torch.linalg.solve(X.T @ X + lam_c * torch.eye(5, dtype=D), X.T @ t)
    (gc,) = torch.autograd.grad(((Xv @ wc - tv) ** 2).sum(), lam_c)
    torch.testing.assert_close(w.detach(), wc.detach(), rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(g, gc, rtol=1e-7, atol=1e-9)


def test_logistic_regression_gradcheck_and_hessian_vector():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(40, 4, generator=g, dtype=D)
    y = (torch.rand(40, generator=g, dtype=D) > 0.5).to(D)

    def loss(w, log_lam):
        z = X @ w
        return torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="sum") + \
            0.5 * log_lam.exp() * (w ** 2).sum()

    log_lam = torch.tensor(0.0, dtype=D, requires_grad=True)
    f = lambda ll: idf.argmin(loss, torch.zeros(4, dtype=D), ll, rtol=1e-13)  # noqa: E731
    assert torch.autograd.gradcheck(f, (log_lam,))
    assert torch.autograd.gradgradcheck(f, (log_lam,))


def test_batched_argmin():
    X, t, _, _ = ridge_data()
    lams = torch.tensor([0.1, 1.0, 10.0], dtype=D, requires_grad=True)
    f = lambda w, lam: 0.5 * ((w @ X.T - t) ** 2).sum(-1) + 0.5 * lam * (w ** 2).sum(-1)  # noqa: E731
    w = idf.argmin(f, torch.zeros(3, 5, dtype=D), lams, batch_dims=1, rtol=1e-12)
    for i in range(3):
        wc = torch.linalg.solve(X.T @ X + lams[i].detach() * torch.eye(5, dtype=D), X.T @ t)
        torch.testing.assert_close(w[i].detach(), wc, rtol=1e-8, atol=1e-9)
    assert torch.autograd.gradcheck(
        lambda l: idf.argmin(f, torch.zeros(3, 5, dtype=D), l, batch_dims=1, rtol=1e-13), (lams,))


def test_matrix_free_default_uses_cg_and_falls_back_to_minres_at_a_saddle(monkeypatch):
    """Past dense_max, Implicit() solves argmin's adjoint by CG (the Hessian of a strict minimum is positive
    definite); at a saddle (found by Broyden on ∇f) CG breaks down and MINRES takes over —
    the gradient is still the exact one, D⁻¹ ȳ for f = ½ yᵀDy − θᵀy."""
    from implicitdiff.linalg import krylov
    used = []
    for name in ("cg", "minres"):
        def spy(*a, _name=name, _fn=getattr(krylov, name), **k):
            used.append(_name)
            return _fn(*a, **k)
        monkeypatch.setattr(krylov, name, spy)

    def f(y, theta, d):
        return 0.5 * (d * y * y).sum() - (theta * y).sum()

    theta = torch.tensor([1.0, 2.0, -1.0, 0.5], dtype=D, requires_grad=True)
    ybar = torch.tensor([0.3, -1.0, 2.0, 1.5], dtype=D)
    for d, want_solvers in ((torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=D), ["cg"]),
                            (torch.tensor([1.0, -2.0, 3.0, -0.5], dtype=D), ["cg", "minres"])):
        used.clear()
        y = idf.argmin(f, torch.zeros(4, dtype=D), theta, d, solver="broyden", adjoint=idf.Implicit(dense_max=0),
                       rtol=1e-13)
        torch.testing.assert_close(y.detach(), theta.detach() / d, atol=1e-12, rtol=0)
        (g,) = torch.autograd.grad((y * ybar).sum(), theta)
        torch.testing.assert_close(g, ybar / d, atol=1e-10, rtol=0)
        assert used == want_solvers, used
