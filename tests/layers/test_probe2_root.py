"""The second probe's findings on the root-type layers (findings 4, 8, 9, 11, 12 and 13).

Each test failed before its fix: a raw torch error or a silent answer where an ``InputError``
naming the argument belongs, a hint that pointed the wrong way, or a rejected keyword call.
"""

import pytest
import torch
from torch.func import grad, vmap

import implicitdiff as idf
from implicitdiff.nn import DEQ
from implicitdiff.solvers import SolverResult

D = torch.float64


# ---------------------------------------------------------------- finding 4: Unroll() under vmap
def _tanh_map(z, a):
    return torch.tanh(a * z + 1.0)


@pytest.mark.parametrize("layer", ["fixed_point", "root", "argmin"])
@pytest.mark.parametrize("with_grad", [False, True])
def test_unroll_under_vmap_is_an_input_error(layer, with_grad):
    a = torch.tensor([[0.5, 0.3], [0.2, 0.1]], dtype=D)
    z0 = torch.zeros(2, dtype=D)
    calls = {
        "fixed_point": lambda a: idf.fixed_point(_tanh_map, z0, a, adjoint=idf.Unroll()),
        "root": lambda a: idf.root(lambda y, a: y ** 3 + y - a, z0, a, adjoint=idf.Unroll()),
        "argmin": lambda a: idf.argmin(lambda y, a: ((y - a) ** 2).sum() + (y ** 4).sum(), z0, a,
                                       adjoint=idf.Unroll()),
    }
    fn = calls[layer]
    if with_grad:
        fn = grad(lambda a, fn=fn: fn(a).sum())
    with pytest.raises(idf.InputError, match=r"vmap.*Unroll\(\).*adjoint=Implicit\(\)"):
        vmap(fn)(a)


