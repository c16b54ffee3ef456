"""The README's two quick-start lines and its API tables stay true to the code and to CI."""

import re
from pathlib import Path

import tfp_resflow
from tfp_resflow import logdet

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def code_lines():
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.DOTALL)
    return [line for block in blocks for line in block.splitlines() if line.strip()]


def test_ci_runs_exactly_the_readme_test_line():
    test_lines = [line for line in code_lines() if "pytest" in line]
    assert len(test_lines) == 1, test_lines
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_lines[0] in ci_lines


def test_main_job_line_installs_and_runs_the_demo():
    main_lines = [line for line in code_lines() if "pip install ." in line]
    assert len(main_lines) == 1, main_lines
    assert main_lines[0].endswith("python -m tfp_resflow")
    assert (ROOT / "tfp_resflow" / "__main__.py").exists()


def test_readme_names_every_public_estimator():
    for name in logdet.__all__:
        if name.endswith("_log_det"):
            assert f"`{name}" in README, name
    for name in tfp_resflow.__all__:
        assert name in README or name == "LogDetFn", name


def test_readme_has_the_measured_benchmark_table():
    assert "BENCHMARK_TABLE" not in README
    assert "| conv | neumann | 20 |" in README
