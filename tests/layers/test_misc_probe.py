"""The probe's findings 3, 4 and 16 (linear_solve, DEQ): a learned non-symmetric ``Q`` uses its symmetric part
as ``qp`` does; a projection's radius or bound that would enlarge the result is an error; shape and dtype
errors name what the caller passed (float64, closed forms and finite differences)."""

import pytest
import torch

import implicitdiff as idf
from implicitdiff._core.errors import InputError
from implicitdiff.layers.deq import deq
from implicitdiff.layers.projections import project_box, project_l1_ball, project_l2_ball, project_simplex
from implicitdiff.nn import DEQ, QPLayer

F64 = torch.float64


# ------------------------------------------------------------------ finding 3: QPLayer's learned Q
def test_learned_nonsymmetric_q_uses_its_symmetric_part():
    Qn = torch.tensor([[2.0, 1.5], [0.0, 2.0]], dtype=F64)
    p = torch.tensor([1.0, -1.0], dtype=F64)
    S = 0.5 * (Qn + Qn.T)
    want = -torch.linalg.solve(S, p)  # the unconstrained minimizer of ½ zᵀQz + pᵀz: z = −S⁻¹p = (−0.8, 0.8)
    learned = QPLayer(2, learn=("Q",), Q=Qn)
    torch.testing.assert_close(learned.Q, S, atol=1e-10, rtol=0)
    for z in (learned(p=p), QPLayer(2, Q=Qn)(p=p), idf.qp(Qn, p)):
        torch.testing.assert_close(z, want, atol=1e-8, rtol=0)


def test_learned_q_gradient_matches_finite_differences():
    # the gradient to the factor L (Q = L Lᵀ) of an unconstrained QP, against central differences
    Qn = torch.tensor([[3.0, 1.0, 0.0], [-0.5, 2.0, 0.4], [0.2, 0.0, 2.5]], dtype=F64)
    p = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    w = torch.tensor([0.3, -1.1, 0.7], dtype=F64)
    layer = QPLayer(3, learn=("Q",), Q=Qn)
    (w @ layer(p=p)).backward()
    L0 = layer.Q_factor.detach().clone()

    def loss(L):
        return w @ idf.qp(L @ L.T, p)

    D = torch.randn(3, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    h = 1e-6
    fd = (loss(L0 + h * D) - loss(L0 - h * D)) / (2 * h)
    torch.testing.assert_close((layer.Q_factor.grad * D).sum(), fd, atol=1e-7, rtol=1e-6)


# ------------------------------------------------------------------ finding 4: radius / bound shapes
def test_radius_that_would_enlarge_the_batch_is_an_error():
    x = torch.zeros(2, 3, dtype=F64)
    for f in (project_simplex, project_l1_ball, project_l2_ball):
        with pytest.raises(InputError, match=r"radius has shape \(2, 1\).*\(2,\)"):
            f(x, radius=torch.tensor([[1.0], [2.0]], dtype=F64))
        with pytest.raises(InputError, match=r"radius has shape \(1,\).*pass a scalar"):
            f(x[0], radius=torch.ones(1, dtype=F64))
    with pytest.raises(InputError, match=r"lower has shape \(2, 3\).*shape of x \(3,\)"):
        project_box(x[0], torch.zeros(2, 3, dtype=F64), 1.0)


def test_radius_that_broadcasts_to_the_batch_is_accepted():
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    r = torch.tensor([1.0, 2.0], dtype=F64)
    z = project_simplex(x, radius=r)
    assert z.shape == x.shape
    for i in range(2):
        torch.testing.assert_close(z[i], project_simplex(x[i], radius=r[i]))
    torch.testing.assert_close(project_simplex(x, radius=r[:1]), project_simplex(x, radius=1.0))
    lower = torch.tensor([0.0, -1.0, 0.5], dtype=F64)
    torch.testing.assert_close(project_box(x, lower, 1.0), torch.maximum(x, lower).clamp(max=1.0))


# ------------------------------------------------------------------ finding 16: linear_solve's shape message
def test_linear_solve_rows_message_names_the_fix():
    A = torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=F64) + 3 * torch.eye(3, dtype=F64)
    b = torch.randn(4, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    with pytest.raises(InputError, match=r"b must be \(3,\) or \(\*, 3, k\); .*b\[\.\.\., None\].*b\.mT") as e:
        idf.linear_solve(A, b)
    assert "(3,), (3,)" not in str(e.value)
    with pytest.raises(InputError, match=r"b must be \(3,\), \(2, 3\) or \(\*, 3, k\)"):
        idf.linear_solve(A.expand(2, 3, 3), torch.ones(4, dtype=F64))
    # the two fixes the message suggests solve what they say
    torch.testing.assert_close(idf.linear_solve(A, b[..., None])[..., 0], torch.linalg.solve(A, b.T).T)
    torch.testing.assert_close(idf.linear_solve(A, b.mT), torch.linalg.solve(A, b.T))


# ------------------------------------------------------------------ finding 16: the DEQ's dtype message
class _Cell(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4, dtype=F64)

    def forward(self, z, x):
        return torch.tanh(0.3 * self.lin(z) + x)


def test_deq_dtype_errors_name_x_z0_and_the_cell_parameter():
    cell, x = _Cell(), torch.randn(3, 4, dtype=F64)
    for call in (lambda: deq(cell, x.float()), lambda: DEQ(cell)(x.float())):
        with pytest.raises(InputError, match=r"parameter 'lin.weight' is torch.float64.*x is torch.float32.*x.to") \
                as e:
            call()
        assert "y0" not in str(e.value)
    with pytest.raises(InputError, match=r"z0 has dtype torch.float32 but x has torch.float64"):
        deq(cell, x, z0=torch.zeros(3, 4))
    with pytest.raises(InputError, match=r"x has dtype torch.int64"):
        deq(cell, torch.ones(3, 4, dtype=torch.int64))
