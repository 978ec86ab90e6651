"""Krylov solves, forward and forward + backward, against scipy.sparse.linalg (see benchmarks/README.md).

    implicitdiff bench krylov [--quick] [--out FILE]
    python benchmarks/krylov.py [--grids 100,316] [--rtol 1e-8] [--repeats 3] [--out FILE] [--threads N] [--quick]

About 3–4 minutes on 2 shared cores with the default grids (n = 10⁴, 10⁵); ``--grids 100,316,1000`` adds
n = 10⁶ (tens of minutes).

Problems (float64): the 2-D Poisson matrix (5-point Laplacian, Dirichlet) on an N × N grid as a
CSR matrix, n = N² unknowns, and the same operator matrix-free with a coefficient field κ on the
grid edges (``A(κ) = Dᵀ diag(κ) D``, gradients wrt κ).  Rows, per problem and solver:

* fwd: ours ``cg``/``minres`` vs SciPy's at the same ``rtol`` (``‖b − Ax‖ ≤ rtol ‖b‖``). SciPy's MINRES
  stops on ``‖r‖/(‖A‖‖x‖)``: its ``rtol`` is tightened (÷10 steps, calibrated once, untimed) until its
  true residual meets ours; the column "rtol sp" says which it got.
* fwd+bwd: ``iterative_solve`` + ``backward`` (one adjoint solve, gradients wrt b and the matrix
  values / κ) vs SciPy: forward solve + adjoint solve + the same gradient assembled in NumPy — what a
  hand-written implicit gradient costs with SciPy.
* graph MB: bytes autograd keeps for the backward, inputs excluded — implicit (x and the operator:
  for CSR the matrix built from the values, for the stencil nothing but x) vs unrolled autograd
  through the same iterations of the same solver (wrt b for CSR, wrt b and κ matrix-free), counted
  exactly with ``saved_tensors_hooks`` while discarding the tensors, so the unrolled graph need not
  fit in memory.
* grad diff: max relative difference between our b̄ and SciPy's adjoint solution.

Writes ``bench-krylov.json``; prints the table with ratios ours / SciPy (lower is better).
"""

import argparse
import os
import time
import weakref


def _setup(threads):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, str(threads))


def _imports():
    global np, sp, spl, torch, F, LinearOperator, iterative_solve, cg, minres, harness, csr_of, quiet_sparse, \
        csr_from_values
    import numpy as np
    import scipy.sparse as sp
    import scipy.sparse.linalg as spl
    import torch
    import torch.nn.functional as F

    from implicitdiff.bench import _harness as harness
    from implicitdiff.implicit.iterative import csr_from_values, iterative_solve
    from implicitdiff.linalg.krylov import cg, minres
    from implicitdiff.linalg.krylov._common import fast_csr as csr_of, quiet_sparse
    from implicitdiff.linalg.operator import LinearOperator


# ----------------------------------------------------------------------------- problems
def poisson_scipy(N):
    T = sp.diags([-np.ones(N - 1), 2 * np.ones(N), -np.ones(N - 1)], [-1, 0, 1], format="csr")
    eye = sp.identity(N, format="csr")
    return (sp.kron(eye, T) + sp.kron(T, eye)).tocsr()


def stencil_torch(x, kx, ky):
    """``A(κ) x = Dᵀ diag(κ) D x`` on an N × N grid with zero boundary; ``kx`` (N, N+1), ``ky`` (N+1, N)."""
    N = kx.shape[0]
    X = F.pad(x.reshape(*x.shape[:-1], N, N), (1, 1, 1, 1))
    fx = kx * (X[..., 1:-1, 1:] - X[..., 1:-1, :-1])
    fy = ky * (X[..., 1:, 1:-1] - X[..., :-1, 1:-1])
    out = (fx[..., :, :-1] - fx[..., :, 1:]) + (fy[..., :-1, :] - fy[..., 1:, :])
    return out.reshape(x.shape)


