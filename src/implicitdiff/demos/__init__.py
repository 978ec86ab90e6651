"""Runnable demonstrations behind ``implicitdiff demo``; see :mod:`implicitdiff.demos.registry`."""
