"""The iteration loop shared by every nonlinear solver: tolerances, statuses, the stopping rule.

Every solver here works on a *flattened* iterate ``y`` of shape ``(*batch, n)``
(``batch = y0.shape[:batch_dims]``, ``n = prod(y0.shape[batch_dims:])``) and
contributes only a ``step``; this module owns what is common:

* **Stopping rule** (per element ``i``, norms over the non-batch dims)::

      ‖F(y_i)‖ ≤ atol + rtol · ‖F(y0_i)‖          rtol default: default_rtol(dtype)

  (for L-BFGS ``F`` is the gradient).  A converged element is *frozen*: its
  state is never updated again (``torch.where``), so a batch costs as many
  iterations as its slowest element but every element stops on its own.
* **Statuses**: ``SUCCESS``; ``MAX_ITERATIONS`` when ``max_iter`` is spent;
  ``NONFINITE`` when an iterate or its residual holds NaN/Inf (the element is
  frozen at its last finite iterate, the others go on); ``DIVERGED`` when
  ``‖F‖ > 1e8 · ‖F(y0)‖`` (fixed-point type solvers); a status a step reports
  itself (Newton: ``SINGULAR`` Jacobian, ``BREAKDOWN`` of the line search).
  Solvers never raise on non-convergence: the caller applies the policy.
* **No per-iteration host sync**: statuses live in tensors; the loop reads
  "is anything still running?" only every ``check_every`` iterations (default
  1 on CPU where reading is free, 8 on CUDA), so on a GPU up to
  ``check_every − 1`` idle steps run after the last element converged (they
  change nothing: every element is frozen).
* **Where reading is free** (``check_every = 1``) the loop also reads whether
  every element moved, and then skips the masks (the common case until the
  first element stops); and one problem (``batch_dims = 0``) runs a host-side
  loop: one read of ``‖F‖`` per iteration, statuses as Python values, and
  a step that may branch in Python (:func:`single`).  The outcome is that of
  the masked loop (``tests/solvers/test_loop.py`` checks it).

Per-iteration cost matters here: on CPU each small tensor operation costs a
few microseconds, as much as a (64, 256) elementwise pass, so the loop keeps
about a dozen of them per iteration and derives the statuses once, at the end,
from the final state.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import torch

from .._core.defaults import default_rtol
from .._core.errors import InputError
from .._core.status import SolveInfo, Status
from .._core.validate import as_float_tensor

__all__ = ["Options", "options", "int_option", "float_option", "flatten_root", "recording", "iterate", "norm",
           "where", "single", "finite_probe", "LoopResult", "Phase", "plain_phase", "lean", "phase_result", "fixed_map"]

# ‖F‖ grows past this multiple of ‖F(y0)‖: the element is declared DIVERGED
DIVERGENCE_FACTOR = 1e8


class Options(NamedTuple):
    """Validated common options of a solve."""

    y0: torch.Tensor          # detached y0, original shape
    params: tuple             # top-level tensors detached
    batch_shape: torch.Size
    n: int                    # per-element size, prod(y0.shape[batch_dims:])
    rtol: float
    atol: float
    max_iter: int
    check_every: int


def int_option(name: str, value, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise InputError(f"{name} must be an integer >= {lo}, got {value!r}")
    return int(value)


def float_option(name: str, value, lo: float = 0.0, strict: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a real number, got {value!r}") from None
    if not math.isfinite(v) or v < lo or (strict and v == lo):
        raise InputError(f"{name} must be a finite number {'>' if strict else '>='} {lo}, got {value!r}")
    return v


def options(y0, params, *, rtol, atol, max_iter, batch_dims, check_every, callback) -> Options:
    """Validate what every solver takes; raise :class:`InputError` naming the argument."""
    y0 = as_float_tensor("y0", y0).detach()
    if not isinstance(params, (tuple, list)):
        raise InputError(f"params must be a tuple of the extra arguments of F, got {type(params).__name__}; "
                         f"wrap a single tensor as (theta,)")
    params = tuple(p.detach() if isinstance(p, torch.Tensor) else p for p in params)
    batch_dims = int_option("batch_dims", batch_dims, 0)
    if batch_dims > y0.dim():
        raise InputError(f"batch_dims={batch_dims} exceeds y0.ndim={y0.dim()} (y0 has shape {tuple(y0.shape)})")
    rtol = default_rtol(y0.dtype) if rtol is None else float_option("rtol", rtol)
    atol = float_option("atol", atol)
    max_iter = int_option("max_iter", max_iter, 0)
    if check_every is None:
        check_every = 1 if y0.device.type == "cpu" else 8
    check_every = int_option("check_every", check_every, 1)
    if callback is not None and not callable(callback):
        raise InputError(f"callback must be callable as callback(iteration, y, residual_norms), got {callback!r}")
    batch_shape = y0.shape[:batch_dims]
    n = math.prod(y0.shape[batch_dims:])
    return Options(y0, params, batch_shape, n, rtol, atol, max_iter, check_every)


def flatten_root(F: Callable, opts: Options, name: str = "F") -> tuple[Callable, torch.Tensor, torch.Tensor]:
    """``(fun, y, f)``: the residual on flattened iterates ``(*batch, n) -> (*batch, n)``,
    the flattened ``y0`` and ``F(y0)``; checks once that ``F`` keeps ``y``'s shape and dtype."""
    if not callable(F):
        raise InputError(f"{name} must be a callable F(y, *params) -> tensor of y's shape, got {F!r}")
    shape, params = opts.y0.shape, opts.params
    flat = (*opts.batch_shape, opts.n)
    name = getattr(F, "name", None) or name          # a fixed-point residual names its map (the DEQ cell)
    try:
        f0 = F(opts.y0, *params)
    except (RuntimeError, TypeError) as e:            # torch's shape errors, a wrong signature: say where
        raise InputError(f"{name} failed at the starting point (y of shape {tuple(shape)}, {opts.y0.dtype}; "
                         f"{len(params)} parameter(s)) with {type(e).__name__}: {e}. Check that it takes "
                         f"(y, *params) and returns a tensor of y's shape") from e
    if not isinstance(f0, torch.Tensor):
        raise InputError(f"{name}(y, *params) must return a tensor, got {type(f0).__name__}")
    if f0.shape != shape:
        raise InputError(f"{name}(y, *params) must return a tensor of y's shape {tuple(shape)}, got "
                         f"{tuple(f0.shape)}; a root solver needs as many equations as unknowns")
    if f0.dtype != opts.y0.dtype or f0.device != opts.y0.device:
        raise InputError(f"{name}(y, *params) returned {f0.dtype} on {f0.device} for y of {opts.y0.dtype} on "
                         f"{opts.y0.device}; make {name} keep y's dtype and device")

    if tuple(flat) == tuple(shape):                      # already flat (one batch dim): no reshapes
        def fun(y):
            return F(y, *params)
    else:
        def fun(y):
            return F(y.reshape(shape), *params).reshape(flat)

    return fun, opts.y0.reshape(flat), f0.detach().reshape(flat)


