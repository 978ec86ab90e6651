"""``python -m implicitdiff``: the command line of :mod:`implicitdiff.cli`."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
