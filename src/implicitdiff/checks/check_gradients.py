"""``check_gradients``: is the gradient of a function built on this library right, here, now?

It compares the derivatives that autograd computes through ``fn`` (the
library's implicit gradients) with float64 central finite differences and,
optionally, with the autograd derivatives of a ``reference`` function — the
same map computed another way (unrolled iterations, a closed form, a
``torch.linalg`` routine).  It does not trust either side to be exact: every
comparison carries an *expected error floor*, so a pass means "as accurate as
finite differences can tell" and a failure means a real discrepancy.
"""

from __future__ import annotations

import inspect
from typing import Callable, Optional

import torch

from .._core.errors import InputError
from .._core.torch_private import pytree, warm_forward_ad
from .._core.options import check_callable, check_choice, check_int, check_real
from .finite_diff import Flat, call, directional_derivatives, flat_output, flatten_inputs, is_float_tensor
from .report import Comparison, GradientReport

__all__ = ["check_gradients", "MODES"]

MODES = ("rev", "fwd", "both")
SAFETY = 10.0  # every floor term is multiplied by this: estimates, not bounds


def check_gradients(fn: Callable, *inputs, eps: float = 1e-6, rtol: Optional[float] = None,
                    atol: Optional[float] = None, reference: Optional[Callable] = None,
                    forward_tol: Optional[float] = None, mode: str = "rev", cond: Optional[float] = None,
                    seed: int = 0, max_fd_numel: int = 64, num_directions: int = 4,
                    fd_dtype: torch.dtype = torch.float64) -> GradientReport:
    r"""Compare the derivatives of ``fn(*inputs)`` with finite differences (and a ``reference``).

    Which inputs: every floating-point tensor leaf of ``inputs`` (tensors or
    pytrees of tensors); if some of them have ``requires_grad=True``, only
    those.  Which derivatives: with a random cotangent ``v`` over the (floating
    leaves of the) output and random tangents ``t``,

    * ``mode="rev"``: the vector-Jacobian product ``vᵀ J`` (``loss.backward()``);
    * ``mode="fwd"``: the Jacobian-vector product ``J t`` (``torch.func.jvp``);
    * ``mode="both"``: both.

    The oracle: float64 central differences ``D(h) = (f(x+hd) − f(x−hd)) / 2h``
    along every coordinate ``d`` of a leaf with at most ``max_fd_numel``
    elements, else along ``num_directions`` random directions, with
    ``h = eps · max(1, ‖x‖∞)``; and, if given, ``reference`` — a callable with
    ``fn``'s signature (e.g. the unrolled solver) whose autograd derivative is
    compared too, after checking that its value matches ``fn``'s.

    A comparison passes when every component satisfies
    ``|computed − expected| ≤ atol + rtol · S + floor``.  ``S`` is the size of
    the terms that sum to the derivative, ``max |v|ᵀ|J|`` (reverse) or
    ``max |J||t|`` (forward), so that a derivative that cancels to nearly zero
    is not held to a relative accuracy no computation has.  The expected error
    floor is (each term × 10, as they are estimates)::

        floor = |v|ᵀ |D(h) − D(2h)|        # measured truncation (h²) and noise of the FD
              + ‖v‖₁ δ / h                 # rounding of the FD:  δ = κ (u₆₄ + τ) ‖f‖∞
              + κ (u + τ) S                # rounding / early stop of the computed derivative

    ``u`` is the unit roundoff of the inputs' dtype, ``u₆₄`` that of
    ``fd_dtype``, ``τ = forward_tol``.  The forward tolerance propagates by the
    condition ``κ``: a solver that stops at a relative residual ``τ`` returns
    ``y`` with a relative error up to ``κ τ`` (for ``A y = b``,
    ``‖δy‖/‖y‖ ≤ ‖A⁻¹‖ ‖b‖/‖y‖ · τ``), which each finite-difference evaluation
    carries (divided by ``h``) and which the implicit derivative, evaluated at
    the inexact ``y``, carries too.  ``κ`` is ``cond`` if given, else the
    relative condition of ``fn`` measured from the finite differences,
    ``max(1, ‖J_x‖ ‖x‖ / ‖f(x)‖)`` maximized over the inputs (for
    ``y = A⁻¹ b`` with respect to ``A`` this is ``κ(A)`` in the Frobenius norm).
    With a loose ``forward_tol`` the floor can exceed the derivative: the
    report marks such rows "weak"; use a larger ``eps`` or a tighter solver.

    Args:
        fn: ``fn(*inputs)`` returning a tensor or a pytree of tensors.
        *inputs: tensors or pytrees of tensors (other leaves are passed unchanged).
        eps: relative finite-difference step.
        rtol: default ``1e-6`` for float64 inputs, ``1e-3`` for float32.
        atol: default ``0``.
        reference: a callable with ``fn``'s signature computing the same map
            another way; its autograd derivative is a second oracle.
        forward_tol: the forward solver's relative tolerance (``None``: exact, ``0``).
        mode: ``"rev"``, ``"fwd"`` or ``"both"``.
        cond: the condition number to use instead of the measured one.
        seed: seed of the random cotangents, tangents and directions.
        max_fd_numel: leaves up to this size are differenced along every coordinate.
        num_directions: random directions for larger leaves.
        fd_dtype: dtype of the finite differences (``fn`` must accept it).

    Returns:
        A :class:`~implicitdiff.checks.report.GradientReport`, truthy exactly
        when every comparison passes; ``print(report)`` shows the table.
        An exception raised while computing a derivative fails its row (the
        message is in the report) instead of propagating.

    Raises:
        InputError: bad options, no floating-point input, a non-tensor output,
            or ``fn`` failing on ``fd_dtype`` copies of the inputs.

    Example:
        >>> import torch, implicitdiff as idf
        >>> from implicitdiff.checks.check_gradients import check_gradients
        >>> A = torch.tensor([[1.0, 2.0]], dtype=torch.float64)     # the seed: x = a₁y₁ + a₂y₂
        >>> x = torch.tensor([3.0], dtype=torch.float64)
        >>> report = check_gradients(lambda A, x: idf.linear_solve(A, x, selection="min_norm"), A, x,
        ...                          reference=lambda A, x: torch.linalg.pinv(A) @ x, mode="both")
        >>> bool(report), report.inputs
        (True, ('A', 'x'))
    """
    _check_options(fn, eps, rtol, atol, reference, forward_tol, mode, cond, seed, max_fd_numel, num_directions,
                   fd_dtype)
    flat = flatten_inputs(inputs)
    names = _leaf_names(fn, flat, len(inputs))
    floating = [i for i, t in enumerate(flat.leaves) if is_float_tensor(t)]
    if not floating:
        raise InputError("check_gradients needs at least one floating-point tensor among the inputs")
    checked = [i for i in floating if flat.leaves[i].requires_grad] or floating
    dtype = flat.leaves[checked[0]].dtype
    for i in checked[1:]:
        dtype = torch.promote_types(dtype, flat.leaves[i].dtype)
    rtol = _default_rtol(dtype) if rtol is None else float(rtol)
    atol = 0.0 if atol is None else float(atol)
    tau = 0.0 if forward_tol is None else float(forward_tol)
    u, u_fd = torch.finfo(dtype).eps, torch.finfo(fd_dtype).eps
    # a stream of its own: random draws must not repeat the ones that built the inputs (torch.manual_seed(0))
    gen = torch.Generator().manual_seed((int(seed) * 2654435761 + 0x5EED) % 2**63)
    notes = []

    try:
        with torch.no_grad():
            f0 = flat_output(call(fn, flat.spec, _detached(flat.leaves, fd_dtype)), fd_dtype)
    except Exception as e:
        if all(flat.leaves[i].dtype == fd_dtype for i in floating):
            raise  # fn fails on the inputs as given: not the oracle's doing
        raise InputError(  # a dtype clash inside fn, typically
            f"fn failed on {fd_dtype} copies of the inputs ({type(e).__name__}: {e}); make fn follow its "
            f"inputs' dtype, or pass fd_dtype=torch.float32 with a larger eps (≈1e-3)"
        ) from e
    device = f0.device

    # -- the finite-difference oracle: D(h) and |D(h) − D(2h)| along directions D of each leaf
    fd = {}
    for i in checked:
        n = flat.leaves[i].numel()
        basis = n <= max_fd_numel
        if basis:
            D = torch.eye(n, dtype=fd_dtype)
        else:
            D = torch.randn(n, num_directions, generator=gen, dtype=fd_dtype)
            D = D / D.abs().amax(0)
            notes.append(f"{names[i]}: {n} elements > max_fd_numel={max_fd_numel}; "
                         f"checked along {num_directions} random directions")
        D = D.to(device)
        Dh, D2h, h = directional_derivatives(fn, flat, i, D, eps=eps, dtype=fd_dtype)
        fd[i] = (D, Dh, (Dh - D2h).abs(), h, basis)

    if cond is None:
        cond = _measured_cond(flat, fd, f0)
    f_inf = float(f0.abs().max()) if f0.numel() else 0.0
    delta = cond * (u_fd + tau) * f_inf  # noise of one evaluation of a component of f
    ref_floor = cond * (u + tau)         # relative error of a computed derivative

    rows = []
    if reference is not None:
        rows.append(_value_row(fn, reference, flat, dtype, rtol, atol, ref_floor))

    if mode in ("rev", "both"):
        v = torch.randn(f0.numel(), generator=gen, dtype=fd_dtype).to(device)
        got = _try(lambda: _vjp(fn, flat, checked, v))
        ref = _try(lambda: _vjp(reference, flat, checked, v)) if reference is not None else None
        for k, i in enumerate(checked):
            D, Dh, E, h, _ = fd[i]
            expected, size = v @ Dh, v.abs() @ Dh.abs()  # size: the terms' magnitude, immune to cancellation
            fd_floor = v.abs() @ E + v.abs().sum() * delta / h
            project = (lambda g, D=D: D.mT @ g)
            rows.append(_row(names[i], "rev", "fd", got, k, project, expected, size, fd_floor, rtol, atol, ref_floor))
            if ref is not None:
                exp_ref = None if isinstance(ref, str) else D.mT @ ref[k]
                rows.append(_row(names[i], "rev", "reference", got, k, project, exp_ref, size, 0.0, rtol, atol,
                                 ref_floor, ref_error=ref))

    if mode in ("fwd", "both"):
        for i in checked:
            D, Dh, E, h, basis = fd[i]
            # every coordinate was differenced: one random tangent; else the random directions themselves
            C = (torch.randn(D.shape[1], 1, generator=gen, dtype=fd_dtype) if basis
                 else torch.eye(D.shape[1], dtype=fd_dtype)).to(device)
            W = D @ C  # the tangents: (leaf_numel, r)
            expected, size = Dh @ C, Dh.abs() @ C.abs()
            fd_floor = E @ C.abs() + delta * C.abs().sum(0) / h
            got = _try(lambda: [_jvp(fn, flat, i, W)])
            rows.append(_row(names[i], "fwd", "fd", got, 0, _identity, expected, size, fd_floor, rtol, atol,
                             ref_floor))
            if reference is not None:
                ref = _try(lambda: _jvp(reference, flat, i, W))
                rows.append(_row(names[i], "fwd", "reference", got, 0, _identity,
                                 None if isinstance(ref, str) else ref, size, 0.0, rtol, atol, ref_floor,
                                 ref_error=ref))

    return GradientReport(tuple(rows), eps=float(eps), rtol=rtol, atol=atol, forward_tol=tau, cond=float(cond),
                          dtype=str(dtype).replace("torch.", ""), notes=tuple(notes))


