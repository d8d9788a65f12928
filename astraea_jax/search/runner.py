"""The search loop of ASTRAEA's budget search (arXiv 2506.05096, Sec. 4): evosax ask / evaluate /
tell over the generations, with a progress bar and a resumable state file.

Per generation: `BudgetGA.ask` (jitted) proposes O schedules, `evaluate` returns their fitness from
batched device runs (`PopulationFitness`), `BudgetGA.tell` (jitted) keeps the best P. After the
initial population and after every generation the whole state -- GA state, random key, history and
any cached arrays such as the dense latents -- is written atomically to the state file, so a run
that stops can be resumed from its last completed generation, and a resumed run gives exactly the
result an uninterrupted one would have.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from astraea_jax.search.algorithm import BudgetGA, GAConfig, GAState
from astraea_jax.search.space import BudgetSpace

__all__ = ["SearchResult", "StateFileError", "levels_evaluator", "read_state", "run_search"]

_STATE_FORMAT = "astraea-budget-search-state"
_STATE_VERSION = 1
_GA_FIELDS = ("population", "fitness", "best_solution", "best_fitness", "generation_counter")

# evaluate(levels [C, T_s] float32) -> fitness [C] (lower is better)
Evaluate = Callable[[np.ndarray], np.ndarray]


class StateFileError(ValueError):
  """The state file cannot be read, or belongs to another search."""


@dataclasses.dataclass(frozen=True)
class SearchResult:
  """Outcome of a search.

  Attributes:
    best: `[T_s]` grid levels of the best schedule found.
    fitness: its fitness (MSE against dense, averaged over the calibration prompts).
    uniform_fitness: fitness of the near-uniform grid member that seeds the initial population.
    history: per generation, `{"generation", "best", "mean", "seconds"}` (mean over the parents).
    evaluations: schedules evaluated in total (this run and any resumed part).
    seconds: wall time of the generations run in this process (initial population included).
    resumed_from: generations already done in the state file when this run started (0: fresh).
  """

  best: np.ndarray
  fitness: float
  uniform_fitness: float
  history: tuple[dict[str, float], ...]
  evaluations: int
  seconds: float
  resumed_from: int


def read_state(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(meta, arrays) of a state file; StateFileError if it is not one."""
  try:
    with np.load(path, allow_pickle=False) as data:
      arrays = {k: np.asarray(data[k]) for k in data.files}
    header = json.loads(str(arrays.pop("header")))
  except (OSError, ValueError, KeyError, EOFError) as e:
    raise StateFileError(f"cannot read search state {str(path)!r}: {e}") from None
  if header.get("format") != _STATE_FORMAT or header.get("version") != _STATE_VERSION:
    raise StateFileError(f"{str(path)!r} is not a budget search state file (version "
                         f"{_STATE_VERSION})")
  return header, arrays


def _write_state(path: Path, header: dict[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
  # Written beside the target and renamed over it: an interrupted write never leaves a torn file.
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=path.parent)
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, header=np.asarray(json.dumps(header)), **arrays)
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise


def _check_meta(path, stored: dict[str, Any], meta: dict[str, Any]) -> None:
  stored = dict(stored)
  current = json.loads(json.dumps(meta))  # the same JSON normal form as the stored copy
  for key in sorted(set(stored) | set(current)):
    if stored.get(key) != current.get(key):
      raise StateFileError(
          f"state file {str(path)!r} belongs to another search: {key} is {stored.get(key)!r} "
          f"there, {current.get(key)!r} now (use another --state file)")


