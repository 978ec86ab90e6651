"""The interior point's normal matrix and data matrix (cone_gram): the structured second-order-cone
Gram and the one from ``A``'s zero pattern (cone_sparse: shared and private columns, batched, on a
subset of the batch, the dense fallback) against the dense ``(W⁻ᵀA)ᵀ(W⁻ᵀA)``, a shared ``A`` against
the same matrix batched, and the solver's status at a tolerance below its arithmetic's reach (float64)."""

import pytest
import torch

import implicitdiff as idf
from implicitdiff import SolveError, Status
from implicitdiff.linalg.cone_spec import parse_cones, svec
from implicitdiff.solvers.cone_exp import ExpCone
from implicitdiff.solvers.cone_gram import (SOC_STRUCTURED_MIN, DataMatrix, NormalMatrix, contiguous, factor_normal, put,
                                           solve_normal, take)
from implicitdiff.solvers.cone_ipm import _CONES, ConeInteriorPoint
from implicitdiff.solvers.cone_sparse import (ELIM_MAX_BLOCK, PRIVATE_MAX_BLOCKS, Elimination, SparseGram, _block_tmul,
                                             _substitute_, elimination)

F64 = torch.float64
CONES = {"z": 2, "l": 3, "q": [9, 3, 9, 12], "s": [3], "ep": 2}  # structured (9, 12) and generic (3) SOC blocks


def _interior(spec, B, g, spread=1.0):
    """A random point in the interior of K (and of K*: the symmetric cones are self-dual), ``(B, m)``."""
    v = torch.zeros(B, spec.m, dtype=F64)
    for kind, _, idx in spec.groups():
        if kind == "l":
            v[:, idx] = torch.rand(B, idx.numel(), generator=g, dtype=F64) * spread + 1e-3
        elif kind == "q":
            u = torch.randn(B, *idx.shape, generator=g, dtype=F64) * spread
            u[..., 0] = u[..., 1:].norm(dim=-1) * (1 + torch.rand(B, idx.shape[0], generator=g, dtype=F64) * 1e-3) + 1e-9
            v[:, idx] = u
        elif kind == "s":
            k = int(round(((8 * idx.shape[1] + 1) ** 0.5 - 1) / 2))
            M = torch.randn(B, idx.shape[0], k, k, generator=g, dtype=F64)
            v[:, idx] = svec(M @ M.mT + 1e-3 * torch.eye(k, dtype=F64))
        else:
            v[:, idx] = ExpCone.unit(v[:, idx]) * (1 + 0.1 * torch.rand(B, idx.shape[0], 1, generator=g, dtype=F64))
    return v


def _states(spec, s, y):
    groups = [(k, size, contiguous(idx)) for k, size, idx in spec.groups()]
    mu = (s[:, spec.z:] * y[:, spec.z:]).sum(-1) / spec.degree
    return groups, [_CONES[k].scale(take(s, idx), take(y, idx), mu) for k, _, idx in groups]


def _dense_normal(A, spec, groups, states):
    """``Σ (W⁻ᵀA_k)ᵀ(W⁻ᵀA_k)`` from each cone's ``winv_t`` on the rows of a batched ``A`` (the reference)."""
    At = torch.zeros_like(A)
    for (kind, _, idx), st in zip(groups, states):
        put(At, idx, _CONES[kind].winv_t(st, take(A, idx)))
    return At.mT @ At


@pytest.mark.parametrize("shared", [False, True])
def test_structured_normal_matrix_equals_the_dense_one(shared):
    g = torch.Generator().manual_seed(0)
    spec = parse_cones(CONES)
    B, n = 3, 7
    A = torch.randn(spec.m, n, generator=g, dtype=F64)
    A = A.expand(B, spec.m, n) if shared else A + 0.1 * torch.randn(B, spec.m, n, generator=g, dtype=F64)
    # far from the central path: the scaling is badly conditioned (‖w‖ large), as near the solution
    s, y = _interior(spec, B, g, 3.0), _interior(spec, B, g, 3.0)
    groups, states = _states(spec, s, y)
    data = DataMatrix(A)
    assert data.shared is shared
    normal = NormalMatrix(data, groups, _CONES)
    structured = [size for (kind, size, _), pre in zip(groups, normal.pre) if pre is not None]
    assert structured == [9, 12] and all(k >= SOC_STRUCTURED_MIN for k in structured)
    N = normal(states, B)
    ref = _dense_normal(A.contiguous(), spec, groups, states)
    assert torch.allclose(N, N.mT, rtol=0, atol=1e-12 * float(ref.abs().max()))
    err = float((N - ref).abs().max() / ref.abs().max())
    assert err < 1e-11, err


@pytest.mark.parametrize("shared", [False, True])
def test_structured_term_with_a_sparse_P_equals_the_dense_one(shared):
    # ‖x‖ ≤ t on a variable's rows (cvxpy's canonical form: −I under a t row): P_k is diagonal, added on
    # its nonzeros; next to a dense structured block and a nonnegative one
    g = torch.Generator().manual_seed(5)
    spec = parse_cones({"l": 2, "q": [13, 10]})
    B, n = 3, 11
    A = torch.randn(B, spec.m, n, generator=g, dtype=F64)
    A[:, 15:] = 0.0
    A[:, 15, 0] = -1.0
    A[:, 16:, 2:] = -torch.eye(9, dtype=F64) * torch.rand(B, 1, 1, generator=g, dtype=F64)
    A = A[0] if shared else A
    s, y = _interior(spec, B, g, 3.0), _interior(spec, B, g, 3.0)
    groups, states = _states(spec, s, y)
    normal = NormalMatrix(DataMatrix(A), groups, _CONES)
    flats = [pre[3] for (kind, _, _), pre in zip(groups, normal.pre) if kind == "q"]
    assert flats[0] is None and flats[1].numel() == 10               # the diagonal's 9 and (0, 0)
    N = normal(states, B)
    ref = _dense_normal(A.expand(B, spec.m, n).contiguous(), spec, groups, states)
    assert float((N - ref).abs().max() / ref.abs().max()) < 1e-12


