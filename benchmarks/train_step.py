"""Time and peak memory of training steps of an image preset, to compare with the authors' code.

The setting of `../shared/reference/targets.md`: a preset (default `mnist`: 16-16-16 blocks,
512 hidden channels, 3-1-3 kernels, LipSwish, coefficient 0.98, Poisson(2) + 2 exact terms,
ActNorm, 4 fully connected end blocks) on random dequantised 28x28x1 images, batch 64, with
the training recipe of `train_tf.py` (Adam, clipping, EMA, non-finite guard) and the power
iterations after every step. One step = `FlowModel.train_on_batch` (forward with the unbiased
log-det estimator, Neumann gradient, optimizer, power iterations). Each configuration runs in
its own subprocess, so its peak resident set size (`ru_maxrss`) is its alone.

    python benchmarks/train_step.py                         # mnist preset, batch 64, 2 steps
    python benchmarks/train_step.py --blocks 4 4 4 --batch-size 8 --exact-terms 10 20

`--exact-terms` runs one configuration per value with that many exact series terms and
(almost) no random extra terms (geometric, p = 0.999), the memory-against-terms setting.
Prints a markdown table and writes `benchmarks/results/train_step.json` (or `--output`).
"""

import argparse
import dataclasses
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

from measure import current_rss_mb, peak_rss_mb, run_worker, write_results

RESULTS = Path(__file__).resolve().parent / "results" / "train_step.json"


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


def measure_configuration(options: dict) -> dict:
    """One configuration, in this process: build, initialise, trace, time steps and sampling."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import numpy as np

    from tfp_resflow import multiscale, presets, training
    from tfp_resflow.model import FlowModel

    keras.utils.set_random_seed(0)
    config = presets.get_preset(options["preset"])
    changes = {}
    if options["blocks"]:
        changes["blocks_per_scale"] = tuple(options["blocks"])
    if options["exact_terms"] is not None:
        changes.update(
            num_exact_terms=options["exact_terms"], term_distribution="geometric", geometric_p=0.999
        )
    config = dataclasses.replace(config, **changes)
    shape = presets.PRESET_INPUT_SHAPES[options["preset"]]
    batch = options["batch_size"]
    rng = np.random.default_rng(0)
    levels = config.num_levels

    def images() -> np.ndarray:  # random integer images, uniformly dequantised, in [0, 1)
        pixels = rng.integers(0, levels, size=(batch, *shape))
        return ((pixels + rng.uniform(size=pixels.shape)) / levels).astype(np.float32)

    start = time.perf_counter()
    flow = multiscale.image_flow(shape, config)
    model = FlowModel(flow, shape, loss_unit="bits_per_dim", num_levels=levels)
    train_config = training.TrainConfig(dataset="mnist", preset=options["preset"])
    model.compile(optimizer=training.make_optimizer(train_config, total_steps=10**5))
    model.initialize(images())
    build_seconds = time.perf_counter() - start
    rss_before_first_step = current_rss_mb()

    start = time.perf_counter()
    first_loss = float(model.train_on_batch(images()))  # traces, then runs one step
    first_step_seconds = time.perf_counter() - start
    rss_after_tracing = current_rss_mb()
    times = []
    with _RssSampler() as steps_rss:
        for _ in range(options["steps"]):
            x = images()
            start = time.perf_counter()
            loss = float(model.train_on_batch(x))
            times.append(time.perf_counter() - start)
    start = time.perf_counter()
    samples = model.sample(options["num_samples"]).numpy()
    sample_seconds = time.perf_counter() - start
    return {
        "preset": options["preset"],
        "blocks_per_scale": list(config.blocks_per_scale),
        "batch_size": batch,
        "num_exact_terms": config.num_exact_terms,
        "term_distribution": config.term_distribution,
        "trainable_parameters": int(sum(np.prod(w.shape) for w in model.trainable_weights)),
        "build_and_init_seconds": round(build_seconds, 1),
        "first_step_seconds_with_tracing": round(first_step_seconds, 1),
        "step_seconds": [round(t, 2) for t in times],
        "step_seconds_median": round(statistics.median(times), 2),
        "sample_seconds": round(sample_seconds, 2),
        "num_samples": options["num_samples"],
        "samples_finite": bool(np.isfinite(samples).all()),
        "losses_bits_per_dim": [round(first_loss, 3), round(loss, 3)],
        "peak_rss_gb": round(peak_rss_mb() / 1024.0, 2),
        "rss_before_first_step_gb": round(rss_before_first_step / 1024.0, 2),
        "rss_after_first_step_gb": round(rss_after_tracing / 1024.0, 2),
        "peak_rss_during_timed_steps_gb": round(steps_rss.peak_mb / 1024.0, 2),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mnist")
    parser.add_argument("--blocks", type=int, nargs="+", help="blocks per scale (preset's)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2, help="timed steps after the first")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument(
        "--exact-terms", type=int, nargs="+", help="one run per value (see module docs)"
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(measure_configuration(json.loads(args.worker))))
        return

    rows = []
    for terms in args.exact_terms or [None]:
        options = {
            "preset": args.preset,
            "blocks": args.blocks,
            "batch_size": args.batch_size,
            "steps": args.steps,
            "num_samples": args.num_samples,
            "exact_terms": terms,
        }
        rows.append(run_worker(__file__, [json.dumps(options)]))
        print(f"  done: {rows[-1]}", file=sys.stderr)

    print(
        "| preset | blocks | batch | exact terms | parameters | step (s, median) "
        f"| first step incl. tracing (s) | sample {args.num_samples} (s) | peak RSS (GB) "
        "| peak RSS in timed steps (GB) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['preset']} | {'-'.join(map(str, r['blocks_per_scale']))} | {r['batch_size']} "
            f"| {r['num_exact_terms']} ({r['term_distribution']}) | {r['trainable_parameters']:,} "
            f"| {r['step_seconds_median']} | {r['first_step_seconds_with_tracing']} "
            f"| {r['sample_seconds']} | {r['peak_rss_gb']} "
            f"| {r['peak_rss_during_timed_steps_gb']} |"
        )
    write_results(args.output, __file__, argv, rows=rows)


if __name__ == "__main__":
    main()
