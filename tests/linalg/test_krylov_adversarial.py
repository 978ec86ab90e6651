"""Adversarial inputs for the Krylov solvers (``implicitdiff.linalg.{cg, minres, gmres, bicgstab, lsqr, lsmr}``).

Each case states the acceptable outcome: the solution of ``torch.linalg.solve`` / ``lstsq`` (to the
solver's tolerance), or an :class:`InputError` naming the argument or the callable.
"""

from __future__ import annotations

import pytest
import torch

from implicitdiff import InputError, Status
from implicitdiff import linalg

F64 = torch.float64
SQUARE = {"cg": linalg.cg, "minres": linalg.minres, "gmres": linalg.gmres, "bicgstab": linalg.bicgstab,
          "lsqr": linalg.lsqr, "lsmr": linalg.lsmr}


def _spd(g, n):
    M = torch.randn(n, n, generator=g, dtype=F64)
    return M @ M.mT + n * torch.eye(n, dtype=F64)


@pytest.mark.parametrize("name", list(SQUARE))
@pytest.mark.parametrize("scale", [1e-300, 1e-170, 1.0, 1e170, 1e300])
def test_extreme_right_hand_sides_are_solved_not_zero(g, name, scale):
    A = _spd(g, 6)
    b = torch.randn(2, 6, generator=g, dtype=F64)
    ref = torch.linalg.solve(A, b.mT).mT
    x, info = SQUARE[name](A, b * scale, rtol=1e-12)
    assert info.status.tolist() == [Status.SUCCESS] * 2
    assert bool((x != 0).any())
    torch.testing.assert_close(x / scale, ref, atol=0, rtol=1e-8)
    assert bool((info.residual <= 1e-11).all())


@pytest.mark.parametrize("name", list(SQUARE))
def test_atol_is_in_b_units_after_scaling(g, name):
    # ‖b‖ below atol: x = 0 is accepted; the scaling must not change what atol means
    A = _spd(g, 4)
    b = torch.randn(4, generator=g, dtype=F64) * 1e-200
    x, info = SQUARE[name](A, b, atol=1e-100)
    assert int(info.status) == Status.SUCCESS and torch.equal(x, torch.zeros(4, dtype=F64))


@pytest.mark.parametrize("name", list(SQUARE))
@pytest.mark.parametrize("bad, match", [
    (lambda x: None, "returned NoneType"),
    (lambda x: x.tolist(), "returned list"),
    (lambda x: x[..., :2], r"returned shape"),
    (lambda x: x.float(), "dtype"),
    (lambda x: torch.cat([x, x], -1), r"returned shape"),
])
def test_bad_matvecs_are_named(name, bad, match):
    b = torch.ones(4, dtype=F64)
    with pytest.raises(InputError, match=match):
        SQUARE[name](bad, b)
    op = linalg.LinearOperator.from_matvec(bad, (4, 4), dtype=F64)
    with pytest.raises(InputError, match=r"the operator's matvec returned.*" + match.replace("returned ", "")):
        SQUARE[name](op, b)


@pytest.mark.parametrize("name", list(SQUARE))
@pytest.mark.parametrize("kwargs, match", [
    (dict(rtol=float("nan")), "rtol is NaN"),
    (dict(rtol=-1.0), "rtol must be >= 0"),
    (dict(atol=float("nan")), "atol is NaN"),
    (dict(atol=None), "atol is required"),
    (dict(max_iter=-1), "max_iter must be >= 0"),
    (dict(max_iter=3.0), "max_iter must be an integer"),
    (dict(check_every=0), "check_every must be >= 1"),
    (dict(callback=3), "callback must be callable"),
])
def test_bad_options_are_named(name, kwargs, match):
    with pytest.raises(InputError, match=match):
        SQUARE[name](torch.eye(3, dtype=F64), torch.ones(3, dtype=F64), **kwargs)


@pytest.mark.parametrize("name", list(SQUARE))
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex128, torch.float16])
def test_other_dtypes_are_named(name, dtype):
    with pytest.raises(InputError, match="dtype"):
        SQUARE[name](torch.eye(3, dtype=F64), torch.ones(3).to(dtype))


@pytest.mark.parametrize("name", list(SQUARE))
def test_empty_systems_and_batches(name):
    x, info = SQUARE[name](torch.zeros(0, 0, dtype=F64), torch.zeros(0, dtype=F64))
    assert x.shape == (0,) and int(info.status) == Status.SUCCESS
    x, info = SQUARE[name](torch.eye(3, dtype=F64), torch.zeros(0, 3, dtype=F64))
    assert x.shape == (0, 3) and info.status.shape == (0,)


