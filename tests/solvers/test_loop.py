"""The shared iteration loop: stopping rule, statuses, freezing, check_every, trace; option checks; registry."""

import math

import pytest
import torch

from implicitdiff import InputError, Status
from implicitdiff.solvers._loop import iterate, options
from implicitdiff.solvers.registry import ROOT_SOLVERS, get_root_solver
from implicitdiff.solvers.result import SolverResult

F64 = torch.float64


def _opts(y0, **kw):
    base = dict(rtol=1e-3, atol=0.0, max_iter=100, batch_dims=1, check_every=1, callback=None)
    base.update(kw)
    return options(y0, (), **base)


def _contract(rates):
    """A step with residual f = y and y ← rate · y per element: ‖F(y_k)‖ = |rate|^k ‖F(y0)‖."""
    rates = torch.as_tensor(rates, dtype=F64)

    def step(k, y, f, extra, active):
        y_new = rates.unsqueeze(-1) * y
        return y_new, y_new, tuple(e + 1 for e in extra), None

    return step


def _needed(rate, rtol):
    """Smallest k with |rate|^k <= rtol: the closed-form iteration count."""
    return math.ceil(math.log(rtol) / math.log(abs(rate)) - 1e-12)


def test_per_element_stopping_and_freezing():
    rates = [0.5, 0.2, 0.9]
    y0 = torch.ones(3, 2, dtype=F64)
    extra0 = (torch.zeros(3, dtype=F64),)
    out = iterate(_contract(rates), y0, y0.clone(), extra0, _opts(y0))
    expected = [_needed(r, 1e-3) for r in rates]
    assert out.info.iterations.tolist() == expected
    assert out.info.status.tolist() == [Status.SUCCESS] * 3
    # y frozen at the iterate that met the rule, y = rate^k y0; the step's own state is passed
    # through as the step returned it (it ran max(expected) times)
    for i, (r, k) in enumerate(zip(rates, expected)):
        assert torch.allclose(out.y[i], torch.full((2,), r ** k, dtype=F64), rtol=1e-14)
    assert out.extra[0].tolist() == [max(expected)] * 3
    assert torch.allclose(out.info.residual, torch.tensor([r ** k for r, k in zip(rates, expected)], dtype=F64))
    assert (out.info.residual <= 1e-3).all()


def test_atol_and_zero_initial_residual():
    y0 = torch.tensor([[1.0], [0.0]], dtype=F64)
    out = iterate(_contract([0.5, 0.5]), y0, y0.clone(), (), _opts(y0, rtol=0.0, atol=0.1))
    # ‖F‖ ≤ 0.1: 0.5^4 = 0.0625; an exact y0 stops at once
    assert out.info.iterations.tolist() == [4, 0]
    assert out.info.status.tolist() == [Status.SUCCESS, Status.SUCCESS]
    assert out.info.residual[1] == 0


def test_max_iterations_and_max_iter_zero():
    y0 = torch.ones(2, 1, dtype=F64)
    out = iterate(_contract([0.5, 0.99]), y0, y0.clone(), (), _opts(y0, max_iter=12))
    assert out.info.status.tolist() == [Status.SUCCESS, Status.MAX_ITERATIONS]
    assert out.info.iterations.tolist() == [10, 12]
    assert torch.isclose(out.info.residual[1], torch.tensor(0.99 ** 12, dtype=F64))
    out0 = iterate(_contract([0.5]), y0[:1], y0[:1].clone(), (), _opts(y0[:1], max_iter=0))
    assert out0.info.status.tolist() == [Status.MAX_ITERATIONS] and out0.info.iterations.tolist() == [0]


def test_nonfinite_element_is_frozen_at_its_last_finite_iterate():
    y0 = torch.ones(3, 2, dtype=F64)

    def step(k, y, f, extra, active):
        y_new = 0.5 * y
        if k == 2:   # element 1 blows up at its third step
            y_new = y_new.clone()
            y_new[1, 0] = float("nan")
        return y_new, y_new, extra, None

    out = iterate(step, y0, y0.clone(), (), _opts(y0))
    assert out.info.status.tolist() == [Status.SUCCESS, Status.NONFINITE, Status.SUCCESS]
    assert out.info.iterations.tolist() == [10, 3, 10]
    assert torch.equal(out.y[1], torch.full((2,), 0.25, dtype=F64))
    assert torch.isfinite(out.y).all()


