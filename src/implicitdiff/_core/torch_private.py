"""Every private or heavy torch API the library relies on, in one place.

torch does not promise that these keep their signatures.  Each one is used through a function
or name here, and ``tests/test_torch_private.py`` calls each on a small case and checks the
result, so that a torch release that changes one fails that test (with the name of what
changed) instead of failing somewhere deep inside a layer.  ``tests/test_architecture.py``
checks that no other module of ``src/`` touches them.

What is here, and why:

* :func:`is_vmapped`, :func:`in_transform`, :func:`tracks_grad` — ``torch._C._functorch`` probes:
  is a tensor batched by ``torch.func.vmap`` (no data access allowed), are we under any
  ``torch.func`` transform (where ``requires_grad_`` and plain ``torch.autograd.grad`` do not see
  the transformed tensors), does autograd record a tensor at any level (a ``torch.func.jvp``
  wrapper reports ``requires_grad=False`` for a tensor that an enclosing autograd differentiates);
* :func:`run_backward` — the autograd engine's entry point that ``torch.autograd.grad`` ends in,
  without its per-call argument normalization (a loop of products through one graph);
* :data:`pytree` — ``torch.utils._pytree`` (flatten/unflatten nested inputs, key paths);
* :func:`warm_forward_ad` — imports ``torch._decomp.decompositions_for_jvp`` once, silencing the
  ``DeprecationWarning`` torch itself emits on the first forward-mode AD call of a process;
* :func:`eager_under_compile` — ``torch.compiler.disable``, applied lazily: the decorator
  imports ``torch._dynamo`` (about a second) only when a ``torch.compile`` trace reaches it,
  never at ``import implicitdiff``;
* :func:`in_derivative_transform` — ``torch._functorch.pyfunctorch``'s interpreter stack: is a
  ``torch.func`` derivative level (``grad``/``vjp``/``jvp``) active (a backward run there is
  differentiated again: ``hessian``);
* :func:`solve_keeping_lu` — ``torch._linalg_solve_ex``, the op ``torch.linalg.solve`` ends in, which
  also returns its LU: the eager square path of ``linear_solve`` screens that LU for
  ill-conditioning instead of factorizing twice, and keeps torch's compiled backward;
  :func:`solve_factorizes_transpose` says whether that LU is of ``A`` or ``Aᵀ`` (torch's choice,
  probed once per call form), and the general path's LU follows it, so both paths give the same
  bits.  A large row-major ``A`` goes in as the transposed system (``left=False``), so that
  LAPACK factorizes the column-major view ``Aᵀ`` instead of a copy of ``A``.
* :func:`inductor_compile` — ``torch.fx.experimental.proxy_tensor.make_fx`` and
  ``torch._inductor.compile_fx``: a function of tensors traced once (fake tensors) and compiled by
  Inductor, called without dynamo's per-call guards (``argmin(..., compiled=True)``); imported on
  first use only.
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable, Optional, Sequence

import torch
from torch.utils import _pytree as pytree

__all__ = ["is_vmapped", "in_transform", "tracks_grad", "run_backward", "HAS_RUN_BACKWARD", "pytree", "warm_forward_ad",
           "eager_under_compile", "in_derivative_transform", "solve_keeping_lu", "solve_factorizes_transpose", "inductor_compile"]

try:
    from torch._C._functorch import (
        get_unwrapped as _get_unwrapped,
        is_batchedtensor as _is_batchedtensor,
        is_functorch_wrapped_tensor as _is_functorch_wrapped_tensor,
        peek_interpreter_stack as _peek_interpreter_stack,
    )
except ImportError:  # pragma: no cover - a torch without these probes
    _get_unwrapped = _is_batchedtensor = _is_functorch_wrapped_tensor = _peek_interpreter_stack = None

_engine = getattr(getattr(torch.autograd, "Variable", None), "_execution_engine", None)
_run_backward = getattr(_engine, "run_backward", None)
HAS_RUN_BACKWARD = _run_backward is not None
"""Whether the engine's entry point is there (else :func:`run_backward` uses ``torch.autograd.grad``)."""


def is_vmapped(t: torch.Tensor) -> bool:
    """True when ``t`` is batched by an enclosing ``torch.func.vmap`` (no data access allowed)."""
    if _is_functorch_wrapped_tensor is None:  # pragma: no cover - a torch without the probes
        return False
    while _is_functorch_wrapped_tensor(t):
        if _is_batchedtensor(t):
            return True
        t = _get_unwrapped(t)
    return False


def in_transform() -> bool:
    """True inside a ``torch.func`` transform (``grad``, ``vjp``, ``jvp``, ``vmap``, …), where
    ``requires_grad_`` and plain ``torch.autograd.grad`` do not see the transformed tensors."""
    if _peek_interpreter_stack is None:  # pragma: no cover - a torch without the probe: assume the worst
        return True
    return _peek_interpreter_stack() is not None


