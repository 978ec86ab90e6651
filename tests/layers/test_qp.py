"""``qp``: solutions against cvxpy, gradients against finite differences and an active-set
oracle, failures, batching/broadcasting, and torch.func transforms (float64 unless stated)."""

import numpy as np
import pytest
import torch
from torch.func import jacfwd, jacrev, jvp, vmap

from implicitdiff._core.errors import InputError, SolveError
from implicitdiff._core.status import Status
from implicitdiff.layers.qp import qp

F64 = torch.float64
NAMES = ("Q", "p", "G", "h", "A", "b")


# --------------------------------------------------------------------------- problems
def problem(g, n=5, m=4, k=2, *, batch=(), lp=False, dtype=F64):
    """A random feasible, bounded QP; roughly half of the inequalities active at the solution."""
    def r(*s):
        return torch.randn(*s, generator=g, dtype=F64)
    if lp:
        Q = torch.zeros(*batch, n, n, dtype=F64)
        # a box keeps the LP bounded; more rows than n make vertices generic
        G = torch.cat([torch.eye(n, dtype=F64), -torch.eye(n, dtype=F64), r(*batch, m, n)], dim=-2) \
            if not batch else torch.cat([torch.eye(n, dtype=F64).expand(*batch, n, n),
                                         -torch.eye(n, dtype=F64).expand(*batch, n, n), r(*batch, m, n)], dim=-2)
        z0 = 0.3 * r(*batch, n)
        h = (G @ z0.unsqueeze(-1)).squeeze(-1) + 0.5 + torch.rand(*batch, G.shape[-2], generator=g, dtype=F64)
    else:
        L = r(*batch, n, n)
        Q = L @ L.mT / n + 0.3 * torch.eye(n, dtype=F64)
        G = r(*batch, m, n)
        z0 = r(*batch, n)
        slack = torch.rand(*batch, m, generator=g, dtype=F64) * (torch.rand(*batch, m, generator=g) > 0.5)
        h = (G @ z0.unsqueeze(-1)).squeeze(-1) + slack
    p = r(*batch, n)
    A = r(*batch, k, n)
    b = (A @ z0.unsqueeze(-1)).squeeze(-1)
    return tuple(t.to(dtype) for t in (Q, p, G, h, A, b))


def cvx(Q, p, G=None, h=None, A=None, b=None):
    """A tight cvxpy (Clarabel) reference for one unbatched problem: ``(z, λ, ν)`` as numpy."""
    cp = pytest.importorskip("cvxpy")
    n = p.shape[-1]
    z = cp.Variable(n)
    Qn = 0.5 * (Q.numpy() + Q.numpy().T)
    obj = 0.5 * cp.quad_form(z, cp.psd_wrap(Qn)) + p.numpy() @ z
    cons = []
    if G is not None:
        cons.append(G.numpy() @ z <= h.numpy())
    if A is not None:
        cons.append(A.numpy() @ z == b.numpy())
    prob = cp.Problem(cp.Minimize(obj), cons)
    prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12, max_iter=200)
    assert prob.status == "optimal"
    lam = cons[0].dual_value if G is not None else np.zeros(0)
    nu = cons[-1].dual_value if A is not None else np.zeros(0)
    return z.value, lam, nu


def active_set_grads(Q, p, G, h, A, b, z, lam, nu, zbar, tol=1e-7):
    """Independent oracle: the exact gradient on the active set {λᵢ > tol}, by a dense numpy solve of the
    reduced KKT system [[Q, Cᵀ], [C, 0]] with C = [G_𝒜; A]."""
    Q, G, A = (t.numpy() for t in (Q, G, A))
    act = lam > tol
    C = np.concatenate([G[act], A])
    n, r = Q.shape[0], C.shape[0]
    K = np.block([[0.5 * (Q + Q.T), C.T], [C, np.zeros((r, r))]])
    u = np.linalg.solve(K, np.concatenate([zbar, np.zeros(r)]))
    uz, uc = u[:n], u[n:]
    mu = np.concatenate([lam[act], nu])
    gC = -(np.outer(uc, z) + np.outer(mu, uz))
    gG = np.zeros_like(G)
    gG[act] = gC[: act.sum()]
    gh = np.zeros(G.shape[0])
    gh[act] = uc[: act.sum()]
    return dict(Q=-0.5 * (np.outer(uz, z) + np.outer(z, uz)), p=-uz, G=gG, h=gh, A=gC[act.sum():], b=uc[act.sum():])


