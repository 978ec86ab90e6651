"""cone_program on badly scaled data (A, b or c far from unit size): the same solution as the unit-scale
problem mapped by the solution map's covariance, per batch element, with its statuses, certificates and
gradients (layers/cone_program.py, "Scaling").

Scaling ``(A, b, c)`` to ``(αA, βb, γc)`` maps the solution ``(x, y, s)`` to ``((β/α)x, (γ/α)y, βs)``."""

import pytest
import torch

import implicitdiff as idf
from implicitdiff import SolveError, Status

from layers._cone_cases import CASES, case
from layers.test_cone_program import _infeasible_and_unbounded  # infeasible, unbounded, x = 1

pytest.importorskip("clarabel")

# per dtype: the scale of "tiny" data (float32: ‖c‖ ≈ 1e-5, the size of its former default rtol) and the
# accuracy asked of the scaled solve, relative to each vector's size (the unit problem reaches ~1e-7 / 1e-9)
TINY = {torch.float32: 1e-5, torch.float64: 1e-10}
TOL = {torch.float32: 1e-4, torch.float64: 1e-6}


def _reference(name):
    """The unit-scale problem and its solution (float64, tight rtol; checked against Clarabel elsewhere)."""
    A, b, c, cones = case(name, 0)
    return (A, b, c, cones), idf.cone_program(A, b, c, cones, rtol=1e-10)


def _close(got, want, tol):
    err = float((got.double() - want).abs().max())
    return err <= tol * float(want.abs().max()), err


