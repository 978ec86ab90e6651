"""Adversarial inputs of ``root``: every case gets a right answer (checked) or a named error."""

import math
import warnings

import pytest
import torch

import implicitdiff as idf
from implicitdiff import InputError, SolveError

from ._adversarial import BAD_DTYPES, BAD_OPTIONS, BAD_OUTPUTS, D, bad_adjoints, raises_input_error


def cube(y, t):
    return y ** 3 - t


@pytest.mark.parametrize("dtype", BAD_DTYPES)
def test_y0_of_a_dtype_we_do_not_solve_in_is_named(dtype):
    with raises_input_error("y0"):
        idf.root(cube, torch.ones(3).to(dtype), torch.full((3,), 8.0, dtype=D))


@pytest.mark.parametrize("name,value", BAD_OPTIONS)
def test_bad_options_are_input_errors_naming_the_option(name, value):
    key = "solver" if name == "solver_options" and False else name
    with pytest.raises(InputError, match=key.split("_")[0]):
        idf.root(cube, torch.ones(3, dtype=D), torch.full((3,), 8.0, dtype=D), **{name: value})


@pytest.mark.parametrize("make", bad_adjoints())
def test_bad_adjoint_values_are_refused_at_construction(make):
    with raises_input_error():
        make()


@pytest.mark.parametrize("kind", sorted(BAD_OUTPUTS))
@pytest.mark.parametrize("solver", ["newton", "broyden", "anderson", "picard"])
def test_F_returning_the_wrong_thing_is_named(kind, solver):
    bad = BAD_OUTPUTS[kind]
    with pytest.raises(InputError, match="F"):
        idf.root(lambda y, t: bad(cube(y, t)), torch.ones(3, dtype=D), torch.full((3,), 8.0, dtype=D),
                 solver=solver)


def test_F_not_callable_is_named():
    with pytest.raises(InputError, match="F"):
        idf.root("y**3", torch.ones(3, dtype=D))


@pytest.mark.parametrize("shape,bd", [((0,), 0), ((0, 3), 1), ((2, 0), 1), ((0, 2, 2), 2)])
def test_empty_problems_give_an_empty_result_and_zero_gradients(shape, bd):
    t = torch.full(shape, 8.0, dtype=D, requires_grad=True)
    y = idf.root(cube, torch.ones(shape, dtype=D), t, batch_dims=bd)
    assert y.shape == shape
    y.sum().backward()
    assert t.grad is not None and t.grad.shape == shape


def test_meta_tensors_are_named():
    with raises_input_error("meta"):
        idf.root(cube, torch.ones(3, device="meta", dtype=D), torch.ones(3, device="meta", dtype=D))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_y0_is_named(bad):
    y0 = torch.ones(3, dtype=D)
    y0[1] = bad
    with raises_input_error("y0"):
        idf.root(cube, y0, torch.full((3,), 8.0, dtype=D))


def test_nan_parameter_is_a_named_failure_not_a_value():
    t = torch.full((3,), 8.0, dtype=D)
    t[0] = math.nan
    with pytest.raises(SolveError, match="NONFINITE"):
        idf.root(cube, torch.ones(3, dtype=D), t)


def test_parameter_of_another_float_dtype_is_named():
    with raises_input_error("dtype"):
        idf.root(cube, torch.ones(3, dtype=D), torch.full((3,), 8.0))


@pytest.mark.parametrize("scale", [1e-150, 1e150])
def test_extreme_scales_solve_and_differentiate(scale):
    # y - t·s = 0 ⇒ y = t·s, dy/dt = s
    t = torch.tensor([1.0, 2.0, 3.0], dtype=D, requires_grad=True)
    y = idf.root(lambda y, t: y - t * scale, torch.full((3,), scale, dtype=D), t)
    torch.testing.assert_close(y.detach() / scale, t.detach(), rtol=1e-12, atol=0)
    y.sum().backward()
    torch.testing.assert_close(t.grad / scale, torch.ones(3, dtype=D), rtol=1e-12, atol=0)


def test_non_contiguous_inputs():
    t = torch.full((4, 3), 8.0, dtype=D).mT.requires_grad_()      # (3, 4), non-contiguous
    y0 = torch.ones(4, 3, dtype=D).mT
    y = idf.root(cube, y0, t, batch_dims=1)
    torch.testing.assert_close(y.detach(), torch.full((3, 4), 2.0, dtype=D))
    y.sum().backward()
    torch.testing.assert_close(t.grad, torch.full((3, 4), 1 / 12, dtype=D))


