"""The denoising loop (astraea_jax/sampling/loop.py) with toy step models."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from astraea_jax.sampling.loop import DenoiseStats, denoise
from astraea_jax.sampling.schedulers import (
    FlowEulerConfig,
    FlowEulerScheduler,
    FlowUniPCConfig,
    FlowUniPCScheduler,
)

SHAPE = (2, 4, 2, 3, 3)  # [B, C, T, Y, X]


def noise(seed=0, shape=SHAPE):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


@jax.jit
def toy_velocity(x, timestep):
  """A nonlinear, timestep-dependent field; per-row weights tell the CFG halves apart."""
  rows = jnp.arange(x.shape[0], dtype=jnp.float32).reshape(-1, *([1] * (x.ndim - 1)))
  return jnp.sin(x) * (1.0 + 0.1 * rows) - 0.5 * x + timestep[:, None, None, None, None] * 1e-3


def plain_step_model(x, timestep, carry, step_index):
  del step_index
  return toy_velocity(x, timestep), carry


def test_without_guidance_matches_manual_loop():
  scheduler = FlowUniPCScheduler(FlowUniPCConfig())
  state = scheduler.set_timesteps(6)
  latents = noise()
  seen = []

  def step_model(x, timestep, carry, step_index):
    seen.append((x.shape, np.asarray(timestep), step_index))
    return toy_velocity(x, timestep), carry

  out, carry, stats = denoise(step_model, latents, scheduler, state, guidance_scale=1.0,
                              progress=False)
  assert carry is None and isinstance(stats, DenoiseStats)
  expected, st = latents, state
  for i in range(6):
    t = jnp.full((SHAPE[0],), st.timesteps[i])
    expected, st = scheduler.step(st, toy_velocity(expected, t), i, expected)
  np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-6, atol=1e-6)
  assert [s[2] for s in seen] == list(range(6))
  assert all(type(s[2]) is int for s in seen)
  assert all(s[0] == SHAPE for s in seen)  # guidance 1: no unconditional half
  for _, t, i in seen:
    assert t.shape == (SHAPE[0],) and t.dtype == np.float32
    np.testing.assert_array_equal(t, np.full(SHAPE[0], np.asarray(state.timesteps)[i]))


@pytest.mark.parametrize("guidance", [5.0, 0.0])
def test_guidance_batches_cond_then_uncond(guidance):
  scheduler = FlowUniPCScheduler(FlowUniPCConfig(shift=5.0))
  state = scheduler.set_timesteps(5)
  latents = noise(1)
  b = SHAPE[0]

  def step_model(x, timestep, carry, step_index):
    assert x.shape == (2 * b, *SHAPE[1:])
    np.testing.assert_array_equal(np.asarray(x[:b]), np.asarray(x[b:]))
    return toy_velocity(x, timestep), carry

  out, _, _ = denoise(step_model, latents, scheduler, state, guidance_scale=guidance,
                      progress=False)
  expected, st = latents, state
  for i in range(5):
    both = jnp.concatenate([expected, expected])
    v = toy_velocity(both, jnp.full((2 * b,), st.timesteps[i]))
    cond, uncond = v[:b], v[b:]
    expected, st = scheduler.step(st, uncond + guidance * (cond - uncond), i, expected)
  np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheduler", [
    FlowUniPCScheduler(FlowUniPCConfig()),
    FlowUniPCScheduler(FlowUniPCConfig(sigma_schedule="wan", shift=5.0)),
    FlowEulerScheduler(FlowEulerConfig()),
], ids=["unipc", "unipc-wan", "euler"])
def test_guided_affine_fields_reach_analytic_endpoint(scheduler):
  """cond and uncond are exact flows to x0_c and x0_u; the guided run ends at their mix."""
  g = 4.0
  state = scheduler.set_timesteps(8)
  x0_c, x0_u = noise(2), noise(3)
  b = SHAPE[0]

  def step_model(x, timestep, carry, step_index):
    del timestep
    sigma = state.sigmas[step_index]
    targets = jnp.concatenate([x0_c, x0_u])
    return (x - targets) / sigma, carry

  out, _, _ = denoise(step_model, noise(4), scheduler, state, guidance_scale=g, progress=False)
  assert out.shape == (b, *SHAPE[1:])
  np.testing.assert_allclose(np.asarray(out), np.asarray(x0_u + g * (x0_c - x0_u)),
                             rtol=1e-4, atol=1e-4)


def test_carry_is_threaded_through_steps():
  scheduler = FlowEulerScheduler(FlowEulerConfig())
  state = scheduler.set_timesteps(4)

  def step_model(x, timestep, carry, step_index):
    count, steps = carry
    return toy_velocity(x, timestep), (count + 1, steps + (step_index,))

  _, carry, _ = denoise(step_model, noise(), scheduler, state, guidance_scale=3.0,
                        carry=(jnp.int32(0), ()), progress=False)
  assert int(carry[0]) == 4 and carry[1] == (0, 1, 2, 3)


def test_static_configs_compile_once_each_and_runs_reuse_programs():
  traces = []

  @functools.partial(jax.jit, static_argnames="config")
  def forward(x, timestep, *, config):
    traces.append(config)
    return toy_velocity(x, timestep) * (1.0 + 0.1 * config)

  def step_model(x, timestep, carry, step_index):
    return forward(x, timestep, config=min(step_index, 2)), carry

  scheduler = FlowUniPCScheduler(FlowUniPCConfig(shift=4.0))
  state = scheduler.set_timesteps(6)
  latents = noise(5, (1, 3, 2, 2, 2))
  out1, _, stats1 = denoise(step_model, latents, scheduler, state, guidance_scale=2.5,
                            progress=False)
  assert traces == [0, 1, 2]
  assert stats1.compile_seconds[0] > 0
  assert all(c == 0 for c in stats1.compile_seconds[3:])
  assert np.isfinite(stats1.steady_step_seconds)
  # Same shapes, another guidance scale and the same state: nothing compiles again.
  out2, _, stats2 = denoise(step_model, latents, scheduler, state, guidance_scale=3.5,
                            progress=False)
  assert traces == [0, 1, 2] and stats2.num_compiling_steps == 0
  assert not np.allclose(np.asarray(out1), np.asarray(out2))
  out3, _, _ = denoise(step_model, latents, scheduler, state, guidance_scale=2.5, progress=False)
  np.testing.assert_array_equal(np.asarray(out1), np.asarray(out3))  # state and noise reusable


def test_stats_and_progress_bar(capsys):
  scheduler = FlowUniPCScheduler(FlowUniPCConfig())
  state = scheduler.set_timesteps(3)
  _, _, stats = denoise(plain_step_model, noise(), scheduler, state, guidance_scale=2.0,
                        progress=True)
  assert "denoising" in capsys.readouterr().err
  assert len(stats.step_seconds) == len(stats.compile_seconds) == 3
  assert all(s > 0 for s in stats.step_seconds)
  assert stats.total_seconds == pytest.approx(sum(stats.step_seconds))
  d = stats.to_dict()
  assert set(d) == {"step_seconds", "compile_seconds", "total_seconds", "steady_step_seconds"}


def test_bfloat16_latents_keep_their_dtype():
  scheduler = FlowUniPCScheduler(FlowUniPCConfig())
  state = scheduler.set_timesteps(4)
  latents = noise().astype(jnp.bfloat16)

  def step_model(x, timestep, carry, step_index):
    return toy_velocity(x.astype(jnp.float32), timestep).astype(jnp.bfloat16), carry

  out, _, _ = denoise(step_model, latents, scheduler, state, guidance_scale=3.0, progress=False)
  assert out.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))


def test_errors():
  scheduler = FlowUniPCScheduler(FlowUniPCConfig())
  state = scheduler.set_timesteps(2)

  def wrong_shape(x, timestep, carry, step_index):
    return x[:1], carry

  with pytest.raises(ValueError, match="step_model returned shape"):
    denoise(wrong_shape, noise(), scheduler, state, guidance_scale=2.0, progress=False)
  with pytest.raises(ValueError, match="guidance_scale"):
    denoise(plain_step_model, noise(), scheduler, state, guidance_scale=float("inf"),
            progress=False)
  with pytest.raises(TypeError, match="floating"):
    denoise(plain_step_model, jnp.zeros(SHAPE, jnp.int32), scheduler, state, guidance_scale=1.0,
            progress=False)


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_x0_prediction_equals_the_velocity_it_implies(guidance):
  # A model that predicts x0 = x_t - sigma v must sample exactly as the velocity model v
  # (sigma >= X0_MIN_SIGMA at every step of a 6-step schedule with shift 3).
  scheduler = FlowUniPCScheduler(FlowUniPCConfig(shift=3.0))
  state = scheduler.set_timesteps(6)
  assert float(np.min(state.timesteps)) / 1000.0 >= 0.05

  def x0_model(x, timestep, carry, step_index):
    del step_index
    sigma = (timestep / 1000.0)[:, None, None, None, None]
    return x - sigma * toy_velocity(x, timestep), carry

  want, _, _ = denoise(plain_step_model, noise(), scheduler, state, guidance_scale=guidance,
                       progress=False)
  got, _, _ = denoise(x0_model, noise(), scheduler, state, guidance_scale=guidance,
                      progress=False, prediction="x0")
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="prediction"):
    denoise(plain_step_model, noise(), scheduler, state, guidance_scale=guidance,
            progress=False, prediction="epsilon")


def test_compile_timer_counts_nested_events_once():
  from astraea_jax.sampling.loop import _CompileTimer  # pylint: disable=import-outside-toplevel

  timer = _CompileTimer()
  timer("/jax/core/compile/jaxpr_trace_duration", 0.5)  # an inner jit traced inside the outer one
  timer("/jax/core/compile/jaxpr_trace_duration", 1.0)  # the outer trace, reported last
  timer("/jax/core/compile/backend_compile_duration", 0.0)
  timer("/jax/some/other_event", 5.0)
  assert 1.0 <= timer.seconds < 1.05
