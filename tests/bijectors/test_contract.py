"""One contract, every bijector: the registry `BIJECTORS` and the checks each entry goes through.

Adding a bijector to the package means adding one line to `BIJECTORS`. Each entry builds a tiny
float64 bijector, initialises its ActNorms from data and moves every weight away from its
initialisation (then re-converges the Lipschitz layers' norm estimates, so `Lip(g) < 1` still
holds), because freshly initialised residual flows are near the identity and would pass
everything. Every check then runs for every entry:

1. round trips `forward(inverse(y)) == y` and `inverse(forward(z)) == z`, and event shapes;
2. `inverse_log_det_jacobian` equals `log|det|` of the brute-force Jacobian of `inverse`;
3. `forward_log_det_jacobian(z) == -inverse_log_det_jacobian(forward(z))`;
4. eager equals `tf.function` (inverse, forward, log-det, joint pass);
5. `composite.inverse_and_log_det` equals the two separate calls;
6. Keras serialisation round trips for the entries that support it (and through a `.keras` file
   of a `FlowModel`); the others must be refused loudly.

Conditional entries (`Entry.context_size`) run every check given a context per example
(`conditional_input`, routed through chains and inversions by `context.conditional_kwargs`):
the round trip, the brute-force log-det and the rest hold for each example's own context.

Two bugs this contract found when it was written are fixed and stay covered: a float64
`ResidualFlowBijector` restored from its config in float32 (its config lacked the dtype), and
`FlowModel`'s default base was float32 whatever the model's dtype (`test_flow_model_in_float64`).

Log-dets are exact by construction, so the checks are deterministic and need no seeds: the checks
run in evaluation mode, where each block's "auto" estimator is exact for events of at most
`EVAL_EXACT_MAX_EVENT_SIZE` (20) dimensions. Entries with larger events make their estimator
exact explicitly: `eval_log_det="exact"` where the constructor takes it (`ResidualBlock`), or
training mode with `log_det="exact"` (`MultiscaleResidualFlow`, whose evaluation estimator is
always "auto"; `Entry.training`).

Direction (TFP's): `inverse` is data -> latent, `forward` latent -> data. `Entry.event_ndims`
is the rank of the data events, `Entry.latent_event_ndims` that of the latent events; they
differ for the multi-scale flow (`[H, W, C]` images to `[D]` latents).
"""

import dataclasses
import functools
import json
from collections.abc import Callable

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp
from checks import brute_force_inverse_log_det

from tfp_resflow.bijectors.actnorm import ActNorm, ActNormLayer
from tfp_resflow.bijectors.composite import inverse_and_log_det
from tfp_resflow.bijectors.flow import ResidualFlowBijector
from tfp_resflow.bijectors.fresh_bijector import keras_layers_of
from tfp_resflow.bijectors.image import LogitTransform, Squeeze
from tfp_resflow.bijectors.multiscale import MultiscaleResidualFlow
from tfp_resflow.bijectors.residual_block import ResidualBlock, training_mode
from tfp_resflow.configs.config_fields import with_fields
from tfp_resflow.configs.flow_configs import ImageFlowConfig
from tfp_resflow.core.context import conditional_kwargs
from tfp_resflow.layers import lipschitz
from tfp_resflow.layers.network import lipschitz_cnn, lipschitz_mlp
from tfp_resflow.models.model import FlowModel

tfb = tfp.bijectors

# ------------------------------------------------------------------------------------------------
# Tiny members (dtype is the weights' dtype; the registry uses float64).

VECTOR_SIZE = 3
TINY_IMAGE = ImageFlowConfig(
    blocks_per_scale=(1, 1),
    hidden_channels=4,
    kernel_sizes=(3, 1, 3),
    fc_end_blocks=1,
    fc_hidden_units=(8,),
    logit_alpha=0.05,
    initial_power_iterations=5,  # `prepared` converges the estimates after moving the kernels
)


def block_mlp(dtype):
    return ResidualBlock(lipschitz_mlp(VECTOR_SIZE, (8,), dtype=dtype))


