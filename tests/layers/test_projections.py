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


# ============================================================================ adversarial inputs (issue 12)
# Each case states the acceptable outcome: a value checked against an independent reference
# (a sort-free bisection on τ, numpy), or a named InputError.
def _simplex_ref(x: torch.Tensor, r: float) -> torch.Tensor:
    """Projection onto {z ≥ 0, Σz = r} by bisection on τ in Σ max(x − τ, 0) = r, done in shifted
    coordinates (x − max x) with Python floats: independent of the sort-based implementation."""
    out = []
    for row in x.reshape(-1, x.shape[-1]).tolist():
        m = max(row)
        u = [v - m for v in row]
        lo, hi = -r, 0.0  # Σ max(u − τ, 0) is ≥ r at τ = −r and 0 at τ = 0
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if sum(max(v - mid, 0.0) for v in u) > r:
                lo = mid
            else:
                hi = mid
        out.append([max(v - hi, 0.0) for v in u])
    return torch.tensor(out, dtype=x.dtype).reshape(x.shape)


@pytest.mark.parametrize("scale", [1e-150, 1e-8, 1.0, 1e8, 1e16, 1e100])
def test_simplex_and_sparsemax_at_extreme_scales_are_not_zero(g, scale):
    x = torch.randn(4, 5, generator=g, dtype=F64) * scale
    ref = _simplex_ref(x, 1.0)
    for z in (project_simplex(x), sparsemax(x)):
        torch.testing.assert_close(z, ref, atol=1e-9, rtol=0)
        torch.testing.assert_close(z.sum(-1), torch.ones(4, dtype=F64), atol=1e-12, rtol=0)
    assert torch.equal(project_simplex(torch.tensor([1.0, 2.0, 3.0], dtype=F64) * 1e16),
                       torch.tensor([0.0, 0.0, 1.0], dtype=F64))


def test_sparsemax_is_shift_invariant(g):
    # exactly for a shift that keeps x + c exact (powers of two), up to the rounding of x + c otherwise
    x = torch.randint(-64, 64, (3, 6), generator=g).to(F64) / 64
    for c in (2.0 ** 10, -(2.0 ** 30), 2.0 ** 40):
        assert torch.equal(sparsemax(x + c), sparsemax(x))
    y = torch.randn(3, 6, generator=g, dtype=F64)
    torch.testing.assert_close(sparsemax(y + 1e8), sparsemax(y), atol=1e-7, rtol=0)


@pytest.mark.parametrize("scale", [1e-170, 1e-100, 1.0, 1e100, 1e160, 1e300])
def test_l2_ball_at_extreme_scales(g, scale):
    x = torch.randn(3, 4, generator=g, dtype=F64)
    z = project_l2_ball(x * scale)
    expected = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True) if scale >= 1 else x * scale
    torch.testing.assert_close(z, expected, atol=0, rtol=1e-13)
    # homogeneity: Π_{αr}(αx) = α Π_r(x) with α a power of two (exact)
    a = 2.0 ** 400
    torch.testing.assert_close(project_l2_ball(x * a, a), project_l2_ball(x) * a, atol=0, rtol=1e-15)


def test_l2_ball_gradient_at_large_scale(fd):
    x = torch.tensor([3e160, 4e160], dtype=F64)
    J = jacrev(project_l2_ball)(x)
    u = torch.tensor([0.6, 0.8], dtype=F64)
    expected = (torch.eye(2, dtype=F64) - torch.outer(u, u)) / 5e160  # (I − uuᵀ) r / ‖x‖
    torch.testing.assert_close(J, expected, atol=0, rtol=1e-12)


@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e16, 1e100])
def test_l1_ball_at_extreme_scales(g, scale):
    x = torch.randn(3, 5, generator=g, dtype=F64) * scale
    z = project_l1_ball(x)
    ref = torch.sign(x) * _simplex_ref(x.abs(), 1.0)
    inside = x.abs().sum(-1, keepdim=True) <= 1
    torch.testing.assert_close(z, torch.where(inside, x, ref), atol=1e-9, rtol=0)


def test_projections_keep_float32_and_take_strided_inputs(g):
    x = torch.randn(6, 4, generator=g, dtype=F64)
    for f in (project_simplex, sparsemax, project_l1_ball, project_l2_ball):
        torch.testing.assert_close(f(x.float()), f(x).float(), atol=1e-6, rtol=0)
        torch.testing.assert_close(f(x.mT), f(x.mT.contiguous()))  # non-contiguous
        torch.testing.assert_close(f(x[0].expand(3, 4)), f(x[0]).expand(3, 4))  # stride 0
    torch.testing.assert_close(sparsemax(x, dim=0), sparsemax(x.mT).mT)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex128, torch.float16])
def test_projections_refuse_other_dtypes(dtype):
    x = torch.ones(3).to(dtype)
    for f in (project_simplex, sparsemax, project_l1_ball, project_l2_ball):
        with pytest.raises(InputError, match=r"x has dtype"):
            f(x)
    with pytest.raises(InputError, match=r"x has dtype"):
        project_box(x, 0.0, 1.0)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), "1", True, torch.tensor([1.0, -0.5])])
def test_bad_radius_is_named(bad):
    x = torch.ones(2, 3, dtype=F64)
    for f in (project_simplex, project_l1_ball, project_l2_ball):
        with pytest.raises(InputError, match="radius"):
            f(x, bad)


@pytest.mark.parametrize("lower, upper", [(1.0, 0.0), (float("nan"), 1.0), (0.0, "1"),
                                          (torch.tensor([0.0, 2.0, 0.0]), 1.0)])
def test_bad_box_bounds_are_named(lower, upper):
    with pytest.raises(InputError, match="lower|upper"):
        project_box(torch.ones(3, dtype=F64), lower, upper)
    # one-sided boxes are fine
    torch.testing.assert_close(project_box(torch.tensor([-1.0, 2.0], dtype=F64), 0.0, float("inf")),
                               torch.tensor([0.0, 2.0], dtype=F64))


def test_empty_and_scalar_inputs():
    e = torch.zeros(0, 3, dtype=F64)  # an empty batch: an empty result
    for f in (project_simplex, sparsemax, project_l1_ball, project_l2_ball):
        assert f(e).shape == (0, 3)
    assert project_l2_ball(torch.zeros(2, 0, dtype=F64)).shape == (2, 0)
    assert project_l1_ball(torch.zeros(2, 0, dtype=F64)).shape == (2, 0)
    with pytest.raises(InputError, match="0 entries"):
        project_simplex(torch.zeros(2, 0, dtype=F64))
    for f in (project_simplex, project_l1_ball, project_l2_ball):
        with pytest.raises(InputError, match="scalar"):
            f(torch.tensor(1.0, dtype=F64))
    with pytest.raises(InputError, match="dim"):
        sparsemax(torch.ones(3, dtype=F64), dim=1)
    with pytest.raises(InputError, match="dim"):
        sparsemax(torch.ones(3, dtype=F64), dim=0.5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_or_inf_in_x_is_named(g, bad):
    # as qp and cone_program: an InputError naming x (the closed forms gave NaN silently: the simplex
    # turned [inf, 1] into [nan, nan], the l2 ball passed [nan, 1] through)
    x = torch.randn(3, 4, generator=g, dtype=F64)
    x[1, 2] = bad
    for f in (project_simplex, sparsemax, project_l1_ball, project_l2_ball, lambda t: project_box(t, 0.0, 1.0)):
        with pytest.raises(InputError, match=r"^x contains 1 NaN or Inf"):
            f(x)
        assert torch.isfinite(f(x[[0, 2]])).all()  # the finite rows alone: fine
