"""Joint generative and discriminative models on the 8x8 digits: accuracy and bits/dim by lambda.

One invertible network models p(x) and classifies (`tfp_resflow.models.hybrid.HybridFlowModel`): the
loss is `lambda * (-log p(x)) + cross-entropy`, with lambda in {0, 1/D, 1} as in the paper
(0: a classifier on invertible features; D = 64). Flows of similar size, each with the
authors' head (per scale: 3x3 conv, ActNorm, ReLU, average pooling; then a dense layer):

    resflow    the `digits` preset (`MultiscaleResidualFlow`), its scales' outputs as features
    coupling   a Glow-style flow from TFP bijectors (`compare_flows.glow_digits`' steps: ActNorm,
               1x1 convolution, affine coupling; squeeze between levels), wrapped as a
               `StackedBijector` with a features mark after each level
    idensenet  i-DenseNet's g (`network="dense"`, CLipSwish), sized like `resflow`
               (`compare_flows.IDENSENET_DIGITS`)
    resflow-squeeze-first
               `resflow` squeezed once before its first scale: its head reads features of
               the coupling flow's shapes (4x4x4 and 2x2x16 instead of 8x8x1 and 4x4x4)
    resflow-squeeze-first-small
               `resflow-squeeze-first` narrowed to the coupling flow's parameter count

The flows are a registry (`FLOWS`: name -> builder of the flow from a seed); a variant is one
line, and every registered flow runs at every lambda unless `--flows` picks some.

Same optimizer recipe (`train_config.make_optimizer`), batch 64, `--epochs` passes over the 1500
training digits, three seeds; reported on the 297 test digits in evaluation mode: accuracy and
bits/dim, mean and spread (min-max).

    python benchmarks/hybrid.py                  # every flow x 3 lambdas x 3 seeds
    python benchmarks/hybrid.py --quick          # 1 epoch of 2 steps, 1 seed (CI): every flow
                                                 # at 1/D, the first flow at every lambda, each
                                                 # flow small (`QUICK_FIELDS`, `QUICK_STEPS`)

Prints a markdown table and writes `benchmarks/results/hybrid.json` (or `--output`).
"""

import argparse
import math
import os
import statistics
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_probability as tfp  # noqa: E402
from compare_flows import IDENSENET_DIGITS, CouplingCNN, LUWeights  # noqa: E402
from measure import write_results  # noqa: E402

from tfp_resflow.bijectors import multiscale  # noqa: E402
from tfp_resflow.bijectors.actnorm import ActNorm, ActNormLayer  # noqa: E402
from tfp_resflow.bijectors.composite import Features, StackedBijector, Step  # noqa: E402
from tfp_resflow.bijectors.image import LogitTransform, Squeeze  # noqa: E402
from tfp_resflow.configs import presets
from tfp_resflow.configs.config_fields import with_fields  # noqa: E402
from tfp_resflow.data import datasets
from tfp_resflow.models.hybrid import HybridFlowModel  # noqa: E402
from tfp_resflow.training import evaluation, train_config

tfb = tfp.bijectors
RESULTS = Path(__file__).resolve().parent / "results" / "hybrid.json"
NLL_WEIGHTS = ("0", "1/D", "1")
HEAD_CHANNELS = 64  # the authors' 256 is for 32x32 images with 512-channel flows


