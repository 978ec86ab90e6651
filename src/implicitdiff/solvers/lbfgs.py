"""L-BFGS minimization, batched, with a per-element backtracking line search."""

from __future__ import annotations

import math
from array import array
from operator import mul
from typing import Callable

import torch

from .._core.engine import vjp as engine_vjp
from .._core.errors import InputError
from .._core.options import check_int
from .._core.validate import in_transform
from .._core.status import Status
from .._core.status import SolveInfo
from ._loop import LoopResult, finite_probe, iterate, norm, options, single
from .result import SolverResult

__all__ = ["lbfgs"]

_ARMIJO = 1e-4       # sufficient decrease constant c
_MIN_STEP = 1e-10    # line search gives up (BREAKDOWN) below this step length (relative to the first trial)
HISTORY = 10         # pairs kept by default (also argmin(compiled=True)'s default)
_BREAKDOWN = int(Status.BREAKDOWN)

# ----------------------------------------------------------------------------- the pairs, in compact form
# The inverse Hessian of L-BFGS from the pairs S = [s_1 … s_k], Y = [r_1 … r_k] (n × k, oldest first)
# and H₀ = h0 I is, in the compact form of Byrd, Nocedal & Schnabel (1994, Thm 2.2),
#
#     H = h0 I + [S  h0 Y] [[R⁻ᵀ(D + h0 YᵀY)R⁻¹, −R⁻ᵀ], [−R⁻¹, 0]] [Sᵀ; h0 Yᵀ]
#
# with R = triu(SᵀY) (R_ij = s_iᵀ r_j, i ≤ j) and D = diag(SᵀY); it equals the two-loop recursion.
# With a = Sᵀg, b = Yᵀg, q = R⁻¹ a and p = R⁻ᵀ((D + h0 YᵀY) q − h0 b):
#
#     H g = h0 g + S p − h0 Y q
#
# so one direction costs two products with the stored pairs and two m × m triangular solves, not
# the 4m vector operations of the two-loop.  Storage, per element (the batch flattened to nb):
#
# * SY (nb, 2m + 1, n): s in rows [0, m), r in rows [m, 2m), a ring — pair number c goes to slot
#   c mod m, overwriting the oldest; row 2m is scratch (a batched step writes the pair of an
#   element that keeps nothing there).  Unused rows are zero.
# * SS (2, nb, m, m) = [SᵀY, YᵀY] in *time* order, newest last, the unused (leading) positions
#   zero.  Time position t is ring slot (c + t) mod m, for c < m too (the unused positions are
#   then the zero slots c … m − 1), so a new pair drops position 0 and appends one row and column,
#   its inner products with the ring (one (2, n) @ (n, 2m) product); nothing is reordered.
# * RM (2, nb, m, m) = [R + I on the unused positions (invertible), D + h0 YᵀY], each contiguous:
#   LAPACK's batched triangular solve rounds a strided batch differently, and an element must
#   get the same iterates in any batch.  nh0 (nb, 1, 1) = −h0; c: pairs stored so far.


class _Tables:
    """Index and mask tables of a history of ``m`` pairs."""

    def __init__(self, m: int, dtype, device):
        t = torch.arange(m, device=device)
        rot = (t[:, None] + t[None, :]) % m          # rot[c mod m, t]: ring slot of time position t
        back = (t[None, :] - t[:, None]) % m         # back[c mod m, slot]: its time position
        self.perm = torch.cat([rot, rot + m], -1).unsqueeze(1)    # (m, 1, 2m): [S, Y] slots → time order
        self.inv = torch.cat([back, back + m], -1).unsqueeze(1)   # (m, 1, 2m): back to slots
        used = torch.arange(m + 1, device=device)[:, None]
        self.unused = torch.diag_embed((t[None, :] < m - used).to(dtype))   # [min(c, m)]: I on unused
        self.triu = torch.ones(m, m, dtype=dtype, device=device).triu()
        self.eye = torch.eye(m, dtype=dtype, device=device)


