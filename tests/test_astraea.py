"""The accelerated Wan forward on the tiny preset (fp32): exactness, reuse, selection, adapters."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from astraea_jax.acceleration.astraea import (
    AstraeaStepModel,
    astraea_forward,
    num_video_tokens,
    selection_only_block,
)
from astraea_jax.acceleration.config import AstraeaConfig
from astraea_jax.acceleration.schedule import BudgetSchedule
from astraea_jax.acceleration.token_cache import TokenCache, cache_bytes_per_token_per_block
from astraea_jax.acceleration.token_selection import reduce_heads
from astraea_jax.models.wan import WanConfig, WanTransformer3DModel
from astraea_jax.sampling.loop import denoise
from astraea_jax.sampling.schedulers import FlowEulerScheduler

B, LATENT = 2, (4, 2, 4, 6)  # latents [B, C_in=4, T=2, Y=4, X=6] -> N = 2 * 2 * 3 = 12 tokens
N = 12
EXACT = AstraeaConfig(delta_mode="exact")


@pytest.fixture(scope="module")
def model():
  return WanTransformer3DModel(WanConfig.preset("tiny"), rngs=nnx.Rngs(0))


def _inputs(seed):
  k1, k2 = jax.random.split(jax.random.key(seed))
  latents = jax.random.normal(k1, (B, *LATENT), jnp.float32)
  context = jax.random.normal(k2, (B, 5, 16), jnp.float32)
  return latents, context


@functools.partial(nnx.jit, static_argnames=("k", "config"))
def _forward(model, latents, t, context, cache, k, config=AstraeaConfig()):
  return astraea_forward(model, latents, t, context, cache, num_selected=k, config=config)


@nnx.jit
def _dense(model, latents, t, context):
  return model(latents, t, context)


def _assert_close(a, b, rtol=1e-5):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  err = np.linalg.norm(a - b) / np.linalg.norm(b)
  assert err < rtol, f"relative error {err:.3e} >= {rtol:.0e}"


def _steps(seed=0):
  """Latents and timesteps of three successive steps (a small drift, as in sampling)."""
  latents, context = _inputs(seed)
  noise = jax.random.normal(jax.random.key(seed + 100), latents.shape, jnp.float32)
  return [(latents + 0.2 * i * noise, jnp.full((B,), 900.0 - 150 * i, jnp.float32))
          for i in range(3)], context


def test_num_video_tokens(model):
  assert num_video_tokens(model.config.patch_size, (B, *LATENT)) == N
  assert num_video_tokens((1, 2, 2), (2, 16, 21, 60, 104)) == 32760
  with pytest.raises(ValueError, match="patch_size"):
    num_video_tokens((1, 2, 2), (2, 16, 21, 61, 104))


@pytest.mark.parametrize("config", [AstraeaConfig(), EXACT])
def test_theta_one_every_step_is_the_dense_model(model, config):
  steps, context = _steps()
  cache = None
  for latents, t in steps:
    out, cache = _forward(model, latents, t, context, cache, N, config)
    _assert_close(out, _dense(model, latents, t, context))
    assert int(jnp.max(cache.skips)) == 0


@pytest.mark.parametrize("config", [AstraeaConfig(), EXACT])
def test_half_budget_changes_output_and_skipped_tokens_keep_their_cache(model, config):
  (s0, s1, _), context = _steps()
  k = N // 2
  _, cache0 = _forward(model, *s0[:1], s0[1], context, None, N, config)
  cache0 = jax.tree.map(np.asarray, cache0)  # keep a host copy: the next call may not alias it
  out1, cache1 = _forward(model, s1[0], s1[1], context, jax.tree.map(jnp.asarray, cache0), k,
                          config)

  dense1 = _dense(model, s1[0], s1[1], context)
  err = np.linalg.norm(np.asarray(out1 - dense1)) / np.linalg.norm(np.asarray(dense1))
  assert err > 1e-3, "half the tokens skipped should change the output"

  skips = np.asarray(cache1.skips)
  computed = skips == 0
  assert set(np.unique(skips)) <= {0, 1}
  np.testing.assert_array_equal(computed.sum(-1), np.full(skips.shape[:2], k))
  out_new, out_old = np.asarray(cache1.out), cache0.out
  # A skipped token carries exactly its cached block output (and keeps its cached statistics).
  np.testing.assert_array_equal(out_new[~computed], out_old[~computed])
  for name in ("in_ref", "lse"):
    np.testing.assert_array_equal(np.asarray(getattr(cache1, name))[~computed],
                                  getattr(cache0, name)[~computed])
  # Computed tokens got a new value.
  assert np.all(np.any(out_new[computed] != out_old[computed], axis=-1))
  # The head reads the reassembled last block (eager here, jitted there: rounding may differ).
  _, cond = model.embed(s1[0], s1[1], context)
  _assert_close(out1, model.head(cache1.out[-1], cond), rtol=1e-6)


def test_sparse_block_zero_selects_top_scores_and_matches_dense_rows(model):
  # Block 0's input is the embedding itself, so its selection and computed rows can be checked
  # against an independent evaluation: the float64 score ranking and the dense block's rows.
  (s0, s1, _), context = _steps(seed=3)
  k = 5
  _, cache0 = _forward(model, s0[0], s0[1], context, None, N, EXACT)
  _, cache1 = _forward(model, s1[0], s1[1], context, cache0, k, EXACT)

  x, cond = model.embed(s1[0], s1[1], context)
  x64, ref64 = np.asarray(x, np.float64), np.asarray(cache0.in_ref[0], np.float64)
  delta = np.linalg.norm(x64 - ref64, axis=-1) / np.linalg.norm(ref64, axis=-1)
  score = 1.0 * np.asarray(cache0.lse[0], np.float64) * delta + 0.5 * np.exp(0.0)
  want = np.sort(np.argsort(-score, axis=-1)[:, :k], axis=-1)
  got = np.stack([np.flatnonzero(r) for r in np.asarray(cache1.skips[0]) == 0])  # sorted
  np.testing.assert_array_equal(got, want)

  graphdef, params = nnx.split(model.blocks)
  block0 = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], params))
  y_dense, lse_dense = block0(x, cond, return_lse=True)
  rows = np.arange(B)[:, None], want
  _assert_close(np.asarray(cache1.out[0])[rows], np.asarray(y_dense)[rows])
  _assert_close(np.asarray(cache1.lse[0])[rows],
                np.asarray(reduce_heads(lse_dense, "mean"))[rows])


def test_pure_cache_step(model):
  (s0, s1, _), context = _steps()
  _, cache0 = _forward(model, s0[0], s0[1], context, None, N)
  before = jax.tree.map(np.asarray, cache0)
  out, cache = _forward(model, s1[0], s1[1], context, cache0, 0)
  _, cond = model.embed(s1[0], s1[1], context)
  _assert_close(out, model.head(cache.out[-1], cond), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(cache.out), before.out)
  np.testing.assert_array_equal(np.asarray(cache.skips), before.skips + 1)


def test_scoring_inside_the_forward_uses_the_configured_weights(model):
  # With w_a = 0 only staleness counts: after a sparse step, the tokens skipped there must be the
  # ones computed in the next sparse step (ties among equal scores go to the lower index).
  config = AstraeaConfig(w_a=0.0)
  (s0, s1, s2), context = _steps(seed=5)
  _, cache = _forward(model, s0[0], s0[1], context, None, N, config)
  _, cache = _forward(model, s1[0], s1[1], context, cache, N // 2, config)
  first = np.asarray(cache.skips) == 0
  _, cache = _forward(model, s2[0], s2[1], context, cache, N // 2, config)
  second = np.asarray(cache.skips) == 0
  np.testing.assert_array_equal(first, ~second)


def test_bad_calls_raise(model):
  (s0, s1, _), context = _steps()
  with pytest.raises(ValueError, match="first step of a run must be dense"):
    _forward(model, s0[0], s0[1], context, None, 3)
  _, cache = _forward(model, s0[0], s0[1], context, None, N)
  with pytest.raises(ValueError, match="num_selected"):
    _forward(model, s1[0], s1[1], context, cache, N + 1)
  with pytest.raises(ValueError, match="does not match"):
    _forward(model, s1[0][:1], s1[1][:1], context[:1], cache, 3)
  with pytest.raises(ValueError, match="delta_mode"):
    _forward(model, s1[0], s1[1], context, cache, 3, EXACT)


def test_cache_memory_layout(model):
  (s0, _, _), context = _steps()
  config = model.config
  _, cache = _forward(model, s0[0], s0[1], context, None, N)
  c, layers = config.hidden_size, config.num_layers
  assert cache.out.shape == (layers, B, N, c) and cache.out.dtype == jnp.float32
  assert cache.in_ref.shape == (layers, B, N, 64) and cache.in_ref.dtype == jnp.float32
  per_token = cache_bytes_per_token_per_block(c, AstraeaConfig(), jnp.float32)
  assert cache.nbytes == layers * B * N * per_token + c * 64 * 4
  # The bound of the method: one bf16 hidden vector per token per block plus small extras.
  assert cache_bytes_per_token_per_block(1536) == 2 * 1536 + 4 * 64 + 8
  assert cache_bytes_per_token_per_block(1536, EXACT) == 4 * 1536 + 8


def test_selection_only_block_leaves_outputs_at_inputs(model):
  # The benchmarks' overhead probe: same selection machinery, block replaced by the identity.
  (s0, s1, _), context = _steps()
  _, cache = _forward(model, s0[0], s0[1], context, None, N)

  @nnx.jit
  def probe(model, latents, t, context, cache):
    return astraea_forward(model, latents, t, context, cache, num_selected=4,
                           block_fn=selection_only_block)

  _, cache = probe(model, s1[0], s1[1], context, cache)
  assert np.all((np.asarray(cache.skips) == 0).sum(-1) == 4)


def test_step_model_threads_the_cache_through_a_loop(model):
  latents, context = _inputs(7)
  schedule = BudgetSchedule((0.3, 0.5, 0.0, 1.0, 0.5))
  step_model = AstraeaStepModel(model, schedule, context, timed=True)
  carry = None
  outs = []
  for step in range(len(schedule)):
    t = jnp.float32(1000.0 - 200.0 * step)
    out, carry = step_model(latents, t, carry, step)
    assert isinstance(carry, TokenCache)
    if step == 3:  # theta = 1: exactly the dense model, whatever the cache held
      _assert_close(out, _dense(model, latents, jnp.full((B,), t), context))
    outs.append(out)
    latents = latents - 0.05 * out  # an Euler-like update
  assert [s.num_selected for s in step_model.stats] == [N, 6, 0, N, 6]
  assert [s.first_call for s in step_model.stats] == [True, True, True, True, False]
  assert all(np.isfinite(np.asarray(o)).all() for o in outs)
  with pytest.raises(ValueError, match="context batch"):
    step_model(latents[:1], jnp.float32(1.0), None, 0)


def _spy_refresh(step_model):
  """Records the `refresh_cache` of every call of the step model's jitted forward."""
  calls, jitted = [], step_model._jitted  # pylint: disable=protected-access

  def spy(*args, **kwargs):
    calls.append(kwargs["refresh_cache"])
    return jitted(*args, **kwargs)

  step_model._jitted = spy  # pylint: disable=protected-access
  return calls