# -- the computed derivatives -------------------------------------------------------------------------------


def _detached(leaves, dtype=None):
    return [(t.detach().to(dtype) if dtype is not None else t.detach()) if is_float_tensor(t) else t for t in leaves]


def _vjp(fn, flat: Flat, checked, v) -> list:
    """``vᵀ J`` for each checked leaf, by autograd through ``fn`` (float64, flattened)."""
    leaves = _detached(flat.leaves)
    for i in checked:
        leaves[i] = leaves[i].clone().requires_grad_(True)
    with torch.enable_grad():
        out = flat_output(call(fn, flat.spec, leaves))
        if out.numel() != v.numel():
            raise InputError(f"the output has {out.numel()} elements here but {v.numel()} in float64")
        s = (out * v.to(out.dtype)).sum()
        targets = [leaves[i] for i in checked]
        grads = (torch.autograd.grad(s, targets, allow_unused=True) if s.requires_grad
                 else [None] * len(targets))
    return [(torch.zeros_like(t) if g is None else g).reshape(-1).to(v.dtype) for t, g in zip(targets, grads)]


def _jvp(fn, flat: Flat, i: int, W: torch.Tensor) -> torch.Tensor:
    """``J w`` for each column ``w`` of ``W``, by ``torch.func.jvp`` through ``fn``: ``(out_numel, r)``."""
    warm_forward_ad()
    leaves = _detached(flat.leaves)
    x = leaves[i]

    def g(xi):
        args = list(leaves)
        args[i] = xi
        out = call(fn, flat.spec, args)
        return tuple(t for t in pytree.tree_leaves(out) if is_float_tensor(t))

    cols = []
    for r in range(W.shape[1]):
        _, tangents = torch.func.jvp(g, (x,), (W[:, r].reshape(x.shape).to(x.dtype),))
        cols.append(torch.cat([t.reshape(-1).to(W.dtype) for t in tangents]))
    return torch.stack(cols, -1)


