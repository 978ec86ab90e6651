"""CvxpyLayer: the findings of probe 3 — parameter values that break their declared attribute, a batched
parameter that enters none of A, b, c, integer variables, the power-cone hint, quad_form / matrix_frac
of ``x - c`` with a parameter ``c``, and the autocast hint of the dtype errors."""

import numpy as np
import pytest
import torch

import implicitdiff as idf
from implicitdiff._core.errors import InputError
from implicitdiff.nn import CvxpyLayer, QPLayer

cp = pytest.importorskip("cvxpy")

F64 = torch.float64


def _cvxpy_refuses(param, value) -> bool:
    try:
        param.value = value
    except ValueError:
        return True
    finally:
        param.value = None
    return False


# ----------------------------------------------------------------------------- declared value attributes
def _sign_problem(attr):
    x = cp.Variable(2)
    q, c = cp.Parameter(2, name="q", **{attr: True}), cp.Parameter(2, name="c")
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x - c) + q @ x))
    return prob, q, [q, c], [x]


@pytest.mark.parametrize("attr, good, bad", [
    ("nonneg", [0.0, 1.0], [-1.0, 1.0]),
    ("pos", [0.5, 1.0], [1.0, -0.5]),
    ("nonpos", [0.0, -1.0], [-1.0, 1e-6]),
    ("neg", [-0.5, -1.0], [-1.0, 0.5]),
    ("integer", [2.0, -1.0], [0.5, 1.0]),
    ("boolean", [0.0, 1.0], [1.0, 2.0]),
])
def test_a_value_that_breaks_its_declared_sign_is_refused_as_cvxpy_refuses_it(attr, good, bad):
    prob, q, params, variables = _sign_problem(attr)
    assert _cvxpy_refuses(q, np.array(bad)) and not _cvxpy_refuses(q, np.array(good))
    layer = CvxpyLayer(prob, params, variables)
    c = torch.tensor([0.3, -0.2], dtype=F64)
    layer(torch.tensor(good, dtype=F64), c)
    with pytest.raises(InputError, match=rf"parameter 0 \(cvxpy Parameter 'q'\) is declared {attr}=True"):
        layer(torch.tensor(bad, dtype=F64), c)
    batch = torch.tensor([good, good, bad], dtype=F64)   # one bad element in a batch
    with pytest.raises(InputError, match=f"{attr}=True"):
        layer(batch, c)


def test_the_probe_case_a_negative_nonneg_parameter_no_longer_drops_the_constraint():
    # q·|x − 1| ≤ d with q = −1, d = −0.5 reads |x − 1| ≥ 0.5, which the canonical problem
    # (assuming q ≥ 0) drops: the layer returned x = 1 with SUCCESS
    x = cp.Variable()
    q, d = cp.Parameter(nonneg=True, name="q"), cp.Parameter(name="d")
    layer = CvxpyLayer(cp.Problem(cp.Minimize(cp.square(x - 1)), [q * cp.abs(x - 1) <= d]), [q, d], [x])
    with pytest.raises(InputError, match="'q'.*nonneg=True"):
        layer(torch.tensor(-1.0, dtype=F64), torch.tensor(-0.5, dtype=F64))


@pytest.mark.parametrize("attr, good, bad", [
    ("PSD", [[2.0, 0.5], [0.5, 1.0]], [[1.0, 0.0], [0.0, -1.0]]),
    ("NSD", [[-2.0, 0.5], [0.5, -1.0]], [[-1.0, 2.0], [2.0, -1.0]]),
])
def test_a_matrix_that_breaks_its_declared_definiteness_is_refused(attr, good, bad):
    X = cp.Variable((2, 2), symmetric=True)
    P = cp.Parameter((2, 2), name="P", **{attr: True})
    layer = CvxpyLayer(cp.Problem(cp.Minimize(cp.sum_squares(X - P)), [X >> 0]), [P], [X])
    assert _cvxpy_refuses(P, np.array(bad)) and not _cvxpy_refuses(P, np.array(good))
    (X_good,) = layer(torch.tensor(good, dtype=F64))
    assert X_good.shape == (2, 2)
    with pytest.raises(InputError, match=rf"'P'\) is declared {attr}=True"):
        layer(torch.tensor(bad, dtype=F64))
    with pytest.raises(InputError, match=f"{attr}=True"):
        layer(torch.tensor([good, bad], dtype=F64))


