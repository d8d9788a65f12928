"""The ASTRAEA-accelerated HunyuanVideo forward on the tiny config (random weights, fp32, CPU
attention): the selected-rows blocks, exactness at theta = 1, reuse of skipped tokens, text always
computed, scoring, the pure cache step, the denoising loop."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from astraea_jax.acceleration.config import AstraeaConfig
from astraea_jax.acceleration.hunyuan_astraea import (
    HunyuanAstraeaStepModel,
    dense_lse_forward,
    hunyuan_astraea_forward,
)
from astraea_jax.acceleration.schedule import BudgetSchedule
from astraea_jax.models import hunyuan as hy
from astraea_jax.sampling import loop
from astraea_jax.sampling.schedulers import FlowEulerConfig, FlowEulerScheduler

B, M = 2, 8
LATENT = (4, 3, 8, 12)  # [B, C_in=4, T=3, Y=8, X=12] -> grid (3, 4, 6), N = 72
N = 72
LENGTHS = (5, 8)  # valid text tokens per sample: row 0 is padded


@pytest.fixture(scope="module")
def model():
  return hy.HunyuanVideoTransformer3DModel(hy.HunyuanConfig.preset("tiny"), rngs=nnx.Rngs(3))


def _inputs(model, seed=0):
  """Latents and timesteps of three successive steps (a small drift, as in sampling), and the text
  conditioning shared by them."""
  cfg = model.config
  k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
  latents = jax.random.normal(k1, (B, *LATENT), jnp.float32)
  noise = jax.random.normal(k2, latents.shape, jnp.float32)
  steps = [(latents + np.float32(0.2 * i) * noise, jnp.full((B,), 900.0 - 150 * i, jnp.float32))
           for i in range(3)]
  text = jax.random.normal(k3, (B, M, cfg.text_embed_dim), jnp.float32)
  mask = jnp.arange(M)[None, :] < jnp.asarray(LENGTHS)[:, None]  # [B, M]
  pooled = jax.random.normal(k4, (B, cfg.pooled_projection_dim), jnp.float32)
  guidance = jnp.full((B,), 6000.0, jnp.float32)
  return steps, (text, mask, pooled, guidance)


@functools.partial(nnx.jit, static_argnames=("k", "config"))
def _forward(model, latents, t, cond, cache, *, k, config=AstraeaConfig()):
  text, mask, pooled, guidance = cond
  return hunyuan_astraea_forward(model, latents, t, text, mask, pooled, guidance, cache,
                                 num_selected=k, config=config)


@nnx.jit
def _dense(model, latents, t, cond):
  text, mask, pooled, guidance = cond
  return model(latents, t, text, mask, pooled, guidance)


def _assert_close(a, b, rtol=1e-5):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  err = np.linalg.norm(a - b) / np.linalg.norm(b)
  assert err < rtol, f"relative error {err:.3e} >= {rtol:.0e}"


def _rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _layer(stack, i):
  graphdef, state = nnx.split(stack)
  return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))


@pytest.fixture(scope="module")
def block_inputs(model):
  """Block 0 inputs of the first step and a selection of S = 30 video tokens per row."""
  steps, (text, mask, pooled, guidance) = _inputs(model)
  latents, t = steps[0]
  x, ctx, cond = model.embed(latents, t, text, mask, pooled, guidance)
  idx = jnp.stack([jax.random.permutation(jax.random.key(b), N)[:30] for b in range(B)]
                  ).astype(jnp.int32)  # [B, S]
  return x, ctx, cond, idx


# ----------------------------------------------------------------------------------------------
# The blocks' selected-rows path


def test_dual_block_selected_rows_match_dense(model, block_inputs):
  x, ctx, cond, idx = block_inputs
  block = _layer(model.transformer_blocks, 0)
  x_dense, ctx_dense = block(x, ctx, cond)
  x_lse, ctx_lse, lse = block(x, ctx, cond, return_lse=True)
  _assert_close(x_lse, x_dense)
  _assert_close(ctx_lse, ctx_dense)
  assert lse.shape == (B, model.config.num_attention_heads, N) and lse.dtype == jnp.float32
  x_sel, ctx_sel, lse_sel = block(x, ctx, cond, select=idx, return_lse=True)
  rows = jnp.arange(B)[:, None]
  assert x_sel.shape == (B, 30, x.shape[-1])
  _assert_close(x_sel, x_dense[rows, idx])
  _assert_close(lse_sel, jnp.take_along_axis(lse, idx[:, None, :], axis=2))


def test_single_block_selected_rows_match_dense(model, block_inputs):
  x, ctx, cond, idx = block_inputs
  block = _layer(model.single_transformer_blocks, 0)
  h = jnp.concatenate([x, ctx], axis=1)  # [B, N + M, C]
  dense = block(h, cond)
  out_lse, lse = block(h, cond, return_lse=True)
  _assert_close(out_lse, dense)
  assert lse.shape == (B, model.config.num_attention_heads, N)
  out_sel, lse_sel = block(h, cond, select=idx, return_lse=True)
  assert out_sel.shape == (B, 30 + M, x.shape[-1])
  _assert_close(out_sel[:, :30], dense[jnp.arange(B)[:, None], idx])
  _assert_close(lse_sel, jnp.take_along_axis(lse, idx[:, None, :], axis=2))


def test_text_tokens_always_computed(model, block_inputs):
  # A selected-rows call returns the whole text stream (dual) and every text row (single), each
  # equal to the dense block's.
  x, ctx, cond, idx = block_inputs
  dual = _layer(model.transformer_blocks, 1)
  _, ctx_dense = dual(x, ctx, cond)
  _, ctx_sel, _ = dual(x, ctx, cond, select=idx[:, :3], return_lse=True)
  assert ctx_sel.shape == (B, M, x.shape[-1])
  _assert_close(ctx_sel, ctx_dense)
  single = _layer(model.single_transformer_blocks, 1)
  h = jnp.concatenate([x, ctx], axis=1)
  out_sel, _ = single(h, cond, select=idx[:, :3], return_lse=True)
  _assert_close(out_sel[:, 3:], single(h, cond)[:, N:])


def test_padded_text_keys_are_ignored(model, block_inputs):
  # The text mask as a key length: changing sample 0's padded text rows changes no video row.
  x, ctx, cond, idx = block_inputs
  block = _layer(model.single_transformer_blocks, 0)
  h = jnp.concatenate([x, ctx], axis=1)
  pad = (jnp.arange(N + M) >= N + LENGTHS[0])[None, :, None] & (jnp.arange(B) == 0)[:, None, None]
  noisy = jnp.where(pad, jax.random.normal(jax.random.key(9), h.shape, h.dtype), h)
  base, lse = block(h, cond, select=idx, return_lse=True)
  changed, lse_changed = block(noisy, cond, select=idx, return_lse=True)
  np.testing.assert_array_equal(changed[:, :30], base[:, :30])
  np.testing.assert_array_equal(lse_changed, lse)
  all_valid = cond.replace(key_mask=jnp.ones_like(cond.key_mask))
  unmasked, _ = block(noisy, all_valid, select=idx, return_lse=True)
  assert _rel_err(unmasked[0, :30], base[0, :30]) > 1e-3


# ----------------------------------------------------------------------------------------------
# The accelerated forward


def test_theta_one_equals_dense(model):
  steps, cond = _inputs(model)
  _assert_close(nnx.jit(lambda m, l, t, c: dense_lse_forward(m, l, t, *c))(model, *steps[0], cond),
                _dense(model, *steps[0], cond))
  cache = None
  for latents, t in steps:
    out, cache = _forward(model, latents, t, cond, cache, k=N)
    assert out.shape == (B, *LATENT) and out.dtype == jnp.float32
    _assert_close(out, _dense(model, latents, t, cond))
  assert cache.out.shape == (4, B, N, model.config.hidden_size)  # L_d + L_s slots, video only
  np.testing.assert_array_equal(cache.skips, 0)


def test_half_budget_changes_output_and_skipped_tokens_keep_their_cache(model):
  steps, cond = _inputs(model)
  (l0, t0), (l1, t1), _ = steps
  out0, cache0 = _forward(model, l0, t0, cond, None, k=N)
  k = N // 2
  out1, cache1 = _forward(model, l1, t1, cond, cache0, k=k)
  assert _rel_err(out1, _dense(model, l1, t1, cond)) > 1e-3
  assert np.isfinite(np.asarray(out1)).all()
  skips = np.asarray(cache1.skips)  # [L, B, N]
  np.testing.assert_array_equal((skips == 0).sum(axis=-1), k)  # k computed per block and row
  np.testing.assert_array_equal(skips[skips > 0], 1)
  skipped = skips > 0
  for name in ("out", "in_ref", "lse"):
    new, old = np.asarray(getattr(cache1, name)), np.asarray(getattr(cache0, name))
    np.testing.assert_array_equal(new[skipped], old[skipped])
    assert not np.array_equal(new[~skipped], old[~skipped])
  # Block 0 reads the embedding, so its computed rows are the dense block's rows.
  x, ctx, c = model.embed(l1, t1, *cond)
  y_dense, _ = _layer(model.transformer_blocks, 0)(x, ctx, c)
  computed = ~skipped[0]  # [B, N]
  _assert_close(np.asarray(cache1.out[0])[computed], np.asarray(y_dense)[computed])


def test_scoring_ranks_a_changed_token_first(model):
  # Same step twice, one token's latent patch changed: every other token's block-0 input is
  # unchanged (delta 0) and all skip counts are 0, so the changed token must be block 0's pick.
  steps, cond = _inputs(model)
  latents, t = steps[0]
  _, cache = _forward(model, latents, t, cond, None, k=N)
  token = 29  # grid (3, 4, 6): frame 1, row 0, column 5
  frame, row, col = 1, 0, 5
  assert token == (frame * 4 + row) * 6 + col
  bumped = latents.at[:, :, frame, 2 * row:2 * row + 2, 2 * col:2 * col + 2].add(np.float32(1.0))
  assert (np.asarray(cache.lse[0, :, token]) > 0).all()  # the LSE * delta term counts upwards
  _, cache = _forward(model, bumped, t, cond, cache, k=1)
  want = np.ones((B, N), np.int32)
  want[:, token] = 0
  np.testing.assert_array_equal(cache.skips[0], want)


def test_zero_budget_reuses_the_cache(model):
  steps, cond = _inputs(model)
  latents, t = steps[0]
  out0, cache0 = _forward(model, latents, t, cond, None, k=N)
  out, cache = _forward(model, latents, t, cond, cache0, k=0)
  _assert_close(out, out0, rtol=1e-6)
  for name in ("out", "in_ref", "lse"):
    np.testing.assert_array_equal(getattr(cache, name), getattr(cache0, name))
  np.testing.assert_array_equal(cache.skips, 1)


def test_light_dense_step_keeps_only_the_last_output(model):
  steps, cond = _inputs(model, seed=4)
  _, cache0 = _forward(model, *steps[0], cond, None, k=N)
  text, mask, pooled, guidance = cond
  light = nnx.jit(functools.partial(hunyuan_astraea_forward, num_selected=N, refresh_cache=False))
  out, cache = light(model, *steps[1], text, mask, pooled, guidance, cache0)
  full, cache_full = _forward(model, *steps[1], cond, cache0, k=N)
  _assert_close(out, _dense(model, *steps[1], cond))
  _assert_close(out, full)
  assert cache.is_last_output and cache.out.shape == (1, *cache_full.out.shape[1:])
  _assert_close(cache.out[0], cache_full.out[-1])
  _assert_close(_forward(model, *steps[2], cond, cache, k=0)[0],
                _forward(model, *steps[2], cond, cache_full, k=0)[0])
  assert not _forward(model, *steps[2], cond, cache, k=N)[1].is_last_output
  with pytest.raises(ValueError, match="refresh_cache=True"):
    _forward(model, *steps[2], cond, cache, k=N // 2)
  # The step model picks the light path where no partial step follows before a dense one.
  schedule = BudgetSchedule((1.0, 1.0, 0.0, 1.0, 0.5))
  step_model = HunyuanAstraeaStepModel(model, schedule, text, pooled, text_mask=mask,
                                       guidance=6000.0)
  calls, jitted = [], step_model._jitted  # pylint: disable=protected-access
  step_model._jitted = lambda *a, **kw: calls.append(kw["refresh_cache"]) or jitted(*a, **kw)
  carry = None
  for i in range(len(schedule)):
    _, carry = step_model(steps[0][0], jnp.float32(900.0 - 100 * i), carry, i)
  assert calls == [False, False, True, True, True]


def test_bad_budgets(model):
  steps, cond = _inputs(model)
  latents, t = steps[0]
  with pytest.raises(ValueError, match="first step of a run must be dense"):
    _forward(model, latents, t, cond, None, k=N // 2)
  with pytest.raises(ValueError, match="must lie in"):
    _forward(model, latents, t, cond, None, k=N + 1)


# ----------------------------------------------------------------------------------------------
# The denoising loop


def test_denoise_with_the_step_model(model):
  steps, (text, mask, pooled, guidance) = _inputs(model)
  noise = steps[0][0]
  scheduler = FlowEulerScheduler(FlowEulerConfig(shift=7.0))  # HunyuanVideo's flow shift
  state = scheduler.set_timesteps(3)

  def run(schedule, timed=False):
    step_model = HunyuanAstraeaStepModel(model, schedule, text, pooled, text_mask=mask,
                                         guidance=6000.0, config=AstraeaConfig(), timed=timed)
    out, cache, stats = loop.denoise(step_model, noise, scheduler, state, guidance_scale=1.0,
                                     progress=False)
    return out, cache, step_model

  sparse, cache, step_model = run(BudgetSchedule.uniform(3, 0.5), timed=True)
  assert sparse.shape == noise.shape and np.isfinite(np.asarray(sparse)).all()
  assert [s.num_selected for s in step_model.stats] == [N, N // 2, N // 2]
  assert [s.first_call for s in step_model.stats] == [True, True, False]
  # One record per step: every dual and single block ran, on half the tokens after step 0.
  layers = model.config.num_layers + model.config.num_single_layers
  assert [(r.blocks, r.tokens) for r in step_model.records] == [(layers, 1.0), (layers, 0.5),
                                                                 (layers, 0.5)]
  np.testing.assert_array_equal(cache.skips.max(), 2)  # a token may skip both sparse steps

  dense, _, _ = run(BudgetSchedule.dense(3))
  jitted = nnx.jit(lambda m, l, t: m(l, t, text, mask, pooled, guidance))
  reference, _, _ = loop.denoise(lambda l, t, c, i: (jitted(model, l, t), c), noise, scheduler,
                                 state, guidance_scale=1.0, progress=False)
  _assert_close(dense, reference)
  assert _rel_err(sparse, reference) > 1e-4
