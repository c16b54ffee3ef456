"""Data sets: offline toys and digits, tfds images, conditional densities with exact answers.

- `datasets`: `load_dataset`, the one entry point `train_tf.py` uses, and the digits.
- `toy_data`: the 2-D toy densities.
- `dequantization`: uniform dequantisation and the shared image pipeline.
- `tfds_images`: MNIST, CIFAR-10 and others through tensorflow-datasets (imported lazily).
- `conditional_data`: rotated toys and two moons, p(x | c) with exact answers.
"""


def __getattr__(name: str) -> object:
    """The names of the old `tfp_resflow.data` module, deprecated (`core.moved_modules`)."""
    from tfp_resflow.core.moved_modules import moved_attribute

    return moved_attribute("data", name)
