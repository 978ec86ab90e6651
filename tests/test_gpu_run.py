"""The logic of ``.ci/gpu`` (``implicitdiff.bench._gpu``), tested without a GPU: the plan, the budget,
the table, the exit codes, and the script failing clearly where there is no CUDA."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from implicitdiff.bench import _gpu

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_plan_runs_the_cuda_tests_then_each_installed_benchmark_on_the_device(tmp_path):
    steps = _gpu.plan("cuda", str(tmp_path))
    assert steps[0].name == "tests" and steps[0].argv[-3:] == ("-m", "cuda", "tests")
    names = [s.name for s in steps[1:]]
    assert names == ["bench linear", "bench qp", "bench deq", "bench cone"]
    for s in steps[1:]:
        assert s.argv[1:4] == ("-m", "implicitdiff", "bench") and "--quick" in s.argv
        assert s.argv[s.argv.index("--device") + 1] == "cuda"
        assert s.json == s.argv[s.argv.index("--out") + 1] and s.json.startswith(str(tmp_path))
    cpu = _gpu.plan("cpu", str(tmp_path), quick=False)
    assert cpu[0].argv[-3:] == ("-m", "not cuda", "tests/test_devices.py")
    assert all("--quick" not in s.argv and "cpu" in s.argv for s in cpu[1:])


def _py(code):
    return (sys.executable, "-c", code)


def test_run_steps_reports_ok_failed_timeout_and_skipped_and_reads_the_json(tmp_path):
    good = tmp_path / "bench-good.json"
    missed = tmp_path / "bench-missed.json"
    steps = [
        _gpu.Step("tests", _py("print('3 passed, 1 skipped in 0.1s')"), None),
        _gpu.Step("bench good", _py(f"import json; json.dump({{'summary': {{'targets_met': True}}}}, "
                                    f"open({str(good)!r}, 'w'))"), str(good)),
        _gpu.Step("bench missed", _py(f"import json; json.dump({{'summary': {{'misses': ['qp ×3 < 6']}}}}, "
                                      f"open({str(missed)!r}, 'w'))"), str(missed)),
        _gpu.Step("bench broken", _py("import sys; print('boom', file=sys.stderr); sys.exit(3)"), None),
        _gpu.Step("bench slow", _py("import time; time.sleep(60)"), None),
        _gpu.Step("bench late", _py("print('never')"), None),
    ]
    outcomes = _gpu.run_steps(steps, budget_s=8.0, out_dir=str(tmp_path / "run"))
    status = {o.step.name: o.status for o in outcomes}
    detail = {o.step.name: o.detail for o in outcomes}
    assert status == {"tests": "ok", "bench good": "ok", "bench missed": "ok", "bench broken": "FAILED (exit 3)",
                      "bench slow": "TIMEOUT", "bench late": "skipped (time budget spent)"}
    assert detail["tests"] == "3 passed, 1 skipped in 0.1s"
    assert detail["bench good"] == "targets met" and "1 target(s) missed: qp ×3 < 6" == detail["bench missed"]
    assert detail["bench broken"] == "boom"
    assert (tmp_path / "run" / "bench-broken.log").read_text().strip() == "boom"
    text = _gpu.table(outcomes, device="cuda", budget_s=8.0)
    assert text.splitlines()[0].startswith("GPU run on cuda:") and "of a 8 s budget" in text
    for name in status:
        assert name in text


def test_tests_get_at_most_their_share_of_the_budget(tmp_path):
    outcomes = _gpu.run_steps([_gpu.Step("tests", _py("import time; time.sleep(30)"), None)],
                              budget_s=5.0, out_dir=str(tmp_path))
    assert outcomes[0].status == "TIMEOUT" and outcomes[0].seconds < 5.0 * _gpu.TESTS_SHARE + 2


def test_unreadable_or_missing_json_is_named(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert _gpu._summary(str(tmp_path / "none.json")) == "no JSON written"
    assert _gpu._summary(str(bad)).startswith("unreadable JSON")
    (tmp_path / "empty.json").write_text(json.dumps({"rows": []}))
    assert _gpu._summary(str(tmp_path / "empty.json")) == "no targets"


def test_dry_run_prints_the_steps_and_runs_nothing(tmp_path, capsys):
    assert _gpu.main(["--dry-run", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "tests:" in out and "bench linear:" in out and "--device cuda" in out
    assert not (tmp_path / "o").exists()


def test_script_without_cuda_fails_clearly():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / ".ci" / "gpu"), "--budget", "60"], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 2
    assert "CUDA is not available" in proc.stderr and "Traceback" not in proc.stderr


def test_script_without_torch_fails_clearly(tmp_path):
    env = dict(os.environ, PYTHON=str(tmp_path / "no-such-python"))
    proc = subprocess.run(["bash", str(ROOT / ".ci" / "gpu")], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2 and "cannot import torch" in proc.stderr


def test_bad_options_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as e:
        _gpu.main(["--budget", "0"])
    assert e.value.code == 2 and "--budget" in capsys.readouterr().err
    assert _gpu.main(["--device", "tpu", "--budget", "5"]) == 2
    assert "unknown --device 'tpu'" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["linear", "qp", "deq", "cone", "hypergrad"])
def test_benchmarks_take_a_device(name):
    """``implicitdiff bench --device`` reaches these through ``run(..., device=...)`` (defaulting to the CPU)."""
    import importlib
    import inspect

    param = inspect.signature(importlib.import_module(f"implicitdiff.bench.{name}").run).parameters.get("device")
    assert param is not None and param.default == "cpu"


def test_ctrl_c_exits_130_without_traceback(monkeypatch, capsys, tmp_path):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(_gpu, "run_steps", interrupted)
    assert _gpu.main(["--device", "cpu", "--out", str(tmp_path)]) == 130
    assert capsys.readouterr().err.strip() == ".ci/gpu: interrupted"
