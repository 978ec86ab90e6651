"""The second probe's QP findings: QPLayer's sizes (finding 10)."""

import pytest
import torch

import implicitdiff as idf
from implicitdiff import InputError
from implicitdiff.nn import QPLayer

F64 = torch.float64
I2 = torch.eye(2, dtype=F64)


def _t(*x):
    return torch.tensor(x, dtype=F64)


# ------------------------------------------------------------------------------------------ QPLayer sizes
@pytest.mark.parametrize("kw, size, fix", [
    (dict(n=3, Q=I2), "n=3", "n=2"),
    (dict(n=2, p=_t(1.0, 2.0, 3.0)), "n=2", "n=3"),
    (dict(n=2, n_ineq=3, Q=I2, G=-I2, h=torch.zeros(2, dtype=F64)), "n_ineq=3", "n_ineq=2"),
    (dict(n=2, n_ineq=2, Q=I2, G=-I2, h=torch.zeros(3, dtype=F64)), "n_ineq=2", "n_ineq=3"),
    (dict(n=2, n_eq=1, Q=I2, A=I2, b=torch.zeros(2, dtype=F64)), "n_eq=1", "n_eq=2"),
    (dict(n=2, n_eq=1, Q=I2, A=_t([1.0, 1.0, 1.0]).reshape(1, 3), b=_t(1.0)), "n=2", "n=3"),
])
def test_qplayer_checks_its_sizes_against_the_constructor_tensors(kw, size, fix):
    with pytest.raises(InputError, match=size) as e:
        QPLayer(**kw)
    assert f"pass {fix}" in str(e.value)


def test_qplayer_checks_its_sizes_against_the_forward_tensors():
    layer = QPLayer(2, n_ineq=2, learn=("h",), Q=I2, G=-I2, h=torch.zeros(2, dtype=F64))
    with pytest.raises(InputError, match="n=2"):
        layer(p=_t(1.0, 2.0, 3.0))
    with pytest.raises(InputError, match="n_ineq=2"):
        layer(p=_t(1.0, -1.0), h=torch.zeros(3, dtype=F64))
    z = layer(p=_t(1.0, -1.0))
    torch.testing.assert_close(z, idf.qp(I2, _t(1.0, -1.0), G=-I2, h=torch.zeros(2, dtype=F64)))


def test_qplayer_with_declared_equalities_needs_a():
    layer = QPLayer(2, n_eq=1, Q=I2)
    with pytest.raises(InputError, match="n_eq=1.*no A"):
        layer(p=_t(1.0, -1.0))
    A, b = _t(1.0, 1.0).reshape(1, 2), _t(1.0)
    torch.testing.assert_close(layer(p=_t(1.0, -1.0), A=A, b=b), idf.qp(I2, _t(1.0, -1.0), A=A, b=b))


def test_qplayer_undeclared_row_counts_come_from_the_tensors():
    # n_ineq = n_eq = 0 (the default): G's and A's rows are whatever the tensors have, here and per call
    layer = QPLayer(2, Q=I2, G=-I2, h=torch.zeros(2, dtype=F64))
    G3, h3 = _t([-1.0, 0.0], [0.0, -1.0], [1.0, 1.0]), _t(0.0, 0.0, 1.0)
    p = _t(-2.0, -2.0)
    torch.testing.assert_close(layer(p=p, G=G3, h=h3), idf.qp(I2, p, G=G3, h=h3))
