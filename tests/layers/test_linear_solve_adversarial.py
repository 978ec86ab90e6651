"""Adversarial inputs for ``linear_solve``, ``linear_solve_ex``, ``ambiguity``, ``Nearest`` and ``Pinned``.

Every case states its acceptable outcome: a value checked against an independent reference
(``torch.linalg``, NumPy) or a named error (:class:`InputError` naming the argument, or a
:class:`SolveError` / status naming the failure).  Float64 unless the dtype is the point.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.autograd import gradcheck

import implicitdiff as idf
from implicitdiff import InputError, Nearest, Pinned, SolveError, Status
from implicitdiff import linalg

F64 = torch.float64


def _well(g, *shape):
    n = shape[-1]
    return torch.randn(*shape, generator=g, dtype=F64) + n * torch.eye(n, dtype=F64)


# ============================================================================ dtypes, devices, layouts
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex128, torch.float16,
                                   torch.bfloat16])
@pytest.mark.parametrize("which", ["A", "b"])
def test_other_dtypes_are_named(dtype, which):
    A, b = torch.eye(3, dtype=F64), torch.ones(3, dtype=F64)
    if which == "A":
        A = A.to(dtype)
    else:
        b = b.to(dtype)
    with pytest.raises(InputError, match=f"{which} has dtype"):
        idf.linear_solve(A, b)


def test_mixed_float_dtypes_are_named():
    with pytest.raises(InputError, match="dtype"):
        idf.linear_solve(torch.eye(3, dtype=F64), torch.ones(3, dtype=torch.float32))


def test_meta_tensors_are_named():
    A, b = torch.empty(3, 3, dtype=F64, device="meta"), torch.empty(3, dtype=F64, device="meta")
    with pytest.raises(InputError, match="meta"):
        idf.linear_solve(A, b)
    with pytest.raises(InputError, match="meta"):
        idf.ambiguity(A, b)


@pytest.mark.parametrize("A", [None, 3.0, [[1.0, 0.0], [0.0, 1.0]], "eye"])
def test_non_tensor_A_is_named(A):
    with pytest.raises(InputError, match="A must"):
        idf.linear_solve(A, torch.ones(2, dtype=F64))


def test_a_list_b_is_taken_in_A_dtype():
    y = idf.linear_solve(2 * torch.eye(2, dtype=F64), [1.0, 2.0])
    torch.testing.assert_close(y, torch.tensor([0.5, 1.0], dtype=F64))
    with pytest.raises(InputError, match="b must|b has"):
        idf.linear_solve(torch.eye(2, dtype=F64), "12")


def test_non_contiguous_and_stride_zero_inputs(g):
    A = _well(g, 4, 4)
    b = torch.randn(4, generator=g, dtype=F64)
    torch.testing.assert_close(idf.linear_solve(A.mT, b), torch.linalg.solve(A.mT, b))  # column-major
    Ae, be = A.expand(3, 4, 4), b.expand(3, 4)  # stride 0 batch dims
    torch.testing.assert_close(idf.linear_solve(Ae, be), torch.linalg.solve(A, b).expand(3, 4))
    Aw = torch.randn(4, 8, generator=g, dtype=F64)[:, ::2]  # a strided view
    torch.testing.assert_close(idf.linear_solve(Aw, b), torch.linalg.solve(Aw.contiguous(), b))
    # gradients of an expanded A are summed over the broadcast batch
    A0 = A.clone().requires_grad_()
    y = idf.linear_solve(A0.expand(3, 4, 4), be)
    (gA,) = torch.autograd.grad(y.sum(), A0)
    A1 = A.clone().requires_grad_()
    (gA1,) = torch.autograd.grad(3 * torch.linalg.solve(A1, b).sum(), A1)
    torch.testing.assert_close(gA, gA1)


# ============================================================================ empty systems
def test_empty_systems_have_defined_results():
    y = idf.linear_solve(torch.zeros(0, 0, dtype=F64), torch.zeros(0, dtype=F64))
    assert y.shape == (0,)
    y = idf.linear_solve(torch.zeros(0, 3, 3, dtype=F64), torch.zeros(0, 3, dtype=F64))  # empty batch
    assert y.shape == (0, 3)
    A = torch.zeros(0, 3, dtype=F64, requires_grad=True)  # no equations: the min-norm solution is 0
    b = torch.zeros(0, dtype=F64, requires_grad=True)
    y, info = idf.linear_solve_ex(A, b)
    assert torch.equal(y, torch.zeros(3, dtype=F64)) and int(info.status) == Status.SUCCESS
    gA, gb = torch.autograd.grad(y.sum(), (A, b))
    assert gA.shape == (0, 3) and gb.shape == (0,)
    assert idf.linear_solve(torch.zeros(2, 0, dtype=F64), torch.ones(2, dtype=F64), selection="min_norm").shape == (0,)
    assert idf.linear_solve(torch.eye(3, dtype=F64), torch.zeros(3, 0, dtype=F64)).shape == (3, 0)


# ============================================================================ NaN / Inf
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("solver", ["auto", "lu", "qr", "svd", "cholesky", "gmres"])
def test_non_finite_data_is_named(bad, solver):
    A = 4 * torch.eye(3, dtype=F64)
    b = torch.ones(3, dtype=F64)
    A[1, 1] = bad
    with pytest.raises(InputError, match="A contains"):
        idf.linear_solve(A, b, solver=solver)
    with pytest.raises(InputError, match="b contains"):
        idf.linear_solve(4 * torch.eye(3, dtype=F64), torch.tensor([1.0, bad, 1.0], dtype=F64), solver=solver)


@pytest.mark.parametrize("policy", ["nan", "warn"])
@pytest.mark.parametrize("solver", ["auto", "svd", "cg", "gmres", "minres", "bicgstab", "lsmr"])
def test_one_bad_element_does_not_poison_a_shared_parameter(g, policy, solver):
    # A batch built from one shared parameter P; element 1 has a NaN right-hand side and is not checked
    # (check_finite=False): it must fail alone, and P's gradient must be that of the other elements.
    P = torch.randn(4, 4, generator=g, dtype=F64)
    P = (P @ P.mT + 4 * torch.eye(4, dtype=F64)).requires_grad_()
    b = torch.randn(3, 4, generator=g, dtype=F64)
    b[1, 2] = float("nan")
    A = P.expand(3, 4, 4) if solver in ("auto", "svd") else P

    def run(A, b):
        if solver in ("auto", "svd"):
            return idf.linear_solve(A, b, solver=solver, on_failure=policy, check_finite=False)
        return idf.linear_solve(A, b.mT, solver=solver, on_failure=policy, check_finite=False).mT

    if policy == "warn":
        with pytest.warns(idf._core.failure.SolveWarning):
            y = run(A, b)
    else:
        y = run(A, b)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all()
    (gP,) = torch.autograd.grad(y[[0, 2]].sum(), P)
    ref = idf.linear_solve(P, b[[0, 2]].mT, solver="lu").mT
    (gP_ref,) = torch.autograd.grad(ref.sum(), P)
    torch.testing.assert_close(gP, gP_ref, atol=1e-8, rtol=1e-8)


# ============================================================================ scale
@pytest.mark.parametrize("scale", [1e-300, 1e-150, 1e-8, 1e8, 1e150, 1e300])
@pytest.mark.parametrize("info", [False, True])
def test_scaled_well_conditioned_systems_are_solved_not_singular(g, scale, info):
    A = _well(g, 2, 5, 5)
    b = torch.randn(2, 5, generator=g, dtype=F64)
    ref = torch.linalg.solve(A, b)
    if info:
        y, inf = idf.linear_solve_ex(A * scale, b)
        assert inf.status.tolist() == [0, 0]
    else:
        y = idf.linear_solve(A * scale, b)
    torch.testing.assert_close(y * scale, ref, atol=0, rtol=1e-12)
    torch.testing.assert_close(idf.linear_solve(A * scale, b * scale), ref, atol=0, rtol=1e-12)


@pytest.mark.parametrize("scale", [1e-150, 1e150])
def test_scaled_non_square_systems(g, scale):
    W = torch.randn(3, 6, generator=g, dtype=F64)
    b = torch.randn(3, generator=g, dtype=F64)
    ref = torch.linalg.pinv(W) @ b
    torch.testing.assert_close(idf.linear_solve(W * scale, b * scale), ref, atol=0, rtol=1e-10)
    torch.testing.assert_close(idf.linear_solve(W.mT * scale, (W.mT @ b) * scale), b, atol=0, rtol=1e-10)


def test_singular_and_hidden_ill_conditioning_are_reported():
    n = 60
    # upper triangular, 1 on the diagonal, −1 above: every LU pivot is 1 but cond ≈ 2ⁿ
    kahan = torch.triu(-torch.ones(n, n, dtype=F64), 1) + torch.eye(n, dtype=F64)
    for A in (kahan, torch.ones(5, 5, dtype=F64), torch.zeros(4, 4, dtype=F64)):
        b = torch.ones(A.shape[-1], dtype=F64)
        with pytest.raises(SolveError, match="SINGULAR"):
            idf.linear_solve(A, b)
        _, info = idf.linear_solve_ex(A, b)
        assert int(info.status) == Status.SINGULAR


def test_eager_path_agrees_with_the_reporting_path(g):
    # linear_solve (eager, screened) and return_info=True (general SolveFn) must give one function
    A = _well(g, 3, 6, 6).requires_grad_()
    b = torch.randn(3, 6, 2, generator=g, dtype=F64, requires_grad=True)
    y1 = idf.linear_solve(A, b)
    y2, _ = idf.linear_solve(A, b, return_info=True)
    torch.testing.assert_close(y1, y2, atol=1e-13, rtol=0)
    w = torch.randn(3, 6, 2, generator=g, dtype=F64)
    g1 = torch.autograd.grad((y1 * w).sum(), (A, b))
    g2 = torch.autograd.grad((y2 * w).sum(), (A, b))
    for a, e in zip(g1, g2):
        torch.testing.assert_close(a, e, atol=1e-10, rtol=0)
    A0 = _well(g, 4, 4).requires_grad_()
    b0 = torch.randn(4, generator=g, dtype=F64, requires_grad=True)
    assert gradcheck(idf.linear_solve, (A0, b0), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(idf.linear_solve, (A0, b0))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 6), batch=st.sampled_from([(), (2,), (2, 3)]), k=st.sampled_from([None, 1, 3]),
       log_scale=st.integers(-150, 150), seed=st.integers(0, 2 ** 16))
def test_square_solves_match_numpy_at_any_scale(n, batch, k, log_scale, seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(*batch, n, n, generator=g, dtype=F64) + 2 * n * torch.eye(n, dtype=F64)
    b = torch.randn(*batch, n, *(() if k is None else (k,)), generator=g, dtype=F64)
    s = 10.0 ** log_scale
    y = idf.linear_solve(A * s, b)
    B = b.numpy()[..., None] if k is None else b.numpy()
    ref = np.linalg.solve(A.numpy(), B)
    ref = ref[..., 0] if k is None else ref
    np.testing.assert_allclose(y.numpy() * s, ref, rtol=1e-10, atol=0)


# ============================================================================ options
@pytest.mark.parametrize("kwargs, match", [
    (dict(rank_rtol=float("nan")), "rank_rtol is NaN"),
    (dict(rank_rtol=-1e-3), "rank_rtol must be >= 0"),
    (dict(rank_rtol="1e-3"), "rank_rtol must be a real number"),
    (dict(solver="svd", rtol=float("nan")), "rtol is NaN"),
    (dict(solver="qr", rtol=-1.0), "rtol must be >= 0"),
    (dict(solver="gmres", max_iter=-1), "max_iter must be >= 0"),
    (dict(solver="gmres", max_iter=2.5), "max_iter must be an integer"),
    (dict(solver="cg", atol=float("inf")), "atol is inf"),
    (dict(solver="cg", adjoint_rtol=float("nan")), "adjoint_rtol is NaN"),
    (dict(solver="minres", M="jacobi"), "M must be a preconditioner"),
    (dict(solver="lu", max_iter=5), "'max_iter' does not apply to solver='lu'"),
    (dict(solver="lu", x0=torch.zeros(3, dtype=F64)), "'x0' does not apply to solver='lu'"),
    (dict(solver="lu", adjoint_rtol=1.0), "'adjoint_rtol' does not apply to solver='lu'"),
    (dict(solver="cholesky", M=lambda r: r), "'M' does not apply to solver='cholesky'"),
    (dict(solver="lu", rtol=1e-3), "'rtol' does not apply to solver='lu'"),
    (dict(solver="svd", max_iter=3), "'max_iter' does not apply to solver='svd'"),
    (dict(solver="cg", rank_rtol=1e-3), "'rank_rtol' does not apply to solver='cg'"),
    (dict(solver=linalg.CG(), rtol=1e-8), "beside the solver object"),
    (dict(solver="gauss"), "solver must be one of"),
    (dict(solver=3), "solver must be one of"),
    (dict(return_info="yes"), "return_info must be True or False"),
    (dict(check_finite=1), "check_finite must be True or False"),
    (dict(on_failure="ignore"), "on_failure must be one of"),
])
def test_bad_options_are_named_before_any_work(kwargs, match):
    A = 4 * torch.eye(3, dtype=F64)
    with pytest.raises(InputError, match=match):
        idf.linear_solve(A, torch.ones(3, dtype=F64), **kwargs)


def test_solver_objects_validate_in_their_constructor():
    with pytest.raises(InputError, match="rank_rtol is NaN"):
        linalg.SVD(rank_rtol=float("nan"))
    with pytest.raises(InputError, match="max_iter must be >= 0"):
        linalg.GMRES(max_iter=-1)
    with pytest.raises(InputError, match="x0 must be a tensor"):
        linalg.CG(x0=[0.0, 0.0])
    with pytest.raises(TypeError):
        linalg.LU(max_iter=3)  # an LU has no such option: the constructor itself refuses it


def test_cholesky_on_a_non_symmetric_matrix_is_refused(g):
    S = _well(g, 4, 4)
    S = S @ S.mT
    N = S + torch.triu(torch.ones(4, 4, dtype=F64), 1)  # positive diagonal, not symmetric
    with pytest.raises(InputError, match="not symmetric"):
        idf.linear_solve(N, torch.ones(4, dtype=F64), solver="cholesky")
    # a symmetric matrix up to rounding (B Bᵀ) is accepted, and solved right
    b = torch.ones(4, dtype=F64)
    torch.testing.assert_close(idf.linear_solve(S, b, solver="cholesky"), torch.linalg.solve(S, b))
    # an indefinite symmetric matrix is reported, not solved wrong
    _, info = idf.linear_solve_ex(-S, b, solver="cholesky")
    assert int(info.status) == Status.SINGULAR


# ============================================================================ selections
def test_nearest_weight_must_be_symmetric_positive_definite(g):
    A = torch.randn(2, 4, generator=g, dtype=F64)
    b = torch.randn(2, generator=g, dtype=F64)
    y0 = torch.zeros(4, dtype=F64)
    W = torch.eye(4, dtype=F64) + torch.triu(torch.ones(4, 4, dtype=F64), 1)
    with pytest.raises(InputError, match="Nearest.weight.*not symmetric"):
        idf.linear_solve(A, b, selection=Nearest(y0, W))
    with pytest.raises(InputError, match="Nearest.weight must be symmetric positive definite"):
        idf.linear_solve(A, b, selection=Nearest(y0, -torch.eye(4, dtype=F64)))
    with pytest.raises(InputError, match="Nearest.weight must be positive"):
        idf.linear_solve(A, b, selection=Nearest(y0, torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=F64)))
    with pytest.raises(InputError, match="Nearest.weight"):
        idf.linear_solve(A, b, selection=Nearest(y0, torch.ones(4, dtype=F64).int()))
    # a valid weight gives the weighted nearest solution: min (y − y0)ᵀ W (y − y0) s.t. A y = b
    Wd = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=F64)
    y = idf.linear_solve(A, b, selection=Nearest(y0, Wd))
    Winv = torch.diag(1 / Wd)
    ref = Winv @ A.mT @ torch.linalg.solve(A @ Winv @ A.mT, b)
    torch.testing.assert_close(y, ref)


@pytest.mark.parametrize("index", [[0.5, 1.7], [True, False], torch.tensor([0.0, 1.0]), "ab", [[0], 1]])
def test_pinned_index_must_be_integers(index):
    with pytest.raises(InputError, match="Pinned.index"):
        Pinned(index, 0.0)


def test_pinned_with_integer_tensor_index(g):
    A = torch.randn(2, 4, generator=g, dtype=F64)
    b = torch.randn(2, generator=g, dtype=F64)
    y = idf.linear_solve(A, b, selection=Pinned(torch.tensor([0, 3]), torch.tensor([1.0, -1.0], dtype=F64)))
    assert y[0] == 1.0 and y[3] == -1.0
    torch.testing.assert_close(A @ y, b)


# ============================================================================ ambiguity
@pytest.mark.parametrize("scale", [1e-300, 1e-170, 1.0, 1e170, 1e300])
def test_ambiguity_is_scale_invariant(g, scale):
    A = torch.randn(2, 5, generator=g, dtype=F64)
    ct = torch.randn(5, generator=g, dtype=F64)
    ref = idf.ambiguity(A, ct)
    assert 0 < float(ref) < 1
    torch.testing.assert_close(idf.ambiguity(A, ct * scale), ref, atol=0, rtol=1e-14)
    torch.testing.assert_close(idf.ambiguity(A * scale, ct), ref, atol=0, rtol=1e-10)
    # a power of two scales exactly
    assert torch.equal(idf.ambiguity(A, ct * 2.0 ** -600), ref)
    # against NumPy: ‖(I − V Vᵀ) ȳ‖ / ‖ȳ‖ with V the row space
    _, _, Vh = np.linalg.svd(A.numpy(), full_matrices=False)
    c = ct.numpy()
    np.testing.assert_allclose(float(ref), np.linalg.norm(c - Vh.T @ (Vh @ c)) / np.linalg.norm(c), rtol=1e-12)


def test_ambiguity_bad_inputs():
    A = torch.ones(1, 2, dtype=F64)
    with pytest.raises(InputError, match="rank_rtol is NaN"):
        idf.ambiguity(A, torch.ones(2, dtype=F64), rank_rtol=float("nan"))
    with pytest.raises(InputError, match="cotangent contains"):
        idf.ambiguity(A, torch.tensor([1.0, float("nan")], dtype=F64))
    with pytest.raises(InputError, match="cotangent has dtype"):
        idf.ambiguity(A, torch.ones(2, dtype=torch.int64))
    assert float(idf.ambiguity(A, torch.zeros(2, dtype=F64))) == 0.0
    assert idf.ambiguity(torch.ones(3, 1, 2, dtype=F64), torch.zeros(3, 0, dtype=F64).reshape(3, 2, 0)).shape == (3,)


# ============================================================================ the dispatcher
def test_auto_solver_is_inspectable_and_matches_the_string_forms(g):
    A = _well(g, 4, 4)
    assert linalg.auto_solver(A) == linalg.LU()
    assert linalg.auto_solver(torch.randn(3, 5, dtype=F64)) == linalg.QR()
    pd = linalg.LinearOperator.from_dense(A @ A.mT, positive_definite=True)
    assert linalg.auto_solver(pd) == linalg.Cholesky()
    mf = linalg.LinearOperator.from_matvec(lambda x: 2 * x, (4, 4), dtype=F64)
    assert isinstance(linalg.auto_solver(mf), linalg.GMRES)
    b = torch.randn(4, generator=g, dtype=F64)
    torch.testing.assert_close(idf.linear_solve(A, b, solver=linalg.GMRES(rtol=1e-13)),
                               idf.linear_solve(A, b, solver="gmres", rtol=1e-13))
    torch.testing.assert_close(idf.linear_solve(A, b, solver=linalg.SVD(rank_rtol=1e-12)), torch.linalg.solve(A, b))
    assert linalg.CG(rtol=1e-3).options() == {"rtol": 1e-3}


# ============================================================================ sparse direct (splu)
def _sparse(A):
    with __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("ignore")  # torch's "sparse CSR is beta" note
        return A.to_sparse_csr()


def test_splu_adversarial_inputs():
    pytest.importorskip("scipy")
    A = 3 * torch.eye(4, dtype=F64) + torch.diag(torch.ones(3, dtype=F64), 1)
    S, b = _sparse(A), torch.ones(4, dtype=F64)
    torch.testing.assert_close(idf.linear_solve(S, b, solver="splu"), torch.linalg.solve(A, b))
    torch.testing.assert_close(idf.linear_solve(_sparse(A * 1e-300), b, solver="splu") * 1e-300,
                               torch.linalg.solve(A, b), atol=0, rtol=1e-12)
    assert idf.linear_solve(_sparse(torch.zeros(0, 0, dtype=F64)), torch.zeros(0, dtype=F64), solver="splu").shape == (0,)
    with pytest.raises(InputError, match="b contains"):
        idf.linear_solve(S, b * float("nan"), solver="splu")
    with pytest.raises(InputError, match="sparse"):
        idf.linear_solve(A, b, solver="splu")
    with pytest.raises(InputError, match="'rtol' does not apply to solver='splu'"):
        idf.linear_solve(S, b, solver="splu", rtol=1e-3)
    with pytest.raises(InputError, match="b has dtype"):
        idf.linear_solve(S, b.long(), solver="splu")
    with pytest.raises(SolveError, match="SINGULAR"):
        idf.linear_solve(_sparse(torch.zeros(4, 4, dtype=F64)), b, solver="splu")


# ============================================================================ transforms and float32
def test_cholesky_asymmetry_under_vmap_is_a_status_not_a_wrong_answer(g):
    S = _well(g, 4, 4)
    S = S @ S.mT
    N = S + torch.triu(torch.ones(4, 4, dtype=F64), 1)
    b = torch.ones(4, dtype=F64)
    y = torch.func.vmap(lambda A: idf.linear_solve(A, b, solver="cholesky", on_failure="nan"))(torch.stack([S, N]))
    torch.testing.assert_close(y[0], torch.linalg.solve(S, b))
    assert torch.isnan(y[1]).all()


def test_float32_eager_path(g):
    A = _well(g, 2, 30, 30)
    b = torch.randn(2, 30, generator=g, dtype=F64)
    A32, b32 = A.float().requires_grad_(), b.float().requires_grad_()
    y = idf.linear_solve(A32, b32)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), torch.linalg.solve(A, b), atol=1e-5, rtol=1e-5)
    gA, gb = torch.autograd.grad(y.sum(), (A32, b32))
    A64, b64 = A.clone().requires_grad_(), b.clone().requires_grad_()
    rA, rb = torch.autograd.grad(torch.linalg.solve(A64, b64).sum(), (A64, b64))
    torch.testing.assert_close(gA.double(), rA, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gb.double(), rb, atol=1e-5, rtol=1e-4)


def test_screened_condition_estimate_is_an_upper_bound_on_rcond(g):
    # the screen may be loose for well-conditioned matrices, never smaller than the truth's bound
    # (an upper bound on rcond), and it agrees with Hager's in doubt
    A = torch.stack([mk_cond(g, c) for c in (1.0, 1e3, 1e8, 1e13)])
    _, screened = linalg.LU.factor(A, screen=True)
    _, full = linalg.LU.factor(A)
    exact = 1.0 / (torch.linalg.matrix_norm(A, ord=1) * torch.linalg.matrix_norm(torch.linalg.inv(A), ord=1))
    assert bool((screened >= exact * (1 - 1e-10)).all()) and bool((full >= exact * (1 - 1e-10)).all())
    assert bool((screened[2:] == full[2:]).all())  # below sqrt(eps): Hager ran (its estimate is kept)


def mk_cond(g, c, n=8):
    Q1, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    Q2, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    s = torch.logspace(0, -torch.log10(torch.tensor(c)).item(), n, dtype=F64)
    return Q1 @ torch.diag(s) @ Q2.mT


def test_cholesky_asymmetric_element_in_a_kept_batch(g):
    S = _well(g, 4, 4)
    S = S @ S.mT
    A = torch.stack([S, S + torch.triu(torch.ones(4, 4, dtype=F64), 1)])
    y, info = idf.linear_solve_ex(A, torch.ones(2, 4, dtype=F64), solver="cholesky")
    assert info.status.tolist() == [Status.SUCCESS, Status.SINGULAR]
    torch.testing.assert_close(y[0], torch.linalg.solve(S, torch.ones(4, dtype=F64)))
    assert torch.isnan(y[1]).all()


@pytest.mark.parametrize("values", ["a", None, [1.0, "b"], torch.ones(2, dtype=torch.int64)])
def test_pinned_values_must_be_numbers(values):
    with pytest.raises(InputError, match="Pinned.values"):
        idf.linear_solve(torch.ones(1, 3, dtype=F64), torch.ones(1, dtype=F64), selection=Pinned([0, 1], values))


@pytest.mark.parametrize("y0", ["a", None, torch.tensor([0.0, float("nan"), 0.0], dtype=F64), torch.zeros(4, dtype=F64)])
def test_nearest_reference_is_validated(y0):
    with pytest.raises(InputError, match="Nearest.y0"):
        idf.linear_solve(torch.ones(1, 3, dtype=F64), torch.ones(1, dtype=F64), selection=Nearest(y0))


@pytest.mark.parametrize("n", [60, 300])  # 300² entries: a row-major A goes in as the transposed system
@pytest.mark.parametrize("layout", ["row_major", "column_major"])
def test_hidden_ill_conditioning_is_caught_whichever_factor_holds_it(layout, n):
    # Kahan's matrix and its transpose, with a benign b (y = 1, nothing large in the solution):
    # the pivots are all 1; the ill conditioning (≈ 2ⁿ) sits in U for one and in L for the other, and
    # in a row-major or a column-major A torch may factorize A or Aᵀ — the screen's generic solve
    # through both factors sees it every time, alone and in a batch of well-conditioned systems.
    from implicitdiff.implicit.linear import fast_square_solve

    upper = torch.triu(-torch.ones(n, n, dtype=F64), 1) + torch.eye(n, dtype=F64)
    for K in (upper, upper.mT):
        A = K.contiguous() if layout == "row_major" else K.mT.contiguous().mT
        b = A @ torch.ones(n, dtype=F64)
        assert fast_square_solve(A, b, True) is None
        with pytest.raises(SolveError, match="SINGULAR"):
            idf.linear_solve(A, b)
        batch = torch.stack([torch.eye(n, dtype=F64) * 2, K, torch.eye(n, dtype=F64)])
        _, info = idf.linear_solve_ex(batch, batch @ torch.ones(n, dtype=F64))
        assert info.status.tolist() == [Status.SUCCESS, Status.SINGULAR, Status.SUCCESS]
    # a well-conditioned system takes the fast path and gets the general path's bits
    g = torch.Generator().manual_seed(5)
    A = torch.randn(n, n, generator=g, dtype=F64) / n ** 0.5 + 2 * torch.eye(n, dtype=F64)
    A = A if layout == "row_major" else A.mT.contiguous().mT
    b = torch.randn(n, generator=g, dtype=F64)
    y = fast_square_solve(A, b, True)
    assert y is not None and torch.equal(y, idf.linear_solve(A, b, return_info=True)[0])
    torch.testing.assert_close(y, torch.linalg.solve(A, b), atol=1e-13, rtol=0)


def test_eager_square_path_gradients_match_finite_differences_float64(g):
    # the eager path differentiates with torch.linalg.solve's formulas: check them against central
    # differences (first order, forward mode, double backward), unbatched and batched, one and k columns
    for shape_b in [(5,), (5, 3), (2, 5), (2, 5, 3)]:
        batch = shape_b[:-1] if len(shape_b) == 2 and shape_b[0] == 2 else shape_b[:-2]
        A = _well(g, *batch, 5, 5).requires_grad_()
        b = torch.randn(*shape_b, generator=g, dtype=F64, requires_grad=True)
        assert gradcheck(idf.linear_solve, (A, b), check_forward_ad=True, atol=1e-9, rtol=1e-7)
        assert torch.autograd.gradgradcheck(idf.linear_solve, (A, b), atol=1e-9, rtol=1e-7)


def test_an_lu_layout_torch_does_not_report_sends_every_solve_the_general_way(monkeypatch, g):
    # a future torch whose solve returns an LU of neither A nor Aᵀ: no screen can be read from it,
    # so the eager path declines and the general path (its own LU) solves, reports and raises
    from implicitdiff._core import torch_private as tp
    from implicitdiff.implicit.linear import fast_square_solve

    tp._lu_is_of_transpose.cache_clear()
    monkeypatch.setattr(tp, "_lu_is_of_transpose", lambda *a: None)
    A = _well(g, 6, 6).requires_grad_()
    b = torch.randn(6, generator=g, dtype=F64, requires_grad=True)
    assert fast_square_solve(A, b, True) is None
    y = idf.linear_solve(A, b)
    torch.testing.assert_close(y, torch.linalg.solve(A, b), atol=1e-13, rtol=0)
    assert gradcheck(idf.linear_solve, (A, b))
    with pytest.raises(SolveError, match="SINGULAR"):
        idf.linear_solve(torch.ones(4, 4, dtype=F64), torch.ones(4, dtype=F64))



@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA is not available here")])])
@pytest.mark.parametrize("batched", [False, True])
def test_eager_screen_reads_the_same_verdicts_on_every_device(device, batched, g):
    # the screen's scalars are read one item() at a time on the CPU and stacked into one read
    # elsewhere: on each device, for one system and a batch, it passes a well-conditioned system
    # with torch.linalg.solve's values and declines Kahan's matrix (ill conditioning hidden in a
    # factor) and a NaN in b
    from implicitdiff.implicit.linear import fast_square_solve

    n = 40
    kahan = torch.triu(-torch.ones(n, n, dtype=F64), 1) + torch.eye(n, dtype=F64)
    well = _well(g, n, n)
    b = torch.randn(n, generator=g, dtype=F64)
    nan_b = b.clone()
    nan_b[3] = float("nan")

    def system(M, rhs):  # batched: behind a benign system, so only the second element can fail
        if batched:
            M, rhs = torch.stack([2 * torch.eye(n, dtype=F64), M]), torch.stack([torch.ones(n, dtype=F64), rhs])
        return M.to(device), rhs.to(device)

    A, rhs = system(well, b)
    y = fast_square_solve(A, rhs, True)
    assert y is not None and torch.equal(y, torch.linalg.solve(A, rhs))
    assert fast_square_solve(*system(kahan, b), True) is None
    assert fast_square_solve(*system(well, nan_b), True) is None
