"""The benchmark scripts keep running: `benchmarks/run_all.py --quick` end to end.

One subprocess runs every script in its tiny configuration (small models, few steps), hybrid.py
and both budgets of conditional.py included, two scripts at a time, into a temporary directory:
about 3 minutes on 2 idle CPU cores. It starts with this module's first test (`quick_run_process`,
if a selected test needs it), so that it runs beside the fast tests, and the tests of its outputs
share it (`quick_run`): each script must exit cleanly and write its JSON with non-empty rows of
finite numbers (and the estimator plot, compare_flows' time-budget curves and pictures,
conditional.py's picture), and what each wrote is checked below. Fast tests check compare_flows'
model registry and its time budget (`WallClockBudget`) on a tiny Keras model.
"""

import functools
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from module_runs import tests_of_this_module

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from run_all import OUTPUTS, QUICK_SCRIPTS  # noqa: E402


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
def compare_flows():
    import compare_flows

    return compare_flows


@pytest.mark.parametrize(("seconds", "count"), [(3.0, 2), (180.0, 10), (360.0, 12)])
def test_checkpoints_are_geometric_up_to_the_budget(compare_flows, seconds, count):
    times = compare_flows.checkpoint_seconds(seconds, count)
    assert len(times) == count
    assert times[-1] == pytest.approx(seconds)
    assert times[0] == pytest.approx(seconds / 32)
    ratios = [b / a for a, b in zip(times, times[1:], strict=False)]
    assert ratios == pytest.approx([ratios[0]] * len(ratios))


@pytest.mark.parametrize(
    ("dataset", "names", "expected"),
    [
        ("digits", ["resflow", "maf", "glow"], ["resflow-lipswish", "glow"]),
        ("checkerboard", ["glow", "realnvp", "resflow-elu"], ["resflow-elu", "realnvp"]),
    ],
)
def test_models_for_resolves_aliases_and_skips_other_data(compare_flows, dataset, names, expected):
    assert compare_flows.models_for(dataset, names) == expected


def built(compare_flows, dataset, name, small=False):
    """A registered model, built: (model, its number of trainable parameters)."""
    model = compare_flows.build_model(dataset, name, seed=0, small=small)
    model.build((None, *model.event_shape))
    return model, sum(math.prod(w.shape) for w in model.trainable_weights)


@pytest.fixture(scope="module")
def reference_size(compare_flows):
    """The reference model's parameter count on a data set (full or quick size), built once."""
    return functools.cache(
        lambda dataset, small=False: built(compare_flows, dataset, "resflow", small)[1]
    )


@pytest.mark.parametrize("dataset", ["8gaussians", "digits"])
@pytest.mark.parametrize("name", ["resflow-clipswish", "resflow-elu", "idensenet"])
def test_residual_variants_keep_the_reference_size(compare_flows, reference_size, dataset, name):
    """Each variant changes its activation (and network), and is sized like the reference."""
    model, size = built(compare_flows, dataset, name)
    reference = reference_size(dataset)
    config = model.bijector.config
    assert config.activation == {"resflow-elu": "elu"}.get(name, "clipswish")
    assert config.network == ("dense" if name == "idensenet" else "resnet")
    assert abs(size / reference - 1) <= compare_flows.PARAMETER_TOLERANCE / 2


@pytest.mark.parametrize(
    ("dataset", "name"), [("8gaussians", "realnvp"), ("8gaussians", "maf"), ("digits", "glow")]
)
@pytest.mark.parametrize("small", [False, True], ids=["full", "quick"])
def test_baselines_keep_the_reference_size(compare_flows, reference_size, dataset, name, small):
    """The equal-steps baselines are sized like the residual flow, at the full size (what the
    README compares) and at the quick run's (`small`, whose summary checks it too)."""
    ratio = built(compare_flows, dataset, name, small)[1] / reference_size(dataset, small)
    assert abs(ratio - 1) <= compare_flows.PARAMETER_TOLERANCE


