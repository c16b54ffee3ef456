"""Train a Residual Flow with Keras `fit`.

With no flags it trains the small `digits` preset on the 8x8 handwritten digits that ship with
scikit-learn (offline, a few minutes on 2 CPU cores) and reports the test bits/dim of the EMA
weights in evaluation mode. Everything goes to --output-dir: config.json, metrics.json,
samples.png (density.png for 2-D data), checkpoints/, logs/ (TensorBoard) and model.keras.

Examples:
    python train_tf.py
    python train_tf.py --dataset 8gaussians --epochs 20
    python train_tf.py --context label             # p(x | label): samples.png, a row per class
    python train_tf.py --model blocks_per_scale=4,4 hidden_channels=64 solver=anderson
    python train_tf.py --dataset mnist --preset mnist --download   # needs internet once
    python train_tf.py --output-dir runs/default --resume --epochs 60
    python train_tf.py --output-dir runs/default --eval-only
    python train_tf.py --output-dir runs/default --sample 100
    python train_tf.py --strategy mirrored --cpu-devices 2        # tf.distribute on 2 CPUs

A run killed mid-way (even by SIGKILL) resumes from its last backup when the same command is run
again (Keras BackupAndRestore).
"""

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from tfp_resflow.configs.config_fields import to_dict  # noqa: E402
from tfp_resflow.core import validation  # noqa: E402
from tfp_resflow.data import datasets, toy_data  # noqa: E402
from tfp_resflow.models.model import FlowModel  # noqa: E402
from tfp_resflow.training import (  # noqa: E402
    artifacts,
    distribute,
    evaluation,
    evaluation_callback,
    train_config,
)

TrainConfig = train_config.TrainConfig


class _OneLineErrors(argparse.ArgumentParser):
    """Bad flags end with one line on stderr and exit status 2, not a usage block."""

    def error(self, message: str) -> None:  # noqa: D102
        self.exit(2, f"train_tf.py: error: {message}\n")


def _make_parser() -> argparse.ArgumentParser:
    """One flag per `TrainConfig` field, plus the run modes."""
    parser = _OneLineErrors(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        help_text = f"{train_config.FLAG_HELP[field.name]} (default: {field.default})"
        if isinstance(field.default, bool):  # --flag / --no-flag, not type=bool ("False" is true)
            action = argparse.BooleanOptionalAction
            parser.add_argument(flag, action=action, default=field.default, help=help_text)
        elif isinstance(field.default, tuple):  # repeatable: --model a=1 b=2 --model c=3
            parser.add_argument(
                flag, nargs="+", action="extend", default=[], metavar="NAME=VALUE", help=help_text
            )
        else:
            parser.add_argument(
                flag, type=type(field.default), default=field.default, help=help_text
            )
    parser.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in --output-dir"
    )
    parser.add_argument(
        "--eval-only",
        action="store_true",
        help="evaluate the latest checkpoint in --output-dir and exit",
    )
    parser.add_argument(
        "--sample",
        type=int,
        default=0,
        metavar="N",
        help="write N samples of the latest checkpoint to samples_N.png and exit",
    )
    parser.add_argument(
        "--download",
        action="store_true",
        help="let tensorflow-datasets download a dataset that is not prepared",
    )
    return parser


def parse_args(argv: list[str] | None) -> tuple[TrainConfig, argparse.Namespace]:
    """The run's `TrainConfig` and the parsed flags; bad values exit with one line."""
    parser = _make_parser()
    args = parser.parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    values["model"] = tuple(values["model"])
    try:
        config = TrainConfig(**values)
        validation.integer("--sample", args.sample, 0)
        train_config.model_config(config)
    except ValueError as error:
        parser.error(str(error))
    return config, args