def test_nonfinite_start_and_step_codes():
    y0 = torch.tensor([[1.0], [float("nan")], [1.0]], dtype=F64)

    def step(k, y, f, extra, active):
        code = torch.tensor([0, 0, int(Status.BREAKDOWN) if k == 1 else 0])
        return 0.5 * y, 0.5 * y, extra, code

    out = iterate(step, y0, y0.clone(), (), _opts(y0))
    assert out.info.status.tolist() == [Status.SUCCESS, Status.NONFINITE, Status.BREAKDOWN]
    assert out.info.iterations.tolist() == [10, 0, 2]
    assert out.y[2, 0] == 0.5      # a failed step keeps the previous state


def test_divergence():
    y0 = torch.ones(2, 1, dtype=F64)
    out = iterate(_contract([2.0, 0.5]), y0, y0.clone(), (), _opts(y0))
    k = math.ceil(math.log(1e8) / math.log(2.0) + 1e-12)   # 2^k > 1e8
    assert out.info.status.tolist() == [Status.DIVERGED, Status.SUCCESS]
    assert out.info.iterations[0] == k
    off = iterate(_contract([2.0]), y0[:1], y0[:1].clone(), (), _opts(y0[:1], max_iter=40), divergence=False)
    assert off.info.status.tolist() == [Status.MAX_ITERATIONS]


@pytest.mark.parametrize("check_every", [1, 4])
def test_check_every_only_changes_idle_iterations(check_every):
    y0 = torch.ones(2, 1, dtype=F64)
    out = iterate(_contract([0.5, 0.2]), y0, y0.clone(), (), _opts(y0, check_every=check_every), trace=True)
    assert out.info.iterations.tolist() == [_needed(0.5, 1e-3), _needed(0.2, 1e-3)] == [10, 5]
    # the loop reads the statuses only at k = 0, c, 2c, ...: it stops at the first multiple of c ≥ 10
    loops = math.ceil(10 / check_every) * check_every
    assert out.trace.shape == (loops + 1, 2)
    assert torch.allclose(out.trace[:, 0], 0.5 ** torch.arange(loops + 1, dtype=F64).clamp(max=10))
    assert torch.equal(out.trace[0], torch.ones(2, dtype=F64))


def test_callback_sees_every_iteration():
    y0 = torch.ones(1, 2, dtype=F64)
    seen = []
    out = iterate(_contract([0.5]), y0, y0.clone(), (), _opts(y0, callback=None),
                  callback=lambda k, y, r: seen.append((k, y.clone(), r.clone())))
    assert [s[0] for s in seen] == list(range(1, 11))
    assert torch.allclose(seen[-1][1], out.y) and torch.allclose(seen[3][2], torch.tensor([0.5 ** 4 * 2 ** 0.5], dtype=F64))


@pytest.mark.parametrize("bad, match", [
    (dict(y0=torch.ones(3, dtype=torch.int64)), "y0"),
    (dict(y0=[1.0, 2.0]), "y0"),
    (dict(params=torch.ones(2)), "params"),
    (dict(batch_dims=3), "batch_dims"),
    (dict(batch_dims=-1), "batch_dims"),
    (dict(rtol=-1.0), "rtol"),
    (dict(atol=float("nan")), "atol"),
    (dict(max_iter=-1), "max_iter"),
    (dict(max_iter=True), "max_iter"),
    (dict(check_every=0), "check_every"),
    (dict(callback=3), "callback"),
])
def test_options_reject_bad_input(bad, match):
    kw = dict(y0=torch.ones(2, dtype=F64), params=(), rtol=None, atol=0.0, max_iter=10, batch_dims=0,
              check_every=None, callback=None)
    kw.update(bad)
    y0, params = kw.pop("y0"), kw.pop("params")
    with pytest.raises(InputError, match=match):
        options(y0, params, **kw)


def test_options_defaults():
    o32 = options(torch.ones(2, 3), (), rtol=None, atol=0.0, max_iter=5, batch_dims=1, check_every=None,
                  callback=None)
    o64 = options(torch.ones(2, 3, dtype=F64), (), rtol=None, atol=0.0, max_iter=5, batch_dims=1,
                  check_every=None, callback=None)
    assert (o32.rtol, o64.rtol) == (1e-6, 1e-10)
    assert o32.check_every == 1 and o32.batch_shape == (2,) and o32.n == 3
    o0 = options(torch.tensor(1.0), (), rtol=None, atol=0.0, max_iter=5, batch_dims=0, check_every=None,
                 callback=None)
    assert o0.n == 1 and o0.batch_shape == ()


