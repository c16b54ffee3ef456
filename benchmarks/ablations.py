"""The paper's ablations of Residual Flows at equal steps: one field changed at a time.

What: test NLL of a residual flow trained for the same steps, with three seeds per variant, on

    toy     checkerboard (`--toy-dataset`), `presets.TOY` (8 blocks, CLipSwish g 2-45-45-2),
            test NLL in nats, exact (evaluation mode uses the exact log-det for 2-D events)
    digits  the `digits` preset image flow, test bits/dim (evaluation mode: the authors'
            unbiased roulette with 20 exact terms, the same for every variant)

Each variant changes one field of the data set's default config with `config.with_fields`:

    default       toy: `BlockConfig()` - unbiased roulette, 2 exact terms + geometric(0.5),
                  Rademacher probes, Neumann gradient (the package's block default), CLipSwish
                  digits: the preset's (the authors' image settings) - unbiased roulette,
                  2 exact terms + Poisson(2), Gaussian probes, Neumann gradient, ELU
    truncated     log_det="truncated": the biased i-ResNet series with num_terms=10 (the
                  BlockConfig default; its gradient stays the matching truncated Neumann series)
    backprop      neumann_gradient=False: autodiff through the roulette series
    probes        the other probe: Gaussian for toy, Rademacher for digits (whose default is
                  already Gaussian)
    lipswish      activation="lipswish" (toy: with g 2-64-64-2, the size of the default)
    elu           toy only: activation="elu", g 2-64-64-2
    gram          lipschitz_estimate="gram": every layer normalised by its Gram-iteration
                  bound (certified at every step) instead of the power-iteration estimate

How: the recipe and measurements of `compare_flows.py` (`train_and_evaluate`: Keras `fit` with
`training.make_optimizer`, EMA weights, converged Lipschitz estimates, evaluation mode). The
table gives mean ± standard deviation [min, max] over seeds, and flags a default that loses to
a variant by more than the sum of the two standard deviations (and a variant that loses to the
default by that much). `--jobs 2` trains the toy and the digits variants in two processes at
once (each process alone leaves a core partly idle, so the wall time drops; step times are
then measured under that load).
For each trained model, `block_jacobians` takes every block's exact Jacobian J at 128 test
examples: its spectral norm, and how much of log det(I + J) lies beyond the first two series
terms (the only part where the roulette and the truncated series differ), which tells whether
an estimator ablation can matter at all at this budget.

    python benchmarks/ablations.py --jobs 2        # full: 7-10 minutes on 2 CPU cores
    python benchmarks/ablations.py --quick         # tiny settings, small models (digits: the
                                                   # default only)
    python benchmarks/ablations.py --datasets toy --seeds 1 --toy-steps 100
    python benchmarks/ablations.py --variants default gram --output ablations_gram.json

Prints a markdown table and writes `benchmarks/results/ablations.json` (or `--output`).
"""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
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
from tfp_resflow.bijectors.composite import FactorOut, Step  # noqa: E402
from tfp_resflow.bijectors.flow import ResidualFlowBijector  # noqa: E402
from tfp_resflow.bijectors.residual_block import ResidualBlock  # noqa: E402
from tfp_resflow.configs import presets
from tfp_resflow.configs.config_fields import to_dict, with_fields  # noqa: E402
from tfp_resflow.data import datasets
from tfp_resflow.models.model import FlowModel  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "ablations.json"
JACOBIAN_EXAMPLES = 128  # test examples at which every block's Jacobian is taken
QUICK_JACOBIAN_EXAMPLES = 16
KINDS = ("toy", "digits")
VARIANTS = {
    "toy": {
        "default": {},
        "truncated": {"log_det": "truncated"},
        "backprop": {"neumann_gradient": False},
        "gaussian probes": {"probe": "gaussian"},
        # The default is CLipSwish 45-45; the other activations at the size they had as default.
        "lipswish": {"activation": "lipswish", "hidden_units": (64, 64)},
        "elu": {"activation": "elu", "hidden_units": (64, 64)},
        "gram": {"lipschitz_estimate": "gram"},
    },
    "digits": {
        "default": {},
        "truncated": {"log_det": "truncated"},
        "backprop": {"neumann_gradient": False},
        "rademacher probes": {"probe": "rademacher"},
        "lipswish": {"activation": "lipswish"},  # the default is ELU
        "gram": {"lipschitz_estimate": "gram"},
    },
}


