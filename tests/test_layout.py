"""The package's layout: no import cycles, and DEVELOPERS.md's layout table names every module."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "oaif"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the oaif modules it imports anywhere in its source (top level or inside functions)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            graph[module].update(t for t in targets if t in files and t not in (module, "oaif"))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def package_of(module: str) -> str:
    """The part a module belongs to: its package below ``oaif`` (``oaif.step``), or itself when it
    sits directly in ``src/oaif`` (``oaif.config``)."""
    parts = module.split(".")
    if len(parts) > 2 or (PACKAGE / parts[-1] / "__init__.py").exists():
        return ".".join(parts[:2])
    return module


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The import graph between parts (packages and the modules directly in ``src/oaif``)."""
    parts: dict[str, set[str]] = {}
    for module, targets in graph.items():
        if module == "oaif":
            continue
        part = package_of(module)
        parts.setdefault(part, set()).update(package_of(t) for t in targets)
    return {part: targets - {part} for part, targets in parts.items()}


def test_the_package_graph_sees_packages():
    g = {"oaif.step.pairs": {"oaif.annotators.base"}, "oaif.annotators.base": {"oaif.errors"},
         "oaif.annotators.build": {"oaif.step.records"}, "oaif.errors": set(), "oaif.step.records": set()}
    assert package_graph(g) == {"oaif.step": {"oaif.annotators"}, "oaif.annotators": {"oaif.errors", "oaif.step"},
                                "oaif.errors": set()}
    assert cycles(package_graph(g)) == [["oaif.annotators", "oaif.step"]]


def test_no_import_cycles_in_the_package():
    graph = import_graph()
    assert "oaif.annotators.reward_scoring" in graph["oaif.annotators.reward_model_judge"]  # the graph sees imports
    assert "oaif.annotators.reward_scoring" in graph["oaif.annotators.reward_model_training"]  # ... inside functions too
    assert cycles(graph) == []


def test_no_import_cycles_between_parts():
    """A part (``step/``, ``run/``, ``annotators/``, ...) never imports a part that imports it back."""
    parts = package_graph(import_graph())
    assert "oaif.step" in parts["oaif.run"] and "oaif.run" in parts["oaif.trainer"]
    assert cycles(parts) == []


def test_the_step_does_not_import_the_run_around_it():
    parts = package_graph(import_graph())
    assert "oaif.run" not in parts["oaif.step"] and "oaif.trainer" not in parts["oaif.step"]


def test_few_modules_sit_directly_in_the_package():
    flat = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert len(flat) <= 8, flat


def test_no_module_is_over_450_lines():
    """A module that grows past this holds more than one job: split it by job (DEVELOPERS.md's table)."""
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text(encoding="utf-8").splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {m: n for m, n in sizes.items() if n > 450} == {}


def test_developers_layout_table_names_every_module():
    text = (ROOT / "DEVELOPERS.md").read_text(encoding="utf-8")
    table = set(re.findall(r"^\| (?:\*\*)?`([\w./]+)`(?:\*\*)? \|", text, flags=re.MULTILINE))
    modules = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}
    packages = {str(p.parent.relative_to(PACKAGE)) + "/" for p in PACKAGE.rglob("*/__init__.py")}
    assert modules | packages <= table, f"not in DEVELOPERS.md's layout table: {sorted(modules | packages - table)}"
    assert table <= modules | packages | {"rubrics/"}, f"in the table but not in src/oaif: {sorted(table - modules - packages)}"
