"""The two exception types of the library.

``InputError`` is raised *before* any work is done, for arguments that cannot be
right (wrong shape, dtype, device, non-finite values, an unknown option).
``SolveError`` is raised when the work was attempted and failed (a singular
matrix, an inconsistent system, a solver that did not converge); it carries
the status, the measured residual and the iteration count so that a caller can
report or recover.
"""

from __future__ import annotations

__all__ = ["InputError", "SolveError"]


class InputError(ValueError):
    """An argument is malformed; the message names the argument and the fix."""


class SolveError(RuntimeError):
    """A solve failed.

    Attributes:
        status: the :class:`~implicitdiff.Status` of the (first) failed element.
        residual: the measured residual (float, or ``None`` where not measured).
        iterations: iterations used (int, or ``None`` for direct solvers).
        info: the full :class:`~implicitdiff.SolveInfo` when available.
    """

    def __init__(self, message, *, status=None, residual=None, iterations=None, info=None):
        super().__init__(message)
        self.status = status
        self.residual = residual
        self.iterations = iterations
        self.info = info
