"""Gradient checks: finite differences, unrolled references, closed forms."""
