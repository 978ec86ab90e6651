"""Krylov solvers (forward only) against SciPy and dense torch on a registry of problems."""

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spl
import torch

from implicitdiff import InputError, SolveError, Status
from implicitdiff._core.failure import apply_on_failure
from implicitdiff.linalg.krylov import bicgstab, cg, gmres, lsmr, lsqr, minres
from implicitdiff.linalg.operator import LinearOperator
from implicitdiff.linalg.preconditioner import jacobi, matrix_diagonal

F64, F32 = torch.float64, torch.float32
SOLVERS = {"cg": cg, "minres": minres, "gmres": gmres, "bicgstab": bicgstab, "lsqr": lsqr, "lsmr": lsmr}
SCIPY = {"cg": spl.cg, "minres": spl.minres, "gmres": spl.gmres, "bicgstab": spl.bicgstab,
         "lsqr": spl.lsqr, "lsmr": spl.lsmr}


def csr(A: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's one-time "CSR support is in beta" notice
        return A.to_sparse_csr()


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def make(kind: str, dtype=F64, n=16, seed=0) -> torch.Tensor:
    g = _gen(seed)
    Q = torch.randn(n, n, generator=g, dtype=F64)
    if kind == "spd":
        A = Q @ Q.T / n + torch.eye(n, dtype=F64)
    elif kind == "indefinite":  # symmetric, eigenvalues of both signs, well away from 0
        U, _ = torch.linalg.qr(Q)
        ev = torch.linspace(1.0, 3.0, n, dtype=F64) * torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0)
        A = U @ torch.diag(ev) @ U.T
    elif kind == "nonsymmetric":
        A = Q / n ** 0.5 + 3 * torch.eye(n, dtype=F64)
    elif kind == "wide":
        A = torch.randn(n // 2, n, generator=g, dtype=F64)
    elif kind == "tall":
        A = torch.randn(n, n // 2, generator=g, dtype=F64)
    elif kind == "rank_deficient":  # 12 × 16 of rank 5
        A = torch.randn(12, 5, generator=g, dtype=F64) @ torch.randn(5, n, generator=g, dtype=F64)
    else:
        raise ValueError(kind)
    return A.to(dtype)


# which solvers apply to which problem (rectangular and singular ones: least squares only)
CASES = [(k, s) for k, ss in {
    "spd": ["cg", "minres", "gmres", "bicgstab", "lsqr", "lsmr"],
    "indefinite": ["minres", "gmres", "lsqr", "lsmr"],
    "nonsymmetric": ["gmres", "bicgstab", "lsqr", "lsmr"],
    "wide": ["lsqr", "lsmr"],
    "tall": ["lsqr", "lsmr"],
    "rank_deficient": ["lsqr", "lsmr"],
}.items() for s in ss]


def reference(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Dense oracle: A⁻¹ b for square nonsingular A, A⁺ b otherwise (rows of B are systems).
    The rank tolerance is that of A's dtype (a rank-5 float32 matrix is rank 12 in float64)."""
    rtol = 1e-5 if A.dtype == F32 else 1e-12
    A = A.double()
    if A.shape[0] == A.shape[1] and torch.linalg.matrix_rank(A, rtol=rtol) == A.shape[0]:
        return torch.linalg.solve(A, B.double().T).T
    return B.double() @ torch.linalg.pinv(A, rtol=rtol).T


@pytest.mark.parametrize("kind,solver", CASES)
@pytest.mark.parametrize("dtype", [F64, F32])
def test_batched_against_dense_oracle(kind, solver, dtype):
    A = make(kind, dtype)
    B = torch.randn(3, A.shape[0], generator=_gen(1), dtype=F64).to(dtype)
    x, info = SOLVERS[solver](A, B)
    assert x.shape == (3, A.shape[1]) and x.dtype == dtype
    assert info.status.shape == (3,) and info.iterations.shape == (3,)
    assert (info.status == Status.SUCCESS).all(), info
    ref = reference(A, B)
    tol = 1e-7 if dtype == F64 else 2e-3
    assert torch.allclose(x.double(), ref, rtol=tol, atol=tol * ref.abs().max()), (x.double() - ref).abs().max()
    # the reported residual is the true one
    r = torch.linalg.vector_norm(B.double() - x.double() @ A.double().T, dim=-1) / B.double().norm(dim=-1)
    assert torch.allclose(info.residual.double(), r, rtol=1e-2, atol=1e-6 if dtype == F32 else 1e-14)


@pytest.mark.parametrize("kind,solver", CASES)
def test_against_scipy(kind, solver):
    A = make(kind)
    b = torch.randn(A.shape[0], generator=_gen(2), dtype=F64)
    x, info = SOLVERS[solver](csr(A), b, rtol=1e-12, max_iter=2000)
    assert int(info.status) == Status.SUCCESS
    A_sp = sp.csr_matrix(A.numpy())
    if solver in ("lsqr", "lsmr"):
        limit = {"iter_lim": 2000} if solver == "lsqr" else {"maxiter": 2000}
        xs = SCIPY[solver](A_sp, b.numpy(), atol=1e-14, btol=1e-14, **limit)[0]
    else:
        xs, code = SCIPY[solver](A_sp, b.numpy(), rtol=1e-12, maxiter=2000)
        assert code == 0
    assert np.allclose(x.numpy(), xs, rtol=1e-7, atol=1e-8 * np.abs(xs).max())


def test_min_norm_and_warm_start_for_least_squares():
    A = make("rank_deficient")
    b = torch.randn(A.shape[0], generator=_gen(3), dtype=F64)
    x0 = torch.randn(A.shape[1], generator=_gen(4), dtype=F64)
    pinv = torch.linalg.pinv(A)
    for solver in (lsqr, lsmr):
        x, info = solver(A, b, x0, rtol=1e-12)
        # from x0: x0 + A⁺(b − A x0), the least-squares solution nearest to x0
        assert torch.allclose(x, x0 + pinv @ (b - A @ x0), atol=1e-8)
        assert int(info.status) == Status.SUCCESS and float(info.residual) > 1e-3  # inconsistent system


def _poisson(N):
    T = 2 * torch.eye(N, dtype=F64) - torch.diag(torch.ones(N - 1, dtype=F64), 1) - torch.diag(
        torch.ones(N - 1, dtype=F64), -1)
    I = torch.eye(N, dtype=F64)
    return torch.kron(I, T) + torch.kron(T, I)


@pytest.mark.parametrize("form", ["dense", "batched_dense", "csr", "coo", "operator", "matvec_operator", "callable"])
def test_input_forms(form):
    A = _poisson(4) + 0.5 * torch.eye(16, dtype=F64)
    B = torch.randn(2, 16, generator=_gen(5), dtype=F64)
    ref = torch.linalg.solve(A, B.T).T
    if form == "dense":
        op = A
    elif form == "batched_dense":  # (2, n, n): one matrix per system
        op = torch.stack([A, 2 * A])
        ref = torch.stack([ref[0], ref[1] / 2])
    elif form == "csr":
        op = csr(A)
    elif form == "coo":
        op = A.to_sparse()
    elif form == "operator":
        op = LinearOperator.from_dense(A, positive_definite=True)
    elif form == "matvec_operator":
        op = LinearOperator.from_matvec(lambda x, M: x @ M.T, (16, 16), A)
    else:
        op = lambda x: x @ A.T  # noqa: E731
    for solver in (cg, minres, gmres, bicgstab, lsqr, lsmr):
        x, info = solver(op, B, rtol=1e-12)
        assert (info.status == 0).all() and torch.allclose(x, ref, atol=1e-9), (solver.__name__, form)


def test_independent_convergence_per_element():
    A = _poisson(5)
    n = A.shape[0]
    evec = torch.linalg.eigh(A).eigenvectors[:, 3]
    B = torch.stack([torch.randn(n, generator=_gen(6), dtype=F64), evec, torch.zeros(n, dtype=F64)])
    for solver in (cg, minres, gmres, bicgstab):
        x, info = solver(A, B, rtol=1e-10)
        assert (info.status == 0).all()
        # an eigenvector converges in one iteration, b = 0 in none; the random one keeps going
        assert info.iterations[1] == 1 and info.iterations[2] == 0 and info.iterations[0] > 3, solver.__name__
        assert torch.equal(x[2], torch.zeros(n, dtype=F64))
        assert torch.allclose(x[1], evec / torch.linalg.eigvalsh(A)[3], atol=1e-12)


def test_check_every_and_callback():
    A = _poisson(4)
    B = torch.randn(3, 16, generator=_gen(7), dtype=F64)
    x1, i1 = cg(A, B, check_every=1)
    x7, i7 = cg(A, B, check_every=7)  # elements freeze while the others finish
    assert torch.equal(i1.iterations, i7.iterations) and torch.allclose(x1, x7, atol=1e-14)
    seen = []
    cg(A, B, callback=lambda x: seen.append(x.shape))
    assert len(seen) == int(i1.iterations.max()) and seen[0] == (3, 16)


def test_jacobi_preconditioner():
    g = _gen(8)
    A = _poisson(6)
    scale = torch.logspace(0, 3, 36, dtype=F64)[torch.randperm(36, generator=g)]
    As = scale[:, None] * A * scale[None, :]  # badly scaled SPD
    b = torch.randn(36, generator=g, dtype=F64)
    ref = torch.linalg.solve(As, b)
    _, plain = cg(As, b, max_iter=5000)
    for M in (jacobi(As), jacobi(csr(As)), jacobi(As.to_sparse()), jacobi(LinearOperator.from_dense(As)),
              jacobi(diagonal=torch.diagonal(As))):
        assert M.positive_definite
        for solver in (cg, minres, gmres, bicgstab):
            x, info = solver(As, b, M=M, max_iter=5000)
            assert int(info.status) == 0 and torch.allclose(x, ref, rtol=1e-6, atol=0), solver.__name__
        assert int(cg(As, b, M=M).info.iterations) < int(plain.iterations) // 3
    assert torch.equal(matrix_diagonal(As.to_sparse()), torch.diagonal(As))


def test_jacobi_errors():
    with pytest.raises(InputError, match="zero"):
        jacobi(torch.zeros(3, 3))
    with pytest.raises(InputError, match="exactly one"):
        jacobi()
    with pytest.raises(InputError, match="matrix-free"):
        jacobi(LinearOperator.from_matvec(lambda x: x, (3, 3)))


def test_breakdown_and_failure_statuses():
    n = 10
    d = torch.linspace(-1, 2, n, dtype=F64)
    ones = torch.ones(n, dtype=F64)
    # CG on an indefinite matrix: pᵀAp ≤ 0
    assert int(cg(torch.diag(d), ones).info.status) == Status.BREAKDOWN
    # a non-positive-definite preconditioner breaks CG and MINRES at once
    spd = _poisson(3) + torch.eye(9, dtype=F64)
    for solver in (cg, minres):
        assert int(solver(spd, torch.ones(9, dtype=F64), M=lambda r: -r).info.status) == Status.BREAKDOWN
    # BiCGSTAB on a skew-symmetric matrix: rᵀAr = 0 every time
    S = torch.randn(n, n, generator=_gen(9), dtype=F64)
    assert int(bicgstab(S - S.T, ones).info.status) == Status.BREAKDOWN
    # GMRES(2) on a cyclic shift stagnates; full GMRES solves it
    P = torch.roll(torch.eye(n, dtype=F64), 1, 0)
    e0 = torch.zeros(n, dtype=F64)
    e0[0] = 1
    assert int(gmres(P, e0, restart=2).info.status) == Status.BREAKDOWN
    assert int(gmres(P, e0).info.status) == Status.SUCCESS
    # the iteration limit, and NaN in the data
    x, info = cg(spd, torch.ones(9, dtype=F64), max_iter=2)
    assert int(info.status) == Status.MAX_ITERATIONS and int(info.iterations) == 2 and float(info.residual) > 1e-3
    bad = torch.ones(9, dtype=F64)
    bad[0] = float("nan")
    assert int(cg(spd, bad).info.status) == Status.NONFINITE


def test_mixed_batch_and_raising_is_the_callers_job():
    spd = _poisson(3)
    B = torch.stack([torch.ones(9, dtype=F64), torch.zeros(9, dtype=F64)])
    x, info = cg(spd, B, max_iter=2)
    assert info.status.tolist() == [Status.MAX_ITERATIONS, Status.SUCCESS]
    with pytest.raises(SolveError) as err:
        apply_on_failure(x, info, "raise", "cg")
    assert err.value.status == Status.MAX_ITERATIONS and err.value.iterations == 2 and err.value.residual > 0


def test_float32_reports_the_true_residual():
    # float32 CG on an ill-conditioned Laplacian: the recursive residual keeps falling below the true
    # one's floor (eps·cond); the loop replaces it, then reports failure with the true residual.
    N = 200
    T = 2 * torch.eye(N) - torch.diag(torch.ones(N - 1), 1) - torch.diag(torch.ones(N - 1), -1)
    B = torch.randn(2, N, generator=_gen(10))
    x, info = cg(T, B, rtol=1e-7)
    true = (B - x @ T.T).norm(dim=-1) / B.norm(dim=-1)
    assert torch.allclose(info.residual, true, rtol=1e-3)
    assert ((info.status == Status.SUCCESS) == (true <= 1e-7)).all()
    assert (info.status != Status.SUCCESS).any()
    x, info = cg(T, B, rtol=1e-4)  # a reachable tolerance converges
    assert (info.status == 0).all() and ((B - x @ T.T).norm(dim=-1) <= 1e-4 * B.norm(dim=-1)).all()


def test_atol_and_default_max_iter():
    A = _poisson(3)
    b = torch.ones(9, dtype=F64)
    x, info = cg(A, b, rtol=0.0, atol=1e-3)
    assert int(info.status) == 0 and float((b - A @ x).norm()) <= 1e-3
    for solver in (cg, minres, gmres, bicgstab):  # an unreachable tolerance: stops by 10·n iterations
        x, info = solver(A, b + 0.1, rtol=0.0, atol=0.0)
        assert int(info.status) in (Status.MAX_ITERATIONS, Status.BREAKDOWN) and int(info.iterations) <= 90
        assert float(info.residual) < 1e-12  # the solution is still as good as it gets


@pytest.mark.parametrize("bad,match", [
    (dict(b=torch.ones(5, dtype=F64)), "b must be"),
    (dict(b=torch.ones(4, dtype=F32)), "dtype"),
    (dict(b=torch.ones(4, dtype=torch.int64)), "dtype"),
    (dict(rtol=-1.0), "rtol"),
    (dict(max_iter=2.5), "max_iter"),
    (dict(x0=torch.ones(3, dtype=F64)), "x0"),
    (dict(M="jacobi"), "M must"),
    (dict(A="matrix"), "A must"),
    (dict(A=torch.ones(4, 5, dtype=F64)), "square"),
    (dict(b=torch.ones(3, 4, dtype=F64), A=torch.ones(2, 4, 4, dtype=F64)), "broadcast"),
])
def test_input_errors(bad, match):
    kw = dict(A=torch.eye(4, dtype=F64), b=torch.ones(4, dtype=F64))
    kw.update(bad)
    A, b = kw.pop("A"), kw.pop("b")
    with pytest.raises(InputError, match=match):
        cg(A, b, **kw)


def test_gmres_restart_argument():
    A = make("nonsymmetric", n=30)
    b = torch.randn(30, generator=_gen(11), dtype=F64)
    x5, i5 = gmres(A, b, restart=5)
    x30, i30 = gmres(A, b, restart=30)
    ref = torch.linalg.solve(A, b)
    assert int(i5.status) == 0 and int(i30.status) == 0
    assert torch.allclose(x5, ref, atol=1e-8) and torch.allclose(x30, ref, atol=1e-8)
    assert int(i30.iterations) <= int(i5.iterations)
    with pytest.raises(InputError, match="restart"):
        gmres(A, b, restart=0)


def test_rectangular_operator_without_rmatvec():
    A = make("tall")
    b = torch.randn(A.shape[0], generator=_gen(12), dtype=F64)
    op = LinearOperator.from_matvec(lambda x, M: x @ M.T, tuple(A.shape), A)  # Aᵀ derived by vjp
    x, info = lsqr(op, b, rtol=1e-12)
    assert torch.allclose(x, torch.linalg.pinv(A) @ b, atol=1e-9)


@pytest.mark.parametrize("name", ["cg", "minres", "gmres", "bicgstab", "lsqr", "lsmr"])
def test_a_solve_that_autograd_would_differentiate_through_is_refused(name):
    # forward only: autograd through the iterations gave a gradient for A a few % off (cg, minres) with SUCCESS
    solver = {"cg": cg, "minres": minres, "gmres": gmres, "bicgstab": bicgstab, "lsqr": lsqr, "lsmr": lsmr}[name]
    g = torch.Generator().manual_seed(5)
    Q = torch.randn(5, 5, generator=g, dtype=torch.float64)
    S = (Q @ Q.mT + 5 * torch.eye(5, dtype=torch.float64)).requires_grad_()
    b = torch.randn(5, generator=g, dtype=torch.float64)
    with pytest.raises(InputError, match="forward only.*linear_solve"):
        solver(S, b, rtol=1e-12)
    with pytest.raises(InputError, match="forward only"):
        solver(lambda v: v @ S.mT, b, rtol=1e-12)                        # a matvec closing over a leaf
    with torch.no_grad():
        x = solver(S, b, rtol=1e-12).x
    torch.testing.assert_close(x, torch.linalg.solve(S.detach(), b), rtol=1e-9, atol=0)
    assert solver(S.detach(), b, rtol=1e-12).info.status == 0          # detached inputs: as before


@pytest.mark.parametrize("name", ["cg", "gmres"])
def test_the_refusal_sees_through_torch_func_jvp(name):
    # inside torch.func.jvp a tensor of an enclosing autograd graph reads requires_grad=False: the
    # solve must still be refused (it gave torch's raw in-place error, or a gradient of the recursion)
    solver = {"cg": cg, "gmres": gmres}[name]
    S = (4 * torch.eye(5, dtype=torch.float64)).requires_grad_()
    b, t = torch.ones(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    with pytest.raises(InputError, match="forward only"):
        torch.func.jvp(lambda bb: solver(lambda v: v @ S.mT, bb, rtol=1e-12).x, (b,), (t,))
    x = torch.func.jvp(lambda bb: solver(S.detach(), bb, rtol=1e-12).x, (b,), (t,))[0]   # nothing recorded
    torch.testing.assert_close(x, b / 4, rtol=1e-12, atol=0)


def test_the_refusal_comes_before_the_first_iteration():
    # a large problem must not build a graph over every iteration before the error
    S = (4 * torch.eye(6, dtype=torch.float64)).requires_grad_()
    seen = []
    for solver in (cg, minres, gmres, bicgstab):
        with pytest.raises(InputError, match="forward only"):
            solver(S, torch.ones(6, dtype=torch.float64), callback=seen.append)
    assert seen == []
