"""A registry of ``linear_solve`` cases (every selection and solver path, batched and broadcast)
swept across transforms, in float64 against central finite differences: backward and forward mode
(``gradcheck``), ``torch.func.jvp``, ``jacrev``/``jacfwd``, ``vmap`` and double backward
(``gradgradcheck``, ``torch.func.hessian``)."""

from __future__ import annotations

from typing import Callable, NamedTuple

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck
from torch.func import hessian, jacfwd, jacrev, jvp, vmap

import implicitdiff as idf
from implicitdiff import Nearest, Pinned
from implicitdiff.linalg import LinearOperator

F64 = torch.float64


class Case(NamedTuple):
    fn: Callable  # fn(*inputs) -> y; every input is differentiated
    inputs: tuple


def _eye(n):
    return torch.eye(n, dtype=F64)


def _build(name, g, mk):
    r = lambda *s: mk.randn(g, *s)  # noqa: E731
    pos = lambda *s: torch.rand(*s, generator=g, dtype=F64) + 0.5  # noqa: E731
    wc = lambda m, n, **k: mk.well_conditioned(g, m, n, **k)  # noqa: E731
    ls = idf.linear_solve
    cases = {
        # square
        "square_auto": lambda: Case(lambda A, b: ls(A, b), (wc(4, 4), r(4))),
        "square_exact_multi_rhs": lambda: Case(lambda A, b: ls(A, b, selection="exact"), (wc(3, 3), r(3, 2))),
        "square_min_norm_qr": lambda: Case(lambda A, b: ls(A, b, selection="min_norm", solver="qr"),
                                           (wc(3, 3), r(3))),
        "square_svd": lambda: Case(lambda A, b: ls(A, b, solver="svd"), (wc(3, 3), r(3))),
        # wide (many solutions)
        "wide_auto": lambda: Case(lambda A, b: ls(A, b), (wc(2, 4), r(2))),
        "wide_exact": lambda: Case(lambda A, b: ls(A, b, selection="exact"), (wc(2, 4), r(2, 2))),
        "wide_min_norm_svd": lambda: Case(lambda A, b: ls(A, b, selection="min_norm", solver="svd"),
                                          (wc(2, 4), r(2))),
        # tall (least squares)
        "tall_auto": lambda: Case(lambda A, b: ls(A, b), (wc(4, 2), r(4))),
        "tall_least_squares_svd": lambda: Case(lambda A, b: ls(A, b, selection="least_squares", solver="svd"),
                                               (wc(4, 2), r(4, 2))),
        "tall_min_norm": lambda: Case(lambda A, b: ls(A, b, selection="min_norm"), (wc(4, 3), r(4))),
        # selections with differentiable parameters
        "nearest_diag": lambda: Case(lambda A, b, y0, w: ls(A, b, selection=Nearest(y0, w)),
                                     (wc(2, 4), r(2), r(4), pos(4))),
        "nearest_matrix": lambda: Case(
            lambda A, b, y0, M: ls(A, b, selection=Nearest(y0, M @ M.mT + _eye(4))), (wc(2, 4), r(2), r(4), r(4, 4))),
        "nearest_no_weight_tall": lambda: Case(lambda A, b, y0: ls(A, b, selection=Nearest(y0)),
                                               (wc(4, 3), r(4), r(3))),
        "pinned": lambda: Case(lambda A, b, v: ls(A, b, selection=Pinned([1, 3], v)), (r(2, 4), r(2), r(2))),
        "pinned_multi_rhs": lambda: Case(lambda A, b, v: ls(A, b, selection=Pinned([2], v)),
                                         (r(2, 3), r(2, 2), r(1, 2))),
        # rank-deficient A = B C (perturbations keep the rank)
        "rank_deficient_svd": lambda: Case(lambda B, C, b: ls(B @ C, b, selection="min_norm", solver="svd"),
                                           (r(3, 2), r(2, 4), r(3))),
        "rank_deficient_auto_square": lambda: Case(lambda B, C, b: ls(B @ C, b, selection="min_norm"),
                                                   (r(3, 2), r(2, 3), r(3))),
        # Cholesky
        "cholesky": lambda: Case(lambda M, b: ls(M @ M.mT + _eye(3), b, solver="cholesky"), (r(3, 3), r(3))),
        "cholesky_operator": lambda: Case(
            lambda M, b: ls(LinearOperator.from_dense(M @ M.mT + _eye(3), positive_definite=True), b),
            (r(3, 3), r(3, 2))),
        # batched and broadcast
        "batched": lambda: Case(lambda A, b: ls(A, b), (wc(3, 3, batch=(2,)), r(2, 3))),
        "broadcast_shared_A": lambda: Case(lambda A, b: ls(A, b, selection="min_norm"), (wc(2, 3), r(2, 2, 1))),
        "broadcast_shared_b": lambda: Case(lambda A, b: ls(A, b), (wc(3, 2, batch=(2,)), r(3, 2))),
    }
    c = cases[name]()
    return Case(c.fn, tuple(x.detach().requires_grad_() for x in c.inputs))