def load_data(config: TrainConfig, download: bool) -> tuple:  # noqa: FBT001
    """Training and test pipelines, a batch for ActNorm's initialisation, the data's shape.

    The initialisation batch comes from a separate copy of the training pipeline: iterating
    the training dataset itself would advance its reshuffling, and the order `fit` sees would
    then depend on how a strategy wraps the dataset.
    """
    with_context = train_config.with_context  # (the argument below shadows the module's name)

    def load(split: str, *, training: bool = True) -> tuple:
        batch_size = config.batch_size if training else config.eval_batch_size
        options = {"seed": config.seed, "download": download, "training": training}
        options["labels"] = config.task != "density" or config.context != "none"
        dataset, shape, levels = datasets.load_dataset(
            config.dataset, split, batch_size=batch_size, **options
        )
        return with_context(dataset, config), shape, levels

    train, event_shape, num_levels = load("train")
    test, _, _ = load("test", training=False)
    init_batch = next(iter(load("train")[0]))
    return train, test, init_batch, tuple(event_shape), num_levels


def _fail(message: str) -> int:
    print(f"train_tf.py: error: {message}", file=sys.stderr)
    return 2


def _steps_per_epoch(config: TrainConfig) -> int:
    """One pass over the training data (the stream is endless), unless the flag says otherwise."""
    if config.steps_per_epoch:
        return config.steps_per_epoch
    count = datasets.num_examples(config.dataset, "train")
    if not count:
        raise ValueError("the dataset's size is unknown: pass --steps-per-epoch.")
    return max(1, count // config.batch_size)


@dataclasses.dataclass
class _Run:
    """What every run mode works with, set up by `_prepare`."""

    config: TrainConfig
    run_dir: Path
    strategy: Any
    write_files: bool
    train: Any
    steps_per_epoch: int
    model: FlowModel
    evaluation: evaluation_callback.EvaluationCallback
    initial_epoch: int = 0


def _prepare(config: TrainConfig, download: bool) -> _Run | str:  # noqa: FBT001
    """Strategy, run directory, data, the compiled model and its evaluation; or an error."""
    run_dir = Path(config.output_dir)
    strategy = distribute.make_strategy(config.strategy, cpu_devices=config.cpu_devices)
    keras.utils.set_random_seed(config.seed)
    write_files = distribute.is_chief(strategy)
    if not write_files:  # other workers of a multi-worker run keep their files apart
        run_dir = run_dir / f"worker_{distribute.task_index(strategy)}"
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        train, test, init_batch, event_shape, num_levels = load_data(config, download)
        steps_per_epoch = _steps_per_epoch(config)
    except (ValueError, OSError) as error:
        return str(error).strip().splitlines()[0]
    with strategy.scope():
        model = train_config.compiled_model(
            config, event_shape, num_levels, init_batch, steps_per_epoch
        )
    toy_points = None
    if config.dataset in toy_data.TOY_DATASETS:
        toy_points = np.concatenate([x.numpy() for x, _ in zip(test, range(32), strict=False)])
    callback = evaluation_callback.EvaluationCallback(
        config, test, run_dir, unit=model.loss_unit, toy_points=toy_points, write_files=write_files
    )
    callback.set_model(model)
    return _Run(config, run_dir, strategy, write_files, train, steps_per_epoch, model, callback)


def _load_checkpoint(run: _Run) -> str | None:
    """Loads the run's latest checkpoint; an error message if there is none."""
    found = artifacts.latest_checkpoint(run.run_dir)
    if found is None:
        return f"no checkpoint in {artifacts.checkpoint_dir(run.run_dir)} to resume or evaluate."
    path, run.initial_epoch = found
    run.model.load_weights(path)
    run.evaluation.initial_epoch = run.initial_epoch
    print(f"loaded {path} (epoch {run.initial_epoch})")
    return None


def _evaluate_only(run: _Run) -> int:
    """`--eval-only`: evaluates the loaded checkpoint into eval.json."""
    unit = run.model.loss_unit
    result = run.evaluation.evaluate(write_samples=run.write_files)
    result["checkpoint_epoch"] = run.initial_epoch
    (run.run_dir / "eval.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"test {unit}: {result[f'test_{unit}']:.4f} (EMA weights, evaluation mode)")
    return 0


def _sample(run: _Run, count: int) -> int:
    """`--sample N`: N samples of the loaded checkpoint's EMA weights, as PNG (or .npy)."""
    config, model = run.config, run.model
    contexts, columns = None, None
    if model.context_shape is not None:  # `count` per class, one row per class
        contexts, columns = evaluation.class_contexts(model.context_shape[0], count), count
    with evaluation.ema_weights(model):
        model.update_lipschitz(atol=config.lipschitz_tolerance, rtol=config.lipschitz_tolerance)
        total = count if contexts is None else len(contexts)
        samples = model.sample(total, seed=[config.seed, 2], context=contexts).numpy()
    path = run.run_dir / f"samples_{count}.png"
    if run.evaluation.toy_points is not None:  # 2-D data: the points themselves
        path = path.with_suffix(".npy")
        np.save(path, samples)
    else:
        scale = max(1, 64 // samples.shape[1])
        grid = artifacts.image_grid(samples, columns=columns, scale=scale)
        artifacts.write_png(path, grid)
    print(f"wrote {path}")
    return 0


def _fit(run: _Run) -> None:
    """Keras `fit` with crash recovery, checkpoints and logs (a custom loop for multiworker)."""
    config, run_dir = run.config, run.run_dir
    schedule = {
        "epochs": config.epochs,
        "steps_per_epoch": run.steps_per_epoch,
        "initial_epoch": run.initial_epoch,
        "verbose": config.verbose,
    }
    if config.strategy == "multiworker":
        distribute.fit_custom_loop(
            run.strategy, run.model, run.train, callbacks=[run.evaluation], **schedule
        )
        return
    callbacks = [
        # First, so that the callbacks after it see the restored state.
        keras.callbacks.BackupAndRestore(
            str(run_dir / "backup"), save_freq=config.backup_every, double_checkpoint=True
        ),
        keras.callbacks.ModelCheckpoint(
            str(artifacts.checkpoint_dir(run_dir) / "epoch_{epoch:03d}.weights.h5"),
            save_weights_only=True,
        ),
        keras.callbacks.TensorBoard(str(run_dir / "logs")),
        run.evaluation,
    ]
    run.model.fit(run.train, callbacks=callbacks, **schedule)


def _train(run: _Run) -> int:
    """Trains, then saves the EMA model and reports the last evaluation."""
    config, model, run_dir, unit = run.config, run.model, run.run_dir, run.model.loss_unit
    if run.write_files:
        flow_config = to_dict(train_config.model_config(config))
        written = {**dataclasses.asdict(config), "model_config": flow_config}
        (run_dir / "config.json").write_text(json.dumps(written, indent=1) + "\n")
    _fit(run)
    # fit ends by replacing the weights with their EMA (Keras' use_ema); save that model, with
    # its norm estimates converged for these weights.
    model.update_lipschitz(atol=config.lipschitz_tolerance, rtol=config.lipschitz_tolerance)
    if run.write_files:
        model.save(run_dir / "model.keras")
    # Every process (each worker of a multi-worker run too) fingerprints its final weights.
    (run_dir / "final_weights.json").write_text(
        json.dumps(evaluation.weights_checksum(model.weights)) + "\n"
    )
    history = run.evaluation.history
    final = history[-1] if history else {}
    accuracy = f", accuracy {final['test_accuracy']:.4f}" if "test_accuracy" in final else ""
    print(
        f"test {unit}: {final.get(f'test_{unit}', float('nan')):.4f}{accuracy} after epoch "
        f"{final.get('epoch')} (EMA weights, evaluation mode); files in {run_dir}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit status."""
    config, args = parse_args(argv)
    run = _prepare(config, args.download)
    if isinstance(run, str):
        return _fail(run)
    if args.resume or args.eval_only or args.sample:
        error = _load_checkpoint(run)
        if error:
            return _fail(error)
    if args.eval_only:
        return _evaluate_only(run)
    if args.sample:
        return _sample(run, args.sample)
    return _train(run)


if __name__ == "__main__":
    sys.exit(main())
