"""How many library functions one call passes through: a shim of ``implicitdiff.bench.calls``.

    python benchmarks/calls.py [--out FILE]
"""

import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="JSON output path (default: bench-calls.json)")
    args = parser.parse_args(argv)
    from implicitdiff.bench.calls import run

    results = run(out=args.out)
    return 0 if results["summary"]["targets_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
