"""Adversarial inputs of ``custom_root`` / ``custom_fixed_point``: a right answer (checked) or a named error."""

import math
import warnings

import pytest
import torch

import implicitdiff as idf
from implicitdiff import InputError, SolveError

from ._adversarial import D, bad_adjoints


def F(y, a):
    return y ** 2 - a


def newton_sqrt(y0, a):
    y = y0.clone()
    for _ in range(60):
        y = 0.5 * (y + a / y)
    return y


@pytest.mark.parametrize("out", [None, [1.0], 3.0, "y"])
def test_solver_returning_a_non_tensor_is_named(out):
    with pytest.raises(InputError, match="solver of custom_root"):
        idf.custom_root(F)(lambda y0, a: out)(torch.ones(2, dtype=D), torch.full((2,), 4.0, dtype=D))


@pytest.mark.parametrize("make", [lambda y0: y0[:1], lambda y0: y0.float(), lambda y0: y0.unsqueeze(0)])
def test_solver_returning_the_wrong_shape_or_dtype_is_named(make):
    with pytest.raises(InputError, match="y0's shape"):
        idf.custom_root(F)(lambda y0, a: make(newton_sqrt(y0, a)))(torch.ones(2, dtype=D),
                                                                   torch.full((2,), 4.0, dtype=D))


def test_a_solver_that_does_not_solve_is_a_named_failure_by_default():
    # returning y0 unchanged is not a root: never taken for one
    with pytest.raises(SolveError, match="custom_root"):
        idf.custom_root(F)(lambda y0, a: y0)(torch.ones(2, dtype=D), torch.full((2,), 4.0, dtype=D))


def test_custom_fixed_point_is_named_as_such():
    with pytest.raises(SolveError, match=r"custom_fixed_point\(stuck\)"):
        def stuck(z0, a):
            return z0
        idf.custom_fixed_point(lambda z, a: 0.5 * z + a)(stuck)(torch.zeros(2, dtype=D), torch.ones(2, dtype=D))


@pytest.mark.parametrize("kw", [dict(batch_dims=-1), dict(batch_dims=0.5), dict(on_failure="skip"),
                                dict(check_rtol=math.nan), dict(check_rtol=-1.0), dict(adjoint="lu")])
def test_bad_options_are_named_when_decorating(kw):
    with pytest.raises(InputError, match=next(iter(kw)).split("_")[0]):
        idf.custom_root(F, **kw)


@pytest.mark.parametrize("make", bad_adjoints())
def test_bad_adjoint_values(make):
    with pytest.raises(InputError):
        make()


def test_non_callables_are_named():
    with pytest.raises(InputError, match="optimality condition"):
        idf.custom_root("F")
    with pytest.raises(InputError, match="solver decorated"):
        idf.custom_root(F)(42)


@pytest.mark.parametrize("on_failure", ["nan", "warn"])
def test_one_bad_element_does_not_poison_the_shared_gradient(on_failure):
    # y_b² = a·x_b; element 1 has NaN data; d Σ y / d a = Σ_good x_b / (2 y_b)
    a = torch.tensor(4.0, dtype=D, requires_grad=True)
    x = torch.tensor([1.0, math.nan, 9.0], dtype=D)

    @idf.custom_root(lambda y, a, x: y ** 2 - a * x, batch_dims=1, on_failure=on_failure)
    def solve(y0, a, x):
        return torch.sqrt(a * x)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", idf.SolveWarning)
        y = solve(torch.ones(3, dtype=D), a, x)
    assert torch.isnan(y[1])
    y.nan_to_num().sum().backward()
    good = x[[0, 2]]
    torch.testing.assert_close(a.grad, (good / (2 * torch.sqrt(4.0 * good))).sum(), rtol=1e-10, atol=0)


def test_empty_batch():
    a = torch.ones(0, dtype=D, requires_grad=True)
    y = idf.custom_root(F, batch_dims=1)(newton_sqrt)(torch.ones(0, dtype=D), a)
    assert y.shape == (0,)


def test_correct_solver_gradient_matches_closed_form():
    a = torch.tensor([4.0, 9.0], dtype=D, requires_grad=True)
    y = idf.custom_root(F)(newton_sqrt)(torch.ones(2, dtype=D), a)
    y.sum().backward()
    torch.testing.assert_close(a.grad, 1 / (2 * torch.sqrt(a.detach())), rtol=1e-12, atol=0)


def test_a_start_that_is_already_a_root_is_accepted():
    # ‖F(y0)‖ = 0: a solver that returns y0 (or a y within rounding of it) has solved the problem
    a = torch.tensor([4.0, 9.0], dtype=D, requires_grad=True)
    y = idf.custom_root(F)(lambda y0, a: y0 * (1 + 1e-16))(torch.tensor([2.0, 3.0], dtype=D), a)
    y.sum().backward()
    torch.testing.assert_close(a.grad, 1 / (2 * torch.sqrt(a.detach())), rtol=1e-12, atol=0)


@pytest.mark.parametrize("bad", [lambda y, a: None, lambda y, a: (y ** 2 - a)[:1], lambda y, a: [y]])
def test_an_optimality_condition_returning_the_wrong_thing_is_named(bad):
    with pytest.raises(InputError, match="optimality condition of custom_root"):
        idf.custom_root(bad)(newton_sqrt)(torch.ones(2, dtype=D), torch.full((2,), 4.0, dtype=D))
