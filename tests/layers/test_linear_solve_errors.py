"""Bad inputs raise ``InputError`` naming the argument and the fix; failed solves raise ``SolveError``
with a status, residual, condition estimate and a hint — or, per batch element, become NaN
(``on_failure="nan"``/``"warn"``, ``linear_solve_ex``) without touching the other elements."""

from __future__ import annotations

import pytest
import torch
from torch.func import vmap

import implicitdiff as idf
from implicitdiff import InputError, Nearest, Pinned, SolveError, SolveWarning, Status
from implicitdiff.linalg import LinearOperator

F64 = torch.float64


def _singular(mk, g):
    # exactly singular in floating point (LU meets an exact zero pivot, so its factors hold Inf/NaN),
    # times a random positive scale
    scale = 0.5 + torch.rand((), generator=g, dtype=F64)
    return scale * torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [0.0, 1.0, 1.0]], dtype=F64)


# ============================================================================ InputError
@pytest.mark.parametrize("a_shape, b_shape, match", [
    ((3, 4), (2,), r"b has shape \(2,\) but A has shape \(3, 4\).*b must be \(3,\)"),
    ((3, 4), (4, 2), r"b must be \(3,\)"),
    ((3, 3), (2, 3), r"b has shape \(2, 3\)"),  # not A.shape[:-1]: a (2, 3) matrix rhs, 2 ≠ 3 rows
    ((2, 3, 4), (5, 3, 1), r"batch dims of A \(2,\) and b \(5,\) do not broadcast"),
    ((3,), (3,), r"A must have shape \(\*, m, n\)"),
])
def test_shape_errors(a_shape, b_shape, match):
    with pytest.raises(InputError, match=match):
        idf.linear_solve(torch.ones(a_shape, dtype=F64), torch.ones(b_shape, dtype=F64))


@pytest.mark.parametrize("a_dtype, b_dtype, name", [(torch.int64, torch.int64, "A"), (F64, torch.int32, "b"),
                                                    (torch.float16, torch.float16, "A")])
def test_non_float_dtypes_are_rejected_with_a_conversion_hint(a_dtype, b_dtype, name):
    with pytest.raises(InputError, match=rf"{name} has dtype .*float32 or float64.*{name}\.to\(torch\.float64\)"):
        idf.linear_solve(torch.eye(2, dtype=a_dtype), torch.ones(2, dtype=b_dtype))


def test_dtype_mismatch_names_both_arguments():
    with pytest.raises(InputError, match=r"b has dtype torch.float32 but A has torch.float64.*b\.to\(A\.dtype\)"):
        idf.linear_solve(torch.eye(2, dtype=F64), torch.ones(2, dtype=torch.float32))


