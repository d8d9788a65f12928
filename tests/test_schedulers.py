"""Flow-matching UniPC and flow Euler schedulers against diffusers and against analytic solutions.

Goldens: tests/goldens/make_unipc_goldens.py (diffusers' `UniPCMultistepScheduler` with Wan2.1's
settings, both sigma schedules, fed recorded float32 model outputs step by step).
"""

import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from astraea_jax.sampling.schedulers import (
    FlowEulerConfig,
    FlowEulerScheduler,
    FlowUniPCConfig,
    FlowUniPCScheduler,
    SchedulerState,
    flow_sigmas,
    make_scheduler,
)

GOLDENS = pathlib.Path(__file__).parent / "goldens" / "unipc"
CASES = json.loads((GOLDENS / "cases.json").read_text())["cases"]


@pytest.fixture(scope="module")
def golden():
  with np.load(GOLDENS / "unipc_golden.npz") as f:
    return {k: f[k] for k in f.files}


def case_scheduler(settings: dict) -> FlowUniPCScheduler:
  return FlowUniPCScheduler(FlowUniPCConfig(
      sigma_schedule=settings["sigma_schedule"], shift=settings["shift"],
      solver_order=settings.get("solver_order", 2), solver_type=settings.get("solver_type", "bh2"),
      disable_corrector=tuple(settings.get("disable_corrector", ()))))


def case_arrays(golden, name):
  return {k: golden[f"{name}__{k}"] for k in ("timesteps", "sigmas", "model_outputs", "samples")}


def assert_close_rel(actual, expected, rtol, what):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  err = np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30)
  assert err <= rtol, f"{what}: relative max error {err:.2e} > {rtol:.0e}"


# ------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("name", sorted(CASES))
def test_schedule_matches_diffusers(golden, name):
  settings, ref = CASES[name], case_arrays(golden, name)
  state = case_scheduler(settings).set_timesteps(settings["num_steps"])
  assert state.num_steps == settings["num_steps"]
  assert state.sigmas.dtype == jnp.float32 and state.timesteps.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(state.sigmas), ref["sigmas"], rtol=1e-6, atol=0)
  np.testing.assert_array_equal(np.asarray(state.timesteps), ref["timesteps"].astype(np.float32))


@pytest.mark.parametrize("name", sorted(CASES))
def test_steps_match_diffusers(golden, name):
  """Replays diffusers' model outputs; every intermediate sample agrees to 1e-5 relative."""
  settings, ref = CASES[name], case_arrays(golden, name)
  scheduler = case_scheduler(settings)
  state = scheduler.set_timesteps(settings["num_steps"])
  sample = jnp.asarray(ref["samples"][0])
  n = settings["num_steps"]
  for i in range(n):
    previous = sample
    sample, state = scheduler.step(state, jnp.asarray(ref["model_outputs"][i]), i, sample)
    assert sample.dtype == jnp.float32
    if i == n - 1 and settings.get("solver_type") == "bh1":
      # diffusers multiplies B(h) = -h = -inf by a zero correction at the step to sigma = 0 and
      # returns NaN; the limit is the data prediction, which is what the scheduler returns.
      assert np.all(np.isnan(ref["samples"][n]))
      expected = previous - state.sigmas[i] * jnp.asarray(ref["model_outputs"][i])
      np.testing.assert_allclose(np.asarray(sample), np.asarray(expected), rtol=1e-6, atol=1e-6)
    else:
      assert_close_rel(sample, ref["samples"][i + 1], 1e-5, f"{name} step {i}")


@pytest.mark.parametrize("name", ["diffusers_shift5_n50", "wan_shift3_n10",
                                  "diffusers_shift5_n10_order3"])