def test_tail_loss_is_the_mean_of_the_last_steps(compare_flows):
    timer = compare_flows.StepTimer()
    losses = [5.0, 4.0, 3.0, 2.0, 1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    running = [sum(losses[: k + 1]) / (k + 1) for k in range(len(losses))]
    timer.running_losses = running
    assert timer.tail_loss(0.2) == pytest.approx((0.25 + 0.25) / 2)
    assert timer.tail_loss(0.5) == pytest.approx(sum(losses[5:]) / 5)
    assert timer.tail_loss(1.0) == pytest.approx(sum(losses) / len(losses))


def test_time_budget_counts_the_clock_it_is_given(compare_flows):
    import itertools

    import keras
    import numpy as np
    import tensorflow as tf

    ticks = itertools.count()
    clock = compare_flows.WallClockBudget(5.0, clock=lambda: float(next(ticks)))
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    x = np.zeros((8, 2), "float32")
    data = tf.data.Dataset.from_tensors((x, x[:, :1])).repeat()
    clock.start_clock()  # tick 0; each step reads one tick: the 5th step reaches 5
    model.fit(data, epochs=1, steps_per_epoch=100, verbose=0, callbacks=[clock])
    assert clock.steps == 5
    assert clock.train_seconds == 5.0
    assert set(compare_flows.CLOCKS) == {"wall", "cpu"}


def test_wall_clock_budget_stops_fit_and_pauses_for_checkpoints(compare_flows):
    import keras
    import numpy as np
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    data = tf.data.Dataset.from_tensors((x, x[:, :1])).repeat()
    pause = 0.3

    def evaluate():
        time.sleep(pause)  # an evaluation; the budget must not count it
        return 1.5

    budget = 1.5
    clock = compare_flows.WallClockBudget(budget, [0.0, 0.5, 1.0, budget, 2 * budget], evaluate)
    start = time.perf_counter()
    clock.start_clock()
    model.fit(data, epochs=1, steps_per_epoch=10**7, verbose=0, callbacks=[clock], shuffle=False)
    wall = time.perf_counter() - start
    assert clock.steps < 10**7  # fit stopped on the budget, not on the step cap
    assert clock.train_seconds >= budget
    assert 1 <= len(clock.curve) <= 3  # checkpoints before the budget only
    assert clock.paused_seconds >= pause * len(clock.curve)
    assert wall >= clock.train_seconds + clock.paused_seconds
    checkpoints = [p["checkpoint"] for p in clock.curve]
    assert checkpoints == sorted(set(checkpoints))
    assert all(p["seconds"] >= p["checkpoint"] for p in clock.curve)
    assert all(p["test_loss"] == 1.5 for p in clock.curve)


def test_tune_learning_rates_picks_the_lowest_late_loss(compare_flows, monkeypatch):
    """Each model gets the rate whose run ends lowest; a non-finite run never wins."""
    late = {("a", 1e-3): 2.0, ("a", 1e-2): 1.0, ("b", 1e-3): 1.5, ("b", 1e-2): float("nan")}
    monkeypatch.setattr(compare_flows, "build_model", lambda dataset, name, seed, small: name)

    def fake_train(model, dataset, budget, seed, *, timer):
        assert seed == compare_flows.TUNING_SEED
        assert budget.sample_repeats == 0
        timer.running_losses = [late[(model, budget.learning_rate)]] * 10
        return {"test_loss": 0.0, "steps": 10}

    monkeypatch.setattr(compare_flows, "train_and_evaluate", fake_train)
    budget = compare_flows.Budget(steps=10, batch_size=4)
    chosen, rows = compare_flows.tune_learning_rates(
        "8gaussians", ["a", "b"], budget, (1e-3, 1e-2), max_extensions=0
    )
    assert chosen == {"a": 1e-2, "b": 1e-3}
    assert len(rows) == 4
    assert {r["model"] for r in rows} == {"a", "b"}


def test_parameter_cell_shows_a_ratio_only_against_a_reference(compare_flows):
    entry = {"parameters": 35_348, "free_parameters": 35_348}
    assert compare_flows._parameter_cell(entry) == "35,348"
    assert compare_flows._parameter_cell({**entry, "parameters_vs_resflow": 0.984}) == (
        "35,348 (0.984x)"
    )


def test_a_calibrated_clock_charges_the_idle_speed_per_step(compare_flows):
    budget = compare_flows.WallClockBudget(1.0)
    clock = compare_flows.calibrated_clock(budget, 0.5, 0.1)
    assert clock() == 0.0
    budget.steps = 1
    assert clock() == 0.5  # the first step, tracing included
    budget.steps = 6
    assert clock() == pytest.approx(1.0)


def test_several_calibrations_give_each_model_its_median_time(compare_flows, tmp_path):
    paths = []
    for k, (flow_step, other_step) in enumerate([(0.037, 0.01), (0.021, 0.02), (0.025, 0.03)]):
        timing = {
            "toy": {
                "flow": {"first_step_seconds": 5.0 + k, "step_seconds": flow_step, "steps": 60},
                "other": {"first_step_seconds": 1.0, "step_seconds": other_step, "steps": 60},
            }
        }
        if k == 1:
            del timing["toy"]["other"]  # missing from one file: left out, not guessed
        paths.append(tmp_path / f"calibration_{k}.json")
        paths[-1].write_text(json.dumps({"calibration": timing}))
    merged = compare_flows.read_calibration(paths)
    assert merged == {"toy": {"flow": {"first_step_seconds": 6.0, "step_seconds": 0.025}}}
    assert compare_flows.read_calibration(paths[:1])["toy"]["other"]["step_seconds"] == 0.01


def test_tuning_grows_the_grid_past_an_end_where_the_best_rate_lies(compare_flows, monkeypatch):
    tried = []

    def fake_run(model, dataset, budget, seed, timer):  # the loss is lowest at 1e-4
        tried.append(budget.learning_rate)
        timer.running_losses = [abs(math.log10(budget.learning_rate) + 4.0)]
        return {"test_loss": 0.0, "steps": 1}

    monkeypatch.setattr(compare_flows, "build_model", lambda *args, **kwargs: None)
    monkeypatch.setattr(compare_flows, "train_and_evaluate", fake_run)
    budget = compare_flows.Budget(steps=10, batch_size=8)
    chosen, rows = compare_flows.tune_learning_rates("8gaussians", ["m"], budget, [1e-2, 1e-3])
    assert tried == pytest.approx([1e-2, 1e-3, 1e-4, 1e-5])  # extended twice, stopped inside
    assert chosen["m"] == pytest.approx(1e-4)
    assert len(rows) == 4


# ------------------------------------------------------------------------------------------------
# benchmarks/conditional.py (issue 19): its quick run (equal steps and equal time) is part of
# run_all's quick run (its results are checked at the end of this module); here the classifier
# two-sample test, the conditional baselines and the learning-rate tuning.


@pytest.fixture(scope="module")
def conditional():
    import conditional

    return conditional


def test_c2st_tells_apart_only_different_samples(conditional):
    from tfp_resflow.data import conditional_data

    _, x_o = conditional.observations(1)
    posterior = conditional_data.grid_posterior(x_o[0], resolution=400)
    reference = posterior.sample(400, seed=0)
    same = conditional.c2st(posterior.sample(400, seed=1), reference, steps=300, seed=0)
    prior = conditional_data.two_moons_prior(400, seed=0)
    different = conditional.c2st(prior, reference, steps=300, seed=0)
    assert abs(same - 0.5) < 0.07
    assert different > 0.9
    broken = prior.copy()
    broken[:100] = np.nan  # non-finite samples count as recognised
    assert conditional.c2st(broken, reference, steps=300, seed=0) >= different - 0.05


@pytest.mark.parametrize("name", ["maf", "realnvp"])
def test_conditional_baselines_use_the_context_and_keep_the_size(conditional, name):
    model = conditional.VECTOR_MODELS[name]()
    model.build(model.input_shape_for_build())
    x = np.random.default_rng(0).normal(size=(5, 2)).astype(np.float32)
    c = np.random.default_rng(1).normal(size=(5, 2)).astype(np.float32)
    # Non-zero output layers, so the context changes the density.
    for network in model.networks:
        for weight in network.trainable_weights:
            weight.assign(np.random.default_rng(2).normal(0, 0.3, weight.shape))
    log_p = model.log_prob(x, context=c).numpy()
    assert np.all(np.isfinite(log_p))
    assert np.max(np.abs(log_p - model.log_prob(x, context=c[::-1]).numpy())) > 1e-3
    # One context for all examples is broadcast.
    np.testing.assert_allclose(
        model.log_prob(x, context=c[0]).numpy(),
        model.log_prob(x, context=np.repeat(c[:1], 5, axis=0)).numpy(),
        rtol=1e-5,
    )
    reference = conditional.VECTOR_MODELS["resflow"]()
    reference.build(reference.input_shape_for_build())
    count = compare_flows_parameters(model)
    assert abs(count / compare_flows_parameters(reference) - 1) <= 0.10


def compare_flows_parameters(model):
    return sum(math.prod(w.shape) for w in model.trainable_weights)


def test_conditional_made_is_autoregressive_in_x_for_every_context():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import tensorflow as tf
    from conditional_baselines import ConditionalMADE

    made = ConditionalMADE(3, (16, 16))
    made.build((None, 3), (None, 2))
    for weight in made.trainable_weights:
        weight.assign(np.random.default_rng(0).normal(0, 0.5, weight.shape))
    x = tf.constant(np.random.default_rng(1).normal(size=(4, 3)), tf.float32)
    for c in np.random.default_rng(2).normal(size=(3, 4, 2)).astype(np.float32):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(x)
            shift, log_scale = made(x, c)
        for out in (shift, log_scale):
            jacobian = tape.batch_jacobian(out, x).numpy()  # [batch, out, in]
            # Output i depends on x_<i only: zero on and above the diagonal.
            assert np.all(np.triu(np.abs(jacobian).sum(0)) == 0)
            assert np.abs(np.tril(jacobian.sum(0), -1)).sum() > 0


def test_conditional_tuning_gives_every_model_the_same_rule(conditional, monkeypatch):
    """compare_flows' rule: the rate whose run ends lowest; a non-finite run never wins; a
    winner at an end of the grid is checked against one more value past it."""
    late = {("a", 1e-3): 2.0, ("a", 1e-2): 1.0, ("b", 1e-3): 1.5, ("b", 1e-2): float("nan")}
    late.update({("a", 1e-1): 3.0, ("b", 1e-4): 2.5})  # the grown grid: worse past each end

    def fake_train(task, name, seed, budget, sizes, *, timer):
        assert seed == conditional.TUNING_SEED
        timer.running_losses = [late[(name, round(budget.learning_rate, 12))]] * 10
        return {"test_loss": 0.0}

    monkeypatch.setattr(conditional, "train_and_score", fake_train)
    budget = conditional.Budget(steps=10, batch_size=4)
    chosen, rows = conditional.tune_learning_rates(
        "rotated", ["a", "b"], budget, (1e-3, 1e-2), conditional.QUICK_SIZES
    )
    assert chosen == pytest.approx({"a": 1e-2, "b": 1e-3})
    assert {(r["model"], round(r["learning_rate"], 12)) for r in rows} == set(late)


def test_conditional_tuning_grows_the_grid_like_compare_flows(conditional, monkeypatch):
    tried = []

    def fake_run(task, name, seed, budget, sizes, *, timer, reference_posteriors=None):
        tried.append(budget.learning_rate)  # the loss is lowest at 1e-4
        timer.running_losses = [abs(math.log10(budget.learning_rate) + 4.0)]
        return {"test_loss": 0.0}

    monkeypatch.setattr(conditional, "train_and_score", fake_run)
    budget = conditional.Budget(steps=10, batch_size=8)
    chosen, rows = conditional.tune_learning_rates(
        "rotated", ["m"], budget, (1e-2, 1e-3), conditional.QUICK_SIZES
    )
    assert tried == pytest.approx([1e-2, 1e-3, 1e-4, 1e-5])
    assert chosen["m"] == pytest.approx(1e-4)
    assert len(rows) == 4


def test_certification_measures_every_layer_of_a_model():
    """benchmarks/certification.py (issue 20) on a small image flow, without training:
    power estimate <= exact norm <= certified bound for every layer, and every block's
    certified bound at least the product of its layers' exact norms."""
    import certification
    import keras

    from tfp_resflow.bijectors import multiscale
    from tfp_resflow.configs.flow_configs import ImageFlowConfig
    from tfp_resflow.models.model import FlowModel

    keras.utils.set_random_seed(0)
    config = ImageFlowConfig(blocks_per_scale=(2,), hidden_channels=8, fc_end_blocks=1)
    model = FlowModel(multiscale.image_flow((4, 4, 1), config), (4, 4, 1))
    model.build(model.input_shape_for_build())
    results = certification.measure(model, 1e-6)
    assert len(results["blocks"]) == 3
    assert len(results["layers"]) == 9
    for layer in results["layers"]:
        assert layer["power"] <= layer["exact"] * (1 + 1e-5)
        assert layer["exact"] <= layer["certified"] <= layer["exact"] * 1.002
    for block in results["blocks"]:
        assert block["exact_layer_product"] <= block["certified_lipschitz"] < 1.0


def test_compare_flows_merge_combines_time_runs_unchanged(compare_flows, tmp_path):
    """`compare_flows.py --merge` (one process per model, on separate cores) summarises the
    union of the runs as one process would: each model's summary equals its source's. (Its
    command line in this process: `main` is what `python compare_flows.py` runs.)"""
    results = ROOT / "benchmarks" / "results"
    sources = [
        results / f"compare_flows_long_{name}.json" for name in ("checkerboard", "8gaussians")
    ]
    output = tmp_path / "merged.json"
    merge = ["--merge", *map(str, sources), "--output", str(output)]
    compare_flows.main(merge)  # exits (SystemExit) on an error
    merged = json.loads(output.read_text())
    expected = {
        (s["dataset"], s["model"]): s
        for path in sources
        for s in json.loads(path.read_text())["time_summary"]
    }
    got = {(s["dataset"], s["model"]): s for s in merged["time_summary"]}
    assert got.keys() == expected.keys()
    for key, summary in got.items():
        for field in ("test_loss", "steps"):
            for statistic in ("mean", "std", "min", "max"):
                assert summary[field][statistic] == pytest.approx(
                    expected[key][field][statistic], rel=1e-9
                ), (key, field, statistic)
    assert sorted(merged["plots"]) == ["8gaussians", "checkerboard"]
    assert all((tmp_path / name).exists() for name in merged["plots"].values())
    repeated = ["--merge", str(sources[0]), str(sources[0]), "--output", str(output)]
    with pytest.raises(SystemExit) as exit_info:  # `python compare_flows.py` exits 1 with it
        compare_flows.main(repeated)
    assert exit_info.value.code not in (0, None)
    assert "without repeats" in str(exit_info.value.code)


# ------------------------------------------------------------------------------------------------
# The quick run's outputs. These tests come last: the quick run trains while the tests above run,
# and the tests after the wait for it only read its files. (The machine pages out what a process
# has not touched for a minute: an in-process test that follows the wait would first read
# TensorFlow's libraries back from disk, 20-40 s.)


QUICK_RUN_TIMEOUT = 900  # seconds


def python_path():
    """PYTHONPATH with this checkout first."""
    return os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)


