"""CvxpyLayer and its canonicalization: the affine map against cvxpy's own data, the recovery of the
variables, bad inputs, and (with cone_program) outputs and gradients against cvxpy + Clarabel, finite
differences and cvxpylayers."""

import math

import numpy as np
import pytest
import torch

from implicitdiff._core.errors import InputError
from implicitdiff.layers.cvxpy_layer import canonicalize

cp = pytest.importorskip("cvxpy")

F64 = torch.float64


# ----------------------------------------------------------------------------- problems
def readme_problem():
    """cvxpylayers' README example: an LP (ℓ1 fit with x ≥ 0)."""
    n, m = 2, 3
    x = cp.Variable(n)
    A, b = cp.Parameter((m, n)), cp.Parameter(m)
    prob = cp.Problem(cp.Minimize(0.5 * cp.pnorm(A @ x - b, p=1)), [x >= 0])
    return prob, [A, b], [x]


def socp_problem():
    """A small portfolio with a risk limit: a norm constraint (SOC) and a ridge (a quad-over-lin SOC)."""
    n, k = 5, 2
    w = cp.Variable(n)
    mu, F = cp.Parameter(n), cp.Parameter((n, k))
    prob = cp.Problem(cp.Minimize(-mu @ w + 0.5 * cp.sum_squares(w)),
                      [cp.sum(w) == 1, cp.norm(F.T @ w, 2) <= 0.3])
    return prob, [mu, F], [w]


def psd_problem():
    """Nearest matrix with unit trace in the PSD cone, a symmetric cost: a PSD variable, an SOC, an equality."""
    k = 3
    X = cp.Variable((k, k), PSD=True)
    y = cp.Variable(2)
    P, C, a = cp.Parameter((k, k)), cp.Parameter((k, k), symmetric=True), cp.Parameter(2)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(X - P) + cp.trace(C @ X) + cp.sum_squares(y - a)),
                      [cp.trace(X) == 1, y >= 0])
    return prob, [P, C, a], [X, y]


def exp_problem():
    """Entropy and log-sum-exp: maximize aᵀx + Σ entr(x) − ½ log_sum_exp(Gx) over the simplex."""
    n = 4
    x = cp.Variable(n)
    a, G = cp.Parameter(n), cp.Parameter((3, n))
    prob = cp.Problem(cp.Maximize(a @ x + cp.sum(cp.entr(x)) - 0.5 * cp.log_sum_exp(G @ x)), [cp.sum(x) == 1])
    return prob, [a, G], [x]


PROBLEMS = {"readme": readme_problem, "socp": socp_problem, "psd": psd_problem, "exp": exp_problem}


def random_values(params, batch=(), seed=0):
    g = np.random.default_rng(seed)
    out = []
    for p in params:
        v = g.standard_normal(batch + p.shape)
        if p.is_symmetric() and len(p.shape) == 2:
            v = 0.5 * (v + np.swapaxes(v, -1, -2))
        out.append(torch.tensor(v, dtype=F64))
    return out


def set_values(params, values, i=None):
    for p, v in zip(params, values):
        p.value = (v if i is None or v.dim() == len(p.shape) else v[i]).detach().numpy()