@pytest.mark.parametrize("where", ["A", "b"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_inputs_name_the_argument(where, bad):
    A, b = torch.eye(3, dtype=F64), torch.ones(3, dtype=F64)
    (A if where == "A" else b).view(-1)[1] = bad
    with pytest.raises(InputError, match=rf"^{where} contains 1 NaN or Inf"):
        idf.linear_solve(A, b)


def test_non_finite_without_the_check_is_a_nonfinite_status(mk, g):
    A = mk.well_conditioned(g, 2, 4, batch=(3,))
    A[1, 0, 0] = float("nan")
    b = mk.randn(g, 3, 2)
    b[2, 1] = float("inf")
    y, info = idf.linear_solve_ex(A, b, check_finite=False)
    assert info.status.tolist() == [Status.SUCCESS, Status.NONFINITE, Status.NONFINITE]
    assert bool(torch.isnan(y[1:]).all())
    torch.testing.assert_close(y[0], torch.linalg.pinv(A[0]) @ b[0], rtol=1e-10, atol=1e-12)
    with pytest.raises(SolveError, match="NONFINITE") as exc:
        idf.linear_solve(A, b, check_finite=False)
    assert exc.value.status == Status.NONFINITE


@pytest.mark.parametrize("kwargs, match", [
    (dict(selection="pinv"), r"selection must be one of .*Nearest.*Pinned.*got 'pinv'"),
    (dict(selection=None), r"selection must be one of"),
    (dict(solver="gauss"), r"solver must be one of .*got 'gauss'"),
    (dict(on_failure="ignore"), r"on_failure must be one of \('raise', 'warn', 'nan'\), got 'ignore'"),
    (dict(solver="lu"), r"solver='lu' needs a square A.*solver='qr' or 'svd'"),
    (dict(solver="cholesky"), r"solver='cholesky' needs a square A"),
])
def test_bad_option_strings(kwargs, match):
    with pytest.raises(InputError, match=match):
        idf.linear_solve(torch.ones(2, 3, dtype=F64), torch.ones(2, dtype=F64), **kwargs)


def test_least_squares_of_a_wide_matrix_points_to_min_norm():
    with pytest.raises(InputError, match=r"least_squares.*\(2, 3\).*use selection='min_norm'"):
        idf.linear_solve(torch.ones(2, 3, dtype=F64), torch.ones(2, dtype=F64), selection="least_squares")


def test_matrix_free_operator_needs_an_iterative_solver():
    # solver="auto" goes matrix-free (tests/layers/test_linear_solve_iterative.py); a direct solver cannot
    op = LinearOperator.from_matvec(lambda x, M: x @ M.mT, (3, 3), torch.eye(3, dtype=F64))
    with pytest.raises(InputError, match="matrix-free LinearOperator needs an iterative solver"):
        idf.linear_solve(op, torch.ones(3, dtype=F64), solver="lu")


# ---------------------------------------------------------------------------- Pinned / Nearest
@pytest.mark.parametrize("index, values, match", [
    ([0], 0.0, r"exactly n − m = 2 pinned coordinates .*\(2, 4\).*got 1"),
    ([0, 1, 2], 0.0, r"exactly n − m = 2 .*got 3"),
    ([1, 1], 0.0, r"Pinned.index must hold distinct coordinates in \[0, 4\), got \[1, 1\]"),
    ([0, 4], 0.0, r"distinct coordinates in \[0, 4\)"),
    ([-1, 0], 0.0, r"distinct coordinates in \[0, 4\)"),
    ([0, 1], torch.zeros(3, dtype=F64), r"Pinned.values must have 2 entries"),
    ([0, 1], torch.zeros(2, dtype=torch.float32), r"Pinned.values has dtype torch.float32 but A has"),
    ([0, 1], torch.tensor([0.0, float("nan")], dtype=F64), r"Pinned.values contains 1 NaN"),
])
def test_pinned_errors(index, values, match):
    with pytest.raises(InputError, match=match):
        idf.linear_solve(torch.ones(2, 4, dtype=F64), torch.ones(2, dtype=F64), selection=Pinned(index, values))


def test_pinned_needs_a_wide_or_square_matrix():
    with pytest.raises(InputError, match=r"Pinned needs exactly n − m"):
        idf.linear_solve(torch.ones(4, 2, dtype=F64), torch.ones(4, dtype=F64), selection=Pinned([], 0.0))


def test_pinned_with_singular_remaining_system_is_a_solve_error():
    # pinning y₁ leaves the columns of y₂, y₃ of A = [[1, 0, 0], [0, 1, 0]]: singular
    A = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=F64)
    with pytest.raises(SolveError, match="SINGULAR") as exc:
        idf.linear_solve(A, torch.ones(2, dtype=F64), selection=Pinned([0], 0.0))
    assert exc.value.status == Status.SINGULAR


@pytest.mark.parametrize("weight, match", [
    (torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=F64), r"Nearest.weight must be positive"),
    (torch.tensor([1.0, -2.0, 1.0, 1.0], dtype=F64), r"Nearest.weight must be positive"),
    (-torch.eye(4, dtype=F64), r"Nearest.weight must be symmetric positive definite"),
    (torch.ones(3, dtype=F64), r"Nearest.weight must be \(\*, 4\) or \(\*, 4, 4\), got \(3,\)"),
    (torch.ones(4, dtype=torch.float32), r"Nearest.weight has dtype torch.float32"),
    (torch.tensor([1.0, float("inf"), 1.0, 1.0], dtype=F64), r"Nearest.weight contains 1 NaN or Inf"),
])
def test_nearest_weight_errors(weight, match):
    with pytest.raises(InputError, match=match):
        idf.linear_solve(torch.ones(2, 4, dtype=F64), torch.ones(2, dtype=F64),
                         selection=Nearest(torch.zeros(4, dtype=F64), weight))


