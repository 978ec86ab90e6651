"""Linear algebra, forward only: operators, factorizations and Krylov solvers.

Nothing here defines gradients; :mod:`implicitdiff.implicit` does.

``LU``, ``Cholesky``, ``QR``, ``SVD``, ``CG``, ... are *solver objects* carrying their options
(:mod:`.solvers`); ``LU.factor(A)`` (etc.) returns the reusable factorization, whose classes are
exported as ``LUFactor``, ``CholeskyFactor``, ``QRFactor``, ``SVDFactor``.
"""

from .cholesky import Cholesky as CholeskyFactor
from .factorization import Factorization as Factorization
from .lu import LU as LUFactor
from .operator import LinearOperator as LinearOperator, aslinearoperator as aslinearoperator
from .qr import QR as QRFactor, QRTransposed as QRTransposed
from .selection import Nearest as Nearest, Pinned as Pinned
from .svd import SVD as SVDFactor
from .solvers import (BiCGStab as BiCGStab, CG as CG, Cholesky as Cholesky, GMRES as GMRES, LSMR as LSMR,
                      LSQR as LSQR, LU as LU, MINRES as MINRES, QR as QR, SPLU as SPLU, SVD as SVD,
                      Solver as Solver, as_solver as as_solver, auto_solver as auto_solver)
from .krylov import (KrylovResult as KrylovResult, bicgstab as bicgstab, cg as cg, gmres as gmres,
                     lsmr as lsmr, lsqr as lsqr, minres as minres)
from .preconditioner import jacobi as jacobi
from . import kkt as kkt
