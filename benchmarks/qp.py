"""Batched QP layer forward + backward against ProxSuite's QPLayer, qpth and cvxpylayers (see benchmarks/README.md).

    python benchmarks/qp.py [--quick] [--out FILE] [--threads N] [--device DEV] [--case LABEL ...] [--no-plot]

Prints a table of speed-ups (peer time / ours) with the agreement of solutions and gradients
against a tight cvxpy reference; writes JSON (default ``bench-qp.json``) and, with matplotlib,
a plot of time vs n and vs batch size beside it.  Peers that are not installed are skipped
(``pip install cvxpy cvxpylayers proxsuite``; ``pip install --no-deps qpth``).
"""

import argparse
import os
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few repeats (a smoke run)")
    parser.add_argument("--out", default=None, help="JSON output path (default: bench-qp.json)")
    parser.add_argument("--threads", type=int, default=1, help="torch/BLAS threads (default 1)")
    parser.add_argument("--no-plot", action="store_true", help="skip the plot")
    parser.add_argument("--device", default="cpu", help="device of ours and qpth (default cpu)")
    parser.add_argument("--case", action="append", default=None,
                        help="run only this case (repeatable), e.g. --case 'qp n=100 eq' --case 'lp n=100'")
    args = parser.parse_args(argv)
    # BLAS/OpenMP read these when torch loads them: set them before the first torch import.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, str(args.threads))
    from implicitdiff.bench.qp import run

    results = run(quick=args.quick, out=args.out, threads=args.threads, plot=not args.no_plot, device=args.device,
                  cases=args.case)
    return 0 if args.quick or results["summary"].get("targets_met") else 1


if __name__ == "__main__":
    sys.exit(main())
