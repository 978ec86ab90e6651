"""Benchmark: a deep equilibrium layer, forward and backward, against torchdeq and unrolled autograd.

The instance (DESIGN §5): the cell ``f(z, x) = tanh(z Wᵀ + x Uᵀ + b)`` of width 256 (``‖W‖₂ = 0.9``),
batch 64, forward tolerance 1e-6 relative, in float64 and float32, one thread.  Measured in one
process, interleaved repeats (:mod:`._harness`):

* time of the forward (graph built, as in training) and of forward + ``autograd.grad`` of
  ``(z* · w).sum()`` in every parameter and in ``x`` — the *minimum* over the interleaved
  repeats, the sample least disturbed by other work on a shared machine (medians are in the
  JSON; on a loaded 2-core machine they scatter by 2× between runs);
* bytes autograd saves for the backward (inputs and parameters excluded);
* the gradients' distance to the *exact implicit gradient* (float64, forward solved to 1e-13,
  dense LU adjoint), relative to its largest entry;
* convergence: each method's final relative residual ``‖f(z) − z‖ / ‖f(z)‖`` (torchdeq's own
  measure, computed here for everyone) and whether its stopping rule was met.

==========================  ===========================================================
method                      what
==========================  ===========================================================
ours                        ``deq`` defaults: Anderson with a lazy start (Picard steps while every
                            residual shrinks at least by the factor 0.8 per step), adjoint fixed
                            point (dedicated Picard loop, GMRES fallback)
ours anderson               Anderson mixing from the first step (``start_rate=0``), same adjoint
ours picard                 Picard forward, same adjoint
ours gmres                  Anderson, ``Implicit(solver="gmres")``
ours lu                     Anderson, ``Implicit(solver="lu")``: 256 VJPs + LU per sample
ours neumann5               Anderson, ``Neumann(5)`` (phantom gradient, approximate)
unrolled                    autograd through the Picard iterations (count fixed beforehand)
torchdeq                    ``get_deq(ift=True)``: its default fixed-point solvers, rel. tol 1e-6
torchdeq anderson           ``get_deq(ift=True, f_solver="anderson", b_solver="anderson")``
torchdeq abs                as torchdeq with its default *absolute* tolerance mode (``1e-6``)
==========================  ===========================================================

Targets (DESIGN §5) for ``ours`` against ``torchdeq`` (its implicit mode): total time ≤ 0.7×, saved
memory ≤ 1×; float32 converging where torchdeq's absolute tolerance does not.

A cost breakdown (per iteration of each solver, against one cell evaluation or one VJP) shows where
the time goes.  ``torchdeq`` is optional: ``pip install torchdeq`` (pure Python; ``--no-deps``
keeps torch as it is); without it its rows are skipped with a note.

Example:
    >>> from implicitdiff.bench.deq import run
    >>> results = run(quick=True, out="/tmp/bench-deq.json")   # doctest: +SKIP
"""

from __future__ import annotations

import time
from typing import NamedTuple, Optional

import torch

from ..implicit.fixed_point_adjoint import picard_adjoint
from ..solvers.objects import Anderson, Picard
from ..layers.deq import ANDERSON_START_RATE, deq
from ..implicit.adjoint import Implicit, Neumann
from ..linalg.krylov import gmres
from ..solvers.registry import get_root_solver
from ._harness import configure_threads, format_table, machine_info, saved_bytes, time_callables, write_json

__all__ = ["run", "DEFAULT_OUT", "TARGETS", "Cell"]

DEFAULT_OUT = "bench-deq.json"
TARGETS = {"time": 0.7, "saved": 1.0}  # ours / torchdeq (implicit mode), at most
PEER = "torchdeq"


class Cell(torch.nn.Module):
    """``f(z, x) = s · tanh((z / s) Wᵀ + x Uᵀ + b)`` with ``‖W‖₂ = rho`` and the state's scale ``s``.

    ``∂f/∂z = diag(tanh′) W`` does not depend on ``s``: the scale only changes the size of ``z*``
    (``‖z*‖ ≈ s √n / 2``), which an absolute tolerance sees and a relative one does not.
    """

    def __init__(self, n: int, *, rho: float = 0.9, scale: float = 1.0, seed: int = 0, dtype=torch.float64):
        super().__init__()
        self.scale = scale
        g = torch.Generator().manual_seed(seed)
        W = torch.randn(n, n, generator=g, dtype=torch.float64)
        self.W = torch.nn.Parameter((rho * W / torch.linalg.matrix_norm(W, 2)).to(dtype))
        self.U = torch.nn.Parameter((torch.randn(n, n, generator=g, dtype=torch.float64) / n ** 0.5).to(dtype))
        self.b = torch.nn.Parameter((0.1 * torch.randn(n, generator=g, dtype=torch.float64)).to(dtype))

    def forward(self, z, x):
        s = self.scale
        return s * torch.tanh((z / s) @ self.W.mT + x @ self.U.mT + self.b)