def _direction(g, SY, RM, nh0, perm, inv):
    """``d = −H g`` (compact form above); ``g`` (nb, 1, n) -> (nb, 1, n)."""
    m = RM.shape[-1]
    pairs = SY[:, :2 * m]
    ab = torch.take_along_dim(torch.bmm(g, pairs.mT), perm, -1).mT    # [Sᵀg; Yᵀg] (nb, 2m, 1), time order
    q = torch.linalg.solve_triangular(RM[0], ab[:, :m], upper=True)   # R⁻¹ a
    p = torch.linalg.solve_triangular(RM[0].mT, torch.baddbmm(ab[:, m:] * nh0, RM[1], q), upper=False)
    coef = torch.take_along_dim(torch.cat([p, q * nh0], 1).mT, inv, -1)   # [p, −h0 q] by ring slot
    return torch.baddbmm(g * nh0, coef, pairs, alpha=-1)               # −(h0 g + S p − h0 Y q)


def _appended(SS, SY, V, perm, unused, tab):
    """``(SS, RM, nh0)`` once the pair ``V = [s; r]`` (nb, 2, n) is in the ring (newest at time
    position m − 1 of ``perm``); time position 0 is dropped."""
    nb, m = V.shape[0], SS.shape[-1]
    Pt = torch.take_along_dim(torch.bmm(V, SY[:, :2 * m].mT), perm, -1)   # [sᵀS sᵀY; rᵀS rᵀY], time order
    rows = Pt[:, :, m:].transpose(0, 1)                             # [sᵀY, rᵀY] (2, nb, m): new last rows
    cols = Pt[:, 1].view(nb, 2, m)[:, :, :-1].transpose(0, 1)       # [Sᵀr, Yᵀr] (2, nb, m − 1): last columns
    SS = torch.cat([torch.cat([SS[:, :, 1:, 1:], cols.unsqueeze(-1)], -1), rows.unsqueeze(-2)], -2)
    sty, yty = SS[0], SS[1]
    nh0 = -(sty[:, -1:, -1:] / yty[:, -1:, -1:])                    # −sᵀr / rᵀr of the newest pair
    RM = torch.stack([torch.addcmul(unused, sty, tab.triu), torch.addcmul(sty * tab.eye, nh0, yty, value=-1)])
    return SS, RM, nh0


def _objective(f: Callable, shape, batch, nb: int, params, dtype):
    """``evaluate(y) -> (v, g)`` for flattened ``y`` (nb, n): values (nb,) and gradients (nb, n).

    One reverse pass of the autograd engine on a leaf copy of ``y`` (:func:`~implicitdiff._core.engine.vjp`:
    ``torch.autograd.grad`` without its per-call checks; cheaper than ``torch.func``);
    ``torch.func.grad_and_value`` when a ``torch.func`` transform is active (``requires_grad_``
    is refused there) or under inference mode.  The first call checks what ``f`` returns.
    """
    plain = not in_transform() and not torch.is_inference_mode_enabled()
    checked, one = [], []

    def check(v):
        if not isinstance(v, torch.Tensor) or v.shape != batch:
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise InputError(f"f(y, *params) must return one objective per batch element, shape {tuple(batch)} "
                             f"(batch_dims={len(batch)}), got {got}; sum or select the objective per element")
        if v.dtype != dtype:
            raise InputError(f"f(y, *params) returned {v.dtype} for y of {dtype}; make f keep y's dtype")
        checked.append(True)

    def total(yf):
        v = f(yf.reshape(shape), *params)
        return v.sum(), v

    value_and_grad = torch.func.grad_and_value(total, has_aux=True)

    def evaluate(yf):
        if plain:
            with torch.enable_grad():
                yy = yf.detach().requires_grad_()
                v = f(yy.reshape(shape), *params)
                if not checked:
                    check(v)
                g = None
                if v.requires_grad:                    # else f does not depend on y: ∇f = 0
                    total = v.sum() if batch else v
                    if not one:                        # the cotangent 1 of the objective, made once
                        one.append(torch.ones_like(total))
                    (g,) = engine_vjp(total, (yy,), one[0], retain_graph=False)
            return v.detach().reshape(nb), torch.zeros_like(yf) if g is None else g
        if not checked:
            with torch.no_grad():
                check(f(yf.reshape(shape), *params))
        g, (_, v) = value_and_grad(yf)
        return v.reshape(nb), g

    return evaluate


