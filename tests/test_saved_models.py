"""Models saved by past releases still load: `.keras` files are what users keep.

The files under tests/saved_models/ were written by tests/saved_models/make_saved_models.py
at the release their names carry; they record the module paths of that release (for example
`tfp_resflow.model`), so a move of modules or a renamed registered class fails here.
"""

from pathlib import Path

import keras
import numpy as np
import pytest

import tfp_resflow as rf

SAVED = Path(__file__).resolve().parent / "saved_models"
RELEASES = ["0.1.0"]
MODELS = {
    "vector_flow": (rf.FlowModel, rf.ResidualFlowBijector, "points"),
    "dense_flow": (rf.FlowModel, rf.ResidualFlowBijector, "points"),
    "image_flow": (rf.FlowModel, rf.MultiscaleResidualFlow, "images"),
    "hybrid_flow": (rf.HybridFlowModel, rf.MultiscaleResidualFlow, "images"),
}


@pytest.mark.parametrize("release", RELEASES)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_saved_model_loads_and_computes_what_it_computed(name, release):
    model_type, bijector_type, inputs = MODELS[name]
    expected = np.load(SAVED / f"expected_v{release}.npz")
    loaded = keras.models.load_model(SAVED / f"{name}_v{release}.keras")
    assert type(loaded) is model_type
    assert type(loaded.bijector) is bijector_type
    np.testing.assert_allclose(
        loaded.log_prob(expected[inputs]), expected[f"{name}_log_prob"], rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("release", RELEASES)
def test_a_saved_model_keeps_training(release):
    loaded = keras.models.load_model(SAVED / f"vector_flow_v{release}.keras")
    assert isinstance(loaded.optimizer, rf.GroupedAdam)
    points = np.load(SAVED / f"expected_v{release}.npz")["points"]
    history = loaded.fit(points, batch_size=8, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert int(loaded.optimizer.iterations.numpy()) > 2  # the saved step count carried on
