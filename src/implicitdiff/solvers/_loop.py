"""The one nonlinear loop, :func:`iterate`, shared by every nonlinear solver: tolerances, statuses,
the stopping rule, the freeze policy.

Every solver here works on a *flattened* iterate ``y`` of shape ``(*batch, n)``
(``batch = y0.shape[:batch_dims]``, ``n = prod(y0.shape[batch_dims:])``) and
contributes only a ``step``; this module owns what is common:

* **Stopping rule** (per element ``i``, norms over the non-batch dims)::

      ‖F(y_i)‖ ≤ atol + rtol · ‖F(y0_i)‖          rtol default: default_rtol(dtype)

  (for L-BFGS ``F`` is the gradient).  By default (``freeze=True``) a converged element is
  *frozen*: its state is never updated again (``torch.where``), so a batch costs as many
  iterations as its slowest element but every element stops on its own; ``freeze=False`` lets
  converged elements step on while the batch runs without masks (:func:`iterate`).
* **Statuses**: ``SUCCESS``; ``MAX_ITERATIONS`` when ``max_iter`` is spent;
  ``NONFINITE`` when an iterate or its residual holds NaN/Inf (the element is
  frozen at its last finite iterate, the others go on); ``DIVERGED`` when
  ``‖F‖ > 1e8 · ‖F(y0)‖`` (fixed-point type solvers); a status a step reports
  itself (Newton: ``SINGULAR`` Jacobian, ``BREAKDOWN`` of the line search).
  Solvers never raise on non-convergence: the caller applies the policy.
* **No per-iteration host sync where it costs**: statuses live in tensors; the loop reads
  "is anything still running?" only every ``check_every`` iterations (default 1 on CPU where
  reading is free, 8 on CUDA).  Where reading is free the loop runs *unmasked* while nothing
  needs a mask (one host read per iteration; one problem, ``batch_dims = 0``, is the case of
  a batch of one), and *masked* from the first iteration where something happened on.
* **One loop**: Picard is :func:`iterate` with :func:`fixed_point_step`; Anderson's lazy start is
  that step with a ``rate`` stop, then the mixing step resumed from there (``resume=``); Newton
  and Broyden bring their own steps; ``Unroll()`` runs Picard or Newton with autograd on
  (``differentiable=True``: no ``no_grad``, nothing detached, no step state updated in place).

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
from .._core.options import check_int, check_real
from .._core.residual import FixedPointResidual
from .._core.status import SolveInfo, Status
from .._core.validate import as_float_tensor, is_vmapped

__all__ = ["Options", "options", "Flat", "flatten_root", "iterate", "norm",
           "where", "single", "finite_probe", "LoopResult", "fixed_point_step"]

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


def options(y0, params, *, rtol, atol, max_iter, batch_dims, check_every, callback,
            differentiable: bool = False) -> Options:
    """Validate what every solver takes; raise :class:`InputError` naming the argument.

    ``differentiable``: keep ``params`` as given (autograd through the iterations, ``Unroll()``);
    otherwise ``y0`` and the top-level tensors of ``params`` are detached."""
    y0 = as_float_tensor("y0", y0).detach()
    if not isinstance(params, (tuple, list)):
        raise InputError(f"params must be a tuple of the extra arguments of F, got {type(params).__name__}; "
                         f"wrap a single tensor as (theta,)")
    if not differentiable:
        params = tuple(p.detach() if isinstance(p, torch.Tensor) else p for p in params)
    batch_dims = check_int("batch_dims", batch_dims, low=0, allow_none=False)
    if batch_dims > y0.dim():
        raise InputError(f"batch_dims={batch_dims} exceeds y0.ndim={y0.dim()} (y0 has shape {tuple(y0.shape)})")
    rtol = default_rtol(y0.dtype) if rtol is None else check_real("rtol", rtol, low=0.0)
    atol = check_real("atol", atol, low=0.0, allow_none=False)
    max_iter = check_int("max_iter", max_iter, low=0, allow_none=False)
    if check_every is None:
        check_every = 1 if y0.device.type == "cpu" else 8
    check_every = check_int("check_every", check_every, low=1, allow_none=False)
    if callback is not None and not callable(callback):
        raise InputError(f"callback must be callable as callback(iteration, y, residual_norms), got {callback!r}")
    batch_shape = y0.shape[:batch_dims]
    n = math.prod(y0.shape[batch_dims:])
    return Options(y0, params, batch_shape, n, rtol, atol, max_iter, check_every)


class Flat(NamedTuple):
    """The residual and what a solver needs of it on flattened iterates ``(*batch, n)``
    (:func:`flatten_root`): ``fun(y) = F(y, *params)``, the flattened ``y0`` and ``f = F(y0)``, the map
    ``tmap`` of a fixed-point residual ``F = T − id`` (a :class:`FixedPointResidual`; ``None`` for any
    other ``F``: :func:`fixed_point_step` then steps ``y ← T(y)``, one pass fewer than ``y + F(y)``), and
    ``record``, a recorder's ``record`` (:class:`~implicitdiff.implicit.speculation.Recorder`: it returns
    ``F(y)`` and keeps the evaluation for the caller's backward; :func:`iterate` calls it, with
    ``freeze=False``, for the step it predicts to be its last; ``None`` without a recorder)."""

    fun: Callable
    y: torch.Tensor
    f: torch.Tensor
    tmap: Optional[Callable] = None
    record: Optional[Callable] = None


def flatten_root(F: Callable, opts: Options, name: str = "F", recorder=None) -> Flat:
    """``F`` on flattened iterates (:class:`Flat`); checks once, at ``y0``, that ``F`` keeps ``y``'s shape
    and dtype."""
    if not callable(F):
        raise InputError(f"{name} must be a callable F(y, *params) -> tensor of y's shape, got {F!r}")
    shape, params = opts.y0.shape, opts.params
    flat = (*opts.batch_shape, opts.n)
    fixed = isinstance(F, FixedPointResidual)
    name = F.name if fixed else name                 # a fixed-point residual names its map
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
    if is_vmapped(f0):   # the loop reads its stopping test on the host, which vmap forbids
        raise InputError(f"{name} returned a tensor batched by torch.func.vmap, but this solver's loop reads its "
                         f"stopping test on the host, which vmap forbids (adjoint=Unroll() runs it under vmap): "
                         f"use the default adjoint=Implicit() under vmap, or batch the problem with batch_dims "
                         f"instead of vmap")
    T = F.map if fixed else None
    record = None if recorder is None else recorder.record
    if tuple(flat) == tuple(shape):                      # already flat (one batch dim): no reshapes
        def fun(y):
            return F(y, *params)
        tmap = None if T is None else lambda y: T(y, *params)
    else:
        def fun(y):
            return F(y.reshape(shape), *params).reshape(flat)
        tmap = None if T is None else lambda y: T(y.reshape(shape), *params).reshape(flat)
        if record is not None:
            record = lambda y, r=record: r(y.reshape(shape)).reshape(flat)  # noqa: E731
    return Flat(fun, opts.y0.reshape(flat), f0.reshape(flat), tmap, record)


def norm(f: torch.Tensor) -> torch.Tensor:
    """Per-element 2-norm of ``(*batch, n)`` -> ``(*batch,)``."""
    return torch.linalg.vector_norm(f, dim=-1)


def where(mask: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``torch.where`` with a batch-shaped ``mask`` broadcast over trailing dims."""
    mask = mask.reshape(mask.shape + (1,) * (new.dim() - mask.dim()))
    return torch.where(mask, new, old)


