"""Benchmark: hyperparameter gradients through an inner minimisation (``argmin``), against peers.

The problem of hyperparameter tuning by hypergradient descent: per-feature
regularization ``λ = exp(θ)``, inner fit ``w*(θ) = argmin_w f(w, θ)``, outer loss
the validation error ``L(w*(θ))``; the hypergradient is ``dL/dθ``.  By the
implicit function theorem on ``∇_w f(w*, θ) = 0`` (``H = ∇²_ww f``)::

    dL/dθ = −(∂²f/∂θ∂w)ᵀ H⁻¹ ∇_w L = −(e^θ ⊙ w*) ⊙ (H⁻¹ ∇_w L)

=====================  ===============================================  ==========================
case                   inner ``f(w, θ)``                                outer ``L(w)``
=====================  ===============================================  ==========================
ridge m×n              ``‖Xw − t‖²/2m + ½ Σ e^θⱼ wⱼ²``                  validation MSE
logistic m×n           ``mean BCE(Xw, t) + ½ Σ e^θⱼ wⱼ²``               validation BCE
=====================  ===============================================  ==========================

Methods, all from ``w0 = 0`` to the same inner tolerance
``‖∇_w f(w)‖ ≤ 1e-10 ‖∇_w f(0)‖`` and with adjoint Krylov solves to the same
``‖r‖ ≤ 1e-10 ‖b‖``, in one process, float64, one thread, medians of
interleaved repeats (:mod:`._harness`):

* ``ours auto`` / ``ours cg``: :func:`implicitdiff.argmin` (L-BFGS forward)
  with ``Implicit()`` (dense Hessian by ``jacrev`` + LU up to ``dense_max = 200`` unknowns, CG beyond)
  and ``Implicit(solver="cg")`` (Hessian-vector products);
* ``ours compiled`` (full runs on the CPU only: it compiles, seconds per case): the same
  with ``compiled=True`` and ``Implicit(solver="cg")``, each L-BFGS and CG iteration one
  call compiled by Inductor (:mod:`implicitdiff.solvers.lbfgs_compiled`); the compile is
  excluded from the timings (the probe call compiles);
* ``closed form`` (ridge): ``torch.linalg.solve(XᵀX/m + diag(e^θ), Xᵀt/m)``
  under autograd — also the reference of the gradient errors; for logistic
  the reference is Newton's method to machine precision plus the formula above
  with an explicit Hessian;
* ``torchopt``: ``torchopt.diff.implicit.custom_root`` (CG) around the same
  L-BFGS forward (TorchOpt has no forward solver of its own);
* ``jaxopt``: ``jaxopt.LBFGS`` inside ``jaxopt.implicit_diff.custom_root``
  (CG), ``jax.jit``-compiled, CPU;
* ``optimistix cg`` / ``optimistix auto``: ``optimistix.minimise`` with
  ``LBFGS`` and ``ImplicitAdjoint`` (``lineax.CG``, or the default
  ``AutoLinearSolver``: a dense Cholesky here), jitted, CPU.  Optimistix
  stops on small steps in ``w`` and ``f`` (rtol = atol = 1e-10), not on the
  gradient: its accuracy is reported, not matched.

A second table compares, on one ridge problem, *unrolled* autograd through
``K`` gradient-descent steps with ours on the very same ``K`` steps
(``custom_root`` + CG adjoint): time, gradient error, and the bytes autograd
keeps for the backward (``saved_tensors_hooks``), which grow with ``K``
unrolled and stay flat implicit.  A third splits our time into forward
(L-BFGS iterations, the cost of one gradient evaluation) and backward, and sets the forward
beside a bare torch loop making the same products (one value and gradient of ``f`` by
autograd and one step per iteration, as many iterations): the difference per iteration is
L-BFGS's own overhead (direction, line search, host reads).

Peers are optional (adapters: :mod:`._hypergrad_peers`); a missing one is skipped with its reason.  ``jax`` runs
with ``jax_enable_x64``.  "One thread" is enforced by pinning the process to
one CPU for the run (``os.sched_setaffinity``; restored afterwards): XLA's CPU
thread pool ignores ``torch.set_num_threads`` and, in jax 0.10, ``XLA_FLAGS``
(set too, when this module is the first to import jax).

Example:
    >>> from implicitdiff.bench.hypergrad import run
    >>> results = run(quick=True, out="/tmp/bench-hypergrad.json", plot=False)  # doctest: +SKIP
    >>> sorted(results)                                                         # doctest: +SKIP
    ['benchmark', 'comparisons', 'machine', 'methods', 'peers', 'profile', 'settings', 'summary', 'targets', 'unrolled']
"""

