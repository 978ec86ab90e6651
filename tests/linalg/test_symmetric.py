"""symmetric_part: (M + Mᵀ)/2 by a copy, never writing into its input."""

import torch

from implicitdiff.linalg.symmetric import symmetric_part


def test_equals_the_formula_and_is_contiguous():
    M = torch.randn(3, 5, 5, dtype=torch.float64)
    S = symmetric_part(M)
    torch.testing.assert_close(S, 0.5 * (M + M.mT), atol=0, rtol=0)
    assert S.is_contiguous() and torch.equal(S, S.mT)


def test_never_writes_into_the_input_even_when_its_transpose_is_contiguous():
    X = torch.randn(2, 4, 4, dtype=torch.float64)
    keep = X.clone()
    S = symmetric_part(X.mT)  # (X.mT).mT is X itself, contiguous: a lazy .contiguous() would alias it
    assert torch.equal(X, keep)
    torch.testing.assert_close(S, 0.5 * (X + X.mT), atol=0, rtol=0)


def test_differentiable_against_finite_differences():
    M = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda m: (symmetric_part(m) ** 2).sum(), (M,))