def lbfgs(f: Callable, y0: torch.Tensor, params: tuple = (), *, rtol=None, atol=0.0, max_iter: int = 200,
          batch_dims: int = 0, history: int = HISTORY, check_every=None, trace: bool = False,
          callback=None) -> SolverResult:
    """Minimize ``f(y, *params)`` by L-BFGS, batched, each element on its own.

    ``f`` returns one objective per batch element (shape ``y0.shape[:batch_dims]``;
    a scalar when ``batch_dims = 0``) and must not couple the elements.  The
    gradients ``∇f`` of every element come from one ``torch.autograd.grad`` of
    ``f(...).sum()`` (``torch.func.grad`` when called inside a ``torch.func``
    transform).  The direction ``d = −H ∇f`` uses the last ``history``
    pairs ``s = Δy, r = Δ∇f`` (compact representation of Byrd, Nocedal &
    Schnabel, equal to the two-loop recursion; ``H₀ = (sᵀr / rᵀr) I`` from the
    newest pair; the first direction is ``−∇f / ‖∇f‖``); a pair with
    ``sᵀr ≤ eps‖s‖‖r‖`` (no positive curvature) is not stored.  The trial
    ``y + α d`` (``α = 1`` first) is accepted on the Armijo condition
    ``f(y + αd) ≤ f(y) + c α ∇fᵀd`` (``c = 1e-4``) or, when ``f`` has stopped
    changing above rounding (``f(y + αd) ≤ f(y) + 1e4·eps·|f(y)|``), on the
    derivative form of it for a quadratic (Hager–Zhang's approximate Wolfe,
    ``∇f(y + αd)ᵀd ≤ (1 − 2c) |∇fᵀd|``), which lets L-BFGS reach gradient
    tolerances far below what ``f``'s rounding can resolve.  A rejected trial
    shrinks ``α`` by safeguarded quadratic interpolation (into ``[0.1α, 0.5α]``);
    every trial is one iteration, so each element backtracks on its own with no
    host sync.  Unbatched with ``check_every = 1`` (the CPU default), a loop of
    its own reads the decisions on the host instead: one sync per iteration
    for ``f``, ``‖∇f‖`` and every inner product the iteration needs (one
    product with the stored pairs), the ``history × history`` algebra on
    Python floats (double precision) — the same rules, iterates equal up to
    rounding, about ten tensor operations per iteration besides ``f``.

    Stopping rule, per element ``i`` (norms over the non-batch dims)::

        ‖∇f(y_i)‖ ≤ atol + rtol · ‖∇f(y0_i)‖        rtol default: 1e-10 float64, 1e-6 float32

    Args:
        f: objective, ``f(y, *params)`` -> tensor of the batch shape;
            differentiable by autograd.
        y0: starting point, ``(*batch, *event)``, float32/float64.
        params: tuple of extra arguments of ``f`` (used detached).
        rtol, atol: the stopping rule above.
        max_iter: iteration limit (one ``f`` and gradient evaluation each).
        batch_dims: leading dims of ``y0`` that index independent problems.
        history: number of stored pairs (``≥ 1``); memory ``2 · history · n`` per element.
        check_every, trace, callback: as in :func:`~implicitdiff.solvers.picard.picard`
            (with the gradient norm as the residual).

    Returns:
        :class:`SolverResult` ``(y, info, None, trace)``; ``info.residual`` is
        ``‖∇f(y)‖ / ‖∇f(y0)‖``.  Failure modes per element: ``MAX_ITERATIONS``,
        ``NONFINITE`` (the element keeps its last finite iterate; a trial whose
        ``y + ∇f`` overflows counts as non-finite and is backtracked),
        ``BREAKDOWN`` (no acceptable step before the step became too small to
        change ``y`` or ``α < 1e-10``: the gradient tolerance is below the
        attainable accuracy, or ``f`` is not smooth).
        An objective unbounded below shows as ``MAX_ITERATIONS`` or
        ``NONFINITE``.  Never raises on non-convergence; raises
        :class:`InputError` for malformed input.

    Example:
        >>> import torch
        >>> from implicitdiff.solvers.lbfgs import lbfgs
        >>> rosen = lambda y: (1 - y[0]) ** 2 + 100 * (y[1] - y[0] ** 2) ** 2
        >>> res = lbfgs(rosen, torch.tensor([-1.2, 1.0], dtype=torch.float64))
        >>> int(res.info.status), bool(torch.allclose(res.y, torch.ones(2, dtype=torch.float64)))
        (0, True)
    """
    opts = options(y0, params, rtol=rtol, atol=atol, max_iter=max_iter, batch_dims=batch_dims,
                   check_every=check_every, callback=callback)
    m = check_int("history", history, low=1, allow_none=False)
    if not callable(f):
        raise InputError(f"f must be a callable f(y, *params) -> objective per batch element, got {f!r}")
    shape, batch, n = opts.y0.shape, opts.batch_shape, opts.n
    nb = math.prod(batch)
    dt, dev = opts.y0.dtype, opts.y0.device
    evaluate = _objective(f, shape, batch, nb, opts.params, dt)
    with torch.no_grad():
        y = opts.y0.reshape(nb, n)
        v, g = evaluate(y)
        if single(opts):
            out = _single(evaluate, y.reshape(n), v, g.reshape(n), opts, m, trace=trace, callback=callback,
                          unflatten=lambda t: t.reshape(shape))
        else:
            tab = _Tables(m, dt, dev)
            memory = (y.new_zeros(nb, 2 * m + 1, n),                        # SY
                      y.new_zeros(2, nb, m, m),                             # SS
                      torch.stack([tab.unused[0].expand(nb, m, m), y.new_zeros(nb, m, m)]),   # RM: R = I, M = 0
                      (-1.0 / torch.clamp(norm(g), min=torch.finfo(dt).tiny)).reshape(nb, 1, 1))   # −h0
            run = _Batched(evaluate, nb, n, m, torch.finfo(dt).eps, tab)
            out = iterate(run.step, y.reshape(*batch, n), g.reshape(*batch, n), run.init(v, y, *memory), opts,
                          trace=trace, callback=callback, unflatten=lambda t: t.reshape(shape), divergence=False)
        # A non-finite objective at y0 is NONFINITE even where its gradient is finite (or zero): the
        # stopping rule reads the gradient only, and trials from a non-finite f(y0) are never compared.
        info = out.info
        info = info._replace(status=torch.where(torch.isfinite(v).reshape(info.status.shape), info.status,
                                                torch.full_like(info.status, int(Status.NONFINITE))))
    return SolverResult(out.y.reshape(shape), info, None, out.trace)


