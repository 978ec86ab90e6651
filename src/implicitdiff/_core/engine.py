"""One reverse pass through a recorded graph, without ``torch.autograd.grad``'s per-call checks.

``torch.autograd.grad`` validates and normalizes its arguments in Python on every call (as much
work as a small layer's whole vector-Jacobian product; figures in docs/benchmarks.md).  A loop
that takes dozens of products through one graph it built itself — the adjoint iterations of a
deep equilibrium layer — already knows that the cotangent has the output's shape, dtype and
device; :func:`vjp` then calls the autograd engine directly (the call ``torch.autograd.grad``
itself ends in, through :func:`implicitdiff._core.torch_private.run_backward`), falling back to
``torch.autograd.grad`` where the engine's entry point is not there.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .torch_private import run_backward

__all__ = ["vjp", "vjp_fn"]


def vjp(output: torch.Tensor, inputs: Sequence[torch.Tensor], cotangent: torch.Tensor, *,
        retain_graph: bool = True) -> tuple[Optional[torch.Tensor], ...]:
    """``(∂output/∂inputs)ᵀ cotangent`` for each input (``None`` where ``output`` does not depend on it).

    ``cotangent`` must have ``output``'s shape, dtype and device (unchecked); first order only
    (no ``create_graph``), outside ``torch.func`` transforms.

    Example:
        >>> import torch
        >>> x = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> y = x * x
        >>> vjp(y, (x,), torch.ones(2))
        (tensor([2., 4.]),)
    """
    return run_backward((output,), (cotangent,), inputs, retain_graph=retain_graph)


def vjp_fn(output: torch.Tensor, input: torch.Tensor):
    """``v ↦ (∂output/∂input)ᵀ v`` as a closure for repeated products through one graph (kept):
    :func:`vjp` with the per-call work done once; zeros where ``output`` does not depend on ``input``.

    Example:
        >>> import torch
        >>> x = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> f = vjp_fn(x * x, x)
        >>> f(torch.ones(2)), f(torch.tensor([1.0, 0.0]))
        (tensor([2., 4.]), tensor([2., 0.]))
    """
    outputs, inputs = (output,), (input,)

    def product(v):
        g = run_backward(outputs, (v,), inputs)[0]
        return torch.zeros_like(input) if g is None else g
    return product