# Quick mode trains one digits variant (a digits model's first step traces for 10-20 s); the
# toy runs every variant. Its models are small (it checks that every variant trains and is
# measured, not what the ablation says): 1 toy block instead of 8, and one digits block per
# scale and no fully connected one instead of 4, 4 and 2; each variant's field on top.
QUICK_DIGITS_VARIANTS = ("default",)
QUICK_FIELDS = {
    "toy": {"num_blocks": 1},
    "digits": {"blocks_per_scale": (1, 1), "fc_end_blocks": 0},
}


def base_config(kind: str):
    return presets.TOY if kind == "toy" else presets.get_preset("digits")


def build(kind: str, fields: dict, *, small: bool = False) -> FlowModel:
    config = with_fields(base_config(kind), **{**(QUICK_FIELDS[kind] if small else {}), **fields})
    if kind == "toy":
        return FlowModel(ResidualFlowBijector(config), event_shape=[2])
    shape = datasets.DIGITS_SHAPE
    return FlowModel(
        multiscale.image_flow(shape, config),
        shape,
        loss_unit="bits_per_dim",
        num_levels=datasets.DIGITS_NUM_LEVELS,
    )


def residual_blocks(model: FlowModel, x: tf.Tensor):
    """Yields `(block, t)`: every residual block of the flow and its input at the data `x`.

    Walks the flow data -> latent (`_steps`, the walk of `StackedBijector._walk`): factor-outs
    keep the first half, `Features` marks do nothing, every other step maps `t` by its
    inverse. The walk resumes after each yield, so a caller may change a block's weights
    before the data pass through it (ActNorms met on the way initialise from their inputs, as
    in `FlowModel.initialize`).
    """
    t = tf.convert_to_tensor(x)
    for step in model.bijector._steps:  # noqa: SLF001 (no public walk over the steps)
        if isinstance(step, FactorOut):
            t = t[..., : t.shape[-1] // 2]
            continue
        if not isinstance(step, Step):  # a Features mark: no computation
            continue
        if isinstance(step.bijector, ResidualBlock):
            yield step.bijector, t
        t = step.bijector.inverse(t)


def exact_block_jacobian(
    block: ResidualBlock, t: tf.Tensor, *, use_pfor: bool = True
) -> np.ndarray:
    """The exact Jacobian of the block's `g` at every example of `t`: float64 [B, D, D].

    `use_pfor=False` takes one backward pass per output instead of tracing a vectorised one
    (faster for a few outputs, or a few calls).
    """
    shape = [-1, *t.shape[1:]]
    flat = tf.reshape(t, [t.shape[0], -1])
    with tf.GradientTape(persistent=not use_pfor) as tape:
        tape.watch(flat)
        g = tf.reshape(block.residual_fn(tf.reshape(flat, shape)), flat.shape)
    jacobian = tape.batch_jacobian(g, flat, experimental_use_pfor=use_pfor)
    return tf.cast(jacobian, tf.float64).numpy()


def block_jacobians(model: FlowModel, x: tf.Tensor) -> dict:
    """How far from linear the trained blocks are, from their exact Jacobians at test data.

    At each residual block's input (`residual_blocks`), takes the full Jacobian J of its `g`
    (2 x 2 for the toy, 64 x 64 for the digits: every block sees 64 numbers). The estimators
    differ only in the series terms k >= 3 (the roulette computes k = 1, 2 exactly, the
    truncated series k <= 10) and the gradients only from k >= 2, so their ablations can
    matter only where these are large.

    Returns means over blocks and examples: `norm` (spectral norm of J; `norm_max`: the largest
    block's mean), `log_det` (|log det(I + J)|), `beyond_1` (|log det - tr J|) and `beyond_2`
    (|log det - tr J + tr J^2 / 2|), in nats per block and example.
    """
    per_block = []
    for block, t in residual_blocks(model, x):
        jacobian = exact_block_jacobian(block, t)
        eye = np.eye(jacobian.shape[-1])
        log_det = np.linalg.slogdet(eye + jacobian)[1]
        trace = np.trace(jacobian, axis1=1, axis2=2)
        trace2 = np.trace(jacobian @ jacobian, axis1=1, axis2=2)
        per_block.append(
            {
                "norm": float(np.mean(np.linalg.norm(jacobian, 2, axis=(1, 2)))),
                "log_det": float(np.mean(np.abs(log_det))),
                "beyond_1": float(np.mean(np.abs(log_det - trace))),
                "beyond_2": float(np.mean(np.abs(log_det - trace + trace2 / 2))),
            }
        )
    stats = {k: float(np.mean([b[k] for b in per_block])) for k in per_block[0]}
    stats["norm_max"] = max(b["norm"] for b in per_block)
    return stats


def run_kind(kind: str, args: argparse.Namespace) -> list[dict]:
    """Every variant and seed of one data set, in this process."""
    budget = budgets(args)[kind]
    dataset = args.toy_dataset if kind == "toy" else "digits"
    rows = []
    for variant, fields in VARIANTS[kind].items():
        if args.quick and kind == "digits" and variant not in QUICK_DIGITS_VARIANTS:
            continue
        if args.variants is not None and variant not in args.variants:
            continue
        for seed in range(args.seeds):
            keras.utils.set_random_seed(seed)
            model = build(kind, fields, small=args.quick)
            row = {"kind": kind, "dataset": dataset, "variant": variant, "fields": fields}
            row["seed"] = seed
            row.update(train_and_evaluate(model, dataset, budget, seed))
            test = datasets_for(dataset, budget, seed)[1]
            examples = QUICK_JACOBIAN_EXAMPLES if args.quick else JACOBIAN_EXAMPLES
            row["jacobian"] = block_jacobians(model, next(iter(test))[:examples])
            rows.append(row)
            print(
                f"  {kind} {variant} seed {seed}: test {row['test_loss']:.4f} {row['unit']}, "
                f"step {1e3 * row['step_seconds_median']:.1f} ms",
                file=sys.stderr,
            )
    return rows


def budgets(args: argparse.Namespace) -> dict[str, Budget]:
    repeats = 0 if args.quick else 1  # quick: no sampling (its tracing costs seconds per model)
    toy = Budget(args.toy_steps, args.toy_batch_size, sample_repeats=repeats)
    digits = Budget(args.digits_steps, args.digits_batch_size, sample_repeats=repeats)
    return {"toy": toy, "digits": digits}


def summarise(rows: list[dict]) -> list[dict]:
    summary = []
    for kind in KINDS:
        mine = [r for r in rows if r["kind"] == kind]
        if not mine:
            continue
        default = spread([r["test_loss"] for r in mine if r["variant"] == "default"])
        for variant in VARIANTS[kind]:
            group = [r for r in mine if r["variant"] == variant]
            if not group:
                continue
            loss = spread([r["test_loss"] for r in group])
            margin = default["std"] + loss["std"]
            difference = loss["mean"] - default["mean"]  # > 0: the variant is worse
            judged = variant != "default" and min(default["n"], loss["n"]) > 1
            summary.append(
                {
                    "kind": kind,
                    "dataset": group[0]["dataset"],
                    "variant": variant,
                    "fields": group[0]["fields"],
                    "unit": group[0]["unit"],
                    "test_loss": loss,
                    "difference_to_default": difference,
                    "sum_of_stds": margin,
                    "default_loses_beyond_spread": judged and -difference > margin,
                    "variant_loses_beyond_spread": judged and difference > margin,
                    "step_seconds": spread([r["step_seconds_median"] for r in group]),
                    "jacobian": {
                        k: float(np.mean([r["jacobian"][k] for r in group]))
                        for k in group[0]["jacobian"]
                    },
                }
            )
    return summary


def print_table(summary: list[dict]) -> None:
    print(
        "| data | variant | changed field | test NLL (mean ± std [min, max]) | variant - default "
        "| step (ms) | ‖J_g‖ mean (max block) | \\|log det - tr J + tr J²/2\\| | verdict |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for s in summary:
        unit = "bits/dim" if s["unit"] == "bits_per_dim" else "nats"
        fields = ", ".join(f"{k}={v}" for k, v in s["fields"].items()) or "-"
        verdict = ""
        if s["default_loses_beyond_spread"]:
            verdict = "**default loses beyond spread**"
        elif s["variant_loses_beyond_spread"]:
            verdict = "default wins beyond spread"
        elif s["variant"] != "default" and s["test_loss"]["n"] < 2:
            verdict = "(one seed: no spread)"
        elif s["variant"] != "default":
            verdict = "within spread"
        print(
            f"| {s['dataset']} | {s['variant']} | {fields} | {format_spread(s['test_loss'])} "
            f"{unit} | {s['difference_to_default']:+.3f} (spread {s['sum_of_stds']:.3f}) "
            f"| {format_spread(s['step_seconds'], 1, 1e3)} "
            f"| {s['jacobian']['norm']:.3f} ({s['jacobian']['norm_max']:.3f}) "
            f"| {s['jacobian']['beyond_2']:.2e} | {verdict} |"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings")
    parser.add_argument("--datasets", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--toy-dataset", choices=datasets.TOY_DATASETS, default="checkerboard")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per variant (default 3)")
    parser.add_argument("--toy-steps", type=int, default=None, help="default 300")
    parser.add_argument("--toy-batch-size", type=int, default=256)
    parser.add_argument(
        "--digits-steps", type=int, default=None, help="default 69: 3 epochs of 1500 at 64"
    )
    parser.add_argument("--digits-batch-size", type=int, default=64)
    parser.add_argument("--jobs", type=int, default=1, help="data sets trained at once (1, 2)")
    names = sorted({name for variants in VARIANTS.values() for name in variants})
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=names,
        default=None,
        help="only these variants (default: every variant of each data set)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.seeds = args.seeds or (1 if args.quick else 3)
    args.toy_steps = args.toy_steps or (10 if args.quick else 300)
    args.digits_steps = args.digits_steps or (3 if args.quick else 69)
    if args.worker:  # one data set, rows as JSON on the last line
        print(json.dumps(run_kind(args.worker, args)))
        return

    load_before = load_average()
    start = time.perf_counter()
    if args.jobs > 1 and len(args.datasets) > 1:
        rows = run_parallel(args)
    else:
        rows = [row for kind in args.datasets for row in run_kind(kind, args)]
    summary = summarise(rows)
    print_table(summary)
    defaults = {kind: to_dict(base_config(kind)) for kind in args.datasets}
    write_results(
        args.output,
        __file__,
        argv,
        settings={
            "quick": args.quick,
            "seeds": args.seeds,
            "jobs": args.jobs,
            "toy_dataset": args.toy_dataset,
            "variants": args.variants,
            "budgets": {k: dataclasses.asdict(v) for k, v in budgets(args).items()},
            "default_configs": defaults,
            **({"quick_fields": QUICK_FIELDS} if args.quick else {}),
        },
        load_average_before=load_before,
        load_average_after=load_average(),
        seconds=round(time.perf_counter() - start, 1),
        rows=rows,
        summary=summary,
    )


def run_parallel(args: argparse.Namespace) -> list[dict]:
    """One worker process per data set, all at once; their rows in data-set order."""
    flags = [
        *(["--quick"] if args.quick else []),
        *("--toy-dataset", args.toy_dataset, "--seeds", str(args.seeds)),
        *("--toy-steps", str(args.toy_steps), "--toy-batch-size", str(args.toy_batch_size)),
        *("--digits-steps", str(args.digits_steps)),
        *("--digits-batch-size", str(args.digits_batch_size)),
        *(["--variants", *args.variants] if args.variants else []),
    ]
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
            raise RuntimeError(f"ablations worker {kind} failed (exit {process.returncode})")
        rows += json.loads(out.strip().splitlines()[-1])
    return rows


if __name__ == "__main__":
    main()
