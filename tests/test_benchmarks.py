"""The benchmark scripts keep running: `benchmarks/run_all.py --quick` end to end.

One subprocess runs every script in its tiny configuration (about 2-3 minutes on 2 CPU cores,
two scripts at a time) into a temporary directory; each must exit cleanly and write its JSON
with non-empty rows of finite numbers (and the estimator plot).
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from run_all import OUTPUTS, SCRIPTS  # noqa: E402


def numbers(value):
    """Every int or float inside a JSON value (booleans are not numbers here)."""
    if isinstance(value, bool):
        return
    if isinstance(value, int | float):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from numbers(item)
    elif isinstance(value, list):
        for item in value:
            yield from numbers(item)


def test_numbers_walks_nested_values():
    assert list(numbers({"a": [1, 2.5, {"b": True, "c": "x", "d": None}], "e": 3})) == [1, 2.5, 3]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("benchmarks")
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--quick", "--output-dir", out],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return out, result


@pytest.mark.slow
def test_run_all_quick_succeeds(quick_run):
    out, result = quick_run
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    summary = json.loads((out / "run_all.json").read_text())
    assert summary["mode"] == "quick"
    assert sorted(r["script"] for r in summary["rows"]) == sorted(SCRIPTS)
    assert all(r["returncode"] == 0 for r in summary["rows"])


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_wrote_finite_rows(quick_run, script):
    out, _ = quick_run
    path = out / OUTPUTS[script]
    assert path.exists(), f"{script} wrote no {path.name}"
    results = json.loads(path.read_text())
    assert results["command"].startswith(f"python benchmarks/{script}.py")
    rows = results["rows"]
    assert rows, f"{path.name} has no rows"
    for row in rows:
        assert row, f"{path.name} has an empty row"
        values = list(numbers(row))
        assert values, f"{path.name}: a row without numbers: {row}"
        assert all(math.isfinite(v) for v in values), f"{path.name}: non-finite value in {row}"


@pytest.mark.slow
def test_quick_results_are_complete(quick_run):
    out, _ = quick_run
    compare = json.loads((out / "compare_flows.json").read_text())
    assert {(r["dataset"], r["model"]) for r in compare["rows"]} == {
        ("8gaussians", "resflow"),
        ("8gaussians", "realnvp"),
        ("8gaussians", "maf"),
        ("digits", "resflow"),
        ("digits", "glow"),
    }
    assert all(s["parameters_within_tolerance"] for s in compare["summary"])
    assert all(r["samples_finite"] for r in compare["rows"])
    ablations = json.loads((out / "ablations.json").read_text())
    assert {r["variant"] for r in ablations["rows"] if r["kind"] == "toy"} == {
        "default",
        "truncated",
        "backprop",
        "gaussian probes",
        "elu",
    }
    estimators = json.loads((out / "estimators.json").read_text())
    assert (out / estimators["plot"]).stat().st_size > 10_000
    truncated = [r for r in estimators["rows"] if r["estimator"] == "truncated"]
    assert truncated
    assert all(r["finite"] for r in estimators["rows"])
    budget = json.loads((out / "lipschitz_budget.json").read_text())
    assert {(r["kind"], r["activation"], r["initialiser"]) for r in budget["rows"]} == {
        ("toy", "clipswish", "peak")
    }
    for row in budget["rows"]:
        for block in row["init"] + row["trained"]:
            # The gain decomposition is exact (a telescoping product per example) ...
            parts = (block["bound"], block["norm_use"], block["direction"])
            assert math.prod(parts) * block["activation_gain"] == pytest.approx(
                block["realised_rms_gain"], rel=1e-4
            )
            # ... the tangents reproduce the exact Jacobian, and no layer exceeds its bound.
            assert block["jacobian_check"] < 1e-5
            linear = [layer for layer in block["layers"] if layer["type"] == "linear"]
            assert all(layer["norm_over_bound"] < 1.01 for layer in linear)
        # The `peak` initialiser starts blocks far from the identity (glorot: ~0.005).
        assert all(block["jacobian_norm_median"] > 0.1 for block in row["init"])


@pytest.mark.slow
def test_hybrid_benchmark_quick(tmp_path):
    # benchmarks/hybrid.py (issue 14's table) is not in run_all's 20-minute budget; its quick
    # mode (1 seed, 2 steps) keeps it running.
    output = tmp_path / "hybrid.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "hybrid.py"), "--quick", "--output", output],
        cwd=ROOT / "benchmarks",
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    rows = json.loads(output.read_text())["rows"]
    assert {(r["flow"], r["nll_weight"]) for r in rows} == {
        (flow, weight) for flow in ("resflow", "coupling") for weight in ("0", "1/D", "1")
    }
    for row in rows:
        assert all(math.isfinite(v) for v in numbers(row)), row
        assert 0.0 <= row["test_accuracy"] <= 1.0
