"""Gradients of the differentiable iterative solve: finite differences, the dense path, memory."""

import warnings

import pytest
import torch

import implicitdiff as idf
from implicitdiff import InputError, SolveError, Status
from implicitdiff.implicit.iterative import iterative_solve
from implicitdiff.linalg.krylov import cg
from implicitdiff.linalg.operator import LinearOperator
from implicitdiff.linalg.preconditioner import jacobi

F64 = torch.float64
# torch.func.jvp's first use compiles decompositions with the deprecated torch.jit.script
jvp_warning = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _spd(n=7, seed=0):
    Q = torch.randn(n, n, generator=_gen(seed), dtype=F64)
    return Q @ Q.T / n + torch.eye(n, dtype=F64)


def _nonsym(n=7, seed=0):
    return torch.randn(n, n, generator=_gen(seed), dtype=F64) / n ** 0.5 + 3 * torch.eye(n, dtype=F64)


def _solve(solver, **kw):
    kw.setdefault("rtol", 1e-13)

    def f(A, b):
        return iterative_solve(LinearOperator.from_dense(A), b, solver=solver, **kw)[0]

    return f


SQUARE = [("cg", _spd), ("minres", _spd), ("gmres", _nonsym), ("bicgstab", _nonsym), ("lsqr", _nonsym),
          ("lsmr", _nonsym)]