class QuickRun:
    """`run_all.py --quick` into a temporary directory, in its own process group."""

    def __init__(self, out):
        self.out = out
        self.log = out.parent / f"{out.name}.log"
        self.process = None
        self.deadline = None

    def start(self):
        if self.process is not None:
            return
        self.deadline = time.monotonic() + QUICK_RUN_TIMEOUT
        with open(self.log, "w") as output:  # the child keeps its own handle
            self.process = subprocess.Popen(
                [sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--quick"]
                + ["--output-dir", str(self.out)],
                cwd=ROOT,
                stdout=output,
                stderr=subprocess.STDOUT,
                # This checkout's package, also where another one is installed (the scripts
                # inherit it).
                env={**os.environ, "PYTHONPATH": python_path(), "TF_CPP_MIN_LOG_LEVEL": "3"},
                start_new_session=True,  # its own process group: `stop` ends the scripts too
            )

    def result(self):
        """(output directory, `subprocess.CompletedProcess` with the output in `stdout`)."""
        self.start()
        try:
            self.process.wait(timeout=max(1.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.stop()
            raise
        output = self.log.read_text()
        return self.out, subprocess.CompletedProcess(
            self.process.args, self.process.returncode, output, ""
        )

    def stop(self):
        """Ends the run if it is still going, the scripts it runs included."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@pytest.fixture(scope="module", autouse=True)
def quick_run_process(request, tmp_path_factory):
    """The quick run, started with this module's first test if a selected test checks its
    outputs: it runs beside the fast tests, and `quick_run` waits for it."""
    run = QuickRun(tmp_path_factory.mktemp("benchmarks"))
    if any("quick_run" in item.fixturenames for item in tests_of_this_module(request)):
        run.start()
    yield run
    run.stop()  # if the session stopped early


@pytest.fixture(scope="module")
def quick_run(quick_run_process):
    """One `run_all.py --quick` for every test of its outputs: (output directory, result)."""
    return quick_run_process.result()


@pytest.mark.slow
def test_run_all_quick_succeeds(quick_run):
    out, result = quick_run
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    summary = json.loads((out / "run_all.json").read_text())
    assert summary["mode"] == "quick"
    assert sorted(r["script"] for r in summary["rows"]) == sorted(QUICK_SCRIPTS)
    assert all(r["returncode"] == 0 for r in summary["rows"])


@pytest.mark.slow
@pytest.mark.parametrize("script", QUICK_SCRIPTS)
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
def test_a_distribution_log_prob_loop_trains_like_fit(quick_run):
    """train_step.py's `digits-td-loop` (a TFP user's tape over `dist.log_prob`) takes the same
    steps as `FlowModel.train_on_batch`: the same seeded model and data give the same losses."""
    out, _ = quick_run
    rows = json.loads((out / OUTPUTS["train_step"]).read_text())["rows"]
    losses = {r["configuration"]: r["losses"] for r in rows}
    assert losses["digits-td-loop"] == pytest.approx(losses["digits"], abs=2e-3)


@pytest.mark.slow
def test_quick_results_are_complete(quick_run):
    out, _ = quick_run
    compare = json.loads((out / "compare_flows.json").read_text())
    assert {(r["dataset"], r["model"]) for r in compare["rows"]} == {
        ("8gaussians", "resflow-lipswish"),
        ("8gaussians", "realnvp"),
        ("8gaussians", "maf"),
        ("digits", "resflow-lipswish"),
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
        "lipswish",
        "elu",
        "gram",
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
def test_quick_time_budget_results(quick_run):
    out, _ = quick_run
    compare = json.loads((out / "compare_flows.json").read_text())
    rows = compare["time_rows"]
    assert {(r["dataset"], r["model"]) for r in rows} == {
        ("8gaussians", "resflow-lipswish"),
        ("8gaussians", "realnvp"),
        ("digits", "resflow-lipswish"),
        ("digits", "glow"),
    }
    for row in rows:
        assert all(math.isfinite(v) for v in numbers(row)), row
        assert row["budget_seconds"] == compare["settings"]["toy_time_budget"]["seconds"] == 3.0
        assert row["train_seconds"] >= row["budget_seconds"]  # stopped by the budget
        assert row["steps"] >= 1
        curve = row["curve"]
        assert curve, row
        assert {"checkpoint", "seconds", "steps", "test_loss"} <= set(curve[-1])
        # The last point is the budget's: the model fit returned, scored after training.
        assert curve[-1]["checkpoint"] == row["budget_seconds"]
        assert curve[-1]["test_loss"] == row["test_loss"]
        assert curve[-1]["steps"] == row["steps"]
        assert [p["seconds"] for p in curve] == sorted(p["seconds"] for p in curve)
    summary = compare["time_summary"]
    assert {(s["dataset"], s["model"]) for s in summary} == {
        (r["dataset"], r["model"]) for r in rows
    }
    for entry in summary:
        assert entry["curve"], entry
        assert {"seconds", "test_loss_mean", "test_loss_min", "test_loss_max"} <= set(
            entry["curve"][0]
        )
        assert entry["steps"]["mean"] >= 1
    assert set(compare["plots"]) == {"8gaussians", "digits"}
    for name in compare["plots"].values():
        assert (out / name).stat().st_size > 10_000


@pytest.mark.slow
def test_hybrid_benchmark_quick(quick_run):
    # benchmarks/hybrid.py (issue 14's table) is not in run_all's full run; its quick mode (1
    # seed, 2 steps, small flows; every flow at 1/D, the first flow at every lambda) is part of
    # run_all's quick run, which keeps it running.
    out, _ = quick_run
    rows = json.loads((out / OUTPUTS["hybrid"]).read_text())["rows"]
    import hybrid

    assert {"resflow", "coupling"} <= set(hybrid.FLOWS)
    first = next(iter(hybrid.FLOWS))
    assert {(r["flow"], r["nll_weight"]) for r in rows} == {
        (flow, "1/D") for flow in hybrid.FLOWS
    } | {(first, weight) for weight in ("0", "1/D", "1")}
    for row in rows:
        assert all(math.isfinite(v) for v in numbers(row)), row
        assert 0.0 <= row["test_accuracy"] <= 1.0


@pytest.mark.slow
def test_conditional_quick_time_budget(quick_run):
    out, _ = quick_run
    results = json.loads((out / OUTPUTS["conditional"]).read_text())
    assert results["command"].startswith("python benchmarks/conditional.py --quick")
    rows = results["time_rows"]
    assert {(r["task"], r["model"]) for r in rows} == {
        *(
            (task, model)
            for task in ("rotated", "two_moons")
            for model in ("resflow", "maf", "realnvp")
        ),
        ("digits", "resflow"),
        ("digits", "resflow-unconditional"),
    }
    for row in rows:
        values = list(numbers(row))
        assert all(math.isfinite(v) for v in values), row
        assert row["train_seconds"] >= row["budget_seconds"]
        if row["task"] == "two_moons":
            assert all(0.0 <= a <= 1.0 for a in row["c2st"])
    # The baselines are sized like the residual flow.
    assert all(s.get("parameters_within_tolerance", True) for s in results["time_summary"])
    assert (out / results["picture"]).stat().st_size > 10_000
    # The true densities' held-out NLL (the floors) are below every model's.
    for row in rows:
        if row["reference_loss"] is not None:
            assert row["test_loss"] > row["reference_loss"]
