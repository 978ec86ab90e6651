"""Linear operators: a dense, batched dense, sparse or matrix-free ``A`` behind one interface.

A :class:`LinearOperator` of shape ``(m, n)`` (with optional leading batch
dimensions for dense matrices) applies ``x -> A x`` to vectors ``x`` of shape
``(..., n)`` and, where it can, ``y -> Aᵀ y``.  Structure tags
(``symmetric``, ``positive_definite``) let solvers pick Cholesky or CG/MINRES;
:meth:`LinearOperator.check_tags` verifies them numerically in a debug run.

The tensors that define the operator are explicit (:attr:`params`), and every
apply takes them as arguments (``matvec(x, *params)``), so that the autograd
layer can differentiate with respect to them without relying on closures.

A user's ``matvec``/``rmatvec`` given with ``vectorized=True`` (the default) is called on batches
``(..., n)``; one written for 1-D vectors fails there with torch's own shape error, so
:func:`_hint_vectorized` re-raises a ``RuntimeError`` on a batched input as an
:class:`InputError` naming ``vectorized=False`` (the original error chained).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .._core.errors import InputError

__all__ = ["LinearOperator", "aslinearoperator"]


def _dense_mv(x, A):
    return (A @ x.unsqueeze(-1)).squeeze(-1)


def _dense_rmv(y, A):
    return (A.mT @ y.unsqueeze(-1)).squeeze(-1)


def _sparse_mv(x, A):
    lead = x.shape[:-1]
    out = A @ x.reshape(-1, x.shape[-1]).mT  # (m, k)
    return out.mT.reshape(*lead, A.shape[0])


def _sparse_rmv(y, A):
    lead = y.shape[:-1]
    out = (y.reshape(-1, y.shape[-1]) @ A)  # (k, n): dense @ sparse
    return out.reshape(*lead, A.shape[1])


class LinearOperator:
    """A linear map ``A: R^n -> R^m`` given by a matrix or by a matvec.

    Build one with :meth:`from_dense`, :meth:`from_sparse` or :meth:`from_matvec`
    (or :func:`aslinearoperator`).  Attributes: ``shape`` ``(m, n)``,
    ``batch_shape``, ``dtype``, ``device``, ``symmetric``, ``positive_definite``,
    ``params`` (the defining tensors) and ``matrix`` (the dense or sparse tensor,
    or ``None`` for a matvec operator).

    Example:
        >>> import torch, implicitdiff as idf
        >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
        >>> op = idf.linalg.LinearOperator.from_dense(A, positive_definite=True)
        >>> op.mv(torch.tensor([1.0, 1.0]))
        tensor([3., 4.])
    """

    def __init__(self, matvec: Callable, shape, params: tuple = (), *, rmatvec: Optional[Callable] = None,
                 dtype=None, device=None, symmetric: bool = False, positive_definite: bool = False,
                 matrix: Optional[torch.Tensor] = None, batch_shape=(), vectorized: bool = True):
        if not callable(matvec):
            raise InputError(f"matvec must be callable as matvec(x, *params), got {type(matvec).__name__}")
        if rmatvec is not None and not callable(rmatvec):
            raise InputError(f"rmatvec must be callable as rmatvec(y, *params), got {type(rmatvec).__name__}")
        try:
            ok = len(shape) == 2 and all(int(d) == d and int(d) >= 0 and not isinstance(d, bool) for d in shape)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise InputError(f"shape must be (m, n) with non-negative integers, got {shape!r}")
        if positive_definite and shape[0] != shape[1]:
            raise InputError(f"a positive definite operator must be square, got shape {tuple(shape)}")
        if symmetric and shape[0] != shape[1]:
            raise InputError(f"a symmetric operator must be square, got shape {tuple(shape)}")
        self._matvec = matvec if vectorized else _vectorize(matvec, len(params))
        self._rmatvec = None if rmatvec is None else (rmatvec if vectorized else _vectorize(rmatvec, len(params)))
        self.shape = (int(shape[0]), int(shape[1]))
        self.params = tuple(params)
        self.dtype = dtype
        self.device = device
        self.symmetric = bool(symmetric or positive_definite)
        self.positive_definite = bool(positive_definite)
        self.matrix = matrix
        self.batch_shape = torch.Size(batch_shape)

    # ----------------------------------------------------------------- builders
    @classmethod
    def from_dense(cls, A: torch.Tensor, *, symmetric=False, positive_definite=False) -> "LinearOperator":
        """Wrap a dense ``(*, m, n)`` tensor (batch dimensions broadcast against ``x``)."""
        if not isinstance(A, torch.Tensor) or A.layout != torch.strided or A.dim() < 2:
            raise InputError("from_dense needs a dense tensor of shape (*, m, n)")
        return cls(_dense_mv, A.shape[-2:], (A,), rmatvec=_dense_rmv, dtype=A.dtype, device=A.device,
                   symmetric=symmetric, positive_definite=positive_definite, matrix=A, batch_shape=A.shape[:-2])

    @classmethod
    def from_sparse(cls, A: torch.Tensor, *, symmetric=False, positive_definite=False) -> "LinearOperator":
        """Wrap a 2-D ``torch.sparse`` COO or CSR matrix."""
        if not isinstance(A, torch.Tensor) or A.layout not in (torch.sparse_coo, torch.sparse_csr) or A.dim() != 2:
            raise InputError("from_sparse needs a 2-D torch.sparse_coo or torch.sparse_csr tensor")
        return cls(_sparse_mv, A.shape, (A,), rmatvec=_sparse_rmv, dtype=A.dtype, device=A.device,
                   symmetric=symmetric, positive_definite=positive_definite, matrix=A)

    @classmethod
    def from_matvec(cls, matvec: Callable, shape, *params, rmatvec: Optional[Callable] = None, dtype=None,
                    device=None, symmetric=False, positive_definite=False, vectorized=True) -> "LinearOperator":
        """A matrix-free operator: ``matvec(x, *params)`` maps ``(..., n)`` to ``(..., m)``.

        ``params`` are the tensors the map depends on (gradients flow to them);
        ``rmatvec(y, *params)`` applies ``Aᵀ`` (if omitted, it is derived with
        ``torch.func.vjp`` of ``matvec``).  With ``vectorized=False`` the maps
        may take 1-D vectors only and are batched with ``torch.func.vmap``.
        """
        tensors = [p for p in params if isinstance(p, torch.Tensor)]
        if dtype is None and tensors:
            dtype = tensors[0].dtype
        if device is None and tensors:
            device = tensors[0].device
        if vectorized:
            matvec = _hint_vectorized(matvec, "matvec")
            rmatvec = None if rmatvec is None else _hint_vectorized(rmatvec, "rmatvec")
        return cls(matvec, shape, params, rmatvec=rmatvec, dtype=dtype, device=device, symmetric=symmetric,
                   positive_definite=positive_definite, vectorized=vectorized)

    # ----------------------------------------------------------------- applies
    @property
    def is_dense(self) -> bool:
        return self.matrix is not None and self.matrix.layout == torch.strided

    @property
    def is_sparse(self) -> bool:
        return self.matrix is not None and self.matrix.layout != torch.strided

    def mv(self, x: torch.Tensor, *params) -> torch.Tensor:
        """``A x`` for ``x`` of shape ``(..., n)``; ``params`` replace :attr:`params` when given."""
        return self._matvec(x, *(params or self.params))

    def rmv(self, y: torch.Tensor, *params) -> torch.Tensor:
        """``Aᵀ y`` for ``y`` of shape ``(..., m)`` (``A x`` again for a symmetric operator)."""
        params = params or self.params
        if self.symmetric:
            return self._matvec(y, *params)
        if self._rmatvec is not None:
            return self._rmatvec(y, *params)
        # Aᵀ y = vjp of x -> A x at any x, with cotangent y (the map is linear).
        x0 = torch.zeros(*y.shape[:-1], self.shape[1], dtype=y.dtype, device=y.device)
        _, vjp = torch.func.vjp(lambda x: self._matvec(x, *params), x0)
        return vjp(y)[0]

    @property
    def T(self) -> "LinearOperator":
        """The transposed operator."""
        if self.symmetric:
            return self
        if self.matrix is not None and self.is_dense:
            return LinearOperator.from_dense(self.matrix.mT)
        return LinearOperator(lambda y, *p: self.rmv(y, *p), self.shape[::-1], self.params,
                              rmatvec=self._matvec, dtype=self.dtype, device=self.device)

    def to_dense(self) -> torch.Tensor:
        """Materialize ``A`` as a dense ``(*, m, n)`` tensor (n matvecs for a matrix-free operator)."""
        if self.matrix is not None:
            return self.matrix if self.is_dense else self.matrix.to_dense()
        eye = torch.eye(self.shape[1], dtype=self.dtype, device=self.device)
        return self.mv(eye).mT  # columns A e_j

    def check_tags(self, *, trials: int = 3, rtol: float | None = None) -> None:
        """Debug check that the ``symmetric`` / ``positive_definite`` tags hold on random vectors.

        Raises :class:`InputError` naming the tag that fails.  Costs ``2 · trials`` applies.
        """
        if not (self.symmetric or self.positive_definite):
            return
        n = self.shape[1]
        dtype = self.dtype or torch.float64
        tol = rtol if rtol is not None else (1e-4 if dtype == torch.float32 else 1e-8)
        g = torch.Generator(device="cpu").manual_seed(0)
        for _ in range(trials):
            u = torch.randn(n, generator=g, dtype=dtype).to(self.device)
            v = torch.randn(n, generator=g, dtype=dtype).to(self.device)
            Au, Av = self._matvec(u, *self.params), self._matvec(v, *self.params)
            lhs, rhs = (v * Au).sum(-1), (u * Av).sum(-1)
            scale = Au.norm(dim=-1) * v.norm() + Av.norm(dim=-1) * u.norm()
            if bool(((lhs - rhs).abs() > tol * scale).any()):
                raise InputError("the operator is tagged symmetric but vᵀAu ≠ uᵀAv; drop symmetric=True")
            if self.positive_definite and bool(((u * Au).sum(-1) <= 0).any()):
                raise InputError("the operator is tagged positive_definite but uᵀAu ≤ 0 for some u; "
                                 "drop positive_definite=True")

    def __repr__(self):
        kind = "dense" if self.is_dense else "sparse" if self.is_sparse else "matvec"
        tags = [t for t in ("symmetric", "positive_definite") if getattr(self, t)]
        return f"LinearOperator({kind}, shape={self.shape}, batch_shape={tuple(self.batch_shape)}, tags={tags})"


def _vectorize(fn, nparams):
    def batched(x, *params):
        lead = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1])
        out = torch.func.vmap(fn, in_dims=(0,) + (None,) * nparams)(flat, *params)
        return out.reshape(*lead, out.shape[-1])
    return batched


def _hint_vectorized(fn, name):
    """``fn`` whose ``RuntimeError`` on a batch ``x`` (``x.dim() ≥ 2``) becomes an :class:`InputError`
    naming ``vectorized=False`` (see the module docstring) — only where ``fn`` runs on one vector of the
    batch (a 1-D-only map); any other error (a failing user function inside the library's own operators,
    out of memory) is re-raised as it is."""
    if not callable(fn):  # the constructor reports it
        return fn

    def checked(x, *params):
        try:
            return fn(x, *params)
        except RuntimeError as e:
            if x.dim() < 2 or isinstance(e, torch.OutOfMemoryError) or not _takes_one_vector(fn, x, params):
                raise  # not a 1-D-only map (its error has another cause: it is the user's to read)
            raise InputError(f"{name}(x, *params) failed on a batch x of shape {tuple(x.shape)}: {e}. "
                             f"from_matvec calls it on batches (..., n) of vectors; if it takes 1-D vectors only, "
                             f"pass vectorized=False (it is then batched with torch.func.vmap)") from e
    return checked


def _takes_one_vector(fn, x, params) -> bool:
    """Whether ``fn`` runs on one vector of the batch ``x`` (then its failure on the batch is the 1-D-only kind)."""
    try:
        fn(x.reshape(-1, x.shape[-1])[0], *params)
    except Exception:  # noqa: BLE001 - any failure: not the kind the hint is about
        return False
    return True


def aslinearoperator(A, *, symmetric=False, positive_definite=False) -> LinearOperator:
    """Return ``A`` as a :class:`LinearOperator` (dense tensor, sparse tensor, or operator)."""
    if isinstance(A, LinearOperator):
        return A
    if isinstance(A, torch.Tensor):
        if A.layout == torch.strided:
            return LinearOperator.from_dense(A, symmetric=symmetric, positive_definite=positive_definite)
        return LinearOperator.from_sparse(A, symmetric=symmetric, positive_definite=positive_definite)
    raise InputError(f"A must be a torch.Tensor or an implicitdiff.linalg.LinearOperator, got {type(A).__name__}")
