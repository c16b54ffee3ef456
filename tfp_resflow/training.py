"""The authors' training recipe (Chen et al., 2019, Appendix and `train_img.py`) on Keras' parts.

    Adam(beta_2=0.99) with gradient clipping at global norm 1      keras Adam (GroupedAdam)
    linear warm-up, then constant or cosine learning rate           keras CosineDecay(warmup_*)
    parameter EMA (0.999; 0.99 for short runs), for evaluation      Adam(use_ema=True)
    skip a step whose loss or gradients are not finite             GroupedAdam; LossScale-
                                                                     Optimizer (tf.distribute)
    power iterations after every step                              FlowModel.train_step
    power iterations to convergence before evaluation              EvaluationCallback
    checkpoints, crash recovery, logs                               ModelCheckpoint,
                                                                     BackupAndRestore, TensorBoard

Only the per-epoch evaluation is ours: Keras validates with the raw weights, while the paper's
numbers are for the EMA weights with converged Lipschitz estimates.

Under a `tf.distribute` strategy `LossScaleOptimizer` is used only for its finite check: with an
initial scale of 1 (and powers of 2 after a skipped step) the scaling is exact in floating point,
and a step with a NaN or inf gradient leaves the weights, the Adam moments and the EMA untouched.
On one replica `GroupedAdam(skip_nonfinite=True)` does the same from one check on the stacked
gradients.
"""

import contextlib
import dataclasses
import json
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tfp_resflow import artifacts, lipschitz
from tfp_resflow.model import FlowModel
from tfp_resflow.modes import training_mode
from tfp_resflow.optimizer import GroupedAdam

__all__ = [
    "EvaluationCallback",
    "TrainConfig",
    "ema_weights",
    "evaluate_loss",
    "evaluation_losses",
    "make_optimizer",
    "make_schedule",
    "weights_checksum",
]

