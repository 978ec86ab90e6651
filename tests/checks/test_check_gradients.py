"""check_gradients: passes on the library's layers, fails on planted wrong gradients, and names the input."""

import pytest
import torch

import implicitdiff as idf
from implicitdiff import InputError
from implicitdiff.checks import finite_diff
from implicitdiff.checks.check_gradients import check_gradients
from implicitdiff.checks.report import GradientReport

F64 = torch.float64


def _problem(n=3, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=F64) + n * torch.eye(n, dtype=F64)
    b = torch.randn(n, generator=g, dtype=F64)
    return A.to(dtype), b.to(dtype)


class _Scaled(torch.autograd.Function):
    """Identity forward; backward and jvp scaled by ``(1 + bw)`` and ``(1 + fw)``: planted errors."""

    @staticmethod
    def forward(x, bw, fw):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.bw, ctx.fw = inputs[1], inputs[2]

    @staticmethod
    def backward(ctx, g):
        return (1 + ctx.bw) * g, None, None

    @staticmethod
    def jvp(ctx, t, _bw, _fw):
        return (1 + ctx.fw) * t


class _NoJvp(torch.autograd.Function):
    @staticmethod
    def forward(x):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return g


def test_passes_on_linear_solve_against_fd_and_reference():
    A, b = _problem()
    report = check_gradients(idf.linear_solve, A, b, mode="both", reference=lambda A, b: torch.linalg.solve(A, b))
    assert isinstance(report, GradientReport)
    assert bool(report), str(report)
    assert report.inputs == ("A", "b")
    assert {(c.input, c.mode, c.against) for c in report.comparisons} >= {
        ("output", "value", "reference"), ("A", "rev", "fd"), ("b", "fwd", "reference")}
    # float64 central differences with eps = 1e-6 resolve the gradient to ~1e-9 relative here
    assert report.max_abs_err("b") < 1e-7 and report.max_abs_err("A") < 1e-7
    assert report.max_abs_err("b", against="reference") < 1e-12


def test_passes_on_the_seeds_pinned_selection_with_values_depending_on_x():
    A = torch.tensor([[1.0, 2.0]], dtype=F64)
    x = torch.tensor([3.0], dtype=F64)

    def fn(A, x):  # y₁ = f(x) = x / (2a₁): the note's first selection
        return idf.linear_solve(A, x, selection=idf.Pinned([0], x / (2 * A[..., 0, 0])))

    def closed_form(A, x):
        return torch.cat([x / (2 * A[0, 0]), x / (2 * A[0, 1])])

    assert check_gradients(fn, A, x, mode="both", reference=closed_form)


def test_fails_on_a_planted_wrong_backward_and_names_the_input():
    A, b = _problem()
    report = check_gradients(lambda A, b: idf.linear_solve(A, _Scaled.apply(b, 1.0, 0.0)), A, b, mode="both")
    assert not bool(report)
    assert not report.passed
    failed = {(c.input, c.mode) for c in report.failures}
    assert failed == {("b", "rev")}  # A's gradient and b's jvp are right
    text = str(report)
    assert "FAILED" in text and "FAIL" in text.splitlines()[[i for i, line in enumerate(text.splitlines())
                                                             if line.strip().startswith("b ")][0]]


def test_detects_a_small_relative_error_in_float64():
    A, b = _problem()
    report = check_gradients(lambda A, b: idf.linear_solve(A, _Scaled.apply(b, 1e-4, 0.0)), A, b)
    assert not report
    assert report.failures[0].input == "b"
    assert report.failures[0].max_rel_err > 1e-5


def test_fails_on_a_planted_wrong_jvp_only_in_forward_mode():
    A, b = _problem()
    fn = lambda A, b: idf.linear_solve(A, _Scaled.apply(b, 0.0, 0.5))  # noqa: E731
    assert check_gradients(fn, A, b, mode="rev")
    report = check_gradients(fn, A, b, mode="fwd")
    assert not report and {c.input for c in report.failures} == {"b"}


def test_an_exception_in_a_derivative_fails_its_row_with_the_message():
    A, b = _problem()
    report = check_gradients(lambda A, b: idf.linear_solve(A, _NoJvp.apply(b)), A, b, mode="both")
    assert not report
    (bad,) = report.failures
    assert (bad.input, bad.mode) == ("b", "fwd") and "jvp" in bad.error
    assert "raised" in str(report)


def test_a_reference_computing_another_function_fails_the_value_row():
    A, b = _problem()
    report = check_gradients(idf.linear_solve, A, b, reference=lambda A, b: 2 * torch.linalg.solve(A, b))
    assert not report
    assert ("output", "value") in {(c.input, c.mode) for c in report.failures}


def test_pytree_inputs_are_named_by_parameter_and_key():
    A, b = _problem()
    params = {"A": A, "b": b}
    report = check_gradients(lambda p, scale: scale * idf.linear_solve(p["A"], p["b"]), params, 2)
    assert report, str(report)
    assert report.inputs == ("p['A']", "p['b']")


def test_only_inputs_that_require_grad_when_some_do():
    A, b = _problem()
    report = check_gradients(idf.linear_solve, A, b.clone().requires_grad_(True))
    assert report.inputs == ("b",)


