"""The README's code runs as shown; its quick-start lines and API lists match the code and CI."""

import re
from pathlib import Path

import pytest

import tfp_resflow

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def code_blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


def bash_lines():
    return [line for block in code_blocks("bash") for line in block.splitlines() if line.strip()]


def test_ci_runs_exactly_the_readme_test_line():
    test_lines = [line for line in bash_lines() if "pytest" in line]
    assert len(test_lines) == 1, test_lines
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_lines[0] in ci_lines


def test_main_job_line_installs_and_runs_train_tf():
    main_lines = [line for line in bash_lines() if "pip install ." in line]
    assert len(main_lines) == 1, main_lines
    assert main_lines[0].endswith("&& python train_tf.py")
    assert (ROOT / "train_tf.py").exists()


def test_first_code_example_is_the_design_card_line():
    first = re.search(r"```\w*\n(.*?)```", README, flags=re.DOTALL).group(1)
    assert "tfd.TransformedDistribution(base, ResidualFlowBijector())" in first


@pytest.mark.slow
def test_readme_python_examples_run_as_shown(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the fit example writes flow.keras
    namespace = {}
    for block in code_blocks("python"):
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102
    assert namespace["log_p"].shape == (5,)
    assert namespace["samples"].shape == (3, 2)
    assert namespace["log_p_given_c"].shape == (5,)  # the conditional section
    assert namespace["left_samples"].shape == (3, 2)
    assert namespace["same_density"].shape == (5,)
    assert namespace["certified_samples"].shape == (4, 2)  # the certification section
    assert (tmp_path / "flow.keras").exists()


def test_readme_names_every_public_name():
    for name in tfp_resflow.__all__:
        assert name in README or name == "LogDetFn", name


def test_readme_has_the_measured_benchmark_table():
    assert "BENCHMARK_TABLE" not in README
    assert "| conv | neumann | 20 |" in README
