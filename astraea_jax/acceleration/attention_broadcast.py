"""Pyramid Attention Broadcast (PAB) for the Wan transformer.

PAB (Zhao et al. 2024, "Real-Time Video Generation with Pyramid Attention Broadcast", arXiv
2408.12588) observes that attention outputs change little between adjacent steps in the middle of
sampling, and more slowly the "higher" the attention: cross-attention (to the fixed text) least,
then temporal, then spatial self-attention. Inside a timestep window it computes each attention only
every `range` steps and broadcasts (reuses) its output in between, with a longer range for
cross-attention. Outside the window everything runs.

Wan2.1 has one self-attention (spatio-temporal, full 3D) and one cross-attention per block, so here:
every block keeps its last self-attention output (after `to_out`, before the gate) and its last
cross-attention output, `[L, B', N, C]` each; at a step inside `[t_start, t_end]` (the scheduler's
timesteps, 1000 = pure noise) the self-attention of every block runs only if `self_range` steps
have passed since it last ran, the cross-attention likewise with `cross_range`. The FFN, norms,
modulations and gates always run. The decision is per step, on the host, and the forward is
compiled once per (self computed, cross computed) pair. Ranges of 1 give the dense model.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from astraea_jax.acceleration.astraea import _layer_params, _num_layers, _set_layer
from astraea_jax.acceleration.method_stats import StepRecord
from astraea_jax.models import attention as attention_lib
from astraea_jax.models.wan import gated_residual, layer_norm

__all__ = ["PABConfig", "PABStepModel", "pab_forward", "pab_step_program"]

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class PABConfig:
  """PAB's knobs. Defaults: PAB's self range 2 and cross range 6, diffusers' window (100, 800).

  Attributes:
    self_range: inside the window, self-attention runs every `self_range` steps (1: every step).
    cross_range: the same for cross-attention (PAB uses a longer range than for self-attention).
    t_start, t_end: the window of timesteps (inclusive) in which outputs are reused.
  """

  self_range: int = 2
  cross_range: int = 6
  t_start: float = 100.0
  t_end: float = 800.0

  def __post_init__(self):
    for name in ("self_range", "cross_range"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")
    for name in ("t_start", "t_end"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be a finite number")
    if not self.t_start <= self.t_end:
      raise ValueError(f"{self.t_start=} must not exceed {self.t_end=}")

  def in_window(self, timestep: float) -> bool:
    return self.t_start <= timestep <= self.t_end


def _block(block, x, cond, attn_cached, cross_cached, *, compute_self, compute_cross):
  """One Wan block (`WanTransformerBlock.__call__`, dense) with either attention reusable.

  Returns `(out, attn, cross)`, each `[B, N, C]`: the block output and the self- and
  cross-attention outputs it used (computed now or the cached ones).
  """
  dt = x.dtype
  mod = block.scale_shift_table[...] + cond.timestep_proj  # [B, 6, C] f32
  shift, scale, gate, c_shift, c_scale, c_gate = (mod[:, i:i + 1] for i in range(6))
  if compute_self:
    h = (layer_norm(x, block.eps) * (1 + scale) + shift).astype(dt)  # [B, N, C]
    q, k, v = block.attn1.project_qkv(h, (cond.rope_cos, cond.rope_sin))  # [B, N, H, D]
    o = attention_lib.attention(q, k, v, implementation=block.attn_impl)
    attn = block.attn1.output(o.astype(dt))  # [B, N, C]
  else:
    attn = attn_cached
  x = (x.astype(F32) + attn.astype(F32) * gate).astype(dt)
  if compute_cross:
    h = block.norm2(x.astype(F32)).astype(dt) if block.norm2 is not None else x
    cross = block.attn2(h, cond.context).astype(dt)
  else:
    cross = cross_cached
  x = x + cross
  h = (layer_norm(x, block.eps) * (1 + c_scale) + c_shift).astype(dt)
  # The self-attention residual stays unfused: its output is what the cache keeps.
  out = gated_residual(x, block.ffn.hidden(h), block.ffn.proj_out, c_gate)
  return out, attn, cross


def pab_forward(model, latents, timestep, context, cache, *, compute_self: bool,
                compute_cross: bool):
  """One Wan forward with attention broadcast; call under `jax.jit`, the two flags static.

  Args:
    model: a Wan transformer.
    latents: `[B, C_in, T, Y, X]`; timestep `[B]`; context `[B, M, text_dim]`.
    cache: `(attn [L, B, N, C], cross [L, B, N, C])` from earlier steps, or None (both flags must
      then be True).
    compute_self, compute_cross: run the self- / cross-attention of every block (True) or reuse
      the cached outputs.

  Returns:
    `(out [B, C_out, T, Y, X], cache)`; computed attention outputs overwrite the cache in place.
  """
  x, cond = model.embed(latents, timestep, context)  # x [B, N, C]
  graphdef, params = nnx.split(model.blocks)
  layers = _num_layers(params)
  if cache is None:
    if not (compute_self and compute_cross):
      raise ValueError("the first PAB step must compute both attentions (the cache is empty)")
    cache = (jnp.zeros((layers, *x.shape), x.dtype), jnp.zeros((layers, *x.shape), x.dtype))

  def body(layer, carry):
    x, attn_c, cross_c = carry
    block = nnx.merge(graphdef, _layer_params(params, layer))
    x, attn, cross = _block(block, x, cond, attn_c[layer], cross_c[layer],
                            compute_self=compute_self, compute_cross=compute_cross)
    # Only computed outputs are written back; a reused one is already there.
    if compute_self:
      attn_c = _set_layer(attn_c, attn, layer)
    if compute_cross:
      cross_c = _set_layer(cross_c, cross, layer)
    return x, attn_c, cross_c

  x, attn_c, cross_c = jax.lax.fori_loop(0, layers, body, (x, *cache))
  return model.head(x, cond), (attn_c, cross_c)


def _step(graphdef, state, latents, timestep, context, cache, *, compute_self, compute_cross):
  return pab_forward(nnx.merge(graphdef, state), latents, timestep, context, cache,
                     compute_self=compute_self, compute_cross=compute_cross)


@functools.lru_cache(maxsize=16)
def pab_step_program(graphdef):
  """The jitted PAB step for `graphdef` (static `compute_self` / `compute_cross`, cache donated).

  Public so that benchmarks can time each variant of a step on its own.
  """
  return jax.jit(functools.partial(_step, graphdef),
                 static_argnames=("compute_self", "compute_cross"), donate_argnames=("cache",))


class PABStepModel:
  """`denoise` step model with Pyramid Attention Broadcast on a Wan transformer.

  The carry is the attention cache `(attn, cross)` `[L, B', N, C]` each (None at the start, which
  also resets the host-side step counters). `records` holds per step how many blocks ran each
  attention.
  """

  def __init__(self, model, context: jax.Array, config: PABConfig = PABConfig(), *,
               num_steps: int | None = None):
    del num_steps  # the window is in timesteps
    self._graphdef, self._state = nnx.split(model)
    self.context = context
    self.config = config
    self.num_layers = model.config.num_layers
    self.records: list[StepRecord] = []
    self._since = [0, 0]  # steps since self / cross attention last ran
    self._jitted = pab_step_program(self._graphdef)

  def decide(self, timestep: float, has_cache: bool) -> tuple[bool, bool]:
    """(compute self-attention, compute cross-attention) at a step with this timestep."""
    if not has_cache or not self.config.in_window(timestep):
      return True, True
    return (self._since[0] + 1 >= self.config.self_range,
            self._since[1] + 1 >= self.config.cross_range)

  def __call__(self, latents: jax.Array, timestep: jax.Array, carry: Any,
               step_index: int) -> tuple[jax.Array, Any]:
    step = int(step_index)
    batch = latents.shape[0]
    timestep = jnp.broadcast_to(jnp.asarray(timestep, F32), (batch,))
    if carry is None:
      self._since = [0, 0]
    t = float(timestep[0])
    compute_self, compute_cross = self.decide(t, carry is not None)
    out, carry = self._jitted(self._state, latents, timestep, self.context, carry,
                              compute_self=compute_self, compute_cross=compute_cross)
    self._since = [0 if compute_self else self._since[0] + 1,
                   0 if compute_cross else self._since[1] + 1]
    layers = self.num_layers
    label = {(True, True): "dense", (False, True): "self-reused", (True, False): "cross-reused",
             (False, False): "both-reused"}[(compute_self, compute_cross)]
    self.records.append(StepRecord(step, layers, layers * compute_self, layers * compute_cross,
                                   1.0, label))
    return out, carry