# ----------------------------------------------------------------------------- a reference cone solve
def clarabel_cone_solve(A, b, c, cones, tol=1e-9):
    """Solve ``min cᵀx s.t. Ax + s = b, s ∈ K`` (SCS convention) with Clarabel; returns x (numpy).

    Clarabel's PSD triangle is the upper triangle by columns, SCS's the lower triangle by columns:
    the same entries of a symmetric matrix in another order, so the rows of each PSD block are permuted."""
    clarabel = pytest.importorskip("clarabel")
    import scipy.sparse as sp

    A, b, c = (np.asarray(t, dtype=np.float64) for t in (A, b, c))
    perm = list(range(cones["z"] + cones["l"] + sum(cones["q"])))
    ks = []
    for k in cones["s"]:
        start = len(perm)
        lower = {(i, j): t for t, (i, j) in enumerate((i, j) for j in range(k) for i in range(j, k))}
        perm += [start + lower[(j, i)] for j in range(k) for i in range(j + 1)]  # upper (i, j) = lower (j, i)
        ks.append(k)
    perm += list(range(len(perm), A.shape[0]))
    A, b = A[perm], b[perm]
    K = []
    if cones["z"]:
        K.append(clarabel.ZeroConeT(cones["z"]))
    if cones["l"]:
        K.append(clarabel.NonnegativeConeT(cones["l"]))
    K += [clarabel.SecondOrderConeT(q) for q in cones["q"]]
    K += [clarabel.PSDTriangleConeT(k) for k in ks]
    K += [clarabel.ExponentialConeT() for _ in range(cones["ep"])]
    settings = clarabel.DefaultSettings()
    settings.verbose = False
    settings.tol_gap_abs = settings.tol_gap_rel = settings.tol_feas = tol
    settings.max_iter = 500
    n = A.shape[1]
    sol = clarabel.DefaultSolver(sp.csc_matrix((n, n)), c, sp.csc_matrix(A), b, K, settings).solve()
    assert str(sol.status) == "Solved", sol.status
    return np.asarray(sol.x)


def cvxpy_solution(prob, params, variables, values, i=None):
    """cvxpy + Clarabel at the tightest tolerance it reaches (1e-11, else 1e-10, else 1e-9)."""
    import warnings

    set_values(params, values, i)
    for tol in (1e-11, 1e-10, 1e-9):
        with warnings.catch_warnings():  # "solution may be inaccurate": then the next tolerance
            warnings.simplefilter("ignore")
            prob.solve(solver=cp.CLARABEL, tol_gap_abs=tol, tol_gap_rel=tol, tol_feas=tol, max_iter=500)
        if prob.status == "optimal":
            break
    assert prob.status == "optimal", prob.status
    return [np.asarray(v.value, dtype=np.float64) for v in variables]


# ----------------------------------------------------------------------------- the affine map
@pytest.mark.parametrize("name", list(PROBLEMS))
def test_map_equals_cvxpys_own_cone_data(name):
    prob, params, variables = PROBLEMS[name]()
    canon = canonicalize(prob, params, variables)
    values = random_values(params, batch=(3,))
    values[0] = values[0][0]  # one unbatched parameter: broadcast
    A, b, c, batch = canon.data(values)
    assert batch == (3,)
    for i in range(3):
        set_values(params, values, i)
        data, _, _ = prob.get_problem_data(solver=cp.SCS, solver_opts={"use_quad_obj": False})
        Ai = A if A.dim() == 2 else A[i]
        bi = b if b.dim() == 1 else b[i]
        ci = c if c.dim() == 1 else c[i]
        np.testing.assert_allclose(Ai.numpy(), data["A"].toarray(), atol=1e-13)
        np.testing.assert_allclose(bi.numpy(), data["b"], atol=1e-13)
        np.testing.assert_allclose(ci.numpy(), data["c"], atol=1e-13)


def test_map_broadcasts_what_depends_on_unbatched_parameters_only():
    prob, params, variables = socp_problem()  # mu enters c only, F enters A only
    canon = canonicalize(prob, params, variables)
    mu, F = random_values(params, batch=(4,))
    A, b, c, batch = canon.data([mu, F[0]])
    assert batch == (4,) and A.shape == (canon.m, canon.n) and b.shape == (canon.m,) and c.shape == (4, canon.n)
    A2, _, c2, _ = canon.data([mu[0], F])
    assert A2.shape == (4, canon.m, canon.n) and c2.shape == (canon.n,)


def test_map_gradient_is_its_transpose():
    prob, params, variables = psd_problem()
    canon = canonicalize(prob, params, variables)
    values = [v.requires_grad_() for v in random_values(params, batch=(2,))]
    assert torch.autograd.gradcheck(lambda *v: canon.data(v)[:3], values)


