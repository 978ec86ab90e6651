"""``LinearOperator``: dense, batched, sparse and matrix-free applies, tags, and gradients through params."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import implicitdiff as idf
from implicitdiff import InputError
from implicitdiff.linalg import LinearOperator, aslinearoperator

F64 = torch.float64
TOL = dict(rtol=1e-12, atol=1e-12)
CSR_BETA = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")


def _sparse(A, layout):
    return A.to_sparse() if layout == "coo" else A.to_sparse_csr()


# ----------------------------------------------------------------------------- dense
@pytest.mark.parametrize("xshape", [(4,), (2, 4), (2, 3, 4)])
def test_dense_mv_rmv_transpose_to_dense(mk, g, xshape):
    A = mk.randn(g, 3, 4)
    op = LinearOperator.from_dense(A)
    x = mk.randn(g, *xshape)
    y = mk.randn(g, *xshape[:-1], 3)
    torch.testing.assert_close(op.mv(x), x @ A.T, **TOL)
    torch.testing.assert_close(op.rmv(y), y @ A, **TOL)
    torch.testing.assert_close(op.T.mv(y), y @ A, **TOL)
    torch.testing.assert_close(op.T.rmv(x), x @ A.T, **TOL)
    assert op.T.shape == (4, 3)
    assert op.to_dense() is A
    assert (op.shape, op.batch_shape, op.dtype, op.is_dense, op.is_sparse) == ((3, 4), torch.Size(()), F64, True,
                                                                               False)
    assert op.params[0] is A and op.matrix is A


def test_batched_dense_operator_broadcasts_against_vectors(mk, g):
    A = mk.randn(g, 2, 3, 4)
    op = LinearOperator.from_dense(A)
    assert op.batch_shape == torch.Size([2]) and op.shape == (3, 4)
    x = mk.randn(g, 4)
    torch.testing.assert_close(op.mv(x), (A @ x), **TOL)  # one x, two matrices
    X = mk.randn(g, 2, 4)
    torch.testing.assert_close(op.mv(X), (A @ X.unsqueeze(-1)).squeeze(-1), **TOL)
    Y = mk.randn(g, 2, 3)
    torch.testing.assert_close(op.rmv(Y), (A.mT @ Y.unsqueeze(-1)).squeeze(-1), **TOL)


def test_params_replace_the_stored_tensors(mk, g):
    A, A2 = mk.randn(g, 3, 3), mk.randn(g, 3, 3)
    op = LinearOperator.from_dense(A)
    x = mk.randn(g, 3)
    torch.testing.assert_close(op.mv(x, A2), A2 @ x, **TOL)
    torch.testing.assert_close(op.rmv(x, A2), A2.T @ x, **TOL)


def test_gradients_flow_through_dense_params(mk, g):
    A = mk.randn(g, 3, 4).requires_grad_()
    x = mk.randn(g, 2, 4).requires_grad_()
    y = mk.randn(g, 2, 3).requires_grad_()
    op = LinearOperator.from_dense(A)
    assert gradcheck(lambda A, x: op.mv(x, A), (A, x), check_forward_ad=True)
    assert gradcheck(lambda A, y: op.rmv(y, A), (A, y), check_forward_ad=True)


# ----------------------------------------------------------------------------- tags
def test_positive_definite_implies_symmetric_and_transpose_is_self(mk, g):
    A = mk.spd(g, 4)
    op = LinearOperator.from_dense(A, positive_definite=True)
    assert op.symmetric and op.positive_definite
    assert op.T is op
    x = mk.randn(g, 4)
    torch.testing.assert_close(op.rmv(x), A @ x, **TOL)
    op.check_tags()  # holds: no error


@pytest.mark.parametrize("batch", [(), (3,)])
def test_check_tags_catches_false_tags(mk, g, batch):
    N = mk.randn(g, *batch, 4, 4)
    with pytest.raises(InputError, match="symmetric.*drop symmetric=True"):
        LinearOperator.from_dense(N, symmetric=True).check_tags()
    S = N + N.mT
    LinearOperator.from_dense(S, symmetric=True).check_tags()
    indefinite = S - 100 * torch.eye(4, dtype=F64)
    with pytest.raises(InputError, match="positive_definite.*drop positive_definite=True"):
        LinearOperator.from_dense(indefinite, positive_definite=True).check_tags()


def test_check_tags_without_tags_is_a_no_op(mk, g):
    LinearOperator.from_dense(mk.randn(g, 3, 3)).check_tags()  # asymmetric but untagged: nothing to check


@pytest.mark.parametrize("kwargs", [dict(symmetric=True), dict(positive_definite=True)])
def test_tags_need_a_square_operator(kwargs):
    with pytest.raises(InputError, match="must be square"):
        LinearOperator.from_dense(torch.ones(2, 3, dtype=F64), **kwargs)


def test_constructor_errors():
    with pytest.raises(InputError, match="shape must be"):
        LinearOperator(lambda x: x, (3,))
    with pytest.raises(InputError, match="from_dense needs a dense tensor"):
        LinearOperator.from_dense(torch.ones(3, dtype=F64))
    with pytest.raises(InputError, match="from_dense needs a dense tensor"):
        LinearOperator.from_dense([[1.0]])
    with pytest.raises(InputError, match="from_sparse needs"):
        LinearOperator.from_sparse(torch.ones(2, 2, dtype=F64))
    with pytest.raises(InputError, match="must be a torch.Tensor or an implicitdiff.linalg.LinearOperator"):
        aslinearoperator([[1.0, 0.0], [0.0, 1.0]])


# ----------------------------------------------------------------------------- sparse
@CSR_BETA
@pytest.mark.parametrize("layout", ["coo", "csr"])
@pytest.mark.parametrize("xshape", [(4,), (2, 4), (2, 2, 4)])
def test_sparse_mv_rmv_transpose_to_dense(mk, g, layout, xshape):
    A = mk.randn(g, 3, 4) * (mk.randn(g, 3, 4) > 0)  # some structural zeros
    op = LinearOperator.from_sparse(_sparse(A, layout))
    assert op.is_sparse and not op.is_dense and op.shape == (3, 4)
    x = mk.randn(g, *xshape)
    y = mk.randn(g, *xshape[:-1], 3)
    torch.testing.assert_close(op.mv(x), x @ A.T, **TOL)
    torch.testing.assert_close(op.rmv(y), y @ A, **TOL)
    torch.testing.assert_close(op.T.mv(y), y @ A, **TOL)
    torch.testing.assert_close(op.to_dense(), A, rtol=0, atol=0)


@CSR_BETA
@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_aslinearoperator(mk, g, layout):
    A = mk.randn(g, 3, 3)
    op = aslinearoperator(A, symmetric=False)
    assert op.is_dense and aslinearoperator(op) is op
    sp = aslinearoperator(_sparse(A, layout), positive_definite=False)
    assert sp.is_sparse
    torch.testing.assert_close(sp.to_dense(), A, rtol=0, atol=0)


# ----------------------------------------------------------------------------- matrix-free
def _mf(M, **kw):
    return LinearOperator.from_matvec(lambda x, M: x @ M.mT, M.shape, M, **kw)


def test_matvec_operator_infers_dtype_and_derives_rmv_by_vjp(mk, g):
    M = mk.randn(g, 3, 4)
    op = _mf(M)
    assert (op.dtype, op.device, op.matrix, op.is_dense, op.is_sparse) == (F64, M.device, None, False, False)
    y = mk.randn(g, 2, 3)
    torch.testing.assert_close(op.rmv(y), y @ M, **TOL)  # no rmatvec given: Aᵀy is a vjp of the matvec
    torch.testing.assert_close(op.T.mv(y), y @ M, **TOL)
    x = mk.randn(g, 4)
    torch.testing.assert_close(op.T.rmv(x), M @ x, **TOL)
    torch.testing.assert_close(op.to_dense(), M, **TOL)
    assert "matvec" in repr(op) and "(3, 4)" in repr(op)


def test_matvec_operator_with_rmatvec_and_transpose(mk, g):
    M = mk.randn(g, 3, 4)
    calls = []

    def rmatvec(y, M):
        calls.append(1)
        return y @ M

    op = LinearOperator.from_matvec(lambda x, M: x @ M.mT, (3, 4), M, rmatvec=rmatvec)
    x = mk.randn(g, 4)
    y = mk.randn(g, 3)
    torch.testing.assert_close(op.rmv(y), M.T @ y, **TOL)
    assert calls, "the given rmatvec must be used"
    torch.testing.assert_close(op.T.mv(y), M.T @ y, **TOL)
    torch.testing.assert_close(op.T.rmv(x), M @ x, **TOL)
    assert op.T.shape == (4, 3)


def test_unvectorized_matvec_is_batched_with_vmap(mk, g):
    M = mk.randn(g, 3, 4)

    def mv(x, M):
        assert x.dim() == 1, "a non-vectorized matvec only ever sees single vectors"
        return M @ x

    op = LinearOperator.from_matvec(mv, (3, 4), M, vectorized=False)
    X = mk.randn(g, 2, 5, 4)
    torch.testing.assert_close(op.mv(X), X @ M.T, **TOL)
    Y = mk.randn(g, 5, 3)
    torch.testing.assert_close(op.rmv(Y), Y @ M, **TOL)
    torch.testing.assert_close(op.to_dense(), M, **TOL)


def test_gradients_flow_through_matvec_params_at_second_order(mk, g):
    # rmv derived by torch.func.vjp must itself be differentiable in the params (used by adjoint solves)
    M = mk.randn(g, 3, 4).requires_grad_()
    y = mk.randn(g, 2, 3).requires_grad_()
    x = mk.randn(g, 2, 4).requires_grad_()
    op = _mf(M.detach())
    assert gradcheck(lambda M, y: op.rmv(y, M), (M, y))
    assert gradgradcheck(lambda M, y: op.rmv(y, M) ** 2, (M, y))
    assert gradcheck(lambda M, x: op.mv(x, M), (M, x), check_forward_ad=True)


def test_matvec_operator_tags_are_checked(mk, g):
    S = mk.spd(g, 4)
    LinearOperator.from_matvec(lambda x, S: x @ S, (4, 4), S, positive_definite=True).check_tags()
    with pytest.raises(InputError, match="positive_definite"):
        LinearOperator.from_matvec(lambda x, S: -(x @ S), (4, 4), S, positive_definite=True).check_tags()


def test_repr_names_kind_and_tags(mk, g):
    r = repr(LinearOperator.from_dense(mk.spd(g, 2, batch=(3,)), positive_definite=True))
    assert "dense" in r and "batch_shape=(3,)" in r and "positive_definite" in r


# ----------------------------------------------------------------------------- with linear_solve
@CSR_BETA
@pytest.mark.parametrize("kind", ["dense_op", "coo", "csr", "coo_op"])
def test_linear_solve_accepts_operators_and_sparse_matrices(mk, g, kind):
    A = mk.randn(g, 4, 4) + 4 * torch.eye(4, dtype=F64)
    A[0, 3] = A[2, 1] = 0.0
    b = mk.randn(g, 4)
    wrapped = {"dense_op": lambda: LinearOperator.from_dense(A), "coo": lambda: A.to_sparse(),
               "csr": lambda: A.to_sparse_csr(), "coo_op": lambda: LinearOperator.from_sparse(A.to_sparse())}[kind]()
    torch.testing.assert_close(idf.linear_solve(wrapped, b), torch.linalg.solve(A, b), rtol=1e-12, atol=1e-12)


def test_gradient_to_a_sparse_matrix_lives_on_its_pattern(mk, g):
    A = mk.randn(g, 4, 4) + 4 * torch.eye(4, dtype=F64)
    A[0, 3] = A[2, 1] = 0.0
    b = mk.randn(g, 4)
    S = A.to_sparse().coalesce().requires_grad_()
    (gS,) = torch.autograd.grad(idf.linear_solve(S, b).square().sum(), S)
    Ad = A.clone().requires_grad_()
    (gA,) = torch.autograd.grad(torch.linalg.solve(Ad, b).square().sum(), Ad)
    dense = gS.to_dense()
    mask = A != 0
    torch.testing.assert_close(dense[mask], gA[mask], rtol=1e-10, atol=1e-12)
    assert bool((dense[~mask] == 0).all())
