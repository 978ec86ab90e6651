"""User-facing layers: each one is a forward solver plus an optimality condition."""
