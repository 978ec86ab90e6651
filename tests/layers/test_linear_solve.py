"""``linear_solve`` values and gradients in float64 against closed forms (A⁻¹, A⁺, the seed note's
selections, Nearest/Pinned formulas), batching and broadcasting, several right-hand sides,
rank-deficient and Cholesky paths, solver choices, ``SolveInfo``, and float32 smoke tests."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck
from torch.func import jacrev

import implicitdiff as idf
from implicitdiff import Nearest, Pinned, Status
from implicitdiff.linalg import CholeskyFactor as Cholesky, LinearOperator

F64 = torch.float64
TIGHT = dict(rtol=1e-10, atol=1e-12)


def _grads(y, inputs, ybar):
    return torch.autograd.grad(y, inputs, ybar, allow_unused=True)


# ============================================================================ closed forms
@pytest.mark.parametrize("selection", ["auto", "exact", "min_norm"])
@pytest.mark.parametrize("solver", ["auto", "lu", "qr", "svd"])
def test_square_is_the_inverse(mk, g, selection, solver):
    A = mk.well_conditioned(g, 4, 4).requires_grad_()
    b = mk.randn(g, 4).requires_grad_()
    y = idf.linear_solve(A, b, selection=selection, solver=solver)
    Ainv = torch.linalg.inv(A.detach())
    torch.testing.assert_close(y, Ainv @ b.detach(), **TIGHT)
    ybar = mk.randn(g, 4)
    gA, gb = _grads(y, (A, b), ybar)
    # the seed note: b̄ = A⁻ᵀ ȳ,  Ā = −b̄ yᵀ
    torch.testing.assert_close(gb, Ainv.T @ ybar, **TIGHT)
    torch.testing.assert_close(gA, -torch.outer(Ainv.T @ ybar, y.detach()), **TIGHT)


# ("exact" needs a consistent system: a wide full-row-rank A always is)
@pytest.mark.parametrize("shape, selection", [((3, 5), "auto"), ((3, 5), "min_norm"), ((3, 5), "exact"),
                                              ((5, 3), "auto"), ((5, 3), "least_squares"), ((5, 3), "min_norm")])
@pytest.mark.parametrize("solver", ["auto", "qr", "svd"])
def test_non_square_is_the_pseudo_inverse(mk, g, shape, selection, solver):
    m, n = shape
    A = mk.well_conditioned(g, m, n).requires_grad_()
    b = mk.randn(g, m).requires_grad_()
    y = idf.linear_solve(A, b, selection=selection, solver=solver)
    # oracle: torch.linalg.pinv and its own (SVD-based) autograd
    y_ref = torch.linalg.pinv(A) @ b
    torch.testing.assert_close(y, y_ref, **TIGHT)
    ybar = mk.randn(g, n)
    for got, ref in zip(_grads(y, (A, b), ybar), _grads(y_ref, (A, b), ybar)):
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-11)
    J = jacrev(lambda b: idf.linear_solve(A.detach(), b, selection=selection, solver=solver))(b.detach())
    torch.testing.assert_close(J, torch.linalg.pinv(A.detach()), **TIGHT)


def test_least_squares_jacobian_is_the_range_projector(mk, g):
    A = mk.well_conditioned(g, 6, 3)
    J = jacrev(lambda b: idf.linear_solve(A, b))(mk.randn(g, 6))
    P = A @ J
    torch.testing.assert_close(P, P.T, **TIGHT)
    torch.testing.assert_close(P @ P, P, **TIGHT)
    torch.testing.assert_close(P @ A, A, **TIGHT)  # A dy/db = A A⁺, the projector onto range(A)


class TestSeedNote:
    """``b = a₁y₁ + a₂y₂``: the note's two solution maps give different gradients, both valid."""

    a1, a2, b0 = 1.5, -0.8, 0.7

    def _setup(self):
        a = torch.tensor([self.a1, self.a2], dtype=F64, requires_grad=True)
        b = torch.tensor([self.b0], dtype=F64, requires_grad=True)
        return a, b

    def test_half_and_half_is_nearest_in_the_a_squared_weight(self):
        # min a₁²y₁² + a₂²y₂² s.t. a₁y₁ + a₂y₂ = b: Lagrange gives a_i² y_i = λ a_i / 2, so y_i = c / a_i,
        # and the constraint gives 2c = b: y = (b/(2a₁), b/(2a₂)), the note's f(b) = b/(2a₁).
        a, b = self._setup()
        y = idf.linear_solve(a[None, :], b, selection=Nearest(torch.zeros(2, dtype=F64), a.detach() ** 2))
        torch.testing.assert_close(y, b.detach() / (2 * a.detach()), **TIGHT)
        (gb,) = _grads(y, (b,), torch.tensor([1.0, 0.0], dtype=F64))
        torch.testing.assert_close(gb, torch.tensor([1 / (2 * self.a1)], dtype=F64), **TIGHT)
        (gb,) = _grads(idf.linear_solve(a[None, :], b, selection=Nearest(torch.zeros(2, dtype=F64), a ** 2)),
                       (b,), torch.tensor([0.3, -1.1], dtype=F64))
        torch.testing.assert_close(gb, torch.tensor([0.3 / (2 * self.a1) - 1.1 / (2 * self.a2)], dtype=F64), **TIGHT)

    def test_zero_first_coordinate_is_pinned(self):
        # f(b) = 0, g(b) = b / a₂:  ∂L/∂b = ȳ₂ / a₂
        a, b = self._setup()
        y = idf.linear_solve(a[None, :], b, selection=Pinned([0], 0.0))
        torch.testing.assert_close(y, torch.tensor([0.0, self.b0 / self.a2], dtype=F64), **TIGHT)
        ybar = torch.tensor([0.3, -1.1], dtype=F64)
        ga, gb = _grads(y, (a, b), ybar)
        torch.testing.assert_close(gb, torch.tensor([-1.1 / self.a2], dtype=F64), **TIGHT)
        # y₂ = b / a₂:  ∂y₂/∂a₁ = 0, ∂y₂/∂a₂ = −b / a₂²
        torch.testing.assert_close(ga, torch.tensor([0.0, 1.1 * self.b0 / self.a2 ** 2], dtype=F64), **TIGHT)

    def test_any_differentiable_pin_satisfies_a1_f_prime_plus_a2_g_prime_equal_one(self):
        # the note's f(b) = b² (any function of b): g = (b − a₁ b²) / a₂ and a₁ f' + a₂ g' = 1
        a, b = self._setup()
        y = idf.linear_solve(a.detach()[None, :], b, selection=Pinned([0], b ** 2))
        fp, gp = torch.autograd.functional.jacobian(
            lambda b: idf.linear_solve(a.detach()[None, :], b, selection=Pinned([0], b ** 2)), b.detach())[:, 0]
        torch.testing.assert_close(fp, torch.tensor(2 * self.b0, dtype=F64), **TIGHT)
        torch.testing.assert_close(gp, torch.tensor((1 - 2 * self.a1 * self.b0) / self.a2, dtype=F64), **TIGHT)
        torch.testing.assert_close(self.a1 * fp + self.a2 * gp, torch.tensor(1.0, dtype=F64), **TIGHT)
        torch.testing.assert_close(y[1], (b[0] - self.a1 * b[0] ** 2) / self.a2, **TIGHT)

    def test_min_norm_and_the_three_gradients_differ(self):
        a, b = self._setup()
        A = a.detach()[None, :]
        ybar = torch.tensor([0.3, -1.1], dtype=F64)
        sels = {"min_norm": "min_norm", "half": Nearest(torch.zeros(2, dtype=F64), a.detach() ** 2),
                "pinned": Pinned([0], 0.0)}
        gb = {k: _grads(idf.linear_solve(A, b, selection=s), (b,), ybar)[0] for k, s in sels.items()}
        n2 = self.a1 ** 2 + self.a2 ** 2
        torch.testing.assert_close(gb["min_norm"], torch.tensor([(0.3 * self.a1 - 1.1 * self.a2) / n2], dtype=F64),
                                   **TIGHT)
        vals = sorted(float(v) for v in gb.values())
        assert min(vals[1] - vals[0], vals[2] - vals[1]) > 0.05  # three different, all valid, gradients
        assert float(idf.ambiguity(A, ybar)) > 0.1


