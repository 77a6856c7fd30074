"""The package's layout rules, read from its source: no private name crosses a module, no import circle."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

PACKAGE = Path(__file__).resolve().parents[1] / "captum_vit"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` names, inside ``captum_vit``."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module_level_only: bool) -> Iterator[Tuple[str, str, ast.ImportFrom]]:
    """``(importer, imported module, node)`` for every ``from ... import`` of captum_vit inside captum_vit."""
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        module, is_package = _module_name(path), path.name == "__init__.py"
        nodes = tree.body if module_level_only else ast.walk(tree)
        for node in nodes:
            if isinstance(node, ast.ImportFrom):
                target = _resolve(module, is_package, node)
                if target.startswith("captum_vit"):
                    yield module, target, node


def test_no_private_name_is_imported_from_another_module():
    crossings = [
        f"{importer} imports {alias.name} from {target}"
        for importer, target, node in _imports(module_level_only=False)
        for alias in node.names
        if alias.name.startswith("_") and not alias.name.startswith("__")
    ]
    assert crossings == []


def _graph(module_level_only: bool = True) -> Dict[str, Set[str]]:
    modules = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    graph: Dict[str, Set[str]] = {m: set() for m in modules}
    for importer, target, node in _imports(module_level_only):
        if node.module is None:  # ``from . import x``: the submodules named
            targets = {f"{target}.{a.name}" for a in node.names} & modules or {target}
        else:
            targets = {target}
        graph[importer] |= {t for t in targets if t in modules and t != importer}
    return graph


def _cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One import circle of ``graph``, or ``[]``."""
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(node: str) -> List[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return []

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return []


def test_module_level_imports_form_no_circle():
    # A package's ``__init__`` importing its own submodules is no circle unless a submodule imports the
    # package back at module level; that is exactly what the graph records.
    graph = _graph()
    assert len(graph) > 30  # the walk found the package
    assert _cycle(graph) == []


def test_imports_inside_functions_form_no_circle_either():
    """A deferred import hides a circle from the interpreter, not from the design: none either way (a module
    importing the package that contains it, for its public names, is not a circle of modules)."""
    graph = _graph(module_level_only=False)
    graph = {m: {t for t in targets if not m.startswith(t + ".")} for m, targets in graph.items()}
    assert _cycle(graph) == []


def test_the_circle_finder_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) == []


def _private_uses_outside(folder: Path) -> List[str]:
    """``captum_vit`` private modules or names imported by the scripts and tests in ``folder``."""
    found = []
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("captum_vit"):
                names = (node.module or "").split(".") + [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                names = [part for a in node.names if a.name.startswith("captum_vit") for part in a.name.split(".")]
            else:
                continue
            if any(n.startswith("_") and not n.startswith("__") for n in names):
                found.append(f"{path.name}:{node.lineno}")
    return found


def test_tests_benchmarks_and_tutorials_use_only_public_names():
    root = PACKAGE.parent
    assert [use for folder in ("tests", "benchmarks", "tutorials") for use in _private_uses_outside(root / folder)] == []


def test_reports_name_no_metric():
    """reports.py reads what each metric's spec says (fields shown, aggregates, descriptions, which way is
    better): no string in it names a metric, a field or an aggregate of the registry."""
    import ast

    from captum_vit.metrics import AGGREGATES, FIELDS, METRICS

    names = set(METRICS) | set(FIELDS) | set(AGGREGATES)
    tree = ast.parse((PACKAGE / "reports.py").read_text())
    literals = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert not literals & names, f"reports.py names {sorted(literals & names)}"


def _layers() -> Dict[str, int]:
    """docs/architecture.md's table: ``{module (without "captum_vit."): layer index, bottom first}``."""
    import re

    page = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    rows = [line for line in page.splitlines() if line.startswith("| ") and not line.startswith("| layer")]
    placed: Dict[str, int] = {}
    for level, row in enumerate(rows):
        for module in re.findall(r"`([\w.]+)`", row.split("|")[2]):
            placed[module] = level
    return placed


def _layer_of(module: str, placed: Dict[str, int]) -> int:
    """The layer of ``captum_vit.x.y``: its own row, or its package's (``adapters`` places every adapter)."""
    name = module[len("captum_vit."):]
    while name not in placed:
        assert "." in name, f"docs/architecture.md places no layer for {module}"
        name = name.rsplit(".", 1)[0]
    return placed[name]


def test_the_architecture_page_is_the_code():
    """Every module has its layer in docs/architecture.md, and no import goes up a layer (module level or
    inside a function; the package root, the public face, is not placed)."""
    placed = _layers()
    assert len(set(placed.values())) >= 8
    modules = {_module_name(p) for p in PACKAGE.rglob("*.py")} - {"captum_vit"}
    for module in modules:
        _layer_of(module, placed)
    for name in placed:
        assert f"captum_vit.{name}" in modules, f"docs/architecture.md places {name}, which does not exist"
    upward = sorted(f"{importer} -> {target} (line {node.lineno})"
                    for importer, target, node in _imports(module_level_only=False)
                    if importer != "captum_vit" and target != "captum_vit"
                    and _layer_of(target, placed) > _layer_of(importer, placed))
    assert upward == [], "imports that go up a layer: " + "; ".join(upward)
