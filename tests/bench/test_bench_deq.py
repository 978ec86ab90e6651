"""The DEQ benchmark: structure, gradient agreement, convergence report, output — never timings."""

import importlib.util
import json
import os
import pathlib
import sys

import pytest
import torch

from implicitdiff.bench import deq as B

from bench_scripts import script_with_fake_run

ROOT = pathlib.Path(__file__).resolve().parents[2]
HAVE_TORCHDEQ = importlib.util.find_spec("torchdeq") is not None
EXACT = ("ours", "ours picard", "ours gmres", "ours lu")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench-deq.json"
    threads = torch.get_num_threads()
    results = B.run(quick=True, out=str(out), verbose=False)
    return results, out, threads


def test_run_returns_documented_structure(quick):
    results, out, threads = quick
    assert set(results) == {"benchmark", "settings", "machine", "targets", "methods", "breakdown", "tolerance",
                            "summary"}
    assert results["settings"]["quick"] is True and results["settings"]["width"] <= 32
    assert torch.get_num_threads() == threads
    cases = {c.label for c in B._cases(True)}
    keys = {(r["case"], r["dtype"], r["method"]) for r in results["methods"]}
    for case in cases:
        for dtype in ("float64", "float32"):
            wanted = ("ours", "ours picard", "ours gmres", "ours neumann5", "unrolled")
            assert {(case, dtype, m) for m in wanted} <= keys
        assert (case, "float64", "ours lu") in keys
    for r in results["methods"]:
        assert "error" not in r or not r["method"].startswith("ours"), r
        if "error" not in r:
            assert r["fwd_ms"] > 0 and r["total_ms"] > 0 and r["saved_mb"] >= 0
        if r.get("ratio") is not None:
            peer = next(p for p in results["methods"] if (p["case"], p["dtype"], p["method"]) ==
                        (r["case"], r["dtype"], "torchdeq"))
            assert r["ratio"] == pytest.approx(r["total_ms"] / peer["total_ms"])
    assert results["summary"]["targets_met"] == (not results["summary"]["misses"])
    assert json.loads(out.read_text())["methods"] == json.loads(json.dumps(results["methods"]))


def test_gradients_agree_with_the_exact_implicit_gradient(quick):
    results, _, _ = quick
    rows = {(r["case"], r["dtype"], r["method"]): r for r in results["methods"]}
    for (case, dtype, method), r in rows.items():
        if method in EXACT:
            # forward and adjoint to 1e-6 relative: the gradient is off by a few 1e-6 relative
            assert r["converged"] is True and r["rel_residual"] < 1e-5, r
            assert r["grad_rel_err"] < 2e-5, r
    for case in {k[0] for k in rows}:
        # the phantom gradient is approximate by design: the comparison sees it
        neumann = rows[case, "float64", "ours neumann5"]["grad_rel_err"]
        assert neumann > 10 * rows[case, "float64", "ours"]["grad_rel_err"]


def test_backward_memory_is_flat_and_below_unrolled(quick):
    results, _, _ = quick
    rows = {(r["case"], r["dtype"], r["method"]): r for r in results["methods"]}
    for (case, dtype, method), r in rows.items():
        if method in EXACT:
            unrolled = rows[case, dtype, "unrolled"]["saved_mb"]
            assert r["saved_mb"] < unrolled / 5, (r, unrolled)
    # the same bytes in both cases, although the slow case needs more iterations
    assert rows["contractive", "float64", "ours"]["saved_mb"] == rows["slow", "float64", "ours"]["saved_mb"]


def test_breakdown_and_tolerance_check(quick):
    results, _, _ = quick
    whats = {(b["dtype"], b["what"]) for b in results["breakdown"]}
    assert ("float64", "adjoint picard") in whats and ("float32", "forward anderson") in whats
    for b in results["breakdown"]:
        assert b["iterations"] >= 1 and b["ms"] > 0
    tol = {r["method"]: r for r in results["tolerance"]}
    assert tol["ours"]["converged"] is True and tol["ours"]["rel_residual"] < 1e-5
    if HAVE_TORCHDEQ:
        # float32 cannot resolve 1e-6 absolute on a state of norm ~1e3: torchdeq's rule is never met
        assert tol["torchdeq abs"]["converged"] is False
        assert any("NOT met" in n for n in results["summary"]["notes"])


def test_missing_peer_is_skipped(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchdeq", None)  # import torchdeq -> ImportError
    methods = B._methods(3, with_lu=False)
    assert "torchdeq" not in methods and "ours" in methods and "unrolled" in methods
    rows = [{"case": "c", "dtype": "float64", "method": "ours", "converged": True, "total_ms": 1.0, "saved_mb": 0.1}]
    B._ratios(rows)
    summary = B._summary(rows, [])
    assert summary["targets_met"] and any("not installed" in n for n in summary["notes"])


def test_script_passes_its_options_to_run(monkeypatch):
    script, seen = script_with_fake_run(monkeypatch, "deq", B)
    assert script.main(["--quick", "--out", "x.json"]) == 0
    assert seen == {"quick": True, "out": "x.json", "threads": 1}
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    assert script.main([]) == 1
