"""Where the Lipschitz budget of a residual block goes: layer and activation gains on the data.

Why: trained blocks have ||J_g||_2 ~ 0.06-0.07 where the bound allows c**n ~ 0.73-0.94. Every
g is linear layers (norm <= c) between 1-Lipschitz activations, so per example

    ||J_g||_F / sqrt(D) = prod_layers gain_l * prod_activations gain_k          (exactly)

where gain = ||T_out||_F / ||T_in||_F and T is the D-column tangent (the Jacobian of that
point of g with respect to the block's input, propagated forward from the identity: the
gain on every direction of the block's input at once). The product telescopes, so the
geometric means over examples multiply too, and a layer's gain splits as

    gain_l = (||A_l|| / c) * c * (gain_l / ||A_l||)
             norm use       bound   direction: the fraction of its norm the signal gets

(||A_l||: the true operator norm of the effective kernel; exact SVD of the dense matrix or of
the explicit convolution operator on its images). An activation's gain on the data is
sqrt(mean phi'(a)^2) over the pre-activations a of held-out points (CLipSwish: the norm of
each unit's 2-row Jacobian), its gain on the signal the tangent ratio above.

What: for the toy model (`ResidualFlowBijector(presets.TOY)` with g 2-64-64-2, checkerboard,
8 blocks, c = 0.9) and the `digits` image flow (`multiscale.image_flow((8, 8, 1),
"digits")`: conv blocks 3x3-1x1-3x3 of width 32 at 8x8x1 and 4x4x4, two fully connected
blocks 64-64-64-64, c = 0.98), at initialisation and after a short training (the recipe of
`compare_flows.py`; toy 400 steps of 256, digits 3 epochs of 23 steps of 64), per variant:

    activations   lipswish (default), clipswish, elu
    initialisers  glorot      Keras' default: glorot_uniform kernels, zero biases
                  orthogonal  `keras.initializers.Orthogonal` kernels (sigma = 1 > c, so they
                              are rescaled to sigma = c exactly), zero biases
                  pytorch     the authors' (nn.Linear / nn.Conv2d defaults): kernel and bias
                              U(-1/sqrt(fan_in), 1/sqrt(fan_in))
                  aligned     ours: orthogonal kernels, and the last layer the adjoint of the
                              chain before it (linearised at the init batch's mean activation
                              slopes), scaled to ||A|| = c: the last layer no longer projects
                              the signal onto random directions, and J_g starts near a
                              positive multiple of I
                  peak        ours: `aligned`, and each hidden layer's bias puts its units'
                              mean pre-activation where the activation's slope peaks (LipSwish
                              and CLipSwish: beta * a = 2.3994; ELU: mean + 3 std > 0); the
                              bound is untouched (biases do not enter it)

An initialiser assigns new kernels (and biases) to every spectral layer of every block after
the flow is built, block by block in data order (so the data-aware ones see the inputs the
earlier, re-initialised blocks give; ActNorms initialise on the way from the same first
training batch `fit` would use), then converges the power iterations
(`update_lipschitz(g, atol=1e-6, rtol=1e-6)`, at most 2000 iterations).

Runs: toy, every activation x initialiser; 3 seeds (`--seeds`) for (lipswish, glorot), the
default, and (lipswish, peak), 1 (`--other-seeds`) for the rest; `--learning-rates` (default
5e-3) repeats those two at other rates. Digits, 1 seed (`--digits-seeds`): every initialiser
with LipSwish, and glorot and peak with CLipSwish and ELU. Test NLL as in `ablations.py`
(toy: nats, exact; digits: bits/dim, roulette with 20 exact terms), with the EMA weights.
Blocks are measured at 256 (toy) / 32 (digits) held-out test points; ||J_g||_2 is the exact
per-example Jacobian of `ablations.exact_block_jacobian` (the tangents above reproduce it:
their largest difference is stored as `jacobian_check`).

    python benchmarks/lipschitz_budget.py --jobs 2   # full: toy and digits in two processes
    python benchmarks/lipschitz_budget.py --quick    # toy (clipswish, peak), 2 blocks, 3 steps
    python benchmarks/lipschitz_budget.py --datasets toy --seeds 1 --toy-steps 100

Prints markdown tables and writes `benchmarks/results/lipschitz_budget.json` (or `--output`).
"""

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from ablations import exact_block_jacobian, residual_blocks  # noqa: E402
from compare_flows import (  # noqa: E402
    Budget,
    datasets_for,
    format_spread,
    load_average,
    spread,
    train_and_evaluate,
)
from measure import write_results  # noqa: E402