from __future__ import annotations

import os
import time
from typing import Optional, Sequence

import torch

from .._core.errors import InputError
from ..implicit.adjoint import Implicit
from ..layers.argmin import argmin
from ..layers.custom_root import custom_root
from ..solvers.lbfgs import lbfgs
from ._hypergrad_peers import _PEER_FACTORIES
from ._hypergrad_problem import (ADJ_RTOL, D, MAX_ITER, TOL, Problem, _graph_saved_bytes,  # noqa: F401 (tests)
                                 _hypergrad, _problem, _saved_kb)
from ._harness import configure_threads, format_table, machine_info, max_abs_diff, plot_ratios, time_callables, \
    write_json

__all__ = ["run", "DEFAULT_OUT", "TARGETS", "PEERS"]

DEFAULT_OUT = "bench-hypergrad.json"
PEERS = ("torchopt", "jaxopt", "optimistix")
#: DESIGN §5: on this case, ours at most as slow as each peer (ratio ours / peer ≤ 1)
TARGETS = {"ridge 5000x1000": {"torchopt": 1.0, "jaxopt": 1.0, "optimistix cg": 1.0, "optimistix auto": 1.0}}


# ----------------------------------------------------------------------------- problems

def _cases(quick: bool) -> list:
    """``(kind, m, n)`` of the problems; the first one also serves the unrolled comparison."""
    if quick:
        return [("ridge", 120, 20), ("logistic", 150, 10)]
    return [("ridge", 1000, 200), ("ridge", 5000, 1000), ("logistic", 1000, 100)]


def _reference(p: Problem) -> torch.Tensor:
    """The exact hypergradient: ridge by the closed form; logistic by Newton to machine precision + the IFT formula."""
    if p.kind == "ridge":
        return _hypergrad(_closed_form, p)[0]
    m = p.X.shape[0]
    lam = p.theta.exp()
    w = torch.zeros(p.n, dtype=D, device=p.X.device)
    for _ in range(100):  # Newton on ∇f = Xᵀ(σ(Xw) − t)/m + λw; quadratic convergence, then stagnation
        s = torch.sigmoid(p.X @ w)
        grad = p.X.T @ (s - p.t) / m + lam * w
        H = (p.X.T * (s * (1 - s))) @ p.X / m + torch.diag(lam)
        step = torch.cholesky_solve(grad.unsqueeze(-1), torch.linalg.cholesky(H)).squeeze(-1)
        w = w - step
        if float(step.abs().max()) <= 1e-15 * max(1.0, float(w.abs().max())):
            break
    s = torch.sigmoid(p.X @ w)
    H = (p.X.T * (s * (1 - s))) @ p.X / m + torch.diag(lam)
    gL = p.Xv.T @ (torch.sigmoid(p.Xv @ w) - p.tv) / p.Xv.shape[0]          # ∇_w L
    return -(lam * w) * torch.cholesky_solve(gL.unsqueeze(-1), torch.linalg.cholesky(H)).squeeze(-1)


# ----------------------------------------------------------------------------- torch methods
# Each maps (problem, θ with requires_grad) to (w*(θ) differentiable, inner iterations or None).

def _ours(adjoint, compiled=False):
    def solve(p: Problem, theta):
        w, info = argmin(p.inner, torch.zeros(p.n, dtype=D, device=p.X.device), theta, p.X, p.t, rtol=TOL,
                         max_iter=MAX_ITER, adjoint=adjoint, return_info=True, compiled=compiled)
        return w, int(info.iterations)
    return solve


def _closed_form(p: Problem, theta):
    m = p.X.shape[0]
    return torch.linalg.solve(p.X.T @ p.X / m + torch.diag(theta.exp()), p.X.T @ p.t / m), None


_OURS = {"ours auto": _ours(Implicit()), "ours cg": _ours(Implicit(solver="cg", rtol=ADJ_RTOL))}
#: measured beside ``_OURS`` (not in the comparisons) in full runs on the CPU
_COMPILED = {"ours compiled": _ours(Implicit(solver="cg", rtol=ADJ_RTOL), compiled=True)}


def _short(err: BaseException) -> str:
    msg = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {msg[:120]}"


# ----------------------------------------------------------------------------- the main table

