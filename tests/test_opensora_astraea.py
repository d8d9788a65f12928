"""The ASTRAEA-accelerated STDiT3 forward on the golden tiny model (fp32): exactness, reuse,
position selection, the RFLOW denoising loop."""

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from astraea_jax.acceleration.config import AstraeaConfig
from astraea_jax.acceleration.opensora_astraea import (
    OpenSoraAstraeaStepModel,
    num_positions,
    opensora_astraea_forward,
    position_rows,
    position_scores,
)
from astraea_jax.acceleration.schedule import BudgetSchedule
from astraea_jax.acceleration.token_cache import TokenCache
from astraea_jax.acceleration.token_selection import reduce_heads
from astraea_jax.pipeline import computed_fraction
from astraea_jax.sampling import loop, rflow
from checkpoints_convert import opensora as convert_opensora

WEIGHTS = (Path(__file__).resolve().parent / "goldens" / "opensora_v1_2"
           / "stdit3_tiny_weights.safetensors")
B = 2
LATENT = (4, 3, 8, 12)  # [B, C_in=4, T=3, Y=8, X=12] -> grid (3, 4, 6): S = 24, N = 72
T_GRID, S = 3, 24
N = T_GRID * S
FPS, HEIGHT, WIDTH = 24.0, 64.0, 96.0
EXACT = AstraeaConfig(delta_mode="exact")


@pytest.fixture(scope="module")
def model():
  return convert_opensora.load_model(WEIGHTS)


def _captions(seed, model):
  y = jax.random.normal(jax.random.key(seed), (B, 1, 8, model.config.caption_channels),
                        jnp.float32)
  mask = jnp.asarray([[1] * 5 + [0] * 3, [1] * 8], jnp.int32)
  return y, mask


def _steps(model, seed=0):
  """Latents and timesteps of three successive steps (a small drift, as in sampling)."""
  k1, k2 = jax.random.split(jax.random.key(seed))
  latents = jax.random.normal(k1, (B, *LATENT), jnp.float32)
  noise = jax.random.normal(k2, latents.shape, jnp.float32)
  steps = [(latents + np.float32(0.2 * i) * noise, jnp.full((B,), 900.0 - 150 * i, jnp.float32))
           for i in range(3)]
  return steps, _captions(seed + 50, model)


@functools.partial(nnx.jit, static_argnames=("k", "config"))
def _forward(model, latents, t, y, mask, cache, x_mask=None, *, k, config=AstraeaConfig()):
  return opensora_astraea_forward(model, latents, t, y, mask, FPS, HEIGHT, WIDTH, cache,
                                  num_selected=k, config=config, x_mask=x_mask)


@nnx.jit
def _dense(model, latents, t, y, mask, x_mask=None):
  return model(latents, t, y, mask=mask, x_mask=x_mask, fps=FPS, height=HEIGHT, width=WIDTH)


def _assert_close(a, b, rtol=1e-5):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  err = np.linalg.norm(a - b) / np.linalg.norm(b)
  assert err < rtol, f"relative error {err:.3e} >= {rtol:.0e}"


def _layer(stack, i):
  graphdef, state = nnx.split(stack)
  return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))


def test_positions_and_rows():
  assert num_positions((1, 2, 2), (B, *LATENT)) == S
  assert num_positions((1, 2, 2), (2, 4, 30, 60, 106)) == 30 * 53
  assert num_positions((1, 2, 2), (2, 4, 5, 7, 9)) == 4 * 5  # padded to the patch, as embed does
  rows = position_rows(jnp.asarray([[5, 1], [0, 23]], jnp.int32), 3, S)
  np.testing.assert_array_equal(rows, [[5, 1, 29, 25, 53, 49], [0, 23, 24, 47, 48, 71]])
  scores = jnp.arange(2 * N, dtype=jnp.float32).reshape(2, N)
  np.testing.assert_allclose(position_scores(scores, 3),
                             np.arange(2 * N, dtype=np.float32).reshape(2, 3, S).mean(1))


