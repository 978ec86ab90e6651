"""The linear benchmark and its harness: structure, gradient agreement, output — never timings."""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from implicitdiff.bench import _harness as H
from implicitdiff.bench import linear as L

from bench_scripts import script_with_fake_run

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench-linear.json"
    threads = torch.get_num_threads()
    results = L.run(quick=True, out=str(out), plot=False, verbose=False)
    return results, out, threads


def test_run_returns_documented_structure(quick):
    results, out, _ = quick
    assert set(results) == {"benchmark", "settings", "machine", "targets", "methods", "comparisons", "fd_checks",
                            "summary"}
    assert results["settings"]["quick"] is True and results["settings"]["dtype"] == "float64"
    cases = L._cases(quick=True)
    assert all(max(c.m, c.n) <= 50 for c in cases)
    # one comparison per (case, ours variant, peer), in order
    expected = [(c.label, o, p) for c in cases for o in L._OURS[c.kind] for p in L._PEERS[c.kind]]
    assert [(c["case"], c["ours"], c["peer"]) for c in results["comparisons"]] == expected
    for c in results["comparisons"]:
        assert c["ours_ms"] > 0 and c["peer_ms"] > 0, c
        assert c["ratio"] == pytest.approx(c["ours_ms"] / c["peer_ms"])
        assert c["met"] is (None if c["target"] is None else c["ratio"] <= c["target"])
        assert c["ours_saved_mb"] >= 0 and c["peer_saved_mb"] >= 0
    for m in results["methods"]:
        assert m["q25_ms"] <= m["time_ms"] <= m["q75_ms"] and m["repeats"] == 3 and m["peak_cuda_mb"] is None
    assert results["summary"]["targets_met"] == (not results["summary"]["misses"])
    # the JSON on disk is the returned dict
    assert json.loads(out.read_text())["comparisons"] == json.loads(json.dumps(results["comparisons"]))


def test_run_restores_thread_count(quick):
    assert torch.get_num_threads() == quick[2]


def test_gradients_agree_with_peers(quick):
    results, _, _ = quick
    for c in results["comparisons"]:
        assert c["note"] == "", c  # torch's solves handle every quick case
        # well-conditioned full-rank cases: DESIGN §5 asks 1e-10; rank-deficient pseudo-inverses 1e-8
        tol = 1e-8 if c["kind"] == "rank_deficient" else 1e-10
        assert c["grad_diff"] <= tol * max(1.0, c["grad_scale"]), c
        assert c["y_diff"] <= tol, c


def test_ours_matches_finite_differences(quick):
    results, _, _ = quick
    fd = results["fd_checks"]
    kinds = {r["kind"] for r in fd}
    assert kinds == {"square", "batch", "wide", "tall", "rank_deficient"}
    for r in fd:
        assert r["status"] in ("ok", "wrong", "unsupported")
        if r["method"].startswith("ours"):
            assert r["status"] == "ok" and r["fd_err"] <= 1e-6, r


def test_fd_check_flags_a_wrong_gradient(monkeypatch):
    # a peer whose backward is wrong (gradient scaled by 2) must be reported, not passed
    class Twice(torch.autograd.Function):
        @staticmethod
        def forward(y):
            return y.clone()

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, g):
            return 2 * g

    def broken(A, b):
        raise NotImplementedError("the derivative for 'broken' is not implemented")

    monkeypatch.setattr(L, "_FD_CASES", [L.Case("wide 2x3", "wide", 0, 2, 3)])
    monkeypatch.setitem(L._PEERS, "wide", {"doubled": lambda A, b: Twice.apply(L._pinv(A, b)), "broken": broken})
    rows = {r["method"]: r for r in L._fd_checks(seed=0, dtype=torch.float64, device="cpu")}
    assert rows["ours"]["status"] == "ok"
    assert rows["doubled"]["status"] == "wrong" and rows["doubled"]["fd_err"] > 1e-3
    assert rows["broken"]["status"] == "unsupported" and "NotImplementedError" in rows["broken"]["note"]


def test_failing_peer_is_noted_not_timed(monkeypatch):
    def broken(A, b):
        raise RuntimeError("not supported for this shape")

    monkeypatch.setitem(L._PEERS, "tall", {"broken": broken})
    case = L.Case("tall 6x3", "tall", 0, 6, 3)
    rows, comps = L._measure_case(case, seed=0, dtype=torch.float64, device="cpu", warmup=0, repeats=1,
                                  min_sample_s=0.0)
    (c,) = comps
    assert c["peer_ms"] is None and c["ratio"] is None and c["grad_diff"] is None
    assert "RuntimeError: not supported" in c["note"] and c["ours_ms"] > 0


