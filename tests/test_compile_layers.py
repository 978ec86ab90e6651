"""torch.compile of models with QPLayer, CvxpyLayer, the functional cone_program, root, fixed_point and
argmin: the solves run eagerly (a graph break, as DEQ's), so the compiled model gives the eager outputs
and gradients without dynamo tracing the solver loops (probe3 item 9: 39–160 s of compilation before)."""

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("cvxpy")  # the script builds a CvxpyLayer

_SCRIPT = textwrap.dedent("""
    import warnings
    import cvxpy as cp
    import torch
    import implicitdiff as idf
    from implicitdiff.nn import CvxpyLayer, QPLayer
    from implicitdiff.solvers.cone_ipm import ConeInteriorPoint
    from implicitdiff.solvers.qp_ipm import QPInteriorPoint

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float64)
    compiling = []  # torch.compiler.is_compiling() at every solve: False when the solve runs eagerly
    for cls in (QPInteriorPoint, ConeInteriorPoint):
        def spy(self, *a, _solve=cls.solve, **k):
            compiling.append(torch.compiler.is_compiling())
            return _solve(self, *a, **k)
        cls.solve = spy

    x = cp.Variable(3); q = cp.Parameter(3); G = cp.Parameter((2, 3))
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x) + q @ x), [G @ x <= 1])
    A = torch.tensor([[0., 0.], [-1., 0.], [0., -1.]]); b = torch.tensor([1., 0., 0.])

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(4, 3)
            self.G = torch.nn.Parameter(torch.randn(2, 3))
            self.qp = QPLayer(3, n_ineq=2, learn=("Q", "G", "h"), generator=torch.Generator().manual_seed(0))
            self.cvx = CvxpyLayer(problem, [q, G], [x])
        def forward(self, inp):
            p = self.head(inp)
            z = self.qp(p=p)
            (w,) = self.cvx(p, self.G)
            u = idf.cone_program(A, b, p[:, :2] + 2, {"q": [3]})[0]
            r = idf.root(F, torch.zeros_like(p), p, batch_dims=1)
            t = idf.fixed_point(T, torch.zeros_like(p), p, batch_dims=1)
            v = idf.argmin(f, torch.zeros_like(p), p, batch_dims=1)
            return z.sum(-1) + w.sum(-1) + u.sum(-1) + r.sum(-1) + t.sum(-1) + v.sum(-1)

    def F(y, p):  # the residuals record whether they run under a dynamo trace
        compiling.append(torch.compiler.is_compiling())
        return y + 0.1 * torch.tanh(y) - p
    def T(z, p):
        compiling.append(torch.compiler.is_compiling())
        return 0.5 * torch.tanh(z) + p
    def f(y, p):
        compiling.append(torch.compiler.is_compiling())
        return ((y - p) ** 2).sum(-1) + 0.1 * (y ** 4).sum(-1)

    model = Model()
    compiled = torch.compile(model, backend="aot_eager")
    params = list(model.parameters())
    for inp in (torch.randn(5, 4), torch.randn(7, 4)):  # a second batch size: a recompile
        ref = model(inp)
        ref_g = torch.autograd.grad(ref.square().sum(), params)
        compiling.clear()
        out = compiled(inp)
        g = torch.autograd.grad(out.square().sum(), params)
        assert len(compiling) >= 6 and not any(compiling), compiling
        assert torch.allclose(out, ref, rtol=1e-9, atol=1e-10), (out - ref).abs().max()
        assert all(torch.allclose(a, b, rtol=1e-7, atol=1e-9) for a, b in zip(g, ref_g))
    print("COMPILED-OK")
""")


def test_compiled_model_runs_the_solves_eagerly_and_matches_eager():
    # in a fresh process: compilation state must not leak into other tests
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    try:
        out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=180, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("torch.compile took more than 180 s: is a solver loop being traced again?")
    assert out.returncode == 0 and "COMPILED-OK" in out.stdout, out.stderr[-3000:]
