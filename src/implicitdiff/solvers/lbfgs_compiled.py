"""``argmin(..., compiled=True)``: L-BFGS and its adjoint with each iteration one compiled call.

A small problem on the CPU is bound by per-operation overhead, not arithmetic: an eager L-BFGS
iteration is an autograd evaluation of ``f`` and ``∇f`` plus a few dozen small tensor operations,
and the eager adjoint a few more per conjugate-gradient step.  This path traces the whole
iteration once and compiles it with Inductor
(:func:`~implicitdiff._core.torch_private.inductor_compile`: no dynamo guards per call,
matrix-vector products kept as BLAS calls), so that an iteration is one call and one host read:

* the forward step (:func:`_lbfgs_step`): the trial ``y + αd``, ``f`` and ``∇f`` there
  (``torch.func.grad_and_value``), the acceptance test of :func:`~.lbfgs.lbfgs` (Armijo, or the
  approximate Wolfe condition once ``f`` is flat to rounding; a non-finite trial is rejected),
  the new pair (stored when ``sᵀr > eps‖s‖‖r‖``) and the next direction by the two-loop
  recursion on a ring of ``history`` pairs kept in time order (an empty slot has ``ρ = 0`` and
  adds nothing), or the shrunk step of a rejected trial (the same safeguarded quadratic
  interpolation).  The rules are those of the eager solver; the iterates agree up to rounding
  (the two-loop recursion instead of the compact form).
* the adjoint (:func:`compiled_adjoint`): conjugate gradients on ``∇²f u = ȳ`` with each step
  (one Hessian-vector product, reverse over reverse) compiled, stopping at
  ``‖r‖ ≤ max(rtol‖ȳ‖, atol)`` (the rule of every adjoint solve); then one compiled mixed product
  ``θ̄ = −∂_θ(∇_y f · u)``.  As the
  eager Krylov solvers do, ``ȳ`` is divided by a power of two near its largest entry (exact) and
  the gradients multiplied back, so that a tiny or huge ``ȳ`` neither underflows ``rᵀr`` nor
  overflows it; a non-finite ``ȳ`` is ``NONFINITE`` before the first step, as is a NaN/Inf
  Hessian-vector product; ``pᵀHp ≤ 0`` is ``BREAKDOWN``, and so are iterates that overflow while
  ``pᵀHp`` is finite (a singular ``H``, whose flat direction CG divides by a vanishing curvature).

What it needs: one problem (``batch_dims = 0``) on the CPU, outside ``torch.func`` transforms,
``params`` all tensors (of ``y0``'s dtype, without forward-mode tangents), and an ``f`` that
Inductor can trace (no Python branching on tensor values: that raises
:class:`~implicitdiff.InputError`).  Tensors ``f`` closes over are constants of the compiled code
(a name rebound later is not seen): pass what changes as ``params``.  Each compiled function is
cached on ``f`` (by equality, so a bound method is found again: define ``f`` once, as a new lambda
per call compiles again; an unhashable ``f`` by identity), ``y``'s shape, the shapes, strides and
dtypes of the tensors it takes, and which parameters need gradients; another shape or dtype
compiles again (seconds); the cache keeps the last :data:`CACHE_SIZE`.  ``y0`` and the parameters
are made contiguous first (a copy where they are not): a compiled call asserts the strides it was
traced with, and the trace's examples are contiguous copies of a strided or expanded tensor, so a
layout never compiles again and a view (``a[::2]``, ``a.expand(n)``) is taken as its values.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable

import torch

from .._core.errors import InputError
from .._core.status import SolveInfo, Status
from .._core.torch_private import inductor_compile
from ..linalg.krylov._common import _pow2_scale
from .lbfgs import _ARMIJO, _MIN_STEP, _objective
from .result import SolverResult

__all__ = ["compiled_lbfgs", "compiled_adjoint", "CACHE_SIZE"]

#: compiled functions kept (least recently used dropped)
CACHE_SIZE = 16
_CACHE: OrderedDict = OrderedDict()


class _Identity:
    """An unhashable ``f`` (an instance of a non-frozen dataclass) in a cache key, by identity and by the
    identity of its attributes at the call: the key holds ``f`` (its id is not reused by another object
    while the entry is cached), and an attribute rebound since (``f.lam = 3.0``) compiles again — the
    compiled code holds the old value as a constant."""
    __slots__ = ("f", "fields")

    def __init__(self, f):
        self.f = f
        self.fields = tuple(getattr(f, "__dict__", {}).values())

    def __hash__(self):
        return id(self.f)

    def __eq__(self, other):
        return (isinstance(other, _Identity) and other.f is self.f and len(other.fields) == len(self.fields)
                and all(a is b for a, b in zip(self.fields, other.fields)))


def _by_equality_or_identity(f: Callable):
    try:
        hash(f)
    except TypeError:
        return _Identity(f)
    return f


def _compiled(kind: str, f: Callable, build: Callable, examples: tuple, extra=()) -> Callable:
    """The compiled ``build()`` for ``examples``, cached on ``(kind, f, extra)`` and the examples' shapes,
    strides, dtypes and devices (a compiled call asserts its inputs' strides); ``extra`` holds what
    the examples do not show, such as ``y``'s shape (the compiled code sees ``y`` flat)."""
    layouts = tuple((tuple(a.shape), a.stride(), a.dtype, a.device) for a in examples)
    key = (kind, _by_equality_or_identity(f), extra) + layouts
    fn = _CACHE.get(key)
    if fn is None:
        try:
            fn = inductor_compile(build(), examples)
        except Exception as err:  # data-dependent control flow, an op Inductor cannot trace, ...
            raise InputError(f"argmin(compiled=True) could not compile f: {type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''}; use compiled=False (the eager "
                             f"path), or write f without Python branching on tensor values") from err
        _CACHE[key] = fn
        if len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
    return fn


def _contiguous(tensors: tuple) -> tuple:
    """The layout every compiled call takes (module docstring)."""
    return tuple(t.contiguous() for t in tensors)


def _lbfgs_step(f: Callable, shape, m: int, eps: float) -> Callable:
    value_and_grad = torch.func.grad_and_value(lambda yf, *params: f(yf.reshape(shape), *params))

    def step(y, g, v, d, alpha, S, Y, rho, h0, *params):
        slope = g @ d                                                   # φ'(0) = ∇fᵀd < 0
        y_t = y + alpha * d
        g_t, v_t = value_and_grad(y_t, *params)
        finite = (v_t + ((g_t + y_t) * 0).sum()).abs() < math.inf
        armijo = v_t <= v + _ARMIJO * alpha * slope
        approx_wolfe = (v_t <= v + 1e4 * eps * v.abs()) & ((g_t @ d) <= (1 - 2 * _ARMIJO) * slope.abs())
        accept = finite & (armijo | approx_wolfe)
        s, r = alpha * d, g_t - g
        sr, ss, rr = s @ r, s @ s, r @ r
        curv = accept & (sr > eps * ss.sqrt() * rr.sqrt())
        S = torch.where(curv, torch.cat([S[1:], s[None]]), S)          # the ring, oldest first
        Y = torch.where(curv, torch.cat([Y[1:], r[None]]), Y)
        rho = torch.where(curv, torch.cat([rho[1:], (1 / sr)[None]]), rho)
        h0 = torch.where(curv, sr / rr, h0)
        q, a = g_t, [None] * m                                          # two-loop: d = −H ∇f(y_t)
        for i in range(m - 1, -1, -1):
            a[i] = rho[i] * (S[i] @ q)
            q = q - a[i] * Y[i]
        q = h0 * q
        for i in range(m):
            q = q + (a[i] - rho[i] * (Y[i] @ q)) * S[i]
        slope_new = -(g_t @ q)
        d_new = torch.where((slope_new < 0) & (slope_new > -math.inf), -q, -h0 * g_t)   # safeguard
        # a rejected trial: quadratic through φ(0), φ'(0), φ(α), into [0.1α, 0.5α]
        t_star = -slope * alpha * alpha / (2 * (v_t - v - slope * alpha))
        t_star = torch.where((t_star > 0) & (t_star < math.inf), t_star, 0.1 * alpha)
        shrunk = torch.minimum(torch.maximum(t_star, 0.1 * alpha), 0.5 * alpha)
        stalled = torch.where(accept, (y_t == y).all(), (shrunk < _MIN_STEP) | (y + shrunk * d == y).all())
        read = torch.stack([accept.to(y.dtype), stalled.to(y.dtype), torch.linalg.vector_norm(g_t)])
        return (torch.where(accept, y_t, y), torch.where(accept, g_t, g), torch.where(accept, v_t, v),
                torch.where(accept, d_new, d), torch.where(accept, 1.0, shrunk), S, Y, rho, h0, read)

    return step


def compiled_lbfgs(f: Callable, y0: torch.Tensor, params: tuple, *, rtol: float, atol: float, max_iter: int,
                   history: int) -> SolverResult:
    """:func:`~.lbfgs.lbfgs` on one problem, each iteration one compiled call (module docstring);
    ``y0`` and ``params`` detached tensors on the CPU. ``info.residual`` is ``‖∇f(y)‖ / ‖∇f(y0)‖``."""
    shape, n, dt, m = y0.shape, y0.numel(), y0.dtype, history
    y, params = y0.reshape(n).contiguous(), _contiguous(params)
    with torch.no_grad():
        v, g = _objective(f, shape, torch.Size(), 1, params, dt)(y.unsqueeze(0))   # checks what f returns
        v, g = v.reshape(()), g.reshape(n)
        gn0 = torch.linalg.vector_norm(g)
        gn0_f, v_f = torch.stack([gn0, v]).tolist()
        status = None
        tol = atol + rtol * gn0_f
        if not (math.isfinite(gn0_f) and math.isfinite(v_f)):
            status = Status.NONFINITE
        elif gn0_f <= tol:
            status = Status.SUCCESS
        zeros = y.new_zeros(m, n)
        state = (y, g, v, -g / gn0, torch.ones((), dtype=dt), zeros, zeros.clone(), y.new_zeros(m), 1 / gn0)
        step = _compiled("lbfgs", f, lambda: _lbfgs_step(f, shape, m, torch.finfo(dt).eps), state + params,
                          (m, tuple(shape))) \
            if status is None else None
        iterations, gn = 0, gn0_f
        while status is None and iterations < max_iter:
            iterations += 1
            *state, read = step(*state, *params)
            accepted, stalled, gn_t = read.tolist()
            if accepted:
                gn = gn_t
            if stalled:
                status = Status.BREAKDOWN
            elif accepted and gn <= tol:
                status = Status.SUCCESS
        info = SolveInfo(torch.tensor(int(Status.MAX_ITERATIONS if status is None else status)),
                         torch.tensor(gn / max(gn0_f, torch.finfo(dt).tiny), dtype=dt), torch.tensor(iterations))
    return SolverResult(state[0].reshape(shape), info, None, None)


def _cg_step(f: Callable, shape) -> Callable:
    grad = torch.func.grad(lambda yf, *params: f(yf.reshape(shape), *params))

    def step(y, x, r, p, rs, *params):
        hp = torch.func.grad(lambda yy: grad(yy, *params) @ p)(y)        # ∇²f p
        php = p @ hp
        a = rs / php
        x, r = x + a * p, r - a * hp
        rs_new = r @ r
        return x, r, r + (rs_new / rs) * p, rs_new, torch.stack([rs_new, php])

    return step


def _mixed(f: Callable, shape, which: tuple) -> Callable:
    def mixed(y, u, *params):
        def along(*chosen):
            full = list(params)
            for i, c in zip(which, chosen):
                full[i] = c
            return torch.func.grad(lambda yf: f(yf.reshape(shape), *full))(y) @ u
        return tuple(-t for t in torch.func.grad(along, argnums=tuple(range(len(which))))(*(params[i] for i in which)))

    return mixed


def compiled_adjoint(f: Callable, y: torch.Tensor, params: tuple, gy: torch.Tensor, which: tuple, *, rtol: float,
                     atol: float, max_iter: int) -> tuple:
    """``θ̄_i = −∂_{θ_i}(∇_y f · u)`` for ``i`` in ``which``, ``∇²f u = ȳ`` by compiled CG (module
    docstring); ``(θ̄ tuple, SolveInfo of the CG)``, ``θ̄`` ``None`` where the CG failed (the caller
    raises)."""
    shape, n = y.shape, y.numel()
    yf, b, params = y.reshape(n).contiguous(), gy.reshape(n).to(y.dtype), _contiguous(params)
    with torch.no_grad():
        scale = _pow2_scale(b.abs().amax())                          # exact: ȳ / scale has entries near 1
        b = b / scale
        x, r, p = torch.zeros_like(b), b.clone(), b.clone()
        rs = r @ r
        bn = math.sqrt(float(rs))
        tol2 = max(rtol * bn, atol / float(scale)) ** 2              # the adjoint solves' one rule (linalg.krylov)
        status, k, rs_f = None if math.isfinite(bn) else Status.NONFINITE, 0, bn * bn
        step = _compiled("cg", f, lambda: _cg_step(f, shape), (yf, x, r, p, rs) + params, tuple(shape)) \
            if status is None else None
        while status is None and rs_f > tol2:
            if k == max_iter:
                status = Status.MAX_ITERATIONS
                break
            x, r, p, rs, read = step(yf, x, r, p, rs, *params)
            k += 1
            rs_f, php = read.tolist()
            if not math.isfinite(php):                    # a Hessian-vector product is NaN/Inf
                status = Status.NONFINITE
            elif not (php > 0 and math.isfinite(rs_f)):   # not positive definite along p, or (nearly) singular
                status = Status.BREAKDOWN
        info = SolveInfo(torch.tensor(int(Status.SUCCESS if status is None else status)),
                         torch.tensor(math.sqrt(rs_f) / max(bn, torch.finfo(y.dtype).tiny)), torch.tensor(k))
        if status is not None:
            return None, info
        mixed = _compiled("mixed", f, lambda: _mixed(f, shape, which), (yf, x) + params, (which, tuple(shape)))
        return tuple(g * scale for g in mixed(yf, x, *params)), info