@pytest.mark.parametrize("shared", [False, True])
def test_sparse_P_from_each_rows_nonzeros_equals_the_dense_one(shared):
    # three second-order blocks in one group whose rows have one or two nonzeros (a t row, differences of
    # neighbouring variables): P_k on its nonzeros, from the products of each row's own nonzeros
    g = torch.Generator().manual_seed(11)
    spec = parse_cones({"l": 2, "q": [10, 10, 10]})
    B, n = 3, 60
    A = torch.zeros(B, spec.m, n, dtype=F64)
    A[:, :2, :4] = torch.randn(B, 2, 4, generator=g, dtype=F64)
    for j in range(3):
        r0, c0 = 2 + 10 * j, 20 * j
        A[:, r0, c0] = -1.0
        for i in range(1, 10):
            A[:, r0 + i, c0 + 2 * i] = torch.randn(B, generator=g, dtype=F64)
            if i % 2:
                A[:, r0 + i, c0 + 2 * i + 1] = torch.randn(B, generator=g, dtype=F64)
    A = A[0] if shared else A
    s, y = _interior(spec, B, g, 3.0), _interior(spec, B, g, 3.0)
    groups, states = _states(spec, s, y)
    normal = NormalMatrix(DataMatrix(A), groups, _CONES, eliminate=False)  # N dense (n × n)
    (q,) = [pre for (kind, _, _), pre in zip(groups, normal.pre) if kind == "q"]
    assert q[3].numel() == 3 * (10 + 5 * 3)                          # per block: t, 9 diagonal, 5 pairs
    N = normal(states, B)
    ref = _dense_normal(A.expand(B, spec.m, n).contiguous(), spec, groups, states)
    assert float((N - ref).abs().max() / ref.abs().max()) < 1e-12


def test_structured_products_made_by_the_caller_give_the_same_normal_matrix():
    # a batched A with at most RIDE_ALONG_MAX structured blocks: the interior point makes A_kᵀ(Jw) in its
    # own Aᵀ product (NormalMatrix.columns) and passes them in
    g = torch.Generator().manual_seed(3)
    spec = parse_cones({"l": 3, "q": [9, 12, 3], "s": [3]})
    B, n = 4, 7
    A = torch.randn(B, spec.m, n, generator=g, dtype=F64)
    s, y = _interior(spec, B, g, 3.0), _interior(spec, B, g, 3.0)
    groups, states = _states(spec, s, y)
    data = DataMatrix(A)
    normal = NormalMatrix(data, groups, _CONES)
    cols = normal.columns(states, spec.m)
    assert cols.shape == (B, 2, spec.m)
    assert [pre[0] is None for pre in normal.pre if isinstance(pre, tuple)] == [True, True]  # A_k not kept
    N = normal(states, B, data.rmv(cols)).clone()
    ref = _dense_normal(A, spec, groups, states)
    assert float((N - ref).abs().max() / ref.abs().max()) < 1e-11
    assert torch.allclose(N, normal(states, B), rtol=0, atol=1e-13 * float(ref.abs().max()))
    assert NormalMatrix(DataMatrix(A[0]), groups, _CONES).columns(states, spec.m) is None  # shared: its own product


@pytest.mark.parametrize("reuse", [False, True])
def test_factor_normal_shifts_in_place_and_retries_an_indefinite_matrix(reuse):
    g = torch.Generator().manual_seed(6)
    n = 6
    X = torch.randn(2, 3, n, generator=g, dtype=F64)
    N = X.mT @ X + torch.eye(n, dtype=F64)
    N[1] -= (1 + 1e-11) * torch.eye(n, dtype=F64)       # rank 3, shifted below 0: Cholesky fails
    eps = torch.finfo(F64).eps
    buf = torch.empty_like(N)                           # reuse: every N in one memory, as NormalMatrix does
    kind, (plan, (L,)) = factor_normal((lambda: buf.copy_(N)) if reuse else N.clone, DataMatrix(X[0].mT), 0)
    assert kind == "chol" and plan is None
    big = eps ** 0.5 * N[1].diagonal().abs().max().clamp(min=1.0)
    for i, shift in ((0, eps ** 0.75), (1, big)):      # N + eps^¾ I; the failed element N + √eps·max|diag| I
        ref = N[i] + shift * torch.eye(n, dtype=F64)
        assert torch.allclose(L[i] @ L[i].mT, ref, rtol=0, atol=1e-13), i


