"""Optional dependencies of the demos (the ``demo`` extra), imported lazily, with fallbacks.

The library never needs them: without tqdm the progress is printed every
tenth of the way, without matplotlib the plot is skipped with a note.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from typing import Iterable, Iterator, Optional

import torch

__all__ = ["optional_import", "progress", "pyplot", "threads"]


def optional_import(name: str):
    """The module ``name``, or ``None`` if it is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def progress(iterable: Iterable, *, total: Optional[int] = None, desc: str = "", enabled: bool = True) -> Iterator:
    """Iterate with a tqdm progress bar if tqdm is installed, else with a line every tenth of the way.

    Example:
        >>> from implicitdiff.demos._optional import progress
        >>> sum(progress(range(4), desc="sum", enabled=False))
        6
    """
    if not enabled:
        yield from iterable
        return
    tqdm = optional_import("tqdm")
    if tqdm is not None:
        yield from tqdm.tqdm(iterable, total=total, desc=desc, leave=False, file=sys.stderr)
        return
    total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
    every = max(1, (total or 10) // 10)
    for i, item in enumerate(iterable):
        if i % every == 0 or (total is not None and i == total - 1):
            print(f"  {desc} {i + 1}/{total if total is not None else '?'}", flush=True)
        yield item


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend, or ``None`` if matplotlib is missing."""
    matplotlib = optional_import("matplotlib")
    if matplotlib is None:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@contextlib.contextmanager
def threads(n: int = 1):
    """Run the block with ``torch.set_num_threads(n)``, then restore the previous count.

    The demos' problems are tiny: more threads only add synchronisation, and on
    a busy machine a spinning BLAS thread can make each step 50× slower.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
