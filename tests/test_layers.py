"""The package's modules import downwards only: no cycle, and no module imports one from a layer above it."""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

import ckptbench

PACKAGE = Path(ckptbench.__file__).resolve().parent
LAYERS: tuple[frozenset[str], ...] = tuple(
    frozenset(layer.split())
    for layer in (
        # what everything uses: errors, number formatting, timing, bitwise comparison, URLs, disk profiles, trees,
        # a training state's live objects
        "errors formatting environment measure bitwise shards location delayproxy profiles pytree stateful",
        # the disk, its probes, limits and throttle, the manifest, S3 (DCP over it too), starting ranks and
        # round workers
        "disk probes limits manifest objectstore dcpstore local launch worker throttle s3server",
        # the strategies, the model and a training state, where checkpoints live, reading one back
        "strategies strategies.* model training storage checkpoint",
        # the study's definitions, a run's settings, the rows
        "study config results",
        # reading rows: bounds, intervals (within a run and between runs), judgements, choices, figures and tables
        # of one kind
        "floor rounds betweenrun verdict choices levers plot cloud scaling yourdisk",
        # measuring: the harness and the runs built on it
        "cycle benchmark ranked sweep targets multihost",
        # showing: reports, comparisons of runs, the notebook's helpers, the docs, the command line
        "report compare notebook docs cli __main__ __init__",
    )
)


def _name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


MODULES = {_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _package(module: str) -> list[str]:
    """The package a module's relative imports start from."""
    return module.split(".")[:-1]


def _resolve(parts: list[str]) -> str | None:
    name = ".".join(parts)
    if name in MODULES:
        return name
    return f"{name}.__init__" if f"{name}.__init__" in MODULES else None


def _runtime(tree: ast.Module) -> ast.Module:
    """The module without its ``if TYPE_CHECKING:`` blocks: imports for annotations only never run."""
    tree.body = [
        node
        for node in tree.body
        if not (isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
    ]
    return tree


def imports(module: str) -> set[str]:
    """The package's modules ``module`` imports when it runs, anywhere in its source (functions included)."""
    found = set()
    for node in ast.walk(_runtime(ast.parse(MODULES[module].read_text()))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package(module)
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
            elif node.module and node.module.split(".")[0] == "ckptbench":
                base = []
                node.module = node.module.removeprefix("ckptbench").lstrip(".") or None
            else:
                continue
            start = base + (node.module.split(".") if node.module else [])
            for alias in node.names:
                target = _resolve([*start, alias.name]) or _resolve(start)
                if target is not None:
                    found.add(target)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "ckptbench":
                    target = _resolve(alias.name.split(".")[1:] or ["__init__"])
                    if target is not None:
                        found.add(target)
    return found - {module}


GRAPH = {module: imports(module) for module in MODULES}


def layer(module: str) -> int:
    name = module.removesuffix(".__init__") if module != "__init__" else module
    for index, members in enumerate(LAYERS):
        if name in members or (name.startswith("strategies.") and "strategies.*" in members):
            return index
    raise AssertionError(f"ckptbench/{MODULES[module].relative_to(PACKAGE)} has no layer: add it to LAYERS here")


def test_the_import_graph_is_read_from_the_sources():
    assert {"config", "results", "storage", "strategies.__init__"} <= GRAPH["benchmark"]
    assert "strategies.base" in GRAPH["strategies.zarr"]
    assert "strategies.sharded" in GRAPH["strategies.__init__"]
    assert "errors" in GRAPH["strategies.base"]
    assert "strategies.orbax_io" in GRAPH["strategies.orbax"]  # an import inside a function counts too


def test_no_module_imports_one_that_imports_it_back():
    try:
        tuple(TopologicalSorter(GRAPH).static_order())
    except CycleError as err:
        pytest.fail(f"import cycle: {' -> '.join(err.args[1])}")


def test_a_cycle_is_found():
    with pytest.raises(CycleError):
        tuple(TopologicalSorter({**GRAPH, "errors": {"benchmark"}}).static_order())


def test_no_module_imports_a_layer_above_its_own():
    upward = [
        f"{module} (layer {layer(module)}) imports {target} (layer {layer(target)})"
        for module, targets in GRAPH.items()
        for target in targets
        if layer(target) > layer(module)
    ]
    assert upward == []
