"""The second probe's linear-solve findings: clear errors and honest failure reports."""

import pytest
import torch

import implicitdiff as idf
from implicitdiff import InputError, SolveError
from implicitdiff.linalg import LinearOperator
from implicitdiff.linalg.selection import factorize

F64 = torch.float64


def _tridiag(n=5):
    return (2 * torch.eye(n, dtype=F64) - torch.diag(torch.ones(n - 1, dtype=F64), 1)
            - 0.5 * torch.diag(torch.ones(n - 1, dtype=F64), -1))


# ---------------------------------------------------------------- finding 5: rows of b on the iterative path
@pytest.mark.parametrize("make", [lambda A: A, LinearOperator.from_dense, lambda A: A.to_sparse(),
                                  lambda A: LinearOperator.from_matvec(lambda x: x @ A.mT, (5, 5))])
def test_iterative_rows_of_b_raise_a_message_that_names_the_fix(make):
    A = _tridiag()
    B = torch.randn(3, 5, dtype=F64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(InputError) as e:
        idf.linear_solve(make(A), B, solver="gmres")
    msg = str(e.value)
    assert "(3, 5)" in msg and "b.mT" in msg and "(*, 5)" not in msg  # no longer "must be (*, 5)" for a (3, 5) b
    # the fix the message names gives the rows' solutions
    y = idf.linear_solve(make(A), B.mT, solver="gmres").mT
    torch.testing.assert_close(y, torch.linalg.solve(A, B.mT).mT, rtol=1e-8, atol=1e-10)


def test_iterative_batched_operator_accepts_its_batch_of_vectors():
    A = torch.stack([_tridiag(), 3 * torch.eye(5, dtype=F64)])
    B = torch.randn(2, 5, dtype=F64, generator=torch.Generator().manual_seed(1))
    y = idf.linear_solve(LinearOperator.from_dense(A), B, solver="gmres")
    torch.testing.assert_close(y, torch.linalg.solve(A, B), rtol=1e-8, atol=1e-10)


# ---------------------------------------------------------------- finding 6: a 1-D matvec under vectorized=True
def test_matvec_for_vectors_only_names_vectorized_false():
    M = _tridiag(3)
    B = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=F64)
    op = LinearOperator.from_matvec(lambda v: M @ v, (3, 3))
    with pytest.raises(InputError, match="vectorized=False") as e:
        idf.linear_solve(op, B, solver="gmres")
    assert isinstance(e.value.__cause__, RuntimeError)  # torch's own error is kept as the cause
    op1 = LinearOperator.from_matvec(lambda v: M @ v, (3, 3), vectorized=False)
    torch.testing.assert_close(idf.linear_solve(op1, B, solver="gmres"), torch.linalg.solve(M, B),
                               rtol=1e-8, atol=1e-10)


def test_rmatvec_for_vectors_only_names_vectorized_false():
    M = _tridiag(3)
    op = LinearOperator.from_matvec(lambda v: v @ M.mT, (3, 3), rmatvec=lambda v: M.mT @ v)
    with pytest.raises(InputError, match="rmatvec.*vectorized=False"):
        op.rmv(torch.ones(2, 3, dtype=F64))
    torch.testing.assert_close(op.rmv(torch.ones(3, dtype=F64)), M.mT @ torch.ones(3, dtype=F64))


# ---------------------------------------------------------------- finding 7: splu is first order only
def _sparse():
    return (3 * torch.eye(3, dtype=F64) + torch.diag(torch.ones(2, dtype=F64), 1)).to_sparse()


