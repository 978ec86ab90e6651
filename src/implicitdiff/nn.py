"""Thin ``nn.Module`` wrappers of the layers: ``QPLayer``, ``DEQ`` and ``CvxpyLayer``.

A module holds the tensors it learns as ``nn.Parameter``\\ s and calls the functional layer,
so ``loss.backward()`` fills ``.grad`` of every parameter and ``torch.func.functional_call``
works as for any module.  Under ``torch.compile`` the solves of ``DEQ.forward``, ``CvxpyLayer.forward`` and the functional ``qp``
run eagerly: :func:`~implicitdiff._core.torch_private.eager_under_compile` (why: docs/architecture.md,
"Under torch.compile").
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ._core.errors import InputError
from ._core.failure import check_on_failure
from ._core.options import check_choice, check_int, check_real
from ._core.torch_private import eager_under_compile
from .layers.cvxpy_layer import canonicalize, rtol_from_solver_args, solve_canonical
from .layers.deq import DEFAULT_ADJOINT, DEQInfo, check_deq_options, deq, jacobian_penalty
from .layers.qp import qp
from .linalg.symmetric import symmetric_part

__all__ = ["QPLayer", "DEQ", "DEQInfo", "CvxpyLayer"]

_NAMES = ("Q", "p", "G", "h", "A", "b")


class QPLayer(torch.nn.Module):
    r"""A quadratic program ``z* = argmin ½ zᵀQz + pᵀz  s.t.  Gz ≤ h, Az = b`` as a layer (OptNet).

    Each of ``Q, p, G, h, A, b`` is, by priority: the tensor passed to ``forward`` (per call,
    e.g. ``p`` computed from the input), else the module's parameter (if its name is in
    ``learn``) or buffer (if a tensor was given here), else absent (``None``).

    Args:
        n: number of variables (needed to initialize learned tensors that are not given).
        n_ineq, n_eq: rows of ``G``/``h`` and ``A``/``b`` (needed to initialize a learned ``G``/``A``
            that is not given; ``0``, the default, leaves them to the tensors).  The sizes given are
            checked against every tensor, from the constructor or per call (an ``InputError`` naming
            the size), and a nonzero ``n_ineq``/``n_eq`` requires ``G``/``A`` to be present.
        learn: names to learn.  A learned ``Q`` is parametrized as ``Q = L Lᵀ + q_ridge·I`` (the
            parameter ``Q_factor = L``), so it stays positive semidefinite; the others are
            plain parameters.  Defaults when no initial tensor is given: ``L = I``, ``p = 0``,
            ``G`` and ``A`` random with rows of norm ≈ 1, ``h = 1``, ``b = 0`` (so ``z = 0``
            is feasible at initialization).
        Q, p, G, h, A, b: initial values (learned) or fixed values (buffers).  As in
            :func:`~implicitdiff.qp`, only the symmetric part of ``Q`` is used (a learned ``Q``
            starts as the factor of ``(Q + Qᵀ)/2``).
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
        n = check_int("n", n, low=1)
        n_ineq, n_eq = check_int("n_ineq", n_ineq, low=0, allow_none=False), check_int("n_eq", n_eq, low=0,
                                                                                        allow_none=False)
        q_ridge = check_real("q_ridge", q_ridge, low=0.0, allow_none=False)
        check_real("rtol", rtol, low=0.0, high=1.0, low_open=True, high_open=True)
        check_int("max_iter", max_iter, low=1, allow_none=False)
        check_choice("on_failure", on_failure, ("raise", "warn", "nan"))
        if isinstance(learn, str) or not all(isinstance(k, str) for k in learn):
            raise InputError(f"learn must be a sequence of names such as ('A', 'b'), got {learn!r}")
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
        _check_sizes(given, n, n_ineq, n_eq, "the constructor's ")
        self.n, self.n_ineq, self.n_eq, self.q_ridge = n, n_ineq, n_eq, float(q_ridge)
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
                eye = torch.eye(t.shape[-1], dtype=t.dtype, device=t.device)
                # the factor of Q's symmetric part, as qp uses (a Cholesky reads one triangle only)
                L, info = torch.linalg.cholesky_ex(symmetric_part(t) - q_ridge * eye + 1e-12 * eye)
                if bool((info != 0).any()):
                    raise InputError("QPLayer learns Q as L Lᵀ + q_ridge·I, but the initial Q − q_ridge·I is not "
                                     "positive definite; pass a positive definite Q (or a smaller q_ridge)")
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
        _check_sizes(ts, self.n, self.n_ineq, self.n_eq, "")
        for size, mat, vec in (("n_ineq", "G", "h"), ("n_eq", "A", "b")):
            if getattr(self, size) and ts[mat] is None:
                raise InputError(f"QPLayer was built with {size}={getattr(self, size)} but has no {mat}: pass {mat} "
                                 f"and {vec} to forward, or give or learn them in the constructor")
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