# ----------------------------------------------------------------------------- recovery of the variables
@pytest.mark.parametrize("name", list(PROBLEMS))
def test_variables_recovered_from_a_reference_cone_solve(name):
    prob, params, variables = PROBLEMS[name]()
    canon = canonicalize(prob, params, variables)
    values = random_values(params, seed=1)
    A, b, c, _ = canon.data(values)
    x = torch.as_tensor(clarabel_cone_solve(A, b, c, canon.cones))
    got = canon.variables(x)
    want = cvxpy_solution(prob, params, variables, values)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        # both solves stop on a duality gap of 1e-9, which leaves ~1e-5 in x; a wrong layout costs O(1)
        np.testing.assert_allclose(g.numpy(), w, atol=5e-5)


# ----------------------------------------------------------------------------- bad inputs
def test_non_dpp_problem_is_refused():
    x = cp.Variable(2)
    a, b = cp.Parameter(2), cp.Parameter(pos=True)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x - a * b)))  # a·b: a product of parameters
    with pytest.raises(InputError, match="DPP"):
        canonicalize(prob, [a, b], [x])


def test_parameters_and_variables_must_be_the_problems():
    prob, params, variables = readme_problem()
    with pytest.raises(InputError, match="exactly the problem's parameters"):
        canonicalize(prob, params[:1], variables)
    with pytest.raises(InputError, match="exactly the problem's parameters"):
        canonicalize(prob, params + [cp.Parameter(2)], variables)
    with pytest.raises(InputError, match="variables must be cvxpy.Variables of the problem"):
        canonicalize(prob, params, [cp.Variable(2)])
    with pytest.raises(InputError, match="list or tuple"):
        canonicalize(prob, params[0], variables)
    with pytest.raises(InputError, match="cvxpy.Problem"):
        canonicalize("min x", params, variables)


def test_power_cones_are_refused():
    x = cp.Variable(3, pos=True)
    a = cp.Parameter(3)
    prob = cp.Problem(cp.Minimize(a @ x), [cp.constraints.PowCone3D(x[0], x[1], x[2], 0.3), x <= 5])
    with pytest.raises(InputError, match="power"):
        canonicalize(prob, [a], [x])


def test_bad_parameter_tensors():
    prob, params, variables = readme_problem()
    canon = canonicalize(prob, params, variables)
    A, b = random_values(params, batch=(2,))
    with pytest.raises(InputError, match="takes 2 parameter tensors"):
        canon.data([A])
    with pytest.raises(InputError, match=r"parameter 1 has shape \(2, 4\)"):
        canon.data([A, torch.zeros(2, 4, dtype=F64)])
    with pytest.raises(InputError, match="batch size 3"):
        canon.data([A, torch.zeros(3, 3, dtype=F64)])
    with pytest.raises(InputError, match="dtype torch.int64"):
        canon.data([A, torch.zeros(3, dtype=torch.int64)])
    with pytest.raises(InputError, match="one dtype"):
        canon.data([A, b.float()])
    with pytest.raises(InputError, match="torch.Tensor"):
        canon.data([A, b.numpy()])


# ----------------------------------------------------------------------------- the nn.Module
def test_layer_keywords_that_do_not_apply_raise():
    from implicitdiff.nn import CvxpyLayer

    prob, params, variables = readme_problem()
    with pytest.raises(InputError, match="solver="):
        CvxpyLayer(prob, params, variables, solver=cp.SCS)
    with pytest.raises(InputError, match="gp=True"):
        CvxpyLayer(prob, params, variables, gp=True)
    with pytest.raises(InputError, match="verbose"):
        CvxpyLayer(prob, params, variables, verbose=True)
    with pytest.raises(InputError, match="max_iters"):
        CvxpyLayer(prob, params, variables, solver_args={"eps": 1e-8, "max_iters": 100})
    with pytest.raises(InputError, match="on_failure"):
        CvxpyLayer(prob, params, variables, on_failure="ignore")
    layer = CvxpyLayer(prob, params, variables, solver_args={"eps_abs": 1e-7, "eps_rel": 1e-9})
    assert layer.rtol == 1e-9
    with pytest.raises(InputError, match="eps"):
        layer(*random_values(params), solver_args={"eps": -1.0})
    with pytest.raises(InputError, match="warm_start"):
        layer(*random_values(params), warm_start=True)
    with pytest.raises(InputError, match="takes 2 parameter tensors"):
        layer(random_values(params)[0])


