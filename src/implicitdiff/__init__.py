"""implicitdiff: gradients of functions defined by equations, for PyTorch.

The public API; everything is re-exported from the module that defines it.
"""

from ._core.errors import InputError as InputError, SolveError as SolveError
from ._core.failure import SolveWarning as SolveWarning
from ._core.status import SolveInfo as SolveInfo, Status as Status
from . import linalg as linalg
from .checks.check_gradients import check_gradients as check_gradients
from .checks.report import GradientReport as GradientReport
from .linalg.selection import Nearest as Nearest, Pinned as Pinned
from .implicit.adjoint import Implicit as Implicit, Neumann as Neumann, Unroll as Unroll
from .implicit.fixed_point_adjoint import FixedPointAdjoint as FixedPointAdjoint
from .solvers.objects import (Anderson as Anderson, Broyden as Broyden, LBFGS as LBFGS, Newton as Newton,
                              Picard as Picard)
from .layers.argmin import argmin as argmin
from .layers.custom_root import custom_fixed_point as custom_fixed_point, custom_root as custom_root
from .layers.fixed_point import fixed_point as fixed_point
from .layers.root import root as root
from .layers.deq import (
    DEQInfo as DEQInfo,
    deq as deq,
    jacobian_penalty as jacobian_penalty,
)
from .layers.projections import (
    project_box as project_box,
    project_l1_ball as project_l1_ball,
    project_l2_ball as project_l2_ball,
    project_simplex as project_simplex,
    sparsemax as sparsemax,
)
from .layers.qp import qp as qp
from .layers.cone_program import cone_program as cone_program
from .layers.linear_solve import (
    ambiguity as ambiguity,
    linear_solve as linear_solve,
    linear_solve_ex as linear_solve_ex,
)

__version__ = "0.1.0"
from . import nn as nn  # noqa: E402  (after the layers it wraps)