# the axes of each QP tensor that hold n (variables), n_ineq or n_eq (rows), counted from the end
_AXES = dict(Q=((-1, "n"), (-2, "n")), p=((-1, "n"),), G=((-1, "n"), (-2, "n_ineq")), h=((-1, "n_ineq"),),
             A=((-1, "n"), (-2, "n_eq")), b=((-1, "n_eq"),))


def _check_sizes(ts, n, n_ineq, n_eq, whose):
    """Each tensor in ``ts`` has the sizes the layer was built with (``None``/``0``: not declared)."""
    sizes = dict(n=n, n_ineq=n_ineq, n_eq=n_eq)
    for name, axes in _AXES.items():
        t = ts[name]
        if t is None:
            continue
        shape = t.shape if isinstance(t, torch.Tensor) else torch.as_tensor(t).shape
        for axis, size in axes:
            want = sizes[size]
            if want and len(shape) >= -axis and shape[axis] != want:
                raise InputError(f"QPLayer was built with {size}={want} but {whose}{name} has shape "
                                 f"{tuple(shape)} ({shape[axis]} at dim {axis}): pass {size}={shape[axis]} or a "
                                 f"{name} of matching shape")


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


class DEQ(torch.nn.Module):
    r"""Deep equilibrium layer ``z* = cell(z*, x)`` with implicit gradients to every cell parameter.

    The forward pass solves the fixed point per sample under ``no_grad``
    (Anderson by default; Broyden, Picard); the backward solves the adjoint
    system ``(I − ∂f/∂z)ᵀ v = z̄`` at ``z*`` and returns ``θ̄ = (∂f/∂θ)ᵀ v``
    for every parameter of the cell (lifted with ``torch.func.functional_call``)
    and ``x̄ = (∂f/∂x)ᵀ v``.  Memory is independent of the forward iterations.

    Args:
        cell: any ``nn.Module`` called as ``cell(z, x)`` and returning a tensor
            of ``z``'s shape; samples (dim 0) must not interact.
        solver: forward solver: ``None`` (default: the lazily started
            :data:`~implicitdiff.layers.deq.DEFAULT_SOLVER`), a solver object
            (``Anderson(...)``, ``Broyden(...)``, ``Picard(...)``, ``Newton(...)``),
            its name, or a callable.
        adjoint: the gradient: :data:`~implicitdiff.layers.deq.DEFAULT_ADJOINT`
            (exact: the adjoint fixed point by Picard, GMRES where that fails),
            ``Implicit(solver="gmres" | "lu" | ...)`` (exact),
            ``Neumann(k)`` (phantom gradient, ``k`` terms) or ``Unroll()``.
        rtol, atol, max_iter: per-sample forward stopping rule
            ``‖f(z) − z‖ ≤ atol + rtol ‖f(z0) − z0‖`` (rtol default 1e-10 in
            float64, 1e-6 in float32).
        on_failure: ``"raise"`` (default) | ``"warn"`` | ``"nan"`` for samples
            whose forward solve fails (their status is in :attr:`last_info`).
        jac_reg: number of Hutchinson probes of the Jacobian regularization
            ``‖∂f/∂z‖_F² / dim(z)`` at ``z*`` (0: off), over the converged
            samples.  In training mode the estimate is left in
            :attr:`jac_loss` (differentiable, double backward included) for
            the user to add to the loss with a weight.
        solver_options: removed (raises ``InputError``): options live on the solver object.
        track_trace: keep the residual of every forward iteration in
            ``last_info.trace`` (from the same solve, no extra cost but memory
            ``(iterations + 1) × B``).

    Attributes:
        last_info: :class:`~implicitdiff.layers.deq.DEQInfo` of the last call:
            per-sample ``status``, relative ``residual``, ``iterations`` and
            ``trace`` (tensors of shape ``(B,)``, trace ``(k + 1, B)``).
        jac_loss: the Jacobian penalty of the last training call, or ``None``.

    Shapes:
        ``x``: ``(B, ...)``; ``z0``: ``(B, ...)`` (default zeros like ``x``);
        output: ``z0``'s shape.

    Example:
        >>> import torch
        >>> from implicitdiff.nn import DEQ
        >>> class Cell(torch.nn.Module):
        ...     def __init__(self, n):
        ...         super().__init__()
        ...         self.lin = torch.nn.Linear(n, n)
        ...         torch.nn.init.normal_(self.lin.weight, std=0.2 / n ** 0.5)
        ...     def forward(self, z, x):
        ...         return torch.tanh(self.lin(z) + x)
        >>> layer = DEQ(Cell(8), jac_reg=1)
        >>> z = layer(torch.randn(4, 8))
        >>> (z.square().sum() + 0.1 * layer.jac_loss).backward()
        >>> layer.last_info.status.tolist(), layer.cell.lin.weight.grad.shape
        ([0, 0, 0, 0], torch.Size([8, 8]))
    """

    def __init__(self, cell: torch.nn.Module, *, solver=None, adjoint=DEFAULT_ADJOINT, rtol=None, atol=None,
                 max_iter=None, on_failure="raise", jac_reg: int = 0, solver_options: Optional[dict] = None,
                 track_trace: bool = False):
        super().__init__()
        if not isinstance(cell, torch.nn.Module):
            raise InputError(f"cell must be a torch.nn.Module called as cell(z, x), got {type(cell).__name__}")
        if isinstance(jac_reg, bool) or not isinstance(jac_reg, int) or jac_reg < 0:
            raise InputError(f"jac_reg must be an integer ≥ 0 (Hutchinson probes; 0 turns it off), got {jac_reg!r}")
        check_deq_options(solver=solver, adjoint=adjoint, rtol=rtol, atol=atol, max_iter=max_iter,
                          on_failure=on_failure, solver_options=solver_options)
        if not isinstance(track_trace, bool):
            raise InputError(f"track_trace must be True or False, got {track_trace!r}")
        self.cell = cell
        self.solver = solver
        self.adjoint = adjoint
        self.rtol = rtol
        self.atol = atol
        self.max_iter = max_iter
        self.on_failure = on_failure
        self.jac_reg = jac_reg
        self.solver_options = solver_options
        self.track_trace = bool(track_trace)
        self.last_info: Optional[DEQInfo] = None
        self.jac_loss: Optional[torch.Tensor] = None

    @eager_under_compile  # docs/architecture.md, "Under torch.compile"
    def forward(self, x: torch.Tensor, z0: Optional[torch.Tensor] = None) -> torch.Tensor:
        z, info = deq(self.cell, x, z0, solver=self.solver, adjoint=self.adjoint, rtol=self.rtol, atol=self.atol,
                      max_iter=self.max_iter, on_failure=self.on_failure, return_info=True,
                      solver_options=self.solver_options, trace=self.track_trace)
        self.last_info = info
        self.jac_loss = None
        if self.jac_reg and self.training and torch.is_grad_enabled():
            zj, xj = z, x
            if not bool(info.ok.all()):  # on_failure="nan"/"warn": measure at the converged samples only
                zj, xj = z[info.ok], x[info.ok]
            self.jac_loss = (jacobian_penalty(self.cell, zj, xj, samples=self.jac_reg) if len(zj)
                             else z.new_zeros(()))
        return z

    def extra_repr(self) -> str:
        return (f"solver={self.solver!r}, adjoint={self.adjoint!r}, rtol={self.rtol}, max_iter={self.max_iter}, "
                f"on_failure={self.on_failure!r}, jac_reg={self.jac_reg}")