def test_layer_pipeline_with_a_reference_cone_solve(monkeypatch):
    """The module's plumbing (batch, broadcast, recovery, info) with a per-element Clarabel solve in place of
    cone_program (values only: the gradients are cone_program's, tested below when it is present)."""
    import implicitdiff.layers.cvxpy_layer as L
    from implicitdiff._core.status import SolveInfo
    from implicitdiff.nn import CvxpyLayer

    def reference(A, b, c, cones, *, rtol, on_failure, return_info):
        B = max(t.shape[0] if t.dim() == d else 1 for t, d in ((A, 3), (b, 2), (c, 2)))
        batched = A.dim() == 3 or b.dim() == 2 or c.dim() == 2
        A, b, c = (t.expand((B,) + t.shape[-k:]) if t.dim() == k else t for t, k in ((A, 2), (b, 1), (c, 1)))
        xs = [torch.as_tensor(clarabel_cone_solve(A[i], b[i], c[i], cones)) for i in range(B)]
        x = torch.stack(xs) if batched else xs[0]
        zeros = torch.zeros(x.shape[:-1], dtype=torch.int64)
        return x, None, None, SolveInfo(zeros, zeros.double(), zeros)

    monkeypatch.setattr(L, "cone_program", reference)
    prob, params, variables = psd_problem()
    layer = CvxpyLayer(prob, params, variables)
    values = random_values(params, batch=(2,), seed=3)
    values[1] = values[1][0]
    X, y = layer(*values)
    assert X.shape == (2, 3, 3) and y.shape == (2, 2) and layer.last_info.status.shape == (2,)
    for i in range(2):
        want = cvxpy_solution(prob, params, variables, values, i)
        np.testing.assert_allclose(X[i].numpy(), want[0], atol=5e-5)
        np.testing.assert_allclose(y[i].numpy(), want[1], atol=5e-5)
    X1, _ = layer(*[v if v.dim() == len(p.shape) else v[1] for v, p in zip(values, params)])
    assert X1.shape == (3, 3)
    np.testing.assert_allclose(X1.numpy(), X[1].numpy(), atol=1e-7)


def clarabel_cone_solve_dual(A, b, c, cones, tol=1e-9):
    """The dual y of the reference solve, in SCS's row order."""
    clarabel = pytest.importorskip("clarabel")
    import scipy.sparse as sp

    A, b, c = (np.asarray(t, dtype=np.float64) for t in (A, b, c))
    perm = list(range(cones["z"] + cones["l"] + sum(cones["q"])))
    for k in cones["s"]:
        start = len(perm)
        lower = {(i, j): t for t, (i, j) in enumerate((i, j) for j in range(k) for i in range(j, k))}
        perm += [start + lower[(j, i)] for j in range(k) for i in range(j + 1)]
    perm += list(range(len(perm), A.shape[0]))
    K = ([clarabel.ZeroConeT(cones["z"])] if cones["z"] else []) + \
        ([clarabel.NonnegativeConeT(cones["l"])] if cones["l"] else []) + \
        [clarabel.SecondOrderConeT(q) for q in cones["q"]] + [clarabel.PSDTriangleConeT(k) for k in cones["s"]] + \
        [clarabel.ExponentialConeT() for _ in range(cones["ep"])]
    settings = clarabel.DefaultSettings()
    settings.verbose = False
    settings.tol_gap_abs = settings.tol_gap_rel = settings.tol_feas = tol
    n = A.shape[1]
    sol = clarabel.DefaultSolver(sp.csc_matrix((n, n)), c, sp.csc_matrix(A[perm]), b[perm], K, settings).solve()
    y = np.empty(A.shape[0])
    y[perm] = np.asarray(sol.z)
    return np.asarray(sol.x), y


