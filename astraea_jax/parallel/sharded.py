"""Dense and ASTRAEA (arXiv 2506.05096) Wan forwards over a device mesh, and their step models.

Layout on the mesh of `astraea_jax.parallel.mesh` (axes "data", "cfg", "seq"; P = size of "seq"):

  latents [B, C_in, T, Y, X]   B split over ("cfg", "data")
  x       [B, N, C]            B as above, N in P contiguous shards of N/P tokens (frame-major)
  RoPE    [N, D/2]             each device keeps the rows of its own tokens
  context [B, M, C]            every text token of the device's rows
  blocks                       parameters replicated
  cache   [L, B, N, ...]       sharded like x

The patch embedding, the conditioning and the head run on the whole sequence outside `shard_map`,
partitioned by the compiler (they are a few percent of the work). Inside `shard_map` every device
runs the unchanged block code on its own tokens; only the self-attention is replaced, by
`sequence.sequence_parallel_attention` (Ulysses all-to-all, arXiv 2309.14509, or the gather-K/V
fallback), passed to the block as its `attention_fn`. Cross-attention needs no communication.

ASTRAEA's token selection is per shard: each device scores its N/P tokens and computes the top k/P
of them, so every device does the same work and no index crosses devices. k must then be a
multiple of P; the step model rounds the schedule's k to the nearest one (`round_num_selected`).
The selected set differs from a global top-k; `AstraeaConfig(selection_chunks=P)` makes the
single-device forward select the same sets, for comparison.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from astraea_jax.acceleration.astraea import (
    AstraeaStepModel,
    astraea_blocks,
    check_step,
    num_video_tokens,
)
from astraea_jax.acceleration.config import AstraeaConfig
from astraea_jax.acceleration.schedule import BudgetSchedule
from astraea_jax.acceleration.token_cache import TokenCache
from astraea_jax.models.wan import WanConditioning
from astraea_jax.parallel.mesh import (
    MeshConfig,
    batch_shards,
    fitting_num_devices,
    make_mesh,
    seq_size,
    sharding,
    spec,
)
from astraea_jax.parallel.sequence import choose_strategy, sequence_parallel_attention

__all__ = [
    "ShardedAstraeaStepModel",
    "ShardedDenseStepModel",
    "default_num_devices",
    "jit_sharded_astraea_step",
    "jit_sharded_dense",
    "mesh_for_request",
    "place_inputs",
    "replicate",
    "round_num_selected",
    "sharded_astraea_forward",
    "sharded_dense_forward",
]

TOKENS = ("batch", "tokens", "channels")  # x [B, N, C]
LATENTS = ("batch", "latent", "latent", "latent", "latent")  # [B, C_in, T, Y, X]
CONTEXT = ("batch", "text", "channels")  # [B, M, text_dim]


def round_num_selected(k: int, num_tokens: int, seq_shards: int) -> int:
  """k rounded to the nearest multiple of P, so that every shard computes k/P of its N/P tokens.

  0 and N are kept (the pure cache step and the dense step); any other k becomes at least P, so a
  sparse step stays sparse and never turns into a cache-only step.
  """
  if num_tokens % seq_shards:
    raise ValueError(f"{num_tokens=} must be a multiple of the seq axis size {seq_shards=}")
  if seq_shards == 1 or k in (0, num_tokens):
    return k
  return min(num_tokens, max(seq_shards, seq_shards * round(k / seq_shards)))


def _check_fits(mesh: jax.sharding.Mesh, x_shape: tuple[int, ...]) -> None:
  batch, tokens = x_shape[:2]
  if tokens % seq_size(mesh):
    raise ValueError(f"N={tokens} tokens do not split into seq={seq_size(mesh)} equal shards")
  if batch % batch_shards(mesh):
    raise ValueError(f"B={batch} rows do not split over cfg x data = {batch_shards(mesh)}")


def _cond_specs(cond: WanConditioning) -> WanConditioning:
  return WanConditioning(timestep_proj=spec("batch", "modulation", "channels"),
                         temb=spec("batch", "channels"), context=spec(*CONTEXT),
                         rope_cos=spec("tokens", "head_dim"), rope_sin=spec("tokens", "head_dim"),
                         grid=cond.grid)


def _cache_specs(config: AstraeaConfig) -> TokenCache:
  rows = spec("layers", "batch", "tokens")  # [L, B, N]
  return TokenCache(out=spec("layers", "batch", "tokens", "channels"),
                    in_ref=spec("layers", "batch", "tokens", "channels"), lse=rows, skips=rows,
                    proj=None if config.delta_mode == "exact" else spec())


def _attention_fn(model, mesh, strategy):
  strategy = choose_strategy(model.config.num_attention_heads, seq_size(mesh), strategy)
  return functools.partial(sequence_parallel_attention, axis_name="seq", strategy=strategy,
                           implementation=model.config.attention_impl)


def _sequence_parallel_block(block, x, cond, idx, *, attention_fn):
  # The `astraea.compute_block` contract, with the self-attention across shards.
  return block(x, cond, select=idx, return_lse=True, attention_fn=attention_fn)


def sharded_dense_forward(model, latents: jax.Array, timestep: jax.Array, context: jax.Array, *,
                          mesh: jax.sharding.Mesh, strategy: str | None = None) -> jax.Array:
  """The dense Wan forward, `model(latents, timestep, context)`, with tokens sharded on `mesh`.

  Call under `jax.jit`. Shapes as for `WanTransformer3DModel.__call__`; `strategy` as for
  `sequence_parallel_attention`. Returns `[B, C_out, T, Y, X]` fp32.
  """
  x, cond = model.embed(latents, timestep, context)  # x [B, N, C]
  _check_fits(mesh, x.shape)
  return model.head(_dense_blocks(model, x, cond, mesh, strategy), cond)


def _dense_blocks(model, x: jax.Array, cond: WanConditioning, mesh: jax.sharding.Mesh,
                  strategy: str | None) -> jax.Array:
  """Every block, dense and without a cache, on tokens `x [B, N, C]` sharded along N."""
  graphdef, params = nnx.split(model.blocks)
  attention_fn = _attention_fn(model, mesh, strategy)

  def body(x, cond, params):  # x [B / (cfg data), N/P, C] on each device
    def layer(x, p):
      return nnx.merge(graphdef, p)(x, cond, attention_fn=attention_fn), None

    return jax.lax.scan(layer, x, params)[0]

  return jax.shard_map(body, mesh=mesh, in_specs=(spec(*TOKENS), _cond_specs(cond), spec()),
                       out_specs=spec(*TOKENS), check_vma=False)(x, cond, params)


def sharded_astraea_forward(model, latents: jax.Array, timestep: jax.Array, context: jax.Array,
                            cache: TokenCache | None, *, num_selected: int,
                            mesh: jax.sharding.Mesh, config: AstraeaConfig = AstraeaConfig(),
                            strategy: str | None = None, refresh_cache: bool = True
                            ) -> tuple[jax.Array, TokenCache]:
  """`astraea.astraea_forward` with tokens and token cache sharded on `mesh`; call under jit.

  `num_selected` (k, per batch row) must be a multiple of P: each device computes the top k/P of
  its own N/P tokens. `config.selection_chunks` must be 1 or P (both mean per shard here). The
  returned cache is sharded like the tokens (`[L, B, N, ...]`, N along "seq"). `refresh_cache`
  as for `astraea_forward`: False at a dense step runs the plain sharded blocks and returns a
  last-output cache.
  """
  x, cond = model.embed(latents, timestep, context)  # x [B, N, C]
  _check_fits(mesh, x.shape)
  graphdef, params = nnx.split(model.blocks)
  p = seq_size(mesh)
  k = int(num_selected)
  layers = jax.tree.leaves(params)[0].shape[0]
  check_step(x.shape, layers, k, cache, config)
  if k == x.shape[1] and not refresh_cache:
    x = _dense_blocks(model, x, cond, mesh, strategy)  # [B, N, C]
    cache = TokenCache.last_output(x)
    out = jax.lax.with_sharding_constraint(cache.out, sharding(mesh, "layers", *TOKENS))
    return model.head(x, cond), cache.replace(out=out)
  if cache is not None and cache.is_last_output:
    if k == 0:
      return model.head(cache.out[0], cond), cache
    cache = None  # a dense step that refills the whole cache
  if k % p:
    raise ValueError(f"num_selected={k} must be a multiple of the seq axis size {p} (top-k per "
                     "shard); see round_num_selected")
  if config.selection_chunks not in (1, p):
    raise ValueError(f"{config.selection_chunks=} must be 1 or the seq axis size {p}")
  local = dataclasses.replace(config, selection_chunks=1)  # each shard is one chunk
  block_fn = functools.partial(_sequence_parallel_block,
                               attention_fn=_attention_fn(model, mesh, strategy))

  def body(x, cond, params, cache):
    return astraea_blocks(graphdef, params, x, cond, cache, num_selected=k // p, config=local,
                          block_fn=block_fn)

  tokens, cache_specs = spec(*TOKENS), _cache_specs(config)
  in_specs = (tokens, _cond_specs(cond), spec())
  if cache is None:  # the first step: the shards build their slices of a fresh cache
    fn, args = (lambda x, cond, params: body(x, cond, params, None)), (x, cond, params)
  else:
    fn, args, in_specs = body, (x, cond, params, cache), (*in_specs, cache_specs)
  x, cache = jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=(tokens, cache_specs),
                           check_vma=False)(*args)
  return model.head(x, cond), cache


# -- jitted steps and the denoising-loop adapters --------------------------------------------------


def _dense_step(graphdef, state, latents, timestep, context, *, mesh, strategy):
  out = sharded_dense_forward(nnx.merge(graphdef, state), latents, timestep, context, mesh=mesh,
                              strategy=strategy)
  # Replicated: the guidance combine and the solver step then need no further communication.
  return jax.lax.with_sharding_constraint(out, sharding(mesh))


def _astraea_step(graphdef, state, latents, timestep, context, cache, *, num_selected, mesh,
                  config, strategy, refresh_cache=True):
  out, cache = sharded_astraea_forward(nnx.merge(graphdef, state), latents, timestep, context,
                                       cache, num_selected=num_selected, mesh=mesh, config=config,
                                       strategy=strategy, refresh_cache=refresh_cache)
  return jax.lax.with_sharding_constraint(out, sharding(mesh)), cache


@functools.lru_cache(maxsize=32)
def jit_sharded_dense(graphdef, mesh: jax.sharding.Mesh, strategy: str | None = None):
  """`sharded_dense_forward` jitted over a split model: `fn(state, latents, timestep, context)`.

  Place the inputs first (`place_inputs`, `replicate`); the output is replicated on the mesh.
  """
  return jax.jit(functools.partial(_dense_step, graphdef, mesh=mesh, strategy=strategy))


@functools.lru_cache(maxsize=32)
def jit_sharded_astraea_step(graphdef, mesh: jax.sharding.Mesh, *,
                             config: AstraeaConfig = AstraeaConfig(), strategy: str | None = None):
  """`sharded_astraea_forward` jitted like `astraea.jit_astraea_step` (cache donated, k static).

  Returns `step(state, latents, timestep, context, cache, *, num_selected, refresh_cache=True)
  -> (out, cache)`.
  """
  return jax.jit(functools.partial(_astraea_step, graphdef, mesh=mesh, config=config,
                                   strategy=strategy),
                 static_argnames=("num_selected", "refresh_cache"), donate_argnames=("cache",))


def replicate(tree, mesh: jax.sharding.Mesh):
  """Every array of `tree` copied to every device of `mesh`."""
  return jax.device_put(tree, sharding(mesh))


def place_inputs(mesh: jax.sharding.Mesh, latents: jax.Array | None = None,
                 timestep: jax.Array | None = None, context: jax.Array | None = None):
  """latents `[B, C_in, T, Y, X]` and context `[B, M, text_dim]` split along B, timestep `[B]`
  replicated (it is tiny); None stays None."""
  put = lambda a, s: None if a is None else jax.device_put(a, s)  # noqa: E731
  return (put(latents, sharding(mesh, *LATENTS)), put(timestep, sharding(mesh)),
          put(context, sharding(mesh, *CONTEXT)))


class ShardedDenseStepModel:
  """The dense transformer as a `denoise` step model, tokens sharded on `mesh`.

  The sharded counterpart of `pipeline.DenseStepModel`: parameters replicated, context split
  along B; the output is replicated.
  """

  def __init__(self, model, context: jax.Array, mesh: jax.sharding.Mesh, *,
               strategy: str | None = None):
    graphdef, state = nnx.split(model)
    self.mesh = mesh
    self._state = replicate(state, mesh)
    self.context = place_inputs(mesh, context=context)[2]
    self._jitted = jit_sharded_dense(graphdef, mesh, strategy)

  def __call__(self, latents, timestep, carry, step_index):
    del step_index
    latents, timestep, _ = place_inputs(self.mesh, latents, jnp.asarray(timestep, jnp.float32))
    return self._jitted(self._state, latents, timestep, self.context), carry


class ShardedAstraeaStepModel(AstraeaStepModel):
  """`AstraeaStepModel` with tokens and token cache sharded on `mesh` (top-k per shard).

  The schedule's k of each step is rounded to a multiple of P (`round_num_selected`), which is
  what `num_selected` reports and what the timed stats record.
  """

  def __init__(self, model, schedule: BudgetSchedule, context: jax.Array,
               mesh: jax.sharding.Mesh, *, config: AstraeaConfig = AstraeaConfig(),
               timed: bool = False, strategy: str | None = None, lookahead: bool = True):
    super().__init__(model, schedule, context, config=config, timed=timed, lookahead=lookahead)
    self.mesh = mesh
    self._state = replicate(self._state, mesh)
    self.context = place_inputs(mesh, context=context)[2]
    self._jitted = jit_sharded_astraea_step(self._graphdef, mesh, config=config,
                                            strategy=strategy)

  def num_selected(self, step_index: int, latents_shape: tuple[int, ...]) -> int:
    n = num_video_tokens(self._patch_size, latents_shape)
    return round_num_selected(self.schedule.num_selected(step_index, n), n, seq_size(self.mesh))

  def __call__(self, latents, timestep, carry, step_index):
    latents, timestep, _ = place_inputs(self.mesh, latents, jnp.asarray(timestep, jnp.float32))
    return super().__call__(latents, timestep, carry, step_index)


def default_num_devices() -> int:
  """Every visible accelerator; 1 on CPU, where several devices share one processor (the forced
  host devices of the tests are for checking shardings, not for speed)."""
  return 1 if jax.default_backend() == "cpu" else len(jax.devices())


def mesh_for_request(num_devices: int | None, *, num_tokens: int, batch: int,
                     guidance: bool) -> jax.sharding.Mesh | None:
  """The mesh for a request of `batch` rows of N tokens, or None for the single-device path.

  `num_devices` None: the most of the visible devices whose mesh splits N and B evenly; else
  exactly that many (ValueError if they do not split them). 1: None.
  """
  visible = len(jax.devices())
  config = MeshConfig(guidance=guidance)
  if num_devices is None:
    num_devices = fitting_num_devices(visible, num_tokens, batch, config)
  elif not 1 <= num_devices <= visible:
    raise ValueError(f"{num_devices=} must lie in [1, {visible}] (the visible devices)")
  if num_devices == 1:
    return None
  mesh = make_mesh(dataclasses.replace(config, num_devices=num_devices))
  if num_tokens % seq_size(mesh) or batch % batch_shards(mesh):
    raise ValueError(f"{num_devices} devices (mesh {dict(mesh.shape)}) do not split N={num_tokens} "
                     f"tokens and B={batch} rows evenly; try --devices "
                     f"{fitting_num_devices(num_devices, num_tokens, batch, config)}")
  return mesh
