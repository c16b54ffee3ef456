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

Only the per-epoch evaluation is ours (`tfp_resflow.training.evaluation_callback`): Keras validates
with the raw weights, while the paper's numbers are for the EMA weights with converged Lipschitz
estimates.
`model_config`, `build_model` and `compiled_model` make the model a `TrainConfig` names (its
preset and changes), ready to train.

Under a `tf.distribute` strategy `LossScaleOptimizer` is used only for its finite check: with an
initial scale of 1 (and powers of 2 after a skipped step) the scaling is exact in floating point,
and a step with a NaN or inf gradient leaves the weights, the Adam moments and the EMA untouched.
On one replica `GroupedAdam(skip_nonfinite=True)` does the same from one check on the stacked
gradients.
"""

import dataclasses

import keras
import tensorflow as tf

from tfp_resflow.bijectors import multiscale
from tfp_resflow.bijectors.flow import ResidualFlowBijector
from tfp_resflow.configs import presets
from tfp_resflow.configs.config_fields import parse_assignments
from tfp_resflow.configs.flow_configs import ImageFlowConfig, ResidualFlowConfig
from tfp_resflow.core import validation
from tfp_resflow.data import datasets, toy_data
from tfp_resflow.models.hybrid import TASKS, HybridFlowModel, nll_weight_value
from tfp_resflow.models.model import FlowModel
from tfp_resflow.training import distribute
from tfp_resflow.training.evaluation import ema_weights, evaluate_loss
from tfp_resflow.training.optimizer import GroupedAdam

__all__ = [
    "FLAG_HELP",
    "TrainConfig",
    "build_model",
    "compiled_model",
    "context_size",
    # Re-exported from `evaluation` for the notebooks, which evaluate with `training.*`.
    "ema_weights",
    "evaluate_loss",
    "make_optimizer",
    "make_schedule",
    "model_config",
    "resolve_preset",
    "total_steps",
    "with_context",
]

SCHEDULES = ("constant", "cosine")
# What a flow is conditioned on: nothing (p(x)), or the example's class as a one-hot vector.
CONTEXTS = ("none", "label")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run; written to `config.json` in the run directory.

    `train_tf.py` makes one command-line flag per field (its help in `FLAG_HELP`), so the two
    cannot drift apart.
    """

    dataset: str = "digits"  # a toy set, "digits" (offline), or a tfds image dataset
    preset: str = "auto"  # image preset name, "toy" for 2-D sets; "auto" picks by dataset
    # "name=value" changes to the preset's model config (`config.parse_assignments`), e.g.
    # ("hidden_channels=64", "solver=anderson"); checked when the model config is made.
    model: tuple[str, ...] = ()
    task: str = "density"  # "density", "classification" or "hybrid" (labelled data)
    nll_weight: str = "1"  # hybrid: lambda on -log p(x), a number >= 0 or "1/D"
    context: str = "none"  # "label": a class-conditional flow p(x | label) (labelled data)
    epochs: int = 15
    steps_per_epoch: int = 0  # 0: one pass over the training data
    batch_size: int = 64
    # Residual flows want larger rates than the authors' 1e-3 on short runs
    # (docs/results/quality-per-step.md, "Defaults follow the evidence"); pass
    # --learning-rate 1e-3 --warmup-steps 1000 for paper runs.
    learning_rate: float = 5e-3
    warmup_steps: int = 20  # the authors warm up over 1000 iterations of longer runs
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
            validation.positive_integer(name, getattr(self, name))
        for name in ("steps_per_epoch", "warmup_steps", "cpu_devices", "seed"):
            validation.integer(name, getattr(self, name), 0)
        if isinstance(self.model, str) or not all(isinstance(a, str) for a in self.model):
            validation.fail("model", "a tuple of 'name=value' strings", self.model)
        object.__setattr__(self, "model", tuple(self.model))
        validation.number("learning_rate", self.learning_rate, above=0)
        validation.number("ema_momentum", self.ema_momentum, at_least=0, below=1)
        validation.number("clip_norm", self.clip_norm, above=0)
        validation.number("lipschitz_tolerance", self.lipschitz_tolerance, above=0)
        validation.choice("schedule", self.schedule, SCHEDULES)
        validation.choice("strategy", self.strategy, distribute.STRATEGIES)
        validation.choice("task", self.task, TASKS)
        nll_weight_value(_as_number(self.nll_weight), 1)  # a number >= 0 or "1/D"
        if self.task != "density" and self.dataset in toy_data.TOY_DATASETS:
            raise ValueError(
                f"task {self.task!r} needs labels: the toy set {self.dataset!r} "
                "has none (use digits or a labelled tfds set)."
            )
        validation.choice("context", self.context, CONTEXTS)
        if self.context != "none" and self.dataset in toy_data.TOY_DATASETS:
            raise ValueError(
                f"context {self.context!r} needs labels: the toy set {self.dataset!r} has none "
                "(use digits or a labelled tfds set)."
            )
        if self.context != "none" and self.task != "density":
            raise ValueError(
                f"context {self.context!r} models p(x | label) with task 'density'; the "
                f"{self.task} task reads the label as its target."
            )
        if self.verbose not in (0, 1, 2):
            validation.fail("verbose", "0, 1 or 2", self.verbose)