def test_scan_with_traced_step_index(golden, name):
  """The whole run as one jitted `lax.scan` over (step index, model output)."""
  settings, ref = CASES[name], case_arrays(golden, name)
  scheduler = case_scheduler(settings)
  sample0 = jnp.asarray(ref["samples"][0])
  state = scheduler.init_history(scheduler.set_timesteps(settings["num_steps"]), sample0)

  @jax.jit
  def run(state, sample, outputs):
    def body(carry, xs):
      state, sample = carry
      i, out = xs
      sample, state = scheduler.step(state, out, i, sample)
      return (state, sample), sample
    _, samples = jax.lax.scan(body, (state, sample),
                              (jnp.arange(outputs.shape[0], dtype=jnp.int32), outputs))
    return samples

  samples = run(state, sample0, jnp.asarray(ref["model_outputs"]))
  for i in range(settings["num_steps"]):
    assert_close_rel(samples[i], ref["samples"][i + 1], 1e-5, f"{name} step {i}")


def test_fori_loop_and_jitted_python_loop_agree(golden):
  name = "diffusers_shift3_n10"
  settings, ref = CASES[name], case_arrays(golden, name)
  scheduler = case_scheduler(settings)
  outputs = jnp.asarray(ref["model_outputs"])
  sample0 = jnp.asarray(ref["samples"][0])
  state0 = scheduler.init_history(scheduler.set_timesteps(10), sample0)

  def body(i, carry):
    state, sample = carry
    sample, state = scheduler.step(state, outputs[i], i, sample)
    return state, sample

  _, final = jax.jit(lambda s, x: jax.lax.fori_loop(0, 10, body, (s, x)))(state0, sample0)
  step = jax.jit(scheduler.step)
  state, sample = state0, sample0
  for i in range(10):
    sample, state = step(state, outputs[i], jnp.int32(i), sample)
  assert step._cache_size() == 1  # one compilation for every step index
  np.testing.assert_allclose(np.asarray(final), np.asarray(sample), rtol=1e-6, atol=1e-6)
  assert_close_rel(final, ref["samples"][-1], 1e-5, name)


def test_wan_schedule_formula(golden):
  """The original Wan schedule: linspace(0.999, 0, N+1)[:-1] shifted by s*x/(1+(s-1)*x)."""
  for name, settings in CASES.items():
    if settings["sigma_schedule"] != "wan":
      continue
    n, s = settings["num_steps"], settings["shift"]
    x = np.linspace(0.999, 0.0, n + 1)[:-1]
    expected = s * x / (1 + (s - 1) * x)
    sigmas, timesteps = flow_sigmas(n, sigma_schedule="wan", shift=s)
    np.testing.assert_allclose(sigmas[:-1], expected, rtol=1e-6)
    assert sigmas[-1] == 0.0
    np.testing.assert_array_equal(timesteps, golden[f"{name}__timesteps"])


def test_diffusers_schedule_formula():
  sigmas, timesteps = flow_sigmas(50, sigma_schedule="diffusers", shift=5.0)
  x = np.linspace(1.0, 1e-3, 51)[:-1]
  expected = 5 * x / (1 + 4 * x)
  expected[0] -= 1e-6
  np.testing.assert_allclose(sigmas[:-1], expected, rtol=1e-6)
  np.testing.assert_array_equal(timesteps, np.floor(expected * 1000).astype(np.int64))
  assert timesteps.dtype == np.int64 and sigmas.dtype == np.float32


# -------------------------------------------------------------------- analytic and numerics


def affine_field(x0):
  """v(x, sigma) = (x - x0) / sigma: the exact flow of a point mass at x0."""
  return lambda x, sigma: (x - x0) / sigma


@pytest.mark.parametrize("scheduler", [
    FlowEulerScheduler(FlowEulerConfig()),
    FlowEulerScheduler(FlowEulerConfig(sigma_schedule="wan", shift=5.0)),
    FlowUniPCScheduler(FlowUniPCConfig()),
    FlowUniPCScheduler(FlowUniPCConfig(sigma_schedule="wan", shift=5.0, solver_order=3)),
    FlowUniPCScheduler(FlowUniPCConfig(solver_order=1, solver_type="bh1")),
], ids=["euler", "euler-wan", "unipc2", "unipc3-wan", "unipc1-bh1"])
def test_affine_field_reaches_analytic_endpoint(scheduler):
  """Both solvers are exact on this field: every step lands on x0 + sigma * (noise - x0)."""
  key0, key1 = jax.random.split(jax.random.key(0))
  x0 = jax.random.normal(key0, (2, 3, 4))
  noise = jax.random.normal(key1, (2, 3, 4))
  v = affine_field(x0)
  state = scheduler.set_timesteps(7)
  sig = np.asarray(state.sigmas)
  x = x0 + sig[0] * (noise - x0)
  for i in range(7):
    x, state = scheduler.step(state, v(x, state.sigmas[i]), i, x)
    np.testing.assert_allclose(np.asarray(x), np.asarray(x0 + sig[i + 1] * (noise - x0)),
                               rtol=1e-5, atol=1e-5)


