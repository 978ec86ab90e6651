"""The prepared GPU run behind ``.ci/gpu``: the CUDA tests, then ``implicitdiff bench NAME --device
cuda --quick`` for linear, qp, deq and cone, within a time budget; one table.

Each step runs in a process of its own (a crash or a hang costs that step only), with the time
left in the budget as its limit; a step that cannot start in time is reported as skipped.
Outputs (JSON of every benchmark, the log of every step) go to ``--out``.  Nothing is installed:
the run uses the interpreter it is started with.

    python -m implicitdiff.bench._gpu [--device cuda] [--budget 480] [--out DIR] [--full] [--dry-run]

``--device cpu`` runs the same steps on the CPU (the tests of ``tests/test_devices.py`` that are
not CUDA-only), which is how the logic is tested on a machine without a GPU; ``--dry-run`` prints
the steps and runs nothing.  Exit codes: 0 every step passed; 1 a step failed, timed out or was
skipped; 2 a usage error (CUDA requested where there is none); 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from typing import NamedTuple, Optional, Sequence

__all__ = ["Step", "plan", "run_steps", "table", "main"]

BENCHMARKS = ("linear", "qp", "deq", "cone")
TESTS_SHARE = 0.4  # the tests may take at most this share of the budget


class Step(NamedTuple):
    name: str
    argv: tuple          # the command (``sys.executable`` first)
    json: Optional[str]  # the benchmark's JSON output, if any


class Outcome(NamedTuple):
    step: Step
    status: str          # "ok", "FAILED (exit N)", "TIMEOUT", "skipped (...)"
    seconds: float
    detail: str


def _available(name: str) -> bool:
    return importlib.util.find_spec(f"implicitdiff.bench.{name}") is not None


def plan(device: str, out_dir: str, *, quick: bool = True, benchmarks: Sequence[str] = BENCHMARKS) -> list:
    """The steps of the run: the device tests, then each benchmark that is installed."""
    py = sys.executable
    if device.startswith("cuda"):
        tests = (py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", "tests")
    else:
        tests = (py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not cuda", "tests/test_devices.py")
    steps = [Step("tests", tests, None)]
    for name in benchmarks:
        if not _available(name):
            continue
        path = os.path.join(out_dir, f"bench-{name}.json")
        argv = (py, "-m", "implicitdiff", "bench", name, "--device", device, "--out", path)
        steps.append(Step(f"bench {name}", argv + (("--quick",) if quick else ()), path))
    return steps


def _tail(text: str, n: int = 1) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return " | ".join(lines[-n:])[:160]


def _summary(path: Optional[str]) -> str:
    """What a benchmark's JSON says of its targets (``summary``), in a line."""
    if not path or not os.path.exists(path):
        return "no JSON written"
    try:
        with open(path) as f:
            summary = json.load(f).get("summary") or {}
    except (OSError, ValueError) as e:
        return f"unreadable JSON: {e}"
    misses = summary.get("misses")
    met = summary.get("targets_met")
    if misses:
        return f"{len(misses)} target(s) missed: " + "; ".join(map(str, misses))[:120]
    if met is not None:
        return "targets met" if met else "targets missed"
    return "no targets"


def run_steps(steps: Sequence[Step], *, budget_s: float, out_dir: str, env: Optional[dict] = None) -> list:
    """Run ``steps`` in order within ``budget_s`` seconds; the tests get at most ``TESTS_SHARE`` of it."""
    os.makedirs(out_dir, exist_ok=True)
    deadline = time.monotonic() + budget_s
    outcomes = []
    for step in steps:
        left = deadline - time.monotonic()
        limit = min(left, TESTS_SHARE * budget_s) if step.name == "tests" else left
        if limit < 1:
            outcomes.append(Outcome(step, "skipped (time budget spent)", 0.0, ""))
            continue
        print(f"[gpu run] {step.name}: {' '.join(step.argv[1:])} (limit {limit:.0f} s)", flush=True)
        log = os.path.join(out_dir, step.name.replace(" ", "-") + ".log")
        t0 = time.monotonic()
        try:
            proc = subprocess.run(step.argv, capture_output=True, text=True, timeout=limit, env=env)
            status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
            text = proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            status = "TIMEOUT"
            text = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
                           for x in (e.stdout, e.stderr))
        seconds = time.monotonic() - t0
        with open(log, "w") as f:
            f.write(text)
        detail = _tail(text) if step.json is None or status != "ok" else _summary(step.json)
        outcomes.append(Outcome(step, status, seconds, detail))
    return outcomes


def table(outcomes: Sequence[Outcome], *, device: str, budget_s: float) -> str:
    """The one table of the run."""
    rows = [("step", "status", "seconds", "result")]
    rows += [(o.step.name, o.status, f"{o.seconds:.1f}", o.detail) for o in outcomes]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    total = sum(o.seconds for o in outcomes)
    lines = [f"GPU run on {device}: {total:.0f} s of a {budget_s:.0f} s budget"]
    for k, r in enumerate(rows):
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3])
        if k == 0:
            lines.append("  " + "  ".join("-" * w for w in widths) + "  " + "-" * 6)
    return "\n".join(lines)


def _device_problem(device: str) -> Optional[str]:
    if device == "cpu":
        return None
    if not device.startswith("cuda"):
        return f"unknown --device {device!r}; use cuda, cuda:N or cpu"
    import torch

    if not torch.cuda.is_available():
        return (f"--device {device}: CUDA is not available (torch {torch.__version__}, "
                f"torch.version.cuda = {torch.version.cuda}); this script needs a machine with a GPU "
                f"(or --device cpu to exercise the same steps on the CPU)")
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog=".ci/gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu to test the script")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for the whole run (default 480)")
    parser.add_argument("--out", default="gpu-run", help="folder of the JSON and logs (default gpu-run)")
    parser.add_argument("--full", action="store_true", help="full benchmark sizes instead of --quick")
    parser.add_argument("--dry-run", action="store_true", help="print the steps, run nothing")
    args = parser.parse_args(argv)
    if not args.budget > 0:
        parser.error(f"--budget must be a positive number of seconds, got {args.budget}")
    steps = plan(args.device, args.out, quick=not args.full)
    if args.dry_run:
        for step in steps:
            print(f"{step.name}: {' '.join(step.argv)}")
        return 0
    problem = _device_problem(args.device)
    if problem:
        print(f".ci/gpu: error: {problem}", file=sys.stderr)
        return 2
    env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    try:
        outcomes = run_steps(steps, budget_s=args.budget, out_dir=args.out, env=env)
    except KeyboardInterrupt:
        print(".ci/gpu: interrupted", file=sys.stderr)
        return 130
    print(table(outcomes, device=args.device, budget_s=args.budget))
    return 0 if all(o.status == "ok" for o in outcomes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
