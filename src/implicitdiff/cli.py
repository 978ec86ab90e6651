"""The ``implicitdiff`` command line: ``demo``, ``check`` and ``bench``.

Exit codes: 0 success; 1 a check failed (``check``) or a demo/benchmark
raised; 2 a usage error (unknown command, option or name, a bad ``--out``,
an unavailable device or benchmark module), printed with the usage of the
subcommand; 130 interrupted (Ctrl-C), one line and no traceback.

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
import inspect
import traceback
from typing import Optional, Sequence

__all__ = ["main", "build_parser"]

DTYPES = ("float64", "float32")


class _UsageError(Exception):
    """A usage error, already explained on stderr with the usage of the (sub)command."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error raises instead of exiting, so that ``main`` returns its code;
    ``commands`` maps each subcommand to its parser (set by :func:`build_parser`)."""

    commands: dict = {}

    def error(self, message):
        self.print_usage(sys.stderr)
        raise _UsageError(f"{self.prog}: error: {message}")


def _usage_error(parser: argparse.ArgumentParser, command: Optional[str], message: str) -> int:
    """Print ``message`` with the usage of ``command`` (or of the program); return the exit code 2."""
    sub = getattr(parser, "commands", {}).get(command, parser)
    try:
        sub.error(message)
    except _UsageError as e:
        print(e, file=sys.stderr)
    return 2


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
    parser.commands = sub.choices

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
    bench.add_argument("--device", default="cpu",
                       help="cpu, cuda or cuda:N, passed to every benchmark that takes it (default: cpu)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:
        print("implicitdiff: interrupted", file=sys.stderr)
        return 130


def _main(argv: list) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
    except _UsageError as e:
        print(e, file=sys.stderr)
        return 2
    except SystemExit as e:  # --help and --version exit 0 through argparse
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    if extra:  # reported with the usage of the subcommand they were given to
        return _usage_error(parser, args.command, f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return {"demo": _demo, "check": _check, "bench": _bench}[args.command](args, parser)


def _device_error(device: str) -> Optional[str]:
    """Why ``device`` cannot be used here (``None`` if it can)."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return (f"--device {device} was requested but CUDA is not available in this PyTorch build "
                    f"({torch.__version__}) or on this machine; use --device cpu")
    elif device != "cpu":
        return f"unknown device {device!r}; use cpu, cuda or cuda:N"
    import torch

    try:
        torch.empty(0, device=device)
    except Exception as e:
        return f"cannot use --device {device}: {e}"
    return None


# -- demo -----------------------------------------------------------------------------------------------------


def _demo(args, parser) -> int:
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
        return _usage_error(parser, "demo", e.args[0])
    blocker = _existing_file_on(args.out)
    if blocker:
        return _usage_error(parser, "demo", f"--out {args.out}: {blocker} is a file; "
                                            f"--out takes the folder for the plot")
    print(f"implicitdiff demo {name}: {demo.description}")
    try:
        demo.run(args)
    except Exception:
        traceback.print_exc()
        print(f"implicitdiff demo: the demo {name!r} failed (traceback above)", file=sys.stderr)
        return 1
    return 0


def _existing_file_on(path: str) -> Optional[str]:
    """The path itself or its nearest existing ancestor, if that is not a folder (``None`` otherwise)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent
    return None if os.path.isdir(path) else path


# -- check ----------------------------------------------------------------------------------------------------


def _check(args, parser) -> int:
    import torch

    from .checks import selfcheck

    device = args.device
    problem = _device_error(device)
    if problem:
        return _usage_error(parser, "check", problem)
    dtype = getattr(torch, args.dtype)
    results = selfcheck.run(device=device, dtype=dtype, pattern=args.pattern)
    if not results:
        names = ", ".join(c.name for c in selfcheck.cases())
        return _usage_error(parser, "check", f"no case matches -k {args.pattern!r}; the cases are: {names}")
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


def _bench(args, parser) -> int:
    available = _bench_names()
    if args.list:
        if not available:
            print("no benchmarks are installed (the module implicitdiff.bench is missing)")
        for name in available:
            print(name)
        return 0
    names = [args.name] if args.name else available
    if not names:
        return _usage_error(parser, "bench", "no benchmarks are installed (the module implicitdiff.bench is missing)")
    for name in names:
        if name not in available:
            return _usage_error(parser, "bench", f"unknown benchmark {name!r} (no module implicitdiff.bench.{name}); "
                                                 f"available: {', '.join(available) or 'none'}")
    if args.out and os.path.isdir(args.out):
        return _usage_error(parser, "bench", f"--out {args.out} is a folder; --out takes a JSON file name")
    problem = _device_error(args.device)
    if problem:
        return _usage_error(parser, "bench", problem)
    for name in names:
        try:
            module = importlib.import_module(f"implicitdiff.bench.{name}")
        except ImportError as e:
            return _usage_error(parser, "bench", f"cannot import implicitdiff.bench.{name}: {e}. Its optional "
                                                 f"dependencies come with: pip install \"implicitdiff[bench]\"")
        run = getattr(module, "run", None)
        if not callable(run):
            return _usage_error(parser, "bench", f"implicitdiff.bench.{name} has no run(quick=..., out=...) function")
        kwargs = dict(quick=args.quick, out=args.out)
        if args.out and len(names) > 1:
            root, ext = os.path.splitext(args.out)
            kwargs["out"] = f"{root}_{name}{ext or '.json'}"
        if "device" in inspect.signature(run).parameters:
            kwargs["device"] = args.device
        elif args.device != "cpu":
            if args.name:
                return _usage_error(parser, "bench", f"the benchmark {name!r} runs on the CPU only (its run() "
                                                     f"takes no device); drop --device {args.device}")
            print(f"implicitdiff bench {name}: skipped, it runs on the CPU only (--device {args.device})")
            continue
        print(f"implicitdiff bench {name}{' (quick)' if args.quick else ''}"
              f"{'' if args.device == 'cpu' else ' on ' + args.device}")
        try:
            run(**kwargs)
        except Exception:
            traceback.print_exc()
            print(f"implicitdiff bench: the benchmark {name!r} failed (traceback above)", file=sys.stderr)
            return 1
    return 0