@pytest.mark.parametrize("y0, match", [(torch.zeros(3, dtype=F64), r"Nearest.y0 must have the solution's shape"),
                                       (torch.zeros(4), r"Nearest.y0 has dtype torch.float32"),
                                       (torch.full((4,), float("nan"), dtype=F64), r"Nearest.y0 contains 4 NaN")])
def test_nearest_reference_errors(y0, match):
    with pytest.raises(InputError, match=match):
        idf.linear_solve(torch.ones(2, 4, dtype=F64), torch.ones(2, dtype=F64), selection=Nearest(y0))


# ============================================================================ SolveError
@pytest.mark.parametrize("selection", ["exact", "auto"])
@pytest.mark.parametrize("solver", ["auto", "lu", "svd"])
def test_exactly_singular_square_matrix(selection, solver):
    A = torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [0.0, 1.0, 1.0]], dtype=F64)  # row 2 = 2 · row 1
    with pytest.raises(SolveError) as exc:
        idf.linear_solve(A, torch.ones(3, dtype=F64), selection=selection, solver=solver)
    msg = str(exc.value)
    assert exc.value.status == Status.SINGULAR
    assert "SINGULAR" in msg and "condition estimate" in msg and "min_norm" in msg
    assert exc.value.info is not None and int(exc.value.info.status) == Status.SINGULAR
    assert isinstance(exc.value, RuntimeError)


@pytest.mark.parametrize("selection", ["exact", "auto"])
def test_numerically_singular_square_matrix(mk, g, selection):
    u, v = mk.randn(g, 4, 1), mk.randn(g, 1, 4)
    A = u @ v + 1e-18 * mk.randn(g, 4, 4)  # rank one plus noise far below eps · ‖A‖
    with pytest.raises(SolveError, match=r"SINGULAR.*condition estimate (\d\.\d+e\+(1[5-9]|[2-9]\d)|inf)") as exc:
        idf.linear_solve(A, mk.randn(g, 4), selection=selection)
    assert exc.value.status == Status.SINGULAR
    assert "min_norm" in str(exc.value)
    # the remedy works
    y = idf.linear_solve(A, mk.randn(g, 4), selection="min_norm")
    assert bool(torch.isfinite(y).all())


def test_singular_with_cholesky_hints_at_definiteness(mk, g):
    with pytest.raises(SolveError, match="not positive definite.*solver='lu'") as exc:
        idf.linear_solve(-mk.spd(g, 3), mk.randn(g, 3), solver="cholesky")
    assert exc.value.status == Status.SINGULAR


def test_inconsistent_tall_system_under_exact_reports_the_residual(mk, g):
    A = mk.well_conditioned(g, 5, 3)
    b = mk.randn(g, 5)  # generic: not in the 3-dim range of A
    with pytest.raises(SolveError, match=r"INCONSISTENT.*residual \d\.\d+e[+-]\d+.*least_squares") as exc:
        idf.linear_solve(A, b, selection="exact")
    assert exc.value.status == Status.INCONSISTENT
    ls = torch.linalg.lstsq(A, b.unsqueeze(-1)).solution.squeeze(-1)
    expected = float(torch.linalg.norm(A @ ls - b) / torch.linalg.norm(b))
    assert exc.value.residual == pytest.approx(expected, rel=1e-8)


def test_inconsistent_rank_deficient_wide_system_under_exact(mk, g):
    A = mk.sv(g, 3, 5, [2.0, 1.0])  # rank 2 < 3 rows: a generic b is not in range(A)
    with pytest.raises(SolveError, match="INCONSISTENT") as exc:
        idf.linear_solve(A, mk.randn(g, 3), selection="exact")
    assert exc.value.status == Status.INCONSISTENT


@pytest.mark.parametrize("solver", ["auto", "qr", "svd"])
def test_rank_deficient_tall_least_squares(mk, g, solver):
    A = mk.sv(g, 5, 3, [3.0, 1.0])
    with pytest.raises(SolveError, match=r"RANK_DEFICIENT.*numerical rank \d.*min_norm") as exc:
        idf.linear_solve(A, mk.randn(g, 5), selection="least_squares", solver=solver)
    assert exc.value.status == Status.RANK_DEFICIENT
    assert "condition estimate" in str(exc.value)