# ----------------------------------------------------------------------------- methods
# Each method maps (cell, x) to (z*, ok): z* differentiably, with the forward tolerance TOL, and
# whether the method's own stopping rule was met (a 0-d bool tensor, no host sync; None: n/a).
TOL = 1e-6


def _ours(**kw):
    def run(cell, x):
        z, info = deq(cell, x, rtol=TOL, return_info=True, **kw)
        return z, info.ok.all()
    return run


def _unrolled(k: int):
    def run(cell, x):
        z = torch.zeros_like(x)
        for _ in range(k):
            z = cell(z, x)
        return z, None
    return run


def _torchdeq(**kw):
    from torchdeq import get_deq  # optional peer

    layer = get_deq(ift=True, f_max_iter=200, b_max_iter=200, f_tol=TOL, b_tol=TOL, **kw)
    layer.train()
    mode = kw.get("f_stop_mode", "abs")

    def run(cell, x):
        z, info = layer(lambda z: cell(z, x), torch.zeros_like(x))
        return z[-1], info[f"{mode}_lowest"].max() < TOL
    return run


def _methods(k_unroll: int, with_lu: bool) -> dict:
    m = {"ours": _ours(), "ours anderson": _ours(solver=Anderson(freeze=False)),
         "ours picard": _ours(solver=Picard(freeze=False)),
         "ours gmres": _ours(adjoint=Implicit(solver="gmres", rtol=TOL)), "ours neumann5": _ours(adjoint=Neumann(5))}
    if with_lu:
        m["ours lu"] = _ours(adjoint=Implicit(solver="lu"))
    m["unrolled"] = _unrolled(k_unroll)
    try:
        m["torchdeq"] = _torchdeq(f_stop_mode="rel", b_stop_mode="rel")
        m["torchdeq anderson"] = _torchdeq(f_solver="anderson", b_solver="anderson", f_stop_mode="rel",
                                           b_stop_mode="rel")
        m["torchdeq abs"] = _torchdeq(f_stop_mode="abs", b_stop_mode="abs")
    except ImportError:
        pass
    return m


# ----------------------------------------------------------------------------- measurement

class Case(NamedTuple):
    label: str
    rho: float           # ‖W‖₂
    n: int
    batch: int


def _cases(quick: bool) -> list:
    if quick:  # the same code paths at a size where everything takes milliseconds
        return [Case("contractive", 0.9, 16, 4), Case("slow", 1.5, 16, 4)]
    return [Case("contractive", 0.9, 256, 64), Case("slow", 2.0, 256, 64)]


def _instance(case: Case, dtype, seed=0, scale=1.0, device="cpu"):
    n, batch = case.n, case.batch
    cell = Cell(n, rho=case.rho, scale=scale, seed=seed, dtype=dtype).to(device)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, n, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_()
    w = torch.randn(batch, n, generator=g, dtype=torch.float64).to(device, dtype)
    return cell, x, w


def _grads(method, cell, x, w):
    z, ok = method(cell, x)
    return z, ok, torch.autograd.grad((z * w).sum(), [*cell.parameters(), x])


def _exact(case, seed, device="cpu"):
    """The exact implicit gradient in float64 (forward to 1e-13, dense LU adjoint)."""
    cell, x, w = _instance(case, torch.float64, seed, device=device)
    z = deq(cell, x, rtol=1e-13, max_iter=500, adjoint=Implicit(solver="lu"))
    return torch.autograd.grad((z * w).sum(), [*cell.parameters(), x])


def _picard_count(cell, x, tol=TOL, cap=300):
    """Picard iterations until ‖f(z) − z‖ ≤ tol ‖f(0)‖ for every sample (the unrolled depth)."""
    with torch.no_grad():
        z = torch.zeros_like(x)
        r0 = (cell(z, x) - z).norm(dim=-1)
        for k in range(cap):
            fz = cell(z, x)
            if bool(((fz - z).norm(dim=-1) <= tol * r0).all()):
                return k
            z = fz
    return cap


