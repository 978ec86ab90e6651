"""Every docstring example of the installed package runs (doctest), and so do the docs' Python snippets."""

import doctest
import importlib
import pathlib
import pkgutil
import re

import pytest

import implicitdiff
from implicitdiff._core.torch_private import warm_forward_ad

# Snippets use torch.func.jvp; the first forward-mode call of a process imports torch's jvp
# decompositions, which warn (DeprecationWarning, torch.jit.script) once — torch's, not ours.
warm_forward_ad()

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _modules():
    names = [implicitdiff.__name__]
    for info in pkgutil.walk_packages(implicitdiff.__path__, prefix="implicitdiff.", onerror=lambda name: None):
        names.append(info.name)
    return sorted(names)


def _import_or_skip(name):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:  # an optional dependency (e.g. a benchmark peer) that is not installed
        if e.name and not e.name.startswith("implicitdiff"):
            pytest.skip(f"{name} needs the optional dependency {e.name}")
        raise


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples(name):
    module = _import_or_skip(name)
    result = doctest.testmod(module, optionflags=FLAGS, report=True)
    assert result.failed == 0, f"{result.failed} of {result.attempted} doctest examples failed in {name}"


def _snippets():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    out = []
    for page in pages:
        if not page.exists():
            continue
        for k, block in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), re.S)):
            out.append(pytest.param(block, id=f"{page.relative_to(ROOT)}#{k}"))
    return out or [pytest.param(None, id="no-docs")]


@pytest.mark.parametrize("code", _snippets())
def test_docs_python_snippets_run(code):
    if code is None:
        pytest.skip("README.md and docs/ are not beside the tests (an installed copy)")
    exec(compile(code, "<snippet>", "exec"), {"__name__": "__snippet__"})


def test_ci_runs_exactly_the_readmes_test_command():
    readme, ci = ROOT / "README.md", ROOT / ".ci" / "run"
    if not (readme.exists() and ci.exists()):
        pytest.skip("README.md and .ci/run are not beside the tests (an installed copy)")
    commands = re.findall(r"```bash\n(.*?)\n```", readme.read_text(encoding="utf-8"), re.S)
    test_command = [c for c in commands if "pytest" in c]
    assert len(test_command) == 1, commands
    ci_lines = [line for line in ci.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert test_command[0] in ci_lines


def _defines(path: pathlib.Path, dotted: str) -> bool:
    """Whether ``path`` defines ``dotted`` (``name`` or ``Class.method``) at the top level."""
    import ast

    body = ast.parse(path.read_text()).body
    for part in dotted.split("."):
        found = None
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == part:
                found = node
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == part for t in targets):
                    found = node
        if found is None:
            return False
        body = getattr(found, "body", [])
    return True


def test_architecture_page_names_only_code_that_exists():
    """docs/architecture.md cites ``file.py::name``: every file and every name must exist."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    refs = re.findall(r"`((?:[\w.]+/)*[\w.]+\.py)(?:::([\w.]+))?`", text)
    assert len(refs) > 30
    missing = []
    for path, name in refs:
        file = ROOT / path if path.startswith("tests/") else ROOT / "src" / "implicitdiff" / path
        if not file.is_file():
            missing.append(path)
        elif name and not _defines(file, name):
            missing.append(f"{path}::{name}")
    assert not missing, f"docs/architecture.md cites what does not exist: {missing}"
