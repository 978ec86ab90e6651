"""Benchmarks: implicitdiff against its peers, side by side, in one process.

Each benchmark is a module with ``run(quick=False, out=None) -> dict`` that
prints a table of *ratios* (ours / peer, lower is better), reports how far the
gradients agree, and writes JSON (default ``bench-<name>.json`` in the working
directory):

* :mod:`implicitdiff.bench.linear` — dense ``linear_solve`` against
  ``torch.linalg.solve``, ``pinv(A) @ b`` and ``torch.linalg.lstsq``.

Shared machinery (threads, timing, memory, tables) is in ``_harness``.  Peers
are optional: no peer library is imported when this package is, and a missing
one is skipped with a message.  From a shell: ``python benchmarks/linear.py``.
"""

__all__: list = []
