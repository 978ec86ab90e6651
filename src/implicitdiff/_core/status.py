"""Named outcomes of a solve and the per-element report that carries them.

A status is a small integer so that it can live in a tensor (one per batch
element) without a host synchronisation; :class:`Status` gives each code its
name and the message a user sees when it is raised.
"""

from __future__ import annotations

import enum
from typing import NamedTuple, Optional

import torch

__all__ = ["Status", "SolveInfo"]


class Status(enum.IntEnum):
    """The outcome of a solve, one per batch element."""

    SUCCESS = 0
    SINGULAR = 1
    INCONSISTENT = 2
    RANK_DEFICIENT = 3
    MAX_ITERATIONS = 4
    BREAKDOWN = 5
    NONFINITE = 6
    DIVERGED = 7
    INFEASIBLE = 8
    UNBOUNDED = 9
    NONCONVEX = 10

    @property
    def message(self) -> str:
        return _MESSAGES[self]


_MESSAGES = {
    Status.SUCCESS: "converged",
    Status.SINGULAR: "the matrix is singular to working precision",
    Status.INCONSISTENT: "the system has no exact solution (the residual of the best solution is not small)",
    Status.RANK_DEFICIENT: "the matrix does not have full column rank, so the least-squares solution is not unique",
    Status.MAX_ITERATIONS: "the solver did not reach the tolerance within the iteration limit",
    Status.BREAKDOWN: "the iterative solver broke down (a zero or indefinite curvature, or stagnation)",
    Status.NONFINITE: "the solve produced NaN or Inf",
    Status.DIVERGED: "the iteration diverged",
    Status.INFEASIBLE: "the problem is primal infeasible",
    Status.UNBOUNDED: "the problem is dual infeasible (unbounded)",
    Status.NONCONVEX: "the objective is not convex: Q is not positive semidefinite (on the null space of the "
                      "equality constraints)",
}


class SolveInfo(NamedTuple):
    """Per-element report of a solve (tensors of the batch shape, no host sync).

    Attributes:
        status: ``int64`` codes of :class:`Status`.
        residual: relative residual of each element (dtype of the solve).
        iterations: iterations used (zeros for direct solvers).
        rank: numerical rank where a rank-revealing factorization ran, else ``None``.
        cond: condition-number estimate where one was computed, else ``None``.
    """

    status: torch.Tensor
    residual: torch.Tensor
    iterations: torch.Tensor
    rank: Optional[torch.Tensor] = None
    cond: Optional[torch.Tensor] = None

    @property
    def ok(self) -> torch.Tensor:
        """Boolean tensor: which elements succeeded."""
        return self.status == Status.SUCCESS