def block_cnn(dtype):
    # 4x4x2 = 32 dimensions: above EVAL_EXACT_MAX_EVENT_SIZE, so exact on purpose.
    g = lipschitz_cnn((4, 4, 2), 4, (3, 1, 3), dtype=dtype)
    return ResidualBlock(g, event_ndims=3, eval_log_det="exact")


def residual_flow(dtype, **fields):
    flow = ResidualFlowBijector(num_blocks=2, hidden_units=(8,), **fields)
    flow.build(VECTOR_SIZE, dtype=dtype)
    return flow


def residual_flow_anderson(dtype):  # the accelerated solver, for forward and its gradient
    return residual_flow(dtype, solver="anderson")


def residual_flow_dense(dtype):  # i-DenseNet blocks: 2 dense layers of growth 4 (CLipSwish)
    flow = ResidualFlowBijector(
        num_blocks=2, network="dense", hidden_units=(4, 4), activation="clipswish"
    )
    flow.build(VECTOR_SIZE, dtype=dtype)
    return flow


def multiscale(dtype, shape=(4, 4, 1), **changes):
    return MultiscaleResidualFlow(shape, with_fields(TINY_IMAGE, **changes), dtype=dtype)


def multiscale_factor_out(dtype):
    # Scale 0 has 4x4x2 = 32 dimensions, where evaluation mode would use the roulette: the
    # entry runs in training mode with the exact training estimator instead.
    return multiscale(dtype, (4, 4, 2), factor_out=True, fc_end_blocks=0, log_det="exact")


def multiscale_dense(dtype):  # dense convolutional and fully connected g (projection to 8)
    return multiscale(dtype, network="dense", kernel_sizes=(3, 1), fc_hidden_units=(8, 4))


CONTEXT_SIZE = 2


def block_mlp_conditional(dtype):
    g = lipschitz_mlp(VECTOR_SIZE, (8,), context_size=CONTEXT_SIZE, dtype=dtype)
    return ResidualBlock(g, context_size=CONTEXT_SIZE)


def block_cnn_conditional(dtype):  # the context broadcast over the 4x4 positions
    g = lipschitz_cnn((4, 4, 2), 4, (3, 1, 3), context_size=CONTEXT_SIZE, dtype=dtype)
    return ResidualBlock(g, event_ndims=3, eval_log_det="exact", context_size=CONTEXT_SIZE)


def residual_flow_conditional(dtype):
    return residual_flow(dtype, context_size=CONTEXT_SIZE, context_hidden_units=(4,))


def multiscale_conditional(dtype):
    return multiscale(dtype, context_size=CONTEXT_SIZE, context_hidden_units=(4,))


def chain_flow_shift_conditional(dtype):  # TFP's per-name kwargs reach the flow
    return tfb.Chain([residual_flow_conditional(dtype), shift(dtype)])


def invert_chain_invert_block_conditional(dtype):  # through Invert, twice, and a Chain
    return tfb.Invert(tfb.Chain([tfb.Invert(block_mlp_conditional(dtype)), shift(dtype)]))


def actnorm(event_ndims):
    return lambda dtype: ActNorm(ActNormLayer(dtype=dtype), event_ndims=event_ndims)


def shift(dtype):
    return tfb.Shift(tf.constant([0.5, -0.25, 1.0], dtype))


def chain_flow_shift(dtype):
    return tfb.Chain([residual_flow(dtype), shift(dtype)])


def invert_invert_flow(dtype):
    return tfb.Invert(tfb.Invert(residual_flow(dtype)))


def chain_invert_block(dtype):  # data -> latent through the block's fixed-point solve
    return tfb.Chain([tfb.Invert(block_mlp(dtype)), shift(dtype)])


def chain_logit_multiscale(dtype):  # the logit outside the flow instead of inside it
    return tfb.Chain([LogitTransform(0.05), multiscale(dtype, logit_alpha=None)])


# ------------------------------------------------------------------------------------------------
# Data-side batches: (batch, seed, dtype) -> tensor.


def vectors(batch, seed, dtype):
    rng = np.random.default_rng(seed)
    return tf.constant(2.0 * rng.normal(size=(batch, VECTOR_SIZE)) + 1.0, dtype)


def images(channels):
    def make(batch, seed, dtype):  # in [0, 1], away from the logit's ends
        rng = np.random.default_rng(seed)
        return tf.constant(rng.uniform(0.05, 0.95, size=(batch, 4, 4, channels)), dtype)

    return make


