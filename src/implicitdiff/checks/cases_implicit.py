"""Self-check cases of the implicit layers: ``root``, ``fixed_point``, ``argmin``, ``custom_root``.

Each case has a closed form or the unrolled solver as its reference; the
forward tolerance is tight (1e-12 in float64) so the finite differences of the
solution map are accurate.
"""

from __future__ import annotations

import torch

from ..implicit.adjoint import Implicit, Unroll
from ..layers.argmin import argmin
from ..layers.custom_root import custom_root
from ..layers.fixed_point import fixed_point
from ..layers.root import root
from .selfcheck import register_case


def _rtol(dtype):
    return 1e-13 if dtype == torch.float64 else 1e-6


@register_case("root/cube_root", layer="root")
def _cube_root(device, dtype):
    theta = torch.tensor([8.0, 27.0, 2.0], device=device, dtype=dtype)

    def fn(theta):
        return root(lambda y, t: y ** 3 - t, torch.ones_like(theta), theta, batch_dims=1, rtol=_rtol(theta.dtype))

    return fn, (theta,), (lambda theta: theta ** (1.0 / 3.0))


@register_case("root/tanh_equilibrium_vs_unroll", layer="root")
def _tanh(device, dtype):
    W = 0.3 * torch.randn(4, 4, dtype=torch.float64).to(device=device, dtype=dtype)
    x = torch.randn(4, dtype=torch.float64).to(device=device, dtype=dtype)
    F = lambda y, W, x: y - torch.tanh(y @ W.mT + x)  # noqa: E731

    def fn(W, x):
        return root(F, torch.zeros_like(x), W, x, rtol=_rtol(x.dtype))

    def unrolled(W, x):
        return root(F, torch.zeros_like(x), W, x, rtol=_rtol(x.dtype), adjoint=Unroll())

    return fn, (W, x), unrolled


@register_case("fixed_point/linear_gmres_adjoint", layer="fixed_point")
def _linear_fixed_point(device, dtype):
    A = torch.randn(4, 4, dtype=torch.float64)
    A = (0.5 * A / torch.linalg.matrix_norm(A, 2)).to(device=device, dtype=dtype)
    b = torch.randn(4, dtype=torch.float64).to(device=device, dtype=dtype)

    def fn(A, b):
        return fixed_point(lambda z, A, b: z @ A.mT + b, torch.zeros_like(b), A, b, rtol=_rtol(b.dtype),
                           adjoint=Implicit(solver="gmres", rtol=_rtol(b.dtype)))

    eye = torch.eye(4, device=device, dtype=dtype)
    return fn, (A, b), (lambda A, b: torch.linalg.solve(eye - A, b))


@register_case("argmin/ridge", layer="argmin")
def _ridge(device, dtype):
    X = torch.randn(12, 3, dtype=torch.float64).to(device=device, dtype=dtype)
    t = torch.randn(12, dtype=torch.float64).to(device=device, dtype=dtype)
    lam = torch.tensor(0.8, device=device, dtype=dtype)

    def fn(lam):
        f = lambda w, lam: 0.5 * ((X.to(lam.dtype) @ w - t.to(lam.dtype)) ** 2).sum() + 0.5 * lam * (w ** 2).sum()  # noqa
        return argmin(f, torch.zeros(3, device=lam.device, dtype=lam.dtype), lam, rtol=_rtol(lam.dtype))

    def closed(lam):
        Xl, tl = X.to(lam.dtype), t.to(lam.dtype)
        return torch.linalg.solve(Xl.T @ Xl + lam * torch.eye(3, device=lam.device, dtype=lam.dtype), Xl.T @ tl)

    return fn, (lam,), closed


@register_case("custom_root/babylonian_sqrt", layer="custom_root")
def _custom(device, dtype):
    @custom_root(lambda y, a: y ** 2 - a)
    def sqrt(y0, a):
        y = y0.clone()
        for _ in range(60):
            y = 0.5 * (y + a / y)
        return y

    a = torch.tensor([4.0, 2.0, 9.0], device=device, dtype=dtype)
    return (lambda a: sqrt(torch.ones_like(a), a)), (a,), torch.sqrt