@pytest.mark.parametrize("solver", ["newton", "broyden"])
@pytest.mark.parametrize("on_failure", ["nan", "warn"])
@pytest.mark.parametrize("adjoint", [idf.Implicit(), idf.Implicit(solver="gmres"), idf.Neumann(100, alpha=0.1)])
def test_one_bad_element_does_not_poison_the_shared_gradient(solver, on_failure, adjoint):
    # y_b³ = θ x_b; element 1 has NaN data.  The gradient of the shared θ is the sum over the others.
    theta = torch.tensor(2.0, dtype=D, requires_grad=True)
    x = torch.tensor([1.0, math.nan, 3.0, 0.5], dtype=D)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", idf.SolveWarning)
        y, info = idf.root(lambda y, t, x: y ** 3 - t * x, torch.ones(4, dtype=D), theta, x, batch_dims=1,
                           on_failure=on_failure, solver=solver, adjoint=adjoint, return_info=True)
    assert info.status.tolist()[1] != 0 and torch.isnan(y[1])
    y.nan_to_num().sum().backward()
    good = x[[0, 2, 3]]
    expected = (good / (3 * (2.0 * good) ** (2 / 3))).sum()
    tol = 1e-8 if isinstance(adjoint, idf.Implicit) else 1e-4
    torch.testing.assert_close(theta.grad, expected, rtol=tol, atol=0)


def test_one_bad_element_forward_mode_tangent_is_finite_elsewhere():
    theta = torch.tensor(2.0, dtype=D)
    x = torch.tensor([1.0, math.nan, 3.0], dtype=D)

    def f(t):
        return idf.root(lambda y, t, x: y ** 3 - t * x, torch.ones(3, dtype=D), t, x, batch_dims=1, on_failure="nan")

    _, dy = torch.func.jvp(f, (theta,), (torch.ones((), dtype=D),))
    expected = x / (3 * (2.0 * x) ** (2 / 3))
    torch.testing.assert_close(dy[[0, 2]], expected[[0, 2]], rtol=1e-8, atol=0)
    assert torch.isnan(dy[1])


def test_all_elements_failing_give_no_gradient_not_nan():
    theta = torch.tensor(2.0, dtype=D, requires_grad=True)
    x = torch.full((2,), math.nan, dtype=D)
    y = idf.root(lambda y, t, x: y ** 3 - t * x, torch.ones(2, dtype=D), theta, x, batch_dims=1, on_failure="nan")
    assert torch.isnan(y).all()
    y.nan_to_num().sum().backward()
    assert theta.grad is None or float(theta.grad) == 0.0


def test_no_root_hint_says_so():
    with pytest.raises(SolveError, match="no root"):
        idf.root(lambda y: y ** 2 + 1, torch.ones(2, dtype=D))
    with pytest.raises(SolveError, match="no root"):
        idf.root(lambda y: y ** 2 + 1, torch.ones(2, dtype=D), solver="broyden")


def test_a_stall_far_above_the_tolerance_says_a_root_may_not_exist():
    # y² + 1 + t = 0 has no real root: Newton's line search stalls at the minimum of ‖F‖ (y = 0)
    F = lambda y, t: y ** 2 + 1 + t  # noqa: E731
    for kw in ({}, {"rtol": 1e-3}):
        with pytest.raises(SolveError, match="non-zero local minimum of ‖F‖") as e:
            idf.root(F, torch.ones(2, dtype=D), torch.tensor(1.0, dtype=D), **kw)
        assert e.value.status == idf.Status.BREAKDOWN
        assert "rounding" not in str(e.value)
        assert e.value.residual > 0.1


def test_a_stall_at_rounding_level_keeps_the_rounding_hint():
    # with rtol = atol = 0 the residual of 1000 sin(y) + y² = t stalls at rounding level, never exactly 0
    F = lambda y, t: torch.sin(y) * 1e3 - t + y * y  # noqa: E731
    with pytest.raises(SolveError, match="rounding") as e:
        idf.root(F, torch.linspace(0.1, 1.0, 7, dtype=D), torch.tensor(2.0, dtype=D), rtol=0.0)
    assert e.value.status == idf.Status.BREAKDOWN
    assert e.value.residual < 1e-12
    assert "local minimum" not in str(e.value)
