"""The implicit-differentiation mechanism: the only home of ``autograd.Function``."""
