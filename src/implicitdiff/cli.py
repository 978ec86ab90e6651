"""The ``implicitdiff`` command line: ``demo``, ``check`` and ``bench``.

Exit codes: 0 success; 1 a check failed (``check``) or a demo/benchmark
raised; 2 a usage error (unknown command, bad argument, unknown name,
unavailable device or benchmark module).

Example:
    >>> from implicitdiff.cli import main
    >>> main(["demo", "--list"])  # doctest: +ELLIPSIS
    seed               the seed note: ...
    sudoku  (default)  OptNet's 4×4 mini-Sudoku: ...
    deq                a deep equilibrium classifier ...
    0
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
import traceback
from typing import Optional, Sequence

__all__ = ["main", "build_parser"]

DTYPES = ("float64", "float32")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error raises instead of exiting, so that ``main`` returns its code."""

    def error(self, message):
        self.print_usage(sys.stderr)
        raise _UsageError(f"{self.prog}: error: {message}")


class _UsageError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="implicitdiff",
        description="Gradients of functions defined by equations (PyTorch). "
                    "Run a demo, check the installed build's gradients, or benchmark.",
        epilog="Run 'implicitdiff COMMAND --help' for the options of a command.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"implicitdiff {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    demo = sub.add_parser("demo", help="run a demo (default: the flagship); writes a PNG plot",
                          description="Run a demo on embedded data: prints what it shows and writes a PNG plot.")
    demo.add_argument("name", nargs="?", help="which demo (see --list); default: the flagship")
    demo.add_argument("--list", action="store_true", help="list the demos and exit")
    demo.add_argument("--out", default=".", metavar="DIR", help="folder for the plot (default: the working directory)")
    demo.add_argument("--quick", action="store_true", help="fewer iterations (seconds)")

    check = sub.add_parser("check", help="gradient self-check of every layer against finite differences",
                           description="Check every layer's gradients (reverse and forward mode) against float64 "
                                       "central finite differences and closed forms; exit 1 if any fails.")
    check.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    check.add_argument("--dtype", default="float64", choices=DTYPES, help="dtype of the layers (default: float64)")
    check.add_argument("-k", dest="pattern", metavar="TEXT", help="only the cases whose name contains TEXT")
    check.add_argument("-v", "--verbose", action="store_true", help="print every case's full report")

    bench = sub.add_parser("bench", help="run benchmarks side by side with peers; writes JSON",
                           description="Run benchmarks (implicitdiff.bench.NAME); prints tables and writes JSON.")
    bench.add_argument("name", nargs="?", help="which benchmark (see --list); default: all")
    bench.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    bench.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    bench.add_argument("--out", metavar="FILE", help="JSON output file (with several benchmarks: FILE_NAME.json)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except _UsageError as e:
        print(e, file=sys.stderr)
        return 2
    except SystemExit as e:  # --help and --version exit 0 through argparse
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return {"demo": _demo, "check": _check, "bench": _bench}[args.command](args)


# -- demo -----------------------------------------------------------------------------------------------------


def _demo(args) -> int:
    from .demos import registry

    if args.list:
        width = max(len(n) for n in registry.names())
        for name, demo in registry.DEMOS.items():
            flag = "(default)" if name == registry.FLAGSHIP else "         "
            print(f"{name.ljust(width)}  {flag}  {demo.description}")
        return 0
    name = args.name or registry.FLAGSHIP
    try:
        demo = registry.get(name)
    except KeyError as e:
        print(f"implicitdiff demo: {e.args[0]}", file=sys.stderr)
        return 2
    print(f"implicitdiff demo {name}: {demo.description}")
    try:
        demo.run(args)
    except Exception:
        traceback.print_exc()
        print(f"implicitdiff demo: the demo {name!r} failed (traceback above)", file=sys.stderr)
        return 1
    return 0


# -- check ----------------------------------------------------------------------------------------------------


def _check(args) -> int:
    import torch

    from .checks import selfcheck

    device = args.device
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            print(f"implicitdiff check: --device {device} was requested but CUDA is not available in this "
                  f"PyTorch build ({torch.__version__}) or on this machine; use --device cpu", file=sys.stderr)
            return 2
    elif device != "cpu":
        print(f"implicitdiff check: unknown device {device!r}; use cpu, cuda or cuda:N", file=sys.stderr)
        return 2
    try:
        torch.empty(0, device=device)
    except Exception as e:
        print(f"implicitdiff check: cannot use device {device!r}: {e}", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    results = selfcheck.run(device=device, dtype=dtype, pattern=args.pattern)
    if not results:
        names = ", ".join(c.name for c in selfcheck.cases())
        print(f"implicitdiff check: no case matches -k {args.pattern!r}; the cases are: {names}", file=sys.stderr)
        return 2
    print(f"implicitdiff check: {len(results)} cases on {device}, {args.dtype}; reverse and forward mode "
          f"against float64 central finite differences (and a closed form where one is given)")
    rows = [("case", "layer", "max rel err (fd)", "max rel err (ref)", "result")]
    for r in results:
        if r.error:
            rows.append((r.case.name, r.case.layer, "-", "-", "ERROR"))
            continue
        fd = [c.max_rel_err for c in r.report.comparisons if c.against == "fd"]
        ref = [c.max_rel_err for c in r.report.comparisons if c.against == "reference" and c.mode != "value"]
        rows.append((r.case.name, r.case.layer, _fmt(fd), _fmt(ref), "ok" if r.passed else "FAIL"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for k, row in enumerate(rows):
        print("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if k == 0:
            print("  " + "  ".join("-" * w for w in widths))
    failed = [r for r in results if not r.passed]
    for r in results:
        if r in failed or args.verbose:
            print(f"\n{r.case.name}:")
            print(f"  could not run: {r.error}" if r.error else r.report)
    if failed:
        print(f"\nFAILED: {len(failed)} of {len(results)} cases", file=sys.stderr)
        return 1
    print(f"\nall {len(results)} cases passed")
    return 0


def _fmt(values) -> str:
    values = [v for v in values if v == v]
    return f"{max(values):.1e}" if values else "-"


# -- bench ----------------------------------------------------------------------------------------------------


def _bench_names() -> list:
    try:
        pkg = importlib.import_module("implicitdiff.bench")
    except ImportError:
        return []
    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))


def _bench(args) -> int:
    available = _bench_names()
    if args.list:
        if not available:
            print("no benchmarks are installed (the module implicitdiff.bench is missing)")
        for name in available:
            print(name)
        return 0
    names = [args.name] if args.name else available
    if not names:
        print("implicitdiff bench: no benchmarks are installed (the module implicitdiff.bench is missing)",
              file=sys.stderr)
        return 2
    for name in names:
        if name not in available:
            print(f"implicitdiff bench: unknown benchmark {name!r} (no module implicitdiff.bench.{name}); "
                  f"available: {', '.join(available) or 'none'}", file=sys.stderr)
            return 2
    for name in names:
        try:
            module = importlib.import_module(f"implicitdiff.bench.{name}")
        except ImportError as e:
            print(f"implicitdiff bench: cannot import implicitdiff.bench.{name}: {e}. Its optional "
                  f"dependencies come with: pip install \"implicitdiff[bench]\"", file=sys.stderr)
            return 2
        if not callable(getattr(module, "run", None)):
            print(f"implicitdiff bench: implicitdiff.bench.{name} has no run(quick=..., out=...) function",
                  file=sys.stderr)
            return 2
        out = args.out
        if out and len(names) > 1:
            root, ext = os.path.splitext(out)
            out = f"{root}_{name}{ext or '.json'}"
        print(f"implicitdiff bench {name}{' (quick)' if args.quick else ''}")
        try:
            module.run(quick=args.quick, out=out)
        except Exception:
            traceback.print_exc()
            print(f"implicitdiff bench: the benchmark {name!r} failed (traceback above)", file=sys.stderr)
            return 1
    return 0
