"""The reusable factorizations (LU, Cholesky, QR, QRᵀ, SVD) and ``factorize``, against torch.linalg oracles."""

from __future__ import annotations

import pytest
import torch

from implicitdiff import InputError, Status
from implicitdiff.linalg import CholeskyFactor as Cholesky, Factorization, LUFactor as LU, QRFactor as QR, QRTransposed
from implicitdiff.linalg import SVDFactor as SVD
from implicitdiff.linalg.factorization import from_tensors, hager_inv_norm1, rank_flags
from implicitdiff.linalg.selection import consistency_rtol, factorize, resolve_selection

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)


def _rcond1(A):
    """Exact 1-norm reciprocal condition number ``1 / (‖A‖₁ ‖A⁻¹‖₁)``."""
    return 1.0 / (torch.linalg.matrix_norm(A, ord=1) * torch.linalg.matrix_norm(torch.linalg.inv(A), ord=1))


# ----------------------------------------------------------------------------- square: LU, Cholesky
@pytest.mark.parametrize("batch", [(), (3,), (2, 2)])
def test_lu_solve_and_adjoint_reuse_the_factors(mk, g, batch):
    A = mk.randn(g, *batch, 5, 5) + 3 * torch.eye(5, dtype=F64)
    B = mk.randn(g, *batch, 5, 2)
    fact, rcond = LU.factor(A)
    torch.testing.assert_close(fact.solve(B), torch.linalg.solve(A, B), **TOL)
    torch.testing.assert_close(fact.solve(B, adjoint=True), torch.linalg.solve(A.mT, B), **TOL)
    assert rcond.shape == batch


def test_lu_condition_estimate_brackets_the_exact_value(mk, g):
    # Hager's estimate of ‖A⁻¹‖₁ is a lower bound (so rcond is an upper bound), usually within 3×.
    A = torch.stack([mk.well_conditioned(g, 6, 6, cond=c) for c in (2.0, 1e3, 1e8)])
    _, rcond = LU.factor(A)
    exact = _rcond1(A)
    assert bool((rcond >= exact * (1 - 1e-10)).all()), (rcond, exact)
    assert bool((rcond <= 10 * exact).all()), (rcond, exact)


def test_lu_exactly_singular_element_has_zero_rcond_without_affecting_others(mk, g):
    A = mk.randn(g, 3, 4, 4) + 4 * torch.eye(4, dtype=F64)
    A[1] = torch.outer(mk.randn(g, 4), mk.randn(g, 4))  # rank one
    A[1, :, 0] = 0.0  # and an exactly zero pivot column
    fact, rcond = LU.factor(A)
    assert rcond[1] == 0.0
    assert bool((rcond[[0, 2]] > 1e-3).all())
    B = mk.randn(g, 4, 1)
    torch.testing.assert_close(fact.solve(B)[0], torch.linalg.solve(A[0], B), **TOL)


def test_cholesky_solve_adjoint_and_rcond(mk, g):
    A = mk.spd(g, 5, batch=(2,))
    B = mk.randn(g, 2, 5, 3)
    fact, rcond = Cholesky.factor(A)
    torch.testing.assert_close(fact.solve(B), torch.linalg.solve(A, B), **TOL)
    torch.testing.assert_close(fact.solve(B, adjoint=True), torch.linalg.solve(A, B), **TOL)  # A⁻ᵀ = A⁻¹
    exact = _rcond1(A)
    assert bool((rcond >= exact * (1 - 1e-10)).all()) and bool((rcond <= 10 * exact).all())


def test_cholesky_reads_the_lower_triangle_and_flags_indefinite(mk, g):
    A = mk.spd(g, 4)
    garbage_upper = A + torch.triu(mk.randn(g, 4, 4), diagonal=1)  # only the strict upper part changes
    B = mk.randn(g, 4, 1)
    torch.testing.assert_close(Cholesky.factor(garbage_upper)[0].solve(B), torch.linalg.solve(A, B), **TOL)
    _, rcond = Cholesky.factor(torch.stack([A, -A]))
    assert rcond[0] > 0 and rcond[1] == 0.0


# ----------------------------------------------------------------------------- QR (tall) and QRᵀ (wide)
@pytest.mark.parametrize("batch", [(), (2,)])
def test_qr_is_the_least_squares_map_of_a_tall_matrix(mk, g, batch):
    A = mk.randn(g, *batch, 6, 3)
    B = mk.randn(g, *batch, 6, 2)
    fact, rcond = QR.factor(A)
    pinv = torch.linalg.pinv(A)
    torch.testing.assert_close(fact.solve(B), pinv @ B, **TOL)
    torch.testing.assert_close(fact.solve(B), torch.linalg.lstsq(A, B).solution, **TOL)
    C = mk.randn(g, *batch, 3, 2)
    torch.testing.assert_close(fact.solve(C, adjoint=True), pinv.mT @ C, **TOL)
    assert bool((rcond > 1e-3).all())


