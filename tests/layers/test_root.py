"""root: closed forms, finite differences, every adjoint solver, every transform, failures."""

import pytest
import torch
from torch.func import grad, jacfwd, jacrev, jvp, vmap

import implicitdiff as idf

D = torch.float64


def cube_root(theta, **kw):
    y0 = torch.ones_like(theta)
    bd = theta.dim()
    return idf.root(lambda y, t: y ** 3 - t, y0, theta, batch_dims=bd, **kw)


def test_cube_root_value_and_gradient_closed_form():
    theta = torch.tensor([8.0, 27.0, 2.0], dtype=D, requires_grad=True)
    y = cube_root(theta)
    torch.testing.assert_close(y, theta.detach() ** (1 / 3), rtol=1e-10, atol=1e-10)
    y.sum().backward()
    torch.testing.assert_close(theta.grad, 1 / (3 * y.detach() ** 2), rtol=1e-10, atol=1e-12)


def test_zero_dim_root():
    theta = torch.tensor(5.0, dtype=D, requires_grad=True)
    y = idf.root(lambda y, t: torch.exp(y) - t, torch.tensor(0.0, dtype=D), theta)
    assert y.shape == ()
    (g,) = torch.autograd.grad(y, theta)
    torch.testing.assert_close(g, 1 / theta.detach(), rtol=1e-10, atol=0)


