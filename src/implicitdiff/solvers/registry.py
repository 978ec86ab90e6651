"""Root solvers by name: ``"newton" | "broyden" | "anderson" | "picard"``."""

from __future__ import annotations

from typing import Callable

from .._core.errors import InputError
from .anderson import anderson
from .broyden import broyden
from .newton import newton
from .picard import picard

__all__ = ["ROOT_SOLVERS", "get_root_solver"]

ROOT_SOLVERS: dict[str, Callable] = {"newton": newton, "broyden": broyden, "anderson": anderson, "picard": picard}


def get_root_solver(name: str) -> Callable:
    """The root solver called ``name``: ``solver(F, y0, params, *, rtol, atol, max_iter, batch_dims, ...)``.

    Raises :class:`InputError` for any other name, listing the valid ones.

    Example:
        >>> from implicitdiff.solvers.registry import get_root_solver
        >>> get_root_solver("newton").__name__
        'newton'
    """
    if not isinstance(name, str) or name not in ROOT_SOLVERS:
        valid = ", ".join(repr(k) for k in ROOT_SOLVERS)
        raise InputError(f"unknown root solver {name!r}: choose one of {valid}, or pass a callable "
                         f"solver(F, y0, params, *, batch_dims, rtol, atol, max_iter) -> SolverResult")
    return ROOT_SOLVERS[name]
