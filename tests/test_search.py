"""astraea_jax.search: the budget space and its repair, the GA's jitted ask/tell, batched population
fitness against per-candidate generation, a small resumable search on the default model, and the
CLI's output and one-line errors."""

import dataclasses
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from astraea_jax.acceleration import BudgetSchedule
from astraea_jax.default_model import load_default_pipeline
from astraea_jax.search import cli
from astraea_jax.search.algorithm import BudgetGA, GAConfig
from astraea_jax.search.fitness import PopulationFitness, calibration_prompts, held_out_prompts
from astraea_jax.search.runner import StateFileError, levels_evaluator, read_state, run_search
from astraea_jax.search.space import BudgetSpace

# 32x32 pixels, 5 frames: N = 5 * 4 * 4 = 80 tokens, so every theta on the 0.1 grid has its own k.
SMALL = dict(height=32, width=32, frames=5, steps=4)
CHUNK = 3
# One padded group per k (a chunk has 3 candidates x 2 prompts x 2 CFG halves = 12 rows): few
# compiled programs on CPU.
MIN_BUCKET = 12


# -- the space -----------------------------------------------------------------------------------


@pytest.mark.parametrize("steps, budget", [(4, 0.5), (20, 0.2), (50, 0.7), (8, 1.0)])
def test_repair_lands_on_grid_within_ten_percent(steps, budget):
  space = BudgetSpace(num_steps=steps, budget=budget)
  key = jax.random.key(steps)
  raw = jax.random.uniform(key, (64, steps), minval=-3.0, maxval=14.0)
  raw = raw.at[0, 1].set(jnp.nan)
  fixed = np.asarray(jax.jit(space.repair_population)(jax.random.key(1), raw))
  assert np.all(np.asarray(space.is_feasible(jnp.asarray(fixed))))
  assert np.all(fixed == np.round(fixed)) and fixed.min() >= 0 and fixed.max() <= 10
  assert np.all(fixed[:, 0] == 10)
  means = fixed.astype(np.float64).mean(axis=1) / 10
  assert np.all(np.abs(means - budget) <= 0.1 * budget + 1e-12), means
  # Feasible candidates are left alone.
  again = np.asarray(jax.jit(space.repair_population)(jax.random.key(2), jnp.asarray(fixed)))
  np.testing.assert_array_equal(again, fixed)
  uniform = space.uniform_levels()
  assert bool(space.is_feasible(jnp.asarray(uniform))) and len(set(uniform[1:])) <= 2


def test_space_conversions_and_impossible_budgets():
  space = BudgetSpace(num_steps=4, budget=0.5)
  schedule = space.to_schedule(np.array([10, 3, 7, 0], np.float32), name="s")
  assert schedule.thetas == (1.0, 0.3, 0.7, 0.0) and schedule.name == "s"
  assert space.mean_window == (0.45, 0.55)
  for budget in (1.5, -0.1, 0.0, float("nan")):
    with pytest.raises(ValueError, match="must lie in"):
      BudgetSpace(num_steps=20, budget=budget)
  with pytest.raises(ValueError, match="unreachable"):
    BudgetSpace(num_steps=4, budget=0.1)  # step 0 alone already makes the mean 0.25


# -- the algorithm -------------------------------------------------------------------------------


def test_ask_tell_jit_keep_constraints_and_improve():
  space = BudgetSpace(num_steps=20, budget=0.4)
  # No step-caching seeds: the operators alone must find the toy optimum from random parents.
  config = GAConfig(num_parents=12, num_offspring=8, num_generations=12, step_cache_seeds=0)
  algo = BudgetGA(space, config)
  params = algo.default_params
  target = jnp.asarray(np.r_[10, np.linspace(8, 1, 19).round()], jnp.float32)

  def toy_fitness(x):  # a known optimum shape: decreasing budgets
    return jnp.mean(jnp.square(x - target), axis=-1)

  parents = algo.initial_population(jax.random.key(0))
  np.testing.assert_array_equal(parents[0], space.uniform_levels())
  state = algo.init(jax.random.key(1), parents, toy_fitness(parents), params)
  start = float(state.best_fitness)
  best = [start]
  for g in range(config.num_generations):
    children, state = algo.ask(jax.random.key(10 + g), state, params)
    assert children.shape == (8, 20)
    assert np.all(np.asarray(space.is_feasible(children)))
    state, _ = algo.tell(jax.random.key(100 + g), children, toy_fitness(children), state, params)
    best.append(float(state.best_fitness))
  assert np.all(np.diff(best) <= 0) and best[-1] < 0.5 * start
  assert np.all(np.asarray(space.is_feasible(state.population)))
  np.testing.assert_allclose(float(state.best_fitness), float(jnp.min(state.fitness)))
  assert float(algo.mutation_prob(jnp.int32(0), params)) == pytest.approx(0.1)
  assert float(algo.mutation_prob(jnp.int32(11), params)) == pytest.approx(0.01)
  # ask and tell are jax.jit functions (evosax compiles them with the algorithm static).
  assert hasattr(BudgetGA.ask, "lower") and hasattr(BudgetGA.tell, "lower")


