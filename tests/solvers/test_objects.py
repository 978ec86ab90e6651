"""Solver objects carry their options: validated at construction, strings are shorthand, no option ignored."""

import math

import pytest
import torch

import implicitdiff as idf
from implicitdiff import InputError

D = torch.float64


@pytest.mark.parametrize("make", [
    lambda: idf.Newton(rtol=math.nan), lambda: idf.Newton(max_iter=-1), lambda: idf.Newton(line_search="yes"),
    lambda: idf.Anderson(m=0), lambda: idf.Anderson(beta=0.0), lambda: idf.Anderson(start_rate=1.0),
    lambda: idf.Anderson(lam=-1.0), lambda: idf.Anderson(freeze=1), lambda: idf.Picard(beta=math.inf),
    lambda: idf.LBFGS(history=0), lambda: idf.Broyden(atol=-1.0), lambda: idf.Broyden(check_every=0),
    lambda: idf.Newton(callback=3),
])
def test_bad_option_values_are_refused_at_construction(make):
    with pytest.raises(InputError):
        make()


@pytest.mark.parametrize("cls,bad", [(idf.Newton, "m"), (idf.Broyden, "line_search"), (idf.Picard, "m"),
                                     (idf.LBFGS, "beta"), (idf.Anderson, "history")])
def test_an_option_the_solver_does_not_take_is_named(cls, bad):
    with pytest.raises(InputError, match=f"does not take '{bad}'"):
        cls(**{bad: 1})


def test_string_is_shorthand_for_the_object():
    t = torch.tensor([8.0, 27.0], dtype=D, requires_grad=True)
    F = lambda y, t: y ** 3 - t  # noqa: E731
    a, ia = idf.root(F, torch.ones(2, dtype=D), t, solver="broyden", rtol=1e-9, max_iter=40, return_info=True)
    b, ib = idf.root(F, torch.ones(2, dtype=D), t, solver=idf.Broyden(rtol=1e-9, max_iter=40), return_info=True)
    assert torch.equal(a, b) and torch.equal(ia.iterations, ib.iterations)
    # call keywords fill what the object leaves unset; both set is an error
    c = idf.root(F, torch.ones(2, dtype=D), t, solver=idf.Broyden(max_iter=40), rtol=1e-9)
    assert torch.equal(a, c)
    with pytest.raises(InputError, match="rtol given both"):
        idf.root(F, torch.ones(2, dtype=D), t, solver=idf.Broyden(rtol=1e-9), rtol=1e-6)


def test_solver_options_is_gone_with_a_pointer_to_the_objects():
    with pytest.raises(InputError, match="solver_options was removed"):
        idf.fixed_point(lambda z: 0.5 * z, torch.ones(2, dtype=D), solver_options={"m": 3})


def test_a_solver_that_does_not_apply_is_refused():
    with pytest.raises(InputError, match="LBFGS does not apply"):
        idf.root(lambda y: y - 1, torch.ones(2, dtype=D), solver=idf.LBFGS())
    with pytest.raises(InputError, match="unknown solver 'lbfgs'"):
        idf.fixed_point(lambda z: 0.5 * z, torch.ones(2, dtype=D), solver="lbfgs")


def test_deq_and_fixed_point_run_the_same_anderson():
    g = torch.Generator().manual_seed(0)

    class Cell(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.W = torch.nn.Parameter(torch.randn(5, 5, generator=g, dtype=D) * 0.3)

        def forward(self, z, x):
            return torch.tanh(z @ self.W.mT + x)

    cell, x = Cell(), torch.randn(4, 5, generator=g, dtype=D)
    z1, i1 = idf.deq(cell, x, solver="anderson", rtol=1e-10, return_info=True)
    z2, i2 = idf.fixed_point(lambda z, W, x: torch.tanh(z @ W.mT + x), torch.zeros(4, 5, dtype=D), cell.W, x,
                             solver="anderson", rtol=1e-10, batch_dims=1, return_info=True)
    torch.testing.assert_close(z1, z2, rtol=0, atol=1e-14)
    assert torch.equal(i1.iterations, i2.iterations)
    # the DEQ's default is the same class with its differences explicit
    from implicitdiff.layers.deq import DEFAULT_SOLVER
    assert DEFAULT_SOLVER == idf.Anderson(start_rate=0.8, freeze=False)


def test_argmin_lbfgs_object_options_are_used():
    c = torch.tensor([1.0, -2.0], dtype=D)
    y, info = idf.argmin(lambda y, c: 0.5 * ((y - c) ** 2).sum() + 0.25 * (y ** 4).sum(), torch.zeros(2, dtype=D), c,
                         solver=idf.LBFGS(history=3, max_iter=2), on_failure="nan", return_info=True)
    assert int(info.iterations) <= 2 and int(info.status) == int(idf.Status.MAX_ITERATIONS)


def test_a_solver_class_stands_for_its_defaults():
    t = torch.tensor([8.0, 27.0], dtype=D)
    y = idf.root(lambda y, t: y ** 3 - t, torch.ones(2, dtype=D), t, solver=idf.Broyden)
    torch.testing.assert_close(y, torch.tensor([2.0, 3.0], dtype=D))
