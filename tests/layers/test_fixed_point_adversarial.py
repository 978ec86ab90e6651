"""Adversarial inputs of ``fixed_point``: every case gets a right answer (checked) or a named error."""

import math
import warnings

import pytest
import torch

import implicitdiff as idf
from implicitdiff import InputError, SolveError

from ._adversarial import BAD_DTYPES, BAD_OPTIONS, BAD_OUTPUTS, D, raises_input_error


def T(z, a, b):
    return a * z + b            # z* = b / (1 − a), dz*/da = b / (1 − a)², dz*/db = 1 / (1 − a)


@pytest.mark.parametrize("dtype", BAD_DTYPES)
def test_z0_of_a_dtype_we_do_not_solve_in_is_named(dtype):
    with raises_input_error("y0"):
        idf.fixed_point(T, torch.ones(3).to(dtype), torch.tensor(0.5, dtype=D), torch.ones(3, dtype=D))


@pytest.mark.parametrize("name,value", BAD_OPTIONS)
def test_bad_options_are_input_errors_naming_the_option(name, value):
    with pytest.raises(InputError, match=name.split("_")[0]):
        idf.fixed_point(T, torch.ones(3, dtype=D), torch.tensor(0.5, dtype=D), torch.ones(3, dtype=D),
                        **{name: value})


@pytest.mark.parametrize("kind", sorted(set(BAD_OUTPUTS) - {"complex"}))
@pytest.mark.parametrize("solver", ["anderson", "picard", "broyden", "newton"])
def test_T_returning_the_wrong_thing_is_named(kind, solver):
    bad = BAD_OUTPUTS[kind]
    with pytest.raises(InputError, match="T must return a tensor of z's shape"):
        idf.fixed_point(lambda z, a, b: bad(T(z, a, b)), torch.ones(3, dtype=D), torch.tensor(0.5, dtype=D),
                        torch.ones(3, dtype=D), solver=solver)


def test_T_returning_complex_is_named():
    with pytest.raises(InputError, match="dtype"):
        idf.fixed_point(lambda z: z.to(torch.complex128) * 0.5, torch.ones(3, dtype=D))


@pytest.mark.parametrize("shape,bd", [((0,), 0), ((0, 3), 1), ((3, 0), 1)])
def test_empty_problems_give_an_empty_result(shape, bd):
    b = torch.ones(shape, dtype=D, requires_grad=True)
    z = idf.fixed_point(T, torch.zeros(shape, dtype=D), torch.tensor(0.5, dtype=D), b, batch_dims=bd)
    assert z.shape == shape
    z.sum().backward()
    assert b.grad.shape == shape


@pytest.mark.parametrize("scale", [1e-150, 1e150])
@pytest.mark.parametrize("solver", ["anderson", "picard"])
def test_extreme_scales(scale, solver):
    a = torch.tensor(0.5, dtype=D, requires_grad=True)
    b = torch.tensor([1.0, -2.0, 3.0], dtype=D) * scale
    z = idf.fixed_point(T, torch.zeros(3, dtype=D), a, b, solver=solver)
    torch.testing.assert_close(z.detach() / scale, 2 * b / scale, rtol=1e-9, atol=0)
    z.sum().backward()
    torch.testing.assert_close(a.grad / scale, (4 * b / scale).sum(), rtol=1e-8, atol=0)


@pytest.mark.parametrize("on_failure", ["nan", "warn"])
@pytest.mark.parametrize("adjoint", [idf.Implicit(), idf.Implicit(solver="gmres"), idf.Implicit(solver="richardson"),
                                     idf.Neumann(60)])
def test_one_bad_element_does_not_poison_the_shared_gradient(on_failure, adjoint):
    a = torch.tensor(0.5, dtype=D, requires_grad=True)
    b = torch.tensor([[1.0, 2.0], [math.nan, 1.0], [3.0, -1.0]], dtype=D)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", idf.SolveWarning)
        z = idf.fixed_point(T, torch.zeros(3, 2, dtype=D), a, b, batch_dims=1, on_failure=on_failure,
                            adjoint=adjoint)
    assert torch.isnan(z[1]).all() and torch.isfinite(z[[0, 2]]).all()
    z.nan_to_num().sum().backward()
    torch.testing.assert_close(a.grad, 4 * b[[0, 2]].sum(), rtol=1e-8, atol=0)


def test_a_map_that_is_not_a_contraction_is_a_named_failure():
    with pytest.raises(SolveError, match="picard|DIVERGED|MAX_ITERATIONS|NONFINITE"):
        idf.fixed_point(lambda z: 2.0 * z + 1.0, torch.zeros(3, dtype=D), solver="picard")


def test_non_contiguous_parameters():
    b = torch.arange(6, dtype=D).reshape(2, 3).mT.requires_grad_()           # (3, 2) non-contiguous
    z = idf.fixed_point(T, torch.zeros(3, 2, dtype=D), torch.tensor(0.25, dtype=D), b, batch_dims=1)
    torch.testing.assert_close(z.detach(), b.detach() / 0.75)
    z.sum().backward()
    torch.testing.assert_close(b.grad, torch.full((3, 2), 1 / 0.75, dtype=D))