class CouplingStack(StackedBijector):
    """A Glow-style coupling flow as a `StackedBijector`, so its pass yields features too.

    Data -> latent: logit, then per level a squeeze and `steps` x [ActNorm, 1x1 convolution
    (`tfb.ScaleMatvecLU`), affine coupling (`tfb.RealNVP` over channels)], then a features mark.
    The latent is the final `[2, 2, 16]` tensor. The Keras networks inside the TFP bijectors
    are listed in `keras_layers`, so `FlowModel` trains them.
    """

    def __init__(self, steps_per_level=(4, 4), hidden_channels=32, seed=0, name="coupling"):
        parameters = dict(locals())
        alpha = presets.get_preset("digits").logit_alpha
        steps = [Step(LogitTransform(alpha), 3)]
        self._networks = []
        h, w, c = datasets.DIGITS_SHAPE
        for level, count in enumerate(steps_per_level):
            steps.append(Step(Squeeze(name=f"squeeze_{level}"), 3))
            h, w, c = h // 2, w // 2, 4 * c
            for k in range(count):
                steps.extend(self._step((h, w, c), hidden_channels, seed, f"l{level}_s{k}"))
            steps.append(Features())
        self._steps = steps
        super().__init__(
            forward_min_event_ndims=3,
            is_constant_jacobian=False,
            parameters=parameters,
            name=name,
        )
        self._set_shapes(datasets.DIGITS_SHAPE)
        self._track_keras_variables()

    def _step(self, shape, hidden_channels, seed, name) -> list[Step]:
        h, w, c = shape
        actnorm_layer = ActNormLayer(name=f"{name}_act_norm_layer")
        actnorm_layer.build((None, *shape))
        lu = LUWeights(c, seed=zlib.crc32(f"{seed}/{name}".encode()), name=f"{name}_conv")
        lu.build()
        net = CouplingCNN(c - c // 2, hidden_channels, name=f"{name}_coupling")
        net.build((None, h, w, c // 2))
        self._networks += [lu, net]
        coupling = tfb.RealNVP(
            num_masked=c // 2,
            shift_and_log_scale_fn=lambda x, output_units, net=net, **kw: net(x),
            name=f"{name}_real_nvp",
        )
        actnorm = ActNorm(actnorm_layer, event_ndims=3, name=f"{name}_act_norm")
        return [Step(actnorm, 3), Step(lu.bijector(), 3), Step(coupling, 3)]

    @property
    def keras_layers(self) -> list:
        return [*super().keras_layers, *getattr(self, "_networks", [])]


# --quick builds every flow small (it checks that each one trains and is scored, not how well):
# the residual flows with one block per scale and no fully connected one instead of 4, 4 and
# 2, the coupling flow with one step per level instead of 4.
QUICK_FIELDS = {"blocks_per_scale": (1, 1), "fc_end_blocks": 0}
QUICK_STEPS = (1, 1)

# The flows by name: (seed, small=False) -> a StackedBijector whose features the head reads. A
# variant is one line.
FlowBuilder = Callable[..., StackedBijector]


def digits_resflow(**fields: object) -> FlowBuilder:
    """The `digits` preset image flow with `fields` changed (`config_fields.with_fields`)."""
    config = with_fields(presets.get_preset("digits"), **fields)
    quick_config = with_fields(config, **QUICK_FIELDS)
    return lambda seed, small=False: multiscale.image_flow(
        datasets.DIGITS_SHAPE, quick_config if small else config
    )


FLOWS: dict[str, FlowBuilder] = {
    "resflow": digits_resflow(),
    "idensenet": digits_resflow(**IDENSENET_DIGITS),  # sized like resflow (compare_flows)
    "coupling": lambda seed, small=False: (
        CouplingStack(QUICK_STEPS, seed=seed) if small else CouplingStack(seed=seed)
    ),
    # The coupling flow's head reads 4x4x4 and 2x2x16 features: the residual flow on the
    # same scales (squeezed once before its first scale).
    "resflow-squeeze-first": digits_resflow(squeeze_first=True),
    # The same, narrowed to the coupling flow's size (56,514 against 57,786 parameters with the
    # head): 20 hidden channels instead of 32, fully connected blocks of 32-32 instead of 64-64.
    "resflow-squeeze-first-small": digits_resflow(
        squeeze_first=True, hidden_channels=20, fc_hidden_units=(32, 32)
    ),
}


def build(flow_name: str, nll_weight: str, seed: int, *, small: bool = False) -> HybridFlowModel:
    keras.utils.set_random_seed(seed)
    shape = datasets.DIGITS_SHAPE
    flow = FLOWS[flow_name](seed, small=small)
    weight = "1/D" if nll_weight == "1/D" else float(nll_weight)
    return HybridFlowModel(
        flow,
        shape,
        num_classes=datasets.DIGITS_NUM_CLASSES,
        nll_weight=weight,
        head_channels=HEAD_CHANNELS,
        loss_unit="bits_per_dim",
        num_levels=datasets.DIGITS_NUM_LEVELS,
    )


def run_one(flow_name: str, nll_weight: str, seed: int, args: argparse.Namespace) -> dict:
    model = build(flow_name, nll_weight, seed, small=args.quick)
    common = {"seed": seed, "labels": True}
    train, shape, _ = datasets.load_dataset("digits", "train", batch_size=64, **common)
    # --quick: the 297 test digits in one batch, so evaluation traces once (not for 200 and 97).
    test_batch = 300 if args.quick else 200
    test, _, _ = datasets.load_dataset(
        "digits", "test", batch_size=test_batch, training=False, **common
    )
    steps = args.steps or datasets.num_examples("digits", "train") // 64
    config = train_config.TrainConfig(epochs=args.epochs, seed=seed)
    model.build((None, *shape))
    model.initialize(next(iter(datasets.load_dataset("digits", batch_size=64, seed=seed)[0])))
    model.compile(optimizer=train_config.make_optimizer(config, args.epochs * steps))
    start = time.perf_counter()
    model.fit(train, epochs=args.epochs, steps_per_epoch=steps, verbose=0)
    seconds = time.perf_counter() - start
    model.update_lipschitz(atol=1e-5, rtol=1e-5)  # the EMA weights fit swapped in
    losses = np.concatenate(evaluation.evaluation_losses(model, test))
    return {
        "flow": flow_name,
        "nll_weight": nll_weight,
        "seed": seed,
        "parameters": int(sum(math.prod(w.shape) for w in model.trainable_weights)),
        "head_parameters": int(sum(math.prod(w.shape) for w in model.head.trainable_weights)),
        "test_accuracy": evaluation.evaluation_accuracy(model, test),
        "test_bits_per_dim": float(np.mean(losses)),
        "train_seconds": round(seconds, 1),
    }


def summarise(rows: list[dict]) -> list[dict]:
    summary = []
    for flow_name in dict.fromkeys(r["flow"] for r in rows):
        for weight in NLL_WEIGHTS:
            group = [r for r in rows if (r["flow"], r["nll_weight"]) == (flow_name, weight)]
            if not group:
                continue
            entry = {"flow": flow_name, "nll_weight": weight, "seeds": len(group)}
            for key in ("test_accuracy", "test_bits_per_dim", "train_seconds"):
                values = [r[key] for r in group]
                entry[key] = {
                    "mean": statistics.fmean(values),
                    "min": min(values),
                    "max": max(values),
                }
            entry["parameters"] = group[0]["parameters"]
            summary.append(entry)
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--flows",
        nargs="+",
        choices=tuple(FLOWS),
        default=tuple(FLOWS),
        help="default: every registered flow (" + ", ".join(FLOWS) + ")",
    )
    parser.add_argument("--nll-weights", nargs="+", choices=NLL_WEIGHTS, default=NLL_WEIGHTS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=0, help="steps per epoch (0: one pass)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1 epoch of 2 steps, seed 0, small flows; every flow at 1/D and the first flow at "
        "every lambda",
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.steps, args.seeds = 1, 2, [0]
    rows = []
    for flow_name in args.flows:
        for weight in args.nll_weights:
            # The quick run checks that every flow and every lambda runs, not every pair (the
            # lambdas differ in one weight): each flow at 1/D, the first flow at all of them.
            if args.quick and weight != "1/D" and flow_name != args.flows[0]:
                continue
            for seed in args.seeds:
                rows.append(run_one(flow_name, weight, seed, args))
                print(f"  {rows[-1]}", file=sys.stderr)
    summary = summarise(rows)
    print("| flow | lambda | parameters | test accuracy | test bits/dim | train (s) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for s in summary:
        acc, bpd, sec = s["test_accuracy"], s["test_bits_per_dim"], s["train_seconds"]
        print(
            f"| {s['flow']} | {s['nll_weight']} | {s['parameters']:,} "
            f"| {acc['mean']:.3f} ({acc['min']:.3f}-{acc['max']:.3f}) "
            f"| {bpd['mean']:.3f} ({bpd['min']:.3f}-{bpd['max']:.3f}) | {sec['mean']:.0f} |"
        )
    write_results(args.output, __file__, argv, epochs=args.epochs, rows=rows, summary=summary)


if __name__ == "__main__":
    tf.get_logger().setLevel("ERROR")
    main()
