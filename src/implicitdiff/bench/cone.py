"""Benchmark: cone programs as layers — ``nn.CvxpyLayer`` (``cone_program``) against cvxpylayers.

What is measured, in one process, float64, one thread (:mod:`._harness`):

* **forward + backward** of a batch of 128 (``∇`` of ``Σ_v ⟨w_v, v⟩`` over the returned variables,
  with fixed random weights ``w``, to every parameter tensor), reported as the *speed-up*
  cvxpylayers' time / ours (higher is better), and our forward alone.  cvxpylayers solves one
  instance at a time (SCS, then diffcp's derivative): it runs on the first ``R`` instances with one
  worker (``n_jobs_forward = n_jobs_backward = 1``, as ours runs on one thread) and its time is
  scaled to the batch (per instance × 128);
* **layer construction**, timed separately (each contender on a freshly built problem, since cvxpy
  caches the canonicalization on the problem object), as the ratio ours / cvxpylayers (≤ 1 wanted);
* **gradient error vs finite differences**, for both: on the first instances, directional
  derivatives of the loss along random unit directions of the parameters, against central
  differences ``(L(θ + hd) − L(θ − hd)) / 2h`` of an independent solution map, exact to rounding
  (a closed form, or Newton's method on a smooth objective — see :func:`reference_solution`;
  cvxpy + Clarabel is not accurate enough for 1e-6 here); the relative error ``|∇L·d − FD| / max(|FD|, 1e-3)`` (max over instances and
  directions) and, as the differences' own noise, ``|FD(h) − FD(h/2)|``; and the largest error of
  the returned variables against the reference solution.

Cases (DESIGN §5): (i) SOCP, robust least squares with ``n = 100`` unknowns:
``min ‖Fx − g‖ + ρ‖x‖`` with ``F`` (150 × 100) and ``g`` per instance; (ii) SDP, the nearest density
matrix: ``min ‖X − P‖²_F s.t. X ⪰ 0 (10 × 10), tr X = 1`` with ``P`` per instance; (iii) exponential cone, ℓ2-regularized logistic regression with 50 features on 50
samples: ``min (1/N) Σ logistic(−zᵢᵀβ) + λ‖β‖²`` with the signed samples ``zᵢ = yᵢxᵢ`` per instance.
Targets: ≥ 20× cvxpylayers forward + backward, construction no slower, gradients to 1e-6 of
finite differences.  Peers that are not installed are skipped (``pip install cvxpylayers``).

Example:
    >>> from implicitdiff.bench.cone import run
    >>> results = run(quick=True, out="/tmp/bench-cone.json")   # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import math
import time
import warnings
from typing import NamedTuple, Optional

import torch

from ._harness import configure_threads, format_table, machine_info, time_callables, write_json

__all__ = ["run", "DEFAULT_OUT", "TARGETS", "GRAD_TOL"]

DEFAULT_OUT = "bench-cone.json"
TARGETS = {"cvxpylayers": 20.0}  # minimum speed-up, forward + backward
GRAD_TOL = 1e-6
F64 = torch.float64
FD_STEP = 1e-5
SLOW_S = 5.0  # a forward + backward slower than this is timed once more, not `repeats` times


class Case(NamedTuple):
    label: str
    family: str  # "socp" | "sdp" | "exp"
    size: int  # assets / side of the PSD matrix / features
    batch: int
    extra: int  # rows of F / - / samples


def _cases(quick):
    if quick:
        return [Case("socp n=6", "socp", 6, 4, 9), Case("sdp 3x3", "sdp", 3, 4, 0), Case("exp 4 features", "exp", 4, 4, 6)]
    return [Case("socp n=100", "socp", 100, 128, 150), Case("sdp 10x10", "sdp", 10, 128, 0),
            Case("exp 50 features", "exp", 50, 128, 50)]


# ----------------------------------------------------------------------------- problems and instances
def problem(case):
    """``(cvxpy problem, parameters, variables)`` of a case (a fresh problem each call)."""
    cp = importlib.import_module("cvxpy")
    if case.family == "socp":
        n, N = case.size, case.extra
        x = cp.Variable(n)
        F, g = cp.Parameter((N, n)), cp.Parameter(N)
        prob = cp.Problem(cp.Minimize(cp.norm(F @ x - g, 2) + RHO * cp.norm(x, 2)))
        return prob, [F, g], [x]
    if case.family == "sdp":
        k = case.size
        X = cp.Variable((k, k), PSD=True)
        P = cp.Parameter((k, k))
        prob = cp.Problem(cp.Minimize(cp.sum_squares(X - P)), [cp.trace(X) == 1])
        return prob, [P], [X]
    d, N = case.size, case.extra
    beta = cp.Variable(d)
    Z = cp.Parameter((N, d))
    prob = cp.Problem(cp.Minimize(cp.sum(cp.logistic(-Z @ beta)) / N + LAM * cp.sum_squares(beta)))
    return prob, [Z], [beta]


RHO, LAM = 1.0, 0.05


def instance(case, seed=0):
    """The parameter tensors (batched, float64) and the loss weights (one per variable)."""
    g = torch.Generator().manual_seed(seed)
    B = case.batch

    def r(*s):
        return torch.randn(*s, generator=g, dtype=F64)
    if case.family == "socp":
        n, N = case.size, case.extra
        params = [r(B, N, n), r(B, N)]
        ws = [r(B, n)]
    elif case.family == "sdp":
        k = case.size
        params = [r(B, k, k) / math.sqrt(k)]
        ws = [r(B, k, k)]
    else:
        d, N = case.size, case.extra
        beta = r(B, d) / math.sqrt(d)
        X = r(B, N, d)
        y = torch.where(torch.rand(B, N, generator=g, dtype=F64) < torch.sigmoid(2 * (X @ beta[..., None])[..., 0]),
                        1.0, -1.0)
        params = [y[..., None] * X]
        ws = [r(B, d)]
    return params, ws


def _loss(values, ws):
    return sum((v * w).sum() for v, w in zip(values, ws))


# ----------------------------------------------------------------------------- the reference solution maps
# Independent of cvxpy and of cone_program, exact to rounding: the SDP is the projection onto the
# spectraplex {X ⪰ 0, tr X = 1}, in closed form (the eigenvalues of sym(P) projected onto the simplex);
# the SOCP (robust least squares, smooth where Fx ≠ g and x ≠ 0) and the logistic regression are smooth
# and strictly convex: damped Newton on the gradient to machine precision.
def reference_solution(case, values):
    """The variables at one instance's parameter tensors ``values`` (unbatched, float64)."""
    if case.family == "sdp":
        (P,) = values
        lam, V = torch.linalg.eigh(0.5 * (P + P.T))
        return [(V * _simplex(lam)) @ V.T]
    if case.family == "socp":
        F, g = values
        x0 = torch.linalg.lstsq(F, g[:, None]).solution[:, 0]
        return [_newton(lambda x: torch.linalg.vector_norm(F @ x - g) + RHO * torch.linalg.vector_norm(x), x0)]
    (Z,) = values
    N = Z.shape[0]
    f = lambda b: torch.nn.functional.softplus(-Z @ b).sum() / N + LAM * b.square().sum()  # noqa: E731
    return [_newton(f, Z.new_zeros(Z.shape[1]))]