@pytest.mark.parametrize("weight", ["none", "vector", "matrix"])
def test_nearest_matches_its_lagrange_closed_form(mk, g, weight):
    A = mk.well_conditioned(g, 2, 5).requires_grad_()
    b = mk.randn(g, 2).requires_grad_()
    y0 = mk.randn(g, 5).requires_grad_()
    if weight == "none":
        W = None
    elif weight == "vector":
        W = (torch.rand(5, generator=g, dtype=F64) + 0.3).requires_grad_()
    else:
        W = mk.spd(g, 5).requires_grad_()
    y = idf.linear_solve(A, b, selection=Nearest(y0, W))
    y_ref = mk.nearest(A, b, y0, W)
    torch.testing.assert_close(y, y_ref, **TIGHT)
    torch.testing.assert_close(A.detach() @ y.detach(), b.detach(), **TIGHT)
    inputs = [t for t in (A, b, y0, W) if t is not None]
    ybar = mk.randn(g, 5)
    got, ref = _grads(y, inputs, ybar), _grads(y_ref, inputs, ybar)
    for i, (u, v) in enumerate(zip(got, ref)):
        if weight == "matrix" and i == 3:  # the Cholesky reads one triangle: compare symmetric parts
            u, v = (u + u.T) / 2, (v + v.T) / 2
        torch.testing.assert_close(u, v, rtol=1e-9, atol=1e-11)