def _rel_residual(cell, x, z):
    with torch.no_grad():
        fz = cell(z, x)
        return float(((fz - z).norm(dim=-1) / fz.norm(dim=-1)).max())


def _measure(case, dtype, *, seed, warmup, repeats, with_lu, device="cpu"):
    cell, x, w = _instance(case, dtype, seed, device=device)
    exact = _exact(case, seed, device)
    scale = max(float(g.abs().max()) for g in exact)
    methods = _methods(_picard_count(cell, x), with_lu)
    rows, runnable_f, runnable_fb = {}, {}, {}
    for name, fn in methods.items():
        row = {"case": case.label, "dtype": _name(dtype), "method": name}
        try:
            z, ok, g = _grads(fn, cell, x, w)
            row["grad_rel_err"] = max(float((a.double() - b).abs().max()) for a, b in zip(g, exact)) / scale
            row["rel_residual"] = _rel_residual(cell, x, z.detach())
            row["converged"] = None if ok is None else bool(ok)
            runnable_f[name] = (lambda fn=fn: fn(cell, x))
            runnable_fb[name] = (lambda fn=fn: _grads(fn, cell, x, w))
        except Exception as err:  # a method that cannot run this case: note it, do not time it
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:100]}"
        rows[name] = row
    # forward and forward+backward of every method interleaved in one run: a neighbour's load hits all alike
    t = time_callables({**{(k, "fwd"): f for k, f in runnable_f.items()},
                        **{(k, "total"): f for k, f in runnable_fb.items()}}, warmup=warmup, repeats=repeats,
                       device=device)
    params = [*cell.parameters(), x]
    for name in runnable_f:
        # the minimum over the repeats: the least-disturbed sample on a shared machine (medians kept too)
        rows[name].update(fwd_ms=1e3 * t[name, "fwd"].min, total_ms=1e3 * t[name, "total"].min,
                          fwd_median_ms=1e3 * t[name, "fwd"].median, total_median_ms=1e3 * t[name, "total"].median,
                          saved_mb=saved_bytes(lambda fn=methods[name]: fn(cell, x), exclude=params) / 2 ** 20)
    return list(rows.values()), (cell, x, w)


def _name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _tolerance_check(case, *, seed, device="cpu"):
    """float32, a state of size ~100 per entry: who reaches its tolerance, with what true residual?

    An absolute tolerance of 1e-6 on ``‖f(z) − z‖`` is below float32's rounding of a state this
    large: a solver using it cannot meet it, runs to its iteration limit and returns its best iterate.
    A relative tolerance is met (or a failure is reported).
    """
    cell, x, w = _instance(case, torch.float32, seed, scale=100.0, device=device)
    rows = []
    for name, fn in _methods(0, False).items():
        if name not in ("ours", "ours picard", "torchdeq", "torchdeq abs"):
            continue
        row = {"method": name}
        try:
            t0 = time.perf_counter()
            z, ok, _ = _grads(fn, cell, x, w)
            row["total_ms"] = 1e3 * (time.perf_counter() - t0)
            with torch.no_grad():
                r = (cell(z, x) - z).norm(dim=-1)
                row.update(converged=bool(ok), abs_residual=float(r.max()),
                           rel_residual=float((r / cell(z, x).norm(dim=-1)).max()))
        except Exception as err:
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:100]}"
        rows.append(row)
    return rows


def _as_pair(res):
    return res.y, res.info


