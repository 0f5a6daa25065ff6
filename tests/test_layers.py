"""The import layers of docs/ARCHITECTURE.md: every module imports only from its own layer or from the layers
that layer may use (``ALLOWED``), with no import circle between modules and no policy stage borrowing a
sibling stage's private names or config classes.

Imports are read from the source (``ast``), lazy ones inside functions included; imports under
``if TYPE_CHECKING:`` are types only and do not count. A module named in a string is an import too (the
registries load modules by name through ``importlib``), except a logger's name, a docstring and the module
after ``-m`` in a command line (another process). Each kind of bad edge is planted and must be reported.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest
from conftest import REPO

PACKAGES = ("foundation", "data", "ui", "reward", "alignment")  # the top-level packages, bottom to top

# bottom to top; a module belongs to the layer of its longest listed prefix (a new alignment.<stage> module
# is a policy stage without being listed)
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("foundation",)),
    ("data", ("data",)),
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
# the layers each layer may import (besides its own): a graph, not a line (ui and reward are side by side)
ALLOWED: dict[str, set[str]] = {
    "foundation": set(),
    "data": {"foundation"},
    "annotation": {"data", "foundation"},
    "ui": {"annotation", "data"},
    "reward": {"data", "foundation"},
    "policy": {"reward", "data", "foundation"},
    "evals": {"reward", "annotation", "data", "foundation"},
    "rounds": {"evals", "policy", "reward", "annotation", "data", "foundation"},
    "entry points": {name for name, _ in LAYERS} - {"entry points"},
}
# policy stages: one may use another's public functions (rs fine-tunes with sft's), never its private names or
# its config classes (shared pieces move down, e.g. to alignment.rl, where both import them)
STAGES = ("alignment.sft", "alignment.rs", "alignment.ppo", "alignment.grpo", "alignment.dpo", "alignment.kto")


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


def _not_imports(tree: ast.AST) -> set[int]:
    """ids of string constants that name a module without importing it: docstrings, logger names, ``-m X``."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            skip.add(id(node.value))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "getLogger":
            skip.update(id(a) for a in node.args)
        elif isinstance(node, (ast.List, ast.Tuple)):
            for before, item in zip(node.elts, node.elts[1:], strict=False):
                if isinstance(before, ast.Constant) and before.value == "-m":
                    skip.add(id(item))
    return skip


def imports(path: Path, module: str, known: set[str], *, names_too: bool = False) -> set[tuple]:
    """(imported project module, line) of every runtime import in ``path``, module strings included; with
    ``names_too``, (module, line, imported name or None) for ``from M import name``."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[tuple] = set()
    skip = _not_imports(tree)

    def add(name: str, line: int, what: str | None = None) -> None:
        while name and name not in known:  # `import a.b.c` names a.b.c; `from a import f` names a
            name = name.rpartition(".")[0]
        if name and name != module:
            found.add((name, line, what) if names_too else (name, line))

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_only(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for a in node.names:
                add(a.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            for a in node.names:  # `from foundation import distributed` depends on foundation.distributed only
                sub = f"{base}.{a.name}"
                add(sub, node.lineno) if sub in known else add(base, node.lineno, a.name)
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip
              and "." in node.value and node.value.split(":")[0] in known):  # dotted: "reward" may be a dict key
            add(node.value.split(":")[0], node.lineno)  # a registry's "package.module" or "module:function"
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def back_edges(root: Path) -> list[str]:
    """Imports of a layer that the importing layer may not use."""
    mods = modules(root)
    known = set(mods)
    bad = []
    for module, path in mods.items():
        here = layer_of(module)
        for target, line in sorted(imports(path, module, known)):
            there = layer_of(target)
            if there != here and there not in ALLOWED[here]:
                bad.append(f"{path.relative_to(root)}:{line}: {module} ({here}) imports {target} ({there})")
    return bad


def package_back_edges(root: Path) -> list[str]:
    """Imports from a top-level package to one above it in ``PACKAGES`` (foundation < data < ui < reward <
    alignment): drawn bottom to top, the packages' import graph has no arrow running back up."""
    mods = modules(root)
    known = set(mods)
    rank = {pkg: i for i, pkg in enumerate(PACKAGES)}
    bad = []
    for module, path in mods.items():
        here = module.split(".")[0]
        for target, line in sorted(imports(path, module, known)):
            there = target.split(".")[0]
            if rank[there] > rank[here]:
                bad.append(f"{path.relative_to(root)}:{line}: {here} imports {there} ({module} -> {target})")
    return bad


def _stage(module: str) -> str | None:
    return next((s for s in STAGES if module == s or module.startswith(s + ".")), None)