def _measure_case(p: Problem, peers: dict, *, warmup, repeats, min_sample_s, compiled=False):

    ref = _reference(p)
    scale = float(ref.abs().max())
    w0 = torch.zeros(p.n, dtype=D, device=p.X.device)
    tol_abs = TOL * float(torch.linalg.vector_norm(torch.func.grad(p.inner)(w0, p.theta, p.X, p.t)))
    variants = {**_OURS, **(_COMPILED if compiled else {})}   # ours, measured
    methods = {name: (lambda s=s: _hypergrad(s, p), lambda s=s: _saved_kb(s, p)) for name, s in variants.items()}
    if p.kind == "ridge":
        methods["closed form"] = (lambda: _hypergrad(_closed_form, p), lambda: _saved_kb(_closed_form, p))
    rows, runnable = {}, {}
    for peer, status in peers.items():
        if status != "ok":
            continue
        try:
            methods.update(_PEER_FACTORIES[peer](p, tol_abs))
        except Exception as err:  # an incompatible installed version: note it, go on
            rows[peer] = {"case": p.label, "method": peer, "error": _short(err)}
    for name, (call, mem) in methods.items():
        row = {"case": p.label, "kind": p.kind, "method": name, "iterations": None, "grad_err": None,
               "rel_err": None, "saved_kb": None}
        try:
            g, iters = call()  # the probe: compiles JAX peers, and shows errors before timing
            row.update(iterations=iters, grad_err=max_abs_diff([g], [ref]))
            row["rel_err"] = row["grad_err"] / scale
            row["saved_kb"] = mem() if mem is not None else None
            runnable[name] = call
        except Exception as err:
            row["error"] = _short(err)
        rows[name] = row
    timings = time_callables(runnable, warmup=warmup, repeats=repeats, min_sample_s=min_sample_s,
                             device=p.X.device)
    for name, tm in timings.items():
        rows[name].update(time_ms=1e3 * tm.median, q25_ms=1e3 * tm.q25, q75_ms=1e3 * tm.q75, min_ms=1e3 * tm.min,
                          repeats=tm.repeats)
    for row in rows.values():
        for name in variants:
            o = rows.get(name, {}).get("time_ms")
            row[f"{name} / this"] = o / row["time_ms"] if o and row.get("time_ms") else None
    comparisons = []
    for ours in _OURS:
        for name, row in rows.items():
            if name in _OURS or name in _COMPILED:
                continue
            target = TARGETS.get(p.label, {}).get(name)
            ratio = row.get(f"{ours} / this")
            o_min, p_min = rows[ours].get("min_ms"), row.get("min_ms")
            comparisons.append({"case": p.label, "ours": ours, "peer": name, "ratio": ratio, "target": target,
                                "ratio_of_minima": o_min / p_min if o_min and p_min else None,
                                "met": None if target is None or ratio is None else bool(ratio <= target),
                                "ours_rel_err": rows[ours].get("rel_err"), "peer_rel_err": row.get("rel_err"),
                                "note": row.get("error", "")})
    return list(rows.values()), comparisons


# ----------------------------------------------------------------------------- unrolled vs implicit

def _gd_step(p: Problem) -> float:
    """``1/L`` with ``L = σ_max(X)²/m + max e^θ ≥ ‖∇²f‖`` (ridge)."""
    return 1.0 / (float(torch.linalg.matrix_norm(p.X, ord=2)) ** 2 / p.X.shape[0] + float(p.theta.exp().max()))


def _unrolled(K: int, eta: float):
    def solve(p: Problem, theta):
        w = torch.zeros(p.n, dtype=D, device=p.X.device, requires_grad=True)
        for _ in range(K):  # autograd keeps every step's graph: memory O(K)
            (g,) = torch.autograd.grad(p.inner(w, theta, p.X, p.t), w, create_graph=True)
            w = w - eta * g
        return w, K
    return solve


def _implicit_gd(K: int, eta: float, p: Problem):
    grad_f = torch.func.grad(p.inner)

    # K steps need not converge (the point of the comparison): accept any residual (check_rtol=inf)
    @custom_root(grad_f, adjoint=Implicit(solver="cg", rtol=ADJ_RTOL), check_rtol=float("inf"))
    def gd(w0, theta, X, t):  # the same K steps, run without a graph
        w = w0
        for _ in range(K):
            w = w - eta * grad_f(w, theta, X, t)
        return w

    def solve(p_, theta):
        return gd(torch.zeros(p.n, dtype=D, device=p.X.device), theta, p.X, p.t), K
    return solve