@pytest.mark.parametrize("shared", [False, True])
def test_factor_normal_lu_with_a_zero_cone_solves_the_quasi_definite_system(shared):
    # the LU is factored in the column-major buffer K is assembled in: against a dense solve of K
    g = torch.Generator().manual_seed(9)
    B, n, z = 3, 7, 2
    X = torch.randn(B, 10, n, generator=g, dtype=F64)
    N = X.mT @ X
    A = torch.randn(z + 4, n, generator=g, dtype=F64)
    data = DataMatrix(A if shared else A.expand(B, z + 4, n).clone())
    kind, F = factor_normal(N.clone, data, z)
    assert kind == "lu"
    delta = torch.finfo(F64).eps ** 0.75
    Az = A[:z].expand(B, z, n)
    K = torch.cat([torch.cat([N + delta * torch.eye(n, dtype=F64), Az.mT], -1),
                   torch.cat([Az, -delta * torch.eye(z, dtype=F64).expand(B, z, z)], -1)], -2)
    R = torch.randn(B, 2, n + z, generator=g, dtype=F64)
    p, qz = solve_normal((kind, F), R[..., :n], R[..., n:])
    ref = torch.linalg.solve(K, R.mT).mT
    assert torch.allclose(torch.cat([p, qz], -1), ref, rtol=0, atol=1e-10 * float(ref.abs().max()))


def test_data_matrix_products_shared_and_batched():
    g = torch.Generator().manual_seed(1)
    A = torch.randn(5, 3, generator=g, dtype=F64)
    v, u = torch.randn(4, 3, generator=g, dtype=F64), torch.randn(4, 5, generator=g, dtype=F64)
    for M in (DataMatrix(A), DataMatrix(A.expand(4, 5, 3)), DataMatrix(A.expand(4, 5, 3).clone())):
        assert torch.allclose(M.mv(v), v @ A.T, atol=1e-14) and torch.allclose(M.rmv(u), u @ A, atol=1e-14)
    assert DataMatrix(A.expand(4, 5, 3)).shared and not DataMatrix(A.expand(4, 5, 3).clone()).shared


@pytest.mark.parametrize("rest,scattered", [(True, False), (False, False), (True, True)])
def test_dense_block_data_matrix_products_equal_the_dense_ones(rest, scattered):
    # dense rows on some columns (a data block), the other rows one nonzero each (an identity, or none):
    # the products on the block and the others' nonzeros; the block on ranges (slices) or scattered
    g = torch.Generator().manual_seed(4)
    B, m, n = 3, 12, 8
    A = torch.zeros(B, m, n, dtype=F64)
    A[:, 1:6, 2:] = torch.randn(B, 5, n - 2, generator=g, dtype=F64)
    if rest:
        A[:, 6:, 2:] = -torch.eye(6, dtype=F64) * torch.rand(B, 1, 1, generator=g, dtype=F64)
        A[:, 0, 0] = 1.0
    if scattered:
        A = A[:, torch.randperm(m, generator=g)][:, :, torch.randperm(n, generator=g)]
    data = DataMatrix(A)
    assert data.sparse is None and data.block is not None and (data.block[3] is not None) is rest
    assert all(isinstance(ix, slice) is not scattered for ix in data.block[:2])
    v, u = torch.randn(B, n, generator=g, dtype=F64), torch.randn(B, m, generator=g, dtype=F64)
    V, U = torch.randn(B, 3, n, generator=g, dtype=F64), torch.randn(B, 3, m, generator=g, dtype=F64)
    keep = torch.tensor([2, 0])
    for M, idx in ((data, torch.arange(B)), (data.subset(keep), keep)):
        Ai = A[idx]
        assert torch.allclose(M.mv(v[idx]), (Ai @ v[idx, :, None])[..., 0], rtol=0, atol=1e-14)
        assert torch.allclose(M.rmv(u[idx]), (Ai.mT @ u[idx, :, None])[..., 0], rtol=0, atol=1e-14)
        assert torch.allclose(M.mv(V[idx]), V[idx] @ Ai.mT, rtol=0, atol=1e-14)
        assert torch.allclose(M.rmv(U[idx]), U[idx] @ Ai, rtol=0, atol=1e-14)
    assert DataMatrix(torch.randn(B, m, n, generator=g, dtype=F64)).block is None  # dense: the whole A


def test_sparse_data_matrix_products_equal_the_dense_ones():
    g = torch.Generator().manual_seed(7)
    A = torch.randn(4, 30, 20, generator=g, dtype=F64) * (torch.rand(30, 20, generator=g) < 0.1)
    A[1, 0, 0] = 2.0                                   # a nonzero of one element only: in the pattern
    data = DataMatrix(A)
    assert data.sparse is not None and DataMatrix(torch.randn(4, 30, 20, dtype=F64)).sparse is None
    keep = torch.tensor([1, 3])
    for M, Ab in ((data, A), (data.subset(keep), A[keep])):
        B = Ab.shape[0]
        v, u = torch.randn(B, 20, generator=g, dtype=F64), torch.randn(B, 30, generator=g, dtype=F64)
        V, U = torch.randn(B, 2, 20, generator=g, dtype=F64), torch.randn(B, 2, 30, generator=g, dtype=F64)
        for got, ref in ((M.mv(v), (Ab @ v[..., None])[..., 0]), (M.rmv(u), (Ab.mT @ u[..., None])[..., 0]),
                         (M.mv(V), V @ Ab.mT), (M.rmv(U), U @ Ab)):
            assert got.shape == ref.shape and torch.allclose(got, ref, rtol=0, atol=1e-13)


