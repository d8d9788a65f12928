"""The denoising loop: a Python loop over the steps of a flow-matching scheduler, with CFG.

Per step i (Wan2.1's loop, wan/text2video.py in Wan-Video/Wan2.1, and diffusers' `WanPipeline`):

  out, carry = step_model(latents_batch, timestep, carry, i)
  v = uncond + g * (cond - uncond)          # classifier-free guidance, g = guidance_scale
  latents = scheduler.step(state, v, i, latents)

Classifier-free guidance runs as one batch: `latents_batch` is `[2B, ...]`, the conditional half
first and the unconditional half second, and the model output is split the same way. A guidance
scale of exactly 1 skips the unconditional half (`latents_batch` is the `[B, ...]` latents).

`step_model` is called eagerly with a Python int step index, so it can pick a static per-step
configuration itself (the ASTRAEA token budget k_t of arXiv 2506.05096 changes array shapes) and
jit its forward once per distinct configuration; the `carry` it returns (e.g. the ASTRAEA token
cache) is handed back to it at the next step. The guidance combination and the scheduler step are
one jitted function with a traced step index, compiled once per run shape. Every step waits for its
result (`block_until_ready`) so that `DenoiseStats` holds true per-step wall times, together with
the XLA compile time observed during each step.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from astraea_jax.models.prediction import PREDICTIONS, output_to_velocity
from astraea_jax.sampling.schedulers import FlowScheduler, SchedulerState

__all__ = ["DenoiseStats", "StepModel", "denoise"]

# step_model(latents_batch [B', ...], timestep [B'] float32, carry, step_index) -> (output, carry)
StepModel = Callable[[jax.Array, jax.Array, Any, int], tuple[jax.Array, Any]]

# Tracing, lowering and XLA compilation: the one-time cost of a new program. Nested jits report
# nested events, so the timer takes the union of the intervals rather than their sum.
_COMPILE_EVENTS = frozenset({"/jax/core/compile/jaxpr_trace_duration",
                             "/jax/core/compile/jaxpr_to_mlir_module_duration",
                             "/jax/core/compile/backend_compile_duration"})


@dataclasses.dataclass(frozen=True)
class DenoiseStats:
  """Timings of one `denoise` run.

  Attributes:
    step_seconds: wall time of each step (model, guidance and scheduler, until the result is ready).
    compile_seconds: time spent tracing, lowering and compiling programs inside each step (0 for
      steps that reused programs).
  """

  step_seconds: tuple[float, ...]
  compile_seconds: tuple[float, ...]

  @property
  def total_seconds(self) -> float:
    return math.fsum(self.step_seconds)

  @property
  def num_compiling_steps(self) -> int:
    return sum(c > 0 for c in self.compile_seconds)

  @property
  def steady_step_seconds(self) -> float:
    """Median wall time of the steps that compiled nothing (nan if every step compiled)."""
    steady = [s for s, c in zip(self.step_seconds, self.compile_seconds) if c == 0]
    return statistics.median(steady) if steady else math.nan

  def to_dict(self) -> dict[str, Any]:
    return {"step_seconds": list(self.step_seconds), "compile_seconds": list(self.compile_seconds),
            "total_seconds": self.total_seconds,
            "steady_step_seconds": self.steady_step_seconds}


class _CompileTimer:
  """The time covered by trace, lowering and compile events (`jax.monitoring`) on this thread."""

  def __init__(self):
    self._intervals: list[tuple[float, float]] = []
    self._thread = threading.get_ident()

  def __call__(self, event: str, duration: float, **kwargs) -> None:
    del kwargs
    if event in _COMPILE_EVENTS and threading.get_ident() == self._thread:
      end = time.perf_counter()  # events are reported as they end
      self._intervals.append((end - duration, end))

  @property
  def seconds(self) -> float:
    total, reach = 0.0, -math.inf
    for start, end in sorted(self._intervals):
      if end > reach:
        total += end - max(start, reach)
        reach = end
    return total

  def __enter__(self) -> _CompileTimer:
    jax.monitoring.register_event_duration_secs_listener(self)
    return self

  def __exit__(self, *exc) -> None:
    jax.monitoring.unregister_event_duration_listener(self)


@functools.partial(jax.jit, static_argnames=("use_cfg",))
def _model_inputs(latents: jax.Array, timestep: jax.Array, *, use_cfg: bool):
  batch = jnp.concatenate([latents, latents], axis=0) if use_cfg else latents  # [B', ...]
  return batch, jnp.broadcast_to(timestep, (batch.shape[0],))


@functools.partial(jax.jit, static_argnames=("scheduler", "use_cfg", "prediction"),
                   donate_argnames=("history",))
def _guided_step(latents: jax.Array, history: Any, model_output: jax.Array,
                 schedule: SchedulerState, step_index: jax.Array, guidance: jax.Array,
                 timestep: jax.Array, *, scheduler: FlowScheduler, use_cfg: bool,
                 prediction: str):
  if use_cfg:
    cond, uncond = jnp.split(model_output.astype(jnp.float32), 2, axis=0)  # [B, ...] each
    guided = uncond + guidance * (cond - uncond)
  else:
    guided = model_output
  # Guidance is linear and x0 = x_t - sigma v is affine in v at fixed (x_t, sigma), so guiding the
  # x0 predictions and then converting equals converting and then guiding.
  velocity = output_to_velocity(guided, latents, timestep, prediction)
  state = dataclasses.replace(schedule, history=history)
  latents, state = scheduler.step(state, velocity, step_index, latents)
  return latents, state.history


def denoise(step_model: StepModel, latents: jax.Array, scheduler: FlowScheduler,
            scheduler_state: SchedulerState, *, guidance_scale: float, carry: Any = None,
            progress: bool = True, prediction: str = "velocity"
            ) -> tuple[jax.Array, Any, DenoiseStats]:
  """Runs every step of `scheduler_state` from the initial noise `latents`.

  Args:
    step_model: `(latents_batch [B', ...], timestep [B'] float32, carry, step_index: int) ->
      (model_output [B', ...], carry)`, called eagerly once per step. With guidance, B' = 2B and
      rows [0, B) are conditional, rows [B, 2B) unconditional; with guidance_scale 1, B' = B.
    latents: `[B, ...]` initial noise.
    scheduler: a `FlowUniPCScheduler` or `FlowEulerScheduler`.
    scheduler_state: `scheduler.set_timesteps(num_steps)`; reusable across runs.
    guidance_scale: g in `uncond + g * (cond - uncond)`; exactly 1 runs the conditional half only.
    carry: the step model's initial carry (e.g. None for an empty token cache).
    progress: show a tqdm progress bar.
    prediction: what the model outputs: "velocity" (Wan2.1, `noise - x0`) or "x0" (the clean
      sample, converted by `astraea_jax.models.prediction.output_to_velocity`).

  Returns:
    (final latents in the input dtype, the last carry, per-step `DenoiseStats`).
  """
  if not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale):
    raise ValueError(f"{guidance_scale=} must be a finite number")
  if not jnp.issubdtype(latents.dtype, jnp.floating):
    raise TypeError(f"latents must be floating point, got {latents.dtype}")
  if prediction not in PREDICTIONS:
    raise ValueError(f"{prediction=} must be one of {PREDICTIONS}")
  use_cfg = float(guidance_scale) != 1.0
  guidance = jnp.asarray(guidance_scale, jnp.float32)
  timesteps = np.asarray(scheduler_state.timesteps, np.float32)
  schedule = dataclasses.replace(scheduler_state, history=None)
  # The history never leaves the loop, so it is donated and updated in place.
  history = scheduler.init_history(schedule, latents).history

  step_seconds, compile_seconds = [], []
  bar = tqdm(total=len(timesteps), desc="denoising", unit="step", disable=not progress)
  try:
    for i, t in enumerate(timesteps):
      with _CompileTimer() as compiled:
        start = time.perf_counter()
        batch, timestep = _model_inputs(latents, jnp.float32(t), use_cfg=use_cfg)
        model_output, carry = step_model(batch, timestep, carry, i)
        if tuple(model_output.shape) != tuple(batch.shape):
          raise ValueError(f"step_model returned shape {tuple(model_output.shape)} for latents of "
                           f"shape {tuple(batch.shape)} at step {i}")
        latents, history = _guided_step(latents, history, model_output, schedule, jnp.int32(i),
                                        guidance, jnp.float32(t), scheduler=scheduler,
                                        use_cfg=use_cfg, prediction=prediction)
        jax.block_until_ready((latents, carry))
        elapsed = time.perf_counter() - start
      step_seconds.append(elapsed)
      compile_seconds.append(compiled.seconds)
      bar.set_postfix(t=f"{t:.0f}", s=f"{elapsed:.3f}")
      bar.update()
  finally:
    bar.close()
  return latents, carry, DenoiseStats(tuple(step_seconds), tuple(compile_seconds))
