"""Train a Residual Flow with Keras `fit`.

With no flags it trains the small `digits` preset on the 8x8 handwritten digits that ship with
scikit-learn (offline, a few minutes on 2 CPU cores) and reports the test bits/dim of the EMA
weights in evaluation mode. Everything goes to --output-dir: config.json, metrics.json,
samples.png (density.png for 2-D data), checkpoints/, logs/ (TensorBoard) and model.keras.

Examples:
    python train_tf.py
    python train_tf.py --dataset 8gaussians --epochs 20
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

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from tfp_resflow import artifacts, data, distribute, multiscale, presets, training  # noqa: E402
from tfp_resflow.config import (  # noqa: E402
    ImageFlowConfig,
    ResidualFlowConfig,
    parse_assignments,
    to_dict,
)
from tfp_resflow.flow import ResidualFlowBijector  # noqa: E402
from tfp_resflow.model import FlowModel  # noqa: E402

TrainConfig = training.TrainConfig

HELP = {
    "dataset": f"toy set ({', '.join(data.TOY_DATASETS)}), 'digits' (offline), or a tfds "
    "image dataset such as mnist or cifar10",
    "preset": f"model: one of {', '.join(sorted(presets.PRESETS))}, 'toy' (2-D data), or "
    "'auto' (digits for digits, the dataset's name if it is a preset, toy for 2-D data)",
    "model": "changes to the preset's model config as name=value (lists comma-separated), "
    "e.g. --model blocks_per_scale=4,4 hidden_channels=64 log_det=exact solver=anderson "
    "learnable_norm_orders=true; fields of ImageFlowConfig (ResidualFlowConfig for 'toy') and "
    "of its BlockConfig",
    "epochs": "number of epochs (total, also with --resume)",
    "steps_per_epoch": "optimizer steps per epoch; 0 means one pass over the training data",
    "batch_size": "global batch size (split across replicas)",
    "learning_rate": "peak learning rate of Adam after the linear warm-up",
    "warmup_steps": "steps of linear learning-rate warm-up from 0",
    "schedule": "learning rate after the warm-up: constant or cosine (decays to 0)",
    "ema_momentum": "momentum of the parameter EMA used for evaluation and sampling (0: off)",
    "clip_norm": "clip gradients to this global norm",
    "seed": "random seed of data shuffling, dequantisation and initialisation",
    "output_dir": "run directory",
    "strategy": "tf.distribute strategy: default, mirrored, multiworker (TF_CONFIG) or tpu",
    "cpu_devices": "split the CPU into this many logical devices (to try mirrored on a CPU)",
    "backup_every": "steps between crash-recovery backups",
    "num_samples": "samples drawn for samples.png at every evaluation",
    "lipschitz_tolerance": "power-iteration tolerance before every evaluation",
    "num_eval_draws": "training-mode estimates per evaluation, for the estimator's spread",
    "eval_batch_size": "test examples per evaluation batch",
    "verbose": "0 silent, 1 progress bar, 2 one line per epoch",
}


class _OneLineErrors(argparse.ArgumentParser):
    """Bad flags end with one line on stderr and exit status 2, not a usage block."""

    def error(self, message: str) -> None:  # noqa: D102
        self.exit(2, f"train_tf.py: error: {message}\n")


def parse_args(argv: list[str] | None) -> tuple[TrainConfig, argparse.Namespace]:
    """One flag per `TrainConfig` field, plus the run modes."""
    parser = _OneLineErrors(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        help_text = f"{HELP[field.name]} (default: {field.default})"
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
    args = parser.parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    values["model"] = tuple(values["model"])
    try:
        config = TrainConfig(**values)
        if args.sample < 0:
            raise ValueError(f"--sample must be >= 0; got {args.sample}.")
        model_config(config)
    except ValueError as error:
        parser.error(str(error))
    return config, args


def resolve_preset(config: TrainConfig) -> str:
    """The model preset for a dataset ('auto' picks one); ValueError if they do not fit."""
    is_toy = config.dataset in data.TOY_DATASETS
    preset = config.preset
    if preset == "auto":
        if is_toy:
            return "toy"
        preset = config.dataset if config.dataset in presets.PRESETS else "digits"
    if is_toy != (preset == "toy"):
        raise ValueError(
            f"preset {preset!r} does not fit dataset {config.dataset!r}: use 'toy' for 2-D "
            "sets and an image preset for images."
        )
    if preset != "toy" and preset not in presets.PRESETS:
        raise ValueError(
            f"unknown preset {preset!r}; choose from {sorted(presets.PRESETS)} or 'toy'."
        )
    return preset


def model_config(config: TrainConfig) -> ResidualFlowConfig | ImageFlowConfig:
    """The preset's model config with the run's `--model` changes; ValueError if one is bad."""
    preset = resolve_preset(config)
    base = presets.TOY if preset == "toy" else presets.get_preset(preset)
    return parse_assignments(base, config.model)


def build_model(config: TrainConfig, event_shape: tuple, num_levels: int | None) -> FlowModel:
    """The run's flow, wrapped in a FlowModel with the run's loss unit."""
    flow_config = model_config(config)
    if isinstance(flow_config, ResidualFlowConfig):
        flow = ResidualFlowBijector(flow_config)
        return FlowModel(flow, event_shape=event_shape, loss_unit="nats")
    flow = multiscale.image_flow(event_shape, flow_config)
    return FlowModel(flow, event_shape=event_shape, loss_unit="bits_per_dim", num_levels=num_levels)


def load_data(config: TrainConfig, download: bool) -> tuple:  # noqa: FBT001
    """Training and test pipelines, a batch for ActNorm's initialisation, the data's shape.

    The initialisation batch comes from a separate copy of the training pipeline: iterating
    the training dataset itself would advance its reshuffling, and the order `fit` sees would
    then depend on how a strategy wraps the dataset.
    """

    def load(split: str, *, training: bool = True) -> tuple:
        return data.load_dataset(
            config.dataset,
            split,
            batch_size=config.batch_size if training else config.eval_batch_size,
            seed=config.seed,
            download=download,
            training=training,
        )

    train, event_shape, num_levels = load("train")
    test, _, _ = load("test", training=False)
    init_batch = next(iter(load("train")[0]))
    return train, test, init_batch, tuple(event_shape), num_levels


def checkpoint_dir(run_dir: Path) -> Path:
    """Where the per-epoch checkpoints (weights and optimizer state) of a run go."""
    return run_dir / "checkpoints"


def latest_checkpoint(run_dir: Path) -> tuple[Path, int] | None:
    """The newest `epoch_NNN.weights.h5` in the run and its epoch, or None."""
    found = sorted(checkpoint_dir(run_dir).glob("epoch_*.weights.h5"))
    if not found:
        return None
    path = found[-1]
    return path, int(path.name.split("_")[1].split(".")[0])


def _fail(message: str) -> int:
    print(f"train_tf.py: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit status."""
    config, args = parse_args(argv)
    run_dir = Path(config.output_dir)
    strategy = distribute.make_strategy(config.strategy, cpu_devices=config.cpu_devices)
    keras.utils.set_random_seed(config.seed)
    write_files = distribute.is_chief(strategy)
    if not write_files:  # other workers of a multi-worker run keep their files apart
        run_dir = run_dir / f"worker_{distribute.task_index(strategy)}"
    run_dir.mkdir(parents=True, exist_ok=True)

    try:
        train, test, init_batch, event_shape, num_levels = load_data(config, args.download)
        # One pass over the training data (the stream is endless), unless the flag says otherwise.
        steps_per_epoch = config.steps_per_epoch
        if not steps_per_epoch:
            count = data.num_examples(config.dataset, "train")
            if not count:
                raise ValueError("the dataset's size is unknown: pass --steps-per-epoch.")
            steps_per_epoch = max(1, count // config.batch_size)
    except (ValueError, OSError) as error:
        return _fail(str(error).strip().splitlines()[0])

    with strategy.scope():
        model = build_model(config, event_shape, num_levels)
        model.build((None, *event_shape))
        model.initialize(init_batch)
        model.compile(
            optimizer=training.make_optimizer(config, training.total_steps(config, steps_per_epoch))
        )
        model.optimizer.build(model.trainable_variables)

    unit = model.loss_unit
    toy_points = None
    if config.dataset in data.TOY_DATASETS:
        toy_points = np.concatenate([x.numpy() for x, _ in zip(test, range(32), strict=False)])
    evaluation = training.EvaluationCallback(
        config, test, run_dir, unit=unit, toy_points=toy_points, write_files=write_files
    )
    evaluation.set_model(model)
    initial_epoch = 0
    if args.resume or args.eval_only or args.sample:
        found = latest_checkpoint(run_dir)
        if found is None:
            return _fail(f"no checkpoint in {checkpoint_dir(run_dir)} to resume or evaluate.")
        path, initial_epoch = found
        model.load_weights(path)
        evaluation.initial_epoch = initial_epoch
        print(f"loaded {path} (epoch {initial_epoch})")
    if args.eval_only:
        result = evaluation.evaluate(write_samples=write_files)
        result["checkpoint_epoch"] = initial_epoch
        (run_dir / "eval.json").write_text(json.dumps(result, indent=1) + "\n")
        print(f"test {unit}: {result[f'test_{unit}']:.4f} (EMA weights, evaluation mode)")
        return 0
    if args.sample:
        with training.ema_weights(model):
            model.update_lipschitz(atol=config.lipschitz_tolerance, rtol=config.lipschitz_tolerance)
            samples = model.sample(args.sample, seed=[config.seed, 2]).numpy()
        path = run_dir / f"samples_{args.sample}.png"
        if toy_points is not None:
            np.save(run_dir / f"samples_{args.sample}.npy", samples)
            print(f"wrote {run_dir / f'samples_{args.sample}.npy'}")
        else:
            artifacts.write_png(
                path, artifacts.image_grid(samples, scale=max(1, 64 // samples.shape[1]))
            )
            print(f"wrote {path}")
        return 0

    if write_files:
        written = {**dataclasses.asdict(config), "model_config": to_dict(model_config(config))}
        (run_dir / "config.json").write_text(json.dumps(written, indent=1) + "\n")
    if config.strategy == "multiworker":
        distribute.fit_custom_loop(
            strategy,
            model,
            train,
            epochs=config.epochs,
            steps_per_epoch=steps_per_epoch,
            initial_epoch=initial_epoch,
            callbacks=[evaluation],
            verbose=config.verbose,
        )
    else:
        callbacks = [
            # First, so that the callbacks after it see the restored state.
            keras.callbacks.BackupAndRestore(
                str(run_dir / "backup"), save_freq=config.backup_every, double_checkpoint=True
            ),
            keras.callbacks.ModelCheckpoint(
                str(checkpoint_dir(run_dir) / "epoch_{epoch:03d}.weights.h5"),
                save_weights_only=True,
            ),
            keras.callbacks.TensorBoard(str(run_dir / "logs")),
            evaluation,
        ]
        model.fit(
            train,
            epochs=config.epochs,
            steps_per_epoch=steps_per_epoch,
            initial_epoch=initial_epoch,
            callbacks=callbacks,
            verbose=config.verbose,
        )
    # fit ends by replacing the weights with their EMA (Keras' use_ema); save that model, with
    # its norm estimates converged for these weights.
    model.update_lipschitz(atol=config.lipschitz_tolerance, rtol=config.lipschitz_tolerance)
    if write_files:
        model.save(run_dir / "model.keras")
    # Every process (each worker of a multi-worker run too) fingerprints its final weights.
    (run_dir / "final_weights.json").write_text(
        json.dumps(training.weights_checksum(model.weights)) + "\n"
    )
    final = evaluation.history[-1] if evaluation.history else {}
    print(
        f"test {unit}: {final.get(f'test_{unit}', float('nan')):.4f} after epoch "
        f"{final.get('epoch')} (EMA weights, evaluation mode); files in {run_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