def tanh_eq(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = (0.3 * torch.randn(n, n, generator=g, dtype=D)).requires_grad_()
    x = torch.randn(n, generator=g, dtype=D).requires_grad_()
    return W, x


def F_tanh(y, p):
    return y - torch.tanh(y @ p["W"].mT + p["x"])


@pytest.mark.parametrize("solver", ["newton", "broyden", "anderson"])
@pytest.mark.parametrize("adjoint", [idf.Implicit(), idf.Implicit(solver="lu"), idf.Implicit(solver="gmres"),
                                     idf.Implicit(solver="bicgstab")])
def test_gradcheck_pytree_params(solver, adjoint):
    W, x = tanh_eq()
    f = lambda W, x: idf.root(F_tanh, torch.zeros(4, dtype=D), {"W": W, "x": x}, solver=solver,  # noqa: E731
                              adjoint=adjoint, rtol=1e-13)
    assert torch.autograd.gradcheck(f, (W, x), atol=1e-6, rtol=1e-5)


def test_double_backward_and_forward_mode():
    W, x = tanh_eq()
    f = lambda W, x: idf.root(F_tanh, torch.zeros(4, dtype=D), {"W": W, "x": x})  # noqa: E731
    assert torch.autograd.gradgradcheck(f, (W, x))
    assert torch.autograd.gradcheck(f, (W, x), check_forward_ad=True, check_backward_ad=False,
                                    check_batched_grad=False)


def test_torch_func_transforms_agree():
    W, x = tanh_eq()
    Wd = W.detach()
    f = lambda x: idf.root(F_tanh, torch.zeros(4, dtype=D), {"W": Wd, "x": x})  # noqa: E731
    Jr = jacrev(f)(x.detach())
    Jf = jacfwd(f)(x.detach())
    # closed form: dy/dx = (I − D W)⁻¹ D with D = diag(1 − tanh²)
    y = f(x.detach())
    Dg = torch.diag(1 - torch.tanh(Wd @ y + x.detach()) ** 2)
    J = torch.linalg.solve(torch.eye(4, dtype=D) - Dg @ Wd, Dg)
    torch.testing.assert_close(Jr, J, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(Jf, J, rtol=1e-9, atol=1e-11)
    t = torch.randn(4, dtype=D)
    _, dy = jvp(f, (x.detach(),), (t,))
    torch.testing.assert_close(dy, J @ t, rtol=1e-9, atol=1e-11)
    xs = torch.randn(3, 4, dtype=D)
    ys = vmap(f)(xs)
    torch.testing.assert_close(ys, torch.stack([f(xi) for xi in xs]), rtol=1e-10, atol=1e-12)
    g = grad(lambda x: f(x).sum())(x.detach())
    torch.testing.assert_close(g, J.sum(0), rtol=1e-9, atol=1e-11)
    H = torch.func.hessian(lambda x: f(x).pow(2).sum())(x.detach())
    Hfd = jacrev(jacrev(lambda x: f(x).pow(2).sum()))(x.detach())
    torch.testing.assert_close(H, Hfd, rtol=1e-8, atol=1e-10)


def test_batched_matches_unbatched_and_broadcast_params():
    W, x = tanh_eq()
    xs = torch.randn(5, 4, dtype=D, requires_grad=True)
    ys = idf.root(F_tanh, torch.zeros(5, 4, dtype=D), {"W": W, "x": xs}, batch_dims=1)
    ref = torch.stack([idf.root(F_tanh, torch.zeros(4, dtype=D), {"W": W, "x": xi}) for xi in xs])
    torch.testing.assert_close(ys, ref, rtol=1e-10, atol=1e-12)
    # gradient of the shared W is the sum over the batch
    gW = torch.autograd.grad(ys.sum(), W)[0]
    gW_ref = torch.autograd.grad(ref.sum(), W)[0]
    torch.testing.assert_close(gW, gW_ref, rtol=1e-9, atol=1e-11)
    assert torch.autograd.gradcheck(
        lambda W, xs: idf.root(F_tanh, torch.zeros(5, 4, dtype=D), {"W": W, "x": xs}, batch_dims=1), (W, xs))


def test_symmetric_adjoint_solvers_on_gradient_system():
    # F = ∇ of a strictly convex quadratic: J symmetric positive definite -> cg and minres apply
    g = torch.Generator().manual_seed(1)
    M = torch.randn(5, 5, generator=g, dtype=D)
    H = M @ M.T + 5 * torch.eye(5, dtype=D)
    b = torch.randn(5, generator=g, dtype=D, requires_grad=True)
    F = lambda y, b: H @ y - b + 0.1 * y ** 3  # noqa: E731  (Jacobian H + 0.3 diag(y²): SPD)
    for solver in ("cg", "minres", "lu"):
        y = idf.root(F, torch.zeros(5, dtype=D), b, adjoint=idf.Implicit(solver=solver, rtol=1e-12))
        (gb,) = torch.autograd.grad(y.sum(), b)
        J = H + 0.3 * torch.diag(y.detach() ** 2)
        torch.testing.assert_close(gb, torch.linalg.solve(J.T, torch.ones(5, dtype=D)), rtol=1e-8, atol=1e-10)


def test_unroll_agrees_with_implicit():
    W, x = tanh_eq()
    f_imp = idf.root(F_tanh, torch.zeros(4, dtype=D), {"W": W, "x": x})
    f_unr = idf.root(F_tanh, torch.zeros(4, dtype=D), {"W": W, "x": x}, adjoint=idf.Unroll())
    g1 = torch.autograd.grad(f_imp.sum(), (W, x))
    g2 = torch.autograd.grad(f_unr.sum(), (W, x))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_nn_module_parameters_via_functional_call():
    torch.manual_seed(0)
    cell = torch.nn.Linear(3, 3).double()
    with torch.no_grad():
        cell.weight.mul_(0.3)
    x = torch.randn(3, dtype=D)
    params = dict(cell.named_parameters())
    F = lambda y, p: y - torch.tanh(torch.func.functional_call(cell, p, (y,)) + x)  # noqa: E731
    y = idf.root(F, torch.zeros(3, dtype=D), params)
    y.sum().backward()
    assert cell.weight.grad is not None and cell.bias.grad is not None
    # finite differences on the bias
    eps = 1e-6
    fd = []
    for i in range(3):
        with torch.no_grad():
            pp = {k: v.detach().clone() for k, v in params.items()}
            pp["bias"][i] += eps
            yp = idf.root(F, torch.zeros(3, dtype=D), pp)
            pp["bias"][i] -= 2 * eps
            ym = idf.root(F, torch.zeros(3, dtype=D), pp)
        fd.append(((yp - ym).sum() / (2 * eps)).item())
    torch.testing.assert_close(cell.bias.grad, torch.tensor(fd, dtype=D), rtol=1e-6, atol=1e-8)


def test_forward_nonconvergence_raises_with_status_and_residual():
    theta = torch.tensor(8.0, dtype=D, requires_grad=True)
    with pytest.raises(idf.SolveError, match="MAX_ITERATIONS") as e:
        idf.root(lambda y, t: y ** 3 - t, torch.tensor(100.0, dtype=D), theta, max_iter=2)
    assert e.value.status == idf.Status.MAX_ITERATIONS and e.value.residual > 0


def test_on_failure_nan_isolates_batch_elements():
    theta = torch.tensor([8.0, float("nan"), 27.0], dtype=D, requires_grad=True)
    y = idf.root(lambda y, t: y ** 3 - t, torch.ones(3, dtype=D), theta, batch_dims=1, on_failure="nan")
    assert torch.isnan(y[1]) and torch.allclose(y[[0, 2]], torch.tensor([2.0, 3.0], dtype=D))
    y.nansum().backward()
    torch.testing.assert_close(theta.grad[[0, 2]], 1 / (3 * torch.tensor([2.0, 3.0], dtype=D) ** 2))
    with pytest.warns(idf.SolveWarning):
        idf.root(lambda y, t: y ** 3 - t, torch.ones(3, dtype=D), theta.detach(), batch_dims=1, on_failure="warn")


def test_singular_jacobian_at_solution_raises_in_backward():
    F = lambda y, t: y ** 2 - t  # noqa: E731

    @idf.custom_root(F)
    def exact(y0, t):
        return torch.zeros_like(y0)  # the root of y² at t = 0, where ∂F/∂y = 0

    t = torch.tensor(0.0, dtype=D, requires_grad=True)
    y = exact(torch.tensor(1.0, dtype=D), t)
    with pytest.raises(idf.SolveError, match="SINGULAR"):
        y.backward()


def test_adjoint_krylov_nonconvergence_raises():
    W, x = tanh_eq(n=6)
    y = idf.root(F_tanh, torch.zeros(6, dtype=D), {"W": W, "x": x},
                 adjoint=idf.Implicit(solver="gmres", max_iter=1, rtol=1e-14))
    with pytest.raises(idf.SolveError, match="adjoint"):
        y.sum().backward()


def test_bad_inputs():
    with pytest.raises(idf.InputError, match="y0"):
        idf.root(lambda y: y, torch.tensor([1, 2]))
    with pytest.raises(idf.InputError, match="adjoint"):
        idf.root(lambda y: y, torch.zeros(2, dtype=D), adjoint="implicit")
    with pytest.raises(idf.InputError, match="dtype"):
        idf.root(lambda y, t: y - t, torch.zeros(2, dtype=D), torch.zeros(2, dtype=torch.float32))
    with pytest.raises(idf.InputError):
        idf.root(lambda y: y, torch.zeros(2, dtype=D), solver="nope")


def test_float32():
    theta = torch.tensor([8.0, 27.0], requires_grad=True)
    y = idf.root(lambda y, t: y ** 3 - t, torch.ones(2), theta, batch_dims=1)
    y.sum().backward()
    torch.testing.assert_close(theta.grad, 1 / (3 * y.detach() ** 2), rtol=1e-5, atol=1e-6)


def test_memory_flat_in_forward_iterations():
    # the autograd graph of an implicit layer holds the same tensors however many iterations ran
    W, x = tanh_eq()

    def count_saved(max_iter, rtol):
        n = [0]

        def pack(t):
            n[0] += 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = idf.root(F_tanh, torch.zeros(4, dtype=D), {"W": W, "x": x}, solver="picard",
                         max_iter=max_iter, rtol=rtol, on_failure="nan")
        return n[0], y

    few, _ = count_saved(3, 1e-1)
    many, _ = count_saved(300, 1e-12)
    assert few == many
