"""bench's modules in layers that import only downwards, and no import cycle: read from the source (every `import`
and `from ... import` of a bench module, at the top of a module or inside a function), nothing imported."""

import ast
import functools

import pytest

from conftest import REPO

# Bottom up. A module may import its own layer's modules and those of the layers below, never one above.
LAYERS = [
    ("foundation: errors, results files, the run folder, configs as values",
     ["bench", "bench.errors", "bench.results", "bench.runfolder", "bench.configs"]),
    ("what strategies, checks and ranks share: topology, optimizer", ["bench.parallel"]),
    ("models", ["bench.models"]),
    ("data and measurement conventions", ["bench.data", "bench.measure"]),
    ("strategies and launchers", ["bench.strategies", "bench.launch"]),
    ("the config checked and resolved into a run", ["bench.checks", "bench.run"]),
    ("inside a rank", ["bench.rank"]),
    ("the planner", ["bench.plan"]),
    ("the commands", ["bench.app", "bench.overrides", "bench.controller", "bench.verify", "bench.summary", "bench.comm",
                      "bench.__main__", "bench.report"]),
    ("the search, which runs the other commands", ["bench.search"]),
]


def module_name(path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in (REPO / "bench").rglob("*.py")}


def imports_of(name: str) -> set[str]:
    """The bench modules `name` imports, anywhere in it."""
    found = set()
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package up
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
            found |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names}
    return {m for m in found if m in MODULES and m != name}


def layer(name: str) -> int:
    """The layer of the longest prefix of `name` the table names."""
    matches = [(len(prefix), i) for i, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
               if name == prefix or name.startswith(prefix + ".")]
    assert matches, f"{name} is in no layer: add it to LAYERS"
    return max(matches)[1]


@functools.cache
def graph() -> dict[str, set[str]]:
    return {name: imports_of(name) for name in MODULES}


def test_every_module_is_in_a_layer():
    for name in MODULES:
        layer(name)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_a_module_imports_nothing_above_its_layer(name):
    up = {target: LAYERS[layer(target)][0] for target in graph()[name] if layer(target) > layer(name)}
    assert not up, f"{name} ({LAYERS[layer(name)][0]}) imports from above: {up}"


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle a depth-first search meets (one per back edge)."""
    found, state, path = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                found.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target)
        path.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_no_import_cycle():
    assert cycles(graph()) == []


def test_the_checks_see_an_upward_import_and_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert layer("bench.plan.memory") > layer("bench.rank.train") > layer("bench.errors")
