"""The private torch APIs of ``_core/torch_private.py``: each called on a small case, result checked.

A torch release that renames one, changes its signature or its meaning fails here, by name.
"""

import functools
import subprocess
import sys
import warnings

import pytest
import torch

from implicitdiff._core import torch_private as tp

F64 = torch.float64


def test_the_functorch_probes_exist():
    # a missing probe would silently turn is_vmapped into "never" and in_transform into "always"
    from torch._C import _functorch

    for name in ("is_batchedtensor", "is_functorch_wrapped_tensor", "get_unwrapped", "peek_interpreter_stack"):
        assert callable(getattr(_functorch, name)), name


def test_is_vmapped_sees_vmap_through_other_transforms():
    x = torch.randn(3, 2, dtype=F64)
    seen = []

    def f(v):
        seen.append(tp.is_vmapped(v))
        return v.sum()

    assert not tp.is_vmapped(x)
    torch.func.vmap(f)(x)
    torch.func.grad(f)(x[0])
    torch.func.vmap(torch.func.grad(f))(x)           # batched under a grad wrapper
    torch.func.grad(lambda v: torch.func.vmap(f)(v).sum())(x)
    assert seen == [True, False, True, True]


def test_in_transform_is_true_under_every_torch_func_transform_only():
    x = torch.randn(2, dtype=F64)
    seen = []

    def f(v):
        seen.append(tp.in_transform())
        return (v * v).sum()

    f(x)
    with torch.enable_grad():
        f(x.requires_grad_())
    torch.func.grad(f)(x.detach())
    torch.func.vjp(f, x.detach())
    torch.func.jvp(f, (x.detach(),), (torch.ones_like(x),))
    torch.func.vmap(f)(x.detach().reshape(2, 1))
    assert seen == [False, False, True, True, True, True]
    assert not tp.in_transform()


def test_tracks_grad_sees_autograd_beneath_torch_func_wrappers():
    x = torch.randn(3, dtype=F64)
    leaf = x.clone().requires_grad_()
    seen = []

    def f(v):
        seen.append((v.requires_grad, tp.tracks_grad(v)))
        return v * 2

    f(x)
    f(leaf)
    torch.func.jvp(f, (leaf,), (torch.ones_like(x),))       # the jvp wrapper hides requires_grad
    torch.func.jvp(f, (x,), (torch.ones_like(x),))
    torch.func.grad(lambda v: f(v).sum())(x)
    torch.func.vmap(f)(leaf.reshape(3, 1))                  # so does vmap's
    assert seen == [(False, False), (True, True), (False, True), (False, False), (True, True), (False, True)]
    assert not tp.tracks_grad(None) and not tp.tracks_grad(1.0)


def test_run_backward_equals_autograd_grad():
    """The engine's ``run_backward(tensors, grad_tensors, keep_graph, create_graph, inputs,
    allow_unreachable, accumulate_grad)``: same values as torch.autograd.grad, ``None`` for an
    unused input, the graph kept for a second call, and nothing accumulated into ``.grad``."""
    assert tp.HAS_RUN_BACKWARD
    a = torch.tensor([1.0, 2.0, 3.0], dtype=F64, requires_grad=True)
    b = torch.tensor([0.5, -1.0], dtype=F64, requires_grad=True)
    unused = torch.ones(2, dtype=F64, requires_grad=True)
    W = torch.arange(6, dtype=F64).reshape(2, 3)
    y = torch.sin(W @ a) * b
    v = torch.tensor([1.0, -2.0], dtype=F64)
    got = tp.run_backward((y,), (v,), (a, b, unused))
    want = torch.autograd.grad(y, (a, b), v, retain_graph=True)
    assert len(got) == 3 and got[2] is None
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-15)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-15)
    torch.testing.assert_close(got[0], W.T @ (torch.cos(W @ a) * b * v), rtol=1e-14, atol=0)  # closed form
    again = tp.run_backward((y,), (2 * v,), (a,), retain_graph=False)  # the graph was kept
    torch.testing.assert_close(again[0], 2 * want[0], rtol=1e-14, atol=0)
    assert a.grad is None and b.grad is None  # accumulate_grad=False
    with pytest.raises(RuntimeError):  # ... and now freed
        tp.run_backward((y,), (v,), (a,))


