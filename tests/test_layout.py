"""The architecture, checked: which module may import which.

Read from the source with `ast` (every import statement, also those inside functions, and
`__import__`/`importlib.import_module` of a constant name), so a lazy import cannot hide a cycle.
An `import a.b.c` counts as importing `a.b.c` only, not the packages above it: Python runs a
package's `__init__` first, which is not a dependency of the module on its package.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"itwinai_journal": ROOT / "src" / "itwinai_journal",
            "itwinai_sync": ROOT / "exporters" / "itwinai_sync"}


def _module_files() -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for name, base in PACKAGES.items():
        for path in sorted(base.rglob("*.py")):
            parts = [name, *path.relative_to(base).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


MODULES = _module_files()


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def _resolve(module: str, level: int, name: str | None) -> str:
    """The absolute name of a (possibly relative) `from` import in `module`."""
    if level == 0:
        return name or ""
    parts = module.split(".")
    if not _is_package(module):
        parts.pop()
    parts = parts[: len(parts) - (level - 1)]
    return ".".join([*parts, name] if name else parts)


def _project(name: str) -> str | None:
    """The project module `name` denotes (the longest known prefix), or None."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _dynamic_import(call: ast.Call) -> bool:
    """`__import__("x")` or `importlib.import_module("x")` with a constant name."""
    func = call.func
    named = ((isinstance(func, ast.Name) and func.id == "__import__")
             or (isinstance(func, ast.Attribute) and func.attr == "import_module"))
    return (named and bool(call.args) and isinstance(call.args[0], ast.Constant)
            and isinstance(call.args[0].value, str))


@cache
def imports_of(module: str) -> frozenset[str]:
    tree = ast.parse(MODULES[module].read_text(), str(MODULES[module]))
    found: set[str | None] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(_project(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node.level, node.module)
            for alias in node.names:
                found.add(_project(f"{base}.{alias.name}") if f"{base}.{alias.name}" in MODULES
                          else _project(base))
        elif isinstance(node, ast.Call) and _dynamic_import(node):
            found.add(_project(node.args[0].value))
    found.discard(None)
    found.discard(module)
    return frozenset(m for m in found if m is not None)


def third_party_imports(module: str) -> set[str]:
    tree = ast.parse(MODULES[module].read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in imports_of(v):
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
                components.append(sorted(component))

    for module in MODULES:
        if module not in index:
            visit(module)
    return components


def _in(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_the_import_graph_is_read():
    """The checks below mean something only if the graph is there: spot-check known edges."""
    assert "itwinai_journal.format.segments" in imports_of("itwinai_sync.engine") | {
        m for dep in imports_of("itwinai_sync.engine") for m in imports_of(dep)}
    assert imports_of("itwinai_sync.targets.mlflow") >= {"itwinai_sync.api"}
    assert "itwinai_journal.format.schema" in MODULES and "itwinai_sync.api" in MODULES


def test_no_import_cycle():
    assert _cycles() == []


def test_the_compute_node_package_never_imports_the_sync_side():
    offending = {m: sorted(d for d in imports_of(m) if _in(d, "itwinai_sync"))
                 for m in MODULES if _in(m, "itwinai_journal")}
    assert {m: d for m, d in offending.items() if d} == {}


def test_the_format_package_stands_alone():
    """format/ is the bottom layer: it imports nothing else of the project but the error root."""
    allowed = ("itwinai_journal.format", "itwinai_journal.errors")
    offending = {m: sorted(d for d in imports_of(m) if not _in(d, *allowed))
                 for m in MODULES if _in(m, "itwinai_journal.format")}
    assert {m: d for m, d in offending.items() if d} == {}


@pytest.mark.parametrize("module", [m for m in MODULES if _in(m, "itwinai_sync.targets")])
def test_targets_use_the_plugin_interface_only(module):
    """A target gets records and session facts from the engine: it never reads journal files
    (format/, read/), never drives the engine, and never imports click (its options are data)."""
    forbidden = ("itwinai_journal.format.segments", "itwinai_journal.format.manifest",
                 "itwinai_journal.read.journal", "itwinai_journal.read.follow",
                 "itwinai_journal.read.verify", "itwinai_sync.engine", "itwinai_sync.cli")
    assert sorted(d for d in imports_of(module) if _in(d, *forbidden)) == []
    assert "click" not in third_party_imports(module)


def test_the_plugin_interface_has_no_cli_in_it():
    assert "click" not in third_party_imports("itwinai_sync.api")
    assert not any(_in(d, "itwinai_sync.cli") for d in imports_of("itwinai_sync.api"))


def test_only_format_and_read_know_segment_and_index_bytes():
    """Reading segments, the index or manifests is the business of format/ and read/ (and the
    writer, which writes them): the engine, the targets, the CLI and inspection go through read/."""
    readers = ("itwinai_journal.format", "itwinai_journal.read", "itwinai_journal.writer")
    byte_level = {"read_index", "read_index_lines", "index_head", "iter_tables", "read_segment",
                  "read_sealed", "read_parquet", "read_jsonl", "segment_files"}
    offending = {}
    for module in MODULES:
        if _in(module, *readers):
            continue
        tree = ast.parse(MODULES[module].read_text())
        names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                 and _project(_resolve(module, node.level, node.module) or "") ==
                 "itwinai_journal.format.segments" for alias in node.names}
        if names & byte_level:
            offending[module] = sorted(names & byte_level)
    assert offending == {}
