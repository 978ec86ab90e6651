"""The command line, in process through ``main([...])`` (small settings), and once as ``python -m``."""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from implicitdiff.checks import selfcheck
from implicitdiff.cli import main


def test_help_lists_the_subcommands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("demo", "check", "bench"):
        assert command in out


def test_no_command_unknown_command_and_bad_argument_are_usage_errors(capsys):
    assert main([]) == 2
    assert main(["frobnicate"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert main(["check", "--dtype", "float16"]) == 2
    assert "--dtype" in capsys.readouterr().err
    assert main(["demo", "no-such-demo"]) == 2
    assert "seed" in capsys.readouterr().err  # names the demos that exist


def test_demo_list_names_the_flagship(capsys):
    assert main(["demo", "--list"]) == 0
    out = capsys.readouterr().out
    assert "seed" in out and "sudoku" in out and "deq" in out


def test_flagship_demo_is_the_sudoku_qp_layer(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Sudoku" in out and "final test error" in out


def test_deq_demo_runs(tmp_path, capsys):
    assert main(["demo", "deq", "--quick", "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip()


def test_demo_runs_prints_and_plots(tmp_path, capsys):
    assert main(["demo", "seed", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "ambiguity" in out and "A·dy/db = I" in out
    # the two selections of the note, with their closed forms: ȳ₁/(2a₁) + ȳ₂/(2a₂) = 0.75 and ȳ₂/a₂ = 0.5
    assert "0.750000" in out and "0.500000" in out
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "seed_demo.png").stat().st_size > 1000
    else:
        assert "matplotlib is not installed" in out


def test_demo_without_matplotlib_and_tqdm_skips_the_plot(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setitem(sys.modules, "tqdm", None)
    assert main(["demo", "seed", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "matplotlib is not installed" in out and "fit 60/60" in out  # the plain-print progress
    assert not (tmp_path / "seed_demo.png").exists()


def test_check_passes_on_every_case_and_prints_the_table(capsys):
    assert main(["check", "--dtype", "float64"]) == 0
    out = capsys.readouterr().out
    for case in selfcheck.cases():
        assert case.name in out
    assert "all" in out and "passed" in out


def test_check_float32_subset(capsys):
    assert main(["check", "--dtype", "float32", "-k", "linear_solve/min_norm"]) == 0
    assert "linear_solve/min_norm_wide" in capsys.readouterr().out


def test_check_no_matching_case_is_a_usage_error(capsys):
    assert main(["check", "-k", "no-such-case"]) == 2
    assert "no case matches" in capsys.readouterr().err


class _WrongBackward(torch.autograd.Function):
    """Identity forward, backward scaled by 3: a planted wrong gradient."""

    @staticmethod
    def forward(x):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return 3 * g

    @staticmethod
    def jvp(ctx, t):
        return 3 * t


def test_check_exits_1_when_a_case_fails(monkeypatch, capsys):
    monkeypatch.setattr(selfcheck, "REGISTRY", list(selfcheck.REGISTRY))

    @selfcheck.register_case("planted/wrong_backward", layer="test")
    def _wrong(device, dtype):
        x = torch.tensor([0.5, -1.0], device=device, dtype=dtype)
        return (lambda x: _WrongBackward.apply(x) ** 2), (x,)

    assert main(["check", "-k", "planted"]) == 1
    captured = capsys.readouterr()
    assert "planted/wrong_backward" in captured.out and "FAIL" in captured.out
    assert "FAILED: 1 of 1" in captured.err


def test_check_on_unavailable_cuda_exits_2(capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert main(["check", "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_bench_unknown_name_is_a_usage_error(capsys):
    assert main(["bench", "no-such-bench"]) == 2
    assert "no-such-bench" in capsys.readouterr().err


def test_bench_linear_quick(tmp_path, capsys):
    if importlib.util.find_spec("implicitdiff.bench") is None or \
            importlib.util.find_spec("implicitdiff.bench.linear") is None:
        pytest.skip("implicitdiff.bench.linear is not installed")
    assert main(["bench", "--list"]) == 0
    assert "linear" in capsys.readouterr().out
    out = tmp_path / "bench-linear.json"
    assert main(["bench", "linear", "--quick", "--out", str(out)]) == 0
    assert isinstance(json.loads(out.read_text()), dict)


def test_python_dash_m_help():
    proc = subprocess.run([sys.executable, "-m", "implicitdiff", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "demo" in proc.stdout and "check" in proc.stdout and "bench" in proc.stdout
