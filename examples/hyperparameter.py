"""Hyperparameter tuning by hypergradient descent with ``implicitdiff.argmin``.

Each feature j gets its own regularization strength ``λⱼ = exp(θⱼ)``.  The inner problem fits
the weights, the outer problem tunes ``θ`` on a validation set::

    w*(θ) = argmin_w  f(w, θ) = loss(X w, t) + ½ Σⱼ exp(θⱼ) wⱼ²          (inner, training set)
    min_θ  L(θ) = loss(X_val w*(θ), t_val)                               (outer, validation set)

``dL/dθ`` — the hypergradient — comes from the implicit function theorem on ``∇_w f(w*, θ) = 0``:
one linear solve with the Hessian, whatever the number of iterations of the inner fit, and no
graph through them.  Two problems, each with a few informative features among many noisy ones,
so that a good per-feature ``λ`` matters:

1. ridge regression (squared loss): the hypergradient is checked once against the closed form
   ``w* = (XᵀX/m + diag λ)⁻¹ Xᵀt/m`` differentiated by autograd;
2. logistic regression (binary cross-entropy).

Run:  python examples/hyperparameter.py      (a few seconds on one CPU thread)
"""

import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # before torch loads its BLAS: one quiet thread
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as tnf  # noqa: E402

import implicitdiff as idf  # noqa: E402

torch.set_num_threads(1)
D = torch.float64


def make_data(kind, m, n, informative, seed):
    """Train / validation / test splits where only ``informative`` of ``n`` features matter."""
    g = torch.Generator().manual_seed(seed)
    w_true = torch.zeros(n, dtype=D)
    w_true[:informative] = 2 * torch.randn(informative, generator=g, dtype=D)
    splits = []
    for rows in (m, m, 4 * m):  # train, validation, test
        X = torch.randn(rows, n, generator=g, dtype=D)
        z = X @ w_true
        if kind == "ridge":
            t = z + torch.randn(rows, generator=g, dtype=D)
        else:
            t = (torch.rand(rows, generator=g, dtype=D) < torch.sigmoid(z)).to(D)
        splits.append((X, t))
    return splits


def data_loss(kind, z, t):
    return 0.5 * ((z - t) ** 2).mean() if kind == "ridge" else tnf.binary_cross_entropy_with_logits(z, t)


def inner(kind):
    def f(w, theta, X, t):
        # w: (n,), theta: (n,) log-λ; a scalar objective. Differentiable tensors are arguments, not closures.
        return data_loss(kind, X @ w, t) + 0.5 * (theta.exp() * w * w).sum()
    return f


def tune(kind, *, m=200, n=60, informative=6, steps=60, lr=0.3, seed=0):
    (X, t), (Xv, tv), (Xt, tt) = make_data(kind, m, n, informative, seed)
    f = inner(kind)
    theta = torch.zeros(n, dtype=D, requires_grad=True)     # λ = 1 for every feature to start
    opt = torch.optim.Adam([theta], lr=lr)
    w = torch.zeros(n, dtype=D)                             # warm start: the previous fit (gets no gradient)
    print(f"\n{kind} regression: {m} samples, {n} features ({informative} informative); Adam on per-feature log-λ")
    print(f"{'step':>4}  {'val loss':>9}  {'test loss':>9}  {'Newton it':>9}  {'mean λ (informative)':>21}  "
          f"{'mean λ (noise)':>14}")
    t0 = time.perf_counter()
    for step in range(steps + 1):
        # Newton suits a few dozen unknowns: one step solves the ridge problem exactly, and the backward reuses
        # its Hessian factorization.  (For thousands of unknowns keep the default L-BFGS, with
        # adjoint=idf.Implicit(solver="cg").)  Warm start from the previous fit; the stopping rule is
        # ‖∇f(w)‖ ≤ atol + rtol ‖∇f(w0)‖, and with a warm start ‖∇f(w0)‖ is already small, so a
        # relative tolerance would tighten at every step: use an absolute one.
        w, info = idf.argmin(f, w.detach(), theta, X, t, solver="newton", rtol=0.0, atol=1e-10, return_info=True)
        val = data_loss(kind, Xv @ w, tv)
        if step % 5 == 0 or step == steps:
            with torch.no_grad():
                test = data_loss(kind, Xt @ w, tt)
                lam = theta.exp()
            print(f"{step:>4}  {val.item():>9.4f}  {float(test):>9.4f}  {int(info.iterations):>9}  "
                  f"{float(lam[:informative].mean()):>21.3g}  {float(lam[informative:].mean()):>14.3g}")
        if step == steps:
            break
        opt.zero_grad()
        val.backward()                                      # hypergradient dL/dθ into theta.grad
        opt.step()
    print(f"{steps} hypergradient steps in {time.perf_counter() - t0:.1f} s")
    return (X, t, Xv, tv), f, theta.detach()


def check_ridge_against_closed_form(data, f, theta):
    """The hypergradient at the tuned ``θ`` by two configurations of ``argmin`` and by the closed form."""
    X, t, Xv, tv = data
    m, n = X.shape
    th = theta.clone().requires_grad_(True)
    w_closed = torch.linalg.solve(X.T @ X / m + torch.diag(th.exp()), X.T @ t / m)
    (g_closed,) = torch.autograd.grad(data_loss("ridge", Xv @ w_closed, tv), th)
    configs = {"Newton, Implicit() reusing its factorization": dict(solver="newton"),
               # the tuned λ spread over four decades: the Hessian is ill-conditioned and L-BFGS needs many steps
               "L-BFGS, Implicit(solver='cg')": dict(max_iter=5000, adjoint=idf.Implicit(solver="cg"))}
    for name, kw in configs.items():
        w, info = idf.argmin(f, torch.zeros(n, dtype=D), th, X, t, return_info=True, **kw)
        (g,) = torch.autograd.grad(data_loss("ridge", Xv @ w, tv), th)
        err = ((g - g_closed).abs().max() / g_closed.abs().max()).item()
        print(f"ridge hypergradient, {name} ({int(info.iterations)} it) vs the closed form: relative error {err:.1e}")
        assert err < 1e-7, err


if __name__ == "__main__":
    data, f, theta = tune("ridge")
    check_ridge_against_closed_form(data, f, theta)
    tune("logistic", lr=0.2)
