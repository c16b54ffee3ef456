"""The documentation site builds strictly, covers the public API, and its code runs as shown.

`mkdocs build --strict` fails on broken links and anchors, pages missing from the navigation,
unresolved API references and docstring warnings (see `mkdocs.yml`).
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import tfp_resflow

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def nav_pages(nav: list) -> list[str]:
    """The Markdown pages of the navigation, in reading order."""
    pages = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        if isinstance(value, list):
            pages += nav_pages(value)
        elif value.endswith(".md"):
            pages.append(value)
    return pages


def mkdocs_config() -> dict:
    # mkdocs.yml has no custom tags; the safe loader reads it.
    return yaml.safe_load((ROOT / "mkdocs.yml").read_text())


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    site_dir = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return site_dir


def test_the_site_builds_strictly(site):
    assert (site / "index.html").exists()
    assert (site / "api" / "models" / "index.html").exists()
    assert (site / "notebooks" / "01_quickstart_2d" / "index.html").exists()


def test_the_api_reference_names_every_public_name(site):
    api = "".join(p.read_text() for p in (site / "api").rglob("*.html"))
    missing = [name for name in tfp_resflow.__all__ if name not in api]
    assert not missing


def test_every_page_is_in_the_navigation():
    listed = set(nav_pages(mkdocs_config()["nav"]))
    on_disk = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert on_disk == listed


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


@pytest.mark.slow
def test_readme_and_docs_python_examples_run_as_shown(tmp_path, monkeypatch):
    # Every Python block of the README and of the docs pages, in reading order, in one
    # namespace (a page may continue an example of an earlier one); a block repeated verbatim
    # (the home page shows the README's two examples) runs once.
    monkeypatch.chdir(tmp_path)  # the fit example writes flow.keras
    sources = [ROOT / "README.md"] + [DOCS / page for page in nav_pages(mkdocs_config()["nav"])]
    namespace: dict = {}
    seen: set[str] = set()
    for source in sources:
        for block in python_blocks(source.read_text()):
            if block in seen:
                continue
            seen.add(block)
            exec(compile(block, str(source.relative_to(ROOT)), "exec"), namespace)  # noqa: S102
    assert namespace["log_p"].shape == (5,)
    assert namespace["samples"].shape == (3, 2)
    assert namespace["log_p_given_c"].shape == (5,)  # the conditional guide
    assert namespace["left_samples"].shape == (3, 2)
    assert namespace["same_density"].shape == (5,)
    assert namespace["certified_samples"].shape == (4, 2)  # the certification guide
    assert (tmp_path / "flow.keras").exists()


def test_results_pages_hold_the_measured_tables():
    speed = (DOCS / "results" / "speed-and-memory.md").read_text()
    assert "| conv | neumann | 20 |" in speed
    assert "| `mnist` preset | 64 |" in speed