def _try(thunk):
    try:
        return thunk()
    except Exception as e:  # reported in the row, not raised: a check must say what broke
        return f"{type(e).__name__}: {e}"


# -- comparisons ----------------------------------------------------------------------------------------------


def _identity(g):
    return g


def _row(name, mode, against, got, k, project, expected, size, fd_floor, rtol, atol, rel_floor, ref_error=None):
    """Compare ``project(got[k])`` with ``expected``; ``size`` is the magnitude of the terms that sum to it."""
    if isinstance(got, str) or isinstance(ref_error, str):
        msg = got if isinstance(got, str) else f"(reference) {ref_error}"
        nan = float("nan")
        return Comparison(name, mode, against, nan, nan, nan, nan, nan, False, msg)
    computed = project(got[k])
    scale = float(size.max()) if size.numel() else 0.0
    floor = SAFETY * (fd_floor + rel_floor * scale)
    allowed = atol + rtol * scale + floor
    err = (computed - expected).abs()
    finite = bool(torch.isfinite(computed).all())
    passed = finite and bool((err <= allowed).all())
    max_abs = float(err.max()) if err.numel() else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    floor_max = float(torch.as_tensor(floor).max())
    allowed_max = float(torch.as_tensor(allowed).max())
    return Comparison(name, mode, against, max_abs, max_rel, scale, floor_max, allowed_max, passed,
                      None if finite else "the computed derivative is not finite")


