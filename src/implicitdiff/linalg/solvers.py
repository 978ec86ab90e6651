"""Linear solvers as values that carry their options, and the one automatic dispatcher.

``linear_solve(A, b, solver=CG(rtol=1e-8))`` and ``linear_solve(A, b, solver="cg", rtol=1e-8)``
are the same call: a string is shorthand for the object built from the keywords given beside
it, and the object's constructor validates them (type, range, NaN).  A keyword that a solver
does not take raises :class:`~implicitdiff.InputError` (``solver="lu"`` with ``max_iter``).

=============  ============================================================  =================
object         what it does                                                  options
=============  ============================================================  =================
``LU``         pivoted LU, square ``A``                                      ``rank_rtol``
``Cholesky``   ``A = L Lᵀ``, symmetric positive definite ``A`` (checked)     ``rank_rtol``
``QR``         Householder QR of ``A`` or ``Aᵀ``, full-rank non-square       ``rank_rtol``, ``rtol``
``SVD``        thin SVD, any shape and rank (the pseudo-inverse)             ``rank_rtol``, ``rtol``
``CG`` …       Krylov, matrix-free (``CG``, ``MINRES``, ``GMRES``,           ``rtol``, ``atol``,
               ``BiCGStab``, ``LSQR``, ``LSMR``)                             ``max_iter``, ``M``,
                                                                             ``x0``, ``adjoint_rtol``,
                                                                             ``adjoint_max_iter``
``SPLU``       SciPy's SuperLU of a square sparse CPU matrix                 —
=============  ============================================================  =================

``rank_rtol``: a singular value ``s ≤ rank_rtol · s_max`` (or a reciprocal condition estimate
below it) counts as zero; default ``eps · max(m, n)`` (:mod:`implicitdiff._core.defaults`).
``rtol`` of a direct solver: the consistency tolerance of ``selection="exact"`` on a
non-square system.  :func:`auto_solver` is the dispatcher behind ``solver="auto"``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch

from .._core.errors import InputError
from .._core.options import check_int, check_real
from .cholesky import Cholesky as CholeskyFactor
from .lu import LU as LUFactor
from .operator import LinearOperator
from .qr import QR as QRFactor
from .svd import SVD as SVDFactor

__all__ = ["Solver", "LU", "Cholesky", "QR", "SVD", "CG", "MINRES", "GMRES", "BiCGStab", "LSQR", "LSMR", "SPLU",
           "as_solver", "auto_solver", "is_matrix_free", "SPARSE_DENSE_MAX"]

#: a sparse ``A`` with at most this many columns is factorized densely under ``solver="auto"``
SPARSE_DENSE_MAX = 2000


@dataclass(frozen=True)
class Solver:
    """Abstract: a linear solver and its options (frozen; direct solvers compare by value, Krylov ones,
    which may hold tensors (``M``, ``x0``), by identity)."""

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""  # "direct" | "krylov" | "sparse"

    def options(self) -> dict:
        """The options that differ from their defaults."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) is not f.default}


def _rank_rtol(value):
    return check_real("rank_rtol", value, low=0.0, high=1.0)


@dataclass(frozen=True)
class _Direct(Solver):
    rank_rtol: Optional[float] = None
    family: ClassVar[str] = "direct"

    def __post_init__(self):
        object.__setattr__(self, "rank_rtol", _rank_rtol(self.rank_rtol))


@dataclass(frozen=True)
class LU(_Direct):
    """Pivoted LU for a square ``A``; singular when the reciprocal condition estimate < ``rank_rtol``.

    ``LU.factor(A)`` returns ``(factorization, rcond)`` (:class:`implicitdiff.linalg.lu.LU`)."""

    name: ClassVar[str] = "lu"
    factor = staticmethod(LUFactor.factor)


@dataclass(frozen=True)
class Cholesky(_Direct):
    """Cholesky for a symmetric positive definite ``A``.  Symmetry is checked (one pass over ``A``,
    relative to its scale) and a non-symmetric or indefinite element is reported, never solved wrong."""

    name: ClassVar[str] = "cholesky"
    factor = staticmethod(CholeskyFactor.factor)


