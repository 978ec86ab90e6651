"""Benchmark: dense ``linear_solve`` forward + backward against PyTorch's own solves.

What is measured, in one process, float64, medians of interleaved repeats
(:mod:`._harness`), as *ratios ours / peer* (lower is better):

* the time of ``y = solve(A, b)``, ``loss = (y * w).sum()`` with a fixed random
  ``w``, and ``torch.autograd.grad(loss, (A, b))`` — the forward and the
  backward together;
* the bytes autograd saves for the backward (inputs excluded);
* ``max |∇ours − ∇peer|`` over ``(Ā, b̄)`` on the same instance;
* on small instances, every method's gradient against float64 central
  differences — this is where a peer's backward that is unsupported (it
  raises) or wrong (it disagrees) shows up.  For the rank-deficient kind
  ``A = B C`` and the differences are taken in ``(B, C, b)``: the
  pseudo-inverse is differentiable only along perturbations that keep the rank.

=============================  ========================================  =================
case                           ours                                      peers
=============================  ========================================  =================
square n = 100, 500, 1000      ``linear_solve(A, b)`` (LU)                ``torch.linalg.solve``
batch 64 × (64 × 64)           ``linear_solve(A, b)`` (batched LU)        ``torch.linalg.solve``
wide 200 × 400                 ``linear_solve(A, b)`` (min-norm, QR)      ``pinv(A) @ b``, ``lstsq``
tall 400 × 200                 ``linear_solve(A, b)`` (least squares)     ``pinv(A) @ b``, ``lstsq``
rank-deficient 200², rank 150  ``selection="min_norm"``, ``solver="svd"``  ``pinv(A) @ b``, ``lstsq``
                               and ``solver="auto"`` (LU, then SVD)
=============================  ========================================  =================

Targets (DESIGN §5): square ≤ 1.1 × ``torch.linalg.solve`` (≤ 1.5 × at n = 100), a batch of 64
systems 64 × 64 ≤ 1.2 ×; non-square
≥ 5 × faster than ``lstsq`` and ``pinv`` (ratio ≤ 0.2).  The rank-deficient
case is reported without a target.

Example:
    >>> from implicitdiff.bench.linear import run
    >>> results = run(quick=True, out="/tmp/bench-linear.json", plot=False)  # doctest: +SKIP
    >>> sorted(results)                                                      # doctest: +SKIP
    ['benchmark', 'comparisons', 'fd_checks', 'machine', 'methods', 'settings', 'summary', 'targets']
"""

from __future__ import annotations

import math
import time
from typing import Callable, NamedTuple, Optional

import torch

from ..layers.linear_solve import linear_solve
from ._harness import (
    central_difference,
    configure_threads,
    cuda_peak_bytes,
    format_table,
    machine_info,
    max_abs_diff,
    plot_ratios,
    saved_bytes,
    time_callables,
    write_json,
)

__all__ = ["run", "DEFAULT_OUT", "TARGETS"]

DEFAULT_OUT = "bench-linear.json"
#: the largest acceptable ratio ours / peer, per (case kind, peer)
TARGETS = {
    ("square", "torch.solve"): 1.1,
    ("batch", "torch.solve"): 1.2,
    ("wide", "pinv"): 0.2,
    ("wide", "lstsq"): 0.2,
    ("tall", "pinv"): 0.2,
    ("tall", "lstsq"): 0.2,
}
#: DESIGN §5 / issue 15: a small square solve (n ≤ SMALL_N) has the looser target 1.5 × torch.linalg.solve
SMALL_N, SMALL_SQUARE_TARGET = 100, 1.5
_FD_RTOL = 1e-6  # a gradient within this (relative to its size) of central differences is "ok"


# ----------------------------------------------------------------------------- methods
# Each method maps (A (*, m, n), b (*, m)) to y (*, n), differentiably.

def _ours(A, b):
    return linear_solve(A, b)


def _ours_svd(A, b):
    return linear_solve(A, b, selection="min_norm", solver="svd")


def _ours_auto_min_norm(A, b):
    return linear_solve(A, b, selection="min_norm")


def _torch_solve(A, b):
    return torch.linalg.solve(A, b)


def _pinv(A, b):
    return (torch.linalg.pinv(A) @ b.unsqueeze(-1)).squeeze(-1)


def _lstsq(A, b):
    return torch.linalg.lstsq(A, b.unsqueeze(-1)).solution.squeeze(-1)


_OURS = {"square": {"ours": _ours}, "batch": {"ours": _ours}, "wide": {"ours": _ours}, "tall": {"ours": _ours},
         "rank_deficient": {"ours svd": _ours_svd, "ours auto": _ours_auto_min_norm}}
