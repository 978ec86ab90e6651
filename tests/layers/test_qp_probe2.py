"""The second probe's QP findings: dependent active constraints (finding 2) and QPLayer's sizes (finding 10).

Dependent active rows leave ``z`` unique with a kink in ``h``: reverse mode returns the gradient with the
minimum-norm multiplier sensitivity (docs/qp.md, "Dependent active constraints"), checked here against the
closed-form generalized gradient; the exact parts (``p``, ``Q``, directions that keep the rows consistent)
against finite differences; the undefined ones (a jvp that moves the rows apart, a cotangent on how ``λ``
is split) must raise ``SINGULAR``.
"""

import pytest
import torch
from torch.func import jvp

import implicitdiff as idf
from implicitdiff import InputError, SolveError
from implicitdiff._core.status import Status
from implicitdiff.nn import QPLayer

F64 = torch.float64
TOL = 1e-6  # the backward's residual check (QPSpec.backward_rtol): the singular K is solved to it, not to eps
I2 = torch.eye(2, dtype=F64)


def _t(*x):
    return torch.tensor(x, dtype=F64)


# G = [[1, 0], [1, 0]] (one row twice), h = [−2, −2], Q = I, p = [1, −1]: z = (min(h₁, h₂), 1), both rows active.
DUP = dict(G=_t([1.0, 0.0], [1.0, 0.0]), h=_t(-2.0, -2.0), p=_t(1.0, -1.0))
# three rows active at the vertex (−1, −1) in 2-D, p = 0
VERTEX = dict(G=_t([1.0, 0.0], [0.0, 1.0], [1.0, 1.0]), h=_t(-1.0, -1.0, -2.0), p=_t(0.0, 0.0))


def _grad_h(case):
    h = case["h"].clone().requires_grad_()
    return torch.autograd.grad(idf.qp(I2, case["p"], G=case["G"], h=h).sum(), h)[0]


def test_repeated_active_row_shares_the_gradient_equally():
    # sum z = min(h₁, h₂) + 1: the generalized gradient is {(t, 1 − t)}, its minimum-norm element (½, ½)
    torch.testing.assert_close(_grad_h(DUP), _t(0.5, 0.5), atol=TOL, rtol=0)


def test_three_active_rows_in_2d_give_the_minimum_norm_generalized_gradient(fd):
    # pieces: rows {1, 2} bind -> ∂(z₁+z₂)/∂h = (1, 1, 0); row 3 binds -> (0, 0, 1); the minimum-norm point of
    # the segment between them is t = 1/3
    g = _grad_h(VERTEX)
    torch.testing.assert_close(g, _t(1 / 3, 1 / 3, 2 / 3), atol=TOL, rtol=0)
    # along a direction that keeps all three rows active (v = G dz) the derivative exists and g gives it
    v = VERTEX["G"] @ _t(1.0, 0.0)
    want = fd.directional(lambda h: idf.qp(I2, VERTEX["p"], G=VERTEX["G"], h=h).sum(), [VERTEX["h"]], [v])
    torch.testing.assert_close(g @ v, want, atol=1e-7, rtol=0)


def test_dependent_rows_of_different_scale_are_split_in_the_equilibrated_problem():
    # rows (1, 0) and (2, 0) (scaled to the same row): pieces (1, 0) and (0, ½); returned: their average
    case = dict(G=_t([1.0, 0.0], [2.0, 0.0]), h=_t(-2.0, -4.0), p=_t(1.0, -1.0))
    torch.testing.assert_close(_grad_h(case), _t(0.5, 0.25), atol=TOL, rtol=0)


def test_dependent_rows_leave_the_p_and_q_gradients_exact(fd):
    Q = _t([2.0, 0.5], [0.5, 1.0])
    G, h = VERTEX["G"], VERTEX["h"]
    p = _t(0.3, -0.2)  # still all three rows active at (−1, −1)
    Qr, pr = Q.clone().requires_grad_(), p.clone().requires_grad_()
    z = idf.qp(Qr, pr, G=G, h=h)
    torch.testing.assert_close(z, _t(-1.0, -1.0), atol=1e-10, rtol=0)
    w = _t(1.0, 2.0)
    gQ, gp = torch.autograd.grad(z @ w, (Qr, pr))
    wQ, wp = fd.jacobian(lambda Q, p: idf.qp(Q, p, G=G, h=h) @ w, [Q, p])
    torch.testing.assert_close(gQ, wQ, atol=1e-7, rtol=0)
    torch.testing.assert_close(gp, wp, atol=1e-7, rtol=0)


