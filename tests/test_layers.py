"""The package's layers import one way: a lower layer never imports a higher one, and no two
modules import each other (directly or around a cycle), function-level imports included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Bottom to top. A module may import its own layer's and lower layers' packages.
LAYERS: list[set[str]] = [
    # foundations
    {"", "errors", "checks", "atomic", "versions", "paths", "config", "rng", "markdown"},
    {"io"},  # readers
    {"data"},  # sources, store, splits, augmentation
    {"train"},  # schedules, checkpoints, devices, logs
    {"models"},  # ViT, heads, classifier, segmenter, model folders
    {"evaluation", "explain"},  # metrics, intervals, plots, explanation maps
    {"pretrain"},  # GMML
    {"tasks"},  # finetune, segment, evaluate
    {"inference", "modelcard", "export"},  # predict and portable models
    {"study", "demo", "serve"},  # whole workflows and services
    {"cli", "__main__"},  # the command line
]
LAYER_OF = {package: i for i, packages in enumerate(LAYERS) for package in packages}


def _modules() -> dict[str, Path]:
    found = {}
    for path in (SRC / "spcxr").rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The spcxr modules that ``name`` imports anywhere in its file (functions included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        out |= {t for t in targets if t in known and t != name}
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_package_has_a_layer() -> None:
    assert {_package(m) for m in _graph()} <= set(LAYER_OF)


def _upward(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{a} -> {b}"
        for a, targets in graph.items()
        for b in targets
        if LAYER_OF[_package(b)] > LAYER_OF[_package(a)]
    )


def test_no_package_imports_a_higher_layer() -> None:
    assert _upward(_graph()) == []


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph``, each as its sorted list of modules."""
    # Tarjan's strongly connected components: any component of two or more modules is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_no_import_cycles() -> None:
    assert _cycles(_graph()) == []


def test_the_cycle_check_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


@pytest.mark.parametrize(
    "source",
    [
        "from spcxr.tasks.classify import finetune\n",
        "import spcxr.tasks.classify\n",
        "def f():\n    from spcxr.tasks.classify import finetune\n",
    ],
)
def test_the_rule_sees_every_form_of_import(source: str, tmp_path: Path) -> None:
    fake = tmp_path / "fake.py"
    fake.write_text(source)
    graph = {"spcxr.data.fake": _imports("spcxr.data.fake", fake, set(_modules()))}
    assert _upward(graph) == ["spcxr.data.fake -> spcxr.tasks.classify"]