NAMES = ["square_auto", "square_exact_multi_rhs", "square_min_norm_qr", "square_svd", "wide_auto", "wide_exact",
         "wide_min_norm_svd", "tall_auto", "tall_least_squares_svd", "tall_min_norm", "nearest_diag",
         "nearest_matrix", "nearest_no_weight_tall", "pinned", "pinned_multi_rhs", "rank_deficient_svd",
         "rank_deficient_auto_square", "cholesky", "cholesky_operator", "batched", "broadcast_shared_A",
         "broadcast_shared_b"]
# double backward on a representative subset (each gradgradcheck costs ~O(inputs²) solves)
SECOND_ORDER = ["square_auto", "wide_auto", "tall_auto", "nearest_diag", "nearest_matrix", "pinned",
                "rank_deficient_svd", "cholesky", "broadcast_shared_A"]


@pytest.fixture(params=NAMES)
def case(request, g, mk):
    return _build(request.param, g, mk)


@pytest.fixture(params=SECOND_ORDER)
def case2(request, g, mk):
    return _build(request.param, g, mk)


def _tangents(case, g):
    return tuple(torch.randn(x.shape, generator=g, dtype=F64) for x in case.inputs)


def test_gradcheck_reverse_and_forward(case):
    assert gradcheck(case.fn, case.inputs, check_forward_ad=True, check_backward_ad=True, check_batched_grad=False)


def test_gradgradcheck(case2):
    assert gradgradcheck(case2.fn, case2.inputs)


def test_func_jvp_matches_central_differences(case, g, fd):
    primals = tuple(x.detach() for x in case.inputs)
    tangents = _tangents(case, g)
    y, dy = jvp(case.fn, primals, tangents)
    torch.testing.assert_close(y, case.fn(*primals), rtol=0, atol=0)
    torch.testing.assert_close(dy, fd.directional(case.fn, primals, tangents), rtol=1e-6, atol=1e-8)


def test_jacrev_and_jacfwd_match_finite_differences(case, fd):
    primals = tuple(x.detach() for x in case.inputs)
    argnums = tuple(range(len(primals)))
    J_rev = jacrev(case.fn, argnums=argnums)(*primals)
    J_fwd = jacfwd(case.fn, argnums=argnums)(*primals)
    J_fd = fd.jacobian(case.fn, primals)
    for r, f, n in zip(J_rev, J_fwd, J_fd):
        torch.testing.assert_close(r, f, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(r, n, rtol=1e-6, atol=1e-8)


def test_vmap_equals_the_loop(case, g):
    # three perturbed copies of every input, mapped over a new leading dimension
    stacked = tuple(torch.stack([x.detach() + 0.05 * torch.randn(x.shape, generator=g, dtype=F64)
                                 for _ in range(3)]) for x in case.inputs)
    out = vmap(case.fn)(*stacked)
    for i in range(3):
        torch.testing.assert_close(out[i], case.fn(*(s[i] for s in stacked)), rtol=1e-12, atol=1e-12)


def test_vmap_over_one_argument_only(case, g):
    # the first input is shared (unbatched); the last is batched
    *shared, last = (x.detach() for x in case.inputs)
    batch = torch.stack([last + 0.05 * torch.randn(last.shape, generator=g, dtype=F64) for _ in range(2)])
    out = vmap(lambda z: case.fn(*shared, z))(batch)
    for i in range(2):
        torch.testing.assert_close(out[i], case.fn(*shared, batch[i]), rtol=1e-12, atol=1e-12)


def test_hessian_matches_finite_differences_of_the_gradient(case2, fd):
    primals = [x.detach() for x in case2.inputs]
    c = torch.linspace(-1.0, 1.0, case2.fn(*primals).numel(), dtype=F64)

    def loss(x0):
        y = case2.fn(x0, *primals[1:])
        return (torch.sin(y).reshape(-1) * c).sum()  # nonlinear in y so the Hessian has both parts

    H = hessian(loss)(primals[0])
    H_fd = fd.jacobian(lambda x0: torch.func.grad(loss)(x0), [primals[0]])[0]
    torch.testing.assert_close(H, H_fd, rtol=1e-6, atol=1e-7)
    n = primals[0].numel()
    torch.testing.assert_close(H.reshape(n, n), H.reshape(n, n).T, rtol=1e-9, atol=1e-10)


def test_hvp_forward_over_reverse(case2, g):
    # (∇²L) v by jvp of grad, against reverse-over-reverse (autograd.functional.hvp)
    primals = tuple(x.detach() for x in case2.inputs)

    def loss(*xs):
        return case2.fn(*xs).square().sum()

    v = _tangents(case2, g)
    _, hvp_fwd = jvp(torch.func.grad(loss, argnums=tuple(range(len(primals)))), primals, v)
    _, hvp_rev = torch.autograd.functional.hvp(loss, primals, v)
    for a, b in zip(hvp_fwd, hvp_rev):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_per_sample_jacobians_by_vmap_of_jacrev(mk, g):
    A = mk.well_conditioned(g, 2, 4, batch=(3,))
    b = mk.randn(g, 3, 2)
    J = vmap(jacrev(lambda b, A: idf.linear_solve(A, b)))(b, A)
    torch.testing.assert_close(J, torch.linalg.pinv(A), rtol=1e-10, atol=1e-12)
