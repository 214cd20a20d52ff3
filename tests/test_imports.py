"""The import graph of tumorseg and search: no cycles, and tumorseg never imports search.

Every ``import``/``from`` statement counts, also those inside functions (a lazy import hides a
cycle from Python, not from a reader). Built with ``ast``, nothing is imported.
"""

import ast
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tumorseg", "search")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """``{module: {modules of PACKAGES it imports}}``."""
    files = {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}
    graph = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in files:  # "tumorseg.data.Split" -> "tumorseg.data"
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]], modules: set[str]) -> list[list[str]]:
    """One cycle (as a path a -> ... -> a) per strongly connected group among ``modules``."""
    found, done = [], set()
    for start in sorted(modules):
        stack, path = [(start, iter(sorted(graph[start] & modules)))], [start]
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop(), path.pop()
                done.add(node)
            elif child in path:
                cycle = path[path.index(child):] + [child]
                if not any(set(cycle) <= set(c) for c in found):
                    found.append(cycle)
            elif child not in done:
                stack.append((child, iter(sorted(graph[child] & modules))))
                path.append(child)
    return found


def in_package(graph, package):
    return {m for m in graph if m.split(".")[0] == package}


def test_the_graph_sees_imports():  # the checks below would pass on an empty graph
    graph = import_graph()
    assert "tumorseg.shipped" in graph["tumorseg.predict"] and "tumorseg.engine" in graph["tumorseg.train"]
    assert "tumorseg.engine" in graph["search.trainable"]  # a lazy import inside a function
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, {"a", "b", "c", "d"}) == [["a", "b", "c", "a"]]


def test_tumorseg_has_no_import_cycle_and_never_imports_search():
    graph = import_graph()
    tumorseg = in_package(graph, "tumorseg")
    assert cycles(graph, tumorseg) == []
    assert {m: sorted(graph[m] & in_package(graph, "search")) for m in tumorseg if graph[m] & in_package(graph, "search")} == {}


def test_search_has_no_import_cycle():
    graph = import_graph()
    assert cycles(graph, set(graph)) == []
