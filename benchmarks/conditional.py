"""Conditional Residual Flows p(x | c) against conditional MAF and RealNVP, at equal steps or time.

Three tasks (`tfp_resflow.data.conditional_data`, `tfp_resflow.data.datasets`):

    rotated     8gaussians rotated by a ~ U[0, 2 pi) per example, context c = (cos a, sin a):
                held-out conditional NLL in nats (exact for every model: 2-D events). The same
                10,000 held-out pairs for every model and seed; the true density's NLL on them
                (`conditional_data.rotated_toy_log_prob`) is the floor: a model's excess over
                it estimates E_c KL(p(. | c) || q(. | c)).
    two_moons   posterior estimation q(theta | x) from 10,000 simulations (theta from the prior)
                of the two-moons simulator of the SBI benchmark (Lueckmann et al. 2021):
                - the mean negative log posterior density of the true theta on 2,000 held-out
                  simulations (nats; floor: the exact posterior's, from the exact likelihood and
                  the exact Monte Carlo evidence, `two_moons_log_evidence`);
                - C2ST, a classifier two-sample test between 1,000 flow samples from q(. | x_o)
                  and 1,000 samples of the grid posterior (`grid_posterior`, 1000^2 cells) for
                  3 fixed observations: a Keras MLP (2 x 128 ReLU, inputs z-scored by the
                  reference samples' statistics, full-batch Adam) trained on half of each set,
                  accuracy on the other half, both halves in turn (2-fold). 0.5:
                  indistinguishable, 1.0: disjoint (calibration: see `c2st`). The SBI
                  benchmark's main metric; it sees the crescents' shape, which the averaged
                  log density hides.
    digits      class-conditional 8x8 digits (17 levels, dequantised): test bits/dim given the
                one-hot label (`train_config.with_context`) against the same flow unconditional;
                and the bits/dim of the conditional model's label marginal (1/10) sum_y
                q(x | y), a model of p(x) comparable with the unconditional one (the label's
                information is worth at most log2(10) / 64 = 0.052 bits/dim).

Models (`MODELS`): on the 2-D tasks the conditional residual flow (`presets.TOY`: CLipSwish
g 2-45-45-2, 8 blocks; `context_size=2`, each block's context network 64 wide), conditional
MAF and conditional RealNVP (`conditional_baselines`: 8 layers of TFP bijectors with Keras 3
networks of (x, c), hidden widths chosen so the parameter counts are within 10% of the residual
flow's; checked and printed); on digits the `digits` preset image flow with `context_size=10`
("resflow") and without ("resflow-unconditional").

How: `compare_flows`' recipe and machinery (imported): `train_config.make_optimizer` (Adam,
warm-up, clipping, EMA 0.99; EMA weights scored, norm estimates converged, evaluation mode),
the same batch size per task, three seeds, `--budget steps|seconds|both` (equal steps, or equal
training time per model and seed counted by `--clock wall|cpu` from the start of `fit`, tracing
included; or `calibrated`: the steps that fit in the budget at each model's speed measured by
`--calibrate` on an idle machine, so the result does not depend on the load while training).
One learning rate for every model (2e-3), or `--learning-rates` with a grid: every model is
tuned on the same grid by the same rule (`compare_flows.tune_learning_rates`' rule: lowest late
training loss at the equal-steps budget, seed 100, test data unused, the grid grown past a
winning end).

    python benchmarks/conditional.py                      # equal steps, 3 seeds
    python benchmarks/conditional.py --budget both --clock cpu
    python benchmarks/conditional.py --calibrate              # on an idle machine, then:
    python benchmarks/conditional.py --budget both --clock calibrated \
        --calibration benchmarks/results/conditional_calibration.json
    python benchmarks/conditional.py --quick --output /tmp/conditional.json   # seconds
    python benchmarks/conditional.py --tasks two_moons --models resflow maf --seeds 1

Prints markdown tables and writes `benchmarks/results/conditional.json` (or `--output`) and the
picture `conditional_two_moons.png` next to it: samples of every model (seed 0) given the first
observation next to the grid posterior.
"""

import argparse
import dataclasses
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from compare_flows import (  # noqa: E402
    CALIBRATION_STEPS,
    CLOCKS,
    LEARNING_RATE_GRID,
    MAX_GRID_EXTENSIONS,
    PARAMETER_TOLERANCE,
    TUNING_SEED,
    TUNING_TAIL,
    Budget,
    NetworkOwningFlowModel,
    StepTimer,
    WallClockBudget,
    best_on_growing_grid,
    calibrated_clock,
    format_spread,
    load_average,
    parameter_counts,
    read_calibration,
    score,
    spread,
    time_steps,
)
from conditional_baselines import conditional_maf, conditional_realnvp  # noqa: E402
from measure import save_figure, write_results  # noqa: E402