def _mixed_problem(B, g):
    """A feasible, bounded program on every cone: x ∈ Rⁿ, equalities, and each cone's slack ``b − Ax``
    interior at x = 0 (``b`` interior), with a cost ``c = −Aᵀy₀`` for an interior ``y₀`` (dual feasible)."""
    spec = parse_cones(CONES)
    n = 6
    A = torch.randn(spec.m, n, generator=g, dtype=F64)
    b = _interior(spec, B, g) + 0.5 * _interior(spec, B, g)
    b[:, : spec.z] = 0.0
    y0 = _interior(spec, B, g) + _interior(spec, B, g)
    y0[:, : spec.z] = torch.randn(B, spec.z, generator=g, dtype=F64)
    c = -(y0 @ A)
    return spec, A, b, c


def test_shared_A_equals_the_same_matrix_batched():
    g = torch.Generator().manual_seed(2)
    spec, A, b, c = _mixed_problem(4, g)
    solver = ConeInteriorPoint(rtol=1e-9)
    shared = solver.solve(A, b, c, spec)
    expanded = solver.solve(A.expand(4, *A.shape), b, c, spec)
    batched = solver.solve(A.expand(4, *A.shape).clone(), b, c, spec)
    assert shared.status.tolist() == [Status.SUCCESS] * 4
    for r in (expanded, batched):
        assert r.status.tolist() == shared.status.tolist() and r.iterations.tolist() == shared.iterations.tolist()
        for a, b_ in zip(r[:3], shared[:3]):  # same iterations; rounding differs (one matmul vs a bmm)
            assert torch.allclose(a, b_, rtol=0, atol=1e-8 * (1 + float(b_.abs().max())))
    # the solution: primal and dual feasible, complementary
    x, y, s = shared.x, shared.y, shared.s
    assert (x @ A.T + s - b).abs().max() < 1e-7 and (y @ A + c).abs().max() < 1e-7
    assert ((c * x).sum(-1) + (b * y).sum(-1)).abs().max() < 1e-6


def test_cone_program_with_a_shared_matrix_float32_and_gradients():
    g = torch.Generator().manual_seed(3)
    spec, A, b, c = _mixed_problem(3, g)
    cones = dict(CONES)
    A.requires_grad_(True)
    Ab = A.detach().expand(3, *A.shape).clone().requires_grad_(True)
    x, y, s = idf.cone_program(A, b, c, cones)                       # A shared by the batch
    xb, yb, sb = idf.cone_program(Ab, b, c, cones)
    assert torch.allclose(x, xb, atol=1e-9) and torch.allclose(y, yb, atol=1e-9)
    w = torch.randn(x.shape, generator=g, dtype=F64)
    (gA,) = torch.autograd.grad((w * x).sum(), A)
    (gAb,) = torch.autograd.grad((w * xb).sum(), Ab)
    assert torch.allclose(gA, gAb.sum(0), rtol=1e-8, atol=1e-10)     # a shared input: the sum over the batch
    # float32 inputs: solved in float64 at the same default tolerance (1e-8), returned in float32
    A32, b32, c32 = A.detach().float(), b.float(), c.float()
    x32 = idf.cone_program(A32, b32, c32, cones)[0]
    x64 = idf.cone_program(A32.double(), b32.double(), c32.double(), cones)[0]
    assert x32.dtype == torch.float32 and torch.allclose(x32.double(), x64, rtol=0, atol=1e-6)
    assert torch.allclose(x32.double(), x.detach(), atol=1e-2)


def test_gradient_to_a_shared_matrix_against_finite_differences():
    g = torch.Generator().manual_seed(5)
    A, b, c, cones = _robust_least_squares(3, g)
    A = A[0].clone().requires_grad_(True)                            # one F for the batch; g per element
    x = idf.cone_program(A, b, c, cones)[0]
    w = torch.randn(x.shape, generator=g, dtype=F64)
    (gA,) = torch.autograd.grad((w * x).sum(), A)
    for _ in range(2):
        d = torch.randn(A.shape, generator=g, dtype=F64)
        d[A == 0] = 0.0                                             # keep the cone structure's zeros
        fds = []
        for h in (1e-5, 5e-6):
            with torch.no_grad():
                xp = idf.cone_program(A + h * d, b, c, cones, rtol=1e-10)[0]
                xm = idf.cone_program(A - h * d, b, c, cones, rtol=1e-10)[0]
            fds.append(float((w * (xp - xm)).sum() / (2 * h)))
        assert abs(fds[0] - fds[1]) <= 1e-7 * max(1.0, abs(fds[0]))   # the differences are converged
        assert abs(float((gA * d).sum()) - fds[1]) <= 1e-6 * max(1.0, abs(fds[1]))


def _robust_least_squares(B, g, n=10, N=15, rho=1.0):
    """min ‖Fx − g‖ + ρ‖x‖ as a cone program in (x, t₁, t₂): two second-order cones."""
    F = torch.randn(B, N, n, generator=g, dtype=F64)
    gv = torch.randn(B, N, generator=g, dtype=F64)
    m, nv = 1 + N + 1 + n, n + 2
    A = torch.zeros(B, m, nv, dtype=F64)
    b = torch.zeros(B, m, dtype=F64)
    A[:, 0, n] = -1.0                   # (t₁, Fx − g) ∈ Q: rows t₁ − 0, g − Fx
    A[:, 1:1 + N, :n] = F
    b[:, 1:1 + N] = gv
    A[:, 1 + N, n + 1] = -1.0           # (t₂, x) ∈ Q
    A[:, 2 + N:, :n] = -torch.eye(n, dtype=F64)
    c = torch.zeros(B, nv, dtype=F64)
    c[:, n], c[:, n + 1] = 1.0, rho
    return A, b, c, {"q": [1 + N, 1 + n]}


