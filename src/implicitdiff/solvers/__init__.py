"""Nonlinear forward solvers (no gradients): Newton, Broyden, Anderson, Picard, L-BFGS.

Each takes ``(F, y0, params, *, rtol, atol, max_iter, batch_dims, ...)`` and
returns a :class:`SolverResult`; the implicit layers attach the gradients.  The layers take
them as objects carrying their options (``Newton(...)``, ``Anderson(m=5)``, …; :mod:`.objects`).
"""

from .anderson import anderson as anderson
from .broyden import broyden as broyden
from .lbfgs import lbfgs as lbfgs
from .newton import newton as newton
from .objects import (Anderson as Anderson, Broyden as Broyden, LBFGS as LBFGS, Newton as Newton, Picard as Picard,
                      Solver as Solver)
from .picard import picard as picard
from .registry import get_root_solver as get_root_solver
from .result import SolverResult as SolverResult
