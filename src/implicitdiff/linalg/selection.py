"""Solution maps ("selections") of ``A y = b`` and the factorization each one needs.

``A`` of shape ``(*, m, n)`` may have one solution, many or none; a selection
says which function ``y(b, A)`` the layer computes, and so which gradient it
has (every valid selection satisfies ``A dy/db = I`` on consistent right-hand
sides, but they differ on null(A)).

=================  ==========================================================
``"auto"``         square → ``"exact"``; ``m < n`` → ``"min_norm"``;
                   ``m > n`` → ``"least_squares"``
``"exact"``        a solution must exist: square ``A`` must be nonsingular
                   (reciprocal condition ≥ ``rank_rtol``); a non-square system
                   must be consistent (``‖Ay − b‖ ≤ rtol (‖A‖‖y‖ + ‖b‖)``);
                   the min-norm solution is returned
``"min_norm"``     ``y = A⁺ b``, any shape and rank (rank tolerance
                   ``rank_rtol``, default ``eps · max(m, n)``)
``"least_squares"`` ``argmin ‖Ay − b‖`` for full column rank ``A``
:class:`Nearest`   the least-squares solution closest to ``y0`` in the
                   ``weight`` norm (``y0 = 0``, no weight: ``"min_norm"``)
:class:`Pinned`    coordinates ``index`` of ``y`` take ``values``; the rest
                   solve the remaining square system (the seed's construction)
=================  ==========================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch

from .._core.defaults import eps, rank_rtol as default_rank_rtol
from .._core.errors import InputError
from .._core.status import Status
from .cholesky import Cholesky
from .lu import LU
from .qr import QR, QRTransposed
from .svd import SVD

__all__ = ["Nearest", "Pinned", "SELECTIONS", "SOLVERS", "resolve_selection", "factorize", "consistency_rtol",
           "not_symmetric"]

SELECTIONS = ("auto", "exact", "min_norm", "least_squares")
SOLVERS = ("auto", "lu", "cholesky", "qr", "svd")


@dataclass(frozen=True, eq=False)
class Nearest:
    """Select the (least-squares) solution nearest to ``y0`` in the ``weight`` norm.

    ``y = argmin ‖y − y0‖_W  s.t.  y minimizes ‖Ay − b‖``.  ``y0`` has the shape
    of the solution and may depend on the inputs (gradients flow to it);
    ``weight`` is ``None`` (identity), a positive vector ``(*, n)`` (diagonal
    ``W``) or a symmetric positive definite matrix ``(*, n, n)``.
    """

    y0: torch.Tensor
    weight: Optional[torch.Tensor] = None


@dataclass(frozen=True, eq=False)
class Pinned:
    """Pin coordinates ``index`` of ``y`` to ``values``; the others solve the square rest.

    With ``A`` of shape ``(*, m, n)`` exactly ``n − m`` coordinates must be
    pinned, and ``A[..., :, free]`` must be nonsingular.  ``values`` has shape
    ``(*, p)`` (or ``(*, p, k)`` for matrix right-hand sides) or is a scalar;
    gradients flow to it.  This is the seed note's ``y₁ = f(x)`` construction.
    """

    index: Union[Sequence[int], torch.Tensor]
    values: Any

    def __post_init__(self):
        idx = self.index
        if isinstance(idx, torch.Tensor):
            ok = not (idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool)
        else:
            try:
                items = list(idx) if not isinstance(idx, (int, str, bytes)) else [idx]
            except TypeError:
                items = [idx]
            ok = all(isinstance(i, int) and not isinstance(i, bool) or type(i).__name__.startswith("int")
                     for i in items)
        if not ok:
            raise InputError(f"Pinned.index must hold integer coordinates (a list of ints or an integer tensor), "
                             f"got {idx!r}")


def resolve_selection(selection, m: int, n: int) -> str:
    """The concrete name of a string selection for an ``m × n`` system."""
    if selection not in SELECTIONS:
        raise InputError(
            f"selection must be one of {SELECTIONS}, implicitdiff.Nearest(...) or implicitdiff.Pinned(...), "
            f"got {selection!r}"
        )
    if selection == "auto":
        return "exact" if m == n else ("min_norm" if m < n else "least_squares")
    if selection == "least_squares" and m < n:
        raise InputError(
            f"selection='least_squares' needs full column rank, impossible for A of shape ({m}, {n}) with "
            f"fewer rows than columns; use selection='min_norm' or an explicit Nearest/Pinned selection"
        )
    return selection


def not_symmetric(A: torch.Tensor) -> torch.Tensor:
    """Per element of a batch of square matrices: ``max|A − Aᵀ| > sqrt(eps) · max|A|`` (relative to
    ``A``'s scale; one pass over ``A``)."""
    return (A - A.mT).abs().amax(dim=(-2, -1)) > eps(A.dtype) ** 0.5 * A.abs().amax(dim=(-2, -1))


def consistency_rtol(dtype) -> float:
    """Default tolerance of the ``"exact"`` consistency check: ``sqrt(eps)``."""
    return eps(dtype) ** 0.5


def factorize(A: torch.Tensor, selection: str, solver: str = "auto", rank_rtol: float | None = None,
              screen: bool = False):
    """Factorize ``A`` for a concrete ``selection``.

    Returns ``(factorization, status, rank, cond)`` where ``status`` (``int64``,
    batch shape of ``A``) marks singular / rank-deficient elements, ``rank`` is
    the numerical rank and ``cond`` a condition estimate.  With
    ``solver="auto"`` a rank-deficient element under ``"min_norm"`` makes the
    whole batch fall back from LU/QR to the SVD (one host sync to decide).  With ``screen`` the LU's
    condition estimate is the cheap screened one (:func:`~.factorization.screened_rcond`): exact
    enough to decide singularity, looser as a reported ``cond`` for well-conditioned matrices.
    """
    if solver not in SOLVERS:
        raise InputError(f"solver must be one of {SOLVERS} for a dense matrix, got {solver!r}")
    m, n = A.shape[-2:]
    tol = default_rank_rtol(A.dtype, m, n) if rank_rtol is None else float(rank_rtol)
    batch = A.shape[:-2]
    full = torch.full(batch, min(m, n), dtype=torch.int64, device=A.device)
    ok = torch.zeros(batch, dtype=torch.int64, device=A.device)

    if solver == "svd":
        # LAPACK's SVD raises on NaN/Inf: zero them (the caller reports those elements NONFINITE)
        A = torch.where(torch.isfinite(A), A, torch.zeros((), dtype=A.dtype, device=A.device))
        # a truncated direction fails "least_squares" and a square "exact": there cond is A's own, not the
        # pseudo-inverse's (which would report a singular A as well conditioned)
        strict = selection == "least_squares" or (selection == "exact" and m == n)
        fact, rank, cond = SVD.factor(A, tol, full_cond=strict)
        status = ok
        if selection == "least_squares":
            status = torch.where(rank < n, int(Status.RANK_DEFICIENT), ok)
        elif selection == "exact" and m == n:
            status = torch.where(rank < n, int(Status.SINGULAR), ok)
        return fact, status, rank, cond

    if solver == "cholesky" and m != n:
        raise InputError(f"solver='cholesky' needs a square A, got shape ({m}, {n})")
    asym = None
    if solver == "cholesky":
        # Cholesky reads one triangle: a non-symmetric A would be solved as another matrix.  Checked
        # relative to A's scale (one pass over A, cheap beside the factorization).
        # A non-symmetric element is reported SINGULAR ("not symmetric positive definite"), per element.
        asym = not_symmetric(A)
    if solver == "lu" and m != n:
        raise InputError(f"solver='lu' needs a square A, got shape ({m}, {n}); use solver='qr' or 'svd'")

    if m == n and solver in ("auto", "lu", "cholesky"):
        if solver == "cholesky":
            fact, rcond = Cholesky.factor(A)
        else:
            fact, rcond = LU.factor(A, allow_transposed=True, screen=screen, doubt=max(tol ** 0.5, tol))
        bad = rcond < tol
        code = Status.SINGULAR
    else:
        cls = QR if m >= n else QRTransposed
        fact, rcond = cls.factor(A)
        bad = rcond < tol
        code = Status.RANK_DEFICIENT if (selection == "least_squares" or m >= n) else Status.SINGULAR
        if selection == "exact" and m == n:
            code = Status.SINGULAR
    if asym is not None:  # under vmap: a non-symmetric element is reported, never solved as another matrix
        bad = bad | asym
    cond = 1.0 / rcond
    rank = torch.where(bad, full - 1, full)  # at least one deficient direction; exact rank needs the SVD
    if selection == "min_norm" and solver == "auto" and bool(bad.any()):
        return factorize(A, selection, "svd", rank_rtol)
    if selection == "exact" and m != n and solver == "auto" and bool(bad.any()):
        # a rank-deficient non-square system may still be consistent: decide with the SVD
        return factorize(A, selection, "svd", rank_rtol)
    status = torch.where(bad, int(code), ok)
    return fact, status, rank, cond
