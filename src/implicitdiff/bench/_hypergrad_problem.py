"""The hypergradient benchmark's problems and measurement helpers, shared by the benchmark and its peers.

A :class:`Problem` is an inner regularized regression (ridge or logistic) with a
validation loss; :func:`_hypergrad` differentiates the validation loss through a
given inner solve and :func:`_saved_kb` counts what autograd keeps for the backward.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as tnf

from ..checks.memory import graph_saved_bytes as _graph_saved_bytes

TOL = 1e-10          # inner: ‖∇f(w)‖ ≤ TOL ‖∇f(0)‖ (peers get the absolute value)
ADJ_RTOL = 1e-10     # adjoint Krylov solves: ‖r‖ ≤ ADJ_RTOL ‖b‖
MAX_ITER = 1000
D = torch.float64
_XLA_ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


class Problem(NamedTuple):
    label: str
    kind: str                  # "ridge" | "logistic"
    X: torch.Tensor            # (m, n) training features
    t: torch.Tensor            # (m,) targets (logistic: labels in {0, 1})
    Xv: torch.Tensor           # (mv, n) validation
    tv: torch.Tensor
    theta: torch.Tensor        # (n,) per-feature log-λ

    @property
    def n(self) -> int:
        return self.X.shape[-1]

    def inner(self, w, theta, X, t):
        return _INNER[self.kind](w, theta, X, t)

    def outer(self, w):
        return _OUTER[self.kind](w, self.Xv, self.tv)


def _ridge_inner(w, theta, X, t):
    r = X @ w - t
    return 0.5 * (r * r).sum() / X.shape[-2] + 0.5 * (theta.exp() * w * w).sum()


def _logistic_inner(w, theta, X, t):
    return tnf.binary_cross_entropy_with_logits(X @ w, t) + 0.5 * (theta.exp() * w * w).sum()


_INNER = {"ridge": _ridge_inner, "logistic": _logistic_inner}
_OUTER = {"ridge": lambda w, Xv, tv: ((Xv @ w - tv) ** 2).mean(),
          "logistic": lambda w, Xv, tv: tnf.binary_cross_entropy_with_logits(Xv @ w, tv)}


def _problem(kind: str, m: int, n: int, seed: int, device="cpu") -> Problem:
    g = torch.Generator().manual_seed(seed)
    mv = max(m // 5, 10)
    X, Xv = torch.randn(m, n, generator=g, dtype=D), torch.randn(mv, n, generator=g, dtype=D)
    w_true = torch.randn(n, generator=g, dtype=D) / math.sqrt(n)
    if kind == "ridge":
        t = X @ w_true + 0.5 * torch.randn(m, generator=g, dtype=D)
        tv = Xv @ w_true + 0.5 * torch.randn(mv, generator=g, dtype=D)
    else:
        t = (torch.rand(m, generator=g, dtype=D) < torch.sigmoid(2 * X @ w_true)).to(D)
        tv = (torch.rand(mv, generator=g, dtype=D) < torch.sigmoid(2 * Xv @ w_true)).to(D)
    theta = math.log(0.1) + 0.5 * torch.randn(n, generator=g, dtype=D)
    return Problem(f"{kind} {m}x{n}", kind, *(a.to(device) for a in (X, t, Xv, tv, theta)))

def _hypergrad(solve: Callable, p: Problem):
    theta = p.theta.detach().clone().requires_grad_(True)
    w, iters = solve(p, theta)
    (g,) = torch.autograd.grad(p.outer(w), theta)
    return g, iters


def _saved_kb(solve: Callable, p: Problem) -> float:
    theta = p.theta.detach().clone().requires_grad_(True)
    loss = p.outer(solve(p, theta)[0])
    return _graph_saved_bytes(loss, exclude=(theta, p.X, p.t, p.Xv, p.tv)) / 1024
