"""custom_root / custom_fixed_point: the JAXopt contract on a black-box solver."""

import pytest
import torch

import implicitdiff as idf

D = torch.float64


def test_custom_root_black_box_solver():
    F = lambda y, a: y ** 2 - a  # noqa: E731

    @idf.custom_root(F)
    def babylonian(y0, a):
        y = y0.clone()
        for _ in range(60):
            y = 0.5 * (y + a / y)
        return y

    a = torch.tensor([4.0, 9.0, 2.0], dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: babylonian(torch.ones(3, dtype=D), a), (a,))
    assert babylonian.__name__ == "babylonian"


def test_custom_fixed_point_with_numpy_style_solver():
    T = lambda z, A, b: z @ A.mT + b  # noqa: E731
    g = torch.Generator().manual_seed(0)
    A = 0.3 * torch.randn(3, 3, generator=g, dtype=D)
    b = torch.randn(3, generator=g, dtype=D, requires_grad=True)

    @idf.custom_fixed_point(T)
    def solve(z0, A, b):  # not differentiable: goes through numpy
        import numpy as np
        return torch.from_numpy(np.linalg.solve(np.eye(3) - A.numpy(), b.numpy()))

    z = solve(torch.zeros(3, dtype=D), A, b)
    (gb,) = torch.autograd.grad(z.sum(), b)
    torch.testing.assert_close(gb, torch.linalg.solve((torch.eye(3, dtype=D) - A).T, torch.ones(3, dtype=D)))


def test_custom_root_residual_check():
    F = lambda y, a: y ** 2 - a  # noqa: E731
    wrong = idf.custom_root(F, check_rtol=1e-8)(lambda y0, a: y0 + 1.0)
    with pytest.raises(idf.SolveError, match="residual"):
        wrong(torch.ones(2, dtype=D), torch.tensor([4.0, 9.0], dtype=D))