_PEERS = {"square": {"torch.solve": _torch_solve}, "batch": {"torch.solve": _torch_solve},
          "wide": {"pinv": _pinv, "lstsq": _lstsq}, "tall": {"pinv": _pinv, "lstsq": _lstsq},
          "rank_deficient": {"pinv": _pinv, "lstsq": _lstsq}}


# ----------------------------------------------------------------------------- instances

class Case(NamedTuple):
    label: str
    kind: str  # "square" | "batch" | "wide" | "tall" | "rank_deficient"
    batch: int  # 0: unbatched
    m: int
    n: int
    rank: Optional[int] = None


def _cases(quick: bool) -> list:
    if quick:
        return [Case("square n=8", "square", 0, 8, 8), Case("square n=32", "square", 0, 32, 32),
                Case("batch 4x(8x8)", "batch", 4, 8, 8), Case("wide 10x20", "wide", 0, 10, 20),
                Case("tall 20x10", "tall", 0, 20, 10), Case("rank-def 12x12 r=8", "rank_deficient", 0, 12, 12, 8)]
    return [Case("square n=100", "square", 0, 100, 100), Case("square n=500", "square", 0, 500, 500),
            Case("square n=1000", "square", 0, 1000, 1000), Case("batch 64x(64x64)", "batch", 64, 64, 64),
            Case("wide 200x400", "wide", 0, 200, 400), Case("tall 400x200", "tall", 0, 400, 200),
            Case("rank-def 200x200 r=150", "rank_deficient", 0, 200, 200, 150)]


def _factors(case: Case, gen, dtype, device):
    """The tensors an instance is built from: ``(A,)`` or, rank-deficient, ``(B, C)`` with ``A = B C``."""
    kw = dict(generator=gen, dtype=dtype)
    bshape = (case.batch,) if case.batch else ()
    m, n = case.m, case.n
    if case.kind == "rank_deficient":
        r = case.rank
        B = torch.randn(*bshape, m, r, **kw) / math.sqrt(r)
        C = torch.randn(*bshape, r, n, **kw)
        return tuple(t.to(device) for t in (B, C))
    A = torch.randn(*bshape, m, n, **kw) / math.sqrt(max(m, n))
    if m == n:  # spectrum in the disc |z − 2| ≤ 1: well conditioned, so gradients compare to ~1e-12
        A = A + 2 * torch.eye(n, dtype=dtype)
    return (A.to(device),)


def _instance(case: Case, seed: int, dtype, device):
    gen = torch.Generator().manual_seed(seed)
    parts = _factors(case, gen, dtype, device)
    bshape = (case.batch,) if case.batch else ()
    b = torch.randn(*bshape, case.m, generator=gen, dtype=dtype).to(device)
    w = torch.randn(*bshape, case.n, generator=gen, dtype=dtype).to(device)
    return parts, b, w


def _make_A(parts):
    return parts[0] @ parts[1] if len(parts) == 2 else parts[0]


# ----------------------------------------------------------------------------- measurement

def _step(method: Callable, A, b, w):
    """One forward + backward: ``∇_(A, b) (method(A, b) · w).sum()``."""
    y = method(A, b)
    return torch.autograd.grad((y * w).sum(), (A, b))


def _short(err: BaseException) -> str:
    msg = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {msg[:120]}"


def _measure_case(case: Case, *, seed, dtype, device, warmup, repeats, min_sample_s):
    parts, b0, w = _instance(case, seed, dtype, device)
    A = _make_A(parts).detach().requires_grad_(True)
    b = b0.detach().requires_grad_(True)
    methods = {**_OURS[case.kind], **_PEERS[case.kind]}
    rows, grads, ys, runnable = {}, {}, {}, {}
    for name, fn in methods.items():
        row = {"case": case.label, "kind": case.kind, "method": name, "shape": _shape(case)}
        try:
            with torch.no_grad():
                ys[name] = fn(A, b)
            grads[name] = _step(fn, A, b, w)
            if not all(bool(torch.isfinite(g).all()) for g in grads[name]):
                raise FloatingPointError("non-finite gradient")
            runnable[name] = (lambda fn=fn: _step(fn, A, b, w))
        except Exception as err:  # a peer that cannot do this case: note it, do not time it
            row["error"] = _short(err)
            grads.pop(name, None)
        rows[name] = row
    timings = time_callables(runnable, warmup=warmup, repeats=repeats, min_sample_s=min_sample_s, device=device)
    for name, t in timings.items():
        fn = methods[name]
        rows[name].update(time_ms=1e3 * t.median, q25_ms=1e3 * t.q25, q75_ms=1e3 * t.q75, repeats=t.repeats,
                          number=t.number,
                          saved_mb=saved_bytes(lambda: fn(A, b), exclude=(A, b)) / 2**20,
                          peak_cuda_mb=_mb(cuda_peak_bytes(lambda: _step(fn, A, b, w), device)))
    comparisons = []
    for ours in _OURS[case.kind]:
        for peer in _PEERS[case.kind]:
            comparisons.append(_compare(case, ours, peer, rows, grads, ys))
    return list(rows.values()), comparisons


