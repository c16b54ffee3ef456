"""Evaluations of `g` and time to sample, for each fixed-point solver and tolerance.

Sampling inverts every residual block with its solver (`BlockConfig.solver`). For each model,
solver ("plain", "anderson"), tolerance (atol = rtol) and compilation of the iteration (`--xla`:
"off", TensorFlow's graph; "on", `BlockConfig.solver_jit_compile`, XLA), this script samples the
same latent draws and reports:

    g per block      evaluations of `g` (each on the whole batch) per block and sample call,
                     mean and maximum over the blocks: the first iterate `z - g(z)`, then one
                     per iteration (counted inside the traced solve functions, in TFP's eager
                     walk of the same draws)
    sample (s)       seconds of `FlowModel.sample` (one traced function), median of `--repeats`
                     calls after the first; and the first call, tracing included
    inverse error    max |inverse(sample) - z|: the latents recovered from the samples through
                     the explicit direction against the drawn ones (the inverse's accuracy)
    max |x - first|  largest difference to the first setting's samples at the same tolerance

Models:

    digits  the `digits` preset trained by `python train_tf.py` (15 epochs, about 2.5 minutes;
            or `--digits-model runs/default/model.keras`), the model the README's default run
            produces
    mnist   the `mnist` preset as built (10 power iterations per layer, untrained: a trained
            MNIST model is out of reach of 2 CPU cores), ActNorm initialised on random images;
            `authors_sampling.py` measures the authors' code on the same model

    python benchmarks/solver.py
    python benchmarks/solver.py --models digits --tolerances 1e-6 --num-samples 16   # quick

Prints a markdown table and writes `benchmarks/results/solver.json` (or `--output`; the
README's runs write `solver_digits.json` and `solver_mnist.json`).
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_probability as tfp  # noqa: E402
from measure import write_results  # noqa: E402

from tfp_resflow.bijectors import block_functions, multiscale  # noqa: E402
from tfp_resflow.bijectors.residual_block import ResidualBlock  # noqa: E402
from tfp_resflow.configs import presets
from tfp_resflow.configs.config_fields import with_fields  # noqa: E402
from tfp_resflow.core.modes import training_mode  # noqa: E402
from tfp_resflow.models.model import SAMPLE_SEED_SALT, FlowModel  # noqa: E402
from tfp_resflow.solvers.solver import SOLVER_NAMES  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "solver.json"
MODELS = ("digits", "mnist")


class EvaluationCounter:
    """Counts evaluations of `g` in the traced block functions, per block's `forward` call.

    Patches `BlockFunctions._stateless_g` (every traced pass calls `g` through it) to add one to
    a variable before each evaluation, and `ResidualBlock._forward` to record the count of each
    block's solve when it runs eagerly (the variable is read between blocks): `measure` counts
    in TFP's eager walk (`model.distribution.sample`), and times `FlowModel.sample`'s traced one.
    """

    def __init__(self) -> None:
        self.count = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.per_block: list[int] = []
        counter = self.count
        stateless_g = block_functions.BlockFunctions._stateless_g  # noqa: SLF001
        forward = ResidualBlock._forward  # noqa: SLF001

        def counted_g(functions, trainable, non_trainable, context, **options):  # noqa: ANN001, ANN003, ANN202
            g, parameters = stateless_g(functions, trainable, non_trainable, context, **options)

            def evaluate(t: tf.Tensor) -> tf.Tensor:
                with tf.control_dependencies([counter.assign_add(1)]):
                    return g(tf.identity(t))

            return evaluate, parameters

        def recorded_forward(block, z, **kwargs):  # noqa: ANN001, ANN202
            if not tf.executing_eagerly():
                return forward(block, z, **kwargs)
            before = int(counter.numpy())
            x = forward(block, z, **kwargs)
            self.per_block.append(int(counter.numpy()) - before)
            return x

        block_functions.BlockFunctions._stateless_g = counted_g  # noqa: SLF001
        ResidualBlock._forward = recorded_forward  # noqa: SLF001


def trained_digits(path: Path | None) -> FlowModel:
    """The default run's model: loaded from `path`, or trained now by `train_tf.py`."""
    if path is None:
        run = Path(tempfile.mkdtemp(prefix="solver_benchmark_"))
        print(f"training the digits preset in {run} (python train_tf.py) ...", file=sys.stderr)
        command = [sys.executable, str(ROOT / "train_tf.py"), "--output-dir", str(run)]
        subprocess.run([*command, "--verbose", "0"], check=True, cwd=ROOT)
        path = run / "model.keras"
    return keras.models.load_model(path)