def test_jvp_through_dependent_rows_exact_when_consistent_singular_otherwise(fd):
    G, h, p = DUP["G"], DUP["h"], DUP["p"]

    def f(h):
        return idf.qp(I2, p, G=G, h=h)

    v = _t(1.0, 1.0)  # both copies moved alike: z₁ = h moves with them
    _, dz = jvp(f, (h,), (v,))
    torch.testing.assert_close(dz, fd.directional(f, [h], [v]), atol=1e-7, rtol=0)
    with pytest.raises(SolveError, match="singular") as e:
        jvp(f, (h,), (_t(1.0, 0.0),))  # moves the copies apart: no derivative
    assert e.value.status == Status.SINGULAR


def test_a_cotangent_on_how_the_multipliers_are_split_raises_singular():
    h = DUP["h"].clone().requires_grad_()
    z, lam, nu = idf.qp(I2, DUP["p"], G=DUP["G"], h=h, return_duals=True)
    torch.testing.assert_close(lam.sum(), torch.tensor(1.0, dtype=F64), atol=1e-10, rtol=0)
    with pytest.raises(SolveError, match="singular") as e:
        torch.autograd.grad(lam[0], h, retain_graph=True)
    assert e.value.status == Status.SINGULAR
    # λ₁ + λ₂ = −(z₁ + p₁) = −(min(h) + 1) is defined up to the kink: the minimum-norm (−½, −½)
    torch.testing.assert_close(torch.autograd.grad(lam.sum(), h)[0], _t(-0.5, -0.5), atol=TOL, rtol=0)


# ------------------------------------------------------------------------------------------ QPLayer sizes
@pytest.mark.parametrize("kw, size, fix", [
    (dict(n=3, Q=I2), "n=3", "n=2"),
    (dict(n=2, p=_t(1.0, 2.0, 3.0)), "n=2", "n=3"),
    (dict(n=2, n_ineq=3, Q=I2, G=-I2, h=torch.zeros(2, dtype=F64)), "n_ineq=3", "n_ineq=2"),
    (dict(n=2, n_ineq=2, Q=I2, G=-I2, h=torch.zeros(3, dtype=F64)), "n_ineq=2", "n_ineq=3"),
    (dict(n=2, n_eq=1, Q=I2, A=I2, b=torch.zeros(2, dtype=F64)), "n_eq=1", "n_eq=2"),
    (dict(n=2, n_eq=1, Q=I2, A=_t([1.0, 1.0, 1.0]).reshape(1, 3), b=_t(1.0)), "n=2", "n=3"),
])
def test_qplayer_checks_its_sizes_against_the_constructor_tensors(kw, size, fix):
    with pytest.raises(InputError, match=size) as e:
        QPLayer(**kw)
    assert f"pass {fix}" in str(e.value)


def test_qplayer_checks_its_sizes_against_the_forward_tensors():
    layer = QPLayer(2, n_ineq=2, learn=("h",), Q=I2, G=-I2, h=torch.zeros(2, dtype=F64))
    with pytest.raises(InputError, match="n=2"):
        layer(p=_t(1.0, 2.0, 3.0))
    with pytest.raises(InputError, match="n_ineq=2"):
        layer(p=_t(1.0, -1.0), h=torch.zeros(3, dtype=F64))
    z = layer(p=_t(1.0, -1.0))
    torch.testing.assert_close(z, idf.qp(I2, _t(1.0, -1.0), G=-I2, h=torch.zeros(2, dtype=F64)))


def test_qplayer_with_declared_equalities_needs_a():
    layer = QPLayer(2, n_eq=1, Q=I2)
    with pytest.raises(InputError, match="n_eq=1.*no A"):
        layer(p=_t(1.0, -1.0))
    A, b = _t(1.0, 1.0).reshape(1, 2), _t(1.0)
    torch.testing.assert_close(layer(p=_t(1.0, -1.0), A=A, b=b), idf.qp(I2, _t(1.0, -1.0), A=A, b=b))


def test_qplayer_undeclared_row_counts_come_from_the_tensors():
    # n_ineq = n_eq = 0 (the default): G's and A's rows are whatever the tensors have, here and per call
    layer = QPLayer(2, Q=I2, G=-I2, h=torch.zeros(2, dtype=F64))
    G3, h3 = _t([-1.0, 0.0], [0.0, -1.0], [1.0, 1.0]), _t(0.0, 0.0, 1.0)
    p = _t(-2.0, -2.0)
    torch.testing.assert_close(layer(p=p, G=G3, h=h3), idf.qp(I2, p, G=G3, h=h3))