@pytest.mark.parametrize("steps,budget", [(20, 0.25), (20, 0.4), (50, 0.3), (8, 0.6), (4, 0.9)])
def test_step_cache_seeds_are_feasible_whole_steps(steps, budget):
  space = BudgetSpace(num_steps=steps, budget=budget)
  _, hi = space.units_window
  for exponent in (1.0, 1.5, 2.0, 3.0):
    x = space.step_cache_levels(exponent)
    assert bool(space.is_feasible(jnp.asarray(x))), (exponent, x)
    assert x.sum() == hi
    # Whole steps computed or skipped, apart from one step holding the remainder.
    assert np.sum((x > 0) & (x < space.levels)) <= 1
  even, early = space.step_cache_levels(1.0), space.step_cache_levels(3.0)
  # A larger exponent crowds the computed steps toward the start.
  full = space.levels
  assert np.mean(np.flatnonzero(early == full)) <= np.mean(np.flatnonzero(even == full))
  with pytest.raises(ValueError, match="exponent"):
    space.step_cache_levels(0.0)


def test_initial_population_holds_uniform_step_cache_and_random_members():
  space = BudgetSpace(num_steps=20, budget=0.25)
  parents = np.asarray(BudgetGA(space, GAConfig(num_parents=12, num_offspring=4)).initial_population(
      jax.random.key(0)))
  assert parents.shape == (12, 20) and np.all(np.asarray(space.is_feasible(parents)))
  np.testing.assert_array_equal(parents[0], space.uniform_levels())
  np.testing.assert_array_equal(parents[1], space.step_cache_levels(1.0))
  np.testing.assert_array_equal(parents[8], space.step_cache_levels(3.0))
  # Without seeds: uniform, then random members only.
  plain = np.asarray(BudgetGA(space, GAConfig(num_parents=12, step_cache_seeds=0))
                     .initial_population(jax.random.key(0)))
  assert not any(np.array_equal(row, space.step_cache_levels(1.0)) for row in plain[1:])
  # Fewer parents than seeds: the seeds are cut, the population keeps its size.
  small = BudgetGA(space, GAConfig(num_parents=3)).initial_population(jax.random.key(0))
  assert small.shape == (3, 20)


def test_ga_config_validation():
  with pytest.raises(ValueError, match="step_cache_seeds"):
    GAConfig(step_cache_seeds=9)
  # The CLI checks the same limit before importing jax.
  GAConfig(step_cache_seeds=cli.MAX_STEP_CACHE_SEEDS)
  with pytest.raises(ValueError, match="step_cache_seeds"):
    GAConfig(step_cache_seeds=cli.MAX_STEP_CACHE_SEEDS + 1)
  with pytest.raises(ValueError, match="num_parents=1"):
    GAConfig(num_parents=1)
  with pytest.raises(ValueError, match="mutation_start=1.5"):
    GAConfig(mutation_start=1.5)


# -- population fitness on the default model -----------------------------------------------------


@pytest.fixture(scope="module")
def pipe():
  return load_default_pipeline()


@pytest.fixture(scope="module")
def fitness(pipe):
  cfg = dataclasses.replace(pipe.defaults, **SMALL)
  return PopulationFitness(pipe, calibration_prompts(2), cfg, chunk=CHUNK, min_bucket=MIN_BUCKET)