def _edges_np(x, N):
    X = np.pad(x.reshape(N, N), 1)
    return X[1:-1, 1:] - X[1:-1, :-1], X[1:, 1:-1] - X[:-1, 1:-1]


def stencil_numpy(x, kx, ky):
    N = kx.shape[0]
    gx, gy = _edges_np(x, N)
    fx, fy = kx * gx, ky * gy
    return ((fx[:, :-1] - fx[:, 1:]) + (fy[:-1, :] - fy[1:, :])).reshape(-1)


# ----------------------------------------------------------------------------- measurements
def _nbytes(t):
    """``(key, bytes)`` of a tensor's memory: its storage, or a sparse tensor's indices and values."""
    if t.layout == torch.sparse_csr:
        parts = (t.crow_indices(), t.col_indices(), t.values())
    elif t.layout == torch.sparse_coo:
        parts = (t._indices(), t._values())
    else:
        s = t.untyped_storage()
        return s.data_ptr(), s.nbytes()
    return parts[-1].data_ptr(), sum(p.numel() * p.element_size() for p in parts)


def graph_bytes(fn, exclude=()):
    """Bytes autograd keeps for ``fn()``'s backward, counted while discarding them (so an unrolled
    graph larger than memory can be measured); a storage saved twice while alive counts once, and
    the storages of ``exclude`` (the inputs, held by the caller anyway) not at all."""
    skip = {_nbytes(t)[0] for t in exclude}
    alive, total = {}, [0]

    def pack(t):
        key, nbytes = _nbytes(t)
        if key in skip:
            return None
        ref = alive.get(key)
        if ref is None or ref() is None:
            total[0] += nbytes
            try:
                alive[key] = weakref.ref(t)
            except TypeError:
                alive[key] = lambda: None
        return None

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda _: None):
        fn()
    return total[0]


def scipy_solve(name, A, b, rtol):
    """SciPy's solve at ``rtol``: ``(x, iterations)``."""
    its = [0]

    def count(_):
        its[0] += 1

    fn = spl.cg if name == "cg" else spl.minres
    x, _code = fn(A, b, rtol=rtol, maxiter=10 * b.size, callback=count, **({"atol": 0.0} if name == "cg" else {}))
    return x, its[0]


def scipy_rtol(name, A, b, rtol):
    """The ``rtol`` to give SciPy so that its true residual meets ``‖b − Ax‖ ≤ rtol ‖b‖`` (CG: ``rtol``
    itself; MINRES stops on ``‖r‖/(‖A‖‖x‖)``, so it is tightened by factors of 10 until it does)."""
    if name == "cg":
        return rtol
    for k in range(6):
        rt = rtol * 10.0 ** -k
        x, _ = scipy_solve(name, A, b, rt)
        if np.linalg.norm(b - A @ x) <= rtol * np.linalg.norm(b):
            break
    return rt