VECTORS, IMAGES_1, IMAGES_2 = vectors, images(1), images(2)  # [3], [4, 4, 1], [4, 4, 2]


def contexts(batch, seed, dtype):
    """One context per example, all different (a broadcasting mistake would show)."""
    rng = np.random.default_rng(seed + 100)
    return tf.constant(rng.normal(size=(batch, CONTEXT_SIZE)), dtype)


# ------------------------------------------------------------------------------------------------
# The registry


@dataclasses.dataclass(frozen=True)
class Entry:
    """One bijector of the contract.

    Attributes:
        build: dtype -> a new bijector (initialised and perturbed by `prepared`).
        data: (batch, seed, dtype) -> a data-side batch.
        event_ndims: rank of the data events (what `inverse` and its log-det take).
        latent_event_ndims: rank of the latent events (what `forward` and its log-det take).
        not_serializable: why Keras cannot serialise it; None for entries that must round trip.
        training: run the checks in training mode (for exact training estimators of large
            events); evaluation mode otherwise.
        context_size: K for a conditional bijector (every call gets `contexts`), else None.
    """

    build: Callable[[str], tfb.Bijector]
    data: Callable[[int, int, str], tf.Tensor]
    event_ndims: int
    latent_event_ndims: int
    not_serializable: str | None = None
    training: bool = False
    context_size: int | None = None


# Why an entry cannot be serialised (its `not_serializable`).
BLOCK = "ResidualBlock has no get_config (its g is any callable)"
UNREGISTERED = "no get_config: only the two flows are registered with keras.saving"
TFP_ONLY = "TFP's tfb.Chain and tfb.Invert have no Keras get_config"

BIJECTORS = {
    "block-mlp": Entry(block_mlp, VECTORS, 1, 1, BLOCK),
    "block-cnn": Entry(block_cnn, IMAGES_2, 3, 3, BLOCK),
    "residual-flow": Entry(residual_flow, VECTORS, 1, 1),
    "residual-flow-anderson": Entry(residual_flow_anderson, VECTORS, 1, 1),
    "residual-flow-dense": Entry(residual_flow_dense, VECTORS, 1, 1),
    "multiscale": Entry(multiscale, IMAGES_1, 3, 1),
    "multiscale-dense": Entry(multiscale_dense, IMAGES_1, 3, 1),
    "multiscale-factor-out": Entry(multiscale_factor_out, IMAGES_2, 3, 1, training=True),
    "actnorm-vector": Entry(actnorm(1), VECTORS, 1, 1, UNREGISTERED),
    "actnorm-image": Entry(actnorm(3), IMAGES_2, 3, 3, UNREGISTERED),
    "logit": Entry(lambda dtype: LogitTransform(0.05), IMAGES_1, 3, 3, UNREGISTERED),
    "squeeze": Entry(lambda dtype: Squeeze(), IMAGES_2, 3, 3, UNREGISTERED),
    "chain-flow-shift": Entry(chain_flow_shift, VECTORS, 1, 1, TFP_ONLY),
    "invert-invert-flow": Entry(invert_invert_flow, VECTORS, 1, 1, TFP_ONLY),
    "chain-invert-block": Entry(chain_invert_block, VECTORS, 1, 1, TFP_ONLY),
    "chain-logit-multiscale": Entry(chain_logit_multiscale, IMAGES_1, 3, 1, TFP_ONLY),
    "block-mlp-conditional": Entry(
        block_mlp_conditional, VECTORS, 1, 1, BLOCK, context_size=CONTEXT_SIZE
    ),
    "block-cnn-conditional": Entry(
        block_cnn_conditional, IMAGES_2, 3, 3, BLOCK, context_size=CONTEXT_SIZE
    ),
    "residual-flow-conditional": Entry(
        residual_flow_conditional, VECTORS, 1, 1, context_size=CONTEXT_SIZE
    ),
    "multiscale-conditional": Entry(
        multiscale_conditional, IMAGES_1, 3, 1, context_size=CONTEXT_SIZE
    ),
    "chain-flow-shift-conditional": Entry(
        chain_flow_shift_conditional, VECTORS, 1, 1, TFP_ONLY, context_size=CONTEXT_SIZE
    ),
    "invert-chain-invert-block-conditional": Entry(
        invert_chain_invert_block_conditional, VECTORS, 1, 1, TFP_ONLY, context_size=CONTEXT_SIZE
    ),
}

