"""The package's shape: no import circles inside `cam_monitor`, and `types` a leaf.

The import graph is read from the source with `ast`, not from `sys.modules`: an import at the
top of a module and one inside a function both count (either can close a circle at run time),
an import under `if TYPE_CHECKING:` does not (it never runs).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cam_monitor"


def _module_names() -> dict[str, Path]:
    """Every module of the package by dotted name (`cam_monitor.history` for its `__init__`)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    """`TYPE_CHECKING` or `typing.TYPE_CHECKING`."""
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """The import statements that run: everywhere but under `if TYPE_CHECKING:`."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            if isinstance(node, ast.If) and _is_type_checking(node.test) and child in node.body:
                continue
            visit(child)

    visit(tree)
    return found


def _imported_names(module: str, path: Path, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The absolute dotted names an import statement may load (`from . import x`: `pkg.x` too)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        base = package[: len(package) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    return [source] + [f"{source}.{alias.name}" for alias in node.names]


def import_graph() -> dict[str, set[str]]:
    """Each `cam_monitor` module and the `cam_monitor` modules it imports."""
    modules = _module_names()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        targets = {
            target
            for node in _imports(tree)
            for target in _imported_names(name, path, node)
            if target in modules and target != name
        }
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as `[a, b, ..., a]`, or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle is not None:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start)
            if cycle is not None:
                return cycle
    return None


def test_the_graph_reader_sees_top_level_and_function_imports_but_not_type_checking() -> None:
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "from .a import x\n"
        "if TYPE_CHECKING:\n    from .b import y\n"
        "def f():\n    from .c import z\n"
        "if True:\n    import cam_monitor.d\n"
    )
    names = [
        name for node in _imports(tree) for name in _imported_names("cam_monitor.m", PACKAGE, node)
    ]
    assert "cam_monitor.a" in names and "cam_monitor.c" in names and "cam_monitor.d" in names
    assert not any(name.startswith("cam_monitor.b") for name in names)
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_graph_holds_the_package_as_it_is() -> None:
    graph = import_graph()
    assert "cam_monitor.types" in graph and "cam_monitor.history.store" in graph
    assert "cam_monitor.layers" in graph["cam_monitor.engine"]
    assert "cam_monitor.schema" in graph["cam_monitor.history.format"]  # `from ..schema`


def test_no_import_circle_inside_the_package() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, f"import circle: {' -> '.join(cycle or [])}"


def test_types_is_a_leaf_that_imports_only_torch_and_typing() -> None:
    assert import_graph()["cam_monitor.types"] == set()
    path = PACKAGE / "types.py"
    roots = {
        name.split(".")[0]
        for node in _imports(ast.parse(path.read_text(encoding="utf-8")))
        for name in _imported_names("cam_monitor.types", path, node)[:1]
    }
    assert roots <= {"__future__", "collections", "torch", "typing"}, roots


def test_moved_and_renamed_names_stay_importable_where_users_import_them() -> None:
    import cam_monitor
    from cam_monitor import channels, schema, types
    from cam_monitor.engine import ForwardFn, OutputTransform, Target
    from cam_monitor.layers import LayerSpec, Reshape

    assert cam_monitor.INPUT_KEY == cam_monitor.INPUT_LAYER == schema.INPUT_LAYER == "input"
    assert cam_monitor.filter_activations is channels.filter_activations
    assert cam_monitor.visualize_filter is channels.visualize_filter
    assert (LayerSpec, Reshape) == (types.LayerSpec, types.Reshape)
    assert (ForwardFn, OutputTransform, Target) == (
        types.ForwardFn,
        types.OutputTransform,
        types.Target,
    )


LIGHTNING_ROOTS = {"lightning", "pytorch_lightning", "lightning_utilities"}
# The only modules that may know Lightning exists: the package that holds the callback, the
# sinks (keys become logger calls), and the old import path of CamMonitor.
KNOWS_LIGHTNING = ("cam_monitor.lightning", "cam_monitor.sinks", "cam_monitor.callback")


def _reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module `start` imports, directly or through others, but through the package's
    `__init__` (which imports CamMonitor lazily, inside a function, on first use)."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            if nxt != "cam_monitor":
                todo.append(nxt)
    return seen


def test_only_the_lightning_package_and_the_sinks_import_lightning() -> None:
    direct = set()
    for name, path in _module_names().items():
        nodes = _imports(ast.parse(path.read_text(encoding="utf-8")))
        roots = {n.split(".")[0] for node in nodes for n in _imported_names(name, path, node)[:1]}
        if roots & LIGHTNING_ROOTS:
            direct.add(name)
    assert direct and all(name.startswith(KNOWS_LIGHTNING) for name in direct), sorted(direct)
    # and nothing else reaches them: the engine, the maths and the history run without Lightning
    graph = import_graph()
    for name in graph:
        if name != "cam_monitor" and not name.startswith(KNOWS_LIGHTNING):
            reached = {m for m in _reaches(graph, name) if m.startswith(KNOWS_LIGHTNING)}
            assert not reached, f"{name} imports {sorted(reached)}"
