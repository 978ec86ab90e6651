"""Forward solvers as values that carry their options: ``Newton(...)``, ``Broyden(...)``,
``Anderson(...)``, ``Picard(...)``, ``LBFGS(...)``.

``solver="anderson", rtol=1e-8, max_iter=50`` in a layer is shorthand for
``solver=Anderson(rtol=1e-8, max_iter=50)``; the string names the class with its defaults
(:data:`~implicitdiff._core.defaults.SOLVER_MAX_ITER`).  Every option is validated by the
constructor (type, range, NaN) and an option the solver does not take raises
:class:`~implicitdiff.InputError` naming it — never silently ignored.  A solver object is
called as ``solver(F, y0, params, batch_dims, **call)`` (``call``: per-call extras such as
``trace``) and returns a :class:`~implicitdiff.solvers.SolverResult`.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from .._core.defaults import SOLVER_MAX_ITER
from .._core.errors import InputError
from .._core.options import check_bool, check_callable, check_int, check_real
from .anderson import anderson
from .broyden import broyden
from .lbfgs import lbfgs
from .newton import newton
from .picard import picard

__all__ = ["Solver", "Newton", "Broyden", "Anderson", "Picard", "LBFGS", "as_solver", "SOLVER_CLASSES"]


def _check_every(v):
    return check_int("check_every", v, low=1)


def _callback(v):
    return check_callable("callback", v, allow_none=True)


class Solver:
    """A forward solver with its options (base class; see the subclasses).

    Attributes: ``rtol``, ``atol``, ``max_iter`` (the stopping rule
    ``‖F(y)‖ ≤ atol + rtol ‖F(y0)‖`` per batch element; ``rtol`` ``None`` is the dtype's
    default) and the solver's own options (``options``, a dict).
    """

    name: str = ""
    fn: Callable = staticmethod(lambda *a, **k: None)
    #: option name -> validator (value -> value); ``None`` means "the function's default"
    takes: dict = {}
    #: whether the solver takes ``recorder=`` (:class:`~implicitdiff.implicit.speculation.Recorder`)
    records: bool = False

    def __init__(self, *, rtol: Optional[float] = None, atol: Optional[float] = None,
                 max_iter: Optional[int] = None, **options: Any):
        self.rtol = check_real(f"{type(self).__name__}(rtol=...)", rtol, low=0.0)
        self.atol = check_real(f"{type(self).__name__}(atol=...)", atol, low=0.0)
        self.max_iter = check_int(f"{type(self).__name__}(max_iter=...)", max_iter, low=0)
        unknown = sorted(set(options) - set(self.takes))
        if unknown:
            valid = ", ".join(["rtol", "atol", "max_iter", *sorted(self.takes)])
            raise InputError(f"{type(self).__name__} does not take {', '.join(repr(k) for k in unknown)}; "
                             f"its options: {valid}")
        self.options = {k: self.takes[k](v) for k, v in options.items() if v is not None}

    def replace(self, **changes) -> "Solver":
        """A copy with some options changed (validated again)."""
        kw = {"rtol": self.rtol, "atol": self.atol, "max_iter": self.max_iter, **self.options, **changes}
        return type(self)(**kw)

    def merged(self, *, rtol=None, atol=None, max_iter=None) -> "Solver":
        """This solver with the layer's ``rtol``/``atol``/``max_iter`` keywords filled in where it
        left them unset; a keyword that the object also sets raises (two values for one option)."""
        given = {"rtol": rtol, "atol": atol, "max_iter": max_iter}
        both = [k for k, v in given.items() if v is not None and getattr(self, k) is not None]
        if both:
            raise InputError(f"{', '.join(both)} given both to the call and to {self!r}; set "
                             f"{'it' if len(both) == 1 else 'them'} in one place (on the solver object)")
        changes = {k: v for k, v in given.items() if v is not None}
        return self.replace(**changes) if changes else self

    def keywords(self, **call) -> dict:
        """The keywords :attr:`fn` is called with: the options, ``call``'s, and the set ``rtol``/``atol``,
        ``max_iter`` always (its default filled in)."""
        kw = dict(self.options, **call)
        if self.rtol is not None:
            kw["rtol"] = self.rtol
        if self.atol is not None:
            kw["atol"] = self.atol
        kw["max_iter"] = SOLVER_MAX_ITER[self.name] if self.max_iter is None else self.max_iter
        return kw

    def __call__(self, F, y0, params, batch_dims, **call):
        return type(self).fn(F, y0, params, batch_dims=batch_dims, **self.keywords(**call))

    def __eq__(self, other):
        return type(other) is type(self) and (self.rtol, self.atol, self.max_iter, self.options) == \
            (other.rtol, other.atol, other.max_iter, other.options)

    def __hash__(self):
        return hash((type(self), self.rtol, self.atol, self.max_iter, tuple(sorted(self.options.items(), key=str))))

    def __repr__(self):
        parts = [f"{k}={v!r}" for k, v in (("rtol", self.rtol), ("atol", self.atol), ("max_iter", self.max_iter))
                 if v is not None]
        parts += [f"{k}={v!r}" for k, v in self.options.items()]
        return f"{type(self).__name__}({', '.join(parts)})"


class Newton(Solver):
    """Newton's method with a backtracking line search (``line_search``); its LU of ``∂F/∂y`` at the
    solution is reused by the backward (:func:`~implicitdiff.solvers.newton.newton`)."""

    name = "newton"
    fn = staticmethod(newton)
    takes = {"line_search": lambda v: check_bool("Newton(line_search=...)", v), "check_every": _check_every,
             "callback": _callback}


class Broyden(Solver):
    """Broyden's good method (:func:`~implicitdiff.solvers.broyden.broyden`)."""

    name = "broyden"
    fn = staticmethod(broyden)
    takes = {"check_every": _check_every, "callback": _callback}


