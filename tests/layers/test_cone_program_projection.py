"""Derivatives of the projection onto the dual cone, against autograd of closed-form projections or
finite differences (float64)."""

import pytest
import torch

from implicitdiff.implicit.cone_projection import (_exp, _exp_kkt, _exp_project_dual, apply_block_diagonal,
                                                   dual_projection_jacobian, project_dual)
from implicitdiff.linalg.cone_spec import parse_cones, smat, svec

F64 = torch.float64


def _proj_psd(v, k):
    lam, U = torch.linalg.eigh(smat(v, k))
    return svec(U @ torch.diag_embed(lam.clamp(min=0)) @ U.mT)


def _proj_soc(v):
    t, x = v[0], v[1:]
    nx = x.norm()
    if nx <= t:
        return v
    if nx <= -t:
        return torch.zeros_like(v)
    return 0.5 * (t + nx) * torch.cat([torch.ones(1, dtype=v.dtype), x / nx])


@pytest.mark.parametrize("seed", range(4))
def test_symmetric_cones_match_autograd_of_the_projection(seed):
    g = torch.Generator().manual_seed(seed)
    cones = {"z": 2, "l": 3, "q": [4, 3], "s": [3]}
    spec = parse_cones(cones)
    v = torch.randn(1, spec.m, generator=g, dtype=F64)
    v[0, 5] = v[0, 6:9].norm() + 0.5        # one SOC block inside, one on the generic part
    y = project_dual(spec, v, None, None)  # no exponential blocks: no hint needed
    s = y - v
    D = dual_projection_jacobian(spec, y, s)[0]

    def proj(u):
        parts = [u[:2], u[2:5].clamp(min=0), _proj_soc(u[5:9]), _proj_soc(u[9:12]), _proj_psd(u[12:], 3)]
        return torch.cat(parts)
    J = torch.autograd.functional.jacobian(proj, v[0])
    assert torch.allclose(D, J, atol=1e-12)
    assert torch.allclose(y[0], proj(v[0]), atol=1e-12)
    V = torch.randn(1, spec.m, 2, generator=g, dtype=F64)
    assert torch.allclose(apply_block_diagonal(spec, D[None], V), D @ V, atol=1e-12)


@pytest.mark.parametrize("r, q, mu", [(0.3, 0.7, 0.5), (-1.2, 2.0, 1.5), (0.8, 0.2, 0.05)])
def test_exponential_cone_projection_and_derivative(r, q, mu):
    # a complementary pair: s on K's boundary, y = −μ∇g(s) on K*'s; then Π_{K*}(y − s) = y
    s = torch.tensor([[r, q, q * torch.exp(torch.tensor(r / q)).item()]], dtype=F64)
    _, grad, _ = _exp_kkt(s, torch.tensor([mu], dtype=F64))
    y = -mu * grad
    v = y - s
    assert torch.allclose(_exp_project_dual(v, s, y), y, atol=1e-12)
    D = _exp(s, y)[0]
    h = 1e-6
    for j in range(3):
        e = torch.zeros(1, 3, dtype=F64)
        e[0, j] = h
        fd = (_exp_project_dual(v + e, s, y) - _exp_project_dual(v - e, s, y))[0] / (2 * h)
        assert torch.allclose(D[:, j], fd, atol=1e-7)
    # the dual projection is a projection: Moreau, Π_{K*}(v) − v = Π_K(−v) on K's boundary
    p = (_exp_project_dual(v + 0.01, s, y) - (v + 0.01))[0]
    assert abs(float(p[1] * torch.exp(p[0] / p[1]) - p[2])) < 1e-10