def test_nearest_with_zero_reference_and_no_weight_is_min_norm(mk, g):
    A, b = mk.randn(g, 3, 6), mk.randn(g, 3)
    torch.testing.assert_close(idf.linear_solve(A, b, selection=Nearest(torch.zeros(6, dtype=F64))),
                               idf.linear_solve(A, b, selection="min_norm"), **TIGHT)


def test_nearest_of_a_rank_deficient_matrix_is_the_nearest_least_squares_solution(mk, g):
    # y0 + (A)⁺(b − A y0): the least-squares solutions closest to y0
    A = mk.sv(g, 4, 5, [2.0, 1.0])
    b, y0 = mk.randn(g, 4), mk.randn(g, 5)
    y = idf.linear_solve(A, b, selection=Nearest(y0))
    torch.testing.assert_close(y, y0 + torch.linalg.pinv(A) @ (b - A @ y0), **TIGHT)


@pytest.mark.parametrize("index", [[1, 3], [0, 4], [4, 2]])
def test_pinned_matches_its_closed_form(mk, g, index):
    A = mk.randn(g, 3, 5).requires_grad_()
    b = mk.randn(g, 3).requires_grad_()
    v = mk.randn(g, 2).requires_grad_()
    y = idf.linear_solve(A, b, selection=Pinned(index, v))
    y_ref = mk.pinned(A, b, index, v)
    torch.testing.assert_close(y, y_ref, **TIGHT)
    torch.testing.assert_close(y[index], v.detach(), rtol=0, atol=0)
    ybar = mk.randn(g, 5)
    for u, w in zip(_grads(y, (A, b, v), ybar), _grads(y_ref, (A, b, v), ybar)):
        torch.testing.assert_close(u, w, rtol=1e-9, atol=1e-11)


def test_pinned_with_tensor_index_and_scalar_values(mk, g):
    A, b = mk.randn(g, 2, 4), mk.randn(g, 2)
    y = idf.linear_solve(A, b, selection=Pinned(torch.tensor([3, 0]), 0.5))
    torch.testing.assert_close(y, mk.pinned(A, b, [3, 0], torch.tensor([0.5, 0.5], dtype=F64)), **TIGHT)


def test_pinned_on_a_square_matrix_pins_nothing(mk, g):
    A, b = mk.well_conditioned(g, 3, 3), mk.randn(g, 3)
    torch.testing.assert_close(idf.linear_solve(A, b, selection=Pinned([], 0.0)), torch.linalg.solve(A, b), **TIGHT)


# ============================================================================ shapes, batching, several rhs
SELECTIONS_WIDE = {
    "auto": lambda g, mk: "auto",
    "exact": lambda g, mk: "exact",
    "min_norm": lambda g, mk: "min_norm",
    "nearest": lambda g, mk: Nearest(mk.randn(g, 5), torch.rand(5, generator=g, dtype=F64) + 0.5),
    "nearest_matrix": lambda g, mk: Nearest(mk.randn(g, 5), mk.spd(g, 5)),
    "pinned": lambda g, mk: Pinned([0, 3], mk.randn(g, 2)),
}


@pytest.mark.parametrize("name", list(SELECTIONS_WIDE))
def test_several_right_hand_sides_are_solved_column_by_column(mk, g, name):
    A = mk.randn(g, 3, 5)
    B = mk.randn(g, 3, 4)
    sel = SELECTIONS_WIDE[name](g, mk)
    Y = idf.linear_solve(A, B, selection=sel)
    assert Y.shape == (5, 4)
    for j in range(4):
        torch.testing.assert_close(Y[:, j], idf.linear_solve(A, B[:, j], selection=sel), **TIGHT)