def _run_steps(step_model, latents, num_steps):
  carry, outs = None, []
  for step in range(num_steps):
    out, carry = step_model(latents, jnp.float32(1000.0 - 150.0 * step), carry, step)
    outs.append(out)
    latents = latents - 0.05 * out
  return outs, carry


def test_dense_step_skips_the_cache_writes_no_later_step_reads(model):
  latents, context = _inputs(8)
  # Steps 0 and 1 are followed by dense steps: they keep only the last block's output. Step 3 is
  # followed by a partial step, which reads every block's cache; step 6 is the last.
  schedule = BudgetSchedule((1.0, 1.0, 0.0, 1.0, 0.5, 0.0, 1.0))
  lazy = AstraeaStepModel(model, schedule, context, timed=True)
  calls = _spy_refresh(lazy)
  outs, cache = _run_steps(lazy, latents, len(schedule))
  assert calls == [False, False, True, True, True, True, False]
  assert all(s.first_call for s in lazy.stats)  # seven distinct programs
  eager = AstraeaStepModel(model, schedule, context, lookahead=False)
  calls = _spy_refresh(eager)
  reference, _ = _run_steps(eager, latents, len(schedule))
  assert all(calls)
  for a, b in zip(outs, reference):
    _assert_close(a, b)
  assert isinstance(cache, TokenCache) and cache.is_last_output


