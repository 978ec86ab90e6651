r"""Euclidean projections onto simple convex sets, batched over leading dims, with exact gradients.

Each is ``argmin_z ½‖z − x‖²`` over a set — a QP small enough to solve in closed form.  The
closed forms are piecewise smooth in ``x`` (and in the radius or bounds), and autograd
through them gives their exact Jacobian wherever it exists: on the simplex, with support
``S = {i : zᵢ > 0}`` and ``s = 1_S``,

    ∂z/∂x = diag(s) − s sᵀ / |S|,     ∂z/∂r = s / |S|,

which is what differentiating the KKT conditions of the QP gives (the projection is
``qp(I, −x, −I, 0, 1ᵀ, r)``; :func:`~implicitdiff.qp` computes the same, slower).  At the
boundaries of the pieces (ties) autograd returns one of the one-sided derivatives.
Everything works under ``torch.func`` (``vmap``, ``jacrev``, ``jacfwd``).
"""

from __future__ import annotations

import torch

from .._core.errors import InputError
from .._core.validate import as_float_tensor

__all__ = ["project_simplex", "project_box", "project_l1_ball", "project_l2_ball", "sparsemax"]


def _radius(radius, x, name="radius"):
    r = torch.as_tensor(radius, dtype=x.dtype, device=x.device) if not isinstance(radius, torch.Tensor) else radius
    r = as_float_tensor(name, r, like=x)
    if r.dim() == 0:
        return r
    try:
        torch.broadcast_shapes(r.shape, x.shape[:-1])
    except RuntimeError:
        raise InputError(f"{name} must be a scalar or broadcast with the batch shape of x {tuple(x.shape[:-1])}, "
                         f"got {tuple(r.shape)}") from None
    return r.unsqueeze(-1)


def _simplex(x, r):
    """Sort-based projection onto {z ≥ 0, Σz = r} along the last dim (Held et al. 1974; Duchi et al. 2008).

    With ``u`` sorted decreasingly, the support is the largest ``ρ`` with ``u_ρ > (Σ_{j≤ρ} u_j − r)/ρ``,
    and ``z = max(x − τ, 0)`` with ``τ = (Σ_{j≤ρ} u_j − r)/ρ``.  ``τ`` is gathered from a cumulative
    sum, so autograd differentiates exactly ``τ = (Σ_S x − r)/|S|``.
    """
    n = x.shape[-1]
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
        radius: positive scalar or tensor broadcastable to ``(*,)`` (differentiable).

    Returns:
        ``z`` of shape ``(*, n)``.  Gradient: ``diag(s) − s sᵀ/|S|`` on the support ``S``.

    Example:
        >>> import torch, implicitdiff as idf
        >>> idf.project_simplex(torch.tensor([0.5, 1.2, -0.3]))
        tensor([0.1500, 0.8500, 0.0000])
    """
    x = as_float_tensor("x", x)
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
    x = as_float_tensor("x", x)
    if x.dim() < 1:
        raise InputError("x must have at least one dimension")
    return _simplex(x.movedim(dim, -1), 1.0).movedim(-1, dim)


def project_box(x, lower, upper):
    r"""Project onto the box ``{z : lower ≤ z ≤ upper}`` (elementwise clamp; bounds broadcast with ``x``
    and receive gradients).

    Example:
        >>> import torch, implicitdiff as idf
        >>> idf.project_box(torch.tensor([-2.0, 0.3, 4.0]), 0.0, 1.0)
        tensor([0.0000, 0.3000, 1.0000])
    """
    x = as_float_tensor("x", x)
    lower = _bound("lower", lower, x)
    upper = _bound("upper", upper, x)
    return torch.minimum(torch.maximum(x, lower), upper)


def _bound(name, t, x):
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device) if not isinstance(t, torch.Tensor) else t
    t = as_float_tensor(name, t, like=x)
    try:
        torch.broadcast_shapes(t.shape, x.shape)
    except RuntimeError:
        raise InputError(f"{name} has shape {tuple(t.shape)}, which does not broadcast with x {tuple(x.shape)}") \
            from None
    return t


def project_l2_ball(x, radius=1.0):
    r"""Project onto the ball ``{z : ‖z‖₂ ≤ radius}`` along the last dim: ``x · min(1, radius/‖x‖)``.

    Example:
        >>> import torch, implicitdiff as idf
        >>> idf.project_l2_ball(torch.tensor([3.0, 4.0]))
        tensor([0.6000, 0.8000])
    """
    x = as_float_tensor("x", x)
    r = _radius(radius, x)
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    outside = norm > r
    safe = torch.where(outside, norm, torch.ones_like(norm))  # no 0/0 in the unused branch's gradient
    return torch.where(outside, x * (r / safe), x)


def project_l1_ball(x, radius=1.0):
    r"""Project onto the ball ``{z : ‖z‖₁ ≤ radius}`` along the last dim:
    ``x`` inside, else ``sign(x) ∘ Π_simplex(|x|, radius)`` (Duchi et al., 2008).

    Example:
        >>> import torch, implicitdiff as idf
        >>> idf.project_l1_ball(torch.tensor([0.8, -0.6, 0.1]))
        tensor([ 0.6000, -0.4000,  0.0000])
    """
    x = as_float_tensor("x", x)
    r = _radius(radius, x)
    inside = x.abs().sum(-1, keepdim=True) <= r
    xs = torch.where(inside, torch.zeros_like(x), x)  # the simplex branch sees no inside element
    z = torch.sign(xs) * _simplex(xs.abs(), r)
    return torch.where(inside, x, z)
