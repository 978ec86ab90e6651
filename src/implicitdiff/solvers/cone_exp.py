"""The exponential cone (placeholder until the nonsymmetric scaling lands)."""

from __future__ import annotations

__all__ = ["ExpCone"]


class ExpCone:
    pass
