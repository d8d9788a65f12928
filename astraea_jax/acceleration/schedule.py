"""Token budget schedules: one theta per denoising step (ASTRAEA, arXiv 2506.05096, Sec. 4).

ASTRAEA computes, at denoising step t, only `k_t = round(theta_t * N)` of the N video tokens in
every transformer block and reuses the cached block output for the rest. A `BudgetSchedule` holds
the `theta_t` of one sampling run (50 values for Wan2.1's default 50 steps). theta = 1 is the dense
model, theta = 0 a pure cache step. The first step is always dense because the token cache is empty
before it; `num_selected` enforces that whatever theta_0 says.

The paper searches the schedule with an evolutionary algorithm over theta in {0, 0.1, ..., 1} under
a mean-budget constraint (astraea_jax.search). `dense_then` builds a simple member of that space
used as a baseline here ("dense for the first m steps, then theta"), and `dense_then_mean` picks the
theta that gives a requested mean budget.

Schedules are saved as a small JSON file:

  {"format": "astraea-budget-schedule", "version": 1, "name": "...", "thetas": [1.0, 0.4, ...]}
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = [
    "BudgetSchedule",
    "first_computing_step_is_partial",
    "load_schedules",
    "num_selected_tokens",
    "shipped_schedule",
]

_FORMAT = "astraea-budget-schedule"
_VERSION = 1


def num_selected_tokens(theta: float, num_tokens: int) -> int:
  """`k = round(theta * N)`, halves rounded up (not Python's half-even), clipped to [0, N]."""
  if not 0.0 <= theta <= 1.0:
    raise ValueError(f"{theta=} must lie in [0, 1]")
  if num_tokens < 1:
    raise ValueError(f"{num_tokens=} must be positive")
  return min(num_tokens, max(0, math.floor(theta * num_tokens + 0.5)))


@dataclasses.dataclass(frozen=True)
class BudgetSchedule:
  """The token budget theta_t of every denoising step t = 0 .. len - 1.

  Attributes:
    thetas: one fraction of tokens per step, each in [0, 1].
    name: free-form label saved with the schedule (e.g. "uniform-0.4").
  """

  thetas: tuple[float, ...]
  name: str = ""

  def __post_init__(self):
    thetas = tuple(float(t) for t in self.thetas)
    if not thetas:
      raise ValueError("a BudgetSchedule needs at least one step")
    for step, theta in enumerate(thetas):
      if not 0.0 <= theta <= 1.0 or math.isnan(theta):
        raise ValueError(f"thetas[{step}]={theta} must lie in [0, 1]")
    object.__setattr__(self, "thetas", thetas)

  # -- constructors ------------------------------------------------------------------------------

  @classmethod
  def uniform(cls, num_steps: int, theta: float) -> BudgetSchedule:
    """theta at every step (step 0 still runs dense: see `num_selected`)."""
    _check_steps(num_steps)
    return cls((float(theta),) * num_steps, name=f"uniform-{theta:g}")

  @classmethod
  def dense(cls, num_steps: int) -> BudgetSchedule:
    """theta = 1 everywhere: the accelerated forward then equals the dense model."""
    _check_steps(num_steps)
    return cls((1.0,) * num_steps, name="dense")

  @classmethod
  def dense_then(cls, num_steps: int, theta: float, *, dense_steps: int) -> BudgetSchedule:
    """Dense (theta = 1) for the first `dense_steps` steps, then `theta` for the rest."""
    _check_steps(num_steps)
    if not 0 <= dense_steps <= num_steps:
      raise ValueError(f"{dense_steps=} must lie in [0, {num_steps=}]")
    thetas = (1.0,) * dense_steps + (float(theta),) * (num_steps - dense_steps)
    return cls(thetas, name=f"dense{dense_steps}-then-{theta:g}")

  @classmethod
  def dense_then_mean(cls, num_steps: int, mean: float, *, dense_fraction: float = 0.2,
                      quantum: float | None = None) -> BudgetSchedule:
    """`dense_then` with `round(dense_fraction * num_steps)` dense steps and mean theta `mean`.

    Args:
      num_steps: number of denoising steps.
      mean: the total budget, the mean of theta over the steps.
      dense_fraction: fraction of the steps, from the start, that run dense.
      quantum: if set, theta is rounded down to a multiple of it (0.1 is the paper's search grid),
        so the mean may fall slightly under `mean`.
    """
    _check_steps(num_steps)
    if not 0.0 <= dense_fraction <= 1.0:
      raise ValueError(f"{dense_fraction=} must lie in [0, 1]")
    dense_steps = num_selected_tokens(dense_fraction, num_steps)
    rest = num_steps - dense_steps
    if rest == 0:
      if mean != 1.0:
        raise ValueError(f"{mean=} is unreachable when every one of {num_steps=} steps is dense")
      return cls.dense(num_steps)
    theta = (mean * num_steps - dense_steps) / rest
    if not 0.0 <= theta <= 1.0 + 1e-12:
      raise ValueError(f"{mean=} is unreachable with {dense_steps} dense steps out of {num_steps}: "
                       f"the remaining steps would need theta={theta:.4f}")
    theta = min(theta, 1.0)
    if quantum is not None:
      if not 0.0 < quantum <= 1.0:
        raise ValueError(f"{quantum=} must lie in (0, 1]")
      theta = math.floor(theta / quantum + 1e-9) * quantum
    return cls.dense_then(num_steps, round(theta, 12), dense_steps=dense_steps)

  RESAMPLE_MODES = ("repeat", "average")

  def resample(self, num_steps: int, mode: str = "repeat") -> BudgetSchedule:
    """The same schedule over `num_steps` steps (e.g. a 20-step search applied to a 50-step run).

    mode="repeat" (default): every source step is repeated `floor(r)` or `ceil(r)` times, `r =
      num_steps / len(self)`, so each new step runs a theta the source ran (a whole step stays
      whole, a skipped one skipped). The longer runs go to evenly spaced source steps, then move,
      one at a time, to wherever brings the mean closest to the source's. Where r is not an
      integer the mean can move a little (0.41 -> 0.412 for a 20-step schedule at 50 steps).
    mode="average": the schedule is read as a step function of the fraction of the run, and new
      step i gets its average over `[i / num_steps, (i + 1) / num_steps)`: the mean is kept
      exactly, and a new step that straddles a computed and a skipped source step computes half
      the tokens (a partial step, which costs more than half a step's time).

    (Picking the nearest source step instead can move the mean far: 0.41 -> 0.37 for a 20-step
    schedule of whole steps at 50 steps.)
    """
    _check_steps(num_steps)
    if mode not in self.RESAMPLE_MODES:
      raise ValueError(f"unknown resample {mode=}; choose from {self.RESAMPLE_MODES}")
    if mode == "average":
      return BudgetSchedule(_averaged(self.thetas, num_steps), name=self.name)
    counts = _repeat_counts(self.thetas, num_steps)
    return BudgetSchedule(tuple(t for t, c in zip(self.thetas, counts) for _ in range(c)),
                          name=self.name)

  # -- queries -----------------------------------------------------------------------------------

  def __len__(self) -> int:
    return len(self.thetas)

  @property
  def num_steps(self) -> int:
    return len(self.thetas)

  @property
  def mean(self) -> float:
    """The total budget: the mean of theta over the steps (the search's constraint)."""
    return sum(self.thetas) / len(self.thetas)

  def theta(self, step: int) -> float:
    if not 0 <= step < len(self.thetas):
      raise IndexError(f"{step=} is outside this {len(self.thetas)}-step schedule")
    return self.thetas[step]

  def num_selected(self, step: int, num_tokens: int, *, multiple: int = 1) -> int:
    """Tokens computed per block at `step`: `round(theta_step * N)`; step 0 is forced dense.

    Each distinct value compiles the accelerated forward once, so a schedule on the paper's 0.1 grid
    compiles at most 11 variants. `multiple` > 1 rounds a partial k up to a multiple of it (capped
    at N; 0 stays 0), for forwards whose kernels run faster on aligned lengths.
    """
    if multiple < 1:
      raise ValueError(f"{multiple=} must be positive")
    k = num_selected_tokens(self.theta(step), num_tokens)
    if step == 0:
      return num_tokens
    return min(num_tokens, -(-k // multiple) * multiple)

  def block_cache_read_after(self, step: int, num_tokens: int, *, multiple: int = 1) -> bool:
    """Whether a later step reads the per-block token cache that `step` leaves behind.

    Only a partial step (0 < k < N) reads it: a dense step rewrites all of it and a k = 0 step
    reads just the last block's output. So it is read iff the first later step with k > 0 is
    partial. A dense step whose cache is not read can skip writing it (the step models'
    `refresh_cache=False`), which makes it cost what the dense model costs.
    """
    return first_computing_step_is_partial(
        (self.num_selected(later, num_tokens, multiple=multiple)
         for later in range(step + 1, len(self.thetas))), num_tokens)

  def effective_mean(self, num_tokens: int, *, multiple: int = 1) -> float:
    """Mean fraction of tokens actually computed, after rounding k and forcing step 0 dense."""
    ks = [self.num_selected(s, num_tokens, multiple=multiple) for s in range(len(self.thetas))]
    return sum(ks) / (num_tokens * len(ks))

  # -- JSON --------------------------------------------------------------------------------------

  def to_json(self) -> str:
    return json.dumps({"format": _FORMAT, "version": _VERSION, "name": self.name,
                       "thetas": list(self.thetas)})

  @classmethod
  def from_json(cls, text: str) -> BudgetSchedule:
    try:
      data = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f"not a budget schedule: invalid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
      raise ValueError(f"not a budget schedule: expected an object with format={_FORMAT!r}")
    if data.get("version") != _VERSION:
      raise ValueError(f"unsupported budget schedule version={data.get('version')!r}; "
                       f"this reader knows version {_VERSION}")
    thetas = data.get("thetas")
    if not isinstance(thetas, list) or not all(
        isinstance(t, (int, float)) and not isinstance(t, bool) for t in thetas):
      raise ValueError("not a budget schedule: 'thetas' must be a list of numbers")
    return cls(tuple(thetas), name=str(data.get("name", "")))

  def save(self, path: str | os.PathLike) -> None:
    with open(path, "w", encoding="utf-8") as f:
      f.write(self.to_json() + "\n")

  @classmethod
  def load(cls, path: str | os.PathLike) -> BudgetSchedule:
    with open(path, encoding="utf-8") as f:
      return cls.from_json(f.read())

  @classmethod
  def from_thetas(cls, thetas: Sequence[float], name: str = "") -> BudgetSchedule:
    return cls(tuple(thetas), name=name)


def first_computing_step_is_partial(ks: Iterable[int], num_tokens: int) -> bool:
  """Whether the first k > 0 of `ks` (the k of the steps after one, in order) is below N: the
  test of `BudgetSchedule.block_cache_read_after`, for callers whose k are rounded differently."""
  for k in ks:
    if k:
      return k < num_tokens
  return False


def load_schedules(folder: str | os.PathLike) -> tuple[BudgetSchedule, ...]:
  """Every schedule file (`*.json`) in `folder`, by file name; none if there is no such folder.

  A model folder's `schedules/` holds the schedules searched for it, which `generate --budget`
  runs in place of the uniform budget (`shipped_schedule`). ValueError names a file that is not
  a schedule.
  """
  root = Path(folder)
  if not root.is_dir():
    return ()
  schedules = []
  for path in sorted(root.glob("*.json")):
    try:
      schedules.append(BudgetSchedule.load(path))
    except (OSError, ValueError) as e:
      raise ValueError(f"cannot read schedule {str(path)!r}: {e}") from None
  return tuple(schedules)


def shipped_schedule(schedules: Sequence[BudgetSchedule], budget: float,
                     num_steps: int) -> BudgetSchedule | None:
  """The first of `schedules` with `num_steps` steps and mean `budget`, or None."""
  for schedule in schedules:
    if len(schedule) == num_steps and abs(schedule.mean - budget) < 1e-9:
      return schedule
  return None


def _check_steps(num_steps: int) -> None:
  if num_steps < 1:
    raise ValueError(f"{num_steps=} must be positive")


def _averaged(thetas: Sequence[float], num_steps: int) -> tuple[float, ...]:
  """`BudgetSchedule.resample(mode="average")`: new step i averages the source over its span."""
  src = len(thetas)
  out = []
  for i in range(num_steps):
    # Step i covers [lo, hi) in units of 1 / num_steps of a source step: integers, no rounding.
    lo, hi = i * src, (i + 1) * src
    total = sum((min(hi, (j + 1) * num_steps) - max(lo, j * num_steps)) * thetas[j]
                for j in range(lo // num_steps, -(-hi // num_steps)))
    out.append(min(1.0, round(total / src, 12)))
  return tuple(out)


def _repeat_counts(thetas: Sequence[float], num_steps: int) -> list[int]:
  """How often `BudgetSchedule.resample(mode="repeat")` repeats each source step (sums to
  `num_steps`): evenly spaced extra repeats, then single moves of one extra repeat that bring the
  mean closest to the source's, the nearest move first among equals."""
  src = len(thetas)
  base = num_steps // src
  counts = [(j + 1) * num_steps // src - j * num_steps // src for j in range(src)]
  target = sum(thetas) * num_steps / src
  error = sum(c * t for c, t in zip(counts, thetas)) - target
  while True:
    best = None  # (|new error|, distance, a, b): move an extra repeat from step a to step b
    for a in range(src):
      if counts[a] == base:
        continue
      for b in range(src):
        if counts[b] != base:
          continue
        key = (abs(error - thetas[a] + thetas[b]), abs(a - b), a, b)
        if best is None or key < best:
          best = key
    if best is None or best[0] >= abs(error) - 1e-9:
      return counts
    _, _, a, b = best
    counts[a] -= 1
    counts[b] += 1
    error += thetas[b] - thetas[a]
