"""Adversarial inputs of ``argmin``: every case gets a right answer (checked) or a named error."""

import math
import warnings

import pytest
import torch

import implicitdiff as idf
from implicitdiff import InputError, SolveError

from ._adversarial import BAD_DTYPES, BAD_OPTIONS, D, raises_input_error


def f(y, c):
    return 0.5 * ((y - c) ** 2).sum(-1) + 0.25 * (y ** 4).sum(-1)


@pytest.mark.parametrize("dtype", BAD_DTYPES)
def test_y0_of_a_dtype_we_do_not_solve_in_is_named(dtype):
    with raises_input_error("y0"):
        idf.argmin(f, torch.zeros(3).to(dtype), torch.ones(3, dtype=D))


@pytest.mark.parametrize("name,value", BAD_OPTIONS)
@pytest.mark.parametrize("solver", ["lbfgs", "newton"])
def test_bad_options_are_input_errors_naming_the_option(name, value, solver):
    kw = {"solver": solver, name: value}
    with pytest.raises(InputError, match=name.split("_")[0]):
        idf.argmin(f, torch.zeros(3, dtype=D), torch.ones(3, dtype=D), **kw)


@pytest.mark.parametrize("out", ["None", "vector", "list", "complex"])
def test_f_returning_the_wrong_thing_is_named(out):
    bad = {"None": lambda v: None, "vector": lambda v: v.expand(3), "list": lambda v: [v],
           "complex": lambda v: v.to(torch.complex128)}[out]
    with pytest.raises(InputError, match="f"):
        idf.argmin(lambda y, c: bad(f(y, c)), torch.zeros(3, dtype=D), torch.ones(3, dtype=D))


def test_empty_batch():
    c = torch.ones(0, 3, dtype=D, requires_grad=True)
    y = idf.argmin(f, torch.zeros(0, 3, dtype=D), c, batch_dims=1)
    assert y.shape == (0, 3)


@pytest.mark.parametrize("f_unb", [lambda y: -(y ** 2).sum(), lambda y: y.sum(), lambda y: -torch.exp(y).sum()])
def test_unbounded_objective_names_the_likely_cause(f_unb):
    with pytest.raises(SolveError, match="unbounded below"):
        idf.argmin(f_unb, torch.ones(2, dtype=D))


@pytest.mark.parametrize("solver", ["lbfgs", "newton"])
@pytest.mark.parametrize("on_failure", ["nan", "warn"])
def test_one_bad_element_does_not_poison_the_shared_gradient(solver, on_failure):
    # y_b = argmin ½‖y − θ x_b‖² + ½‖y‖² = θ x_b / 2 ⇒ d Σ y / dθ = Σ x_b / 2 over the good elements
    theta = torch.tensor(2.0, dtype=D, requires_grad=True)
    x = torch.tensor([[1.0, 2.0], [math.nan, 0.0], [3.0, -1.0]], dtype=D)
    g = lambda y, t, x: 0.5 * ((y - t * x) ** 2).sum(-1) + 0.5 * (y ** 2).sum(-1)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", idf.SolveWarning)
        y = idf.argmin(g, torch.zeros(3, 2, dtype=D), theta, x, batch_dims=1, on_failure=on_failure, solver=solver)
    assert torch.isnan(y[1]).all()
    torch.testing.assert_close(y[[0, 2]].detach(), x[[0, 2]], rtol=1e-8, atol=1e-10)
    y.nan_to_num().sum().backward()
    torch.testing.assert_close(theta.grad, x[[0, 2]].sum() / 2, rtol=1e-8, atol=0)


@pytest.mark.parametrize("scale", [1e-100, 1e100])
def test_extreme_scales_newton_solves(scale):
    c = torch.tensor([1.0, -2.0], dtype=D) * scale
    c.requires_grad_()
    y = idf.argmin(lambda y, c: 0.5 * ((y - c) ** 2).sum(), torch.zeros(2, dtype=D), c, solver="newton")
    torch.testing.assert_close(y.detach() / scale, c.detach() / scale, rtol=1e-8, atol=0)
    y.sum().backward()
    torch.testing.assert_close(c.grad, torch.ones(2, dtype=D), rtol=1e-8, atol=0)


@pytest.mark.parametrize("scale", [1e-100, 1e100])
def test_extreme_scales_lbfgs_solves_or_names_the_scale(scale):
    # L-BFGS's first trial step has unit length: far from unit scale it may not get there in
    # max_iter; the acceptable outcomes are the right answer or a named failure that says so.
    c = torch.tensor([1.0, -2.0], dtype=D) * scale
    try:
        y = idf.argmin(lambda y, c: 0.5 * ((y - c) ** 2).sum(), torch.zeros(2, dtype=D), c)
    except SolveError as e:
        assert "scale" in str(e)
    else:
        torch.testing.assert_close(y / scale, c / scale, rtol=1e-8, atol=0)
