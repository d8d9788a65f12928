"""Uniform step skipping: the naive baseline of step-level reuse.

Every `interval`-th denoising step runs the transformer (and the first `warmup` steps always do);
the other steps return the last computed model output unchanged. It is the fixed-schedule ancestor
of the adaptive caches in `step_cache` (TeaCache, arXiv 2411.19108; EasyCache, arXiv 2507.02860):
same reuse, no indicator. A skipped step costs nothing on the device.

`StepSkipStepModel` wraps any `denoise` step model (the dense transformer, or ASTRAEA's
`AstraeaStepModel`, whose per-step token budget then applies on the computed steps): a skipped
step does not call it, so its carry passes through unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from astraea_jax.acceleration.method_stats import StepRecord

__all__ = ["StepSkipConfig", "StepSkipStepModel"]


@dataclasses.dataclass(frozen=True)
class StepSkipConfig:
  """Compute step s iff `s < warmup` or `s % interval == 0`; interval 1 is the dense run."""

  interval: int = 2
  warmup: int = 1

  def __post_init__(self):
    if isinstance(self.interval, bool) or not isinstance(self.interval, int) or self.interval < 1:
      raise ValueError(f"interval={self.interval!r} must be a positive integer")
    if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 1:
      # Step 0 has nothing to reuse.
      raise ValueError(f"warmup={self.warmup!r} must be a positive integer (step 0 is always "
                       "computed)")

  def computes(self, step: int) -> bool:
    return step < self.warmup or step % self.interval == 0

  def computed_steps(self, num_steps: int) -> list[int]:
    return [s for s in range(num_steps) if self.computes(s)]


class StepSkipStepModel:
  """`denoise` step model: `inner` on the computed steps, its last output on the others.

  The carry is `(inner_carry, last_output [B', ...])`; None at the start of a run.
  """

  def __init__(self, inner, config: StepSkipConfig = StepSkipConfig(), *,
               num_layers: int | None = None):
    self.inner = inner
    self.config = config
    self.num_layers = num_layers or getattr(inner, "num_layers", 0)
    self.records: list[StepRecord] = []

  def __call__(self, latents: jax.Array, timestep: jax.Array, carry: Any,
               step_index: int) -> tuple[jax.Array, Any]:
    step = int(step_index)
    inner_carry, last = (None, None) if carry is None else carry
    if last is None or self.config.computes(step):
      out, inner_carry = self.inner(latents, timestep, inner_carry, step)
      self.records.append(_inner_record(self.inner, step, self.num_layers))
      return out, (inner_carry, out)
    self.records.append(StepRecord.reused(step))
    return last, (inner_carry, last)


def _inner_record(inner, step: int, num_layers: int) -> StepRecord:
  """The record of a step that called `inner`: its own when it keeps records, else a full one."""
  records = getattr(inner, "records", None)
  if records and records[-1].step == step:
    return records[-1]
  return StepRecord.full(step, num_layers)
