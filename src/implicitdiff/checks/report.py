"""The result of :func:`~implicitdiff.check_gradients`: one row per (input, mode, oracle).

A row compares the library's derivative with an oracle — central finite
differences (``"fd"``) or a ``reference`` function's autograd (``"reference"``)
— and passes when every component satisfies::

    |computed − expected| ≤ atol + rtol · S + floor

with ``S`` the size of the terms that sum to the derivative (``max |v|ᵀ|J|``
in reverse mode).  ``floor`` is the *expected error floor* of that comparison (see
:func:`~implicitdiff.check_gradients` for how it is estimated): the error an
exact gradient would still show because finite differences truncate and
round, and because the forward solver stopped at a tolerance.  A report is
truthy exactly when every row passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

__all__ = ["Comparison", "GradientReport"]


@dataclass(frozen=True)
class Comparison:
    """One comparison of a computed derivative with an oracle.

    Attributes:
        input: the name of the input leaf (``"b"``, ``"params['w']"``), or
            ``"output"`` for the value check against ``reference``.
        mode: ``"rev"`` (vector-Jacobian product ``vᵀJ``), ``"fwd"``
            (Jacobian-vector product ``J t``) or ``"value"`` (``fn`` vs ``reference``).
        against: ``"fd"`` or ``"reference"``.
        max_abs_err: ``max |computed − expected|`` over the components.
        max_rel_err: ``max_abs_err / scale`` (norm-wise; ``inf`` when the scale
            is zero and the error is not).
        scale: ``S``, the size of the terms that sum to the derivative:
            ``max |v|ᵀ|J|`` (rev), ``max |J||t|`` (fwd), ``max |f|`` (value).
        floor: the largest per-component expected error floor.
        allowed: the largest per-component allowance ``atol + rtol · S + floor``.
        passed: whether every component is within its allowance.
        error: the message of an exception raised while computing the
            derivative (the row then fails), else ``None``.
    """

    input: str
    mode: str
    against: str
    max_abs_err: float
    max_rel_err: float
    scale: float
    floor: float
    allowed: float
    passed: bool
    error: Optional[str] = None

    @property
    def weak(self) -> bool:
        """The floor is at least a tenth of the derivative itself: the check cannot see small errors."""
        return self.error is None and self.scale > 0 and self.floor >= 0.1 * self.scale


@dataclass(frozen=True)
class GradientReport:
    """The outcome of :func:`~implicitdiff.check_gradients`; ``bool(report)`` is True iff it passed.

    Attributes:
        comparisons: every :class:`Comparison` made.
        eps: the finite-difference step (relative, see
            :mod:`implicitdiff.checks.finite_diff`).
        rtol, atol: the tolerances used.
        forward_tol: the forward solver's relative tolerance accounted for (0 if none).
        cond: the condition estimate that scaled the floors.
        dtype: the dtype of the computed derivatives.
    """

    comparisons: tuple
    eps: float
    rtol: float
    atol: float
    forward_tol: float
    cond: float
    dtype: str
    notes: tuple = field(default=())

    def __bool__(self) -> bool:
        return bool(self.comparisons) and all(c.passed for c in self.comparisons)

    @property
    def passed(self) -> bool:
        return bool(self)

    @property
    def failures(self) -> tuple:
        """The comparisons that failed."""
        return tuple(c for c in self.comparisons if not c.passed)

    @property
    def inputs(self) -> tuple:
        """The names of the checked inputs, in order."""
        seen = []
        for c in self.comparisons:
            if c.mode != "value" and c.input not in seen:
                seen.append(c.input)
        return tuple(seen)

    def max_abs_err(self, input: str, *, against: str = "fd") -> float:
        """The largest absolute error of ``input`` against ``"fd"`` or ``"reference"`` over the modes."""
        errs = [c.max_abs_err for c in self.comparisons if c.input == input and c.against == against]
        if not errs:
            raise KeyError(f"no comparison for input {input!r} against {against!r}; inputs are {self.inputs}")
        return max(errs)

    def __str__(self) -> str:
        verdict = "PASSED" if self else "FAILED"
        n_fail = len(self.failures)
        head = (f"check_gradients: {verdict} ({len(self.comparisons) - n_fail}/{len(self.comparisons)} "
                f"comparisons pass; {self.dtype}, eps={self.eps:g}, rtol={self.rtol:g}, atol={self.atol:g}, "
                f"forward_tol={self.forward_tol:g}, cond≈{self.cond:.3g})")
        cols = ("input", "mode", "vs", "max abs err", "max rel err", "floor", "allowed", "result")
        rows = [cols]
        for c in self.comparisons:
            result = "ok" if c.passed else ("ERROR" if c.error else "FAIL")
            if c.passed and c.weak:
                result = "ok (weak)"
            rows.append((c.input, c.mode, c.against, _num(c.max_abs_err), _num(c.max_rel_err), _num(c.floor),
                         _num(c.allowed), result))
        widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
        lines = [head]
        for k, r in enumerate(rows):
            lines.append("  " + "  ".join(s.ljust(w) if i < 3 or i == 7 else s.rjust(w)
                                          for i, (s, w) in enumerate(zip(r, widths))).rstrip())
            if k == 0:
                lines.append("  " + "  ".join("-" * w for w in widths))
        for c in self.comparisons:
            if c.error:
                lines.append(f"  {c.input} ({c.mode} vs {c.against}) raised: {c.error}")
        if any(c.weak for c in self.comparisons):
            lines.append("  weak: the error floor is ≥ 10% of the derivative; use a larger eps or a tighter "
                         "forward tolerance to make the check sharper")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)

    def __repr__(self) -> str:
        names = ", ".join(self.inputs)
        return f"GradientReport(passed={bool(self)}, inputs=[{names}], failures={len(self.failures)})"


def _num(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if math.isinf(x):
        return "inf"
    return f"{x:.2e}"