def _value_row(fn, reference, flat, dtype, rtol, atol, rel_floor) -> Comparison:
    """Does ``reference`` compute the same map as ``fn``?  (Else its gradient proves nothing.)"""
    def values():
        with torch.no_grad():
            leaves = _detached(flat.leaves)
            return (flat_output(call(fn, flat.spec, leaves), torch.float64),
                    flat_output(call(reference, flat.spec, leaves), torch.float64))
    got = _try(values)
    if isinstance(got, str):
        nan = float("nan")
        return Comparison("output", "value", "reference", nan, nan, nan, nan, nan, False, got)
    y, y_ref = got
    if y.shape != y_ref.shape:
        nan = float("nan")
        return Comparison("output", "value", "reference", nan, nan, nan, nan, nan, False,
                          f"reference returns {y_ref.numel()} values, fn returns {y.numel()}")
    return _row("output", "value", "reference", [y], 0, _identity, y_ref, y_ref.abs(), 0.0, rtol, atol, rel_floor)


def _measured_cond(flat: Flat, fd: dict, f0: torch.Tensor) -> float:
    """``max(1, ‖J_x‖ ‖x‖ / ‖f‖)`` over the checked leaves, ``‖J_x‖`` from the finite differences."""
    fnorm = float(f0.norm())
    if not fnorm > 0:
        return 1.0
    kappa = 1.0
    for i, (D, Dh, _, _, basis) in fd.items():
        if basis:
            jnorm = float(Dh.norm())  # Frobenius ≥ spectral: errs on the safe side
        else:
            jnorm = float((Dh.norm(dim=0) / D.norm(dim=0)).max())
        k = jnorm * float(flat.leaves[i].detach().double().norm()) / fnorm
        if k == k and k != float("inf"):
            kappa = max(kappa, k)
    return kappa


# -- options and names ----------------------------------------------------------------------------------------


def _default_rtol(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-6, torch.float32: 1e-3}.get(dtype, 1e-2)


def _check_options(fn, eps, rtol, atol, reference, forward_tol, mode, cond, seed, max_fd_numel,
                   num_directions, fd_dtype):
    """Every option, checked with the shared validators before any work (type, range, NaN)."""
    check_callable("fn", fn)
    check_choice("mode", mode, MODES)
    check_real("eps", eps, low=0.0, high=1.0, low_open=True, high_open=True, allow_none=False)
    for name, val in (("rtol", rtol), ("atol", atol), ("forward_tol", forward_tol)):
        check_real(name, val, low=0.0)
    check_real("cond", cond, low=1.0)
    check_callable("reference (a callable with fn's signature)", reference, allow_none=True)
    check_int("seed", seed, allow_none=False)
    check_int("max_fd_numel", max_fd_numel, low=0, allow_none=False)
    check_int("num_directions", num_directions, low=1, allow_none=False)
    if not (isinstance(fd_dtype, torch.dtype) and fd_dtype.is_floating_point and not fd_dtype.is_complex):
        raise InputError(f"fd_dtype must be a real floating torch.dtype (torch.float64, torch.float32), "
                         f"got {fd_dtype!r}")


def _leaf_names(fn, flat: Flat, n_args: int) -> list:
    """``"A"``, ``"params['w']"``: the parameter name of ``fn`` plus the key path inside the pytree."""
    arg_names = [f"inputs[{k}]" for k in range(n_args)]
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        params = []
    k = 0
    for p in params:
        if k >= n_args:
            break
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            arg_names[k] = p.name
            k += 1
        elif p.kind == p.VAR_POSITIONAL:
            for j in range(k, n_args):
                arg_names[j] = f"{p.name}[{j - k}]"
            break
    names = []
    for path in flat.paths:
        head = path[0].idx if path and hasattr(path[0], "idx") else 0
        names.append(arg_names[head] + pytree.keystr(tuple(path[1:])))
    return names