def _check_covariant(got, ref, alpha, beta, gamma, tol):
    for label, g, r in zip("xys", got, ref):
        r = r * {"x": beta / alpha, "y": gamma / alpha, "s": beta}[label]
        ok, err = _close(g, r, tol)
        assert ok, (label, err, float(r.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("which, up", [("A", False), ("A", True), ("b", False), ("b", True), ("c", False),
                                       ("c", True)], ids=["A_tiny", "A_huge", "b_tiny", "b_huge", "c_tiny", "c_huge"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_scaled_data_gives_the_covariant_solution(name, which, up, dtype):
    (A, b, c, cones), ref = _reference(name)
    f = 1e-4 if which == "A" else TINY[dtype]
    f = 1 / f if up else f
    alpha, beta, gamma = (f if which == w else 1.0 for w in "Abc")
    x, y, s, info = idf.cone_program((alpha * A).to(dtype), (beta * b).to(dtype), (gamma * c).to(dtype), cones,
                                     return_info=True)
    assert int(info.status) == Status.SUCCESS and x.dtype == dtype
    _check_covariant((x, y, s), ref, alpha, beta, gamma, TOL[dtype])


@pytest.mark.parametrize("batched_A", [False, True], ids=["shared_A", "batched_A"])
def test_each_batch_element_has_its_own_scale(batched_A):
    (A, b, c, cones), ref = _reference("socp")
    scales = [(1.0, 1.0, 1.0), (1.0, 1.0, 1e-9), (1.0, 1e-9, 1e9), (1.0, 1e8, 1.0)]
    if batched_A:
        scales += [(1e-5, 1.0, 1.0), (1e5, 1e-3, 1e3)]
    al, be, ga = (torch.tensor(t, dtype=torch.float64) for t in zip(*scales))
    Ab = al[:, None, None] * A if batched_A else A
    x, y, s, info = idf.cone_program(Ab, be[:, None] * b, ga[:, None] * c, cones, return_info=True)
    assert (info.status == Status.SUCCESS).all()
    for i, (a_, b_, g_) in enumerate(scales):
        _check_covariant((x[i], y[i], s[i]), ref, a_, b_, g_, TOL[torch.float64])


@pytest.mark.parametrize("alpha, beta, gamma", [(1.0, 1e-9, 1e-9), (1e4, 1e9, 1e-9), (1e-4, 1e-9, 1e9)])
def test_certificates_survive_scaling(alpha, beta, gamma):
    A, b, c, cones = _infeasible_and_unbounded()
    x, y, s, info = idf.cone_program(alpha * A, beta * b, gamma * c, cones, on_failure="nan", return_info=True)
    assert info.status.tolist() == [Status.INFEASIBLE, Status.UNBOUNDED, Status.SUCCESS]
    assert abs(float(x[2, 0]) - beta / alpha) <= 1e-8 * beta / alpha


def test_zero_b_or_c_elements():
    """An all-zero ``b`` or ``c`` has no scale (1 is used): ``c = 0`` is a feasibility problem (``y = 0``),
    ``b = 0`` here leaves only ``x = 0`` (its bounds ``|x| ≤ 3 + |x₀|`` become ``|x| ≤ 0``)."""
    A, b, c, cones = case("lp", 0)
    bb = torch.stack([b, torch.zeros_like(b)])
    cc = torch.stack([torch.zeros_like(c), 1e-9 * c])
    x, y, s, info = idf.cone_program(A, bb, cc, cones, return_info=True)
    assert (info.status == Status.SUCCESS).all()
    assert float(y[0].abs().max()) <= 1e-8 and float(s[0].min()) >= -1e-10
    assert torch.allclose(A @ x[0] + s[0], b, atol=1e-8)
    assert float(x[1].abs().max()) <= 1e-8 and float(s[1].abs().max()) <= 1e-8
    assert torch.allclose(A.T @ y[1] + cc[1], torch.zeros_like(c), atol=1e-15)


def test_an_unreachable_tolerance_is_reported_not_success():
    """Tiny ``c`` and ``rtol`` below float64's reach on a curved cone: a failure with its residual."""
    A, b, c, cones = case("socp", 0)
    x, y, s, info = idf.cone_program(A, b, 1e-10 * c, cones, rtol=1e-15, on_failure="nan", return_info=True)
    assert int(info.status) in (Status.BREAKDOWN, Status.MAX_ITERATIONS)
    assert 1e-15 < float(info.residual) < 1e-6 and torch.isnan(x).all()
    with pytest.raises(SolveError, match="residual"):
        idf.cone_program(A, b, 1e-10 * c, cones, rtol=1e-15)


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradients_of_a_scaled_problem_match_finite_differences(name):
    A, b, c, cones = case(name, 0)
    alpha, beta, gamma = 1e3, 1e-4, 1e-7
    A, b, c = alpha * A, beta * b, gamma * c
    g = torch.Generator().manual_seed(1)
    # weights and directions of each output's / input's own size, so that every term counts
    w = [torch.randn(k, generator=g, dtype=torch.float64) / f
         for k, f in ((A.shape[1], beta / alpha), (A.shape[0], gamma / alpha), (A.shape[0], beta))]
    d = [torch.randn(t.shape, generator=g, dtype=torch.float64) * f for t, f in ((A, alpha), (b, beta), (c, gamma))]
    d[0] = d[0] * (A != 0)  # keep the structure

    def loss(A_, b_, c_):
        x, y, s = idf.cone_program(A_, b_, c_, cones, rtol=1e-10)
        return sum((wi * t).sum() for wi, t in zip(w, (x, y, s)))

    Ar, br, cr = (t.clone().requires_grad_() for t in (A, b, c))
    grads = torch.autograd.grad(loss(Ar, br, cr), (Ar, br, cr))
    an = float(sum((gi * di).sum() for gi, di in zip(grads, d)))
    h = 1e-5
    fd = float(loss(A + h * d[0], b + h * d[1], c + h * d[2]) - loss(A - h * d[0], b - h * d[1], c - h * d[2])) / (2 * h)
    assert abs(an - fd) <= 1e-7 * max(1.0, abs(fd)), (an, fd)
    # forward mode agrees: <w, J d> = <Jᵀw, d>
    _, jvp = torch.func.jvp(loss, (A, b, c), tuple(d))
    assert abs(float(jvp) - an) <= 1e-9 * max(1.0, abs(an)), (float(jvp), an)


# rows of very different sizes: a budget Σx ≤ g beside the constant 1 of each exponential cone (as cvxpy
# writes log x_i); normalizing b by ‖b‖∞ shrank those 1s to 1/g and gave x 4e-4 off with SUCCESS at g = 1e5
def _log_budget(g, k=4):
    n, m = 2 * k, 1 + 3 * k
    A, b = torch.zeros(m, n, dtype=torch.float64), torch.zeros(m, dtype=torch.float64)
    A[0, :k], b[0] = 1.0, g
    for i in range(k):  # (t_i, 1, x_i) in K_exp: t_i ≤ log x_i
        A[1 + 3 * i, k + i], b[2 + 3 * i], A[3 + 3 * i, i] = -1.0, 1.0, -1.0
    c = torch.cat([torch.zeros(k, dtype=torch.float64), -torch.ones(k, dtype=torch.float64)])
    return A, b, c, {"l": 1, "ep": k}


@pytest.mark.parametrize("g", [1e5, 1e6, 1e8])
def test_a_large_row_beside_unit_rows_keeps_the_small_rows_accurate(g):
    A, b, c, cones = _log_budget(g)
    x, _, _, info = idf.cone_program(A, b, c, cones, return_info=True)
    assert int(info.status) == 0
    assert abs(float(x[0]) / (g / 4) - 1) < 1e-6  # max Σ log x_i s.t. Σ x_i ≤ g: x_i = g/4


def test_a_solution_that_overflows_float32_is_not_success():
    A = torch.tensor([[3e-30], [-3e-30], [0.0]])
    b, c = torch.full((3,), 1e30), torch.tensor([1e-30])
    _, _, _, info = idf.cone_program(A, b, c, {"l": 3}, on_failure="nan", return_info=True)
    assert int(info.status) != 0
