"""solver="splu": a sparse direct solve (SciPy SuperLU) whose backward reuses the factors."""

import warnings

import pytest
import torch

import implicitdiff as idf
from implicitdiff.implicit.sparse_direct import splu_solve

pytest.importorskip("scipy")

D = torch.float64


def _quiet(f):
    """Run ``f`` with torch's one-time "sparse CSR is in beta" warning silenced (a torch notice)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        return f()


def sparse_system(n=7, seed=0, dtype=D):
    """A nonsymmetric, well-conditioned matrix with ~half its entries zero, and its pattern."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=dtype)
    A = A * (torch.rand(n, n, generator=g) < 0.4) + n * torch.eye(n, dtype=dtype)
    b = torch.randn(n, generator=g, dtype=dtype)
    return A, b, (A != 0)


def as_layout(A, layout):
    return _quiet(lambda: A.to_sparse_csr() if layout == "csr" else A.to_sparse_coo())


@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_solution_and_gradients_match_dense_path_on_pattern(layout):
    A, b, mask = sparse_system()
    w = torch.linspace(-1.0, 2.0, A.shape[0], dtype=D)
    S = as_layout(A, layout).requires_grad_()
    bs = b.clone().requires_grad_()
    y = idf.linear_solve(S, bs, solver="splu")
    _quiet(lambda: (y * w).sum().backward())
    Ad, bd = A.clone().requires_grad_(), b.clone().requires_grad_()
    yd = torch.linalg.solve(Ad, bd)
    (yd * w).sum().backward()
    torch.testing.assert_close(y.detach(), yd.detach(), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(bs.grad, bd.grad, rtol=1e-10, atol=1e-12)
    assert S.grad.layout == S.layout  # never densified
    assert S.grad._nnz() == S._nnz()
    gA = _quiet(lambda: S.grad.to_dense())
    torch.testing.assert_close(gA, Ad.grad * mask, rtol=1e-10, atol=1e-12)


def test_gradcheck_wrt_stored_values_and_b():
    A, b, mask = sparse_system(6, seed=1)
    idx = mask.nonzero().T
    vals = A[mask].clone().requires_grad_()
    B = torch.randn(6, 2, dtype=D, requires_grad=True)

    def f(vals, B):
        S = torch.sparse_coo_tensor(idx, vals, A.shape, check_invariants=True).coalesce()
        return idf.linear_solve(S, B, solver="splu")

    assert torch.autograd.gradcheck(f, (vals, B))


def test_multiple_and_batched_right_hand_sides():
    A, _, _ = sparse_system(8, seed=2)
    S = as_layout(A, "csr")
    B = torch.randn(8, 3, dtype=D)
    torch.testing.assert_close(idf.linear_solve(S, B, solver="splu"), torch.linalg.solve(A, B), rtol=1e-12,
                               atol=1e-13)
    Bb = torch.randn(2, 8, 3, dtype=D, requires_grad=True)
    Y = idf.linear_solve(S, Bb, solver="splu")
    torch.testing.assert_close(Y, torch.linalg.solve(A, Bb.detach()), rtol=1e-12, atol=1e-13)
    W = torch.randn(2, 8, 3, dtype=D)
    (g,) = torch.autograd.grad((Y * W).sum(), Bb)
    torch.testing.assert_close(g, torch.linalg.solve(A.T, W), rtol=1e-10, atol=1e-12)  # b̄ = A⁻ᵀ ȳ


def test_return_info_reports_success_and_backward_error():
    A, b, _ = sparse_system()
    y, info = idf.linear_solve(as_layout(A, "coo"), b, solver="splu", return_info=True)
    assert int(info.status) == idf.Status.SUCCESS
    assert 0.0 <= float(info.residual) < 1e-14
    x, info2 = splu_solve(as_layout(A, "coo"), b)
    torch.testing.assert_close(x, y)


def test_singular_raises_solve_error_or_returns_nan():
    A = torch.tensor([[1.0, 2.0, 0.0], [2.0, 4.0, 0.0], [0.0, 0.0, 1.0]], dtype=D)
    S = as_layout(A, "coo").requires_grad_()
    b = torch.ones(3, dtype=D)
    with pytest.raises(idf.SolveError, match="SINGULAR.*lsmr") as e:
        idf.linear_solve(S, b, solver="splu")
    assert e.value.status == idf.Status.SINGULAR
    bg = b.clone().requires_grad_()
    y, info = idf.linear_solve(S, bg, solver="splu", on_failure="nan", return_info=True)
    assert bool(torch.isnan(y).all()) and int(info.status) == idf.Status.SINGULAR
    y.sum().backward()  # a failed solve sends no NaN gradient upstream
    assert bg.grad is None or not bool(torch.isnan(bg.grad).any())
    with pytest.warns(idf.SolveWarning, match="SINGULAR"):
        y = idf.linear_solve(S, b, solver="splu", on_failure="warn")
    assert bool(torch.isnan(y).all())


def test_numerically_singular_is_reported():
    A = torch.tensor([[1.0, 1.0], [1.0, 1.0 + 2.0 ** -52]], dtype=D)  # a tiny pivot, not an exact zero
    b = torch.tensor([1.0, -1.0], dtype=D)
    with pytest.raises(idf.SolveError, match="SINGULAR.*condition estimate"):
        idf.linear_solve(as_layout(A, "coo"), b, solver="splu")
    A[1, 1] = 1.5  # the same pattern, well conditioned: the estimate is small and nothing is raised
    y, info = idf.linear_solve(as_layout(A, "coo"), b, solver="splu", return_info=True)
    assert 1.0 <= float(info.cond) < 10.0
    torch.testing.assert_close(y, torch.linalg.solve(A, b))


def test_bad_inputs_raise_input_error():
    A, b, _ = sparse_system()
    S = as_layout(A, "coo")
    with pytest.raises(idf.InputError, match="sparse"):
        idf.linear_solve(A, b, solver="splu")  # dense A
    with pytest.raises(idf.InputError, match="square"):
        idf.linear_solve(as_layout(A[:5], "coo"), b[:5], solver="splu")
    with pytest.raises(idf.InputError, match="b has shape"):
        idf.linear_solve(S, b[:3], solver="splu")
    with pytest.raises(idf.InputError, match="dtype"):
        idf.linear_solve(S, b.float(), solver="splu")
    with pytest.raises(idf.InputError, match="selection"):
        idf.linear_solve(S, b, solver="splu", selection="min_norm")
    with pytest.raises(idf.InputError, match="NaN"):
        idf.linear_solve(S, b * float("nan"), solver="splu")
    with pytest.raises(idf.InputError, match="vmap"):
        torch.func.vmap(lambda c: idf.linear_solve(S, c, solver="splu"))(b.expand(2, -1))


def test_forward_mode_raises_input_error():
    A, b, _ = sparse_system()
    S = as_layout(A, "coo")
    with pytest.raises(idf.InputError, match="forward mode"):
        torch.func.jvp(lambda c: idf.linear_solve(S, c, solver="splu"), (b,), (torch.ones_like(b),))


def test_float32_smoke():
    A, b, mask = sparse_system(dtype=torch.float32)
    S = as_layout(A, "csr").requires_grad_()
    y = idf.linear_solve(S, b, solver="splu")
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.detach(), torch.linalg.solve(A, b), rtol=1e-5, atol=1e-6)
    _quiet(lambda: y.sum().backward())
    assert S.grad.dtype == torch.float32 and S.grad.layout == torch.sparse_csr


def test_uncoalesced_coo_duplicates_each_get_the_entry_gradient():
    # A = sum of its stored entries, so each duplicate of (i, j) gets the full Ā_ij = −u_i x_j
    idx = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 1]])
    S = torch.sparse_coo_tensor(idx, torch.tensor([2.0, 1.0, 2.0, 0.5], dtype=D), (2, 2),
                                check_invariants=True).requires_grad_()
    b = torch.tensor([1.0, 2.0], dtype=D)
    y = idf.linear_solve(S, b, solver="splu")
    y.sum().backward()
    Ad = S.detach().to_dense().requires_grad_()
    torch.linalg.solve(Ad, b).sum().backward()
    assert not S.grad.is_coalesced() and S.grad._nnz() == 4
    torch.testing.assert_close(S.grad._values(), Ad.grad[idx[0], idx[1]], rtol=1e-12, atol=1e-14)
