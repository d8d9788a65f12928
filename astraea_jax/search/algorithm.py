"""The genetic algorithm of ASTRAEA's budget search (arXiv 2506.05096, Sec. 4), an evosax algorithm.

The paper evolves per-step budget schedules with 50 parents and 30 offspring per generation for 30
generations, uniform and block crossover, and a mutation probability decaying from 0.1 to 0.01.
evosax's `SimpleGA` does not fit as it is: it adds Gaussian noise to real vectors, has no block
crossover and replaces the whole population every generation. `BudgetGA` is a custom evosax
`PopulationBasedAlgorithm` (same `init` / `ask` / `tell` API, jit-compiled by evosax's base class)
that works on the grid of `BudgetSpace`:

  state.population [P, T_s]: the parents (grid levels), state.fitness [P] their fitness (lower is
    better: the MSE against the dense output).
  ask:  O offspring, each from two parents picked by binary tournaments;
        crossover: with probability `block_crossover_prob` a block crossover (one random contiguous
          run of steps from the second parent, the rest from the first), otherwise a uniform one
          (each step from either parent with probability 1/2);
        mutation: each step, with probability p_g, gets a new grid level drawn uniformly;
          p_g falls linearly from `mutation_start` at the first generation to `mutation_end` at the
          last;
        repair onto the grid and into the mean-budget window (`BudgetSpace.repair`).
  tell: the P best of parents and offspring survive ((mu + lambda) selection: the best schedule is
        never lost, and the O offspring are the only new evaluations per generation). A NaN fitness
        counts as +inf.

The paper does not state its selection scheme; tournaments and (mu + lambda) survival are the usual
choices for a small elitist GA. The initial parents are the grid member nearest to the uniform
schedule of the target budget (the baseline the search must beat), a few step-caching schedules
(whole steps computed or skipped, front-loaded as adaptive step caches compute them), and random
feasible schedules; crossover then mixes token budgets with skipped steps.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from evosax.algorithms.population_based.base import (
    Params as BaseParams,
    PopulationBasedAlgorithm,
    State as BaseState,
)
from evosax.types import Fitness, Population
from flax import struct

from astraea_jax.search.space import BudgetSpace

__all__ = ["BudgetGA", "GAConfig", "GAParams", "GAState"]

# Spacings of the step-caching seeds: even (1) to strongly front-loaded (3).
_SEED_EXPONENTS = (1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 3.0)


@dataclasses.dataclass(frozen=True)
class GAConfig:
  """Sizes and rates of the search; the defaults are the paper's settings.

  Attributes:
    num_parents: P, parents kept from one generation to the next (the paper's population, 50).
    num_offspring: O, new schedules evaluated per generation (30).
    num_generations: G, generations after the initial population (30).
    mutation_start, mutation_end: per-step mutation probability at the first and last generation.
    block_crossover_prob: share of offspring made by block rather than uniform crossover.
    tournament_size: parents compared per tournament.
    step_cache_seeds: initial parents that are step-caching schedules (theta in {0, 1}, see
      `BudgetSpace.step_cache_levels`), at most 8; the composition of token budgets with whole-step
      caching is then searched from both ends.
  """

  num_parents: int = 50
  num_offspring: int = 30
  num_generations: int = 30
  mutation_start: float = 0.1
  mutation_end: float = 0.01
  block_crossover_prob: float = 0.5
  tournament_size: int = 2
  step_cache_seeds: int = 8

  def __post_init__(self):
    if (isinstance(self.step_cache_seeds, bool) or not isinstance(self.step_cache_seeds, int)
        or not 0 <= self.step_cache_seeds <= len(_SEED_EXPONENTS)):
      raise ValueError(f"step_cache_seeds={self.step_cache_seeds!r} must be an int in "
                       f"[0, {len(_SEED_EXPONENTS)}]")
    for name in ("num_parents", "num_offspring", "num_generations", "tournament_size"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value} must be a positive int")
    if self.num_parents < 2:
      raise ValueError(f"{self.num_parents=} must be at least 2 (crossover needs two parents)")
    for name in ("mutation_start", "mutation_end", "block_crossover_prob"):
      value = getattr(self, name)
      if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}={value} must lie in [0, 1]")

  @property
  def num_evaluations(self) -> int:
    """Schedules evaluated by a whole search: the initial parents, then O per generation."""
    return self.num_parents + self.num_generations * self.num_offspring


@struct.dataclass
class GAState(BaseState):
  population: Population  # [P, T_s] parents, grid levels
  fitness: Fitness  # [P]


@struct.dataclass
class GAParams(BaseParams):
  mutation_start: float
  mutation_end: float
  block_crossover_prob: float


class BudgetGA(PopulationBasedAlgorithm):
  """The paper's GA over `BudgetSpace` (see the module docstring).

  `population_size` (evosax's name for the number of solutions `ask` returns) is O; the initial
  population given to `init` has P rows.
  """

  def __init__(self, space: BudgetSpace, config: GAConfig = GAConfig()):
    super().__init__(config.num_offspring, jnp.zeros((space.num_steps,), jnp.float32))
    self.space = space
    self.config = config
    self.num_parents = config.num_parents

  # evosax jits ask / tell with the algorithm as a static argument: equal settings share programs.
  def __hash__(self) -> int:
    return hash((type(self), self.space, self.config))

  def __eq__(self, other) -> bool:
    return type(other) is type(self) and (self.space, self.config) == (other.space, other.config)

  @property
  def _default_params(self) -> GAParams:
    c = self.config
    return GAParams(mutation_start=c.mutation_start, mutation_end=c.mutation_end,
                    block_crossover_prob=c.block_crossover_prob)

  def initial_population(self, key: jax.Array) -> jax.Array:
    """P feasible parents `[P, T_s]`: the near-uniform grid member first, then up to
    `step_cache_seeds` step-caching members (`BudgetSpace.step_cache_levels`), then random ones."""
    uniform = self.space.uniform_levels()[None]  # [1, T_s]
    num_seeds = min(self.config.step_cache_seeds, self.num_parents - 1)
    seeds = np.array([self.space.step_cache_levels(e) for e in _SEED_EXPONENTS[:num_seeds]],
                     np.float32).reshape(num_seeds, self.space.num_steps)  # [S, T_s]
    rest = self.space.sample(key, self.num_parents - 1 - num_seeds)
    return jnp.concatenate([jnp.asarray(uniform), jnp.asarray(seeds), rest], axis=0)

  def mutation_prob(self, generation: jax.Array, params: GAParams) -> jax.Array:
    """p_g: linear from `mutation_start` (generation 0) to `mutation_end` (the last, G - 1)."""
    frac = jnp.clip(generation / max(self.config.num_generations - 1, 1), 0.0, 1.0)
    return params.mutation_start + frac * (params.mutation_end - params.mutation_start)

  def _init(self, key: jax.Array, params: GAParams) -> GAState:
    del key, params
    t = self.num_dims
    return GAState(population=jnp.full((self.num_parents, t), jnp.nan, jnp.float32),
                   fitness=jnp.full((self.num_parents,), jnp.inf, jnp.float32),
                   best_solution=jnp.full((t,), jnp.nan, jnp.float32),
                   best_fitness=jnp.inf, generation_counter=0)

  def _ask(self, key: jax.Array, state: GAState, params: GAParams) -> tuple[Population, GAState]:
    num = self.population_size
    k_sel, k_cross, k_mut, k_fix = jax.random.split(key, 4)
    first, second = self._tournaments(k_sel, state.fitness, num)  # [O] each
    children = jax.vmap(self._crossover, in_axes=(0, 0, 0, None))(
        jax.random.split(k_cross, num), state.population[first], state.population[second],
        params.block_crossover_prob)  # [O, T_s]
    prob = self.mutation_prob(state.generation_counter, params)
    children = jax.vmap(self._mutate, in_axes=(0, 0, None))(
        jax.random.split(k_mut, num), children, prob)
    return self.space.repair_population(k_fix, children), state

  def _tell(self, key: jax.Array, population: Population, fitness: Fitness, state: GAState,
            params: GAParams) -> GAState:
    del key, params
    pool = jnp.concatenate([state.population, population], axis=0)  # [P + O, T_s]
    scores = jnp.concatenate([state.fitness, _finite(fitness)], axis=0)  # [P + O]
    # Stable: on equal fitness the older schedule (a parent) stays.
    keep = jnp.argsort(scores, stable=True)[:self.num_parents]
    return state.replace(population=pool[keep], fitness=scores[keep])

  def _postprocess_fitness(self, raw_fitness: Fitness, fitness: Fitness) -> Fitness:
    del raw_fitness
    return _finite(fitness)

  # -- operators ---------------------------------------------------------------------------------

  def _tournaments(self, key: jax.Array, fitness: jax.Array, num: int):
    """Two parent indices `[O]` per offspring, each the fittest of `tournament_size` random ones."""
    size = self.config.tournament_size
    entrants = jax.random.randint(key, (2, num, size), 0, self.num_parents)  # [2, O, size]
    winner = jnp.argmin(fitness[entrants], axis=-1)  # [2, O]
    picked = jnp.take_along_axis(entrants, winner[..., None], axis=-1)[..., 0]
    return picked[0], picked[1]

  def _crossover(self, key: jax.Array, first: jax.Array, second: jax.Array,
                 block_prob: jax.Array) -> jax.Array:
    k_kind, k_mask, k_cut = jax.random.split(key, 3)
    steps = first.shape[0]
    uniform = jax.random.bernoulli(k_mask, 0.5, (steps,))
    cuts = jnp.sort(jax.random.randint(k_cut, (2,), 0, steps + 1))
    pos = jnp.arange(steps)
    block = (pos >= cuts[0]) & (pos < cuts[1])  # one contiguous run of steps
    take_second = jnp.where(jax.random.bernoulli(k_kind, block_prob), block, uniform)
    return jnp.where(take_second, second, first)

  def _mutate(self, key: jax.Array, x: jax.Array, prob: jax.Array) -> jax.Array:
    k_hit, k_level = jax.random.split(key)
    hit = jax.random.bernoulli(k_hit, prob, x.shape)
    level = jax.random.randint(k_level, x.shape, 0, self.space.levels + 1).astype(x.dtype)
    return jnp.where(hit, level, x)


def _finite(fitness: jax.Array) -> jax.Array:
  return jnp.where(jnp.isnan(fitness), jnp.inf, fitness).astype(jnp.float32)
