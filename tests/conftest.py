"""Shared fixtures and helpers: float64 central finite differences and well-posed random problems.

Helpers are plain functions exposed through session-scoped fixtures (``fd``, ``mk``) so
that hypothesis tests may use them too (hypothesis rejects function-scoped fixtures).  Random
data always comes from an explicit ``torch.Generator``, never from the global seed.
"""

from __future__ import annotations

import os
import types
import warnings

# Tests use tiny matrices on a shared 2-core machine: a multi-threaded, busy-waiting BLAS makes a 4×4
# QR ~1000× slower (20 ms instead of 7 µs).  One passive thread, set before torch starts its pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

F64 = torch.float64

# The first forward-mode AD call in a process (torch.autograd.forward_ad.make_dual, used by
# gradcheck(check_forward_ad=True)) imports torch's jvp decompositions, which call the deprecated
# torch.jit.script; under `filterwarnings = error` that one-off DeprecationWarning would fail
# whichever test happens to run first.  Import them once here, with that warning silenced.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from torch._decomp import decompositions_for_jvp  # noqa: F401


# --------------------------------------------------------------------------- finite differences
def fd_jacobian(f, inputs, *, eps: float = 1e-6, wrt=None):
    """Central finite-difference Jacobians of ``f(*inputs)`` (a tensor) in float64.

    Returns one Jacobian per differentiated input, shaped ``out.shape + input.shape``
    (the layout of ``torch.func.jacrev``).  ``wrt`` selects input positions (default: all
    floating tensors).  Truncation error is O(eps²), round-off O(ε_mach / eps).
    """
    inputs = [x.detach().clone().contiguous() if isinstance(x, torch.Tensor) else x for x in inputs]
    wrt = [i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor) and x.is_floating_point()] \
        if wrt is None else list(wrt)
    with torch.no_grad():
        out_shape = f(*inputs).shape
    jacs = []
    for i in wrt:
        x = inputs[i]
        flat = x.reshape(-1)
        cols = []
        for j in range(flat.numel()):
            orig = flat[j].item()
            with torch.no_grad():
                flat[j] = orig + eps
                hi = f(*inputs).clone()
                flat[j] = orig - eps
                lo = f(*inputs).clone()
                flat[j] = orig
            cols.append((hi - lo) / (2 * eps))
        jacs.append(torch.stack(cols, dim=-1).reshape(*out_shape, *x.shape))
    return jacs


def fd_directional(f, inputs, tangents, *, eps: float = 1e-6):
    """Central difference of ``f`` along ``tangents``: ``(f(x + eps t) − f(x − eps t)) / 2eps``."""
    with torch.no_grad():
        hi = f(*[x + eps * t if t is not None else x for x, t in zip(inputs, tangents)])
        lo = f(*[x - eps * t if t is not None else x for x, t in zip(inputs, tangents)])
    return (hi - lo) / (2 * eps)


# --------------------------------------------------------------------------- random problems
def randn(g, *shape, dtype=F64):
    return torch.randn(*shape, generator=g, dtype=F64).to(dtype)


def with_singular_values(g, m, n, s, *, batch=(), dtype=F64):
    """``U diag(s) Vᵀ`` with random orthonormal ``U`` (m × r), ``V`` (n × r), ``r = len(s)``."""
    s = torch.as_tensor(s, dtype=F64)
    r = s.numel()
    U, _ = torch.linalg.qr(randn(g, *batch, m, r))
    V, _ = torch.linalg.qr(randn(g, *batch, n, r))
    return (U * s) @ V.mT if r else torch.zeros(*batch, m, n, dtype=F64)


def well_conditioned(g, m, n, *, batch=(), dtype=F64, cond: float = 4.0):
    """A full-rank ``(*batch, m, n)`` matrix with singular values spread in ``[1, cond]``."""
    r = min(m, n)
    s = torch.linspace(cond, 1.0, r, dtype=F64) if r > 1 else torch.ones(1, dtype=F64)
    return with_singular_values(g, m, n, s, batch=batch).to(dtype)


def spd(g, n, *, batch=(), dtype=F64):
    """A symmetric positive definite ``M Mᵀ + I``."""
    M = randn(g, *batch, n, n)
    return (M @ M.mT + torch.eye(n, dtype=F64)).to(dtype)


def nearest_closed_form(A, b, y0, W):
    """The Nearest selection of a full-row-rank ``A``:  ``y0 + W⁻¹Aᵀ (A W⁻¹ Aᵀ)⁻¹ (b − A y0)``.

    (Lagrange conditions of ``min ½‖y − y0‖²_W  s.t.  A y = b``.)  ``W`` is ``None``, a vector
    (diagonal) or a matrix; vector ``b``/``y0`` only.
    """
    if W is None:
        Winv_At = A.mT
    elif W.dim() == 1:
        Winv_At = A.mT / W.unsqueeze(-1)
    else:
        Winv_At = torch.linalg.solve(W, A.mT)
    lam = torch.linalg.solve(A @ Winv_At, b - A @ y0)
    return y0 + Winv_At @ lam


def pinned_closed_form(A, b, index, values):
    """The Pinned selection: ``y[index] = values``, ``y[free] = A[:, free]⁻¹ (b − A[:, index] values)``."""
    n = A.shape[-1]
    index = list(index)
    free = [j for j in range(n) if j not in index]
    y = torch.zeros(n, dtype=A.dtype)
    y = y.index_put((torch.tensor(index, dtype=torch.long),), values) if index else y
    rhs = b - (A[:, index] @ values if index else 0.0)
    return y.index_put((torch.tensor(free, dtype=torch.long),), torch.linalg.solve(A[:, free], rhs))


@pytest.fixture(scope="session")
def fd():
    """Finite-difference helpers: ``fd.jacobian(f, inputs)``, ``fd.directional(f, inputs, tangents)``."""
    return types.SimpleNamespace(jacobian=fd_jacobian, directional=fd_directional)


@pytest.fixture(scope="session")
def mk():
    """Random well-posed problems and closed forms: ``mk.randn``, ``mk.sv`` (given singular values),
    ``mk.well_conditioned``, ``mk.spd``, ``mk.nearest`` and ``mk.pinned`` (closed-form selections)."""
    return types.SimpleNamespace(randn=randn, sv=with_singular_values, well_conditioned=well_conditioned,
                                 spd=spd, nearest=nearest_closed_form, pinned=pinned_closed_form)


@pytest.fixture
def g():
    """A seeded CPU generator (a fresh one per test, so tests do not depend on their order)."""
    return torch.Generator().manual_seed(1234)
