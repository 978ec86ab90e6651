"""``implicitdiff check`` covers every layer (the probe's finding 15): qp, cone_program, CvxpyLayer, deq and the
projections have cases, each passing in float64 and float32 against finite differences and its reference."""

import importlib.util

import pytest
import torch

from implicitdiff.checks import selfcheck

LAYERS = {"linear_solve", "ambiguity", "root", "fixed_point", "argmin", "custom_root", "qp", "cone_program", "deq",
          "projections"} | ({"CvxpyLayer"} if importlib.util.find_spec("cvxpy") else set())
NEW = ("qp/", "cone_program/", "CvxpyLayer/", "deq/", "projections/")


def test_every_layer_has_a_case():
    assert LAYERS <= {c.layer for c in selfcheck.cases()}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_layer_cases_pass(dtype):
    results = [r for prefix in NEW for r in selfcheck.run(dtype=dtype, pattern=prefix)
               if r.case.name.startswith(prefix)]
    assert {r.case.layer for r in results} == LAYERS - {"linear_solve", "ambiguity", "root", "fixed_point", "argmin",
                                                        "custom_root"}
    for r in results:
        assert r.passed, f"{r.case.name}: {r.error or r.report}"
        assert r.report.comparisons  # something was compared