class _Batched:
    """Every element advances each iteration; the line-search decisions are masks (no host sync)."""

    def __init__(self, evaluate, nb, n, m, eps, tab):
        self.evaluate, self.nb, self.n, self.m, self.eps, self.tab = evaluate, nb, n, m, eps, tab
        self.offset = torch.tensor([0, m], device=tab.eye.device)

    def init(self, v, y, SY, SS, RM, nh0):
        nb = self.nb
        # (v, d, α, need a new direction, SY, SS, RM, −h0, c)
        return (v, torch.zeros_like(y), torch.ones_like(v), torch.ones(nb, dtype=torch.bool, device=y.device),
                SY, SS, RM, nh0, torch.zeros(nb, dtype=torch.int64, device=y.device))

    def step(self, k, y, g, state, active):
        nb, n, m, eps, tab = self.nb, self.n, self.m, self.eps, self.tab
        v, d, alpha, need, SY, SS, RM, nh0, c = state
        shape = y.shape
        y, g = y.reshape(nb, n), g.reshape(nb, n)
        slot = c % m
        # a new direction where the last trial was accepted (formed for all: cheap)
        d_new = _direction(g.unsqueeze(1), SY, RM, nh0, tab.perm[slot], tab.inv[slot]).squeeze(1)
        slope_new = (g * d_new).sum(-1)
        descent = (slope_new < 0) & (slope_new > -math.inf)
        d_new = torch.where(descent.unsqueeze(-1), d_new, g * nh0.view(nb, 1))   # safeguard: scaled −∇f
        d = torch.where(need.unsqueeze(-1), d_new, d)
        alpha = torch.where(need, 1.0, alpha)
        slope = (g * d).sum(-1)                                        # φ'(0) = ∇fᵀd < 0
        y_t = y + alpha.unsqueeze(-1) * d
        v_t, g_t = self.evaluate(y_t)
        # non-finite v, ∇f or y (or y + ∇f overflowing): the trial is not accepted
        finite = (v_t + ((g_t + y_t) * 0).sum(-1)).abs() < math.inf
        armijo = v_t <= v + _ARMIJO * alpha * slope
        flat_f = v_t <= v + 1e4 * eps * v.abs()
        approx_wolfe = flat_f & ((g_t * d).sum(-1) <= (1 - 2 * _ARMIJO) * slope.abs())
        accept = finite & (armijo | approx_wolfe)
        # quadratic through φ(0), φ'(0), φ(α): minimizer t* = −φ'(0) α² / (2 (φ(α) − φ(0) − φ'(0) α))
        t_star = -slope * alpha * alpha / (2 * (v_t - v - slope * alpha))
        t_star = torch.where((t_star > 0) & (t_star < math.inf), t_star, 0.1 * alpha)
        shrunk = torch.minimum(torch.maximum(t_star, 0.1 * alpha), 0.5 * alpha)
        # stagnation: the next trial could not move y (or α is negligible), or an accepted
        # step left y unchanged — ∇f sits at its rounding floor
        tiny_step = (y + shrunk.unsqueeze(-1) * d == y).all(-1) | (shrunk < _MIN_STEP)
        stalled = (~accept & tiny_step) | (accept & (y_t == y).all(-1))
        code = torch.where(stalled, _BREAKDOWN, 0)
        # store the pair (s, r) of an accepted step with positive curvature sᵀr > eps ‖s‖ ‖r‖
        V = torch.stack([alpha.unsqueeze(-1) * d, g_t - g], 1)        # (nb, 2, n)
        Q = torch.bmm(V, V.mT)
        curv = accept & (Q[:, 0, 1] > eps * Q[:, 0, 0].sqrt() * Q[:, 1, 1].sqrt())   # NaN: False
        rows = torch.where(curv.unsqueeze(-1), slot.unsqueeze(-1) + self.offset, 2 * m)   # else scratch row 2m
        SY.scatter_(1, rows.unsqueeze(-1).expand(nb, 2, n), V)
        c = c + curv
        SS_new, RM_new, nh0_new = _appended(SS, SY, V, tab.perm[c % m], tab.unused[torch.clamp(c, max=m)], tab)
        SS = torch.where(curv.view(nb, 1, 1), SS_new, SS)
        RM = torch.where(curv.view(nb, 1, 1), RM_new, RM)
        nh0 = torch.where(curv.view(nb, 1, 1), nh0_new, nh0)
        alpha = torch.where(accept, alpha, shrunk)
        y_next, g_next = torch.where(accept.unsqueeze(-1), y_t, y), torch.where(accept.unsqueeze(-1), g_t, g)
        v_next = torch.where(accept, v_t, v)
        return y_next.reshape(shape), g_next.reshape(shape), (v_next, d, alpha, accept, SY, SS, RM, nh0, c), \
            code.reshape(shape[:-1])




