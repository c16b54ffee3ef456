"""Residual Flows against TFP's coupling and autoregressive flows at equal steps or equal time.

What: test negative log-likelihood, time per training step and time to sample, for

    2-D toy sets (8gaussians, checkerboard, 2spirals), test NLL in nats (exact for every model:
    the residual flow's evaluation mode uses the exact log-det for 2-D events):
        resflow-lipswish  `ResidualFlowBijector(presets.TOY)`: 8 blocks, g = 2-64-64-2 LipSwish
                          MLP (alias `resflow`)
        resflow-clipswish, resflow-elu   the same with `activation=` changed (`with_fields`)
        realnvp   ActNorm, then 8 x `tfb.RealNVP` affine couplings (Keras 3 MLP 1-64-64-2 for
                  shift and log-scale) alternating halves with `tfb.Permute`
        maf       ActNorm, then 8 x `tfb.MaskedAutoregressiveFlow` with a Keras 3 MADE (masked
                  dense 2-64-64-4, our own; TFP's `AutoregressiveNetwork` is tf_keras) and
                  `tfb.Permute` between them
    8x8 digits (17 levels, dequantised), test bits/dim:
        resflow-lipswish  the `digits` preset image flow (`multiscale.image_flow`)
        resflow-clipswish, resflow-elu   the `digits` preset with `activation=` changed
        glow      a Glow-style coupling flow from TFP bijectors: logit, squeeze, 4 steps at
                  4x4x4, squeeze, 4 steps at 2x2x16; a step is ActNorm -> invertible 1x1
                  convolution (`tfb.ScaleMatvecLU` over Keras-owned LU factors) -> affine
                  coupling (`tfb.RealNVP` over channels, Keras 3 conv net 3x3-1x1-3x3, 32 wide)
    idensenet (toys and digits): i-DenseNet's g (`network="dense"`, CLipSwish), sized like
        resflow-lipswish (`IDENSENET_TOY`, `IDENSENET_DIGITS`); resflow-clipswish likewise

The models are registries (`TOY_FLOWS`, `DIGITS_FLOWS`: name -> builder of an unbuilt
`FlowModel` from a seed), so a variant is one line.

How: every model is a bijector in `FlowModel` (the base is `Sample(Normal(0, 1))`), trained with
`fit` by the authors' Adam recipe (`train_config.make_optimizer`: warm-up, constant rate, clipping
at norm 1, EMA 0.99) at the same batch size, for one of two budgets (`--budget steps|seconds|both`):

    steps     the same number of steps (warm-up min(100, steps / 5)); parameter counts agree
              within 10% (checked and printed). After training (EMA weights, Lipschitz
              estimates converged) the test set is scored in evaluation mode
              (`model(x, training=False)`): exact for the toy sets and the coupling flows; for
              the digits residual flows the authors' evaluation estimator (unbiased roulette,
              20 exact terms). Step time is the median over the steps after the first (Keras
              callback around each `fit` step); sampling time is the median of 3 calls of a
              `tf.function` drawing 64 samples, after a first (tracing) call.
    seconds   the same training wall-clock per model and seed (`--toy-seconds`,
              `--digits-seconds`; warm-up 100 steps): counted from the start of `fit`, tracing
              and the first step included (what a user waits for), and stopped by a Keras
              callback (`WallClockBudget` sets `model.stop_training` at the end of the step
              that uses the budget up). On the way it scores the test set at `--checkpoints`
              training times spaced geometrically from 1/32 of the budget, with the clock
              paused: EMA weights swapped in (`train_config.ema_weights`), converged Lipschitz
              estimates, evaluation mode - the code that scores the final model (`score`). The
              table gives the test NLL at the budget, the steps reached and the step time; one
              picture per data set (`compare_flows_<data set>.png` next to the JSON) the mean
              test NLL over seeds against training seconds, min-max shaded. Models of a time
              budget share the machine with whatever else runs on it: the JSON records the
              load average before and after.

Three seeds per model: mean, standard deviation and min-max.

`tfb.Glow` itself runs with Keras 3 networks in float32, but its ActNorm and 1x1-convolution
parameters are raw `tf.Variable`s created inside TFP, which Keras 3 neither tracks nor trains
(measured: none of its 12 variables changes during `fit`); hence the equivalent built here.
`FlowModel` finds the Keras layers of this package's bijectors only
(`fresh_bijector.keras_layers_of`), so the coupling networks are handed to a `FlowModel`
subclass that owns them (`NetworkOwningFlowModel`); without it `fit` would train nothing.

    python benchmarks/compare_flows.py            # equal steps: about 7 minutes on 2 CPU cores
    python benchmarks/compare_flows.py --quick    # both budgets, tiny settings (3 s budgets,
                                                  # small models: QUICK_TOY_LAYERS, ...)
    python benchmarks/compare_flows.py --long     # equal seconds for the README: 180 s per toy
                                                  # model and seed, 360 s per digits model
                                                  # (every registered model: about 4 hours)
    python benchmarks/compare_flows.py --budget seconds --datasets checkerboard --seeds 1 \
        --models resflow-lipswish realnvp --toy-seconds 20
    python benchmarks/compare_flows.py --datasets checkerboard --seeds 1 --toy-steps 100
    python benchmarks/compare_flows.py --merge A.json B.json --output AB.json
                                                  # one file, tables and pictures from the
                                                  # time-budget runs of several processes

Prints markdown tables and writes `benchmarks/results/compare_flows.json` (or `--output`; a run
with `--budget seconds`, as `--long`, writes `compare_flows_seconds.json`, so the equal-steps
results stay).
"""

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TextIO

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_probability as tfp  # noqa: E402
from measure import save_figure, write_results  # noqa: E402

from tfp_resflow.bijectors import multiscale  # noqa: E402
from tfp_resflow.bijectors.actnorm import ActNorm, ActNormLayer  # noqa: E402
from tfp_resflow.bijectors.flow import ResidualFlowBijector  # noqa: E402
from tfp_resflow.bijectors.image import LogitTransform, Squeeze  # noqa: E402
from tfp_resflow.configs import presets
from tfp_resflow.configs.config_fields import with_fields  # noqa: E402
from tfp_resflow.data import datasets
from tfp_resflow.models.model import FlowModel  # noqa: E402
from tfp_resflow.training import train_config

tfb = tfp.bijectors

