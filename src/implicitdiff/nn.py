"""Thin ``nn.Module`` wrappers of the layers: ``QPLayer`` (and ``DEQ``, which the lead adds to this
file from ``_deq_module.py``).

A module holds the tensors it learns as ``nn.Parameter``\\ s and calls the functional layer,
so ``loss.backward()`` fills ``.grad`` of every parameter and ``torch.func.functional_call``
works as for any module.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ._core.errors import InputError
from .layers.qp import qp

__all__ = ["QPLayer"]

_NAMES = ("Q", "p", "G", "h", "A", "b")


class QPLayer(torch.nn.Module):
    r"""A quadratic program ``z* = argmin ½ zᵀQz + pᵀz  s.t.  Gz ≤ h, Az = b`` as a layer (OptNet).

    Each of ``Q, p, G, h, A, b`` is, by priority: the tensor passed to ``forward`` (per call,
    e.g. ``p`` computed from the input), else the module's parameter (if its name is in
    ``learn``) or buffer (if a tensor was given here), else absent (``None``).

    Args:
        n: number of variables (needed to initialize learned tensors that are not given).
        n_ineq, n_eq: rows of ``G``/``h`` and ``A``/``b`` for default initializations.
        learn: names to learn.  A learned ``Q`` is parametrized as ``Q = L Lᵀ + q_ridge·I`` (the
            parameter ``Q_factor = L``), so it stays positive semidefinite; the others are
            plain parameters.  Defaults when no initial tensor is given: ``L = I``, ``p = 0``,
            ``G`` and ``A`` random with rows of norm ≈ 1, ``h = 1``, ``b = 0`` (so ``z = 0``
            is feasible at initialization).
        Q, p, G, h, A, b: initial values (learned) or fixed values (buffers).
        q_ridge: the ``ε`` of a learned ``Q = L Lᵀ + εI``.
        rtol, max_iter, on_failure: passed to :func:`~implicitdiff.qp`.
        dtype, device, generator: of the default initializations.

    Attributes:
        last_info: the :class:`~implicitdiff.SolveInfo` of the last forward call.

    Example (learn the equality constraints of a projection):
        >>> import torch
        >>> from implicitdiff.nn import QPLayer
        >>> layer = QPLayer(3, n_eq=1, learn=("A", "b"), Q=torch.eye(3), dtype=torch.float32,
        ...                 generator=torch.Generator().manual_seed(0))
        >>> z = layer(p=-torch.randn(8, 3))             # p per call, (A, b) learned
        >>> z.shape
        torch.Size([8, 3])
        >>> z.square().sum().backward()
        >>> layer.A.grad.shape, layer.b.grad.shape
        (torch.Size([1, 3]), torch.Size([1]))
    """

    def __init__(self, n: Optional[int] = None, n_ineq: int = 0, n_eq: int = 0, *, learn: Sequence[str] = (),
                 Q=None, p=None, G=None, h=None, A=None, b=None, q_ridge: float = 0.0, rtol=None,
                 max_iter: int = 50, on_failure: str = "raise", dtype=None, device=None, generator=None):
        super().__init__()
        learn = tuple(learn)
        unknown = [k for k in learn if k not in _NAMES]
        if unknown:
            raise InputError(f"learn names unknown parameters {unknown}; choose among {_NAMES}")
        given = dict(Q=Q, p=p, G=G, h=h, A=A, b=b)
        ref = next((t for t in given.values() if isinstance(t, torch.Tensor)), None)
        dtype = dtype or (ref.dtype if ref is not None else torch.get_default_dtype())
        device = device or (ref.device if ref is not None else None)
        if n is None:
            n = _infer_n(given)
        self.n, self.q_ridge = n, float(q_ridge)
        self.rtol, self.max_iter, self.on_failure = rtol, max_iter, on_failure
        self.learn = learn
        self.last_info = None
        for name in _NAMES:
            t = given[name]
            if name in learn and t is None:
                if n is None:
                    raise InputError(f"QPLayer needs n to initialize the learned {name}; pass n or an initial {name}")
                t = _default(name, n, n_ineq, n_eq, dtype, device, generator)
            if t is None:
                if name != "Q":
                    setattr(self, name, None)
                continue
            t = torch.as_tensor(t, dtype=dtype, device=device)
            if name == "Q" and name in learn:
                L = torch.linalg.cholesky(t - q_ridge * torch.eye(t.shape[-1], dtype=t.dtype, device=t.device)
                                          + 1e-12 * torch.eye(t.shape[-1], dtype=t.dtype, device=t.device))
                self.Q_factor = torch.nn.Parameter(L.detach().clone())
            elif name in learn:
                setattr(self, name, torch.nn.Parameter(t.detach().clone()))
            else:  # a fixed tensor (a fixed Q is stored as ``Q_fixed``; ``Q`` is a property)
                self.register_buffer("Q_fixed" if name == "Q" else name, t.detach().clone())

    @property
    def Q(self):
        if "Q_factor" in self._parameters:
            L = self.Q_factor
            eye = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device)
            return L @ L.mT + self.q_ridge * eye
        return self._buffers.get("Q_fixed")

    def forward(self, *args, **kwargs):
        """``forward(Q=None, p=None, G=None, h=None, A=None, b=None)`` (positional in that order): per-call
        tensors override the module's; returns ``z`` ``(*batch, n)``."""
        if len(args) > len(_NAMES):
            raise InputError(f"QPLayer.forward takes at most {len(_NAMES)} positional tensors {_NAMES}")
        call = dict(zip(_NAMES, args))
        for k, v in kwargs.items():
            if k not in _NAMES:
                raise InputError(f"QPLayer.forward got an unknown argument {k!r}; the QP's tensors are {_NAMES}")
            if k in call:
                raise InputError(f"QPLayer.forward got {k} twice (positionally and by name)")
            call[k] = v
        ts = {k: call[k] if call.get(k) is not None else getattr(self, k) for k in _NAMES}
        if ts["p"] is None:
            raise InputError("QPLayer needs p: pass it to forward (p=...) or give/learn it in the constructor")
        z, info = qp(ts["Q"], ts["p"], ts["G"], ts["h"], ts["A"], ts["b"], rtol=self.rtol,
                     max_iter=self.max_iter, on_failure=self.on_failure, return_info=True)
        self.last_info = info
        return z

    def extra_repr(self) -> str:
        return f"n={self.n}, learn={self.learn}"


def _infer_n(given):
    for name, axis in (("p", -1), ("Q", -1), ("G", -1), ("A", -1)):
        t = given[name]
        if t is not None:
            return torch.as_tensor(t).shape[axis]
    return None


def _default(name, n, n_ineq, n_eq, dtype, device, generator):
    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)
    if name == "Q":
        return torch.eye(n, dtype=dtype, device=device)
    if name == "p":
        return torch.zeros(n, dtype=dtype, device=device)
    if name in ("G", "A"):
        rows = n_ineq if name == "G" else n_eq
        if rows <= 0:
            raise InputError(f"QPLayer learns {name} but n_{'ineq' if name == 'G' else 'eq'} is 0; pass the number "
                             "of rows or an initial tensor")
        return randn(rows, n) / n ** 0.5
    if name == "h":
        return torch.ones(n_ineq, dtype=dtype, device=device)
    return torch.zeros(n_eq, dtype=dtype, device=device)