@pytest.mark.parametrize("batch", [(), (2,)])
def test_qr_transposed_is_the_min_norm_map_of_a_wide_matrix(mk, g, batch):
    A = mk.randn(g, *batch, 3, 6)
    B = mk.randn(g, *batch, 3, 2)
    fact, _ = QRTransposed.factor(A)
    pinv = torch.linalg.pinv(A)
    Y = fact.solve(B)
    torch.testing.assert_close(Y, pinv @ B, **TOL)
    torch.testing.assert_close(A @ Y, B, **TOL)  # consistent: full row rank
    C = mk.randn(g, *batch, 6, 2)
    torch.testing.assert_close(fact.solve(C, adjoint=True), pinv.mT @ C, **TOL)


def test_qr_rcond_reveals_rank_deficiency(mk, g):
    A = mk.sv(g, 6, 3, [3.0, 1.0])  # rank 2 of 3 columns
    _, rcond = QR.factor(A)
    assert rcond < 1e-12
    _, rcond_t = QRTransposed.factor(A.mT)
    assert rcond_t < 1e-12


# ----------------------------------------------------------------------------- SVD
@pytest.mark.parametrize("shape", [(4, 6), (6, 4), (5, 5)])
def test_svd_is_the_pseudo_inverse_with_rank_truncation(mk, g, shape):
    m, n = shape
    A = mk.sv(g, m, n, [4.0, 2.0, 1e-20])  # numerical rank 2
    fact, rank, cond = SVD.factor(A)
    pinv = torch.linalg.pinv(A)
    B = mk.randn(g, m, 2)
    C = mk.randn(g, n, 2)
    torch.testing.assert_close(fact.solve(B), pinv @ B, **TOL)
    torch.testing.assert_close(fact.solve(C, adjoint=True), pinv.mT @ C, **TOL)
    assert int(rank) == 2
    torch.testing.assert_close(cond, torch.tensor(2.0, dtype=F64), rtol=1e-10, atol=0)


def test_svd_rank_tolerance_and_per_element_rank(mk, g):
    s_small = 1e-7
    A = torch.stack([mk.sv(g, 4, 4, [1.0, 0.5, 0.2, s_small]),
                     mk.sv(g, 4, 4, [1.0, 0.5, 0.2, 0.1])])
    _, rank_default, _ = SVD.factor(A)
    assert rank_default.tolist() == [4, 4]
    fact, rank_loose, cond = SVD.factor(A, 1e-6)
    assert rank_loose.tolist() == [3, 4]
    torch.testing.assert_close(cond, torch.tensor([5.0, 10.0], dtype=F64), rtol=1e-8, atol=0)
    B = mk.randn(g, 2, 4, 1)
    torch.testing.assert_close(fact.solve(B), torch.linalg.pinv(A, rtol=1e-6) @ B, **TOL)


def test_svd_of_zero_matrix_is_zero_map():
    fact, rank, _ = SVD.factor(torch.zeros(3, 2, dtype=F64))
    assert int(rank) == 0
    assert bool((fact.solve(torch.ones(3, 1, dtype=F64)) == 0).all())


# ----------------------------------------------------------------------------- the common interface
@pytest.mark.parametrize("cls, shape", [(LU, (4, 4)), (Cholesky, (4, 4)), (QR, (5, 3)),
                                        (QRTransposed, (3, 5)), (SVD, (3, 5))])
def test_tensors_round_trip_and_flags(mk, g, cls, shape):
    A = mk.spd(g, 4) if cls is Cholesky else mk.randn(g, *shape)
    fact = cls.factor(A)[0]
    assert isinstance(fact, Factorization)
    rebuilt = from_tensors(fact.kind, fact.tensors())
    assert type(rebuilt) is cls
    B = mk.randn(g, shape[0], 2)
    torch.testing.assert_close(rebuilt.solve(B), fact.solve(B), rtol=0, atol=0)
    m, n = shape
    row, col = rank_flags(fact.kind)
    # A A⁺ = I iff full row rank, A⁺ A = I iff full column rank (for these full-rank matrices)
    P_range = A @ fact.solve(torch.eye(m, dtype=F64))
    P_row = fact.solve(A)
    if cls is SVD:  # serves any rank, so it claims neither flag (the extra gradient terms then vanish)
        assert (row, col) == (False, False)
    else:
        assert row == torch.allclose(P_range, torch.eye(m, dtype=F64), atol=1e-10) == (m <= n)
        assert col == torch.allclose(P_row, torch.eye(n, dtype=F64), atol=1e-10) == (m >= n)


def test_hager_estimate_is_a_tight_lower_bound(mk, g):
    A = mk.randn(g, 5, 6, 6) + 2 * torch.eye(6, dtype=F64)
    est = hager_inv_norm1(lambda X, adj: torch.linalg.solve(A.mT if adj else A, X), 6, (5,), F64, A.device)
    exact = torch.linalg.matrix_norm(torch.linalg.inv(A), ord=1)
    assert bool((est <= exact * (1 + 1e-12)).all())
    assert bool((est >= exact / 3).all())


