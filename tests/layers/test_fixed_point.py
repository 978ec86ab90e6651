"""fixed_point: linear closed forms, Neumann, Unroll agreement."""

import pytest
import torch

import implicitdiff as idf

D = torch.float64


def linear_problem(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=D)
    A = (0.5 * A / torch.linalg.matrix_norm(A, 2)).requires_grad_()
    b = torch.randn(n, generator=g, dtype=D).requires_grad_()
    return A, b


def T_lin(z, A, b):
    return z @ A.mT + b


@pytest.mark.parametrize("solver", ["anderson", "picard", "broyden", "newton"])
def test_linear_fixed_point_closed_form(solver):
    A, b = linear_problem()
    z = idf.fixed_point(T_lin, torch.zeros(4, dtype=D), A, b, solver=solver, rtol=1e-13, max_iter=500)
    zc = torch.linalg.solve(torch.eye(4, dtype=D) - A, b)
    torch.testing.assert_close(z, zc.detach(), rtol=1e-10, atol=1e-11)
    w = torch.arange(4, dtype=D)
    g = torch.autograd.grad((z * w).sum(), (A, b))
    gc = torch.autograd.grad((zc * w).sum(), (A, b))
    for a, c in zip(g, gc):
        torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-10)


def test_gradcheck_and_gradgradcheck():
    A, b = linear_problem()
    f = lambda A, b: idf.fixed_point(lambda z, A, b: torch.tanh(T_lin(z, A, b)), torch.zeros(4, dtype=D),  # noqa
                                     A, b, rtol=1e-13)
    assert torch.autograd.gradcheck(f, (A, b))
    assert torch.autograd.gradgradcheck(f, (A, b))


def test_neumann_converges_to_implicit_and_unroll_agrees():
    A, b = linear_problem()
    z = idf.fixed_point(T_lin, torch.zeros(4, dtype=D), A, b, rtol=1e-13)
    g_exact = torch.autograd.grad(z.sum(), b)[0]
    errs = []
    for k in (1, 5, 40):
        zk = idf.fixed_point(T_lin, torch.zeros(4, dtype=D), A, b, rtol=1e-13, adjoint=idf.Neumann(k))
        errs.append((torch.autograd.grad(zk.sum(), b)[0] - g_exact).norm().item())
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-10
    # k = 1: the one-step ("Jacobian-free") gradient is exactly ȳ pushed through ∂T/∂b = I
    z1 = idf.fixed_point(T_lin, torch.zeros(4, dtype=D), A, b, adjoint=idf.Neumann(1))
    torch.testing.assert_close(torch.autograd.grad(z1.sum(), b)[0], torch.ones(4, dtype=D))
    zu = idf.fixed_point(T_lin, torch.zeros(4, dtype=D), A, b, rtol=1e-14, adjoint=idf.Unroll(max_iter=2000))
    torch.testing.assert_close(torch.autograd.grad(zu.sum(), b)[0], g_exact, rtol=1e-9, atol=1e-10)


def test_batched_per_element_convergence():
    A, b = linear_problem()
    g = torch.Generator().manual_seed(5)
    bs = torch.randn(6, 4, generator=g, dtype=D) * torch.logspace(-3, 3, 6, dtype=D)[:, None]
    z, info = idf.fixed_point(T_lin, torch.zeros(6, 4, dtype=D), A, bs, batch_dims=1, return_info=True)
    assert info.status.shape == (6,) and bool((info.status == 0).all())
    zc = torch.linalg.solve(torch.eye(4, dtype=D) - A.detach(), bs.T).T
    # the stopping rule is relative per element (‖F(z)‖ ≤ rtol ‖F(z0)‖): so is the error, over 6 decades of scale
    rel = (z.detach() - zc).norm(dim=-1) / zc.norm(dim=-1)
    assert bool((rel < 1e-8).all()), rel


def test_nonconverging_forward_raises():
    A, b = linear_problem()
    with pytest.raises(idf.SolveError, match="fixed_point"):
        idf.fixed_point(lambda z, A, b: 3.0 * T_lin(z, A, b), torch.zeros(4, dtype=D), A, b, solver="picard",
                        max_iter=20)


