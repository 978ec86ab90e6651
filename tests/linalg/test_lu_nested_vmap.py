"""Regression: nested vmap with the factors and the right-hand side batched at different levels.

torch.linalg.lu_solve's batching rule gets this wrong in torch 2.13 (vmap(jacrev(solve)) with a
batched A); the LU factorization therefore solves with a gather and two triangular solves.
"""

import torch
from torch.func import jacfwd, jacrev, vmap

import implicitdiff as idf

D = torch.float64


def test_vmap_of_jacobians_with_batched_matrix():
    g = torch.Generator().manual_seed(1)
    A = torch.randn(4, 3, 3, generator=g, dtype=D) + 3 * torch.eye(3, dtype=D)
    b = torch.randn(4, 3, generator=g, dtype=D)
    Ainv = torch.linalg.inv(A)
    for jac in (jacrev, jacfwd):
        J = vmap(jac(idf.linear_solve, argnums=1))(A, b)
        torch.testing.assert_close(J, Ainv, rtol=1e-10, atol=1e-12)
        J1 = vmap(jac(idf.linear_solve, argnums=1), in_dims=(0, None))(A, b[0])
        torch.testing.assert_close(J1, Ainv, rtol=1e-10, atol=1e-12)


def test_lu_transpose_solve_reuses_factors():
    g = torch.Generator().manual_seed(2)
    A = torch.randn(2, 5, 5, generator=g, dtype=D)
    B = torch.randn(2, 5, 3, generator=g, dtype=D)
    lu, rcond = idf.linalg.LU.factor(A)
    torch.testing.assert_close(lu.solve(B), torch.linalg.solve(A, B))
    torch.testing.assert_close(lu.solve(B, adjoint=True), torch.linalg.solve(A.mT, B))
    assert bool((rcond > 0).all()) and bool((rcond <= 1).all())


def test_row_major_matrix_is_factorized_as_torch_solve_does_with_the_same_solves():
    from implicitdiff._core.torch_private import solve_factorizes_transpose
    from implicitdiff.linalg.lu import LUTransposed

    g = torch.Generator().manual_seed(3)
    A = torch.randn(4, 4, generator=g, dtype=D) + 4 * torch.eye(4, dtype=D)
    B = torch.randn(4, 2, generator=g, dtype=D)
    lu_a, rcond_a = idf.linalg.LU.factor(A, allow_transposed=True)
    lu, rcond = idf.linalg.LU.factor(A)
    assert lu_a.kind == ("lu_t" if solve_factorizes_transpose(A) else "lu") and lu.kind == "lu"
    assert torch.equal(lu_a.solve(B), torch.linalg.solve(A, B))  # the eager path's bits
    lu_t = LUTransposed(*torch.linalg.lu_factor(A.mT))  # the LU of Aᵀ standing for A, in any torch
    for adjoint in (False, True):
        torch.testing.assert_close(lu_t.solve(B, adjoint), lu.solve(B, adjoint))
        torch.testing.assert_close(lu_a.solve(B, adjoint), lu.solve(B, adjoint))
    torch.testing.assert_close(rcond_a, rcond, rtol=0.5, atol=0)  # both estimate the same 1/cond₁(A)
