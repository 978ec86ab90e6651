"""Problems shared by the solver tests: the ``tanh`` fixed point and its SciPy reference."""

import numpy as np
import scipy.optimize
import torch

F64 = torch.float64


def tanh_map(y, W, x):
    """``tanh(W y + x) − y`` for ``y`` ``(*batch, n)``, ``W`` ``(*batch, n, n)``."""
    return torch.tanh((W @ y.unsqueeze(-1)).squeeze(-1) + x) - y


def tanh_problem(g, batch, n, dtype, norm):
    """A contraction ``W`` of spectral norm ``norm`` and an input ``x``, drawn in float64 from ``g``."""
    W = torch.randn(*batch, n, n, generator=g, dtype=F64)
    W = norm * W / torch.linalg.matrix_norm(W, 2).unsqueeze(-1).unsqueeze(-1)
    x = torch.randn(*batch, n, generator=g, dtype=F64)
    return W.to(dtype), x.to(dtype)


def scipy_root(W, x):
    """Independent reference: MINPACK's hybrid method per element, float64."""
    W, x = W.double().numpy(), x.double().numpy()
    fun = lambda y: np.tanh(W @ y + x) - y  # noqa: E731
    sol = scipy.optimize.root(fun, np.zeros_like(x), tol=1e-13)
    assert np.abs(fun(sol.x)).max() < 1e-13
    return torch.from_numpy(sol.x)
