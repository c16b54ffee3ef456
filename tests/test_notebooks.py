"""The notebooks: committed without outputs, and executed top to bottom with small settings.

`TFP_RESFLOW_QUICK=1` (read by each notebook's parameters cell) shrinks every run, so the four
together take about a minute on 2 CPU cores (two kernels at a time); unset, they train for real.
"""

import asyncio
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
KERNELS_AT_ONCE = 2  # one per core: each kernel's work is mostly one Python thread


def test_the_four_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == [
        "01_quickstart_2d.ipynb",
        "02_images.ipynb",
        "03_estimators.ipynb",
        "04_conditional.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name}: a cell has outputs; strip them"
            assert cell.execution_count is None, f"{path.name}: a cell has an execution count"


async def _execute(path: Path, slots: asyncio.Semaphore) -> nbformat.NotebookNode:
    """The notebook at `path` executed top to bottom in a fresh kernel (once a slot is free)."""
    async with slots:
        notebook = nbformat.read(path, as_version=4)
        # From the repository root, as a reader who opens the notebook from a clone would.
        client = NotebookClient(
            notebook,
            timeout=900,
            kernel_name="python3",
            resources={"metadata": {"path": str(ROOT)}},
        )
        await client.async_execute()
        return notebook


async def _execute_all(paths: list[Path]) -> list:
    slots = asyncio.Semaphore(KERNELS_AT_ONCE)
    runs = [_execute(path, slots) for path in paths]
    # A notebook that fails gives its exception, raised by its own test.
    return await asyncio.gather(*runs, return_exceptions=True)


@pytest.fixture(scope="module")
def executed_notebooks():
    """Every notebook executed with small settings, `KERNELS_AT_ONCE` kernels at a time (each
    notebook in its own fresh kernel, as before): {path: executed notebook, or its error}."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TFP_RESFLOW_QUICK", "1")  # the kernels inherit the environment
        env.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
        # The longest first (02 trains the digits preset), so that the two slots end together.
        order = sorted(NOTEBOOKS, key=lambda p: p.name != "02_images.ipynb")
        results = asyncio.run(_execute_all(order))
    return dict(zip(order, results, strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, executed_notebooks):
    notebook = executed_notebooks[path]
    if isinstance(notebook, BaseException):
        raise notebook  # the cell's error, as executing it here would raise it
    errors = [
        output
        for cell in notebook.cells
        for output in cell.get("outputs", [])
        if output.get("output_type") == "error"
    ]
    assert not errors
    images = [
        output
        for cell in notebook.cells
        for output in cell.get("outputs", [])
        if "image/png" in output.get("data", {})
    ]
    assert images, f"{path.name} drew no pictures"
