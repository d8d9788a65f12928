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


def _top_k_sort(scores: jax.Array, k: int) -> jax.Array:
  # XLA sorts whole rows for large k.
  return jax.lax.top_k(scores, k)[1]


def _sortable_keys(scores: jax.Array) -> jax.Array:
  """float32 -> uint32 keys in the same order (negative floats have their bits flipped)."""
  u = jax.lax.bitcast_convert_type(scores.astype(jnp.float32), jnp.uint32)
  return jnp.where(u >> 31 == 1, ~u, u | np.uint32(0x80000000))


def _top_k_radix(scores: jax.Array, k: int) -> jax.Array:
  """Radix select: the k-th largest key digit by digit (4 passes of 8 bits), then one compaction.

  Each pass counts the still-matching keys per 8-bit digit (a `[B, N, 256]` comparison reduced
  over N, which XLA fuses into one read of the keys) and fixes the digit of the k-th largest key.
  The selected set then is every key above it plus the lowest-index keys equal to it, compacted
  by a prefix sum: the same set as `jax.lax.top_k` (ties to the lower index), in ascending index
  order, without sorting.
  """
  key = _sortable_keys(scores)  # [B, N]
  batch, tokens = key.shape
  prefix = jnp.zeros((batch,), jnp.uint32)
  known = np.uint32(0)
  remaining = jnp.full((batch,), k, jnp.int32)
  digits = jnp.arange(256, dtype=jnp.uint32)
  for shift in (24, 16, 8, 0):
    match = (key & known) == prefix[:, None]  # [B, N]
    digit = (key >> np.uint32(shift)) & np.uint32(0xFF)  # [B, N]
    hist = jnp.sum((digit[:, :, None] == digits) & match[:, :, None], axis=1,
                   dtype=jnp.int32)  # [B, 256]
    at_least = jnp.cumsum(hist[:, ::-1], axis=1)[:, ::-1]  # [B, 256]: keys with digit >= d
    chosen = jnp.sum(at_least >= remaining[:, None], axis=1, dtype=jnp.int32) - 1  # [B]
    above = jnp.where(chosen < 255,
                      jnp.take_along_axis(at_least, jnp.minimum(chosen + 1, 255)[:, None],
                                          axis=1)[:, 0], 0)
    remaining = remaining - above
    prefix = prefix | (chosen.astype(jnp.uint32) << np.uint32(shift))
    known = known | np.uint32(0xFF << shift)
  equal = key == prefix[:, None]
  selected = (key > prefix[:, None]) | (equal & (jnp.cumsum(equal, axis=1, dtype=jnp.int32)
                                                 <= remaining[:, None]))  # [B, N], k per row
  slot = jnp.where(selected, jnp.cumsum(selected, axis=1, dtype=jnp.int32) - 1, k)  # [B, N]
  rows = jnp.arange(batch, dtype=jnp.int32)[:, None]
  iota = jnp.broadcast_to(jnp.arange(tokens, dtype=jnp.int32), (batch, tokens))
  return jnp.zeros((batch, k), jnp.int32).at[rows, slot].set(iota, mode="drop")


SELECTIONS = {"sort": _top_k_sort, "radix": _top_k_radix}


def select_top_k(scores: jax.Array, k: int, *, method: str = "sort", chunks: int = 1) -> jax.Array:
  """Indices of the k highest scores of each row: `[B, N]` -> `[B, S=k]` int32.

  Both methods select the same set (ties to the lower index). "sort" (`jax.lax.top_k`) orders it
  by descending score; "radix" (a radix select, no sort) by ascending index. Gathers and scatters
  of whole rows do not depend on the order.

  `chunks > 1` splits each row into that many contiguous chunks of N / chunks tokens and takes the
  top k / chunks of each (chunk by chunk in the result): the per-shard selection of the
  sequence-parallel forward, on one device.
  """
  if scores.ndim != 2:
    raise ValueError(f"scores must be [B, N], got shape {scores.shape}")
  if not 0 < k <= scores.shape[1]:
    raise ValueError(f"{k=} must lie in [1, N={scores.shape[1]}]")
  try:
    fn = SELECTIONS[method]
  except KeyError:
    raise ValueError(f"unknown selection {method=}; choose from {sorted(SELECTIONS)}") from None
  if chunks == 1:
    return fn(scores, k).astype(jnp.int32)
  batch, tokens = scores.shape
  if chunks < 1 or tokens % chunks or k % chunks:
    raise ValueError(f"{chunks=} must be positive and divide N={tokens} and {k=}")
  width = tokens // chunks
  local = fn(scores.reshape(batch * chunks, width), k // chunks).astype(jnp.int32)  # [B*G, S/G]
  offset = (jnp.arange(chunks, dtype=jnp.int32) * width)[None, :, None]  # [1, G, 1]
  return (local.reshape(batch, chunks, -1) + offset).reshape(batch, k)


def gather_rows(x: jax.Array, idx: jax.Array) -> jax.Array:
  """`x [B, N, ...]`, `idx [B, S]` -> `x[b, idx[b]]`, `[B, S, ...]`."""
  b = jnp.arange(x.shape[0], dtype=jnp.int32)[:, None]
  return x.at[b, idx].get(mode="promise_in_bounds")


def scatter_rows(base: jax.Array, idx: jax.Array, rows: jax.Array) -> jax.Array:
  """`base [B, N, ...]` with rows `idx [B, S]` replaced by `rows [B, S, ...]` (indices unique)."""
  b = jnp.arange(base.shape[0], dtype=jnp.int32)[:, None]
  return base.at[b, idx].set(rows.astype(base.dtype), unique_indices=True,
                             indices_are_sorted=False, mode="promise_in_bounds")