def test_richardson_adjoint_fixed_point_iteration():
    A, b = linear_problem()
    z = idf.fixed_point(T_lin, torch.zeros(4, dtype=D), A, b, rtol=1e-13,
                        adjoint=idf.Implicit(solver="richardson", rtol=1e-13))
    g = torch.autograd.grad(z.sum(), (A, b))
    zc = torch.linalg.solve(torch.eye(4, dtype=D) - A, b)
    gc = torch.autograd.grad(zc.sum(), (A, b))
    for a, c in zip(g, gc):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-11)
    # a non-contractive map: the adjoint iteration cannot converge and must say so
    z2 = idf.fixed_point(lambda z, A, b: T_lin(z, 3 * A, b), torch.zeros(4, dtype=D), A, b, solver="newton",
                         adjoint=idf.Implicit(solver="richardson", max_iter=50))
    with pytest.raises(idf.SolveError, match="adjoint"):
        z2.sum().backward()


def test_failed_element_does_not_poison_shared_parameter_gradient():
    a = torch.tensor([0.5, 0.999], dtype=D)
    w = torch.tensor(1.0, dtype=D, requires_grad=True)
    z, info = idf.fixed_point(lambda z, w: w * a * z + 1.0, torch.zeros(2, dtype=D), w, batch_dims=1,
                              solver="picard", max_iter=50, on_failure="nan", return_info=True)
    assert info.ok.tolist() == [True, False] and torch.isnan(z[1])
    z[info.ok].sum().backward()
    torch.testing.assert_close(w.grad, torch.tensor(2.0, dtype=D))  # d/dw 1/(1 − 0.5w) at w = 1


def test_krylov_adjoint_under_double_backward_and_vmap():
    g = torch.Generator().manual_seed(4)
    W = (0.3 * torch.randn(4, 4, generator=g, dtype=D)).requires_grad_()
    x = torch.randn(4, generator=g, dtype=D, requires_grad=True)

    def f(W, x):
        return idf.fixed_point(lambda z, W, x: torch.tanh(z @ W.mT + x), torch.zeros(4, dtype=D), W, x,
                               rtol=1e-13, adjoint=idf.Implicit(solver="gmres", rtol=1e-12))

    assert torch.autograd.gradgradcheck(f, (W, x))
    xs = torch.randn(3, 4, generator=g, dtype=D)
    gs = torch.func.vmap(torch.func.grad(lambda x: f(W.detach(), x).sum()))(xs)
    ref = torch.stack([torch.func.grad(lambda x: f(W.detach(), x).sum())(xi) for xi in xs])
    torch.testing.assert_close(gs, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("adjoint", [idf.FixedPointAdjoint(), idf.FixedPointAdjoint(solver="anderson", fallback=None),
                                     idf.FixedPointAdjoint(solver="broyden")], ids=["picard", "anderson", "broyden"])
def test_fixed_point_adjoint_strategy_matches_the_dense_adjoint(adjoint):
    # FixedPointAdjoint lives in implicit/ with the other strategies and works for fixed_point, not only nn.DEQ
    g = torch.Generator().manual_seed(7)
    A = torch.randn(3, 4, 4, generator=g, dtype=D) * 0.2
    b = torch.randn(3, 4, generator=g, dtype=D)
    w = torch.randn(3, 4, generator=g, dtype=D)
    T = lambda z, A, b: torch.tanh((A @ z.unsqueeze(-1)).squeeze(-1) + b)  # noqa: E731
    grads = []
    for adj in (adjoint, idf.Implicit(solver="lu")):
        Ar, br = A.clone().requires_grad_(), b.clone().requires_grad_()
        z = idf.fixed_point(T, torch.zeros(3, 4, dtype=D), Ar, br, batch_dims=1, adjoint=adj, rtol=1e-13)
        grads.append(torch.autograd.grad((z * w).sum(), (Ar, br)))
    for got, ref in zip(*grads):
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)


def test_fixed_point_adjoint_is_refused_by_root():
    with pytest.raises(idf.InputError, match="use it with fixed_point or nn.DEQ"):
        idf.root(lambda y: y - 1, torch.zeros(2, dtype=D), adjoint=idf.FixedPointAdjoint())