from tfp_resflow.bijectors import multiscale  # noqa: E402
from tfp_resflow.bijectors.flow import ResidualFlowBijector  # noqa: E402
from tfp_resflow.configs import presets
from tfp_resflow.configs.config_fields import to_dict, with_fields  # noqa: E402
from tfp_resflow.data import datasets
from tfp_resflow.layers.activation import LipSwish  # noqa: E402
from tfp_resflow.layers.lipschitz import SpectralConv2D, SpectralDense, update_lipschitz  # noqa: E402
from tfp_resflow.layers.spectral_layer import SpectralLayer  # noqa: E402
from tfp_resflow.models.model import FlowModel  # noqa: E402

tf.get_logger().setLevel("ERROR")
RESULTS = Path(__file__).resolve().parent / "results" / "lipschitz_budget.json"
PARTIAL = Path(tempfile.gettempdir()) / f"lipschitz_budget_partial_{os.getpid()}.json"
KINDS = ("toy", "digits")
ACTIVATIONS = ("lipswish", "clipswish", "elu")
INITIALISERS = ("glorot", "orthogonal", "pytorch", "aligned", "peak")
DEFAULT_VARIANT = ("lipswish", "glorot")
# digits trains one seed per variant: every initialiser with LipSwish, and the other
# activations with the default and our `peak` initialiser.
DIGITS_VARIANTS = (
    *(("lipswish", init) for init in INITIALISERS),
    *((act, init) for act in ("clipswish", "elu") for init in ("glorot", "peak")),
)
# Quick mode runs the toy alone by default (a digits model costs a minute even for 2 steps):
# one variant that goes through every code path of the initialisers (CLipSwish, alignment,
# peak biases). `--quick --datasets digits` runs the digits one.
QUICK_VARIANTS = {"toy": (("clipswish", "peak"),), "digits": (("elu", "peak"),)}
# Its models are small (it checks the measurements' plumbing and exactness, not where a trained
# model's budget goes): 2 toy blocks instead of 8, one digits block per scale and one fully
# connected block instead of 4, 4 and 2.
QUICK_FIELDS = {
    "toy": {"num_blocks": 2},
    "digits": {"blocks_per_scale": (1, 1), "fc_end_blocks": 1},
}
LIPSWISH_PEAK = 2.3994  # beta * a where LipSwish's (and CLipSwish's) slope peaks
ELU_MARGIN = 3.0  # ELU's peak bias: pre-activations this many standard deviations above 0
CONVERGED = {"atol": 1e-6, "rtol": 1e-6, "max_iterations": 2000}
EXAMPLES = {"toy": 256, "digits": 32}  # held-out points at which blocks are measured
QUICK_EXAMPLES = 16


def base_config(kind: str):
    """The diagnosed models: g 2-64-64-2 for the toy (the `TOY` preset's size before it took
    CLipSwish 2-45-45-2), the `digits` preset; each variant sets the activation."""
    if kind == "toy":
        return with_fields(presets.TOY, hidden_units=(64, 64))
    return presets.get_preset("digits")


def build(kind: str, activation: str, *, small: bool = False) -> FlowModel:
    config = with_fields(base_config(kind), activation=activation)
    if small:
        config = with_fields(config, **QUICK_FIELDS[kind])
    if kind == "toy":
        model = FlowModel(ResidualFlowBijector(config), event_shape=[2])
    else:
        model = FlowModel(
            multiscale.image_flow(datasets.DIGITS_SHAPE, config),
            datasets.DIGITS_SHAPE,
            loss_unit="bits_per_dim",
            num_levels=datasets.DIGITS_NUM_LEVELS,
        )
    model.build((None, *model.event_shape))
    return model


# ------------------------------------------------------------------------------------------------
# Linear layers as explicit operators.


def _as_4d(kernel: np.ndarray) -> np.ndarray:
    """A dense [n_in, n_out] kernel as a 1x1 convolution kernel [1, 1, n_in, n_out]."""
    return kernel if kernel.ndim == 4 else kernel[None, None]