def test_prompt_sets_are_disjoint():
  calib = calibration_prompts(4)
  held = held_out_prompts(8, exclude=calib)
  assert len(set(calib)) == 4 and len(set(held)) == 8 and not set(calib) & set(held)
  assert calibration_prompts(4) == calib


def test_batched_population_equals_generate_per_candidate(pipe, fitness):
  # 4 candidates = one full chunk and one padded chunk; thetas {0, 0.5, 1} keep compiles few.
  thetas = np.array([[1, .5, 0, .5], [1, 1, .5, 0], [1, 0, 0, 1], [1, .5, .5, .5]])
  latents = fitness.final_latents(thetas)  # [C, P, 3, 5, 32, 32]
  assert latents.shape == (4, 2, 3, 5, 32, 32)
  mse = fitness(thetas)
  np.testing.assert_allclose(
      mse, np.mean(np.square(latents - fitness.dense[None]), axis=(1, 2, 3, 4, 5)), rtol=1e-5)
  assert np.all(mse > 0)
  for c, j in [(0, 0), (0, 1), (2, 1), (3, 0)]:
    cfg = dataclasses.replace(fitness.cfg, seed=fitness.cfg.seed + j)
    alone = pipe.generate([fitness.prompts[j]], cfg, schedule=BudgetSchedule(tuple(thetas[c])),
                          progress=False)
    np.testing.assert_allclose(latents[c, j], alone.latents[0], atol=1e-4)
  dense = pipe.generate([fitness.prompts[1]], dataclasses.replace(fitness.cfg, seed=1),
                        progress=False)
  np.testing.assert_allclose(fitness.dense[1], dense.latents[0], atol=1e-4)
  # Grouping is by k: one program per (k, bucket), never one per candidate; the programs were
  # compiled ahead of the loops (the latents above equal `generate`, which does not use them).
  assert {k for k, _ in fitness.variants} <= {0, 40, 80}
  assert 0 < fitness.compiled_ahead <= len(fitness.variants)


def test_small_search_is_deterministic_and_resumable(fitness, tmp_path):
  # A 3-level grid (theta in {0, 0.5, 1}) reuses the programs compiled above.
  space = BudgetSpace(num_steps=4, budget=0.5, levels=2)
  config = GAConfig(num_parents=4, num_offspring=3, num_generations=2)
  evaluate = levels_evaluator(space, fitness)
  whole = run_search(space, config, evaluate, seed=3, progress=False)
  state = tmp_path / "s.npz"
  first = run_search(space, config, evaluate, seed=3, state_path=state, progress=False,
                     stop_after=1, meta={"prompts": fitness.prompts})
  assert len(first.history) == 1 and read_state(state)[0]["history"][0]["generation"] == 1
  resumed = run_search(space, config, evaluate, seed=3, state_path=state, progress=False,
                       meta={"prompts": fitness.prompts})
  # The run stopped after one generation and resumed is the same search as the whole one.
  assert resumed.resumed_from == 1 and resumed.evaluations == 4 + 3 * 2
  np.testing.assert_array_equal(resumed.best, whole.best)
  assert resumed.fitness == whole.fitness and resumed.uniform_fitness == whole.uniform_fitness
  assert [h["best"] for h in resumed.history] == [h["best"] for h in whole.history]
  assert [h["mean"] for h in resumed.history] == [h["mean"] for h in whole.history]
  assert whole.fitness <= whole.uniform_fitness
  assert bool(space.is_feasible(jnp.asarray(whole.best)))
  with pytest.raises(StateFileError, match="another search"):
    run_search(space, config, evaluate, seed=4, state_path=state, progress=False,
               meta={"prompts": fitness.prompts})


@pytest.mark.parametrize("devices", [2, 4])
def test_population_sharded_over_devices_equals_one_device(pipe, fitness, devices):
  # The batch rows split over a data mesh of `devices` fake CPU devices: same fitness and latents.
  thetas = np.array([[1, .5, 0, .5], [1, 1, .5, 0], [1, 0, 0, 1]])
  sharded = PopulationFitness(pipe, fitness.prompts, fitness.cfg, chunk=CHUNK,
                              min_bucket=MIN_BUCKET, dense=fitness.dense, devices=devices)
  assert len(sharded._rows_noise.sharding.device_set) == devices  # pylint: disable=protected-access
  np.testing.assert_allclose(sharded(thetas), fitness(thetas), rtol=1e-5)
  assert all(b % devices == 0 for _, b in sharded.variants) and sharded.compiled_ahead > 0
  np.testing.assert_allclose(sharded.final_latents(thetas[:1]), fitness.final_latents(thetas[:1]),
                             rtol=1e-5, atol=1e-6)


