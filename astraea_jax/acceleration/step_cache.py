"""Adaptive step caching: TeaCache and EasyCache, whole-step reuse decided per step on the host.

Both skip the transformer at a denoising step when an indicator says its output will barely change,
and reuse what the last computed step produced instead.

**TeaCache** (Liu et al. 2024, "Timestep Embedding Tells: It's Time to Cache for Video Diffusion
Model", arXiv 2411.19108). Indicator: the relative L1 change, from the previous step, of the
timestep-modulated input of the first block,

  d_t = mean|m_t - m_{t-1}| / mean|m_{t-1}|,   m_t = LN(x_t) * (1 + scale_t) + shift_t   # [B', N, C]

where x_t are the patch-embedded tokens and (shift, scale) the first block's modulation
(`indicator="modulated_input"`, default), or the timestep projection that modulates every block
(`indicator="timestep_embedding"`, what TeaCache4Wan2.1 uses: it carries no content, only t).
Optionally rescaled by a polynomial fitted on a real model (`coefficients`, numpy.poly1d order,
highest degree first; `WAN21_T2V_1_3B` and `WAN21_T2V_14B` are TeaCache4Wan2.1's). The rescaled
values accumulate over steps; while the sum stays below `rel_l1_thresh` the step skips every block
and reuses the last residual `r = blocks(x) - x` (`out = head(x_t + r)`: patch embedding and head
only, no block launch); otherwise it computes and resets the sum. The first `warmup` steps (the
paper's `ret_steps`) and the last `cutoff` steps always compute.

**EasyCache** (Zhou et al. 2025, "EasyCache: Training-Free Video Diffusion Acceleration via
Runtime-Adaptive Caching", arXiv 2507.02860). Runtime-adaptive and model-agnostic: it watches the
model's transformation rate between its last two computed steps,

  k = mean|v_i - v_j| / mean|x_i - x_j|         # output change per input change (latents x)

and predicts the relative output change at step t from the input change alone,
`eps_t = k * mean|x_t - x_{t-1}| / mean|v_i|`. The predictions accumulate; while the sum stays below
`threshold` (tau) the step reuses the last transformation vector, `out = x_t + (v_i - x_i)` (an add
on the latents, nothing else), otherwise it computes and resets the sum. The first `warmup` steps
always compute (k needs two computed steps), as do the last `cutoff`.

Classifier-free guidance runs as one batch (`denoise` stacks cond and uncond rows), so one decision
covers both halves here, from indicators averaged over all rows; the papers' implementations decide
for each half separately. The decisions are made on the host, one scalar read back per step (the
reference implementations do the same with `.item()`), and recorded in `records`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from astraea_jax.acceleration.method_stats import StepRecord
from astraea_jax.acceleration.step_skip import _inner_record
from astraea_jax.models.wan import layer_norm

__all__ = [
    "EasyCacheConfig",
    "EasyCacheStepModel",
    "TeaCacheConfig",
    "TeaCacheStepModel",
    "easy_cache_change",
    "easy_cache_reuse",
    "tea_cache_programs",
    "WAN21_T2V_14B",
    "WAN21_T2V_1_3B",
]

F32 = jnp.float32

# TeaCache4Wan2.1's rescaling polynomials (teacache_generate.py, use_ret_steps=False), fitted on
# the real checkpoints; meaningless for other weights.
WAN21_T2V_1_3B = (2.39676752e+03, -1.31110545e+03, 2.01331979e+02, -8.29855975e+00, 1.37887774e-01)
WAN21_T2V_14B = (-5784.54975374, 5449.50911966, -1811.16591783, 256.27178429, -13.02252404)
COEFFICIENTS = {"none": None, "wan2.1-t2v-1.3b": WAN21_T2V_1_3B, "wan2.1-t2v-14b": WAN21_T2V_14B}
_INDICATORS = ("modulated_input", "timestep_embedding")


def _check_steps(name: str, value, minimum: int) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")


def _check_threshold(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
      math.isfinite(value) and value >= 0):
    raise ValueError(f"{name}={value!r} must be a finite number >= 0")


@dataclasses.dataclass(frozen=True)
class TeaCacheConfig:
  """TeaCache's knobs; `rel_l1_thresh=0` never skips (the dense run).

  Attributes:
    rel_l1_thresh: skip while the accumulated (rescaled) relative L1 change stays below this.
    coefficients: rescaling polynomial, highest degree first; None is the identity.
    warmup: first steps always computed (TeaCache's `ret_steps`), at least 1.
    cutoff: last steps always computed (needs the run's step count; 0 for none).
    indicator: "modulated_input" or "timestep_embedding" (see the module docstring).
  """

  rel_l1_thresh: float = 0.1
  coefficients: tuple[float, ...] | None = None
  warmup: int = 1
  cutoff: int = 1
  indicator: str = "modulated_input"

  def __post_init__(self):
    _check_threshold("rel_l1_thresh", self.rel_l1_thresh)
    _check_steps("warmup", self.warmup, 1)
    _check_steps("cutoff", self.cutoff, 0)
    if self.indicator not in _INDICATORS:
      raise ValueError(f"{self.indicator=} must be one of {_INDICATORS}")
    if self.coefficients is not None:
      coeffs = tuple(float(c) for c in self.coefficients)
      if not coeffs or not all(math.isfinite(c) for c in coeffs):
        raise ValueError(f"{self.coefficients=} must be a non-empty tuple of finite numbers")
      object.__setattr__(self, "coefficients", coeffs)

  def rescale(self, value: float) -> float:
    return value if self.coefficients is None else float(np.polyval(self.coefficients, value))


@dataclasses.dataclass(frozen=True)
class EasyCacheConfig:
  """EasyCache's knobs; `threshold=0` never skips (the dense run).

  Attributes:
    threshold: tau, skip while the accumulated predicted relative output change stays below it.
    warmup: first steps always computed, at least 2 (the transformation rate needs two).
    cutoff: last steps always computed (needs the run's step count; 0 for none).
  """

  threshold: float = 0.05
  warmup: int = 2
  cutoff: int = 1

  def __post_init__(self):
    _check_threshold("threshold", self.threshold)
    _check_steps("warmup", self.warmup, 2)
    _check_steps("cutoff", self.cutoff, 0)


def _forced(step: int, warmup: int, cutoff: int, num_steps: int | None) -> bool:
  return step < warmup or (num_steps is not None and step >= num_steps - cutoff)


# -- TeaCache (Wan transformer) --------------------------------------------------------------------


def _indicator_input(model, latents, timestep, context, indicator):
  """m_t: `[B', N, C]` modulated first-block input, or `[B', 6, C]` timestep projection."""
  x, cond = model.embed(latents, timestep, context)  # x [B', N, C]
  if indicator == "timestep_embedding":
    return cond.timestep_proj
  table = model.blocks.scale_shift_table[...][0]  # [1, 6, C]: block 0 of the stacked blocks
  mod = table + cond.timestep_proj  # [B', 6, C] f32
  shift, scale = mod[:, 0:1], mod[:, 1:2]
  return (layer_norm(x, model.config.eps) * (1 + scale) + shift).astype(x.dtype)


def _tea_indicator(graphdef, state, latents, timestep, context, previous, *, indicator):
  """(m_t, relative L1 change from `previous` (0 without one)) for the host's decision."""
  m = _indicator_input(nnx.merge(graphdef, state), latents, timestep, context, indicator)
  if previous is None:
    return m, jnp.zeros((), F32)
  prev = previous.astype(F32)
  rel = jnp.mean(jnp.abs(m.astype(F32) - prev)) / jnp.maximum(jnp.mean(jnp.abs(prev)), 1e-12)
  return m, rel


def _tea_compute(graphdef, state, latents, timestep, context):
  """The dense forward that also returns the residual of the block stack `[B', N, C]`."""
  model = nnx.merge(graphdef, state)
  x, cond = model.embed(latents, timestep, context)
  y = model.run_blocks(x, cond)  # [B', N, C]
  return model.head(y, cond), y - x


def _tea_reuse(graphdef, state, latents, timestep, context, residual):
  """A skipped step: embedding and head around the cached residual, no block."""
  model = nnx.merge(graphdef, state)
  x, cond = model.embed(latents, timestep, context)
  return model.head(x + residual.astype(x.dtype), cond)


@functools.lru_cache(maxsize=16)
def tea_cache_programs(graphdef, indicator: str):
  """TeaCache's three jitted programs for `graphdef`: (indicator, full step, residual reuse).

  Public so that benchmarks can time each variant of a step on its own.
  """
  # Module-level and per graphdef, so later runs of the same model reuse the compiled programs.
  return (jax.jit(functools.partial(_tea_indicator, graphdef, indicator=indicator)),
          jax.jit(functools.partial(_tea_compute, graphdef)),
          jax.jit(functools.partial(_tea_reuse, graphdef)))


class TeaCacheStepModel:
  """`denoise` step model with TeaCache on a Wan transformer (see the module docstring).

  Args:
    model: the Wan transformer (`embed`, `run_blocks`, `head`, stacked `blocks`).
    context: `[B', M, text_dim]` text embeddings in the loop's row order.
    config: the knobs.
    num_steps: the run's step count (for `cutoff`); None: no cutoff.
    decisions: forces compute (True) / reuse (False) per step instead of the indicator (timing a
      decision pattern found elsewhere); steps without a cache always compute.

  The carry is `(m_prev, residual)`; host-side state (the accumulator) resets when it is None.
  """

  def __init__(self, model, context: jax.Array, config: TeaCacheConfig = TeaCacheConfig(), *,
               num_steps: int | None = None, decisions=None):
    self._graphdef, self._state = nnx.split(model)
    self.context = context
    self.config = config
    self.num_steps = num_steps
    self.num_layers = model.config.num_layers
    self.decisions = None if decisions is None else tuple(bool(d) for d in decisions)
    self.records: list[StepRecord] = []
    self.indicators: list[float] = []  # rescaled d_t of every step (0 at step 0)
    self._accumulated = 0.0
    self._indicator, self._compute, self._reuse = tea_cache_programs(self._graphdef, config.indicator)

  def __call__(self, latents: jax.Array, timestep: jax.Array, carry: Any,
               step_index: int) -> tuple[jax.Array, Any]:
    step = int(step_index)
    cfg = self.config
    timestep = jnp.broadcast_to(jnp.asarray(timestep, F32), (latents.shape[0],))
    previous, residual = (None, None) if carry is None else carry
    if carry is None:
      self._accumulated = 0.0
    m, rel = self._indicator(self._state, latents, timestep, self.context, previous)
    value = cfg.rescale(float(rel)) if previous is not None else 0.0
    self.indicators.append(value)
    if residual is None or _forced(step, cfg.warmup, cfg.cutoff, self.num_steps):
      compute = True
    elif self.decisions is not None:
      compute = self.decisions[step]
    else:
      self._accumulated += value
      compute = not (cfg.rel_l1_thresh > 0 and self._accumulated < cfg.rel_l1_thresh)
    if compute:
      self._accumulated = 0.0
      out, residual = self._compute(self._state, latents, timestep, self.context)
      self.records.append(StepRecord.full(step, self.num_layers))
    else:
      out = self._reuse(self._state, latents, timestep, self.context, residual)
      self.records.append(StepRecord.reused(step))
    return out, (m, residual)


# -- EasyCache (any step model) --------------------------------------------------------------------


@jax.jit
def easy_cache_change(x, x_prev, v_last):
  """EasyCache's per-step check: (mean|x - x_prev|, mean|v_last|) as one [2] f32 read-back."""
  return jnp.stack([jnp.mean(jnp.abs(x.astype(F32) - x_prev.astype(F32))),
                    jnp.mean(jnp.abs(v_last.astype(F32)))])


@jax.jit
def _easy_rate(x, v, x_last, v_last):
  """Transformation rate k = mean|v - v_last| / mean|x - x_last| between two computed steps."""
  dv = jnp.mean(jnp.abs(v.astype(F32) - v_last.astype(F32)))
  dx = jnp.mean(jnp.abs(x.astype(F32) - x_last.astype(F32)))
  return dv / jnp.maximum(dx, 1e-12)


@jax.jit
def easy_cache_reuse(x, x_last, v_last):
  """EasyCache's skipped step: the cached transformation vector applied to the current input."""
  # out = x_t + (v_i - x_i): the cached transformation vector applied to the current input.
  return (x.astype(F32) + (v_last.astype(F32) - x_last.astype(F32))).astype(v_last.dtype)


class EasyCacheStepModel:
  """`denoise` step model with EasyCache around any step model `inner` (dense or ASTRAEA).

  The latents the loop passes are the model input x; the model output must have their shape (a
  Wan transformer with in_channels == out_channels). A reused step does not call `inner`, so its
  carry passes through. `decisions` forces compute / reuse per step as in `TeaCacheStepModel`.
  The carry is `(inner_carry, x_prev, x_last, v_last)`.
  """

  def __init__(self, inner, config: EasyCacheConfig = EasyCacheConfig(), *,
               num_steps: int | None = None, num_layers: int | None = None, decisions=None):
    self.inner = inner
    self.config = config
    self.num_steps = num_steps
    self.num_layers = num_layers or getattr(inner, "num_layers", 0)
    self.decisions = None if decisions is None else tuple(bool(d) for d in decisions)
    self.records: list[StepRecord] = []
    self.predictions: list[float] = []  # eps_t of every step (0 where not predicted)
    self._accumulated = 0.0
    self._rate: float | None = None

  def __call__(self, latents: jax.Array, timestep: jax.Array, carry: Any,
               step_index: int) -> tuple[jax.Array, Any]:
    step = int(step_index)
    cfg = self.config
    if carry is None:
      carry = (None, None, None, None)
      self._accumulated, self._rate = 0.0, None
    inner_carry, x_prev, x_last, v_last = carry
    x = latents
    eps = 0.0
    if v_last is None or _forced(step, cfg.warmup, cfg.cutoff, self.num_steps):
      compute = True
    elif self.decisions is not None:
      compute = self.decisions[step]
    elif self._rate is None or cfg.threshold == 0:
      compute = True
    else:
      dx, v_norm = (float(a) for a in np.asarray(easy_cache_change(x, x_prev, v_last)))
      eps = self._rate * dx / max(v_norm, 1e-12)
      self._accumulated += eps
      compute = not self._accumulated < cfg.threshold
    self.predictions.append(eps)
    if not compute:
      self.records.append(StepRecord.reused(step))
      return easy_cache_reuse(x, x_last, v_last), (inner_carry, x, x_last, v_last)
    v, inner_carry = self.inner(latents, timestep, inner_carry, step)
    if tuple(v.shape) != tuple(x.shape):
      raise ValueError(f"EasyCache needs outputs shaped like the inputs; got {tuple(v.shape)} "
                       f"for {tuple(x.shape)}")
    if v_last is not None:
      self._rate = float(_easy_rate(x, v, x_last, v_last))
    self._accumulated = 0.0
    self.records.append(_inner_record(self.inner, step, self.num_layers))
    return v, (inner_carry, x, x, v)
