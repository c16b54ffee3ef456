"""Bias and spread of the log-det estimators against the exact log-det, on small events.

What: for a fixed contraction `g(x) = W2 tanh(x)` on D = 8 and 16 dimensions (`||W2||_2 = 0.9`,
so `Lip(g) <= 0.9`; non-normal, eigenvalues in [-0.6, 0.4]; float64; see `contraction`) at a
fixed point `x0`, the bias and the standard deviation of one estimate of
`log|det(I + J_g(x0))|`, against `logdet.exact_log_det`:

    roulette   `logdet.russian_roulette_log_det` (unbiased) by the number of exact terms,
               the distribution of the extra terms N (geometric p, Poisson rate; with 1 probe
               and with 64, which leave N's own share of the variance visible), the probes
               (Gaussian, Rademacher) and their number
    truncated  `logdet.power_series_log_det` (biased) by the number of terms and the probes

How: a batch of B identical copies of `x0` gives B independent probes in one call, but N is
drawn once per call, so the calls are looped over seeds inside one `tf.function` (`tf.map_fn`).
Reported per setting: the mean estimate and its bias, the standard error of the bias (from the
spread of the per-call means, which accounts for the shared N), the standard deviation of a
single estimate (over all draws), the RMSE, and the expected number of series terms (its cost in
vector-Jacobian products: exact terms + E[N], i.e. + 1/p or + rate; the truncated series' terms).
Also the spectral norm and the spectral radius of `J_g(x0)`: the geometric roulette's variance is
finite only if the spectral radius is below `sqrt(1 - p)`.

    python benchmarks/estimators.py            # full: D = 8, 16, 200 calls x 256 probes
    python benchmarks/estimators.py --quick    # D = 8, a few settings, 10 calls

Prints a markdown table, writes `benchmarks/results/estimators.json` (or `--output`) and the plot
`benchmarks/results/estimators.png` (next to the JSON).
"""

import argparse
import functools
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from measure import save_figure, write_results  # noqa: E402

from tfp_resflow.estimators import logdet  # noqa: E402

tf.get_logger().setLevel("ERROR")  # a new tf.function per setting is intended
RESULTS = Path(__file__).resolve().parent / "results" / "estimators.json"
LIPSCHITZ = 0.9
PROBES = ("rademacher", "gaussian")
MANY_PROBES = 64


def contraction(event_size: int, seed: int = 0):
    """`g(x) = W2 tanh(x)` with `||W2||_2 = LIPSCHITZ` (so `Lip(g) <= 0.9`), and a point `x0`.

    `W2 = Q T Q^T` with Q a random rotation and T upper triangular: eigenvalues spread over
    [-0.6, 0.4] on its diagonal (a clearly nonzero log-det, a series tail that truncation
    visibly cuts) and a random strictly upper part scaled so that `||T||_2 = 0.9`, a non-normal
    Jacobian whose norm is at the Lipschitz bound and whose spectral radius is well below it, as
    in trained residual blocks. The geometric(p) roulette has finite variance only for
    spectral radius < sqrt(1 - p): here for p up to about 0.6.
    """
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(event_size, event_size)))
    diagonal = np.diag(np.linspace(-0.6, 0.4, event_size))
    upper = np.triu(rng.normal(size=(event_size, event_size)), k=1)
    low, high = 0.0, 10.0  # bisect the scale of the upper part: ||T||_2 = LIPSCHITZ
    for _ in range(100):
        middle = (low + high) / 2
        if np.linalg.norm(diagonal + middle * upper, 2) > LIPSCHITZ:
            high = middle
        else:
            low = middle
    w2 = q @ (diagonal + low * upper) @ q.T
    w2_t = tf.constant(w2.T)  # row vectors: x @ W2^T

    def g(x: tf.Tensor) -> tf.Tensor:
        return tf.matmul(tf.tanh(x), w2_t)

    x0 = tf.constant(0.2 * rng.normal(size=(1, event_size)))
    return g, x0


def jacobian_norms(g, x0: tf.Tensor) -> tuple[float, float]:
    """(spectral norm, spectral radius) of `J_g(x0)`."""
    with tf.GradientTape() as tape:
        tape.watch(x0)
        y = g(x0)
    jacobian = tape.batch_jacobian(y, x0)[0].numpy()
    return float(np.linalg.norm(jacobian, 2)), float(np.max(np.abs(np.linalg.eigvals(jacobian))))


