"""OptNet's 4×4 mini-Sudoku: a QP layer learns the rules of Sudoku as its equality constraints.

The model is a single ``implicitdiff.nn.QPLayer`` (64 one-hot variables, ``z ≥ 0``, 40 learned
equalities ``A z = b``); puzzles are generated in code.  It prints the train/test board error per
epoch (a progress bar with tqdm) and writes ``sudoku.png`` (with matplotlib).
See :mod:`implicitdiff.demos.sudoku`; ``implicitdiff demo sudoku`` runs the same.

Run:  python examples/sudoku.py [--quick] [--out DIR]      (about 30 s on one CPU thread;
      --quick: about 12 s, fewer puzzles and epochs)
"""

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads its BLAS: one quiet thread
os.environ.setdefault("OMP_NUM_THREADS", "1")

from implicitdiff.demos.sudoku import run  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--out", default=".", help="folder for sudoku.png (default: .)")
    args = parser.parse_args(argv)
    res = run(args)
    return 0 if (args.quick or res["final_test_error"] < 0.1) else 1


if __name__ == "__main__":
    raise SystemExit(main())