def tracks_grad(t) -> bool:
    """True when autograd records ``t`` at some level: ``t.requires_grad``, or that of a tensor a
    ``torch.func`` wrapper hides (inside ``torch.func.jvp`` a tensor of an enclosing autograd graph
    reads ``requires_grad=False``).  False for anything but a tensor."""
    if not isinstance(t, torch.Tensor):
        return False
    while True:
        if t.requires_grad:
            return True
        if _is_functorch_wrapped_tensor is None or not _is_functorch_wrapped_tensor(t):
            return False
        t = _get_unwrapped(t)


def run_backward(outputs: Sequence[torch.Tensor], cotangents: Sequence[torch.Tensor],
                 inputs: Sequence[torch.Tensor], *, retain_graph: bool = True) -> tuple:
    """``Σ (∂outputs/∂inputs)ᵀ cotangents`` per input (``None`` where unused); first order only.

    The cotangents must match the outputs in shape, dtype and device (unchecked). The engine is
    called as ``run_backward(tensors, grad_tensors, keep_graph, create_graph, inputs,
    allow_unreachable, accumulate_grad)``, the call ``torch.autograd.grad`` itself ends in.
    """
    outputs, cotangents, inputs = tuple(outputs), tuple(cotangents), tuple(inputs)
    if _run_backward is None:  # pragma: no cover - a torch without the engine entry point
        return torch.autograd.grad(outputs, inputs, cotangents, retain_graph=retain_graph, allow_unused=True)
    return _run_backward(outputs, cotangents, retain_graph, False, inputs, True, False)


