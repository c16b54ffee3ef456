"""Time and memory of training steps, to compare with the authors' code (targets.md settings).

One configuration per fresh subprocess, so that its peak resident set size (`ru_maxrss`) and
its start-up time are its own. Each configuration builds the model, runs `model.initialize` on
one batch and then `FlowModel.train_on_batch` (the unbiased log-det with the Neumann gradient,
Adam with clipping and EMA, the non-finite guard and the power iterations after the step: the
recipe of `train_tf.py`) on random data of the setting's shape:

    toy             2-D, 10 blocks, g = 128-128-128-128 LipSwish MLP, coefficient 0.9, batch 500
    digits-authors  8x8x1, 4-4 blocks, 64 hidden channels, 4 FC end blocks of width 64 (the
                    authors' digits setting of targets.md), batch 64
    digits          the `digits` preset (what `python train_tf.py` trains), batch 64
    mnist-B         the `mnist` preset (16-16-16 blocks, 512 hidden channels), batch B
    NAME-td-loop    the same model trained the TFP way: a `tf.function` step of
                    `loss = mean bits/dim of tfd.TransformedDistribution(base, flow).log_prob(x)`
                    under a `tf.GradientTape`, the same optimizer's `apply`, then the power
                    iterations (for `digits` and `mnist-16`)
    NAME-gram       the same model with `lipschitz_estimate="gram"`: every Lipschitz layer
                    normalised by its Gram-iteration bound, recomputed in every call (for
                    `toy`, `digits` and `mnist-64`)

Reported per configuration: the seconds from process start (before TensorFlow is imported) to
the end of the first training step, the first step alone (tracing included), the median of the
timed steps after it, sampling time (images: the median of two calls of the traced sampler
after its first call, and that first call, tracing included), peak RSS, and RSS before the
first step.

    python benchmarks/train_step.py                               # every configuration
    python benchmarks/train_step.py --configs toy digits --steps 5
    python benchmarks/train_step.py --quick --configs digits digits-td-loop --steps 2
                                      # small models (`QUICK_FIELDS`): that each configuration
                                      # runs, not its time or memory (run_all.py --quick)

Prints a markdown table and writes `benchmarks/results/train_step.json` (or `--output`).
"""

import time

PROCESS_START = time.perf_counter()  # before TensorFlow is imported by a worker

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402

from measure import (  # noqa: E402
    current_rss_mb,
    peak_rss_mb,
    print_table,
    run_worker,
    write_results,
)

RESULTS = Path(__file__).resolve().parent / "results" / "train_step.json"
CONFIGURATIONS = (
    "toy",
    "digits-authors",
    "digits",
    "digits-td-loop",
    "mnist-16",
    "mnist-16-td-loop",
    "mnist-32",
    "mnist-64",
    "toy-gram",
    "digits-gram",
    "mnist-64-gram",
)
TD_LOOP = "-td-loop"
GRAM = "-gram"
# --quick: 1 toy block instead of 10; image flows with one block per scale and no fully
# connected one.
QUICK_FIELDS = {"toy": {"num_blocks": 1}, "image": {"fc_end_blocks": 0}}


class _RssSampler:
    """Largest resident set size seen while active (sampled every 20 ms): the peak of a phase,
    which `ru_maxrss` (the peak of the whole process, tracing included) cannot give."""

    def __init__(self) -> None:
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, current_rss_mb())
            time.sleep(0.02)

    def __enter__(self) -> "_RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _model_and_data(name: str, *, small: bool = False):  # noqa: ANN202
    """The FlowModel of a configuration and a function drawing one random batch (`small`:
    `QUICK_FIELDS`)."""
    import dataclasses

    import numpy as np

    from tfp_resflow.bijectors import multiscale
    from tfp_resflow.bijectors.flow import ResidualFlowBijector
    from tfp_resflow.configs import presets
    from tfp_resflow.models.model import FlowModel

    rng = np.random.default_rng(0)
    estimate = "gram" if name.endswith(GRAM) else "power"
    name = name.removesuffix(GRAM)
    if name == "toy":
        flow = ResidualFlowBijector(
            num_blocks=QUICK_FIELDS["toy"]["num_blocks"] if small else 10,
            hidden_units=(128,) * 4,
            lipschitz_constant=0.9,
            lipschitz_estimate=estimate,
        )
        model = FlowModel(flow, event_shape=[2])
        return model, lambda: rng.normal(size=(500, 2)).astype(np.float32)
    if name.startswith("mnist"):
        preset, batch = "mnist", int(name.split("-")[1])
        config = presets.get_preset(preset)
    else:
        preset, batch = "digits", 64
        config = presets.get_preset(preset)
        if name == "digits-authors":
            config = dataclasses.replace(
                config, hidden_channels=64, fc_end_blocks=4, fc_hidden_units=(64, 64)
            )
    config = dataclasses.replace(config, lipschitz_estimate=estimate)
    if small:
        scales = len(config.blocks_per_scale)
        config = dataclasses.replace(
            config, blocks_per_scale=(1,) * scales, **QUICK_FIELDS["image"]
        )
    shape = presets.PRESET_INPUT_SHAPES[preset]
    levels = config.num_levels
    flow = multiscale.image_flow(shape, config)
    model = FlowModel(flow, shape, loss_unit="bits_per_dim", num_levels=levels)

    def images() -> np.ndarray:  # random integer images, uniformly dequantised, in [0, 1)
        pixels = rng.integers(0, levels, size=(batch, *shape))
        return ((pixels + rng.uniform(size=pixels.shape)) / levels).astype(np.float32)

    return model, images