def test_matrix_valued_nearest_reference_and_pinned_values(mk, g):
    A, B = mk.randn(g, 2, 4), mk.randn(g, 2, 3)
    Y0, V = mk.randn(g, 4, 3), mk.randn(g, 2, 3)
    Yn = idf.linear_solve(A, B, selection=Nearest(Y0))
    Yp = idf.linear_solve(A, B, selection=Pinned([1, 2], V))
    for j in range(3):
        torch.testing.assert_close(Yn[:, j], mk.nearest(A, B[:, j], Y0[:, j], None), **TIGHT)
        torch.testing.assert_close(Yp[:, j], mk.pinned(A, B[:, j], [1, 2], V[:, j]), **TIGHT)


@pytest.mark.parametrize("a_shape, b_shape, y_shape", [
    ((3, 2, 5), (3, 2), (3, 5)),          # b of shape A.shape[:-1]: a batch of vectors
    ((3, 2, 5), (2,), (3, 5)),            # one vector against a batch of matrices
    ((2, 5), (3, 2, 4), (3, 5, 4)),       # one matrix, a batch of multi-rhs
    ((3, 2, 5), (2, 4), (3, 5, 4)),       # a batch of matrices, one multi-rhs
    ((3, 1, 2, 5), (4, 2, 1), (3, 4, 5, 1)),  # broadcasting batch dims
    ((2, 2), (2, 2), (2, 2)),             # square b of A's shape: matrix rhs (torch.linalg.solve's rule)
])
@pytest.mark.parametrize("name", ["auto", "min_norm", "nearest", "pinned"])
def test_batches_broadcast_and_equal_the_per_element_solves(mk, g, a_shape, b_shape, y_shape, name):
    A, b = mk.randn(g, *a_shape), mk.randn(g, *b_shape)
    n = a_shape[-1]
    if name == "nearest":
        sel = Nearest(mk.randn(g, n), torch.rand(n, generator=g, dtype=F64) + 0.5)
    elif name == "pinned":
        p = n - a_shape[-2]
        sel = Pinned(list(range(p)), mk.randn(g, p) if p else 0.0)
    else:
        sel = name
    y = idf.linear_solve(A, b, selection=sel)
    assert y.shape == y_shape
    vector = len(b_shape) == 1 or b_shape == a_shape[:-1]
    B = b.unsqueeze(-1) if vector else b
    Y = y.unsqueeze(-1) if vector else y
    batch = Y.shape[:-2]
    Ae = A.expand(*batch, *a_shape[-2:]).reshape(-1, *a_shape[-2:])
    Be = B.expand(*batch, *B.shape[-2:]).reshape(-1, *B.shape[-2:])
    for Ai, Bi, Yi in zip(Ae, Be, Y.reshape(-1, *Y.shape[-2:])):
        torch.testing.assert_close(Yi, idf.linear_solve(Ai, Bi, selection=sel), **TIGHT)


@pytest.mark.parametrize("a_shape, b_shape", [((2, 5), (3, 2, 2)), ((3, 2, 5), (2, 2)), ((3, 2, 5), (3, 2))])
@pytest.mark.parametrize("selection", ["min_norm", "pinned"])
def test_gradients_of_broadcast_inputs_are_summed(mk, g, a_shape, b_shape, selection):
    A = mk.randn(g, *a_shape).requires_grad_()
    b = mk.randn(g, *b_shape).requires_grad_()
    sel = Pinned([1, 4, 2], 0.25) if selection == "pinned" else selection
    assert gradcheck(lambda A, b: idf.linear_solve(A, b, selection=sel), (A, b), check_forward_ad=True)


def test_list_inputs_are_converted_to_a_dtype(mk, g):
    A = mk.well_conditioned(g, 2, 2)
    torch.testing.assert_close(idf.linear_solve(A, [1.0, 2.0]),
                               torch.linalg.solve(A, torch.tensor([1.0, 2.0], dtype=F64)), **TIGHT)