class CvxpyLayer(torch.nn.Module):
    r"""A DPP cvxpy problem as a layer: a drop-in for ``cvxpylayers.torch.CvxpyLayer``.

    The problem is canonicalized **once** (cvxpy's parametrized cone program); per call the parameter
    tensors map to the cone program ``min cᵀx s.t. Ax + s = b, s ∈ K`` through a sparse affine map
    applied in torch (batched, differentiable, on the parameters' device and dtype), which
    :func:`~implicitdiff.cone_program` solves and differentiates (the exact derivative of the solution
    map).  See ``docs/cone_program.md``.

    Args:
        problem: a ``cvxpy.Problem`` that is DPP (``problem.is_dpp()``).
        parameters: all of the problem's ``cvxpy.Parameter`` objects, in the order of the tensors
            passed to ``forward``.
        variables: the ``cvxpy.Variable`` objects whose values ``forward`` returns, in order.
        solver, gp, verbose: cvxpylayers' keywords, accepted at their defaults only (``None``,
            ``False``, ``False``): the solver is always ``cone_program``; geometric programs are not
            supported.
        canon_backend: cvxpy's canonicalization backend (passed to ``get_problem_data``).
        solver_args: default ``{"eps": ...}`` (or ``eps_abs``/``eps_rel``): the relative tolerance
            ``rtol`` of ``cone_program``; other keys raise.
        rtol: the same tolerance by its own name (``None``: ``cone_program``'s default).
        on_failure: ``"raise"`` (default) | ``"warn"`` | ``"nan"`` for elements that fail (infeasible,
            unbounded, not converged); their status is in :attr:`last_info`.

    Attributes:
        last_info: the :class:`~implicitdiff.SolveInfo` of the last call (per batch element).

    ``forward(*params, solver_args=None)`` takes one tensor per parameter, of the parameter's shape or
    with one leading batch dimension (batched and unbatched tensors mix; unbatched ones broadcast),
    all of one floating dtype on one device, and returns a tuple with one tensor per variable
    (batched iff a parameter is).  Raises :class:`~implicitdiff.InputError` for a non-DPP problem,
    foreign parameters or variables, a parameter given twice, wrong number, shape or dtype of tensors,
    and a NaN/Inf in a parameter tensor (named by its position and cvxpy name).

    Example:
        >>> import cvxpy as cp, torch
        >>> from implicitdiff.nn import CvxpyLayer
        >>> x = cp.Variable(2)
        >>> A, b = cp.Parameter((3, 2)), cp.Parameter(3)
        >>> problem = cp.Problem(cp.Minimize(cp.sum_squares(A @ x - b)), [x >= 0])
        >>> layer = CvxpyLayer(problem, parameters=[A, b], variables=[x])
        >>> A_t = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
        >>> b_t = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)   # a batch of 8
        >>> (sol,) = layer(A_t, b_t)
        >>> sol.shape
        torch.Size([8, 2])
        >>> sol.sum().backward()
    """

    def __init__(self, problem, parameters, variables, solver=None, gp=False, verbose=False, canon_backend=None,
                 solver_args=None, *, rtol=None, on_failure="raise"):
        super().__init__()
        if solver is not None:
            raise InputError(f"solver={solver!r} selects one of cvxpylayers' backends; this layer always solves with "
                             "implicitdiff.cone_program. Remove solver= (tolerances go in rtol= or solver_args)")
        if gp is not False:
            raise InputError("gp=True (geometric programs) is not supported by implicitdiff's CvxpyLayer; take the "
                             "logarithms yourself and pass the DCP problem, or use cvxpylayers")
        if verbose is not False:
            raise InputError("verbose=True does not apply: cone_program prints nothing; read layer.last_info "
                             "(status, residual, iterations per element) instead")
        self.canonical = canonicalize(problem, parameters, variables, canon_backend=canon_backend)
        self.rtol = rtol_from_solver_args(solver_args, default=rtol)
        check_on_failure(on_failure)
        self.on_failure = on_failure
        self.last_info = None

    @eager_under_compile  # docs/architecture.md, "Under torch.compile"
    def forward(self, *params, solver_args=None, warm_start=False):
        if warm_start is not False:
            raise InputError("warm_start does not apply: cone_program starts every solve afresh; remove it")
        rtol = rtol_from_solver_args(solver_args, default=self.rtol)
        values, info = solve_canonical(self.canonical, params, rtol=rtol, on_failure=self.on_failure)
        self.last_info = info
        return values

    def extra_repr(self) -> str:
        c = self.canonical
        return f"m={c.m}, n={c.n}, cones={c.cones}, rtol={self.rtol}, on_failure={self.on_failure!r}"
