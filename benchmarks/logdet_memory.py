"""Peak memory and time of one forward + backward pass of the log-det series, by number of terms.

Compares the Neumann gradient (`neumann_gradient=True`, memory-flat by design) with naive
backpropagation through the series (`neumann_gradient=False`), on

- an MLP `g`: D = 64 -> 512 -> 512 -> 64 (ELU), batch 256;
- a conv `g`: 28x28x1 -> 3x3 conv (64) -> 1x1 conv (64) -> 3x3 conv (1), ELU, batch 64,

with a fixed number of terms (the truncated series, so every configuration does the same work
on every run). Each configuration runs in its own subprocess, so its peak resident set size
(`ru_maxrss`, including TensorFlow's own ~0.5 GB) is its alone.

    python benchmarks/logdet_memory.py                 # full table, writes results JSON
    python benchmarks/logdet_memory.py --terms 2 20    # fewer configurations

Prints a markdown table and writes `benchmarks/results/logdet_memory.json`.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from measure import current_rss_mb, peak_rss_mb, print_table, run_worker, write_results

RESULTS = Path(__file__).resolve().parent / "results" / "logdet_memory.json"
NETWORKS = ("mlp", "conv")
METHODS = ("neumann", "naive")
TIMED_STEPS = 5


def _network(network: str) -> tuple:
    """The residual function `g` (Lip(g) < 1, so the series is finite) and its input batch."""
    import keras
    import tensorflow as tf

    small = keras.initializers.VarianceScaling(0.3)  # keeps Lip(g) < 1 so the series is finite
    if network == "mlp":
        g = keras.Sequential(
            [
                keras.Input((64,)),
                keras.layers.Dense(512, activation="elu", kernel_initializer=small),
                keras.layers.Dense(512, activation="elu", kernel_initializer=small),
                keras.layers.Dense(64, kernel_initializer=small),
            ]
        )
        return g, tf.random.normal([256, 64])
    g = keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(64, 3, padding="same", activation="elu", kernel_initializer=small),
            keras.layers.Conv2D(64, 1, activation="elu", kernel_initializer=small),
            keras.layers.Conv2D(1, 3, padding="same", kernel_initializer=small),
        ]
    )
    return g, tf.random.uniform([64, 28, 28, 1])


def measure_configuration(network: str, method: str, num_terms: int) -> dict:
    """One configuration, in this process: build, trace, time, and report memory."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import tensorflow as tf

    from tfp_resflow.estimators import logdet

    keras.utils.set_random_seed(0)
    g, x = _network(network)

    @tf.function
    def step(seed: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            gx, log_det = logdet.power_series_log_det(
                g, x, seed=seed, num_terms=num_terms, neumann_gradient=method == "neumann"
            )
            loss = tf.reduce_mean(tf.square(x + gx)) - tf.reduce_mean(log_det)
        grads = tape.gradient(loss, g.trainable_weights)
        return tf.add_n([tf.reduce_sum(gr) for gr in grads])

    rss_before = current_rss_mb()
    step(tf.constant([0, 0])).numpy()  # trace and first run
    times = []
    for i in range(TIMED_STEPS):
        start = time.perf_counter()
        step(tf.constant([0, i + 1])).numpy()
        times.append(time.perf_counter() - start)
    return {
        "network": network,
        "method": method,
        "num_terms": num_terms,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "rss_before_first_step_mb": round(rss_before, 1),
        "step_seconds_median": round(statistics.median(times), 4),
    }


def _print_table(rows: list[dict]) -> None:
    columns = [
        "g",
        "gradient",
        "terms",
        "peak RSS (MB)",
        "peak - RSS before first step (MB)",
        "step (s, median of 5)",
    ]
    cells = [
        [
            r["network"],
            r["method"],
            r["num_terms"],
            f"{r['peak_rss_mb']:.0f}",
            f"{r['peak_rss_mb'] - r['rss_before_first_step_mb']:.0f}",
            f"{r['step_seconds_median']:.3f}",
        ]
        for r in rows
    ]
    print_table(columns, cells)


def _peak_ratios(rows: list[dict], networks: list[str]) -> dict[str, float]:
    """Peak RSS at the most terms over peak RSS at the fewest, per network and method."""
    ratios = {}
    for network in networks:
        for method in METHODS:
            peaks = {
                r["num_terms"]: r["peak_rss_mb"]
                for r in rows
                if r["network"] == network and r["method"] == method
            }
            low, high = min(peaks), max(peaks)
            ratios[f"{network}/{method}"] = round(peaks[high] / peaks[low], 3)
            print(
                f"{network} {method}: peak at {high} terms / at {low} terms = "
                f"{ratios[f'{network}/{method}']:.3f}"
            )
    return ratios


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--terms", type=int, nargs="+", default=[2, 5, 10, 20])
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=NETWORKS)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument(
        "--worker", nargs=3, metavar=("NETWORK", "METHOD", "TERMS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.worker:
        network, method, terms = args.worker
        print(json.dumps(measure_configuration(network, method, int(terms))))
        return

    rows = []
    for network in args.networks:
        for method in METHODS:
            for terms in args.terms:
                rows.append(run_worker(__file__, [network, method, str(terms)]))
                print(f"  done {network} {method} {terms}", file=sys.stderr)
    _print_table(rows)
    ratios = _peak_ratios(rows, args.networks)
    write_results(args.output, __file__, argv, rows=rows, peak_ratio_max_over_min_terms=ratios)


if __name__ == "__main__":
    main()