def single(opts: Options) -> bool:
    """Whether one problem (``batch_dims = 0``) has its statuses read on the host every iteration
    (``check_every = 1``, the CPU default).

    L-BFGS then runs its host-side loop, whose step may branch in Python on values it reads
    (:func:`~implicitdiff.solvers.lbfgs.lbfgs`); :func:`iterate` treats this case as a batch of one."""
    return len(opts.batch_shape) == 0 and opts.check_every == 1


def finite_probe(fn: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``fn`` where every entry of ``y`` is finite, NaN elsewhere; ``(*batch)``.

    ``y · 0`` is ``±0`` for a finite entry and NaN for ±Inf/NaN, so the sum adds exactly zero
    to ``fn`` or poisons it: one pass over ``y`` (``isfinite(y).all(-1)`` costs a 4× slower
    boolean reduction on CPU)."""
    return fn + (y * 0).sum(-1)


class LoopResult(NamedTuple):
    """The outcome of :func:`iterate`: the iterate ``y`` and ``f = F(y)`` (``(*batch, n)``), the step's
    state ``extra``, the statuses ``info``, the residual norms of every iteration (``trace=True``), and
    what a later call needs to go on from here (``resume=``): ``f0 = ‖F(y0)‖``, the iterations ``k``
    run, the norms ``rows`` of every iterate (kept by ``freeze=False`` and ``trace``), ``F`` at the
    iterate before ``y`` (``f_prev``; ``None`` after no step), whether it ended on the unmasked path, and
    whether it is known to have ended with every element stopped (``done``: nothing left to resume)."""

    y: torch.Tensor
    f: torch.Tensor
    extra: tuple
    info: SolveInfo
    trace: Optional[torch.Tensor]
    f0: Optional[torch.Tensor] = None
    k: int = 0
    rows: Optional[list] = None
    f_prev: Optional[torch.Tensor] = None
    unmasked: bool = False
    done: bool = False


Step = Callable[..., tuple]


def _first_converged(rows: list, tol: torch.Tensor) -> torch.Tensor:
    """Per element, the first row index ``j`` with ``rows[j] ≤ tol`` (``len(rows) − 1`` if none)."""
    if len(rows) == 1:
        return torch.zeros(tol.shape, dtype=torch.int64, device=tol.device)
    above = torch.stack(rows[:-1]) > tol                     # (k, *batch)
    return torch.cummin(above, 0)[0].sum(0)                  # leading rows above tol


def iterate(step: Step, y: torch.Tensor, f: torch.Tensor, extra: tuple, opts: Options, *,
            trace: bool = False, callback=None, unflatten: Callable = lambda y: y, divergence: bool = True,
            freeze: bool = True, rate: float = 0.0, record: Optional[Callable] = None,
            resume: Optional[LoopResult] = None) -> LoopResult:
    r"""The nonlinear loop: run ``step`` until every element has stopped or ``opts.max_iter`` iterations.

    ``step(k, y, f, extra, active) -> (y, f, extra, code)`` advances every element by one
    iteration (it may compute on all of them; the loop keeps ``y, f`` of stopped elements
    frozen).  ``y, f`` are ``(*batch, n)``; ``extra`` is the step's own state, passed back as
    returned: the loop does not freeze it, since a stopped element's state is never read again,
    so a step may update large state in place (elements must stay independent).  ``code`` is
    ``None`` or an int64 batch tensor, nonzero where the step itself failed with that
    :class:`Status` (such elements keep their previous ``y, f``).

    Each iteration takes one of two paths:

    * **unmasked** (where reading is free, ``check_every = 1``, the CPU default): every element
      steps, and one host read of ``max_i ‖F_i‖ / tol_i`` (with ``freeze`` or a step code also the
      min, ``Σ y`` — finite unless ``y`` holds NaN/Inf — and the code) tells that nothing happened
      that needs a mask: every iterate finite, none possibly diverged, no code and, with
      ``freeze``, none converged.  The new iterates are then taken as they are.  (With
      ``freeze=False`` and no code, the lean case of a DEQ's plain steps, a finite residual is
      taken for a finite iterate — as ``F = T(y) − y`` ensures: one reduction fewer per step.);
    * **masked**, from the first iteration where something happened on: the per-element
      bookkeeping with ``torch.where``, the "anything still running?" read every
      ``check_every`` iterations only (on a GPU up to ``check_every − 1`` idle steps run after the
      last element stopped; they change nothing).

    **The freeze policy.** ``freeze=True``: an element that has converged is frozen, its ``y``
    never updated again, so its result does not depend on the batch.  ``freeze=False`` (where the
    unmasked path applies and the problem is batched, without a ``callback``; elsewhere it is
    ``freeze=True``): while the batch steps unmasked a converged element keeps stepping — on a
    contraction it only gets more accurate — and the loop ends when every element meets the
    tolerance at once; its ``iterations`` count the steps it needed.  A NaN/Inf, a possible
    divergence or a step code hands the batch to the masked path, which freezes.

    **The speculative recording** (``freeze=False`` only): ``record`` is a
    :class:`~implicitdiff.implicit.speculation.Recorder`'s ``record`` on flat iterates
    (:attr:`Flat.record`); the step whose residual the last two predict (linear convergence,
    ``q_{k+1} ≈ q_k² / q_{k−1}``, ``q = max_i ‖F_i‖ / tol_i``) to meet the tolerance
    (``q ≤ 1.2``) is evaluated through it.  With ``record`` the step takes a sixth argument: the
    evaluation of ``F`` to use for this step (``record``, or ``None`` for its own).  (The rate of a
    contraction creeps up as its slowest mode takes over: the prediction errs low; a guess one step
    early costs a recorded evaluation, a miss one evaluation more in the backward.)

    ``rate = ρ > 0``: the loop also stops (running elements ``MAX_ITERATIONS``) when the worst
    running element's ``‖F_i‖ / tol_i`` shrank by less than ``ρ²`` over the last two iterations
    (checked every other one): a lazy start's plain steps (:func:`~.anderson.anderson`).

    ``resume``: the :class:`LoopResult` this call goes on from (``y, f`` its iterate, ``extra``
    the new step's state): the tolerances stay relative to its ``f0``, its trace rows come first,
    only the rest of ``opts.max_iter`` is spent; after an unmasked end the loop simply goes on,
    otherwise the elements it left ``MAX_ITERATIONS`` run on and the others keep their status.

    The statuses follow from the final state: ``SUCCESS`` (``‖F‖ ≤ atol + rtol ‖F(y0)‖``),
    ``MAX_ITERATIONS`` (still running), ``DIVERGED`` (``‖F‖ > 1e8 ‖F(y0)‖``, with ``divergence``),
    ``NONFINITE`` (NaN/Inf: the element keeps its last finite iterate), or the step's code.
    """
    k0 = 0 if resume is None else resume.k
    max_iter = max(opts.max_iter - k0, 0)
    eager = opts.check_every == 1                        # reading on the host is free every iteration (CPU)
    freeze = freeze or not (eager and len(opts.batch_shape) > 0 and callback is None)
    spec = None if freeze else record
    tiny = torch.finfo(y.dtype).tiny
    fn = norm(f)
    f0 = fn if resume is None else resume.f0
    tol = opts.atol + opts.rtol * f0                     # NaN when F(y0) is NaN: never "converged"
    limit = DIVERGENCE_FACTOR * torch.clamp(f0, min=tiny)
    itol = 1.0 / torch.clamp(tol, min=tiny)
    nonfinite0 = prior = None
    counted = 0                                          # unmasked iterations, not yet in ``iterations``
    probe = fn
    if resume is None:
        probe = finite_probe(fn, y)                      # NaN where y0 or F(y0) is not finite
        nonfinite0 = ~(probe < math.inf)
        active = ~nonfinite0 & (fn > tol)
    elif resume.unmasked:                                # the same loop, going on
        active, counted = fn > tol, k0
    else:                                                # the elements it left running run on
        prior = resume.info.status
        active = prior == int(Status.MAX_ITERATIONS)
    started = active
    iterations = torch.zeros(fn.shape, dtype=torch.int64, device=y.device) if prior is None \
        else resume.info.iterations
    rows = ([fn] if resume is None or resume.rows is None else list(resume.rows)) if trace or not freeze else None
    failed_code = None
    f_prev = None if resume is None else resume.f_prev
    fast = eager and max_iter > 0 and fn.numel() > 0 and prior is None
    bound = q = math.inf
    if fast:   # all finite (q < inf), some running (q > 1) and, with freeze, all running (min > 1)
        head = [*torch.aminmax(probe * itol)]
        if divergence:  # below this max_i ‖F_i‖ / tol_i none can have diverged
            head.append(torch.where(f0 > 0, limit * itol, math.inf).amin())
        lo, q, *bound = torch.stack(head).tolist()
        fast = 1.0 < q < math.inf and (lo > 1.0 or not freeze)
        bound = bound[0] if bound else math.inf
    q_prev, two_back = math.inf, q
    ran, done = 0, False
    for k in range(max_iter):
        if not fast and k % opts.check_every == 0 and not bool(active.any()):   # the host sync
            done = True
            break
        ran = k + 1
        if record is None:
            y_new, f_new, extra, code = step(k, y, f, extra, active)
        else:
            guess = spec is not None and fast and q * q <= 1.2 * q_prev < math.inf
            y_new, f_new, extra, code = step(k, y, f, extra, active, spec if guess else None)
        if fast:
            fn_new = norm(f_new)
            if freeze or code is not None:
                parts = [*torch.aminmax(fn_new * itol), y_new.sum()]
                if code is not None:
                    parts.append((code != 0).any().to(fn_new.dtype))
                lo, hi, ysum, *bad = torch.stack(parts).tolist()    # the one host read
            else:  # (the lean case) a finite residual stands for a finite iterate, as F = T(y) − y ensures
                lo = hi = float((fn_new * itol).amax())             # the one host read
                ysum, bad = 0.0, ()
            if hi < bound and math.isfinite(ysum) and not (bad and bad[0]) and (lo > 1.0 or not freeze):
                f_prev, y, f, fn = f, y_new, f_new, fn_new
                counted += 1
                if rows is not None:
                    rows.append(fn)
                if callback is not None:
                    callback(k0 + k + 1, unflatten(y), fn)
                if hi <= 1.0:                                        # (freeze=False) every element converged
                    done = True
                    break
                if rate > 0.0 and k % 2 == 1:                        # the worst element's two-step reduction
                    if hi > rate * rate * two_back:
                        break
                    two_back = hi
                q_prev, q = q, hi
                continue
            # something happened: the masked path from here on, starting with this iteration
            fast = False
            active = active if freeze else fn > tol                 # converged elements stop here
            iterations = iterations + (counted if freeze else
                                       torch.where(active, counted, _first_converged(rows, tol)))
            counted = 0
        fn_new = norm(f_new + y_new * 0)                   # ‖F‖, NaN where y or F holds NaN/Inf (y · 0 = ±0 or NaN)
        move = active & (fn_new < math.inf)
        if code is not None:
            failed = active & (code != 0)
            failed_code = torch.where(failed, code, 0 if failed_code is None else failed_code)
            move = move & ~failed
        go = fn_new > tol                                  # NaN: False
        if divergence:
            go = go & (fn_new <= limit)
        f_prev = f                                         # (read only for elements that moved)
        if eager and bool(move.all()):       # every element moves (typical until the first stops): no masks
            y, f, fn = y_new, f_new, fn_new
        else:
            y, f, fn = where(move, y_new, y), where(move, f_new, f), torch.where(move, fn_new, fn)
        iterations = iterations + active
        active = move & go
        if rows is not None:
            rows.append(fn)
        if callback is not None:
            callback(k0 + k + 1, unflatten(y), fn)
        if rate > 0.0 and k % 2 == 1:                      # the worst running element's two-step reduction
            worst = float(torch.where(active, fn * itol, 0.0).amax()) if fn.numel() else 0.0
            if worst > rate * rate * two_back:
                break
            two_back = worst
    if fast and done:                                    # (freeze=False) every element converged unmasked
        info = SolveInfo(torch.zeros(fn.shape, dtype=torch.int64, device=fn.device),  # SUCCESS
                         (fn / torch.clamp(f0, min=tiny)).detach(), _first_converged(rows, tol))
        return LoopResult(y, f, extra, info, torch.stack(rows) if trace else None, f0, k0 + ran, rows, f_prev,
                          True, True)
    if fast or counted:                                  # ended on the unmasked path
        if freeze:
            iterations = iterations + counted
        else:
            active = fn > tol
            iterations = iterations + torch.where(active, counted, _first_converged(rows, tol))
    # statuses from the final state: running → MAX_ITERATIONS; stopped → NONFINITE unless
    # ‖F‖ ≤ tol (SUCCESS), ‖F‖ > limit (DIVERGED) or the step's code; NaN/Inf at y0 → NONFINITE
    status = torch.where(active, int(Status.MAX_ITERATIONS), int(Status.NONFINITE))
    if divergence:
        status = torch.where(~active & (fn > limit), int(Status.DIVERGED), status)
    status = torch.where(~active & (fn <= tol), int(Status.SUCCESS), status)
    if failed_code is not None:
        status = torch.where(failed_code != 0, failed_code, status)
    if nonfinite0 is not None:
        status = torch.where(nonfinite0, int(Status.NONFINITE), status)
    if prior is not None:
        status = torch.where(started, status, prior)
    info = SolveInfo(status, (fn / torch.clamp(f0, min=tiny)).detach(), iterations)  # (no graph kept in info)
    return LoopResult(y, f, extra, info, torch.stack(rows) if trace else None, f0, k0 + ran, rows, f_prev, fast,
                      done)


def fixed_point_step(fun: Callable, beta: float, tmap: Optional[Callable], y: torch.Tensor,
                     f: torch.Tensor) -> tuple[Step, tuple]:
    """``(step, extra)``: the plain step ``y ← y + β F(y)`` of a fixed-point type solver for :func:`iterate`
    (taking the loop's speculative evaluation) and its state at ``y`` (``f = F(y)``).

    ``tmap``: the map ``T`` of a fixed-point residual ``F = T − id`` (:attr:`Flat.tmap`) — used at
    ``β = 1``, where the step is ``y ← T(y)`` with ``T(y) = y + F(y)`` carried over from the last step,
    one pass fewer than ``y + F(y)`` then ``T(y) − y``."""
    if tmap is None or beta != 1.0:
        def step(k, y, f, extra, active, ev=None):
            y_new = torch.add(y, f, alpha=beta)
            return y_new, (ev or fun)(y_new), extra, None
        return step, ()

    def step_map(k, y, f, extra, active, ev=None):
        y_new = extra[0]                                 # T(y)
        if ev is not None:
            f_new = ev(y_new)
            return y_new, f_new, (f_new + y_new,), None
        t_new = tmap(y_new)
        return y_new, t_new - y_new, (t_new,), None
    return step_map, (y + f,)
