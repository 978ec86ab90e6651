"""The hypergradient benchmark: structure, gradient errors against the exact hypergradient, memory — never timings."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from implicitdiff import InputError
from implicitdiff.bench import _harness as H
from implicitdiff.bench import hypergrad as B

from bench_scripts import script_with_fake_run

ROOT = pathlib.Path(__file__).resolve().parents[2]
HAS_TORCHOPT = importlib.util.find_spec("torchopt") is not None


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench-hypergrad.json"
    threads = (torch.get_num_threads(), os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None)
    # the JAX peers cost seconds of compilation each: the full run measures them, the test only TorchOpt
    results = B.run(quick=True, out=str(out), peers=("torchopt",), plot=False, verbose=False)
    return results, out, threads


def test_run_returns_documented_structure(quick):
    results, out, threads = quick
    assert set(results) == {"benchmark", "settings", "machine", "peers", "targets", "methods", "comparisons",
                            "unrolled", "profile", "summary"}
    assert results["settings"]["quick"] is True
    assert torch.get_num_threads() == threads[0]  # restored, and so is the CPU affinity the run narrows
    assert threads[1] is None or os.sched_getaffinity(0) == threads[1]
    assert results["peers"]["jaxopt"].startswith("skipped") and results["peers"]["optimistix"].startswith("skipped")
    cases = [f"{k} {m}x{n}" for k, m, n in B._cases(quick=True)]
    assert [p["case"] for p in results["profile"]] == cases
    for row in results["methods"]:
        assert row["case"] in cases
        assert "error" not in row, row
        assert row["time_ms"] > 0 and row["q25_ms"] <= row["time_ms"] <= row["q75_ms"]
        for ours in B._OURS:
            assert row[f"{ours} / this"] == pytest.approx(
                next(r for r in results["methods"] if r["case"] == row["case"] and r["method"] == ours)["time_ms"]
                / row["time_ms"])
    methods = {(r["case"], r["method"]) for r in results["methods"]}
    for case in cases:
        assert {(case, "ours auto"), (case, "ours cg")} <= methods
        assert ((case, "closed form") in methods) == case.startswith("ridge")
        assert ((case, "torchopt") in methods) == HAS_TORCHOPT
    for c in results["comparisons"]:
        assert c["met"] is None if c["target"] is None else c["met"] == (c["ratio"] <= c["target"])
    assert json.loads(out.read_text())["methods"] == json.loads(json.dumps(results["methods"]))


def test_gradients_match_the_exact_hypergradient(quick):
    results, _, _ = quick
    for row in results["methods"]:
        # inner tolerance 1e-10 (relative gradient norm) and adjoint rtol 1e-10 on well-conditioned problems
        assert row["rel_err"] <= 1e-8, row
        if row["method"] in B._OURS or row["method"] == "torchopt":
            assert row["iterations"] > 0


def test_implicit_memory_is_flat_and_unrolled_grows(quick):
    results, _, _ = quick
    rows = results["unrolled"]
    Ks = results["settings"]["unrolled_K"]
    unrolled = [r for r in rows if r["method"] == "unrolled GD"]
    ours = [r for r in rows if r["method"] == "ours GD + implicit cg"]
    assert [r["K"] for r in unrolled] == Ks and [r["K"] for r in ours] == Ks
    assert results["summary"]["memory_flat"] is True
    assert len({r["saved_kb"] for r in ours}) == 1
    # unrolled: at least one n-vector per step; ours: the solution and the outer loss' own (a few n-vectors)
    n = int(rows[0]["case"].split("x")[-1])
    for r in unrolled:
        assert r["saved_kb"] * 1024 >= r["K"] * n * 8
    assert ours[0]["saved_kb"] * 1024 <= 4 * n * 8
    # both converge to the exact hypergradient as K grows; the converged L-BFGS one is exact
    assert unrolled[-1]["rel_err"] < unrolled[0]["rel_err"] and ours[-1]["rel_err"] < ours[0]["rel_err"]
    assert rows[-1]["method"] == "ours lbfgs + cg" and rows[-1]["rel_err"] <= 1e-8


def test_profile_rows(quick):
    results, _, _ = quick
    for p in results["profile"]:
        assert p["lbfgs_iterations"] > 0
        assert p["ms_per_iteration"] == pytest.approx(p["forward_ms"] / p["lbfgs_iterations"])
        for k in ("forward_ms", "grad_eval_ms", "matvecs_ms", "backward_auto_ms", "backward_cg_ms",
                  "bare_ms_per_iteration"):
            assert p[k] > 0
        assert p["overhead_ms_per_iteration"] == pytest.approx(p["ms_per_iteration"] - p["bare_ms_per_iteration"])


@pytest.mark.parametrize("ours", sorted(B._OURS))
def test_ridge_hypergradient_equals_the_closed_form(ours):
    # the benchmark's ridge case (smaller), float64, through the unbatched host L-BFGS path (history 10 wraps
    # around well before convergence) and either adjoint: relative error ≤ 1e-8 against the closed form
    p = B._problem("ridge", 400, 80, seed=3)
    g, iters = B._hypergrad(B._OURS[ours], p)
    ref, _ = B._hypergrad(B._closed_form, p)
    assert g.dtype == torch.float64 and iters > 10
    assert float((g - ref).abs().max() / ref.abs().max()) <= 1e-8


def test_logistic_reference_matches_finite_differences():
    p = B._problem("logistic", 40, 3, seed=5)

    def outer_of_theta(theta):  # w*(θ) by Newton, to machine precision
        lam = theta.exp()
        w = torch.zeros(3, dtype=torch.float64)
        for _ in range(60):
            s = torch.sigmoid(p.X @ w)
            grad = p.X.T @ (s - p.t) / p.X.shape[0] + lam * w
            Hm = (p.X.T * (s * (1 - s))) @ p.X / p.X.shape[0] + torch.diag(lam)
            w = w - torch.linalg.solve(Hm, grad)
        return p.outer(w)

    (fd,) = H.central_difference(outer_of_theta, (p.theta,), h=1e-5)
    torch.testing.assert_close(B._reference(p), fd, rtol=1e-6, atol=1e-9)


def test_ridge_reference_is_the_ift_formula():
    # the closed form's autograd equals −(e^θ ⊙ w*) ⊙ H⁻¹ ∇_w L, the formula the logistic reference uses
    p = B._problem("ridge", 30, 4, seed=2)
    m = p.X.shape[0]
    H_ = p.X.T @ p.X / m + torch.diag(p.theta.exp())
    w = torch.linalg.solve(H_, p.X.T @ p.t / m)
    gL = 2 * p.Xv.T @ (p.Xv @ w - p.tv) / p.Xv.shape[0]
    torch.testing.assert_close(B._reference(p), -(p.theta.exp() * w) * torch.linalg.solve(H_, gL),
                               rtol=1e-10, atol=1e-13)


def test_graph_saved_bytes_agrees_with_saved_tensors_hooks():
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    A = torch.randn(5, 5, dtype=torch.float64)

    def build():
        return ((x @ A).exp().sin() * x).sum()

    assert B._graph_saved_bytes(build(), exclude=(x, A)) == H.saved_bytes(build, exclude=(x, A)) == 2 * 7 * 5 * 8
    assert B._graph_saved_bytes(build()) == H.saved_bytes(build)


def test_missing_peer_is_reported_not_fatal(monkeypatch):
    real = importlib.util.find_spec
    # every peer module missing, whatever happens to be installed on this machine
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("jax", "optimistix", "lineax") else real(name, *a))
    status = B._available_peers(None)
    assert status["optimistix"] == "not installed (jax, optimistix, lineax): pip install optimistix"
    assert B._available_peers(("torchopt",))["jaxopt"] == "skipped (not requested)"


def test_script_passes_its_options_to_run(monkeypatch):
    script, seen = script_with_fake_run(monkeypatch, "hypergrad", B)
    assert script.main(["--quick", "--out", "x.json", "--no-plot", "--peers", "torchopt,jaxopt"]) == 0
    assert seen == {"quick": True, "out": "x.json", "threads": 1, "plot": False, "peers": ("torchopt", "jaxopt")}
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE" and os.environ["OPENBLAS_NUM_THREADS"] == "1"
    assert script.main([]) == 1 and seen["peers"] is None  # a full run that misses a target exits non-zero


def test_importing_the_benchmark_imports_no_peer():
    code = ("import sys, implicitdiff.bench.hypergrad\n"
            "bad = [m for m in ('jax', 'jaxopt', 'optimistix', 'lineax', 'torchopt', 'matplotlib') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_unknown_peer_is_an_input_error():
    with pytest.raises(InputError, match="peers: unknown"):
        B.run(quick=True, peers=("scipy",), plot=False, verbose=False)