def _distribution_loop_step(model):  # noqa: ANN202
    """A TFP user's training step: `dist.log_prob` under a tape, in a `tf.function`.

    The loss is the model's (mean bits/dim of the same `tfd.TransformedDistribution`), the
    optimizer is the compiled one, and the power iterations follow the step as in
    `FlowModel.train_step`; only the path to the log-density differs.
    """
    import math

    import tensorflow as tf

    from tfp_resflow.models import bits

    variables = model.trainable_variables
    model.optimizer.build(variables)
    size = math.prod(model.event_shape)

    @tf.function
    def step(x: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            log_prob = model.distribution.log_prob(x)
            loss = tf.reduce_mean(bits.bits_per_dim(log_prob, size, model.num_levels))
        model.optimizer.apply(tape.gradient(loss, variables), variables)
        model.update_lipschitz(model.power_iterations)
        return loss

    return step


def _timed_steps(step, batch, steps: int) -> tuple[list[float], float, float]:
    """`steps` timed training steps: their seconds, the last loss, and the peak RSS (MB)."""
    times = []
    with _RssSampler() as steps_rss:
        for _ in range(steps):
            x = batch()
            t = time.perf_counter()
            loss = float(step(x))
            times.append(time.perf_counter() - t)
    return times, loss, steps_rss.peak_mb


def _sampling(model, num_samples: int, repeats: int = 2) -> dict:
    """Seconds to draw `num_samples` samples (`FlowModel.sample`, one traced function): the
    first call, tracing included, and the median of `repeats` later calls; finite or not."""
    import numpy as np

    times = []
    for _ in range(1 + repeats):
        start = time.perf_counter()
        samples = model.sample(num_samples).numpy()
        times.append(time.perf_counter() - start)
    return {
        "sample_seconds": round(statistics.median(times[1:]), 2),
        "first_sample_seconds": round(times[0], 2),
        "num_samples": num_samples,
        "samples_finite": bool(np.isfinite(samples).all()),
    }


def measure_configuration(options: dict) -> dict:
    """One configuration, in this process: build, initialise, first step, timed steps, sampling."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    start = time.perf_counter()
    import keras
    import numpy as np

    from tfp_resflow.training import train_config

    import_seconds = time.perf_counter() - start
    keras.utils.set_random_seed(0)
    start = time.perf_counter()
    name = options["name"]
    td_loop = name.endswith(TD_LOOP)
    model, batch = _model_and_data(name.removesuffix(TD_LOOP), small=options.get("small", False))
    recipe = train_config.TrainConfig()
    model.compile(optimizer=train_config.make_optimizer(recipe, total_steps=10**5))
    model.initialize(batch())
    build_seconds = time.perf_counter() - start
    rss_before_first_step = current_rss_mb()

    start = time.perf_counter()
    step = _distribution_loop_step(model) if td_loop else model.train_on_batch
    first_loss = float(step(batch()))  # traces, then runs one step
    end_of_first_step = time.perf_counter()
    times, loss, steps_peak_mb = _timed_steps(step, batch, options["steps"])
    row = {
        "configuration": name,
        "batch_size": int(batch().shape[0]),
        "trainable_parameters": int(sum(np.prod(w.shape) for w in model.trainable_weights)),
        "trainable_variables": len(model.trainable_weights),
        "import_seconds": round(import_seconds, 1),
        "build_and_init_seconds": round(build_seconds, 1),
        "first_step_seconds_with_tracing": round(end_of_first_step - start, 1),
        "seconds_to_first_step_end": round(end_of_first_step - PROCESS_START, 1),
        "step_seconds": [round(t, 3) for t in times],
        "step_seconds_median": round(statistics.median(times), 3),
        "losses": [round(first_loss, 3), round(loss, 3)],
        "peak_rss_gb": round(peak_rss_mb() / 1024.0, 2),
        "rss_before_first_step_gb": round(rss_before_first_step / 1024.0, 2),
        "peak_rss_during_timed_steps_gb": round(steps_peak_mb / 1024.0, 2),
    }
    if not name.startswith("toy"):
        row.update(_sampling(model, options["num_samples"]))
    return row


def _print_table(rows: list[dict]) -> None:
    columns = [
        "configuration",
        "batch",
        "parameters",
        "step (s, median)",
        "first step incl. tracing (s)",
        "process start to end of first step (s)",
        "sample 64 (s)",
        "first sample 64 incl. tracing (s)",
        "peak RSS (GB)",
    ]
    cells = [
        [
            r["configuration"],
            r["batch_size"],
            f"{r['trainable_parameters']:,}",
            r["step_seconds_median"],
            r["first_step_seconds_with_tracing"],
            r["seconds_to_first_step_end"],
            r.get("sample_seconds", "-"),
            r.get("first_sample_seconds", "-"),
            r["peak_rss_gb"],
        ]
        for r in rows
    ]
    print_table(columns, cells)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", choices=CONFIGURATIONS, default=CONFIGURATIONS)
    parser.add_argument("--steps", type=int, default=0, help="timed steps (0: 5, 2 for mnist)")
    parser.add_argument("--num-samples", type=int, default=64, help="images sampled per model")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small models (one block per scale, no fully connected one; 1 toy block): that "
        "each configuration runs, not its time or memory",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(measure_configuration(json.loads(args.worker))))
        return

    rows = []
    for name in args.configs:
        steps = args.steps or (2 if name.startswith("mnist") else 5)
        options = {"name": name, "steps": steps, "num_samples": args.num_samples}
        if args.quick:
            options["small"] = True
        rows.append(run_worker(__file__, [json.dumps(options)]))
        print(f"  done: {rows[-1]}", file=sys.stderr)

    _print_table(rows)
    quick = {"quick_fields": QUICK_FIELDS} if args.quick else {}
    write_results(args.output, __file__, argv, rows=rows, **quick)


if __name__ == "__main__":
    main()
