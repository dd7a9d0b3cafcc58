"""The package's layers, read from the code's own imports (every import statement, also inside functions).

Floors: ``sf_model`` (core) at the bottom, ``toy`` above it; ``nodes``, ``cli`` and ``training`` on top, never
importing each other; ``workflows`` (API workflow tools) may read the nodes' schemas. No import cycle anywhere.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "self_forcing"
FOLDERS = ("sf_model", "toy", "nodes", "cli", "training", "workflows")

# top-level folder -> folders it must never import
FORBIDDEN = {
    "sf_model": {"toy", "nodes", "cli", "training", "workflows"},
    "toy": {"nodes", "cli", "training", "workflows"},
    "nodes": {"cli", "training"},
    "cli": {"nodes", "training", "workflows"},
    "training": {"nodes", "cli", "workflows"},
    "workflows": {"cli", "training"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([PACKAGE, *parts])


def package_files() -> dict[str, Path]:
    files = {PACKAGE: ROOT / "__init__.py"}
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            files[module_name(path)] = path
    return files


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of the package that ``name`` imports (relative and absolute, at any depth of the file)."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        targets = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                stem = base[: len(base) - (node.level - 1)]
                mod = ".".join(stem + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" for a in node.names] + [mod]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        for t in targets:
            while t and t not in known:  # `from .x import name`: the module is x unless name is a submodule
                t = t.rpartition(".")[0]
            # a module's own parent packages are imported before it anyway: not an edge of the design
            if t and t != name and t.startswith(PACKAGE + ".") and not name.startswith(t + "."):
                out.add(t)
    return out


def graph() -> dict[str, set[str]]:
    files = package_files()
    known = set(files)
    return {name: imports_of(name, path, known) for name, path in files.items()}


def floor(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in FOLDERS else None


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (a list of modules, first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(g.get(n, ())):
            if m == PACKAGE or m not in g:
                continue
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_the_graph_is_read_from_the_code():
    g = graph()
    # facts of today's code that any reading must find (guards against a parser that finds nothing)
    assert f"{PACKAGE}.sf_model.checkpoint" in g[f"{PACKAGE}.sf_model.weights"]
    assert f"{PACKAGE}.sf_model.sampler" in g[f"{PACKAGE}.cli.generate"]
    assert any(m.startswith(f"{PACKAGE}.toy") for m in g[f"{PACKAGE}.training.data"])
    assert len(g) > 60


def test_no_layer_imports_upwards_or_sideways():
    bad = []
    for name, deps in graph().items():
        own = floor(name)
        for dep in deps:
            if own and floor(dep) in FORBIDDEN[own]:
                bad.append(f"{name} imports {dep}")
    assert not bad, "layer rule broken:\n" + "\n".join(sorted(bad))


def test_no_import_cycles():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("edges, expect", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
])
def test_the_cycle_finder_finds_cycles(edges, expect):
    assert find_cycle(edges) == expect


def test_a_relative_import_resolves_to_the_module(tmp_path):
    pkg = tmp_path / "p"
    pkg.mkdir()
    f = pkg / "m.py"
    f.write_text("from .x import thing\nfrom ..top import other\nfrom . import y\n")
    known = {f"{PACKAGE}.sf_model", f"{PACKAGE}.sf_model.x", f"{PACKAGE}.sf_model.y", f"{PACKAGE}.top"}
    # pretend the file is self_forcing.sf_model.m
    got = imports_of(f"{PACKAGE}.sf_model.m", f, known)
    assert got == {f"{PACKAGE}.sf_model.x", f"{PACKAGE}.sf_model.y", f"{PACKAGE}.top"}  # not its own package