SERIALIZABLE = [name for name, entry in BIJECTORS.items() if entry.not_serializable is None]
UNSERIALIZABLE = [name for name, entry in BIJECTORS.items() if entry.not_serializable]

BATCH = 3


@functools.cache
def prepared(name, dtype="float64"):
    """The entry's bijector, with ActNorm initialised from data and every weight moved.

    Shared by the checks (none of them changes a weight), so each bijector is built once.
    """
    keras.utils.set_random_seed(0)
    entry = BIJECTORS[name]
    bijector = entry.build(dtype)
    # builds lazily sized layers, initialises ActNorm
    bijector.inverse(entry.data(32, 0, dtype), **context_kwargs(entry, bijector, 32, dtype))
    layers = keras_layers_of(bijector)
    rng = np.random.default_rng(1)
    for layer in layers:
        for weight in layer.trainable_weights:
            weight.assign(weight + 0.3 * rng.normal(size=weight.shape))
    # The kernels moved: re-converge the norm estimates, so every g is a contraction again.
    tolerance = 1e-7 if dtype == "float64" else 1e-5
    lipschitz.update_lipschitz(layers, atol=tolerance, rtol=tolerance)
    return bijector


def context_kwargs(entry, bijector, batch, dtype="float64"):
    """The keyword arguments of a call on `batch` examples: their contexts, if conditional."""
    if entry.context_size is None:
        return {}
    return conditional_kwargs(bijector, contexts(batch, 0, dtype))


def setup(name):
    """(entry, bijector, y, z, kw) of a registry entry in float64: data and latent batches, and
    the keyword arguments of every call (a context per example for conditional entries)."""
    entry = BIJECTORS[name]
    bijector = prepared(name)
    y = entry.data(BATCH, 2, "float64")
    event_shape = y.shape[y.shape.rank - entry.event_ndims :]
    latent_shape = bijector.inverse_event_shape(event_shape)
    rng = np.random.default_rng(3)
    z = tf.constant(rng.normal(size=(BATCH, *latent_shape)), tf.float64)
    return entry, bijector, y, z, context_kwargs(entry, bijector, BATCH)


def fresh(t):
    """`tf.identity(t)`: a new tensor, so no cache (TFP's or a warm start) can answer for it."""
    return tf.identity(t)


names = pytest.mark.parametrize("name", list(BIJECTORS))


# ------------------------------------------------------------------------------------------------
# 1. Round trips and event shapes


@names
def test_round_trips_and_event_shapes(name):
    entry, bijector, y, z, kw = setup(name)
    assert bijector.dtype in (None, tf.float64)
    assert bijector.inverse_event_ndims(entry.event_ndims) == entry.latent_event_ndims
    assert bijector.forward_event_ndims(entry.latent_event_ndims) == entry.event_ndims
    with training_mode(entry.training):
        x = bijector.inverse(fresh(y), **kw)
        assert x.dtype == tf.float64
        assert x.shape == (BATCH, *bijector.inverse_event_shape(y.shape[1:]))
        np.testing.assert_allclose(bijector.forward(fresh(x), **kw), y, rtol=0, atol=1e-8)
        y_of_z = bijector.forward(fresh(z), **kw)
        assert y_of_z.shape == (BATCH, *bijector.forward_event_shape(z.shape[1:]))
        np.testing.assert_allclose(bijector.inverse(fresh(y_of_z), **kw), z, rtol=0, atol=1e-8)


# ------------------------------------------------------------------------------------------------
# 2. The log-det is that of the Jacobian