def test_light_dense_step_keeps_only_the_last_output(model):
  (s0, s1, s2), context = _steps(seed=12)
  _, cache0 = _forward(model, s0[0], s0[1], context, None, N)
  light = nnx.jit(functools.partial(astraea_forward, num_selected=N, refresh_cache=False))
  out, cache = light(model, s1[0], s1[1], context, cache0)
  full, cache_full = _forward(model, s1[0], s1[1], context, cache0, N)
  _assert_close(out, _dense(model, s1[0], s1[1], context))
  _assert_close(out, full)
  assert cache.is_last_output and cache.out.shape == (1, *cache_full.out.shape[1:])
  assert cache.nbytes * model.config.num_layers < cache_full.nbytes
  _assert_close(cache.out[0], cache_full.out[-1])
  # A k = 0 step reads it as it reads the last block of a full cache.
  _assert_close(_forward(model, s2[0], s2[1], context, cache, 0)[0],
                _forward(model, s2[0], s2[1], context, cache_full, 0)[0])
  # A dense step after it refills a full cache; a partial step cannot run on it.
  out2, cache2 = _forward(model, s2[0], s2[1], context, cache, N)
  assert not cache2.is_last_output and cache2.num_layers == model.config.num_layers
  _assert_close(out2, _dense(model, s2[0], s2[1], context))
  with pytest.raises(ValueError, match="refresh_cache=True"):
    _forward(model, s2[0], s2[1], context, cache, 5)
  _, first = light(model, s0[0], s0[1], context, None)  # a first step may be light too
  assert first.is_last_output


