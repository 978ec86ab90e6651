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