def _measure_unrolled(p: Problem, Ks: Sequence[int], *, warmup, repeats):
    ref = _reference(p)
    eta = _gd_step(p)
    methods = {}
    for K in Ks:
        methods[("unrolled GD", K)] = _unrolled(K, eta)
        methods[("ours GD + implicit cg", K)] = _implicit_gd(K, eta, p)
    methods[("ours lbfgs + cg", None)] = _OURS["ours cg"]
    timings = time_callables({k: (lambda s=s: _hypergrad(s, p)) for k, s in methods.items()}, device=p.X.device,
                             warmup=warmup,
                             repeats=repeats)
    rows = []
    for (name, K), solve in methods.items():
        g, iters = _hypergrad(solve, p)
        err = max_abs_diff([g], [ref])
        rows.append({"case": p.label, "method": name, "K": K if K is not None else iters,
                     "time_ms": 1e3 * timings[(name, K)].median, "saved_kb": _saved_kb(solve, p),
                     "grad_err": err, "rel_err": err / float(ref.abs().max())})
    return rows


# ----------------------------------------------------------------------------- where our time goes

def _profile(p: Problem, *, repeats, min_sample_s):
    """Forward L-BFGS alone (iterations, per iteration, one gradient evaluation) and each backward alone."""
    args = (p.theta, p.X, p.t)
    w = torch.zeros(p.n, dtype=D, device=p.X.device)
    grad_and_value = torch.func.grad_and_value(lambda w: p.inner(w, *args))
    graphs = {}
    for name, solve in _OURS.items():
        theta = p.theta.detach().clone().requires_grad_(True)
        graphs[name] = (p.outer(solve(p, theta)[0]), theta)
    fns = {"forward": lambda: lbfgs(p.inner, w, args, rtol=TOL, max_iter=MAX_ITER),
           "grad_eval": lambda: grad_and_value(w),
           "matvecs": lambda: p.X.T @ (p.X @ w - p.t)}
    for name, (loss, theta) in graphs.items():
        fns[f"backward {name}"] = lambda loss=loss, theta=theta: torch.autograd.grad(loss, theta, retain_graph=True)
    iters = int(lbfgs(p.inner, w, args, rtol=TOL, max_iter=MAX_ITER).info.iterations)

    def bare():  # the same products as the L-BFGS forward: one value and gradient of f and a step per iteration
        y = w
        for _ in range(iters):
            with torch.enable_grad():
                yy = y.detach().requires_grad_()
                (g,) = torch.autograd.grad(p.inner(yy, *args), yy)
            y = y - 1e-3 * g
        return y

    fns["bare loop"] = bare
    t = time_callables(fns, warmup=1, repeats=repeats, min_sample_s=min_sample_s, device=p.X.device)
    ms = {k: 1e3 * v.median for k, v in t.items()}
    return {"case": p.label, "n": p.n, "forward_ms": ms["forward"], "lbfgs_iterations": iters,
            "ms_per_iteration": ms["forward"] / max(iters, 1), "bare_ms_per_iteration": ms["bare loop"] / max(iters, 1),
            "overhead_ms_per_iteration": (ms["forward"] - ms["bare loop"]) / max(iters, 1),
            "grad_eval_ms": ms["grad_eval"],
            "matvecs_ms": ms["matvecs"], "backward_auto_ms": ms["backward ours auto"],
            "backward_cg_ms": ms["backward ours cg"]}


# ----------------------------------------------------------------------------- report

def _pin_cpus(threads: int):
    """Restrict this process to ``threads`` CPUs (Linux); returns the previous affinity, or ``None``.

    ``torch.set_num_threads`` bounds torch, but XLA keeps its own thread pool (JAX on 2 cores
    used 1.9 CPU-seconds per second here despite ``XLA_FLAGS``).  Threads started while the
    affinity is narrowed inherit it, so a JAX backend first used in this run stays on them.
    """
    if not hasattr(os, "sched_setaffinity"):
        return None
    previous = os.sched_getaffinity(0)
    os.sched_setaffinity(0, set(sorted(previous)[:max(1, int(threads))]))
    return previous