# ----------------------------------------------------------------------------- factorize / selections
def test_resolve_selection():
    assert resolve_selection("auto", 3, 3) == "exact"
    assert resolve_selection("auto", 2, 3) == "min_norm"
    assert resolve_selection("auto", 3, 2) == "least_squares"
    for s in ("exact", "min_norm", "least_squares"):
        assert resolve_selection(s, 3, 2) == s
    with pytest.raises(InputError, match="least_squares.*min_norm"):
        resolve_selection("least_squares", 2, 3)
    with pytest.raises(InputError, match="selection must be one of"):
        resolve_selection("pinv", 2, 3)


def test_consistency_rtol_is_sqrt_eps():
    assert consistency_rtol(F64) == pytest.approx(torch.finfo(F64).eps ** 0.5)
    assert consistency_rtol(torch.float32) == pytest.approx(torch.finfo(torch.float32).eps ** 0.5)


@pytest.mark.parametrize("shape, selection, solver, kind", [
    ((4, 4), "exact", "auto", "lu"),
    ((4, 4), "exact", "lu", "lu"),
    ((4, 4), "exact", "cholesky", "cholesky"),
    ((4, 4), "min_norm", "qr", "qr"),
    ((3, 5), "min_norm", "auto", "qr_t"),
    ((3, 5), "exact", "auto", "qr_t"),
    ((5, 3), "least_squares", "auto", "qr"),
    ((5, 3), "min_norm", "auto", "qr"),
    ((5, 3), "least_squares", "svd", "svd"),
])
def test_factorize_picks_the_factorization(mk, g, shape, selection, solver, kind):
    A = mk.spd(g, shape[0]) if solver == "cholesky" else mk.well_conditioned(g, *shape)
    fact, status, rank, cond = factorize(A, selection, solver)
    # a row-major A is LU-factorized as Aᵀ (no copy), which is the same map with the adjoint flipped
    assert fact.kind == kind or (kind, fact.kind) == ("lu", "lu_t")
    assert int(status) == Status.SUCCESS and int(rank) == min(shape)
    assert 1.0 <= float(cond) < 1e3


def test_factorize_min_norm_falls_back_to_svd_for_rank_deficient_batches(mk, g):
    A = torch.stack([mk.well_conditioned(g, 3, 5), mk.sv(g, 3, 5, [2.0, 1.0])])
    fact, status, rank, _ = factorize(A, "min_norm", "auto")
    assert fact.kind == "svd"
    assert status.tolist() == [0, 0] and rank.tolist() == [3, 2]
    B = mk.randn(g, 2, 3, 1)
    torch.testing.assert_close(fact.solve(B), torch.linalg.pinv(A) @ B, **TOL)


@pytest.mark.parametrize("solver", ["auto", "svd"])
def test_factorize_statuses(mk, g, solver):
    singular = mk.sv(g, 4, 4, [1.0, 1.0, 1.0])
    _, status, _, _ = factorize(torch.stack([mk.well_conditioned(g, 4, 4), singular]), "exact", solver)
    assert status.tolist() == [Status.SUCCESS, Status.SINGULAR]
    deficient = mk.sv(g, 5, 3, [1.0, 1.0])
    _, status, rank, _ = factorize(torch.stack([mk.well_conditioned(g, 5, 3), deficient]), "least_squares", solver)
    assert status.tolist() == [Status.SUCCESS, Status.RANK_DEFICIENT]
    assert rank.tolist()[0] == 3 and rank.tolist()[1] <= 2
    # a rank-deficient non-square system under "exact" is decided by the (exact-rank) SVD
    fact, status, rank, _ = factorize(mk.sv(g, 3, 5, [1.0, 1.0]), "exact", solver)
    assert fact.kind == "svd" and int(status) == Status.SUCCESS and int(rank) == 2


def test_factorize_rank_rtol(mk, g):
    A = mk.sv(g, 4, 4, [1.0, 1.0, 1.0, 1e-5])
    assert int(factorize(A, "exact", "auto")[1]) == Status.SUCCESS
    assert int(factorize(A, "exact", "auto", rank_rtol=1e-3)[1]) == Status.SINGULAR
    assert int(factorize(A, "min_norm", "svd", rank_rtol=1e-3)[2]) == 3


@pytest.mark.parametrize("shape, solver, match", [
    ((3, 4), "lu", "solver='lu' needs a square A"),
    ((3, 4), "cholesky", "solver='cholesky' needs a square A"),
    ((3, 3), "gauss", "solver must be one of"),
])
def test_factorize_rejects_bad_solvers(shape, solver, match):
    with pytest.raises(InputError, match=match):
        factorize(torch.ones(shape, dtype=F64), "min_norm", solver)