def test_a_tolerance_beyond_reach_stops_with_a_reported_status():
    # rtol = 1e-12 is below what the interior point's arithmetic reaches on these SOCPs (~1e-11): the
    # elements must end SUCCESS or with a named failure and a finite best iterate — never NaN, never
    # NONFINITE (which is for non-finite data)
    g = torch.Generator().manual_seed(4)
    A, b, c, cones = _robust_least_squares(4, g)
    r = ConeInteriorPoint(rtol=1e-12).solve(A, b, c, parse_cones(cones))
    assert set(r.status.tolist()) <= {Status.SUCCESS, Status.BREAKDOWN, Status.MAX_ITERATIONS}
    assert torch.isfinite(r.x).all() and torch.isfinite(r.y).all() and torch.isfinite(r.residual).all()
    assert (r.residual < 1e-9).all()  # the best iterate is returned: accurate to near the arithmetic's limit
    x, y, s, info = idf.cone_program(A, b, c, cones, rtol=1e-12, on_failure="nan", return_info=True)
    assert not (info.status == Status.NONFINITE).any()
    assert torch.isfinite(x[info.status == Status.SUCCESS]).all()
    if not bool((info.status == Status.SUCCESS).all()):
        with pytest.raises(SolveError, match="BREAKDOWN|MAX_ITERATIONS"):
            idf.cone_program(A, b, c, cones, rtol=1e-12)
    x8 = idf.cone_program(A, b, c, cones)[0]  # the default tolerance converges
    assert torch.allclose(x[info.status == Status.SUCCESS], x8[info.status == Status.SUCCESS], atol=1e-7)


# -- the normal matrix from A's zero pattern (cone_sparse) ------------------------------------
# an exp-cone group whose blocks share the first D columns (like a logistic regression's weights),
# nonnegative rows, small SOC blocks (generic) and a large one (structured or sparse), a PSD block
SPARSE_CONES = {"l": 6, "q": [3, 3, 9], "s": [2], "ep": 8}


def _sparse_A(spec, B, g, n=41, d=5, drop=0.2):
    """``(B, m, n)``: every block touches a few columns of its own, the exp blocks also the first ``d``
    columns (only half of them: blocks with and without shared columns); a fraction ``drop`` of the
    entries set to zero (each element its own zeros)."""
    A = torch.zeros(B, spec.m, n, dtype=F64)
    col = d
    for kind, _, idx in spec.groups():
        blocks = idx[:, None] if idx.dim() == 1 else idx
        for j, rows in enumerate(blocks):
            own = torch.arange(col, col + 2) % n
            col += 2
            A[:, rows[:, None], own] = torch.randn(B, rows.numel(), 2, generator=g, dtype=F64)
            if kind == "ep" and j % 2 == 0:
                A[:, rows[0], :d] = torch.randn(B, d, generator=g, dtype=F64)
            if kind == "q" and rows.numel() > 3:       # the large SOC block: a few more columns
                A[:, rows[:, None], torch.arange(n - 6, n)] = torch.randn(B, rows.numel(), 6, generator=g, dtype=F64)
    A[:, 0, n - 1] = 1.0  # column n−1: shared by the first "l" row and the large SOC block (1-2 blocks)
    return A * (torch.rand(B, spec.m, n, generator=g, dtype=F64) >= drop)