def dual_problem():
    """Constraints of every symmetric kind, their duals requested."""
    X = cp.Variable((3, 3), symmetric=True)
    x = cp.Variable(2)
    a, P = cp.Parameter(2), cp.Parameter((3, 3))
    cons = [X >> 0, cp.trace(X) == 1, x >= a, cp.sum(x) == 1]
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x) + cp.sum_squares(X - P)), cons)
    return prob, [a, P], [x, X] + [con.dual_variables[0] for con in cons], cons


def test_dual_variables_recovered_like_cvxpy():
    prob, params, variables, cons = dual_problem()
    canon = canonicalize(prob, params, variables)
    values = random_values(params, seed=4)
    values[0] = values[0] - 1.0  # x ≥ a active in some coordinates
    A, b, c, _ = canon.data(values)
    x, y = clarabel_cone_solve_dual(A, b, c, canon.cones)
    got = canon.variables(torch.as_tensor(x), torch.as_tensor(y))
    set_values(params, values)
    prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10)
    want = [v.value for v in variables[:2]] + [con.dual_value for con in cons]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.numpy(), np.asarray(w, dtype=np.float64).reshape(g.shape), atol=5e-5)
    with pytest.raises(InputError, match="dual solution y"):
        canon.variables(torch.as_tensor(x))


# ----------------------------------------------------------------------------- values and gradients (cone_program)


def _directions(params, values, seed):
    """A random direction per parameter tensor (symmetric parameters: symmetric directions), unit norm overall."""
    g = np.random.default_rng(seed)
    ds = []
    for p, v in zip(params, values):
        d = g.standard_normal(tuple(v.shape))
        if p.is_symmetric() and len(p.shape) == 2:
            d = 0.5 * (d + np.swapaxes(d, -1, -2))
        ds.append(torch.tensor(d, dtype=F64))
    norm = math.sqrt(sum(float(d.square().sum()) for d in ds))
    return [d / norm for d in ds]


def _cvxpy_loss(prob, params, variables, values, ws, batch):
    """``Σ_i Σ_v ⟨w_v[i], v_i⟩`` with each element solved by cvxpy + Clarabel at tight tolerance."""
    total = 0.0
    for i in range(batch[0] if batch else 1):
        sol = cvxpy_solution(prob, params, variables, values, i if batch else None)
        total += sum(float((torch.as_tensor(s) * (w[i] if batch else w)).sum()) for s, w in zip(sol, ws))
    return total


