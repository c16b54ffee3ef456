"""Inverting `y = x + g(x)`: fixed-point solvers and the implicit gradient of the inverse.

- `fixed_point`: the solvers' signature and tolerances; plain iteration.
- `anderson`: Anderson acceleration, per example, with its safeguard.
- `solver`: the solver registry; `solve_residual`, the residual inverse and its gradient.
"""
