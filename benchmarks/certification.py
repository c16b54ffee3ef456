"""Every Lipschitz layer of a trained model: power-iteration estimate, exact norm, certified bound.

For the map each layer applies (its rescaled kernel W_eff = W / max(1, sigma / c)):
- power: the power-iteration estimate of ||W_eff|| after converging the estimates as the
  evaluation does (`update_lipschitz` to the run's `lipschitz_tolerance`), `sigma / max(1,
  sigma / c)`; a lower bound;
- exact: the largest singular value of the explicit operator matrix (the convolution on the
  layer's image size, zero padding included), float64 SVD;
- certified: `certification.layer_bound`, a guaranteed upper bound.
Then each residual block's certified bound on Lip(g) (`FlowModel.certify`) against the product
of its layers' exact norms and the time `certify` takes.

    python benchmarks/certification.py              # trains the default run (python train_tf.py)
                                                    # into runs/certification first (~3 minutes)
    python benchmarks/certification.py --run-dir DIR    # a finished train_tf.py run
    python benchmarks/certification.py --quick      # a 2-step run, for the test suite

Prints the per-block table and writes `benchmarks/results/certification.json` and
`certification.png` (every layer's three norms divided by its constant c).
"""

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from measure import print_table, save_figure, write_results  # noqa: E402

import tfp_resflow  # noqa: E402, F401  (registers the serialisable classes)
from tfp_resflow.bijectors.certification import layer_bound  # noqa: E402
from tfp_resflow.layers import lipschitz  # noqa: E402
from tfp_resflow.layers.spectral_conv import SpectralConv2D  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_tf  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "certification.json"
QUICK_RUN = ["--epochs", "1", "--steps-per-epoch", "2"]


def exact_norm(layer: keras.layers.Layer) -> float | None:
    """The spectral norm of the layer's map from its explicit matrix; None for mixed norms."""
    if (float(layer.domain), float(layer.codomain)) != (2.0, 2.0):
        return None
    kernel = tf.cast(layer.effective_kernel(), tf.float64)
    if isinstance(layer, SpectralConv2D) and not layer._use_matrix:  # noqa: SLF001
        _, h, w, c = layer._op.v_shape  # noqa: SLF001 (the image size it was built for)
        n = h * w * c
        impulses = tf.reshape(tf.eye(n, dtype=tf.float64), [n, h, w, c])
        columns = tf.nn.conv2d(impulses, kernel, list(layer.strides), layer.padding.upper())
        matrix = tf.reshape(columns, [n, -1]).numpy()
    else:  # a dense kernel, or a 1x1 convolution's channel matrix
        matrix = layer._operator_kernel(kernel).numpy()  # noqa: SLF001
    return float(np.linalg.norm(matrix, 2))


def power_estimate(layer: keras.layers.Layer) -> float:
    """The power method's estimate of ||W_eff||: sigma / max(1, sigma / c)."""
    sigma = float(layer.sigma())
    return sigma / max(1.0, sigma / layer.lipschitz_constant)


def measure(model: keras.Model, tolerance: float) -> dict:
    model.update_lipschitz(atol=tolerance, rtol=tolerance)
    layers, blocks = [], []
    for b, block in enumerate(model.bijector.blocks):
        exact_product = 1.0
        for layer in lipschitz.spectral_layers(block.residual_fn):
            exact = exact_norm(layer)
            exact_product *= math.inf if exact is None else exact
            layers.append(
                {
                    "block": b,
                    "layer": layer.name,
                    "kind": type(layer).__name__,
                    "kernel_shape": list(layer.kernel.shape),
                    "lipschitz_constant": layer.lipschitz_constant,
                    "power": power_estimate(layer),
                    "exact": exact,
                    "certified": layer_bound(layer),
                }
            )
        blocks.append({"block": b, "exact_layer_product": exact_product})
    start = time.perf_counter()
    bounds = model.certify()
    seconds = time.perf_counter() - start
    for entry, bound in zip(blocks, bounds, strict=True):
        entry["certified_lipschitz"] = bound
    return {"layers": layers, "blocks": blocks, "certify_seconds": round(seconds, 3)}


def plot(layers: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt  # imported late: the benchmarks' plotting dependency

    index = np.arange(len(layers))
    fig, ax = plt.subplots(figsize=(9, 3.6))
    for key, marker, label in (
        ("power", "v", "power-iteration estimate (lower bound)"),
        ("exact", "o", "exact norm (SVD)"),
        ("certified", "^", "certified bound (Gram iteration)"),
    ):
        values = [np.nan if e[key] is None else e[key] / e["lipschitz_constant"] for e in layers]
        ax.plot(index, values, marker, label=label, markersize=5, alpha=0.8)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("Lipschitz layer (data -> latent)")
    ax.set_ylabel("norm / its constant c")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=Path("runs/certification"))
    parser.add_argument("--quick", action="store_true", help="a 2-step training run")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    model_path = args.run_dir / "model.keras"
    trained = None
    if not model_path.exists():
        command = ["--output-dir", str(args.run_dir), *(QUICK_RUN if args.quick else [])]
        start = time.perf_counter()
        if train_tf.main(command) != 0:
            raise SystemExit("the training run failed")
        trained = {"train_tf_args": command, "seconds": round(time.perf_counter() - start, 1)}
    config = json.loads((args.run_dir / "config.json").read_text())
    model = keras.models.load_model(model_path)
    results = measure(model, config["lipschitz_tolerance"])
    rows = [
        [
            e["block"],
            f"{e['exact_layer_product']:.4f}",
            f"{e['certified_lipschitz']:.4f}",
            f"{e['certified_lipschitz'] / e['exact_layer_product']:.4f}",
        ]
        for e in results["blocks"]
    ]
    print_table(["block", "product of exact norms", "certified Lip(g)", "ratio"], rows)
    layers = results["layers"]
    measured = [e for e in layers if e["exact"]]
    ratios = {
        "certified/exact": max(e["certified"] / e["exact"] for e in measured),
        "exact/c": max(e["exact"] / e["lipschitz_constant"] for e in measured),
        "certified/c": max(e["certified"] / e["lipschitz_constant"] for e in measured),
        "exact/power": max(e["exact"] / e["power"] for e in measured),
    }
    results["largest_ratios"] = ratios
    print(
        f"{len(layers)} layers; largest "
        + ", ".join(f"{k} {v:.5f}" for k, v in ratios.items())
        + f"; certify: {results['certify_seconds']} s"
    )
    write_results(
        args.output,
        __file__,
        argv,
        run_dir=str(args.run_dir),
        training=trained,
        **results,
    )
    plot(layers, args.output.with_suffix(".png"))


if __name__ == "__main__":
    main()