def test_min_norm_with_an_unrevealing_solver_points_to_svd(mk, g):
    A = mk.sv(g, 3, 5, [2.0, 1.0])
    with pytest.raises(SolveError, match="solver='auto' or 'svd'"):
        idf.linear_solve(A, mk.randn(g, 3), selection="min_norm", solver="qr")


def test_batch_error_names_the_failed_element(mk, g):
    A = mk.well_conditioned(g, 3, 3, batch=(4,))
    A[2] = _singular(mk, g)
    with pytest.raises(SolveError, match=r"in 1 of 4 batch elements \(first: flat index 2\).*on_failure='nan'"):
        idf.linear_solve(A, mk.randn(g, 4, 3))


# ============================================================================ on_failure / linear_solve_ex
def _batch_with_one_singular(mk, g):
    A = mk.well_conditioned(g, 3, 3, batch=(3,))
    A[1] = _singular(mk, g)
    return A, mk.randn(g, 3, 3)


@pytest.mark.parametrize("selection", ["exact", "pinned"])
def test_on_failure_nan_keeps_the_other_elements_and_their_gradients(mk, g, selection):
    A, b = _batch_with_one_singular(mk, g)
    if selection == "pinned":  # the same singular 3×3 systems, reached through Pinned on a wide A
        A = torch.cat([mk.randn(g, 3, 3, 1), A], dim=-1)
        sel = Pinned([0], mk.randn(g, 3, 1))
    else:
        sel = selection
    A.requires_grad_()
    b.requires_grad_()
    y = idf.linear_solve(A, b, selection=sel, on_failure="nan")
    assert bool(torch.isnan(y[1]).all())
    ok = [0, 2]
    for i in ok:
        torch.testing.assert_close(y[i], idf.linear_solve(A[i], b[i], selection=_index_sel(sel, i)),
                                   rtol=1e-12, atol=1e-12)
    ybar = mk.randn(g, *y.shape)
    ybar[1] = 0.0  # a loss of the good elements only
    gA, gb = torch.autograd.grad((y[ok] * ybar[ok]).sum(), (A, b))
    assert bool(torch.isfinite(gA).all()) and bool(torch.isfinite(gb).all())
    assert bool((gA[1] == 0).all()) and bool((gb[1] == 0).all())
    for i in ok:
        Ai, bi = A[i].detach().requires_grad_(), b[i].detach().requires_grad_()
        ref = torch.autograd.grad((idf.linear_solve(Ai, bi, selection=_index_sel(sel, i)) * ybar[i]).sum(), (Ai, bi))
        torch.testing.assert_close(gA[i], ref[0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gb[i], ref[1], rtol=1e-10, atol=1e-12)


def _index_sel(sel, i):
    return Pinned(sel.index, sel.values[i]) if isinstance(sel, Pinned) else sel


def test_on_failure_nan_does_not_poison_a_shared_parameter(mk, g):
    # A batch built from one parameter: the singular element must not turn its gradient into NaN
    theta = mk.well_conditioned(g, 3, 3).requires_grad_()
    P = _singular(mk, g)
    scale = torch.tensor([1.0, 0.0, 2.0], dtype=F64)[:, None, None]
    A = scale * theta + (1 - scale.clamp(max=1)) * P  # element 1 is exactly P (singular)
    b = mk.randn(g, 3, 3)
    y, info = idf.linear_solve_ex(A, b)
    assert info.status.tolist() == [Status.SUCCESS, Status.SINGULAR, Status.SUCCESS]
    loss = y[[0, 2]].sin().sum()
    (grad,) = torch.autograd.grad(loss, theta)
    theta_ = theta.detach().requires_grad_()
    ref = idf.linear_solve(theta_, b[0]).sin().sum() + idf.linear_solve(2 * theta_, b[2]).sin().sum()
    (grad_ref,) = torch.autograd.grad(ref, theta_)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-10, atol=1e-12)


def test_on_failure_nan_forward_mode(mk, g):
    A, b = _batch_with_one_singular(mk, g)
    dA = mk.randn(g, *A.shape)
    y, dy = torch.func.jvp(lambda A: idf.linear_solve(A, b, on_failure="nan"), (A,), (dA,))
    assert bool(torch.isnan(y[1]).all())
    for i in (0, 2):
        _, dyi = torch.func.jvp(lambda Ai: idf.linear_solve(Ai, b[i]), (A[i],), (dA[i],))
        torch.testing.assert_close(dy[i], dyi, rtol=1e-10, atol=1e-12)


