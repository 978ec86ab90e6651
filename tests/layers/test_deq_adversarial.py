"""Adversarial inputs of ``nn.DEQ``: a right answer (checked) or a named error."""

import math
import warnings

import pytest
import torch

import implicitdiff as idf
from implicitdiff import InputError, SolveError

from ._adversarial import BAD_DTYPES, D


class Cell(torch.nn.Module):
    def __init__(self, n=4, std=0.1, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.lin = torch.nn.Linear(n, n, dtype=D)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(n, n, generator=g, dtype=D) * std)

    def forward(self, z, x):
        return torch.tanh(self.lin(z) + x)


class Bad(torch.nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.w = torch.nn.Parameter(torch.ones((), dtype=D))

    def forward(self, z, x):
        return {"None": None, "tuple": (z, z), "list": [z], "shape": z[:, :2], "float": 1.0,
                "batch": z[:1]}[self.kind]


@pytest.mark.parametrize("kind", ["None", "tuple", "list", "shape", "float", "batch"])
@pytest.mark.parametrize("solver", ["anderson", "picard", "broyden"])
def test_a_cell_returning_the_wrong_thing_is_named(kind, solver):
    with pytest.raises(InputError, match="DEQ cell"):
        idf.nn.DEQ(Bad(kind), solver=solver)(torch.ones(2, 3, dtype=D))


@pytest.mark.parametrize("kw", [dict(max_iter=-1), dict(max_iter=2.5), dict(rtol=math.nan), dict(rtol=-1.0),
                                dict(atol=math.nan), dict(on_failure="skip"), dict(solver="bogus"),
                                dict(adjoint="implicit"), dict(solver_options=[1]), dict(jac_reg=-1),
                                dict(track_trace="yes")])
def test_bad_options_are_named_at_construction(kw):
    with pytest.raises(InputError, match=next(iter(kw)).split("_")[0]):
        idf.nn.DEQ(Cell(), **kw)


def test_unknown_solver_option_is_named():
    with pytest.raises(InputError, match="bogus"):
        idf.nn.DEQ(Cell(), solver=idf.Anderson(bogus=1))
    with pytest.raises(InputError, match="solver_options was removed.*Anderson"):
        idf.nn.DEQ(Cell(), solver_options={"m": 3})
    with pytest.raises(InputError, match="rtol given both"):
        idf.nn.DEQ(Cell(), solver=idf.Anderson(rtol=1e-6), rtol=1e-8)


@pytest.mark.parametrize("dtype", BAD_DTYPES)
def test_x_of_a_dtype_we_do_not_solve_in_is_named(dtype):
    with pytest.raises(InputError):
        idf.nn.DEQ(Cell())(torch.ones(2, 4).to(dtype))


def test_meta_and_0d_inputs_are_named():
    with pytest.raises(InputError, match="meta"):
        idf.nn.DEQ(Cell())(torch.ones(2, 4, dtype=D, device="meta"))
    with pytest.raises(InputError, match="z0"):
        idf.nn.DEQ(Cell())(torch.tensor(1.0, dtype=D))


def test_empty_batch_gives_an_empty_result():
    z = idf.nn.DEQ(Cell())(torch.ones(0, 4, dtype=D))
    assert z.shape == (0, 4)


def test_a_non_contracting_cell_hints_at_jac_reg_and_spectral_norm():
    class Expand(torch.nn.Module):
        def forward(self, z, x):
            return torch.sin(3.0 * z) + x          # |∂f/∂z| up to 3: Picard oscillates
    with pytest.raises(SolveError, match="jac_reg.*spectral"):
        idf.nn.DEQ(Expand(), solver="picard", max_iter=50)(torch.full((2, 3), 0.3, dtype=D))


@pytest.mark.parametrize("on_failure", ["nan", "warn"])
@pytest.mark.parametrize("adjoint", [None, idf.Implicit(solver="lu"), idf.Implicit(solver="gmres"), idf.Neumann(40)])
def test_one_bad_sample_does_not_poison_the_parameters_gradient(on_failure, adjoint):
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(1), dtype=D)
    xbad = x.clone()
    xbad[2, 1] = math.nan
    kw = {} if adjoint is None else {"adjoint": adjoint}
    cell = Cell()
    layer = idf.nn.DEQ(cell, on_failure=on_failure, rtol=1e-12, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", idf.SolveWarning)
        z = layer(xbad)
    assert layer.last_info.status.tolist() == [0, 0, 4, 0] or not bool(layer.last_info.ok[2])
    assert torch.isnan(z[2]).all()
    z.nan_to_num().sum().backward()
    got = cell.lin.weight.grad.clone()
    # reference: the same layer on the three good samples only
    cell.zero_grad()
    idf.nn.DEQ(cell, rtol=1e-12, **kw)(x[[0, 1, 3]]).sum().backward()
    tol = 1e-8 if not isinstance(adjoint, idf.Neumann) else 1e-6
    torch.testing.assert_close(got, cell.lin.weight.grad, rtol=tol, atol=tol)


def test_a_cell_that_fails_inside_torch_is_named_with_the_shapes():
    # z0 of another feature size than the cell takes: torch's matmul error, wrapped with where it happened
    with pytest.raises(InputError, match=r"DEQ cell.*shape \(2, 4\).*mat1"):
        idf.nn.DEQ(Cell(n=3))(torch.ones(2, 3, dtype=D), torch.zeros(2, 4, dtype=D))
    # a module with the wrong signature (cell(z) instead of cell(z, x))
    with pytest.raises(InputError, match="DEQ cell.*TypeError"):
        idf.nn.DEQ(torch.nn.Sequential(torch.nn.Linear(3, 3, dtype=D)))(torch.ones(2, 3, dtype=D))