def bench_problem(kind, N, solver, rtol, repeats, rows):
    n = N * N
    rng = np.random.default_rng(N)
    b_np = rng.standard_normal(n)
    gx_np = rng.standard_normal(n)  # the incoming gradient x̄
    b, gx = torch.from_numpy(b_np), torch.from_numpy(gx_np)
    A_sp = poisson_scipy(N)
    if kind == "poisson-csr":
        with quiet_sparse():
            A_t = csr_of(torch.sparse_csr_tensor(torch.from_numpy(A_sp.indptr), torch.from_numpy(A_sp.indices),
                                                 torch.from_numpy(A_sp.data), (n, n), check_invariants=False))
        crow, cols, vals = A_t.crow_indices(), A_t.col_indices(), A_t.values()
        rows_idx = np.repeat(np.arange(n), np.diff(A_sp.indptr))
        A_op_sp = A_sp

        def make_op(v):  # csr_from_values: torch.sparse_csr_tensor's own backward densifies (gh-107381)
            return LinearOperator.from_sparse(csr_from_values(crow, cols, v, (n, n)), positive_definite=True)

        params = vals

        def scipy_param_grad(u, x):  # Ā_ij = −u_i x_j on the pattern
            return -(u[rows_idx] * x[A_sp.indices])
    else:
        kx_np = 1.0 + 0.5 * rng.random((N, N + 1))
        ky_np = 1.0 + 0.5 * rng.random((N + 1, N))
        kx, ky = torch.from_numpy(kx_np), torch.from_numpy(ky_np)
        A_op_sp = spl.LinearOperator((n, n), matvec=lambda v: stencil_numpy(v, kx_np, ky_np), dtype=np.float64)

        def make_op(k):
            return LinearOperator.from_matvec(stencil_torch, (n, n), k[0], k[1], positive_definite=True)

        params = (kx, ky)

        def scipy_param_grad(u, x):  # κ̄_e = −(D u)_e (D x)_e
            ux, uy = _edges_np(u, N)
            xx, xy = _edges_np(x, N)
            return -(ux * xx), -(uy * xy)

    solve = {"cg": cg, "minres": minres}[solver]
    p_list = list(params) if isinstance(params, tuple) else [params]
    op0 = make_op(params)
    ours_fwd = lambda: solve(op0, b, rtol=rtol)  # noqa: E731
    x_ours, info = ours_fwd()
    rtol_sp = scipy_rtol(solver, A_op_sp, b_np, rtol)
    x_sp, its_sp = scipy_solve(solver, A_op_sp, b_np, rtol_sp)
    res_sp = float(np.linalg.norm(b_np - A_op_sp @ x_sp) / np.linalg.norm(b_np))

    def ours_fwd_bwd():
        bb = b.clone().requires_grad_()
        ps = [p.clone().requires_grad_() for p in p_list]
        x, _ = iterative_solve(make_op(ps if len(ps) > 1 else ps[0]), bb, solver=solver, rtol=rtol)
        x.backward(gx)
        return bb.grad, [p.grad for p in ps]

    def scipy_fwd_bwd():
        x, _ = scipy_solve(solver, A_op_sp, b_np, rtol_sp)
        u, _ = scipy_solve(solver, A_op_sp, gx_np, rtol_sp)  # symmetric: Aᵀ u = x̄ with the same solver
        return u, scipy_param_grad(u, x)

    t = harness.time_callables({"ours_fwd": ours_fwd, "scipy_fwd": lambda: scipy_solve(solver, A_op_sp, b_np, rtol_sp),
                                "ours_fb": ours_fwd_bwd, "scipy_fb": scipy_fwd_bwd}, warmup=1, repeats=repeats)
    gb, _ = ours_fwd_bwd()
    u_sp, _ = scipy_fwd_bwd()
    grad_diff = float(np.abs(gb.numpy() - u_sp).max() / np.abs(u_sp).max())
    # backward memory: implicit vs unrolled autograd through the same iterations of our CG
    bb = b.clone().requires_grad_()
    ps = [p.clone().requires_grad_() for p in p_list]
    implicit = graph_bytes(
        lambda: iterative_solve(make_op(ps if len(ps) > 1 else ps[0]), bb, solver=solver, rtol=rtol)[0], [bb] + ps)
    its = int(info.iterations)
    if kind == "poisson-csr":
        unrolled = graph_bytes(lambda: solve(op0, bb, rtol=0.0, max_iter=its), [bb])  # wrt b
    else:
        unrolled = graph_bytes(lambda: solve(make_op(ps), bb, rtol=0.0, max_iter=its), [bb] + ps)  # wrt b and κ
    row = dict(problem=kind, n=n, solver=solver, its=its, its_scipy=its_sp, res=float(info.residual),
               res_scipy=res_sp, rtol_scipy=rtol_sp,
               fwd_ms=t["ours_fwd"].median * 1e3, fwd_scipy_ms=t["scipy_fwd"].median * 1e3,
               fb_ms=t["ours_fb"].median * 1e3, fb_scipy_ms=t["scipy_fb"].median * 1e3,
               implicit_mb=implicit / 2 ** 20, unrolled_mb=unrolled / 2 ** 20, grad_diff=grad_diff,
               status=int(info.status))
    row["fwd_ratio"] = row["fwd_ms"] / row["fwd_scipy_ms"]
    row["fb_ratio"] = row["fb_ms"] / row["fb_scipy_ms"]
    row["mem_ratio"] = row["unrolled_mb"] / max(row["implicit_mb"], 1e-12)
    rows.append(row)
    print(f"  {kind:12s} n={n:>8d} {solver:6s} its {its}/{its_sp}  fwd ×{row['fwd_ratio']:.2f}  "
          f"f+b ×{row['fb_ratio']:.2f}  graph {row['implicit_mb']:.2f} vs {row['unrolled_mb']:.1f} MB", flush=True)