def test_registry():
    for name, fn in ROOT_SOLVERS.items():
        assert get_root_solver(name) is fn and fn.__name__ == name
    with pytest.raises(InputError, match="'newton', 'broyden', 'anderson', 'picard'"):
        get_root_solver("gauss-seidel")
    with pytest.raises(InputError, match="unknown root solver"):
        get_root_solver(None)


@pytest.mark.parametrize("name", sorted(ROOT_SOLVERS))
def test_every_root_solver_checks_F(name):
    solver = get_root_solver(name)
    y0 = torch.zeros(2, 3, dtype=F64)
    with pytest.raises(InputError, match=r"F\(y, \*params\) must return a tensor of y's shape \(2, 3\), got \(3,\)"):
        solver(lambda y: y.sum(0), y0)
    with pytest.raises(InputError, match="must return a tensor, got float"):
        solver(lambda y: 1.0, y0)
    with pytest.raises(InputError, match="keep y's dtype"):
        solver(lambda y: y.float(), y0)
    res = solver(lambda y: 0.5 * (1.0 - y), y0, max_iter=60)
    assert isinstance(res, SolverResult) and res.info.status.shape == ()


def _scenario(name):
    """A step for one element (shape (*, 2)) and the options that exercise one way of stopping."""
    def step(k, y, f, extra, active):
        y_new = 0.5 * y
        code = None
        if name == "nonfinite" and k == 2:
            y_new = torch.full_like(y, float("nan"))
        if name == "inf_iterate_finite_residual" and k == 1:    # F finite, y not: still NONFINITE
            y_new = torch.full_like(y, float("inf"))
            return y_new, torch.ones_like(y), extra, None
        if name == "code":
            code = torch.full(y.shape[:-1], int(Status.BREAKDOWN) if k == 3 else 0, dtype=torch.int64)
        if name == "diverge":
            y_new = 3.0 * y
        return y_new, y_new.clone(), extra, code

    kw = dict(max_iter=7) if name == "max_iter" else {}
    return step, kw


@pytest.mark.parametrize("name", ["converge", "nonfinite", "inf_iterate_finite_residual", "code", "diverge",
                                  "max_iter", "exact_start"])
def test_unbatched_host_path_matches_the_batched_loop(name):
    # one problem (batch_dims = 0) must end in the same state as the same element in a batch of one,
    # with check_every 1 and 3 (masks, idle steps)
    step, kw = _scenario(name)
    y0 = torch.zeros(2, dtype=F64) if name == "exact_start" else torch.tensor([1.0, -2.0], dtype=F64)
    seen = []
    one = iterate(step, y0, y0.clone(), (), _opts(y0, batch_dims=0, **kw), trace=True,
                  callback=lambda k, y, r: seen.append((k, y.clone(), r.clone())))
    assert one.info.status.shape == () and one.info.iterations.shape == ()
    for check_every in (1, 3):
        many = iterate(step, y0[None], y0[None].clone(), (), _opts(y0[None], check_every=check_every, **kw),
                       trace=True)
        assert one.info.status == many.info.status[0] and one.info.iterations == many.info.iterations[0]
        assert torch.equal(one.y, many.y[0]) and torch.equal(one.info.residual, many.info.residual[0])
        rows = one.trace.shape[0]
        assert torch.equal(one.trace, many.trace[:rows, 0])
        assert (many.trace[rows:, 0] == one.trace[-1]).all()      # idle steps change nothing
    expected = {"converge": Status.SUCCESS, "nonfinite": Status.NONFINITE, "code": Status.BREAKDOWN,
                "inf_iterate_finite_residual": Status.NONFINITE, "diverge": Status.DIVERGED,
                "max_iter": Status.MAX_ITERATIONS, "exact_start": Status.SUCCESS}[name]
    assert one.info.status == expected
    assert [s[0] for s in seen] == list(range(1, int(one.info.iterations) + 1))
    assert torch.isfinite(one.y).all()


def test_every_element_moving_then_some_stopping():
    # the loop skips its masks while every element moves; once one stops, its state is frozen
    rates = [0.5, 0.2, 0.8, 0.3]
    y0 = torch.ones(4, 3, dtype=F64)
    out = iterate(_contract(rates), y0, y0.clone(), (), _opts(y0, rtol=1e-6))
    expected = [_needed(r, 1e-6) for r in rates]
    assert out.info.iterations.tolist() == expected
    for i, (r, k) in enumerate(zip(rates, expected)):
        assert torch.allclose(out.y[i], torch.full((3,), r ** k, dtype=F64), rtol=1e-13)
