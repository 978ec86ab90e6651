"""Shared benchmark machinery: threads, timing, memory, gradient agreement, output.

Every benchmark of :mod:`implicitdiff.bench` measures *ratios* — ours against a
peer, in one process, on one machine, with the same threads — because absolute
times on a shared machine say little.  This module gives them one way to:

* pin the threads (:func:`thread_env` for the environment, set **before**
  ``torch`` is imported; :func:`configure_threads` for ``torch`` itself).  On a
  shared 2-core machine a busy-waiting BLAS at 2 threads can be 100× slower
  than at 1, so the default is one thread and ``OMP_WAIT_POLICY=PASSIVE``;
* time callables (:func:`time_callables`): warm-up, then *interleaved*
  repeats (one sample of each callable per round, the order rotated every
  round) so that a neighbour's load hits every contender alike; the median is
  reported.  Calls shorter than ``min_sample_s`` are looped inside a sample;
* measure memory: :func:`saved_bytes` (what autograd keeps for the backward,
  inputs excluded — meaningful on every device; it lives in
  :mod:`implicitdiff.checks.memory`, where tests use it) and
  :func:`cuda_peak_bytes` (``None`` off CUDA);
* compare gradients (:func:`max_abs_diff`, :func:`central_difference`);
* report (:func:`format_table`, :func:`write_json`, :func:`plot_ratios` —
  matplotlib is imported lazily and the plot skipped with a message if absent).

No peer library is imported here: a benchmark imports its optional peers inside
the function that uses them and skips them cleanly when they are missing.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from typing import Callable, Mapping, NamedTuple, Optional, Sequence

import torch

from ..checks.memory import saved_bytes, saved_bytes_and_output  # noqa: F401  (re-exported)

__all__ = [
    "thread_env",
    "configure_threads",
    "machine_info",
    "Timing",
    "time_callables",
    "saved_bytes",
    "saved_bytes_and_output",
    "cuda_peak_bytes",
    "max_abs_diff",
    "central_difference",
    "format_table",
    "write_json",
    "plot_ratios",
]

_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def thread_env(num_threads: int = 1, *, environ: Optional[dict] = None) -> dict:
    """Set the threading environment variables that must precede ``import torch``.

    ``OMP_WAIT_POLICY=PASSIVE`` (idle OpenMP threads sleep instead of spinning)
    and ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` / ``OPENBLAS_NUM_THREADS`` are
    set unless already present (a user's choice wins).  They take effect only
    in a process that has not loaded its BLAS yet: a script calls this first,
    before importing ``torch`` — copy these lines rather than importing this
    module, which imports ``torch``::

        import os
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # and OMP_/MKL_NUM_THREADS

    Returns the variables as they are now set.
    """
    env = os.environ if environ is None else environ
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    for var in _THREAD_VARS:
        env.setdefault(var, str(int(num_threads)))
    return {k: env.get(k) for k in ("OMP_WAIT_POLICY",) + _THREAD_VARS}


def configure_threads(num_threads: int = 1) -> int:
    """``torch.set_num_threads(num_threads)``; returns the previous count (to restore it)."""
    if int(num_threads) < 1:
        raise ValueError(f"num_threads must be ≥ 1, got {num_threads}")
    previous = torch.get_num_threads()
    torch.set_num_threads(int(num_threads))
    return previous


def machine_info(device: str = "cpu") -> dict:
    """What a reader needs to interpret the timings: host, threads, BLAS, torch, device."""
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "blas": "mkl" if torch.backends.mkl.is_available() else "other",
        "env": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY",) + _THREAD_VARS},
        "device": str(device),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


class Timing(NamedTuple):
    """Seconds per call over ``repeats`` samples (each the mean of ``number`` calls)."""

    median: float
    q25: float
    q75: float
    min: float
    repeats: int
    number: int


def _sync(device) -> None:
    if device is not None and str(device).startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def _quantile(sorted_xs: Sequence[float], q: float) -> float:
    pos = q * (len(sorted_xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def time_callables(
    fns: Mapping[str, Callable[[], object]],
    *,
    warmup: int = 2,
    repeats: int = 11,
    min_sample_s: float = 0.0,
    device=None,
) -> dict[str, Timing]:
    """Time several zero-argument callables against each other.

    Each callable runs ``warmup`` times (then once more to calibrate), and
    ``number`` — the smallest count whose run lasts ``min_sample_s`` — is fixed
    per callable.  Then ``repeats`` rounds follow; each round takes one sample
    (``number`` calls, averaged) of every callable, starting from a rotated
    position so that no callable always runs first.  CUDA work is synchronized
    around each sample.  A callable that raises propagates the error: probe
    peers for errors before timing them.

    Returns ``{name: Timing}`` in seconds per call.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be ≥ 1, got {repeats}")
    names = list(fns)
    number = {}
    for name in names:
        fn = fns[name]
        for _ in range(warmup):
            fn()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        once = max(time.perf_counter() - t0, 1e-9)
        number[name] = max(1, math.ceil(min_sample_s / once)) if min_sample_s > 0 else 1
    samples: dict[str, list] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            fn, k = fns[name], number[name]
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(k):
                fn()
            _sync(device)
            samples[name].append((time.perf_counter() - t0) / k)
    out = {}
    for name in names:
        xs = sorted(samples[name])
        out[name] = Timing(_quantile(xs, 0.5), _quantile(xs, 0.25), _quantile(xs, 0.75), xs[0], repeats, number[name])
    return out


def cuda_peak_bytes(fn: Callable[[], object], device) -> Optional[int]:
    """Peak CUDA memory allocated during ``fn()`` above what was allocated before; ``None`` off CUDA."""
    if device is None or not str(device).startswith("cuda") or not torch.cuda.is_available():
        return None
    dev = torch.device(device)
    torch.cuda.synchronize(dev)
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    fn()
    torch.cuda.synchronize(dev)
    return int(torch.cuda.max_memory_allocated(dev) - base)


def max_abs_diff(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> float:
    """``max |x − y|`` over paired tensors (``nan`` if any pair holds a NaN)."""
    worst = 0.0
    for x, y in zip(xs, ys):
        d = (x.detach() - y.detach()).abs()
        if d.numel():
            if bool(torch.isnan(d).any()):
                return float("nan")
            worst = max(worst, float(d.max()))
    return worst


def central_difference(f: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], h: float = 1e-6):
    """Gradient of the scalar ``f(*inputs)`` by central differences, entry by entry.

    ``(f(x + h eᵢ) − f(x − h eᵢ)) / 2h``: truncation error ``O(h²)``, rounding
    ``O(eps/h)``; with float64 and ``h = 1e-6`` about ``1e-9`` relative.  Costs
    two evaluations per entry — for small instances only.
    """
    xs = [x.detach().clone() for x in inputs]
    grads = []
    with torch.no_grad():
        for i, x in enumerate(xs):
            g = torch.zeros_like(x)
            flat, gflat = x.view(-1), g.view(-1)
            for j in range(flat.numel()):
                v = float(flat[j])
                flat[j] = v + h
                fp = float(f(*xs))
                flat[j] = v - h
                fm = float(f(*xs))
                flat[j] = v
                gflat[j] = (fp - fm) / (2 * h)
            grads.append(g)
    return grads


def _fmt(v, spec: str) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return format(v, spec)
    return str(v)


def format_table(rows: Sequence[Mapping], columns: Sequence[tuple], title: str = "") -> str:
    """A plain-text table; ``columns`` are ``(key, header, format_spec)``; ``None`` prints as ``—``."""
    cells = [[h for _, h, _ in columns]]
    for row in rows:
        cells.append([_fmt(row.get(k), spec) for k, _, spec in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = [title] if title else []
    for i, r in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if i and j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return _jsonable(x.tolist())
    return x


def write_json(path: str, results: Mapping) -> str:
    """Write ``results`` as JSON (NaN → ``null``, ±Inf → strings); returns the path."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w") as fh:
        json.dump(_jsonable(dict(results)), fh, indent=2)
        fh.write("\n")
    return path


def plot_ratios(rows: Sequence[Mapping], path: str, *, title: str = "", targets: Mapping[str, float] = ()) -> Optional[str]:
    """Bar chart of ``row["ratio"]`` per ``row["label"]`` on a log axis; ``None`` (and a
    message) if matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print(f"matplotlib is not installed: skipping the plot {path} (pip install matplotlib)")
        return None
    pts = [r for r in rows if r.get("ratio") is not None and math.isfinite(r["ratio"])]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(pts) + 1.5))
    ax.barh([r["label"] for r in pts], [r["ratio"] for r in pts], color="tab:blue")
    ax.axvline(1.0, color="k", lw=0.8)
    for (name, value), color in zip(dict(targets).items(), ("tab:red", "tab:green", "tab:orange", "tab:purple")):
        ax.axvline(value, color=color, ls="--", lw=1.0, label=name)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.set_xlabel("time ratio ours / peer (lower is better)")
    ax.invert_yaxis()
    if targets:
        ax.legend(loc="lower right", fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