def test_euler_constant_velocity():
  scheduler = FlowEulerScheduler(FlowEulerConfig(shift=5.0))
  state = scheduler.set_timesteps(9)
  x = jnp.full((3, 5), 2.0)
  velocity = jnp.linspace(-1.0, 1.0, 15, dtype=jnp.float32).reshape(3, 5)
  for i in range(9):
    x, state = scheduler.step(state, velocity, i, x)
  np.testing.assert_allclose(np.asarray(x), 2.0 - float(state.sigmas[0]) * np.asarray(velocity),
                             rtol=1e-6, atol=1e-6)


def _mid_schedule_error(scheduler, num_steps):
  """|x - exact| halfway through a run on v = (x - m(sigma)) / sigma with m = x0 + c * sigma."""
  rng = np.random.default_rng(0)
  x0, c, noise = (rng.standard_normal(8) for _ in range(3))
  state = scheduler.set_timesteps(num_steps)
  sig = np.asarray(state.sigmas, np.float64)
  x = jnp.asarray(noise, jnp.float32)
  step = jax.jit(scheduler.step)
  half = num_steps // 2
  for i in range(half):
    v = (x - jnp.asarray(x0 + c * sig[i], jnp.float32)) / state.sigmas[i]
    x, state = step(state, v, jnp.int32(i), x)
  s, s0 = sig[half], sig[0]
  exact = (s / s0) * noise + x0 * (1 - s / s0) + c * s * math.log(s0 / s)
  return float(np.max(np.abs(np.asarray(x, np.float64) - exact)))


@pytest.mark.parametrize("scheduler, min_ratio, max_ratio", [
    (FlowUniPCScheduler(FlowUniPCConfig(shift=3.0)), 6.0, 12.0),  # third order with the corrector
    (FlowUniPCScheduler(FlowUniPCConfig(shift=3.0, solver_order=1)), 3.0, 5.0),  # second order
    (FlowEulerScheduler(FlowEulerConfig(shift=3.0)), 1.6, 2.5),  # first order
], ids=["unipc2", "unipc1", "euler"])
def test_convergence_order(scheduler, min_ratio, max_ratio):
  """Halving the step size divides the error by about 2^(order)."""
  e8, e16 = _mid_schedule_error(scheduler, 8), _mid_schedule_error(scheduler, 16)
  assert min_ratio <= e8 / e16 <= max_ratio, (e8, e16)


def test_single_step_returns_data_prediction():
  scheduler = FlowUniPCScheduler(FlowUniPCConfig(shift=5.0))
  state = scheduler.set_timesteps(1)
  x = jnp.arange(6, dtype=jnp.float32).reshape(2, 3)
  v = jnp.ones((2, 3), jnp.float32)
  out, _ = scheduler.step(state, v, 0, x)
  np.testing.assert_allclose(np.asarray(out), np.asarray(x - state.sigmas[0] * v), rtol=1e-7)


def test_bfloat16_sample_is_stepped_in_float32(golden):
  name = "diffusers_shift3_n10"
  settings, ref = CASES[name], case_arrays(golden, name)
  scheduler = case_scheduler(settings)
  state = scheduler.set_timesteps(10)
  sample = jnp.asarray(ref["samples"][0], jnp.bfloat16)
  for i in range(10):
    out = jnp.asarray(ref["model_outputs"][i], jnp.bfloat16)
    sample, state = scheduler.step(state, out, i, sample)
    assert sample.dtype == jnp.bfloat16
    assert state.history["x0"].dtype == jnp.float32
  assert_close_rel(sample.astype(jnp.float32), ref["samples"][-1], 3e-2, "bf16 run")


