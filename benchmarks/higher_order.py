"""Higher-order derivatives through ``fixed_point`` at width 4000: cost relative to one first-order pass.

    python benchmarks/higher_order.py [--n 4000] [--repeats 3] [--threads 1]

A contraction ``T(z) = tanh(W z + b)`` (``‖W‖₂ ≈ 0.5``), default solver and adjoint.  Times, in
one process, interleaved, min of repeats: one first-order forward+backward (``∂L/∂W`` of
``L = ‖z*‖²``), a Hessian-vector product (double backward of ``⟨∇_W L, V⟩``) and a
``torch.func.jvp`` of ``z*`` along ``V``; prints each as a multiple of the first-order pass
(target ≤ 10×) and its error against an independent reference (autograd through unrolled
Picard iterations to convergence).
"""

import argparse
import os
import sys
import time


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, str(args.threads))
    import torch
    import implicitdiff as idf

    torch.set_num_threads(args.threads)
    D, n = torch.float64, args.n
    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(n, n, generator=g, dtype=D) * (0.25 / n ** 0.5)   # ‖W‖₂ ≈ 0.5
    b = torch.randn(n, generator=g, dtype=D)
    V = torch.randn(n, n, generator=g, dtype=D) / n ** 0.5

    def T(z, W, b):
        return torch.tanh(W @ z + b)

    def ours(W):
        return idf.fixed_point(T, torch.zeros(n, dtype=D), W, b, rtol=1e-12)

    def unrolled(W, steps=70):                                         # 0.5^70 ≈ 1e-21
        z = torch.zeros(n, dtype=D)
        for _ in range(steps):
            z = T(z, W, b)
        return z

    def first_order(f):
        W = W0.clone().requires_grad_()
        return torch.autograd.grad(f(W).pow(2).sum(), W)[0]

    def hvp(f):
        W = W0.clone().requires_grad_()
        (gW,) = torch.autograd.grad(f(W).pow(2).sum(), W, create_graph=True)
        return torch.autograd.grad((gW * V).sum(), W)[0]

    def jvp(f):
        return torch.func.jvp(f, (W0,), (V,))[1]

    tasks = {"first-order fwd+bwd": first_order, "Hessian-vector product": hvp, "torch.func.jvp": jvp}
    best = {k: float("inf") for k in tasks}
    out = {}
    for _ in range(args.repeats):
        for k, fn in tasks.items():
            t = time.perf_counter()
            out[k] = fn(ours)
            best[k] = min(best[k], time.perf_counter() - t)
    ref = {k: fn(unrolled) for k, fn in tasks.items()}
    base = best["first-order fwd+bwd"]
    print(f"fixed point width {n}, float64, {args.threads} thread(s), min of {args.repeats} interleaved repeats, "
          f"torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}")
    print(f"{'task':24s} {'s':>8s} {'× first order':>14s} {'rel err vs unrolled':>20s}")
    ok = True
    for k in tasks:
        err = float((out[k] - ref[k]).norm() / ref[k].norm())
        ratio = best[k] / base
        ok &= ratio <= 10 and err < 1e-6
        print(f"{k:24s} {best[k]:8.3f} {ratio:14.2f} {err:20.1e}")
    print("target (each ≤ 10× first order, values equal to the reference):", "met" if ok else "NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
