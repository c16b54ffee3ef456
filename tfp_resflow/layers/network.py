"""Builders of residual functions g with Lip(g) <= lipschitz_constant.

Each builder alternates 1-Lipschitz activations (`tfp_resflow.layers.activation`) with Lipschitz
layers (`tfp_resflow.layers.lipschitz`), each of norm at most c, so for n linear layers

    Lip(g) <= c**n <= c < 1

in the l_p norm of `norm_orders[0] = norm_orders[-1]` (every activation is 1-Lipschitz in
every l_p; CLipSwish only in l2). The bound holds once the layers' sigma estimates have
converged: call `tfp_resflow.layers.lipschitz.update_lipschitz(g, atol=..., rtol=...)`.

With `learnable_norm_orders=True` each boundary order is a `NormOrder` starting at
`norm_orders` (default 2), shared by the layers on both sides of it, and the last boundary is
the first one, so the bound above holds in the learned l_p (see `tfp_resflow.layers.norm_order`).
`.keras` files keep these ties, and the flows rebuild them from their own settings; Keras'
`Sequential.from_config` and `clone_model` do not (each layer gets its own copy).
"""

__all__ = ["check_norm_orders", "lipschitz_cnn", "lipschitz_mlp"]

from collections.abc import Callable, Sequence

import keras

from tfp_resflow.core import validation
from tfp_resflow.core.context import check_context_size
from tfp_resflow.layers.activation import get_activation
from tfp_resflow.layers.lipschitz import SpectralDense
from tfp_resflow.layers.norm_order import MAX_ORDER, MIN_ORDER, NormOrder
from tfp_resflow.layers.operator_norm import check_order
from tfp_resflow.layers.spectral_conv import SpectralConv2D
from tfp_resflow.layers.spectral_layer import SpectralLayer


def check_norm_orders(
    norm_orders: Sequence | None, num_linear: int, activation: str, *, learnable: bool
) -> list[float]:
    """Checks the boundary orders of a `g` with `num_linear` linear layers.

    Returns:
        The `num_linear + 1` orders as floats (all 2.0 for None).

    Raises:
        ValueError: On a wrong count or type, first != last, an order outside [1, inf]
            (outside (1, 5) if `learnable`), or CLipSwish with orders other than 2.
    """
    validation.boolean("learnable_norm_orders", learnable)
    if norm_orders is None:
        norm_orders = [2] * (num_linear + 1)
    if isinstance(norm_orders, str) or not isinstance(norm_orders, Sequence):
        validation.fail("norm_orders", "a sequence of orders", norm_orders)
    orders = [check_order("norm_orders", p) for p in norm_orders]
    if len(orders) != num_linear + 1:
        raise ValueError(
            f"norm_orders needs {num_linear + 1} entries (one per layer boundary); "
            f"got {norm_orders!r}"
        )
    if orders[0] != orders[-1]:
        raise ValueError(f"norm_orders must start and end with the same order; got {orders!r}")
    if str(activation).lower() == "clipswish" and (learnable or any(p != 2 for p in orders)):
        raise ValueError(
            f"clipswish is 1-Lipschitz in l2 only; got norm_orders={orders!r}, "
            f"learnable_norm_orders={learnable!r}"
        )
    if learnable and not all(MIN_ORDER < p < MAX_ORDER for p in orders):
        raise ValueError(
            f"learnable norm_orders start in ({MIN_ORDER:g}, {MAX_ORDER:g}); got {orders!r}"
        )
    return orders


def _orders(
    norm_orders: Sequence | None,
    num_linear: int,
    activation: str,
    *,
    learnable: bool,
    dtype: str | None,
) -> tuple[list, list]:
    """The (domain, codomain) of each linear layer: numbers, or tied `NormOrder`s."""
    orders = check_norm_orders(norm_orders, num_linear, activation, learnable=learnable)
    if not learnable:
        return orders[:-1], orders[1:]
    shared = [NormOrder(p, dtype=dtype) for p in orders[:-1]]
    return shared, shared[1:] + shared[:1]  # codomain i = domain i+1; last = first domain