def _compare(case, ours, peer, rows, grads, ys):
    o, p = rows[ours], rows[peer]
    target = TARGETS.get((case.kind, peer))
    if case.kind == "square" and case.n <= SMALL_N and target is not None:
        target = SMALL_SQUARE_TARGET
    c = {"case": case.label, "kind": case.kind, "ours": ours, "peer": peer, "ours_ms": o.get("time_ms"),
         "peer_ms": p.get("time_ms"), "ratio": None, "target": target, "met": None, "grad_diff": None,
         "grad_scale": None, "y_diff": None, "ours_saved_mb": o.get("saved_mb"), "peer_saved_mb": p.get("saved_mb"),
         "note": p.get("error") or o.get("error") or ""}
    if c["ours_ms"] is not None and c["peer_ms"] is not None:
        c["ratio"] = c["ours_ms"] / c["peer_ms"]
        c["met"] = None if target is None else bool(c["ratio"] <= target)
    if ours in grads and peer in grads:
        c["grad_diff"] = max_abs_diff(grads[ours], grads[peer])
        c["grad_scale"] = max(float(g.abs().max()) for g in grads[peer])
        c["y_diff"] = max_abs_diff([ys[ours]], [ys[peer]])
    return c


def _shape(case: Case) -> str:
    s = f"{case.m}x{case.n}"
    return f"{case.batch}x({s})" if case.batch else s


def _mb(nbytes):
    return None if nbytes is None else nbytes / 2**20


# ----------------------------------------------------------------------------- gradient checks

_FD_CASES = [Case("square 5x5", "square", 0, 5, 5), Case("batch 2x(4x4)", "batch", 2, 4, 4),
             Case("wide 3x6", "wide", 0, 3, 6), Case("tall 6x3", "tall", 0, 6, 3),
             Case("rank-def 6x6 r=3", "rank_deficient", 0, 6, 6, 3)]


def _fd_checks(*, seed, dtype, device):
    """Every method's gradient against central differences on small float64 instances."""
    out = []
    for case in _FD_CASES:
        parts, b, w = _instance(case, seed + 1, dtype, device)
        inputs = tuple(parts) + (b,)

        def loss(*xs, fn):
            return (fn(_make_A(xs[:-1]), xs[-1]) * w).sum()

        for name, fn in {**_OURS[case.kind], **_PEERS[case.kind]}.items():
            row = {"case": case.label, "kind": case.kind, "method": name, "fd_err": None, "status": "ok", "note": ""}
            try:
                leaves = [x.detach().requires_grad_(True) for x in inputs]
                g = torch.autograd.grad(loss(*leaves, fn=fn), leaves)
                g_fd = central_difference(lambda *xs: loss(*xs, fn=fn), inputs)
                err = max_abs_diff(g, g_fd)
                scale = max(1.0, max(float(t.abs().max()) for t in g_fd))
                row["fd_err"] = err
                if not err <= _FD_RTOL * scale:
                    row["status"] = "wrong"
                    row["note"] = f"gradient differs from finite differences by {err:.1e}"
            except Exception as err:  # e.g. a backward that is not implemented for this shape
                row["status"], row["note"] = "unsupported", _short(err)
            out.append(row)
    return out


# ----------------------------------------------------------------------------- report

_COMPARE_COLUMNS = [("case", "case", ""), ("ours", "ours", ""), ("peer", "peer", ""), ("ours_ms", "ours ms", ".3f"),
                    ("peer_ms", "peer ms", ".3f"), ("ratio", "ours/peer", ".2f"), ("target", "target", ".2f"),
                    ("met_s", "met", ""), ("grad_diff", "max|dgrad|", ".1e"), ("ours_saved_mb", "saved MB ours", ".2f"),
                    ("peer_saved_mb", "peer", ".2f"), ("note", "note", "")]
_FD_COLUMNS = [("case", "case", ""), ("method", "method", ""), ("fd_err", "max|grad - fd|", ".1e"),
               ("status", "status", ""), ("note", "note", "")]