def with_solver(model: FlowModel, solver: str, tolerance: float, *, xla: bool) -> FlowModel:
    """A copy of an image-flow model whose blocks use `solver` at `tolerance` (XLA or not)."""
    flow = model.bijector
    config = with_fields(
        flow.config, solver=solver, atol=tolerance, rtol=tolerance, solver_jit_compile=xla
    )
    copy = FlowModel(
        multiscale.image_flow(flow.image_shape, config),
        flow.image_shape,
        loss_unit=model.loss_unit,
        num_levels=model.num_levels,
    )
    copy.build((None, *flow.image_shape))
    copy.set_weights(model.get_weights())
    return copy


def measure(
    model: FlowModel, counter: EvaluationCounter, tolerance: float, args: argparse.Namespace
) -> dict:
    """Samples `args.num_samples` with a fixed seed: evaluations per block, time, samples."""
    start = time.perf_counter()
    samples = model.sample(args.num_samples, seed=[0, 1]).numpy()  # traces
    first = time.perf_counter() - start
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        model.sample(args.num_samples, seed=[0, 1]).numpy()
        times.append(time.perf_counter() - start)
    counter.per_block.clear()
    seed = tfp.random.sanitize_seed([0, 1], salt=SAMPLE_SEED_SALT)  # `sample`'s draws
    eager = model.distribution.sample(args.num_samples, seed=seed).numpy()
    per_block = list(counter.per_block)
    if not np.allclose(eager, samples, rtol=1e-3, atol=max(10 * tolerance, 1e-5)):
        raise RuntimeError("the eager walk drew other samples than FlowModel.sample")
    # Inverse accuracy: the latents back from the samples through the explicit direction
    # (tf.identity defeats TFP's cache, which would return z itself).
    z = model.distribution.distribution.sample(args.num_samples, seed=seed)
    with training_mode(training=False):
        back = model.bijector.inverse(tf.identity(samples))
    return {
        "reconstruction_error": float(tf.reduce_max(tf.abs(back - z))),
        "first_sample_seconds": round(first, 3),
        "g_per_block_mean": round(float(np.mean(per_block)), 1),
        "g_per_block_max": int(np.max(per_block)),
        "sample_seconds": round(statistics.median(times), 3),
        "samples": samples,
    }


def run_model(name: str, counter: EvaluationCounter, args: argparse.Namespace) -> list[dict]:
    if name == "digits":
        base = trained_digits(args.digits_model)
    else:
        keras.utils.set_random_seed(0)
        shape = presets.PRESET_INPUT_SHAPES[name]
        base = FlowModel(
            multiscale.image_flow(shape, name), shape, loss_unit="bits_per_dim", num_levels=256
        )
        base.build((None, *shape))
        # ActNorm's data-dependent start on random dequantised images, as the authors' model
        # gets it from its first forward pass (`authors_sampling.py`).
        rng = np.random.default_rng(0)
        pixels = rng.integers(0, 256, size=(args.num_samples, *shape))
        base.initialize(((pixels + rng.uniform(size=pixels.shape)) / 256.0).astype(np.float32))
    rows = []
    for tolerance in args.tolerances:
        reference = None
        for solver in args.solvers:
            for xla in args.xla:
                copy = with_solver(base, solver, tolerance, xla=xla == "on")
                result = measure(copy, counter, tolerance, args)
                samples = result.pop("samples")
                if reference is None:
                    reference = samples
                difference = float(np.max(np.abs(samples - reference)))
                row = {"model": name, "solver": solver, "xla": xla, "tolerance": tolerance}
                rows.append({**row, **result, "max_difference_to_first_setting": difference})
                print(f"  {rows[-1]}", file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=MODELS)
    parser.add_argument("--solvers", nargs="+", choices=SOLVER_NAMES, default=SOLVER_NAMES)
    parser.add_argument("--tolerances", nargs="+", type=float, default=[1e-6, 1e-4])
    parser.add_argument("--xla", nargs="+", choices=("off", "on"), default=["off", "on"])
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="timed sample calls per setting")
    parser.add_argument("--digits-model", type=Path, help="a trained digits model.keras")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    counter = EvaluationCounter()
    rows = [row for name in args.models for row in run_model(name, counter, args)]
    print(
        f"| model | solver | XLA | tolerance | g per block (mean) | g per block (max) "
        f"| sample {args.num_samples} (s) | first call (s) | max abs inverse error "
        f"| max abs difference to the first setting |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['model']} | {r['solver']} | {r['xla']} | {r['tolerance']:g} "
            f"| {r['g_per_block_mean']} | {r['g_per_block_max']} | {r['sample_seconds']} "
            f"| {r['first_sample_seconds']} | {r['reconstruction_error']:.1e} "
            f"| {r['max_difference_to_first_setting']:.2e} |"
        )
    write_results(args.output, __file__, argv, rows=rows)


if __name__ == "__main__":
    main()