def _breakdown(cell, x, w, *, warmup, repeats):
    """Per-iteration cost of each solver against the cell (forward) or one VJP (adjoint)."""
    xd = x.detach()
    F = lambda z, x: cell(z, x) - z  # noqa: E731
    with torch.no_grad():
        zs = deq(cell, xd, max_iter=500).detach()  # to the dtype's default tolerance: z* at rounding level
    _, vjp = torch.func.vjp(lambda z: cell(z, xd) - z, zs)
    mv = lambda v: vjp(v)[0]  # noqa: E731
    wd = w.detach()
    fns = {
        "cell f(z, x)": (lambda: cell(zs, xd), None),
        "vjp (∂f/∂z)ᵀv": (lambda: mv(wd), None),
        "forward anderson": (lambda: get_root_solver("anderson")(F, torch.zeros_like(xd), (xd,), batch_dims=1,
                                                                   rtol=TOL), "cell f(z, x)"),
        "forward anderson lazy": (lambda: get_root_solver("anderson")(F, torch.zeros_like(xd), (xd,), batch_dims=1,
                                                                        rtol=TOL, start_rate=ANDERSON_START_RATE),
                                  "cell f(z, x)"),
        "forward picard": (lambda: get_root_solver("picard")(F, torch.zeros_like(xd), (xd,), batch_dims=1,
                                                               rtol=TOL), "cell f(z, x)"),
        "adjoint picard": (lambda: picard_adjoint(mv, wd, rtol=TOL, atol=0.0, max_iter=200), "vjp (∂f/∂z)ᵀv"),
        "adjoint anderson": (lambda: _as_pair(get_root_solver("anderson")(lambda v: mv(v) - wd, torch.zeros_like(wd),
                                                                          (), batch_dims=1, rtol=TOL)),
                             "vjp (∂f/∂z)ᵀv"),
        "adjoint gmres": (lambda: gmres(mv, wd, rtol=TOL), "vjp (∂f/∂z)ᵀv"),
    }
    with torch.no_grad():
        t = time_callables({k: v[0] for k, v in fns.items()}, warmup=warmup, repeats=repeats, device=x.device)
        rows = []
        for name, (fn, unit) in fns.items():
            out = fn()
            info = out[1] if isinstance(out, tuple) and not isinstance(out, torch.Tensor) else None
            its = int(info.iterations.max()) if info is not None else 1
            ms = 1e3 * t[name].min
            row = {"what": name, "ms": ms, "iterations": its, "ms_per_iter": ms / max(its, 1)}
            if unit is not None:
                row["overhead_per_iter_ms"] = row["ms_per_iter"] - 1e3 * t[unit].min
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------- report

_COLUMNS = [("case", "case", ""), ("dtype", "dtype", ""), ("method", "method", ""), ("fwd_ms", "fwd ms", ".1f"),
            ("total_ms", "fwd+bwd ms", ".1f"), ("ratio", "total/torchdeq", ".2f"), ("saved_mb", "saved MB", ".3f"),
            ("saved_ratio", "saved/torchdeq", ".2f"), ("grad_rel_err", "grad err", ".1e"),
            ("rel_residual", "rel resid", ".1e"), ("conv", "converged", ""), ("error", "note", "")]
_BREAKDOWN = [("dtype", "dtype", ""), ("what", "solve", ""), ("ms", "ms", ".2f"), ("iterations", "iters", ""),
              ("ms_per_iter", "ms/iter", ".3f"), ("overhead_per_iter_ms", "overhead/iter ms", ".3f")]
_TOLERANCE = [("method", "method", ""), ("conv", "own rule met", ""), ("abs_residual", "max ‖f(z)−z‖", ".1e"),
              ("rel_residual", "max rel", ".1e"), ("total_ms", "fwd+bwd ms", ".0f"), ("error", "note", "")]


def _conv(r):
    r["conv"] = {True: "yes", False: "NO", None: "—"}[r.get("converged")]


def _ratios(rows):
    by = {(r["case"], r["dtype"], r["method"]): r for r in rows}
    for r in rows:
        peer = by.get((r["case"], r["dtype"], PEER))
        if peer and r.get("total_ms") and peer.get("total_ms"):
            r["ratio"] = r["total_ms"] / peer["total_ms"]
            r["saved_ratio"] = r["saved_mb"] / peer["saved_mb"] if peer["saved_mb"] else None
        _conv(r)


def _summary(rows, tolerance):
    misses, notes = [], []
    by = {(r["case"], r["dtype"], r["method"]): r for r in rows}
    for case, dtype in sorted({(r["case"], r["dtype"]) for r in rows}):
        key = f"{case} {dtype}"
        ours, peer = by.get((case, dtype, "ours"), {}), by.get((case, dtype, PEER))
        if "error" in ours or not ours.get("converged"):
            misses.append(f"{key}: ours did not converge ({ours.get('error', '')})")
        if peer is None or "ratio" not in ours:
            notes.append(f"{key}: torchdeq not installed or failed: no ratio")
            continue
        if ours["ratio"] > TARGETS["time"]:
            misses.append(f"{key}: time ours/torchdeq = {ours['ratio']:.2f} > {TARGETS['time']}")
        if ours.get("saved_ratio") is not None and ours["saved_ratio"] > TARGETS["saved"]:
            misses.append(f"{key}: saved memory ours/torchdeq = {ours['saved_ratio']:.2f} > {TARGETS['saved']}")
    tol = {r["method"]: r for r in tolerance}
    if "ours" in tol and not tol["ours"].get("converged"):
        misses.append("float32 large state: ours did not converge")
    if "torchdeq abs" in tol and "converged" in tol["torchdeq abs"]:
        notes.append(f"float32 large state: torchdeq's absolute tolerance {TOL:g} "
                     f"{'met' if tol['torchdeq abs']['converged'] else 'NOT met (ran to its iteration limit)'}")
    return {"misses": misses, "targets_met": not misses, "notes": notes}