# ============================================================================ rank-deficient A = B C
@pytest.mark.parametrize("m, r, n", [(4, 2, 5), (5, 2, 3), (4, 2, 4), (3, 1, 3)])
@pytest.mark.parametrize("solver", ["svd", "auto"])
def test_rank_deficient_min_norm_gradients_to_the_factors(mk, g, m, r, n, solver):
    # perturbing B or C keeps rank(BC) = r, so the pseudo-inverse is differentiable along them
    B = mk.randn(g, m, r).requires_grad_()
    C = mk.randn(g, r, n).requires_grad_()
    b = mk.randn(g, m).requires_grad_()

    def f(B, C, b):
        return idf.linear_solve(B @ C, b, selection="min_norm", solver=solver)

    y = f(B, C, b)
    y_ref = torch.linalg.pinv(B @ C) @ b
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-11)
    ybar = mk.randn(g, n)
    for u, v in zip(_grads(y, (B, C, b), ybar), _grads(y_ref, (B, C, b), ybar)):
        torch.testing.assert_close(u, v, rtol=1e-8, atol=1e-10)
    assert gradcheck(f, (B, C, b), check_forward_ad=True)
    assert gradgradcheck(f, (B, C, b))
    _, info = idf.linear_solve_ex(B @ C, b, selection="min_norm", solver=solver)
    assert int(info.status) == Status.SUCCESS and int(info.rank) == r


def test_rank_deficient_batch_with_several_rhs(mk, g):
    B, C = mk.randn(g, 3, 4, 2), mk.randn(g, 3, 2, 5)
    Bs = mk.randn(g, 3, 4, 2)
    y = idf.linear_solve(B @ C, Bs, selection="min_norm")
    torch.testing.assert_close(y, torch.linalg.pinv(B @ C) @ Bs, rtol=1e-9, atol=1e-11)


def test_rank_rtol_truncates_small_singular_values(mk, g):
    A = mk.sv(g, 4, 4, [1.0, 0.5, 0.1, 1e-8])
    b = mk.randn(g, 4)
    keep = idf.linear_solve(A, b, selection="min_norm")
    torch.testing.assert_close(keep, torch.linalg.solve(A, b), rtol=1e-6, atol=0)
    cut = idf.linear_solve(A, b, selection="min_norm", rank_rtol=1e-6)
    torch.testing.assert_close(cut, torch.linalg.pinv(A, rtol=1e-6) @ b, **TIGHT)


def test_exact_accepts_a_consistent_non_square_system(mk, g):
    A = mk.well_conditioned(g, 5, 3).requires_grad_()
    x = mk.randn(g, 3)
    b = (A.detach() @ x).requires_grad_()
    y = idf.linear_solve(A, b, selection="exact")
    torch.testing.assert_close(y, x, **TIGHT)
    assert gradcheck(lambda A, b: idf.linear_solve(A, b, selection="exact", rtol=1.0), (A, b))


def test_exact_rtol_loosens_the_consistency_check(mk, g):
    A = mk.well_conditioned(g, 5, 3)
    b = A @ mk.randn(g, 3) + 1e-4 * mk.randn(g, 5)
    y, info = idf.linear_solve_ex(A, b, selection="exact")
    assert int(info.status) == Status.INCONSISTENT
    y = idf.linear_solve(A, b, selection="exact", rtol=1e-2)
    torch.testing.assert_close(y, torch.linalg.lstsq(A, b.unsqueeze(-1)).solution.squeeze(-1), **TIGHT)


# ============================================================================ Cholesky
def _spy_cholesky(monkeypatch):
    calls = []
    orig = Cholesky.factor.__func__

    def factor(cls, A):
        calls.append(A.shape)
        return orig(cls, A)

    monkeypatch.setattr(Cholesky, "factor", classmethod(factor))
    return calls


@pytest.mark.parametrize("how", ["solver", "operator"])
@pytest.mark.parametrize("rhs", [(), (2,)])
def test_cholesky_path_values_and_gradients(mk, g, monkeypatch, how, rhs):
    calls = _spy_cholesky(monkeypatch)
    M = mk.randn(g, 4, 4).requires_grad_()
    b = mk.randn(g, 4, *rhs).requires_grad_()

    def f(M, b):
        A = M @ M.mT + torch.eye(4, dtype=F64)  # symmetric positive definite in every direction of M
        if how == "operator":
            return idf.linear_solve(LinearOperator.from_dense(A, positive_definite=True), b)
        return idf.linear_solve(A, b, solver="cholesky")

    y = f(M, b)
    assert calls, "the Cholesky factorization must be used"
    A = M.detach() @ M.detach().T + torch.eye(4, dtype=F64)
    torch.testing.assert_close(y, torch.linalg.solve(A, b.detach()), **TIGHT)
    assert gradcheck(f, (M, b), check_forward_ad=True)
    assert gradgradcheck(f, (M, b))


