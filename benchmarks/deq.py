"""A deep equilibrium layer (width 256, batch 64) against torchdeq and unrolled autograd.

    python benchmarks/deq.py [--quick] [--out FILE] [--threads N]

Prints a table of times (forward, forward+backward), ratios to torchdeq's implicit mode, saved
memory, gradient error to the exact implicit gradient and convergence, in float64 and float32, then
a per-iteration cost breakdown of the solvers; writes JSON (default ``bench-deq.json``).
torchdeq is optional (``pip install --no-deps torchdeq``).
"""

import argparse
import os
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few repeats (a smoke run)")
    parser.add_argument("--out", default=None, help="JSON output path (default: bench-deq.json)")
    parser.add_argument("--threads", type=int, default=1, help="torch/BLAS threads (default 1)")
    args = parser.parse_args(argv)
    # BLAS/OpenMP read these when torch loads them: set them before the first torch import.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, str(args.threads))
    from implicitdiff.bench.deq import run

    results = run(quick=args.quick, out=args.out, threads=args.threads)
    return 0 if results["summary"]["targets_met"] or args.quick else 1


if __name__ == "__main__":
    sys.exit(main())
