"""Writes the `.keras` files tests/test_saved_models.py loads: models saved by a past release.

Run it only to add files for a new release (`python tests/saved_models/make_saved_models.py`);
the committed files must stay those the named release wrote, so that loading them checks that
models users saved before a change (a move of modules, a renamed argument) still load.

Each model is small, trained a few steps (weights away from their initialisation) and saved
with the optimizer it was compiled with; `expected.npz` holds inputs and the outputs the saving
release computed for them.
"""

from pathlib import Path

import keras
import numpy as np

import tfp_resflow as rf

HERE = Path(__file__).resolve().parent


def vector_flow() -> keras.Model:
    """A flow for 2-D points: learnable norm orders, GroupedAdam."""
    flow = rf.ResidualFlowBijector(
        num_blocks=2,
        hidden_units=(8, 8),
        event_size=2,
        learnable_norm_orders=True,
    )
    model = rf.FlowModel(flow, event_shape=[2])
    model.compile(optimizer=rf.GroupedAdam(1e-2))
    return model


def dense_flow() -> keras.Model:
    """A flow for 2-D points: densely connected (i-DenseNet) residual functions, CLipSwish."""
    flow = rf.ResidualFlowBijector(
        num_blocks=2, hidden_units=(8, 8), event_size=2, network="dense", activation="clipswish"
    )
    model = rf.FlowModel(flow, event_shape=[2])
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    return model


def image_flow() -> keras.Model:
    """A multi-scale flow for 4x4x1 images with a factored-out scale, ActNorm, LipSwish."""
    config = rf.ImageFlowConfig(
        blocks_per_scale=(1, 1),
        hidden_channels=4,
        factor_out=True,
        actnorm=True,
        fc_end_blocks=1,
        fc_hidden_units=(8,),
    )
    flow = rf.MultiscaleResidualFlow((4, 4, 1), config)
    model = rf.FlowModel(flow, (4, 4, 1), loss_unit="bits_per_dim", num_levels=256)
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    return model


def hybrid_flow() -> keras.Model:
    """A hybrid model of 4x4x1 images in three classes (a head on the flow's features)."""
    config = rf.ImageFlowConfig(blocks_per_scale=(1, 1), hidden_channels=4, fc_end_blocks=0)
    flow = rf.MultiscaleResidualFlow((4, 4, 1), config)
    model = rf.HybridFlowModel(
        flow, (4, 4, 1), num_classes=3, nll_weight=0.5, num_levels=256, head_channels=4
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    return model


def main() -> None:
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    points = rng.normal(size=(64, 2)).astype(np.float32)
    images = rng.uniform(size=(64, 4, 4, 1)).astype(np.float32)
    labels = rng.integers(0, 3, size=64).astype(np.int32)
    expected = {"points": points[:8], "images": images[:8]}
    for name, model, fit_args in [
        ("vector_flow", vector_flow(), (points,)),
        ("dense_flow", dense_flow(), (points,)),
        ("image_flow", image_flow(), (images,)),
        ("hybrid_flow", hybrid_flow(), (images, labels)),
    ]:
        model.fit(*fit_args, batch_size=32, epochs=1, verbose=0)
        model.save(HERE / f"{name}_v{rf.__version__}.keras")
        x = expected["points"] if fit_args[0] is points else expected["images"]
        expected[f"{name}_log_prob"] = np.asarray(model.log_prob(x))
    np.savez(HERE / f"expected_v{rf.__version__}.npz", **expected)


if __name__ == "__main__":
    main()