def grads_of(fn, params, w):
    params = [t.clone().requires_grad_() for t in params]
    (fn(*params) * w).sum().backward()
    return [t.grad for t in params]


# --------------------------------------------------------------------------- solutions vs cvxpy
@pytest.mark.parametrize("kind", ["ineq", "eq", "mixed", "lp", "lp_eq", "unconstrained"])
def test_solution_matches_cvxpy(g, kind):
    Q, p, G, h, A, b = problem(g, n=6, m=5, k=2, lp=kind.startswith("lp"))
    if kind in ("ineq", "lp"):
        A = b = None
    if kind in ("eq", "unconstrained"):
        G = h = None
    if kind == "unconstrained":
        A = b = None
    z, lam, nu, info = qp(Q, p, G, h, A, b, return_duals=True, return_info=True)
    zr, lr, nr = cvx(Q, p, G, h, A, b)
    assert int(info.status) == Status.SUCCESS
    np.testing.assert_allclose(z.numpy(), zr, atol=1e-7, rtol=1e-7)
    np.testing.assert_allclose(lam.numpy(), np.asarray(lr).reshape(-1), atol=1e-6)
    np.testing.assert_allclose(nu.numpy(), np.asarray(nr).reshape(-1), atol=1e-6)
    if kind in ("eq", "unconstrained"):
        assert int(info.iterations) == 0  # a direct KKT solve


def test_batched_solution_matches_cvxpy(g):
    Q, p, G, h, A, b = problem(g, n=5, m=6, k=1, batch=(4,))
    z = qp(Q, p, G, h, A, b)
    assert z.shape == (4, 5)
    for i in range(4):
        np.testing.assert_allclose(z[i].numpy(), cvx(Q[i], p[i], G[i], h[i], A[i], b[i])[0], atol=1e-7)


# --------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("kind", ["ineq", "eq", "mixed", "lp"])
def test_gradients_match_finite_differences(g, fd, kind):
    params = list(problem(g, n=4, m=4, k=1, lp=kind == "lp"))
    if kind in ("ineq", "lp"):
        params[4:] = [None, None]
    if kind == "eq":
        params[2:4] = [None, None]
    idx = [i for i, t in enumerate(params) if t is not None and not (kind == "lp" and i == 0)]
    w = torch.randn(4, generator=g, dtype=F64)

    def f(*ts):
        full = list(params)
        for i, t in zip(idx, ts):
            full[i] = t
        return qp(*full) @ w

    got = grads_of(lambda *ts: f(*ts), [params[i] for i in idx], torch.ones((), dtype=F64))
    want = fd.jacobian(f, [params[i] for i in idx], eps=1e-6)
    for i, a, e in zip(idx, got, want):
        torch.testing.assert_close(a, e, atol=2e-7, rtol=1e-6, msg=f"gradient of {NAMES[i]}")


def test_gradients_match_active_set_oracle(g):
    """Exact KKT gradient on the active set (an independent dense solve from the cvxpy solution)."""
    Q, p, G, h, A, b = problem(g, n=6, m=6, k=2)
    zbar = torch.randn(6, generator=g, dtype=F64)
    got = grads_of(qp, (Q, p, G, h, A, b), zbar)
    zr, lr, nr = cvx(Q, p, G, h, A, b)
    want = active_set_grads(Q, p, G, h, A, b, zr, lr, nr, zbar.numpy())
    for name, gr in zip(NAMES, got):
        np.testing.assert_allclose(gr.numpy(), want[name], atol=1e-6, err_msg=name)


def test_weakly_active_constraint_gives_one_sided_derivative():
    """min ½‖z − a‖² s.t. z₁ ≤ 1 at a = (1, 2): the constraint is weakly active (λ = 0 = slack).  The
    gradient is the derivative of the branch that relaxes it (here the identity), not a barrier blend."""
    a = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    I = torch.eye(2, dtype=F64)
    G, h = torch.tensor([[1.0, 0.0]], dtype=F64), torch.ones(1, dtype=F64)
    z = qp(I, -a, G, h)
    torch.testing.assert_close(z.detach(), torch.tensor([1.0, 2.0], dtype=F64), atol=1e-9, rtol=0)
    J = torch.stack([torch.autograd.grad(z[i], a, retain_graph=True)[0] for i in range(2)])
    eps = 1e-6  # the left derivative in a₁ (the constraint relaxes)
    left = (qp(I, -a.detach(), G, h) - qp(I, -(a.detach() - torch.tensor([eps, 0.0], dtype=F64)), G, h)) / eps
    torch.testing.assert_close(J[:, 0], left, atol=1e-7, rtol=0)
    torch.testing.assert_close(J, I, atol=1e-9, rtol=0)


