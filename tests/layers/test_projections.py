"""Projections: values against the QP layer (an independent interior-point solve), gradients against
finite differences and closed forms, batching and torch.func transforms (float64)."""

import pytest
import torch
from torch.func import jacrev, vmap

from implicitdiff._core.errors import InputError
from implicitdiff.layers.projections import project_box, project_l1_ball, project_l2_ball, project_simplex, sparsemax
from implicitdiff.layers.qp import qp

F64 = torch.float64


def qp_projection(x, G=None, h=None, A=None, b=None):
    n = x.shape[-1]
    return qp(torch.eye(n, dtype=F64), -x, G, h, A, b)


def test_simplex_matches_qp_and_properties(g):
    x = 2 * torch.randn(5, 6, generator=g, dtype=F64)
    r = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5], dtype=F64)
    z = project_simplex(x, r)
    n = 6
    want = qp(torch.eye(n, dtype=F64), -x, -torch.eye(n, dtype=F64), torch.zeros(n, dtype=F64),
              torch.ones(1, n, dtype=F64), r[:, None])
    torch.testing.assert_close(z, want, atol=1e-9, rtol=0)
    assert (z >= 0).all()
    torch.testing.assert_close(z.sum(-1), r)


def test_simplex_gradient_closed_form_and_fd(g, fd):
    x = torch.randn(6, generator=g, dtype=F64)
    r = torch.tensor(1.3, dtype=F64)
    z = project_simplex(x, r)
    s = (z > 0).to(F64)
    J = jacrev(project_simplex, argnums=(0, 1))(x, r)
    torch.testing.assert_close(J[0], torch.diag(s) - torch.outer(s, s) / s.sum(), atol=1e-12, rtol=0)
    torch.testing.assert_close(J[1], s / s.sum(), atol=1e-12, rtol=0)
    Jfd = fd.jacobian(project_simplex, [x, r])
    torch.testing.assert_close(J[0], Jfd[0], atol=1e-8, rtol=0)
    torch.testing.assert_close(J[1], Jfd[1], atol=1e-8, rtol=0)


def test_simplex_gradient_matches_qp_gradient(g):
    x = torch.randn(5, generator=g, dtype=F64)
    n = 5
    J = jacrev(project_simplex)(x)
    Jqp = jacrev(lambda x: qp(torch.eye(n, dtype=F64), -x, -torch.eye(n, dtype=F64), torch.zeros(n, dtype=F64),
                              torch.ones(1, n, dtype=F64), torch.ones(1, dtype=F64)))(x)
    torch.testing.assert_close(J, Jqp, atol=1e-9, rtol=0)


def test_sparsemax_along_a_dim(g):
    x = torch.randn(3, 4, 5, generator=g, dtype=F64)
    z = sparsemax(x, dim=1)
    torch.testing.assert_close(z, project_simplex(x.transpose(1, 2)).transpose(1, 2))
    torch.testing.assert_close(z.sum(1), torch.ones(3, 5, dtype=F64))


def test_box_values_and_gradients(g, fd):
    x = 2 * torch.randn(7, generator=g, dtype=F64)
    lo, hi = -0.5 * torch.rand(7, generator=g, dtype=F64), 0.5 * torch.rand(7, generator=g, dtype=F64)
    z = project_box(x, lo, hi)
    n = 7
    G = torch.cat([torch.eye(n, dtype=F64), -torch.eye(n, dtype=F64)])
    torch.testing.assert_close(z, qp_projection(x, G, torch.cat([hi, -lo])), atol=1e-9, rtol=0)
    J = jacrev(project_box, argnums=(0, 1, 2))(x, lo, hi)
    for a, e in zip(J, fd.jacobian(project_box, [x, lo, hi])):
        torch.testing.assert_close(a, e, atol=1e-8, rtol=0)


@pytest.mark.parametrize("scale", [0.2, 3.0])  # inside and outside the ball
def test_l2_ball(g, fd, scale):
    x = scale * torch.randn(4, 5, generator=g, dtype=F64) / 5 ** 0.5
    z = project_l2_ball(x, 1.0)
    norms = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    torch.testing.assert_close(z, torch.where(norms > 1, x / norms, x))
    J = vmap(jacrev(project_l2_ball))(x)
    for i in range(4):
        torch.testing.assert_close(J[i], fd.jacobian(project_l2_ball, [x[i]])[0], atol=1e-8, rtol=0)


@pytest.mark.parametrize("scale", [0.1, 2.0])
def test_l1_ball(g, fd, scale):
    x = scale * torch.randn(6, generator=g, dtype=F64)
    r = torch.tensor(1.0, dtype=F64)
    z = project_l1_ball(x, r)
    n = 6
    # the l1 ball as a QP in (z⁺, z⁻): z = z⁺ − z⁻, z± ≥ 0, Σ z⁺ + z⁻ ≤ r
    Q = torch.eye(2 * n, dtype=F64)
    Q[:n, n:] = Q[n:, :n] = -torch.eye(n, dtype=F64)
    Q = Q + 1e-9 * torch.eye(2 * n, dtype=F64)
    G = torch.cat([-torch.eye(2 * n, dtype=F64), torch.ones(1, 2 * n, dtype=F64)])
    h = torch.cat([torch.zeros(2 * n, dtype=F64), r[None]])
    w = qp(Q, torch.cat([-x, x]), G, h)
    torch.testing.assert_close(z, w[:n] - w[n:], atol=1e-7, rtol=0)
    assert z.abs().sum() <= r + 1e-12
    J = jacrev(project_l1_ball, argnums=(0, 1))(x, r)
    for a, e in zip(J, fd.jacobian(project_l1_ball, [x, r])):
        torch.testing.assert_close(a, e, atol=1e-8, rtol=0)


def test_batched_radius_and_bad_radius(g):
    x = torch.randn(3, 4, generator=g, dtype=F64)
    r = torch.tensor([0.5, 1.0, 2.0], dtype=F64)
    z = project_l2_ball(x, r)
    for i in range(3):
        torch.testing.assert_close(z[i], project_l2_ball(x[i], r[i]))
    with pytest.raises(InputError, match="radius"):
        project_simplex(x, torch.ones(2, dtype=F64))
    with pytest.raises(InputError, match="lower"):
        project_box(x, torch.zeros(5, dtype=F64), 1.0)