# ----------------------------------------------------------------------------- harness


def test_time_callables_structure():
    calls = {"a": 0, "b": 0}

    def bump(k):
        calls[k] += 1

    t = H.time_callables({"a": lambda: bump("a"), "b": lambda: bump("b")}, warmup=2, repeats=5)
    assert set(t) == {"a", "b"}
    for name, timing in t.items():
        assert timing.repeats == 5 and timing.number == 1
        assert 0 < timing.min <= timing.q25 <= timing.median <= timing.q75
        assert calls[name] == 2 + 1 + 5  # warm-up, calibration, samples
    with pytest.raises(ValueError, match="repeats"):
        H.time_callables({"a": lambda: None}, repeats=0)


def test_saved_bytes_counts_saved_outputs_not_inputs():
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    assert H.saved_bytes(lambda: x * x, exclude=(x,)) == 0  # mul saves only its inputs
    assert H.saved_bytes(lambda: x.exp(), exclude=(x,)) == 7 * 5 * 8  # exp saves its output
    assert H.saved_bytes(lambda: x * x) == 7 * 5 * 8  # the one input storage, counted once


def test_central_difference_matches_closed_form():
    x = torch.randn(3, 2, dtype=torch.float64)
    y = torch.randn(4, dtype=torch.float64)
    gx, gy = H.central_difference(lambda a, b: (a**3).sum() * b.sin().sum(), (x, y))
    assert torch.allclose(gx, 3 * x**2 * y.sin().sum(), rtol=0, atol=1e-8)
    assert torch.allclose(gy, (x**3).sum() * y.cos(), rtol=0, atol=1e-8)


def test_max_abs_diff():
    a = [torch.tensor([1.0, 2.0]), torch.tensor([[0.5]])]
    assert H.max_abs_diff(a, [torch.tensor([1.0, 2.5]), torch.tensor([[0.0]])]) == 0.5
    assert math.isnan(H.max_abs_diff(a, [torch.tensor([float("nan"), 2.0]), a[1]]))


def test_format_table_and_json(tmp_path):
    text = H.format_table([{"x": "row", "v": 1.23456, "n": None}], [("x", "name", ""), ("v", "value", ".2f"),
                                                                   ("n", "none", "")], "title")
    lines = text.splitlines()
    assert lines[0] == "title" and "1.23" in lines[3] and "—" in lines[3] and "name" in lines[1]
    path = H.write_json(str(tmp_path / "sub" / "r.json"), {"a": float("nan"), "b": [float("inf"), 1.0]})
    assert json.loads(pathlib.Path(path).read_text()) == {"a": None, "b": ["inf", 1.0]}


def test_plot_skipped_without_matplotlib(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert H.plot_ratios([{"label": "x", "ratio": 1.0}], str(tmp_path / "p.png")) is None
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert not (tmp_path / "p.png").exists()


def test_thread_env_keeps_user_choices():
    env = {"OMP_NUM_THREADS": "4"}
    got = H.thread_env(1, environ=env)
    assert got == {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "4", "MKL_NUM_THREADS": "1",
                   "OPENBLAS_NUM_THREADS": "1"}
    with pytest.raises(ValueError, match="num_threads"):
        H.configure_threads(0)


def test_bench_imports_no_peer_or_plotting_library():
    code = ("import sys, implicitdiff.bench.linear, implicitdiff.bench._harness\n"
            "bad = [m for m in ('matplotlib', 'jax', 'cvxpy', 'cvxpylayers', 'qpth', 'torchopt', 'torchdeq')"
            " if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_script_passes_its_options_to_run(monkeypatch):
    script, seen = script_with_fake_run(monkeypatch, "linear", L)
    assert script.main(["--quick", "--out", "x.json", "--no-plot"]) == 0  # a quick run never fails on targets
    assert seen == {"quick": True, "out": "x.json", "device": "cpu", "threads": 1, "plot": False}
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE" and os.environ["OPENBLAS_NUM_THREADS"] == "1"
    assert script.main([]) == 1  # a full run that misses a target exits non-zero
