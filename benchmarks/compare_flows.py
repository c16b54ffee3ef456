"""Residual Flows against TFP's coupling and autoregressive flows at equal budget.

What: test negative log-likelihood, time per training step and time to sample, for

    2-D toy sets (8gaussians, checkerboard, 2spirals), test NLL in nats (exact for every model:
    the residual flow's evaluation mode uses the exact log-det for 2-D events):
        resflow   `ResidualFlowBijector(presets.TOY)`: 8 blocks, g = 2-64-64-2 LipSwish MLP
        realnvp   ActNorm, then 8 x `tfb.RealNVP` affine couplings (Keras 3 MLP 1-64-64-2 for
                  shift and log-scale) alternating halves with `tfb.Permute`
        maf       ActNorm, then 8 x `tfb.MaskedAutoregressiveFlow` with a Keras 3 MADE (masked
                  dense 2-64-64-4, our own; TFP's `AutoregressiveNetwork` is tf_keras) and
                  `tfb.Permute` between them
    8x8 digits (17 levels, dequantised), test bits/dim:
        resflow   the `digits` preset image flow (`multiscale.image_flow`)
        glow      a Glow-style coupling flow from TFP bijectors: logit, squeeze, 4 steps at
                  4x4x4, squeeze, 4 steps at 2x2x16; a step is ActNorm -> invertible 1x1
                  convolution (`tfb.ScaleMatvecLU` over Keras-owned LU factors) -> affine
                  coupling (`tfb.RealNVP` over channels, Keras 3 conv net 3x3-1x1-3x3, 32 wide)

How: every model is a bijector in `FlowModel` (the base is `Sample(Normal(0, 1))`), trained with
`fit` by the authors' Adam recipe (`training.make_optimizer`: warm-up, constant rate, clipping at
norm 1, EMA 0.99) for the same steps and batch size; parameter counts agree within 10% (checked
and printed). After training (EMA weights, Lipschitz estimates converged) the test set is scored
in evaluation mode (`model(x, training=False)`): exact for the toy sets and the coupling flows;
for the digits residual flow the authors' evaluation estimator (unbiased roulette, 20 exact
terms). Step time is the median over the steps after the first (Keras callback around each
`fit` step); sampling time is the median of 3 calls of a `tf.function` drawing 64 samples, after
a first (tracing) call. Three seeds per model: mean, standard deviation and min-max.

`tfb.Glow` itself runs with Keras 3 networks in float32, but its ActNorm and 1x1-convolution
parameters are raw `tf.Variable`s created inside TFP, which Keras 3 neither tracks nor trains
(measured: none of its 12 variables changes during `fit`); hence the equivalent built here.
`FlowModel` finds the Keras layers of this package's bijectors only
(`fresh_bijector.keras_layers_of`), so the coupling networks are handed to a `FlowModel`
subclass that owns them (`NetworkOwningFlowModel`); without it `fit` would train nothing.

    python benchmarks/compare_flows.py            # full: about 7 minutes on 2 CPU cores
    python benchmarks/compare_flows.py --quick    # tiny settings, 1-2 minutes
    python benchmarks/compare_flows.py --datasets checkerboard --seeds 1 --toy-steps 100

Prints markdown tables and writes `benchmarks/results/compare_flows.json` (or `--output`).
"""

import argparse
import dataclasses
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_probability as tfp  # noqa: E402
from measure import write_results  # noqa: E402

from tfp_resflow import data, multiscale, presets, training  # noqa: E402
from tfp_resflow.actnorm import ActNorm, ActNormLayer  # noqa: E402
from tfp_resflow.flow import ResidualFlowBijector  # noqa: E402
from tfp_resflow.image import LogitTransform, Squeeze  # noqa: E402
from tfp_resflow.model import FlowModel  # noqa: E402

tfb = tfp.bijectors

tf.get_logger().setLevel("ERROR")  # a new tf.function per setting is intended
RESULTS = Path(__file__).resolve().parent / "results" / "compare_flows.json"
TOY_SETS = ("8gaussians", "checkerboard", "2spirals")
DATASETS = (*TOY_SETS, "digits")
TOY_MODELS = ("resflow", "realnvp", "maf")
DIGITS_MODELS = ("resflow", "glow")
PARAMETER_TOLERANCE = 0.10  # parameter counts within 10% of the residual flow's
TOY_TEST_POINTS = 10_000
NUM_SAMPLES = 64


