"""Joint generative and discriminative modelling: one invertible network models p(x) and classifies.

The flow's data -> latent pass yields, besides the latent and the log-det, the activations a
classifier reads (`StackedBijector.inverse_log_det_and_features`, the same pass):

    images   each scale's output (the part leaving at a factor-out, or the whole activation)
             -> per scale: 3x3 conv (256 channels), ActNorm, ReLU, global average pooling
             -> concatenated -> dense layer to the class logits
    vectors  the latent -> dense layer to the class logits

as the authors build the head (Chen et al. 2019, their `resflow.py`; with factor-out their last
head reads the previous scale's part, a bug not copied here). The loss is

    loss = nll_weight * (-log p(x)) + cross_entropy(label, logits)      (nats, per example)

with `nll_weight` = lambda in {0, 1/D, 1} in the paper: 0 is a classifier with an invertible
backbone, 1/D weighs the likelihood per dimension, 1 the full likelihood. Reported metrics:
`nll` (in the model's `loss_unit`, e.g. bits/dim), `cross_entropy` and `accuracy`.

References:
    Chen, Behrmann, Duvenaud, Jacobsen (2019). Residual Flows for Invertible Generative
    Modeling. NeurIPS, section 6.5. https://arxiv.org/abs/1906.02735
    Nalisnick, Matsukawa, Teh, Gorur, Lakshminarayanan (2019). Hybrid Models with Deep and
    Invertible Features. ICML. https://arxiv.org/abs/1902.02767
"""

import math
from collections.abc import Sequence
from typing import Any

import keras
import tensorflow as tf

from tfp_resflow.bijectors.actnorm import ActNormLayer
from tfp_resflow.bijectors.composite import StackedBijector
from tfp_resflow.core import validation
from tfp_resflow.core.modes import training_mode
from tfp_resflow.models import bits
from tfp_resflow.models.model import FlowModel

__all__ = ["TASKS", "ClassificationHead", "HybridFlowModel", "nll_weight_value"]

TASKS = ("density", "classification", "hybrid")


