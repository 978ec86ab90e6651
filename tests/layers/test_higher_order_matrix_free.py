"""Higher-order derivatives through root / fixed_point / argmin / nn.DEQ stay matrix-free.

With a matrix-free adjoint (``Implicit(solver="gmres" | "cg" | "minres" | "richardson")``,
``FixedPointAdjoint``) a Hessian-vector product (double backward), a ``torch.func.jvp`` and
``jacrev`` go through the library's differentiable Krylov solve over F's products: the dense
per-element Jacobian is never built (``batch_jacobian`` is patched to fail), and every value
matches an independent reference (unrolled iterations to convergence, or a closed form).
"""

import pytest
import torch

import implicitdiff as idf
import implicitdiff.implicit.system as mechanism

D = torch.float64
N = 12


@pytest.fixture
def no_dense(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a dense Jacobian was built on a matrix-free path")
    monkeypatch.setattr(mechanism, "batch_jacobian", refuse)


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, N, generator=g, dtype=D) / N ** 0.5 * 0.5
    b = torch.randn(N, generator=g, dtype=D)
    V = torch.randn(N, N, generator=g, dtype=D)
    return W, b, V


def T(z, W, b):
    return torch.tanh(W @ z + b)


def unrolled(W, b, steps=300):
    z = torch.zeros(N, dtype=D)
    for _ in range(steps):
        z = T(z, W, b)
    return z


def fp(adj):
    return lambda W, b: idf.fixed_point(T, torch.zeros(N, dtype=D), W, b, adjoint=adj, rtol=1e-14)


ADJOINTS = [idf.Implicit(solver="gmres", rtol=1e-13), idf.Implicit(solver="richardson", rtol=1e-13),
            idf.Implicit(solver="bicgstab", rtol=1e-13)]


