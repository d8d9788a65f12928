"""What a step model computed at each denoising step: one `StepRecord` per step.

Every acceleration method (ASTRAEA, `step_cache`, `attention_broadcast`, `step_skip`) appends one
record per call to its `records` list, so that `generate`'s summary line and the frontier benchmark
count computed steps and blocks the same way for all of them. Records are host-side Python values
(the decisions are made on the host), so keeping them costs nothing on the device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

__all__ = ["StepRecord", "summarize", "summary_line"]


@dataclasses.dataclass(frozen=True)
class StepRecord:
  """One denoising step of one step model.

  Attributes:
    step: the step index.
    blocks: transformer blocks evaluated, fully or partly (0 when the step reused a cached output).
    self_attn: blocks whose self-attention ran (PAB reuses it while the FFN still runs).
    cross_attn: blocks whose cross-attention ran.
    tokens: fraction of the tokens computed in the blocks that ran (ASTRAEA's k / N; 1 otherwise).
    method: short label of what ran, e.g. "dense", "reuse", "k=410", "self-reused".
  """

  step: int
  blocks: int
  self_attn: int
  cross_attn: int
  tokens: float = 1.0
  method: str = ""

  @property
  def computed(self) -> bool:
    return self.blocks > 0

  @classmethod
  def full(cls, step: int, num_layers: int, method: str = "dense", tokens: float = 1.0):
    return cls(step, num_layers, num_layers, num_layers, tokens, method)

  @classmethod
  def reused(cls, step: int, method: str = "reuse"):
    return cls(step, 0, 0, 0, 0.0, method)


def summarize(records: Sequence[StepRecord], num_layers: int) -> dict:
  """Counts over a run: computed steps, block / attention evaluations and their totals."""
  steps = len(records)
  return {
      "steps": steps,
      "computed_steps": [r.step for r in records if r.computed],
      "num_computed_steps": sum(r.computed for r in records),
      "blocks": sum(r.blocks for r in records),
      "self_attn": sum(r.self_attn for r in records),
      "cross_attn": sum(r.cross_attn for r in records),
      "blocks_total": steps * num_layers,
      # Block work in dense-block units (token fraction times blocks): ASTRAEA's effective budget.
      "block_tokens": sum(r.blocks * r.tokens for r in records),
      "methods": [r.method for r in records],
  }


def summary_line(records: Sequence[StepRecord], num_layers: int) -> str:
  """e.g. "computed 12/20 steps, 360/600 blocks (self-attn 300, cross-attn 200)"."""
  s = summarize(records, num_layers)
  line = (f"computed {s['num_computed_steps']}/{s['steps']} steps, "
          f"{s['blocks']}/{s['blocks_total']} blocks")
  if s["self_attn"] != s["blocks"] or s["cross_attn"] != s["blocks"]:
    line += f" (self-attn {s['self_attn']}, cross-attn {s['cross_attn']})"
  if s["blocks"] and abs(s["block_tokens"] - s["blocks"]) > 1e-9:
    line += f", {s['block_tokens'] / max(s['blocks_total'], 1):.2f} of the dense block work"
  return line