def _available_peers(peers) -> dict:
    import importlib.util

    wanted = PEERS if peers is None else tuple(peers)
    unknown = sorted(set(wanted) - set(PEERS))
    if unknown:
        raise InputError(f"peers: unknown {unknown}; choose among {list(PEERS)} (or () for none)")
    out = {}
    for name in PEERS:
        if name not in wanted:
            out[name] = "skipped (not requested)"
            continue
        needs = {"torchopt": ["torchopt"], "jaxopt": ["jax", "jaxopt"], "optimistix": ["jax", "optimistix", "lineax"]}
        missing = [m for m in needs[name] if importlib.util.find_spec(m) is None]
        out[name] = "ok" if not missing else f"not installed ({', '.join(missing)}): pip install {name}"
    return out


_MAIN_COLUMNS = [("case", "case", ""), ("method", "method", ""), ("time_ms", "ms", ".1f"), ("min_ms", "min ms", ".1f"),
                 ("iterations", "inner it", ""), ("rel_err", "rel err", ".1e"), ("saved_kb", "saved kB", ".1f"),
                 ("ours cg / this", "ours cg/this", ".2f"), ("ours auto / this", "ours auto/this", ".2f"),
                 ("ours compiled / this", "compiled/this", ".2f"), ("error", "note", "")]
_UNROLL_COLUMNS = [("method", "method", ""), ("K", "K", ""), ("time_ms", "ms", ".1f"), ("saved_kb", "saved kB", ".1f"),
                   ("rel_err", "rel err", ".1e")]
_PROFILE_COLUMNS = [("case", "case", ""), ("forward_ms", "L-BFGS ms", ".1f"), ("lbfgs_iterations", "it", ""),
                    ("ms_per_iteration", "ms/it", ".2f"), ("bare_ms_per_iteration", "bare loop ms/it", ".2f"),
                    ("overhead_ms_per_iteration", "overhead ms/it", ".2f"), ("grad_eval_ms", "grad eval ms", ".3f"),
                    ("matvecs_ms", "Xᵀ(Xw−t) ms", ".3f"), ("backward_auto_ms", "bwd auto ms", ".1f"),
                    ("backward_cg_ms", "bwd cg ms", ".1f")]


def _report(results) -> str:
    m, s = results["machine"], results["settings"]
    head = (f"implicitdiff hypergradient benchmark — forward + backward, float64, median of {s['repeats']} "
            f"interleaved repeats, {m['torch_threads']} thread(s) pinned to CPU(s) {m['cpu_affinity']}, "
            f"torch {m['torch']}, {m['cpu_count']} CPUs, load average at start "
            f"{'n/a' if m['load_avg_1m'] is None else format(m['load_avg_1m'], '.1f')}; inner tol {TOL:g} (relative "
            f"gradient), adjoint CG rtol {ADJ_RTOL:g}; rel err = max|g − g_exact| / max|g_exact|")
    lines = [format_table(results["methods"], _MAIN_COLUMNS, head), ""]
    if results["unrolled"]:
        lines += [format_table(results["unrolled"], _UNROLL_COLUMNS,
                               f"unrolled autograd vs implicit, {results['unrolled'][0]['case']}, the same K "
                               "gradient-descent steps (saved kB: what autograd keeps for the backward)"), ""]
    lines += [format_table(results["profile"], _PROFILE_COLUMNS, "where ours spends its time (L-BFGS forward alone; "
                                                                 "each backward alone on a built graph)"), ""]
    lines.append("peers: " + "; ".join(f"{k}: {v}" for k, v in results["peers"].items()))
    sm = results["summary"]
    lines.append(f"memory flat in K (ours): {sm['memory_flat']}; unrolled saved kB grows "
                 f"{sm['unrolled_growth']:.0f}x from the smallest to the largest K" if sm["unrolled_growth"] else "")
    lines.append("targets (ours/peer ≤ 1 on ridge 5000x1000): " + (
        "none measured" if not sm["measured"] else
        "; ".join(f"{o}: {'met' if ok else 'MISSED'}" for o, ok in sm["targets_met_by"].items())))
    return "\n".join(lines)