def test_splu_second_derivative_names_splu_and_the_fix():
    b = torch.ones(3, dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad(idf.linear_solve(_sparse(), b, solver="splu").pow(3).sum(), b, create_graph=True)
    with pytest.raises(InputError, match=r"splu.*first order.*solver='lu'"):
        torch.autograd.grad(g.sum(), b)


def test_splu_first_order_with_create_graph_matches_dense():
    A = _sparse()
    vals = A.coalesce().values().clone().requires_grad_()
    Asp = torch.sparse_coo_tensor(A.coalesce().indices(), vals, (3, 3), check_invariants=True)
    b = torch.tensor([1.0, -2.0, 0.5], dtype=F64, requires_grad=True)
    gv, gb = torch.autograd.grad(idf.linear_solve(Asp, b, solver="splu").sum(), (vals, b), create_graph=True)
    Ad = A.to_dense().requires_grad_()
    gA_ref, gb_ref = torch.autograd.grad(torch.linalg.solve(Ad, b).sum(), (Ad, b))
    idx = A.coalesce().indices()
    torch.testing.assert_close(gb.detach(), gb_ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gv.detach(), gA_ref[idx[0], idx[1]], rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------- finding 9: honest failure numbers
def test_svd_exact_singular_reports_the_condition_of_A():
    S = torch.tensor([[1.0, 2.0], [2.0, 4.0]], dtype=F64)
    with pytest.raises(SolveError, match="SINGULAR") as e:
        idf.linear_solve(S, torch.tensor([1.0, 2.0], dtype=F64), selection="exact", solver="svd")
    assert "condition estimate 1.000e+00" not in str(e.value)
    _, info = idf.linear_solve_ex(S, torch.tensor([1.0, 2.0], dtype=F64), selection="exact", solver="svd")
    assert float(info.cond) > 1e15  # s_max / s_min of a singular A: huge (or inf), never 1
    # an exactly zero singular value: inf; a nonsingular A: torch's 2-norm condition
    _, status, _, cond = factorize(torch.diag(torch.tensor([1.0, 0.0], dtype=F64)), "exact", "svd")
    assert int(status) != 0 and torch.isinf(cond)
    A = _tridiag(4)
    _, status, _, cond = factorize(A, "least_squares", "svd")
    torch.testing.assert_close(cond, torch.linalg.cond(A), rtol=1e-10, atol=0)


def test_svd_min_norm_keeps_the_pseudo_inverse_condition():
    S = torch.tensor([[1.0, 2.0], [2.0, 4.0]], dtype=F64)
    _, info = idf.linear_solve_ex(S, torch.tensor([1.0, 2.0], dtype=F64), selection="min_norm", solver="svd")
    assert int(info.status) == 0
    torch.testing.assert_close(info.cond, torch.tensor(1.0, dtype=F64))  # one kept singular value


def test_singular_pinned_remainder_reports_no_residual_instead_of_nan():
    A = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=F64)
    with pytest.raises(SolveError, match="SINGULAR") as e:
        idf.linear_solve(A, torch.ones(2, dtype=F64), selection=idf.Pinned([0], 0.0))
    assert "residual nan" not in str(e.value) and "no residual" in str(e.value)


def test_a_vectorized_matvec_failing_for_another_reason_keeps_its_own_error():
    # review: the vectorized=False hint is only for a map that runs on one vector but not on the batch;
    # a map that fails on every input (the library's own operators wrap user functions) keeps its error
    def broken(x):
        raise RuntimeError("the user's own failure")

    op = LinearOperator.from_matvec(broken, (3, 3), dtype=torch.float64)
    with pytest.raises(RuntimeError, match="the user's own failure") as err:
        op.mv(torch.ones(2, 3, dtype=torch.float64))
    assert not isinstance(err.value, InputError)


def test_splu_gradient_in_b_alone_is_constant_not_an_error():
    # review: with only b requiring grad, ∂y/∂b = A⁻¹ does not depend on b: the gradient of a linear
    # loss is a constant (as torch.linalg.solve's), not linked to y (which made a second derivative raise)
    b = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(idf.linear_solve(_sparse(), b, solver="splu").sum(), b, create_graph=True)
    assert not g.requires_grad
    torch.testing.assert_close(g, torch.linalg.solve(_sparse().to_dense().mT, torch.ones(3, dtype=torch.float64)))