# ----------------------------------------------------------------------------- a batched parameter read by no block
def _constant_term_problem():
    x = cp.Variable(2)
    k, c = cp.Parameter(2, name="k"), cp.Parameter(2, name="c")   # k: a constant term of the objective only
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x - c) + cp.sum(k)), [x <= 1])
    return CvxpyLayer(prob, [k, c], [x], rtol=1e-10)


@pytest.mark.parametrize("batch", [1, 3])
def test_a_batched_parameter_read_by_no_block_keeps_its_zero_gradient(batch):
    layer = _constant_term_problem()
    k = torch.randn(batch, 2, dtype=F64, requires_grad=True)
    c = torch.tensor([0.4, 2.0], dtype=F64, requires_grad=True)
    (x,) = layer(k, c)
    assert x.shape == (batch, 2) and x.requires_grad
    w = torch.tensor([1.0, -2.0], dtype=F64)
    gk, gc = torch.autograd.grad((x @ w).sum(), (k, c))
    assert torch.equal(gk, torch.zeros_like(k))
    # x = min(c, 1): the closed form of the gradient with respect to c
    torch.testing.assert_close(x.detach(), torch.tensor([0.4, 1.0], dtype=F64).expand(batch, 2), atol=1e-7, rtol=0)
    torch.testing.assert_close(gc, batch * torch.tensor([1.0, 0.0], dtype=F64), atol=1e-6, rtol=0)
    # as unbatched: a zero gradient there too
    (x1,) = layer(k[0].detach().requires_grad_(), c)
    assert x1.requires_grad


def test_an_empty_batch_of_a_parameter_read_by_no_block():
    layer = _constant_term_problem()
    k = torch.zeros(0, 2, dtype=F64, requires_grad=True)
    (x,) = layer(k, torch.zeros(2, dtype=F64))
    assert x.shape == (0, 2)
    (gk,) = torch.autograd.grad(x.sum(), k)
    assert gk.shape == (0, 2)


# ----------------------------------------------------------------------------- refused problems and their hints
@pytest.mark.parametrize("kind", ["integer", "boolean"])
def test_integer_and_boolean_variables_are_refused_at_construction(kind):
    x = cp.Variable(3, **{kind: True}, name="z")
    c = cp.Parameter(3)
    with pytest.raises(InputError, match=r"integer or boolean variables \['z'\]"):
        CvxpyLayer(cp.Problem(cp.Minimize(cp.sum_squares(x - c))), [c], [x])


@pytest.mark.parametrize("atom", [lambda x: cp.sum(cp.power(x, 1.5, approx=False)),
                                  lambda x: cp.pnorm(x, 3, approx=False)])
def test_the_power_cone_hint_says_approx_true(atom):
    x, c = cp.Variable(3), cp.Parameter(3)
    prob = cp.Problem(cp.Minimize(atom(x) + c @ x), [x >= 0.1, x <= 2])
    with pytest.raises(InputError, match="approx=True"):
        CvxpyLayer(prob, [c], [x])
    # the hint's way out: the same atom with approx=True (cvxpy's default) is taken
    CvxpyLayer(cp.Problem(cp.Minimize(cp.pnorm(x, 3) + c @ x), [x >= 0.1, x <= 2]), [c], [x])


# ----------------------------------------------------------------------------- quad_form / matrix_frac of x − c
P_MAT = np.array([[2.0, 0.3], [0.3, 1.0]])


