"""The demos of ``implicitdiff demo``: name → (description, entry point), imported only when run.

Add a demo by adding an entry (``"module:function"``, the function taking the
parsed command-line arguments ``args`` with ``args.out`` and ``args.quick``),
and make it the flagship — what ``implicitdiff demo`` runs without a name —
by setting :data:`FLAGSHIP`.

Example:
    >>> from implicitdiff.demos.registry import DEMOS, FLAGSHIP
    >>> FLAGSHIP in DEMOS
    True
"""

from __future__ import annotations

import importlib
from typing import Callable, NamedTuple

__all__ = ["Demo", "DEMOS", "FLAGSHIP", "get", "names"]


class Demo(NamedTuple):
    name: str
    description: str
    entry: str  # "module:function"; the function is called as function(args)

    def load(self) -> Callable:
        module, _, attr = self.entry.partition(":")
        return getattr(importlib.import_module(module), attr)

    def run(self, args) -> object:
        return self.load()(args)


DEMOS = {
    "seed": Demo(
        "seed",
        "the seed note: x = a₁y₁ + a₂y₂, two selections giving two gradients, A·dy/dx = I, "
        "and a non-square fit learned through linear_solve",
        "implicitdiff.demos.seed:main",
    ),
    "sudoku": Demo(
        "sudoku",
        "OptNet's 4×4 mini-Sudoku: a QP layer learns the rules of Sudoku as its equality constraints "
        "(puzzles generated in code; ~30 s, --quick ~12 s)",
        "implicitdiff.demos.sudoku:main",
    ),
    "deq": Demo(
        "deq",
        "a deep equilibrium classifier on three spirals: per-sample convergence, implicit gradients equal "
        "to unrolled autograd at constant memory",
        "implicitdiff.demos.deq:run",
    ),
    "cone": Demo("cone", "an SOCP layer (nn.CvxpyLayer) learns a hidden ellipse from projections onto it",
                 "implicitdiff.demos.cone:run"),
}

FLAGSHIP = "sudoku"
"""The demo that ``implicitdiff demo`` runs without a name."""


def names() -> list:
    return list(DEMOS)


def get(name: str) -> Demo:
    """The demo called ``name``; ``KeyError`` with the list of names otherwise."""
    try:
        return DEMOS[name]
    except KeyError:
        raise KeyError(f"unknown demo {name!r}; the demos are: {', '.join(DEMOS)}") from None
