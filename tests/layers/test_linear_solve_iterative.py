"""linear_solve with Krylov solvers: the matrix-free path of the same contract."""

import pytest
import torch

import implicitdiff as idf
from implicitdiff.linalg import LinearOperator

D = torch.float64


def spd(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(n, n, generator=g, dtype=D)
    return (M @ M.T + n * torch.eye(n, dtype=D)).requires_grad_(), torch.randn(n, generator=g, dtype=D).requires_grad_()


@pytest.mark.parametrize("solver", ["cg", "minres", "gmres", "bicgstab", "lsqr", "lsmr"])
def test_each_solver_matches_dense_solve_and_gradients(solver):
    A, b = spd()
    y = idf.linear_solve(A, b, solver=solver, rtol=1e-12)
    gA, gb = torch.autograd.grad((y * torch.arange(6, dtype=D)).sum(), (A, b))
    y2 = torch.linalg.solve(A, b)
    gA2, gb2 = torch.autograd.grad((y2 * torch.arange(6, dtype=D)).sum(), (A, b))
    torch.testing.assert_close(y, y2, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(gA, gA2, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(gb, gb2, rtol=1e-8, atol=1e-9)


def test_matrix_rhs_and_gradcheck_through_matvec_params():
    A, b = spd()
    B = torch.randn(6, 3, dtype=D)
    torch.testing.assert_close(idf.linear_solve(A, B, solver="cg", rtol=1e-12), torch.linalg.solve(A, B).detach(),
                               rtol=1e-9, atol=1e-10)

    def f(A, b):
        op = LinearOperator.from_matvec(lambda x, A: x @ A.mT, (6, 6), A)  # matrix-free, no tags: GMRES
        return idf.linear_solve(op, b, rtol=1e-12)

    assert torch.autograd.gradcheck(f, (A, b))


def test_auto_picks_cg_for_positive_definite_operator_and_lsmr_for_wide():
    A, b = spd()
    op = LinearOperator.from_matvec(lambda x, A: x @ A.mT, (6, 6), A, positive_definite=True)
    y, info = idf.linear_solve(op, b, return_info=True)
    torch.testing.assert_close(y, torch.linalg.solve(A, b).detach(), rtol=1e-9, atol=1e-10)
    W = torch.randn(3, 6, dtype=D, requires_grad=True)
    c = torch.randn(3, dtype=D, requires_grad=True)
    opw = LinearOperator.from_matvec(lambda x, W: x @ W.mT, (3, 6), W)
    y = idf.linear_solve(opw, c, rtol=1e-12)  # min-norm by LSMR
    torch.testing.assert_close(y, (torch.linalg.pinv(W) @ c).detach(), rtol=1e-8, atol=1e-9)
    g1 = torch.autograd.grad(y.sum(), (W, c))
    g2 = torch.autograd.grad((torch.linalg.pinv(W) @ c).sum(), (W, c))
    for a, e in zip(g1, g2):
        torch.testing.assert_close(a, e, rtol=1e-7, atol=1e-8)


def test_sparse_gradient_stays_on_pattern():
    A, b = spd()
    S = A.detach().to_sparse_coo().requires_grad_()
    y = idf.linear_solve(S, b, solver="cg", rtol=1e-12)
    y.sum().backward()
    assert S.grad.layout == torch.sparse_coo
    gA = torch.autograd.grad(torch.linalg.solve(A, b).sum(), A)[0]
    torch.testing.assert_close(S.grad.to_dense(), gA, rtol=1e-8, atol=1e-9)


def test_nonconvergence_raises_and_nan_policy():
    A, b = spd(20)
    with pytest.raises(idf.SolveError, match="MAX_ITERATIONS"):
        idf.linear_solve(A, b, solver="cg", max_iter=2)
    y = idf.linear_solve(A, b, solver="cg", max_iter=2, on_failure="nan")
    assert bool(torch.isnan(y).all())


def test_iterative_rejects_nearest_and_pinned():
    A, b = spd()
    with pytest.raises(idf.InputError, match="direct solver"):
        idf.linear_solve(A, b, solver="cg", selection=idf.Pinned([0], 0.0))


def test_exact_selection_with_lsmr_reports_inconsistent_system():
    A = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=D)
    b = torch.tensor([1.0, 1.0, 0.0], dtype=D)  # not in range(A)
    with pytest.raises(idf.SolveError, match="INCONSISTENT"):
        idf.linear_solve(A, b, solver="lsmr", selection="exact")
    y = idf.linear_solve(A, b, solver="lsmr", selection="min_norm", rtol=1e-12)
    torch.testing.assert_close(y, torch.linalg.pinv(A) @ b, rtol=1e-9, atol=1e-10)
    # a consistent tall system passes under "exact"
    y = idf.linear_solve(A, A @ torch.tensor([1.0, 2.0], dtype=D), solver="lsmr", selection="exact", rtol=1e-12)
    torch.testing.assert_close(y, torch.tensor([1.0, 2.0], dtype=D), rtol=1e-9, atol=1e-10)


def test_argmin_under_vmap_with_default_solver():
    X = torch.randn(10, 3, dtype=D, generator=torch.Generator().manual_seed(0))
    f = lambda w, c: 0.5 * ((X @ w - c) ** 2).sum() + 0.5 * (w ** 2).sum()  # noqa: E731
    C = torch.randn(4, 10, dtype=D, generator=torch.Generator().manual_seed(1))
    W = torch.func.vmap(lambda c: idf.argmin(f, torch.zeros(3, dtype=D), c))(C)
    ref = torch.linalg.solve(X.T @ X + torch.eye(3, dtype=D), X.T @ C.T).T
    torch.testing.assert_close(W, ref, rtol=1e-8, atol=1e-9)


def test_uncoalesced_coo_matrix_is_accepted():
    # duplicates sum: A = diag(1, 2)
    A = torch.sparse_coo_tensor(torch.tensor([[0, 1, 1], [0, 1, 1]]), torch.ones(3, dtype=D), (2, 2),
                                check_invariants=True)
    y = idf.linear_solve(A, torch.ones(2, dtype=D), solver="cg", rtol=1e-12)
    torch.testing.assert_close(y, torch.tensor([1.0, 0.5], dtype=D))