@pytest.mark.parametrize("batched", [False, True], ids=["unbatched", "batched"])
@pytest.mark.parametrize("name", list(PROBLEMS))
def test_values_and_gradients_match_cvxpy_and_finite_differences(name, batched):
    from implicitdiff.nn import CvxpyLayer

    prob, params, variables = PROBLEMS[name]()
    layer = CvxpyLayer(prob, params, variables, rtol=1e-10)
    batch = (2,) if batched else ()
    values = random_values(params, batch=batch, seed=5)
    if batched:
        values[0] = values[0][0]  # shared by the batch: its gradient is the sum over the batch
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(batch + v.shape, generator=g, dtype=F64) for v in variables]
    leaves = [v.clone().requires_grad_() for v in values]
    outs = layer(*leaves)
    for i in range(batch[0] if batch else 1):
        want = cvxpy_solution(prob, params, variables, values, i if batch else None)
        for o, w in zip(outs, want):
            np.testing.assert_allclose((o[i] if batch else o).detach().numpy(), w, atol=1e-6)
    grads = torch.autograd.grad(sum((o * w).sum() for o, w in zip(outs, ws)), leaves)

    def own_loss(vals):  # the layer's forward alone (no backward involved), at its tolerance 1e-10
        with torch.no_grad():
            return float(sum((o * w).sum() for o, w in zip(layer(*vals), ws)))

    for seed in range(2):
        d = _directions(params, values, seed)
        dd = sum(float((gr * t).sum()) for gr, t in zip(grads, d))
        plus, minus = [v + 1e-5 * t for v, t in zip(values, d)], [v - 1e-5 * t for v, t in zip(values, d)]
        fd_own = (own_loss(plus) - own_loss(minus)) / 2e-5
        assert abs(dd - fd_own) <= 1e-6 * max(1.0, abs(fd_own)), (dd, fd_own)
        # independent, but only as accurate as Clarabel's solutions: 1e-7 … 1e-8 at tolerance 1e-11 on the
        # symmetric cones (the quotient at h = 1e-4 resolves ~1e-5 of the derivative), ~1e-6 on exponential
        # cones (h = 1e-2: truncation ~1e-4 rather than noise ~1e-2)
        h, tol = (1e-2, 1e-3) if name == "exp" else (1e-4, 1e-4)
        fd = (_cvxpy_loss(prob, params, variables, [v + h * t for v, t in zip(values, d)], ws, batch)
              - _cvxpy_loss(prob, params, variables, [v - h * t for v, t in zip(values, d)], ws, batch)) / (2 * h)
        assert abs(dd - fd) <= tol * max(1.0, abs(fd)), (dd, fd)


@pytest.mark.parametrize("batched", [False, True], ids=["unbatched", "batched"])
@pytest.mark.parametrize("name", ["readme", "psd", "exp"])
def test_same_outputs_and_gradients_as_cvxpylayers(name, batched):
    """cvxpylayers (diffcp) with Clarabel's forward at tolerance 1e-10, on the cone form cvxpy gives it: its
    solutions are accurate to ~1e-6 there (ours agree with cvxpy + Clarabel's QP form to 1e-6 above), so the
    comparison is at that accuracy."""
    import warnings

    theirs_mod = pytest.importorskip("cvxpylayers.torch")
    from implicitdiff.nn import CvxpyLayer

    prob, params, variables = PROBLEMS[name]()
    ours = CvxpyLayer(prob, params, variables, rtol=1e-10)
    prob2, params2, variables2 = PROBLEMS[name]()
    theirs = theirs_mod.CvxpyLayer(prob2, parameters=params2, variables=variables2)
    batch = (3,) if batched else ()
    values = random_values(params, batch=batch, seed=6)
    g = torch.Generator().manual_seed(1)
    ws = [torch.randn(batch + v.shape, generator=g, dtype=F64) for v in variables]

    def run(layer, **kw):
        leaves = [v.clone().requires_grad_() for v in values]
        outs = layer(*leaves, **kw)
        return outs, torch.autograd.grad(sum((o * w).sum() for o, w in zip(outs, ws)), leaves)

    o1, g1 = run(ours)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        o2, g2 = run(theirs, solver_args={"solve_method": "Clarabel", "tol_gap_abs": 1e-10, "tol_gap_rel": 1e-10,
                                          "tol_feas": 1e-10, "n_jobs_forward": 1, "n_jobs_backward": 1})
    for a, b in zip(o1, o2):
        assert a.shape == b.shape
        np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), atol=2e-5)
    for a, b in zip(g1, g2):
        assert a.shape == b.shape
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-4 * max(1.0, float(b.abs().max())))


def test_batch_equals_its_elements_and_float32_follows_float64():
    from implicitdiff.nn import CvxpyLayer

    prob, params, variables = psd_problem()
    layer = CvxpyLayer(prob, params, variables)
    values = random_values(params, batch=(3,), seed=7)
    values[1] = values[1][0]
    X, y = layer(*values)
    for i in range(3):
        Xi, yi = layer(*[v[i] if v.dim() > len(p.shape) else v for v, p in zip(values, params)])
        assert torch.allclose(Xi, X[i], atol=1e-7) and torch.allclose(yi, y[i], atol=1e-7)
    X32, y32 = layer(*[v.float() for v in values])
    assert X32.dtype == torch.float32 and layer.last_info.residual.dtype == torch.float32
    assert torch.allclose(X32.double(), X, atol=1e-3) and torch.allclose(y32.double(), y, atol=1e-3)


