"""The ASTRAEA-accelerated HunyuanVideo forward (arXiv 2506.05096, Sec. 3) and its denoising-loop
adapter.

HunyuanVideo (`astraea_jax.models.hunyuan`) runs L_d dual-stream blocks (video `x [B, N, C]` and
text `ctx [B, M, C]` in separate streams, one joint attention) and then L_s single-stream blocks on
`h = [x; ctx] [B, N + M, C]`; the head reads the video rows only. The choices made here:

  Only video tokens are selected and cached. Every one of the L = L_d + L_s blocks has its slice of
  one `TokenCache` over the N video tokens (`out [L, B, N, C]`, ...; dual blocks in slots
  0 .. L_d - 1, single blocks after them), scored per token with Eq. 1 of the paper,
  `S_i = w_a * LSE_prev_i * delta_i + w_b * exp(n_i)` (`token_selection`: LSE of the token's query
  averaged over heads, delta the relative change of its block input since it was last computed, n
  its consecutive skips), and the top k video tokens of each batch row are computed.

  Text tokens are always computed. The M text tokens (M = 256 at most for HunyuanVideo, against
  N = 67,320 video tokens at 544x960 x 129 frames) are the conditioning every video query attends
  to; computing them costs M / N of a block, and caching them would let stale keys steer every
  video token. So the dual blocks run their whole text stream, and the single blocks compute the
  selected video rows plus all M text rows; the text rows are carried from block to block, never
  cached.

  Keys and values of everything. A computed query attends to all N video tokens (skipped ones with
  their cached value, i.e. the reassembled block input) and all M text tokens, so each computed row
  equals the dense block's row for that input. The text mask is the key length
  `N + sum(text_mask)` of the LSE kernel (`HunyuanConditioning.kv_len`).

So per step, with k static (each distinct k compiles once):

  x, ctx, cond = embed(latents, t, text, text_mask, pooled, guidance)     # [B, N, C], [B, M, C]
  for dual block l (slot l):
    idx = top-k of the slot's scores                                     # [B, S]
    y, ctx, lse = block(x, ctx, cond, select=idx, return_lse=True)      # [B, S, C], [B, M, C]
    out_l[idx] = y                                                       # next block's video input
  for single block l (slot L_d + l):
    y, lse = block([x; ctx], cond, select=idx, return_lse=True)         # [B, S + M, C]
    out_slot[idx] = y[:, :S]; ctx = y[:, S:]
  out = head(out_{L-1}, cond)

k = N runs every block dense (the dense model, to float rounding) and refills the cache; k = 0 is a
pure cache step: the head reads the last block's cache (nothing reads the text then). The first step
of a run must be dense. HunyuanVideo's guidance is embedded (a conditioning input), so a step is
one batch row per video; several rows select independently. Scoring, top-k, the cache and the
in-place walk are the Wan core's (`astraea_jax.acceleration.astraea`, `token_selection`,
`token_cache`); block inputs are always read in place from the cache
(`AstraeaConfig.inplace_input` has no effect here).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from astraea_jax.acceleration.astraea import (
    ScheduledSteps,
    _layer_params,
    _num_layers,
    _read_before_write,
    _set_layer,
    check_step,
    num_video_tokens,
)
from astraea_jax.acceleration.config import AstraeaConfig
from astraea_jax.acceleration.schedule import BudgetSchedule
from astraea_jax.acceleration.token_cache import TokenCache
from astraea_jax.acceleration.token_selection import (
    gather_rows,
    input_change,
    reduce_heads,
    select_top_k,
    sketch_matrix,
    summarize_inputs,
    token_scores,
)

__all__ = [
    "HunyuanAstraeaStepModel",
    "dense_lse_forward",
    "hunyuan_astraea_forward",
    "jit_hunyuan_astraea_step",
]


def hunyuan_astraea_forward(model, latents: jax.Array, timestep: jax.Array, text: jax.Array,
                            text_mask: jax.Array | None, pooled: jax.Array,
                            guidance: jax.Array | None, cache: TokenCache | None, *,
                            num_selected: int, config: AstraeaConfig = AstraeaConfig(),
                            refresh_cache: bool = True) -> tuple[jax.Array, TokenCache]:
  """One accelerated HunyuanVideo forward; call it under `jax.jit` with `num_selected` and
  `refresh_cache` static.

  Args:
    model: a `HunyuanVideoTransformer3DModel`.
    latents, timestep, text, text_mask, pooled, guidance: as the model's `__call__` takes them
      (latents `[B, C_in, T, Y, X]`, timesteps `[B]`, LLM text `[B, M, text_embed_dim]`, its mask
      `[B, M]`, pooled CLIP text `[B, pooled_projection_dim]`, embedded guidance `[B]` or None).
    cache: the token cache from the previous step, or None at the first step.
    num_selected: k, video tokens computed per block and batch row, in [0, N]; N means dense.
    config: scoring and cache options.
    refresh_cache: at a dense step, False runs the plain blocks and returns a last-output cache
      (`TokenCache.last_output`: what k = 0 steps read, none of the per-block state), so the next
      step that computes tokens must be dense. Ignored at other steps.

  Returns:
    `(out [B, C_out, T, Y, X] fp32, cache)`, the model output and the updated cache
    (`out [L_d + L_s, B, N, C]`, ...).
  """
  x, ctx, cond = model.embed(latents, timestep, text, text_mask, pooled, guidance)
  dual = nnx.split(model.transformer_blocks)
  single = nnx.split(model.single_transformer_blocks)
  layers = _num_layers(dual[1]) + _num_layers(single[1])
  k = int(num_selected)
  check_step(x.shape, layers, k, cache, config)
  if k == 0:
    if cache.is_last_output:
      return model.head(cache.out[0], cond), cache
    return model.head(cache.out[layers - 1], cond), cache.replace(skips=cache.skips + 1)
  if k == x.shape[1] and not refresh_cache:
    x = _plain_blocks(model, x, ctx, cond)  # [B, N, C]
    return model.head(x, cond), TokenCache.last_output(x)
  if cache is None or cache.is_last_output:
    cache = _empty_cache(x, layers, config)
  cache = _walk_blocks(dual, single, x, ctx, cond, cache, k, config)
  return model.head(cache.out[layers - 1], cond), cache


def _empty_cache(x: jax.Array, layers: int, config: AstraeaConfig) -> TokenCache:
  """A zero cache for the first (dense) step, which overwrites every entry.

  Filled in place block by block rather than stacked from a scan: stacking the dual and single
  blocks' outputs would hold the cache twice (2 x 25 GB at HunyuanVideo's full size).
  """
  batch, tokens, dim = x.shape
  proj = (None if config.delta_mode == "exact" else
          sketch_matrix(dim, config.sketch_dim, config.sketch_seed, x.dtype))
  ref_shape, ref_dtype = (((layers, batch, tokens, dim), x.dtype) if proj is None else
                          ((layers, batch, tokens, config.sketch_dim), jnp.float32))
  return TokenCache(out=jnp.zeros((layers, batch, tokens, dim), x.dtype),
                    in_ref=jnp.zeros(ref_shape, ref_dtype),
                    lse=jnp.zeros((layers, batch, tokens), jnp.float32),
                    skips=jnp.zeros((layers, batch, tokens), jnp.int32), proj=proj)


def _walk_blocks(dual, single, x, ctx, cond, cache, k, config):
  """The L_d dual and L_s single blocks at k video tokens each (all N: dense), the cache updated
  in place.

  Block l > 0 reads its video input from the cache, `out[l - 1]`, which after block l - 1's scatter
  IS the reassembled sequence (see `astraea._walk_layers`); the text rows travel as a loop carry.
  """
  (graph_d, params_d), (graph_s, params_s) = dual, single
  layers_d = _num_layers(params_d)
  layers = layers_d + _num_layers(params_s)
  batch, n, _ = x.shape
  rows_b = jnp.arange(batch, dtype=jnp.int32)[:, None]  # [B, 1]
  relative = config.delta_norm == "relative"

  def choose(c, slot, x):
    """Summary of the block input and the rows to compute (None: all)."""
    current = summarize_inputs(x, c.proj)  # [B, N, P or C]
    if k == n:
      return current, None
    delta = input_change(current, c.in_ref[slot], relative=relative, eps=config.eps)  # [B, N]
    scores = token_scores(c.lse[slot], delta, c.skips[slot], config)  # [B, N]
    return current, select_top_k(scores, k, method=config.selection,
                                 chunks=config.selection_chunks)  # [B, S]

  def write(c, slot, idx, current, y, lse, text):
    """Stores the computed video rows `y [B, S, C]` and their LSE `[B, H, S]` in `slot`."""
    if y.shape != (batch, k, x.shape[-1]):
      raise ValueError(f"block returned {y.shape} for {k} selected rows of {x.shape}")
    ref = current if idx is None else gather_rows(current, idx)
    # The text carry also feeds on the block input: ordered before the write like the rest.
    y, ref, text = _read_before_write(y, ref, text)
    lse = reduce_heads(lse, config.head_reduction)  # [B, S]
    if idx is None:
      c = c.replace(out=_set_layer(c.out, y, slot), in_ref=_set_layer(c.in_ref, ref, slot),
                    lse=_set_layer(c.lse, lse, slot),
                    skips=_set_layer(c.skips, jnp.zeros(c.skips.shape[1:], jnp.int32), slot))
      return c, text
    at = (slot, rows_b, idx)  # rows (slot, b, idx[b, s]) of the stacked arrays
    skips = (c.skips[slot] + 1).at[rows_b, idx].set(0, unique_indices=True)  # [B, N]
    c = c.replace(out=c.out.at[at].set(y.astype(c.out.dtype), unique_indices=True),
                  in_ref=c.in_ref.at[at].set(ref.astype(c.in_ref.dtype), unique_indices=True),
                  lse=c.lse.at[at].set(lse, unique_indices=True),
                  skips=_set_layer(c.skips, skips, slot))
    return c, text

  def dual_block(slot, c, x, ctx):
    block = nnx.merge(graph_d, _layer_params(params_d, slot))
    current, idx = choose(c, slot, x)
    y, ctx, lse = block(x, ctx, cond, select=idx, return_lse=True)  # [B, S, C], [B, M, C]
    return write(c, slot, idx, current, y, lse, ctx)

  def single_block(slot, c, txt):
    block = nnx.merge(graph_s, _layer_params(params_s, slot - layers_d))
    x = c.out[slot - 1]  # [B, N, C]
    current, idx = choose(c, slot, x)
    h, lse = block(jnp.concatenate([x, txt], axis=1), cond, select=idx,
                   return_lse=True)  # [B, S + M, C], [B, H, S]
    return write(c, slot, idx, current, h[:, :k], lse, h[:, k:])

  cache, ctx = dual_block(0, cache, x, ctx)  # block 0 reads the embedding
  cache, ctx = jax.lax.fori_loop(
      1, layers_d, lambda l, carry: dual_block(l, carry[0], carry[0].out[l - 1], carry[1]),
      (cache, ctx))
  cache, _ = jax.lax.fori_loop(layers_d, layers,
                               lambda l, carry: single_block(l, *carry), (cache, ctx))
  return cache


def dense_lse_forward(model, latents: jax.Array, timestep: jax.Array, text: jax.Array,
                      text_mask: jax.Array | None, pooled: jax.Array,
                      guidance: jax.Array | None = None) -> jax.Array:
  """The dense model with every attention on the accelerated forward's path (the LSE kernel, the
  text mask as a key length), no cache: `model(...)` to float rounding.

  The like-for-like dense baseline of the speed benchmark: same kernel as the accelerated steps.
  """
  x, ctx, cond = model.embed(latents, timestep, text, text_mask, pooled, guidance)
  return model.head(_plain_blocks(model, x, ctx, cond), cond)


def _plain_blocks(model, x: jax.Array, ctx: jax.Array, cond) -> jax.Array:
  """Every block dense on the accelerated forward's attention path, no cache: video tokens
  `[B, N, C]` and text `[B, M, C]` -> the last block's video tokens `[B, N, C]`."""

  @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
  def dual(block, carry):
    return block(*carry, cond, return_lse=True)[:2]

  @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
  def single(block, h):
    return block(h, cond, return_lse=True)[0]

  x, ctx = dual(model.transformer_blocks, (x, ctx))
  h = single(model.single_transformer_blocks, jnp.concatenate([x, ctx], axis=1))
  return h[:, :cond.num_video_tokens]


