"""Central finite differences of any function of tensors (or pytrees of tensors), in float64.

The oracle of :func:`~implicitdiff.check_gradients`: it knows nothing about
the library, only how to evaluate ``fn``.  Every floating-point tensor leaf of
the inputs is cast to ``dtype`` (float64 by default) before ``fn`` sees it, and
every floating-point leaf of the output is flattened into one vector, so a
derivative is always a matrix ``(out_numel, leaf_numel)``.

For a direction ``d`` of one input leaf ``x`` and a step ``h``::

    D(h) = (f(x + h d) − f(x − h d)) / (2h) = J d + (h²/6) f'''[d, d, d] + O(h⁴)

with a rounding error ``≈ δ / h`` when each evaluation of ``f`` is off by
``δ`` (``δ ≈ u ‖f‖`` for a backward-stable ``f``, ``u`` the unit roundoff; a
solver that stops at a relative tolerance ``τ`` gives ``δ ≈ κ τ ‖f‖``).  The
step is ``h = eps · max(1, ‖x‖∞)``: relative for large inputs, absolute near
zero.  :func:`directional_derivatives` also returns ``D(2h)``: their
difference ``|D(h) − D(2h)| ≈ 3|c| h² + O(δ/h)`` is a measured estimate of
both the truncation error ``c h²`` and the noise, which the gradient check
uses as part of its error floor.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
from .._core.torch_private import pytree

from .._core.errors import InputError

__all__ = ["Flat", "flatten_inputs", "flat_output", "step_size", "directional_derivatives", "jvp", "jacobian"]


class Flat(NamedTuple):
    """The inputs of ``fn`` as leaves: ``fn(*pytree.tree_unflatten(leaves, spec))``."""

    leaves: list
    spec: Any
    paths: list  # key paths, for naming the leaves


def is_float_tensor(x) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()


def flatten_inputs(inputs: tuple) -> Flat:
    """Flatten the positional ``inputs`` (a tuple of tensors or pytrees of tensors)."""
    with_paths, spec = pytree.tree_flatten_with_path(tuple(inputs))
    return Flat([leaf for _, leaf in with_paths], spec, [path for path, _ in with_paths])


def call(fn: Callable, spec, leaves) -> Any:
    return fn(*pytree.tree_unflatten(list(leaves), spec))


def flat_output(out, dtype=None) -> torch.Tensor:
    """Concatenate the floating-point tensor leaves of ``out`` into one 1-D tensor."""
    leaves = [t for t in pytree.tree_leaves(out) if is_float_tensor(t)]
    if not leaves:
        raise InputError(
            f"fn must return a floating-point tensor (or a pytree holding some), got {type(out).__name__}; "
            "return the solution y itself rather than an info tuple or a Python number"
        )
    dtype = dtype or leaves[0].dtype
    return torch.cat([t.reshape(-1).to(dtype) for t in leaves])


def step_size(x: torch.Tensor, eps: float) -> float:
    """The finite-difference step of leaf ``x``: ``eps · max(1, ‖x‖∞)`` (one host sync)."""
    return float(eps) * max(1.0, float(x.detach().abs().max())) if x.numel() else float(eps)


def _cast(leaves, dtype):
    return [t.detach().to(dtype) if is_float_tensor(t) else t for t in leaves]


def directional_derivatives(fn: Callable, flat: Flat, index: int, directions: torch.Tensor, *, eps: float = 1e-6,
                            dtype: torch.dtype = torch.float64, both_steps: bool = True):
    """Central differences of ``fn`` along the columns of ``directions`` for input leaf ``index``.

    Args:
        fn: the function; called as ``fn(*inputs)`` with float leaves cast to ``dtype``.
        flat: the flattened inputs (:func:`flatten_inputs`).
        index: which leaf of ``flat.leaves`` to perturb (a floating-point tensor).
        directions: ``(leaf_numel, k)``; column ``j`` is a direction ``d_j``.
        eps: relative step (see :func:`step_size`).
        dtype: the evaluation dtype (float64: the point of an oracle).
        both_steps: also difference with step ``2h`` (else ``D_2h`` is ``None``).

    Returns:
        ``(D_h, D_2h, h)``: two ``(out_numel, k)`` matrices (steps ``h`` and ``2h``) and ``h``;
        ``2k`` evaluations of ``fn`` per step.
    """
    leaves = _cast(flat.leaves, dtype)
    x = leaves[index]
    if not is_float_tensor(x):
        raise InputError(f"input leaf {index} is not a floating-point tensor; it cannot be perturbed")
    h = step_size(x, eps)
    D = directions.to(dtype=dtype, device=x.device)
    cols_h, cols_2h = [], []
    with torch.no_grad():
        for j in range(D.shape[1]):
            d = D[:, j].reshape(x.shape)
            for step, cols in ((h, cols_h), (2 * h, cols_2h))[: 2 if both_steps else 1]:
                leaves[index] = x + step * d
                f_plus = flat_output(call(fn, flat.spec, leaves), dtype)
                leaves[index] = x - step * d
                f_minus = flat_output(call(fn, flat.spec, leaves), dtype)
                cols.append((f_plus - f_minus) / (2 * step))
    leaves[index] = x
    if not cols_h:
        raise InputError(f"input leaf {index} needs at least one direction (it has {x.numel()} elements)")
    return torch.stack(cols_h, -1), (torch.stack(cols_2h, -1) if both_steps else None), h


def jvp(fn: Callable, inputs: tuple, tangents: tuple, *, eps: float = 1e-6,
        dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Central-difference estimate of ``J t``: the derivative of ``fn(*inputs)`` along ``tangents``.

    ``tangents`` mirrors ``inputs`` (``None`` for a leaf that does not move).
    The step is ``eps · max(1, ‖x‖∞)`` over every moving leaf ``x``.

    Returns:
        The flattened floating-point outputs' directional derivative, ``(out_numel,)`` in ``dtype``.

    Example:
        >>> import torch
        >>> from implicitdiff.checks.finite_diff import jvp
        >>> x = torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> d = jvp(lambda x: x ** 2, (x,), (torch.tensor([1.0, 0.0], dtype=torch.float64),))
        >>> torch.allclose(d, torch.tensor([2.0, 0.0], dtype=torch.float64), atol=1e-8)
        True
    """
    flat = flatten_inputs(inputs)
    leaves_t, spec_t = pytree.tree_flatten(tuple(tangents), is_leaf=lambda t: t is None)
    if len(leaves_t) != len(flat.leaves):
        raise InputError("tangents must have the structure of inputs (use None for leaves that do not move)")
    leaves = _cast(flat.leaves, dtype)
    moving = [(i, t.to(dtype=dtype, device=leaves[i].device)) for i, t in enumerate(leaves_t)
              if t is not None and is_float_tensor(leaves[i])]
    if not moving:
        raise InputError("tangents must give a direction for at least one floating-point input")
    h = float(eps) * max([1.0] + [float(leaves[i].abs().max()) for i, _ in moving if leaves[i].numel()])
    with torch.no_grad():
        outs = []
        for sign in (1.0, -1.0):
            shifted = list(leaves)
            for i, t in moving:
                shifted[i] = leaves[i] + sign * h * t.reshape(leaves[i].shape)
            outs.append(flat_output(call(fn, flat.spec, shifted), dtype))
    return (outs[0] - outs[1]) / (2 * h)


def jacobian(fn: Callable, *inputs, eps: float = 1e-6, dtype: torch.dtype = torch.float64) -> list:
    """Central-difference Jacobians of ``fn(*inputs)`` w.r.t. each floating-point input leaf.

    Costs ``2 · numel`` evaluations per leaf: for small inputs.

    Returns:
        A list with one ``(out_numel, leaf_numel)`` matrix per floating-point
        leaf of ``inputs`` (in ``pytree`` order), ``None`` for other leaves.

    Example:
        >>> import torch
        >>> from implicitdiff.checks.finite_diff import jacobian
        >>> x = torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> J = jacobian(lambda x: x ** 2, x)[0]
        >>> torch.allclose(J, torch.diag(2 * x), atol=1e-8)
        True
    """
    flat = flatten_inputs(inputs)
    return [
        directional_derivatives(fn, flat, i, torch.eye(leaf.numel(), dtype=dtype, device=leaf.device), eps=eps,
                                dtype=dtype, both_steps=False)[0]
        if is_float_tensor(leaf) else None
        for i, leaf in enumerate(flat.leaves)
    ]