@names
def test_inverse_log_det_equals_the_brute_force_jacobian(name):
    entry, bijector, y, _, kw = setup(name)
    with training_mode(entry.training):
        expected = brute_force_inverse_log_det(bijector, y, entry.event_ndims, **kw)
        ildj = bijector.inverse_log_det_jacobian(fresh(y), event_ndims=entry.event_ndims, **kw)
        again = bijector.inverse_log_det_jacobian(fresh(y), event_ndims=entry.event_ndims, **kw)
    # Exact estimators: the same value on every call (a stochastic one would differ by far more
    # than the fixed-point solves' tolerance, which entries with a tfb.Invert go through).
    np.testing.assert_allclose(again, ildj, rtol=0, atol=1e-12)
    # Float64 sums of a few terms of size ~10: 1e-9 is round-off, not estimation error.
    np.testing.assert_allclose(np.broadcast_to(ildj, expected.shape), expected, rtol=0, atol=1e-9)
    if not bijector.is_constant_jacobian:
        assert ildj.shape == (BATCH,)


# ------------------------------------------------------------------------------------------------
# 3. TFP's convention between the two log-dets


@names
def test_forward_log_det_is_minus_the_inverse_log_det_at_the_image(name):
    entry, bijector, y, z, kw = setup(name)
    with training_mode(entry.training):
        fldj = bijector.forward_log_det_jacobian(
            fresh(z), event_ndims=entry.latent_event_ndims, **kw
        )
        y_of_z = bijector.forward(fresh(z), **kw)
        ildj = bijector.inverse_log_det_jacobian(fresh(y_of_z), event_ndims=entry.event_ndims, **kw)
        # And from the data side: ildj(y) = -fldj(inverse(y)).
        x = bijector.inverse(fresh(y), **kw)
        fldj_at_x = bijector.forward_log_det_jacobian(
            fresh(x), event_ndims=entry.latent_event_ndims, **kw
        )
        ildj_at_y = bijector.inverse_log_det_jacobian(fresh(y), event_ndims=entry.event_ndims, **kw)
    np.testing.assert_allclose(fldj, -ildj, rtol=0, atol=1e-9)
    np.testing.assert_allclose(fldj_at_x, -ildj_at_y, rtol=0, atol=1e-9)


# ------------------------------------------------------------------------------------------------
# 4. Eager and tf.function agree


@names
def test_eager_equals_tf_function(name):
    entry, bijector, y, z, kw = setup(name)

    def passes(y, z):
        x = bijector.inverse(fresh(y), **kw)
        ildj = bijector.inverse_log_det_jacobian(fresh(y), event_ndims=entry.event_ndims, **kw)
        joint = inverse_and_log_det(bijector, fresh(y), event_ndims=entry.event_ndims, **kw)
        return x, ildj, bijector.forward(fresh(z), **kw), *joint

    with training_mode(entry.training):  # read at trace time: trace inside the context
        eager = passes(y, z)
        traced = tf.function(passes)(y, z)
    labels = ("inverse", "inverse_log_det_jacobian", "forward", "joint x", "joint ildj")
    for label, a, b in zip(labels, eager, traced, strict=True):
        # The fixed-point solves stop within 1e-12 of their limit (and eagerly warm-start).
        atol = 1e-10 if label == "forward" else 1e-12
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=atol, err_msg=label)
        assert a.shape == b.shape, label


# ------------------------------------------------------------------------------------------------
# 5. The joint pass equals the two calls


@names
def test_joint_inverse_and_log_det_equals_the_two_calls(name):
    entry, bijector, y, _, kw = setup(name)
    with training_mode(entry.training):
        x = bijector.inverse(fresh(y), **kw)
        ildj = bijector.inverse_log_det_jacobian(fresh(y), event_ndims=entry.event_ndims, **kw)
        x_joint, ildj_joint = inverse_and_log_det(
            bijector, fresh(y), event_ndims=entry.event_ndims, **kw
        )
    np.testing.assert_allclose(x_joint, x, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ildj_joint, ildj, rtol=1e-12, atol=1e-12)
    assert ildj_joint.shape == ildj.shape  # TFP's: [] for constant Jacobians, else batch shape


# ------------------------------------------------------------------------------------------------
# 6. Serialisation


def copy_weights(source, target):
    """Sets the weights of `target`'s Keras layers from `source`'s (same structure, in order)."""
    source_layers, target_layers = keras_layers_of(source), keras_layers_of(target)
    assert len(source_layers) == len(target_layers)
    for s, t in zip(source_layers, target_layers, strict=True):
        t.set_weights(s.get_weights())