def test_strongly_active_constraint_gradient_is_exact():
    """At a = (2, 2) the constraint binds (λ = 1): dz₁/da₁ = 0 exactly (an interior-point blend is not)."""
    a = torch.tensor([2.0, 2.0], dtype=F64, requires_grad=True)
    z = qp(torch.eye(2, dtype=F64), -a, torch.tensor([[1.0, 0.0]], dtype=F64), torch.ones(1, dtype=F64))
    (ga,) = torch.autograd.grad(z[0], a)
    assert ga.abs().max() < 1e-12


def test_shared_parameters_get_summed_gradients(g):
    """Q, G, A shared (no batch dim) across a batch of p, h, b: their gradient is the sum of per-element ones."""
    Q, p, G, h, A, b = problem(g, n=4, m=5, k=1, batch=(3,))
    Q, G, A = Q[0], G[0], A[0]
    z0 = torch.randn(3, 4, generator=g, dtype=F64)
    h = (z0 @ G.T) + 0.3 * torch.rand(3, 5, generator=g, dtype=F64)
    b = z0 @ A.T
    w = torch.randn(3, 4, generator=g, dtype=F64)
    got = grads_of(qp, (Q, p, G, h, A, b), w)
    per = [grads_of(qp, (Q, p[i], G, h[i], A, b[i]), w[i]) for i in range(3)]
    for j, name in enumerate(NAMES):
        want = sum(pe[j] for pe in per) if name in ("Q", "G", "A") else torch.stack([pe[j] for pe in per])
        torch.testing.assert_close(got[j], want, atol=1e-9, rtol=1e-9, msg=name)



def test_shared_q_with_batched_vectors_forward_and_reverse_modes_of_the_duals_at_a_far_scale(g, fd):
    """A shared Q, G, A (one scale σ_Q, per-row d_G, d_A) with batched p, h, b (per-element σ): z, λ and ν
    by reverse and forward mode against finite differences, data far from unit scale."""
    Q, p, G, h, A, b = problem(g, n=4, m=5, k=1, batch=(3,))
    Q, G, A = 40.0 * Q[0], 1e-2 * G[0], 7.0 * A[0]
    z0 = torch.randn(3, 4, generator=g, dtype=F64)
    h = (z0 @ G.T) + 3e-3 * torch.rand(3, 5, generator=g, dtype=F64)
    b = z0 @ A.T
    p = 25.0 * p
    args = (Q, p, G, h, A, b)
    f = lambda *P: torch.cat(qp(*P, return_duals=True), -1)  # noqa: E731
    want = fd.jacobian(f, list(args))
    rev = jacrev(f, argnums=tuple(range(6)))(*args)
    fwd = jacfwd(f, argnums=tuple(range(6)))(*args)
    for name, w, r, fw in zip(NAMES, want, rev, fwd):  # entries span 1e-7 … 5e5: relative to the largest
        scale = w.abs().max()
        assert (r - w).abs().max() <= 1e-7 * scale, name
        assert (fw - w).abs().max() <= 1e-7 * scale, name


# --------------------------------------------------------------------------- transforms
def test_vmap_matches_batched_and_jacrev_matches_jacfwd_and_fd(g, fd):
    Q, p, G, h, A, b = problem(g, n=4, m=4, k=1, batch=(3,))
    f = lambda p_: qp(Q[0], p_, G[0], h[0], A[0], b[0])  # noqa: E731
    zs = vmap(f)(p)
    torch.testing.assert_close(zs, qp(Q[0], p, G[0], h[0], A[0], b[0]), atol=0, rtol=0)
    J = jacrev(f)(p[0])
    torch.testing.assert_close(J, jacfwd(f)(p[0]), atol=1e-10, rtol=0)
    torch.testing.assert_close(J, fd.jacobian(f, [p[0]])[0], atol=1e-7, rtol=0)
    # per-element Jacobians of every parameter at once: vmap over jacrev
    # (each (G[i], h[i]) is feasible on its own; the equalities of element 0 are left out)
    Jv = vmap(jacrev(lambda G_, h_: qp(Q[0], p[0], G_, h_), argnums=(0, 1)))(G, h)
    for i in range(3):
        want = fd.jacobian(lambda G_, h_: qp(Q[0], p[0], G_, h_), [G[i], h[i]])
        torch.testing.assert_close(Jv[0][i], want[0], atol=1e-7, rtol=0)
        torch.testing.assert_close(Jv[1][i], want[1], atol=1e-7, rtol=0)