def run(quick: bool = False, out: Optional[str] = None, *, device="cpu", threads: int = 1, seed: int = 0,
        verbose: bool = True) -> dict:
    """Run the benchmark, print its tables, write JSON; return the results.

    Args:
        quick: width 16, batch 4, few repeats (seconds; timings mean little).
        out: JSON path (default ``bench-deq.json`` in the working directory).
        device: where to run (``"cpu"``, ``"cuda"``); CUDA work is synchronized before each timing.
        threads: ``torch.set_num_threads`` during the run (restored after).
        seed: seed of the instances.
        verbose: print the tables.

    Returns:
        ``{"benchmark", "settings", "machine", "targets", "methods", "breakdown", "tolerance",
        "summary"}``: ``methods`` has one row per (case, dtype, method) with ``fwd_ms``,
        ``total_ms``, ``ratio`` (total time / torchdeq's), ``saved_mb``, ``saved_ratio``,
        ``grad_rel_err`` (to the exact float64 implicit gradient), ``rel_residual``,
        ``converged`` (the method's own stopping rule) and ``error`` (a method that could not
        run); ``breakdown`` the per-iteration solver costs (contractive case); ``tolerance`` the
        float32 large-state convergence check.
    """
    cases = _cases(quick)
    settings = dict(quick=bool(quick), width=cases[0].n, batch=cases[0].batch, tol=TOL, seed=seed,
                    threads=threads, device=str(device), cases={c.label: {"rho": c.rho} for c in cases},
                    warmup=1 if quick else 2, repeats=2 if quick else 15)
    previous = configure_threads(threads)
    info = machine_info(str(device))
    t0 = time.perf_counter()
    rows, breakdown = [], []
    try:
        for case in cases:
            for dtype in (torch.float64, torch.float32):
                r, inst = _measure(case, dtype, seed=seed, warmup=settings["warmup"], repeats=settings["repeats"],
                                   with_lu=dtype == torch.float64, device=str(device))
                rows += r
                if case is cases[0]:
                    breakdown += [dict(b, dtype=_name(dtype)) for b in
                                  _breakdown(*inst, warmup=settings["warmup"], repeats=settings["repeats"])]
        tolerance = _tolerance_check(cases[0], seed=seed, device=str(device))
    finally:
        torch.set_num_threads(previous)
    settings["wall_s"] = time.perf_counter() - t0
    _ratios(rows)
    for r in tolerance:
        _conv(r)
    results = {"benchmark": "deq", "settings": settings, "machine": info, "targets": dict(TARGETS),
               "methods": rows, "breakdown": breakdown, "tolerance": tolerance,
               "summary": _summary(rows, tolerance)}
    if verbose:
        print(report(results))
    path = write_json(DEFAULT_OUT if out is None else out, results)
    if verbose:
        print(f"\nwrote {path}")
    return results


def report(results) -> str:
    """The tables as text."""
    s, m = results["settings"], results["machine"]
    load = m.get("load_avg_1m")
    cases = ", ".join(f"{k} ‖W‖₂ = {v['rho']}" for k, v in s["cases"].items())
    head = (f"DEQ benchmark — width {s['width']}, batch {s['batch']}, tol {s['tol']:g} relative ({cases}), "
            f"min of {s['repeats']} interleaved repeats, {m['torch_threads']} thread(s), torch {m['torch']}, "
            f"{m['cpu_count']} CPUs, load average {'n/a' if load is None else format(load, '.1f')}")
    lines = [format_table(results["methods"], _COLUMNS, head), "",
             format_table(results["breakdown"], _BREAKDOWN, "cost per solver iteration, contractive case "
                          "(overhead = ms/iter − one cell evaluation (forward) or one VJP (adjoint))"), "",
             format_table(results["tolerance"], _TOLERANCE, f"float32, state entries ~100 (‖z*‖ ~ 1e3), "
                          f"tolerance {s['tol']:g}: relative (ours, torchdeq) vs absolute (torchdeq abs)"), ""]
    summ = results["summary"]
    lines += [f"note: {x}" for x in summ["notes"]]
    lines.append("targets: all met" if summ["targets_met"] else "targets MISSED: " + "; ".join(summ["misses"]))
    return "\n".join(lines)
