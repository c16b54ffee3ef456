"""The package's import graph: layered subpackages, no upward imports, no cycles.

Every `tfp_resflow` import counts, at module level or inside a function, type-checking imports
included: a cycle or an upward import that only lazy imports hide is still in the design.
"""

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import tfp_resflow

PACKAGE = Path(tfp_resflow.__file__).resolve().parent

# The layers of the design, bottom up (docs/design.md argues them): a subpackage imports only
# from itself and from subpackages of a lower rank; subpackages of one rank are independent.
RANKS = {
    "core": 0,
    "estimators": 1,
    "layers": 1,
    "solvers": 1,
    "data": 1,
    "configs": 2,
    "bijectors": 3,
    "models": 4,
    "training": 5,
}


def module_name(path: Path) -> str:
    """`tfp_resflow.layers.lipschitz` for .../tfp_resflow/layers/lipschitz.py (and packages)."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imported_modules(path: Path, modules=MODULES) -> set[str]:
    """The `tfp_resflow` modules a module imports (`from tfp_resflow.x import y` counts x.y when
    y is a module, x otherwise)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] != "tfp_resflow":
                continue
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                names.add(child if child in modules else node.module)
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.split(".")[0] == "tfp_resflow"}
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import; the package spells imports in full")
    return names - {module_name(path)}


def import_graph() -> dict[str, set[str]]:
    return {name: imported_modules(path) for name, path in MODULES.items()}


def subpackage(module: str) -> str | None:
    """The subpackage of a module (`layers` for `tfp_resflow.layers.lipschitz`), or None at the
    top (the package's `__init__` and `__main__`)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in RANKS) else None


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph as a list of nodes, or None (depth-first search)."""
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


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    """Imports from a subpackage of the same or a higher rank ("a -> b" lines)."""
    found = []
    for module, imports in sorted(graph.items()):
        here = subpackage(module)
        if here is None:
            continue
        for other in sorted(imports):
            there = subpackage(other)
            if there is None or (there != here and RANKS[there] >= RANKS[here]):
                found.append(f"{module} -> {other}")
    return found


def test_the_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


@pytest.mark.parametrize(
    ("importer", "imported", "violates"),
    [
        ("tfp_resflow.models.model", "tfp_resflow.bijectors.flow", False),  # downward
        ("tfp_resflow.bijectors.flow", "tfp_resflow.bijectors.composite", False),  # within
        ("tfp_resflow.bijectors.flow", "tfp_resflow.models.model", True),  # upward
        ("tfp_resflow.layers.network", "tfp_resflow.estimators.logdet", True),  # same rank
        ("tfp_resflow.core.context", "tfp_resflow", True),  # the top imports everything
        ("tfp_resflow.core.context", "tfp_resflow.layers", True),  # a subpackage's __init__
    ],
)
def test_the_layering_check_finds_upward_and_sideways_imports(importer, imported, violates):
    assert bool(layering_violations({importer: {imported}})) == violates


def test_every_module_lives_in_a_ranked_subpackage():
    top = {"tfp_resflow", "tfp_resflow.__main__"}
    assert {m for m in MODULES if subpackage(m) is None} == top
    assert {subpackage(m) for m in MODULES} - {None} == set(RANKS)


def test_every_import_names_an_existing_module():
    unknown = {f"{m} -> {i}" for m, imports in import_graph().items() for i in imports}
    assert {line for line in unknown if line.split(" -> ")[1] not in MODULES} == set()


def test_no_import_cycles_between_modules():
    assert find_cycle(import_graph()) is None


def test_no_upward_or_sideways_imports_between_subpackages():
    assert layering_violations(import_graph()) == []


def test_no_import_cycles_between_subpackages():
    graph: dict[str, set[str]] = {}
    for module, imports in import_graph().items():
        if (here := subpackage(module)) is not None:
            there = {subpackage(i) for i in imports} - {here, None}
            graph.setdefault(here, set()).update(there)
    assert find_cycle(graph) is None


def test_importing_the_package_leaves_tensorflow_datasets_out():
    # tfds costs seconds to import and is needed only for its data sets.
    code = "import sys, tfp_resflow; print('tensorflow_datasets' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


def project_sources() -> dict[str, str]:
    """Python outside the package: tests, benchmarks, scripts, docs' examples, notebooks."""
    root = PACKAGE.parent
    files = [
        *root.glob("*.py"),
        *(root / "tests").rglob("*.py"),
        *(root / "benchmarks").rglob("*.py"),
    ]
    sources = {str(p.relative_to(root)): p.read_text() for p in files}
    for page in [root / "README.md", *(root / "docs").rglob("*.md")]:
        blocks = re.findall(r"^```python\n(.*?)^```", page.read_text(), re.M | re.S)
        sources[str(page.relative_to(root))] = "\n".join(blocks)
    for notebook in (root / "notebooks").glob("*.ipynb"):
        cells = json.loads(notebook.read_text())["cells"]
        lines = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        magics = ("%", "!")
        code = [line for line in lines.splitlines() if not line.lstrip().startswith(magics)]
        sources[str(notebook.relative_to(root))] = "\n".join(code)
    return sources


def package_names(package: str) -> set[str]:
    """What `from <package> import x` may name: its submodules and what its __init__ binds."""
    names = {m.rpartition(".")[2] for m in MODULES if m.rpartition(".")[0] == package}
    for node in ast.parse(MODULES[package].read_text()).body:
        if isinstance(node, ast.ImportFrom | ast.Import):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.FunctionDef | ast.ClassDef) and node.name != "__getattr__":
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return names


def stale_imports(source: str) -> set[str]:
    """`tfp_resflow` imports of paths that are not current modules or names (old 0.1.0 ones)."""
    stale = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            stale |= {a.name for a in node.names if a.name.startswith("tfp_resflow")} - set(MODULES)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tfp_resflow"):
            if node.module not in MODULES:
                stale.add(node.module)
            elif MODULES[node.module].name == "__init__.py":
                allowed = package_names(node.module)
                stale |= {f"{node.module}.{a.name}" for a in node.names if a.name not in allowed}
    return stale


def test_the_stale_import_check_finds_old_paths():
    assert stale_imports("from tfp_resflow.config import BlockConfig") == {"tfp_resflow.config"}
    assert stale_imports("import tfp_resflow.logdet") == {"tfp_resflow.logdet"}
    assert stale_imports("from tfp_resflow import logdet") == {"tfp_resflow.logdet"}
    assert stale_imports("from tfp_resflow.data import toy_samples") == {
        "tfp_resflow.data.toy_samples"
    }
    current = "from tfp_resflow import FlowModel\nfrom tfp_resflow.estimators import logdet"
    assert stale_imports(current) == set()


def test_the_project_imports_modules_by_their_current_paths():
    # The 0.1.0 paths still import (`core.moved_modules`), so a leftover would pass silently;
    # the test of that module is the one place that imports them on purpose.
    found = {
        f"{name}: {path}"
        for name, source in project_sources().items()
        if name != "tests/core/test_moved_modules.py"
        for path in stale_imports(source)
    }
    assert found == set()
