"""The package's import graph, read with `ast` (imports inside functions included, since a lazy import
is still a dependency): no module imports from a layer above its own, and no modules import each other
in a circle. The layers, bottom to top, are in docs/architecture.md."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "verl_mtp"

# top-level part of a module name -> layer (a module may import from its own layer and those below)
LAYERS = {
    # cli: the dispatcher finds each command's module by name at run time (no import edge) and holds the
    # one-line argument parser every command uses, so it sits at the bottom
    "__init__": 0, "config": 0, "data": 0, "observability": 0, "batch": 0, "cli": 0, "net": 0, "device": 0,
    "algos": 1,
    "models": 2,
    "engines": 3, "rollout": 3, "rewards": 3,
    "workers": 4,
    "trainer": 5,
    # stand-alone commands beside the trainer's stages: they may use every layer
    "smoke": 6, "generate": 6,
}


def module_name(path: Path, root: Path) -> str:
    parts = ["verl_mtp", *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _target(name: str, modules: set[str]) -> str | None:
    """The package module an imported name lives in: the longest prefix that is one of ours."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in modules:
            return ".".join(parts[:end])
    return None


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the package modules it imports (a `from pkg import name` edge goes to pkg.name when that
    is a module, else to pkg)."""
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    modules = set(files)
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolved against this module's package
                    anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                names = [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for imported in names:
                target = _target(imported, modules)
                if target is not None and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    if top not in LAYERS:
        raise KeyError(f"{module}: classify '{top}' in LAYERS (tests/test_layering.py) and docs/architecture.md")
    return LAYERS[top]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} (layer {layer(m)}) imports {t} (layer {layer(t)})"
                  for m, targets in graph.items() for t in targets if layer(t) > layer(m))


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_from_a_layer_above_its_own():
    assert upward_imports(import_graph()) == []


def test_no_import_cycles():
    assert [sorted(c) for c in cycles(import_graph())] == []


def test_the_checks_see_lazy_relative_and_from_imports(tmp_path):
    """The graph reader on a made-up package: a function-level import upward and a circle through a
    relative `from . import` are both found."""
    pkg = tmp_path / "verl_mtp"
    for folder in ("algos", "trainer"):
        (pkg / folder).mkdir(parents=True)
        (pkg / folder / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "algos" / "a.py").write_text("def f():\n    from verl_mtp.trainer import run\n")
    (pkg / "trainer" / "run.py").write_text("from . import loop\n")
    (pkg / "trainer" / "loop.py").write_text("import verl_mtp.trainer.run as r\n")
    graph = import_graph(pkg)
    assert upward_imports(graph) == ["verl_mtp.algos.a (layer 1) imports verl_mtp.trainer.run (layer 5)"]
    assert cycles(graph) == [frozenset({"verl_mtp.trainer.run", "verl_mtp.trainer.loop"})]
