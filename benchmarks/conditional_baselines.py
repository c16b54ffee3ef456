"""Conditional MAF and RealNVP for vectors from TFP bijectors, with Keras 3 networks of (x, c).

TFP's `tfb.MaskedAutoregressiveFlow` and `tfb.RealNVP` pass the `conditional_input=c` they are
given on to their `shift_and_log_scale_fn`; these networks take it:

    ConditionalCouplingMLP   [x_a, c] -> (shift, log_scale) of x_b: an MLP of the concatenation
    ConditionalMADE          MADE of x whose first hidden layer also gets W c (unmasked: every
                             output may depend on all of c, the conditional MADE of
                             Papamakarios et al. 2017)

`conditional_realnvp(event_size, context_size)` and `conditional_maf(...)` build the flows as
`compare_flows.realnvp_2d` and `maf_2d` do (ActNorm, then couplings or MAF layers with
permutations between them), returning `(bijector, networks)` for `NetworkOwningFlowModel`;
the context reaches every coupling through `tfp_resflow.core.context.conditional_kwargs` (member
names are unique). A context `[K]` (one for all) is broadcast to the batch of x.
"""

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
from compare_flows import CouplingMLP, MaskedDense, _actnorm, _soft_log_scale

tfb = tfp.bijectors

__all__ = ["ConditionalCouplingMLP", "ConditionalMADE", "conditional_maf", "conditional_realnvp"]


def _broadcast_context(x: tf.Tensor, context: tf.Tensor) -> tf.Tensor:
    """`context` `[..., K]` broadcast to x's batch shape, `[*batch, K]`, in x's dtype."""
    context = tf.cast(context, x.dtype)
    shape = tf.concat([tf.shape(x)[:-1], tf.shape(context)[-1:]], axis=0)
    return tf.broadcast_to(context, shape)


class ConditionalCouplingMLP(CouplingMLP):
    """`(x_a [B, d_a], c [B, K]) -> (shift, log_scale) [B, d_b]` for a conditional `tfb.RealNVP`.

    `compare_flows.CouplingMLP` on `[x_a, c]` concatenated (built for `(None, d_a + K)`); its
    last layer starts at zero, so every coupling starts as the identity.
    """

    def __init__(self, output_size: int, hidden_units: tuple, **kwargs):
        super().__init__(None, output_size, hidden_units, **kwargs)

    def call(self, x: tf.Tensor, conditional_input: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return super().call(tf.concat([x, _broadcast_context(x, conditional_input)], axis=-1))


class ConditionalMADE(keras.Model):
    """Masked autoencoder of `x [B, D]` given `c [B, K]`: output i sees `x_<i` and all of c.

    Degrees as in `compare_flows.MADE`; the context enters the first hidden layer through an
    unmasked linear map (`h_1 = relu(M x + W c + b)`), so the autoregressive structure in x is
    kept for every c.
    """

    def __init__(self, event_size: int, hidden_units: tuple, **kwargs):
        super().__init__(**kwargs)
        d = event_size
        self.event_size = d
        degrees = [np.arange(1, d + 1)]
        for h in hidden_units:
            degrees.append(np.arange(h) % max(1, d - 1) + 1)
        activations = [None] + ["relu"] * (len(hidden_units) - 1)  # the first after + W c
        self.hidden = [
            MaskedDense(h, degrees[i][:, None] <= degrees[i + 1][None, :], activation=act)
            for i, (h, act) in enumerate(zip(hidden_units, activations, strict=True))
        ]
        self.context_in = keras.layers.Dense(hidden_units[0], use_bias=False, name="context_in")
        out_degrees = np.tile(np.arange(1, d + 1), 2)
        self.out = MaskedDense(
            2 * d, degrees[-1][:, None] < out_degrees[None, :], zeros=True, name="made_output"
        )

    def build(self, input_shape: tuple, context_shape: tuple) -> None:
        shape = tuple(input_shape)
        for layer in [*self.hidden, self.out]:
            layer.build(shape)
            shape = (*shape[:-1], layer.units)
        self.context_in.build(tuple(context_shape))

    def call(self, x: tf.Tensor, conditional_input: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        c = _broadcast_context(x, conditional_input)
        h = tf.nn.relu(self.hidden[0](x) + self.context_in(c))
        for layer in self.hidden[1:]:
            h = layer(h)
        out = self.out(h)
        return out[..., : self.event_size], _soft_log_scale(out[..., self.event_size :])


def _permutation(event_size: int, k: int) -> list[int]:
    """The order reversed (2-D: the halves swapped), as in `compare_flows`."""
    del k
    return list(range(event_size))[::-1]


def conditional_realnvp(
    event_size: int, context_size: int, num_layers: int = 8, hidden_units: tuple = (64, 64)
) -> tuple[tfb.Bijector, list[keras.Model]]:
    """ActNorm, then `num_layers` conditional affine couplings alternating the halves."""
    bijectors, networks = [_actnorm((event_size,), "act_norm")], []
    masked = event_size // 2
    for k in range(num_layers):
        net = ConditionalCouplingMLP(event_size - masked, hidden_units, name=f"coupling_{k}")
        net.build((None, masked + context_size))
        networks.append(net)
        if k:
            bijectors.append(tfb.Permute(_permutation(event_size, k), name=f"permute_{k}"))
        bijectors.append(
            tfb.RealNVP(
                num_masked=masked,
                shift_and_log_scale_fn=lambda x, output_units, net=net, **kw: net(
                    x, kw["conditional_input"]
                ),
                name=f"real_nvp_{k}",
            )
        )
    return tfb.Chain(bijectors, name="conditional_realnvp"), networks


def conditional_maf(
    event_size: int, context_size: int, num_layers: int = 8, hidden_units: tuple = (64, 64)
) -> tuple[tfb.Bijector, list[keras.Model]]:
    """ActNorm, then `num_layers` conditional MAF layers with reversals between them."""
    bijectors, networks = [_actnorm((event_size,), "act_norm")], []
    for k in range(num_layers):
        made = ConditionalMADE(event_size, hidden_units, name=f"made_{k}")
        made.build((None, event_size), (None, context_size))
        networks.append(made)
        if k:
            bijectors.append(tfb.Permute(_permutation(event_size, k), name=f"permute_{k}"))
        bijectors.append(
            tfb.MaskedAutoregressiveFlow(
                shift_and_log_scale_fn=lambda x, made=made, **kw: made(x, kw["conditional_input"]),
                name=f"maf_{k}",
            )
        )
    return tfb.Chain(bijectors, name="conditional_maf"), networks
