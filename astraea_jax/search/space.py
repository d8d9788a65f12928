"""The search space of per-step token budgets and its mean-budget constraint (ASTRAEA, arXiv
2506.05096, Sec. 4).

A candidate is one theta per denoising step on the paper's grid theta in {0, 0.1, ..., 1}. It is
stored as grid levels, `theta = level / levels` with `levels = 10`, in a float32 vector `[T_s]`
(T_s denoising steps; evosax keeps populations as float arrays, and small integers are exact in
float32). The constraint is the paper's "total budget": the mean theta over the steps must lie
within a relative tolerance (default +-10%) of the target. `repair` moves any vector onto the grid
and into that window, one grid unit at a time at random steps, so crossover and mutation may break
the constraint freely.

Step 0 is fixed at theta = 1: the accelerated forward runs the first step dense whatever its theta
says (the token cache is empty before it), so counting it at 1 makes the constrained mean the true
mean fraction of tokens computed (up to the rounding of k).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from astraea_jax.acceleration.schedule import BudgetSchedule

__all__ = ["BudgetSpace"]

# Sums of grid levels are exact small integers in float32; this guards the rounding of the window.
_SLACK = 1e-6


@dataclasses.dataclass(frozen=True)
class BudgetSpace:
  """Per-step budgets on a grid, with the mean constrained to `budget * (1 +- tolerance)`.

  Attributes:
    num_steps: T_s, denoising steps (one theta each).
    budget: the target mean theta over the steps, in (0, 1].
    tolerance: relative half-width of the allowed window of the mean (the paper's 10%).
    levels: grid resolution: theta in {0, 1 / levels, ..., 1} (10: the paper's 0.1 grid).
  """

  num_steps: int
  budget: float
  tolerance: float = 0.1
  levels: int = 10

  def __post_init__(self):
    if not isinstance(self.num_steps, int) or self.num_steps < 2:
      raise ValueError(f"{self.num_steps=} must be an int >= 2 (step 0 is always dense)")
    if not isinstance(self.levels, int) or self.levels < 1:
      raise ValueError(f"{self.levels=} must be a positive int")
    object.__setattr__(self, "budget", float(self.budget))
    if not 0.0 < self.budget <= 1.0:
      raise ValueError(f"budget={self.budget:g} must lie in (0, 1]")
    if not 0.0 <= self.tolerance < 1.0:
      raise ValueError(f"{self.tolerance=} must lie in [0, 1)")
    lo, hi = self.units_window
    if lo > hi:
      t = self.num_steps
      raise ValueError(
          f"budget={self.budget} is unreachable: with step 0 dense and theta on a 1/{self.levels} "
          f"grid, the mean of {t} steps lies in [{1 / t:.3f}, 1], and no grid point has a mean "
          f"within {self.tolerance:.0%} of the budget")

  # -- the constraint in grid units --------------------------------------------------------------

  @property
  def units_window(self) -> tuple[int, int]:
    """Smallest and largest allowed sum of levels over the steps (step 0 counts `levels`)."""
    total = self.budget * self.levels * self.num_steps
    lo = math.ceil(total * (1.0 - self.tolerance) - _SLACK)
    hi = math.floor(total * (1.0 + self.tolerance) + _SLACK)
    return max(lo, self.levels), min(hi, self.levels * self.num_steps)

  @property
  def mean_window(self) -> tuple[float, float]:
    """The allowed range of the mean theta, on the grid."""
    lo, hi = self.units_window
    return lo / (self.levels * self.num_steps), hi / (self.levels * self.num_steps)

  def is_feasible(self, x: jax.Array) -> jax.Array:
    """Per candidate `[..., T_s]`: on the grid, step 0 dense, and the mean within the window."""
    lo, hi = self.units_window
    on_grid = jnp.all((x == jnp.round(x)) & (x >= 0) & (x <= self.levels), axis=-1)
    total = jnp.sum(x, axis=-1)
    return on_grid & (x[..., 0] == self.levels) & (total >= lo) & (total <= hi)

  # -- repair and sampling -----------------------------------------------------------------------

  def repair(self, key: jax.Array, x: jax.Array) -> jax.Array:
    """Maps `x [T_s]` (any floats) to a feasible candidate; jittable, vmap it over a population.

    Rounds to the grid, clips to [0, levels], sets step 0 dense, then, while the sum of levels is
    outside the window, moves one unit at a step drawn uniformly from those that can move (down
    when above the window, up when below). Feasible inputs come back unchanged; the steps that move
    are random so that repair does not bias the schedule's shape toward any part of the run.
    """
    lo, hi = self.units_window
    x = jnp.clip(jnp.round(jnp.nan_to_num(x.astype(jnp.float32))), 0, self.levels)
    x = x.at[0].set(self.levels)
    free = jnp.arange(self.num_steps) > 0  # [T_s]

    def outside(carry):
      _, x = carry
      total = jnp.sum(x)
      return (total < lo) | (total > hi)

    def move(carry):
      key, x = carry
      key, pick = jax.random.split(key)
      down = jnp.sum(x) > hi
      movable = free & jnp.where(down, x > 0, x < self.levels)
      # Gumbel-max over the movable steps: a uniform choice among them.
      score = jnp.where(movable, jax.random.gumbel(pick, x.shape), -jnp.inf)
      step = jnp.argmax(score)
      return key, x.at[step].add(jnp.where(down, -1.0, 1.0))

    # The window lies inside [levels, levels * T_s] (checked at construction), so the loop ends.
    _, x = jax.lax.while_loop(outside, move, (key, x))
    return x

  def repair_population(self, key: jax.Array, x: jax.Array) -> jax.Array:
    """`repair` over a population `[P, T_s]`."""
    return jax.vmap(self.repair)(jax.random.split(key, x.shape[0]), x)

  def sample(self, key: jax.Array, num: int) -> jax.Array:
    """`num` random feasible candidates `[num, T_s]`: uniform levels per step, then repaired."""
    draw, fix = jax.random.split(key)
    x = jax.random.randint(draw, (num, self.num_steps), 0, self.levels + 1).astype(jnp.float32)
    return self.repair_population(fix, x)

  def uniform_levels(self) -> np.ndarray:
    """The grid member closest to "dense step 0, the same theta afterwards" with mean `budget`.

    The remaining steps get the grid level nearest to `(budget * T_s - 1) / (T_s - 1)`, and single
    units are added or removed from the last steps backwards until the sum is in the window.
    """
    lo, hi = self.units_window
    t = self.num_steps
    rest = (self.budget * self.levels * t - self.levels) / (t - 1)
    x = np.full((t,), float(np.clip(np.round(rest), 0, self.levels)), np.float32)
    x[0] = self.levels
    step = t - 1
    while not lo <= x.sum() <= hi:
      delta = -1.0 if x.sum() > hi else 1.0
      if 0 <= x[step] + delta <= self.levels:
        x[step] += delta
      step = step - 1 if step > 1 else t - 1
    return x

  def step_cache_levels(self, exponent: float) -> np.ndarray:
    """A step-caching member of the space: n steps at theta = 1, the rest of the budget at the
    last step, every other step at theta = 0 (a whole-step cache hit).

    The computed steps sit at `round((T_s - 1) * (i / n) ** exponent)`, i = 0..n-1 (made strictly
    increasing): exponent 1 spaces them evenly, larger exponents crowd them into the early,
    high-noise steps, where step caches (TeaCache, EasyCache) also compute most. n and the remainder
    come from the largest allowed sum of levels, so the member uses the whole window.
    """
    if not exponent > 0:
      raise ValueError(f"{exponent=} must be positive")
    _, hi = self.units_window
    t, levels = self.num_steps, self.levels
    n, rest = divmod(hi, levels)  # hi <= levels * t, so a remainder leaves a free step
    x = np.zeros((t,), np.float32)
    previous = -1
    for i in range(n):
      # Leave room for the steps still to place after this one.
      pos = min(max(round((t - 1) * (i / n) ** exponent), previous + 1), t - (n - i))
      x[pos] = levels
      previous = pos
    if rest:
      x[np.flatnonzero(x == 0)[-1]] = rest  # the last free step
    return x

  # -- conversions -------------------------------------------------------------------------------

  def thetas(self, x) -> tuple[float, ...]:
    """Grid levels `[T_s]` -> thetas, as `BudgetSchedule` and `generate --schedule` read them."""
    levels = np.asarray(x, np.float64).reshape(-1)
    if levels.shape != (self.num_steps,):
      raise ValueError(f"candidate of shape {levels.shape} does not have {self.num_steps} steps")
    return tuple(int(round(v)) / self.levels for v in levels)

  def to_schedule(self, x, name: str = "") -> BudgetSchedule:
    return BudgetSchedule(self.thetas(x), name=name)

  def mean(self, x) -> float:
    return float(np.mean(self.thetas(x)))