@pytest.mark.parametrize("config", [AstraeaConfig(), EXACT])
def test_theta_one_every_step_is_the_dense_model(model, config):
  steps, (y, mask) = _steps(model)
  cache = None
  for latents, t in steps:
    out, cache = _forward(model, latents, t, y, mask, cache, k=S, config=config)
    _assert_close(out, _dense(model, latents, t, y, mask))
    assert int(jnp.max(cache.skips)) == 0
  assert cache.out.shape == (2 * model.config.depth, B, N, model.config.hidden_size)


def test_theta_one_with_frame_mask_is_the_dense_model(model):
  (s0, s1, _), (y, mask) = _steps(model, seed=1)
  x_mask = jnp.asarray([[False, True, True], [True, True, False]])
  _, cache = _forward(model, s0[0], s0[1], y, mask, None, x_mask, k=S)
  out, _ = _forward(model, s1[0], s1[1], y, mask, cache, x_mask, k=S)
  _assert_close(out, _dense(model, s1[0], s1[1], y, mask, x_mask))


@pytest.mark.parametrize("temporal", [False, True])
def test_selected_positions_equal_the_dense_block_rows(model, temporal):
  (s0, _, _), (y, mask) = _steps(model, seed=2)
  x, cond = model.embed(s0[0], s0[1], y, mask, None, FPS, HEIGHT, WIDTH)
  block = _layer(model.temporal_blocks if temporal else model.spatial_blocks, 1)
  positions = jnp.asarray([[7, 0, 19, 3, 11], [23, 2, 9, 16, 5]], jnp.int32)  # [B, K=5]
  y_sel, lse_sel = block(x, cond, select=positions, return_lse=True)
  y_all, lse_all = block(x, cond, return_lse=True)
  assert y_sel.shape == (B, T_GRID * 5, 48) and lse_sel.shape == (B, 2, T_GRID * 5)
  rows = np.asarray(position_rows(positions, T_GRID, S))
  b = np.arange(B)[:, None]
  _assert_close(y_sel, np.asarray(y_all)[b, rows])
  _assert_close(lse_sel, np.asarray(lse_all)[b, :, rows].transpose(0, 2, 1))
  # The dense LSE path returns the plain block output.
  _assert_close(y_all, block(x, cond), rtol=1e-6)


@pytest.mark.parametrize("config", [AstraeaConfig(), EXACT])
def test_half_budget_changes_output_and_skipped_tokens_keep_their_cache(model, config):
  (s0, s1, _), (y, mask) = _steps(model)
  k = S // 2
  _, cache0 = _forward(model, s0[0], s0[1], y, mask, None, k=S, config=config)
  cache0 = jax.tree.map(np.asarray, cache0)  # a host copy: the next call may not alias it
  out1, cache1 = _forward(model, s1[0], s1[1], y, mask, jax.tree.map(jnp.asarray, cache0), k=k,
                          config=config)

  dense1 = _dense(model, s1[0], s1[1], y, mask)
  err = np.linalg.norm(np.asarray(out1 - dense1)) / np.linalg.norm(np.asarray(dense1))
  assert err > 1e-3, "half the positions skipped should change the output"

  skips = np.asarray(cache1.skips)  # [2L, B, N]
  computed = skips == 0
  assert set(np.unique(skips)) <= {0, 1}
  # Whole positions: every frame of a position is computed or skipped together, K per block.
  per_frame = computed.reshape(*computed.shape[:2], T_GRID, S)
  np.testing.assert_array_equal(per_frame, np.broadcast_to(per_frame[:, :, :1], per_frame.shape))
  np.testing.assert_array_equal(per_frame[:, :, 0].sum(-1), np.full(skips.shape[:2], k))
  out_new, out_old = np.asarray(cache1.out), cache0.out
  # A skipped token carries exactly its cached block output (and keeps its cached statistics).
  np.testing.assert_array_equal(out_new[~computed], out_old[~computed])
  for name in ("in_ref", "lse"):
    np.testing.assert_array_equal(np.asarray(getattr(cache1, name))[~computed],
                                  getattr(cache0, name)[~computed])
  assert np.all(np.any(out_new[computed] != out_old[computed], axis=-1))
  # The head reads the reassembled last block.
  _, cond = model.embed(s1[0], s1[1], y, mask, None, FPS, HEIGHT, WIDTH)
  _assert_close(out1, model.head(jnp.asarray(cache1.out[-1]), cond), rtol=1e-6)


