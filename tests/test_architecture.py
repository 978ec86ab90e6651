"""The layering of DESIGN §4: imports point down only; solvers/ and implicit/ never meet."""

import ast
import pathlib

import implicitdiff

PKG = pathlib.Path(implicitdiff.__file__).parent

# rank of each top-level part; a module may import parts of lower or equal rank only
RANK = {"_core": 0, "linalg": 1, "solvers": 2, "implicit": 2, "layers": 3, "nn": 4, "checks": 5,
        "demos": 6, "bench": 6, "cli": 7, "__main__": 8, "__init__": 9}
FORBIDDEN_PAIRS = {("solvers", "implicit"), ("implicit", "solvers")}


def _part(path: pathlib.Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: pathlib.Path):
    tree = ast.parse(path.read_text())
    rel = path.relative_to(PKG)
    pkg_parts = list(rel.parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg_parts[: len(pkg_parts) - (node.level - 1)] if node.level > 1 else pkg_parts
                mod = (node.module or "").split(".") if node.module else []
                target = base + [m for m in mod if m]
                if not target:  # "from . import x" at the top level
                    target = [node.names[0].name]
                yield target[0], node.lineno
            elif node.module and node.module.split(".")[0] == "implicitdiff":
                parts = node.module.split(".")
                yield (parts[1] if len(parts) > 1 else "__init__"), node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "implicitdiff":
                    yield (parts[1] if len(parts) > 1 else "__init__"), node.lineno


def test_imports_point_down():
    bad = []
    for path in PKG.rglob("*.py"):
        src = _part(path)
        for target, line in _imports(path):
            if src == target or target not in RANK:
                continue
            if (src, target) in FORBIDDEN_PAIRS or RANK[target] > RANK[src]:
                bad.append(f"{path.relative_to(PKG)}:{line} imports {target} (upward)")
    assert not bad, "\n".join(bad)


def test_autograd_functions_live_in_implicit():
    bad = []
    for path in PKG.rglob("*.py"):
        if _part(path) == "implicit":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                for base in node.bases:
                    if isinstance(base, ast.Attribute) and base.attr == "Function":
                        bad.append(f"{path.relative_to(PKG)}:{node.lineno} {node.name}")
    assert not bad, f"torch.autograd.Function defined outside implicit/: {bad}"


# ----------------------------------------------------------------------------- private torch APIs

PRIVATE_HOME = pathlib.Path("_core") / "torch_private.py"


def _torch_private_uses(path: pathlib.Path):
    """``(line, what)`` for every private torch name (or heavy import) used in ``path``."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "torch" \
                and node.level == 0:
            parts = node.module.split(".") + [a.name for a in node.names]
            if any(p.startswith("_") for p in parts):
                yield node.lineno, f"from {node.module} import {', '.join(a.name for a in node.names)}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("torch.") and any(p.startswith("_") for p in alias.name.split(".")):
                    yield node.lineno, f"import {alias.name}"
        elif isinstance(node, ast.Attribute):
            chain, inner = [node.attr], node.value
            while isinstance(inner, ast.Attribute):
                chain.append(inner.attr)
                inner = inner.value
            chain.reverse()
            if isinstance(inner, ast.Name) and inner.id == "torch":
                private = [p for p in chain if p.startswith("_") and not (p.startswith("__") and p.endswith("__"))]
                if private and node.attr == private[-1] or chain[:2] == ["compiler", "disable"]:
                    yield node.lineno, "torch." + ".".join(chain)
            if node.attr in ("_execution_engine", "run_backward") and not isinstance(node.ctx, ast.Store):
                yield node.lineno, node.attr


def test_private_torch_apis_live_in_one_module():
    """torch._C, torch._functorch, torch.utils._pytree, the engine's run_backward, torch._decomp,
    torch._dynamo (torch.compiler.disable imports it): only through ``_core/torch_private.py``,
    where ``tests/test_torch_private.py`` pins each one's signature."""
    bad = []
    for path in PKG.rglob("*.py"):
        if path.relative_to(PKG) == PRIVATE_HOME:
            continue
        bad += [f"{path.relative_to(PKG)}:{line} uses {what}" for line, what in _torch_private_uses(path)]
    assert not bad, "use implicitdiff._core.torch_private instead:\n" + "\n".join(bad)


def test_the_private_api_check_sees_each_form(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text("import torch\nimport torch._dynamo\nfrom torch._C._functorch import is_batchedtensor\n"
                       "from torch.utils import _pytree\nx = torch._C._get_tracing_state()\n"
                       "e = torch.autograd.Variable._execution_engine\n@torch.compiler.disable\ndef f(): pass\n"
                       "ok = torch.__version__, torch.func.vmap\n")
    found = sorted({line for line, _ in _torch_private_uses(planted)})
    assert found == [2, 3, 4, 5, 6, 7], found


def test_import_is_light():
    """``import implicitdiff`` loads neither torch._dynamo nor any optional or heavy package."""
    import subprocess
    import sys

    heavy = ("torch._dynamo", "torch._inductor", "scipy", "cvxpy", "matplotlib", "tqdm", "sympy.solvers",
             "jax", "qpth", "proxsuite", "cvxpylayers", "diffcp", "torchdeq", "torchopt")
    code = ("import sys, torch\nbefore = set(sys.modules)\nimport implicitdiff, implicitdiff.nn\n"
            f"print(','.join(m for m in {heavy!r} if m in sys.modules and m not in before))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"import implicitdiff imported: {proc.stdout.strip()}"


# ----------------------------------------------------------------------------- timings in docstrings

def test_no_timings_in_src_outside_bench():
    """Millisecond and microsecond figures go stale in docstrings: they belong in docs/benchmarks.md."""
    import re

    figure = re.compile(r"\d(?:\.\d+)?\s?(?:ms|µs)\b")
    quoting = sorted(str(p.relative_to(PKG)) for p in PKG.rglob("*.py")
                     if _part(p) != "bench" and figure.search(p.read_text()))
    assert not quoting, f"timings quoted in {quoting}: move them to docs/benchmarks.md"


# ----------------------------------------------------------------------------- a fresh machine

OPTIONAL = {"qpth", "proxsuite", "cmeel", "cvxpylayers", "diffcp", "torchdeq", "torchopt", "jax", "jaxlib", "jaxopt",
            "optimistix", "lineax", "equinox", "matplotlib", "tqdm"}  # not in the [test] extra


def test_tests_reach_optional_packages_only_through_importorskip():
    """``pip install -e ".[test]"`` is all a fresh machine has: a test may use a peer only after
    ``pytest.importorskip`` (or behind ``importlib.util.find_spec``), never by a plain import."""
    tests = pathlib.Path(__file__).resolve().parent
    bad = []
    for path in tests.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
            bad += [f"{path.relative_to(tests)}:{node.lineno} imports {n}" for n in names
                    if n.split(".")[0] in OPTIONAL]
    assert not bad, "use pytest.importorskip(...) instead:\n" + "\n".join(bad)


def test_benchmarks_have_one_home():
    """The benchmark code lives in ``implicitdiff.bench``; ``benchmarks/*.py`` are thin shims of it."""
    scripts = sorted((pathlib.Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"))
    bench = {m.stem for m in (PKG / "bench").glob("*.py") if not m.stem.startswith("_")}
    bad = []
    for s in scripts:
        text = s.read_text()
        if f"implicitdiff.bench.{s.stem}" not in text or s.stem not in bench:
            bad.append(f"{s.name} is not a shim of implicitdiff.bench.{s.stem}")
        elif len(text.splitlines()) > 60:
            bad.append(f"{s.name} has {len(text.splitlines())} lines: move its code into implicitdiff.bench.{s.stem}")
    assert scripts and not bad, "\n".join(bad)


def test_the_speculative_recording_is_one_isolated_piece():
    """The forward's recording for the backward lives in ``implicit/speculation.py`` alone (the
    ``Recorder`` and its ``Linearization``), reaches a solver only as its ``recorder=`` argument and
    comes back in ``SolverResult.recording``: no other module defines them, and no residual carries a
    ``speculate`` attribute read back by ``getattr``."""
    bad = []
    for path in PKG.rglob("*.py"):
        tree = ast.parse(path.read_text())
        rel = path.relative_to(PKG).as_posix()
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.name in ("Recorder", "Linearization", "Speculation") \
                    and rel != "implicit/speculation.py":
                bad.append(f"{rel}:{node.lineno} defines {node.name}")
            if isinstance(node, ast.Attribute) and node.attr == "speculate":
                bad.append(f"{rel}:{node.lineno} uses .speculate")
            if isinstance(node, ast.Constant) and node.value == "speculate":
                bad.append(f"{rel}:{node.lineno} names 'speculate'")
    assert not bad, "\n".join(bad)