def _residual_function(
    input_shape: tuple[int, ...],
    layer_class: Callable[..., keras.layers.Layer],
    layer_args: list[tuple],
    *,
    lipschitz_constant: float,
    activation: str,
    activation_first: bool,
    norm_orders: Sequence | None,
    learnable_norm_orders: bool,
    zero_init_last: bool,
    context_size: int | None,
    context_hidden_units: Sequence[int],
    name: str | None,
    layer_kwargs: dict,
) -> keras.Model:
    """Builds `g` = linear o phi o ... o phi o linear [o phi] on inputs of `input_shape`.

    The i-th linear layer is `layer_class(*layer_args[i], ...)`, whose first argument is its
    output width, with the i-th boundary orders and `layer_kwargs` (which hold `dtype`); the
    orders are checked first. With a `context_size`, a functional model of `[x, c]` that adds
    a context shift after every linear layer (see `lipschitz_mlp`).
    """
    dtype = layer_kwargs["dtype"]
    domains, codomains = _orders(
        norm_orders, len(layer_args), activation, learnable=learnable_norm_orders, dtype=dtype
    )
    # Fixed names inside each g: two gs of one configuration then have equal structure keys
    # (`block_functions.structure_key`) and share their traced passes.
    layers = []
    if activation_first:
        layers.append(get_activation(activation, dtype=dtype, name="activation_0"))
    for i, args in enumerate(layer_args):
        last = i == len(layer_args) - 1
        if i > 0:
            layers.append(get_activation(activation, dtype=dtype, name=f"activation_{i + 1}"))
        initializer = "zeros" if last and zero_init_last else "glorot_uniform"
        layers.append(
            layer_class(
                *args,
                lipschitz_constant=lipschitz_constant,
                domain=domains[i],
                codomain=codomains[i],
                kernel_initializer=initializer,
                name=f"linear_{i}",
                **layer_kwargs,
            )
        )
    if context_size is None:
        return keras.Sequential([keras.Input(input_shape, dtype=dtype), *layers], name=name)
    return _with_context_shifts(
        input_shape, layers, context_size, context_hidden_units, dtype=dtype, name=name
    )


def _with_context_shifts(
    input_shape: tuple[int, ...],
    layers: list[keras.layers.Layer],
    context_size: int,
    context_hidden_units: Sequence[int],
    *,
    dtype: str | None,
    name: str | None,
) -> keras.Model:
    """`g(x, c)`: `layers` applied to x, each linear layer's output shifted by `s_i(c)`.

        e = MLP(c)                          unconstrained (ELU hidden layers)
        h_i = L_i(phi(h_{i-1})) + s_i(e)    s_i linear, starting at zero
        s_i broadcast over space for images

    For a fixed c each shift is a constant, so `x -> L_i x + s_i(c)` has the Lipschitz
    constant of `L_i`, and `Lip_x(g(., c)) <= prod_i ||L_i|| <= c^n` for every c.
    """
    x = x_in = keras.Input(input_shape, dtype=dtype, name="x")
    c_in = keras.Input((context_size,), dtype=dtype, name="context")
    e = c_in
    for j, units in enumerate(context_hidden_units):
        e = keras.layers.Dense(units, activation="elu", dtype=dtype, name=f"context_{j}")(e)
    i = 0
    for layer in layers:
        x = layer(x)
        if not isinstance(layer, SpectralLayer):
            continue  # an activation
        width = x.shape[-1]
        shift = keras.layers.Dense(
            width, kernel_initializer="zeros", dtype=dtype, name=f"context_shift_{i}"
        )(e)
        if len(input_shape) > 1:  # images: one shift per channel, over all positions
            spatial = (1,) * (len(input_shape) - 1)
            shift = keras.layers.Reshape((*spatial, width), dtype=dtype, name=f"at_{i}")(shift)
        x = keras.layers.Add(dtype=dtype, name=f"shifted_{i}")([x, shift])
        i += 1
    return keras.Model([x_in, c_in], x, name=name)