def test_a_changed_position_outranks_unchanged_ones(model):
  # Same timestep, latents changed at one patch position in one frame only: block 0's input (the
  # embedding) changes at that token alone, so with K = 1 the first spatial block must compute that
  # position; its output then differs only there, so the first temporal block picks it too.
  (s0, _, _), (y, mask) = _steps(model, seed=3)
  latents, t = s0
  _, cache0 = _forward(model, latents, t, y, mask, None, k=S, config=EXACT)
  row, col, frame = 2, 4, 1  # patch position 2 * 6 + 4 = 16
  # LSE * delta raises a changed token's score only where its LSE is positive (the formula keeps
  # the sign; over the 3 keys of a temporal block some tokens' LSE is negative).
  assert np.all(np.asarray(cache0.lse[:2, :, frame * S + row * 6 + col]) > 0)
  changed = latents.at[:, :, frame, 2 * row:2 * row + 2, 2 * col:2 * col + 2].add(np.float32(0.5))
  _, cache1 = _forward(model, changed, t, y, mask, cache0, k=1, config=EXACT)
  for slot in (0, 1):
    computed = np.asarray(cache1.skips[slot]).reshape(B, T_GRID, S) == 0
    np.testing.assert_array_equal(np.flatnonzero(computed[0, 0]), [row * 6 + col])
    np.testing.assert_array_equal(np.flatnonzero(computed[1, 0]), [row * 6 + col])

  # The rows computed by block 0 equal the dense block 0 on the new input, with its LSE.
  x, cond = model.embed(changed, t, y, mask, None, FPS, HEIGHT, WIDTH)
  y_dense, lse_dense = _layer(model.spatial_blocks, 0)(x, cond, return_lse=True)
  rows = np.asarray(position_rows(jnp.full((B, 1), row * 6 + col, jnp.int32), T_GRID, S))
  b = np.arange(B)[:, None]
  _assert_close(np.asarray(cache1.out[0])[b, rows], np.asarray(y_dense)[b, rows])
  _assert_close(np.asarray(cache1.lse[0])[b, rows],
                np.asarray(reduce_heads(lse_dense, "mean"))[b, rows])


def test_pure_cache_step(model):
  (s0, s1, _), (y, mask) = _steps(model)
  _, cache0 = _forward(model, s0[0], s0[1], y, mask, None, k=S)
  before = jax.tree.map(np.asarray, cache0)
  out, cache = _forward(model, s1[0], s1[1], y, mask, cache0, k=0)
  _, cond = model.embed(s1[0], s1[1], y, mask, None, FPS, HEIGHT, WIDTH)
  _assert_close(out, model.head(cache.out[-1], cond), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(cache.out), before.out)
  np.testing.assert_array_equal(np.asarray(cache.skips), before.skips + 1)


def test_light_dense_step_keeps_only_the_last_output(model):
  (s0, s1, s2), (y, mask) = _steps(model, seed=3)
  _, cache0 = _forward(model, s0[0], s0[1], y, mask, None, k=S)
  light = nnx.jit(functools.partial(opensora_astraea_forward, fps=FPS, height=HEIGHT, width=WIDTH,
                                    num_selected=S, refresh_cache=False))
  out, cache = light(model, s1[0], s1[1], y, mask, cache=cache0)
  full, cache_full = _forward(model, s1[0], s1[1], y, mask, cache0, k=S)
  _assert_close(out, _dense(model, s1[0], s1[1], y, mask))
  _assert_close(out, full)
  assert cache.is_last_output and cache.out.shape == (1, *cache_full.out.shape[1:])
  _assert_close(cache.out[0], cache_full.out[-1])
  _assert_close(_forward(model, s2[0], s2[1], y, mask, cache, k=0)[0],
                _forward(model, s2[0], s2[1], y, mask, cache_full, k=0)[0])
  out2, cache2 = _forward(model, s2[0], s2[1], y, mask, cache, k=S)
  assert not cache2.is_last_output
  _assert_close(out2, _dense(model, s2[0], s2[1], y, mask))
  with pytest.raises(ValueError, match="refresh_cache=True"):
    _forward(model, s2[0], s2[1], y, mask, cache, k=4)


