"""Benchmark of simplicity: how many of the library's functions (and files) one call passes through.

Follows one call from the public function to the autograd ``Function`` and back with
``sys.setprofile``, and counts the distinct functions of ``implicitdiff`` entered (nested functions
and lambdas included, each counted once however often it runs) and the files they live in —
forward (the call) and backward (``.backward()`` of a scalar of the output) separately.  The
calls (issue 13's review):

* ``deq``: ``nn.DEQ(cell)(x)`` with its defaults, a contractive ``tanh`` cell, batch 4, width 8;
* ``root``: ``root(F, y0, θ)`` with its defaults, ``F(y, θ) = y³ + y − θ`` per element, batch 3;
* ``fixed_point``: ``fixed_point(T, z0, a)`` with its defaults.

Targets (issue 13: "half the functions and files of today"): :data:`TARGETS`.

Example:
    >>> from implicitdiff.bench.calls import count
    >>> fwd, bwd = count("root")
    >>> fwd.functions > 0 and bwd.functions > 0
    True
"""

from __future__ import annotations

import pathlib
import sys
from typing import Callable, NamedTuple

import torch

__all__ = ["count", "run", "CASES", "TARGETS", "DEFAULT_OUT"]

DEFAULT_OUT = "bench-calls.json"
_PKG = str(pathlib.Path(__file__).resolve().parents[1])
_BENCH = str(pathlib.Path(__file__).resolve().parent)         # the cases themselves are not counted

#: case -> (forward functions, forward files, backward functions, backward files), at most
TARGETS = {"deq": (30, 10, 14, 6)}


class Count(NamedTuple):
    functions: int
    files: int
    names: tuple        # "file.py::function" of each, sorted


def _trace(fn: Callable):
    seen = set()

    def prof(frame, event, arg):
        if event == "call":
            code = frame.f_code
            if code.co_filename.startswith(_PKG) and not code.co_filename.startswith(_BENCH):
                seen.add((code.co_filename, code.co_firstlineno, code.co_name))

    old = sys.getprofile()
    sys.setprofile(prof)
    try:
        out = fn()
    finally:
        sys.setprofile(old)
    rel = sorted(f"{pathlib.Path(f).relative_to(_PKG).as_posix()}::{name}" for f, _, name in seen)
    return out, Count(len(seen), len({f for f, _, _ in seen}), tuple(rel))


def _deq():
    from ..nn import DEQ

    class Cell(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8, dtype=torch.float64)
            with torch.no_grad():
                self.lin.weight.mul_(0.3)

        def forward(self, z, x):
            return torch.tanh(self.lin(z) + x)

    torch.manual_seed(0)
    layer = DEQ(Cell())
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    return lambda: layer(x)


def _root():
    from .. import root

    theta = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
    y0 = torch.zeros(3, dtype=torch.float64)
    return lambda: root(lambda y, t: y ** 3 + y - t, y0, theta, batch_dims=1)


def _fixed_point():
    from .. import fixed_point

    a = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    z0 = torch.tensor(0.0, dtype=torch.float64)
    return lambda: fixed_point(lambda z, a: a * torch.tanh(z) + 1.0, z0, a)


CASES = {"deq": _deq, "root": _root, "fixed_point": _fixed_point}


def count(case: str) -> tuple[Count, Count]:
    """``(forward, backward)`` counts of one call of ``case`` (a key of :data:`CASES`), after a warm-up
    call (so that one-off imports and caches are not counted)."""
    call = CASES[case]()
    call().sum().backward()                                   # warm-up
    out, fwd = _trace(call)
    _, bwd = _trace(lambda: out.sum().backward())
    return fwd, bwd


def run(quick: bool = False, out: str | None = None, verbose: bool = True) -> dict:
    """Count every case; print a table and write JSON (``out``, default :data:`DEFAULT_OUT`).  The counts do
    not depend on the device: it runs on the CPU (``implicitdiff bench --device cuda`` skips it)."""
    from ._harness import write_json

    results = {}
    for case in CASES:
        fwd, bwd = count(case)
        target = TARGETS.get(case)
        met = None if target is None else (fwd.functions <= target[0] and fwd.files <= target[1]
                                           and bwd.functions <= target[2] and bwd.files <= target[3])
        results[case] = {"forward": {"functions": fwd.functions, "files": fwd.files, "names": list(fwd.names)},
                         "backward": {"functions": bwd.functions, "files": bwd.files, "names": list(bwd.names)},
                         "target": target, "met": met}
        if verbose:
            tgt = "" if target is None else f"   target ≤ {target[0]}/{target[1]}, ≤ {target[2]}/{target[3]}: " \
                                            f"{'met' if met else 'NOT met'}"
            print(f"{case:12s} forward {fwd.functions:3d} functions / {fwd.files:2d} files   "
                  f"backward {bwd.functions:3d} / {bwd.files:2d}{tgt}")
    results["summary"] = {"targets_met": all(r["met"] is not False for r in results.values())}
    write_json(out or DEFAULT_OUT, results)
    return results


if __name__ == "__main__":
    import json

    case = sys.argv[1] if len(sys.argv) > 1 else "deq"
    f, b = count(case)
    print(json.dumps({"forward": f._asdict(), "backward": b._asdict()}, indent=1))