def test_unroll_outside_vmap_and_implicit_under_vmap_still_work():
    # the check does not touch the paths that work: Unroll without vmap, the default adjoint under vmap
    a = torch.tensor([[0.5, 0.3], [0.2, 0.1]], dtype=D)
    z0 = torch.zeros(2, dtype=D)

    def f(a, adjoint):
        return idf.fixed_point(_tanh_map, z0, a, adjoint=adjoint, rtol=1e-13).sum()

    g_vmap = vmap(grad(lambda a: f(a, idf.Implicit())))(a)
    g_unroll = torch.stack([grad(lambda a: f(a, idf.Unroll()))(ai) for ai in a])
    # closed form: z = tanh(a z + 1) elementwise, dz/da = s z / (1 − s a), s = 1 − z²
    z = torch.stack([idf.fixed_point(_tanh_map, z0, ai, rtol=1e-13) for ai in a])
    s = 1 - z ** 2
    expected = s * z / (1 - s * a)
    torch.testing.assert_close(g_vmap, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g_unroll, expected, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- finding 11: T's dtype
def test_fixed_point_map_returning_another_dtype_is_an_input_error():
    a = torch.tensor([0.5, 0.9], dtype=D)
    with pytest.raises(idf.InputError, match=r"T returned torch.float32 for z of torch.float64.*keep z's dtype"):
        idf.fixed_point(lambda z, a: (a * z + 1).float(), torch.zeros(2, dtype=D), a)


class _Cell(torch.nn.Module):
    def __init__(self, dtype=D):
        super().__init__()
        self.lin = torch.nn.Linear(5, 5, dtype=D)
        torch.nn.init.normal_(self.lin.weight, std=0.5 / 5 ** 0.5, generator=torch.Generator().manual_seed(0))
        self.dtype = dtype

    def forward(self, z, x):
        return torch.tanh(self.lin(z) + x).to(self.dtype)


def test_deq_cell_returning_another_dtype_is_an_input_error():
    x = torch.randn(4, 5, dtype=D, generator=torch.Generator().manual_seed(1))
    with pytest.raises(idf.InputError, match=r"returned torch.float32 for z of torch.float64"):
        DEQ(_Cell(torch.float32))(x)


# ---------------------------------------------------------------- finding 8: keyword parameters
def _newton_cubic(y0, a):
    y = y0.clone()
    for _ in range(60):
        y = y - (y + y ** 3 - a) / (1 + 3 * y ** 2)
    return y


def _cubic(y, a):
    return y + y ** 3 - a


def test_custom_root_accepts_keyword_parameters():
    solve = idf.custom_root(_cubic, batch_dims=1, check_rtol=1e-10)(_newton_cubic)
    a = torch.tensor([1.0, 2.0], dtype=D, requires_grad=True)
    y0 = torch.zeros(2, dtype=D)
    for y in (solve(y0, a=a), solve(y0=y0, a=a)):
        torch.testing.assert_close(y, solve(y0, a), rtol=0, atol=0)
        (g,) = torch.autograd.grad(y.sum(), a)
        torch.testing.assert_close(g, 1 / (1 + 3 * y.detach() ** 2), rtol=1e-12, atol=0)   # dy/da


def test_custom_root_keyword_only_and_missing_y0_are_input_errors():
    def solver(y0, a, *, steps=60):
        return _newton_cubic(y0, a)
    solve = idf.custom_root(_cubic)(solver)
    y0, a = torch.zeros(2, dtype=D), torch.ones(2, dtype=D)
    with pytest.raises(idf.InputError, match=r"keyword-only arguments \['steps'\].*functools.partial"):
        solve(y0, a, steps=3)
    with pytest.raises(idf.InputError, match="missing a required argument: 'y0'"):
        solve(a=a)
    with pytest.raises(idf.InputError, match="unexpected keyword argument 'b'"):
        solve(y0, a, b=a)


# ---------------------------------------------------------------- finding 12: a SolverResult's info shape
def _result(info_shape):
    def solver(y0, a):
        y = _newton_cubic(y0, a)
        z = torch.zeros(info_shape, dtype=torch.int64)
        return SolverResult(y, idf.SolveInfo(z, torch.zeros(info_shape, dtype=D), z))
    return solver


def test_custom_root_rejects_a_solver_result_of_the_wrong_batch_shape():
    a = torch.tensor([1.0, 2.0], dtype=D, requires_grad=True)
    bad = idf.custom_root(_cubic, batch_dims=1)(_result((3,)))
    with pytest.raises(idf.InputError, match=r"info.status has shape \(3,\); it must have the batch shape \(2,\)"):
        bad(torch.zeros(2, dtype=D), a)
    good = idf.custom_root(_cubic, batch_dims=1)(_result((2,)))
    y = good(torch.zeros(2, dtype=D), a)
    (g,) = torch.autograd.grad(y.sum(), a)
    torch.testing.assert_close(g, 1 / (1 + 3 * y.detach() ** 2), rtol=1e-12, atol=0)


def test_custom_root_info_shape_error_under_vmap_says_what_to_do():
    # under vmap the solver sees the whole vmapped batch: an info of the user's own batch shape (here ())
    # got a message naming only y0.shape[:batch_dims], a batch_dims the user never set
    a = torch.tensor([1.0, 2.0], dtype=D)
    bad = idf.custom_root(_cubic)(_result(()))
    torch.testing.assert_close(bad(torch.zeros((), dtype=D), a[0]), _newton_cubic(torch.zeros((), dtype=D), a[0]))
    with pytest.raises(idf.InputError, match=r"info.status has shape \(\); .*batch shape \(2,\).*Under "
                                             r"torch.func.vmap .* y0 \(here of shape \(2,\)\).*1 more leading dim"
                                             r".*y0.shape\[:y0.dim\(\) - 0\]"):
        vmap(lambda a: bad(torch.zeros((), dtype=D), a))(a)

    def solver(y0, a):  # what the message asks for: the info's shape from y0's
        y = _newton_cubic(y0, a)
        z = torch.zeros(y0.shape[:y0.dim() - 0], dtype=torch.int64)
        return SolverResult(y, idf.SolveInfo(z, torch.zeros(z.shape, dtype=D), z))
    good = idf.custom_root(_cubic)(solver)
    g = vmap(grad(lambda a: good(torch.zeros((), dtype=D), a)))(a)
    y = _newton_cubic(torch.zeros(2, dtype=D), a)
    torch.testing.assert_close(g, 1 / (1 + 3 * y ** 2), rtol=1e-12, atol=0)   # dy/da


# ---------------------------------------------------------------- finding 13: the default check, named
def test_custom_root_default_check_rejects_a_wrong_y_and_says_it_is_the_default():
    wrong = idf.custom_root(_cubic, batch_dims=1)(lambda y0, a: y0 + 0.1)
    with pytest.raises(idf.SolveError, match=r"exceeds check_rtol \(default eps\^\(1/3\)"):
        wrong(torch.zeros(2, dtype=D), torch.tensor([1.0, 2.0], dtype=D, requires_grad=True))


# ---------------------------------------------------------------- finding 9: adjoint hints
def _flat_root(adjoint):
    # F's Jacobian [[1, 1], [2, 2]] is singular; ȳ = e₀ is outside the range of its transpose
    a = torch.tensor([0.5, 1.5], dtype=D, requires_grad=True)
    F = lambda y, a: torch.stack([y[0] + y[1] - a[0], 2 * (y[0] + y[1] - a[0])])  # noqa: E731
    y = idf.root(F, torch.zeros(2, dtype=D), a, solver="broyden", adjoint=adjoint)
    return torch.autograd.grad(y[0], a)


def test_gmres_adjoint_breakdown_does_not_suggest_gmres():
    with pytest.raises(idf.SolveError, match="BREAKDOWN") as e:
        _flat_root(idf.Implicit(solver="gmres"))
    assert "Implicit(solver='lu')" in str(e.value) and "solver='gmres'" not in str(e.value)
    with pytest.raises(idf.SolveError, match=r"BREAKDOWN.*use Implicit\(solver='gmres'\) or 'lu'"):
        _flat_root(idf.Implicit(solver="bicgstab"))


def test_diverging_richardson_adjoint_has_a_hint():
    a = torch.tensor([3.0, 0.5], dtype=D, requires_grad=True)   # ∂F/∂y = diag(3, 0.5): I − J has radius 2
    y = idf.root(lambda y, a: a * y - 1, torch.ones(2, dtype=D), a, adjoint=idf.Implicit(solver="richardson"))
    with pytest.raises(idf.SolveError, match=r"DIVERGED.*spectral radius below 1; use Implicit\(solver='gmres'\)"):
        torch.autograd.grad(y.sum(), a)


def test_deq_adjoint_failure_names_fixed_point_adjoint():
    layer = DEQ(_Cell(), adjoint=idf.FixedPointAdjoint(max_iter=1, fallback=None))
    x = torch.randn(4, 5, dtype=D, generator=torch.Generator().manual_seed(1))
    with pytest.raises(idf.SolveError, match="MAX_ITERATIONS") as e:
        layer(x).sum().backward()
    msg = str(e.value)
    assert "FixedPointAdjoint(max_iter=...)" in msg and "fallback='gmres'" in msg
    assert "Implicit(max_iter" not in msg


def test_a_keyword_after_an_omitted_positional_parameter_is_named():
    # review: c given by keyword while b (before it, defaulted) is not: the call cannot be placed by position
    def F(y, a, b=1.0, c=0.0):
        return y - a * b - c

    @idf.custom_root(F)
    def solver(y0, a, b=1.0, c=0.0):
        return a * b + c

    a = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
    with pytest.raises(idf.InputError, match=r"\['c'\] follow \['b'\].*pass those too"):
        solver(torch.zeros(1, dtype=torch.float64), a, c=torch.tensor(3.0, dtype=torch.float64))
    y = solver(torch.zeros(1, dtype=torch.float64), a, torch.tensor(1.0, dtype=torch.float64),
               c=torch.tensor(3.0, dtype=torch.float64))
    torch.testing.assert_close(y, torch.tensor([5.0], dtype=torch.float64))


def test_a_dtype_change_under_autocast_names_autocast():
    # review: under torch.autocast the dtype change comes from autocast (Anderson's mixing ran in bfloat16),
    # not from T: the message says so
    W = torch.nn.Linear(16, 16)
    torch.manual_seed(0)
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(idf.InputError, match=r"T returned .*torch\.autocast is on"):
            idf.fixed_point(lambda z, x: torch.tanh(0.3 * W(z) + x), torch.zeros(4, 16), x, batch_dims=1,
                            solver="anderson", rtol=1e-2)