# -- the denoising-loop adapter -------------------------------------------------------------------


def _step(graphdef, state, latents, timestep, text, text_mask, pooled, guidance, cache, *,
          num_selected, config, refresh_cache=True):
  model = nnx.merge(graphdef, state)
  return hunyuan_astraea_forward(model, latents, timestep, text, text_mask, pooled, guidance,
                                 cache, num_selected=num_selected, config=config,
                                 refresh_cache=refresh_cache)


@functools.lru_cache(maxsize=32)
def jit_hunyuan_astraea_step(graphdef, *, config: AstraeaConfig = AstraeaConfig()):
  """`hunyuan_astraea_forward` jitted over a split model, the cache donated, k static.

  Returns `step(state, latents, timestep, text, text_mask, pooled, guidance, cache, *,
  num_selected, refresh_cache=True) -> (out, cache)` where `graphdef, state = nnx.split(model)`. The donated cache is
  updated in place: do not reuse it. One jitted function per (graphdef, config).
  """
  return jax.jit(functools.partial(_step, graphdef, config=config),
                 static_argnames=("num_selected", "refresh_cache"), donate_argnames=("cache",))


class HunyuanAstraeaStepModel(ScheduledSteps):
  """`step_model(latents, timestep, carry, step_index) -> (velocity, carry)` for
  `astraea_jax.sampling.loop.denoise` (flow Euler, `guidance_scale=1`: the guidance is embedded).

  Looks up theta for `step_index` in the schedule, runs the accelerated forward with
  `k = round(theta * N)` (step 0 dense) and threads the token cache through the loop as the carry.
  The forward is jitted once per distinct k, the cache donated so that it is updated in place.

  Args:
    model: the `HunyuanVideoTransformer3DModel`.
    schedule: one theta per denoising step.
    text: `[B, M, text_embed_dim]` LLM text embeddings, batched like the latents.
    pooled: `[B, pooled_projection_dim]` pooled CLIP text embedding.
    text_mask: `[B, M]` or None (every token valid).
    guidance: the embedded guidance as the model takes it, scale x 1000 (HunyuanVideo's default
      scale 6.0: 6000), a scalar or `[B]`; None iff the model has no guidance embedding.
    config: scoring and cache options.
    timed: wait for every step's result and record `StepStat`s in `self.stats`.
    lookahead: let a dense step skip the cache writes that no later step reads (the schedule
      says which; `BudgetSchedule.block_cache_read_after`). Needs every step of the schedule
      called in order: a wrapper that may leave steps out (a step cache) must pass False.
  """

  def __init__(self, model, schedule: BudgetSchedule, text: jax.Array, pooled: jax.Array, *,
               text_mask: jax.Array | None = None, guidance: jax.Array | float | None = None,
               config: AstraeaConfig = AstraeaConfig(), timed: bool = False,
               lookahead: bool = True):
    self._graphdef, self._state = nnx.split(model)
    self._patch = tuple(model.config.patch)
    self._init_steps(schedule, num_layers=model.config.num_layers + model.config.num_single_layers,
                     timed=timed, lookahead=lookahead)
    self.text, self.pooled, self.text_mask = text, pooled, text_mask
    batch = text.shape[0]
    self.guidance = (None if guidance is None else
                     jnp.broadcast_to(jnp.asarray(guidance, jnp.float32), (batch,)))
    self.config = config
    self._jitted = jit_hunyuan_astraea_step(self._graphdef, config=config)

  def num_tokens(self, latents_shape: tuple[int, ...]) -> int:
    return num_video_tokens(self._patch, latents_shape)

  def __call__(self, latents: jax.Array, timestep: jax.Array, carry: TokenCache | None,
               step_index: int) -> tuple[jax.Array, TokenCache]:
    step_index = int(step_index)
    batch = latents.shape[0]
    if self.text.shape[0] != batch:
      raise ValueError(f"text batch {self.text.shape[0]} does not match latents batch {batch}")
    timestep = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32), (batch,))
    out, carry = self._run_step(
        step_index, latents.shape, carry,
        lambda k, refresh: self._jitted(self._state, latents, timestep, self.text,
                                        self.text_mask, self.pooled, self.guidance, carry,
                                        num_selected=k, refresh_cache=refresh))
    return out.astype(latents.dtype), carry