def lipschitz_mlp(
    event_size: int,
    hidden_units: Sequence[int] = (128, 128),
    *,
    lipschitz_constant: float = 0.9,
    activation: str = "lipswish",
    activation_first: bool = True,
    norm_orders: Sequence[float | str] | None = None,
    learnable_norm_orders: bool = False,
    zero_init_last: bool = False,
    context_size: int | None = None,
    context_hidden_units: Sequence[int] = (64,),
    dtype: str | None = None,
    name: str | None = None,
    **layer_kwargs,
) -> keras.Model:
    """Builds the authors' fully connected g for vector events, [batch, D] -> [batch, D].

        g = Dense(h_n -> D) o phi o ... o phi o Dense(D -> h_1) o [phi]

    Args:
        event_size: D.
        hidden_units: Widths h_1, ..., h_n of the hidden layers (may be empty).
        lipschitz_constant: Bound c in (0, 1) on each layer's norm ("coeff" in Chen et al.).
        activation: A name in `tfp_resflow.layers.activation.ACTIVATIONS`; new layer per use.
        activation_first: Whether g starts with phi (the authors' pre-activation).
        norm_orders: Orders of the norms at the layer boundaries, one more than there are
            linear layers, first = last: linear layer i maps l_{p_i} to l_{p_(i+1)}
            (the authors' `vnorms`). Default: all 2 (spectral norms).
        learnable_norm_orders: Learn the orders (the authors' `--learn-p`), starting from
            `norm_orders`, which must then lie in (1, 5); see the module docs.
        zero_init_last: Start the last kernel at zero, so g = bias and the block is a shift.
        context_size: K for a conditional g(x, c) with contexts c of shape [batch, K]: each
            linear layer's output is shifted by a function of c (an unconstrained network
            `context_hidden_units` wide, ELU, then one linear map per layer, starting at zero),
            which leaves Lip_x(g(., c)) <= c**n for every c (see `_with_context_shifts`).
            None (default): g(x).
        context_hidden_units: Hidden widths of the context network (may be empty).
        dtype: Layer dtype, e.g. "float64".
        name: Model name.
        **layer_kwargs: Passed to every `SpectralDense` (e.g. `power_iterations`).

    Returns:
        A `keras.Sequential` built for input [None, D]; with a `context_size`, a functional
        `keras.Model` of `[x, c]`, shapes `([None, D], [None, K])`.

    Raises:
        ValueError: On a non-positive size, a bad order list or an unknown activation.
    """
    event_size = validation.positive_integer("event_size", event_size)
    widths = (*validation.integers("hidden_units", hidden_units, nonempty=False), event_size)
    return _residual_function(
        (event_size,),
        SpectralDense,
        [(width,) for width in widths],
        lipschitz_constant=lipschitz_constant,
        activation=activation,
        activation_first=activation_first,
        norm_orders=norm_orders,
        learnable_norm_orders=learnable_norm_orders,
        zero_init_last=zero_init_last,
        context_size=check_context_size("context_size", context_size),
        context_hidden_units=validation.integers(
            "context_hidden_units", context_hidden_units, nonempty=False
        ),
        name=name,
        layer_kwargs={"dtype": dtype, **layer_kwargs},
    )


def lipschitz_cnn(
    input_shape: Sequence[int],
    hidden_channels: int = 512,
    kernel_sizes: Sequence[int] = (3, 1, 3),
    *,
    lipschitz_constant: float = 0.98,
    activation: str = "lipswish",
    activation_first: bool = True,
    norm_orders: Sequence[float | str] | None = None,
    learnable_norm_orders: bool = False,
    zero_init_last: bool = False,
    context_size: int | None = None,
    context_hidden_units: Sequence[int] = (64,),
    dtype: str | None = None,
    name: str | None = None,
    **layer_kwargs,
) -> keras.Model:
    """Builds the authors' convolutional g for images, [batch, H, W, C] -> [batch, H, W, C].

        g = Conv3x3(-> C) o phi o Conv1x1(-> hidden) o phi o Conv3x3(-> hidden) o [phi]

    (for the default kernel sizes 3-1-3). Convolutions are stride 1 with "same" padding, and
    their norms are those of the convolution operators on H x W images.

    Args:
        input_shape: (H, W, C) of one image.
        hidden_channels: Output channels of every convolution but the last (512 in the paper).
        kernel_sizes: Odd kernel size of each convolution, first to last.
        lipschitz_constant: Bound c in (0, 1) on each convolution's norm.
        activation: A name in `tfp_resflow.layers.activation.ACTIVATIONS`; new layer per use.
        activation_first: Whether g starts with phi; False for the network's first block.
        norm_orders: As in `lipschitz_mlp`, one more entry than `kernel_sizes`.
        learnable_norm_orders: As in `lipschitz_mlp`.
        zero_init_last: Start the last kernel at zero.
        context_size: As in `lipschitz_mlp`; the shifts are per channel, the same at every
            position (a vector context broadcast over space).
        context_hidden_units: As in `lipschitz_mlp`.
        dtype: Layer dtype, e.g. "float64".
        name: Model name.
        **layer_kwargs: Passed to every `SpectralConv2D` (e.g. `power_iterations`).

    Returns:
        A `keras.Sequential` built for input [None, H, W, C]; with a `context_size`, a
        functional `keras.Model` of `[x, c]`, shapes `([None, H, W, C], [None, K])`.

    Raises:
        ValueError: On a bad shape, width, kernel size, order list or activation.
    """
    shape = validation.image_shape("input_shape", input_shape)
    hidden_channels = validation.positive_integer("hidden_channels", hidden_channels)
    kernels = validation.integers("kernel_sizes", kernel_sizes, odd=True)
    channels = [hidden_channels] * (len(kernels) - 1) + [shape[-1]]
    return _residual_function(
        shape,
        SpectralConv2D,
        list(zip(channels, kernels, strict=True)),
        lipschitz_constant=lipschitz_constant,
        activation=activation,
        activation_first=activation_first,
        norm_orders=norm_orders,
        learnable_norm_orders=learnable_norm_orders,
        zero_init_last=zero_init_last,
        context_size=check_context_size("context_size", context_size),
        context_hidden_units=validation.integers(
            "context_hidden_units", context_hidden_units, nonempty=False
        ),
        name=name,
        layer_kwargs={"dtype": dtype, **layer_kwargs},
    )
