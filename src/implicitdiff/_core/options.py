"""Validation of options (keywords): one wording for every layer and solver.

Every option is checked when the call is made — type, range, NaN — so that a bad option is
reported as an :class:`InputError` naming it, never as a failed solve or an error from inside
torch.  Solvers and strategies call these from their constructors or at the top of the layer.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Iterable

from .errors import InputError

__all__ = ["check_real", "check_int", "check_choice", "check_bool", "check_callable",
           "reject_inapplicable"]


def check_real(name: str, value: Any, *, low: float | None = None, high: float | None = None,
               low_open: bool = False, high_open: bool = False, allow_none: bool = True,
               allow_inf: bool = False) -> float | None:
    """Return ``value`` as a float after checking it is a finite real number in range.

    ``low``/``high`` bound the value (closed unless ``low_open``/``high_open``); ``None`` passes
    through when ``allow_none``.  Booleans, NaN, complex numbers and tensors with more than one
    element are refused with an :class:`InputError` naming ``name``.
    """
    if value is None:
        if allow_none:
            return None
        raise InputError(f"{name} is required (got None)")
    if hasattr(value, "numel") and hasattr(value, "item"):  # a 0-d / 1-element tensor
        if value.numel() != 1 or value.is_complex():
            raise InputError(f"{name} must be a real number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if math.isnan(value):
        raise InputError(f"{name} is NaN; pass a number")
    if math.isinf(value) and not allow_inf:
        raise InputError(f"{name} is {value}; pass a finite number")
    if low is not None and (value < low or (low_open and value == low)):
        raise InputError(f"{name} must be {'>' if low_open else '>='} {low:g}, got {value:g}")
    if high is not None and (value > high or (high_open and value == high)):
        raise InputError(f"{name} must be {'<' if high_open else '<='} {high:g}, got {value:g}")
    return value


def check_int(name: str, value: Any, *, low: int | None = None, high: int | None = None,
              allow_none: bool = True) -> int | None:
    """Return ``value`` as an int after checking it is an integer (not a bool, not a float) in range."""
    if value is None:
        if allow_none:
            return None
        raise InputError(f"{name} is required (got None)")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    value = int(value)
    if low is not None and value < low:
        raise InputError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise InputError(f"{name} must be <= {high}, got {value}")
    return value


def check_choice(name: str, value: Any, choices: Iterable) -> Any:
    """Return ``value`` if it is one of ``choices``; else an :class:`InputError` listing them."""
    choices = tuple(choices)
    try:
        ok = value in choices
    except TypeError:  # unhashable / incomparable
        ok = False
    if not ok or isinstance(value, bool) and not any(c is value for c in choices):
        raise InputError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """Return ``value`` if it is a bool (``True``/``False``); else an :class:`InputError`."""
    if not isinstance(value, bool):
        raise InputError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return value


def check_callable(name: str, value: Any, *, allow_none: bool = False) -> Callable | None:
    """Return ``value`` if it is callable; else an :class:`InputError` naming ``name``."""
    if value is None and allow_none:
        return None
    if not callable(value):
        raise InputError(f"{name} must be callable, got {type(value).__name__}")
    return value


def reject_inapplicable(owner: str, **given: Any) -> None:
    """Raise an :class:`InputError` for every keyword in ``given`` that was set (is not ``None``).

    For the keywords that do not apply to the chosen solver or strategy ``owner``: an option
    that does not apply is an error, never silently ignored.
    """
    bad = [k for k, v in given.items() if v is not None]
    if bad:
        names = ", ".join(repr(k) for k in bad)
        raise InputError(f"{names} {'does' if len(bad) == 1 else 'do'} not apply to {owner}; "
                         f"remove {'it' if len(bad) == 1 else 'them'} or choose a solver that takes "
                         f"{'it' if len(bad) == 1 else 'them'}")