@functools.lru_cache(maxsize=None)
def warm_forward_ad() -> None:
    """Import torch's jvp decompositions once, without the ``DeprecationWarning`` torch emits then.

    The first forward-mode AD call of a process imports them, and they call the deprecated
    ``torch.jit.script``: a one-off warning from torch itself that would fail a test suite run
    with warnings as errors.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            from torch._decomp import decompositions_for_jvp  # noqa: F401
        except ImportError:  # pragma: no cover - other torch versions
            pass


def eager_under_compile(fn: Callable) -> Callable:
    """``torch.compiler.disable(fn)``, with ``torch._dynamo`` imported only once a compile needs it.

    Outside ``torch.compile`` the wrapper calls ``fn`` directly. Under a ``torch.compile`` trace
    it calls (and caches) ``torch.compiler.disable(fn)``: ``fn`` runs eagerly, a graph break,
    as with the decorator, but ``import implicitdiff`` does not pay for importing dynamo.
    """
    disabled: list = []

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        if not disabled:
            disabled.append(torch.compiler.disable(fn))
        return disabled[0](*args, **kwargs)

    return wrapper


def in_derivative_transform() -> bool:
    """True under a ``torch.func`` derivative transform (``grad``, ``vjp``, ``jacrev``, ``jvp``, ``jacfwd``),
    not under ``vmap`` alone (``jacrev``'s backward runs under its ``vmap`` only)."""
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    return any(i.key() in (TransformType.Grad, TransformType.Jvp) for i in retrieve_all_functorch_interpreters())


def inductor_compile(fn: Callable, example_args: Sequence[torch.Tensor]) -> Callable:
    """``fn`` traced once on fake copies of ``example_args`` and compiled by Inductor (CPU C++).

    The result takes tensors of the examples' shapes, strides, dtypes and devices (nothing checks
    the shapes; another stride is an ``AssertionError`` of Inductor's: the caller keys its cache on
    all four) and returns ``fn``'s outputs, without autograd.  No guards
    are evaluated per call (``torch.compile``'s dynamo guards on the closure cost more than a
    small problem's arithmetic); Python control flow on tensor values in ``fn`` cannot be traced
    and raises; tensors ``fn`` closes over become constants of the graph (the tensor as it is
    at the call, by reference: a name rebound later is not seen).  Matrix-vector products stay BLAS
    calls (``aten.mv``/``addmv`` become one-column ``mm``, not Inductor's generated reductions, which
    are slower on the CPU).
    """
    with warnings.catch_warnings():  # torch's own deprecation notices on importing Inductor
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        from torch._inductor.compile_fx import compile_fx
        from torch._inductor.decomposition import select_decomp_table
        from torch.fx.experimental.proxy_tensor import make_fx

        aten = torch.ops.aten
        table = dict(select_decomp_table())
        table[aten.mv.default], table[aten.addmv.default] = _mv_as_mm, _addmv_as_mm
        # distinct examples: make_fx maps one tensor passed twice to one graph input
        examples = [a.detach().clone() for a in example_args]
        graph = make_fx(fn, tracing_mode="fake", _allow_non_fake_inputs=True)(*examples)
        return compile_fx(graph, examples, decompositions=table)


def _mv_as_mm(mat: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
    # A matrix-vector product as a one-column matrix product: Inductor's CPU lowering of ``mm``
    # is a BLAS call, where its own decomposition of ``mv`` is a generated reduction (slower).  A
    # decomposition, not a fallback: an op without lowering gets an implicit fallback, which
    # Inductor refuses outright when the environment sets ``CI`` and the op has a decomposition.
    return torch.mm(mat, vec.unsqueeze(-1)).squeeze(-1)


def _addmv_as_mm(self: torch.Tensor, mat: torch.Tensor, vec: torch.Tensor, *, beta=1, alpha=1) -> torch.Tensor:
    out = _mv_as_mm(mat, vec)
    if alpha != 1:
        out = out * alpha
    if beta == 0:  # addmv ignores ``self`` then (NaN in it included)
        return out
    return out + (self if beta == 1 else self * beta)


_solve_ex = getattr(torch, "_linalg_solve_ex", None)

#: ``solve_keeping_lu`` hands a C-contiguous ``A`` with at least this many entries to torch as the
#: transposed system (``X Aᵀ = Bᵀ``, ``left=False``), whose matrix is the column-major view ``Aᵀ``
#: that LAPACK factorizes in place of a copy of ``A`` (torch 2.13's plain solve copies a row-major
#: ``A``).  Below it the copy costs less than the three views the transposed call adds.
COPY_FREE_MIN = 1 << 16


def _copy_free(A: torch.Tensor) -> bool:
    return A.numel() >= COPY_FREE_MIN and A.is_contiguous()


def _solve_ex_call(A, B, vector, copy_free):
    if not copy_free:
        return _solve_ex(A, B)
    X, LU, piv, info = _solve_ex(A.mT, B.unsqueeze(-2) if vector else B.mT, left=False)
    return (X.squeeze(-2) if vector else X.mT), LU, piv, info


@functools.lru_cache(maxsize=None)
def _lu_is_of_transpose(copy_free: bool, contiguous: bool, device_type: str) -> Optional[bool]:
    # Which matrix torch's solve factorizes (A or Aᵀ) is torch's choice and has changed between
    # releases: ask it once per call form, on a matrix whose LU pivots.  None: neither (an LU
    # this module cannot read; the callers then do without it).
    M = torch.tensor([[1.0, 2.0, 0.0], [3.0, 1.0, 4.0], [0.0, 5.0, 1.0]], dtype=torch.float64, device=device_type)
    if not contiguous:
        M = M.mT.contiguous().mT
    LU = _solve_ex_call(M, torch.ones(3, dtype=M.dtype, device=M.device), True, copy_free)[1]
    if torch.equal(LU, torch.linalg.lu_factor(M)[0]):
        return False
    if torch.equal(LU, torch.linalg.lu_factor(M.mT)[0]):
        return True
    return None  # pragma: no cover - no torch seen so far


def solve_factorizes_transpose(A: torch.Tensor) -> bool:
    """Whether :func:`solve_keeping_lu` factorizes ``Aᵀ`` (else ``A``, or an LU it cannot read) for this ``A``."""
    if _solve_ex is None or A.is_complex():  # pragma: no cover - a torch without the op
        return False
    return _lu_is_of_transpose(_copy_free(A), A.is_contiguous(), A.device.type) is True


def solve_keeping_lu(A: torch.Tensor, B: torch.Tensor, vector: bool) -> tuple:
    """``X = A⁻¹ B`` by ``torch.linalg.solve``'s own op and autograd formulas, and its LU:
    returns ``(X, LU, pivots, info, transposed)``.

    ``B`` is ``(*, n)`` with ``A``'s batch shape when ``vector`` (``torch.linalg.solve``'s rule), else
    ``(*, n, k)``.  ``LU, pivots`` factorize ``Aᵀ`` when ``transposed`` is True
    (:func:`solve_factorizes_transpose`), ``A`` when it is False: ``torch.linalg.lu_solve(LU, pivots,
    Z, adjoint=transposed)`` is ``A⁻¹ Z``; ``None`` when this torch's LU is neither (do not use it).
    ``LU`` and ``pivots`` carry no gradient.  A large row-major
    ``A`` is passed as the transposed system (:data:`COPY_FREE_MIN`).
    """
    if _solve_ex is None:  # pragma: no cover - a torch without the op: factorize twice
        LU, piv, info = torch.linalg.lu_factor_ex(A.detach())
        return torch.linalg.solve(A, B), LU, piv, info, False
    copy_free = _copy_free(A)
    X, LU, piv, info = _solve_ex_call(A, B, vector, copy_free)
    return X, LU, piv, info, _lu_is_of_transpose(copy_free, A.is_contiguous(), A.device.type)
