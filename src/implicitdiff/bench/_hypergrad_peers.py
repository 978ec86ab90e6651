"""The peer adapters of :mod:`implicitdiff.bench.hypergrad`: TorchOpt, JAXopt, Optimistix.

Each factory maps a :class:`~implicitdiff.bench.hypergrad.Problem` and the absolute inner
tolerance ``tol_abs`` to ``{method name: (call, saved_kb)}``: ``call()`` returns the
hypergradient ``(n,)`` (a float64 torch tensor) and the inner iterations, ``saved_kb()`` the
kilobytes autograd keeps for the backward (``None`` where not measurable: JAX).  The peer
library is imported inside the factory, never at module import, so importing the benchmark
imports no peer; a factory raises (``ImportError``, or the peer's own error for an
incompatible version) when the peer is unusable, and the benchmark records that as a note.

Example:
    >>> from implicitdiff.bench._hypergrad_peers import _PEER_FACTORIES
    >>> sorted(_PEER_FACTORIES)
    ['jaxopt', 'optimistix', 'torchopt']
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import warnings

import torch

from ..solvers.lbfgs import lbfgs
from ._hypergrad_problem import ADJ_RTOL, D, MAX_ITER, TOL, _XLA_ONE_THREAD, Problem, _hypergrad, _saved_kb



# ----------------------------------------------------------------------------- peers
# Each factory returns {method name: (call, saved_kb)} for a problem: ``call()`` gives (hypergradient,
# inner iterations), ``saved_kb()`` the memory kept for the backward (None where not measurable: JAX).
# The library is imported here (never at module import); a factory raises if it is unusable.

@contextlib.contextmanager
def _quiet():
    """Peers' own deprecation notices (TorchOpt's functorch.vjp, JAXopt's maintenance notice) are not ours."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def _torchopt(p: Problem, tol_abs: float) -> dict:
    with _quiet():
        import torchopt
    last = {}

    @torchopt.diff.implicit.custom_root(torch.func.grad(p.inner), argnums=1,
                                        solve=torchopt.linear_solve.solve_cg(rtol=ADJ_RTOL, atol=0.0,
                                                                             maxiter=MAX_ITER))
    def solver(w0, theta, X, t):
        res = lbfgs(p.inner, w0, (theta, X, t), rtol=TOL, max_iter=MAX_ITER)
        last["iters"] = int(res.info.iterations)
        return res.y

    def solve(p_, theta):
        return solver(torch.zeros(p.n, dtype=D, device=p.X.device), theta, p.X, p.t), last.get("iters")

    def call():
        with _quiet():
            return _hypergrad(solve, p)

    return {"torchopt": (call, lambda: _saved_kb_quiet(solve, p))}


def _saved_kb_quiet(solve, p):
    with _quiet():
        return _saved_kb(solve, p)


def _jax():
    if "jax" not in sys.modules:
        os.environ.setdefault("XLA_FLAGS", _XLA_ONE_THREAD)
    with _quiet():
        import jax
    jax.config.update("jax_enable_x64", True)
    return jax


def _jax_fns(p: Problem):
    import jax.numpy as jnp
    import numpy as np

    m = p.X.shape[0]
    arrays = tuple(jnp.asarray(a.cpu().numpy()) for a in (p.theta, p.X, p.t, p.Xv, p.tv))
    if p.kind == "ridge":
        def inner(w, theta, X, t):
            return 0.5 * jnp.sum((X @ w - t) ** 2) / m + 0.5 * jnp.sum(jnp.exp(theta) * w * w)

        def outer(w, Xv, tv):
            return jnp.mean((Xv @ w - tv) ** 2)
    else:
        def bce(z, t):
            return jnp.mean(jnp.logaddexp(0.0, z) - t * z)

        def inner(w, theta, X, t):
            return bce(X @ w, t) + 0.5 * jnp.sum(jnp.exp(theta) * w * w)

        def outer(w, Xv, tv):
            return bce(Xv @ w, tv)

    def wrap(hyper):
        def call():
            g, iters = hyper(*arrays)
            return torch.from_numpy(np.array(g)), int(iters)
        return call

    return jnp, inner, outer, wrap


def _jaxopt(p: Problem, tol_abs: float) -> dict:
    jax = _jax()
    with _quiet():
        import jaxopt
    jnp, inner, outer, wrap = _jax_fns(p)
    lb = jaxopt.LBFGS(fun=inner, tol=tol_abs, maxiter=MAX_ITER, history_size=10, implicit_diff=False)

    @jaxopt.implicit_diff.custom_root(jax.grad(inner), has_aux=True,
                                      solve=functools.partial(jaxopt.linear_solve.solve_cg, tol=ADJ_RTOL,
                                                              maxiter=MAX_ITER))
    def solve(w0, theta, X, t):
        params, state = lb.run(w0, theta, X, t)
        return params, state.iter_num

    def loss(theta, X, t, Xv, tv):
        w, iters = solve(jnp.zeros(p.n), theta, X, t)
        return outer(w, Xv, tv), iters

    return {"jaxopt": (wrap(jax.jit(jax.grad(loss, has_aux=True))), None)}


def _optimistix(p: Problem, tol_abs: float) -> dict:
    jax = _jax()
    with _quiet():
        import lineax as lx
        import optimistix as optx
    jnp, inner, outer, wrap = _jax_fns(p)
    tags = frozenset({lx.symmetric_tag, lx.positive_semidefinite_tag})
    out = {}
    for name, adjoint in (("optimistix cg", optx.ImplicitAdjoint(linear_solver=lx.CG(rtol=ADJ_RTOL, atol=0.0,
                                                                                       max_steps=MAX_ITER))),
                          ("optimistix auto", optx.ImplicitAdjoint())):
        def loss(theta, X, t, Xv, tv, adjoint=adjoint):
            sol = optx.minimise(lambda w, a: inner(w, *a), optx.LBFGS(rtol=TOL, atol=TOL), jnp.zeros(p.n),
                                (theta, X, t), max_steps=MAX_ITER, adjoint=adjoint, tags=tags)
            return outer(sol.value, Xv, tv), sol.stats["num_steps"]

        out[name] = (wrap(jax.jit(jax.grad(loss, has_aux=True))), None)
    return out


_PEER_FACTORIES = {"torchopt": _torchopt, "jaxopt": _jaxopt, "optimistix": _optimistix}
