"""Imports point down the layer table of docs/design.md, and only down.

Every module under attnrewrite/ is parsed with `ast`; each import of an attnrewrite module —
absolute or relative, at module level or inside a function — is resolved to the module it
loads, and that module's row in the table must be the importer's row or one below it. The
table is read from docs/design.md itself, so the document and the code cannot drift apart:
a new row, a moved module or a new upward import fails here, naming the file and line.
"""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import attnrewrite

PACKAGE = Path(attnrewrite.__file__).resolve().parent
DESIGN = PACKAGE.parent / "docs" / "design.md"

# Upward imports that exist today, each named: (importer, imported). Empty means none; a new
# one fails the test until it is removed or, with a reason, listed here and in docs/design.md.
KNOWN_UPWARD: set[tuple[str, str]] = set()

# The package's entry modules sit above every row: attnrewrite/__init__.py re-exports the
# public API, __main__.py runs the CLI. Nothing inside the package may import them.
ENTRY = {"attnrewrite", "attnrewrite.__main__"}


def layer_table() -> list[list[str]]:
    """The rows of the table under '## Layers' in docs/design.md, top first: each row is a list
    of module names ('attnrewrite.cli') or package prefixes ('attnrewrite.frontends')."""
    text = DESIGN.read_text()
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```\n(.*?)```", section, re.S).group(1)
    rows = []
    for line in block.splitlines():
        if not line.strip():
            continue
        names = re.match(r"((?:[\w/]+\.py|[\w]+/)(?:,\s*(?:[\w/]+\.py|[\w]+/))*)\s", line + " ")
        assert names, f"docs/design.md: a layer row that names no module: {line!r}"
        rows.append(["attnrewrite." + n.strip().removesuffix(".py").rstrip("/").replace("/", ".")
                     for n in names.group(1).split(",")])
    return rows


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return name.removesuffix(".__init__")


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path):
    """(line, imported module) for every attnrewrite import in one file, wherever it sits."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module
            # `from pkg import name` loads pkg.name when that is a module, else pkg itself
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in MODULES else module
                       for a in node.names]
        else:
            continue
        for t in targets:
            if t == "attnrewrite" or t.startswith("attnrewrite."):
                while t not in MODULES:                 # `import attnrewrite.x.y` names a module
                    t = t.rpartition(".")[0]
                yield node.lineno, t


def row_of(module: str, rows) -> int | None:
    for i, row in enumerate(rows):
        if any(module == entry or module.startswith(entry + ".") for entry in row):
            return i
    return None


def test_every_module_has_one_row_in_the_layer_table():
    rows = layer_table()
    assert len(rows) >= 5, rows
    flat = [entry for row in rows for entry in row]
    assert len(flat) == len(set(flat)), f"a module in two rows: {flat}"
    missing = [m for m in MODULES if m not in ENTRY and row_of(m, rows) is None]
    assert not missing, f"modules docs/design.md's layer table does not place: {missing}"
    stale = [e for e in flat if e not in MODULES]
    assert not stale, f"layer table rows naming no module of the package: {stale}"


def test_imports_point_down_the_layer_table():
    rows = layer_table()
    upward, into_entry = [], []
    for module, path in MODULES.items():
        if module in ENTRY:
            continue
        here = row_of(module, rows)
        for line, target in imports(path):
            if target in ENTRY:
                into_entry.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}")
                continue
            there = row_of(target, rows)
            if here is None or there is None:
                continue                                # test_every_module_has_one_row_in_the_layer_table
            if there < here and (module, target) not in KNOWN_UPWARD:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target} "
                              f"(row {there + 1}: {', '.join(rows[there])}) from row {here + 1}")
    assert not into_entry, into_entry
    assert not upward, "imports pointing up docs/design.md's layer table:\n" + "\n".join(upward)


def test_known_upward_imports_still_exist():
    """An exception that no longer exists is removed from KNOWN_UPWARD, so it cannot come back."""
    actual = {(module, target) for module, path in MODULES.items() for _, target in imports(path)}
    assert KNOWN_UPWARD <= actual, KNOWN_UPWARD - actual


def test_the_checker_sees_relative_absolute_and_function_level_imports(tmp_path, monkeypatch):
    """A file written here with one import of each kind, read as if it were attnrewrite/passes/x.py."""
    fake = tmp_path / "attnrewrite" / "passes"
    fake.mkdir(parents=True)
    (fake / "x.py").write_text(
        "from ..pipeline import rewrite\n"
        "import attnrewrite.variants.sparse\n"
        "def f():\n    from attnrewrite import cli\n"
        "    from . import vocab\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path / "attnrewrite")
    found = [t for _, t in imports(fake / "x.py")]
    assert found == ["attnrewrite.pipeline", "attnrewrite.variants.sparse", "attnrewrite.cli",
                     "attnrewrite.passes.vocab"]
    rows = layer_table()
    assert row_of("attnrewrite.pipeline", rows) < row_of("attnrewrite.passes.x", rows)
