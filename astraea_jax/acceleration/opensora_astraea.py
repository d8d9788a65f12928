"""The ASTRAEA-accelerated OpenSora v1.2 STDiT3 forward (arXiv 2506.05096, Sec. 3) and its
denoising-loop adapter.

STDiT3 (`astraea_jax.models.opensora`) regroups its tokens between blocks: a spatial block attends
within each frame (`[B*t, S, C]`, S = y*x patch positions), a temporal block along time at each
position (`[B*S, t, C]`). The method's "compute k tokens, keep K/V of all N" is exact only if every
key a computed query needs is available, and the two groupings need different keys. The choice made
here keeps both exact and every shape static:

  Select positions, not tokens. Each block selects K = round(theta * S) patch POSITIONS per sample
  and computes the tokens at those positions in every frame (t*K of the N = t*S tokens, the same
  fraction theta). In a spatial block they are each frame's queries against all S keys/values of
  that frame, projected from the reassembled input (skipped tokens carrying their cached values), as
  for Wan. In a temporal block a selected position attends only to its own t frames, all of which
  are selected, so the block runs densely on the `[B*K, t, C]` sub-video and needs nothing else.

  Score per token, select per position. Every token keeps its own cache entry and score
  `S_i = w_a * LSE_prev_i * delta_i + w_b * exp(n_i)` (Sec. 3.1 of the paper; `token_selection`),
  with LSE the block's own self-attention LSE (over the frame in a spatial block, over time in a
  temporal one) and delta the relative change of the token's block input. A position's score is the
  mean of its tokens' scores over the t frames (w_b exp(n) is common to them: a position is computed
  or skipped as a whole, so its tokens share n), and the top K positions of each sample are
  computed. A temporal LSE runs over only t keys (30 at 4 s), so it is smaller than a spatial one
  (S = 1,590 keys at 480p) and, as in the core, its sign is kept: where it is negative a change
  lowers the score.

  A cache per block. The 2L blocks (spatial 0, temporal 0, spatial 1, ..., in run order) each have
  their own slice of one `TokenCache` (`out [2L, B, N, C]`, ...), so spatial and temporal blocks
  select independently, each from its own LSE; a block's skipped tokens take its cached output, and
  the reassembled sequence is the next block's input.

So per step, with k = K positions (static; each distinct K compiles once):

  x, cond = embed(latents, t, y, ...)               # x [B, N, C]
  for l in 0 .. L-1, for block in (spatial_l, temporal_l), cache slice c = 2l or 2l + 1:
    scores = token_scores(...)  [B, N] -> mean over frames  [B, S] -> top-K positions  [B, K]
    y_sel, lse = block(x, cond, select=positions)   # [B, t*K, C], [B, H, t*K]
    out_c[rows of those positions] = y_sel          # the next block's input [B, N, C]
  out = head(x, cond)

K = S runs every block dense (exactly the dense model, to float rounding) and refills the cache;
K = 0 is a pure cache step (the head reads the last block's cache); the first step must be dense.
A dense step whose cache no partial step reads (`refresh_cache=False`: the next step that computes
tokens is dense too, or there is none) runs the plain blocks and keeps only the last block's output,
which is all that K = 0 steps read (`TokenCache.last_output`); it then costs what the dense model
costs, and a schedule of whole steps holds no per-block cache at all.
Classifier-free guidance runs as batch rows, each selecting its own positions. The scoring,
top-k, cache and in-place walk are the Wan core's (`astraea_jax.acceleration.astraea`,
`token_selection`, `token_cache`); `AstraeaConfig.inplace_input` has no effect here (block inputs
are always read in place from the cache).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from astraea_jax.acceleration.astraea import (
    BlockFn,
    ScheduledSteps,
    _layer_params,
    _num_layers,
    _read_before_write,
    _set_layer,
    compute_block,
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
    "K_MULTIPLE",
    "OpenSoraAstraeaStepModel",
    "jit_opensora_astraea_step",
    "num_positions",
    "opensora_astraea_forward",
    "position_rows",
    "position_scores",
]


# The loop adapter rounds a partial K up to an even count, at the cost of at most one more position:
# on an H200 at 480p x 102 frames each odd K (477, 795, 1,113, 1,431 of S = 1,590) ran 11-35 ms per
# step above the line through the even ones, and K = 796 / 1,114 ran 1.72x / 1.32x faster than the
# dense step where 795 / 1,113 ran 1.63x / 1.25x (benchmarks/NOTES-opensora-hunyuan.md).
K_MULTIPLE = 2


def num_positions(patch_size: tuple[int, int, int], latents_shape: tuple[int, ...]) -> int:
  """S, patch positions per frame of latents `[B, C_in, T, Y, X]` (Y, X padded to the patch, as
  `STDiT3.embed` does): the budget's unit, `K = round(theta * S)`."""
  if len(latents_shape) != 5:
    raise ValueError(f"latents must be [B, C_in, T, Y, X], got shape {tuple(latents_shape)}")
  return (-(-latents_shape[3] // patch_size[1])) * (-(-latents_shape[4] // patch_size[2]))


def position_scores(scores: jax.Array, frames: int) -> jax.Array:
  """Per-token scores `[B, N]` (N = t*S, frame-major) -> per-position scores `[B, S]`: the mean
  over the t frames."""
  b, n = scores.shape
  return jnp.mean(scores.reshape(b, frames, n // frames), axis=1)


def position_rows(positions: jax.Array, frames: int, per_frame: int) -> jax.Array:
  """Token rows of the selected positions in every frame: `[B, K]` -> `[B, t*K]` int32, row
  `f*K + j` = `f*S + positions[b, j]` (the order of the block's selected output)."""
  b, k = positions.shape
  offset = (jnp.arange(frames, dtype=jnp.int32) * per_frame)[None, :, None]  # [1, t, 1]
  return (positions.astype(jnp.int32)[:, None, :] + offset).reshape(b, frames * k)


def opensora_astraea_forward(model, x: jax.Array, timestep: jax.Array, y: jax.Array,
                             mask: jax.Array | None, fps: Any, height: Any, width: Any,
                             cache: TokenCache | None, *, num_selected: int,
                             config: AstraeaConfig = AstraeaConfig(),
                             x_mask: jax.Array | None = None, refresh_cache: bool = True,
                             block_fn: BlockFn = compute_block) -> tuple[jax.Array, TokenCache]:
  """One accelerated STDiT3 forward; call it under `jax.jit` with `num_selected` and
  `refresh_cache` static.

  Args:
    model: an `STDiT3`.
    x, timestep, y, mask, fps, height, width, x_mask: as `STDiT3.__call__` takes them (latents
      `[B, C_in, T, Y, X]`, timesteps `[B]`, captions `[B, 1, M, C_text]`, caption mask, frame rate,
      pixel size, frame mask).
    cache: the token cache from the previous step, or None at the first step.
    num_selected: K, patch positions computed per block and batch row (in every frame), in [0, S];
      S (`num_positions`) means dense.
    config: scoring and cache options.
    refresh_cache: at a dense step, False runs the plain blocks and returns a last-output cache
      (`TokenCache.last_output`: what K = 0 steps read, none of the per-block state), so the next
      step that computes tokens must be dense. Ignored at other steps.
    block_fn: how a block is evaluated; `compute_block` unless measuring overheads.

  Returns:
    `(out [B, C_out, T, Y, X] fp32, cache)`, the model output and the updated cache.
  """
  tokens, cond = model.embed(x, timestep, y, mask, x_mask, fps, height, width)  # [B, N, C]
  frames, rows, cols = cond.grid
  per_frame = rows * cols
  spatial, temporal = nnx.split(model.spatial_blocks), nnx.split(model.temporal_blocks)
  layers = _num_layers((spatial[1], temporal[1]))
  k = int(num_selected)
  batch, n, dim = tokens.shape
  if not 0 <= k <= per_frame:
    raise ValueError(f"num_selected={k} must lie in [0, S={per_frame}] (patch positions per frame)")
  if cache is None:
    if k != per_frame:
      raise ValueError(f"num_selected={k} < S={per_frame} needs a token cache: the first step of a "
                       "run must be dense")
  else:
    cache.check_compatible(2 * layers, batch, n, dim, config)
    cache.check_serves(k, per_frame)
    if cache.is_last_output and k == per_frame:
      cache = None  # a dense step that refills the whole cache

  if k == per_frame and not refresh_cache:
    out = model.run_blocks(tokens, cond)  # [B, N, C]
    cache = TokenCache.last_output(out)
  elif k == 0 and cache.is_last_output:
    out = cache.out[0]
  elif k == per_frame:
    out, cache = _dense_blocks(spatial, temporal, tokens, cond, cache, config, block_fn)
  elif k == 0:
    out, cache = cache.out[2 * layers - 1], cache.replace(skips=cache.skips + 1)
  else:
    out, cache = _sparse_blocks(spatial, temporal, tokens, cond, cache, k, config, block_fn)
  return model.head(out, cond), cache


def _walk_pairs(update, spatial, temporal, x, cache):
  """Runs `update(cache, slot, block_input, block) -> cache` over the blocks in run order: spatial
  block l in cache slot 2l, temporal block l in slot 2l + 1.

  Every block but the first reads its input in place from the previous slot's output, which after
  that block's scatter IS the reassembled sequence (see `astraea._walk_layers`).
  """
  (graph_s, params_s), (graph_t, params_t) = spatial, temporal
  layers = _num_layers((params_s, params_t))

  def pair(c, layer, x):
    c = update(c, 2 * layer, x, nnx.merge(graph_s, _layer_params(params_s, layer)))
    return update(c, 2 * layer + 1, c.out[2 * layer],
                  nnx.merge(graph_t, _layer_params(params_t, layer)))

  cache = pair(cache, 0, x)
  cache = jax.lax.fori_loop(1, layers, lambda l, c: pair(c, l, c.out[2 * l - 1]), cache)
  return cache.out[2 * layers - 1], cache


def _dense_blocks(spatial, temporal, x, cond, cache, config, block_fn):
  """Every token of every block; fills the cache (a fresh one at the first step)."""
  if cache is None:
    (graph_s, params_s), (graph_t, params_t) = spatial, temporal
    proj = (None if config.delta_mode == "exact" else
            sketch_matrix(x.shape[-1], config.sketch_dim, config.sketch_seed, x.dtype))
    summary = lambda v: summarize_inputs(v, proj)  # noqa: E731
    heads = lambda lse: reduce_heads(lse, config.head_reduction)  # noqa: E731

    def body(x, p):
      p_s, p_t = p
      y_s, lse_s = block_fn(nnx.merge(graph_s, p_s), x, cond, None)  # [B, N, C], [B, H, N]
      y_t, lse_t = block_fn(nnx.merge(graph_t, p_t), y_s, cond, None)
      return y_t, (jnp.stack([y_s, y_t]), jnp.stack([summary(x), summary(y_s)]),
                   jnp.stack([heads(lse_s), heads(lse_t)]))

    x, (out, ref, lse) = jax.lax.scan(body, x, (params_s, params_t))  # [L, 2, B, N, ...]
    flat = lambda a: a.reshape(-1, *a.shape[2:])  # noqa: E731  ([L, 2] -> run order [2L])
    out, ref, lse = flat(out), flat(ref), flat(lse)
    return x, TokenCache(out=out, in_ref=ref, lse=lse, skips=jnp.zeros(lse.shape, jnp.int32),
                         proj=proj)

  def update(c, slot, x, block):
    y, lse = block_fn(block, x, cond, None)
    y, ref = _read_before_write(y, summarize_inputs(x, c.proj))
    return c.replace(out=_set_layer(c.out, y, slot), in_ref=_set_layer(c.in_ref, ref, slot),
                     lse=_set_layer(c.lse, reduce_heads(lse, config.head_reduction), slot),
                     skips=_set_layer(c.skips, jnp.zeros(c.skips.shape[1:], jnp.int32), slot))

  return _walk_pairs(update, spatial, temporal, x, cache)


def _sparse_blocks(spatial, temporal, x, cond, cache, k, config, block_fn):
  """K positions (t*K tokens) per block and batch row; the cache is updated row-wise in place."""
  batch, _, dim = x.shape
  frames, rows, cols = cond.grid
  per_frame = rows * cols
  rows_b = jnp.arange(batch, dtype=jnp.int32)[:, None]  # [B, 1]
  relative = config.delta_norm == "relative"

  def update(c, slot, x, block):
    current = summarize_inputs(x, c.proj)  # [B, N, P or C]
    delta = input_change(current, c.in_ref[slot], relative=relative, eps=config.eps)  # [B, N]
    scores = token_scores(c.lse[slot], delta, c.skips[slot], config)  # [B, N]
    positions = select_top_k(position_scores(scores, frames), k, method=config.selection,
                             chunks=config.selection_chunks)  # [B, K]
    idx = position_rows(positions, frames, per_frame)  # [B, t*K]
    y_sel, lse_sel = block_fn(block, x, cond, positions)  # [B, t*K, C], [B, H, t*K]
    if y_sel.shape != (batch, frames * k, dim):
      raise ValueError(f"block returned {y_sel.shape} for {k} selected positions of {x.shape}")
    y_sel, ref_sel = _read_before_write(y_sel, gather_rows(current, idx))
    at = (slot, rows_b, idx)  # rows (slot, b, idx[b, s]) of the stacked arrays
    skips = (c.skips[slot] + 1).at[rows_b, idx].set(0, unique_indices=True)  # [B, N]
    return c.replace(
        out=c.out.at[at].set(y_sel.astype(c.out.dtype), unique_indices=True),
        in_ref=c.in_ref.at[at].set(ref_sel.astype(c.in_ref.dtype), unique_indices=True),
        lse=c.lse.at[at].set(reduce_heads(lse_sel, config.head_reduction), unique_indices=True),
        skips=_set_layer(c.skips, skips, slot))

  return _walk_pairs(update, spatial, temporal, x, cache)


# -- the denoising-loop adapter -------------------------------------------------------------------


def _step(graphdef, state, x, timestep, y, mask, fps, height, width, cache, *, num_selected,
          config, x_mask=None, refresh_cache=True):
  model = nnx.merge(graphdef, state)
  return opensora_astraea_forward(model, x, timestep, y, mask, fps, height, width, cache,
                                  num_selected=num_selected, config=config, x_mask=x_mask,
                                  refresh_cache=refresh_cache)


@functools.lru_cache(maxsize=32)
def jit_opensora_astraea_step(graphdef, *, config: AstraeaConfig = AstraeaConfig()):
  """`opensora_astraea_forward` jitted over a split model, the cache donated, K static.

  Returns `step(state, x, timestep, y, mask, fps, height, width, cache, *, num_selected,
  x_mask=None, refresh_cache=True) -> (out, cache)` where `graphdef, state = nnx.split(model)`.
  The donated cache is updated in place: do not reuse it. One jitted function per (graphdef,
  config).
  """
  return jax.jit(functools.partial(_step, graphdef, config=config),
                 static_argnames=("num_selected", "refresh_cache"), donate_argnames=("cache",))


class OpenSoraAstraeaStepModel(ScheduledSteps):
  """`step_model(latents, timestep, carry, step_index) -> (velocity, carry)` for
  `astraea_jax.sampling.loop.denoise` (with `rflow.RFlowScheduler`).

  Looks up theta for `step_index` in the schedule, runs the accelerated forward with
  `K = round(theta * S)` positions (step 0 dense), returns the first C_in output channels (the
  velocity; STDiT3's pred_sigma half is dropped) and threads the token cache through the loop.

  Args:
    model: the `STDiT3`.
    schedule: one theta per denoising step.
    y: `[B, 1, M, C_text]` captions batched like the latents the loop passes (with guidance, the
      captions then `model.null_caption`, in the loop's cond/uncond order).
    mask: `[B', M]` caption mask or None; fps, height, width: as `STDiT3.embed` takes them.
    config: scoring and cache options.
    timed: wait for every step's result and record `StepStat`s in `self.stats`.
    lookahead: let a dense step skip the cache writes that no later step reads (the schedule
      says which; `BudgetSchedule.block_cache_read_after`). Needs every step of the schedule
      called in order: a wrapper that may leave steps out (a step cache) must pass False.
  """

  def __init__(self, model, schedule: BudgetSchedule, y: jax.Array, *,
               mask: jax.Array | None = None, fps: Any = 24.0, height: Any, width: Any,
               config: AstraeaConfig = AstraeaConfig(), timed: bool = False,
               lookahead: bool = True):
    self._graphdef, self._state = nnx.split(model)
    self._patch_size = tuple(model.config.patch_size)
    # A layer is a (spatial, temporal) block pair, as the cache stores them.
    self._init_steps(schedule, num_layers=model.config.depth, timed=timed, lookahead=lookahead)
    self.y, self.mask = y, mask
    self.fps = jnp.asarray(fps, jnp.float32)
    self.height = jnp.asarray(height, jnp.float32)
    self.width = jnp.asarray(width, jnp.float32)
    self.config = config
    self._jitted = jit_opensora_astraea_step(self._graphdef, config=config)

  def num_tokens(self, latents_shape: tuple[int, ...]) -> int:
    return num_positions(self._patch_size, latents_shape)

  def num_selected(self, step_index: int, latents_shape: tuple[int, ...]) -> int:
    """K of step `step_index` for latents of this shape (rounded up to `K_MULTIPLE`)."""
    return self.schedule.num_selected(step_index, num_positions(self._patch_size, latents_shape),
                                      multiple=K_MULTIPLE)

  def __call__(self, latents: jax.Array, timestep: jax.Array, carry: TokenCache | None,
               step_index: int) -> tuple[jax.Array, TokenCache]:
    step_index = int(step_index)
    batch = latents.shape[0]
    if self.y.shape[0] != batch:
      raise ValueError(f"caption batch {self.y.shape[0]} does not match latents batch {batch}")
    timestep = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32), (batch,))
    out, carry = self._run_step(
        step_index, latents.shape, carry,
        lambda k, refresh: self._jitted(self._state, latents, timestep, self.y, self.mask,
                                        self.fps, self.height, self.width, carry, num_selected=k,
                                        refresh_cache=refresh))
    return out[:, :latents.shape[1]].astype(latents.dtype), carry
