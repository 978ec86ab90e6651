"""What autograd keeps for the backward: the memory probes of the tests and the benchmarks.

* :func:`saved_bytes` records, with ``saved_tensors_hooks``, the tensors a graph saves while
  ``fn()`` builds it, and counts the storages the graph still holds when ``fn`` returns;
* :func:`graph_saved_bytes` walks an existing graph instead (each node's saved tensors), for
  code that runs ``torch.func`` inside its forward, where saved-tensor hooks are refused.

Both count each distinct storage once and skip the storages of ``exclude`` (the inputs, which
the caller holds anyway).  Device independent: a measure of the backward's memory, not of
workspace.
"""

from __future__ import annotations

import gc
import weakref
from typing import Callable, Sequence

import torch

__all__ = ["saved_bytes", "saved_bytes_and_output", "graph_saved_bytes"]


def _storage_key(t: torch.Tensor):
    try:
        s = t.untyped_storage()
        return s.data_ptr(), s.nbytes()
    except (RuntimeError, NotImplementedError):  # sparse or wrapper tensors: count the values
        return id(t), t.numel() * t.element_size()


class _Saved:
    """A saved tensor as the graph holds it (a weak reference to a tensor would follow the tensor,
    which other owners may keep alive, not the graph)."""

    __slots__ = ("t", "__weakref__")

    def __init__(self, t):
        self.t = t


def saved_bytes(fn: Callable[[], object], exclude: Sequence[torch.Tensor] = ()) -> int:
    """Bytes autograd keeps for the backward once ``fn()`` has built its graph.

    Counts each distinct storage once, skipping those of ``exclude`` (the
    inputs, which the caller holds anyway), and only storages the graph still
    holds when ``fn`` returns: a graph recorded along the way and dropped (a
    speculative evaluation that was not the last) is not memory of the
    backward.  The graph ``fn`` returns must be alive while counting, so ``fn``
    should return its output.

    Example:
        >>> import torch
        >>> x = torch.ones(7, 5, dtype=torch.float64, requires_grad=True)
        >>> saved_bytes(lambda: x.exp(), exclude=(x,))   # exp saves its output: 35 float64
        280
    """
    return saved_bytes_and_output(fn, exclude)[0]


def saved_bytes_and_output(fn: Callable[[], object], exclude: Sequence[torch.Tensor] = ()) -> tuple[int, object]:
    """:func:`saved_bytes` and ``fn``'s output (whose graph then stays alive)."""
    skip = {_storage_key(t)[0] for t in exclude}
    seen: dict = {}

    def pack(t):
        # what the graph keeps, alive exactly as long as the graph holds it; detached, since a saved
        # output would otherwise reference its own grad_fn through the box (a cycle that never dies)
        box = _Saved(t.detach())
        ptr, nbytes = _storage_key(t)
        if ptr not in skip:
            size, refs = seen.get(ptr, (0, []))
            refs.append(weakref.ref(box))
            seen[ptr] = (max(size, nbytes), refs)
        return box

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.t):
        out = fn()
    gc.collect()
    total = sum(size for size, refs in seen.values() if any(r() is not None for r in refs))
    return int(total), out


def graph_saved_bytes(out: torch.Tensor, exclude=()) -> int:
    """Bytes of the tensors the autograd graph of ``out`` keeps for the backward, inputs excluded.

    Walks the graph (each node's ``_saved_*`` attributes; a custom Function's
    ``saved_tensors``) and counts each storage once.  :func:`saved_bytes`
    records them with ``saved_tensors_hooks`` instead, which ``torch.func``
    transforms refuse ("don't yet support saved tensor hooks") — and both our
    L-BFGS and TorchOpt's backward run ``torch.func`` inside the forward.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen, stack, visited = {}, [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        saved = []
        for name in dir(node):
            if name.startswith("_saved_"):
                saved.append(getattr(node, name))
        if hasattr(node, "saved_tensors"):
            saved.append(node.saved_tensors)
        for item in saved:
            for t in item if isinstance(item, (tuple, list)) else (item,):
                if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                    st = t.untyped_storage()
                    if st.data_ptr() not in skip:
                        seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        stack.extend(fn for fn, _ in node.next_functions)
    return int(sum(seen.values()))