from tfp_resflow.bijectors import multiscale  # noqa: E402
from tfp_resflow.bijectors.flow import ResidualFlowBijector  # noqa: E402
from tfp_resflow.configs import presets
from tfp_resflow.configs.config_fields import with_fields  # noqa: E402
from tfp_resflow.data import conditional_data, datasets
from tfp_resflow.models import bits
from tfp_resflow.models.model import FlowModel  # noqa: E402
from tfp_resflow.training import train_config

tf.get_logger().setLevel("ERROR")
RESULTS = Path(__file__).resolve().parent / "results" / "conditional.json"
PICTURE = "conditional_two_moons.png"
CALIBRATION = "conditional_calibration.json"  # `--calibrate`'s default output
TASKS = ("rotated", "two_moons", "digits")
REFERENCE_MODEL = "resflow"
ROTATED_TOY = "8gaussians"
# Hidden widths of the baselines' networks: parameter counts within 10% of the residual flow's
# 85,452 (`presets.TOY`'s 8 blocks with a 64-wide context network and context shifts): MAF
# 88,036 (85,636 free), RealNVP 85,620.
BASELINE_HIDDEN_UNITS = (100, 100)
MAX_STEPS = 10**7  # a time budget's step cap: never reached
EVALUATION_BATCH = 2000


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The sizes of one run: data, held-out sets, C2ST; `--quick` shrinks them."""

    train_points: int = 50_000  # rotated: training pairs
    simulations: int = 10_000  # two_moons: training simulations
    test_points: int = 10_000  # rotated
    test_simulations: int = 2_000  # two_moons
    observations: int = 3  # two_moons: fixed observations for C2ST
    c2st_samples: int = 1_000  # per set (flow and reference), per observation
    c2st_steps: int = 1000  # the classifier's full-batch Adam steps
    grid_resolution: int = 1000
    evidence_draws: int = 4096
    small_models: bool = False  # `QUICK_LAYERS` and `QUICK_DIGITS_FIELDS` (models' plumbing)


QUICK_SIZES = Sizes(
    train_points=2_000,
    simulations=2_000,
    test_points=1_000,
    test_simulations=500,
    observations=1,
    c2st_samples=200,
    c2st_steps=100,
    grid_resolution=400,
    evidence_draws=1024,
    small_models=True,
)
# Equal-steps budgets (steps, batch size) and equal-time budgets (seconds) per task.
STEPS = {"rotated": (400, 256), "two_moons": (1000, 256), "digits": (115, 64)}
QUICK_STEPS = {"rotated": 5, "two_moons": 5, "digits": 2}
SECONDS = {"rotated": 30.0, "two_moons": 60.0, "digits": 60.0}
QUICK_SECONDS = 1.0
# --quick builds every model small: it checks that each one trains and is scored, not how well.
# The 2-D flows get 1 block or layer instead of 8 (each one's parameter count scales with its
# layers, so the baselines stay within 10% of the residual flow), the digits flows one block
# per scale and no fully connected one instead of 4, 4 and 2.
QUICK_LAYERS = 1
QUICK_DIGITS_FIELDS = {"blocks_per_scale": (1, 1), "fc_end_blocks": 0}


def quick_both(names: list[str]) -> list[str]:
    """The models of a task at equal steps in `--quick --budget both`: the reference only (every
    model trains at equal time; a budget changes how long a model trains, not what it is, so
    every model and both budgets still run)."""
    return [name for name in names if name == REFERENCE_MODEL] or names[:1]


# ------------------------------------------------------------------------------------------------
# Models.

ModelBuilder = Callable[..., FlowModel]  # (small=False) -> an unbuilt model
DIGITS_LOSS = {"loss_unit": "bits_per_dim", "num_levels": datasets.DIGITS_NUM_LEVELS}


def vector_resflow(context_size: int, *, small: bool = False) -> FlowModel:
    """The conditional residual flow for 2-D events: `presets.TOY` (8 blocks of CLipSwish g
    2-45-45-2) with a context network per block (`small`: `QUICK_LAYERS` blocks)."""
    config = with_fields(presets.TOY, context_size=context_size)
    if small:
        config = with_fields(config, num_blocks=QUICK_LAYERS)
    return FlowModel(ResidualFlowBijector(config), event_shape=[2], context_shape=[context_size])


def vector_baseline(flow: Callable, context_size: int, *, small: bool = False) -> FlowModel:
    """A conditional TFP flow (`conditional_baselines`) that owns its networks (`small`:
    `QUICK_LAYERS` layers)."""
    layers = {"num_layers": QUICK_LAYERS} if small else {}
    bijector, networks = flow(2, context_size, hidden_units=BASELINE_HIDDEN_UNITS, **layers)
    return NetworkOwningFlowModel(bijector, [2], networks=networks, context_shape=[context_size])


def digits_resflow(*, conditional: bool, small: bool = False) -> FlowModel:
    """The `digits` preset image flow, class-conditional (one-hot, 10) or not (`small`: with
    `QUICK_DIGITS_FIELDS`)."""
    classes = datasets.DIGITS_NUM_CLASSES
    config = presets.get_preset("digits")
    if small:
        config = with_fields(config, **QUICK_DIGITS_FIELDS)
    if conditional:
        config = with_fields(config, context_size=classes)
    flow = multiscale.image_flow(datasets.DIGITS_SHAPE, config)
    context_shape = [classes] if conditional else None
    return FlowModel(flow, datasets.DIGITS_SHAPE, context_shape=context_shape, **DIGITS_LOSS)


VECTOR_MODELS: dict[str, ModelBuilder] = {
    "resflow": lambda small=False: vector_resflow(2, small=small),
    "maf": lambda small=False: vector_baseline(conditional_maf, 2, small=small),
    "realnvp": lambda small=False: vector_baseline(conditional_realnvp, 2, small=small),
}
MODELS: dict[str, dict[str, ModelBuilder]] = {
    "rotated": VECTOR_MODELS,
    "two_moons": VECTOR_MODELS,
    "digits": {
        "resflow": lambda small=False: digits_resflow(conditional=True, small=small),
        "resflow-unconditional": lambda small=False: digits_resflow(conditional=False, small=small),
    },
}
MODEL_NAMES = tuple(dict.fromkeys(name for models in MODELS.values() for name in models))


# ------------------------------------------------------------------------------------------------
# Data.


def pairs(x: np.ndarray, c: np.ndarray, batch_size: int, *, seed: int | None) -> tf.data.Dataset:
    """`(x, c)` batches: an endless reshuffled stream (`seed`), or one pass (seed None)."""
    ds = tf.data.Dataset.from_tensor_slices((x, c))
    if seed is None:
        return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
    ds = ds.repeat().shuffle(min(len(x), 50_000), seed=seed)
    return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


@dataclasses.dataclass
class TaskData:
    """A task's data for one seed: the training stream, the held-out set, the first batch."""

    train: tf.data.Dataset
    test: tf.data.Dataset
    first_batch: tuple
    reference_nll: float | None = None  # the true density's held-out NLL (nats)