# One line of help per field: the flags of `train_tf.py`.
FLAG_HELP = {
    "dataset": f"toy set ({', '.join(toy_data.TOY_DATASETS)}), 'digits' (offline), or a tfds "
    "image dataset such as mnist or cifar10",
    "preset": f"model: one of {', '.join(sorted(presets.PRESETS))}, 'toy' (2-D data), or "
    "'auto' (digits for digits, the dataset's name if it is a preset, toy for 2-D data)",
    "model": "changes to the preset's model config as name=value (lists comma-separated), "
    "e.g. --model blocks_per_scale=4,4 hidden_channels=64 log_det=exact solver=anderson "
    "learnable_norm_orders=true; fields of ImageFlowConfig (ResidualFlowConfig for 'toy') and "
    "of its BlockConfig",
    "task": "density (p(x) only), classification (a head on the flow's features, cross-entropy "
    "only) or hybrid (nll_weight * NLL + cross-entropy); the last two need labelled data",
    "nll_weight": "hybrid task: weight lambda of -log p(x), a number or 1/D (the authors: 1)",
    "context": "none (p(x)), or label: a class-conditional flow p(x | label) on labelled data, "
    "its samples.png one row per class",
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
    smaller graphs; see `tfp_resflow.training.optimizer`). On one replica it skips non-finite steps
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


def total_steps(config: TrainConfig, steps_per_epoch: int) -> int:
    """Optimizer steps of the whole run."""
    return max(1, config.epochs * steps_per_epoch)


def resolve_preset(config: TrainConfig) -> str:
    """The model preset for a dataset ('auto' picks one); ValueError if they do not fit."""
    is_toy = config.dataset in toy_data.TOY_DATASETS
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
    """The preset's model config with the run's `--model` changes and its context size.

    Raises:
        ValueError: for a bad change, or a context the model cannot take.
    """
    preset = resolve_preset(config)
    base = presets.TOY if preset == "toy" else presets.get_preset(preset)
    flow_config = parse_assignments(base, config.model)
    size = context_size(config)
    if size is not None:
        flow_config = dataclasses.replace(flow_config, context_size=size)
    return flow_config


def context_size(config: TrainConfig) -> int | None:
    """K of the run's context vectors (the number of classes for "label"), or None."""
    return datasets.num_classes(config.dataset) if config.context == "label" else None


def with_context(dataset: tf.data.Dataset, config: TrainConfig) -> tf.data.Dataset:
    """`(x, label)` batches as `(x, one-hot label)`, the pairs a class-conditional model fits.

    Unchanged without a context.
    """
    size = context_size(config)
    if size is None:
        return dataset
    return dataset.map(lambda x, label: (x, tf.one_hot(label, size, dtype=x.dtype)))


def build_model(config: TrainConfig, event_shape: tuple, num_levels: int | None) -> FlowModel:
    """The run's flow in a FlowModel (a HybridFlowModel for classification and hybrid tasks)."""
    flow_config = model_config(config)
    if isinstance(flow_config, ResidualFlowConfig):
        flow = ResidualFlowBijector(flow_config)
        options = {"loss_unit": "nats"}
    else:
        flow = multiscale.image_flow(event_shape, flow_config)
        options = {"loss_unit": "bits_per_dim", "num_levels": num_levels}
    if config.task == "density":
        size = context_size(config)
        context_shape = None if size is None else [size]
        return FlowModel(flow, event_shape, context_shape=context_shape, **options)
    weight = 0.0 if config.task == "classification" else _as_number(config.nll_weight)
    classes = datasets.num_classes(config.dataset)
    return HybridFlowModel(flow, event_shape, num_classes=classes, nll_weight=weight, **options)


def _as_number(text: str) -> float | str:
    """A flag's number ("1", "0.5") as a float; other text ("1/D") as it is."""
    try:
        return float(text)
    except ValueError:
        return text


def compiled_model(
    config: TrainConfig,
    event_shape: tuple,
    num_levels: int | None,
    init_batch: tf.Tensor,
    steps_per_epoch: int,
) -> FlowModel:
    """`build_model`, built, initialised on `init_batch`, compiled with `make_optimizer`.

    Call it inside the scope of the run's `tf.distribute` strategy.
    """
    model = build_model(config, event_shape, num_levels)
    model.build(model.input_shape_for_build())
    if model.context_shape is not None:  # (x, c) pairs
        model.initialize(init_batch[0], context=init_batch[1])
    else:  # x, or (x, labels)
        model.initialize(init_batch[0] if isinstance(init_batch, tuple) else init_batch)
    model.compile(optimizer=make_optimizer(config, total_steps(config, steps_per_epoch)))
    model.optimizer.build(model.trainable_variables)
    return model
