"""What every Krylov solver shares: input normalization, the stopping rule and the loop.

One place turns ``(A, b, x0, rtol, atol, max_iter, M)`` into a :class:`Problem`
(apply functions for ``A``, ``Aᵀ`` and ``M`` on ``(*batch, n)`` vectors, the
right-hand side broadcast to the batch shape, the per-element tolerance), and
one loop (:func:`run`) drives a solver's :class:`Iteration` to convergence with
a per-element status.

The stopping rule of the family, per batch element::

    ‖b − A x‖ ≤ max(rtol · ‖b‖, atol)

The loop stops an element when the solver's *recursive* residual estimate meets
it, then checks the *true* residual ``b − A x`` once all elements have stopped.
Elements whose true residual misses the rule (rounding makes the recursion
drift, e.g. CG in float32 on an ill-conditioned matrix), and elements whose
solver stalled in a curable way (a BiCGSTAB shadow-residual breakdown), are
restarted from their current ``x`` (residual replacement, at most
:data:`MAX_REPLACEMENTS` times); one whose true residual does not halve across
a restart, or is still off after the last one, has stagnated and is reported
as ``BREAKDOWN``.  The reported residual is always the true one.  An element that ends NaN/Inf
is ``NONFINITE`` where its data are (``b``, ``x0``, or ``A`` or ``M`` applied to a vector of ones),
else ``BREAKDOWN``: its iterates overflowed (CG on a singular operator).  That classification runs
once after the loop (one host read per solve; the probe products only when some element ended
non-finite), not per iteration (a per-iteration test slowed batched CG: docs/benchmarks.md).

Host synchronisation: the loop reads ``done.all()`` every ``check_every``
iterations (default 1 on CPU, where a sync is cheap, and 10 on CUDA, where it
stalls the queue); in between, converged elements are frozen by masks so extra
iterations do not move them.  A ``callback`` is called after every iteration
with the current ``x`` (which may sync).
"""

from __future__ import annotations

import abc
import contextlib
import warnings
from typing import Callable, NamedTuple, Optional

import torch

from ..._core.defaults import default_rtol
from ..._core.errors import InputError
from ..._core.options import check_callable, check_int, check_real
from ..._core.status import SolveInfo, Status
from ..._core.validate import tracks_grad
from ..operator import LinearOperator

__all__ = ["KrylovResult", "Problem", "Iteration", "normalize", "run", "CHECK_EVERY_CPU", "CHECK_EVERY_CUDA",
           "MAX_REPLACEMENTS", "dot", "norm", "safe", "col", "fast_csr", "quiet_sparse", "where_active",
           "and_active"]

CHECK_EVERY_CPU = 1
CHECK_EVERY_CUDA = 10
MAX_REPLACEMENTS = 4


class KrylovResult(NamedTuple):
    """``(x, info)`` of a Krylov solve: ``x`` of shape ``(*, n)`` and a per-element
    :class:`~implicitdiff.SolveInfo` (status, relative residual ``‖b − A x‖/‖b‖``, iterations)."""

    x: torch.Tensor
    info: SolveInfo


