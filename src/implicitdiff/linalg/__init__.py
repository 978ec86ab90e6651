"""Linear algebra, forward only: operators, factorizations and Krylov solvers.

Nothing here defines gradients; :mod:`implicitdiff.implicit` does.
"""

from .cholesky import Cholesky as Cholesky
from .factorization import Factorization as Factorization
from .lu import LU as LU
from .operator import LinearOperator as LinearOperator, aslinearoperator as aslinearoperator
from .qr import QR as QR, QRTransposed as QRTransposed
from .selection import Nearest as Nearest, Pinned as Pinned
from .svd import SVD as SVD
from .krylov import (KrylovResult as KrylovResult, bicgstab as bicgstab, cg as cg, gmres as gmres,
                     lsmr as lsmr, lsqr as lsqr, minres as minres)
from .preconditioner import jacobi as jacobi
from . import kkt as kkt