def _simplex(v):
    """Euclidean projection of ``v`` onto the unit simplex (sort-based)."""
    u, _ = torch.sort(v, descending=True)
    css = torch.cumsum(u, 0) - 1
    k = torch.arange(1, len(v) + 1, dtype=v.dtype)
    rho = int(torch.nonzero(u - css / k > 0)[-1])
    return torch.clamp(v - css[rho] / (rho + 1), min=0)


def _newton(f, x, iters=80):
    """Damped Newton (Armijo backtracking) while the Newton decrement is large, then pure Newton steps
    (quadratic convergence; a line search there would only see rounding) to machine precision."""
    pure = 0
    for _ in range(iters):
        g = torch.func.grad(f)(x)
        H = torch.func.jacrev(torch.func.grad(f))(x)  # reverse over reverse: no forward-mode set-up
        step = torch.linalg.solve(H, g)
        dec = float(g @ step)
        if dec < 1e-8 * (1 + abs(float(f(x)))):
            x = x - step
            pure += 1
            if pure >= 3:
                break
            continue
        t, fx = 1.0, float(f(x))
        while float(f(x - t * step)) > fx - 0.25 * t * dec and t > 1e-12:
            t *= 0.5
        x = x - t * step
    return x


# ----------------------------------------------------------------------------- contenders
def _ours_layer(case, prob=None):
    from ..nn import CvxpyLayer

    prob, params, variables = prob or problem(case)
    return CvxpyLayer(prob, params, variables)


