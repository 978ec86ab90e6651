"""The library's own gradient self-check: a registry of small cases, run by ``implicitdiff check``.

A case is a name, the layer it exercises, and ``build(device, dtype) -> (fn,
inputs)`` or ``(fn, inputs, reference)``; :func:`run` passes each to
:func:`~implicitdiff.checks.check_gradients.check_gradients` (reverse and
forward mode, finite differences in float64, plus the reference when given).
Cases are tiny: the whole registry runs in seconds on a CPU, so a user can
check an installed build on their own machine and device.

Adding a case for another layer is one decorated function::

    @register_case("root/cubic", layer="root")
    def _cubic(device, dtype):
        theta = torch.tensor([8.0, 27.0], device=device, dtype=dtype)
        y0 = torch.ones(2, device=device, dtype=dtype)
        return (lambda theta: idf_root(lambda y, t: y ** 3 - t, y0, theta)), (theta,)

either here or in a module listed in :data:`CASE_MODULES` (imported when the
registry is read).  ``fn`` must follow the dtype of its inputs: the finite
differences evaluate it on float64 copies.
"""

from __future__ import annotations

import importlib
from typing import Callable, NamedTuple, Optional

import torch

from ..layers.linear_solve import ambiguity, linear_solve
from ..linalg.selection import Nearest, Pinned
from .._core.errors import InputError
from .._core.options import check_choice, check_int
from .check_gradients import check_gradients
from .report import GradientReport

__all__ = ["Case", "REGISTRY", "CASE_MODULES", "register_case", "cases", "run", "CaseResult"]


class Case(NamedTuple):
    """A self-check case: ``build(device, dtype)`` returns ``(fn, inputs)`` or ``(fn, inputs, reference)``."""

    name: str
    layer: str
    build: Callable
    options: dict  # extra keyword arguments of check_gradients (e.g. forward_tol)


class CaseResult(NamedTuple):
    case: Case
    report: Optional[GradientReport]
    error: Optional[str]  # the case could not even be built or evaluated

    @property
    def passed(self) -> bool:
        return self.error is None and bool(self.report)


REGISTRY: list = []
"""The cases, in registration order.  Append with :func:`register_case`."""

CASE_MODULES: list = ["implicitdiff.checks.cases_implicit", "implicitdiff.checks.cases_layers"]
"""Modules (dotted names) that register more cases when imported, e.g. ``"implicitdiff.checks.cases_qp"``."""


def register_case(name: str, *, layer: str, **options) -> Callable:
    """Decorator: register ``build(device, dtype)`` as the self-check case ``name`` of ``layer``.

    ``options`` are passed to ``check_gradients`` (``forward_tol=``, ``mode=``, ...).
    """
    def deco(build: Callable) -> Callable:
        if any(c.name == name for c in REGISTRY):
            raise ValueError(f"a self-check case named {name!r} is already registered")
        REGISTRY.append(Case(name, layer, build, dict(options)))
        return build
    return deco


def cases(pattern: Optional[str] = None) -> list:
    """The registered cases (after importing :data:`CASE_MODULES`), those whose name contains ``pattern``."""
    for mod in CASE_MODULES:
        importlib.import_module(mod)
    return [c for c in REGISTRY if pattern is None or pattern in c.name]


def run(*, device="cpu", dtype=torch.float64, pattern: Optional[str] = None, seed: int = 0) -> list:
    """Run the (matching) cases; returns one :class:`CaseResult` per case, in order.

    Example:
        >>> from implicitdiff.checks.selfcheck import run
        >>> results = run(pattern="linear_solve/auto_square")
        >>> [(r.case.name, r.passed) for r in results]
        [('linear_solve/auto_square', True)]
    """
    check_choice("dtype", dtype, (torch.float64, torch.float32))
    check_int("seed", seed, allow_none=False)
    if pattern is not None and not isinstance(pattern, str):
        raise InputError(f"pattern must be a string (a part of a case's name) or None, got {type(pattern).__name__}")
    out = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny cases: extra threads only synchronise (and crawl on a busy machine)
    try:
        for case in cases(pattern):
            out.append(_run_case(case, device, dtype, seed))
    finally:
        torch.set_num_threads(threads)
    return out


def _run_case(case: Case, device, dtype, seed: int) -> CaseResult:
    torch.manual_seed(seed)
    try:
        built = case.build(torch.device(device), dtype)
        fn, inputs = built[0], built[1]
        reference = built[2] if len(built) > 2 else None
        options = {"mode": "both", **case.options}
        return CaseResult(case, check_gradients(fn, *inputs, reference=reference, seed=seed, **options), None)
    except Exception as e:  # a case that cannot run is a failed case, with its message
        return CaseResult(case, None, f"{type(e).__name__}: {e}")


def _t(data, device, dtype):
    return torch.tensor(data, device=device, dtype=dtype)


def _well_conditioned(m, n, device, dtype):
    A = torch.randn(m, n, dtype=torch.float64)
    U, _, Vh = torch.linalg.svd(A, full_matrices=False)
    s = torch.linspace(1.0, 2.0, min(m, n), dtype=torch.float64)
    return ((U * s) @ Vh).to(device=device, dtype=dtype)