SCHEDULES = ("constant", "cosine")
STRATEGIES = ("default", "mirrored", "multiworker", "tpu")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run; written to `config.json` in the run directory.

    `train_tf.py` makes one command-line flag per field, so the two cannot drift apart.
    """

    dataset: str = "digits"  # a toy set, "digits" (offline), or a tfds image dataset
    preset: str = "auto"  # image preset name, "toy" for 2-D sets; "auto" picks by dataset
    # "name=value" changes to the preset's model config (`config.parse_assignments`), e.g.
    # ("hidden_channels=64", "solver=anderson"); checked when the model config is made.
    model: tuple[str, ...] = ()
    epochs: int = 15
    steps_per_epoch: int = 0  # 0: one pass over the training data
    batch_size: int = 64
    learning_rate: float = 2e-3
    warmup_steps: int = 100  # the authors warm up over 1000 iterations of longer runs
    schedule: str = "constant"  # "constant" or "cosine" after the warm-up
    # The authors' 0.999 averages over ~1000 steps, right for their 10**5-step runs; the default
    # run has ~345 steps, so 0.99 (~100 steps). Pass --ema-momentum 0.999 for paper runs.
    ema_momentum: float = 0.99
    clip_norm: float = 1.0
    seed: int = 0
    output_dir: str = "runs/default"
    strategy: str = "default"  # "default", "mirrored", "multiworker" or "tpu"
    cpu_devices: int = 0  # > 0: split the CPU into this many logical devices (for mirrored)
    backup_every: int = 50  # steps between crash-recovery backups
    num_samples: int = 64  # samples drawn for samples.png at every evaluation
    lipschitz_tolerance: float = 1e-5  # power-iteration tolerance before evaluation
    num_eval_draws: int = 8  # training-mode estimates per evaluation, for their spread
    eval_batch_size: int = 200  # test examples per evaluation batch (the authors' 200)
    verbose: int = 2  # Keras verbosity: 0 silent, 1 progress bar, 2 one line per epoch

    def __post_init__(self) -> None:
        positive = (
            "epochs",
            "batch_size",
            "backup_every",
            "num_samples",
            "num_eval_draws",
            "eval_batch_size",
        )
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}.")
        for name in ("steps_per_epoch", "warmup_steps", "cpu_devices", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0; got {value!r}.")
        if isinstance(self.model, str) or not all(isinstance(a, str) for a in self.model):
            raise ValueError(f"model must be a tuple of 'name=value' strings; got {self.model!r}.")
        object.__setattr__(self, "model", tuple(self.model))
        if not (isinstance(self.learning_rate, int | float) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be > 0; got {self.learning_rate!r}.")
        if not 0.0 <= self.ema_momentum < 1.0:
            raise ValueError(f"ema_momentum must be in [0, 1); got {self.ema_momentum!r}.")
        if not self.clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0; got {self.clip_norm!r}.")
        if not self.lipschitz_tolerance > 0:
            raise ValueError(f"lipschitz_tolerance must be > 0; got {self.lipschitz_tolerance!r}.")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}; got {self.schedule!r}.")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}; got {self.strategy!r}.")
        if self.verbose not in (0, 1, 2):
            raise ValueError(f"verbose must be 0, 1 or 2; got {self.verbose!r}.")


def make_schedule(
    config: TrainConfig, total_steps: int
) -> keras.optimizers.schedules.LearningRateSchedule:
    """Linear warm-up from 0 to `learning_rate`, then constant or cosine decay to 0."""
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0,
        warmup_target=config.learning_rate,
        warmup_steps=config.warmup_steps,
        decay_steps=max(total_steps - config.warmup_steps, 1),
        # alpha is the floor as a fraction of the peak: 1.0 keeps the rate constant.
        alpha=1.0 if config.schedule == "constant" else 0.0,
    )


def make_optimizer(config: TrainConfig, total_steps: int) -> keras.optimizers.Optimizer:
    """Adam with warm-up schedule, global-norm clipping and EMA, skipping non-finite steps.

    `GroupedAdam` is Keras' Adam with the variables of each shape updated together (much
    smaller graphs; see `tfp_resflow.optimizer`). On one replica it skips non-finite steps
    itself; under a `tf.distribute` strategy Keras' `LossScaleOptimizer` does, at a scale that
    stays a power of two near 1 (exact, so only its finite check matters).
    """
    distributed = tf.distribute.has_strategy()
    adam = GroupedAdam(
        learning_rate=make_schedule(config, total_steps),
        beta_2=0.99,
        global_clipnorm=config.clip_norm,
        use_ema=config.ema_momentum > 0,
        ema_momentum=config.ema_momentum,
        skip_nonfinite=not distributed,
    )
    if not distributed:
        return adam
    # Grow the scale back only after many good steps: it stays a power of two near 1.
    return keras.optimizers.LossScaleOptimizer(adam, initial_scale=1.0, dynamic_growth_steps=1000)


def weights_checksum(weights: list) -> list[float]:
    """Per-weight sums of absolute values: a cheap fingerprint to compare two weight sets."""
    return [float(np.abs(np.asarray(w, np.float64)).sum()) for w in weights]


@contextlib.contextmanager
def ema_weights(model: keras.Model, power_vectors: dict | None = None) -> Iterator[None]:
    """Temporarily replaces the trainable weights by their EMA (if the optimizer keeps one).

    The power-iteration vectors (u, v) of the Lipschitz layers belong to the kernels they were
    converged for, so they are swapped too: the training weights get theirs back on exit, and
    with a `power_vectors` dict the EMA weights' vectors are kept in it between calls, so the
    next evaluation starts its power iterations from the last ones (the EMA moves slowly).
    """
    optimizer = model.optimizer
    raw = [v.numpy() for v in model.trainable_weights]
    vectors = [w for layer in lipschitz.spectral_layers(model) for w in layer.non_trainable_weights]
    raw_vectors = [w.numpy() for w in vectors]
    if optimizer is not None and getattr(optimizer, "built", False):
        optimizer.finalize_variable_values(model.trainable_weights)
    if power_vectors and len(power_vectors.get("ema", [])) == len(vectors):
        for variable, value in zip(vectors, power_vectors["ema"], strict=True):
            variable.assign(value)
    try:
        yield
    finally:
        if power_vectors is not None:
            power_vectors["ema"] = [w.numpy() for w in vectors]
        for variable, value in zip(model.trainable_weights, raw, strict=True):
            variable.assign(value)
        for variable, value in zip(vectors, raw_vectors, strict=True):
            variable.assign(value)


def evaluation_losses(
    model: FlowModel, dataset: tf.data.Dataset | Iterable[tf.Tensor]
) -> list[np.ndarray]:
    """Per-example losses (`model.loss_unit`) in evaluation mode, one array per batch."""
    step = getattr(model, "_evaluation_step", None)
    if step is None:
        step = tf.function(lambda x: tf.cast(model(x, training=False), tf.float64))
        model._evaluation_step = step
    return [step(x).numpy() for x in dataset]


def evaluate_loss(model: FlowModel, dataset: tf.data.Dataset | Iterable[tf.Tensor]) -> float:
    """Mean per-example loss (`model.loss_unit`) in evaluation mode over finitely many batches."""
    losses = evaluation_losses(model, dataset)
    return float(np.mean(np.concatenate(losses))) if losses else 0.0


class EvaluationCallback(keras.callbacks.Callback):
    """After every epoch: EMA weights, converged Lipschitz estimates, test loss, samples.

    Writes `metrics.json` (one entry per epoch: train and test loss, estimator statistics),
    `samples.png` (and `density.png` for 2-D data) and TensorBoard summaries under
    `run_dir/logs/eval`. Entries of earlier processes of the same run (after a crash or with
    `--resume`) are kept.

    Args:
        config: the run's configuration.
        test_data: a finite dataset of test batches.
        run_dir: where the files go.
        unit: name of the loss unit ("bits_per_dim" or "nats").
        toy_points: for 2-D data, points from the data for `density.png`.
        write_files: False on non-chief workers of a multi-worker run.
    """

    def __init__(
        self,
        config: TrainConfig,
        test_data: tf.data.Dataset,
        run_dir: Path,
        *,
        unit: str,
        toy_points: np.ndarray | None = None,
        write_files: bool = True,
    ) -> None:
        super().__init__()
        self.config = config
        self.test_data = test_data
        self.run_dir = Path(run_dir)
        self.unit = unit
        self.toy_points = toy_points
        self.write_files = write_files
        self.metrics_path = self.run_dir / "metrics.json"
        self.history: list[dict] = []
        self.initial_epoch = 0  # set by the caller when fit starts from a checkpoint
        self._writer = None
        # The estimator's spread is measured on one training-sized batch of test data.
        self._probe_batch = next(iter(test_data))[: config.batch_size]
        self._traced: dict[str, Any] = {}
        self._ema_power_vectors: dict = {}  # the EMA weights' own (u, v), between evaluations

    def on_train_begin(self, logs: dict | None = None) -> None:
        if self.metrics_path.exists():
            self.history = json.loads(self.metrics_path.read_text())["epochs"]
        # A crash-recovery restore (BackupAndRestore) sets the model's `_initial_epoch`, a
        # `--resume` from a checkpoint sets ours.
        initial_epoch = max(self.initial_epoch, getattr(self.model, "_initial_epoch", 0) or 0)
        self.history = [e for e in self.history if e["epoch"] <= initial_epoch]
        if self.write_files:
            resume = {
                "initial_epoch": int(initial_epoch),
                "optimizer_iterations": int(self.model.optimizer.iterations.numpy()),
                "weights_checksum": weights_checksum(self.model.weights),
            }
            (self.run_dir / "resume.json").write_text(json.dumps(resume, indent=1) + "\n")

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch_start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = dict(logs or {})
        entry = {"epoch": epoch + 1, f"train_{self.unit}": logs.get("loss")}
        start = time.perf_counter()
        entry.update(self.evaluate(write_samples=self.write_files))
        entry["learning_rate"] = float(
            keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)
        )
        # Wall time of the epoch's training steps (and callbacks before this one) and of the
        # evaluation, so the cost of evaluating is visible in metrics.json.
        entry["train_seconds"] = round(start - getattr(self, "_epoch_start", start), 3)
        entry["evaluation_seconds"] = round(time.perf_counter() - start, 3)
        self.history.append(entry)
        if self.write_files:
            self._write_metrics()
            self._summaries(epoch + 1, entry)
        if self.config.verbose:
            test = entry[f"test_{self.unit}"]
            print(f"epoch {epoch + 1}: test {self.unit} {test:.4f} (EMA weights, evaluation mode)")

    def evaluate(self, *, write_samples: bool) -> dict:
        """Evaluates the EMA weights; returns the metrics entry (and writes pictures)."""
        model = self.model
        out: dict[str, Any] = {}
        with ema_weights(model, self._ema_power_vectors):
            self._function("converge_lipschitz")()
            losses = evaluation_losses(model, self.test_data)
            out[f"test_{self.unit}"] = float(np.mean(np.concatenate(losses)))
            # The probe batch is the first test batch's head: its evaluation-mode losses are
            # already known.
            probe_eval_mode = float(np.mean(losses[0][: self.config.batch_size]))
            out["estimator"] = self._estimator_statistics(probe_eval_mode)
            if write_samples:
                self._write_pictures()
        return out

    def _function(self, name: str) -> Any:
        """One of the evaluation's passes, traced once per run.

        Eagerly, every epoch would pay Python's per-op cost for every block (measured: 2.2 s of
        evaluation per epoch of the default run, 1.2 s of it in eight eager training-mode
        passes).
        """
        if name not in self._traced:
            model, config = self.model, self.config
            functions = {
                "converge_lipschitz": lambda: model.update_lipschitz(
                    atol=config.lipschitz_tolerance, rtol=config.lipschitz_tolerance
                ),
                # One traced walk in a loop: fresh randomness in every iteration.
                "train_mode_draws": lambda x: tf.map_fn(
                    lambda _: tf.reduce_mean(tf.cast(model(x, training=True), tf.float64)),
                    tf.range(config.num_eval_draws),
                    fn_output_signature=tf.float64,
                ),
                "sample": lambda: model.sample(config.num_samples, seed=[config.seed, 1]),
            }
            self._traced[name] = tf.function(functions[name])
        return self._traced[name]

    def _estimator_statistics(self, eval_mode: float) -> dict:
        """Spread of the training-mode (unbiased) estimate on one test batch, vs evaluation."""
        x = self._probe_batch
        draws = self._function("train_mode_draws")(x).numpy()
        return {
            "train_mode_mean": float(np.mean(draws)),
            "train_mode_std": float(np.std(draws, ddof=1)) if len(draws) > 1 else 0.0,
            "eval_mode": eval_mode,
            "batch_size": int(x.shape[0]),
        }

    def _write_pictures(self) -> None:
        samples = self._function("sample")().numpy()
        self._last_samples = samples
        if self.toy_points is not None:
            with training_mode(training=False):
                panels = artifacts.density_panels(
                    self.toy_points,
                    lambda grid: self.model.log_prob(grid).numpy(),
                    samples,
                )
            artifacts.write_png(self.run_dir / "density.png", panels)
            scatter = panels
            self._last_picture = scatter[None, ..., None]
        else:
            scale = max(1, 64 // samples.shape[1])
            grid = artifacts.image_grid(samples, scale=scale)
            artifacts.write_png(self.run_dir / "samples.png", grid)
            self._last_picture = grid[None]

    def _write_metrics(self) -> None:
        payload = {
            "unit": self.unit,
            "config": dataclasses.asdict(self.config),
            "epochs": self.history,
        }
        tmp = self.metrics_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(payload, indent=1) + "\n")
        tmp.replace(self.metrics_path)  # atomic: a crash never leaves half a file

    def _summaries(self, step: int, entry: dict) -> None:
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(str(self.run_dir / "logs" / "eval"))
        with self._writer.as_default():
            tf.summary.scalar(f"test_{self.unit}", entry[f"test_{self.unit}"], step=step)
            tf.summary.scalar(
                "estimator/train_mode_std", entry["estimator"]["train_mode_std"], step=step
            )
            picture = getattr(self, "_last_picture", None)
            if picture is not None:
                tf.summary.image("samples", picture, step=step)
        self._writer.flush()


def total_steps(config: TrainConfig, steps_per_epoch: int) -> int:
    """Optimizer steps of the whole run."""
    return max(1, config.epochs * steps_per_epoch)
