r"""The layout of a product cone in SCS's convention, and the svec map of its PSD blocks.

A cone program's slack ``s ∈ K`` stacks its rows as SCS does: ``"z"`` zero-cone rows
(equalities), ``"l"`` nonnegative rows, then one block per second-order cone (``"q"``, sizes;
``(t, x)`` with ``‖x‖ ≤ t``), one per PSD cone (``"s"``, side lengths ``k``, each block the
``k(k+1)/2`` entries of the *scaled lower triangle*: column-major lower-triangular entries,
off-diagonals multiplied by ``√2`` so that ``svec(X)ᵀsvec(Y) = tr(XY)``), and ``"ep"``
exponential cones ``(x, y, z)`` with ``y·exp(x/y) ≤ z``.  Example: ``X = [[1, 2], [2, 3]]``
is ``svec(X) = (1, 2√2, 3)``.

:class:`ConeSpec` validates a ``cones`` dict once and gathers blocks of the same kind and size
into index tensors, so that the solvers and the derivative work on all blocks of one size at
once (``s[..., idx]`` has shape ``(*, blocks, size)``).  Forward only: no gradients here.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import NamedTuple

import torch

from .._core.errors import InputError

__all__ = ["ConeSpec", "parse_cones", "svec", "smat", "svec_indices"]

_KEYS = ("z", "l", "q", "s", "ep")


class ConeSpec(NamedTuple):
    """A validated product cone: counts, block sizes and row offsets (all Python ints)."""

    z: int
    l: int
    q: tuple
    s: tuple
    ep: int

    @property
    def m(self) -> int:
        """Total number of rows."""
        return self.z + self.l + sum(self.q) + sum(k * (k + 1) // 2 for k in self.s) + 3 * self.ep

    @property
    def degree(self) -> int:
        """Barrier parameter ``ν`` of the cone (the zero cone has none)."""
        return self.l + len(self.q) + sum(self.s) + 3 * self.ep

    def groups(self, device=None):
        """Blocks of one kind and size gathered together.

        Returns a list of ``(kind, size, idx)`` with ``kind`` in ``"l", "q", "s", "ep"``, ``size``
        the block's side (``"s"``: ``k``; ``"l"``: number of rows) and ``idx`` a ``long`` tensor of
        shape ``(blocks, rows_per_block)`` of row indices (``"l"``: shape ``(rows,)``).
        """
        out, at = [], self.z
        if self.l:
            out.append(("l", self.l, torch.arange(at, at + self.l, device=device)))
            at += self.l
        for kind, sizes, rows in (("q", self.q, lambda k: k), ("s", self.s, lambda k: k * (k + 1) // 2)):
            starts: dict = {}
            for k in sizes:
                starts.setdefault(k, []).append(at)
                at += rows(k)
            for k, st in starts.items():
                idx = torch.tensor(st, device=device)[:, None] + torch.arange(rows(k), device=device)
                out.append((kind, k, idx))
        if self.ep:
            out.append(("ep", 3, at + torch.arange(3 * self.ep, device=device).reshape(self.ep, 3)))
        return out


def _count(cones, key):
    v = cones.get(key, 0)
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
        raise InputError(f"cones[{key!r}] must be a nonnegative integer (a number of rows or cones), got {v!r}")
    return int(v)


def _sizes(cones, key, low):
    v = cones.get(key, [])
    if isinstance(v, numbers.Integral) and not isinstance(v, bool):
        v = [v]
    try:
        v = list(v)
    except TypeError:
        raise InputError(f"cones[{key!r}] must be a list of block sizes, got {v!r}") from None
    for k in v:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < low:
            raise InputError(f"cones[{key!r}] must list integer block sizes >= {low}, got {v!r}")
    return tuple(int(k) for k in v)


def parse_cones(cones) -> ConeSpec:
    """Validate a ``cones`` dict (SCS keys ``z, l, q, s, ep``) into a :class:`ConeSpec`."""
    if isinstance(cones, ConeSpec):
        return cones
    if not isinstance(cones, dict):
        raise InputError(f"cones must be a dict with SCS's keys {_KEYS} (e.g. {{'l': 3, 'q': [4]}}), "
                         f"got {type(cones).__name__}")
    extra = [k for k in cones if k not in _KEYS]
    if extra:
        alias = {"f": "z", "psd": "s", "soc": "q", "exp": "ep", "nonneg": "l", "zero": "z"}
        hint = "; ".join(f"use {alias[k]!r} for {k!r}" for k in extra if k in alias)
        raise InputError(f"cones has unsupported key(s) {extra}; the keys are {_KEYS}"
                         + (f" ({hint})" if hint else "") + " (power cones are not supported)")
    spec = ConeSpec(_count(cones, "z"), _count(cones, "l"), _sizes(cones, "q", 1), _sizes(cones, "s", 1),
                    _count(cones, "ep"))
    if spec.m == 0:
        raise InputError("cones describes no rows; give at least one cone")
    return spec


def svec_indices(k: int, device=None):
    """Row indices, column indices and off-diagonal mask of SCS's svec order (cached)."""
    return _svec_indices(k, torch.device(device) if device is not None else torch.device("cpu"))


@functools.lru_cache(maxsize=64)
def _svec_indices(k: int, device):
    rows, cols = [], []
    for j in range(k):
        for i in range(j, k):
            rows.append(i)
            cols.append(j)
    r = torch.tensor(rows, device=device)
    c = torch.tensor(cols, device=device)
    return r, c, (r != c)


@functools.lru_cache(maxsize=64)
def _gathers(k: int, device, dtype):
    """Flat gathers for svec and smat: the ``(i, j)`` entry of svec position ``p`` (``i·k + j``) with its
    scale, and the svec position of each entry of the ``k × k`` matrix with its scale (one
    ``index_select`` each way instead of two advanced-index scatters)."""
    r, c, off = _svec_indices(k, device)
    flat = r * k + c
    scale = torch.where(off, torch.full(off.shape, math.sqrt(2.0), dtype=dtype, device=device),
                        torch.ones(off.shape, dtype=dtype, device=device))
    pos = torch.empty(k * k, dtype=torch.long, device=device)
    pos[flat] = torch.arange(r.numel(), device=device)
    pos[c * k + r] = torch.arange(r.numel(), device=device)
    return flat, scale, pos, (1.0 / scale)[pos]


def svec(X: torch.Tensor) -> torch.Tensor:
    """``(*, k, k)`` symmetric → ``(*, k(k+1)/2)`` scaled lower triangle (column-major)."""
    k = X.shape[-1]
    flat, scale, _, _ = _gathers(k, X.device, X.dtype)
    return X.reshape(X.shape[:-2] + (k * k,)).index_select(-1, flat) * scale


def smat(v: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`svec`: ``(*, k(k+1)/2)`` → ``(*, k, k)`` symmetric."""
    _, _, pos, unscale = _gathers(k, v.device, v.dtype)
    return (v.index_select(-1, pos) * unscale).reshape(v.shape[:-1] + (k, k))
