"""The package's import graph: no cycles between modules, no heavy optional imports on import.

Every `tfp_resflow` import counts, at module level or inside a function, type-checking imports
included: a cycle that only lazy imports hide is still a design cycle.
"""

import ast
import subprocess
import sys
from pathlib import Path

import tfp_resflow

PACKAGE = Path(tfp_resflow.__file__).resolve().parent
MODULES = {p.stem for p in PACKAGE.glob("*.py")}


def imported_modules(path: Path) -> set[str]:
    """The `tfp_resflow` modules a module imports (`from tfp_resflow import x` counts x)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "tfp_resflow":
                names |= {a.name for a in node.names if a.name in MODULES}
            elif node.module.startswith("tfp_resflow."):
                names.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("tfp_resflow."):
                    names.add(alias.name.split(".")[1])
    return names - {path.stem}


def import_graph() -> dict[str, set[str]]:
    return {p.stem: imported_modules(p) for p in PACKAGE.glob("*.py") if p.stem != "__init__"}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph as a list of modules, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles_between_modules():
    assert find_cycle(import_graph()) is None


def test_importing_the_package_leaves_tensorflow_datasets_out():
    # tfds costs seconds to import and is needed only for its data sets.
    code = "import sys, tfp_resflow; print('tensorflow_datasets' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"
