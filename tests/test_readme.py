"""The README's two commands match CI and the design card (its code runs in `test_docs`)."""

import re
from pathlib import Path

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


def test_readme_is_short():
    # Guides, results and the API live in docs/; the README is the entry point.
    assert len(README.splitlines()) <= 150