def test_pytree_flatten_unflatten_and_key_paths():
    tree = ({"w": torch.ones(2), "b": [torch.zeros(1), 3]}, torch.eye(2))
    leaves, spec = tp.pytree.tree_flatten(tree)
    assert len(leaves) == 4 and leaves[2] == 3
    rebuilt = tp.pytree.tree_unflatten(leaves, spec)
    assert rebuilt[0]["b"][1] == 3 and torch.equal(rebuilt[1], torch.eye(2))
    with_paths, _ = tp.pytree.tree_flatten_with_path(tree)
    assert [tp.pytree.keystr(p) for p, _ in with_paths] == ["[0]['w']", "[0]['b'][0]", "[0]['b'][1]", "[1]"]
    assert len(tp.pytree.tree_leaves(tree)) == 4
    leaves_none, _ = tp.pytree.tree_flatten((None, torch.ones(1)), is_leaf=lambda t: t is None)
    assert leaves_none[0] is None


def test_warm_forward_ad_then_jvp_emits_no_warning():
    tp.warm_forward_ad()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, t = torch.func.jvp(torch.linalg.solve, (torch.eye(2, dtype=F64) * 2, torch.ones(2, dtype=F64)),
                              (torch.zeros(2, 2, dtype=F64), torch.ones(2, dtype=F64)))
    torch.testing.assert_close(t, torch.full((2,), 0.5, dtype=F64))


def test_eager_under_compile_is_a_plain_call_outside_compile():
    calls = []

    @tp.eager_under_compile
    def f(x, *, k=1):
        """doc"""
        calls.append(torch.compiler.is_compiling())
        return x * k

    assert f.__doc__ == "doc" and f.__name__ == "f"
    assert torch.equal(f(torch.ones(2), k=3), torch.full((2,), 3.0)) and calls == [False]


