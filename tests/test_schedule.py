"""Budget schedules: constructors, k per step, JSON round trip and input validation."""

import json

import numpy as np
import pytest

from astraea_jax.acceleration.schedule import (
    BudgetSchedule,
    load_schedules,
    num_selected_tokens,
    shipped_schedule,
)


def test_uniform_and_dense():
  s = BudgetSchedule.uniform(5, 0.4)
  assert s.thetas == (0.4,) * 5 and len(s) == 5 and s.num_steps == 5
  assert s.mean == pytest.approx(0.4)
  assert BudgetSchedule.dense(3).thetas == (1.0, 1.0, 1.0)


def test_dense_then():
  s = BudgetSchedule.dense_then(10, 0.3, dense_steps=2)
  assert s.thetas == (1.0, 1.0) + (0.3,) * 8
  assert s.mean == pytest.approx((2 + 8 * 0.3) / 10)
  assert BudgetSchedule.dense_then(4, 0.5, dense_steps=0).thetas == (0.5,) * 4
  with pytest.raises(ValueError, match="dense_steps"):
    BudgetSchedule.dense_then(4, 0.5, dense_steps=5)


@pytest.mark.parametrize("mean, theta", [(0.4, 0.25), (0.5, 0.375), (0.7, 0.625)])
def test_dense_then_mean_hits_the_budget(mean, theta):
  s = BudgetSchedule.dense_then_mean(50, mean, dense_fraction=0.2)
  assert s.thetas[:10] == (1.0,) * 10
  assert s.thetas[10:] == pytest.approx((theta,) * 40)
  assert s.mean == pytest.approx(mean)


def test_dense_then_mean_quantized_and_unreachable():
  s = BudgetSchedule.dense_then_mean(50, 0.4, dense_fraction=0.2, quantum=0.1)
  assert s.thetas[10:] == pytest.approx((0.2,) * 40)
  assert s.mean <= 0.4
  with pytest.raises(ValueError, match="unreachable"):
    BudgetSchedule.dense_then_mean(50, 0.1, dense_fraction=0.2)


def test_num_selected_rounds_up_to_a_multiple():
  s = BudgetSchedule((0.3, 0.3, 0.0, 0.95, 1.0))
  assert [s.num_selected(i, 10, multiple=2) for i in range(5)] == [10, 4, 0, 10, 10]
  assert [s.num_selected(i, 21, multiple=4) for i in range(5)] == [21, 8, 0, 20, 21]
  assert s.effective_mean(10, multiple=2) == (10 + 4 + 0 + 10 + 10) / 50
  with pytest.raises(ValueError, match="multiple"):
    s.num_selected(1, 10, multiple=0)


def test_block_cache_read_after_looks_for_the_next_computing_step():
  s = BudgetSchedule((1.0, 1.0, 0.0, 1.0, 0.0, 0.5, 0.04, 1.0, 0.0))
  # Step 1 is followed (after a skip) by a dense step, step 3 (after a skip) by a partial one;
  # 0.04 of 10 tokens rounds to 0, a skip; nothing computes after the last dense step.
  assert [s.block_cache_read_after(i, 10) for i in range(9)] == [
      False, False, False, True, True, False, False, False, False]
  # k = 9 of 10 is partial; rounded up to a multiple of 2 it is 10, a dense step.
  s = BudgetSchedule((1.0, 1.0, 0.9))
  assert s.block_cache_read_after(1, 10) and not s.block_cache_read_after(1, 10, multiple=2)


def test_num_selected_rounds_half_up_and_forces_step_zero_dense():
  assert num_selected_tokens(0.5, 5) == 3  # Python's round(2.5) would give 2
  assert num_selected_tokens(0.4, 32760) == 13104
  assert num_selected_tokens(0.0, 7) == 0 and num_selected_tokens(1.0, 7) == 7
  s = BudgetSchedule((0.0, 0.5, 0.0, 1.0))
  assert [s.num_selected(i, 10) for i in range(4)] == [10, 5, 0, 10]
  assert s.effective_mean(10) == pytest.approx((10 + 5 + 0 + 10) / 40)
  with pytest.raises(IndexError):
    s.num_selected(4, 10)
  with pytest.raises(ValueError, match="num_tokens"):
    s.num_selected(1, 0)


def test_json_round_trip(tmp_path):
  s = BudgetSchedule.dense_then(6, 0.35, dense_steps=1)
  path = tmp_path / "schedule.json"
  s.save(path)
  data = json.loads(path.read_text())
  assert data["thetas"] == list(s.thetas) and data["format"] == "astraea-budget-schedule"
  assert BudgetSchedule.load(path) == s
  assert BudgetSchedule.from_json(s.to_json()) == s


@pytest.mark.parametrize("text, match", [
    ("not json", "invalid JSON"),
    ('{"thetas": [0.5]}', "format"),
    ('{"format": "astraea-budget-schedule", "version": 2, "thetas": [0.5]}', "version"),
    ('{"format": "astraea-budget-schedule", "version": 1, "thetas": "0.5"}', "list of numbers"),
    ('{"format": "astraea-budget-schedule", "version": 1, "thetas": [0.5, 1.5]}', r"thetas\[1\]"),
    ('{"format": "astraea-budget-schedule", "version": 1, "thetas": []}', "at least one"),
])
def test_bad_json_raises_value_error(text, match):
  with pytest.raises(ValueError, match=match):
    BudgetSchedule.from_json(text)


