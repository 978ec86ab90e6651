"""Properties of every solution map, on random problems drawn by hypothesis (small sizes, float64).

* every valid selection ``y(b)`` of a full-row-rank ``A`` satisfies ``A dy/db = I`` (the seed note);
* ``ambiguity(A, ȳ) = ‖P_null(A) ȳ‖ / ‖ȳ‖`` is ~0 exactly when the ``b``-gradients of different
  selections agree, and the selections differ only through ``P_null(A) ȳ``;
* each selection's defining optimality condition holds.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch.func import jacrev

import implicitdiff as idf
from implicitdiff import Nearest, Pinned

F64 = torch.float64
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])

seeds = st.integers(0, 2**31 - 1)
conds = st.floats(1.0, 20.0)


def _weights(g, n, kind):
    if kind == "vector":
        return torch.rand(n, generator=g, dtype=F64) * 4.8 + 0.2
    M = torch.randn(n, n, generator=g, dtype=F64)
    return M @ M.T + 0.2 * torch.eye(n, dtype=F64)


def _pinned(g, A):
    """A Pinned selection on a random set of n − m coordinates whose complement is well conditioned."""
    m, n = A.shape
    perm = torch.randperm(n, generator=g)
    index, free = perm[: n - m], perm[n - m:]
    assume(float(torch.linalg.cond(A[:, free])) < 1e4)
    return Pinned(index.tolist(), torch.randn(n - m, generator=g, dtype=F64))


def _wide_selections(g, A):
    n = A.shape[-1]
    return {
        "min_norm": "min_norm",
        "exact": "exact",
        "auto": "auto",
        "nearest_vector": Nearest(torch.randn(n, generator=g, dtype=F64), _weights(g, n, "vector")),
        "nearest_matrix": Nearest(torch.randn(n, generator=g, dtype=F64), _weights(g, n, "matrix")),
        "nearest_plain": Nearest(torch.randn(n, generator=g, dtype=F64)),
        "pinned": _pinned(g, A),
    }


def _null_projector(A):
    return torch.eye(A.shape[-1], dtype=F64) - torch.linalg.pinv(A) @ A


def _bbar(A, b, selection, ybar):
    b = b.detach().requires_grad_()
    return torch.autograd.grad(idf.linear_solve(A, b, selection=selection), b, ybar)[0]


# ============================================================================ A dy/db = I
@SETTINGS
@given(m=st.integers(1, 3), extra=st.integers(0, 3), seed=seeds, cond=conds)
def test_every_selection_is_a_right_inverse(mk, m, extra, seed, cond):
    g = torch.Generator().manual_seed(seed)
    n = m + extra
    A = mk.well_conditioned(g, m, n, cond=cond)
    b = torch.randn(m, generator=g, dtype=F64)
    for name, sel in _wide_selections(g, A).items():
        J = jacrev(lambda b: idf.linear_solve(A, b, selection=sel))(b)
        assert J.shape == (n, m)
        torch.testing.assert_close(A @ J, torch.eye(m, dtype=F64), rtol=0, atol=1e-10, msg=name)
        y = idf.linear_solve(A, b, selection=sel)
        torch.testing.assert_close(A @ y, b, rtol=0, atol=1e-10, msg=name)


@SETTINGS
@given(n=st.integers(1, 3), extra=st.integers(1, 3), seed=seeds, cond=conds)
def test_tall_selections_all_give_the_pseudo_inverse(mk, n, extra, seed, cond):
    # full column rank: the least-squares solution is unique, so every selection is A⁺ and
    # A dy/db = A A⁺ is the orthogonal projector onto range(A)
    g = torch.Generator().manual_seed(seed)
    m = n + extra
    A = mk.well_conditioned(g, m, n, cond=cond)
    b = torch.randn(m, generator=g, dtype=F64)
    pinv = torch.linalg.pinv(A)
    for sel in ("auto", "least_squares", "min_norm", Nearest(torch.randn(n, generator=g, dtype=F64),
                                                             _weights(g, n, "vector"))):
        J = jacrev(lambda b: idf.linear_solve(A, b, selection=sel))(b)
        torch.testing.assert_close(J, pinv, rtol=0, atol=1e-10)
        torch.testing.assert_close(J @ A, torch.eye(n, dtype=F64), rtol=0, atol=1e-10)


# ============================================================================ ambiguity
@SETTINGS
@given(n=st.integers(1, 4), extra=st.integers(0, 2), seed=seeds, cond=conds)
def test_full_column_rank_has_no_ambiguity_and_all_selections_agree(mk, n, extra, seed, cond):
    g = torch.Generator().manual_seed(seed)
    m = n + extra
    A = mk.well_conditioned(g, m, n, cond=cond)
    b = torch.randn(m, generator=g, dtype=F64)
    ybar = torch.randn(n, generator=g, dtype=F64)
    assert float(idf.ambiguity(A, ybar)) < 1e-12
    sels = ["min_norm", "auto", Nearest(torch.randn(n, generator=g, dtype=F64), _weights(g, n, "matrix"))]
    sels += [Pinned([], 0.0), "exact"] if m == n else ["least_squares"]
    grads = [_bbar(A, b, s, ybar) for s in sels]
    for gb in grads[1:]:
        torch.testing.assert_close(gb, grads[0], rtol=1e-9, atol=1e-11)


@SETTINGS
@given(m=st.integers(1, 3), extra=st.integers(1, 3), seed=seeds, cond=conds, in_row_space=st.booleans(),
       null_part=st.floats(0.3, 3.0))
def test_ambiguity_is_zero_iff_the_selections_agree(mk, m, extra, seed, cond, in_row_space, null_part):
    g = torch.Generator().manual_seed(seed)
    n = m + extra
    A = mk.well_conditioned(g, m, n, cond=cond)
    b = torch.randn(m, generator=g, dtype=F64)
    sels = _wide_selections(g, A)
    P = _null_projector(A)
    row = A.T @ torch.randn(m, generator=g, dtype=F64)
    null = P @ torch.randn(n, generator=g, dtype=F64)
    null = null / null.norm() * row.norm() * null_part
    ybar = row if in_row_space else row + null

    amb = float(idf.ambiguity(A, ybar))
    torch.testing.assert_close(torch.tensor(amb, dtype=F64), (P @ ybar).norm() / ybar.norm(), rtol=1e-8,
                               atol=1e-12)
    grads = {k: _bbar(A, b, s, ybar) for k, s in sels.items()}
    spread = max(float((u - grads["min_norm"]).norm()) for u in grads.values()) / float(ybar.norm())
    agree = spread < 1e-8
    assert agree == (amb < 1e-8), (amb, spread)
    if not in_row_space:
        assert amb > 0.05
        # the selections differ only through the null-space part of ȳ (min_norm ignores it entirely)
        assert float(_bbar(A, b, "min_norm", null).norm()) < 1e-10 * float(null.norm())
        for k, s in sels.items():
            torch.testing.assert_close(grads[k] - grads["min_norm"], _bbar(A, b, s, null), rtol=1e-8,
                                       atol=1e-10, msg=k)


@SETTINGS
@given(m=st.integers(1, 3), extra=st.integers(0, 3), r=st.integers(0, 3), seed=seeds, k=st.integers(1, 2))
def test_ambiguity_is_the_relative_null_space_component(mk, m, extra, r, seed, k):
    # any rank (r ≤ min(m, n)), several cotangent columns, a batch of two
    g = torch.Generator().manual_seed(seed)
    n = m + extra
    r = min(r, m, n)
    A = torch.stack([mk.sv(g, m, n, torch.linspace(2.0, 1.0, r)) for _ in range(2)])
    Ybar = torch.randn(2, n, k, generator=g, dtype=F64)
    amb = idf.ambiguity(A, Ybar)
    assert amb.shape == (2,)
    expected = torch.linalg.matrix_norm(_null_projector(A) @ Ybar) / torch.linalg.matrix_norm(Ybar)
    torch.testing.assert_close(amb, expected, rtol=1e-8, atol=1e-12)
    assert bool(((amb >= 0) & (amb <= 1 + 1e-12)).all())


# ============================================================================ optimality conditions
@SETTINGS
@given(m=st.integers(1, 3), extra=st.integers(1, 3), seed=seeds, cond=conds)
def test_each_selection_satisfies_its_optimality_condition(mk, m, extra, seed, cond):
    g = torch.Generator().manual_seed(seed)
    n = m + extra
    A = mk.well_conditioned(g, m, n, cond=cond)
    b = torch.randn(m, generator=g, dtype=F64)
    P = _null_projector(A)
    sels = _wide_selections(g, A)
    # min_norm: y ⟂ null(A)
    y = idf.linear_solve(A, b, selection="min_norm")
    assert float((P @ y).norm()) < 1e-10 * max(1.0, float(y.norm()))
    # Nearest: W (y − y0) ⟂ null(A), i.e. no feasible direction decreases ‖y − y0‖_W
    for key in ("nearest_vector", "nearest_matrix", "nearest_plain"):
        sel = sels[key]
        y = idf.linear_solve(A, b, selection=sel)
        W = torch.eye(n, dtype=F64) if sel.weight is None else (
            torch.diag(sel.weight) if sel.weight.dim() == 1 else sel.weight)
        grad = W @ (y - sel.y0)
        assert float((P @ grad).norm()) < 1e-9 * max(1.0, float(grad.norm())), key
    # Pinned: the pinned coordinates hold their values exactly
    sel = sels["pinned"]
    y = idf.linear_solve(A, b, selection=sel)
    torch.testing.assert_close(y[sel.index], sel.values, rtol=0, atol=0)


@pytest.mark.parametrize("k", [1, 3])
def test_ambiguity_accepts_operators_and_matrix_cotangents(mk, g, k):
    A = mk.well_conditioned(g, 2, 4)
    Ybar = mk.randn(g, 4, k)
    ref = torch.linalg.matrix_norm(_null_projector(A) @ Ybar) / torch.linalg.matrix_norm(Ybar)
    torch.testing.assert_close(idf.ambiguity(idf.linalg.LinearOperator.from_dense(A), Ybar), ref, rtol=1e-10,
                               atol=0)
    torch.testing.assert_close(idf.ambiguity(A.to_sparse(), Ybar), ref, rtol=1e-10, atol=0)
    assert float(idf.ambiguity(A, torch.zeros(4, dtype=F64))) == 0.0


def test_ambiguity_errors():
    with pytest.raises(idf.InputError, match=r"cotangent must have the solution's shape"):
        idf.ambiguity(torch.ones(2, 4, dtype=F64), torch.ones(2, dtype=F64))
    with pytest.raises(idf.InputError, match=r"A must have shape"):
        idf.ambiguity(torch.ones(4, dtype=F64), torch.ones(4, dtype=F64))
    with pytest.raises(idf.InputError, match=r"cotangent has dtype torch.float32 but A has torch.float64"):
        idf.ambiguity(torch.ones(2, 4, dtype=F64), torch.ones(4))
