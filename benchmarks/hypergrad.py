"""Hyperparameter gradients through ``argmin`` against the closed form, unrolled autograd and peers.

    python benchmarks/hypergrad.py [--quick] [--out FILE] [--threads N] [--peers torchopt,jaxopt,optimistix|none]
                                   [--no-plot]

Ridge regression (1000×200, 5000×1000) and L2-regularized logistic regression (1000×100),
per-feature log-λ: our implicit hypergradient (L-BFGS forward; dense-LU and CG adjoints) against
the closed form, TorchOpt, JAXopt and Optimistix (those installed), and against unrolled autograd
as the number of inner iterations grows.  Prints tables of times, gradient errors, ratios and
saved memory; writes JSON (default ``bench-hypergrad.json``) and, with matplotlib, a plot.
"""

import argparse
import os
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats (a smoke run)")
    parser.add_argument("--out", default=None, help="JSON output path (default: bench-hypergrad.json)")
    parser.add_argument("--threads", type=int, default=1, help="torch/BLAS threads (default 1)")
    parser.add_argument("--peers", default=None,
                        help="comma-separated peers to run (default: every installed one); 'none' for none")
    parser.add_argument("--no-plot", action="store_true", help="skip the plot")
    args = parser.parse_args(argv)
    # BLAS/OpenMP read these when torch loads them: set them before the first torch import.
    # A busy-waiting BLAS on a shared machine can be 100x slower at 2 threads than at 1.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, str(args.threads))
    peers = None
    if args.peers is not None:
        peers = () if args.peers.strip().lower() == "none" else tuple(p.strip() for p in args.peers.split(",") if p)
    from implicitdiff.bench.hypergrad import run

    results = run(quick=args.quick, out=args.out, threads=args.threads, plot=not args.no_plot, peers=peers)
    return 0 if results["summary"]["targets_met"] or args.quick else 1


if __name__ == "__main__":
    sys.exit(main())