def weight_dtypes(bijector):
    return [w.dtype for layer in keras_layers_of(bijector) for w in layer.weights]


@pytest.mark.parametrize("name", SERIALIZABLE)
def test_keras_serialization_round_trip(name):
    entry, bijector, y, _, kw = setup(name)
    serialized = json.loads(json.dumps(keras.saving.serialize_keras_object(bijector)))
    restored = keras.saving.deserialize_keras_object(serialized)
    assert type(restored) is type(bijector)
    assert restored.get_config() == bijector.get_config()
    assert restored.name == bijector.name
    assert weight_dtypes(restored) == weight_dtypes(bijector), "the weights' dtype was lost"
    copy_weights(bijector, restored)
    with training_mode(entry.training):
        x = bijector.inverse(fresh(y), **kw)
        ildj = bijector.inverse_log_det_jacobian(fresh(y), event_ndims=entry.event_ndims, **kw)
        np.testing.assert_array_equal(restored.inverse(fresh(y), **kw), x)
        np.testing.assert_array_equal(
            restored.inverse_log_det_jacobian(fresh(y), event_ndims=entry.event_ndims, **kw), ildj
        )


def context_shape(entry):
    return None if entry.context_size is None else [entry.context_size]


@pytest.mark.parametrize("name", SERIALIZABLE)
def test_flow_model_keras_file_round_trip(name, tmp_path):
    # float32, as models are usually trained (float64 is `test_flow_model_in_float64`).
    entry = BIJECTORS[name]
    bijector = prepared(name, "float32")
    y = entry.data(8, 2, "float32")
    kw = context_kwargs(entry, bijector, 8, "float32")
    context = contexts(8, 0, "float32") if entry.context_size else None
    model = FlowModel(bijector, y.shape[1:], context_shape=context_shape(entry))
    model.build((None, *y.shape[1:]))
    path = tmp_path / f"{name}.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, FlowModel)
    assert type(loaded.bijector) is type(bijector)
    assert loaded.bijector.get_config() == bijector.get_config()
    assert loaded.context_shape == model.context_shape
    assert len(loaded.weights) == len(model.weights)
    for a, b in zip(loaded.weights, model.weights, strict=True):
        assert a.dtype == b.dtype, a.path
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    with training_mode(entry.training):
        np.testing.assert_array_equal(
            loaded.bijector.inverse(fresh(y), **kw), bijector.inverse(fresh(y), **kw)
        )
    np.testing.assert_array_equal(
        loaded.log_prob(y, context=context, training=entry.training),
        model.log_prob(y, context=context, training=entry.training),
    )


@pytest.mark.parametrize("name", UNSERIALIZABLE)
def test_unserializable_entries_are_refused_loudly(name, tmp_path):
    entry = BIJECTORS[name]
    bijector = prepared(name)
    y = entry.data(BATCH, 2, "float64")
    assert entry.not_serializable.strip()  # the registry says why
    with pytest.raises(TypeError, match="Cannot serialize"):
        keras.saving.serialize_keras_object(bijector)
    # Nor can a model holding it. (Keras opens the file before it serialises the config, so
    # the failed save leaves an empty file behind, which must not load as a model.)
    path = tmp_path / f"{name}.keras"
    model = FlowModel(bijector, y.shape[1:], dtype="float64", context_shape=context_shape(entry))
    model.build((None, *y.shape[1:]))
    with pytest.raises(TypeError, match="Cannot serialize"):
        model.save(path)
    if path.exists():
        with pytest.raises(ValueError, match="zip file"):
            keras.models.load_model(path)


def test_flow_model_in_float64(tmp_path):
    name = "multiscale"
    entry = BIJECTORS[name]
    bijector = prepared(name)
    y = entry.data(BATCH, 2, "float64")
    model = FlowModel(bijector, y.shape[1:], dtype="float64")
    log_prob = model.log_prob(y)  # the default base takes the model's dtype
    assert log_prob.dtype == tf.float64
    model.save(tmp_path / "float64.keras")
    loaded = keras.models.load_model(tmp_path / "float64.keras")
    np.testing.assert_array_equal(loaded.log_prob(y), log_prob)