def _cvxpylayers_layer(case, prob=None):
    try:
        CvxpyLayer = importlib.import_module("cvxpylayers.torch").CvxpyLayer
    except ImportError:
        return None
    prob, params, variables = prob or problem(case)
    return CvxpyLayer(prob, parameters=params, variables=variables)


def _run_ours(layer, params, ws, grad=True, device="cpu"):
    ps = [p.to(device).detach().requires_grad_(grad) for p in params]
    if not grad:
        with torch.no_grad():
            return layer(*ps), None
    values = layer(*ps)
    return values, torch.autograd.grad(_loss(values, [w.to(device) for w in ws]), ps)


def _run_cvxpylayers(layer, params, ws, grad=True):
    ps = [p.detach().clone().requires_grad_(grad) for p in params]
    with warnings.catch_warnings():  # numpy's deprecation warnings from inside diffcp
        warnings.simplefilter("ignore")
        values = layer(*ps, solver_args={"n_jobs_forward": 1, "n_jobs_backward": 1})
        if not grad:
            return values, None
        return values, torch.autograd.grad(_loss(values, ws), ps)


# ----------------------------------------------------------------------------- finite differences
def _reference(case, params, ws, i, directions):
    """The reference variables at instance ``i``, and central differences of the loss along each direction
    at steps h and h/2."""
    base = [p[i] for p in params]
    wi = [w[i] for w in ws]
    xs = reference_solution(case, base)
    fds = []
    for d in directions:
        fd = []
        for h in (FD_STEP, FD_STEP / 2):
            lp = float(_loss(reference_solution(case, [p + h * dp for p, dp in zip(base, d)]), wi))
            lm = float(_loss(reference_solution(case, [p - h * dp for p, dp in zip(base, d)]), wi))
            fd.append((lp - lm) / (2 * h))
        fds.append(fd)
    return xs, fds


def _grad_errors(grads, i, directions, fds):
    worst = 0.0
    for d, (fd, _) in zip(directions, fds):
        dd = sum(float((g[i].detach().double().cpu() * dp).sum()) for g, dp in zip(grads, d))
        worst = max(worst, abs(dd - fd) / max(abs(fd), 1e-3))
    return worst


def _x_err(values, i, xs):
    return max(float((v[i].detach().double().cpu() - x).abs().max()) for v, x in zip(values, xs))


