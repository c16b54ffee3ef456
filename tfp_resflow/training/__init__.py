"""What `train_tf.py` is built from.

- `train_config`: `TrainConfig`, its flags, and the model, optimizer and schedule it builds.
- `optimizer`: `GroupedAdam`, Keras' Adam updating equal-shaped variables together.
- `evaluation`: losses, accuracy and EMA weights at evaluation time.
- `evaluation_callback`: `EvaluationCallback`, evaluation, samples and checkpoints during `fit`.
- `distribute`: `tf.distribute` strategies and the custom loop for multi-worker runs.
- `artifacts`: images, density panels and checkpoint paths a run writes.
"""


def __getattr__(name: str) -> object:
    """The names of the old `tfp_resflow.training` module, deprecated (`core.moved_modules`)."""
    from tfp_resflow.core.moved_modules import moved_attribute

    return moved_attribute("training", name)