def settings(*, quick: bool) -> list[dict]:
    """Every estimator setting of the sweeps (one dict of options each, plus its sweep)."""
    roulette = {"estimator": "roulette", "term_distribution": "geometric", "geometric_p": 0.5}
    roulette.update(poisson_rate=2.0, num_exact_terms=2, num_probes=1)
    exact_terms = [0, 2] if quick else [0, 1, 2, 4, 8]
    terms = [2, 8] if quick else [1, 2, 4, 8, 16]
    probes = [1, 4] if quick else [1, 2, 4, 8]
    geometric = [0.5] if quick else [0.2, 0.35, 0.5, 0.65, 0.8]
    poisson = [2.0] if quick else [0.5, 1.0, 2.0, 4.0]
    out = []
    for probe in PROBES:
        for n in exact_terms:
            out.append({**roulette, "sweep": "exact_terms", "probe": probe, "num_exact_terms": n})
        for n in terms:
            out.append(
                {
                    "estimator": "truncated",
                    "sweep": "terms",
                    "probe": probe,
                    "num_terms": n,
                    "num_probes": 1,
                }
            )
        for n in probes:
            out.append({**roulette, "sweep": "probes", "probe": probe, "num_probes": n})
    # The distribution of N with 1 probe, and with many probes, which divide the probes' share
    # of the variance by their number and leave the share of N (the roulette's own) visible.
    for num_probes in (1, 8 if quick else MANY_PROBES):
        for p in geometric:
            out.append(
                {
                    **roulette,
                    "sweep": "distribution",
                    "probe": "rademacher",
                    "geometric_p": p,
                    "num_probes": num_probes,
                }
            )
        for rate in poisson:
            out.append(
                {
                    **roulette,
                    "sweep": "distribution",
                    "probe": "rademacher",
                    "term_distribution": "poisson",
                    "poisson_rate": rate,
                    "num_probes": num_probes,
                }
            )
    return out


def expected_terms(setting: dict) -> float:
    """Series terms per estimate on average: its cost in vector-Jacobian products."""
    if setting["estimator"] == "truncated":
        return float(setting["num_terms"])
    if setting["term_distribution"] == "geometric":
        return setting["num_exact_terms"] + 1.0 / setting["geometric_p"]
    return setting["num_exact_terms"] + setting["poisson_rate"]


def estimator_fn(setting: dict):
    if setting["estimator"] == "truncated":
        return functools.partial(
            logdet.power_series_log_det,
            num_terms=setting["num_terms"],
            probe=setting["probe"],
            num_probes=setting["num_probes"],
        )
    return functools.partial(
        logdet.russian_roulette_log_det,
        term_distribution=setting["term_distribution"],
        geometric_p=setting["geometric_p"],
        poisson_rate=setting["poisson_rate"],
        num_exact_terms=setting["num_exact_terms"],
        probe=setting["probe"],
        num_probes=setting["num_probes"],
        neumann_gradient=False,  # values only: no custom gradient needed
    )


def draw(g, x0: tf.Tensor, setting: dict, *, calls: int, batch: int, stream: int) -> np.ndarray:
    """`[calls, batch]` estimates: each call its own seed (own N), each row its own probe."""
    estimator = estimator_fn(setting)
    x = tf.repeat(x0, batch, axis=0)

    @tf.function
    def run(seeds: tf.Tensor) -> tf.Tensor:
        return tf.map_fn(
            lambda s: estimator(g, x, seed=tf.stack([s, stream]))[1],
            seeds,
            fn_output_signature=tf.float64,
        )

    return run(tf.range(calls)).numpy()


def measure(g, x0, exact: float, setting: dict, *, calls: int, batch: int, stream: int) -> dict:
    estimates = draw(g, x0, setting, calls=calls, batch=batch, stream=stream)
    call_means = estimates.mean(axis=1)
    mean = float(estimates.mean())
    std = float(estimates.std(ddof=1))
    bias = mean - exact
    return {
        **setting,
        "expected_terms": expected_terms(setting),
        "exact": exact,
        "mean": mean,
        "bias": bias,
        "bias_standard_error": float(call_means.std(ddof=1) / math.sqrt(calls)),
        "std": std,
        "rmse": math.sqrt(bias**2 + std**2),
        "calls": calls,
        "draws": int(estimates.size),
        "finite": bool(np.isfinite(estimates).all()),
    }


