"""The ASTRAEA-accelerated Wan forward (arXiv 2506.05096, Sec. 3) and its denoising-loop adapter.

One denoising step with budget k = round(theta_t * N) tokens per block:

  x, cond = embed(latents, t, context)                 # x [B, N, C]
  for each block l (a loop over the stacked block parameters and the stacked token cache):
    score every token from the cache (token_selection.token_scores)
    idx = top-k per batch row                           # [B, S]
    y_sel, lse = block(x, cond, select=idx)             # Q for the S rows, K/V for all N rows
    out_l[idx] = y_sel      # scatter into the cached output: now the next block's input [B, N, C]
    cache: input summary, LSE and skip counter refreshed for rows idx, skip counter + 1 elsewhere
  out = head(x, cond)

k = N runs every block dense (exactly the dense model) and refills the whole cache; k = 0 is a pure
cache step: every block returns its cached output, so the head reads the last block's cache. The
first step of a run must be dense (there is no cache before it). k is a static argument: each
distinct k compiles once. A dense step whose cache no partial step reads (`refresh_cache=False`:
the next step that computes tokens is dense too, or there is none) runs the plain blocks and keeps
only the last block's output, all that k = 0 steps read (`TokenCache.last_output`); it then costs
what the dense model costs, and a schedule of whole steps holds no per-block cache at all.

Classifier-free guidance runs as batch rows (cond and uncond halves of B), and each row selects its
own tokens: the halves attend to different keys anyway, and per-row selection keeps the work per row
equal to k.

The model is any module following the Wan contract of `astraea_jax.models.wan`: `embed`, `blocks`
(one block whose parameters are stacked along a leading L axis), `head`, and the block call
`block(x, cond, select=idx, return_lse=True)`.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from astraea_jax.acceleration.config import AstraeaConfig
from astraea_jax.acceleration.method_stats import StepRecord
from astraea_jax.acceleration.schedule import BudgetSchedule, first_computing_step_is_partial
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
    "AstraeaStepModel",
    "StepStat",
    "astraea_blocks",
    "astraea_forward",
    "check_step",
    "compute_block",
    "jit_astraea_step",
    "num_video_tokens",
    "selection_only_block",
]

# (block, x [B, N, C], cond, idx [B, S] or None) -> (y [B, S or N, C], lse [B, H, S or N] f32)
BlockFn = Callable[[Any, jax.Array, Any, jax.Array | None], tuple[jax.Array, jax.Array]]


def compute_block(block, x: jax.Array, cond, idx: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """The block itself: dense when `idx` is None, else the rows `idx` only; with the LSE."""
  if idx is None:
    return block(x, cond, return_lse=True)
  return block(x, cond, select=idx, return_lse=True)


def selection_only_block(block, x: jax.Array, cond, idx: jax.Array | None):
  """A stand-in for `compute_block` that does no block work: returns the input rows and zero LSE.

  Running `astraea_forward` with it measures what the selection machinery alone costs (scoring,
  top-k, gathers, scatters, cache updates); benchmarks only.
  """
  del block, cond
  rows = x if idx is None else gather_rows(x, idx)
  return rows, jnp.zeros((x.shape[0], 1, rows.shape[1]), jnp.float32)  # one "head" suffices


def num_video_tokens(patch_size: tuple[int, int, int], latents_shape: tuple[int, ...]) -> int:
  """N for latents `[B, C_in, T, Y, X]`: `(T / p_t) * (Y / p_y) * (X / p_x)`."""
  if len(latents_shape) != 5:
    raise ValueError(f"latents must be [B, C_in, T, Y, X], got shape {tuple(latents_shape)}")
  patch = tuple(patch_size)
  dims = latents_shape[2:]
  for d, p in zip(dims, patch):
    if d % p:
      raise ValueError(f"latent shape {tuple(dims)} is not divisible by patch_size={patch}")
  return int(np.prod([d // p for d, p in zip(dims, patch)]))


def astraea_forward(model, latents: jax.Array, timestep: jax.Array, context: jax.Array,
                    cache: TokenCache | None, *, num_selected: int,
                    config: AstraeaConfig = AstraeaConfig(), refresh_cache: bool = True,
                    block_fn: BlockFn = compute_block) -> tuple[jax.Array, TokenCache]:
  """One accelerated Wan forward; call it under `jax.jit` with `num_selected` and
  `refresh_cache` static.

  Args:
    model: a Wan transformer (see the module docstring).
    latents: `[B, C_in, T, Y, X]` noisy latents.
    timestep: `[B]` float timesteps.
    context: `[B, M, text_dim]` text embeddings.
    cache: the token cache from the previous step, or None at the first step.
    num_selected: k, tokens computed per block and batch row, in [0, N]; N means dense.
    config: scoring and cache options.
    refresh_cache: at a dense step, False runs the plain blocks and returns a last-output cache
      (`TokenCache.last_output`: what k = 0 steps read, none of the per-block state), so the next
      step that computes tokens must be dense. Ignored at other steps.
    block_fn: how a block is evaluated; `compute_block` unless measuring overheads.

  Returns:
    `(out [B, C_out, T, Y, X], cache)`, the model output and the updated cache.
  """
  x, cond = model.embed(latents, timestep, context)  # x [B, N, C]
  graphdef, params = nnx.split(model.blocks)
  k = int(num_selected)
  layers = _num_layers(params)
  check_step(x.shape, layers, k, cache, config)
  if k == x.shape[1] and not refresh_cache:
    x = model.run_blocks(x, cond)  # [B, N, C]
    return model.head(x, cond), TokenCache.last_output(x)
  if cache is not None and cache.is_last_output:
    if k == 0:
      return model.head(cache.out[0], cond), cache
    cache = None  # a dense step that refills the whole cache
  x, cache = astraea_blocks(graphdef, params, x, cond, cache, num_selected=k, config=config,
                            block_fn=block_fn)
  return model.head(x, cond), cache


def check_step(x_shape: tuple[int, int, int], num_layers: int, num_selected: int,
               cache: TokenCache | None, config: AstraeaConfig) -> None:
  """ValueError unless k lies in [0, N], a sparse step has a cache and the cache fits x."""
  batch, tokens, dim = x_shape
  k = num_selected
  if not 0 <= k <= tokens:
    raise ValueError(f"num_selected={k} must lie in [0, N={tokens}]")
  if cache is None:
    if k != tokens:
      raise ValueError(f"num_selected={k} < N={tokens} needs a token cache: the first step of a "
                       "run must be dense")
  else:
    cache.check_compatible(num_layers, batch, tokens, dim, config)
    cache.check_serves(k, tokens)


def astraea_blocks(graphdef, params, x: jax.Array, cond, cache: TokenCache | None, *,
                   num_selected: int, config: AstraeaConfig = AstraeaConfig(),
                   block_fn: BlockFn = compute_block) -> tuple[jax.Array, TokenCache]:
  """The L blocks of one accelerated step: tokens `x [B, N, C]` -> last block's output and cache.

  `graphdef, params = nnx.split(model.blocks)`; arguments as checked by `check_step`. The
  sequence-parallel forward (`astraea_jax.parallel.sharded`) runs this on every device with its
  N/P tokens, its slice of the cache and k/P, which makes the top-k per shard.
  """
  layers = _num_layers(params)
  k = num_selected
  if k == x.shape[1]:
    return _dense_blocks(graphdef, params, x, cond, cache, config, block_fn)
  if k == 0:
    return cache.out[layers - 1], cache.replace(skips=cache.skips + 1)
  return _sparse_blocks(graphdef, params, x, cond, cache, k, config, block_fn)


def _dense_blocks(graphdef, params, x, cond, cache, config, block_fn):
  """Every token of every block; fills the cache (a fresh one at the first step)."""
  if cache is None:
    proj = (None if config.delta_mode == "exact" else
            sketch_matrix(x.shape[-1], config.sketch_dim, config.sketch_seed, x.dtype))

    def body(x, p):
      y, lse = block_fn(nnx.merge(graphdef, p), x, cond, None)  # [B, N, C], [B, H, N]
      return y, (y, summarize_inputs(x, proj), reduce_heads(lse, config.head_reduction))

    x, (out, ref, lse) = jax.lax.scan(body, x, params)
    return x, TokenCache(out=out, in_ref=ref, lse=lse, skips=jnp.zeros(lse.shape, jnp.int32),
                         proj=proj)

  def update(c, layer, x, p):
    y, lse = block_fn(nnx.merge(graphdef, p), x, cond, None)
    y, ref = _read_before_write(y, summarize_inputs(x, c.proj))
    return c.replace(out=_set_layer(c.out, y, layer), in_ref=_set_layer(c.in_ref, ref, layer),
                     lse=_set_layer(c.lse, reduce_heads(lse, config.head_reduction), layer),
                     skips=_set_layer(c.skips, jnp.zeros(c.skips.shape[1:], jnp.int32), layer))

  return _walk_layers(update, params, x, cache, config.inplace_input)


def _sparse_blocks(graphdef, params, x, cond, cache, k, config, block_fn):
  """k tokens per block and batch row; the cache is updated row-wise in place."""
  batch = x.shape[0]
  rows_b = jnp.arange(batch, dtype=jnp.int32)[:, None]  # [B, 1]
  relative = config.delta_norm == "relative"

  def update(c, layer, x, p):
    current = summarize_inputs(x, c.proj)  # [B, N, P or C]
    delta = input_change(current, c.in_ref[layer], relative=relative, eps=config.eps)  # [B, N]
    scores = token_scores(c.lse[layer], delta, c.skips[layer], config)  # [B, N]
    idx = select_top_k(scores, k, method=config.selection,
                       chunks=config.selection_chunks)  # [B, S]
    y_sel, lse_sel = block_fn(nnx.merge(graphdef, p), x, cond, idx)  # [B, S, C], [B, H, S]
    if y_sel.shape != (batch, k, x.shape[-1]):
      raise ValueError(f"block returned {y_sel.shape} for {k} selected rows of {x.shape}")
    y_sel, ref_sel = _read_before_write(y_sel, gather_rows(current, idx))
    # Rows (layer, b, idx[b, s]) of the stacked arrays.
    at = (layer, rows_b, idx)
    skips_l = (c.skips[layer] + 1).at[rows_b, idx].set(0, unique_indices=True)  # [B, N]
    return c.replace(
        out=c.out.at[at].set(y_sel.astype(c.out.dtype), unique_indices=True),
        in_ref=c.in_ref.at[at].set(ref_sel.astype(c.in_ref.dtype), unique_indices=True),
        lse=c.lse.at[at].set(reduce_heads(lse_sel, config.head_reduction), unique_indices=True),
        skips=_set_layer(c.skips, skips_l, layer))

  return _walk_layers(update, params, x, cache, config.inplace_input)


def _walk_layers(update, params, x, cache, inplace_input=True):
  """Runs `update(cache, layer, block_input, layer_params) -> cache` over the L blocks.

  Block l > 0 reads its input straight from the cache, `out[l - 1]`: after block l - 1 has written
  its computed rows there, that slice IS the reassembled sequence (new rows computed, the others
  cached). Reading it in place, rather than carrying a [B, N, C] copy from block to block
  (`inplace_input=False`), saves a full read and write of the activations per block. Block 0 reads
  the embedding, so it runs once outside the loop.
  """
  layers = _num_layers(params)
  cache = update(cache, 0, x, _layer_params(params, 0))
  if inplace_input:
    def body(layer, c):
      return update(c, layer, c.out[layer - 1], _layer_params(params, layer))

    cache = jax.lax.fori_loop(1, layers, body, cache)
    return cache.out[layers - 1], cache

  def carried(layer, carry):
    x, c = carry
    c = update(c, layer, x, _layer_params(params, layer))
    return c.out[layer], c

  return jax.lax.fori_loop(1, layers, carried, (cache.out[0], cache))


def _read_before_write(y, *reads):
  """Orders `reads` (values computed from the block input) before any use of the block output `y`.

  Block l reads its input from the cache's `out[l - 1]` in place and then writes `out[l]` of the
  same buffer. XLA updates a buffer in place only when every read of it is ordered before the write;
  values that do not feed `y` (the input summary stored for delta) are not, and XLA would then copy
  the whole stacked cache in every block. Tying them to `y` here gives that order.
  """
  return jax.lax.optimization_barrier((y, *reads))


def _layer_params(params, layer):
  return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, layer, keepdims=False), params)


def _set_layer(stacked, value, layer):
  return jax.lax.dynamic_update_index_in_dim(stacked, value.astype(stacked.dtype), layer, axis=0)


def _num_layers(params) -> int:
  leaves = jax.tree.leaves(params)
  if not leaves:
    raise ValueError("model.blocks has no parameters")
  sizes = {leaf.shape[0] if leaf.ndim else None for leaf in leaves}
  if len(sizes) != 1 or None in sizes:
    raise ValueError(f"model.blocks must stack every parameter along a leading layer axis L; found "
                     f"leading sizes {sorted(map(str, sizes))}")
  return sizes.pop()


# -- the denoising-loop adapter -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StepStat:
  """One step of a timed run: k, and wall seconds (including compilation when `first_call`)."""

  step: int
  theta: float
  num_selected: int
  seconds: float
  first_call: bool


class StepTimer:
  """The timing every accelerated step model shares: with `timed`, waits for each step's result
  and appends a `StepStat`; `first_call` marks the first call of each compiled variant (k, has
  a cache, and any `variant` the caller adds), which includes its compilation."""

  def __init__(self, timed: bool):
    self.timed = timed
    self.stats: list[StepStat] = []
    self._seen: set[tuple] = set()

  def run(self, step_index: int, theta: float, k: int, has_cache: bool, call, *,
          variant: tuple = ()):
    """Returns `call()`, timed as step `step_index` when `self.timed`."""
    variant = (k, has_cache, *variant)
    start = time.perf_counter()
    out = call()
    if self.timed:
      jax.block_until_ready(out)
      self.stats.append(StepStat(step_index, theta, k, time.perf_counter() - start,
                                 variant not in self._seen))
    self._seen.add(variant)
    return out


class ScheduledSteps:
  """What the ASTRAEA step models (Wan, sharded Wan, OpenSora, HunyuanVideo) share: the schedule's
  k at each step, the light dense step, timing and one `StepRecord` per step.

  A subclass calls `_init_steps` and implements `num_tokens` (the N that k counts: video tokens,
  or OpenSora's patch positions); it may override `num_selected` to round k. Its `__call__` hands
  `_run_step` a function `run(k, refresh_cache) -> (out, cache)`.
  """

  schedule: BudgetSchedule
  lookahead: bool
  num_layers: int

  def _init_steps(self, schedule: BudgetSchedule, *, num_layers: int, timed: bool,
                  lookahead: bool) -> None:
    self.schedule = schedule
    self.lookahead = lookahead
    self.num_layers = num_layers
    self.timer = StepTimer(timed)
    self.stats = self.timer.stats
    self.records: list[StepRecord] = []

  def num_tokens(self, latents_shape: tuple[int, ...]) -> int:
    raise NotImplementedError

  def num_selected(self, step_index: int, latents_shape: tuple[int, ...]) -> int:
    """k of step `step_index` for latents of this shape."""
    return self.schedule.num_selected(step_index, self.num_tokens(latents_shape))

  def block_cache_read_after(self, step_index: int, latents_shape: tuple[int, ...]) -> bool:
    """`BudgetSchedule.block_cache_read_after` with this model's k (`num_selected`, which a
    subclass may round): whether the first later step that computes tokens is partial."""
    return first_computing_step_is_partial(
        (self.num_selected(later, latents_shape)
         for later in range(step_index + 1, len(self.schedule))),
        self.num_tokens(latents_shape))

  def _run_step(self, step_index: int, latents_shape: tuple[int, ...],
                carry: TokenCache | None, run) -> tuple[jax.Array, TokenCache]:
    """`run(k, refresh_cache)` for this step, timed and recorded. A dense step whose block cache
    no later step reads runs light (`refresh_cache=False`): it keeps only the last block's
    output."""
    k = self.num_selected(step_index, latents_shape)
    n = self.num_tokens(latents_shape)
    light = (self.lookahead and k == n
             and not self.block_cache_read_after(step_index, latents_shape))
    out, carry = self.timer.run(
        step_index, self.schedule.theta(step_index), k, carry is not None,
        lambda: run(k, not light),
        variant=(light, carry is not None and carry.is_last_output))
    self.records.append(StepRecord.full(step_index, self.num_layers, f"k={k}", k / n) if k else
                        StepRecord.reused(step_index, "k=0"))
    return out, carry


def _step(graphdef, state, latents, timestep, context, cache, *, num_selected, config, block_fn,
          refresh_cache=True):
  model = nnx.merge(graphdef, state)
  return astraea_forward(model, latents, timestep, context, cache, num_selected=num_selected,
                         config=config, refresh_cache=refresh_cache, block_fn=block_fn)


@functools.lru_cache(maxsize=32)
def jit_astraea_step(graphdef, *, config: AstraeaConfig = AstraeaConfig(),
                     block_fn: BlockFn = compute_block):
  """`astraea_forward` jitted over a split model, the cache donated, `num_selected` static.

  Returns `step(state, latents, timestep, context, cache, *, num_selected, refresh_cache=True) ->
  (out, cache)` where `graphdef, state = nnx.split(model)`. The donated cache is updated in place:
  do not reuse it.
  One jitted function per (graphdef, config, block_fn), so that later runs of the same model (a
  batch of requests, `--compare-dense`, a search) reuse its compiled programs.
  """
  return jax.jit(functools.partial(_step, graphdef, config=config, block_fn=block_fn),
                 static_argnames=("num_selected", "refresh_cache"), donate_argnames=("cache",))


class AstraeaStepModel(ScheduledSteps):
  """`step_model(latents, timestep, carry, step_index) -> (model_output, carry)` for `denoise`.

  Looks up theta for `step_index` in the schedule, runs the accelerated forward with
  `k = round(theta * N)` (step 0 dense), and threads the token cache through the loop as the carry.
  The forward is jitted once per distinct k, with the cache donated so that it is updated in place.

  theta = 0 (k = 0) is a whole-step cache hit, as in step caching (TeaCache, EasyCache): no block
  runs; the head reads the last block's cached output under the current step's modulation (the
  patch embedding is dead code there and XLA drops it). Every step appends a `StepRecord` to
  `self.records` (0 blocks at k = 0), timed or not.

  Args:
    model: the Wan transformer.
    schedule: one theta per denoising step.
    context: `[B, M, text_dim]` text embeddings, batched like the latents that the loop passes
      (with classifier-free guidance, cond and uncond rows in the loop's order).
    config: scoring and cache options.
    timed: wait for every step's result and record `StepStat`s in `self.stats`.
    lookahead: let a dense step skip the cache writes that no later step reads (the schedule
      says which; `BudgetSchedule.block_cache_read_after`). Needs every step of the schedule
      called in order: a wrapper that may leave steps out (a step cache) must pass False.
  """

  def __init__(self, model, schedule: BudgetSchedule, context: jax.Array, *,
               config: AstraeaConfig = AstraeaConfig(), timed: bool = False,
               lookahead: bool = True):
    self._graphdef, self._state = nnx.split(model)
    self._patch_size = tuple(model.config.patch_size)
    self._init_steps(schedule, num_layers=model.config.num_layers, timed=timed,
                     lookahead=lookahead)
    self.context = context
    self.config = config
    self._jitted = jit_astraea_step(self._graphdef, config=config)

  def num_tokens(self, latents_shape: tuple[int, ...]) -> int:
    return num_video_tokens(self._patch_size, latents_shape)

  def __call__(self, latents: jax.Array, timestep: jax.Array, carry: TokenCache | None,
               step_index: int) -> tuple[jax.Array, TokenCache]:
    step_index = int(step_index)
    batch = latents.shape[0]
    if self.context.shape[0] != batch:
      raise ValueError(f"context batch {self.context.shape[0]} does not match latents batch "
                       f"{batch}")
    timestep = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32), (batch,))
    return self._run_step(
        step_index, latents.shape, carry,
        lambda k, refresh: self._jitted(self._state, latents, timestep, self.context, carry,
                                        num_selected=k, refresh_cache=refresh))

