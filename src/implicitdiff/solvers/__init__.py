"""Nonlinear forward solvers (no gradients): Newton, Broyden, Anderson, Picard, L-BFGS, QP interior point."""
