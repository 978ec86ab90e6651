"""Shared inputs of the adversarial suites of the nonlinear entry points (root, fixed_point, argmin,
custom_root, nn.DEQ): bad dtypes, bad options, bad callable outputs.  Each suite states, per case,
the acceptable outcome: a result checked against a reference, or a named error."""

import math

import pytest
import torch

D = torch.float64

#: y0 dtypes the library does not solve in: each must be an InputError naming y0.
BAD_DTYPES = [torch.int64, torch.int32, torch.bool, torch.complex128, torch.float16, torch.bfloat16]

#: options that must be refused with an InputError naming the option, before any work.
BAD_OPTIONS = [
    ("max_iter", -1), ("max_iter", 1.5), ("max_iter", "10"), ("max_iter", True),
    ("rtol", math.nan), ("rtol", -1.0), ("rtol", math.inf), ("rtol", "1e-6"),
    ("atol", math.nan), ("atol", -1e-3),
    ("batch_dims", 1.5), ("batch_dims", -1), ("batch_dims", 5),
    ("on_failure", "ignore"), ("on_failure", None),
    ("return_info", "yes"),
    ("solver", "bogus"), ("solver", 3),
    ("solver_options", {"m": 3}), ("solver_options", {}), ("solver", object()),
    ("adjoint", "implicit"),
]

#: what a user callable might wrongly return (given the correct output t of the right shape).
BAD_OUTPUTS = {
    "None": lambda t: None,
    "list": lambda t: [t],
    "tuple": lambda t: (t, t),
    "float": lambda t: 1.0,
    "wrong shape": lambda t: t.reshape(-1)[:1],
    "extra dim": lambda t: t.unsqueeze(0),
    "complex": lambda t: t.to(torch.complex128),
}


def bad_adjoints():
    import implicitdiff as idf
    return [
        lambda: idf.Implicit(rtol=math.nan), lambda: idf.Implicit(max_iter=-1), lambda: idf.Implicit(max_iter=0),
        lambda: idf.Implicit(dense_max=-1), lambda: idf.Implicit(solver="svd"), lambda: idf.Implicit(atol=-1.0),
        lambda: idf.Neumann(0), lambda: idf.Neumann(1.5), lambda: idf.Neumann(3, alpha=math.nan),
        lambda: idf.Neumann(3, alpha=0.0), lambda: idf.Unroll(max_iter=-1), lambda: idf.Unroll(max_iter=0.5),
    ]


def raises_input_error(match=None):
    from implicitdiff import InputError
    return pytest.raises(InputError, match=match)
