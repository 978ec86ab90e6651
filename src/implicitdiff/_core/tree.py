"""Pytree helpers: parameters may be tensors or nested tuples/lists/dicts of tensors.

Tensor leaves become explicit ``autograd.Function`` inputs; every other leaf
(numbers, strings, ``None``) stays static in the :class:`Tree`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from .torch_private import pytree

__all__ = ["Tree", "flatten"]


class Tree(NamedTuple):
    spec: Any           # pytree spec of the whole params tuple
    static: tuple       # leaves, with None in tensor slots
    tensor_slots: tuple  # indices of the tensor leaves

    def unflatten(self, tensors) -> tuple:
        leaves = list(self.static)
        for slot, t in zip(self.tensor_slots, tensors):
            leaves[slot] = t
        return pytree.tree_unflatten(leaves, self.spec)


def flatten(params: tuple) -> tuple[tuple, Tree]:
    """Split ``params`` into its tensor leaves and a :class:`Tree` that rebuilds it."""
    leaves, spec = pytree.tree_flatten(tuple(params))
    slots = tuple(i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor))
    static = tuple(None if i in slots else leaf for i, leaf in enumerate(leaves))
    return tuple(leaves[i] for i in slots), Tree(spec, static, slots)
