"""The project's import graph, lazy imports (inside functions, ``if TYPE_CHECKING``) included:
dependencies point one way, app -> serving -> conversion -> model_loader, and no module of these
packages takes part in an import loop."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"app": 3, "module_app": 3, "serving": 2, "conversion": 1, "model_loader": 0}


def modules() -> dict[str, Path]:
    found = {name: ROOT / f"{name}.py" for name in ("app", "module_app")}
    for package in ("serving", "conversion", "model_loader"):
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports() -> dict[str, set[str]]:
    """Each module -> the project modules it imports anywhere in its source."""
    known = modules()

    def project_module(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = {}
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                candidates = [f"{base}.{alias.name}" for alias in node.names] + [base]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            targets.update(filter(None, map(project_module, candidates)))
        # A package's __init__ re-exporting its modules is not a module importing its own package.
        edges[name] = {t for t in targets if t != name and not name.startswith(t + ".")}
    return edges


def test_dependencies_point_one_way_app_serving_conversion_model_loader():
    upward = sorted(f"{a} -> {b}" for a, targets in imports().items() for b in targets
                    if LAYERS[b.split(".")[0]] > LAYERS[a.split(".")[0]])
    assert upward == []


def test_no_module_takes_part_in_an_import_loop():
    edges = imports()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    loops: list[str] = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(edges[name]):
            if state.get(target) == 1:
                loops.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, [*path, target])
        state[name] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])
    assert loops == []


def test_the_graph_sees_lazy_imports():
    edges = imports()
    assert "conversion.convert" in edges["conversion.sources.base"]  # imported inside Source.convert
    assert "model_loader.reader" in edges["model_loader.background"]  # imported for a GPU only