# -- the CLI -------------------------------------------------------------------------------------


def _cli_args(tmp_path, *extra):
  return ["--quiet", "--steps", "4", "--size", "32x32", "--frames", "5", "--num-prompts", "2",
          "--population", "4", "--offspring", str(CHUNK), "--generations", "1",
          "--min-bucket", str(MIN_BUCKET), *extra]


def test_cli_writes_loadable_schedule_and_resumes(fitness, tmp_path, capsys):
  del fitness  # compiles the programs this search shares
  out, state = tmp_path / "schedule.json", tmp_path / "state.npz"
  # Budget 0.3 over 4 steps leaves thetas 0 .. 0.3 after the dense step: few programs to compile.
  args = _cli_args(tmp_path, "--budget", "0.3", "--out", str(out), "--state", str(state))
  assert cli.main(args) == 0, capsys.readouterr().err
  schedule = BudgetSchedule.load(out)
  record = json.loads(out.read_text())
  assert len(schedule) == 4 and schedule.thetas[0] == 1.0 and 0.27 <= schedule.mean <= 0.33
  assert all(round(t * 10) == t * 10 for t in schedule.thetas)
  assert record["budget"] == 0.3 and record["model"] == "default" and record["size"] == "32x32"
  assert record["steps"] == 4 and record["prompts"] == calibration_prompts(2)
  assert record["fitness"] <= record["uniform_fitness"] and record["evaluations"] == 4 + CHUNK
  assert "wrote" in capsys.readouterr().out
  # The finished state file resumes to the same schedule without evaluating anything.
  out2 = tmp_path / "again.json"
  assert cli.main(_cli_args(tmp_path, "--budget", "0.3", "--out", str(out2), "--state",
                            str(state))) == 0
  assert json.loads(out2.read_text())["thetas"] == record["thetas"]


def test_cli_whole_step_levels(fitness, tmp_path, capsys):
  del fitness
  out = tmp_path / "whole.json"
  args = _cli_args(tmp_path, "--budget", "0.5", "--tolerance", "0", "--levels", "1", "--out",
                   str(out))
  assert cli.main(args) == 0, capsys.readouterr().err
  record = json.loads(out.read_text())
  assert record["levels"] == 1 and record["thetas"][0] == 1.0
  assert sorted(record["thetas"]) == [0.0, 0.0, 1.0, 1.0]  # mean exactly 0.5, whole steps


@pytest.mark.parametrize("extra, message", [
    (["--budget", "1.5"], "--budget 1.5 must lie in (0, 1]"),
    (["--levels", "0"], "--levels 0 must be positive"),
    (["--levels", "1", "--budget", "0.3", "--tolerance", "0"], "budget=0.3 is unreachable"),
    (["--budget", "-0.1"], "--budget -0.1 must lie in (0, 1]"),
    (["--prompts", "missing.txt"], "cannot read prompts file"),
    (["--prompts", "empty.txt"], "has no prompts"),
    (["--out", "nodir/schedule.json"], "does not exist"),
    (["--population", "0"], "--population 0 must be positive"),
    (["--devices", "0"], "--devices 0 must be at least 1"),
    (["--devices", "99"], "--devices 99 must be at most"),
])
def test_cli_bad_input_one_line_no_file(tmp_path, capsys, monkeypatch, extra, message):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "empty.txt").write_text("\n  \n")
  args = _cli_args(tmp_path, "--out", "schedule.json", *extra)
  assert cli.main(args) == 1
  lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], lines
  assert not list(tmp_path.glob("*.json")) and not list(tmp_path.glob("nodir"))


def test_module_entry_point_reports_impossible_budget(tmp_path):
  r = subprocess.run([sys.executable, "-m", "astraea_jax.search", "--budget", "1.5", "--out",
                      "s.json"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
  assert r.returncode == 1 and r.stderr.strip().count("\n") == 0
  assert r.stderr.startswith("error: --budget 1.5") and not (tmp_path / "s.json").exists()