def test_on_failure_warn_warns_and_sets_nan(mk, g):
    A, b = _batch_with_one_singular(mk, g)
    with pytest.warns(SolveWarning, match=r"flat index 1\).*SINGULAR.*set to NaN"):
        y = idf.linear_solve(A, b, on_failure="warn")
    assert bool(torch.isnan(y[1]).all()) and bool(torch.isfinite(y[[0, 2]]).all())
    assert issubclass(SolveWarning, UserWarning)


def test_on_failure_does_not_warn_on_success(mk, g):
    A = mk.well_conditioned(g, 3, 3)
    idf.linear_solve(A, mk.randn(g, 3), on_failure="warn")  # warnings are errors in this suite


@pytest.mark.parametrize("case", ["singular", "inconsistent", "rank_deficient"])
def test_linear_solve_ex_reports_per_element_status_without_raising(mk, g, case):
    if case == "singular":
        A, b = _batch_with_one_singular(mk, g)
        kw, code = {}, Status.SINGULAR
    elif case == "inconsistent":
        A = mk.well_conditioned(g, 5, 3, batch=(3,))
        b = A @ mk.randn(g, 3, 3, 1)
        b[1] += mk.randn(g, 5, 1)
        kw, code = {"selection": "exact"}, Status.INCONSISTENT
    else:
        A = mk.well_conditioned(g, 5, 3, batch=(3,))
        A[1] = mk.sv(g, 5, 3, [1.0, 1.0])
        b = mk.randn(g, 3, 5)
        kw, code = {"selection": "least_squares"}, Status.RANK_DEFICIENT
    y, info = idf.linear_solve_ex(A, b, **kw)
    assert info.status.tolist() == [Status.SUCCESS, code, Status.SUCCESS]
    assert info.ok.tolist() == [True, False, True]
    assert bool(torch.isnan(y[1]).all()) and bool(torch.isfinite(y[[0, 2]]).all())
    if case != "rank_deficient":  # (a random b has a least-squares residual)
        assert bool((info.residual[[0, 2]] < 1e-12).all())
    # it does not raise, but explicit bad inputs still do
    with pytest.raises(InputError):
        idf.linear_solve_ex(A, b, selection="pinv")


def test_linear_solve_ex_respects_an_explicit_on_failure(mk, g):
    A, b = _batch_with_one_singular(mk, g)
    with pytest.raises(SolveError):
        idf.linear_solve_ex(A, b, on_failure="raise")


def test_under_vmap_failures_become_nan(mk, g):
    A, b = _batch_with_one_singular(mk, g)
    y = vmap(lambda A, b: idf.linear_solve(A, b))(A, b)  # nothing can be raised from data under vmap
    assert bool(torch.isnan(y[1]).all())
    torch.testing.assert_close(y[[0, 2]], torch.linalg.solve(A[[0, 2]], b[[0, 2]]), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bad", ["nan_A", "indefinite_weight", "negative_weight"])
def test_under_vmap_bad_data_becomes_nan_not_an_exception(mk, g, bad):
    A, b = mk.well_conditioned(g, 2, 4, batch=(3,)), mk.randn(g, 3, 2)
    y0 = torch.zeros(4, dtype=F64)
    if bad == "nan_A":
        A[1, 0, 0] = float("nan")
        y = vmap(lambda A: idf.linear_solve(A, b[0]))(A)
    else:
        W = torch.stack([mk.spd(g, 4), mk.spd(g, 4), mk.spd(g, 4)]) if bad == "indefinite_weight" \
            else torch.ones(3, 4, dtype=F64)
        W[1] = -W[1]
        y = vmap(lambda A, W: idf.linear_solve(A, b[0], selection=Nearest(y0, W)))(A, W)
    assert bool(torch.isnan(y[1]).all())
    assert bool(torch.isfinite(y[[0, 2]]).all())
    torch.testing.assert_close(A[[0, 2]] @ y[[0, 2]].unsqueeze(-1), b[0].expand(2, 2).unsqueeze(-1),
                               rtol=1e-10, atol=1e-12)
