"""Token scoring and top-k selection of ASTRAEA (arXiv 2506.05096, Sec. 3.1).

In every block of a sparse step, token i gets the score

  S_i = w_a * LSE_prev_i * delta_i + w_b * exp(n_i)

- `LSE_prev_i`: the token's self-attention log-sum-exp (natural log of the softmax denominator of
  the scaled scores), reduced over heads (`AstraeaConfig.head_reduction`), from the last step in
  which this block computed the token. Adjacent steps' LSE agree closely, so it stands in for this
  step's.
- `delta_i`: the L2 change of the token's block input since that step, relative to the cached input
  by default (`AstraeaConfig.delta_norm`), exact or estimated from a random sketch
  (`AstraeaConfig.delta_mode`).
- `n_i`: how many consecutive steps this block has skipped the token; exp(n) forces stale tokens
  back.

The k highest-scoring tokens of each batch row are computed (`select_top_k`); with classifier-free
guidance the cond and uncond halves are separate batch rows, so each picks its own tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from astraea_jax.acceleration.config import AstraeaConfig

__all__ = [
    "gather_rows",
    "input_change",
    "reduce_heads",
    "scatter_rows",
    "select_top_k",
    "sketch_matrix",
    "summarize_inputs",
    "token_scores",
]


def reduce_heads(lse: jax.Array, mode: str = "mean") -> jax.Array:
  """`[B, H, S]` per-head LSE -> `[B, S]` float32, by "mean" or "max" over H."""
  if lse.ndim != 3:
    raise ValueError(f"lse must be [B, H, S], got shape {lse.shape}")
  lse = lse.astype(jnp.float32)
  if mode == "mean":
    return jnp.mean(lse, axis=1)
  if mode == "max":
    return jnp.max(lse, axis=1)
  raise ValueError(f"unknown head reduction {mode=}; choose 'mean' or 'max'")


def sketch_matrix(dim: int, sketch_dim: int, seed: int = 0, dtype=jnp.float32) -> jax.Array:
  """The fixed Gaussian projection `[C, P]`, entries N(0, 1/P), so that E||v P||^2 = ||v||^2.

  Drawn in float32 from `seed` and then cast, so every block, step and run with the same seed uses
  the same matrix. Keep it in the activations' dtype: the products then run on the matrix units with
  float32 accumulation, and the cast only changes which fixed matrix is used.
  """
  if dim < 1 or sketch_dim < 1:
    raise ValueError(f"{dim=} and {sketch_dim=} must be positive")
  p = jax.random.normal(jax.random.key(seed), (dim, sketch_dim), jnp.float32)
  return (p * np.float32(1.0 / np.sqrt(sketch_dim))).astype(dtype)


def summarize_inputs(x: jax.Array, proj: jax.Array | None) -> jax.Array:
  """What the cache keeps of a block input to measure its later change.

  Args:
    x: `[B, N, C]` block input.
    proj: `[C, P]` sketch matrix, or None for the exact mode.

  Returns:
    The sketch `x P`, `[B, N, P]` float32 (products in x's dtype, accumulated in float32), or x
    itself in the exact mode.
  """
  if proj is None:
    return x
  if proj.shape[0] != x.shape[-1]:
    raise ValueError(f"sketch matrix {proj.shape} does not match hidden size C={x.shape[-1]}")
  return jnp.einsum("bnc,cp->bnp", x, proj.astype(x.dtype), preferred_element_type=jnp.float32)


def input_change(current: jax.Array, cached: jax.Array, *, relative: bool = True,
                 eps: float = 1e-6) -> jax.Array:
  """delta: `||current - cached||` over the last axis, optionally divided by `||cached||`.

  With sketches both norms are Johnson-Lindenstrauss estimates of the input norms (`E||v P||^2 =
  ||v||^2`), so the ratio estimates the relative change of the full input without storing its norm.

  Args:
    current: `[B, N, R]` this step's summary (`summarize_inputs`: the sketch, R = P, or the input,
      R = C).
    cached: `[B, N, R]` the summary stored when the token was last computed.
    relative: divide by `max(||cached||, eps)`.

  Returns:
    `[B, N]` float32.
  """
  if current.shape != cached.shape:
    raise ValueError(f"current {current.shape} and cached {cached.shape} summaries differ in shape")
  cached = cached.astype(jnp.float32)
  change = jnp.sqrt(jnp.sum(jnp.square(current.astype(jnp.float32) - cached), axis=-1))  # [B, N]
  if relative:
    change = change / jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(cached), axis=-1)), np.float32(eps))
  return change


def token_scores(lse: jax.Array, delta: jax.Array, skips: jax.Array,
                 config: AstraeaConfig = AstraeaConfig()) -> jax.Array:
  """`w_a * lse * delta + w_b * exp(min(skips, cap))`, all `[B, N]`; returns float32 `[B, N]`."""
  if not lse.shape == delta.shape == skips.shape:
    raise ValueError(f"lse {lse.shape}, delta {delta.shape} and skips {skips.shape} must match")
  n = jnp.minimum(skips, config.staleness_cap).astype(jnp.float32)
  return (np.float32(config.w_a) * lse.astype(jnp.float32) * delta.astype(jnp.float32)
          + np.float32(config.w_b) * jnp.exp(n))


def select_top_k(scores: jax.Array, k: int) -> jax.Array:
  """Indices of the k highest scores of each row: `[B, N]` -> `[B, S=k]` int32.

  Ordered by descending score, ties to the lower index (`jax.lax.top_k`). The order is not sorted by
  position: gathers and scatters of whole rows do not need it, and sorting would cost a second sort.
  """
  if scores.ndim != 2:
    raise ValueError(f"scores must be [B, N], got shape {scores.shape}")
  if not 0 < k <= scores.shape[1]:
    raise ValueError(f"{k=} must lie in [1, N={scores.shape[1]}]")
  _, idx = jax.lax.top_k(scores, k)
  return idx.astype(jnp.int32)


def gather_rows(x: jax.Array, idx: jax.Array) -> jax.Array:
  """`x [B, N, ...]`, `idx [B, S]` -> `x[b, idx[b]]`, `[B, S, ...]`."""
  b = jnp.arange(x.shape[0], dtype=jnp.int32)[:, None]
  return x.at[b, idx].get(mode="promise_in_bounds")


def scatter_rows(base: jax.Array, idx: jax.Array, rows: jax.Array) -> jax.Array:
  """`base [B, N, ...]` with rows `idx [B, S]` replaced by `rows [B, S, ...]` (indices unique)."""
  b = jnp.arange(base.shape[0], dtype=jnp.int32)[:, None]
  return base.at[b, idx].set(rows.astype(base.dtype), unique_indices=True,
                             indices_are_sorted=False, mode="promise_in_bounds")