def test_invalid_thetas():
  with pytest.raises(ValueError, match=r"thetas\[0\]"):
    BudgetSchedule((-0.1,))
  with pytest.raises(ValueError, match=r"thetas\[1\]"):
    BudgetSchedule((0.5, float("nan")))
  with pytest.raises(ValueError, match="num_steps"):
    BudgetSchedule.uniform(0, 0.5)
  with pytest.raises(ValueError, match="theta"):
    num_selected_tokens(1.2, 10)


@pytest.mark.parametrize("src,steps", [(20, 50), (50, 20), (7, 30), (30, 7), (20, 20), (3, 1)])
def test_resample_keeps_the_mean(src, steps):
  rng = np.random.default_rng(src * 100 + steps)
  thetas = np.where(rng.random(src) < 0.5, 1.0, rng.choice([0.0, 0.2, 0.7], src))
  s = BudgetSchedule(tuple(thetas), name="x")
  r = s.resample(steps, mode="average")
  assert len(r) == steps and r.name == "x"
  assert r.mean == pytest.approx(s.mean, abs=1e-9)
  assert all(0.0 <= t <= 1.0 for t in r.thetas)


@pytest.mark.parametrize("src,steps", [(20, 50), (50, 20), (7, 30), (30, 7), (20, 20), (3, 1),
                                       (20, 40)])
def test_resample_repeat_runs_only_source_thetas_in_order(src, steps):
  rng = np.random.default_rng(src * 100 + steps)
  thetas = np.where(rng.random(src) < 0.5, 1.0, rng.choice([0.0, 0.2, 0.7], src))
  s = BudgetSchedule(tuple(thetas), name="x")
  r = s.resample(steps)  # the default mode
  assert len(r) == steps and r.name == "x"
  # Each source step appears floor(r) or ceil(r) times, in order: compare runs of equal values.
  def runs(values):
    out = []
    for v in values:
      if out and out[-1][0] == v:
        out[-1][1] += 1
      else:
        out.append([v, 1])
    return out

  lo, hi = steps // src, -(-steps // src)
  got = runs(r.thetas)
  want = [(v, n) for v, n in runs(thetas.tolist()) if hi * n > 0]
  if lo == 0:  # dropping steps may merge runs; only check the values that remain
    assert set(r.thetas) <= set(thetas.tolist())
  else:
    assert [v for v, _ in got] == [v for v, _ in want]
    assert all(lo * n <= m <= hi * n for (_, m), (_, n) in zip(got, want))
  assert abs(r.mean - s.mean) <= max(thetas) / steps + 1e-9
  if steps % src == 0:
    assert r.thetas == tuple(t for t in thetas for _ in range(steps // src))


def test_resample_repeat_keeps_a_step_caching_schedule_whole():
  # The 20-step seeded search result at 50 steps: 20 whole steps and 3 steps at 0.2.
  s = BudgetSchedule((1, 1, 1, 1, 0, 1, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0.2))
  r = s.resample(50)
  assert r.thetas.count(1.0) == 20 and r.thetas.count(0.2) == 3 and r.thetas.count(0.0) == 27
  assert r.mean == pytest.approx(0.412)
  assert s.resample(50, mode="average").mean == pytest.approx(0.41)
  with pytest.raises(ValueError, match="mode"):
    s.resample(50, mode="nearest")


def test_resample_splits_straddling_steps_and_is_identity_at_the_same_length():
  s = BudgetSchedule((1.0, 0.0))
  assert s.resample(2, mode="average").thetas == (1.0, 0.0)
  assert s.resample(4, mode="average").thetas == (1.0, 1.0, 0.0, 0.0)
  # Three steps over two: the middle one straddles the boundary.
  assert s.resample(3, mode="average").thetas == (1.0, 0.5, 0.0)
  assert BudgetSchedule((0.2, 0.4, 0.9)).resample(1, mode="average").thetas == (0.5,)
  with pytest.raises(ValueError):
    s.resample(0)


def test_shipped_schedules_are_found_by_mean_and_step_count(tmp_path):
  assert load_schedules(tmp_path / "none") == ()
  half = BudgetSchedule((1.0, 0.0, 1.0, 0.0), name="half")
  half.save(tmp_path / "b.json")
  BudgetSchedule((1.0, 0.5, 0.5, 0.0), name="half-partial").save(tmp_path / "a.json")
  BudgetSchedule.uniform(6, 0.5).save(tmp_path / "c.json")
  (tmp_path / "notes.txt").write_text("not a schedule, not read")
  schedules = load_schedules(tmp_path)
  assert [s.name for s in schedules] == ["half-partial", "half", "uniform-0.5"]
  assert shipped_schedule(schedules, 0.5, 4).name == "half-partial"  # the first by file name
  assert shipped_schedule(schedules[1:], 0.5, 4) == half
  assert shipped_schedule(schedules, 0.4, 4) is None
  assert shipped_schedule(schedules, 0.5, 5) is None
  (tmp_path / "d.json").write_text("{truncated")
  with pytest.raises(ValueError, match="d.json"):
    load_schedules(tmp_path)


def test_the_default_model_ships_whole_step_schedules_at_their_budgets():
  from astraea_jax.default_model import WEIGHTS  # pylint: disable=import-outside-toplevel

  schedules = load_schedules(WEIGHTS / "schedules")
  for budget in (0.4, 0.5, 0.7):
    schedule = shipped_schedule(schedules, budget, 20)
    assert schedule is not None and schedule.thetas[0] == 1.0
    assert set(schedule.thetas) == {0.0, 1.0}