def operator_matrix(layer: SpectralLayer, kernel: np.ndarray) -> np.ndarray:
    """The [n_in, n_out] matrix of the layer's linear map with `kernel` (row convention).

    Dense: the kernel. Convolution: its action on every basis image of the input shape the
    layer was built for (strides and zero padding included).
    """
    if isinstance(layer, SpectralDense):
        return np.asarray(kernel, np.float64).reshape(layer.kernel.shape)
    kernel = np.asarray(kernel, np.float64).reshape(layer.kernel.shape)
    h, w, c = (layer.input_spec.axes[i] for i in (1, 2, 3))
    n = h * w * c
    basis = tf.reshape(tf.eye(n, dtype=tf.float64), [n, h, w, c])
    y = tf.nn.conv2d(basis, kernel, list(layer.strides), layer.padding.upper())
    return tf.reshape(y, [n, -1]).numpy()


def operator_norm(layer: SpectralLayer, kernel: np.ndarray) -> float:
    """||A||_2 of the layer's linear map with `kernel`, exactly (largest eigenvalue)."""
    kernel = np.asarray(kernel, np.float64).reshape(layer.kernel.shape)
    one_by_one = isinstance(layer, SpectralConv2D) and layer.kernel_size == (1, 1)
    if one_by_one and layer.strides == (1, 1):
        matrix = kernel[0, 0]  # block-diagonal over pixels: the channel matrix's norm
    else:
        matrix = operator_matrix(layer, kernel)
    small = matrix.T @ matrix if matrix.shape[0] >= matrix.shape[1] else matrix @ matrix.T
    return float(np.sqrt(max(np.linalg.eigvalsh(small)[-1], 0.0)))


def effective_kernel(layer: SpectralLayer) -> np.ndarray:
    return layer.effective_kernel().numpy().astype(np.float64)


# ------------------------------------------------------------------------------------------------
# Activations: slopes on the data.


def activation_slopes(layer: keras.layers.Layer, a: tf.Tensor) -> np.ndarray:
    """phi'(a) per unit, [..., n] (CLipSwish: [..., 2n], the slopes of both halves)."""
    with tf.autodiff.ForwardAccumulator(a, tf.ones_like(a)) as acc:
        y = layer(a)
    return acc.jvp(y).numpy().astype(np.float64)


def unit_gains(slopes: np.ndarray, width: int) -> np.ndarray:
    """Each unit's gain |phi'(a)|; for CLipSwish the norm of its 2-row Jacobian column."""
    if slopes.shape[-1] == 2 * width:
        return np.hypot(slopes[..., :width], slopes[..., width:])
    return np.abs(slopes)