# ----------------------------------------------------------------------------- one case
def _measure(case, *, seed, repeats, build_repeats, R, cvx_R, n_dirs, device, verbose):
    params, ws = instance(case, seed)
    row = dict(case=case.label, family=case.family, batch=case.batch)
    ours = _ours_layer(case)
    row["m"], row["n"], row["cones"] = ours.canonical.m, ours.canonical.n, ours.canonical.cones
    theirs = _cvxpylayers_layer(case)
    # construction: fresh problems, interleaved
    builds = {"ours": [], "cvxpylayers": []}
    for _ in range(build_repeats + 1):  # the first round warms up (imports, caches) and is dropped
        for name, make in (("ours", _ours_layer), ("cvxpylayers", _cvxpylayers_layer)):
            if name == "cvxpylayers" and theirs is None:
                continue
            prob = problem(case)
            t0 = time.perf_counter()
            make(case, prob)
            builds[name].append(time.perf_counter() - t0)
    for name, ts in builds.items():
        ts = ts[1:]
        if ts:
            row[f"{name}_build_ms"] = 1e3 * sorted(ts)[len(ts) // 2]
    if theirs is not None:
        row["build_ratio"] = row["ours_build_ms"] / row["cvxpylayers_build_ms"]
    # forward + backward
    ours_out = None
    try:
        t0 = time.perf_counter()
        ours_out = _run_ours(ours, params, ws, device=device)
        first = time.perf_counter() - t0
        if first > SLOW_S:  # one more sample each, the first call having warmed up
            repeats = 1
        t = time_callables({"ours_fwd": lambda: _run_ours(ours, params, ws, grad=False, device=device),
                            "ours": lambda: _run_ours(ours, params, ws, device=device)},
                           warmup=0 if first > SLOW_S else 1, repeats=repeats, device=device)
        row["ours_fwd_ms"], row["ours_ms"] = 1e3 * t["ours_fwd"].median, 1e3 * t["ours"].median
        row["ours_repeats"] = repeats
    except Exception as err:  # noqa: BLE001 - a failure is a result
        row["ours_error"] = f"{type(err).__name__}: {str(err)[:160]}"
    cvx_out = None
    if theirs is not None:
        sub = [p[:cvx_R] for p in params]
        wsub = [w[:cvx_R] for w in ws]
        try:
            samples = []
            for _ in range(max(1, repeats // 2)):
                t0 = time.perf_counter()
                cvx_out = _run_cvxpylayers(theirs, sub, wsub)
                samples.append(time.perf_counter() - t0)
            row["cvxpylayers_ms"] = 1e3 * sorted(samples)[len(samples) // 2] * case.batch / cvx_R
        except Exception as err:  # noqa: BLE001
            row["cvxpylayers_error"] = f"{type(err).__name__}: {str(err)[:160]}"
            cvx_out = None
    if "ours_ms" in row and "cvxpylayers_ms" in row:
        row["speedup"] = row["cvxpylayers_ms"] / row["ours_ms"]
    # accuracy against the reference
    g = torch.Generator().manual_seed(seed + 1)
    ours_err = cvx_err = ours_xe = cvx_xe = noise = 0.0
    for i in range(R):
        dirs = [[torch.randn(p.shape[1:], generator=g, dtype=F64) for p in params] for _ in range(n_dirs)]
        dirs = [[t / math.sqrt(sum(float(u.square().sum()) for u in d)) for t in d] for d in dirs]
        xs, fds = _reference(case, params, ws, i, dirs)
        noise = max(noise, max(abs(a - b) / max(abs(a), 1e-3) for a, b in fds))
        if ours_out is not None:
            ours_err = max(ours_err, _grad_errors(ours_out[1], i, dirs, fds))
            ours_xe = max(ours_xe, _x_err(ours_out[0], i, xs))
        if cvx_out is not None and i < cvx_R:
            cvx_err = max(cvx_err, _grad_errors(cvx_out[1], i, dirs, fds))
            cvx_xe = max(cvx_xe, _x_err(cvx_out[0], i, xs))
    row["fd_noise"] = noise
    if ours_out is not None:
        row["ours_grad_err"], row["ours_x_err"] = ours_err, ours_xe
    if cvx_out is not None:
        row["cvxpylayers_grad_err"], row["cvxpylayers_x_err"] = cvx_err, cvx_xe
    if ours.last_info is not None:
        row["ours_iterations"] = int(ours.last_info.iterations.max())
    return row


# ----------------------------------------------------------------------------- run
def run(quick: bool = False, out: Optional[str] = None, *, threads: int = 1, seed: int = 0, device="cpu",
        verbose: bool = True) -> dict:
    """Run the benchmark, print its table, write JSON; return the results.

    Args:
        quick: tiny problems, batch 4, few repeats (seconds; timings mean little).
        out: JSON path (default ``bench-cone.json`` in the working directory).
        threads: ``torch.set_num_threads`` during the run (restored after).
        seed: seed of the instances.
        device: where ours runs (``"cuda"`` on a GPU); cvxpylayers and the reference run on the CPU.
        verbose: print the table.

    Returns:
        ``{"benchmark", "settings", "machine", "targets", "rows", "summary"}``; ``rows`` has one row
        per case with ``ours_fwd_ms``, ``ours_ms`` and ``cvxpylayers_ms`` (forward + backward of the
        batch; cvxpylayers scaled from its instances), ``speedup``, ``ours_build_ms``,
        ``cvxpylayers_build_ms``, ``build_ratio``, ``*_grad_err`` (relative, directional, against
        finite differences of the reference), ``*_x_err``, ``fd_noise``, and ``*_error`` where a
        contender could not run.
    """
    cases = _cases(quick)
    settings = dict(quick=bool(quick), threads=threads, seed=seed, device=str(device),
                    repeats=2 if quick else 5, build_repeats=3 if quick else 9,
                    reference_instances=2, cvxpylayers_instances=4 if quick else 16, directions=2 if quick else 3,
                    fd_step=FD_STEP)
    previous = configure_threads(threads)
    t0 = time.perf_counter()
    rows = []
    try:
        for case in cases:
            t1 = time.perf_counter()
            rows.append(_measure(case, seed=seed, repeats=settings["repeats"], build_repeats=settings["build_repeats"],
                                 R=min(settings["reference_instances"], case.batch),
                                 cvx_R=min(settings["cvxpylayers_instances"], case.batch),
                                 n_dirs=settings["directions"], device=device, verbose=verbose))
            if verbose:
                r = rows[-1]
                print(f"  {case.label}: {time.perf_counter() - t1:.1f} s; f+b ours {r.get('ours_ms', math.nan):.0f} ms, "
                      f"cvxpylayers {r.get('cvxpylayers_ms', math.nan):.0f} ms (x{r.get('speedup', math.nan):.1f}); "
                      f"build ratio {r.get('build_ratio', math.nan):.2f}; grad err ours "
                      f"{r.get('ours_grad_err', math.nan):.1e}, cvxpylayers {r.get('cvxpylayers_grad_err', math.nan):.1e}",
                      flush=True)
    finally:
        configure_threads(previous)
    settings["wall_s"] = time.perf_counter() - t0
    summary = _summary(rows, quick)
    results = dict(benchmark="cone", settings=settings, machine=machine_info(str(device)),
                   targets=dict(TARGETS, grad_tol=GRAD_TOL, build_ratio=1.0), rows=rows, summary=summary)
    if verbose:
        print(_table(rows, settings))
        for note in summary["notes"]:
            print("note: " + note)
    path = write_json(out or DEFAULT_OUT, results)
    if verbose:
        print(f"wrote {path}")
    return results


def _table(rows, settings):
    cols = [("case", "case", "s"), ("m", "m", "s"), ("n", "n", "s"), ("ours_fwd_ms", "ours fwd ms", ".0f"),
            ("ours_ms", "ours f+b ms", ".0f"), ("cvxpylayers_ms", "cvxpyl. f+b ms*", ".0f"),
            ("speedup", "× cvxpyl.", ".1f"), ("ours_build_ms", "ours build ms", ".0f"),
            ("cvxpylayers_build_ms", "cvxpyl. build ms", ".0f"), ("build_ratio", "build ours/cvxpyl.", ".2f"),
            ("ours_grad_err", "ours ∇err", ".1e"), ("cvxpylayers_grad_err", "cvxpyl. ∇err", ".1e"),
            ("fd_noise", "FD noise", ".1e"), ("ours_x_err", "ours x err", ".1e"),
            ("cvxpylayers_x_err", "cvxpyl. x err", ".1e")]
    title = (f"Cone programs as layers, batch {settings.get('batch', '')}forward + backward, float64, "
             f"{settings['threads']} thread(s) (× = cvxpylayers time / ours; higher is better)").replace("batch f", "f")
    foot = (f"* cvxpylayers: its first {settings['cvxpylayers_instances']} instances, one worker, scaled to the batch. "
            f"∇err: max relative error of {settings['directions']} directional derivatives on "
            f"{settings['reference_instances']} instances against central differences (h = {settings['fd_step']:g}) "
            "of the exact reference solution map; FD noise: |FD(h) − FD(h/2)| relative")
    return format_table(rows, cols, title=title) + "\n" + foot


def _summary(rows, quick):
    notes, misses = [], []
    for r in rows:
        for who in ("ours", "cvxpylayers"):
            if f"{who}_error" in r:
                notes.append(f"{r['case']}: {who} failed: {r[f'{who}_error']}")
        if "cvxpylayers_ms" not in r and "cvxpylayers_error" not in r:
            notes.append(f"{r['case']}: cvxpylayers is not installed; no speed-up measured (pip install cvxpylayers)")
        sp = r.get("speedup")
        if sp is not None and sp < TARGETS["cvxpylayers"]:
            misses.append(f"{r['case']}: {sp:.1f}× cvxpylayers < {TARGETS['cvxpylayers']:g}×")
        if r.get("build_ratio") is not None and r["build_ratio"] > 1.0:
            misses.append(f"{r['case']}: construction {r['build_ratio']:.2f}× cvxpylayers' (> 1)")
        err = r.get("ours_grad_err")
        if err is None or not err <= max(GRAD_TOL, 10 * r.get("fd_noise", 0.0)):
            misses.append(f"{r['case']}: gradient error {err} > {GRAD_TOL:g} (FD noise {r.get('fd_noise', 0.0):.1e})")
    if quick:
        notes.append("quick run: tiny problems; the targets are judged on the full run")
    return dict(targets_met=not misses and not quick, misses=misses, notes=notes)
