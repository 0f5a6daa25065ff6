"""The import layers of docs/ARCHITECTURE.md: every module imports only from its own layer or those below.

Imports are read from the source (``ast``), lazy ones inside functions included; imports under
``if TYPE_CHECKING:`` are types only and do not count. A planted back edge must be reported.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest
from conftest import REPO

PACKAGES = ("alignment", "reward", "data", "ui")

# bottom to top; a module belongs to the layer of its longest listed prefix (a new alignment.<stage> module
# is a policy stage without being listed)
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("alignment.config", "alignment.runs", "alignment.models", "alignment.adapters", "alignment.training",
                    "alignment.distributed", "alignment.launch", "alignment.generation")),
    ("data", ("data", "alignment.heldout")),
    ("annotation", ("data.store",)),
    ("ui", ("ui",)),
    ("reward", ("reward",)),
    ("policy", ("alignment",)),  # alignment.sft, .dpo, .kto, .ppo, .rs, .grpo, .rl, .methods, ...
    ("evals", ("alignment.evals",)),
    ("rounds", ("alignment.rounds",)),
    ("entry points", ("alignment.cli", "alignment.demo", "alignment.commands", "alignment.annotate", "alignment.evals.cli",
                      "reward.commands")),
]
RANK = {name: i for i, (name, _) in enumerate(LAYERS)}


def layer_of(module: str) -> str:
    best, layer = -1, None
    for name, prefixes in LAYERS:
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, layer = len(p), name
    if layer is None:
        raise AssertionError(f"{module}: in no layer; add it to LAYERS (tests/test_layers.py) and docs/ARCHITECTURE.md")
    return layer


def modules(root: Path) -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in sorted((root / pkg).rglob("*.py")):
            parts = f.relative_to(root).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _type_only(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imports(path: Path, module: str, known: set[str]) -> set[tuple[str, int]]:
    """(imported project module, line) of every runtime import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[tuple[str, int]] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_only(node):
            for child in node.orelse:
                visit(child)
            return
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
            names = subs or [base]  # `from alignment import distributed` depends on alignment.distributed only
        for name in names:
            while name and name not in known:  # `import a.b.c` names a.b.c; `from a import f` names a
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add((name, node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def back_edges(root: Path) -> list[str]:
    mods = modules(root)
    known = set(mods)
    bad = []
    for module, path in mods.items():
        here = layer_of(module)
        for target, line in sorted(imports(path, module, known)):
            there = layer_of(target)
            if RANK[there] > RANK[here]:
                bad.append(f"{path.relative_to(root)}:{line}: {module} ({here}) imports {target} ({there})")
    return bad


def test_every_module_imports_only_downwards():
    assert back_edges(REPO) == []


def test_a_planted_back_edge_is_reported(tmp_path):
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.bin", "*.safetensors"))
    loaders = tmp_path / "data" / "loaders.py"
    lines = loaders.read_text().splitlines()
    n = len(lines) + 3
    loaders.write_text("\n".join(lines) + "\n\n\ndef _planted():\n    from alignment.rounds import Project  # noqa\n")
    assert back_edges(tmp_path) == [f"data/loaders.py:{n + 1}: data.loaders (data) imports alignment.rounds (rounds)"]
    # a types-only import is not a dependency at run time
    loaders.write_text("\n".join(lines) + "\nif TYPE_CHECKING:\n    from alignment.rounds import Project  # noqa\n")
    assert back_edges(tmp_path) == []


def test_every_module_has_a_layer():
    for module in modules(REPO):
        layer_of(module)


def test_long_modules_say_why_at_the_top():
    """A module reads top to bottom in about 400 lines; a longer one says why near its top ("Length (...): ...")."""
    long = [f"{path.relative_to(REPO)} ({n} lines)" for path in modules(REPO).values()
            if (n := len(path.read_text().splitlines())) > 450 and "Length (" not in path.read_text()[:2000]]
    assert long == []


def test_lint_is_clean():
    """`make lint` (ruff with the rules pinned in pyproject.toml, lines <= 130 characters) passes."""
    import shutil
    import subprocess
    import sys

    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e .[dev])")
    res = subprocess.run([ruff, "check", "alignment", "reward", "data", "ui", "tests", "benchmarks"], cwd=REPO,
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
