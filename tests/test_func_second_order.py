"""Second derivatives of cone_program through torch.func (float64): ``hessian`` (forward over reverse),
``jacfwd(grad)``, ``jacrev(grad)``, ``jacrev(jacrev)`` and ``jvp(grad)`` against central finite differences
of the gradient and against double backward; a third derivative is refused with a clear error."""

import pytest
import torch
from torch.func import grad, hessian, jacfwd, jacrev, jvp

import implicitdiff as idf

from layers._cone_cases import case

RTOL = 1e-10


def _objective(name):
    """``φ(c) = ‖x(c) − t‖² + uᵀy(c)``: a loss with a nonzero Hessian on every cone."""
    A, b, c, cones = case(name)
    g = torch.Generator().manual_seed(5)
    t = torch.randn(A.shape[1], generator=g, dtype=torch.float64)
    u = torch.randn(A.shape[0], generator=g, dtype=torch.float64)

    def phi(c_):
        x, y, _ = idf.cone_program(A, b, c_, cones, rtol=RTOL)
        return (x - t).pow(2).sum() + (u * y).sum()

    return phi, c


def _gradient(phi, c):
    cr = c.clone().requires_grad_()
    return torch.autograd.grad(phi(cr), cr)[0]


def _double_backward(phi, c):
    cr = c.clone().requires_grad_()
    (gc,) = torch.autograd.grad(phi(cr), cr, create_graph=True)
    return torch.stack([torch.autograd.grad(gc[i], cr, retain_graph=True)[0] for i in range(c.numel())])


@pytest.mark.parametrize("name", ["socp", "sdp", "exp"])
def test_hessian_matches_finite_differences_of_the_gradient(name):
    # failed before: forward AD met the backward's out= ops (SOC/PSD/exp frames)
    phi, c = _objective(name)
    H = hessian(phi)(c)
    h = 1e-5
    fd = torch.stack([(_gradient(phi, c + h * e) - _gradient(phi, c - h * e)) / (2 * h)
                      for e in torch.eye(c.numel(), dtype=c.dtype)], 1)
    assert float(H.abs().max()) > 1e-3  # a real second derivative, not a vanishing one
    assert torch.allclose(H, fd, atol=1e-5, rtol=1e-4), (H - fd).abs().max()
    assert torch.allclose(H, H.mT, atol=1e-8, rtol=0)


@pytest.mark.parametrize("name", ["lp", "socp", "sdp", "exp"])
def test_every_torch_func_route_equals_double_backward(name):
    # jacfwd(grad) needed _AdjointSolve's vmap and jvp rules, jacrev(grad) / jacrev(jacrev) its vmap rule
    # and a backward under torch.func (which always builds a graph: not a third derivative)
    phi, c = _objective(name)
    ref = _double_backward(phi, c)
    for route in (hessian(phi), jacfwd(grad(phi)), jacrev(grad(phi)), jacrev(jacrev(phi))):
        assert torch.allclose(route(c), ref, atol=1e-8, rtol=1e-7)
    v = torch.linspace(-1, 1, c.numel(), dtype=c.dtype)
    assert torch.allclose(jvp(grad(phi), (c,), (v,))[1], ref @ v, atol=1e-8, rtol=1e-7)


def test_a_third_derivative_raises_a_clear_error():
    phi, c = _objective("socp")
    with pytest.raises(NotImplementedError, match="differentiable twice"):
        jacrev(jacrev(grad(phi)))(c)
    cr = c.clone().requires_grad_()
    (gc,) = torch.autograd.grad(phi(cr), cr, create_graph=True)
    (hc,) = torch.autograd.grad(gc.pow(2).sum(), cr, create_graph=True)  # the second: built with a graph
    with pytest.raises(NotImplementedError, match="differentiable twice"):
        torch.autograd.grad(hc.sum(), cr)


@pytest.mark.parametrize("wrt", ["A shared", "A batched", "b batched"])
def test_hessian_in_A_and_batched_b_equals_double_backward(wrt):
    # the vmap rule's fold of a shared / batched A and of a batch of problems
    A, b, c, cones = case("socp")
    g = torch.Generator().manual_seed(9)
    bb = b + 0.05 * torch.rand(2, b.shape[0], generator=g, dtype=b.dtype)
    cb = c + 0.1 * torch.randn(2, c.shape[0], generator=g, dtype=c.dtype)
    if wrt == "b batched":
        def phi(b_):
            return idf.cone_program(A, b_, cb, cones, rtol=RTOL)[0].pow(2).sum()
        p0 = bb
    else:
        def phi(A_):
            return idf.cone_program(A_, bb, cb, cones, rtol=RTOL)[1].pow(2).sum()
        p0 = A.clone() if wrt == "A shared" else A.expand(2, *A.shape).clone()
    pr = p0.clone().requires_grad_()
    (gp,) = torch.autograd.grad(phi(pr), pr, create_graph=True)
    rows = range(0, gp.numel(), 7)
    ref = torch.stack([torch.autograd.grad(gp.reshape(-1)[i], pr, retain_graph=True)[0].reshape(-1) for i in rows])
    assert float(ref.abs().max()) > 1e-3
    for route in (hessian(phi), jacrev(grad(phi))):
        H = route(p0).reshape(gp.numel(), -1)[list(rows)]
        assert torch.allclose(H, ref, atol=1e-8, rtol=1e-7)


def test_per_sample_hessians_under_vmap_are_refused_with_the_route():
    # vmap over a derivative maps the saved solution: differentiable once there (implicit/cone.py)
    phi, c = _objective("socp")
    C = c + 0.1 * torch.randn(2, c.numel(), generator=torch.Generator().manual_seed(1), dtype=c.dtype)
    for route in (hessian(phi), jacrev(grad(phi))):
        with pytest.raises(NotImplementedError, match="take it outside vmap"):
            torch.func.vmap(route)(C)