COLUMNS = [("problem", "problem", "s"), ("n", "n", "d"), ("solver", "solver", "s"), ("its", "its", "d"),
           ("its_scipy", "its sp", "d"), ("fwd_ms", "fwd ms", ".1f"), ("fwd_scipy_ms", "fwd sp ms", ".1f"),
           ("fwd_ratio", "fwd ×", ".2f"), ("fb_ms", "f+b ms", ".1f"), ("fb_scipy_ms", "f+b sp ms", ".1f"),
           ("fb_ratio", "f+b ×", ".2f"), ("implicit_mb", "graph MB", ".2f"), ("unrolled_mb", "unrolled MB", ".1f"),
           ("mem_ratio", "mem ÷", ".0f"), ("res", "res", ".1e"), ("res_scipy", "res sp", ".1e"),
           ("rtol_scipy", "rtol sp", ".0e"), ("grad_diff", "b̄ diff", ".1e")]


def run(quick: bool = False, out=None, *, grids: str = "100,316", rtol: float = 1e-8, repeats: int = 3,
        solvers: str = "cg,minres", problems: str = "poisson-csr,matrix-free", threads: int = 1) -> int:
    """``implicitdiff bench krylov``: :func:`main` with these settings (``out`` default ``bench-krylov.json``)."""
    argv = ["--grids", grids, "--rtol", repr(rtol), "--repeats", str(repeats), "--solvers", solvers,
            "--problems", problems, "--threads", str(threads), "--out", out or "bench-krylov.json"]
    return main(argv + (["--quick"] if quick else []))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grids", default="100,316", help="grid sizes N (n = N²), comma-separated; 1000 → 10⁶")
    parser.add_argument("--rtol", type=float, default=1e-8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--solvers", default="cg,minres")
    parser.add_argument("--problems", default="poisson-csr,matrix-free")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="bench-krylov.json")
    parser.add_argument("--quick", action="store_true", help="a smoke run: one 32 × 32 grid, one repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.grids, args.repeats = "32", 1
    _setup(args.threads)
    _imports()
    harness.configure_threads(args.threads)
    rows = []
    t0 = time.perf_counter()
    for N in [int(s) for s in args.grids.split(",")]:
        for kind in args.problems.split(","):
            for solver in args.solvers.split(","):
                bench_problem(kind, N, solver, args.rtol, args.repeats, rows)
    print()
    print(harness.format_table(rows, COLUMNS, title=f"Krylov vs scipy.sparse.linalg, float64, rtol={args.rtol}, "
                                                    f"{args.threads} thread(s); ratios ours/SciPy (×), "
                                                    f"unrolled/implicit graph memory (÷)"))
    result = {"benchmark": "krylov", "settings": vars(args), "machine": harness.machine_info("cpu"), "rows": rows,
              "targets": {"fwd_ratio": 1.5, "fb_ratio": 1.5},
              "summary": {"misses": [f"{r['problem']} n={r['n']} {r['solver']} {k}={r[k]:.2f}" for r in rows
                                     for k in ("fwd_ratio", "fb_ratio") if r[k] > 1.5],
                          "seconds": time.perf_counter() - t0}}
    harness.write_json(args.out, result)
    print(f"\nwrote {args.out}; {len(result['summary']['misses'])} ratio(s) above 1.5: {result['summary']['misses']}")
    return 0
