"""Higher-order derivatives through ``fixed_point`` at width 4000: cost relative to one first-order pass.

    implicitdiff bench higher_order [--quick] [--out FILE] [--device DEV]
    python benchmarks/higher_order.py [--n 4000] [--repeats 3] [--threads 1] [--quick] [--out FILE]

A contraction ``T(z) = tanh(W z + b)`` (``‖W‖₂ ≈ 0.5``), default solver and adjoint.  Times, in
one process, interleaved, min of repeats: one first-order forward+backward (``∂L/∂W`` of
``L = ‖z*‖²``), a Hessian-vector product (double backward of ``⟨∇_W L, V⟩``) and a
``torch.func.jvp`` of ``z*`` along ``V``; prints each as a multiple of the first-order pass
(target ≤ 10×) and its error against an independent reference (autograd through unrolled
Picard iterations to convergence).  Writes JSON (default ``bench-higher_order.json``).
"""

from __future__ import annotations

import os
import time
from typing import Optional

import torch

from ..layers.fixed_point import fixed_point
from ._harness import configure_threads, format_table, machine_info, write_json

__all__ = ["run", "TARGET"]

DEFAULT_OUT = "bench-higher_order.json"
TARGET = 10.0  # each higher-order task ≤ 10× one first-order forward+backward


def run(quick: bool = False, out: Optional[str] = None, *, n: Optional[int] = None, repeats: Optional[int] = None,
        threads: int = 1, device="cpu", verbose: bool = True) -> dict:
    """Run the benchmark, print its table, write JSON; return the results.

    ``quick``: width 200, one repeat (seconds; the ratios mean little).  ``n``, ``repeats``
    override the width (default 4000) and the repeats (default 3).
    """
    n = (200 if quick else 4000) if n is None else int(n)
    repeats = (1 if quick else 3) if repeats is None else int(repeats)
    previous = configure_threads(threads)
    try:
        rows, ok = _measure(n, repeats, device)
    finally:
        configure_threads(previous)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    title = (f"fixed point width {n}, float64, {threads} thread(s), min of {repeats} interleaved repeats, "
             f"torch {torch.__version__}, load average {load:.1f}")
    results = {"benchmark": "higher_order", "settings": dict(quick=bool(quick), n=n, repeats=repeats,
                                                             threads=threads, device=str(device)),
               "machine": machine_info(str(device)), "target": TARGET, "rows": rows,
               "summary": {"targets_met": ok, "misses": [f"{r['task']}: {r['ratio']:.2f}× (err {r['rel_err']:.1e})"
                                                         for r in rows if not r["met"]]}}
    if verbose:
        print(format_table(rows, _COLUMNS, title))
        print(f"target (each ≤ {TARGET:g}× first order, values equal to the reference):",
              "met" if ok else "NOT met")
    path = write_json(out or DEFAULT_OUT, results)
    if verbose:
        print(f"wrote {path}")
    return results


_COLUMNS = [("task", "task", ""), ("seconds", "s", ".3f"), ("ratio", "× first order", ".2f"),
            ("rel_err", "rel err vs unrolled", ".1e")]


def _measure(n: int, repeats: int, device):
    D = torch.float64
    g = torch.Generator().manual_seed(0)
    W0 = (torch.randn(n, n, generator=g, dtype=D) * (0.25 / n ** 0.5)).to(device)   # ‖W‖₂ ≈ 0.5
    b = torch.randn(n, generator=g, dtype=D).to(device)
    V = (torch.randn(n, n, generator=g, dtype=D) / n ** 0.5).to(device)

    def T(z, W, b):
        return torch.tanh(W @ z + b)

    def ours(W):
        return fixed_point(T, torch.zeros(n, dtype=D, device=W.device), W, b, rtol=1e-12)

    def unrolled(W, steps=70):                                         # 0.5^70 ≈ 1e-21
        z = torch.zeros(n, dtype=D, device=W.device)
        for _ in range(steps):
            z = T(z, W, b)
        return z

    def first_order(f):
        W = W0.clone().requires_grad_()
        return torch.autograd.grad(f(W).pow(2).sum(), W)[0]

    def hvp(f):
        W = W0.clone().requires_grad_()
        (gW,) = torch.autograd.grad(f(W).pow(2).sum(), W, create_graph=True)
        return torch.autograd.grad((gW * V).sum(), W)[0]

    def jvp(f):
        return torch.func.jvp(f, (W0,), (V,))[1]

    def sync():
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()

    tasks = {"first-order fwd+bwd": first_order, "Hessian-vector product": hvp, "torch.func.jvp": jvp}
    best = {k: float("inf") for k in tasks}
    out = {}
    for fn in tasks.values():  # warm-up, untimed (first calls import and allocate)
        fn(ours)
    for _ in range(repeats):
        for k, fn in tasks.items():
            sync()
            t = time.perf_counter()
            out[k] = fn(ours)
            sync()
            best[k] = min(best[k], time.perf_counter() - t)
    ref = {k: fn(unrolled) for k, fn in tasks.items()}
    base = best["first-order fwd+bwd"]
    rows = []
    for k in tasks:
        err = float((out[k] - ref[k]).norm() / ref[k].norm())
        ratio = best[k] / base
        rows.append(dict(task=k, seconds=best[k], ratio=ratio, rel_err=err, met=bool(ratio <= TARGET and err < 1e-6)))
    return rows, all(r["met"] for r in rows)
