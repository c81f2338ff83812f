"""The package's shape: imports point down, with no cycles, and the store format stands alone.

    .venv/bin/pytest tests/test_layout.py -q

Imports are read from the source (every ``import`` / ``from ... import``, inside functions too),
so a cycle hidden by a function-local import is found as well.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "pipeline"


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__"): p
            for p in ROOT.rglob("*.py")}


def _imports(path: Path, modules: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """(imported project module, line, inside a function) for every import in ``path``."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                names = [f"{child.module}.{a.name}" for a in child.names]
            for name in names:
                while name and name not in modules:
                    name = name.rpartition(".")[0]
                if name:
                    found.append((name, child.lineno, inner))
            visit(child, inner)

    visit(tree, False)
    return found


MODULES = _modules()
GRAPH = {m: {dep for dep, _, _ in _imports(p, MODULES) if dep != m} for m, p in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan). A package importing
    its own submodules in ``__init__`` is how registration works, so edges into a package's
    ``__init__`` from its own submodules are not followed."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def edges(v: str) -> set[str]:
        return {w for w in graph[v] if not (MODULES[w].name == "__init__.py" and v.startswith(w + "."))}

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_in_the_package() -> None:
    assert len(MODULES) > 30                      # the walk found the package
    assert _cycles(GRAPH) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {**GRAPH, "pipeline.errors": GRAPH["pipeline.errors"] | {"pipeline.train.loop"}}
    assert any("pipeline.errors" in comp for comp in _cycles(graph))


@pytest.mark.parametrize("package", ["pipeline.store"])
def test_the_store_format_imports_no_model_checkpoint_or_dataset_code(package: str) -> None:
    allowed = ({"pipeline", "pipeline.errors", "pipeline.faults", "pipeline.files", "pipeline.registry"}
               | {m for m in MODULES if m.startswith(package)})
    for module in (m for m in MODULES if m == package or m.startswith(package + ".")):
        assert GRAPH[module] <= allowed, (module, sorted(GRAPH[module] - allowed))


def test_project_modules_are_imported_at_the_top_of_each_module() -> None:
    local = [(m, line, dep) for m, p in MODULES.items() for dep, line, inner in _imports(p, MODULES) if inner]
    assert local == []


def test_dependencies_point_down() -> None:
    """The format and the building blocks never import the jobs and tasks built on them."""
    upper = {"pipeline.cli", "pipeline.cli_manifest", "pipeline.train", "pipeline.cache", "pipeline.inspect"}
    lower = [m for m in MODULES if not any(m == u or m.startswith(u + ".") for u in upper)]
    for module in lower:
        ups = {dep for dep in GRAPH[module] if any(dep == u or dep.startswith(u + ".") for u in upper)}
        assert not ups, (module, sorted(ups))
    cache = [m for m in MODULES if m.startswith("pipeline.cache")]
    assert not any(dep.startswith("pipeline.train") for m in cache for dep in GRAPH[m])
    train = [m for m in MODULES if m.startswith("pipeline.train")]   # live teachers come from pipeline.teachers
    assert not any(dep.startswith("pipeline.cache") for m in train for dep in GRAPH[m])


def test_the_command_line_does_not_import_torchvision_until_it_is_used() -> None:
    """torchvision takes seconds to import (its models pull in torch._dynamo); every stage of a
    pipeline pays for what ``kdcache`` imports, so it waits until an arch or augmentation needs it."""
    code = "import sys, pipeline.cli; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torchvision'))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT.parent, check=True)
    assert done.stdout.strip() == "[]", done.stdout
