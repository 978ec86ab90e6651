"""Every layer on every available device: CPU always, CUDA when present (skipped otherwise).

The CUDA cases carry the ``cuda`` marker: ``pytest -m cuda`` (what ``.ci/gpu`` runs) selects them.

Each case runs on the device and compares value and gradients with a float64 CPU computation,
so the same test checks the CUDA paths (Cholesky-only QP, lu_solve/geqrf/ormqr on the GPU,
host-sync schedules of the iterative solvers) on a machine that has one.
"""

import importlib
import importlib.util

import pytest
import torch

import implicitdiff as idf
from implicitdiff.checks.selfcheck import run as selfcheck

NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available here")
CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, NO_CUDA])
DEVICES = ["cpu", CUDA]
D = torch.float64


def _grads(fn, *inputs):
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*inputs)
    w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).reshape(out.shape)
    grads = torch.autograd.grad((out * w).sum(), inputs)
    return out.detach().cpu(), [g.cpu() for g in grads]


def _same_on(device, fn, *inputs, rtol=1e-8, atol=1e-10):
    ref_out, ref_g = _grads(fn, *inputs)
    out, g = _grads(fn, *[x.to(device) for x in inputs])
    torch.testing.assert_close(out, ref_out, rtol=rtol, atol=atol)
    for a, b in zip(g, ref_g):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape, selection", [((4, 4), "auto"), ((3, 5), "min_norm"), ((5, 3), "least_squares")])
def test_linear_solve(device, shape, selection):
    A = _rand(2, *shape) + (3 * torch.eye(*shape, dtype=D) if shape[0] == shape[1] else 0)
    b = _rand(2, shape[0], 2, seed=1)
    _same_on(device, lambda A, b: idf.linear_solve(A, b, selection=selection), A, b)


@pytest.mark.parametrize("device", DEVICES)
def test_linear_solve_cg(device):
    M = _rand(6, 6)
    A = M @ M.T + 6 * torch.eye(6, dtype=D)
    _same_on(device, lambda A, b: idf.linear_solve(A, b, solver="cg", rtol=1e-12), A, _rand(6, seed=2))


@pytest.mark.parametrize("device", DEVICES)
def test_root_fixed_point_argmin(device):
    W, x = 0.3 * _rand(4, 4), _rand(4, seed=3)
    _same_on(device, lambda W, x: idf.root(lambda y, W, x: y - torch.tanh(y @ W.mT + x), torch.zeros_like(x),
                                           W, x, rtol=1e-13), W, x)
    _same_on(device, lambda W, x: idf.fixed_point(lambda z, W, x: torch.tanh(z @ W.mT + x), torch.zeros_like(x),
                                                  W, x, rtol=1e-13), W, x)
    X, t = _rand(12, 3, seed=4), _rand(12, seed=5)
    lam = torch.tensor(0.7, dtype=D)
    _same_on(device, lambda lam, X, t: idf.argmin(
        lambda w, lam, X, t: 0.5 * ((X @ w - t) ** 2).sum() + 0.5 * lam * (w ** 2).sum(),
        torch.zeros(3, dtype=lam.dtype, device=lam.device), lam, X, t, rtol=1e-13), lam, X, t)


@pytest.mark.parametrize("device", DEVICES)
def test_qp(device):
    n, m = 4, 6
    L = _rand(n, n)
    Q = L @ L.T + torch.eye(n, dtype=D)
    G, h = _rand(m, n, seed=6), torch.ones(m, dtype=D)
    _same_on(device, lambda p, h: idf.qp(Q.to(p.device), p, G.to(p.device), h), _rand(3, n, seed=7), h,
             rtol=1e-7, atol=1e-9)


class _Cell(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 4).double()
        with torch.no_grad():
            self.lin.weight.mul_(0.3)

    def forward(self, z, x):
        return torch.tanh(self.lin(z) + x)


@pytest.mark.parametrize("device", DEVICES)
def test_deq(device):
    """nn.DEQ on the device: parameters' and input's gradients equal the CPU's, on the device."""

    def grads_on(dev):
        model = idf.nn.DEQ(_Cell(), rtol=1e-12).to(dev)
        x = _rand(3, 4, seed=8).to(dev).requires_grad_()
        z = model(x)
        (z * torch.linspace(-1, 1, 12, dtype=D, device=dev).reshape(3, 4)).sum().backward()
        assert z.device.type == dev and all(p.grad.device.type == dev for p in model.parameters())
        return [z.detach().cpu(), x.grad.cpu()] + [p.grad.cpu() for p in model.parameters()]

    for a, b in zip(grads_on(device), grads_on("cpu")):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_float32_on_the_device(device):
    """float32 inputs stay float32 on the device, within float32 accuracy of the float64 CPU result."""
    A = _rand(2, 5, 5) + 5 * torch.eye(5, dtype=D)
    b = _rand(2, 5, seed=9)
    out, g = _grads(lambda A, b: idf.linear_solve(A, b), A.float().to(device), b.float().to(device))
    ref, ref_g = _grads(lambda A, b: idf.linear_solve(A, b), A, b)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    for a, r in zip(g, ref_g):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_projections(device):
    x = _rand(3, 6, seed=10)
    _same_on(device, lambda x: idf.project_simplex(x), x)
    _same_on(device, lambda x: idf.sparsemax(x), x)


@pytest.mark.cuda
@NO_CUDA
@pytest.mark.parametrize("name", ["linear", "qp", "deq", "cone"])
def test_bench_runs_on_cuda(name, tmp_path):
    """``run(quick=True, device="cuda")`` of every benchmark that takes a device: it runs and writes JSON."""
    import inspect

    if importlib.util.find_spec(f"implicitdiff.bench.{name}") is None:
        pytest.skip(f"implicitdiff.bench.{name} does not exist yet")
    module = importlib.import_module(f"implicitdiff.bench.{name}")
    if "device" not in inspect.signature(module.run).parameters:
        pytest.skip(f"implicitdiff.bench.{name}.run takes no device yet")
    out = tmp_path / f"bench-{name}.json"
    module.run(quick=True, out=str(out), device="cuda")
    assert out.stat().st_size > 0


@pytest.mark.parametrize("device", DEVICES)
def test_selfcheck_registry(device):
    results = selfcheck(device=device, dtype=torch.float64)
    failed = [(r.case.name, r.error) for r in results if not r.passed]
    assert not failed, failed