def test_jvp_matches_directional_finite_difference(g, fd):
    params = problem(g, n=4, m=4, k=1)
    tangents = tuple(torch.randn(t.shape, generator=g, dtype=F64) for t in params)
    _, dz = jvp(qp, params, tangents)
    torch.testing.assert_close(dz, fd.directional(qp, params, tangents), atol=1e-7, rtol=0)


def test_jvp_of_the_duals_matches_directional_finite_differences_on_badly_scaled_data(g, fd):
    """The layer solves the equilibrated problem inside QPFn: the tangents of λ and ν are mapped back through
    the scales (λ = σλ'/d_G, ν = σν'/d_A); data far from unit scale makes a missing factor show."""
    Q, p, G, h, A, b = problem(g, n=4, m=4, k=2)
    rows = torch.tensor([[1e2], [1.0], [3e-2], [5.0]], dtype=F64)
    params = (Q * 40.0, p * 3.0, G * rows, h * rows[:, 0], A * 7.0, b * 7.0)
    tangents = tuple(torch.randn(t.shape, generator=g, dtype=F64) for t in params)

    def duals(*P):
        return torch.cat(qp(*P, return_duals=True)[1:], -1)
    _, dy = jvp(duals, params, tangents)
    want = fd.directional(duals, params, tangents)
    torch.testing.assert_close(dy, want, atol=1e-6 * (1 + float(want.abs().max())), rtol=0)


# --------------------------------------------------------------------------- failures
def test_infeasible_raises_naming_the_status():
    I = torch.eye(1, dtype=F64)
    with pytest.raises(SolveError, match="INFEASIBLE") as e:
        qp(I, torch.zeros(1, dtype=F64), torch.tensor([[1.0], [-1.0]], dtype=F64),
           torch.tensor([-1.0, -1.0], dtype=F64))
    assert e.value.status == Status.INFEASIBLE


def test_unbounded_raises_naming_the_status():
    with pytest.raises(SolveError, match="UNBOUNDED") as e:
        qp(torch.zeros(2, 2, dtype=F64), torch.tensor([-1.0, 0.0], dtype=F64),
           torch.tensor([[-1.0, 0.0]], dtype=F64), torch.zeros(1, dtype=F64))
    assert e.value.status == Status.UNBOUNDED


def test_inconsistent_equalities_raise_infeasible():
    with pytest.raises(SolveError, match="INFEASIBLE"):
        qp(torch.eye(2, dtype=F64), torch.zeros(2, dtype=F64), A=torch.ones(2, 2, dtype=F64),
           b=torch.tensor([1.0, 2.0], dtype=F64))


def test_on_failure_nan_isolates_the_bad_element(g):
    """Element 1 asks for z₁ ≤ −1 and z₁ ≥ 1; the other two are fine and keep their values and gradients."""
    Q = torch.eye(2, dtype=F64).expand(3, 2, 2).clone().requires_grad_()
    p = torch.randn(3, 2, generator=g, dtype=F64)
    G = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=F64)
    h = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [0.5, 1.0]], dtype=F64)
    z, info = qp(Q, p, G, h, on_failure="nan", return_info=True)
    assert info.status.tolist() == [Status.SUCCESS, Status.INFEASIBLE, Status.SUCCESS]
    assert torch.isnan(z[1]).all() and torch.isfinite(z[[0, 2]]).all()
    for i in (0, 2):
        torch.testing.assert_close(z[i], qp(Q[i].detach(), p[i], G, h[i]), atol=1e-12, rtol=0)
    z[[0, 2]].sum().backward()
    assert torch.isfinite(Q.grad).all() and Q.grad[1].abs().max() == 0
    with pytest.raises(SolveError, match="1 of 3 batch elements"):
        qp(Q.detach(), p, G, h)