# ------------------------------------------------------------------------------------------------
# Keras 3 networks for TFP's coupling and autoregressive bijectors.


def _soft_log_scale(raw: tf.Tensor) -> tf.Tensor:
    """Log-scale bounded in (-2, 2) per layer (slope 1 at 0), for stable affine couplings."""
    return 2.0 * tf.tanh(raw / 2.0)


class CouplingMLP(keras.Model):
    """`x_a [B, d_a] -> (shift, log_scale) [B, d_b]` for `tfb.RealNVP` on vectors.

    The last layer starts at zero, so every coupling starts as the identity (as in Glow).
    """

    def __init__(self, input_size: int, output_size: int, hidden_units: tuple, **kwargs):
        super().__init__(**kwargs)
        self.input_size, self.output_size = input_size, output_size
        self.hidden = [keras.layers.Dense(h, activation="relu") for h in hidden_units]
        self.out = keras.layers.Dense(2 * output_size, kernel_initializer="zeros")

    def build(self, input_shape: tuple) -> None:
        shape = tuple(input_shape)
        for layer in self.hidden:
            layer.build(shape)
            shape = (*shape[:-1], layer.units)
        self.out.build(shape)

    def call(self, x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        for layer in self.hidden:
            x = layer(x)
        out = self.out(x)
        return out[..., : self.output_size], _soft_log_scale(out[..., self.output_size :])


class MaskedDense(keras.layers.Layer):
    """Dense layer whose kernel is multiplied by a fixed 0/1 mask (MADE, Germain et al. 2015)."""

    def __init__(self, units: int, mask: np.ndarray, *, activation=None, zeros=False, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.mask = np.asarray(mask, np.float32)  # [inputs, units]
        self.activation = keras.activations.get(activation)
        self.zeros = zeros

    def build(self, input_shape: tuple) -> None:
        init = "zeros" if self.zeros else "glorot_uniform"
        self.kernel = self.add_weight(shape=self.mask.shape, initializer=init, name="kernel")
        self.bias = self.add_weight(shape=(self.units,), initializer="zeros", name="bias")

    def call(self, x: tf.Tensor) -> tf.Tensor:
        kernel = self.kernel * tf.constant(self.mask, self.kernel.dtype)
        return self.activation(tf.matmul(x, kernel) + self.bias)

    @property
    def masked_out(self) -> int:
        """Kernel entries the mask keeps at zero (not free parameters)."""
        return int(self.mask.size - self.mask.sum())


class MADE(keras.Model):
    """Masked autoencoder `x [B, D] -> (shift, log_scale) [B, D]`, output i sees `x_<i` only.

    Degrees: inputs 1..D, hidden units cycle through 1..D-1, outputs 1..D (for the shift and
    for the log-scale); a hidden unit of degree k sees inputs of degree <= k, an output of
    degree d sees hidden units of degree < d. Written with Keras 3 layers, because TFP's
    `tfb.AutoregressiveNetwork` is a tf_keras layer.
    """

    def __init__(self, event_size: int, hidden_units: tuple, **kwargs):
        super().__init__(**kwargs)
        d = event_size
        self.event_size = d
        degrees = [np.arange(1, d + 1)]
        for h in hidden_units:
            degrees.append(np.arange(h) % max(1, d - 1) + 1)
        self.hidden = [
            MaskedDense(h, degrees[i][:, None] <= degrees[i + 1][None, :], activation="relu")
            for i, h in enumerate(hidden_units)
        ]
        out_degrees = np.tile(np.arange(1, d + 1), 2)
        self.out = MaskedDense(
            2 * d, degrees[-1][:, None] < out_degrees[None, :], zeros=True, name="made_output"
        )

    def build(self, input_shape: tuple) -> None:
        shape = tuple(input_shape)
        for layer in [*self.hidden, self.out]:
            layer.build(shape)
            shape = (*shape[:-1], layer.units)

    def call(self, x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        for layer in self.hidden:
            x = layer(x)
        out = self.out(x)
        return out[..., : self.event_size], _soft_log_scale(out[..., self.event_size :])


class CouplingCNN(keras.Model):
    """`x_a [B, H, W, c_a] -> (shift, log_scale) [B, H, W, c_b]`: Glow's 3x3 -> 1x1 -> 3x3."""

    def __init__(self, output_channels: int, hidden_channels: int, **kwargs):
        super().__init__(**kwargs)
        self.output_channels = output_channels
        self.convs = [
            keras.layers.Conv2D(hidden_channels, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(hidden_channels, 1, activation="relu"),
            keras.layers.Conv2D(2 * output_channels, 3, padding="same", kernel_initializer="zeros"),
        ]

    def build(self, input_shape: tuple) -> None:
        shape = tuple(input_shape)
        for conv in self.convs:
            conv.build(shape)
            shape = (*shape[:-1], conv.filters)

    def call(self, x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        for conv in self.convs:
            x = conv(x)
        c = self.output_channels
        return x[..., :c], _soft_log_scale(x[..., c:])


class LUWeights(keras.layers.Layer):
    """Keras-owned LU factors of an invertible `c x c` matrix (Glow's 1x1 convolution).

    Starts from the LU decomposition of a random orthogonal matrix, as Glow does; the
    permutation is fixed. `bijector()` is a `tfb.ScaleMatvecLU` reading the variable itself
    (`.value`, a `tf.Variable`), so Keras' optimizer updates reach it.
    """

    def __init__(self, channels: int, seed: int, **kwargs):
        super().__init__(**kwargs)
        q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(channels, channels)))
        lower_upper, permutation = tf.linalg.lu(tf.constant(q, tf.float32))
        self._initial = lower_upper.numpy()
        self.permutation = permutation.numpy()

    def build(self, input_shape: tuple | None = None) -> None:
        self.lower_upper = self.add_weight(
            shape=self._initial.shape,
            initializer=keras.initializers.Constant(self._initial),
            name="lower_upper",
        )

    def bijector(self) -> tfb.Bijector:
        return tfb.ScaleMatvecLU(
            self.lower_upper.value, tf.constant(self.permutation), name=f"{self.name}_lu"
        )


class NetworkOwningFlowModel(FlowModel):
    """`FlowModel` that also owns Keras networks used inside TFP bijectors.

    `FlowModel` collects the Keras layers of this package's bijectors only
    (`fresh_bijector.keras_layers_of`); the networks of `tfb.RealNVP`,
    `tfb.MaskedAutoregressiveFlow` and our LU factors must be attached before the model is built
    to be trained.
    """

    def __init__(self, bijector: tfb.Bijector, event_shape, *, networks=(), **kwargs):
        super().__init__(bijector, event_shape, **kwargs)
        self.networks = list(networks)


def _actnorm(shape: tuple, name: str) -> ActNorm:
    layer = ActNormLayer(name=f"{name}_layer")
    layer.build((None, *shape))
    return ActNorm(layer, event_ndims=len(shape), name=name)


def realnvp_2d(num_layers: int = 8, hidden_units: tuple = (64, 64)):
    """ActNorm, then `num_layers` RealNVP couplings alternating the halves (data -> latent)."""
    bijectors, networks = [_actnorm((2,), "act_norm")], []
    for k in range(num_layers):
        net = CouplingMLP(1, 1, hidden_units, name=f"coupling_{k}")
        net.build((None, 1))
        networks.append(net)
        if k:
            bijectors.append(tfb.Permute([1, 0], name=f"permute_{k}"))
        bijectors.append(
            tfb.RealNVP(
                num_masked=1,
                shift_and_log_scale_fn=lambda x, output_units, net=net, **kw: net(x),
                name=f"real_nvp_{k}",
            )
        )
    return tfb.Chain(bijectors, name="realnvp"), networks


def maf_2d(num_layers: int = 8, hidden_units: tuple = (64, 64)):
    """ActNorm, then `num_layers` MAF layers with reversals between them (data -> latent)."""
    bijectors, networks = [_actnorm((2,), "act_norm")], []
    for k in range(num_layers):
        made = MADE(2, hidden_units, name=f"made_{k}")
        made.build((None, 2))
        networks.append(made)
        if k:
            bijectors.append(tfb.Permute([1, 0], name=f"permute_{k}"))
        bijectors.append(
            tfb.MaskedAutoregressiveFlow(
                shift_and_log_scale_fn=lambda x, made=made, **kw: made(x), name=f"maf_{k}"
            )
        )
    return tfb.Chain(bijectors, name="maf"), networks


def glow_digits(steps_per_level: tuple = (4, 4), hidden_channels: int = 32, seed: int = 0):
    """Glow-style flow for 8x8x1 digits from TFP bijectors (data -> latent order):

    logit (the `digits` preset's alpha), squeeze to 4x4x4, steps, squeeze to 2x2x16, steps;
    a step is ActNorm -> 1x1 convolution (`tfb.ScaleMatvecLU`) -> affine coupling (`tfb.RealNVP`
    over channels with a `CouplingCNN`).
    """
    alpha = presets.get_preset("digits").logit_alpha
    bijectors, networks = [LogitTransform(alpha)], []
    h, w, c = data.DIGITS_SHAPE
    for level, steps in enumerate(steps_per_level):
        bijectors.append(Squeeze(name=f"squeeze_{level}"))
        h, w, c = h // 2, w // 2, 4 * c
        for k in range(steps):
            name = f"level_{level}_step_{k}"
            bijectors.append(_actnorm((h, w, c), f"{name}_act_norm"))
            lu = LUWeights(c, seed=1000 * seed + 10 * level + k, name=f"{name}_conv")
            lu.build()
            net = CouplingCNN(c - c // 2, hidden_channels, name=f"{name}_coupling")
            net.build((None, h, w, c // 2))
            networks += [lu, net]
            bijectors.append(lu.bijector())
            bijectors.append(
                tfb.RealNVP(
                    num_masked=c // 2,
                    shift_and_log_scale_fn=lambda x, output_units, net=net, **kw: net(x),
                    name=f"{name}_real_nvp",
                )
            )
    return tfb.Chain(bijectors, name="glow"), networks


def build_model(dataset: str, model_name: str, seed: int) -> FlowModel:
    """The FlowModel of one (data set, model) pair."""
    if dataset == "digits":
        shape = data.DIGITS_SHAPE
        kwargs = {"loss_unit": "bits_per_dim", "num_levels": data.DIGITS_NUM_LEVELS}
        if model_name == "resflow":
            return FlowModel(multiscale.image_flow(shape, "digits"), shape, **kwargs)
        bijector, networks = glow_digits(seed=seed)
        return NetworkOwningFlowModel(bijector, shape, networks=networks, **kwargs)
    if model_name == "resflow":
        return FlowModel(ResidualFlowBijector(presets.TOY), event_shape=[2])
    bijector, networks = {"realnvp": realnvp_2d, "maf": maf_2d}[model_name]()
    return NetworkOwningFlowModel(bijector, [2], networks=networks)


def parameter_counts(model: FlowModel) -> tuple[int, int]:
    """(trainable weights, free parameters: minus kernel entries masked to zero in MADEs)."""
    total = int(sum(math.prod(w.shape) for w in model.trainable_weights))
    masked = 0
    for network in getattr(model, "networks", []):
        for layer in network._flatten_layers():  # noqa: SLF001 (Keras' own walk)
            if isinstance(layer, MaskedDense):
                masked += layer.masked_out
    return total, total - masked


# ------------------------------------------------------------------------------------------------
# Training and measurement.


@dataclasses.dataclass(frozen=True)
class Budget:
    """Equal training budget for every model of a data set."""

    steps: int
    batch_size: int
    learning_rate: float = 2e-3
    warmup_steps: int = 100
    ema_momentum: float = 0.99
    sample_repeats: int = 3  # timed sampling calls after the first; 0: no sampling

    def train_config(self, seed: int) -> training.TrainConfig:
        return training.TrainConfig(
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            warmup_steps=min(self.warmup_steps, max(1, self.steps // 5)),
            ema_momentum=self.ema_momentum,
            seed=seed,
        )


class StepTimer(keras.callbacks.Callback):
    """Wall time of every `fit` step (the loss is read at the end, so the step has finished)."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: list[float] = []

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        float(keras.ops.convert_to_numpy((logs or {}).get("loss", 0.0)))
        self.seconds.append(time.perf_counter() - self._start)


def datasets_for(dataset: str, budget: Budget, seed: int):
    """(training stream, finite test set, the first training batch for ActNorm's init)."""
    if dataset == "digits":
        train = data.digits_dataset("train", batch_size=budget.batch_size, seed=seed)
        test = data.digits_dataset("test", batch_size=300, training=False)
    else:
        train = data.toy_dataset(
            dataset, batch_size=budget.batch_size, num_samples=data.TOY_NUM_SAMPLES, seed=seed
        )
        test = data.toy_dataset(
            dataset,
            batch_size=2000,
            num_samples=TOY_TEST_POINTS,
            seed=seed,
            split="test",
            training=False,
        )
    # Iterators of a seeded stream restart it, so this is the first batch that fit sees.
    return train, test, next(iter(train))


def train_and_evaluate(
    model: FlowModel,
    dataset: str,
    budget: Budget,
    seed: int,
    *,
    save_path: Path | None = None,
) -> dict:
    """Trains `model` by the recipe for `budget.steps` steps; scores and times it."""
    train, test, init_batch = datasets_for(dataset, budget, seed)
    model.build((None, *model.event_shape))
    model.initialize(init_batch)
    config = budget.train_config(seed)
    model.compile(optimizer=training.make_optimizer(config, budget.steps))
    timer = StepTimer()
    start = time.perf_counter()
    model.fit(
        train, epochs=1, steps_per_epoch=budget.steps, verbose=0, callbacks=[timer], shuffle=False
    )
    train_seconds = time.perf_counter() - start
    # fit ends with the EMA weights in place (Keras' use_ema); converge the norm estimates for
    # them before scoring, as train_tf.py does.
    model.update_lipschitz(atol=config.lipschitz_tolerance, rtol=config.lipschitz_tolerance)
    start = time.perf_counter()
    test_loss = training.evaluate_loss(model, test)
    evaluation_seconds = time.perf_counter() - start

    first_sample_seconds, sample_times, finite = None, [], None
    if budget.sample_repeats:  # 0: no sampling (the quick ablations)
        sample = tf.function(lambda: model.sample(NUM_SAMPLES))
        start = time.perf_counter()
        sample()
        first_sample_seconds = round(time.perf_counter() - start, 2)
        finite = True
        for _ in range(budget.sample_repeats):
            start = time.perf_counter()
            samples = sample().numpy()
            sample_times.append(time.perf_counter() - start)
            finite = finite and bool(np.isfinite(samples).all())
    if save_path is not None:
        save_path.parent.mkdir(parents=True, exist_ok=True)
        model.save(save_path)
    total, free = parameter_counts(model)
    steps_after_first = timer.seconds[1:] or timer.seconds
    return {
        "test_loss": test_loss,
        "unit": model.loss_unit,
        "parameters": total,
        "free_parameters": free,
        "steps": budget.steps,
        "batch_size": budget.batch_size,
        "first_step_seconds": round(timer.seconds[0], 3),
        "step_seconds_median": statistics.median(steps_after_first),
        "train_seconds": round(train_seconds, 2),
        "evaluation_seconds": round(evaluation_seconds, 2),
        "first_sample_seconds": first_sample_seconds,
        "sample_seconds_median": statistics.median(sample_times) if sample_times else None,
        "samples_finite": finite,
    }


def run_one(dataset: str, model_name: str, seed: int, budget: Budget, save_path=None) -> dict:
    keras.utils.set_random_seed(seed)
    model = build_model(dataset, model_name, seed)
    row = {"dataset": dataset, "model": model_name, "seed": seed}
    row.update(train_and_evaluate(model, dataset, budget, seed, save_path=save_path))
    return row


# ------------------------------------------------------------------------------------------------
# Summaries and tables (shared with ablations.py).


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value), min and max."""
    values = [float(v) for v in values]
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def format_spread(s: dict, digits: int = 3, scale: float = 1.0) -> str:
    mean, std = s["mean"] * scale, s["std"] * scale
    low, high = s["min"] * scale, s["max"] * scale
    return f"{mean:.{digits}f} ± {std:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (other processes on the shared machine)."""
    return [round(x, 2) for x in os.getloadavg()]


def summarise(rows: list[dict]) -> list[dict]:
    summary = []
    keys = sorted({(r["dataset"], r["model"]) for r in rows}, key=_order)
    for dataset, model_name in keys:
        group = [r for r in rows if r["dataset"] == dataset and r["model"] == model_name]
        reference = [r for r in rows if r["dataset"] == dataset and r["model"] == "resflow"]
        entry = {
            "dataset": dataset,
            "model": model_name,
            "unit": group[0]["unit"],
            "parameters": group[0]["parameters"],
            "free_parameters": group[0]["free_parameters"],
            "test_loss": spread([r["test_loss"] for r in group]),
            "step_seconds": spread([r["step_seconds_median"] for r in group]),
            "sample_seconds": spread([r["sample_seconds_median"] for r in group]),
            "first_step_seconds": spread([r["first_step_seconds"] for r in group]),
            "seeds": [r["seed"] for r in group],
        }
        if reference:
            ratio = entry["parameters"] / reference[0]["parameters"]
            entry["parameters_vs_resflow"] = round(ratio, 4)
            entry["parameters_within_tolerance"] = abs(ratio - 1) <= PARAMETER_TOLERANCE
        summary.append(entry)
    return summary


def _order(key: tuple[str, str]) -> tuple[int, int]:
    dataset, model_name = key
    models = DIGITS_MODELS if dataset == "digits" else TOY_MODELS
    return DATASETS.index(dataset), models.index(model_name)


def print_tables(summary: list[dict]) -> None:
    print(
        "| data | model | parameters (vs resflow) | test NLL | step (ms) | sample 64 (ms) "
        "| first step (s) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for s in summary:
        unit = "bits/dim" if s["unit"] == "bits_per_dim" else "nats"
        params = f"{s['parameters']:,}"
        if s["free_parameters"] != s["parameters"]:
            params += f" ({s['free_parameters']:,} unmasked)"
        params += f" ({s.get('parameters_vs_resflow', 1.0):.3f}x)"
        print(
            f"| {s['dataset']} | {s['model']} | {params} "
            f"| {format_spread(s['test_loss'])} {unit} "
            f"| {format_spread(s['step_seconds'], 1, 1e3)} "
            f"| {format_spread(s['sample_seconds'], 1, 1e3)} "
            f"| {s['first_step_seconds']['mean']:.1f} |"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings (seconds per model)")
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=None)
    parser.add_argument("--seeds", type=int, default=None, help="seeds per model (default 3)")
    parser.add_argument("--toy-steps", type=int, default=None, help="default 400")
    parser.add_argument("--toy-batch-size", type=int, default=256)
    parser.add_argument(
        "--digits-steps", type=int, default=None, help="default 115: 5 epochs of 1500 at 64"
    )
    parser.add_argument("--digits-batch-size", type=int, default=64)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument(
        "--save-digits-model", type=Path, help="save the first seed's residual digits model"
    )
    args = parser.parse_args(argv)
    quick = args.quick
    datasets = args.datasets or (["8gaussians", "digits"] if quick else list(DATASETS))
    seeds = range(args.seeds or (1 if quick else 3))
    repeats = 1 if quick else 3
    toy = Budget(args.toy_steps or (10 if quick else 400), args.toy_batch_size)
    toy = dataclasses.replace(toy, sample_repeats=repeats)
    digits = Budget(args.digits_steps or (3 if quick else 115), args.digits_batch_size)
    digits = dataclasses.replace(digits, sample_repeats=repeats)

    load_before = load_average()
    start = time.perf_counter()
    rows = []
    for dataset in datasets:
        budget = digits if dataset == "digits" else toy
        for model_name in DIGITS_MODELS if dataset == "digits" else TOY_MODELS:
            for seed in seeds:
                save = None
                if dataset == "digits" and model_name == "resflow" and seed == 0:
                    save = args.save_digits_model
                rows.append(run_one(dataset, model_name, seed, budget, save))
                r = rows[-1]
                print(
                    f"  {dataset} {model_name} seed {seed}: test {r['test_loss']:.4f} "
                    f"{r['unit']}, step {1e3 * r['step_seconds_median']:.1f} ms, "
                    f"sample {1e3 * r['sample_seconds_median']:.1f} ms, {r['parameters']:,} "
                    "parameters",
                    file=sys.stderr,
                )
    summary = summarise(rows)
    print_tables(summary)
    for s in summary:
        if not s.get("parameters_within_tolerance", True):
            print(f"WARNING: {s['dataset']} {s['model']}: parameters differ by more than 10%")
    write_results(
        args.output,
        __file__,
        argv,
        settings={
            "quick": quick,
            "toy_budget": dataclasses.asdict(toy),
            "digits_budget": dataclasses.asdict(digits),
            "toy_test_points": TOY_TEST_POINTS,
            "num_samples": NUM_SAMPLES,
            "recipe": "training.make_optimizer: GroupedAdam beta_2=0.99, linear warm-up "
            "(min(100, steps/5) steps) then constant, clip 1, EMA 0.99; EMA weights scored",
        },
        load_average_before=load_before,
        load_average_after=load_average(),
        seconds=round(time.perf_counter() - start, 1),
        rows=rows,
        summary=summary,
    )


if __name__ == "__main__":
    main()
