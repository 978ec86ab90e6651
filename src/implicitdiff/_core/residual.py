"""The residual of a fixed point, ``F(z) = T(z) − z``, as a type that knows its map ``T``.

``fixed_point``, ``custom_fixed_point`` and ``nn.DEQ`` build one; the solvers step ``z ← T(z)``
with its map (:attr:`~implicitdiff.solvers._loop.Flat.tmap`), and the speculative recording
records ``T`` rather than ``F`` (:func:`~implicitdiff.implicit.speculation.record`).  Both test
for the type (``isinstance``), never for an attribute: a plain callable is a plain residual.
It lives in ``_core`` because ``solvers/`` and ``implicit/`` both read it and import neither
each other nor ``layers/``.
"""

from __future__ import annotations

from typing import Callable

import torch

from .errors import InputError
from .validate import autocast_hint

__all__ = ["FixedPointResidual"]


class FixedPointResidual:
    """The optimality condition of a fixed point, ``F(z, *params) = T(z, *params) − z``, knowing its map.

    ``map`` is ``T``.  ``name`` names ``T`` in the error raised when it returns something other
    than a tensor of ``z``'s shape and dtype.
    """

    __slots__ = ("map", "name")

    def __init__(self, T: Callable, name: str = "T"):
        self.map = T
        self.name = name

    def __call__(self, z, *params):
        t = self.map(z, *params)
        if not isinstance(t, torch.Tensor) or t.shape != z.shape:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise InputError(f"{self.name} must return a tensor of z's shape {tuple(z.shape)} (a fixed point maps "
                             f"z to a tensor like z), got {got}")
        if t.dtype != z.dtype:   # else T − z would promote it silently
            raise InputError(f"{self.name} returned {t.dtype} for z of {z.dtype}; make {self.name} keep z's dtype"
                             f"{autocast_hint(z)}")
        return t - z