def test_cholesky_batched(mk, g, monkeypatch):
    calls = _spy_cholesky(monkeypatch)
    A, b = mk.spd(g, 3, batch=(2,)), mk.randn(g, 2, 3)
    y = idf.linear_solve(LinearOperator.from_dense(A, positive_definite=True), b)
    assert calls
    torch.testing.assert_close(y, torch.linalg.solve(A, b), **TIGHT)


# ============================================================================ info and solvers
def test_solve_info_reports_per_element(mk, g):
    A = mk.well_conditioned(g, 4, 4, batch=(3,), cond=50.0)
    b = mk.randn(g, 2, 1, 4, 1)
    y, info = idf.linear_solve(A, b, return_info=True)
    assert y.shape == (2, 3, 4, 1)
    for t in (info.status, info.residual, info.iterations, info.rank, info.cond):
        assert t.shape == (2, 3)
    assert bool(info.ok.all()) and bool((info.iterations == 0).all())
    assert bool((info.rank == 4).all())
    assert bool((info.residual < 1e-14).all())
    # a 1-norm estimate of the 2-norm condition number 50: κ₂/n ≤ κ₁ ≤ n κ₂, and Hager's lower bound
    # of ‖A⁻¹‖₁ is within a small factor (10 allowed here)
    assert bool((info.cond >= 50 / 4 / 10).all()) and bool((info.cond <= 50 * 4).all())


def test_solve_info_svd_rank_and_condition(mk, g):
    A = mk.sv(g, 3, 5, [3.0, 1.5])
    y, info = idf.linear_solve(A, mk.randn(g, 3), selection="min_norm", solver="svd", return_info=True)
    assert int(info.rank) == 2
    torch.testing.assert_close(info.cond, torch.tensor(2.0, dtype=F64), rtol=1e-10, atol=0)
    assert float(info.residual) > 1e-3  # b is not in the 2-dim range: the least-squares residual is reported


@pytest.mark.parametrize("shape", [(4, 4), (3, 5), (5, 3)])
def test_solvers_agree(mk, g, shape):
    A, b = mk.well_conditioned(g, *shape), mk.randn(g, shape[0], 2)
    solvers = ["auto", "qr", "svd"] + (["lu"] if shape[0] == shape[1] else [])
    ys = [idf.linear_solve(A, b, solver=s) for s in solvers]
    for y in ys[1:]:
        torch.testing.assert_close(y, ys[0], **TIGHT)


# ============================================================================ float32
F32_CASES = {
    "square": ((4, 4), "auto"),
    "wide_min_norm": ((3, 5), "min_norm"),
    "wide_exact": ((3, 5), "exact"),
    "tall_least_squares": ((5, 3), "least_squares"),
    "nearest": ((3, 5), "nearest"),
    "pinned": ((3, 5), "pinned"),
    "cholesky": ((4, 4), "cholesky"),
}


@pytest.mark.parametrize("name", list(F32_CASES))
def test_float32_matches_the_float64_reference(mk, g, name):
    shape, sel = F32_CASES[name]
    A64 = mk.spd(g, 4) if sel == "cholesky" else mk.well_conditioned(g, *shape)
    b64 = mk.randn(g, shape[0])
    y0, w, v = mk.randn(g, 5), torch.rand(5, generator=g, dtype=F64) + 0.5, mk.randn(g, 2)

    def run(dtype):
        A = A64.to(dtype).requires_grad_()
        b = b64.to(dtype).requires_grad_()
        kw = {"selection": sel}
        if sel == "nearest":
            kw = {"selection": Nearest(y0.to(dtype), w.to(dtype))}
        elif sel == "pinned":
            kw = {"selection": Pinned([1, 2], v.to(dtype))}
        elif sel == "cholesky":
            kw = {"solver": "cholesky"}
        y = idf.linear_solve(A, b, **kw)
        assert y.dtype == dtype
        gA, gb = torch.autograd.grad(y.sin().sum(), (A, b))
        return [t.detach().double() for t in (y, gA, gb)]

    for u, v_ in zip(run(torch.float32), run(F64)):
        torch.testing.assert_close(u, v_, rtol=1e-4, atol=1e-5)