tf.get_logger().setLevel("ERROR")  # a new tf.function per setting is intended
RESULTS = Path(__file__).resolve().parent / "results" / "compare_flows.json"
RESULTS_SECONDS = RESULTS.with_name("compare_flows_seconds.json")  # a time budget alone
TOY_SETS = ("8gaussians", "checkerboard", "2spirals")
DATASETS = (*TOY_SETS, "digits")
# Learning-rate tuning (`tune_learning_rates`): the grid, the seed of its runs (not a reported
# seed) and the fraction of the last steps whose training loss scores a run.
LEARNING_RATE_GRID = (2e-3, 5e-3, 1e-2, 2e-2)
TUNING_SEED = 100
TUNING_TAIL = 0.2
MAX_GRID_EXTENSIONS = 3  # past an end of the grid where a model's best rate lies
CALIBRATION_STEPS = 60  # steps per model of `--calibrate` (the first one traces)
PARAMETER_TOLERANCE = 0.10  # parameter counts within 10% of the residual flow's
TOY_TEST_POINTS = 10_000
NUM_SAMPLES = 64
# Time budgets per model and seed (seconds of training wall-clock).
TOY_SECONDS, DIGITS_SECONDS = 30.0, 60.0
LONG_TOY_SECONDS, LONG_DIGITS_SECONDS = 180.0, 360.0  # --long: the README's run
QUICK_SECONDS = 3.0
MAX_STEPS = 10**7  # a time budget's step cap: never reached


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
    h, w, c = datasets.DIGITS_SHAPE
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


# ------------------------------------------------------------------------------------------------
# The model registries: name -> builder (seed -> an unbuilt FlowModel). A variant is one line.

FlowBuilder = Callable[..., FlowModel]  # (seed, small=False) -> an unbuilt FlowModel
DIGITS_LOSS = {"loss_unit": "bits_per_dim", "num_levels": datasets.DIGITS_NUM_LEVELS}

# --quick builds every model small (`small=True`): it checks that each one trains, is scored and
# samples, not how well. Each model shrinks alike, so the baselines stay within
# PARAMETER_TOLERANCE of the reference (checked by the quick run; the full sizes by
# tests/test_benchmarks.py): toy flows of 1 block, coupling or MAF layer instead of 8; the
# residual digits flow with 2 blocks at 8x8x1, 1 at 4x4x4 and 1 fully connected one (19,359
# parameters; 4, 4 and 2 in full) against a Glow of 1 step at 4x4x4 and 2 at 2x2x16 (19,452).
QUICK_TOY_LAYERS = 1
QUICK_DIGITS_FIELDS = {"blocks_per_scale": (2, 1), "fc_end_blocks": 1}
QUICK_GLOW_STEPS = (1, 2)


# The i-DenseNet variants (`network="dense"`, CLipSwish), sized like the reference model: toy
# growths 88-88 (36,036 parameters); digits growth 20 with kernels 3-3-1 and fully connected
# blocks of projection 48 and growths 40-40 (47,678).
IDENSENET_TOY = {"network": "dense", "activation": "clipswish", "hidden_units": (88, 88)}
IDENSENET_DIGITS = {
    "network": "dense",
    "activation": "clipswish",
    "hidden_channels": 20,
    "kernel_sizes": (3, 3, 1),
    "fc_hidden_units": (48, 40, 40),
}


def toy_resflow(**fields: object) -> FlowBuilder:
    """`ResidualFlowBijector(presets.TOY)` with `fields` changed (`config_fields.with_fields`)."""
    config = with_fields(presets.TOY, **fields)
    quick_config = with_fields(config, num_blocks=QUICK_TOY_LAYERS)
    return lambda seed, small=False: FlowModel(
        ResidualFlowBijector(quick_config if small else config), event_shape=[2]
    )


def digits_resflow(**fields: object) -> FlowBuilder:
    """The `digits` preset image flow with `fields` changed (`config_fields.with_fields`)."""
    config = with_fields(presets.get_preset("digits"), **fields)
    quick_config = with_fields(config, **QUICK_DIGITS_FIELDS)
    return lambda seed, small=False: FlowModel(
        multiscale.image_flow(datasets.DIGITS_SHAPE, quick_config if small else config),
        datasets.DIGITS_SHAPE,
        **DIGITS_LOSS,
    )


def network_owning(flow: Callable[..., tuple], event_shape, **kwargs: object) -> FlowBuilder:
    """A TFP flow `flow(seed, small) -> (bijector, networks)` in a `NetworkOwningFlowModel`."""

    def build(seed: int, *, small: bool = False) -> FlowModel:
        bijector, networks = flow(seed, small=small)
        return NetworkOwningFlowModel(bijector, event_shape, networks=networks, **kwargs)

    return build


TOY_FLOWS: dict[str, FlowBuilder] = {
    # LipSwish and ELU with g 2-64-64-2; CLipSwish doubles the width the next layer reads, so
    # 45-45 keeps that size (the `TOY` preset).
    "resflow-lipswish": toy_resflow(activation="lipswish", hidden_units=(64, 64)),
    "resflow-clipswish": toy_resflow(activation="clipswish", hidden_units=(45, 45)),
    "resflow-elu": toy_resflow(activation="elu", hidden_units=(64, 64)),
    "idensenet": toy_resflow(**IDENSENET_TOY),
    "realnvp": network_owning(
        lambda seed, small: realnvp_2d(QUICK_TOY_LAYERS) if small else realnvp_2d(), [2]
    ),
    "maf": network_owning(lambda seed, small: maf_2d(QUICK_TOY_LAYERS) if small else maf_2d(), [2]),
}
DIGITS_FLOWS: dict[str, FlowBuilder] = {
    "resflow-lipswish": digits_resflow(activation="lipswish"),
    # Equal size for CLipSwish: 14 hidden channels and 45-45 fully connected (45,109).
    "resflow-clipswish": digits_resflow(
        activation="clipswish", hidden_channels=14, fc_hidden_units=(45, 45)
    ),
    "resflow-elu": digits_resflow(activation="elu"),
    "idensenet": digits_resflow(**IDENSENET_DIGITS),
    "glow": network_owning(
        lambda seed, small: (
            glow_digits(QUICK_GLOW_STEPS, seed=seed) if small else glow_digits(seed=seed)
        ),
        datasets.DIGITS_SHAPE,
        **DIGITS_LOSS,
    ),
}


REFERENCE_MODEL = "resflow-lipswish"  # parameter ratios are to this model
ALIASES = {"resflow": REFERENCE_MODEL}  # the name before the registry
# The equal-steps comparison's models (as before the registry); a time budget runs them all.
STEP_MODELS = (REFERENCE_MODEL, "realnvp", "maf", "glow")
QUICK_TIME_MODELS = (REFERENCE_MODEL, "realnvp", "glow")  # --quick's time budget: one baseline
MODEL_NAMES = tuple(dict.fromkeys([*TOY_FLOWS, *DIGITS_FLOWS, *ALIASES]))


