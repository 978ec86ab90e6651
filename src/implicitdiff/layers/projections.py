r"""Euclidean projections onto simple convex sets, batched over leading dims, with exact gradients.

Each is ``argmin_z ½‖z − x‖²`` over a set — a QP small enough to solve in closed form.  The
closed forms are piecewise smooth in ``x`` (and in the radius or bounds), and autograd
through them gives their exact Jacobian wherever it exists: on the simplex, with support
``S = {i : zᵢ > 0}`` and ``s = 1_S``,

    ∂z/∂x = diag(s) − s sᵀ / |S|,     ∂z/∂r = s / |S|,

which is what differentiating the KKT conditions of the QP gives (the projection is
``qp(I, −x, −I, 0, 1ᵀ, r)``; :func:`~implicitdiff.qp` computes the same, slower).  At the
boundaries of the pieces (ties) autograd returns one of the one-sided derivatives.
Everything works under ``torch.func`` (``vmap``, ``jacrev``, ``jacfwd``).  A NaN or Inf in ``x`` is an
``InputError`` (as in ``qp`` and ``cone_program``; one host read per call, skipped under ``vmap`` and
``torch.compile``):
the closed forms would turn it into NaN silently, or into a NaN of every entry of the vector (simplex).
"""

from __future__ import annotations

import torch

from .._core.errors import InputError
from .._core.options import check_int
from .._core.validate import as_float_tensor, check_finite, is_vmapped
from ..linalg.krylov._common import _pow2_scale

__all__ = ["project_simplex", "project_box", "project_l1_ball", "project_l2_ball", "sparsemax"]


def _radius(radius, x, name="radius"):
    if isinstance(radius, bool) or not isinstance(radius, (int, float, torch.Tensor)):
        raise InputError(f"{name} must be a non-negative number or a tensor, got {type(radius).__name__} {radius!r}")
    r = torch.as_tensor(radius, dtype=x.dtype, device=x.device) if not isinstance(radius, torch.Tensor) else radius
    r = as_float_tensor(name, r, like=x)
    if r.device != x.device:
        raise InputError(f"{name} is on {r.device} but x is on {x.device}; move it, e.g. {name}.to(x.device)")
    if r.device.type != "meta" and not is_vmapped(r) and r.numel() and not bool(
            (torch.isfinite(r) & (r >= 0)).all()):  # one host read (a tensor radius)
        raise InputError(f"{name} must be finite and >= 0, got {r.tolist() if r.numel() < 8 else 'a bad entry'}")
    if r.dim() == 0:
        return r
    _check_broadcasts_to(name, r, x.shape[:-1], "the batch shape of x (one radius per projected vector)")
    return r.unsqueeze(-1)


def _finite(x):
    """The NaN/Inf check of the module docstring: skipped on meta tensors and while ``torch.compile``
    traces (a host read there would split the graph of a model using a projection as an activation)."""
    if x.device.type != "meta" and not torch.compiler.is_compiling():
        check_finite("x", x)
    return x


def _check_broadcasts_to(name, t, shape, what):
    """A projection returns the shape of ``x``: ``t`` must broadcast *to* ``shape``, not enlarge it."""
    try:
        ok = torch.broadcast_shapes(t.shape, shape) == shape
    except RuntimeError:
        ok = False
    if not ok:
        hint = f"a scalar or a tensor of shape {tuple(shape)}" if len(shape) else "a scalar"
        raise InputError(f"{name} has shape {tuple(t.shape)} but must broadcast to {what} {tuple(shape)}, so "
                         f"that the result has the shape of x: pass {hint}")


def _simplex(x, r):
    """Sort-based projection onto {z ≥ 0, Σz = r} along the last dim (Held et al. 1974; Duchi et al. 2008).

    With ``u`` sorted decreasingly, the support is the largest ``ρ`` with ``u_ρ > (Σ_{j≤ρ} u_j − r)/ρ``,
    and ``z = max(x − τ, 0)`` with ``τ = (Σ_{j≤ρ} u_j − r)/ρ``.  ``τ`` is gathered from a cumulative
    sum, so autograd differentiates exactly ``τ = (Σ_S x − r)/|S|``.
    """
    # Shift by the (detached) maximum first: the projection commutes with x -> x - c (τ moves by c),
    # and in shifted coordinates τ is O(r), so a radius far below |x| (x·1e16, r = 1) is not
    # rounded away in Σx − r.  The shift's derivative cancels in x − τ, so it is detached.
    n = x.shape[-1]
    if n == 0:
        raise InputError("x has 0 entries along the projected dim: the simplex in R^0 is empty")
    x = x - x.detach().amax(dim=-1, keepdim=True)
    u, _ = torch.sort(x, dim=-1, descending=True)
    css = torch.cumsum(u, dim=-1) - r
    k = torch.arange(1, n + 1, dtype=x.dtype, device=x.device)
    cond = (u - css / k) > 0
    rho = (cond.to(x.dtype) * k).amax(dim=-1, keepdim=True).clamp(min=1)
    tau = css.gather(-1, rho.long() - 1) / rho
    return torch.clamp(x - tau, min=0)