def test_an_infeasible_element_is_named_and_the_others_kept():
    from implicitdiff import SolveError, Status
    from implicitdiff.nn import CvxpyLayer

    x = cp.Variable(2)
    lo = cp.Parameter(2)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x)), [x >= lo, cp.sum(x) <= 1])
    bounds = torch.tensor([[0.1, 0.2], [0.8, 0.9]], dtype=F64)  # the second: x ≥ lo and Σx ≤ 1 cannot hold
    with pytest.raises(SolveError, match="INFEASIBLE"):
        CvxpyLayer(prob, [lo], [x])(bounds)
    layer = CvxpyLayer(prob, [lo], [x], on_failure="nan")
    (sol,) = layer(bounds)
    assert layer.last_info.status.tolist() == [Status.SUCCESS, Status.INFEASIBLE]
    assert torch.allclose(sol[0], bounds[0], atol=1e-7) and bool(torch.isnan(sol[1]).all())


# ----------------------------------------------------------------------------- transforms through the layer
@pytest.mark.parametrize("name", ["socp", "psd"])
def test_vmap_and_jacrev_through_the_layer_equal_the_batched_call(name):
    from implicitdiff.nn import CvxpyLayer

    prob, params, variables = PROBLEMS[name]()
    layer = CvxpyLayer(prob, params, variables, rtol=1e-10)
    values = random_values(params, batch=(3,), seed=8)
    rest = [v[0] for v in values[1:]]  # vmapped over the first parameter only, the others shared
    batched = layer(values[0], *rest)
    mapped = torch.func.vmap(lambda p0: layer(p0, *rest))(values[0])
    for a, b in zip(mapped, batched):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-10)

    # jacrev of one element's first variable w.r.t. every parameter, against rows of autograd's Jacobian
    def first(*ps):
        return layer(*ps)[0]

    args = [values[0][0]] + rest
    J = torch.func.jacrev(first, argnums=tuple(range(len(args))))(*args)
    leaves = [a.clone().requires_grad_() for a in args]
    out = first(*leaves).reshape(-1)
    for k in range(out.numel()):
        rows = torch.autograd.grad(out[k], leaves, retain_graph=True, allow_unused=True)
        for Jp, r in zip(J, rows):
            r = torch.zeros_like(Jp.reshape(out.numel(), -1)[k]) if r is None else r.reshape(-1)
            assert torch.allclose(Jp.reshape(out.numel(), -1)[k], r, atol=1e-10)


def test_layer_is_twice_differentiable():
    from implicitdiff.nn import CvxpyLayer

    prob, params, variables = socp_problem()
    layer = CvxpyLayer(prob, params, variables, rtol=1e-10)
    mu, F = random_values(params, seed=9)
    w = torch.randn(5, generator=torch.Generator().manual_seed(2), dtype=F64)
    d = torch.randn(5, generator=torch.Generator().manual_seed(3), dtype=F64)

    def grad_mu(mu_):
        mu_ = mu_.clone().requires_grad_()
        (g,) = torch.autograd.grad((layer(mu_, F)[0] * w).sum(), mu_, create_graph=True)
        return g

    mur = mu.clone().requires_grad_()
    (hvp,) = torch.autograd.grad((grad_mu(mur) * d).sum(), mur)
    h = 1e-4
    fd = (grad_mu(mu + h * d) - grad_mu(mu - h * d)).detach() / (2 * h)
    assert torch.allclose(hvp, fd, atol=1e-6 * max(1.0, float(fd.abs().max()))), (hvp, fd)
    assert float(fd.abs().max()) > 1e-3  # a curved solution map: the test is not vacuous