def test_eager_under_compile_runs_eagerly_inside_torch_compile():
    """In a fresh process (dynamo is heavy): the wrapped function runs eagerly (a graph break) and
    the compiled module around it gives the eager result."""
    code = """
import torch
from implicitdiff._core.torch_private import eager_under_compile
seen = []
@eager_under_compile
def inner(x):
    seen.append(torch.compiler.is_compiling())
    y = x
    for _ in range(50):                       # a data-dependent loop dynamo must not trace
        y = 0.5 * y + x
        if float((y - 2 * x).abs().max()) < 1e-9:
            break
    return y
def outer(x):
    return inner(torch.sin(x)) * 2
x = torch.randn(3, dtype=torch.float64)
r = torch.compile(outer, backend="eager")(x)
assert torch.allclose(r, outer(x)), (r, outer(x))
assert seen and not any(seen), seen
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and ("C++ compiler" in proc.stderr or "InvalidCxxCompiler" in proc.stderr):
        pytest.skip("torch.compile cannot run on this machine")
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


@pytest.mark.parametrize("copy_free_min", [0, 1 << 30])  # the transposed call form for every A / for none
@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("batch, vector", [((), True), ((), False), ((3,), True), ((3,), False)])
def test_solve_keeping_lu_returns_torch_solve_and_the_lu_it_used(monkeypatch, copy_free_min, contiguous, batch,
                                                                  vector):
    monkeypatch.setattr(tp, "COPY_FREE_MIN", copy_free_min)
    g = torch.Generator().manual_seed(0)
    n = 5
    A = torch.randn(*batch, n, n, generator=g, dtype=F64)  # pivots: the LU of A and of Aᵀ differ
    if not contiguous:
        A = A.mT.contiguous().mT
    B = torch.randn(*batch, n, *(() if vector else (2,)), generator=g, dtype=F64)
    A.requires_grad_()
    X, LU, piv, info, transposed = tp.solve_keeping_lu(A, B, vector)
    assert transposed == tp.solve_factorizes_transpose(A) and not LU.requires_grad and bool((info == 0).all())
    assert X.shape == B.shape
    torch.testing.assert_close(X, torch.linalg.solve(A, B), atol=1e-13, rtol=0)
    LU_ref, piv_ref = torch.linalg.lu_factor(A.detach().mT if transposed else A.detach())
    assert torch.equal(LU, LU_ref) and torch.equal(piv, piv_ref)
    Z = torch.randn(*batch, n, 1, generator=g, dtype=F64)
    torch.testing.assert_close(torch.linalg.lu_solve(LU, piv, Z, adjoint=transposed),
                               torch.linalg.solve(A.detach(), Z), atol=1e-12, rtol=0)
    B.requires_grad_()
    assert torch.autograd.gradcheck(lambda A, B: tp.solve_keeping_lu(A, B, vector)[0], (A, B),
                                    check_forward_ad=True)


def test_solve_keeping_lu_takes_a_large_row_major_matrix_without_a_copy():
    A = torch.randn(300, 300, dtype=F64) + 30 * torch.eye(300, dtype=F64)  # 9·10⁴ ≥ COPY_FREE_MIN entries
    assert A.numel() >= tp.COPY_FREE_MIN
    X, LU, piv, info, transposed = tp.solve_keeping_lu(A, torch.ones(300, dtype=F64), True)
    assert transposed and torch.equal(LU, torch.linalg.lu_factor(A.mT)[0])



def test_inductor_compile_traces_once_and_keeps_the_examples_apart(monkeypatch):
    # CI=1: Inductor then refuses an implicit fallback for an op that has a decomposition (the
    # first CI run of argmin(compiled=True) failed so on aten.mv); products must never need one
    monkeypatch.setenv("CI", "1")
    # one tensor passed twice as the examples must still give two graph inputs (make_fx alone merges them)
    # and a tensor fn closes over stays a tensor of the graph (not a fake one)
    A, c = torch.randn(4, 3, dtype=F64), torch.randn(4, dtype=F64)
    x, y = torch.randn(3, dtype=F64), torch.randn(3, dtype=F64)

    def fn(A, x, y):
        return A @ (x - y) + c, (x * y).sum()

    compiled = tp.inductor_compile(fn, (A, x, x))
    for got, want in zip(compiled(A, x, y), fn(A, x, y)):
        torch.testing.assert_close(got, want, atol=1e-14, rtol=0)
    from torch._inductor.lowering import lowerings
    assert torch.ops.aten.mv.default not in lowerings, "aten.mv reached Inductor as an implicit fallback"


def test_inductor_compile_keeps_addmv_semantics(monkeypatch):
    # addmv as a one-column mm: alpha and beta applied, and beta = 0 ignores self (NaN included)
    monkeypatch.setenv("CI", "1")
    A, x = torch.randn(5, 3, dtype=F64), torch.randn(3, dtype=F64)
    for beta, alpha, b in ((1, 1, torch.randn(5, dtype=F64)), (0.5, -2.0, torch.randn(5, dtype=F64)),
                           (0, 3.0, torch.full((5,), float("nan"), dtype=F64))):
        fn = functools.partial(torch.addmv, beta=beta, alpha=alpha)
        got = tp.inductor_compile(fn, (b, A, x))(b, A, x)
        torch.testing.assert_close(got, fn(b, A, x), atol=1e-14, rtol=0)


def test_in_derivative_transform_is_true_under_grad_and_jvp_not_under_vmap_alone():
    x = torch.randn(2, dtype=F64)
    seen = []

    def f(v):
        seen.append(tp.in_derivative_transform())
        return (v * v).sum()

    f(x)
    torch.func.grad(f)(x)
    torch.func.jvp(f, (x,), (torch.ones_like(x),))
    torch.func.vmap(f)(x.reshape(2, 1))
    torch.func.vmap(torch.func.grad(f))(x.reshape(2, 1))
    assert seen == [False, True, True, False, True]
