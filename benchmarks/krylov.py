"""Krylov solves against scipy.sparse.linalg: a shim of ``implicitdiff.bench.krylov`` (see benchmarks/README.md).

    python benchmarks/krylov.py [--grids 100,316] [--rtol 1e-8] [--repeats 3] [--solvers cg,minres]
                                [--problems poisson-csr,matrix-free] [--threads N] [--out FILE] [--quick]
"""

import os
import sys


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    threads = argv[argv.index("--threads") + 1] if "--threads" in argv[:-1] else "1"
    # BLAS/OpenMP read these when torch loads them: set them before the first torch import.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, threads)
    from implicitdiff.bench.krylov import main as bench_main

    return bench_main(argv)


if __name__ == "__main__":
    sys.exit(main())
