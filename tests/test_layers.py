"""crfm's packages form floors, one package per floor: an import into another package goes down, never up or
sideways, and never round in a cycle.

utils < data < models < segmentation < sampling < fewstep < training < toy; the documented `python -m crfm.<tool>`
modules at the package root sit above everything. With a floor each, two packages that import each other always
fail: one of the two imports goes up. Imports inside functions count too: a lazy import is still a
dependency, and the tiny <-> pretrain cycle this test was written for was one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers import REPO

PACKAGE = REPO / "crfm"
FLOORS = {
    "utils": 0,
    "data": 1,
    "models": 2,
    "segmentation": 3,
    "sampling": 4,
    "fewstep": 5,
    "training": 6,  # owns every objective; fewstep (pairs, straightness, evaluation) sits below it
    "toy": 7,
}
ROOT_FLOOR = 8  # crfm/<tool>.py: the documented command names
# Old module paths kept as aliases of their new home until README's architecture map (edited by others) names the
# new one; each points up a floor, so each is listed here by name, to be deleted with its alias.
PENDING_ALIASES: set[str] = set()  # old module names kept as aliases while docs still name them


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def floor(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return 0  # crfm/__init__.py: the version only
    if parts[1] in FLOORS:
        return FLOORS[parts[1]]
    return ROOT_FLOOR


def crfm_imports(path: Path, modules: set[str]) -> set[str]:
    """The crfm modules `path` imports anywhere in it (a `from crfm.x import name` of a submodule counts as it)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in modules and name != "crfm"}
    return found


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(path): path for path in PACKAGE.rglob("*.py") if "configs" not in path.parts}
    return {module: crfm_imports(path, set(paths)) - {module} for module, path in paths.items()}


def package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Imports into another package on the same floor or above (packages share no floor, so: above)."""
    return sorted(
        f"{module} (floor {floor(module)}) imports {target} (floor {floor(target)})"
        for module, targets in graph.items()
        for target in targets
        if package(target) != package(module) and floor(target) >= floor(module) and module not in PENDING_ALIASES
    )


def test_every_package_has_its_own_floor():
    assert len(set(FLOORS.values())) == len(FLOORS) and ROOT_FLOOR > max(FLOORS.values())
    packages = {path.parent.name for path in PACKAGE.glob("*/__init__.py")}
    assert packages == set(FLOORS), f"packages without a floor: {sorted(packages - set(FLOORS))}"


def test_no_import_goes_up_a_floor():
    upward = upward_imports(import_graph())
    assert not upward, "upward imports:\n" + "\n".join(upward)


@pytest.mark.parametrize("pair", [("fewstep", "training"), ("models", "segmentation"), ("utils", "data")])
def test_two_packages_importing_each_other_fail(pair):
    low, high = (f"crfm.{name}.module" for name in pair)
    assert upward_imports({low: {high}, high: {low}}) == [
        f"{low} (floor {floor(low)}) imports {high} (floor {floor(high)})"
    ]


def test_no_import_cycle():
    graph = import_graph()
    cycles: list[list[str]] = []
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append([*stack[stack.index(target) :], target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_the_ground_floor_imports_nothing_above_it():
    graph = import_graph()
    for module in ("crfm.utils.errors", "crfm.utils.constants"):
        assert graph[module] == set(), f"{module} imports {sorted(graph[module])}"