@dataclass(frozen=True)
class QR(_Direct):
    """Householder QR (of ``A`` when tall, of ``Aᵀ`` when wide) for full-rank systems."""

    rtol: Optional[float] = None
    name: ClassVar[str] = "qr"
    factor = staticmethod(QRFactor.factor)

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "rtol", check_real("rtol", self.rtol, low=0.0))


@dataclass(frozen=True)
class SVD(_Direct):
    """Thin SVD: the minimum-norm least-squares map for any shape and rank."""

    rtol: Optional[float] = None
    name: ClassVar[str] = "svd"
    factor = staticmethod(SVDFactor.factor)

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "rtol", check_real("rtol", self.rtol, low=0.0))


@dataclass(frozen=True)
class _Krylov(Solver):
    rtol: Optional[float] = None
    atol: Optional[float] = None
    max_iter: Optional[int] = None
    M: Any = None
    x0: Optional[torch.Tensor] = dataclasses.field(default=None, compare=False)
    adjoint_rtol: Optional[float] = None
    adjoint_max_iter: Optional[int] = None
    family: ClassVar[str] = "krylov"
    square: ClassVar[bool] = True

    def __post_init__(self):
        object.__setattr__(self, "rtol", check_real("rtol", self.rtol, low=0.0))
        object.__setattr__(self, "atol", check_real("atol", self.atol, low=0.0))
        object.__setattr__(self, "adjoint_rtol", check_real("adjoint_rtol", self.adjoint_rtol, low=0.0))
        object.__setattr__(self, "max_iter", check_int("max_iter", self.max_iter, low=0))
        object.__setattr__(self, "adjoint_max_iter", check_int("adjoint_max_iter", self.adjoint_max_iter, low=0))
        if self.M is not None and not (callable(self.M) or isinstance(self.M, (torch.Tensor, LinearOperator))):
            raise InputError(f"M must be a preconditioner r -> M r (a callable, LinearOperator or tensor), "
                             f"got {type(self.M).__name__}")
        if self.x0 is not None and not isinstance(self.x0, torch.Tensor):
            raise InputError(f"x0 must be a tensor of the solution's shape, got {type(self.x0).__name__}")

    __hash__ = object.__hash__


@dataclass(frozen=True, eq=False)
class CG(_Krylov):
    """Conjugate gradients (symmetric positive definite ``A``)."""

    name: ClassVar[str] = "cg"


@dataclass(frozen=True, eq=False)
class MINRES(_Krylov):
    """MINRES (symmetric, possibly indefinite ``A``)."""

    name: ClassVar[str] = "minres"


@dataclass(frozen=True, eq=False)
class GMRES(_Krylov):
    """Restarted GMRES (any square ``A``)."""

    name: ClassVar[str] = "gmres"


@dataclass(frozen=True, eq=False)
class BiCGStab(_Krylov):
    """BiCGStab (any square ``A``)."""

    name: ClassVar[str] = "bicgstab"


@dataclass(frozen=True, eq=False)
class LSQR(_Krylov):
    """LSQR: ``x = A⁺ b`` for any shape and rank."""

    name: ClassVar[str] = "lsqr"
    square: ClassVar[bool] = False


@dataclass(frozen=True, eq=False)
class LSMR(_Krylov):
    """LSMR: ``x = A⁺ b`` for any shape and rank (MINRES on the normal equations)."""

    name: ClassVar[str] = "lsmr"
    square: ClassVar[bool] = False


@dataclass(frozen=True)
class SPLU(Solver):
    """SciPy's SuperLU of a square 2-D sparse CPU ``A``, factorized once and reused by the backward."""

    name: ClassVar[str] = "splu"
    family: ClassVar[str] = "sparse"


_BY_NAME = {cls.name: cls for cls in (LU, Cholesky, QR, SVD, CG, MINRES, GMRES, BiCGStab, LSQR, LSMR, SPLU)}
_DEFAULT = {cls: cls() for cls in _BY_NAME.values()}  # solvers are immutable: "auto" hands these out
_OPTION_NAMES = ("rank_rtol", "rtol", "atol", "max_iter", "M", "x0", "adjoint_rtol", "adjoint_max_iter")


