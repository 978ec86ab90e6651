"""cone_sparse's SparseGram paths against the dense ``Σ (W⁻ᵀA_k)ᵀ(W⁻ᵀA_k)``: the shared columns through
one row of each block (the exp blocks of a logistic regression) and the general path (blocks that meet the
shared columns in two rows), batched and shared ``A``, dense ``N`` and the elimination's compact layout."""

import pytest
import torch

from implicitdiff.linalg.cone_spec import parse_cones
from implicitdiff.solvers.cone_exp import ExpCone
from implicitdiff.solvers.cone_gram import DataMatrix, NormalMatrix, contiguous, factor_normal, put, solve_normal, take
from implicitdiff.solvers.cone_ipm import _CONES
from implicitdiff.solvers.cone_sparse import SparseGram, SparseProducts

F64 = torch.float64


def _A(B, g, nb=12, d=6, rows_on_d=(0,), shared=False, every=2):
    """``(B or 1, 3·nb + nb, n)``: ``nb`` nonnegative rows (one private column each, plus column ``d + 2j``
    of exp block ``j`` for even ``j``: N_PP's blocks of 3 and of 1 and 2 columns) then ``nb`` exp blocks,
    each on two private columns in all three rows; every ``every``-th block also on the ``d`` shared
    columns, in the rows ``rows_on_d`` (cycled by block where it has one row per block: blocks meeting
    them in different rows)."""
    n = d + 3 * nb
    A = torch.zeros(1 if shared else B, 4 * nb, n, dtype=F64)
    for j in range(nb):
        cols = [d + 2 * nb + j, d + 2 * j] if j % 2 == 0 else [d + 2 * nb + j]
        A[:, j, cols] = torch.randn(A.shape[0], len(cols), generator=g, dtype=F64)
        r = nb + 3 * j
        A[:, r:r + 3, d + 2 * j:d + 2 * j + 2] = torch.randn(A.shape[0], 3, 2, generator=g, dtype=F64)
        if j % every == 0:
            on = rows_on_d if len(rows_on_d) > 1 else ((rows_on_d[0] + j // 2) % 3,)
            for i in on:
                A[:, r + i, :d] = torch.randn(A.shape[0], d, generator=g, dtype=F64)
    return A[0] if shared else A


def _normals(A, B, g):
    spec = parse_cones({"l": 12, "ep": 12})
    s = torch.zeros(B, spec.m, dtype=F64)
    y = torch.zeros(B, spec.m, dtype=F64)
    for v in (s, y):
        v[:, :12] = torch.rand(B, 12, generator=g, dtype=F64) + 0.1
        v[:, 12:] = ExpCone.unit(v[:, 12:].view(B, 12, 3)).reshape(B, -1) * (
            1 + 0.3 * torch.rand(B, 36, generator=g, dtype=F64))
    groups = [(k, size, contiguous(idx)) for k, size, idx in spec.groups()]
    mu = (s * y).sum(-1) / spec.degree
    states = [_CONES[k].scale(take(s, idx), take(y, idx), mu) for k, _, idx in groups]
    Ab = A.expand(B, *A.shape[-2:])
    At = torch.zeros_like(Ab)
    for (kind, _, idx), st in zip(groups, states):
        put(At, idx, _CONES[kind].winv_t(st, take(Ab, idx)))
    ref = At.mT @ At
    normals = [NormalMatrix(DataMatrix(A), groups, _CONES, eliminate) for eliminate in (False, True)]
    return ref, normals, states


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("rows_on_d", [(0,), (1,), (0, 2)])
def test_sparse_gram_equals_the_dense_normal_matrix(shared, rows_on_d):
    g = torch.Generator().manual_seed(len(rows_on_d) + 2 * shared)
    B = 3
    A = _A(B, g, rows_on_d=rows_on_d, shared=shared)
    ref, normals, states = _normals(A, B, g)
    ep = normals[0].pre[1]
    assert isinstance(ep, SparseGram)
    # one row per block on the shared columns (the row may differ by block): that path; two rows: the general one
    assert (ep.vD is not None) == (len(rows_on_d) == 1)
    assert isinstance(normals[1].pre[1].index[0], slice)   # N_DD: one range of the compact layout, added as a view
    dense, first = normals[0](states, B), normals[1](states, B).clone()
    compact = normals[1](states, B)   # the compact layout's buffer, zeroed and reused: the same N again
    assert torch.equal(compact, first)
    plan = normals[1].elimination
    real = plan.slot < sum(plan.sizes)
    scale = float(ref.abs().max())
    assert float((dense - ref).abs().max()) <= 1e-13 * scale
    assert float((compact[:, plan.slot[real]] - ref.view(B, -1)[:, real]).abs().max()) <= 1e-13 * scale


def test_one_row_sparse_gram_on_a_subset_of_the_batch():
    g = torch.Generator().manual_seed(9)
    B, keep = 4, torch.tensor([3, 1])
    A = _A(B, g)
    _, normals, _ = _normals(A, B, g)
    data = DataMatrix(A).subset(keep)
    sub = normals[0].subset(data, keep)
    ref, _, states = _normals(A[keep], 2, g)
    assert sub.pre[1].vD is not None
    got = sub(states, 2)
    assert float((got - ref).abs().max()) <= 1e-13 * float(ref.abs().max())


def test_sparse_products_with_int32_indices_equal_the_dense_ones():
    g = torch.Generator().manual_seed(3)
    B, m, n = 4, 30, 20
    A = torch.randn(B, m, n, generator=g, dtype=F64) * (torch.rand(m, n, generator=g) < 0.15)
    sp = SparseProducts(A, (A != 0).any(0))
    assert sp.a.col_indices().dtype == sp.at.crow_indices().dtype == torch.int32
    v, u = torch.randn(B, 3, n, generator=g, dtype=F64), torch.randn(B, m, generator=g, dtype=F64)
    assert float((sp.mv(v) - v @ A.mT).abs().max()) <= 1e-14 * float((v @ A.mT).abs().max())
    assert float((sp.rmv(u) - (u[:, None] @ A)[:, 0]).abs().max()) <= 1e-14 * float(u.abs().max() * A.abs().max() * m)


def test_elimination_fallback_keeps_the_factor_of_the_elements_that_did_not_fail():
    # the elimination computes W = L_P⁻¹N_PD where N_PD lies in the compact N (a buffer that the next N
    # reuses): where one element's N is indefinite, factor_normal builds N again and factors it shifted;
    # the other elements keep their first factor (the same solves as without the failure)
    g = torch.Generator().manual_seed(11)
    B = 3
    A = _A(B, g)
    _, normals, states = _normals(A, B, g)
    normal, data = normals[1], normals[1].data

    def make_N(fail):
        G = normal(states, B)
        if fail:
            plan.diagonals(G)[1][0] -= 1e3 * float(G.abs().max())
        return G
    plan = normal.elimination
    R = torch.randn(B, 2, A.shape[-1], generator=g, dtype=F64)
    ok = solve_normal(factor_normal(lambda: make_N(False), data, 0, plan), R, R[..., :0])[0]
    fac = factor_normal(lambda: make_N(True), data, 0, plan)
    got = solve_normal(fac, R, R[..., :0])[0]
    assert bool(torch.isfinite(got).all())
    assert float((got[1:] - ok[1:]).abs().max()) <= 1e-12 * float(ok[1:].abs().max())
    assert float((got[0] - ok[0]).abs().max()) > 1e-6 * float(ok[0].abs().max())   # element 0: another N


@pytest.mark.parametrize("dense_term", [False, True])
def test_elimination_solve_equals_the_dense_solve(dense_term, monkeypatch):
    # N in the compact layout with padded blocks of N_PP (3 columns and 1 or 2; the padding of a block of 2
    # repeats a column coupled to D), its terms added there or (dense_term: the exp blocks' Gram formed
    # dense, then gathered by compact) the factorization and solve against a dense solve of the shifted N
    from implicitdiff.solvers import cone_gram
    if dense_term:
        sparse_gram = cone_gram.sparse_gram
        monkeypatch.setattr(cone_gram, "sparse_gram",
                            lambda rows, pattern, n, cost=None: None if pattern.dim() == 3 else sparse_gram(rows, pattern, n, cost))
    g = torch.Generator().manual_seed(13)
    B = 3
    A = _A(B, g, every=1)
    ref, normals, states = _normals(A, B, g)
    normal = normals[1]
    plan = normal.elimination
    assert bool((~plan.valid).any()) and isinstance(normal.pre[1], SparseGram) != dense_term
    R = torch.randn(B, 2, A.shape[-1], generator=g, dtype=F64)
    got = solve_normal(factor_normal(lambda: normal(states, B), normal.data, 0, plan), R, R[..., :0])[0]
    n = ref.shape[-1]
    want = torch.linalg.solve(ref + torch.finfo(F64).eps ** 0.75 * torch.eye(n, dtype=F64), R.mT).mT
    assert float((got - want).abs().max()) <= 1e-10 * float(want.abs().max())