@pytest.mark.parametrize("bad, match", [
    (dict(Q=torch.eye(3, dtype=F64)), r"Q has shape \(3, 3\) but must be \(\*, 4, 4\)"),
    (dict(G=torch.ones(2, 3, dtype=F64)), r"G has shape \(2, 3\) but must be \(\*, rows, 4\)"),
    (dict(h=torch.ones(3, dtype=F64)), r"h has shape \(3,\) but must be \(\*, 2\)"),
    (dict(b=torch.ones(2, dtype=F64)), r"b has shape \(2,\) but must be \(\*, 1\)"),
    (dict(h=None), "G and h come together"),
    (dict(p=torch.ones(2, 4, dtype=F64), h=torch.ones(3, 2, dtype=F64)), "do not broadcast"),
    (dict(b=torch.ones(1, dtype=torch.float32)), "dtype"),
])
def test_bad_inputs_name_the_parameter(bad, match):
    kw = dict(Q=torch.eye(4, dtype=F64), p=torch.ones(4, dtype=F64), G=-torch.eye(2, 4, dtype=F64),
              h=torch.ones(2, dtype=F64), A=torch.ones(1, 4, dtype=F64), b=torch.ones(1, dtype=F64))
    kw.update(bad)
    with pytest.raises(InputError, match=match):
        qp(**kw)


def test_nonfinite_input_raises():
    with pytest.raises(InputError, match="p contains 1 NaN"):
        qp(torch.eye(2, dtype=F64), torch.tensor([0.0, float("nan")], dtype=F64))


# --------------------------------------------------------------------------- precision, options
def test_float32_matches_float64(g):
    P64 = problem(g, n=8, m=8, k=2, batch=(6,))
    P32 = tuple(t.float() for t in P64)
    w = torch.randn(6, 8, generator=g, dtype=F64)
    z64, z32 = qp(*P64), qp(*P32)
    assert z32.dtype == torch.float32
    torch.testing.assert_close(z32.double(), z64, atol=2e-5, rtol=2e-5)
    g64 = grads_of(qp, P64, w)
    g32 = grads_of(qp, P32, w.float())
    for name, a, e in zip(NAMES, g32, g64):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), e, atol=2e-4, rtol=2e-4, msg=name)


def test_warm_start_and_info(g):
    Q, p, G, h, A, b = problem(g, n=5, m=5, k=1, batch=(2,))
    z, lam, nu, info = qp(Q, p, G, h, A, b, return_duals=True, return_info=True)
    assert lam.shape == (2, 5) and nu.shape == (2, 1) and (lam >= 0).all()
    assert info.status.shape == (2,) and (info.residual <= 1e-10).all()
    z2 = qp(Q, p, G, h, A, b, warm_start=(z, lam, nu))
    torch.testing.assert_close(z2, z, atol=1e-9, rtol=0)


def test_unbatched_returns_a_vector():
    z = qp(torch.eye(3, dtype=F64), torch.ones(3, dtype=F64))
    assert z.shape == (3,)
    torch.testing.assert_close(z, -torch.ones(3, dtype=F64))