@pytest.mark.parametrize("adj", ADJOINTS, ids=lambda a: a.solver)
def test_fixed_point_hessian_vector_product(adj, no_dense):
    W, b, V = _problem()
    for f, tol in ((fp(adj), 1e-8), (unrolled, None)):
        Wr = W.clone().requires_grad_()
        g, = torch.autograd.grad(f(Wr, b).pow(2).sum(), Wr, create_graph=True)
        h, = torch.autograd.grad((g * V).sum(), Wr)
        if tol is None:
            ref = h
        else:
            got = h
    torch.testing.assert_close(got, ref, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("adj", ADJOINTS, ids=lambda a: a.solver)
def test_fixed_point_forward_mode_and_jacrev(adj, no_dense):
    W, b, V = _problem(1)
    _, t = torch.func.jvp(lambda W: fp(adj)(W, b), (W,), (V,))
    _, t_ref = torch.func.jvp(lambda W: unrolled(W, b), (W,), (V,))
    torch.testing.assert_close(t, t_ref, rtol=1e-8, atol=1e-10)
    J = torch.func.jacrev(lambda b: fp(adj)(W, b))(b)
    J_ref = torch.func.jacrev(lambda b: unrolled(W, b))(b)
    torch.testing.assert_close(J, J_ref, rtol=1e-8, atol=1e-10)


def test_fixed_point_hvp_against_finite_differences(no_dense):
    # the derivative of the gradient along V, by central differences of the first-order gradient
    W, b, V = _problem(2)
    adj = idf.Implicit(solver="gmres", rtol=1e-13)

    def grad_at(Wv, create=False):
        Wr = Wv.clone().requires_grad_()
        g, = torch.autograd.grad(fp(adj)(Wr, b).pow(3).sum(), Wr, create_graph=create)
        return Wr, g

    Wr, g = grad_at(W, create=True)
    h, = torch.autograd.grad((g * V).sum(), Wr)
    eps = 1e-5
    fd = ((grad_at(W + eps * V)[1] - grad_at(W - eps * V)[1]) * V).sum() / (2 * eps)
    torch.testing.assert_close((h * V).sum(), fd, rtol=1e-6, atol=0)


def test_root_double_backward_closed_form(no_dense):
    # y³ + y = θ elementwise: y' = 1/(3y² + 1), y'' = −6y y'³
    theta = torch.linspace(-2, 3, N, dtype=D).requires_grad_()
    y = idf.root(lambda y, t: y ** 3 + y - t, torch.zeros(N, dtype=D), theta, adjoint=idf.Implicit(solver="gmres"))
    g, = torch.autograd.grad(y.sum(), theta, create_graph=True)
    h, = torch.autograd.grad(g.sum(), theta)
    yd = y.detach()
    d1 = 1 / (3 * yd ** 2 + 1)
    torch.testing.assert_close(g.detach(), d1, rtol=1e-9, atol=0)
    torch.testing.assert_close(h, -6 * yd * d1 ** 3, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("adj", [idf.Implicit(solver="cg"), idf.Implicit(solver="minres"),
                                 idf.Implicit(dense_max=0)], ids=["cg", "minres", "auto-matrix-free"])
def test_argmin_hessian_vector_product_closed_form(adj, no_dense):
    # y* = argmin ½ yᵀ A y − θᵀ y = A⁻¹ θ; L = ½‖y*‖² ⇒ ∇L = A⁻² θ, HVP = A⁻² v
    g = torch.Generator().manual_seed(3)
    M = torch.randn(N, N, generator=g, dtype=D)
    A = M @ M.T / N + torch.eye(N, dtype=D)
    theta = torch.randn(N, generator=g, dtype=D, requires_grad=True)
    v = torch.randn(N, generator=g, dtype=D)
    y = idf.argmin(lambda y, t: 0.5 * y @ A @ y - t @ y, torch.zeros(N, dtype=D), theta, adjoint=adj)
    gr, = torch.autograd.grad(0.5 * y.pow(2).sum(), theta, create_graph=True)
    h, = torch.autograd.grad((gr * v).sum(), theta)
    Ainv2 = torch.linalg.inv(A @ A)
    torch.testing.assert_close(gr.detach(), Ainv2 @ theta.detach(), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(h, Ainv2 @ v, rtol=1e-7, atol=1e-9)


class Cell(torch.nn.Module):
    def __init__(self, n=6):
        super().__init__()
        g = torch.Generator().manual_seed(4)
        self.lin = torch.nn.Linear(n, n, dtype=D)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(n, n, generator=g, dtype=D) * 0.15)

    def forward(self, z, x):
        return torch.tanh(self.lin(z) + x)


@pytest.mark.parametrize("adjoint", [None, idf.Implicit(solver="gmres", rtol=1e-13)], ids=["default", "gmres"])
def test_deq_double_backward_matches_unrolled(adjoint, no_dense):
    cell = Cell()
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(5), dtype=D, requires_grad=True)
    kw = {} if adjoint is None else {"adjoint": adjoint}
    z = idf.nn.DEQ(cell, rtol=1e-13, **kw)(x)
    gx, = torch.autograd.grad(z.pow(2).sum(), x, create_graph=True)
    h, = torch.autograd.grad(gx.pow(2).sum(), cell.lin.weight)

    def unrolled_deq(x):
        zz = torch.zeros_like(x)
        for _ in range(200):
            zz = cell(zz, x)
        return zz
    x2 = x.detach().clone().requires_grad_()
    gx2, = torch.autograd.grad(unrolled_deq(x2).pow(2).sum(), x2, create_graph=True)
    h2, = torch.autograd.grad(gx2.pow(2).sum(), cell.lin.weight)
    torch.testing.assert_close(gx.detach(), gx2.detach(), rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(h, h2, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("adj", [idf.FixedPointAdjoint(rtol=1e-13), idf.Implicit(solver="gmres", rtol=1e-13)],
                         ids=["fixed_point_adjoint", "gmres"])
def test_torch_func_grad_and_grad_of_grad_through_fixed_point(adj, no_dense):
    # torch.func.grad wraps the parameters: the differentiable Krylov solve takes them (no dense fallback);
    # the gradient and its directional derivative match central differences of the loss and of the gradient
    W, b, V = _problem(6)
    v = torch.randn(N, generator=torch.Generator().manual_seed(7), dtype=D)

    def loss(b):
        return fp(adj)(W, b).pow(3).sum()

    grad = torch.func.grad(loss)
    g = grad(b)
    h = torch.func.grad(lambda b: (grad(b) * v).sum())(b)       # H v
    eps = 1e-5
    torch.testing.assert_close((g * v).sum(), (loss(b + eps * v) - loss(b - eps * v)) / (2 * eps),
                               rtol=1e-7, atol=0)
    torch.testing.assert_close(h, (grad(b + eps * v) - grad(b - eps * v)) / (2 * eps), rtol=1e-6, atol=1e-9)


def test_torch_func_grad_of_grad_through_root_closed_form(no_dense):
    # y³ + y = θ elementwise: y' = 1/(3y² + 1), y'' = −6y y'³ (torch.func.grad twice, matrix-free)
    theta = torch.linspace(-2, 3, N, dtype=D)

    def y_sum(t):
        return idf.root(lambda y, t: y ** 3 + y - t, torch.zeros(N, dtype=D), t,
                        adjoint=idf.Implicit(solver="gmres", rtol=1e-13)).sum()

    g = torch.func.grad(y_sum)(theta)
    h = torch.func.grad(lambda t: torch.func.grad(y_sum)(t).sum())(theta)
    y = idf.root(lambda y, t: y ** 3 + y - t, torch.zeros(N, dtype=D), theta)
    d1 = 1 / (3 * y ** 2 + 1)
    torch.testing.assert_close(g, d1, rtol=1e-9, atol=0)
    torch.testing.assert_close(h, -6 * y * d1 ** 3, rtol=1e-8, atol=1e-12)


def _cubic_root(adj):
    return lambda t: idf.root(lambda y, t: y ** 3 + y - t, torch.zeros(N, dtype=D), t, adjoint=adj)


@pytest.mark.parametrize("solver", ["gmres", "bicgstab"])
def test_backward_through_torch_func_jvp_closed_form(solver, no_dense):
    # the tangent solve inside torch.func.jvp, differentiated by an enclosing autograd (or torch.func.grad),
    # whose requires_grad the jvp's wrapper hides: it gave torch's raw in-place error.  y³ + y = θ
    # elementwise, ẏ = y' v; L = Σ ẏ² ⇒ ∂L/∂θ = 2 ẏ v y'' with y' = 1/(3y² + 1), y'' = −6y y'³
    theta0 = torch.linspace(-2, 3, N, dtype=D)
    v = torch.randn(N, generator=torch.Generator().manual_seed(8), dtype=D)
    solve = _cubic_root(idf.Implicit(solver=solver, rtol=1e-13))

    def loss(t):
        return torch.func.jvp(solve, (t,), (v,))[1].pow(2).sum()

    theta = theta0.clone().requires_grad_()
    g, = torch.autograd.grad(loss(theta), theta)
    y = solve(theta0)
    d1 = 1 / (3 * y ** 2 + 1)
    want = 2 * (d1 * v) * v * (-6 * y * d1 ** 3)
    torch.testing.assert_close(g, want, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(torch.func.grad(loss)(theta0), want, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("adj", ADJOINTS[:2] + [idf.FixedPointAdjoint(rtol=1e-13)],
                         ids=["gmres", "richardson", "fixed-point-adjoint"])
def test_backward_through_torch_func_jvp_against_finite_differences(adj, no_dense):
    # a coupled system: L(W) = Σ ẏ³ with ẏ = ∂y*/∂b · u; ∂L/∂W · V against central differences of L
    W, b, V = _problem(9)
    u = torch.randn(N, generator=torch.Generator().manual_seed(10), dtype=D)

    def loss(W):
        return torch.func.jvp(lambda bb: fp(adj)(W, bb), (b,), (u,))[1].pow(3).sum()

    Wr = W.clone().requires_grad_()
    g, = torch.autograd.grad(loss(Wr), Wr)
    eps = 1e-5
    fd = (loss(W + eps * V) - loss(W - eps * V)) / (2 * eps)
    torch.testing.assert_close((g * V).sum(), fd, rtol=1e-6, atol=0)


def test_forward_over_reverse_transforms_match_the_dense_adjoint():
    # jacfwd, hessian (jacfwd of jacrev) and vmap of jvp through a Krylov adjoint, each under an enclosing
    # autograd backward, against the dense LU adjoint (a different path: the per-element Jacobian)
    g = torch.Generator().manual_seed(11)
    A = torch.randn(N, N, generator=g, dtype=D) / N ** 0.5 + 3 * torch.eye(N, dtype=D)
    theta0, U = torch.randn(N, generator=g, dtype=D), torch.randn(3, N, generator=g, dtype=D)

    def solve(adj):
        return lambda t: idf.root(lambda y, t: A @ y + 0.1 * y ** 3 - t, torch.zeros(N, dtype=D), t, adjoint=adj)

    transforms = {
        "jacfwd": lambda f, t: torch.func.jacfwd(f)(t),
        "hessian": lambda f, t: torch.func.hessian(lambda s: f(s).pow(2).sum())(t),
        "vmap(jvp)": lambda f, t: torch.func.vmap(lambda w: torch.func.jvp(f, (t,), (w,))[1])(U),
    }
    for name, transform in transforms.items():
        got, want = [], []
        for adj, out in ((idf.Implicit(solver="gmres", rtol=1e-13), got), (idf.Implicit(solver="lu"), want)):
            theta = theta0.clone().requires_grad_()
            value = transform(solve(adj), theta)
            out += [value.detach(), torch.autograd.grad(value.pow(2).sum(), theta)[0]]
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)