@keras.saving.register_keras_serializable(package="tfp_resflow")
class ClassificationHead(keras.layers.Layer):
    """Class logits from a flow's features: `list of [B, H, W, C] or [B, D]` -> `[B, classes]`.

    Image features go through 3x3 conv (`channels`), ActNorm, ReLU and global average pooling
    each; vector features are used as they are; all are concatenated for one dense layer.

    Args:
        num_classes: number of classes (>= 2).
        channels: output channels of each image feature's convolution (the authors' 256).
    """

    def __init__(self, num_classes: int, *, channels: int = 256, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_classes = validation.integer("num_classes", num_classes, 2)
        self.channels = validation.positive_integer("channels", channels)
        self._per_feature: list[list[keras.layers.Layer]] = []

    def build(self, input_shape: Sequence[Sequence[int | None]]) -> None:
        width = 0
        for k, shape in enumerate(input_shape):
            if len(shape) == 4:  # [batch, h, w, c]
                layers = [
                    keras.layers.Conv2D(self.channels, 3, padding="same", name=f"conv_{k}"),
                    ActNormLayer(name=f"act_norm_{k}"),
                    keras.layers.ReLU(),
                    keras.layers.GlobalAveragePooling2D(),
                ]
                width += self.channels
            elif len(shape) == 2:  # [batch, features]
                layers = []
                width += shape[-1]
            else:
                raise ValueError(f"features must be [B, H, W, C] or [B, D]; got shape {shape}.")
            current = tuple(shape)
            for layer in layers:
                layer.build(current)
                current = tuple(layer.compute_output_shape(current))
            self._per_feature.append(layers)
        self.logits = keras.layers.Dense(self.num_classes, name="logits")
        self.logits.build((None, width))

    def call(self, features: Sequence[tf.Tensor]) -> tf.Tensor:
        pooled = []
        for layers, t in zip(self._per_feature, features, strict=True):
            for layer in layers:
                if isinstance(layer, ActNormLayer):
                    layer.maybe_initialize(t)  # the authors' ActNorm2d: from the first batch
                t = layer(t)
            pooled.append(t)
        return self.logits(tf.concat(pooled, axis=-1))

    def get_config(self) -> dict:
        return {**super().get_config(), "num_classes": self.num_classes, "channels": self.channels}


def nll_weight_value(nll_weight: float | str, event_size: int) -> float:
    """The likelihood's weight as a number: a number >= 0, or "1/D" for 1 / event size."""
    if nll_weight == "1/D":
        return 1.0 / event_size
    return validation.number("nll_weight", nll_weight, at_least=0)


@keras.saving.register_keras_serializable(package="tfp_resflow")
class HybridFlowModel(FlowModel):
    """A `FlowModel` whose flow also classifies, trained on `(x, label)` batches.

        call(x) -> {"nll": [B] in loss_unit, "logits": [B, num_classes]}   one pass
        loss = nll_weight * (-log p(x)) + cross_entropy                      nats per example

    Args:
        bijector: a `StackedBijector` (`ResidualFlowBijector`, `MultiscaleResidualFlow`),
            whose single data -> latent pass gives the features.
        event_shape: shape of one data event.
        num_classes: number of classes.
        nll_weight: lambda: a number >= 0, or "1/D" (the default 1 is the authors' hybrid
            model; 0 trains a classifier, whose likelihood is still reported).
        head_channels: channels of the head's per-scale convolutions.
        **kwargs: `FlowModel` arguments (`loss_unit`, `num_levels`, ...).
    """

    def __init__(
        self,
        bijector: StackedBijector,
        event_shape: Sequence[int],
        *,
        num_classes: int,
        nll_weight: float | str = 1.0,
        head_channels: int = 256,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("context_shape") is not None or getattr(bijector, "context_size", None):
            # Its (x, label) batches have no place for a context, and its head reads p(x)'s
            # features: a conditional hybrid model is not defined here.
            raise ValueError(
                "HybridFlowModel models p(x) and p(label | x); it takes no context_shape and "
                "no conditional flow (use FlowModel(..., context_shape=[K]) for p(x | c))."
            )
        super().__init__(bijector, event_shape, **kwargs)
        if not isinstance(bijector, StackedBijector):
            raise ValueError(
                "HybridFlowModel needs one of the package's flows (a StackedBijector), whose "
                f"pass yields the features; got {type(bijector).__name__}."
            )
        self.nll_weight = nll_weight
        self._nll_weight = nll_weight_value(nll_weight, math.prod(self.event_shape))
        self.head = ClassificationHead(num_classes, channels=head_channels, name="head")
        self.num_classes = num_classes
        self.nll_tracker = keras.metrics.Mean(name="nll")
        self.cross_entropy_tracker = keras.metrics.Mean(name="cross_entropy")
        self.accuracy_tracker = keras.metrics.SparseCategoricalAccuracy(name="accuracy")

    @property
    def task(self) -> str:
        """The task trained: "classification" when the likelihood has no weight, else "hybrid"."""
        return "classification" if self._nll_weight == 0 else "hybrid"

    def log_prob_and_logits(
        self, x: tf.Tensor, *, training: bool = False, seed: Any = None
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """`(log p(x) [B] in nats, class logits [B, num_classes])` from one pass of the flow."""
        x = self._check_events(x)
        with training_mode(training):
            z, log_det, features = self.bijector.inverse_log_det_and_features(x, seed=seed)
            log_prob = self.distribution.distribution.log_prob(z) + log_det
        return log_prob, self.head(features)

    def call(self, x: tf.Tensor, *, training: bool | None = None) -> dict[str, tf.Tensor]:
        """`{"nll": per-example NLL in loss_unit, "logits": class logits}`."""
        log_prob, logits = self.log_prob_and_logits(x, training=bool(training))
        if self.loss_unit == "bits_per_dim":
            nll = bits.bits_per_dim(log_prob, math.prod(self.event_shape), self.num_levels)
        else:
            nll = -log_prob
        return {"nll": nll, "logits": logits, "log_prob": log_prob}

    def build(self, input_shape: Sequence[int | None]) -> None:
        super().build(input_shape)
        if not self.head.built:  # the flow knows its features' shapes: no pass needed
            self.head.build([(None, *shape) for shape in self.bijector.feature_shapes])

    def compute_loss(
        self,
        x: Any = None,
        y: Any = None,
        y_pred: dict | None = None,
        sample_weight: Any = None,
        *,
        training: bool = True,
    ) -> tf.Tensor:
        """`nll_weight * mean(-log p(x)) + mean(cross-entropy)`, plus the flow's extras."""
        if y is None:
            raise ValueError("HybridFlowModel trains on (x, label) batches; got no labels.")
        cross_entropy = keras.losses.sparse_categorical_crossentropy(
            y, y_pred["logits"], from_logits=True
        )
        per_example = self._nll_weight * -y_pred["log_prob"] + cross_entropy
        # FlowModel's loss of this per-example value: its mean (reduced as Keras reduces under a
        # strategy), plus the added losses and the norm orders' term.
        return super().compute_loss(x, y, per_example, sample_weight, training=training)

    def compute_metrics(
        self, x: Any, y: Any, y_pred: dict, sample_weight: Any = None
    ) -> dict[str, tf.Tensor]:
        self.nll_tracker.update_state(y_pred["nll"])
        self.cross_entropy_tracker.update_state(
            keras.losses.sparse_categorical_crossentropy(y, y_pred["logits"], from_logits=True)
        )
        self.accuracy_tracker.update_state(y, y_pred["logits"])
        return self.get_metrics_result()

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "nll_weight": self.nll_weight,
            "head_channels": self.head.channels,
        }