def test_large_inputs_use_random_directions_and_still_catch_errors():
    A, b = _problem(n=9)  # 81 entries > max_fd_numel=64
    good = check_gradients(idf.linear_solve, A, b)
    assert good and any("random directions" in n for n in good.notes)
    bad = check_gradients(lambda A, b: _Scaled.apply(idf.linear_solve(A, b), 0.1, 0.0), A, b)
    assert not bad and {c.input for c in bad.failures} == {"A", "b"}


def test_forward_tolerance_raises_the_floor_by_the_condition():
    A, b = _problem()
    fn = lambda A, b: idf.linear_solve(A, _Scaled.apply(b, 1e-5, 0.0))  # noqa: E731  (an "inexact" gradient)
    exact = check_gradients(fn, A, b)
    loose = check_gradients(fn, A, b, forward_tol=1e-4, eps=1e-3)
    assert not exact
    assert loose, str(loose)
    row = [c for c in loose.comparisons if c.input == "b"][0]
    assert row.floor > 10 * [c for c in exact.comparisons if c.input == "b"][0].floor
    # the floor grows with the condition used to propagate the tolerance
    worse = check_gradients(fn, A, b, forward_tol=1e-4, eps=1e-3, cond=1e3)
    assert [c for c in worse.comparisons if c.input == "b"][0].floor > row.floor
    assert worse.cond == 1e3 and 1 <= exact.cond < 1e2


def test_float32_layers_pass_with_float32_tolerances():
    A, b = _problem(dtype=torch.float32)
    report = check_gradients(idf.linear_solve, A, b, mode="both")
    assert report, str(report)
    assert report.dtype == "float32" and report.rtol == 1e-3


def test_report_str_and_repr_are_readable():
    A, b = _problem()
    report = check_gradients(idf.linear_solve, A, b)
    text = str(report)
    assert text.startswith("check_gradients: PASSED")
    for column in ("input", "mode", "max abs err", "max rel err", "floor", "result"):
        assert column in text
    assert repr(report) == "GradientReport(passed=True, inputs=[A, b], failures=0)"
    with pytest.raises(KeyError, match="inputs are"):
        report.max_abs_err("nope")


@pytest.mark.parametrize("kwargs, match", [
    (dict(mode="sideways"), "mode"),
    (dict(eps=0.0), "eps"),
    (dict(rtol=-1.0), "rtol"),
    (dict(cond=0.5), "cond"),
    (dict(reference=3), "reference"),
    # every option is validated: NaN, infinity, wrong types and ranges are named, never used
    (dict(rtol=float("nan")), "rtol"),
    (dict(atol=float("nan")), "atol"),
    (dict(atol=-1e-9), "atol"),
    (dict(forward_tol=float("nan")), "forward_tol"),
    (dict(forward_tol=-0.1), "forward_tol"),
    (dict(rtol=float("inf")), "rtol"),
    (dict(eps=float("nan")), "eps"),
    (dict(eps=1.5), "eps"),
    (dict(eps="1e-6"), "eps"),
    (dict(cond=float("nan")), "cond"),
    (dict(cond=float("inf")), "cond"),
    (dict(mode=None), "mode"),
    (dict(seed=1.5), "seed"),
    (dict(seed=None), "seed"),
    (dict(max_fd_numel=-1), "max_fd_numel"),
    (dict(max_fd_numel=2.0), "max_fd_numel"),
    (dict(num_directions=0), "num_directions"),
    (dict(num_directions=True), "num_directions"),
    (dict(fd_dtype=torch.int64), "fd_dtype"),
    (dict(fd_dtype="float64"), "fd_dtype"),
])
def test_bad_options_raise_input_error_naming_them(kwargs, match):
    A, b = _problem()
    with pytest.raises(InputError, match=match):
        check_gradients(idf.linear_solve, A, b, **kwargs)


def test_bad_functions_and_inputs_raise_input_error():
    with pytest.raises(InputError, match="floating-point"):
        check_gradients(lambda n: torch.ones(2) * n, 3)
    with pytest.raises(InputError, match="floating-point tensor"):
        check_gradients(lambda x: float(x.sum()), torch.ones(2, dtype=F64))
    W = torch.eye(2)  # float32, captured: fn cannot follow its inputs to float64
    with pytest.raises(InputError, match="fd_dtype"):
        check_gradients(lambda x: x @ W, torch.ones(2))


def test_finite_differences_match_closed_forms():
    A, b = _problem()
    J_A, J_b = finite_diff.jacobian(idf.linear_solve, A, b)
    A_inv = torch.linalg.inv(A)
    y = torch.linalg.solve(A, b)
    assert torch.allclose(J_b, A_inv, atol=1e-8)                 # dy/db = A⁻¹
    # dy/dA[k, l] = −A⁻¹[:, k] y[l]
    assert torch.allclose(J_A, -(A_inv[:, :, None] * y[None, None, :]).reshape(3, 9), atol=1e-8)
    t = torch.randn(3, generator=torch.Generator().manual_seed(3), dtype=F64)
    assert torch.allclose(finite_diff.jvp(idf.linear_solve, (A, b), (None, t)), A_inv @ t, atol=1e-8)


@pytest.mark.parametrize("kwargs, match", [(dict(dtype=torch.float16), "dtype"), (dict(seed=0.5), "seed"),
                                           (dict(pattern=3), "pattern")])
def test_selfcheck_run_validates_its_options(kwargs, match):
    from implicitdiff.checks.selfcheck import run

    with pytest.raises(InputError, match=match):
        run(**kwargs)