def rotated_data(sizes: Sizes, batch_size: int, seed: int) -> TaskData:
    x, c = conditional_data.rotated_toy_samples(ROTATED_TOY, sizes.train_points, seed=[0, seed])
    # The held-out pairs do not depend on the seed: every model and seed scores the same ones.
    x_test, c_test = conditional_data.rotated_toy_samples(ROTATED_TOY, sizes.test_points, seed=1)
    reference = -conditional_data.rotated_toy_log_prob(ROTATED_TOY, x_test, c_test).mean()
    return TaskData(
        pairs(x, c, batch_size, seed=seed),
        pairs(x_test, c_test, EVALUATION_BATCH, seed=None),
        (x[:batch_size], c[:batch_size]),
        float(reference),
    )


def two_moons_simulations(num: int, seed: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """`(theta, x)`: `num` draws of theta from the prior and one simulation each."""
    theta = conditional_data.two_moons_prior(num, seed=[*seed, 0])
    return theta, conditional_data.two_moons_simulate(theta, seed=[*seed, 1])


def two_moons_data(sizes: Sizes, batch_size: int, seed: int) -> TaskData:
    theta, x = two_moons_simulations(sizes.simulations, [0, seed])
    theta_test, x_test = two_moons_simulations(sizes.test_simulations, [1])
    log_posterior = (
        conditional_data.two_moons_log_likelihood(x_test, theta_test)
        - conditional_data.two_moons_log_evidence(x_test, num_draws=sizes.evidence_draws)
        - np.log(4.0)  # the prior density
    )
    return TaskData(
        pairs(theta, x, batch_size, seed=seed),  # events theta, contexts x
        pairs(theta_test, x_test, EVALUATION_BATCH, seed=None),
        (theta[:batch_size], x[:batch_size]),
        float(-log_posterior.mean()),
    )


def digits_data(batch_size: int, seed: int, *, conditional: bool) -> TaskData:
    config = train_config.TrainConfig(dataset="digits", context="label" if conditional else "none")
    train = datasets.digits_dataset("train", batch_size=batch_size, seed=seed, labels=True)
    test = datasets.digits_dataset("test", batch_size=300, training=False, labels=True)
    if conditional:
        train, test = (
            train_config.with_context(train, config),
            train_config.with_context(test, config),
        )
    else:
        train, test = (ds.map(lambda x, label: x) for ds in (train, test))
    first = next(iter(train))
    return TaskData(train, test, first if conditional else (first, None))


def task_data(task: str, model_name: str, sizes: Sizes, batch_size: int, seed: int) -> TaskData:
    if task == "rotated":
        return rotated_data(sizes, batch_size, seed)
    if task == "two_moons":
        return two_moons_data(sizes, batch_size, seed)
    return digits_data(batch_size, seed, conditional=model_name != "resflow-unconditional")


def observations(count: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` fixed (theta_o, x_o) of the C2ST: theta_o from the prior, x_o simulated."""
    return two_moons_simulations(count, [2])


# ------------------------------------------------------------------------------------------------
# The classifier two-sample test.


def c2st(samples: np.ndarray, reference: np.ndarray, *, steps: int, seed: int) -> float:
    """Held-out accuracy of an MLP telling `samples` from `reference` (2-fold, mean).

    Inputs are z-scored with the reference's mean and std. The classifier (2 x 128 ReLU) is
    trained full-batch by Adam (3e-3) for `steps` steps on one half and scored on the other,
    then the halves swap. 0.5 means it cannot tell the sets apart; a non-finite sample counts
    as told apart (left out of training, scored as recognised). Calibrated on the two-moons
    grid posterior (1,000 samples each, 1,000 steps): new reference samples 0.51, prior samples
    0.99, one of the two crescents only 0.75 (the optimum), the crescent widened from std 0.01
    to 0.022 0.68 (the optimum, 0.5 + TV / 2, is about 0.68); Keras `fit` with mini-batches
    for 100 epochs underfits (0.51 for the widened crescent).
    """
    mean, std = reference.mean(0), reference.std(0) + 1e-8
    features = (np.concatenate([samples, reference]) - mean) / std
    finite = np.all(np.isfinite(features), axis=1)
    features = np.where(finite[:, None], features, 0.0).astype(np.float32)
    labels = np.concatenate([np.ones(len(samples)), np.zeros(len(reference))]).astype(np.float32)
    folds = np.array_split(np.random.default_rng(seed).permutation(len(features)), 2)
    accuracies = []
    for k in range(2):
        fit_on, test_on = folds[k], folds[1 - k]
        fit_on = fit_on[finite[fit_on]]
        keras.utils.set_random_seed(seed + k)
        classifier = keras.Sequential(
            [
                keras.Input((features.shape[1],)),
                keras.layers.Dense(128, activation="relu"),
                keras.layers.Dense(128, activation="relu"),
                keras.layers.Dense(1),
            ]
        )
        optimizer = keras.optimizers.Adam(3e-3)
        x, y = tf.constant(features[fit_on]), tf.constant(labels[fit_on])

        @tf.function
        def train(num_steps: tf.Tensor, x=x, y=y, classifier=classifier, optimizer=optimizer):
            weights = classifier.trainable_variables
            for _ in tf.range(num_steps):
                with tf.GradientTape() as tape:
                    logits = classifier(x)[:, 0]
                    loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(y, logits))
                optimizer.apply_gradients(zip(tape.gradient(loss, weights), weights, strict=True))

        train(tf.constant(steps))
        logits = classifier(features[test_on]).numpy()[:, 0]
        right = ((logits > 0) == (labels[test_on] == 1)) | ~finite[test_on]
        accuracies.append(float(np.mean(right)))
    return float(np.mean(accuracies))


def label_marginal_bits(model: FlowModel, test: tf.data.Dataset) -> float:
    """Test bits/dim of a class-conditional model's label marginal, `(1/L) sum_y q(x | y)`.

    A model of p(x) built from the conditional one, so it compares with the unconditional
    flow: the label alone can lower the bits/dim by at most `log2(L) / D` (0.052 for digits,
    `E[-log p(x | y)] >= E[-log p(x)] - H(y)`); a larger gap given the label is the
    conditional model fitting x better, not the label's information. Evaluation mode, the
    norm estimates converged by the `score` before.
    """
    classes = model.context_shape[0]
    log_prob = tf.function(lambda x, c: model.log_prob(x, context=c))
    losses = []
    for x, _ in test:
        per_label = [log_prob(x, tf.one_hot(k, classes)) for k in range(classes)]
        marginal = tf.reduce_logsumexp(tf.stack(per_label), axis=0) - math.log(classes)
        losses.append(bits.bits_per_dim(marginal, math.prod(model.event_shape), model.num_levels))
    return float(np.mean(np.concatenate(losses)))


def conditional_samples(model: FlowModel, num: int, context: np.ndarray, seed: int) -> np.ndarray:
    """`num` draws of the model given one context `[K]` (a `tf.function`, as compare_flows)."""
    draw = tf.function(lambda c: model.sample(num, seed=seed, context=c))
    return draw(tf.constant(context, tf.float32)).numpy()


# ------------------------------------------------------------------------------------------------
# Training and scoring.


def train_and_score(
    task: str,
    model_name: str,
    seed: int,
    budget: Budget,
    sizes: Sizes,
    *,
    timer: StepTimer | None = None,
    reference_posteriors: list | None = None,
) -> dict:
    """Trains one model by the recipe for `budget` (steps, or seconds); scores it."""
    keras.utils.set_random_seed(seed)
    model = MODELS[task][model_name](small=sizes.small_models)
    task_set = task_data(task, model_name, sizes, budget.batch_size, seed)
    model.build(model.input_shape_for_build())
    x0, c0 = task_set.first_batch
    model.initialize(x0, context=c0)
    config = budget.train_config(seed)
    model.compile(optimizer=train_config.make_optimizer(config, budget.steps))
    timer = timer or StepTimer()
    callbacks: list[keras.callbacks.Callback] = [timer]
    clock = None
    if budget.seconds is not None:
        if budget.clock == "calibrated":
            clock = WallClockBudget(budget.seconds)
            clock.clock = calibrated_clock(clock, *budget.calibrated)
        else:
            clock = WallClockBudget(budget.seconds, clock=CLOCKS[budget.clock])
        callbacks.append(clock)
    start = time.perf_counter()
    if clock is not None:
        clock.start_clock()
    model.fit(
        task_set.train,
        epochs=1,
        steps_per_epoch=budget.steps,
        verbose=0,
        callbacks=callbacks,
        shuffle=False,
    )
    train_seconds = time.perf_counter() - start
    # fit ends with the EMA weights in place (Keras' use_ema); score them in evaluation mode.
    test_loss = score(model, task_set.test, config)
    total, free = parameter_counts(model)
    row = {
        "task": task,
        "model": model_name,
        "seed": seed,
        "learning_rate": budget.learning_rate,
        "test_loss": test_loss,
        "unit": model.loss_unit,
        "reference_loss": task_set.reference_nll,
        "parameters": total,
        "free_parameters": free,
        "steps": len(timer.seconds),
        "batch_size": budget.batch_size,
        "first_step_seconds": round(timer.seconds[0], 3),
        "step_seconds_median": statistics.median(timer.seconds[1:] or timer.seconds),
        "train_seconds": round(clock.train_seconds if clock else train_seconds, 2),
    }
    if clock is not None:
        row.update(budget_seconds=budget.seconds, clock=budget.clock)
    if task == "digits" and model.context_shape is not None:
        row["marginal_loss"] = label_marginal_bits(model, task_set.test)
    if task == "two_moons" and reference_posteriors:
        row["c2st"], samples = [], []
        for k, posterior in enumerate(reference_posteriors):
            drawn = conditional_samples(model, sizes.c2st_samples, posterior.observation, seed)
            reference = posterior.sample(sizes.c2st_samples, seed=[3, seed, k])
            row["c2st"].append(c2st(drawn, reference, steps=sizes.c2st_steps, seed=seed))
            samples.append(drawn)
        row["c2st_mean"] = float(np.mean(row["c2st"]))
        row["samples_first_observation"] = samples[0]
    return row


def tune_learning_rates(
    task: str, names: list[str], budget: Budget, grid: tuple, sizes: Sizes
) -> tuple[dict[str, float], list[dict]]:
    """`compare_flows.tune_learning_rates`' rule on this script's tasks: for every model, the
    grid value with the lowest mean training loss over the last `TUNING_TAIL` of the steps of
    an equal-steps run (seed `TUNING_SEED`; the held-out data play no part), the grid grown
    past a winning end (`compare_flows.best_on_growing_grid`)."""
    rows = []

    def score(name: str, rate: float) -> float:
        timer = StepTimer()
        tuned = dataclasses.replace(budget, learning_rate=rate)
        row = train_and_score(task, name, TUNING_SEED, tuned, sizes, timer=timer)
        tail = timer.tail_loss(TUNING_TAIL)
        rows.append(
            {
                "task": task,
                "model": name,
                "learning_rate": rate,
                "tail_loss": tail,
                "test_loss": row["test_loss"],
            }
        )
        print(f"  tuning {task} {name} lr={rate:g}: late training loss {tail:.4f}", file=sys.stderr)
        return tail if math.isfinite(tail) else math.inf

    chosen = {
        name: best_on_growing_grid(
            grid, lambda rate, name=name: score(name, rate), MAX_GRID_EXTENSIONS
        )
        for name in names
    }
    return chosen, rows


def calibrate(task: str, names: list[str], budget: Budget, sizes: Sizes) -> dict:
    """Each model's first-step and median later-step wall time on `task`, `{model: {...}}`.

    Run on an idle machine (`compare_flows.calibrate` for this script's tasks): these are the
    speeds a `--clock calibrated` comparison charges.
    """
    budget = dataclasses.replace(budget, steps=CALIBRATION_STEPS)

    def run(name: str, timer: StepTimer) -> None:
        train_and_score(task, name, 0, budget, sizes, timer=timer)

    return time_steps(task, names, run, stream=sys.stderr)


# ------------------------------------------------------------------------------------------------
# Summaries, tables, the picture.


def summarise(rows: list[dict]) -> list[dict]:
    """Per (task, model): spreads over seeds, parameters and their ratio to the residual flow's."""
    summary = []
    keys = dict.fromkeys((r["task"], r["model"]) for r in rows)
    for task, model_name in keys:
        group = [r for r in rows if r["task"] == task and r["model"] == model_name]
        reference = [r for r in rows if r["task"] == task and r["model"] == REFERENCE_MODEL]
        entry = {
            "task": task,
            "model": model_name,
            "unit": group[0]["unit"],
            "parameters": group[0]["parameters"],
            "free_parameters": group[0]["free_parameters"],
            "learning_rate": group[0]["learning_rate"],
            "test_loss": spread([r["test_loss"] for r in group]),
            "reference_loss": group[0]["reference_loss"],
            "steps": spread([r["steps"] for r in group]),
            "step_seconds": spread([r["step_seconds_median"] for r in group]),
            "train_seconds": spread([r["train_seconds"] for r in group]),
            "seeds": [r["seed"] for r in group],
        }
        if "budget_seconds" in group[0]:
            entry.update(budget_seconds=group[0]["budget_seconds"], clock=group[0]["clock"])
        if "marginal_loss" in group[0]:
            entry["marginal_loss"] = spread([r["marginal_loss"] for r in group])
        if "c2st_mean" in group[0]:
            entry["c2st"] = spread([r["c2st_mean"] for r in group])
        if reference:
            ratio = entry["parameters"] / reference[0]["parameters"]
            entry["parameters_vs_resflow"] = round(ratio, 4)
            # The unconditional digits flow is the same flow minus its context networks.
            if task != "digits":
                entry["parameters_within_tolerance"] = abs(ratio - 1) <= PARAMETER_TOLERANCE
        summary.append(entry)
    return summary


def _parameter_cell(s: dict) -> str:
    cell = f"{s['parameters']:,}"
    if s["free_parameters"] != s["parameters"]:
        cell += f" ({s['free_parameters']:,} unmasked)"
    ratio = s.get("parameters_vs_resflow")
    return cell if ratio is None else cell + f" ({ratio:.3f}x)"


TASK_METRIC = {
    "rotated": "held-out NLL of x given c (nats)",
    "two_moons": "NLL of the true theta (nats)",
    "digits": "test bits/dim",
}


def print_tables(summary: list[dict], title: str) -> None:
    for task in dict.fromkeys(s["task"] for s in summary):
        rows = [s for s in summary if s["task"] == task]
        reference = rows[0]["reference_loss"]
        floor = "" if reference is None else f"; the true density: {reference:.4f}"
        print(f"\n{task}, {title} ({rows[0]['test_loss']['n']} seeds{floor})\n")
        columns = ["model", "parameters (vs resflow)", "learning rate", TASK_METRIC[task]]
        if task == "two_moons":
            columns.append("C2ST accuracy (0.5 best)")
        if task == "digits":
            columns.append("bits/dim of the label marginal (1/10) sum_y q(x given y)")
        columns += ["steps", "step (ms)"]
        print("| " + " | ".join(columns) + " |")
        print("|" + " --- |" * len(columns))
        for s in rows:
            cells = [
                s["model"],
                _parameter_cell(s),
                f"{s['learning_rate']:g}",
                format_spread(s["test_loss"]),
            ]
            if task == "two_moons":
                cells.append(format_spread(s["c2st"]) if "c2st" in s else "-")
            if task == "digits":
                marginal = s.get("marginal_loss")
                cells.append("-" if marginal is None else format_spread(marginal))
            steps = s["steps"]
            cells += [f"{steps['mean']:.0f}", format_spread(s["step_seconds"], 1, 1e3)]
            print("| " + " | ".join(cells) + " |")


def plot_two_moons(samples: dict[str, tuple[np.ndarray, float]], posterior, path: Path) -> None:
    """The grid posterior for the first observation next to every model's samples.

    Args:
        samples: model name -> (its samples given the observation, its C2ST accuracy there).
        posterior: the `GridPosterior` of the observation.
        path: the PNG to write.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = max((len(points) for points, _ in samples.values()), default=1000)
    panels = [("grid posterior (reference)", posterior.sample(count, seed=[4]))]
    panels += [
        (f"{name} (C2ST {accuracy:.2f})", points) for name, (points, accuracy) in samples.items()
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.5))
    b = conditional_data.TWO_MOONS.prior_bound
    for ax, (title, points) in zip(np.atleast_1d(axes), panels, strict=True):
        ax.imshow(
            np.exp(posterior.log_density).T,
            origin="lower",
            extent=[-b, b, -b, b],
            cmap="Greys",
            alpha=0.5,
        )
        ax.scatter(points[:, 0], points[:, 1], s=2, alpha=0.4, color="C0")
        ax.set_xlim(-b, b)
        ax.set_ylim(-b, b)
        ax.set_aspect("equal")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("theta_1")
    np.atleast_1d(axes)[0].set_ylabel("theta_2")
    x_o = posterior.observation
    fig.suptitle(
        f"two moons: samples of q(theta | x_o), x_o = ({x_o[0]:.3f}, {x_o[1]:.3f}); grey: the "
        "grid posterior",
        fontsize=10,
    )
    save_figure(fig, path)


def _report(row: dict) -> None:
    c2st_text = f", C2ST {row['c2st_mean']:.3f}" if "c2st_mean" in row else ""
    print(
        f"  {row['task']} {row['model']} seed {row['seed']}: test {row['test_loss']:.4f} "
        f"{row['unit']}{c2st_text} after {row['steps']} steps ({row['train_seconds']:.1f} s), "
        f"{row['parameters']:,} parameters",
        file=sys.stderr,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings (seconds per model)")
    parser.add_argument(
        "--budget",
        choices=("steps", "seconds", "both"),
        default=None,
        help="equal steps, equal training time, or both (default: steps; both with --quick)",
    )
    parser.add_argument(
        "--clock",
        choices=(*CLOCKS, "calibrated"),
        default="wall",
        help="how time budgets count: wall-clock (default), process CPU time, or 'calibrated': "
        "the steps that fit in the budget at the speeds of --calibration, measured on an idle "
        "machine (`compare_flows.py --clock`)",
    )
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help=f"only measure every model's step time ({CALIBRATION_STEPS} steps, on an idle "
        "machine) and write them to --output, for --clock calibrated",
    )
    parser.add_argument(
        "--calibration",
        type=Path,
        nargs="+",
        help="the --calibrate output(s) used by --clock calibrated; with several, each "
        "model's median time over them (`compare_flows.read_calibration`)",
    )
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument(
        "--models",
        nargs="+",
        choices=MODEL_NAMES,
        default=None,
        help="default: every model of a task",
    )
    parser.add_argument("--seeds", type=int, default=None, help="seeds per model (default 3)")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="steps for every task (default: "
        + ", ".join(f"{t} {s}" for t, (s, _) in STEPS.items())
        + ")",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="time budget for every task (default: "
        + ", ".join(f"{t} {s:g}" for t, s in SECONDS.items())
        + f"; --quick "
        f"{QUICK_SECONDS:g})",
    )
    parser.add_argument(
        "--learning-rates",
        nargs="+",
        type=float,
        default=None,
        help="one rate for every model (default 2e-3), or a grid on which "
        "every model is tuned by the same rule",
    )
    parser.add_argument(
        "--tune-learning-rates",
        action="store_true",
        help="tune on " + " ".join(f"{r:g}" for r in LEARNING_RATE_GRID),
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=RESULTS,
        help="the results JSON (the picture goes next to it)",
    )
    args = parser.parse_args(argv)
    if (args.clock == "calibrated") != (args.calibration is not None):
        parser.error("--clock calibrated and --calibration go together")
    calibration = read_calibration(args.calibration) if args.calibration else {}
    quick = args.quick
    budgets = args.budget or ("both" if quick else "steps")
    sizes = QUICK_SIZES if quick else Sizes()
    seeds = range(args.seeds or (1 if quick else 3))
    grid = LEARNING_RATE_GRID if args.tune_learning_rates else args.learning_rates
    grid = tuple(grid or (Budget.learning_rate,))

    load_before = load_average()
    start = time.perf_counter()
    posteriors = []
    if "two_moons" in args.tasks:
        theta_o, x_o = observations(sizes.observations)
        posteriors = [
            conditional_data.grid_posterior(x, resolution=sizes.grid_resolution) for x in x_o
        ]
    rows, time_rows, tuning_rows, learning_rates, budgets_used = [], [], [], {}, {}
    picture: dict[str, dict] = {}  # budget -> model -> (samples, C2ST) for the picture
    for task in args.tasks:
        names = [m for m in MODELS[task] if args.models is None or m in args.models]
        steps, batch_size = STEPS[task]
        steps = args.steps or (QUICK_STEPS[task] if quick else steps)
        step_budget = Budget(steps, batch_size, sample_repeats=0)
        seconds = args.seconds or (QUICK_SECONDS if quick else SECONDS[task])
        time_budget = Budget(
            MAX_STEPS,
            batch_size,
            sample_repeats=0,
            seconds=seconds,
            checkpoints=1,
            clock=args.clock,
        )
        budgets_used[task] = {
            "steps": dataclasses.asdict(step_budget),
            "seconds": dataclasses.asdict(time_budget),
        }
        if args.calibrate:
            calibration[task] = calibrate(task, names, step_budget, sizes)
            continue
        if len(grid) > 1:
            rates, tuned = tune_learning_rates(task, names, step_budget, grid, sizes)
            tuning_rows.extend(tuned)
        else:
            rates = dict.fromkeys(names, grid[0])
        learning_rates[task] = rates
        for budget_name, budget, out in (
            ("steps", step_budget, rows),
            ("seconds", time_budget, time_rows),
        ):
            if budgets not in (budget_name, "both"):
                continue
            trained = names
            if quick and budgets == "both" and budget_name == "steps":
                trained = quick_both(names)
            for name in trained:
                for seed in seeds:
                    run = dataclasses.replace(budget, learning_rate=rates[name])
                    if budget_name == "seconds" and args.clock == "calibrated":
                        speed = calibration[task][name]
                        run = dataclasses.replace(
                            run, calibrated=(speed["first_step_seconds"], speed["step_seconds"])
                        )
                    out.append(
                        train_and_score(
                            task, name, seed, run, sizes, reference_posteriors=posteriors
                        )
                    )
                    drawn = out[-1].pop("samples_first_observation", None)
                    if drawn is not None and seed == seeds[0]:
                        picture.setdefault(budget_name, {})[name] = (drawn, out[-1]["c2st"][0])
                    _report(out[-1])
    if args.calibrate:
        output = args.output if args.output != RESULTS else RESULTS.with_name(CALIBRATION)
        write_results(output, __file__, argv, calibration=calibration)
        return
    results: dict = {}
    for key, found, title in (("", rows, "equal steps"), ("time_", time_rows, "equal time")):
        if found:
            summary = summarise(found)
            print_tables(summary, title)
            for s in summary:
                if not s.get("parameters_within_tolerance", True):
                    print(f"WARNING: {s['task']} {s['model']}: parameters differ by more than 10%")
            results.update({f"{key}rows": found, f"{key}summary": summary})
    if picture:  # the equal-steps models if they ran, else the equal-time ones
        drawn = picture.get("steps", picture.get("seconds"))
        path = args.output.parent / PICTURE
        plot_two_moons(drawn, posteriors[0], path)
        results["picture"] = path.name
    if posteriors:
        results["observations"] = [
            {"theta": t.tolist(), "x": p.observation.tolist(), "grid_cell": p.cell_size}
            for t, p in zip(theta_o, posteriors, strict=True)
        ]
    write_results(
        args.output,
        __file__,
        argv,
        settings={
            "quick": quick,
            "budget": budgets,
            "clock": args.clock,
            "budgets": budgets_used,
            "sizes": dataclasses.asdict(sizes),
            "rotated_toy": ROTATED_TOY,
            "baseline_hidden_units": list(BASELINE_HIDDEN_UNITS),
            "recipe": "training.make_optimizer: GroupedAdam beta_2=0.99, linear warm-up "
            "(min(100, steps/5) steps) then constant, clip 1, EMA 0.99; EMA weights scored",
            "learning_rate_grid": list(grid),
            "tuning": f"one run per model and grid value at the equal-steps budget (seed "
            f"{TUNING_SEED}); the lowest mean training loss over the last {TUNING_TAIL:g} of "
            "the steps wins"
            if len(grid) > 1
            else "none: one rate for every model",
            "c2st": "2-fold held-out accuracy of a Keras MLP 2x128 ReLU (full-batch Adam 3e-3, "
            "c2st_steps steps, z-scored by the reference samples) between flow samples and "
            "grid-posterior samples",
        },
        learning_rates=learning_rates,
        tuning_rows=tuning_rows,
        load_average_before=load_before,
        load_average_after=load_average(),
        seconds=round(time.perf_counter() - start, 1),
        **results,
    )


if __name__ == "__main__":
    main()