@pytest.mark.parametrize("atom", ["quad_form", "matrix_frac"])
def test_quadratic_atoms_of_an_affine_parameter_expression_match_cvxpy_and_finite_differences(atom):
    def problem(c):
        f = cp.quad_form(x - c, P_MAT) if atom == "quad_form" else cp.matrix_frac(x - c, P_MAT)
        return cp.Problem(cp.Minimize(f + cp.sum(x)), [x[0] >= 0.2 * x[1] - 0.5])

    x, c = cp.Variable(2), cp.Parameter(2)
    layer = CvxpyLayer(problem(c), [c], [x], rtol=1e-10)
    c0 = torch.tensor([-1.0, 2.0], dtype=F64)
    problem(c0.numpy()).solve(solver=cp.CLARABEL, tol_gap_abs=1e-11, tol_gap_rel=1e-11, tol_feas=1e-11)
    ct = c0.clone().requires_grad_()
    (xt,) = layer(ct)
    np.testing.assert_allclose(xt.detach().numpy(), x.value, atol=1e-6)
    w = torch.tensor([0.7, -1.3], dtype=F64)
    (g,) = torch.autograd.grad(xt @ w, ct)
    h = 1e-5
    fd = torch.stack([(layer(c0 + h * e)[0] @ w - layer(c0 - h * e)[0] @ w) / (2 * h) for e in torch.eye(2, dtype=F64)])
    torch.testing.assert_close(g, fd, atol=1e-5, rtol=1e-5)
    assert g.abs().max() > 0.1   # the constraint is active: a gradient that is not the trivial one


# ----------------------------------------------------------------------------- the autocast hint
def test_dtype_errors_under_autocast_name_the_way_out():
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    x, q, G = cp.Variable(3), cp.Parameter(3), cp.Parameter((2, 3))
    cvx = CvxpyLayer(cp.Problem(cp.Minimize(cp.sum_squares(x) + q @ x), [G @ x <= 1]), [q, G], [x])
    qp = QPLayer(3, n_ineq=2, learn=("Q", "G", "h"), dtype=torch.float32, generator=torch.Generator().manual_seed(0))
    inp, Gv = torch.randn(5, 4), torch.randn(2, 3)
    hint = r"torch\.autocast\('cpu', enabled=False\)"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(InputError, match=rf"parameter 0 has dtype torch\.bfloat16.*{hint}"):
            cvx(lin(inp), Gv)
        with pytest.raises(InputError, match=rf"p has dtype torch\.bfloat16.*{hint}"):
            qp(p=lin(inp))
        with torch.autocast("cpu", enabled=False):   # the way out the hint names, taken literally
            p = lin(inp)
            (sol,) = cvx(p, Gv)
            z = qp(p=p)
    assert sol.dtype == torch.float32 and z.dtype == torch.float32
    with pytest.raises(InputError, match="bfloat16") as err:   # outside autocast: no word of it
        cvx(torch.zeros(3, dtype=torch.bfloat16), Gv.bfloat16())
    assert "autocast" not in str(err.value)


def test_a_fixed_point_map_changed_by_autocast_names_the_way_out():
    W = torch.nn.Linear(16, 16)
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(InputError, match=r"T returned .*torch\.autocast\('cpu', enabled=False\)"):
            idf.fixed_point(lambda z, x: torch.tanh(0.3 * W(z) + x), torch.zeros(4, 16), x, batch_dims=1,
                            solver="anderson", rtol=1e-2)


def test_a_problem_cvxpy_cannot_reduce_gets_an_input_error_with_a_rewrite():
    x, g = cp.Variable(3), cp.Parameter(3)
    try:  # only where this cvxpy refuses the atom for SCS-type solvers (1.9 does)
        cp.Problem(cp.Minimize(cp.norm_inf(x - g))).get_problem_data(solver=cp.SCS)
        pytest.skip("this cvxpy reduces norm_inf(x - g) for SCS")
    except cp.error.SolverError:
        pass
    with pytest.raises(InputError, match=r"cp\.max\(cp\.abs\(v\)\)"):
        CvxpyLayer(cp.Problem(cp.Minimize(cp.norm_inf(x - g))), [g], [x])
    layer = CvxpyLayer(cp.Problem(cp.Minimize(cp.max(cp.abs(x - g)))), [g], [x])  # the rewrite the message names
    gv = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    (xv,) = layer(gv)
    torch.testing.assert_close(xv, gv, atol=1e-6, rtol=0)