def label(row: dict) -> str:
    if row["estimator"] == "truncated":
        return f"truncated, {row['num_terms']} terms"
    if row["term_distribution"] == "geometric":
        n = f"geometric p={row['geometric_p']:g}"
    else:
        n = f"Poisson rate={row['poisson_rate']:g}"
    return f"roulette, {row['num_exact_terms']} exact + {n}"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["event_size"] for r in rows})
    fig, axes = plt.subplots(len(sizes), 4, figsize=(20, 4.6 * len(sizes)), squeeze=False)
    styles = {"rademacher": "-", "gaussian": "--"}
    for i, size in enumerate(sizes):
        mine = [r for r in rows if r["event_size"] == size]
        ax_bias, ax_std, ax_probes, ax_dist = axes[i]
        for probe in PROBES:
            for sweep, estimator, colour in (
                ("exact_terms", "roulette", "C0"),
                ("terms", "truncated", "C3"),
            ):
                sel = [r for r in mine if r["sweep"] == sweep and r["probe"] == probe]
                if not sel:
                    continue
                x = [r["expected_terms"] for r in sel]
                ax_bias.errorbar(
                    x,
                    [r["bias"] for r in sel],
                    yerr=[2 * r["bias_standard_error"] for r in sel],
                    fmt="o" + styles[probe],
                    color=colour,
                    capsize=3,
                    label=f"{estimator}, {probe}",
                )
                ax_std.plot(
                    x,
                    [r["std"] for r in sel],
                    "o" + styles[probe],
                    color=colour,
                    label=f"{estimator}, {probe}",
                )
            sel = [r for r in mine if r["sweep"] == "probes" and r["probe"] == probe]
            if sel:
                n = np.array([r["num_probes"] for r in sel])
                ax_probes.plot(n, [r["std"] for r in sel], "o" + styles[probe], label=probe)
                ax_probes.plot(n, sel[0]["std"] / np.sqrt(n / n[0]), ":", color="grey")
        many = max(r["num_probes"] for r in mine if r["sweep"] == "distribution")
        for distribution, colour in (("geometric", "C2"), ("poisson", "C4")):
            sel = [
                r
                for r in mine
                if r["sweep"] == "distribution"
                and r["term_distribution"] == distribution
                and r["num_probes"] == many
            ]
            if sel:
                ax_dist.plot(
                    [r["expected_terms"] for r in sel],
                    [r["std"] for r in sel],
                    "o-",
                    color=colour,
                    label=f"{distribution} (2 exact terms), {many} probes",
                )
                for r in sel:
                    value = r["geometric_p"] if distribution == "geometric" else r["poisson_rate"]
                    ax_dist.annotate(f"{value:g}", (r["expected_terms"], r["std"]), fontsize=8)
        rho = mine[0]["spectral_radius"]
        ax_bias.axhline(0.0, color="black", lw=0.8)
        ax_bias.set_yscale("symlog", linthresh=1e-3)
        ax_bias.set(
            title=f"D={size}: bias (±2 s.e.), exact log-det {mine[0]['exact']:.3f}",
            xlabel="expected series terms (VJPs)",
            ylabel="mean estimate - exact",
        )
        ax_std.set_yscale("log")
        ax_std.set(
            title=f"D={size}: std of one estimate (spectral radius {rho:.2f})",
            xlabel="expected series terms (VJPs)",
            ylabel="standard deviation",
        )
        ax_probes.set_xscale("log", base=2)
        ax_probes.set_yscale("log")
        ax_probes.set(
            title=f"D={size}: roulette (2 exact + geometric 0.5) vs probes",
            xlabel="probes per estimate",
            ylabel="standard deviation (dotted: 1/sqrt(n))",
        )
        ax_dist.set_yscale("log")
        ax_dist.set(
            title=f"D={size}: law of N (labels: p, rate), {many} Rademacher probes",
            xlabel="expected series terms (VJPs)",
            ylabel="standard deviation",
        )
        for ax in axes[i]:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="D = 8, a few settings, 10 calls")
    parser.add_argument("--event-sizes", type=int, nargs="+", default=None, help="default 8 16")
    parser.add_argument("--calls", type=int, default=None, help="seeds per setting (200)")
    parser.add_argument("--batch", type=int, default=256, help="probes per call")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--plot", type=Path, default=None, help="default: estimators.png beside")
    args = parser.parse_args(argv)
    sizes = args.event_sizes or ([8] if args.quick else [8, 16])
    calls = args.calls or (10 if args.quick else 200)
    start = time.perf_counter()
    rows = []
    for size in sizes:
        g, x0 = contraction(size)
        exact = float(logdet.exact_log_det(g, x0)[1][0])
        norm, radius = jacobian_norms(g, x0)
        print(
            f"D={size}: exact log-det {exact:.4f}, ||J||_2 = {norm:.3f}, spectral radius "
            f"{radius:.3f}",
            file=sys.stderr,
        )
        for k, setting in enumerate(settings(quick=args.quick)):
            row = measure(g, x0, exact, setting, calls=calls, batch=args.batch, stream=k)
            row.update(event_size=size, jacobian_norm=norm, spectral_radius=radius)
            rows.append(row)

    print(
        "| D | sweep | estimator | probe | probes | expected terms | bias (± s.e.) | std | RMSE |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['event_size']} | {r['sweep']} | {label(r)} | {r['probe']} | "
            f"{r['num_probes']} | {r['expected_terms']:.2f} | {r['bias']:+.4f} ± "
            f"{r['bias_standard_error']:.4f} | {r['std']:.4f} | {r['rmse']:.4f} |"
        )
    plot_path = args.plot or args.output.with_suffix(".png")
    plot(rows, plot_path)
    write_results(
        args.output,
        __file__,
        argv,
        settings={
            "lipschitz": LIPSCHITZ,
            "g": "W2 tanh(x), W2 = Q T Q^T, T upper triangular with diagonal in [-0.6, 0.4], "
            "||W2||_2 = 0.9, float64",
            "calls": calls,
            "probes_per_call": args.batch,
        },
        plot=str(plot_path.name),
        seconds=round(time.perf_counter() - start, 1),
        rows=rows,
    )


if __name__ == "__main__":
    main()
