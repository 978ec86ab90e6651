"""Dense ``linear_solve`` forward + backward against ``torch.linalg`` (see benchmarks/README.md).

    python benchmarks/linear.py [--quick] [--out FILE] [--threads N] [--device cpu|cuda] [--no-plot]

Prints a table of time ratios ours / peer and gradient agreement; writes JSON
(default ``bench-linear.json``) and, with matplotlib, a plot beside it.
"""

import argparse
import os
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few repeats (a smoke run)")
    parser.add_argument("--out", default=None, help="JSON output path (default: bench-linear.json)")
    parser.add_argument("--threads", type=int, default=1, help="torch/BLAS threads (default 1)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--no-plot", action="store_true", help="skip the plot")
    args = parser.parse_args(argv)
    # BLAS/OpenMP read these when torch loads them: set them before the first torch import.
    # A busy-waiting BLAS on a shared machine can be 100x slower at 2 threads than at 1.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, str(args.threads))
    from implicitdiff.bench.linear import run

    results = run(quick=args.quick, out=args.out, device=args.device, threads=args.threads, plot=not args.no_plot)
    return 0 if results["summary"]["targets_met"] or args.quick else 1


if __name__ == "__main__":
    sys.exit(main())
