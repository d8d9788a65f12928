"""What a flow-matching denoiser predicts, and how it becomes the velocity the samplers step with.

Flow matching with Wan2.1's conventions (rectified flow, Liu et al. 2022; Esser et al. 2024): the input
is `x_t = (1 - sigma) x0 + sigma noise`, the timestep is `1000 sigma`, and the velocity is
`v = noise - x0`, so `x0 = x_t - sigma v`. Wan2.1 predicts `v`; the project's small pixel-space model
predicts `x0`, which suits a model whose patches (8 x 8 x 3 values) are not much narrower than its width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["PREDICTIONS", "X0_MIN_SIGMA", "output_to_velocity"]

PREDICTIONS = ("velocity", "x0")
# Floor of sigma when an x0 prediction becomes a velocity, so that near-clean inputs do not divide
# by ~0 (training never weights sigma < 0.05 more than this; samplers never evaluate sigma = 0).
X0_MIN_SIGMA = 0.05


def output_to_velocity(out: jax.Array, x_t: jax.Array, timestep: jax.Array,
                       prediction: str) -> jax.Array:
  """The velocity of a model output: `out` itself ("velocity"), or for "x0"
  `(x_t - out) / max(timestep / 1000, X0_MIN_SIGMA)`.

  out, x_t: `[B, C, T, Y, X]`; timestep: `[B]` (or a scalar), `1000 sigma` as the samplers feed it.
  """
  if prediction == "velocity":
    return out
  if prediction != "x0":
    raise ValueError(f"prediction={prediction!r} must be one of {PREDICTIONS}")
  sigma = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32) / 1000.0, (x_t.shape[0],))
  s = jnp.maximum(sigma, X0_MIN_SIGMA).reshape((-1,) + (1,) * (x_t.ndim - 1))
  return (x_t.astype(jnp.float32) - out.astype(jnp.float32)) / s