@pytest.mark.parametrize("solver,make", SQUARE)
def test_gradcheck_dense_matrix_and_b(solver, make):
    A = make().requires_grad_()
    b = torch.randn(2, 7, generator=_gen(1), dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(_solve(solver), (A, b), atol=1e-6)


@pytest.mark.parametrize("solver,make", SQUARE)
def test_matches_dense_linear_solve(solver, make):
    A = make().requires_grad_()
    b = torch.randn(3, 7, generator=_gen(2), dtype=F64, requires_grad=True)
    g = torch.randn(3, 7, generator=_gen(3), dtype=F64)
    x = _solve(solver)(A, b)
    gA, gb = torch.autograd.grad(x, (A, b), g)
    y = idf.linear_solve(A, b.T).T  # the dense path, with the 3 systems as right-hand sides (7, 3)
    gA2, gb2 = torch.autograd.grad(y, (A, b), g)
    assert torch.allclose(x, y, atol=1e-10)
    assert torch.allclose(gA, gA2, atol=1e-9) and torch.allclose(gb, gb2, atol=1e-9)


@pytest.mark.parametrize("solver", ["lsqr", "lsmr"])
@pytest.mark.parametrize("shape", [(4, 7), (7, 4)])
def test_least_squares_gradients_rectangular(solver, shape):
    A = torch.randn(*shape, generator=_gen(4), dtype=F64, requires_grad=True)
    b = torch.randn(2, shape[0], generator=_gen(5), dtype=F64, requires_grad=True)
    f = _solve(solver, max_iter=300)
    assert torch.autograd.gradcheck(f, (A, b), atol=1e-6)
    g = torch.randn(2, shape[1], generator=_gen(6), dtype=F64)
    gA, gb = torch.autograd.grad(f(A, b), (A, b), g)
    gA2, gb2 = torch.autograd.grad(idf.linear_solve(A, b.T, selection="min_norm").T, (A, b), g)
    assert torch.allclose(gA, gA2, atol=1e-9) and torch.allclose(gb, gb2, atol=1e-9)


@pytest.mark.parametrize("solver", ["lsqr", "lsmr"])
def test_least_squares_gradient_rank_deficient(solver):
    # A = L R of rank 3, perturbed within its rank so finite differences see the same pseudo-inverse
    L = torch.randn(5, 3, generator=_gen(7), dtype=F64, requires_grad=True)
    R = torch.randn(3, 6, generator=_gen(8), dtype=F64, requires_grad=True)
    b = torch.randn(5, generator=_gen(9), dtype=F64, requires_grad=True)

    def f(L, R, b):
        return iterative_solve(LinearOperator.from_dense(L @ R), b, solver=solver, rtol=1e-13, max_iter=300)[0]

    assert torch.autograd.gradcheck(f, (L, R, b), atol=1e-5)


def _csr(A):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return A.to_sparse_csr()


@pytest.mark.parametrize("solver", ["cg", "minres", "gmres", "bicgstab", "lsqr"])
def test_sparse_csr_values_gradient(solver):
    D = _spd(8) * (torch.rand(8, 8, generator=_gen(10)) < 0.4) + 3 * torch.eye(8, dtype=F64)
    D = (D + D.T) / 2
    S = _csr(D)
    crow, col = S.crow_indices(), S.col_indices()
    vals = S.values().clone().requires_grad_()
    b = torch.randn(2, 8, generator=_gen(11), dtype=F64, requires_grad=True)

    def f(v, b):
        A = torch.sparse_csr_tensor(crow, col, v, (8, 8), check_invariants=False)
        return iterative_solve(A, b, solver=solver, rtol=1e-13)[0]

    assert torch.autograd.gradcheck(f, (vals, b), atol=1e-6)
    # a sparse leaf gets a sparse gradient on its own pattern, never a dense one
    A = torch.sparse_csr_tensor(crow, col, vals.detach(), (8, 8), check_invariants=False).requires_grad_()
    x, _ = iterative_solve(A, b.detach(), solver=solver, rtol=1e-13)
    g = torch.randn(2, 8, generator=_gen(12), dtype=F64)
    x.backward(g)
    assert A.grad.layout == torch.sparse_csr and torch.equal(A.grad.col_indices(), col)
    Ad = D.clone().requires_grad_()
    torch.autograd.backward(torch.linalg.solve(Ad, b.detach().T).T, g)
    assert torch.allclose(A.grad.values(), Ad.grad[D != 0], atol=1e-9)


def test_sparse_coo_values_gradient():
    D = _nonsym(6) * (torch.rand(6, 6, generator=_gen(13)) < 0.5) + 3 * torch.eye(6, dtype=F64)
    C = D.to_sparse().coalesce()
    vals = C.values().clone().requires_grad_()
    b = torch.randn(6, generator=_gen(14), dtype=F64, requires_grad=True)

    def f(v, b):
        A = torch.sparse_coo_tensor(C.indices(), v, (6, 6), is_coalesced=True, check_invariants=False)
        return iterative_solve(A, b, solver="gmres", rtol=1e-13)[0]

    assert torch.autograd.gradcheck(f, (vals, b), atol=1e-6)


def _stencil(x, theta):  # symmetric: diag(θ + 3) + 0.3 (shift + shift⁻¹)
    return x * (theta + 3) + 0.3 * (torch.roll(x, 1, -1) + torch.roll(x, -1, -1))


def _advection(x, theta):  # non-symmetric, no rmatvec given: Aᵀ by torch.func.vjp
    return x * (theta ** 2 + 3) + 0.5 * torch.roll(x, 1, -1)


@pytest.mark.parametrize("solver,mv,symmetric", [("cg", _stencil, True), ("minres", _stencil, True),
                                                 ("gmres", _advection, False), ("bicgstab", _advection, False),
                                                 ("lsqr", _advection, False)])
def test_matvec_parameter_gradient(solver, mv, symmetric):
    theta = torch.randn(7, generator=_gen(15), dtype=F64, requires_grad=True)
    b = torch.randn(3, 7, generator=_gen(16), dtype=F64, requires_grad=True)

    def f(theta, b):
        op = LinearOperator.from_matvec(mv, (7, 7), theta, symmetric=symmetric)
        return iterative_solve(op, b, solver=solver, rtol=1e-13)[0]

    assert torch.autograd.gradcheck(f, (theta, b), atol=1e-6)


@jvp_warning
@pytest.mark.parametrize("solver", ["cg", "minres", "gmres", "bicgstab"])
def test_jvp_dense_and_matvec(solver):
    A, dA = _spd(6), torch.randn(6, 6, generator=_gen(17), dtype=F64)
    b, db = torch.randn(2, 6, generator=_gen(18), dtype=F64), torch.randn(2, 6, generator=_gen(19), dtype=F64)
    _, t = torch.func.jvp(_solve(solver), (A, b), (dA, db))
    _, t_ref = torch.func.jvp(lambda A, b: torch.linalg.solve(A, b.T).T, (A, b), (dA, db))
    assert torch.allclose(t, t_ref, atol=1e-10)
    theta, dtheta = torch.randn(6, generator=_gen(20), dtype=F64), torch.randn(6, generator=_gen(21), dtype=F64)

    def g(theta, b):
        return iterative_solve(LinearOperator.from_matvec(_stencil, (6, 6), theta, symmetric=True), b,
                               solver=solver, rtol=1e-13)[0]

    _, t = torch.func.jvp(g, (theta, b), (dtheta, db))
    h = 1e-6
    fd = (g(theta + h * dtheta, b + h * db) - g(theta - h * dtheta, b - h * db)) / (2 * h)
    assert torch.allclose(t, fd, atol=1e-7)


@jvp_warning
def test_jvp_least_squares_wrt_b_only():
    A = torch.randn(4, 7, generator=_gen(22), dtype=F64)
    b, db = torch.randn(4, generator=_gen(23), dtype=F64), torch.randn(4, generator=_gen(24), dtype=F64)
    _, t = torch.func.jvp(lambda b: _solve("lsqr")(A, b), (b,), (db,))
    assert torch.allclose(t, torch.linalg.pinv(A) @ db, atol=1e-10)
    with pytest.raises(InputError, match="lsqr/lsmr"):
        torch.func.jvp(_solve("lsqr"), (A, b), (A, db))


def test_double_backward():
    A = _nonsym(5).requires_grad_()
    b = torch.randn(5, generator=_gen(25), dtype=F64, requires_grad=True)
    assert torch.autograd.gradgradcheck(_solve("gmres"), (A, b), atol=1e-5)


def test_batched_operator_and_broadcast_b():
    A = torch.stack([_spd(5, 0), _spd(5, 1)]).requires_grad_()  # (2, 5, 5)
    b = torch.randn(5, generator=_gen(26), dtype=F64, requires_grad=True)  # shared by both systems
    assert torch.autograd.gradcheck(_solve("cg"), (A, b), atol=1e-6)


def test_adjoint_failure_raises_with_details():
    A = _nonsym(7).requires_grad_()
    b = torch.randn(7, generator=_gen(27), dtype=F64, requires_grad=True)
    x, info = iterative_solve(LinearOperator.from_dense(A), b, solver="gmres", adjoint_max_iter=2)
    assert int(info.status) == Status.SUCCESS
    with pytest.raises(SolveError, match="adjoint_max_iter") as err:
        x.sum().backward()
    assert err.value.status == Status.MAX_ITERATIONS and err.value.iterations == 2 and err.value.residual > 1e-6


def test_forward_reports_and_does_not_raise():
    A = _spd(7)
    x, info = iterative_solve(A, torch.ones(7, dtype=F64), solver="cg", max_iter=2)
    assert int(info.status) == Status.MAX_ITERATIONS and float(info.residual) > 1e-6


@pytest.mark.parametrize("adjoint_x0", ["zero", "cotangent", "tensor", "callable"])
def test_adjoint_options_give_the_same_gradient(adjoint_x0):
    A = _nonsym(7).requires_grad_()
    b = torch.randn(7, generator=_gen(28), dtype=F64, requires_grad=True)
    u0 = {"zero": "zero", "cotangent": "cotangent", "tensor": torch.ones(7, dtype=F64),
          "callable": lambda g: 0.5 * g}[adjoint_x0]
    M = jacobi(A.detach())
    x, _ = iterative_solve(LinearOperator.from_dense(A), b, solver="bicgstab", M=M, rtol=1e-13,
                           adjoint_rtol=1e-12, adjoint_x0=u0)
    gA, gb = torch.autograd.grad(x.sum(), (A, b))
    gb_ref = torch.linalg.solve(A.detach().T, torch.ones(7, dtype=F64))
    assert torch.allclose(gb, gb_ref, atol=1e-10)
    assert torch.allclose(gA, -gb_ref[:, None] * x.detach()[None, :], atol=1e-10)


def test_bad_arguments():
    with pytest.raises(InputError, match="solver"):
        iterative_solve(_spd(3), torch.ones(3, dtype=F64), solver="jacobi")
    with pytest.raises(InputError, match="adjoint_x0"):
        iterative_solve(_spd(3), torch.ones(3, dtype=F64), adjoint_x0="previous")


def _saved_tensors(fn):
    """Number and bytes of the tensors autograd keeps for the backward of ``fn()``."""
    sizes = []

    def pack(t):
        sizes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return len(sizes), sum(sizes), out


def test_backward_memory_does_not_grow_with_iterations():
    n = 64
    T = 3.0 * torch.eye(n, dtype=F64) - torch.diag(torch.ones(n - 1, dtype=F64), 1) - torch.diag(
        torch.ones(n - 1, dtype=F64), -1)
    A = T.requires_grad_()
    b = torch.randn(4, n, generator=_gen(29), dtype=F64, requires_grad=True)
    counts = {}
    for rtol in (1e-2, 1e-12):
        k, nbytes, (x, info) = _saved_tensors(
            lambda: iterative_solve(LinearOperator.from_dense(A, positive_definite=True), b, solver="cg", rtol=rtol))
        counts[rtol] = (k, nbytes, int(info.iterations.max()))
    (k1, b1, it1), (k2, b2, it2) = counts[1e-2], counts[1e-12]
    assert it2 >= 4 * it1  # many more iterations ...
    assert (k1, b1) == (k2, b2)  # ... the same saved tensors: x and A
    assert b2 == (4 * n + n * n) * 8
    # the forward-only solver refuses autograd through its iterations (a wrong gradient, and a graph per iteration)
    with pytest.raises(InputError, match="forward only.*linear_solve"):
        cg(A, b, rtol=1e-12)


@jvp_warning
def test_vmap_jacrev_jacfwd_over_b():
    A = _spd(5)
    B = torch.randn(4, 5, generator=_gen(30), dtype=F64)

    def f(b):
        return iterative_solve(LinearOperator.from_dense(A), b, solver="cg", rtol=1e-13)[0]

    assert torch.allclose(torch.func.vmap(f)(B), torch.linalg.solve(A, B.T).T, atol=1e-10)
    Ainv = torch.linalg.inv(A)
    assert torch.allclose(torch.func.jacrev(f)(B[0]), Ainv, atol=1e-10)
    assert torch.allclose(torch.func.jacfwd(f)(B[0]), Ainv, atol=1e-10)
    N = _nonsym(5)
    J = torch.func.jacrev(_solve("gmres"))(N, B[0])  # jacrev wrt A: vmap over the cotangent only
    J_ref = torch.func.jacrev(torch.linalg.solve)(N, B[0])
    assert torch.allclose(J, J_ref, atol=1e-9)
    with pytest.raises(InputError, match="vmap"):
        torch.func.vmap(_solve("gmres"), in_dims=(0, None))(torch.stack([N, N]), B[0])


def test_csr_from_values_gradient_is_linear_in_nnz():
    from implicitdiff.implicit.iterative import csr_from_values

    n = 20000  # a dense gradient of this matrix would take 3.2 GB
    crow, col = torch.arange(n + 1), torch.arange(n)
    v = torch.linspace(1.0, 2.0, n, dtype=F64).requires_grad_()
    b = torch.randn(n, generator=_gen(31), dtype=F64)
    A = csr_from_values(crow, col, v, (n, n))
    x, info = iterative_solve(LinearOperator.from_sparse(A, positive_definite=True), b, solver="cg")
    x.sum().backward()
    # x = b / v, so ∂(Σx)/∂v = −b / v²
    assert int(info.status) == 0 and torch.allclose(v.grad, -b / v.detach() ** 2, rtol=1e-8)
    crow3, col3 = torch.tensor([0, 2, 3, 5]), torch.tensor([0, 1, 1, 0, 2])
    vals = torch.tensor([3.0, 1.0, 4.0, 1.0, 5.0], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: csr_from_values(crow3, col3, v, (3, 3)).to_dense(), (vals,))
