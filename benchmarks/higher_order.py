"""Higher-order derivatives through ``fixed_point``: a shim of ``implicitdiff.bench.higher_order``.

    python benchmarks/higher_order.py [--n 4000] [--repeats 3] [--threads 1] [--quick] [--out FILE]

Prints the cost of a Hessian-vector product and a ``torch.func.jvp`` as multiples of one
first-order forward+backward (target ≤ 10×), with their errors against unrolled autograd.
"""

import argparse
import os
import sys


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=None, help="width (default 4000; --quick: 200)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 3)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None, help="JSON output (default bench-higher_order.json)")
    args = ap.parse_args(argv)
    # BLAS/OpenMP read these when torch loads them: set them before the first torch import.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, str(args.threads))
    from implicitdiff.bench.higher_order import run

    results = run(quick=args.quick, out=args.out, n=args.n, repeats=args.repeats, threads=args.threads)
    return 0 if args.quick or results["summary"]["targets_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