def project_simplex(x, radius=1.0):
    r"""Project onto the simplex ``{z : z ≥ 0, Σᵢ zᵢ = radius}`` along the last dim.

    Args:
        x: ``(*, n)``.
        radius: positive scalar or tensor broadcastable to ``(*,)`` (differentiable); a shape that
            would enlarge the batch (such as ``(*, 1)``) is an ``InputError``.

    Returns:
        ``z`` of shape ``(*, n)``.  Gradient: ``diag(s) − s sᵀ/|S|`` on the support ``S``.

    Example:
        >>> import torch, implicitdiff as idf
        >>> idf.project_simplex(torch.tensor([0.5, 1.2, -0.3]))
        tensor([0.1500, 0.8500, 0.0000])
    """
    x = _finite(as_float_tensor("x", x))
    if x.dim() < 1:
        raise InputError("x must have shape (*, n), got a scalar")
    return _simplex(x, _radius(radius, x))


def sparsemax(x, dim=-1):
    r"""Sparsemax (Martins & Astudillo, 2016): the projection of ``x`` onto the probability
    simplex along ``dim`` — a softmax-like map with exact zeros.

    Example:
        >>> import torch, implicitdiff as idf
        >>> idf.sparsemax(torch.tensor([[1.0, 2.0, 0.5], [0.1, 0.2, 0.3]]))
        tensor([[0.0000, 1.0000, 0.0000],
                [0.2333, 0.3333, 0.4333]])
    """
    x = _finite(as_float_tensor("x", x))
    if x.dim() < 1:
        raise InputError("x must have at least one dimension")
    dim = check_int("dim", dim, low=-x.dim(), high=x.dim() - 1, allow_none=False)
    return _simplex(x.movedim(dim, -1), 1.0).movedim(-1, dim)


def project_box(x, lower, upper):
    r"""Project onto the box ``{z : lower ≤ z ≤ upper}`` (elementwise clamp; bounds broadcast to the shape
    of ``x`` and receive gradients).

    Example:
        >>> import torch, implicitdiff as idf
        >>> idf.project_box(torch.tensor([-2.0, 0.3, 4.0]), 0.0, 1.0)
        tensor([0.0000, 0.3000, 1.0000])
    """
    x = _finite(as_float_tensor("x", x))
    lower = _bound("lower", lower, x)
    upper = _bound("upper", upper, x)
    if x.device.type != "meta" and not (is_vmapped(lower) or is_vmapped(upper)) and bool(
            (lower.isnan().any() | upper.isnan().any() | (lower > upper).any())):  # one host read
        raise InputError("lower and upper must not be NaN and need lower <= upper elementwise (±inf allowed)")
    return torch.minimum(torch.maximum(x, lower), upper)


def _bound(name, t, x):
    if isinstance(t, bool) or not isinstance(t, (int, float, torch.Tensor)):
        raise InputError(f"{name} must be a number or a tensor, got {type(t).__name__} {t!r}")
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device) if not isinstance(t, torch.Tensor) else t
    t = as_float_tensor(name, t, like=x)
    _check_broadcasts_to(name, t, x.shape, "the shape of x")
    return t


def project_l2_ball(x, radius=1.0):
    r"""Project onto the ball ``{z : ‖z‖₂ ≤ radius}`` along the last dim: ``x · min(1, radius/‖x‖)``.

    Example:
        >>> import torch, implicitdiff as idf
        >>> idf.project_l2_ball(torch.tensor([3.0, 4.0]))
        tensor([0.6000, 0.8000])
    """
    x = _finite(as_float_tensor("x", x))
    if x.dim() < 1:
        raise InputError("x must have shape (*, n), got a scalar")
    r = _radius(radius, x)
    # ‖x‖ = s ‖x/s‖ with s = max|x| a power of two (exact, detached: ‖·‖ is 1-homogeneous, so its
    # derivative is unchanged) — no overflow of Σx² at |x| ~ 1e160, no underflow at 1e-170.
    # x·r/‖x‖ = (x/s)·r/‖x/s‖: computed in the scaled variables, so its derivative has no ‖x‖² either.
    s = _pow2_scale(x.detach().abs().amax(dim=-1, keepdim=True)) if x.shape[-1] else torch.ones_like(x[..., :1])
    xs = x / s
    ns = torch.linalg.vector_norm(xs, dim=-1, keepdim=True)
    outside = ns * s > r
    safe = torch.where(outside, ns, torch.ones_like(ns))  # no 0/0 in the unused branch's gradient
    return torch.where(outside, xs * (r / safe), x)


def project_l1_ball(x, radius=1.0):
    r"""Project onto the ball ``{z : ‖z‖₁ ≤ radius}`` along the last dim:
    ``x`` inside, else ``sign(x) ∘ Π_simplex(|x|, radius)`` (Duchi et al., 2008).

    Example:
        >>> import torch, implicitdiff as idf
        >>> idf.project_l1_ball(torch.tensor([0.8, -0.6, 0.1]))
        tensor([ 0.6000, -0.4000,  0.0000])
    """
    x = _finite(as_float_tensor("x", x))
    if x.dim() < 1:
        raise InputError("x must have shape (*, n), got a scalar")
    r = _radius(radius, x)
    if x.shape[-1] == 0:
        return x.clone()
    inside = x.abs().sum(-1, keepdim=True) <= r
    xs = torch.where(inside, torch.zeros_like(x), x)  # the simplex branch sees no inside element
    z = torch.sign(xs) * _simplex(xs.abs(), r)
    return torch.where(inside, x, z)
