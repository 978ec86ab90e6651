"""Benchmarks: implicitdiff against its peers, side by side, in one process.

Each benchmark is a module with ``run(quick=False, out=None) -> dict`` that
prints a table of *ratios* (ours / peer, lower is better), reports how far the
gradients agree, and writes JSON (default ``bench-<name>.json`` in the working
directory):

* :mod:`implicitdiff.bench.linear` — dense ``linear_solve`` against
  ``torch.linalg.solve``, ``pinv(A) @ b`` and ``torch.linalg.lstsq``;
* :mod:`implicitdiff.bench.hypergrad` — ridge / logistic hypergradients against
  the closed form, unrolled autograd, TorchOpt, JAXopt and Optimistix;
* :mod:`implicitdiff.bench.deq` — deep equilibrium layers against torchdeq and
  unrolled autograd;
* :mod:`implicitdiff.bench.qp` — batched QPs against qpth and cvxpylayers;
* :mod:`implicitdiff.bench.cone` — cone programs (SOCP, SDP, exponential cone) as layers against cvxpylayers;
* :mod:`implicitdiff.bench.krylov` — Krylov solves against ``scipy.sparse.linalg``.

Shared machinery (threads, timing, memory, tables) is in ``_harness``.  Peers
are optional: no peer library is imported when this package is, and a missing
one is skipped with a message.  From a shell: ``implicitdiff bench linear`` or the
thin shim ``python benchmarks/linear.py``.
"""

__all__: list = []