def sibling_borrowing(root: Path) -> list[str]:
    """A policy stage importing another stage's private names (``_x``) or config classes (``...Config``)."""
    mods = modules(root)
    known = set(mods)
    bad = []
    for module, path in mods.items():
        mine = _stage(module)
        if mine is None:
            continue
        for target, line, name in sorted(imports(path, module, known, names_too=True), key=str):
            theirs = _stage(target)
            if theirs is None or theirs == mine or name is None:
                continue
            if name.startswith("_") or name.endswith("Config"):
                bad.append(f"{path.relative_to(root)}:{line}: {module} borrows {name} from {target}")
    return bad


def circles(root: Path) -> list[list[str]]:
    """Import circles between modules (strongly connected components of the import graph, sorted)."""
    mods = modules(root)
    known = set(mods)
    graph = {m: sorted({t for t, _ in imports(p, m, known)}) for m, p in mods.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def strongconnect(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            strongconnect(v)
    return sorted(out)


def test_every_module_imports_only_downwards():
    assert back_edges(REPO) == []


def test_the_top_level_packages_form_one_downward_chain():
    assert package_back_edges(REPO) == []


def test_a_planted_package_back_edge_is_reported(tmp_path):
    root = _copy(tmp_path)
    n = _plant(root, "foundation/runs.py", "def _planted():\n    from data.schemas import Message  # noqa")
    m = _plant(root, "reward/combine.py", 'METHODS = {"x": "alignment.methods"}')
    assert package_back_edges(root) == [
        f"foundation/runs.py:{n + 1}: foundation imports data (foundation.runs -> data.schemas)",
        f"reward/combine.py:{m}: reward imports alignment (reward.combine -> alignment.methods)"]


def test_a_planted_back_edge_is_reported(tmp_path):
    loaders = _copy(tmp_path) / "data" / "loaders.py"
    lines = loaders.read_text().splitlines()
    n = len(lines) + 3
    loaders.write_text("\n".join(lines) + "\n\n\ndef _planted():\n    from alignment.rounds import Project  # noqa\n")
    assert back_edges(tmp_path) == [f"data/loaders.py:{n + 1}: data.loaders (data) imports alignment.rounds (rounds)"]
    # a types-only import is not a dependency at run time
    loaders.write_text("\n".join(lines) + "\nif TYPE_CHECKING:\n    from alignment.rounds import Project  # noqa\n")
    assert back_edges(tmp_path) == []


def test_no_stage_borrows_a_siblings_private_names_or_config_classes():
    assert sibling_borrowing(REPO) == []


def test_no_import_circles():
    assert circles(REPO) == []


def _copy(tmp_path: Path) -> Path:
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.bin", "*.safetensors"))
    return tmp_path


def _plant(root: Path, rel: str, code: str) -> int:
    """Append ``code`` to ``root/rel``; returns the line number of its first line."""
    path = root / rel
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines) + "\n\n\n" + code + "\n")
    return len(lines) + 3


def test_each_kind_of_bad_edge_is_reported(tmp_path):
    root = _copy(tmp_path)
    # a module named in a registry string (loaded with importlib) counts as an import
    n = _plant(root, "data/mixing.py", 'PLUGINS = {"rounds": "alignment.rounds.driver:run"}')
    # ui sits beside reward, not above it: a sideways import is refused
    m = _plant(root, "ui/app.py", "def _planted():\n    from reward.model import load_scorer  # noqa")
    # a logger's name, a docstring and `-m module` (another process) are not imports
    _plant(root, "data/schemas.py", '"""See alignment.rounds.driver."""\nimport logging\n'
                                    'logging.getLogger("alignment.rounds.driver")\nCMD = ["-m", "alignment.rounds.driver"]')
    assert back_edges(root) == [
        f"data/mixing.py:{n}: data.mixing (data) imports alignment.rounds.driver (rounds)",
        f"ui/app.py:{m + 1}: ui.app (ui) imports reward.model (reward)"]
    # a stage borrowing a sibling's private name or config class
    k = _plant(root, "alignment/kto.py", "from alignment.sft import SFTConfig, _helper  # noqa")
    found = sibling_borrowing(root)
    assert f"alignment/kto.py:{k}: alignment.kto borrows SFTConfig from alignment.sft" in found
    assert f"alignment/kto.py:{k}: alignment.kto borrows _helper from alignment.sft" in found
    # an import circle, even through lazy imports
    _plant(root, "alignment/evals/lcwr.py", "def _planted():\n    from alignment.evals import toxigen  # noqa")
    _plant(root, "alignment/evals/toxigen.py", "def _planted_too():\n    from alignment.evals.lcwr import lc_win_rate  # noqa")
    assert ["alignment.evals.lcwr", "alignment.evals.toxigen"] in circles(root)


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
    res = subprocess.run([ruff, "check", *PACKAGES, "tests", "benchmarks"], cwd=REPO,
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