def norm(f: torch.Tensor) -> torch.Tensor:
    """Per-element 2-norm of ``(*batch, n)`` -> ``(*batch,)``."""
    return torch.linalg.vector_norm(f, dim=-1)


def where(mask: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``torch.where`` with a batch-shaped ``mask`` broadcast over trailing dims."""
    mask = mask.reshape(mask.shape + (1,) * (new.dim() - mask.dim()))
    return torch.where(mask, new, old)


def single(opts: Options) -> bool:
    """Whether :func:`iterate` runs its unbatched fast path: one problem (``batch_dims = 0``),
    statuses read on the host every iteration (``check_every = 1``, the CPU default).

    A step may then branch in Python on values it reads (see :func:`iterate`)."""
    return len(opts.batch_shape) == 0 and opts.check_every == 1


def finite_probe(fn: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``fn`` where every entry of ``y`` is finite, NaN elsewhere; ``(*batch)``.

    ``y · 0`` is ``±0`` for a finite entry and NaN for ±Inf/NaN, so the sum adds exactly zero
    to ``fn`` or poisons it: one pass over ``y`` (``isfinite(y).all(-1)`` costs a 4× slower
    boolean reduction on CPU)."""
    return fn + (y * 0).sum(-1)


def recording(recorder, opts: Options) -> Optional[Callable]:
    """``recorder.record`` on flattened iterates, or ``None`` without a recorder.

    A recorder (:class:`~implicitdiff.implicit.speculation.Recorder`) returns ``F(y)`` and keeps
    the evaluation for the caller's backward; :func:`plain_phase` calls it for the step it predicts
    to be its last, and the solver returns ``recorder.take(y)`` in ``SolverResult.recording``."""
    if recorder is None:
        return None
    shape, flat = opts.y0.shape, (*opts.batch_shape, opts.n)
    if tuple(flat) == tuple(shape):
        return recorder.record
    return lambda y: recorder.record(y.reshape(shape)).reshape(flat)


def fixed_map(F: Callable, opts: Options) -> Optional[Callable]:
    """``F.map`` on flattened iterates — the map ``T`` of a fixed-point residual ``F = T − id``
    (:func:`~implicitdiff.fixed_point_residual`) — or ``None``: :func:`plain_phase` then steps
    ``y ← T(y)`` instead of ``y ← y + F(y)`` (one pass fewer per step)."""
    fn = getattr(F, "map", None)                          # a FixedPointResidual knows its map
    if fn is None:
        return None
    shape, params = opts.y0.shape, opts.params
    flat = (*opts.batch_shape, opts.n)
    if tuple(flat) == tuple(shape):
        return lambda y: fn(y, *params)
    return lambda y: fn(y.reshape(shape), *params).reshape(flat)


def lean(opts: Options, callback, freeze: bool) -> bool:
    """Whether a fixed-point type solver runs :func:`plain_phase`: ``freeze=False`` was asked, the
    problem is batched, read on the host every iteration (the CPU default), without a callback."""
    return (not freeze and len(opts.batch_shape) > 0 and opts.check_every == 1 and callback is None
            and math.prod(opts.batch_shape) > 0 and opts.n > 0)


class Phase(NamedTuple):
    """Where :func:`plain_phase` stopped: the iterate ``y``, ``f = F(y)``, the reference norms
    ``f0 = ‖F(y0)‖``, ``k`` iterations, the norms ``‖F(y_j)‖`` of every iterate (``k + 1`` rows,
    the last one that of ``y``), whether every element has converged (``done``), and ``F`` at
    the iterate before ``y`` (``None`` when ``k = 0``; Anderson seeds its history with it)."""

    y: torch.Tensor
    f: torch.Tensor
    f0: torch.Tensor
    k: int
    rows: list
    done: bool
    f_prev: Optional[torch.Tensor] = None


def plain_phase(fun: Callable, y: torch.Tensor, f: torch.Tensor, opts: Options, *, beta: float, budget: int,
                start_rate: float = 0.0, spec: Optional[Callable] = None, tmap: Optional[Callable] = None) -> Phase:
    r"""Plain steps ``y ← y + β F(y)`` for the whole batch, one host read per step, no masks.

    The cheap regime of a fixed-point iteration on a contraction (a DEQ cell): no element is
    frozen — one that has converged keeps iterating while others run, which on a contraction
    only makes it more accurate — so each step costs, beyond ``F``, the step itself, the
    per-element norm and one read of ``q = max_i ‖F_i‖ / tol_i`` (``tol_i = atol + rtol ‖F(y0_i)‖``).
    It stops with ``done`` when ``q ≤ 1`` (every element meets the tolerance), and otherwise
    hands over to the masked loop (:func:`iterate` with ``resume=``), which then owns the
    statuses:

    * at once, from the last accepted iterate, when ``q`` is NaN/Inf (an element's iterate
      or residual is not finite) or an element may have diverged (``‖F_i‖ > 1e8 ‖F(y0_i)‖``);
    * with ``start_rate = ρ > 0``, when ``q`` — the worst element's — shrank by less than ``ρ²``
      over the last two steps (checked every other step; no read beyond ``q``: an element slower
      than the others soon is the worst one);
    * after ``budget`` steps.

    ``spec``: see :func:`recording`; it replaces ``fun`` for the step whose ``q`` the last
    two predict (linear convergence, ``q_{k+1} ≈ q_k² / q_{k−1}``) to be at most 1.2, so
    that the final evaluation is usually the speculative one (the rate of a contraction creeps
    up as its slowest mode takes over: the prediction errs low, and a guess one step early costs
    a recorded evaluation — a fraction of one evaluation — where a miss would cost one evaluation more in the
    backward).
    """
    tiny = torch.finfo(y.dtype).tiny
    fn = norm(f)
    f0 = fn
    tol = torch.clamp(opts.atol + opts.rtol * f0, min=tiny)      # ‖F(y0)‖ = 0: converged at once
    itol = 1.0 / tol
    # below this q no element can have diverged (‖F_i‖ ≤ 1e8 ‖F(y0_i)‖ for all i).  An element with
    # F(y0) = 0 sits exactly at a fixed point and stays there; should it move, its q = ‖F_i‖ / tiny
    # exceeds the bound at once and the masked loop takes over
    bound = float(torch.where(f0 > 0, DIVERGENCE_FACTOR * f0 * itol, math.inf).amin())
    rows = [fn]
    q = float((fn * itol).max())                             # NaN: F(y0) not finite
    if q <= 1.0:
        return Phase(y, f, f0, 0, rows, True)
    if not q < bound:                                        # not finite (or y0 beyond the bound): masked loop
        return Phase(y, f, f0, 0, rows, False)
    q_prev = math.inf
    two_back = q
    tmap = tmap if beta == 1.0 else None
    t = y + f if tmap is not None else None                  # T(y): the next iterate
    t_new = None
    f_prev = None
    for k in range(budget):
        y_new = t if tmap is not None else torch.add(y, f, alpha=beta)
        guess = spec is not None and q * q <= 1.2 * q_prev < math.inf
        if guess:
            f_new = spec(y_new)
            if tmap is not None:
                t_new = f_new + y_new
        elif tmap is not None:
            t_new = tmap(y_new)
            f_new = t_new - y_new
        else:
            f_new = fun(y_new)
        fn_new = norm(f_new)
        q_new = float((fn_new * itol).amax())
        if not q_new < bound:  # NaN/Inf, or an element may have diverged: the masked loop redoes this step
            return Phase(y, f, f0, k, rows, False, f_prev)
        f_prev = f
        y, f, fn, t = y_new, f_new, fn_new, t_new
        rows.append(fn)
        if q_new <= 1.0:
            return Phase(y, f, f0, k + 1, rows, True, f_prev)
        if start_rate > 0.0 and k % 2 == 1:  # the two-step reduction of the worst element
            if q_new > start_rate * start_rate * two_back:
                return Phase(y, f, f0, k + 1, rows, False, f_prev)
            two_back = q_new
        q_prev, q = q, q_new
    return Phase(y, f, f0, budget, rows, False, f_prev)


def _first_converged(rows: list, tol: torch.Tensor) -> torch.Tensor:
    """Per element, the first row index ``j`` with ``rows[j] ≤ tol`` (``len(rows) − 1`` if none)."""
    if len(rows) == 1:
        return torch.zeros(tol.shape, dtype=torch.int64, device=tol.device)
    above = torch.stack(rows[:-1]) > tol                     # (k, *batch)
    return torch.cummin(above, 0)[0].sum(0)                  # leading rows above tol


def phase_result(phase: Phase, opts: Options, trace: bool) -> "LoopResult":
    """The :class:`LoopResult` of a :func:`plain_phase` that is ``done`` (every element converged)."""
    tiny = torch.finfo(phase.y.dtype).tiny
    tol = opts.atol + opts.rtol * phase.f0
    fn = phase.rows[-1]
    status = torch.zeros(fn.shape, dtype=torch.int64, device=fn.device)   # SUCCESS
    info = SolveInfo(status, fn / torch.clamp(phase.f0, min=tiny), _first_converged(phase.rows, tol))
    return LoopResult(phase.y, phase.f, (), info, torch.stack(phase.rows) if trace else None)


class LoopResult(NamedTuple):
    y: torch.Tensor           # (*batch, n)
    f: torch.Tensor           # (*batch, n)
    extra: tuple
    info: SolveInfo
    trace: Optional[torch.Tensor]


Step = Callable[[int, torch.Tensor, torch.Tensor, tuple, torch.Tensor],
                tuple[torch.Tensor, torch.Tensor, tuple, Optional[torch.Tensor]]]


def iterate(step: Step, y: torch.Tensor, f: torch.Tensor, extra: tuple, opts: Options, *,
            trace: bool = False, callback=None, unflatten: Callable = lambda y: y,
            divergence: bool = True, resume: Optional["Phase"] = None) -> LoopResult:
    """Run ``step`` until every element has stopped or ``opts.max_iter`` iterations.

    ``step(k, y, f, extra, active) -> (y, f, extra, code)`` advances every
    element by one iteration (it may compute on all of them; the loop keeps
    ``y, f`` of stopped elements frozen).  ``y, f`` are ``(*batch, n)``;
    ``extra`` is the step's own state (a tuple of tensors with leading batch
    dims), passed back as returned: the loop does not freeze it, since a
    stopped element's state is never read again, so a step may update large
    state in place (elements must stay independent: garbage in a stopped
    element must not reach the others).  ``code`` is ``None`` or an int64
    batch tensor, nonzero where the step itself failed with that
    :class:`Status` (such elements keep their previous ``y, f``).

    With :func:`single` (one problem, ``check_every = 1``) the bookkeeping runs
    on the host: one read of ``‖F‖`` (and of ``code``, which may then also be a
    Python ``int``) per iteration, no masking; the outcome is the same.

    ``resume``: the :class:`Phase` this loop takes over from (``y, f`` are its iterate): the
    tolerances stay relative to the phase's ``‖F(y0)‖``, its iterations count and its trace
    rows come first, and only the rest of ``opts.max_iter`` is spent.
    """
    if resume is not None:
        opts = opts._replace(max_iter=max(opts.max_iter - resume.k, 0))
    if single(opts):
        return _iterate_single(step, y, f, extra, opts, trace=trace, callback=callback, unflatten=unflatten,
                               divergence=divergence)
    tiny = torch.finfo(y.dtype).tiny
    fn = norm(f)
    f0 = fn if resume is None else resume.f0
    tol = opts.atol + opts.rtol * f0                     # NaN when F(y0) is NaN: never "converged"
    limit = DIVERGENCE_FACTOR * torch.clamp(f0, min=tiny)
    nonfinite0 = ~(finite_probe(fn, y) < math.inf)
    active = ~nonfinite0 & (fn > tol)
    if resume is None:
        iterations = torch.zeros(fn.shape, dtype=torch.int64, device=y.device)
    else:  # the phase's steps: all of them for an element still running, else those it needed
        iterations = torch.where(active, resume.k, _first_converged(resume.rows, tol))
    failed_code = None
    rows = None if not trace else [fn] if resume is None else list(resume.rows)
    # The loop keeps only ``active``; the statuses follow from the final state (see the end):
    # an element stops when it converges (‖F‖ ≤ tol), diverges (‖F‖ > limit: it moves there),
    # hits NaN/Inf (it stays at its last finite iterate, whose ‖F‖ lies in (tol, limit]) or its
    # step reports a code (kept in ``failed_code``).
    eager = opts.check_every == 1            # reading on the host is allowed every iteration (CPU default)
    counted = 0                              # iterations in which every element ran, not yet in ``iterations``
    # Fast path (eager only): while every element runs, one host read of min/max ‖F_i‖ / tol_i per
    # iteration decides that every element moved and goes on — finite (a NaN or Inf reaches the
    # max), not converged (min > 1), not diverged (max ≤ min_i limit_i / tol_i) — without the masks.
    # Otherwise the iteration takes the general path below, with ``active`` all True.
    fast = False
    if eager and opts.max_iter > 0 and fn.numel() > 0:   # (an empty batch: nothing runs)
        head = torch.stack([active.all().to(fn.dtype), (limit / tol).amin() if divergence else fn.new_tensor(math.inf),
                            tol.amin()]).tolist()         # NaN tol (F(y0) not finite): not all active
        fast = head[0] == 1.0 and head[2] > 0.0
        bound = head[1]
    for k in range(opts.max_iter):
        if not fast and k % opts.check_every == 0 and not bool(active.any()):   # the host sync
            break
        # a stopped element's extra state is never read again: the step's extra is kept as returned
        y_new, f_new, extra, code = step(k, y, f, extra, active)
        if fast and code is None:
            fn_new = norm(f_new)
            # the one host read; Σy is finite unless y holds NaN/Inf (or overflows: then the general path)
            lo, hi, ysum = torch.stack([*torch.aminmax(fn_new / tol), y_new.sum()]).tolist()
            if lo > 1.0 and hi < bound and math.isfinite(ysum):   # every element moved and still runs
                y, f, fn = y_new, f_new, fn_new
                counted += 1
                if rows is not None:
                    rows.append(fn)
                if callback is not None:
                    callback(k + 1, unflatten(y), fn)
                continue
        fast = False
        fn_new = norm(f_new + y_new * 0)                   # ‖F‖, NaN where y or F holds NaN/Inf (y · 0 = ±0 or NaN)
        move = active & (fn_new < math.inf)
        if code is not None:
            failed = active & (code != 0)
            failed_code = torch.where(failed, code, 0 if failed_code is None else failed_code)
            move = move & ~failed
        go = fn_new > tol                                  # NaN: False
        if divergence:
            go = go & (fn_new <= limit)
        if eager and bool(move.all()):       # every element moves (typical until the first stops): no masks
            y, f, fn = y_new, f_new, fn_new
            counted += 1                     # every element was active
            active = go
        else:
            y, f, fn = where(move, y_new, y), where(move, f_new, f), torch.where(move, fn_new, fn)
            iterations = iterations + active
            active = move & go
        if rows is not None:
            rows.append(fn)
        if callback is not None:
            callback(k + 1, unflatten(y), fn)
    # statuses from the final state: running → MAX_ITERATIONS; stopped → NONFINITE unless
    # ‖F‖ ≤ tol (SUCCESS), ‖F‖ > limit (DIVERGED) or the step's code; NaN/Inf at y0 → NONFINITE
    status = torch.where(active, int(Status.MAX_ITERATIONS), int(Status.NONFINITE))
    if divergence:
        status = torch.where(~active & (fn > limit), int(Status.DIVERGED), status)
    status = torch.where(~active & (fn <= tol), int(Status.SUCCESS), status)
    if failed_code is not None:
        status = torch.where(failed_code != 0, failed_code, status)
    status = torch.where(nonfinite0, int(Status.NONFINITE), status)
    residual = fn / torch.clamp(f0, min=tiny)
    info = SolveInfo(status, residual, iterations + counted if counted else iterations)
    return LoopResult(y, f, extra, info, torch.stack(rows) if rows is not None else None)


def _iterate_single(step, y, f, extra, opts, *, trace, callback, unflatten, divergence) -> LoopResult:
    """:func:`iterate` for one problem read on the host every iteration (same outcome, no masks)."""
    tiny = torch.finfo(y.dtype).tiny
    fn = norm(f)
    f0 = fn
    # the thresholds in the solve's dtype, as the batched loop compares them, read once
    probe, tol, limit = torch.stack([finite_probe(fn, y), opts.atol + opts.rtol * f0,
                                     DIVERGENCE_FACTOR * torch.clamp(f0, min=tiny)]).tolist()
    status = None                                         # None: running
    if not math.isfinite(probe):
        status = Status.NONFINITE
    elif probe <= tol:
        status = Status.SUCCESS
    iterations = 0
    running = torch.ones((), dtype=torch.bool, device=y.device)
    rows = [fn] if trace else None
    for k in range(opts.max_iter):
        if status is not None:
            break
        y_new, f_new, extra, code = step(k, y, f, extra, running)
        iterations += 1
        code = 0 if code is None else int(code)
        if code != 0:                                     # a failed step keeps the previous y, f
            status = code
        else:
            fn_new = norm(f_new + y_new * 0)              # ‖F‖, NaN where y or F holds NaN/Inf
            val = float(fn_new)                           # the one host read
            if not math.isfinite(val):
                status = Status.NONFINITE
            else:
                y, f, fn = y_new, f_new, fn_new
                if val <= tol:
                    status = Status.SUCCESS
                elif divergence and val > limit:
                    status = Status.DIVERGED
        if rows is not None:
            rows.append(fn)
        if callback is not None:
            callback(k + 1, unflatten(y), fn)
    dev = y.device
    status = torch.tensor(int(Status.MAX_ITERATIONS if status is None else status), dtype=torch.int64, device=dev)
    info = SolveInfo(status, fn / torch.clamp(f0, min=tiny), torch.tensor(iterations, dtype=torch.int64, device=dev))
    return LoopResult(y, f, extra, info, torch.stack(rows) if rows is not None else None)
