"""Turning a per-element status into the behaviour the user asked for.

``on_failure="raise"`` (default) raises :class:`SolveError` naming the failed
elements, their status, residual and a hint; ``"warn"`` warns and sets the
failed elements to NaN; ``"nan"`` sets them to NaN silently (the status stays
available through ``return_info``).  Under ``vmap`` nothing can be raised from
data, so failed elements become NaN whatever was asked.
"""

from __future__ import annotations

import math

import warnings

import torch

from .errors import InputError, SolveError
from .status import SolveInfo, Status

__all__ = ["ON_FAILURE", "check_on_failure", "apply_on_failure", "SolveWarning"]

ON_FAILURE = ("raise", "warn", "nan")


class SolveWarning(UserWarning):
    """Warned for failed batch elements under ``on_failure="warn"``."""


def check_on_failure(on_failure: str) -> str:
    if on_failure not in ON_FAILURE:
        raise InputError(f"on_failure must be one of {ON_FAILURE}, got {on_failure!r}")
    return on_failure


def _describe(info: SolveInfo, what: str, hints: dict, raising: bool = True) -> tuple[str, Status, float, int]:
    status = info.status.reshape(-1)
    failed = torch.nonzero(status != Status.SUCCESS).reshape(-1)
    first = int(failed[0])
    code = Status(int(status[first]))
    residual = float(info.residual.reshape(-1)[first]) if info.residual.numel() else float("nan")
    iters = int(info.iterations.reshape(-1)[first]) if info.iterations.numel() else 0
    n_failed, n_all = failed.numel(), status.numel()
    where = "" if n_all == 1 else f" in {n_failed} of {n_all} batch elements (first: flat index {first})"
    measured = f"residual {residual:.3e}" if not math.isnan(residual) else "no residual (no solution was computed)"
    msg = f"{what} failed{where}: {code.name} — {code.message}; {measured}"
    if iters:
        msg += f" after {iters} iterations"
    if info.cond is not None:
        msg += f"; condition estimate {float(info.cond.reshape(-1)[first]):.3e}"
    if info.rank is not None:
        msg += f"; numerical rank {int(info.rank.reshape(-1)[first])}"
    hint = hints.get(code)
    if hint:
        msg += f". {hint}"
    if n_all > 1 and raising:
        msg += ". Pass on_failure='nan' or 'warn' to keep the other elements."
    return msg, code, residual, iters


def apply_on_failure(y: torch.Tensor, info: SolveInfo, on_failure: str, what: str, hints: dict | None = None,
                     policy_hint: bool = True) -> torch.Tensor:
    """Apply the failure policy to the solution ``y`` given its per-element ``info``.

    ``info.status`` has the batch shape; ``y`` has the batch shape followed by
    trailing solution dimensions.  Returns ``y`` (failed elements set to NaN
    unless raising).  Performs one host sync to read the statuses.
    """
    ok = info.status == Status.SUCCESS
    if bool(ok.all()):
        return y
    if on_failure == "raise":
        msg, code, residual, iters = _describe(info, what, hints or {}, raising=policy_hint)
        raise SolveError(msg, status=code, residual=residual, iterations=iters, info=info)
    if on_failure == "warn":
        msg, *_ = _describe(info, what, hints or {}, raising=False)
        warnings.warn(msg + " The failed elements are set to NaN.", SolveWarning, stacklevel=3)
    return nan_where_failed(y, ok)


def nan_where_failed(y: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """Set the elements of ``y`` whose batch entry in ``ok`` is False to NaN (no sync)."""
    extra = y.dim() - ok.dim()
    mask = ok.reshape(ok.shape + (1,) * extra)
    return torch.where(mask, y, torch.full_like(y, float("nan")))