# ----------------------------------------------------------------------------- one problem, read on the host
# One problem on the CPU (:func:`~._loop.single`) is bound by the count of small tensor operations, not by
# arithmetic: its own loop keeps about ten per iteration besides f.  One buffer Z (2m + 4, n) holds the ring
# (s in rows [0, m), r in rows [m, 2m)) and the rows [d, r, g_t, Δ = y_t − y] of the trial; one product
# Z[2m:] Zᵀ gives every inner product an iteration needs (the new pair's with itself and the ring, ∇fᵀd, the
# new gradient's with the ring), read with f(y_t) and ‖∇f(y_t)‖ in one host sync.  The m × m algebra of the
# compact form runs on Python floats (double precision), in time order; the direction is one product
# d = −h0 g + Zᵀ coef.

def _solve_upper(R, b):
    """``x`` with ``R x = b``, ``R[i][j] = s_iᵀ r_j`` (``i ≤ j``) in time order (lists of floats)."""
    x = []                                      # x[i:], built from the back
    for i in range(len(b) - 1, -1, -1):
        Ri = R[i]
        x.insert(0, (b[i] - sum(map(mul, Ri[i + 1:], x))) / Ri[i])
    return x


def _solve_lower_t(R, b):
    """``x`` with ``Rᵀ x = b``."""
    x = []
    for i, col in enumerate(zip(*R)):          # column i of R: R[j][i]
        x.append((b[i] - sum(map(mul, col[:i], x))) / col[i])
    return x


