"""The import graph of ``src/netshrink`` against docs/architecture.md's "may import" table.

Every ``import`` counts, at module level or inside a function: a function-level import still
makes the importer depend on the imported, and is how cycles used to hide. The graph is read
with ``ast`` (nothing is imported), so a violation is found even in code no test runs.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
DOC = ROOT / "docs" / "architecture.md"

KNOWN_EXCEPTIONS = {
    # #12: artifact/store.py imports every family (through registry.load_all) so that their
    # layer classes are registered before a load; the compressed layers will register
    # themselves. Remove this entry when that lands (test_known_exceptions_are_still_needed).
    ("netshrink.artifact.store", "netshrink.registry"),
}


@dataclass(frozen=True)
class Import:
    """``importer`` imports ``imported`` (dotted module names); ``typing_only`` under
    ``if TYPE_CHECKING:``."""

    importer: str
    imported: str
    line: int
    typing_only: bool


def modules(src: Path = SRC) -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name)."""
    found = {}
    for path in sorted((src / "netshrink").rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _typing_only_nodes(tree: ast.AST) -> set[int]:
    """ids of the nodes inside ``if TYPE_CHECKING:`` blocks."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
            if name == "TYPE_CHECKING":
                inside.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return inside


def imports_of(name: str, path: Path, known: dict[str, Path]) -> Iterator[Import]:
    """The package-internal imports of module ``name`` (at ``path``), resolved to modules.

    ``from a.b import c`` is an import of ``a.b.c`` when that is a module, else of ``a.b``.
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    typing_only = _typing_only_nodes(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([node.module] if node.module else [])])
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            if target in known and target != name:
                yield Import(name, target, node.lineno, id(node) in typing_only)


def import_graph(src: Path = SRC) -> list[Import]:
    """Every package-internal import of every module under ``src/netshrink``."""
    known = modules(src)
    return [imp for name, path in known.items() for imp in imports_of(name, path, known)]


def cycles(edges: list[tuple[str, str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), sorted."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def _prefix(token: str) -> str:
    """A table cell's ``training/``, ``errors.py`` or ``artifact.modules`` as a dotted name."""
    if token == "__init__.py":
        return "netshrink"
    return "netshrink." + token.removesuffix(".py").rstrip("/").replace("/", ".")


def _covers(prefix: str, module: str) -> bool:
    if prefix == "netshrink":  # the package root is one module, not everything under it
        return module == prefix
    return module == prefix or module.startswith(prefix + ".")


@dataclass(frozen=True)
class Row:
    """One row of the table: the modules it holds and the modules they may import."""

    holds: tuple[str, ...]
    may_import: tuple[str, ...]
    everything: bool

    def owns(self, module: str) -> bool:
        return any(_covers(p, module) for p in self.holds)

    def allows(self, module: str) -> bool:
        return self.everything or any(_covers(p, module) for p in (*self.holds, *self.may_import))


def table(doc: Path = DOC) -> list[Row]:
    """The "may import" table of ``doc``, with ``core`` expanded as its **core** line says."""
    text = doc.read_text()
    core_line = re.search(r"^\*\*core\*\*:(.*?)(?:\n\n|\Z)", text, re.M | re.S)
    assert core_line, f"{doc} has no '**core**: ...' line"
    core = tuple(_prefix(t) for t in re.findall(r"`([^`]+)`", core_line.group(1)))
    lines = text[text.index("| module | holds | may import |") :].splitlines()[2:]
    rows = []
    for line in lines:
        if not line.startswith("|"):
            break
        first, _, last = (cell.strip() for cell in line.strip("|").split("|"))
        tokens = re.findall(r"`([^`]+)`", last)
        may = tuple(_prefix(t) for t in tokens) + (core if last.startswith("core") else ())
        holds = tuple(_prefix(t) for t in re.findall(r"`([^`]+)`", first))
        rows.append(Row(holds, may, last.startswith("everything")))
    return rows


def row_of(module: str, rows: list[Row]) -> Row | None:
    """The row whose modules include ``module`` most specifically (longest name)."""
    owners = [
        (max(len(p) for p in row.holds if _covers(p, module)), i)
        for i, row in enumerate(rows)
        if row.owns(module)
    ]
    return rows[max(owners)[1]] if owners else None


def violations(graph: list[Import], rows: list[Row]) -> list[str]:
    """Imports the table does not allow, as ``importer:line -> imported`` lines."""
    bad = []
    for imp in graph:
        row = row_of(imp.importer, rows)
        if row is None or (imp.importer, imp.imported) in KNOWN_EXCEPTIONS:
            continue
        if not row.allows(imp.imported):
            bad.append(f"{imp.importer}:{imp.line} -> {imp.imported}")
    return bad


@pytest.fixture(scope="module")
def graph() -> list[Import]:
    return import_graph()


def test_every_module_falls_under_a_row_of_the_table() -> None:
    rows = table()
    assert [m for m in modules() if row_of(m, rows) is None] == []


def test_every_import_is_one_the_table_allows(graph: list[Import]) -> None:
    assert violations(graph, table()) == []


def test_no_import_cycles(graph: list[Import]) -> None:
    runtime_edges = [(i.importer, i.imported) for i in graph if not i.typing_only]
    assert cycles(runtime_edges) == []


def test_known_exceptions_are_still_needed(graph: list[Import]) -> None:
    edges = {(i.importer, i.imported) for i in graph}
    assert edges >= KNOWN_EXCEPTIONS, "an exception is gone: delete it from KNOWN_EXCEPTIONS"


def test_the_checker_sees_function_level_imports_and_cycles(tmp_path: Path) -> None:
    """The checker itself, on a two-module package that hides a cycle in a function."""
    pkg = tmp_path / "netshrink"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from netshrink.b import g\n")
    (pkg / "b.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from netshrink import a\n"
        "def g():\n    from netshrink.a import f\n    return f\n"
    )
    found = import_graph(tmp_path)
    assert {(i.importer, i.imported, i.typing_only) for i in found} == {
        ("netshrink.a", "netshrink.b", False),
        ("netshrink.b", "netshrink.a", True),
        ("netshrink.b", "netshrink.a", False),
    }
    runtime = [(i.importer, i.imported) for i in found if not i.typing_only]
    assert cycles(runtime) == [["netshrink.a", "netshrink.b"]]
    doc = tmp_path / "arch.md"
    doc.write_text(
        "| module | holds | may import |\n|---|---|---|\n"
        "| `a.py` | a | core |\n| `b.py` | b | nothing |\n\n**core**: `b.py`.\n"
    )
    assert violations(found, table(doc)) == [
        "netshrink.b:3 -> netshrink.a",
        "netshrink.b:5 -> netshrink.a",
    ]
