"""The cone benchmark: structure, agreement with the exact references, skipping a missing peer — never timings."""

import importlib.util
import json
import math
import os
import sys

import pytest
import torch

pytest.importorskip("cvxpy")

from implicitdiff.bench import cone as B  # noqa: E402

from bench_scripts import script_with_fake_run  # noqa: E402

HAVE_CVXPYLAYERS = importlib.util.find_spec("cvxpylayers") is not None


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench-cone.json"
    threads = torch.get_num_threads()
    return B.run(quick=True, out=str(out), verbose=False), out, threads


def test_run_returns_documented_structure(quick):
    results, out, threads = quick
    assert set(results) == {"benchmark", "settings", "machine", "targets", "rows", "summary"}
    assert results["settings"]["quick"] is True and torch.get_num_threads() == threads
    assert [r["case"] for r in results["rows"]] == [c.label for c in B._cases(True)]
    for r in results["rows"]:
        assert r["m"] > 0 and r["n"] > 0 and r["ours_build_ms"] > 0
        assert r["fd_noise"] < 1e-6  # the reference is exact: its differences agree at h and h/2
        if HAVE_CVXPYLAYERS:
            assert r["build_ratio"] == pytest.approx(r["ours_build_ms"] / r["cvxpylayers_build_ms"])
            assert r["cvxpylayers_ms"] > 0 and math.isfinite(r["cvxpylayers_grad_err"])
    assert results["summary"]["targets_met"] is False  # a quick run judges nothing
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(results["rows"]))


def test_ours_agrees_with_the_exact_references(quick):
    results, _, _ = quick
    for r in results["rows"]:
        assert "ours_error" not in r, r
        assert r["speedup"] > 0 if HAVE_CVXPYLAYERS else "speedup" not in r
        assert r["ours_x_err"] < 1e-6 and r["ours_grad_err"] < 1e-5, r


@pytest.mark.parametrize("family", ["socp", "sdp", "exp"])
def test_reference_solutions_are_optimal(family):
    """The references are independent of cvxpy: check them against cvxpy + Clarabel on one instance."""
    cp = pytest.importorskip("cvxpy")
    case = next(c for c in B._cases(True) if c.family == family)
    params, _ = B.instance(case, seed=3)
    values = [p[0] for p in params]
    (x,) = B.reference_solution(case, values)
    prob, cparams, (var,) = B.problem(case)
    for p, v in zip(cparams, values):
        p.value = v.numpy()
    prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10)
    assert torch.allclose(x, torch.as_tensor(var.value), atol=1e-4)
    var.value = x.numpy()
    assert prob.objective.value <= prob.value + 1e-9  # the reference is at least as good as Clarabel's
    assert all(c.violation().max() < 1e-9 for c in prob.constraints)


def test_missing_peer_is_skipped(monkeypatch):
    monkeypatch.setitem(sys.modules, "cvxpylayers.torch", None)  # import cvxpylayers.torch -> ImportError
    case = B._cases(True)[0]
    assert B._cvxpylayers_layer(case) is None
    summary = B._summary([{"case": case.label, "ours_grad_err": 0.0, "fd_noise": 0.0}], quick=False)
    assert any("not installed" in n for n in summary["notes"])


def test_script_passes_its_options_to_run(monkeypatch):
    script, seen = script_with_fake_run(monkeypatch, "cone", B)
    assert script.main(["--quick", "--out", "x.json"]) == 0
    assert seen == {"quick": True, "out": "x.json", "threads": 1}
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    assert script.main([]) == 1