def slope_matrix(slopes: np.ndarray, width: int) -> np.ndarray:
    """The activation's mean Jacobian per pixel, [n, n'] (row convention): diag(mean phi'),
    or [diag(mean first half), diag(mean second half)] for CLipSwish."""
    mean = slopes.reshape(-1, slopes.shape[-1]).mean(axis=0)
    return np.concatenate([np.diag(m) for m in np.split(mean, mean.size // width)], axis=1)


def peak_bias(layer: keras.layers.Layer, a: np.ndarray) -> np.ndarray:
    """Per-unit bias shift that moves the mean pre-activation to where phi' peaks."""
    flat = a.reshape(-1, a.shape[-1])
    if isinstance(layer, LipSwish):  # CLipSwish too: its unit gain peaks at the same point
        target = LIPSWISH_PEAK / float(layer.beta.numpy())
        return target - flat.mean(axis=0)
    return ELU_MARGIN * flat.std(axis=0) - flat.mean(axis=0)


# ------------------------------------------------------------------------------------------------
# Initialisers.


def _assign(layer: SpectralLayer, kernel: np.ndarray, bias: np.ndarray | None = None) -> None:
    kernel = np.asarray(kernel).reshape(layer.kernel.shape)
    layer.kernel.assign(kernel.astype(layer.kernel.dtype))
    if layer.use_bias:
        bias = np.zeros(layer.bias.shape) if bias is None else bias
        layer.bias.assign(np.asarray(bias).astype(layer.bias.dtype))


def _compose(composite: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """The kernel of (composite then kernel), both [kh, kw, in, out]; one may be spatial."""
    if composite.shape[:2] == (1, 1):
        return np.einsum("ac,hwcd->hwad", composite[0, 0], kernel)
    if kernel.shape[:2] == (1, 1):
        return composite @ kernel[0, 0]
    raise ValueError("aligned initialisation: two spatial kernels before the last layer")


def initialise_block(g: keras.Model, x: tf.Tensor, scheme: str, seed: int) -> None:
    """Assigns `scheme`'s kernels (and biases) to every spectral layer of `g`, whose input
    at the init batch is `x`, then converges the power iterations."""
    linear = [layer for layer in g.layers if isinstance(layer, SpectralLayer)]
    for i, layer in enumerate(linear):
        shape = tuple(layer.kernel.shape)
        if scheme == "glorot":
            _assign(layer, keras.initializers.GlorotUniform(seed + i)(shape).numpy())
        elif scheme == "pytorch":  # kaiming_uniform(a=sqrt(5)) and the bias rule of nn.Linear
            bound = 1.0 / math.sqrt(math.prod(shape[:-1]))
            rng = np.random.default_rng(seed + i)
            _assign(
                layer,
                rng.uniform(-bound, bound, shape),
                rng.uniform(-bound, bound, shape[-1:]),
            )
        else:  # orthogonal, aligned, peak: orthogonal kernels (the last is replaced below)
            _assign(layer, keras.initializers.Orthogonal(seed=seed + i)(shape).numpy())
        layer.update_lipschitz(**CONVERGED)
    if scheme not in ("aligned", "peak"):
        return
    # Walk g on the init batch; at each activation set the previous layer's bias (peak),
    # and accumulate the chain's kernel with the activation's mean slopes.
    h = tf.convert_to_tensor(x, g.compute_dtype)
    composite = np.eye(h.shape[-1])[None, None]
    previous = None
    for layer in g.layers:
        if layer is linear[-1]:
            break
        if isinstance(layer, SpectralLayer):
            composite = _compose(composite, _as_4d(effective_kernel(layer)))
            previous = layer
            h = layer(h)
            continue
        if scheme == "peak" and previous is not None:
            shift = peak_bias(layer, h.numpy())
            previous.bias.assign((previous.bias.numpy() + shift).astype(previous.bias.dtype))
            h = h + tf.constant(shift, h.dtype)
        width = h.shape[-1]
        composite = composite @ slope_matrix(activation_slopes(layer, h), width)
        h = layer(h)
    last = linear[-1]
    adjoint = composite[::-1, ::-1].transpose(0, 1, 3, 2)  # conv's adjoint: flipped, transposed
    if adjoint.shape != _as_4d(np.zeros(last.kernel.shape)).shape:
        raise ValueError(f"aligned: chain kernel {adjoint.shape} vs last {last.kernel.shape}")
    adjoint = adjoint * (last.lipschitz_constant / operator_norm(last, adjoint))
    _assign(last, adjoint)
    last.update_lipschitz(**CONVERGED)


def initialise(model: FlowModel, x: tf.Tensor, scheme: str, seed: int) -> None:
    """`initialise_block` on every block in data order, at its input from the batch `x`."""
    for k, (block, t) in enumerate(residual_blocks(model, x)):
        initialise_block(block.residual_fn, t, scheme, 1000 * seed + 10 * k)
    update_lipschitz(model.flow_layers, **CONVERGED)


# ------------------------------------------------------------------------------------------------
# Measurement.


def _geomean(values: np.ndarray) -> float:
    return float(np.exp(np.mean(np.log(np.maximum(values, 1e-300)))))


def block_kind(block, t: tf.Tensor) -> str:
    """The block's kind, e.g. "fc 64", "conv 8x8x1"; "(first)": a g without pre-activation."""
    shape = "x".join(str(n) for n in t.shape[1:])
    kind = f"fc {shape}" if t.shape.rank == 2 else f"conv {shape}"
    first = isinstance(block.residual_fn.layers[0], SpectralLayer)
    return f"{kind} (first)" if first else kind


def analyse_block(block, t: tf.Tensor) -> dict:
    """Every layer's norm and gains, every activation's slopes, and ||J_g|| at inputs `t`."""
    g = block.residual_fn
    x = tf.convert_to_tensor(t, g.compute_dtype)
    b, event = x.shape[0], x.shape[1:]
    d = math.prod(event)
    # Forward-mode pass of all D basis directions of every example (example-major).
    xs = tf.repeat(x, d, axis=0)
    basis = tf.tile(tf.reshape(tf.eye(d, dtype=x.dtype), [d, *event]), [b, *[1] * len(event)])
    with tf.autodiff.ForwardAccumulator(xs, basis) as acc:
        h, outputs = xs, []
        for layer in g.layers:
            h = layer(h)
            outputs.append(h)
    tangents = [basis, *(acc.jvp(o) for o in outputs)]
    frobenius = [
        np.linalg.norm(tf.reshape(tn, [b, -1]).numpy().astype(np.float64), axis=1)
        for tn in tangents
    ]
    jacobian = exact_block_jacobian(block, x, use_pfor=d > 8)  # [B, D_out, D_in]
    from_tangents = tf.reshape(tangents[-1], [b, d, d]).numpy().transpose(0, 2, 1)
    spectral = np.linalg.norm(jacobian, 2, axis=(1, 2))

    layers, h = [], x
    for i, layer in enumerate(g.layers):
        gain = frobenius[i + 1] / frobenius[i]
        entry = {"layer": layer.name, "gain": _geomean(gain)}
        if isinstance(layer, SpectralLayer):
            c = layer.lipschitz_constant
            norm = operator_norm(layer, effective_kernel(layer))
            entry.update(
                type="linear",
                bound=c,
                norm_over_bound=norm / c,
                raw_norm_over_bound=operator_norm(layer, layer.kernel.numpy()) / c,
                estimate_over_bound=float(layer.sigma().numpy()) / c,
                gain_over_norm=entry["gain"] / norm,
            )
        else:
            width = h.shape[-1]
            slopes = activation_slopes(layer, h)
            gains = unit_gains(slopes, width)
            entry.update(
                type="activation",
                rms_slope=float(np.sqrt(np.mean(gains**2))),
                mean_slope=float(np.mean(slopes[..., :width])),
            )
        layers.append(entry)
        h = layer(h)
    linear = [e for e in layers if e["type"] == "linear"]
    activations = [e for e in layers if e["type"] == "activation"]
    bound = math.prod(e["bound"] for e in linear)
    return {
        "kind": block_kind(block, t),
        "name": block.name,
        "jacobian_norm_median": float(np.median(spectral)),
        "jacobian_norm_max": float(np.max(spectral)),
        "jacobian_check": float(np.max(np.abs(from_tangents - jacobian))),
        "realised_rms_gain": _geomean(frobenius[-1] / math.sqrt(d)),
        "bound": bound,
        "norm_use": math.prod(e["norm_over_bound"] for e in linear),
        "direction": math.prod(e["gain_over_norm"] for e in linear),
        "activation_gain": math.prod(e["gain"] for e in activations),
        "layers": layers,
    }


def analyse(model: FlowModel, x: tf.Tensor) -> list[dict]:
    return [analyse_block(block, t) for block, t in residual_blocks(model, x)]


# ------------------------------------------------------------------------------------------------
# Runs.


@dataclasses.dataclass(frozen=True)
class Variant:
    kind: str
    activation: str
    initialiser: str
    learning_rate: float = 2e-3

    @property
    def label(self) -> str:
        lr = "" if self.learning_rate == 2e-3 else f", lr {self.learning_rate:g}"
        return f"{self.activation}, {self.initialiser}{lr}"


def variant_pair(text: str) -> tuple[str, str]:
    """ "activation:initialiser" (a command-line value) as a pair."""
    activation, _, initialiser = text.partition(":")
    if activation not in ACTIVATIONS or initialiser not in INITIALISERS:
        raise argparse.ArgumentTypeError(
            f"expected activation:initialiser with activation in {ACTIVATIONS} and "
            f"initialiser in {INITIALISERS}; got {text!r}"
        )
    return activation, initialiser


def variants(args: argparse.Namespace) -> list[Variant]:
    out = []
    for kind in args.datasets:
        chosen = args.toy_variants if kind == "toy" else args.digits_variants
        if chosen:
            pairs = chosen
        elif args.quick:
            pairs = QUICK_VARIANTS[kind]
        elif kind == "toy":
            pairs = [(a, i) for a in ACTIVATIONS for i in INITIALISERS]
        else:
            pairs = DIGITS_VARIANTS
        out += [Variant(kind, a, i) for a, i in pairs]
        if kind == "toy" and not args.quick:
            for rate in args.learning_rates:
                out += [Variant(kind, "lipswish", i, rate) for i in ("glorot", "peak")]
    return out


def budget_of(kind: str, variant: Variant, args: argparse.Namespace) -> Budget:
    steps, batch = (
        (args.toy_steps, args.toy_batch_size)
        if kind == "toy"
        else (args.digits_steps, args.digits_batch_size)
    )
    return Budget(steps, batch, learning_rate=variant.learning_rate, sample_repeats=0)


def run_variant(variant: Variant, seed: int, args: argparse.Namespace) -> dict:
    kind = variant.kind
    dataset = args.toy_dataset if kind == "toy" else "digits"
    budget = budget_of(kind, variant, args)
    keras.utils.set_random_seed(seed)
    model = build(kind, variant.activation, small=args.quick)
    _, test, init_batch = datasets_for(dataset, budget, seed)
    start = time.perf_counter()
    initialise(model, init_batch, variant.initialiser, seed)
    init_seconds = time.perf_counter() - start
    examples = QUICK_EXAMPLES if args.quick else EXAMPLES[kind]
    held_out = next(iter(test))[:examples]
    row = {**dataclasses.asdict(variant), "dataset": dataset, "seed": seed}
    row["initialise_seconds"] = round(init_seconds, 2)
    start = time.perf_counter()
    row["init"] = analyse(model, held_out)
    row["analyse_seconds"] = round(time.perf_counter() - start, 2)
    row.update(train_and_evaluate(model, dataset, budget, seed))
    row["trained"] = analyse(model, held_out)
    print(
        f"  {kind} {variant.label} seed {seed}: test {row['test_loss']:.4f} {row['unit']}, "
        f"||J_g|| init {_median_norm(row['init']):.3f} -> trained "
        f"{_median_norm(row['trained']):.3f} (init {row['initialise_seconds']:.0f} s, analyse "
        f"{row['analyse_seconds']:.0f} s, train {row['train_seconds']:.0f} s)",
        file=sys.stderr,
    )
    return row


def seeds_of(variant: Variant, args: argparse.Namespace) -> int:
    """`--seeds` for the toy's default and `peak` LipSwish variants, else `--other-seeds`."""
    if variant.kind == "digits":
        return min(args.seeds, args.digits_seeds)
    main = variant.activation == "lipswish" and variant.initialiser in ("glorot", "peak")
    return args.seeds if main else min(args.seeds, args.other_seeds)


def run_rows(args: argparse.Namespace) -> list[dict]:
    """Every variant and seed of `args.datasets`, in this process."""
    rows = []
    for variant in variants(args):
        for seed in range(seeds_of(variant, args)):
            rows.append(run_variant(variant, seed, args))
            # Rows so far, in case a long run is stopped (the results file comes at the end).
            PARTIAL.write_text(json.dumps(rows))
    return rows


def run_parallel(argv: list[str], args: argparse.Namespace) -> list[dict]:
    """One worker process per data set, all at once (as `ablations.py --jobs 2`)."""
    flags, skip = [], False
    for a in argv:  # all flags but --jobs N
        if not skip and not a.startswith("--jobs"):
            flags.append(a)
        skip = a == "--jobs"
    processes = {
        kind: subprocess.Popen(
            [sys.executable, __file__, *flags, "--worker", kind], stdout=subprocess.PIPE, text=True
        )
        for kind in args.datasets
    }
    rows = []
    for kind, process in processes.items():
        out, _ = process.communicate()
        if process.returncode:
            raise RuntimeError(f"lipschitz_budget worker {kind} failed (exit {process.returncode})")
        rows += json.loads(out.strip().splitlines()[-1])
    return rows


def _median_norm(blocks: list[dict]) -> float:
    return float(np.median([b["jacobian_norm_median"] for b in blocks]))


# ------------------------------------------------------------------------------------------------
# Summaries and tables.

BLOCK_KEYS = (
    "jacobian_norm_median",
    "jacobian_norm_max",
    "realised_rms_gain",
    "bound",
    "norm_use",
    "direction",
    "activation_gain",
)
LAYER_KEYS = (
    "gain",
    "norm_over_bound",
    "raw_norm_over_bound",
    "estimate_over_bound",
    "gain_over_norm",
    "rms_slope",
    "mean_slope",
)


def summarise(rows: list[dict]) -> list[dict]:
    """Per variant, phase and block kind: means over seeds and blocks (norm max: the max)."""
    summary = []
    keys = list(
        dict.fromkeys(
            (r["kind"], r["activation"], r["initialiser"], r["learning_rate"]) for r in rows
        )
    )
    for key in keys:
        group = [
            r
            for r in rows
            if (r["kind"], r["activation"], r["initialiser"], r["learning_rate"]) == key
        ]
        entry = {
            "kind": key[0],
            "activation": key[1],
            "initialiser": key[2],
            "learning_rate": key[3],
            "unit": group[0]["unit"],
            "test_loss": spread([r["test_loss"] for r in group]),
            "seeds": [r["seed"] for r in group],
            "phases": {},
        }
        for phase in ("init", "trained"):
            blocks = [b for r in group for b in r[phase]]
            per_kind = {}
            for kind in dict.fromkeys(b["kind"] for b in blocks):
                mine = [b for b in blocks if b["kind"] == kind]
                stats = {k: float(np.mean([b[k] for b in mine])) for k in BLOCK_KEYS}
                stats["jacobian_norm_max"] = max(b["jacobian_norm_max"] for b in mine)
                stats["blocks_per_model"] = len(mine) // len(group)
                stats["jacobian_check"] = max(b["jacobian_check"] for b in mine)
                positions = []
                for i, first in enumerate(mine[0]["layers"]):
                    layer = {"type": first["type"]}
                    for k in LAYER_KEYS:
                        if k in first:
                            layer[k] = float(np.mean([b["layers"][i][k] for b in mine]))
                    positions.append(layer)
                stats["layers"] = positions
                per_kind[kind] = stats
            entry["phases"][phase] = per_kind
        summary.append(entry)
    return summary


def _label(s: dict) -> str:
    lr = "" if s["learning_rate"] == 2e-3 else f" (lr {s['learning_rate']:g})"
    return f"{s['activation']} | {s['initialiser']}{lr}"


def print_tables(summary: list[dict]) -> None:
    print("\n### Where the gain goes, per block (geometric means over held-out points)\n")
    print(
        "realised RMS gain = ||J_g||_F / sqrt(D) = bound x norm use x direction x activations "
        "(exactly, per point)\n"
    )
    print(
        "| data | activation | initialiser | phase | block | ‖J_g‖₂ median (max) | bound c^n "
        "| norm use Π‖A‖/c | direction Π gain/‖A‖ | activations Π gain | realised RMS gain |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for s in summary:
        for phase, per_kind in s["phases"].items():
            for kind, b in per_kind.items():
                print(
                    f"| {s['kind']} | {_label(s)} | {phase} | {kind} ×{b['blocks_per_model']} "
                    f"| {b['jacobian_norm_median']:.4f} ({b['jacobian_norm_max']:.3f}) "
                    f"| {b['bound']:.3f} | {b['norm_use']:.3f} | {b['direction']:.3f} "
                    f"| {b['activation_gain']:.3f} | {b['realised_rms_gain']:.4f} |"
                )
    print("\n### Per layer position (means over blocks of a kind and seeds)\n")
    print(
        "linear: ‖A‖/c (raw kernel's ‖W‖/c) · gain/‖A‖;  activation: RMS φ'(a) · mean φ'(a) "
        "· gain on the signal\n"
    )
    print("| data | activation | initialiser | phase | block | layers, input to output |")
    print("| --- | --- | --- | --- | --- | --- |")
    for s in summary:
        for phase, per_kind in s["phases"].items():
            for kind, b in per_kind.items():
                cells = []
                for layer in b["layers"]:
                    if layer["type"] == "linear":
                        cells.append(
                            f"A {layer['norm_over_bound']:.2f} ({layer['raw_norm_over_bound']:.2f})"
                            f" · {layer['gain_over_norm']:.2f}"
                        )
                    else:
                        cells.append(
                            f"φ {layer['rms_slope']:.2f} · {layer['mean_slope']:.2f} "
                            f"· {layer['gain']:.2f}"
                        )
                print(f"| {s['kind']} | {_label(s)} | {phase} | {kind} | {' → '.join(cells)} |")
    print("\n### Test NLL after the short training\n")
    print(
        "| data | activation | initialiser | test NLL (mean ± std [min, max]) | seeds "
        "| ‖J_g‖₂ median init → trained (per block kind) |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for s in summary:
        unit = "bits/dim" if s["unit"] == "bits_per_dim" else "nats"
        norms = "; ".join(
            f"{kind} {b['jacobian_norm_median']:.3f} → "
            f"{s['phases']['trained'][kind]['jacobian_norm_median']:.3f}"
            for kind, b in s["phases"]["init"].items()
        )
        print(
            f"| {s['kind']} | {_label(s)} | {format_spread(s['test_loss'])} {unit} "
            f"| {len(s['seeds'])} | {norms} |"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings (< 60 s)")
    parser.add_argument("--datasets", nargs="+", choices=KINDS, help="default: both (quick: toy)")
    parser.add_argument("--toy-dataset", choices=datasets.TOY_DATASETS, default="checkerboard")
    parser.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="toy seeds of (lipswish, glorot), (lipswish, peak) and their lr runs (default 3)",
    )
    parser.add_argument("--other-seeds", type=int, default=1, help="of the other toy variants")
    parser.add_argument("--digits-seeds", type=int, default=1)
    parser.add_argument("--toy-steps", type=int, default=None, help="default 400")
    parser.add_argument("--toy-batch-size", type=int, default=256)
    parser.add_argument(
        "--digits-steps", type=int, default=None, help="default 69: 3 epochs of 1500 at 64"
    )
    parser.add_argument("--digits-batch-size", type=int, default=64)
    parser.add_argument(
        "--learning-rates",
        type=float,
        nargs="*",
        default=[5e-3],
        help="extra toy rates for (lipswish, glorot) and (lipswish, peak); default 5e-3",
    )
    parser.add_argument(
        "--toy-variants",
        nargs="+",
        type=variant_pair,
        help="activation:initialiser pairs (default: every pair)",
    )
    parser.add_argument(
        "--digits-variants", nargs="+", type=variant_pair, help="default: see the docs"
    )
    parser.add_argument("--jobs", type=int, default=1, help="data sets run at once (1, 2)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.datasets = args.datasets or (["toy"] if args.quick else list(KINDS))
    args.seeds = args.seeds or (1 if args.quick else 3)
    args.toy_steps = args.toy_steps or (3 if args.quick else 400)
    args.digits_steps = args.digits_steps or (2 if args.quick else 69)

    if args.worker:  # one data set, rows as JSON on the last line
        args.datasets = [args.worker]
        print(json.dumps(run_rows(args)))
        return

    load_before = load_average()
    start = time.perf_counter()
    rows = run_parallel(argv or sys.argv[1:], args) if args.jobs > 1 else run_rows(args)
    summary = summarise(rows)
    print_tables(summary)
    write_results(
        args.output,
        __file__,
        argv,
        settings={
            "quick": args.quick,
            "toy_dataset": args.toy_dataset,
            "toy_seeds": args.seeds,
            "other_toy_seeds": min(args.seeds, args.other_seeds),
            "digits_seeds": min(args.seeds, args.digits_seeds),
            "toy_steps": args.toy_steps,
            "toy_batch_size": args.toy_batch_size,
            "digits_steps": args.digits_steps,
            "digits_batch_size": args.digits_batch_size,
            "examples": {k: QUICK_EXAMPLES if args.quick else EXAMPLES[k] for k in KINDS},
            "power_iterations": CONVERGED,
            "default_configs": {kind: to_dict(base_config(kind)) for kind in args.datasets},
            **({"quick_fields": QUICK_FIELDS} if args.quick else {}),
        },
        load_average_before=load_before,
        load_average_after=load_average(),
        seconds=round(time.perf_counter() - start, 1),
        rows=rows,
        summary=summary,
    )


if __name__ == "__main__":
    main()