# -- linear_solve: every selection -------------------------------------------------------------------------


@register_case("linear_solve/auto_square", layer="linear_solve")
def _auto_square(device, dtype):
    A, b = _well_conditioned(4, 4, device, dtype), torch.randn(4, device=device, dtype=dtype)
    return linear_solve, (A, b), (lambda A, b: torch.linalg.solve(A, b))


@register_case("linear_solve/exact_batched_multi_rhs", layer="linear_solve")
def _exact_batched(device, dtype):
    A = torch.stack([_well_conditioned(3, 3, device, dtype) for _ in range(2)])
    B = torch.randn(2, 3, 2, device=device, dtype=dtype)
    return (lambda A, B: linear_solve(A, B, selection="exact")), (A, B), (lambda A, B: torch.linalg.solve(A, B))


@register_case("linear_solve/min_norm_wide", layer="linear_solve")
def _min_norm_wide(device, dtype):
    A, b = _well_conditioned(2, 4, device, dtype), torch.randn(2, device=device, dtype=dtype)
    return ((lambda A, b: linear_solve(A, b, selection="min_norm")), (A, b),
            (lambda A, b: A.mT @ torch.linalg.solve(A @ A.mT, b)))  # A⁺b = Aᵀ(AAᵀ)⁻¹b


@register_case("linear_solve/least_squares_tall", layer="linear_solve")
def _least_squares_tall(device, dtype):
    A, b = _well_conditioned(5, 3, device, dtype), torch.randn(5, device=device, dtype=dtype)
    return ((lambda A, b: linear_solve(A, b, selection="least_squares")), (A, b),
            (lambda A, b: torch.linalg.solve(A.mT @ A, A.mT @ b)))  # the normal equations


@register_case("linear_solve/min_norm_rank_deficient_svd", layer="linear_solve")
def _rank_deficient(device, dtype):
    # A = U Vᵀ has rank 2 for every (U, V): perturbations keep the rank, so A⁺ is differentiable along them.
    # The rank tolerance sits far above float32 noise (≈1e-7) and far below the nonzero singular values.
    U = _well_conditioned(3, 2, device, dtype)
    V = _well_conditioned(4, 2, device, dtype)
    b = torch.randn(3, device=device, dtype=dtype)
    return (lambda U, V, b: linear_solve(U @ V.mT, b, selection="min_norm", solver="svd", rank_rtol=1e-4)), (U, V, b)


@register_case("linear_solve/nearest_weighted", layer="linear_solve")
def _nearest(device, dtype):
    A, b = _well_conditioned(2, 4, device, dtype), torch.randn(2, device=device, dtype=dtype)
    y0 = torch.randn(4, device=device, dtype=dtype)
    w = 0.5 + torch.rand(4, device=device, dtype=dtype)

    def reference(A, b, y0, w):  # y0 + W⁻¹Aᵀ(AW⁻¹Aᵀ)⁻¹(b − A y0)
        AWi = A / w
        return y0 + AWi.mT @ torch.linalg.solve(AWi @ A.mT, b - A @ y0)

    return (lambda A, b, y0, w: linear_solve(A, b, selection=Nearest(y0, w))), (A, b, y0, w), reference


@register_case("linear_solve/pinned_seed", layer="linear_solve")
def _pinned_seed(device, dtype):
    # the seed note: x = a₁y₁ + a₂y₂ with y₁ = f(x) = x / (2a₁), so y₂ = x / (2a₂)
    A, x = _t([[1.5, -2.0]], device, dtype), _t([3.0], device, dtype)

    def fn(A, x):
        return linear_solve(A, x, selection=Pinned([0], x / (2 * A[..., 0, 0])))

    return fn, (A, x), (lambda A, x: torch.cat([x / (2 * A[0, 0]), x / (2 * A[0, 1])]))


@register_case("linear_solve/pinned_values", layer="linear_solve")
def _pinned_values(device, dtype):
    A, b = _well_conditioned(2, 3, device, dtype), torch.randn(2, device=device, dtype=dtype)
    v = torch.randn(1, device=device, dtype=dtype)

    def reference(A, b, v):  # y = [A[:, :2]⁻¹ (b − A[:, 2] v); v]
        return torch.cat([torch.linalg.solve(A[:, :2], b - A[:, 2] * v), v])

    return (lambda A, b, v: linear_solve(A, b, selection=Pinned([2], v))), (A, b, v), reference


@register_case("ambiguity", layer="ambiguity")
def _ambiguity(device, dtype):
    A, g = _well_conditioned(2, 3, device, dtype), torch.randn(3, device=device, dtype=dtype)

    def reference(A, g):  # ‖(I − A⁺A) g‖ / ‖g‖ with A⁺A = Aᵀ(AAᵀ)⁻¹A
        p = g - A.mT @ torch.linalg.solve(A @ A.mT, A @ g)
        return p.norm() / g.norm()

    return ambiguity, (A, g), reference