def flows_for(dataset: str) -> dict[str, FlowBuilder]:
    """The registry of a data set's models."""
    return DIGITS_FLOWS if dataset == "digits" else TOY_FLOWS


def canonical(model_name: str) -> str:
    """The registry name of `model_name` (aliases resolved)."""
    return ALIASES.get(model_name, model_name)


def models_for(dataset: str, names: Iterable[str]) -> list[str]:
    """The registered models of `dataset` among `names` (aliases resolved, in registry order)."""
    wanted = {canonical(name) for name in names}
    return [name for name in flows_for(dataset) if name in wanted]


def build_model(dataset: str, model_name: str, seed: int, *, small: bool = False) -> FlowModel:
    """The FlowModel of one (data set, model) pair (`small`: its --quick size)."""
    return flows_for(dataset)[canonical(model_name)](seed, small=small)


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
    """Equal training budget for every model of a data set: steps, or wall-clock seconds.

    With `seconds`, `fit` stops once that much training time has passed (`WallClockBudget`);
    `steps` is then only a cap (and the schedule's length: warm-up, then constant), and the test
    loss is also taken at `checkpoints - 1` points on the way (`checkpoint_seconds`).
    """

    steps: int
    batch_size: int
    learning_rate: float = 2e-3
    warmup_steps: int = 100
    ema_momentum: float = 0.99
    sample_repeats: int = 3  # timed sampling calls after the first; 0: no sampling
    seconds: float | None = None  # training time per model and seed
    checkpoints: int = 10  # test-loss evaluations of a time budget, the final one included
    clock: str = "wall"  # how `seconds` are counted: a name of CLOCKS, or "calibrated"
    # With clock="calibrated": (first step, every later step) in seconds of an idle machine
    # (`calibrate`); the budget is then the steps that fit in `seconds` at that speed.
    calibrated: tuple[float, float] | None = None

    def train_config(self, seed: int) -> train_config.TrainConfig:
        return train_config.TrainConfig(
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            warmup_steps=min(self.warmup_steps, max(1, self.steps // 5)),
            ema_momentum=self.ema_momentum,
            seed=seed,
        )


class StepTimer(keras.callbacks.Callback):
    """Wall time of every `fit` step (the loss is read at the end, so the step has finished).

    Also keeps Keras' running mean of the training loss after every step (`running_losses`),
    from which `tail_loss` takes the mean over the last steps.
    """

    def __init__(self) -> None:
        super().__init__()
        self.seconds: list[float] = []
        self.running_losses: list[float] = []

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        loss = float(keras.ops.convert_to_numpy((logs or {}).get("loss", 0.0)))
        self.seconds.append(time.perf_counter() - self._start)
        self.running_losses.append(loss)

    def tail_loss(self, fraction: float = TUNING_TAIL) -> float:
        """Mean training loss over the last `fraction` of the steps (one epoch of `fit`).

        Keras reports m_k, the mean of the first k step losses, so the mean over steps
        a+1..n is (n m_n - a m_a) / (n - a).
        """
        n = len(self.running_losses)
        a = min(int(n * (1 - fraction)), n - 1)
        before = a * self.running_losses[a - 1] if a > 0 else 0.0
        return (n * self.running_losses[-1] - before) / (n - a)


def checkpoint_seconds(seconds: float, count: int, first_fraction: float = 1 / 32) -> list[float]:
    """`count` training times, geometric from `first_fraction * seconds` to `seconds`.

    Geometric, because the loss falls fastest early; the last one is the budget itself.
    """
    if count < 2:
        return [seconds]
    ratio = first_fraction ** (1 / (count - 1))
    return [seconds * ratio ** (count - 1 - k) for k in range(count)]


# How a time budget is counted. "wall": wall-clock, what a user waits for on an idle machine.
# "cpu": the process's CPU time, which on a pinned core with one TensorFlow thread equals the
# wall-clock of an idle core but does not count time the process waits for a busy machine, so a
# long comparison can run beside other work and still give every model the same compute.
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


class WallClockBudget(keras.callbacks.Callback):
    """Stops `fit` when its training time reaches `seconds`; scores checkpoints on the way.

    The clock starts at `start_clock()` (called right before `fit`; else at `on_train_begin`),
    so tracing and the first step count: that is what a user waits for. When a step ends past
    a checkpoint time, `evaluate()` runs (the test loss of the EMA weights in evaluation mode)
    with the clock paused, and `(checkpoint, seconds, steps, test_loss)` goes to `curve`; a
    step past several checkpoints (the first, which traces) scores once, under the latest.
    The budget's own point is left to the caller, who scores the model `fit` returns.

    Args:
        seconds: the training time after which `fit` stops (at the end of that step).
        checkpoints: training times at which to evaluate (those >= `seconds` are skipped).
        evaluate: returns the test loss; None: no checkpoints.
        clock: the time in seconds (a value of `CLOCKS`; default the wall-clock).
    """

    def __init__(
        self,
        seconds: float,
        checkpoints: Iterable[float] = (),
        evaluate: Callable[[], float] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        super().__init__()
        self.seconds = seconds
        self.clock = clock
        self._pending = sorted(t for t in checkpoints if t < seconds) if evaluate else []
        self.evaluate = evaluate
        self.curve: list[dict] = []
        self.steps = 0
        self.train_seconds = 0.0  # training time at the end of the last step
        self.paused_seconds = 0.0  # time spent in checkpoint evaluations
        self._start: float | None = None

    def start_clock(self) -> None:
        self._start = self.clock()
        self.paused_seconds = 0.0

    def on_train_begin(self, logs: dict | None = None) -> None:
        if self._start is None:
            self.start_clock()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        # Reading the loss waits for the step to finish.
        float(keras.ops.convert_to_numpy((logs or {}).get("loss", 0.0)))
        self.steps += 1
        self.train_seconds = self.clock() - self._start - self.paused_seconds
        if self.train_seconds >= self.seconds:
            self.model.stop_training = True
            return
        due = [t for t in self._pending if t <= self.train_seconds]
        if not due:
            return
        self._pending = self._pending[len(due) :]
        pause = self.clock()
        loss = self.evaluate()
        self.curve.append(
            {
                "checkpoint": round(due[-1], 3),
                "seconds": round(self.train_seconds, 3),
                "steps": self.steps,
                "test_loss": loss,
            }
        )
        self.paused_seconds += self.clock() - pause


def calibrated_clock(
    budget: WallClockBudget, first_step_seconds: float, step_seconds: float
) -> Callable[[], float]:
    """The idle-machine time of the steps `budget` has counted: a clock that load cannot move.

    0 before the first step, `first + (k - 1) * step` after k steps, so a time budget becomes
    the steps that fit in it at the speed `calibrate` measured on an idle machine: the
    comparison is the same whatever else runs while it trains.
    """

    def seconds() -> float:
        steps = budget.steps
        return 0.0 if steps == 0 else first_step_seconds + (steps - 1) * step_seconds

    return seconds


def calibrate(
    dataset: str, names: Iterable[str], budget: Budget, steps: int, *, small: bool = False
) -> dict:
    """Each model's first-step and median later-step wall time, `{model: {...}}`.

    Run on an idle machine: these are the speeds a `--clock calibrated` comparison charges.
    """
    budget = dataclasses.replace(budget, steps=steps, sample_repeats=0)

    def run(name: str, timer: StepTimer) -> None:
        keras.utils.set_random_seed(0)
        model = build_model(dataset, name, 0, small=small)
        train_and_evaluate(model, dataset, budget, 0, timer=timer)

    return time_steps(dataset, names, run)


def time_steps(
    label: str,
    names: Iterable[str],
    run: Callable[[str, StepTimer], object],
    stream: TextIO | None = None,
) -> dict:
    """`{model: {first_step_seconds, step_seconds (median of the later steps), steps}}` of one
    `run(name, timer)` per model, each reported on `stream` (default stdout). The measurement
    of `calibrate`, shared with `conditional.py`."""
    timing = {}
    for name in names:
        timer = StepTimer()
        run(name, timer)
        timing[name] = {
            "first_step_seconds": round(timer.seconds[0], 4),
            "step_seconds": statistics.median(timer.seconds[1:]),
            "steps": len(timer.seconds),
        }
        print(
            f"  calibration {label} {name}: first step {timer.seconds[0]:.2f} s, then "
            f"{1000 * timing[name]['step_seconds']:.1f} ms per step",
            file=stream,
        )
    return timing


def read_calibration(paths: Sequence[Path]) -> dict:
    """`{set or task: {model: {first_step_seconds, step_seconds}}}` from one or more
    `--calibrate` outputs: per entry, the median over the files of each time.

    Why several: two calibrations of the same toy flow on the same idle machine differed by up
    to 1.7x in median step time (21 and 37 ms, 2026-12-07), so one calibration can hand one
    model a budget far from its usual speed; the median of three calibrations made at
    different times is what `--long` uses. An entry missing from any file is left out.
    """
    loaded = [json.loads(Path(p).read_text())["calibration"] for p in paths]
    merged: dict = {}
    for key in loaded[0]:
        for model in loaded[0][key]:
            entries = [c.get(key, {}).get(model) for c in loaded]
            if any(e is None for e in entries):
                continue
            merged.setdefault(key, {})[model] = {
                field: statistics.median(e[field] for e in entries)
                for field in ("first_step_seconds", "step_seconds")
            }
    return merged


def score(model: FlowModel, test: tf.data.Dataset, config: train_config.TrainConfig) -> float:
    """Test loss of the weights in place, in evaluation mode, with converged norm estimates."""
    model.update_lipschitz(atol=config.lipschitz_tolerance, rtol=config.lipschitz_tolerance)
    return train_config.evaluate_loss(model, test)


def datasets_for(dataset: str, budget: Budget, seed: int):
    """(training stream, finite test set, the first training batch for ActNorm's init)."""
    if dataset == "digits":
        train = datasets.digits_dataset("train", batch_size=budget.batch_size, seed=seed)
        test = datasets.digits_dataset("test", batch_size=300, training=False)
    else:
        train = datasets.toy_dataset(
            dataset, batch_size=budget.batch_size, num_samples=datasets.TOY_NUM_SAMPLES, seed=seed
        )
        test = datasets.toy_dataset(
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
    timer: StepTimer | None = None,
) -> dict:
    """Trains `model` by the recipe for `budget.steps` steps (or `budget.seconds`); scores it.

    Under a time budget the row also has the training time used, the checkpoints' evaluation
    time, and `curve`: the test loss at the checkpoints and at the end.
    """
    train, test, init_batch = datasets_for(dataset, budget, seed)
    model.build((None, *model.event_shape))
    model.initialize(init_batch)
    config = budget.train_config(seed)
    model.compile(optimizer=train_config.make_optimizer(config, budget.steps))
    timer = timer or StepTimer()
    callbacks: list[keras.callbacks.Callback] = [timer]  # the timer first: steps end before a pause
    clock = None
    if budget.seconds is not None:
        power_vectors: dict = {}  # the EMA weights' power-iteration vectors between checkpoints

        def evaluate_ema() -> float:
            with train_config.ema_weights(model, power_vectors):
                return score(model, test, config)

        times = checkpoint_seconds(budget.seconds, budget.checkpoints)
        if budget.clock == "calibrated":
            clock = WallClockBudget(budget.seconds, times, evaluate_ema)
            clock.clock = calibrated_clock(clock, *budget.calibrated)
        else:
            clock = WallClockBudget(budget.seconds, times, evaluate_ema, CLOCKS[budget.clock])
        callbacks.append(clock)
    start = time.perf_counter()
    if clock is not None:
        clock.start_clock()
    model.fit(
        train, epochs=1, steps_per_epoch=budget.steps, verbose=0, callbacks=callbacks, shuffle=False
    )
    train_seconds = time.perf_counter() - start
    # fit ends with the EMA weights in place (Keras' use_ema); converge the norm estimates for
    # them before scoring, as train_tf.py does.
    start = time.perf_counter()
    test_loss = score(model, test, config)
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
    row = {
        "test_loss": test_loss,
        "unit": model.loss_unit,
        "parameters": total,
        "free_parameters": free,
        "steps": len(timer.seconds),
        "batch_size": budget.batch_size,
        "first_step_seconds": round(timer.seconds[0], 3),
        "step_seconds_median": statistics.median(steps_after_first),
        "train_seconds": round(train_seconds, 2),
        "evaluation_seconds": round(evaluation_seconds, 2),
        "first_sample_seconds": first_sample_seconds,
        "sample_seconds_median": statistics.median(sample_times) if sample_times else None,
        "samples_finite": finite,
    }
    if clock is not None:
        end = {"checkpoint": budget.seconds, "seconds": round(clock.train_seconds, 3)}
        end.update({"steps": clock.steps, "test_loss": test_loss})
        row.update(
            budget_seconds=budget.seconds,
            clock=budget.clock,
            # The wall time of fit, checkpoint evaluations included.
            wall_train_seconds=round(train_seconds, 2),
            # The clock's training time (calibrated: the idle machine's time of these steps).
            train_seconds=round(clock.train_seconds, 2),
            checkpoint_evaluation_seconds=round(clock.paused_seconds, 2),
            curve=[*clock.curve, end],
        )
    return row


def run_one(
    dataset: str,
    model_name: str,
    seed: int,
    budget: Budget,
    save_path=None,
    *,
    small: bool = False,
) -> dict:
    keras.utils.set_random_seed(seed)
    model = build_model(dataset, model_name, seed, small=small)
    row = {"dataset": dataset, "model": canonical(model_name), "seed": seed}
    row["learning_rate"] = budget.learning_rate
    row.update(train_and_evaluate(model, dataset, budget, seed, save_path=save_path))
    return row


def tune_learning_rates(
    dataset: str,
    names: Iterable[str],
    budget: Budget,
    grid: Sequence[float],
    max_extensions: int = MAX_GRID_EXTENSIONS,
    *,
    small: bool = False,
) -> tuple[dict[str, float], list[dict]]:
    """Each model's learning rate: the grid value with the lowest late training loss.

    Every model gets the same care: one run per grid value (seed `TUNING_SEED`, not one of the
    reported seeds, the budget of the comparison), scored by its mean training loss over the
    last `TUNING_TAIL` of its steps (`StepTimer.tail_loss`), so the test set plays no part.
    A run that ends with a non-finite loss scores inf. When a model's best value is at an end
    of the grid, the grid grows past that end by the ratio of its last two values, up to
    `max_extensions` times per model: no model's optimum is cut off by the grid.

    Returns:
        `{model: learning rate}` and the tuning rows (one per model and rate tried).
    """
    rows = []
    budget = dataclasses.replace(budget, sample_repeats=0)

    def score(name: str, rate: float) -> float:
        keras.utils.set_random_seed(TUNING_SEED)
        model = build_model(dataset, name, TUNING_SEED, small=small)
        timer = StepTimer()
        tuned = dataclasses.replace(budget, learning_rate=rate)
        row = train_and_evaluate(model, dataset, tuned, TUNING_SEED, timer=timer)
        tail = timer.tail_loss()
        rows.append(
            {
                "dataset": dataset,
                "model": name,
                "learning_rate": rate,
                "tail_loss": tail,
                "test_loss": row["test_loss"],
                "steps": row["steps"],
            }
        )
        print(f"  tuning {dataset} {name} lr={rate:g}: late training loss {tail:.4f}")
        return tail if math.isfinite(tail) else math.inf

    chosen = {
        name: best_on_growing_grid(grid, lambda rate, name=name: score(name, rate), max_extensions)
        for name in names
    }
    return chosen, rows


def best_on_growing_grid(
    grid: Sequence[float], score: Callable[[float], float], max_extensions: int
) -> float:
    """The grid value of lowest `score`, the grid grown past a winning end.

    When the best value is at an end of the grid, the grid grows past that end by the ratio
    of its last two values, up to `max_extensions` times: no optimum is cut off by the grid.
    (The rule of `tune_learning_rates`, shared with `conditional.py`.)
    """
    scores = {rate: score(rate) for rate in grid}
    for _ in range(max_extensions):
        rates = sorted(scores)
        best = min(scores, key=scores.get)
        if len(rates) < 2 or best not in (rates[0], rates[-1]):
            break
        if best == rates[0]:
            new = best * rates[0] / rates[1]
        else:
            new = best * rates[-1] / rates[-2]
        scores[new] = score(new)
    return min(scores, key=scores.get)


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


def _groups(rows: list[dict]) -> Iterable[tuple[str, str, list[dict], list[dict]]]:
    """(data set, model, its rows, the reference model's rows of that data set), in order."""
    keys = sorted({(r["dataset"], r["model"]) for r in rows}, key=_order)
    for dataset, model_name in keys:
        group = [r for r in rows if r["dataset"] == dataset and r["model"] == model_name]
        reference = [r for r in rows if r["dataset"] == dataset and r["model"] == REFERENCE_MODEL]
        yield dataset, model_name, group, reference


def _parameters(group: list[dict], reference: list[dict]) -> dict:
    """Parameter counts (and the ratio to the reference model's) and the learning rate."""
    entry = {"parameters": group[0]["parameters"], "free_parameters": group[0]["free_parameters"]}
    entry["learning_rate"] = group[0].get("learning_rate")
    if reference:
        ratio = entry["parameters"] / reference[0]["parameters"]
        entry["parameters_vs_resflow"] = round(ratio, 4)
        entry["parameters_within_tolerance"] = abs(ratio - 1) <= PARAMETER_TOLERANCE
    return entry


def summarise(rows: list[dict]) -> list[dict]:
    """Per (data set, model) of an equal-steps run: spreads over seeds."""
    summary = []
    for dataset, model_name, group, reference in _groups(rows):
        entry = {"dataset": dataset, "model": model_name, "unit": group[0]["unit"]}
        entry.update(_parameters(group, reference))
        entry.update(
            test_loss=spread([r["test_loss"] for r in group]),
            step_seconds=spread([r["step_seconds_median"] for r in group]),
            sample_seconds=spread([r["sample_seconds_median"] for r in group]),
            first_step_seconds=spread([r["first_step_seconds"] for r in group]),
            seeds=[r["seed"] for r in group],
        )
        summary.append(entry)
    return summary


def summarise_time(rows: list[dict]) -> list[dict]:
    """Per (data set, model) of a time-budget run: spreads at the budget, and the mean curve.

    The curve groups the seeds' points by checkpoint (a scheduled time): the mean, min and max
    test loss over the seeds that reached it, at their mean training time.
    """
    summary = []
    for dataset, model_name, group, reference in _groups(rows):
        entry = {"dataset": dataset, "model": model_name, "unit": group[0]["unit"]}
        entry.update(_parameters(group, reference))
        entry.update(
            budget_seconds=group[0]["budget_seconds"],
            test_loss=spread([r["test_loss"] for r in group]),
            steps=spread([r["steps"] for r in group]),
            step_seconds=spread([r["step_seconds_median"] for r in group]),
            train_seconds=spread([r["train_seconds"] for r in group]),
            first_step_seconds=spread([r["first_step_seconds"] for r in group]),
            seeds=[r["seed"] for r in group],
        )
        points = [point for r in group for point in r["curve"]]
        curve = []
        for checkpoint in sorted({p["checkpoint"] for p in points}):
            at = [p for p in points if p["checkpoint"] == checkpoint]
            losses = [p["test_loss"] for p in at]
            curve.append(
                {
                    "checkpoint": checkpoint,
                    "seconds": statistics.fmean(p["seconds"] for p in at),
                    "steps": statistics.fmean(p["steps"] for p in at),
                    "test_loss_mean": statistics.fmean(losses),
                    "test_loss_min": min(losses),
                    "test_loss_max": max(losses),
                    "seeds": len(at),
                }
            )
        entry["curve"] = curve
        summary.append(entry)
    return summary


def _order(key: tuple[str, str]) -> tuple[int, int]:
    dataset, model_name = key
    return DATASETS.index(dataset), list(flows_for(dataset)).index(model_name)


def _unit(summary_entry: dict) -> str:
    return "bits/dim" if summary_entry["unit"] == "bits_per_dim" else "nats"


def _parameter_cell(s: dict) -> str:
    params = f"{s['parameters']:,}"
    if s["free_parameters"] != s["parameters"]:
        params += f" ({s['free_parameters']:,} unmasked)"
    # Without the reference model in the run (`--models`) there is no ratio to show.
    ratio = s.get("parameters_vs_resflow")
    return params if ratio is None else params + f" ({ratio:.3f}x)"


def _rate(s: dict) -> str:
    return "-" if s.get("learning_rate") is None else f"{s['learning_rate']:g}"


def print_tables(summary: list[dict]) -> None:
    print(
        "| data | model | parameters (vs resflow) | learning rate | test NLL | step (ms) "
        "| sample 64 (ms) | first step (s) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for s in summary:
        print(
            f"| {s['dataset']} | {s['model']} | {_parameter_cell(s)} | {_rate(s)} "
            f"| {format_spread(s['test_loss'])} {_unit(s)} "
            f"| {format_spread(s['step_seconds'], 1, 1e3)} "
            f"| {format_spread(s['sample_seconds'], 1, 1e3)} "
            f"| {s['first_step_seconds']['mean']:.1f} |"
        )


def print_time_tables(summary: list[dict]) -> None:
    """One table per data set: the test loss when the time budget is used up."""
    for dataset in dict.fromkeys(s["dataset"] for s in summary):
        rows = [s for s in summary if s["dataset"] == dataset]
        print(
            f"\n{dataset}: {rows[0]['budget_seconds']:g} s of training per model and seed "
            f"({rows[0]['test_loss']['n']} seeds)\n"
        )
        print(
            "| model | parameters (vs resflow) | learning rate | test NLL at the budget "
            "| steps reached | step (ms) | first step (s) |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for s in rows:
            steps = s["steps"]
            print(
                f"| {s['model']} | {_parameter_cell(s)} | {_rate(s)} "
                f"| {format_spread(s['test_loss'])} {_unit(s)} "
                f"| {steps['mean']:.0f} [{steps['min']:.0f}, {steps['max']:.0f}] "
                f"| {format_spread(s['step_seconds'], 1, 1e3)} "
                f"| {s['first_step_seconds']['mean']:.1f} |"
            )


def plot_curves(summary: list[dict], dataset: str, path: Path) -> None:
    """Mean test loss over seeds vs training seconds, one line per model, min-max shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = [s for s in summary if s["dataset"] == dataset]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in rows:
        curve = s["curve"]
        seconds = [p["seconds"] for p in curve]
        ax.plot(seconds, [p["test_loss_mean"] for p in curve], marker="o", ms=3, label=s["model"])
        low, high = [p["test_loss_min"] for p in curve], [p["test_loss_max"] for p in curve]
        ax.fill_between(seconds, low, high, alpha=0.2)
    # The first checkpoints of a slow starter can be far above the rest: keep the later ones
    # readable (the JSON holds every value).
    finals = [s["curve"][-1]["test_loss_max"] for s in rows]
    middles = [s["curve"][len(s["curve"]) // 2]["test_loss_max"] for s in rows]
    lowest = min(p["test_loss_min"] for s in rows for p in s["curve"])
    top = max(*middles, *finals)
    span = max(top - lowest, 1e-3)
    ax.set_ylim(lowest - 0.05 * span, top + 0.25 * span)
    ax.set_xscale("log")
    # Plain numbers on the log axis; within a decade every minor tick, else 2x and 5x only.
    seconds = [p["seconds"] for s in rows for p in s["curve"]]
    decade = max(seconds) < 10 * min(seconds)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(
        matplotlib.ticker.FuncFormatter(
            lambda v, _: f"{v:g}" if decade or f"{v:.0e}"[0] in "25" else ""
        )
    )
    ax.set_xlabel("training seconds (tracing and first step included; evaluations excluded)")
    ax.set_ylabel(f"test NLL ({_unit(rows[0])})")
    seeds = rows[0]["test_loss"]["n"]
    ax.set_title(
        f"{dataset}: {rows[0]['budget_seconds']:g} s per model, {seeds} seed(s); "
        "EMA weights, evaluation mode",
        fontsize=10,
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def _report(r: dict) -> None:
    sample = r["sample_seconds_median"]
    sample = "" if sample is None else f", sample {1e3 * sample:.1f} ms"
    print(
        f"  {r['dataset']} {r['model']} seed {r['seed']}: test {r['test_loss']:.4f} "
        f"{r['unit']} after {r['steps']} steps ({r['train_seconds']:.1f} s), step "
        f"{1e3 * r['step_seconds_median']:.1f} ms{sample}, {r['parameters']:,} parameters",
        file=sys.stderr,
    )


def _calibrate_only(
    args: argparse.Namespace, argv: list[str] | None, datasets: list, budgets: dict, *, quick: bool
) -> None:
    """`--calibrate`: every model's step time on each data set, to `--output`."""
    load_before = load_average()
    timing = {}
    steps = 3 if quick else CALIBRATION_STEPS
    for dataset in datasets:
        budget = budgets["digits" if dataset == "digits" else "toy"]
        names = models_for(
            dataset, args.models or (QUICK_TIME_MODELS if quick else flows_for(dataset))
        )
        speeds = calibrate(dataset, names, budget, steps, small=quick)
        timing[dataset] = {canonical(name): speed for name, speed in speeds.items()}
    output = args.output or RESULTS.with_name("compare_flows_calibration.json")
    write_results(
        output,
        __file__,
        argv,
        settings={"steps": steps, "statistic": "first step; median of the later steps"},
        load_average_before=load_before,
        load_average_after=load_average(),
        calibration=timing,
    )


def report_time_runs(time_rows: list[dict], directory: Path) -> tuple[list[dict], dict]:
    """Summarises time-budget runs, prints their tables and draws one picture per data set
    (`compare_flows_<data set>.png` in `directory`). Returns the summary and the pictures'
    names by data set."""
    time_summary = summarise_time(time_rows)
    print_time_tables(time_summary)
    plots = {}
    for dataset in dict.fromkeys(r["dataset"] for r in time_rows):
        path = directory / f"compare_flows_{dataset}.png"
        plot_curves(time_summary, dataset, path)
        plots[dataset] = path.name
    return time_summary, plots


def merge_time_runs(paths: list[Path], output: Path, argv: list[str] | None) -> None:
    """One results file from the time-budget runs of several (`--merge`).

    Every run keeps its own settings, recorded per source; the runs must not repeat a
    (data set, model, seed).
    """
    sources = [json.loads(path.read_text()) for path in paths]
    time_rows = [row for source in sources for row in source.get("time_rows", [])]
    keys = [(r["dataset"], r["model"], r["seed"]) for r in time_rows]
    if not time_rows or len(set(keys)) != len(keys):
        raise SystemExit(f"--merge needs time-budget runs without repeats; got {keys}")
    time_summary, plots = report_time_runs(time_rows, output.parent)
    learning_rates: dict = {}
    for source in sources:
        for dataset, rates in source.get("learning_rates", {}).items():
            learning_rates.setdefault(dataset, {}).update(rates)
    write_results(
        output,
        __file__,
        argv,
        merged_from=[
            {"path": str(path), "command": source["command"], "settings": source["settings"]}
            for path, source in zip(paths, sources, strict=True)
        ],
        time_rows=time_rows,
        time_summary=time_summary,
        plots=plots,
        learning_rates=learning_rates,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings (seconds per model)")
    parser.add_argument(
        "--long",
        action="store_true",
        help=f"time budget for the README: {LONG_TOY_SECONDS:g} s per toy model and seed, "
        f"{LONG_DIGITS_SECONDS:g} s per digits model, 3 seeds, every model (about 4 hours)",
    )
    parser.add_argument(
        "--budget",
        choices=("steps", "seconds", "both"),
        default=None,
        help="equal steps, equal training wall-clock, or both (default: steps; both with "
        "--quick, seconds with --long)",
    )
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=None)
    parser.add_argument(
        "--models",
        nargs="+",
        choices=MODEL_NAMES,
        default=None,
        help="default: " + ", ".join(STEP_MODELS) + " at equal steps, every registered model "
        "of a data set at equal seconds; a model a data set lacks is skipped for it",
    )
    parser.add_argument("--seeds", type=int, default=None, help="seeds per model (default 3)")
    parser.add_argument("--toy-steps", type=int, default=None, help="default 400")
    parser.add_argument("--toy-batch-size", type=int, default=256)
    parser.add_argument(
        "--digits-steps", type=int, default=None, help="default 115: 5 epochs of 1500 at 64"
    )
    parser.add_argument("--digits-batch-size", type=int, default=64)
    parser.add_argument(
        "--clock",
        choices=(*CLOCKS, "calibrated"),
        default="wall",
        help="how time budgets count: wall-clock (default); the process's CPU time (a run "
        "pinned to one core with one TensorFlow thread); or 'calibrated': the steps that fit "
        "in the budget at the speeds of --calibration, measured on an idle machine (the "
        "result does not depend on the load while it trains)",
    )
    parser.add_argument(
        "--learning-rates-from",
        type=Path,
        help="take each model's learning rate from an earlier run's results JSON (its "
        "tuned `learning_rates`) instead of tuning again",
    )
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help=f"only measure every model's step time ({CALIBRATION_STEPS} steps each, on an "
        "idle machine) and write them to --output, for --clock calibrated",
    )
    parser.add_argument(
        "--calibration",
        type=Path,
        nargs="+",
        help="the --calibrate output(s) used by --clock calibrated; with several, each "
        "model's median time over them",
    )
    parser.add_argument(
        "--toy-seconds",
        type=float,
        default=None,
        help=f"time budget per toy model and seed (default {TOY_SECONDS:g}; --quick "
        f"{QUICK_SECONDS:g}, --long {LONG_TOY_SECONDS:g})",
    )
    parser.add_argument(
        "--digits-seconds",
        type=float,
        default=None,
        help=f"time budget per digits model and seed (default {DIGITS_SECONDS:g}; --quick "
        f"{QUICK_SECONDS:g}, --long {LONG_DIGITS_SECONDS:g})",
    )
    parser.add_argument(
        "--checkpoints",
        type=int,
        default=None,
        help="test-loss evaluations per time-budget run, the final one included (default 10, "
        "--quick 2)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="default: results/compare_flows.json; results/compare_flows_seconds.json for "
        "--budget seconds (the curves' pictures go next to it: compare_flows_<data set>.png)",
    )
    parser.add_argument(
        "--learning-rates",
        nargs="+",
        type=float,
        default=None,
        help="one rate for every model (default 2e-3), or a grid: each model then gets the "
        "grid value with the lowest late training loss at the equal-steps budget "
        "(`tune_learning_rates`; --tune-learning-rates uses "
        + " ".join(f"{r:g}" for r in LEARNING_RATE_GRID)
        + ")",
    )
    parser.add_argument(
        "--tune-learning-rates",
        action="store_true",
        help="tune every model's learning rate on the grid "
        + " ".join(f"{r:g}" for r in LEARNING_RATE_GRID),
    )
    parser.add_argument(
        "--save-digits-model", type=Path, help="save the first seed's residual digits model"
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        help="only combine the time-budget runs of earlier results JSONs (e.g. one process "
        "per model, on separate cores) into one --output, with its tables and pictures",
    )
    args = parser.parse_args(argv)
    if args.merge:
        merge_time_runs(args.merge, args.output or RESULTS_SECONDS, argv)
        return
    quick, long = args.quick, args.long
    if quick and long:
        parser.error("--quick and --long exclude each other")
    if (args.clock == "calibrated") != (args.calibration is not None):
        parser.error("--clock calibrated and --calibration go together")
    calibration = read_calibration(args.calibration) if args.calibration else {}
    budgets = args.budget or ("both" if quick else "seconds" if long else "steps")
    output = args.output or (RESULTS_SECONDS if budgets == "seconds" else RESULTS)
    datasets = args.datasets or (["8gaussians", "digits"] if quick else list(DATASETS))
    seeds = range(args.seeds or (1 if quick else 3))
    repeats = 1 if quick else 3
    toy = Budget(args.toy_steps or (10 if quick else 400), args.toy_batch_size)
    toy = dataclasses.replace(toy, sample_repeats=repeats)
    digits = Budget(args.digits_steps or (3 if quick else 115), args.digits_batch_size)
    digits = dataclasses.replace(digits, sample_repeats=repeats)
    # A time budget: no sampling (the equal-steps run times it), the step count only a cap.
    checkpoints = args.checkpoints or (2 if quick else 10)
    toy_seconds = args.toy_seconds or (
        QUICK_SECONDS if quick else LONG_TOY_SECONDS if long else TOY_SECONDS
    )
    digits_seconds = args.digits_seconds or (
        QUICK_SECONDS if quick else LONG_DIGITS_SECONDS if long else DIGITS_SECONDS
    )
    timed = {"checkpoints": checkpoints, "sample_repeats": 0, "steps": MAX_STEPS}
    timed["clock"] = args.clock
    toy_timed = Budget(batch_size=args.toy_batch_size, seconds=toy_seconds, **timed)
    digits_timed = Budget(batch_size=args.digits_batch_size, seconds=digits_seconds, **timed)

    grid = LEARNING_RATE_GRID if args.tune_learning_rates else args.learning_rates
    grid = tuple(grid or (Budget.learning_rate,))
    if args.calibrate:
        return _calibrate_only(args, argv, datasets, {"toy": toy, "digits": digits}, quick=quick)

    load_before = load_average()
    start = time.perf_counter()
    rows, time_rows, tuning_rows, learning_rates = [], [], [], {}
    for dataset in datasets:
        step_budget = digits if dataset == "digits" else toy
        step_names = models_for(dataset, args.models or STEP_MODELS)
        time_names = models_for(
            dataset, args.models or (QUICK_TIME_MODELS if quick else flows_for(dataset))
        )
        names = list(dict.fromkeys([*step_names, *time_names]))
        if args.learning_rates_from:
            earlier = json.loads(args.learning_rates_from.read_text())["learning_rates"]
            missing = [n for n in names if canonical(n) not in earlier.get(dataset, {})]
            if missing:
                parser.error(f"{args.learning_rates_from} has no rate for {missing} on {dataset}")
            rates = {n: earlier[dataset][canonical(n)] for n in names}
        elif len(grid) > 1:
            rates, tuned = tune_learning_rates(dataset, names, step_budget, grid, small=quick)
            tuning_rows.extend(tuned)
        else:
            rates = dict.fromkeys(names, grid[0])
        learning_rates[dataset] = rates
        if budgets in ("steps", "both"):
            for model_name in step_names:
                budget = dataclasses.replace(step_budget, learning_rate=rates[model_name])
                for seed in seeds:
                    save = None
                    if dataset == "digits" and model_name == REFERENCE_MODEL and seed == 0:
                        save = args.save_digits_model
                    rows.append(run_one(dataset, model_name, seed, budget, save, small=quick))
                    _report(rows[-1])
        if budgets in ("seconds", "both"):
            timed_budget = digits_timed if dataset == "digits" else toy_timed
            for model_name in time_names:
                budget = dataclasses.replace(timed_budget, learning_rate=rates[model_name])
                if args.clock == "calibrated":
                    speed = calibration.get(dataset, {}).get(canonical(model_name))
                    if speed is None:
                        parser.error(f"the calibration has no {model_name} on {dataset}")
                    speeds = (speed["first_step_seconds"], speed["step_seconds"])
                    budget = dataclasses.replace(budget, calibrated=speeds)
                for seed in seeds:
                    time_rows.append(run_one(dataset, model_name, seed, budget, small=quick))
                    _report(time_rows[-1])
    results: dict = {}
    if rows:
        summary = summarise(rows)
        print_tables(summary)
        for s in summary:
            if not s.get("parameters_within_tolerance", True):
                print(f"WARNING: {s['dataset']} {s['model']}: parameters differ by more than 10%")
        results.update(rows=rows, summary=summary)
    if time_rows:
        time_summary, plots = report_time_runs(time_rows, output.parent)
        results.update(time_rows=time_rows, time_summary=time_summary, plots=plots)
    results.update(learning_rates=learning_rates, tuning_rows=tuning_rows)
    write_results(
        output,
        __file__,
        argv,
        settings={
            "quick": quick,
            "long": long,
            "budget": budgets,
            "toy_budget": dataclasses.asdict(toy),
            "digits_budget": dataclasses.asdict(digits),
            "toy_time_budget": dataclasses.asdict(toy_timed),
            "digits_time_budget": dataclasses.asdict(digits_timed),
            "toy_test_points": TOY_TEST_POINTS,
            "num_samples": NUM_SAMPLES,
            "recipe": "training.make_optimizer: GroupedAdam beta_2=0.99, linear warm-up "
            "(min(100, steps/5) steps) then constant, clip 1, EMA 0.99; EMA weights scored",
            "learning_rate_grid": list(grid),
            "tuning": "one run per model and grid value at the equal-steps budget (seed "
            f"{TUNING_SEED}); the lowest mean training loss over the last {TUNING_TAIL:g} of "
            f"the steps wins; the grid grows past an end that wins (up to {MAX_GRID_EXTENSIONS} "
            "times)"
            if len(grid) > 1
            else "none: one rate for every model",
            "calibration": [str(p) for p in args.calibration] if args.calibration else None,
            "learning_rates_from": str(args.learning_rates_from or "") or None,
            "time_budget": f"training time ({args.clock} clock) from the start of fit (tracing "
            "and the first step included), checkpoint evaluations excluded; fit stops at the "
            "end of the step that reaches it",
            **(
                {
                    "quick_sizes": {
                        "toy_layers": QUICK_TOY_LAYERS,
                        "digits_fields": QUICK_DIGITS_FIELDS,
                        "glow_steps": QUICK_GLOW_STEPS,
                    }
                }
                if quick
                else {}
            ),
        },
        load_average_before=load_before,
        load_average_after=load_average(),
        seconds=round(time.perf_counter() - start, 1),
        **results,
    )


if __name__ == "__main__":
    main()