def _single(evaluate, y, v, g, opts, m, *, trace, callback, unflatten) -> LoopResult:
    """The L-BFGS iteration of :func:`lbfgs` for one problem, decisions on the host (same rules as
    :class:`_Batched`, the same iterates up to rounding); returns the loop's :class:`LoopResult`."""
    n, dt, dev = y.shape[0], y.dtype, y.device
    eps, tiny = torch.finfo(dt).eps, torch.finfo(dt).tiny
    fn = norm(g)
    f0 = fn
    probe, tol, v = torch.stack([finite_probe(fn, y), opts.atol + opts.rtol * f0, v.reshape(())]).tolist()
    status = None
    if not math.isfinite(probe):
        status = Status.NONFINITE
    elif probe <= tol:
        status = Status.SUCCESS
    Z = y.new_zeros(2 * m + 4, n)
    ring = Z[:2 * m]
    d_row, r_row, g_row, dy_row = Z[2 * m], Z[2 * m + 1], Z[2 * m + 2], Z[2 * m + 3]
    slots, SR, YR = [], [], []                  # time order: ring slots, s_iᵀr_j, r_iᵀr_j
    h0 = 1.0 / max(probe, tiny) if math.isfinite(probe) else 1.0
    gg = probe * probe if math.isfinite(probe) else 0.0
    torch.mul(g, -h0, out=d_row)                # first direction −∇f / ‖∇f‖
    slope, alpha, c = -h0 * gg, 1.0, 0
    rows = [fn] if trace else None
    iterations = 0
    for k in range(opts.max_iter):
        if status is not None:
            break
        iterations += 1
        y_t = torch.add(y, d_row, alpha=alpha)
        v_t, g_t = evaluate(y_t.unsqueeze(0))
        g_t = g_t.view(n)
        torch.sub(g_t, g, out=r_row)
        g_row.copy_(g_t)
        torch.sub(y_t, y, out=dy_row)
        fn_t = norm(g_t)
        vals = torch.cat([v_t.view(1), fn_t.view(1), torch.mm(Z[2 * m:], Z.T).view(-1)]).tolist()
        v_t, gn, B = vals[0], vals[1], vals[2:]
        w = 2 * m + 4
        dd, dr, dg, dydy = B[2 * m], B[2 * m + 1], B[2 * m + 2], B[3 * w + 2 * m + 3]
        finite = math.isfinite(v_t) and math.isfinite(gn) and math.isfinite(dydy)
        armijo = v_t <= v + _ARMIJO * alpha * slope
        approx_wolfe = v_t <= v + 1e4 * eps * abs(v) and dg <= (1 - 2 * _ARMIJO) * abs(slope)
        if finite and (armijo or approx_wolfe):
            if dydy == 0 and bool((y_t == y).all()):          # y did not move: stalled
                status = _BREAKDOWN
            else:
                ss, sr, rr = alpha * alpha * dd, alpha * dr, B[w + 2 * m + 1]
                # the new gradient against the ring, by time order (before the new pair goes in)
                a = [B[2 * w + i] for i in slots]
                b = [B[2 * w + m + i] for i in slots]
                if sr > eps * math.sqrt(ss) * math.sqrt(rr):   # positive curvature: store (s, r)
                    slot = c % m
                    torch.mul(d_row, alpha, out=ring[slot])
                    ring[m + slot].copy_(r_row)
                    col = [B[w + i] for i in slots]           # s_iᵀ r_new
                    ycol = [B[w + m + i] for i in slots]      # r_iᵀ r_new
                    if len(slots) == m:                       # the oldest pair leaves
                        slots, col, ycol, a, b = slots[1:], col[1:], ycol[1:], a[1:], b[1:]
                        SR = [row[1:] for row in SR[1:]]
                        YR = [row[1:] for row in YR[1:]]
                    SR = [row + [x] for row, x in zip(SR, col)] + [[0.0] * len(col) + [sr]]
                    YR = [row + [x] for row, x in zip(YR, ycol)] + [ycol + [rr]]
                    slots = slots + [slot]
                    a, b = a + [alpha * dg], b + [B[w + 2 * m + 2]]
                    h0, c = sr / rr, c + 1
                y, g, v, fn, gg = y_t, g_t, v_t, fn_t, B[2 * w + 2 * m + 2]
                if gn <= tol:
                    status = Status.SUCCESS
                else:                                         # the next direction d = −H g
                    slope = _direction_host(Z, g, a, b, slots, SR, YR, h0, gg, m, d_row)
                    if not -math.inf < slope < 0:             # safeguard: scaled −∇f
                        torch.mul(g, -h0, out=d_row)
                        slope = -h0 * gg
                    alpha = 1.0
        else:
            # quadratic through φ(0), φ'(0), φ(α) (see the batched step), into [0.1α, 0.5α]
            den = 2 * (v_t - v - slope * alpha) if finite else math.nan
            t_star = -slope * alpha * alpha / den if den != 0 else math.nan
            if not (t_star > 0 and t_star < math.inf):
                t_star = 0.1 * alpha
            alpha = min(max(t_star, 0.1 * alpha), 0.5 * alpha)
            if alpha < _MIN_STEP or bool((y + alpha * d_row == y).all()):
                status = _BREAKDOWN
        if rows is not None:
            rows.append(fn)
        if callback is not None:
            callback(k + 1, unflatten(y), fn)
    status = torch.tensor(int(Status.MAX_ITERATIONS if status is None else status), dtype=torch.int64, device=dev)
    info = SolveInfo(status, fn / torch.clamp(f0, min=tiny), torch.tensor(iterations, dtype=torch.int64, device=dev))
    return LoopResult(y, g, (), info, torch.stack(rows) if rows is not None else None)


def _direction_host(Z, g, a, b, slots, SR, YR, h0, gg, m, out) -> float:
    """``out = −H g`` by the compact form (time order; ``a = Sᵀg``, ``b = Yᵀg``); returns ``gᵀd``."""
    if not slots:
        torch.mul(g, -h0, out=out)
        return -h0 * gg
    q = _solve_upper(SR, a)                                            # R⁻¹ a
    wv = [SR[i][i] * qi + h0 * (sum(map(mul, YR[i], q)) - bi) for i, (qi, bi) in enumerate(zip(q, b))]
    p = _solve_lower_t(SR, wv)                                         # R⁻ᵀ((D + h0 YᵀY) q − h0 b)
    coef = [0.0] * (2 * m)
    for i, s in enumerate(slots):
        coef[s], coef[m + s] = -p[i], h0 * q[i]
    # the coefficients as a tensor: frombuffer on an array of doubles (torch.tensor of a list costs 20× more)
    coef = torch.frombuffer(array("d", coef), dtype=torch.float64).to(dtype=g.dtype, device=g.device)
    torch.addmv(g, Z[:2 * m].T, coef, beta=-h0, out=out)
    return -h0 * gg - sum(map(mul, p, a)) + h0 * sum(map(mul, q, b))