def _check(A, B, spec, g, keep=None):
    # N dense, and in the elimination's compact layout (formed there directly): every entry the
    # factorization reads equals the dense reference's
    s, y = _interior(spec, B, g, 3.0), _interior(spec, B, g, 3.0)
    data = DataMatrix(A)
    groups, states = _states(spec, s, y)
    normals = [NormalMatrix(data, groups, _CONES, eliminate) for eliminate in (False, True)]
    kinds = [kind for (kind, _, _), pre in zip(groups, normals[0].pre) if isinstance(pre, SparseGram)]
    if keep is not None:
        data = data.subset(keep)
        normals = [normal.subset(data, keep) for normal in normals]
        s, y, A = s[keep], y[keep], A[keep] if A.dim() == 3 else A
        groups, states = _states(spec, s, y)
        B = keep.numel()
    ref = _dense_normal(A.expand(B, *A.shape[-2:]).contiguous(), spec, groups, states)
    dense, compact = (normal(states, B) for normal in normals)
    plan = normals[1].elimination
    assert normals[0].elimination is None and isinstance(plan, Elimination)
    size = sum(plan.sizes)
    real = plan.slot < size
    assert compact.shape == (B, size + 1)
    # the entries left out are zeros or the transposes of entries kept (N_DP)
    n = ref.shape[-1]
    out = (~real).nonzero()[:, 0]
    assert bool((real[(out % n) * n + out // n] | (ref.view(B, -1)[:, out] == 0).all(0)).all())
    for N, R in ((dense, ref), (compact[:, plan.slot[real]], ref.view(B, -1)[:, real])):
        err = float((N - R).abs().max() / ref.abs().max())
        assert err < 1e-12, err
    return kinds


@pytest.mark.parametrize("shared", [False, True])
def test_sparse_normal_matrix_equals_the_dense_one(shared):
    g = torch.Generator().manual_seed(0)
    spec = parse_cones(SPARSE_CONES)
    B = 3
    A = _sparse_A(spec, B, g)
    kinds = _check(A[0] if shared else A, B, spec, g)
    assert set(kinds) >= {"l", "ep", "s"}          # the groups with a sparse pattern take the sparse form


def test_compact_normal_matrix_with_a_dense_term(monkeypatch):
    # a group kept dense (the nonnegative rows here) is formed in N (n × n), which is then gathered into
    # the elimination's compact layout, where the other groups add their terms
    from implicitdiff.solvers import cone_gram
    sparse_gram = cone_gram.sparse_gram

    def decline_single_rows(rows, pattern, n, cost=None):
        return None if pattern.dim() == 2 else sparse_gram(rows, pattern, n, cost)
    monkeypatch.setattr(cone_gram, "sparse_gram", decline_single_rows)
    g = torch.Generator().manual_seed(4)
    spec = parse_cones(SPARSE_CONES)
    kinds = _check(_sparse_A(spec, 3, g), 3, spec, g)
    assert "l" not in kinds and "ep" in kinds


def test_compact_normal_matrix_keeps_a_transposed_part_it_reads():
    # column 29 is private to two nonnegative rows and one exp block (in each group), but shared in the
    # elimination (three blocks): N's entries (0, 29) and (29, 0) both lie in N_DD, so the nonnegative
    # group's transposed part N_{D, P_b} (D = column 0, in every row) is kept in the compact layout
    g = torch.Generator().manual_seed(5)
    spec = parse_cones({"l": 6, "ep": 4})
    B, n = 2, 30
    A = torch.zeros(B, spec.m, n, dtype=F64)
    for i in range(6):
        A[:, i, [0, 1 + 2 * i, 2 + 2 * i]] = torch.randn(B, 3, generator=g, dtype=F64)
    for j in range(4):
        A[:, 6 + 3 * j:9 + 3 * j, [13 + 2 * j, 14 + 2 * j]] = torch.randn(B, 3, 2, generator=g, dtype=F64)
    A[:, [0, 1, 6], 29] = torch.randn(B, 3, generator=g, dtype=F64)
    groups, _ = _states(spec, _interior(spec, B, g), _interior(spec, B, g))
    normal = NormalMatrix(DataMatrix(A), groups, _CONES)
    assert normal.elimination.D.tolist() == [0, 29] and len(normal.pre[0].index) == 4
    assert len(normal.pre[1].index) == 3
    assert _check(A, B, spec, g) == ["l", "ep"]


def test_sparse_normal_matrix_on_a_subset_of_the_batch():
    g = torch.Generator().manual_seed(1)
    spec = parse_cones(SPARSE_CONES)
    A = _sparse_A(spec, 5, g)
    assert "ep" in _check(A, 5, spec, g, keep=torch.tensor([0, 3, 4]))


@pytest.mark.parametrize("shared", [False, True])
def test_structured_term_on_its_columns_equals_the_dense_one(shared):
    # second-order blocks of 20 rows on 20 of 120 columns: the structured term (not a SparseGram), formed
    # on those columns and scattered into N; also on a subset of the batch
    g = torch.Generator().manual_seed(9)
    spec = parse_cones({"l": 4, "q": [20, 20]})
    B, n = 4, 120
    A = torch.zeros(B, spec.m, n, dtype=F64)
    A[:, :4, :8] = torch.randn(B, 4, 8, generator=g, dtype=F64)
    A[:, 4:24, 10:30] = torch.randn(B, 20, 20, generator=g, dtype=F64)
    A[:, 24:, 25:45] = torch.randn(B, 20, 20, generator=g, dtype=F64)
    A = A[0] if shared else A
    s, y = _interior(spec, B, g, 3.0), _interior(spec, B, g, 3.0)
    data = DataMatrix(A)
    groups, states = _states(spec, s, y)
    normal = NormalMatrix(data, groups, _CONES)
    (q,) = [pre for (kind, _, _), pre in zip(groups, normal.pre) if kind == "q"]
    assert isinstance(q, tuple) and q[2][0].tolist() == list(range(10, 45))
    keep = torch.tensor([0, 2, 3])
    for nm, idx in ((normal, torch.arange(B)), (normal.subset(data.subset(keep), keep), keep)):
        groups, states = _states(spec, s[idx], y[idx])
        N = nm(states, idx.numel())
        ref = _dense_normal((A if shared else A[idx]).expand(idx.numel(), spec.m, n).contiguous(), spec, groups, states)
        assert float((N - ref).abs().max() / ref.abs().max()) < 1e-12


def test_shared_columns_split_blocks_with_and_without_them():
    g = torch.Generator().manual_seed(2)
    spec = parse_cones({"ep": 8})
    A = _sparse_A(spec, 2, g)
    s, y = _interior(spec, 2, g), _interior(spec, 2, g)
    groups, states = _states(spec, s, y)
    (plan,) = NormalMatrix(DataMatrix(A), groups, _CONES).pre
    # 5 shared columns, touched by the even blocks; 2 private columns per block, 3 for block 0 (row 0)
    assert plan.d == 5 and plan.p == 3 and plan.touch.tolist() == [0, 2, 4, 6] and plan.other.tolist() == [1, 3, 5, 7]
    assert PRIVATE_MAX_BLOCKS < 4


def test_dense_pattern_keeps_the_dense_form():
    g = torch.Generator().manual_seed(3)
    spec = parse_cones(SPARSE_CONES)
    A = torch.randn(spec.m, 7, generator=g, dtype=F64)
    s, y = _interior(spec, 2, g), _interior(spec, 2, g)
    groups, _ = _states(spec, s, y)
    assert not any(isinstance(p, SparseGram) for p in NormalMatrix(DataMatrix(A), groups, _CONES).pre)


@pytest.mark.parametrize("shared", [False, True])
def test_elimination_solves_like_the_dense_cholesky(shared):
    # N with its private columns' blocks eliminated first: the same solves as the dense Cholesky,
    # and the same shifts (eps^¾, and √eps·max|diag| where N is indefinite)
    g = torch.Generator().manual_seed(8)
    spec = parse_cones(SPARSE_CONES)
    B = 3
    A = _sparse_A(spec, B, g, drop=0.0)
    A = A[0] if shared else A
    s, y = _interior(spec, B, g), _interior(spec, B, g)
    groups, states = _states(spec, s, y)
    data = DataMatrix(A)
    N = NormalMatrix(data, groups, _CONES, eliminate=False)(states, B)
    n = N.shape[-1]
    eye = torch.eye(n, dtype=F64)
    N += eye                                                    # (A has fewer rows than columns in places)
    plan = NormalMatrix(data, groups, _CONES).elimination
    assert isinstance(plan, Elimination) and plan.D.tolist()[:5] == list(range(5)) and plan.comp.shape[1] > 1
    N[2] -= (torch.linalg.eigvalsh(N[2])[0] + 1e-9) * eye      # element 2: indefinite
    R = torch.randn(B, 2, n, generator=g, dtype=F64)
    kind, (got_plan, F) = factor_normal(lambda: plan.compact(N), data, 0, plan)
    assert kind == "chol" and got_plan is plan
    x = solve_normal((kind, (got_plan, F)), R, R[..., :0])[0]
    xd = solve_normal(factor_normal(N.clone, data, 0), R, R[..., :0])[0]
    eps = torch.finfo(F64).eps
    for i in range(B):
        shift = eps ** 0.5 * N[i].diagonal().abs().max().clamp(min=1.0) if i == 2 else eps ** 0.75
        Ni = N[i] + shift * eye                                 # backward stable: a small residual
        assert float((x[i] @ Ni - R[i]).abs().max()) <= 1e-12 * float(Ni.abs().max() * x[i].abs().max())
        if i < 2:                                               # (element 2 is nearly singular)
            tol = 1e2 * eps * float(torch.linalg.cond(Ni))
            assert torch.allclose(x[i], xd[i], rtol=0, atol=tol * float(xd[i].abs().max())) and tol < 1e-6


@pytest.mark.parametrize("c", [1, 3, 7])
def test_blockwise_substitution_equals_the_triangular_solve(c):
    g = torch.Generator().manual_seed(c)
    M = torch.randn(4, 5, c, c, generator=g, dtype=F64)
    L = torch.linalg.cholesky(M @ M.mT + 1e-3 * torch.eye(c, dtype=F64))     # (some ill-conditioned blocks)
    R = torch.randn(4, 5, c, 3, generator=g, dtype=F64)
    for transpose in (False, True):
        ref = torch.linalg.solve_triangular(L.mT if transpose else L, R, upper=transpose)
        got = _substitute_(L, R.clone(), transpose)
        assert float((got - ref).abs().max()) <= 1e-12 * float(ref.abs().max()), transpose


def test_elimination_finds_the_private_blocks_or_declines():
    n = 41
    pairs = torch.zeros(20, n, dtype=torch.bool)               # block i: columns 2i, 2i+1 and the shared 40
    pairs[torch.arange(20), 2 * torch.arange(20)] = True
    pairs[torch.arange(20), 2 * torch.arange(20) + 1] = True
    pairs[:, 40] = True
    plan = elimination([pairs[:10], pairs[10:]], n)             # (two groups)
    assert plan.D.tolist() == [40] and sorted(plan.comp.tolist()) == [[2 * i, 2 * i + 1] for i in range(20)]
    chain = torch.zeros(ELIM_MAX_BLOCK + 4, n, dtype=torch.bool)  # blocks (i, i+1): one block of 21 columns
    chain[torch.arange(chain.shape[0]), torch.arange(chain.shape[0])] = True
    chain[torch.arange(chain.shape[0]), torch.arange(chain.shape[0]) + 1] = True
    assert elimination([chain], n) is None
    assert elimination([torch.ones(3, n, dtype=torch.bool)], n) is None   # dense: nothing private


@pytest.mark.parametrize("k, p, q", [(1, 2, 52), (3, 2, 52), (3, 3, 5), (4, 2, 52), (3, 8, 18), (9, 2, 3)])
def test_block_products_by_outer_products_equal_the_matrix_product(k, p, q):
    # SparseGram's per-block product Pᵀ V: outer products for blocks below ATen's naive-bmm size (the first
    # three), bmm for the others; both against the products summed in float64 by einsum, on strided views
    g = torch.Generator().manual_seed(k * 100 + p)
    V = torch.randn(5, 7, k, q + 3, generator=g, dtype=F64)[..., 3:]
    P = V[..., -p:]
    got = _block_tmul(P, V)
    ref = torch.einsum("bjki,bjkl->bjil", P, V)
    assert got.shape == (5, 7, p, q)
    assert float((got - ref).abs().max()) <= 1e-14 * float(ref.abs().max())
    assert float((_block_tmul(P, P) - P.mT @ P).abs().max()) <= 1e-14 * float(ref.abs().max())


def test_blocks_in_one_range_are_taken_as_views():
    # the exp blocks reordered so that those touching the shared columns come first: both sets are
    # ranges (views), the term equals the one taken by index_select and the dense ÃᵀÃ
    g = torch.Generator().manual_seed(5)
    spec = parse_cones({"ep": 8})
    A = _sparse_A(spec, 2, g).view(2, 8, 3, -1)[:, [0, 2, 4, 6, 1, 3, 5, 7]].reshape(2, 24, -1)
    s, y = _interior(spec, 2, g), _interior(spec, 2, g)
    groups, states = _states(spec, s, y)
    (plan,) = NormalMatrix(DataMatrix(A), groups, _CONES, eliminate=False).pre     # (onto N, not compact)
    assert plan.touch == (0, 4) and plan.other == (4, 4)
    indexed = plan.subset(torch.arange(2))
    indexed.touch, indexed.other = torch.arange(4), torch.arange(4, 8)
    n = A.shape[-1]
    N, ref = (p(ExpCone.winv_t, states[0], A.new_zeros(2, n, n)) for p in (plan, indexed))
    assert torch.equal(N, ref)
    dense = _dense_normal(A, spec, groups, states)
    assert float((N - dense).abs().max()) <= 1e-12 * float(dense.abs().max())


def test_data_matrix_norm_is_the_largest_entry_per_element_and_follows_a_subset():
    # the stopping rule's ‖A‖∞ (max |A| per element), from the |A| that the pattern is made of: shared,
    # batched dense, batched with a dense block, batched sparse; a subset keeps its elements'
    g = torch.Generator().manual_seed(9)
    B, m, n = 4, 12, 8
    dense = torch.randn(B, m, n, generator=g, dtype=F64)
    block = torch.zeros(B, m, n, dtype=F64)
    block[:, :5, 2:] = torch.randn(B, 5, n - 2, generator=g, dtype=F64)
    block[:, 5:, :7] = -3 * torch.eye(7, dtype=F64) * torch.rand(B, 1, 1, generator=g, dtype=F64)
    sparse = torch.zeros(B, m, n, dtype=F64)
    sparse[:, torch.arange(m), torch.arange(m) % n] = torch.randn(B, m, generator=g, dtype=F64)
    sparse[1] *= -5
    for A in (dense, block, sparse):
        data = DataMatrix(A)
        ref = A.abs().flatten(1).max(1).values
        assert torch.equal(data.norm, ref)
        keep = torch.tensor([3, 1])
        assert torch.equal(data.subset(keep).norm, ref[keep])
    assert DataMatrix(block).block is not None and DataMatrix(sparse).sparse is not None
    assert torch.equal(DataMatrix(dense[0]).norm, dense[0].abs().max())
    assert torch.equal(DataMatrix(dense[:1].expand(B, m, n)).norm, dense[0].abs().max())


def test_subset_with_a_block_or_sparse_products_copies_A_only_when_read():
    # the products of a subset with a dense block (or sparse products) never read A itself: its rows are
    # copied on first use (rows(), for a generic term), and then equal the elements' own; also a subset
    # of a subset, and the normal matrix formed on it
    g = torch.Generator().manual_seed(10)
    B, m, n = 4, 12, 8
    block = torch.zeros(B, m, n, dtype=F64)
    block[:, :5, 2:] = torch.randn(B, 5, n - 2, generator=g, dtype=F64)
    block[:, 5:, :7] = -torch.eye(7, dtype=F64) * torch.rand(B, 1, 1, generator=g, dtype=F64)
    sparse = torch.randn(B, m, n, generator=g, dtype=F64) * (torch.rand(m, n, generator=g) < 0.1)
    for A in (block, sparse):
        data = DataMatrix(A)
        assert (data.block is not None) or (data.sparse is not None)
        keep, keep2 = torch.tensor([3, 0, 2]), torch.tensor([2, 0])
        sub = data.subset(keep)
        sub2 = sub.subset(keep2)
        v = torch.randn(2, n, generator=g, dtype=F64)
        assert sub._A is None and sub2._A is None            # not copied by the products
        assert torch.allclose(sub2.mv(v), (A[keep][keep2] @ v[..., None])[..., 0], rtol=0, atol=1e-14)
        assert sub._A is None and sub2._A is None
        idx = contiguous(torch.arange(5))
        assert torch.equal(sub2.rows(idx), A[keep][keep2][:, :5]) and torch.equal(sub2.A, A[keep][keep2])
        assert sub2.shape == (m, n) and sub2.dtype == F64 and not sub2.shared


def test_a_chain_of_lazy_subsets_keeps_no_parent_alive():
    # each subset reads the root A through a composed index, not its parent: the parents' products
    # (and their copies of A's data) are freed as the interior point drops finished elements
    import gc
    import weakref
    B, m, n = 6, 40, 20
    A = torch.zeros(B, m, n, dtype=torch.float64)
    A[:, :5] = torch.randn(B, 5, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    A[:, 5:].diagonal(dim1=-2, dim2=-1)[:] = 1.0
    d = DataMatrix(A)
    assert d.sparse is not None
    parents = [weakref.ref(d.sparse)]
    s1 = d.subset(torch.tensor([0, 2, 4, 5]))
    parents.append(weakref.ref(s1.sparse))
    s2 = s1.subset(torch.tensor([1, 3]))
    del d, s1
    gc.collect()
    assert all(p() is None for p in parents)
    assert torch.equal(s2.A, A[[2, 5]])
