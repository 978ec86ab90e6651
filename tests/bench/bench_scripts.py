"""Shared set-up of the tests of the ``benchmarks/*.py`` scripts."""

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
THREAD_VARS = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def script_with_fake_run(monkeypatch, name, module):
    """Load ``benchmarks/<name>.py`` with ``module.run`` replaced by a recorder and the thread
    variables unset (restored by ``monkeypatch``); returns ``(script, seen)``, where ``seen``
    collects the keyword arguments of the last ``run`` call (which misses every target)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}_script", ROOT / "benchmarks" / f"{name}.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    seen = {}

    def fake_run(**kwargs):
        seen.update(kwargs)
        return {"summary": {"targets_met": False}}

    for var in THREAD_VARS:
        monkeypatch.setenv(var, "unset")  # so that monkeypatch restores the variable's absence afterwards
        monkeypatch.delenv(var)
    monkeypatch.setattr(module, "run", fake_run)
    return script, seen