# --------------------------------------------------------------------- small vector helpers
def dot(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Batched inner product over the last dim."""
    return torch.linalg.vecdot(u, v)


def norm(u: torch.Tensor) -> torch.Tensor:
    """Batched 2-norm over the last dim."""
    return torch.linalg.vector_norm(u, dim=-1)


def safe(d: torch.Tensor) -> torch.Tensor:
    """A denominator with zeros replaced by ones (the lanes using it are masked elsewhere)."""
    return torch.where(d != 0, d, 1.0)


def where_active(active: Optional[torch.Tensor], a, b):
    """``a`` on active lanes, ``b`` on frozen ones; ``active is None`` means every lane is active."""
    return a if active is None else torch.where(active, a, b)


def and_active(active: Optional[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """``active & mask`` (``mask`` when every lane is active)."""
    return mask if active is None else active & mask


def col(s: torch.Tensor) -> torch.Tensor:
    """A per-element scalar ``(*batch,)`` as ``(*batch, 1)`` to scale vectors (a 0-dim scalar of an
    unbatched solve broadcasts as it is: one op less, which counts at n ≲ 10⁴)."""
    return s if s.dim() == 0 else s.unsqueeze(-1)


# --------------------------------------------------------------------- the normalized problem
class Problem(NamedTuple):
    """A Krylov problem in one canonical form (built by :func:`normalize`)."""

    mv: Callable  # (*batch, n) -> (*batch, m)
    rmv: Optional[Callable]  # (*batch, m) -> (*batch, n), None unless requested
    M: Optional[Callable]  # (*batch, k) -> (*batch, k) preconditioner (≈ A⁻¹), None for identity
    b: torch.Tensor  # (*batch, m)
    x0: torch.Tensor  # (*batch, n)
    bnorm: torch.Tensor  # (*batch,)
    tol: torch.Tensor  # (*batch,)  max(rtol ‖b‖, atol)
    rtol: float
    atol: float
    max_iter: int
    check_every: int
    callback: Optional[Callable]
    scale: Optional[torch.Tensor] = None  # (*batch, 1): the solve runs on b / scale; x is scaled back


def _dense_apply(A: torch.Tensor) -> Callable:
    if A.dim() == 2:
        At = A.mT
        return lambda x: x @ At  # one GEMM for any batch of vectors
    return lambda x: (A @ x.unsqueeze(-1)).squeeze(-1)


@contextlib.contextmanager
def quiet_sparse():
    """Silence torch's one-time "sparse CSR support is in beta" warning around internal conversions
    (a user running with warnings as errors should not fail on the library's own CSR copies)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        yield


def fast_csr(A: torch.Tensor) -> torch.Tensor:
    """``A`` as CSR with int32 indices where they fit: torch's CSR kernels are up to 2× faster with
    them (SciPy's choice too) and COO matvecs are 20× slower than CSR ones."""
    if A.layout == torch.sparse_csr and A.crow_indices().dtype == torch.int32:
        return A
    with quiet_sparse():
        return _fast_csr(A)


def _fast_csr(A):
    if A.layout == torch.sparse_coo:
        A = A.coalesce().to_sparse_csr()
    elif A.layout != torch.sparse_csr:
        A = A.to_sparse_csr()
    crow, cols = A.crow_indices(), A.col_indices()
    if crow.dtype == torch.int64 and max(A.shape[0], A.shape[1], cols.numel()) < 2 ** 31 - 1:
        A = torch.sparse_csr_tensor(crow.int(), cols.int(), A.values(), A.shape, check_invariants=False)
    return A


def _sparse_apply(A: torch.Tensor) -> Callable:
    A = fast_csr(A)
    m, n = A.shape

    def apply(x):
        if x.dim() == 1:
            return torch.mv(A, x)
        # CSR @ a row-major (n, k) matrix is several times faster than @ a transposed view
        lead = x.shape[:-1]
        return (A @ x.reshape(-1, n).T.contiguous()).T.contiguous().reshape(*lead, m)

    return apply


def _operator_applies(A, name: str):
    """``(mv, rmv_factory, shape, batch_shape, dtype)`` of anything a solver accepts as ``A``."""
    if isinstance(A, torch.Tensor):
        A = _as_operator(A, name)
    if isinstance(A, LinearOperator):
        mat = A.matrix
        if mat is not None and len(A.params) == 1 and A.params[0] is mat:
            if mat.layout == torch.strided:
                mv, rmv = _dense_apply(mat), (lambda: _dense_apply(mat.mT))
            else:
                mv = _sparse_apply(mat)
                rmv = (lambda: _sparse_apply(mat.t()))
            if A.symmetric:
                rmv = (lambda: mv)
            return mv, rmv, A.shape, A.batch_shape, mat.dtype
        op = A
        m, n = op.shape
        return (_checked_apply(op.mv, m, "the operator's matvec"), (lambda: _checked_apply(op.rmv, n, "the operator's rmatvec")),
                op.shape, op.batch_shape, op.dtype)
    if callable(A):
        return _checked_apply(A, None, name), None, None, torch.Size(), None
    raise InputError(
        f"{name} must be a dense or torch.sparse tensor, an implicitdiff.linalg.LinearOperator or a callable "
        f"x -> A x on (..., n) vectors; got {type(A).__name__}"
    )


def _checked_apply(fn: Callable, out_dim: Optional[int], name: str) -> Callable:
    """``fn`` with its output checked: a tensor of ``x``'s dtype and device, shape ``(*, out_dim)``
    (``x``'s own last dim for a square callable).  A user's matvec that returns ``None``, a list, the
    wrong shape or dtype is named in an :class:`InputError`, not met deep inside the solver."""
    def apply(x):
        y = fn(x)
        k = x.shape[-1] if out_dim is None else out_dim
        if not isinstance(y, torch.Tensor):
            raise InputError(f"{name} returned {type(y).__name__}; it must return a tensor of shape (..., {k}) "
                             f"for an input of shape {tuple(x.shape)}")
        if y.dim() < 1 or y.shape[-1] != k or (y.dim() > 1 and y.shape[:-1] != x.shape[:-1]):
            raise InputError(f"{name} returned shape {tuple(y.shape)} for an input of shape {tuple(x.shape)}; "
                             f"expected {tuple(x.shape[:-1]) + (k,)}")
        if y.dtype != x.dtype or y.device != x.device:
            raise InputError(f"{name} returned dtype/device {y.dtype}/{y.device} for an input of "
                             f"{x.dtype}/{x.device}; it must keep the input's dtype and device")
        return y
    return apply


def _as_operator(A: torch.Tensor, name: str) -> LinearOperator:
    if A.layout == torch.strided:
        if A.dim() < 2:
            raise InputError(f"{name} must have shape (*, m, n), got {tuple(A.shape)}")
        return LinearOperator.from_dense(A)
    if A.layout in (torch.sparse_coo, torch.sparse_csr) and A.dim() == 2:
        return LinearOperator.from_sparse(A)
    raise InputError(f"a sparse {name} must be a 2-D torch.sparse_coo or torch.sparse_csr tensor, "
                     f"got layout {A.layout} with {A.dim()} dims")


def _preconditioner(M, n: int) -> Optional[Callable]:
    if M is None:
        return None
    if isinstance(M, torch.Tensor):
        M = _as_operator(M, "M")
    if isinstance(M, LinearOperator):
        if M.shape != (n, n):
            raise InputError(f"M must be an (n, n) = ({n}, {n}) operator, got shape {M.shape}")
        mv, *_ = _operator_applies(M, "M")
        return mv
    if callable(M):
        return _checked_apply(M, None, "the preconditioner M")
    raise InputError(f"M must be a callable r -> M r on (..., n) vectors, a LinearOperator or a tensor; "
                     f"got {type(M).__name__}")


def normalize(A, b, x0=None, *, rtol=None, atol=0.0, max_iter=None, M=None, callback=None, check_every=None,
              solver: str, square: bool = True, need_rmv: bool = False) -> Problem:
    """Validate and normalize the arguments of a Krylov solver (raises :class:`InputError` on bad input).

    ``A`` is a dense ``(*, m, n)`` tensor (batch dims broadcast with ``b``), a 2-D
    ``torch.sparse`` COO/CSR tensor, a :class:`LinearOperator` or a callable
    ``x -> A x`` on ``(..., n)`` vectors (taken square, ``n = b.shape[-1]``, unless
    ``x0`` gives ``n``).  ``b`` is ``(*, m)``; ``x0`` is ``(*, n)``.
    """
    if not isinstance(b, torch.Tensor):
        raise InputError(f"{solver}: b must be a torch.Tensor of shape (*, m), got {type(b).__name__}")
    if b.dtype not in (torch.float32, torch.float64):
        raise InputError(f"{solver}: b has dtype {b.dtype}; solve in float32 or float64 (e.g. b.double())")
    if b.dim() < 1:
        raise InputError(f"{solver}: b must have shape (*, m), got a 0-dim tensor; use b.reshape(1)")
    mv, rmv_factory, shape, op_batch, op_dtype = _operator_applies(A, "A")
    m = b.shape[-1]
    if shape is None:  # a bare callable: square unless x0 says otherwise
        n = x0.shape[-1] if isinstance(x0, torch.Tensor) and x0.dim() >= 1 else m
        shape = (m, n)
        fn = mv
        rmv_factory = lambda: LinearOperator.from_matvec(lambda x: fn(x), shape).rmv  # noqa: E731
    if op_dtype is not None and op_dtype != b.dtype:
        raise InputError(f"{solver}: A has dtype {op_dtype} but b has {b.dtype}; convert one of them, "
                         f"e.g. b.to({op_dtype})")
    if shape[0] != m:
        raise InputError(f"{solver}: A has shape {tuple(shape)} (m = {shape[0]} rows) but b has shape "
                         f"{tuple(b.shape)}; b must be (*, {shape[0]})")
    n = shape[1]
    if square and shape[0] != shape[1]:
        raise InputError(f"{solver} needs a square operator, got shape {tuple(shape)}; use lsqr or lsmr for "
                         f"rectangular systems")
    if x0 is not None:
        if not isinstance(x0, torch.Tensor) or x0.dim() < 1 or x0.shape[-1] != n:
            got = tuple(x0.shape) if isinstance(x0, torch.Tensor) else type(x0).__name__
            raise InputError(f"{solver}: x0 must be a tensor of shape (*, {n}), got {got}")
        if x0.dtype != b.dtype or x0.device != b.device:
            raise InputError(f"{solver}: x0 has dtype/device {x0.dtype}/{x0.device} but b has "
                             f"{b.dtype}/{b.device}; use x0.to(b)")
    try:
        batch = torch.broadcast_shapes(b.shape[:-1], op_batch, x0.shape[:-1] if x0 is not None else ())
    except RuntimeError:
        raise InputError(f"{solver}: the batch dims of A {tuple(op_batch)}, b {tuple(b.shape[:-1])} and x0 "
                         f"do not broadcast") from None
    rtol = check_real(f"{solver}: rtol", rtol, low=0.0)
    rtol = default_rtol(b.dtype) if rtol is None else rtol
    atol = check_real(f"{solver}: atol", atol, low=0.0, allow_none=False)
    max_iter = check_int(f"{solver}: max_iter", max_iter, low=0)
    if max_iter is None:
        max_iter = 10 * n
    check_every = check_int(f"{solver}: check_every", check_every, low=1)
    if check_every is None:
        check_every = CHECK_EVERY_CUDA if b.device.type == "cuda" else CHECK_EVERY_CPU
    check_callable(f"{solver}: callback", callback, allow_none=True)
    # Scale: solve A (x/s) = b/s with s a power of two near max|b| (exact, per element), so that norms
    # neither underflow (b·1e-300 would give ‖b‖ = 0, "converged" at x = 0) nor overflow; x is scaled back.
    b = b.expand(*batch, m)
    scale = _pow2_scale(b.abs().amax(dim=-1, keepdim=True)) if m else torch.ones(*batch, 1, dtype=b.dtype,
                                                                                    device=b.device)
    b = b / scale
    x0 = torch.zeros(*batch, n, dtype=b.dtype, device=b.device) if x0 is None else x0.expand(*batch, n) / scale
    bnorm = norm(b)
    tol = torch.maximum(rtol * bnorm, atol / scale.squeeze(-1))
    if callback is not None:
        user_callback = callback
        callback = lambda x: user_callback(x * scale)  # noqa: E731
    return Problem(mv, rmv_factory() if need_rmv else None, _preconditioner(M, n), b, x0, bnorm,
                   tol, float(rtol), float(atol), max_iter, check_every, callback, scale)


def _pow2_scale(a: torch.Tensor) -> torch.Tensor:
    """A power of two near ``a`` (1 where ``a`` is 0 or not finite): dividing by it is exact."""
    _, e = torch.frexp(a)
    s = torch.ldexp(torch.ones_like(a), e)
    return torch.where((a > 0) & torch.isfinite(a), s, torch.ones_like(a))


# --------------------------------------------------------------------- the iteration protocol
class Iteration(abc.ABC):
    """One Krylov method as a restartable, batched iteration (the loop lives in :func:`run`).

    Attributes set by :meth:`init` and :meth:`step`: ``rnorm`` (``(*batch,)``
    recursive residual-norm estimate), ``broken`` (``(*batch,)`` bool: a breakdown
    in this step, final) and ``stall`` (bool: this lane cannot go on but a restart
    from its current ``x`` may cure it, e.g. a BiCGSTAB shadow-residual breakdown;
    the loop restarts it like a drifted lane).  Lanes not in ``active`` must keep
    their ``x``.
    """

    rnorm: torch.Tensor
    broken: torch.Tensor
    stall: torch.Tensor = None
    can_break = True  # class flags: whether ``broken`` / ``stall`` can ever be set by ``step``
    can_stall = False

    def __init__(self, prob: Problem):
        self.prob = prob
        self.stall = torch.zeros(prob.bnorm.shape, dtype=torch.bool, device=prob.b.device)

    @abc.abstractmethod
    def init(self, x: torch.Tensor) -> None:
        """(Re)start from ``x`` (``(*batch, n)``)."""

    @abc.abstractmethod
    def step(self, active: Optional[torch.Tensor]) -> None:
        """One iteration for the lanes in ``active`` (``None``: all lanes, a single system on the
        fast path of :func:`run`)."""

    @abc.abstractmethod
    def solution(self) -> torch.Tensor:
        """The current iterate ``x``."""

    def converged(self) -> torch.Tensor:
        """The stopping rule on the recursive estimate (``rnorm ≤ tol``; a NaN estimate stops too, and
        the true residual then reports it as ``NONFINITE``, or ``BREAKDOWN`` on finite data)."""
        return ~(self.rnorm > self.prob.tol)

    def verify(self, x: torch.Tensor):
        """``(ok, rel_residual)`` from the true residual ``b − A x``."""
        r = norm(self.prob.b - self.prob.mv(x))
        return r <= self.prob.tol, r / safe(self.prob.bnorm)


def run(it: Iteration) -> KrylovResult:
    """Drive ``it`` until every element converges, breaks down or ``max_iter`` is reached."""
    prob = it.prob
    x = prob.x0
    it.init(x)
    _refuse_autograd(vars(it).values())  # before the first iteration: the state after A x₀ and b shows it
    broken = it.broken.clone()
    done = it.converged() | broken
    iters = torch.zeros(done.shape, dtype=torch.int64, device=x.device)
    # One system checked every iteration: a step only ever runs while it is active, so the masks
    # (and ~10 small ops per iteration, which dominate for n ≲ 10⁴ on CPU) are skipped.
    single = done.numel() == 1 and prob.check_every == 1
    k, replacements = 0, 0
    prev_true = None
    while True:
        while k < prob.max_iter:
            if (k % prob.check_every == 0 or prob.callback is not None) and bool(done.all()):
                break
            active = None if single else ~done
            it.step(active)
            k += 1
            if single:
                iters += 1
                done = it.converged()
                if it.can_break:
                    broken = it.broken
                    done = done | broken
                if it.can_stall:
                    done = done | it.stall
            else:
                iters += active
                done = done | it.converged()
                if it.can_break:
                    broken = broken | (it.broken & active)
                    done = done | broken
                if it.can_stall:
                    done = done | (it.stall & active)
            if prob.callback is not None:
                prob.callback(it.solution())
        x = it.solution()
        ok, rel = it.verify(x)
        # stopped by the recursion (or stalled) but not by the true residual: replace and go on
        broken = broken | (done & ~torch.isfinite(rel))  # NaN/Inf: no restart can help
        drifted = done & ~ok & ~broken
        if k >= prob.max_iter or not bool(drifted.any()):
            break
        true_abs = rel * safe(prob.bnorm)
        if prev_true is not None:  # no halving of the true residual across a replacement: stagnation
            broken = broken | (drifted & (true_abs > 0.5 * prev_true))
        if replacements >= MAX_REPLACEMENTS:
            broken = broken | drifted
            break
        prev_true = true_abs
        replacements += 1
        it.init(x)
        broken = broken | (it.broken & ~ok)
        done = ok | broken
    status = torch.full(done.shape, int(Status.MAX_ITERATIONS), dtype=torch.int64, device=x.device)
    status = torch.where(broken, int(Status.BREAKDOWN), status)
    status = torch.where(ok, int(Status.SUCCESS), status)
    if prob.scale is not None:
        x = x * prob.scale
    finite = torch.isfinite(x).all(-1) & torch.isfinite(rel)
    if not bool(finite.all()):  # one read per solve: the classification costs nothing while all is finite
        overflowed = _finite_data(prob)
        status = torch.where(finite, status, torch.where(overflowed, int(Status.BREAKDOWN), int(Status.NONFINITE)))
    _refuse_autograd((x,))  # (again at the end: M, and lsqr/lsmr's first state, may not show it at the start)
    return KrylovResult(x, SolveInfo(status, rel, iters))


def _finite_data(prob: Problem) -> torch.Tensor:
    """Per element: ``b``, ``x₀`` and the products of ``A`` (and ``M``) on a vector of ones are finite, so a
    non-finite end came from the iterates themselves — overflow, as CG's on a singular operator, whose
    flat direction it divides by a vanishing curvature — not from NaN/Inf in the data (one product of
    each; called only when some element ended non-finite)."""
    ones = torch.ones_like(prob.x0)
    ok = torch.isfinite(prob.b).all(-1) & torch.isfinite(prob.x0).all(-1) & torch.isfinite(prob.mv(ones)).all(-1)
    if prob.M is not None:
        ok = ok & torch.isfinite(prob.M(ones)).all(-1)
    return ok


def _refuse_autograd(tensors) -> None:
    """Raise where the solve's state would carry autograd through the iterations: the "gradient" of a
    truncated recursion is wrong, and its graph grows with every iteration.  Seen through ``torch.func``
    wrappers too (inside ``torch.func.jvp`` a tensor of an enclosing autograd graph reads
    ``requires_grad=False``)."""
    if any(tracks_grad(t) for t in tensors):
        raise InputError(
            "the Krylov solvers of implicitdiff.linalg are forward only, and an input of this one requires grad "
            "(A, b, x0, or a tensor A's matvec or M uses): autograd through the iterations would give a wrong "
            "gradient. Use implicitdiff.linear_solve(A, b, solver=...) for the exact (implicit) gradient, or "
            "call the solver under torch.no_grad() / on detached inputs")
