"""The shared option validators: every bad option is an InputError naming it."""

import math

import pytest
import torch

from implicitdiff import InputError
from implicitdiff._core.options import (check_bool, check_callable, check_choice, check_int, check_real,
                                        reject_inapplicable)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, True, "1e-3", 1j, torch.ones(2)])
def test_check_real_refuses(bad):
    with pytest.raises(InputError, match="rtol"):
        check_real("rtol", bad, low=0.0)


def test_check_real_accepts_and_bounds():
    assert check_real("rtol", 1e-3, low=0.0) == 1e-3
    assert check_real("rtol", torch.tensor(0.5), low=0.0, high=1.0) == 0.5
    assert check_real("rtol", None) is None
    assert check_real("x", math.inf, allow_inf=True) == math.inf
    with pytest.raises(InputError, match="> 0"):
        check_real("radius", 0.0, low=0.0, low_open=True)
    with pytest.raises(InputError, match="required"):
        check_real("radius", None, allow_none=False)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3"])
def test_check_int_refuses(bad):
    with pytest.raises(InputError, match="max_iter"):
        check_int("max_iter", bad, low=0)


def test_check_choice_bool_callable():
    assert check_choice("solver", "lu", ("lu", "qr")) == "lu"
    with pytest.raises(InputError, match="'lu', 'qr'"):
        check_choice("solver", "xx", ("lu", "qr"))
    with pytest.raises(InputError, match="solver"):
        check_choice("solver", ["lu"], ("lu", "qr"))
    assert check_bool("flag", False) is False
    with pytest.raises(InputError, match="flag"):
        check_bool("flag", 1)
    with pytest.raises(InputError, match="F must be callable"):
        check_callable("F", 3)


def test_reject_inapplicable_names_the_keyword():
    reject_inapplicable("solver 'lu'", max_iter=None)
    with pytest.raises(InputError, match="'max_iter', 'x0' do not apply to solver 'lu'"):
        reject_inapplicable("solver 'lu'", max_iter=3, x0=torch.zeros(2), M=None)
