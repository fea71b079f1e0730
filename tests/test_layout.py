"""The package layout holds: one-way imports, no cycles, one place for each database and event difference.

The import rules live in ``pyproject.toml`` as import-linter contracts (layers,
the queue core's isolation, where torch may be imported and what must never
reach it); ``lint-imports`` checks them here. What import-linter cannot say is
checked on grimp's graph (the one import-linter builds, with function-level
imports counted) and on the source: no cycle between any two modules, the
"which database am I on" question asked only in the dialect module,
``send_event`` only in the broker, and the sizes that keep modules readable.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKERS = ROOT / "workers"
MAX_LINES = 450
MAX_TOP_LEVEL_MODULES = 10


def _modules() -> dict[str, Path]:
    """Every module of the app except migrations (generated, never imported by code)."""
    found = {}
    for path in WORKERS.rglob("*.py"):
        if "migrations" in path.parts:
            continue
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def test_import_linter_contracts_are_kept():
    proc = subprocess.run([str(Path(sys.executable).with_name("lint-imports")), "--no-cache"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative: the groups of modules that import each other round a loop."""
    index, low, stack, on_stack, groups, counter = {}, {}, [], set(), [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter[0]
                    counter[0] += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.append(member)
                        if member == node:
                            break
                    if len(group) > 1:
                        groups.append(sorted(group))
    return groups


def test_no_import_cycle_between_any_modules_at_any_scope():
    graph = grimp.build_graph("workers", cache_dir=None)
    edges = {m: {i for i in graph.find_modules_directly_imported_by(m) if i.startswith("workers")}
             for m in graph.modules if m.startswith("workers")}
    assert _strongly_connected(edges) == []


def test_the_cycle_finder_finds_a_cycle():
    """The check above is only worth something if it can fail."""
    assert _strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _uses(tree: ast.AST, attribute: str | None = None, name: str | None = None) -> bool:
    for node in ast.walk(tree):
        if attribute and isinstance(node, ast.Attribute) and node.attr == attribute:
            return True
        if name and isinstance(node, (ast.Name, ast.alias)) and getattr(node, "id", getattr(node, "name", "")) == name:
            return True
        if isinstance(node, ast.Constant) and node.value in ("ENGINE",) and attribute == "vendor":
            return True
    return False


@pytest.mark.parametrize("attribute, name, allowed", [
    ("vendor", None, {"workers.jobs.dialect"}),
    (None, "send_event", {"workers.live.broker"}),
])
def test_one_module_for_each_difference(attribute, name, allowed):
    using = {module for module, path in _modules().items()
             if _uses(ast.parse(path.read_text()), attribute=attribute, name=name)}
    assert using <= allowed, f"only {sorted(allowed)} may use {attribute or name}"
    assert using, f"{allowed} should still be the one place that uses {attribute or name}"


def test_modules_stay_readable():
    sizes = {m: len(p.read_text().splitlines()) for m, p in _modules().items()}
    assert {m: n for m, n in sizes.items() if n > MAX_LINES} == {}
    top = [p for p in WORKERS.glob("*.py")]
    assert len(top) <= MAX_TOP_LEVEL_MODULES, sorted(p.name for p in top)


def test_each_package_says_what_it_owns_and_may_import():
    for init in sorted(WORKERS.glob("*/__init__.py")):
        if init.parent.name in ("migrations", "management", "templates"):
            continue
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert len(doc.splitlines()) >= 2 and "import" in doc.lower(), f"{init}: docstring missing or says nothing of imports"