def is_matrix_free(A) -> bool:
    """Whether ``solver="auto"`` treats ``A`` as matrix-free (a matvec operator, or sparse with more than
    :data:`SPARSE_DENSE_MAX` columns): it then picks a Krylov solver."""
    if isinstance(A, LinearOperator):
        return A.matrix is None or (A.is_sparse and A.shape[1] > SPARSE_DENSE_MAX)
    return isinstance(A, torch.Tensor) and A.layout != torch.strided and A.shape[-1] > SPARSE_DENSE_MAX


def auto_solver(A, selection="auto") -> Solver:
    """The solver ``solver="auto"`` picks for ``A`` (inspect it, or pass it on with options).

    A dense ``A`` (or a sparse one with at most :data:`SPARSE_DENSE_MAX` columns) is factorized:
    :class:`Cholesky` for a ``LinearOperator`` tagged ``positive_definite``, :class:`LU` when square
    (an ``"exact"``/``"auto"`` selection), :class:`QR` otherwise (the layer falls back to the SVD for a
    rank-deficient ``"min_norm"`` element).  A matrix-free or large sparse ``A`` goes to :class:`CG`
    (tagged positive definite), :class:`MINRES` (tagged symmetric), :class:`GMRES` (square) or
    :class:`LSMR` (non-square).

    Example:
        >>> import torch, implicitdiff as idf
        >>> idf.linalg.auto_solver(torch.eye(3))
        LU(rank_rtol=None)
    """
    if isinstance(A, LinearOperator):
        m, n = A.shape
        pd, sym = A.positive_definite, A.symmetric
    elif isinstance(A, torch.Tensor):
        if A.dim() < 2:
            raise InputError(f"A must have shape (*, m, n), got {tuple(A.shape)}")
        (m, n), pd, sym = A.shape[-2:], False, False
    else:
        raise InputError(f"A must be a torch.Tensor or an implicitdiff.linalg.LinearOperator, got "
                         f"{type(A).__name__}")
    if is_matrix_free(A):
        if m != n:
            return _DEFAULT[LSMR]
        return _DEFAULT[CG] if pd else _DEFAULT[MINRES] if sym else _DEFAULT[GMRES]
    if m != n:
        return _DEFAULT[QR]
    return _DEFAULT[Cholesky] if pd else _DEFAULT[LU]


def as_solver(solver, A=None, selection="auto", **options) -> Solver:
    """A :class:`Solver` from ``solver`` (an object, a name, or ``"auto"``) and shorthand ``options``.

    Options set to ``None`` are "not given".  A given option the solver does not take raises
    :class:`~implicitdiff.InputError` naming it; options beside a solver *object* raise too (set
    them on the object).
    """
    given = {k: v for k, v in options.items() if v is not None}
    unknown = [k for k in given if k not in _OPTION_NAMES]
    if unknown:
        raise InputError(f"unknown option(s) {unknown}; linear solvers take {list(_OPTION_NAMES)}")
    if isinstance(solver, Solver):
        if given:
            raise InputError(f"{sorted(given)} given beside the solver object {solver!r}: set options on the "
                             f"object, e.g. {type(solver).__name__}({next(iter(sorted(given)))}=...)")
        return solver
    if isinstance(solver, type) and issubclass(solver, Solver) and solver.name:
        solver = solver.name
    if not isinstance(solver, str) or (solver != "auto" and solver not in _BY_NAME):
        raise InputError(f"solver must be one of {('auto',) + tuple(_BY_NAME)} or an implicitdiff.linalg solver "
                         f"object (LU(), CG(rtol=...), ...), got {solver!r}")
    if solver == "auto" and not given:
        return auto_solver(A, selection)
    cls = type(auto_solver(A, selection)) if solver == "auto" else _BY_NAME[solver]
    bad = [k for k in given if k not in {f.name for f in dataclasses.fields(cls)}]
    if bad:
        names = ", ".join(repr(k) for k in bad)
        raise InputError(f"{names} {'does' if len(bad) == 1 else 'do'} not apply to solver={cls.name!r} "
                         f"({cls.__name__}); remove {'it' if len(bad) == 1 else 'them'} or choose a solver "
                         f"that takes {'it' if len(bad) == 1 else 'them'}")
    return cls(**given)