def test_second_order_and_forward_mode_gradcheck(g):
    """Double backward (hypergradients through the QP) and forward mode, against finite differences."""
    params = [t.clone().requires_grad_() for t in problem(g, n=3, m=3, k=1)]
    assert torch.autograd.gradcheck(qp, params, eps=1e-6, atol=1e-6, check_forward_ad=True)
    assert torch.autograd.gradgradcheck(qp, params, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_nonsymmetric_q_gradients_match_finite_differences(g):
    """Only Q's symmetric part enters: the backward's products use (Qx + Qᵀx)/2 on the unsymmetrized Q."""
    Q, p, G, h, A, b = problem(g, n=4, m=4, k=1)
    R = torch.randn(4, 4, generator=g, dtype=F64)
    Q = Q + R - R.mT  # a skew part: the same symmetric part, Q − Qᵀ ≠ 0
    params = [t.clone().requires_grad_() for t in (Q, p, G, h, A, b)]
    assert (params[0] - params[0].mT).abs().max() > 0.1
    assert torch.autograd.gradcheck(qp, params, eps=1e-6, atol=1e-6, check_forward_ad=True)


# --------------------------------------------------------------------------- nn.QPLayer
def test_qplayer_fills_grad_of_every_parameter(g, fd):
    from implicitdiff.nn import QPLayer

    layer = QPLayer(4, n_ineq=3, n_eq=1, learn=("Q", "p", "G", "h", "A", "b"), dtype=F64, generator=g)
    x = torch.randn(5, 4, generator=g, dtype=F64)
    z = layer(p=layer.p + x)  # p per call overrides the stored one (built from it here)
    assert z.shape == (5, 4) and int(layer.last_info.status.abs().sum()) == 0
    z.square().sum().backward()
    names = dict(layer.named_parameters())
    assert set(names) == {"Q_factor", "p", "G", "h", "A", "b"}
    for name, prm in names.items():
        assert prm.grad is not None and torch.isfinite(prm.grad).all(), name
    # the same gradient through the functional layer and Q = L Lᵀ, and against differences in L
    def loss(L, G, h):
        return qp(L @ L.T, layer.p.detach() + x, G, h, layer.A.detach(), layer.b.detach()).square().sum()
    L0 = layer.Q_factor.detach()
    want = fd.jacobian(loss, [L0, layer.G.detach(), layer.h.detach()])
    for got, w in zip((layer.Q_factor.grad, layer.G.grad, layer.h.grad), want):
        torch.testing.assert_close(got, w, atol=1e-6, rtol=1e-6)


def test_qplayer_fixed_tensors_are_buffers_and_functional_call_works(g):
    from implicitdiff.nn import QPLayer

    eye = torch.eye(3, dtype=F64)
    layer = QPLayer(learn=("A",), Q=eye, G=-eye, h=torch.zeros(3, dtype=F64), A=torch.ones(1, 3, dtype=F64),
                    b=torch.ones(1, dtype=F64))
    assert [n for n, _ in layer.named_parameters()] == ["A"] and "Q_fixed" in dict(layer.named_buffers())
    p = torch.randn(2, 3, generator=g, dtype=F64)
    A2 = torch.full((1, 3), 2.0, dtype=F64, requires_grad=True)
    z = torch.func.functional_call(layer, {"A": A2}, (), {"p": p})
    torch.testing.assert_close(z, qp(eye, p, -eye, torch.zeros(3, dtype=F64), A2.detach(), torch.ones(1, dtype=F64)))
    z.sum().backward()
    assert A2.grad is not None and layer.A.grad is None
    with pytest.raises(InputError, match="needs p"):
        layer()


def test_gradient_through_the_duals_alone_matches_finite_differences(g, fd):
    """A loss of λ and ν only: the backward gets no cotangent for z (None, not materialized zeros)."""
    Q, p, G, h, A, b = problem(g, n=4, m=5, k=1)
    wl = torch.randn(5, generator=g, dtype=F64)

    def f(p_, h_):
        _, lam, nu = qp(Q, p_, G, h_, A, b, return_duals=True)
        return lam @ wl + 0.3 * nu.sum()

    got = grads_of(f, [p, h], torch.ones((), dtype=F64))
    want = fd.jacobian(f, [p, h], eps=1e-6)
    for a, e, name in zip(got, want, ("p", "h")):
        torch.testing.assert_close(a, e, atol=2e-7, rtol=1e-6, msg=f"gradient of {name}")


@pytest.mark.parametrize("seed", [43, 53])
def test_small_lp_batch_equals_each_element_alone(seed):
    """24 LPs, n = 6, a box, 4 random rows and one equality: every element is solved, in the batch as alone
    (they stalled at residuals up to ~1 as MAX_ITERATIONS, in the batch or alone depending on rounding, when
    the equality was eliminated through an ill-conditioned H — see linalg/kkt.py)."""
    Q, p, G, h, A, b = problem(torch.Generator().manual_seed(seed), n=6, m=4, k=1, batch=(24,), lp=True)
    z, info = qp(Q, p, G, h, A, b, on_failure="nan", return_info=True)
    assert (info.status == Status.SUCCESS).all(), info.status.tolist()
    for i in range(24):
        zi, ii = qp(Q[i], p[i], G[i], h[i], A[i], b[i], on_failure="nan", return_info=True)
        assert int(ii.status) == Status.SUCCESS
        torch.testing.assert_close(z[i], zi, atol=1e-8, rtol=1e-8)