def test_carried_input_matches_in_place_input(model):
  # `inplace_input` only changes where each block reads its input from, not the result.
  (s0, s1, s2), context = _steps(seed=9)
  results = []
  for inplace in (True, False):
    config = AstraeaConfig(inplace_input=inplace)
    _, cache = _forward(model, s0[0], s0[1], context, None, N, config)
    _, cache = _forward(model, s1[0], s1[1], context, cache, 5, config)
    out, cache = _forward(model, s2[0], s2[1], context, cache, 5, config)
    results.append((out, cache))
  (out_a, cache_a), (out_b, cache_b) = results
  _assert_close(out_a, out_b, rtol=1e-6)
  np.testing.assert_array_equal(cache_a.skips, cache_b.skips)  # the same tokens were selected
  for name in ("out", "in_ref", "lse"):
    _assert_close(getattr(cache_a, name), getattr(cache_b, name), rtol=1e-6)


def test_radix_selection_matches_sort_selection(model):
  # The top-k method changes only the order of the selected rows, not the result.
  (s0, s1, s2), context = _steps(seed=10)
  results = []
  for selection in ("sort", "radix"):
    config = AstraeaConfig(selection=selection)
    _, cache = _forward(model, s0[0], s0[1], context, None, N, config)
    _, cache = _forward(model, s1[0], s1[1], context, cache, 5, config)
    results.append(_forward(model, s2[0], s2[1], context, cache, 3, config))
  (out_a, cache_a), (out_b, cache_b) = results
  _assert_close(out_a, out_b, rtol=1e-6)
  np.testing.assert_array_equal(cache_a.skips, cache_b.skips)


def test_step_model_in_the_denoising_loop(model):
  # With guidance the loop batches [cond; uncond] rows: the context is laid out the same way.

  latents, context = _inputs(11)
  latents = latents[:1]  # [1, C_in, T, Y, X]; the CFG pair makes the model batch 2
  scheduler = FlowEulerScheduler()
  state = scheduler.set_timesteps(3)

  def dense_step(batch, timestep, carry, step_index):
    del step_index
    return _dense(model, batch, timestep, context), carry

  def run(step_model):
    out, carry, stats = denoise(step_model, latents, scheduler, state, guidance_scale=5.0,
                                progress=False)
    assert len(stats.step_seconds) == 3
    return out, carry

  dense, _ = run(dense_step)
  full, cache = run(AstraeaStepModel(model, BudgetSchedule.dense(3), context))
  half, _ = run(AstraeaStepModel(model, BudgetSchedule.uniform(3, 0.5), context))
  assert isinstance(cache, TokenCache) and cache.batch_size == 2
  _assert_close(full, dense)
  err = np.linalg.norm(np.asarray(half - dense)) / np.linalg.norm(np.asarray(dense))
  assert err > 1e-2, err