@pytest.mark.parametrize("name", list(SQUARE))
def test_non_contiguous_and_stride_zero(g, name):
    A = _spd(g, 5)
    b = torch.randn(5, generator=g, dtype=F64)
    x, _ = SQUARE[name](A.mT, b.expand(3, 5), rtol=1e-12)
    torch.testing.assert_close(x, torch.linalg.solve(A, b).expand(3, 5), atol=1e-9, rtol=0)


@pytest.mark.parametrize("name", list(SQUARE))
def test_one_nan_element_is_reported_alone(g, name):
    A = _spd(g, 5)
    b = torch.randn(3, 5, generator=g, dtype=F64)
    b[1, 0] = float("nan")
    x, info = SQUARE[name](A, b, rtol=1e-12)
    assert info.status.tolist() == [Status.SUCCESS, Status.NONFINITE, Status.SUCCESS]
    torch.testing.assert_close(x[[0, 2]], torch.linalg.solve(A, b[[0, 2]].mT).mT, atol=1e-9, rtol=0)


def test_callback_sees_the_unscaled_iterate(g):
    A = _spd(g, 5)
    b = torch.randn(5, generator=g, dtype=F64) * 1e-250
    seen = []
    x, _ = linalg.cg(A, b, rtol=1e-12, callback=lambda x: seen.append(x.clone()))
    torch.testing.assert_close(seen[-1], x)


@pytest.mark.parametrize("shape", [(3,), (3, -1), (2.5, 3), ("a", 3), None, (True, 3)])
def test_operator_shape_is_validated(shape):
    with pytest.raises(InputError, match="shape must be"):
        linalg.LinearOperator.from_matvec(lambda x: x, shape)


def test_operator_matvec_must_be_callable():
    with pytest.raises(InputError, match="matvec must be callable"):
        linalg.LinearOperator.from_matvec(3, (2, 2))
    with pytest.raises(InputError, match="rmatvec must be callable"):
        linalg.LinearOperator.from_matvec(lambda x: x, (2, 2), rmatvec="T")


@pytest.mark.parametrize("name", ["cg", "minres", "gmres", "bicgstab"])
@pytest.mark.parametrize("bad", [lambda r: None, lambda r: r[..., :1], lambda r: r.float()])
def test_bad_preconditioner_outputs_are_named(g, name, bad):
    with pytest.raises(InputError, match="the preconditioner M returned"):
        SQUARE[name](_spd(g, 4), torch.ones(4, dtype=F64), M=bad)


def test_iterates_that_overflow_on_finite_data_are_a_breakdown_nan_data_stays_nonfinite():
    # CG on a singular SPD diag(2, 0, c) with b ∉ range: it divides by a vanishing curvature along the
    # flat direction and its iterates overflow (NaN), with finite data: BREAKDOWN (as the compiled
    # adjoint CG of argmin reports), not NONFINITE, which names NaN/Inf in b, x0, A or M
    ones = torch.ones(3, dtype=F64)
    A = torch.stack([torch.diag(torch.tensor(d, dtype=F64)) for d in ([2.0, 0.0, 1e-7], [2.0, 0.0, 0.5],
                                                                         [2.0, 1.0, 0.5], [2.0, 1.0, 0.5])])
    b = ones.repeat(4, 1)
    b[3, 1] = float("nan")
    x, info = linalg.cg(A, b)
    assert info.status.tolist() == [Status.BREAKDOWN, Status.BREAKDOWN, Status.SUCCESS, Status.NONFINITE]
    assert not bool(torch.isfinite(x[:2]).all(-1).any())              # the overflowed iterates are not hidden
    torch.testing.assert_close(x[2], ones / torch.tensor([2.0, 1.0, 0.5], dtype=F64), rtol=1e-12, atol=0)
    nan_A = A[2].clone()
    nan_A[1, 0] = float("nan")
    assert int(linalg.cg(nan_A, ones).info.status) == Status.NONFINITE            # NaN in A
    nan_M = lambda r: r * torch.tensor([1.0, float("nan"), 1.0], dtype=F64)  # noqa: E731
    assert int(linalg.cg(A[2], ones, M=nan_M).info.status) == Status.NONFINITE    # NaN in M
    assert int(linalg.cg(A[2], ones, x0=ones * float("inf")).info.status) == Status.NONFINITE  # Inf in x0


def test_argmin_with_a_singular_hessian_eager_cg_adjoint_is_a_breakdown():
    # the eager twin of test_argmin_compiled's singular Hessian: flat in y[1], the same BREAKDOWN and hint
    import implicitdiff as idf

    a = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    y = idf.argmin(lambda y, a: (y[0] - a[0]) ** 2 + 0 * y[1] ** 2 + (y[2] - a[1]) ** 4, torch.zeros(3, dtype=F64),
                   a, adjoint=idf.Implicit(solver="cg"))
    with pytest.raises(idf.SolveError, match=r"BREAKDOWN.*singular") as err:
        y.sum().backward()
    assert not err.value.residual < 1
