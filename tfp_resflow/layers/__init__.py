"""Keras layers with a bounded Lipschitz constant, and the residual functions `g` built of them.

- `operator_norm`: induced norms `||A||_{p->q}`: closed forms and the generalized power method.
- `gram_iteration`: guaranteed upper bounds on spectral norms (dense kernels, convolutions).
- `norm_order`: learnable orders of the mixed norms.
- `spectral_layer`: the shared base: soft rescaling, stored estimates, power iterations.
- `lipschitz`, `spectral_conv`: `SpectralDense`, `SpectralConv2D` (operator norm at most c < 1).
- `activation`: 1-Lipschitz activations (LipSwish, CLipSwish and others).
- `network`, `dense_network`: builders of `g` with `Lip(g) < 1` (ResNet, i-DenseNet).
"""
