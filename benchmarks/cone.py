"""Cone programs as layers: nn.CvxpyLayer (cone_program) forward + backward against cvxpylayers.

    python benchmarks/cone.py [--quick] [--out FILE] [--threads N] [--device DEV]

Batch 128 of an SOCP (robust least squares, n = 100), an SDP (a 10×10 PSD variable) and an
exponential-cone problem (logistic regression, 50 features).  Prints a table of speed-ups
(cvxpylayers' time / ours), layer construction times, and the error of both gradients against
finite differences of an exact reference; writes JSON (default ``bench-cone.json``).  A peer that
is not installed is skipped (``pip install cvxpylayers``).
"""

import argparse
import os
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few repeats (a smoke run)")
    parser.add_argument("--out", default=None, help="JSON output path (default: bench-cone.json)")
    parser.add_argument("--threads", type=int, default=1, help="torch/BLAS threads (default 1)")
    parser.add_argument("--device", default="cpu", help="where ours runs (default cpu)")
    args = parser.parse_args(argv)
    # BLAS/OpenMP read these when torch loads them: set them before the first torch import.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, str(args.threads))
    from implicitdiff.bench.cone import run

    kwargs = dict(quick=args.quick, out=args.out, threads=args.threads)
    if args.device != "cpu":
        kwargs["device"] = args.device
    results = run(**kwargs)
    return 0 if args.quick or results["summary"].get("targets_met") else 1


if __name__ == "__main__":
    sys.exit(main())