def test_state_is_a_pytree_and_make_scheduler():
  scheduler = make_scheduler(FlowUniPCConfig.preset("wan2.1-720p"))
  assert isinstance(scheduler, FlowUniPCScheduler) and scheduler.config.shift == 5.0
  assert isinstance(make_scheduler(FlowEulerConfig.preset("tiny")), FlowEulerScheduler)
  state = scheduler.init_history(scheduler.set_timesteps(4), jnp.zeros((1, 2, 3)))
  leaves, treedef = jax.tree.flatten(state)
  rebuilt = jax.tree.unflatten(treedef, leaves)
  assert isinstance(rebuilt, SchedulerState) and rebuilt.num_steps == 4
  assert state.history["x0"].shape == (2, 1, 2, 3)
  assert hash(scheduler) == hash(FlowUniPCScheduler(FlowUniPCConfig.preset("wan2.1-720p")))
  assert FlowUniPCConfig.preset("wan2.1-original").sigma_schedule == "wan"


# ---------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs, error", [
    (dict(sigma_schedule="karras"), ValueError),
    (dict(shift=0.0), ValueError),
    (dict(shift=float("nan")), ValueError),
    (dict(num_train_timesteps=1), ValueError),
    (dict(num_train_timesteps=1000.0), TypeError),
    (dict(solver_order=0), ValueError),
    (dict(solver_order=4), ValueError),
    (dict(solver_type="bh3"), ValueError),
    (dict(disable_corrector=(-1,)), ValueError),
])
def test_config_validation(kwargs, error):
  with pytest.raises(error):
    FlowUniPCConfig(**kwargs)


def test_bad_inputs():
  with pytest.raises(ValueError, match="unknown UniPC preset"):
    FlowUniPCConfig.preset("nope")
  with pytest.raises(ValueError, match="unknown Euler preset"):
    FlowEulerConfig.preset("nope")
  with pytest.raises(TypeError):
    make_scheduler("wan")
  with pytest.raises(ValueError, match="num_steps"):
    flow_sigmas(0)
  with pytest.raises(TypeError, match="num_steps"):
    flow_sigmas(2.5)
  with pytest.raises(ValueError, match="strictly decreasing"):
    flow_sigmas(10, shift=1e9)
  scheduler = FlowUniPCScheduler()
  state = scheduler.set_timesteps(3)
  x = jnp.zeros((2, 3))
  with pytest.raises(IndexError):
    scheduler.step(state, x, 3, x)
  with pytest.raises(IndexError):
    scheduler.step(state, x, -1, x)
  with pytest.raises(ValueError, match="shape"):
    scheduler.step(state, jnp.zeros((2, 4)), 0, x)
  with pytest.raises(TypeError, match="floating"):
    scheduler.step(state, jnp.zeros((2, 3), jnp.int32), 0, jnp.zeros((2, 3), jnp.int32))
  with pytest.raises(TypeError, match="step_index"):
    scheduler.step(state, x, jnp.float32(0), x)
  stale = scheduler.init_history(state, jnp.zeros((5,)))
  with pytest.raises(ValueError, match="init_history"):
    scheduler.step(stale, x, 0, x)


def test_disable_corrector_changes_only_later_steps(golden):
  """Disabling the corrector of step j leaves steps 0..j untouched and changes step j + 1."""
  name = "diffusers_shift3_n10"
  ref = case_arrays(golden, name)
  runs = {}
  for disabled in ((), (3,)):
    scheduler = FlowUniPCScheduler(FlowUniPCConfig(disable_corrector=disabled))
    state = scheduler.set_timesteps(10)
    sample, samples = jnp.asarray(ref["samples"][0]), []
    for i in range(10):
      sample, state = scheduler.step(state, jnp.asarray(ref["model_outputs"][i]), i, sample)
      samples.append(np.asarray(sample))
    runs[disabled] = samples
  for i in range(4):
    np.testing.assert_array_equal(runs[()][i], runs[(3,)][i])
  assert np.max(np.abs(runs[()][4] - runs[(3,)][4])) > 1e-4