def run(quick: bool = False, out: Optional[str] = None, *, peers: Optional[Sequence[str]] = None, device="cpu",
        threads: int = 1, seed: int = 0, plot: bool = True, verbose: bool = True) -> dict:
    """Run the benchmark, print its tables, write JSON (and a plot); return the results.

    Args:
        quick: small sizes and few repeats: seconds (plus the peers' compilation),
            for tests and smoke runs.  Its timings mean little.
        out: JSON path (default ``bench-hypergrad.json`` in the working directory).
        peers: which of ``PEERS`` to run (default: every installed one).
        device: where the problems live (``"cpu"``, ``"cuda"``); the JAX peers run on the CPU
            only and are reported as errors elsewhere.
        threads: ``torch.set_num_threads`` for the run, and the process pinned to
            that many CPUs (Linux), both restored afterwards.
        seed: seed of the random problems.
        plot: draw the ratios ``ours / other`` (skipped without matplotlib).
        verbose: print the tables.

    Returns:
        ``{"benchmark", "settings", "machine", "peers", "targets", "methods",
        "comparisons", "unrolled", "profile", "summary"}``: ``methods`` has one row
        per (case, method) with ``time_ms``, ``iterations``, ``grad_err`` /
        ``rel_err`` against the exact hypergradient, ``saved_kb`` (torch methods)
        and the ratios of ours to it, or an ``error``; ``comparisons`` one per
        (case, ours variant, other method) with ``ratio``, ``target``, ``met``;
        ``unrolled`` one per (method, K); ``profile`` one per case.
    """
    settings = dict(quick=bool(quick), dtype="float64", device=str(device), seed=seed, threads=threads, tol=TOL,
                    adjoint_rtol=ADJ_RTOL, cpus_pinned=threads,
                    warmup=1, repeats=3 if quick else 7, min_sample_s=0.0 if quick else 0.01,
                    unrolled_K=[5, 50] if quick else [10, 100, 1000])
    peer_status = _available_peers(peers)
    previous = configure_threads(threads)
    affinity = _pin_cpus(threads)
    info = machine_info(str(device))
    info["cpu_affinity"] = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    t0 = time.perf_counter()
    try:
        methods, comparisons, profile = [], [], []
        problems = [_problem(kind, m, n, seed + i, device) for i, (kind, m, n) in enumerate(_cases(quick))]
        for p in problems:
            rows, comps = _measure_case(p, peer_status, warmup=settings["warmup"], repeats=settings["repeats"],
                                        min_sample_s=settings["min_sample_s"],
                                        compiled=not quick and str(device) == "cpu")
            methods += rows
            comparisons += comps
            profile.append(_profile(p, repeats=settings["repeats"], min_sample_s=settings["min_sample_s"]))
        unrolled = _measure_unrolled(problems[0], settings["unrolled_K"], warmup=1, repeats=3)
    finally:
        torch.set_num_threads(previous)
        if affinity is not None:
            os.sched_setaffinity(0, affinity)
    info["xla_flags"] = os.environ.get("XLA_FLAGS")
    settings["wall_s"] = time.perf_counter() - t0
    ours_rows = [r for r in unrolled if r["method"] == "ours GD + implicit cg"]
    unrolled_rows = [r for r in unrolled if r["method"] == "unrolled GD"]
    targeted = [c for c in comparisons if c["target"] is not None]
    met_by = {o: all(c["met"] is True for c in targeted if c["ours"] == o) for o in _OURS}
    summary = {"measured": bool([c for c in targeted if c["ratio"] is not None]),
               "targets_met_by": met_by, "targets_met": any(met_by.values()),
               "misses": [f"{c['case']}: {c['ours']}/{c['peer']} = {c['ratio']:.2f} > {c['target']}"
                          for c in targeted if c["met"] is False],
               "memory_flat": len({round(r["saved_kb"], 9) for r in ours_rows}) == 1,
               "unrolled_growth": (unrolled_rows[-1]["saved_kb"] / unrolled_rows[0]["saved_kb"]
                                   if unrolled_rows and unrolled_rows[0]["saved_kb"] else None)}
    results = {"benchmark": "hypergrad", "settings": settings, "machine": info, "peers": peer_status,
               "targets": TARGETS, "methods": methods, "comparisons": comparisons, "unrolled": unrolled,
               "profile": profile, "summary": summary}
    if verbose:
        print(_report(results))
    path = write_json(DEFAULT_OUT if out is None else out, results)
    if verbose:
        print(f"\nwrote {path}")
    if plot:
        png = path[:-5] + ".png" if path.endswith(".json") else path + ".png"
        rows = [dict(c, label=f"{c['case']}: {c['ours']} / {c['peer']}") for c in comparisons]
        if plot_ratios(rows, png, title="hypergradient fwd+bwd time, ours / other", targets={"target 1x": 1.0}) \
                and verbose:
            print(f"wrote {png}")
    return results