def run_search(space: BudgetSpace, config: GAConfig, evaluate: Evaluate, *, seed: int = 0,
               state_path: str | os.PathLike | None = None, meta: Mapping[str, Any] | None = None,
               cache: Mapping[str, np.ndarray] | None = None, progress: bool = True,
               stop_after: int | None = None) -> SearchResult:
  """Runs (or resumes) the search.

  Args:
    space: the schedules searched.
    config: population sizes, generations, mutation schedule.
    evaluate: fitness of a population of grid levels `[C, T_s]` -> `[C]`.
    seed: seed of the GA's random key.
    state_path: the state file; resumed from if it exists, (re)written after every generation
      (by process 0 alone when `jax.distributed` runs several).
    meta: JSON-able description of the search (model, prompts, size, ...): a state file written
      with other meta, space, config or seed is refused.
    cache: arrays stored in the state file beside the GA state (e.g. the dense latents).
    progress: show a bar over the generations with the best and mean fitness.
    stop_after: stop after this generation (for tests and time-boxed jobs); the state file then
      resumes from it.
  """
  algo = BudgetGA(space, config)
  params = algo.default_params
  full_meta = {"space": dataclasses.asdict(space), "ga": dataclasses.asdict(config), "seed": seed,
               **dict(meta or {})}
  header = {"format": _STATE_FORMAT, "version": _STATE_VERSION, "meta": full_meta}
  path = None if state_path is None else Path(state_path)
  start = time.perf_counter()
  history: list[dict[str, float]] = []

  if path is not None and path.exists():
    stored, arrays = read_state(path)
    _check_meta(path, stored.get("meta", {}), full_meta)
    state = GAState(**{k: jnp.asarray(arrays[k]) for k in _GA_FIELDS})
    key = jax.random.wrap_key_data(jnp.asarray(arrays["key"]))
    history = list(stored["history"])
    uniform_fitness = float(stored["uniform_fitness"])
    evaluations = int(stored["evaluations"])
    extra = {k: v for k, v in arrays.items() if k not in (*_GA_FIELDS, "key")}
  else:
    key, k_pop, k_init = jax.random.split(jax.random.key(seed), 3)
    parents = algo.initial_population(k_pop)  # [P, T_s]
    fitness = np.asarray(evaluate(np.asarray(parents)), np.float64)
    state = algo.init(k_init, parents, jnp.asarray(fitness, jnp.float32), params)
    uniform_fitness = float(fitness[0])
    evaluations = config.num_parents
    extra = {k: np.asarray(v) for k, v in (cache or {}).items()}

  def save():
    if path is None or jax.process_index() != 0:  # several processes: process 0 writes it
      return
    arrays = {k: np.asarray(getattr(state, k)) for k in _GA_FIELDS}
    arrays["key"] = np.asarray(jax.random.key_data(key))
    _write_state(path, {**header, "history": history, "uniform_fitness": uniform_fitness,
                        "evaluations": evaluations}, {**arrays, **extra})

  resumed_from = len(history)
  if resumed_from == 0:
    save()
  last = config.num_generations if stop_after is None else min(stop_after,
                                                               config.num_generations)
  bar = tqdm(total=config.num_generations, initial=resumed_from, desc="search", unit="gen",
             disable=not progress)
  try:
    if history:
      bar.set_postfix(best=f"{history[-1]['best']:.4g}", mean=f"{history[-1]['mean']:.4g}")
    for generation in range(resumed_from, last):
      gen_start = time.perf_counter()
      key, k_ask, k_tell = jax.random.split(key, 3)
      children, state = algo.ask(k_ask, state, params)  # [O, T_s]
      fitness = np.asarray(evaluate(np.asarray(children)), np.float64)
      state, _ = algo.tell(k_tell, children, jnp.asarray(fitness, jnp.float32), state, params)
      evaluations += config.num_offspring
      parents_fit = np.asarray(state.fitness, np.float64)
      finite = parents_fit[np.isfinite(parents_fit)]
      history.append({"generation": generation + 1, "best": float(state.best_fitness),
                      "mean": float(finite.mean()) if finite.size else float("inf"),
                      "seconds": time.perf_counter() - gen_start})
      save()
      bar.set_postfix(best=f"{history[-1]['best']:.4g}", mean=f"{history[-1]['mean']:.4g}")
      bar.update()
  finally:
    bar.close()

  best = np.asarray(state.best_solution, np.float32)
  return SearchResult(best=best, fitness=float(state.best_fitness),
                      uniform_fitness=uniform_fitness, history=tuple(history),
                      evaluations=evaluations, seconds=time.perf_counter() - start,
                      resumed_from=resumed_from)


def levels_evaluator(space: BudgetSpace, fitness_of_thetas: Callable[[np.ndarray], np.ndarray]
                     ) -> Evaluate:
  """Adapts a fitness of thetas `[C, T_s]` (e.g. `PopulationFitness`) to grid levels."""

  def evaluate(levels: np.ndarray) -> np.ndarray:
    return fitness_of_thetas(np.array([space.thetas(x) for x in np.asarray(levels)]))

  return evaluate
