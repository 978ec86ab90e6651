"""The forward's last evaluation recorded for the backward (Recorder, implicit/speculation.py): the backward of a DEQ and of
``fixed_point(..., solver="picard", freeze=False)`` evaluates the map zero times when it hits, and its
gradients are exact (finite differences, the dense adjoint); ``Recorder.take`` refuses a recording made at
another iterate; no speculation where the backward could not use it (no_grad, no leaf requiring grad,
``torch.func`` transforms, a dense adjoint, a failed element); retain_graph, create_graph; saved memory."""

import pytest
import torch

import implicitdiff as idf
from implicitdiff._core.tree import flatten
from implicitdiff.checks.memory import saved_bytes, saved_bytes_and_output
from implicitdiff.implicit.root import RootProblem
from implicitdiff.implicit.speculation import Recorder
from implicitdiff.layers.deq import deq
from implicitdiff.layers.fixed_point import fixed_point_residual
from implicitdiff.nn import DEQ
from implicitdiff.solvers.picard import picard

D = torch.float64


class Cell(torch.nn.Module):
    """``tanh(lin(z) + inj(x))`` with ``‖lin.weight‖₂ = 0.5``: a contraction; ``calls`` counts its evaluations."""

    def __init__(self, n=4, m=3, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.lin = torch.nn.Linear(n, n, dtype=D)
        self.inj = torch.nn.Linear(m, n, bias=False, dtype=D)
        with torch.no_grad():
            W = torch.randn(n, n, generator=g, dtype=D)
            self.lin.weight.copy_(0.5 * W / torch.linalg.matrix_norm(W, 2))
            self.lin.bias.copy_(0.1 * torch.randn(n, generator=g, dtype=D))
            self.inj.weight.copy_(torch.randn(n, m, generator=g, dtype=D) / m ** 0.5)
        self.calls = 0
        self.register_forward_hook(lambda *_: setattr(self, "calls", self.calls + 1))

    def forward(self, z, x):
        return torch.tanh(self.lin(z) + self.inj(x))


def data(B=3, n=4, m=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, m, generator=g, dtype=D), torch.randn(B, n, generator=g, dtype=D)


#: the DEQ's lazily started Anderson (its default) and whole-batch Picard, by short names
DEQ_SOLVERS = {"anderson": None, "picard": idf.Picard(freeze=False)}


def loss(cell, x, w, **kw):
    if isinstance(kw.get("solver"), str):
        kw["solver"] = DEQ_SOLVERS[kw["solver"]]
    return (deq(cell, x, torch.zeros_like(w), **kw) * w).sum()


def fd_grads(f, tensors, eps=1e-6):
    """Central differences of the scalar ``f()`` in every entry of ``tensors`` (modified in place, restored)."""
    out = []
    with torch.no_grad():
        for t in tensors:
            g = torch.zeros_like(t)
            flat, gflat = t.view(-1), g.view(-1)
            for j in range(flat.numel()):
                v = float(flat[j])
                flat[j] = v + eps
                hi = float(f())
                flat[j] = v - eps
                lo = float(f())
                flat[j] = v
                gflat[j] = (hi - lo) / (2 * eps)
            out.append(g)
    return out


@pytest.fixture
def spy(monkeypatch):
    """Counts Recorders made, their ``record`` calls, and what ``take`` handed over (None: a miss)."""
    log = {"made": 0, "speculated": 0, "taken": []}
    init, speculate, take = Recorder.__init__, Recorder.record, Recorder.take

    def init_(self, *a, **k):
        log["made"] += 1
        init(self, *a, **k)

    def speculate_(self, *a, **k):
        log["speculated"] += 1
        return speculate(self, *a, **k)

    def take_(self, y):
        out = take(self, y)
        log["taken"].append(out)
        return out

    monkeypatch.setattr(Recorder, "__init__", init_)
    monkeypatch.setattr(Recorder, "record", speculate_)
    monkeypatch.setattr(Recorder, "take", take_)
    return log


def hit(log):
    return log["taken"] != [] and all(t is not None for t in log["taken"])


@pytest.fixture(scope="module")
def reference():
    """A cell, data, and the finite-difference gradient of the loss in every parameter and in x."""
    cell = Cell()
    x, w = data()
    ref = fd_grads(lambda: loss(cell, x, w, rtol=1e-13, max_iter=500), [*cell.parameters(), x])
    return cell, x, w, ref


@pytest.mark.parametrize("solver", ["anderson", "picard"])
def test_deq_backward_evaluates_the_cell_zero_times(solver, reference, spy):
    """With the DEQ defaults (freeze=False, a matrix-free adjoint) the speculation hits: the backward takes every
    product from the forward's recorded evaluation — the cell is not called — and every gradient (3 parameters
    and x) equals the dense adjoint's and the central finite differences."""
    cell, x, w, ref = reference
    params = list(cell.parameters())
    xr = x.clone().requires_grad_()
    cell.calls = 0
    out = loss(cell, xr, w, solver=solver, rtol=1e-12)
    forward = cell.calls
    assert spy["made"] == 1 and 1 <= spy["speculated"] <= 3 and hit(spy)
    cell.calls = 0
    grads = torch.autograd.grad(out, [*params, xr])
    assert cell.calls == 0 and forward > 10
    dense = torch.autograd.grad(loss(cell, xr, w, solver=solver, rtol=1e-12, adjoint=idf.Implicit(solver="lu")),
                                [*params, xr])
    assert cell.calls > 0   # the dense adjoint evaluates the cell for its Jacobian
    for g, d, r in zip(grads, dense, ref):
        torch.testing.assert_close(g, d, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(g, r, rtol=1e-7, atol=1e-9)


def test_input_from_an_upstream_graph(spy):
    """x produced by an encoder and also used outside the DEQ: the recording (made in the forward, attached to
    x's history) serves the backward with zero cell calls, and the encoder's and the cell's gradients equal the
    dense adjoint's and the central finite differences."""
    cell = Cell(seed=4)
    enc = torch.nn.Linear(2, 3, dtype=D)
    g = torch.Generator().manual_seed(5)
    inp = torch.randn(3, 2, generator=g, dtype=D)
    w = torch.randn(3, 4, generator=g, dtype=D)

    def total(**kw):
        x = enc(inp)
        z = deq(cell, x, torch.zeros(3, 4, dtype=D), **kw)
        return (z * w).sum() + (x ** 2).sum()

    params = [*enc.parameters(), *cell.parameters()]
    out = total(rtol=1e-12)
    assert hit(spy)
    cell.calls = 0
    grads = torch.autograd.grad(out, params)
    assert cell.calls == 0
    dense = torch.autograd.grad(total(rtol=1e-12, adjoint=idf.Implicit(solver="lu")), params)
    ref = fd_grads(lambda: total(rtol=1e-13, max_iter=500), params)
    for a, d, r in zip(grads, dense, ref):
        torch.testing.assert_close(a, d, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(a, r, rtol=1e-7, atol=1e-9)


def test_deq_default_adjoint_variants_hit(reference, spy):
    """Implicit(solver="gmres") and the fixed-point adjoint with Anderson also run on the recording (zero cell
    calls), and agree with the default."""
    cell, x, w, _ = reference
    xr = x.clone().requires_grad_()
    params = [*cell.parameters(), xr]
    base = torch.autograd.grad(loss(cell, xr, w, rtol=1e-12), params)
    for adjoint in (idf.Implicit(solver="gmres"), idf.FixedPointAdjoint(solver="anderson", fallback=None)):
        spy["taken"].clear()
        out = loss(cell, xr, w, rtol=1e-12, adjoint=adjoint)
        cell.calls = 0
        grads = torch.autograd.grad(out, params)
        assert hit(spy) and cell.calls == 0
        for g, b in zip(grads, base):
            torch.testing.assert_close(g, b, rtol=1e-9, atol=1e-11)


def test_fixed_point_picard_freeze_false_speculates_through_the_map(spy):
    """fixed_point(..., solver="picard", freeze=False) records ``F.map = T`` at the last iterate: the backward
    (GMRES and Richardson adjoints) calls T zero times and the gradients in every parameter equal the central
    finite differences; with freeze=True the backward evaluates T once instead."""
    g = torch.Generator().manual_seed(4)
    A = torch.randn(5, 5, generator=g, dtype=D)
    A = (0.6 * A / torch.linalg.matrix_norm(A, 2)).requires_grad_()
    b = torch.randn(3, 5, generator=g, dtype=D, requires_grad=True)
    w = torch.randn(3, 5, generator=g, dtype=D)
    calls = []

    def T(z, A, b):
        calls.append(1)
        return torch.tanh(z @ A.mT + b)

    def run(freeze, adjoint, A=A, b=b, rtol=1e-12):
        z = idf.fixed_point(T, torch.zeros(3, 5, dtype=D), A, b, solver=idf.Picard(freeze=freeze), batch_dims=1,
                            rtol=rtol, adjoint=adjoint, max_iter=500)
        return (z * w).sum()

    ref = fd_grads(lambda: run(False, idf.Implicit(solver="gmres"), rtol=1e-13), [A, b])
    for adjoint in (idf.Implicit(solver="gmres"), idf.Implicit(solver="richardson")):
        spy["taken"].clear()
        out = run(False, adjoint)
        assert hit(spy)
        calls.clear()
        grads = torch.autograd.grad(out, [A, b])
        assert calls == []
        for gr, r in zip(grads, ref):
            torch.testing.assert_close(gr, r, rtol=1e-7, atol=1e-9)
    spy["speculated"] = 0
    out = run(True, idf.Implicit(solver="gmres"))
    assert spy["speculated"] == 0 and spy["taken"][-1] is None
    calls.clear()
    grads = torch.autograd.grad(out, [A, b])
    assert len(calls) == 1
    for gr, r in zip(grads, ref):
        torch.testing.assert_close(gr, r, rtol=1e-7, atol=1e-9)


# ----------------------------------------------------------------------------- Recorder.take
def _problem():
    """A tiny fixed point ``z = a · tanh(z) + c`` as a RootProblem, with its leaves (requiring grad)."""
    a = torch.tensor(0.5, dtype=D, requires_grad=True)
    c = torch.tensor([0.3, -0.2, 1.0], dtype=D, requires_grad=True)
    leaves, tree = flatten((a, c))
    F = fixed_point_residual(lambda z, a, c: a * torch.tanh(z) + c)
    return RootProblem(F=F, solve=picard, tree=tree), leaves


def test_speculate_records_the_map_in_the_original_leaves():
    """``record`` returns F(y) (= T(y) − y), and its recording gives (∂T/∂y)ᵀv, (∂F/∂y)ᵀv and −(∂F/∂θ)ᵀu
    in the original leaves (not the solver's detached params)."""
    problem, (a, c) = _problem()
    spec = Recorder(problem, (a, c))
    y = torch.tensor([0.1, 0.2, -0.4], dtype=D)
    value = spec.record(y)
    torch.testing.assert_close(value, 0.5 * torch.tanh(y) + c.detach() - y, rtol=1e-15, atol=0.0)
    torch.testing.assert_close(problem.F(y, a.detach(), c.detach()), value, rtol=0.0, atol=0.0)
    lin = spec.take(y)
    assert lin is not None and lin.fixed
    v = torch.tensor([1.0, -2.0, 0.5], dtype=D)
    dT = 0.5 / torch.cosh(y) ** 2
    torch.testing.assert_close(lin.map_vjp(v), dT * v, rtol=1e-14, atol=0.0)
    torch.testing.assert_close(lin.rmv(v), dT * v - v, rtol=1e-14, atol=0.0)
    ga, gc = lin.theta_vjp(v, (a, c))
    torch.testing.assert_close(ga, -(torch.tanh(y) * v).sum(), rtol=1e-14, atol=0.0)
    torch.testing.assert_close(gc, -v, rtol=0.0, atol=0.0)


def test_take_refuses_a_recording_made_at_another_iterate():
    """``take`` hands the recording over once, and only for the very tensor it was made at: not for a copy
    (other storage), a reshaped view (other shape), the same tensor modified in place (version bump), nor
    when nothing was recorded."""
    problem, leaves = _problem()
    spec = Recorder(problem, leaves)
    assert spec.take(torch.zeros(3, dtype=D)) is None          # nothing recorded
    y = torch.tensor([0.1, 0.2, -0.4], dtype=D)
    spec.record(y)
    assert spec.take(y) is not None
    assert spec.take(y) is None                                # handed over once
    spec.record(y)
    assert spec.take(y.clone()) is None                        # same values, other storage
    spec.record(y)
    assert spec.take(y.view(3, 1)) is None                     # same storage, other shape
    spec.record(y)
    y.mul_(1.0)                                                # same values, but written to
    assert spec.take(y) is None
    spec.record(y)
    other = torch.tensor([0.0, 0.0, 0.0], dtype=D)
    spec.record(other)                                      # a later speculation replaces the earlier one
    assert spec.take(y) is None
    spec.record(y)
    assert spec.take(y[:]) is not None                         # a view of the same storage, shape and version


def test_plain_residual_records_F():
    """Without ``F.map`` the recording is of F itself: rmv = (∂F/∂y)ᵀ, not shifted by −v."""
    a = torch.tensor(0.7, dtype=D, requires_grad=True)
    leaves, tree = flatten((a,))
    problem = RootProblem(F=lambda y, a: a * y ** 3 - 1.0, solve=picard, tree=tree)
    spec = Recorder(problem, leaves)
    y = torch.tensor([1.0, 2.0], dtype=D)
    torch.testing.assert_close(spec.record(y), 0.7 * y ** 3 - 1.0, rtol=1e-15, atol=0.0)
    lin = spec.take(y)
    assert not lin.fixed
    v = torch.tensor([1.0, 1.0], dtype=D)
    torch.testing.assert_close(lin.rmv(v), 3 * 0.7 * y ** 2, rtol=1e-14, atol=0.0)
    torch.testing.assert_close(lin.theta_vjp(v, (a,))[0], -(y ** 3).sum(), rtol=1e-14, atol=0.0)


# ----------------------------------------------------------------------------- where nothing is recorded
def test_no_speculation_without_a_first_order_backward(reference, spy):
    """No Recorder under no_grad, when no leaf requires grad, or with the dense adjoint (its backward builds
    the Jacobian anyway); the forward's result is the same."""
    cell, x, w, _ = reference
    z0 = torch.zeros_like(w)
    z = deq(cell, x, z0, rtol=1e-12)
    assert spy["made"] == 1
    with torch.no_grad():
        z_ng = deq(cell, x, z0, rtol=1e-12)
    cell.requires_grad_(False)
    try:
        z_nl = deq(cell, x, z0, rtol=1e-12)
    finally:
        cell.requires_grad_(True)
    assert spy["made"] == 1 and not z_nl.requires_grad
    torch.testing.assert_close(z_ng, z.detach(), rtol=0.0, atol=0.0)
    torch.testing.assert_close(z_nl, z.detach(), rtol=0.0, atol=0.0)
    xr = x.clone().requires_grad_()
    out = loss(cell, xr, w, rtol=1e-12, adjoint=idf.Implicit(solver="lu"))
    assert spy["made"] == 1
    cell.calls = 0
    g = torch.autograd.grad(out, xr)[0]
    assert cell.calls > 0
    torch.testing.assert_close(g, torch.autograd.grad(loss(cell, xr, w, rtol=1e-12), xr)[0], rtol=1e-9, atol=1e-11)


def test_no_speculation_under_torch_func(reference, spy):
    """Under torch.func.grad (matrix-free default adjoint) and vmap nothing is recorded (the transforms' tensors
    are not the leaves'); the gradients equal the finite differences."""
    cell, x, w, ref = reference
    layer = DEQ(cell, rtol=1e-12)
    z0 = torch.zeros_like(w)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    gp, gx = torch.func.grad(lambda p, xx: (torch.func.functional_call(layer, p, (xx, z0)) * w).sum(),
                             argnums=(0, 1))(params, x)
    assert spy["made"] == 0
    assert list(gp) == [f"cell.{k}" for k, _ in cell.named_parameters()]
    for g, r in zip([*gp.values(), gx], ref):
        torch.testing.assert_close(g, r, rtol=1e-7, atol=1e-9)
    # vmap over samples, forward only, matrix-free default adjoint: no Recorder, the same equilibria
    zv = torch.func.vmap(lambda xi, zi: layer(xi[None], zi[None])[0])(x, z0)
    assert spy["made"] == 0
    torch.testing.assert_close(zv.detach(), layer(x, z0).detach(), rtol=1e-9, atol=1e-11)
    # per-sample gradients by vmap(grad), with the dense adjoint (the matrix-free ones stop on data)
    dense = DEQ(cell, rtol=1e-12, adjoint=idf.Implicit(solver="lu"))
    gxv = torch.func.vmap(torch.func.grad(lambda xi, wi: (dense(xi[None], z0[:1]) * wi).sum()))(x, w)
    assert spy["made"] == 1   # the un-transformed layer(x, z0) call above
    torch.testing.assert_close(gxv, ref[-1], rtol=1e-7, atol=1e-9)


def test_failed_element_discards_the_recording(spy):
    """on_failure="nan" with an element out of iterations: the recording is not used (the backward evaluates the
    cell at the last finite iterates) and the converged elements' gradient equals the dense adjoint's."""
    cell = Cell(seed=2)
    x, w = data(seed=3)
    x = x.clone()
    x[1] *= 1e6                                              # a huge input: tanh saturates; still contractive
    xr = x.requires_grad_()
    kw = dict(solver=idf.Picard(freeze=False), rtol=1e-12, max_iter=12, on_failure="nan", return_info=True)
    z, info = deq(cell, xr, torch.zeros_like(w), **kw)
    ok = info.ok
    assert not bool(ok.all()) and bool(ok.any())
    cell.calls = 0
    g = torch.autograd.grad((z[ok] * w[ok]).sum(), xr)[0]
    assert cell.calls > 0 and bool(torch.isfinite(g).all())
    zd, _ = deq(cell, xr, torch.zeros_like(w), adjoint=idf.Implicit(solver="lu"), **kw)
    gd = torch.autograd.grad((zd[ok] * w[ok]).sum(), xr)[0]
    torch.testing.assert_close(g, gd, rtol=1e-9, atol=1e-11)


# ----------------------------------------------------------------------------- retain_graph, create_graph
def test_retain_graph_then_a_second_backward(reference, spy):
    """retain_graph=True: the first backward uses the recording (zero cell calls), the second records afresh;
    both give the same gradients."""
    cell, x, w, ref = reference
    xr = x.clone().requires_grad_()
    params = [*cell.parameters(), xr]
    out = loss(cell, xr, w, rtol=1e-12)
    assert hit(spy)
    cell.calls = 0
    first = torch.autograd.grad(out, params, retain_graph=True)
    assert cell.calls == 0
    second = torch.autograd.grad(out, params)
    assert cell.calls >= 1
    for a, b, r in zip(first, second, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(a, r, rtol=1e-7, atol=1e-9)


def test_create_graph_second_derivative(reference, spy):
    """create_graph=True through a speculating forward: the Hessian-vector product in x equals the central
    difference of the (first-order, speculating) gradient."""
    cell, x, w, _ = reference
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=D)

    def grad_x(xx, create_graph=False):
        xx = xx.detach().requires_grad_() if not create_graph else xx
        return torch.autograd.grad(loss(cell, xx, w, rtol=1e-13, max_iter=500), xx, create_graph=create_graph)[0]

    xr = x.clone().requires_grad_()
    g = grad_x(xr, create_graph=True)
    assert hit(spy) and g.requires_grad
    hv = torch.autograd.grad((g * v).sum(), xr)[0]
    eps = 1e-5
    fd = (grad_x(x + eps * v) - grad_x(x - eps * v)) / (2 * eps)
    assert float(hv.abs().max()) > 1e-2
    torch.testing.assert_close(hv, fd, rtol=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------- memory
def _slow(n, rho, seed=1):
    """Symmetric, eigenvalues spread in ``[rho / 2, rho]``."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D))
    return (Q * torch.linspace(rho / 2, rho, n, dtype=D)) @ Q.mT


def test_saved_memory_does_not_grow_with_forward_iterations(spy):
    """A few or ~80 Picard iterations: the graph holds the same bytes — the one recording that hit, once — more
    than without speculation (freeze=True: the backward records instead)."""
    cell = Cell(8, 8)
    with torch.no_grad():   # nearly linear (small inputs), Picard rate ≈ 0.95
        cell.lin.weight.copy_(_slow(8, 0.95))
        cell.lin.bias.zero_()
        cell.inj.weight.copy_(torch.eye(8, dtype=D))
    x = 0.1 * torch.randn(4, 8, generator=torch.Generator().manual_seed(3), dtype=D)
    z0 = torch.zeros_like(x)
    sizes = {}
    for max_iter, rtol in ((20, 0.5), (400, 1e-4)):
        spy["taken"].clear()
        nbytes, (z, info) = saved_bytes_and_output(lambda: deq(cell, x, z0, solver=idf.Picard(freeze=False), rtol=rtol,
                                                               max_iter=max_iter, return_info=True))
        assert bool(info.ok.all()) and hit(spy)
        sizes[max_iter] = (nbytes, int(info.iterations.max()))
        cell.calls = 0
        z.sum().backward()
        assert cell.calls == 0
    assert sizes[20][1] <= 4 and sizes[400][1] >= 40
    assert sizes[20][0] == sizes[400][0] > 0
    frozen = saved_bytes(lambda: deq(cell, x, z0, solver=idf.Picard(freeze=True), rtol=1e-4, max_iter=400))
    assert 0 < frozen < sizes[400][0]


def test_dropped_recording_is_not_counted(spy):
    """A speculation made at an iterate the solver does not return is dropped with its graph: the saved bytes
    equal those of a solve that never speculated; one at the returned iterate is counted and used."""
    g = torch.Generator().manual_seed(6)
    A = torch.randn(16, 16, generator=g, dtype=D)
    A = (0.5 * A / torch.linalg.matrix_norm(A, 2)).requires_grad_()
    b = torch.randn(4, 16, generator=g, dtype=D, requires_grad=True)
    calls = []

    def T(z, A, b):
        calls.append(1)
        return torch.tanh(z @ A.mT + b)

    def solver(where):
        # a solver object that takes a recorder (a Picard whose function guesses where told)
        def solve(F, y0, params, *, batch_dims, rtol=None, atol=0.0, max_iter=200, recorder=None):
            if where == "start":
                recorder.record(y0)                         # a wrong guess
            res = picard(F, y0, params, batch_dims=batch_dims, rtol=rtol, atol=atol, max_iter=max_iter)
            if where == "end":
                recorder.record(res.y)                      # the right one
            return res._replace(recording=recorder.take(res.y))
        return type("Guessing", (idf.Picard,), {"fn": staticmethod(solve)})()

    def run(where):
        return idf.fixed_point(T, torch.zeros(4, 16, dtype=D), A, b, solver=solver(where), batch_dims=1,
                               rtol=1e-12, adjoint=idf.Implicit(solver="gmres"))

    sizes, grads = {}, {}
    for where in ("never", "start", "end"):
        spy["taken"].clear()
        sizes[where], z = saved_bytes_and_output(lambda: run(where))
        calls.clear()
        grads[where] = torch.autograd.grad(z.sum(), (A, b))
        assert len(calls) == (0 if where == "end" else 1)      # the backward records T unless the guess hit
        assert (spy["taken"][-1] is not None) == (where == "end")
    assert sizes["start"] == sizes["never"] > 0
    assert sizes["end"] > sizes["never"]
    for where in ("start", "end"):
        for a, r in zip(grads[where], grads["never"]):
            torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)