def _report(results) -> str:
    rows = [dict(c, met_s={True: "yes", False: "NO", None: "—"}[c["met"]]) for c in results["comparisons"]]
    m = results["machine"]
    head = (f"implicitdiff linear_solve benchmark — forward+backward, {results['settings']['dtype']}, "
            f"median of {results['settings']['repeats']} interleaved repeats, {m['torch_threads']} thread(s), "
            f"device {m['device']}, torch {m['torch']}, {m['cpu_count']} CPUs, load average at start "
            f"{'n/a' if m['load_avg_1m'] is None else format(m['load_avg_1m'], '.1f')}")
    lines = [format_table(rows, _COMPARE_COLUMNS, head), "",
             format_table(results["fd_checks"], _FD_COLUMNS, "gradients against float64 central differences "
                          "(small instances; rank-deficient: A = B C, differences in B, C, b)")]
    s = results["summary"]
    lines.append("")
    lines.append("peers' gradients: " + ("; ".join(s["peer_gradient_issues"]) or "all agree with finite differences"))
    lines.append("targets: all met" if not s["misses"] else "targets MISSED: " + "; ".join(s["misses"]))
    return "\n".join(lines)


def run(quick: bool = False, out: Optional[str] = None, *, device="cpu", threads: int = 1, seed: int = 0,
        plot: bool = True, verbose: bool = True) -> dict:
    """Run the benchmark, print its table, write JSON (and a plot); return the results.

    Args:
        quick: tiny sizes (n ≤ 32) and few repeats: seconds, for tests and smoke runs.
            Its timings mean little.
        out: JSON path (default ``bench-linear.json`` in the working directory);
            the plot goes beside it with a ``.png`` suffix.
        device: where to run (``"cpu"``, ``"cuda"``).  CUDA work is synchronized
            around each timed sample, and CUDA peak memory is recorded.
        threads: ``torch.set_num_threads`` for the run (restored afterwards).
            The OpenMP/BLAS environment (``OMP_WAIT_POLICY=PASSIVE``, …) can only
            be set before ``torch`` is imported: ``benchmarks/linear.py`` does.
        seed: seed of the random instances.
        plot: draw ``ratio`` bars (skipped with a message if matplotlib is absent).
        verbose: print the table.

    Returns:
        ``{"benchmark", "settings", "machine", "targets", "methods",
        "comparisons", "fd_checks", "summary"}`` — ``comparisons`` has one entry
        per (case, ours, peer) with ``ours_ms``, ``peer_ms``, ``ratio``,
        ``target``, ``met``, ``grad_diff`` (``max |∇ours − ∇peer|``), saved memory
        and a ``note`` (a peer's error, if it failed); ``fd_checks`` has
        ``fd_err`` and ``status`` (``"ok" | "wrong" | "unsupported"``) per method.
    """
    dtype = torch.float64
    device = str(device)
    settings = dict(quick=bool(quick), dtype="float64", seed=seed, threads=threads,
                    warmup=1 if quick else 2, repeats=3 if quick else 15, min_sample_s=0.0 if quick else 0.01)
    previous = configure_threads(threads)
    info = machine_info(device)
    t0 = time.perf_counter()
    try:
        methods, comparisons = [], []
        for case in _cases(quick):
            rows, comps = _measure_case(case, seed=seed, dtype=dtype, device=device, warmup=settings["warmup"],
                                        repeats=settings["repeats"], min_sample_s=settings["min_sample_s"])
            methods += rows
            comparisons += comps
        fd = _fd_checks(seed=seed, dtype=dtype, device=device)
    finally:
        torch.set_num_threads(previous)
    settings["wall_s"] = time.perf_counter() - t0
    misses = [f"{c['case']}: {c['ours']}/{c['peer']} = {c['ratio']:.2f} > {c['target']}"
              for c in comparisons if c["met"] is False]
    misses += sorted({f"{m['case']}: {m['method']} failed ({m['error']})" for m in methods
                      if "error" in m and m["method"].startswith("ours")})
    misses += [f"{r['case']}: {r['method']} gradient {r['status']}" for r in fd
               if r["status"] != "ok" and r["method"].startswith("ours")]
    results = {"benchmark": "linear", "settings": settings, "machine": info,
               "targets": {f"{k[0]} vs {k[1]}": v for k, v in TARGETS.items()},
               "methods": methods, "comparisons": comparisons, "fd_checks": fd,
               "summary": {"misses": misses, "targets_met": not misses,
                           "peer_gradient_issues": [f"{r['case']}: {r['method']} {r['status']} ({r['note']})"
                                                    for r in fd if r["status"] != "ok" and
                                                    not r["method"].startswith("ours")]}}
    if verbose:
        print(_report(results))
    path = write_json(DEFAULT_OUT if out is None else out, results)
    if verbose:
        print(f"\nwrote {path}")
    if plot:
        png = path[:-5] + ".png" if path.endswith(".json") else path + ".png"
        rows = [dict(c, label=f"{c['case']}: {c['ours']} / {c['peer']}") for c in comparisons]
        if plot_ratios(rows, png, title="linear_solve fwd+bwd time, ours / peer",
                       targets={"target 1.1x": 1.1, "target 0.2x": 0.2}) and verbose:
            print(f"wrote {png}")
    return results