class Anderson(Solver):
    """Anderson mixing (:func:`~implicitdiff.solvers.anderson.anderson`): ``m`` differences,
    damping ``beta``, regularization ``lam``, lazy start ``start_rate`` (``0``: mix from the first
    step), ``freeze`` (stop each element where it converged; ``False``: whole-batch plain steps)."""

    name = "anderson"
    fn = staticmethod(anderson)
    records = True
    takes = {"m": lambda v: check_int("Anderson(m=...)", v, low=1),
             "beta": lambda v: check_real("Anderson(beta=...)", v, low=0.0, low_open=True),
             "lam": lambda v: check_real("Anderson(lam=...)", v, low=0.0),
             "start_rate": lambda v: check_real("Anderson(start_rate=...)", v, low=0.0, high=1.0, high_open=True),
             "freeze": lambda v: check_bool("Anderson(freeze=...)", v), "check_every": _check_every,
             "callback": _callback}


class Picard(Solver):
    """The damped iteration ``y ← y + β F(y)`` (``T(y)`` for a fixed point at ``β = 1``)
    (:func:`~implicitdiff.solvers.picard.picard`)."""

    name = "picard"
    fn = staticmethod(picard)
    records = True
    takes = {"beta": lambda v: check_real("Picard(beta=...)", v, low=0.0, low_open=True),
             "freeze": lambda v: check_bool("Picard(freeze=...)", v), "check_every": _check_every,
             "callback": _callback}


class LBFGS(Solver):
    """L-BFGS on the objective (``argmin`` only; :func:`~implicitdiff.solvers.lbfgs.lbfgs`)."""

    name = "lbfgs"
    fn = staticmethod(lbfgs)
    takes = {"history": lambda v: check_int("LBFGS(history=...)", v, low=1), "check_every": _check_every,
             "callback": _callback}


#: the string shorthands
SOLVER_CLASSES = {"newton": Newton, "broyden": Broyden, "anderson": Anderson, "picard": Picard, "lbfgs": LBFGS}


def as_solver(solver, *, rtol=None, atol=None, max_iter=None, allowed=("newton", "broyden", "anderson", "picard"),
              solver_options=None):
    """The forward solver of a layer, called as ``solve(F, y0, params, batch_dims, **call)``: a :class:`Solver`
    from a name (with the layer's ``rtol``/``atol``/``max_iter``) or an object (those keywords merged in), or a
    user callable wrapped to receive them as keywords.  ``allowed``: the names the layer takes;
    ``solver_options`` was removed (options live on the solver object) and raises."""
    if solver_options is not None:
        raise InputError("solver_options was removed: options live on the solver object, e.g. "
                         "solver=implicitdiff.solvers.Anderson(m=5, beta=0.5) or Newton(line_search=False) "
                         "(rtol/atol/max_iter may stay keywords of the call)")
    if isinstance(solver, type) and issubclass(solver, Solver):  # the class itself: its defaults
        solver = solver()
    if isinstance(solver, Solver):
        if solver.name not in allowed:
            raise InputError(f"{type(solver).__name__} does not apply here; choose one of "
                             f"{', '.join(SOLVER_CLASSES[k].__name__ for k in allowed)} (or their names)")
        if rtol is None and atol is None and max_iter is None:
            return solver
        return solver.merged(rtol=rtol, atol=atol, max_iter=max_iter)
    if isinstance(solver, str):
        if solver not in allowed:
            valid = ", ".join(repr(k) for k in allowed)
            raise InputError(f"unknown solver {solver!r}: choose one of {valid}, a solver object "
                             f"({', '.join(SOLVER_CLASSES[k].__name__ for k in allowed)}), or pass a callable "
                             f"solver(F, y0, params, *, batch_dims, rtol, atol, max_iter) -> SolverResult")
        return SOLVER_CLASSES[solver](rtol=rtol, atol=atol, max_iter=max_iter)
    if not callable(solver):
        raise InputError(f"solver must be a name, a solver object or a callable, got {type(solver).__name__}")
    kw = {"rtol": check_real("rtol", rtol, low=0.0), "atol": check_real("atol", atol, low=0.0) or 0.0}
    max_iter = check_int("max_iter", max_iter, low=0)
    if max_iter is not None:
        kw["max_iter"] = max_iter

    def solve(F, y0, params, batch_dims, **call):
        return solver(F, y0, params, batch_dims=batch_dims, **kw, **call)

    return solve