def test_bad_calls_raise(model):
  (s0, s1, _), (y, mask) = _steps(model)
  with pytest.raises(ValueError, match="first step of a run must be dense"):
    _forward(model, s0[0], s0[1], y, mask, None, k=3)
  _, cache = _forward(model, s0[0], s0[1], y, mask, None, k=S)
  with pytest.raises(ValueError, match="num_selected"):
    _forward(model, s1[0], s1[1], y, mask, cache, k=S + 1)
  with pytest.raises(ValueError, match="does not match"):
    _forward(model, s1[0][:1], s1[1][:1], y[:1], mask[:1], cache, k=3)


def test_step_model_in_the_rflow_denoising_loop(model):
  # Guidance batches [cond; uncond] rows: the captions are laid out the same way.
  config = rflow.RFlowConfig(num_sampling_steps=3)
  scheduler = rflow.RFlowScheduler(config, height=HEIGHT, width=WIDTH, num_frames=51.0,
                                   condition_dtype="float32")
  state = scheduler.set_timesteps(3)
  latents = jax.random.normal(jax.random.key(11), (1, *LATENT), jnp.float32)
  y, mask = _captions(12, model)
  y_all = jnp.concatenate([y[:1], model.null_caption(1)], axis=0)  # [2, 1, M, C_text]
  mask_all = jnp.concatenate([mask[:1], mask[:1]], axis=0)

  def dense_step(batch, timestep, carry, step_index):
    del step_index
    return _dense(model, batch, timestep, y_all, mask_all)[:, :4], carry

  def run(step_model):
    out, carry, stats = loop.denoise(step_model, latents, scheduler, state, guidance_scale=7.0,
                                     progress=False)
    assert len(stats.step_seconds) == 3
    return out, carry

  def astraea(schedule, **kwargs):
    return OpenSoraAstraeaStepModel(model, schedule, y_all, mask=mask_all, fps=FPS, height=HEIGHT,
                                    width=WIDTH, **kwargs)

  dense, _ = run(dense_step)
  full, cache = run(astraea(BudgetSchedule.dense(3)))
  half_model = astraea(BudgetSchedule((1.0, 0.5, 0.0)), timed=True)
  half, cache_half = run(half_model)
  assert isinstance(cache, TokenCache) and cache.batch_size == 2
  _assert_close(full, dense)
  assert [s.num_selected for s in half_model.stats] == [S, S // 2, 0]
  # One record per step; the theta = 0 step runs no block.
  assert [(r.blocks, r.tokens) for r in half_model.records] == [
      (model.config.depth, 1.0), (model.config.depth, 0.5), (0, 0.0)]
  odd = astraea(BudgetSchedule((1.0, 7 / S, 0.0, 1.0)))  # K = 7 runs as 8 (K_MULTIPLE = 2)
  assert [odd.num_selected(i, (2, *LATENT)) for i in range(4)] == [S, 8, 0, S]
  # The generate summary's mean counts the even K the model runs, not the schedule's 7.
  assert computed_fraction(odd, (2, *LATENT), 4) == pytest.approx((2 * S + 8) / (4 * S))
  assert computed_fraction(odd, (2, *LATENT), 4) > odd.schedule.effective_mean(S)
  assert computed_fraction(dense_step, (2, *LATENT), 4) is None
  assert np.isfinite(np.asarray(half)).all()
  err = np.linalg.norm(np.asarray(half - dense)) / np.linalg.norm(np.asarray(dense))
  assert err > 1e-3, err
  assert int(jnp.max(cache_half.skips)) == 2  # skipped at step 1, and every token at step 2
  # Dense steps that no partial step follows keep only the last block's output: same result.
  mixed = BudgetSchedule((1.0, 1.0, 0.0))
  calls, lazy = [], astraea(mixed)
  jitted = lazy._jitted  # pylint: disable=protected-access
  lazy._jitted = lambda *a, **kw: calls.append(kw["refresh_cache"]) or jitted(*a, **kw)
  _assert_close(run(lazy)[0], run(astraea(mixed, lookahead=False))[0])
  assert calls == [False, False, True]
  with pytest.raises(ValueError, match="caption batch"):
    half_model(latents, jnp.float32(1.0), None, 0)
