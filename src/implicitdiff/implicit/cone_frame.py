r"""The eigen-frame of ``DΠ_{K*}(v)``: ``DΠ = U diag(λ) Uᵀ`` with ``U`` block-diagonal and orthogonal.

``DΠ_{K*}`` at a cone program's solution (:mod:`.cone_projection`) is symmetric, block-diagonal
(one block per cone) and ``0 ≼ DΠ ≼ I``.  In the coordinates of its eigenvectors it is the
diagonal ``λ ∈ [0, 1]ᵐ``, and the derivative system of :mod:`.cone_system` becomes the one of a
linear program (one scalar per row).  Each cone has its eigenvectors in closed form or from a
small eigen-decomposition, so going to the frame costs ``O(m·r)`` (zero, nonnegative, second-order
cones), ``O(k³·r)`` per ``k × k`` PSD block or ``3 × 3`` per exponential cone, for ``r`` vectors:

- zero cone: ``U = I``, ``λ = 1``; nonnegative: ``U = I``, ``λᵢ = 1[vᵢ > 0]``;
- second-order, ``v = (t, x)`` with ``‖x‖ > |t|``: ``e₁ = (1, x̂)/√2`` (``λ = 1``),
  ``e₀ = (1, −x̂)/√2`` (``λ = 0``) and ``(0, w)`` for ``w ⟂ x̂`` (``λ = (1 + t/‖x‖)/2``), the
  ``w`` the columns ``2…`` of the Householder reflection that maps the first unit vector to
  ``±x̂``; inside ``K*`` all ``λ = 1``, in the polar all ``λ = 0`` (any orthonormal basis);
- PSD, ``V = smat(v) = Q diag(μ) Qᵀ``: the eigenvectors of ``DΠ`` in svec coordinates are
  ``svec(sym(qᵢqⱼᵀ))`` (normalized) with ``λ = Γᵢⱼ`` of :mod:`.cone_projection`, so the frame
  coordinates of ``a`` are ``svec(Qᵀ smat(a) Q)``;
- exponential: the ``3 × 3`` symmetric blocks, by ``eigh`` (eigenvalues within a few eps of 0 set to 0).

Forward only (no gradient flows through the frame: the differentiable path of the derivative
uses :func:`~.cone_projection.dual_projection_jacobian`).

Speed: the frame is applied to ``A`` itself (``(B, m, n)``), so every pass over it counts.  Groups of
consecutive rows are read as views and written as slices of one output (:func:`_group_rows`,
:func:`_map`), and the second-order blocks of a group are computed with one product and one fused
update written straight into that output (:func:`_soc_to`; functional under ``vmap``).  The PSD blocks'
``Qᵀ · Q`` on ``A``'s rows is applied column by column, and once for the batch's columns where ``A`` is
shared (:func:`~implicitdiff.linalg.congruence.congruence_columns`).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from .._core.validate import is_vmapped
from ..linalg.cone_spec import ConeSpec, smat, svec_indices
from ..linalg.congruence import congruence_columns
from .cone_projection import _exp, psd_gamma

__all__ = ["Frame", "dual_projection_frame", "to_frame", "from_frame"]


class Frame(NamedTuple):
    """``DΠ_{K*} = U diag(lam) Uᵀ``: ``lam (B, m)`` and, per group of same-size blocks of
    ``spec.groups()``, what defines ``U`` on it (``None`` where ``U = I``)."""

    spec: ConeSpec
    lam: torch.Tensor
    parts: tuple  # ((kind, k, idx, data), ...)


def _soc_frame(v):
    """``(λ (*, k), (x̂, h))`` of second-order blocks ``v (*, k)``, ``k ≥ 2``; ``h`` the Householder
    vector (``‖h‖² ≥ 2``) with ``(I − 2hhᵀ/‖h‖²) f₀ = ∓x̂``."""
    t, x = v[..., 0], v[..., 1:]
    nx = x.norm(dim=-1)
    tiny = torch.finfo(v.dtype).tiny
    f0 = torch.zeros_like(x)
    f0[..., 0] = 1.0
    xh = torch.where((nx > 0)[..., None], x / nx.clamp(min=tiny)[..., None], f0)
    sgn = torch.where(xh[..., :1] >= 0, 1.0, -1.0).to(v.dtype)
    h = f0 + sgn * xh
    inside = nx <= t
    polar = (nx <= -t) & ~inside
    mu = 0.5 * (1 + t / nx.clamp(min=tiny))
    k = v.shape[-1]
    lam = torch.cat([torch.ones_like(t)[..., None], torch.zeros_like(t)[..., None],
                     mu[..., None].expand(mu.shape + (k - 2,))], -1)
    lam = torch.where(inside[..., None], torch.ones_like(lam), torch.where(polar[..., None], torch.zeros_like(lam), lam))
    return lam, (xh, h)


def _soc_to(data, a, out=None):
    """Frame coordinates of second-order blocks ``a (*, k, r)`` (into ``out`` if given): one product
    with ``(x̂, 2h/‖h‖²)`` and one fused update of the rows ``2…``."""
    xh, h = data
    at, ax = a[..., 0, :], a[..., 1:, :]
    hn = h * (2 / (h * h).sum(-1, keepdim=True))
    ph = torch.stack([xh, hn], -2) @ ax                                # (*, 2, r): x̂ᵀa_x, (2h/‖h‖²)ᵀa_x
    p = ph[..., 0, :]
    r2 = math.sqrt(0.5)
    top = torch.stack([(at + p) * r2, (at - p) * r2], -2)
    # rows 1… of (I − 2hhᵀ/‖h‖²) a_x
    if out is None:  # functional (also under vmap, where out= has no batching rule)
        return torch.cat([top, torch.addcmul(ax[..., 1:, :], h[..., 1:, None], ph[..., 1:, :], value=-1)], -2)
    out[..., :2, :] = top
    torch.addcmul(ax[..., 1:, :], h[..., 1:, None], ph[..., 1:, :], value=-1, out=out[..., 2:, :])
    return out


def _soc_from(data, c):
    """Inverse of :func:`_soc_to`."""
    xh, h = data
    r2 = math.sqrt(0.5)
    c1, c0 = c[..., 0, :], c[..., 1, :]
    perp = c[..., 2:, :]
    hn = h * (2 / (h * h).sum(-1, keepdim=True))
    hp = -h[..., :, None] * (hn[..., None, 1:] @ perp)                 # (I − 2hhᵀ/‖h‖²)(0, perp)
    hp[..., 1:, :] += perp
    ax = xh[..., :, None] * ((c1 - c0) * r2)[..., None, :] + hp
    return torch.cat([((c1 + c0) * r2)[..., None, :], ax], -2)


def _psd_conj(Q, a, k, transpose):
    """``svec(Qᵀ smat(a) Q)`` (or ``svec(Q smat(a) Qᵀ)``) for ``a (B, nb, d, r)`` (a stride-0 batch: rows of a
    shared ``A``), ``Q (B, nb, k, k)``: column by column where there are many (module docstring)."""
    return congruence_columns(Q if transpose else Q.mT, a, k)


def dual_projection_frame(spec: ConeSpec, y: torch.Tensor, s: torch.Tensor) -> Frame:
    """The eigen-frame of ``DΠ_{K*}(y − s)`` (``y, s (B, m)``), the same matrix as
    :func:`~.cone_projection.dual_projection_jacobian` (with its conventions at kinks)."""
    v = y - s
    lam = torch.ones_like(v)  # zero cone: K* = ℝ
    parts = []
    for kind, k, idx in spec.groups(y.device):
        data = None
        if kind == "l":
            lam[:, idx] = (v[:, idx] > 0).to(v.dtype)
        elif kind == "q" and k == 1:  # t ≥ 0: a nonnegative row
            lam[:, idx] = (v[:, idx] >= 0).to(v.dtype)
        elif kind == "q":
            lam[:, idx], data = _soc_frame(v[:, idx])
        elif kind == "s":
            mu, Q = torch.linalg.eigh(smat(v[:, idx], k))
            r, c, _ = svec_indices(k, v.device)
            lam[:, idx] = psd_gamma(mu)[..., r, c]
            data = Q
        else:
            D = _exp(s[:, idx], y[:, idx])
            ev, Q = torch.linalg.eigh(0.5 * (D + D.mT))
            # eigenvalues within eigh's rounding (a few eps, ‖D‖ ≤ 1) of 0 are 0: the normal direction
            lam[:, idx] = torch.where(ev <= 4 * torch.finfo(ev.dtype).eps, torch.zeros_like(ev), ev.clamp(max=1.0))
            data = Q
        parts.append((kind, k, idx, data))
    return Frame(spec, lam, tuple(parts))


@functools.lru_cache(maxsize=64)
def _group_rows(spec: ConeSpec) -> tuple:
    """Per group of ``spec.groups()``: the ``slice`` of its rows when they are consecutive (a single
    block, consecutive blocks of one size, the nonnegative and exponential rows), else ``None``."""
    out = []
    for _, _, idx in spec.groups():
        first, last = int(idx.reshape(-1)[0]), int(idx.reshape(-1)[-1])
        out.append(slice(first, last + 1) if last - first + 1 == idx.numel() else None)
    return tuple(out)


def _map(frame: Frame, V: torch.Tensor, inverse: bool) -> torch.Tensor:
    """``U V`` or ``Uᵀ V``, group by group into one output (consecutive rows as views and slices:
    on a ``(B, m, n)`` matrix every pass over it counts)."""
    vec = V.dim() == 2
    if vec:
        V = V[..., None]
    out = torch.empty_like(V)
    vmapped = is_vmapped(V)
    z = frame.spec.z
    out[:, :z] = V[:, :z]
    for (kind, k, idx, data), rows in zip(frame.parts, _group_rows(frame.spec)):
        blk = V[:, idx] if rows is None else V[:, rows].view(V.shape[:1] + idx.shape + V.shape[2:])
        if data is None:
            res = blk
        elif kind == "q" and not inverse and rows is not None and not vmapped:  # written in place
            _soc_to(data, blk, out[:, rows].view(blk.shape))
            continue
        elif kind == "q":
            res = _soc_from(data, blk) if inverse else _soc_to(data, blk)
        elif kind == "s":
            res = _psd_conj(data, blk, k, transpose=inverse)
        else:
            res = (data @ blk) if inverse else (data.mT @ blk)
        if rows is None:
            out[:, idx] = res
        else:
            out[:, rows] = res.reshape(out[:, rows].shape)
    return out[..., 0] if vec else out


def to_frame(frame: Frame, V: torch.Tensor) -> torch.Tensor:
    """``Uᵀ V`` for ``V (B, m)`` or ``(B, m, r)``."""
    return _map(frame, V, inverse=False)


def from_frame(frame: Frame, V: torch.Tensor) -> torch.Tensor:
    """``U V`` for ``V (B, m)`` or ``(B, m, r)``."""
    return _map(frame, V, inverse=True)
