"""Sharded dense and ASTRAEA inference on 2, 4 and 8 fake CPU devices (tiny Wan preset, fp32).

conftest.py forces 8 host devices. With guidance the meshes are (cfg, seq) = (2, 1), (2, 2), (2, 4):
the tiny preset's 2 heads divide seq = 2 (Ulysses all-to-all) but not seq = 4 (the gather-K/V
fallback). Sharded ASTRAEA selects its top-k per shard, so it is compared with the one-device
forward that selects per contiguous chunk of N/P tokens (`AstraeaConfig(selection_chunks=P)`).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from astraea_jax import parallel
from astraea_jax.acceleration import AstraeaConfig, BudgetSchedule, jit_astraea_step
from astraea_jax.acceleration.astraea import AstraeaStepModel
from astraea_jax.acceleration.token_selection import select_top_k
from astraea_jax.models import attention as attention_lib
from astraea_jax.models.wan import WanConfig, WanTransformer3DModel
from astraea_jax.parallel import mesh as mesh_lib
from astraea_jax.parallel import sequence
from astraea_jax.pipeline import GenerationConfig, GenerationError, WanPipeline

B, LATENT = 2, (4, 2, 8, 8)  # latents [B=2, C_in=4, T=2, Y=8, X=8] -> N = 2 * 4 * 4 = 32 tokens
N = 32
RTOL = 1e-5  # fp32; the sharded programs only reorder sums (measured errors are ~1e-7)


def _assert_close(a, b, rtol=RTOL):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  err = np.linalg.norm(a - b) / np.linalg.norm(b)
  assert err < rtol, f"relative error {err:.3e} >= {rtol:.0e}"


@pytest.fixture(scope="module")
def split():
  return nnx.split(WanTransformer3DModel(WanConfig.preset("tiny"), rngs=nnx.Rngs(0)))


def _inputs(step=0):
  k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
  latents = jax.random.normal(k1, (B, *LATENT), jnp.float32)
  drift = jax.random.normal(k3, latents.shape, jnp.float32)
  context = jax.random.normal(k2, (B, 5, 16), jnp.float32)
  return latents + 0.2 * step * drift, jnp.full((B,), 900.0 - 150 * step, jnp.float32), context


@functools.partial(jax.jit, static_argnums=0)
def _dense_reference(graphdef, state, latents, timestep, context):
  return nnx.merge(graphdef, state)(latents, timestep, context)


# -- mesh, rules, selection ------------------------------------------------------------------------


def test_mesh_axes_and_rules():
  def shape(**kw):
    return tuple(parallel.make_mesh(parallel.MeshConfig(**kw)).shape.values())

  assert shape(num_devices=1) == (1, 1, 1)
  assert shape(num_devices=2) == (1, 2, 1)
  assert shape(num_devices=8) == (1, 2, 4)
  assert shape(num_devices=8, guidance=False) == (1, 1, 8)
  assert shape(num_devices=6) == (1, 2, 3)
  assert shape(num_devices=8, data=2) == (2, 2, 2)
  assert shape() == (1, 2, 4)  # all 8 visible devices
  assert parallel.spec("layers", "batch", "tokens", "channels") == P(None, ("cfg", "data"), "seq",
                                                                     None)
  with pytest.raises(ValueError, match="logical axis"):
    parallel.spec("frames")
  with pytest.raises(ValueError, match="num_devices"):
    parallel.MeshConfig(num_devices=0)
  with pytest.raises(ValueError, match="data"):
    parallel.MeshConfig(num_devices=6, data=4)
  with pytest.raises(ValueError, match="visible"):
    parallel.make_mesh(parallel.MeshConfig(num_devices=9))


def test_device_counts_and_rounding():
  # N = 30 splits over seq 1, 2, 3 (cfg 2 x seq 3 = 6 devices), not seq 4.
  assert mesh_lib.fitting_num_devices(8, 30, 2) == 6
  assert mesh_lib.fitting_num_devices(8, 32, 2) == 8
  assert parallel.mesh_for_request(1, num_tokens=32, batch=2, guidance=True) is None
  assert dict(parallel.mesh_for_request(None, num_tokens=30, batch=2, guidance=True).shape) == {
      "data": 1, "cfg": 2, "seq": 3}
  with pytest.raises(ValueError, match="do not split"):
    parallel.mesh_for_request(8, num_tokens=30, batch=2, guidance=True)
  assert [parallel.round_num_selected(k, 32, 4) for k in (0, 1, 5, 6, 13, 31, 32)] == [
      0, 4, 4, 8, 12, 32, 32]
  assert parallel.round_num_selected(13, 32, 1) == 13
  assert parallel.default_num_devices() == 1  # CPU


@pytest.mark.parametrize("method", ["sort", "radix"])
def test_chunked_top_k_is_top_k_per_chunk(method):
  scores = jax.random.normal(jax.random.key(0), (3, 32), jnp.float32)
  idx = np.asarray(select_top_k(scores, 8, method=method, chunks=4))  # [B, S]
  for b in range(3):
    for c in range(4):
      part = idx[b, 2 * c:2 * c + 2]
      assert ((8 * c <= part) & (part < 8 * (c + 1))).all()
      want = np.sort(np.asarray(jax.lax.top_k(scores[b, 8 * c:8 * (c + 1)], 2)[1]) + 8 * c)
      np.testing.assert_array_equal(np.sort(part), want)
  np.testing.assert_array_equal(select_top_k(scores, 8, method=method, chunks=1),
                                select_top_k(scores, 8, method=method))
  with pytest.raises(ValueError, match="chunks"):
    select_top_k(scores, 6, chunks=4)


# -- sequence-parallel attention -------------------------------------------------------------------


@pytest.mark.parametrize("heads, strategy", [(4, "ulysses"), (4, "gather_kv"), (2, None)])
def test_sequence_parallel_attention_with_selected_queries(heads, strategy):
  mesh = parallel.make_mesh(parallel.MeshConfig(num_devices=4, guidance=False))  # seq = 4
  kq, kk, kv = jax.random.split(jax.random.key(1), 3)
  q = jax.random.normal(kq, (2, 8, heads, 8), jnp.float32)  # [B, S, H, D]: 2 queries per shard
  k = jax.random.normal(kk, (2, 16, heads, 8), jnp.float32)  # [B, N, H, D]: 4 keys per shard
  v = jax.random.normal(kv, (2, 16, heads, 8), jnp.float32)
  tokens = P(None, "seq", None, None)
  fn = jax.jit(jax.shard_map(
      lambda q, k, v: sequence.sequence_parallel_attention(q, k, v, return_lse=True,
                                                           strategy=strategy),
      mesh=mesh, in_specs=(tokens, tokens, tokens), out_specs=(tokens, P(None, None, "seq")),
      check_vma=False))
  out, lse = fn(q, k, v)
  want_out, want_lse = attention_lib.attention_with_lse(q, k, v)
  _assert_close(out, want_out)
  _assert_close(lse, want_lse)
  if strategy is None:
    assert sequence.choose_strategy(heads, 4) == "gather_kv"
  with pytest.raises(ValueError, match="Ulysses"):
    sequence.choose_strategy(2, 4, "ulysses")


# -- sharded forwards against one device -----------------------------------------------------------


@pytest.mark.parametrize("num_devices, guidance, data", [
    (2, True, 1),  # (data, cfg, seq) = (1, 2, 1)
    (4, True, 1),  # (1, 2, 2): Ulysses
    (8, True, 1),  # (1, 2, 4): 2 heads on 4 shards -> gather-K/V fallback
    (8, False, 2),  # (2, 1, 4): batch split on the data axis, fallback
])
def test_sharded_dense_matches_one_device(num_devices, guidance, data, split):
  graphdef, state = split
  inputs = _inputs()
  want = _dense_reference(graphdef, state, *inputs)
  mesh = parallel.make_mesh(parallel.MeshConfig(num_devices=num_devices, guidance=guidance,
                                                data=data))
  fn = parallel.jit_sharded_dense(graphdef, mesh)
  out = fn(parallel.replicate(state, mesh), *parallel.place_inputs(mesh, *inputs))
  assert out.sharding.spec == P() and len(out.sharding.device_set) == num_devices
  _assert_close(out, want)


@pytest.mark.parametrize("num_devices", [2, 4, 8])
def test_sharded_astraea_matches_per_shard_reference(num_devices, split):
  """Four steps, k = N, N/4, N/4, N: every output and cache equals the one-device forward that
  selects per chunk; the k = N steps (fresh and cached) equal the dense model."""
  graphdef, state = split
  mesh = parallel.make_mesh(parallel.MeshConfig(num_devices=num_devices))
  p = mesh_lib.seq_size(mesh)
  config = AstraeaConfig()
  reference = jit_astraea_step(graphdef, config=dataclasses.replace(config, selection_chunks=p))
  sharded = parallel.jit_sharded_astraea_step(graphdef, mesh, config=config)
  sharded_state = parallel.replicate(state, mesh)
  cache_ref = cache = None
  for step, k in enumerate([N, N // 4, N // 4, N]):
    inputs = _inputs(step)
    want, cache_ref = reference(state, *inputs, cache_ref, num_selected=k)
    out, cache = sharded(sharded_state, *parallel.place_inputs(mesh, *inputs), cache,
                         num_selected=k)
    _assert_close(out, want)
    _assert_close(cache.out, cache_ref.out)
    _assert_close(cache.lse, cache_ref.lse)
    np.testing.assert_array_equal(cache.skips, cache_ref.skips)
    assert cache.out.sharding.is_equivalent_to(
        parallel.sharding(mesh, "layers", "batch", "tokens", "channels"), 4)
    if k == N:  # theta = 1 is the dense model
      _assert_close(out, _dense_reference(graphdef, state, *inputs))
  assert int(jnp.max(cache.skips)) == 0
  if p > 1:
    with pytest.raises(ValueError, match="multiple of the seq axis"):
      sharded(sharded_state, *parallel.place_inputs(mesh, *_inputs()), cache, num_selected=p + 1)


@pytest.mark.parametrize("num_devices", [4, 8])
def test_sharded_light_dense_steps_match_one_device(num_devices, split):
  """A whole-step schedule on the sharded step model: the dense steps that no partial step
  follows (0, 1 and 6) keep only the last block's output, and every output equals the one-device
  step model that refreshes the whole cache at every dense step."""
  graphdef, _ = split
  model = nnx.merge(*split)
  mesh = parallel.make_mesh(parallel.MeshConfig(num_devices=num_devices))
  p = mesh_lib.seq_size(mesh)
  schedule = BudgetSchedule((1.0, 1.0, 0.0, 1.0, 0.5, 0.0, 1.0))
  latents, _, context = _inputs()
  sharded = parallel.ShardedAstraeaStepModel(model, schedule, context, mesh)
  calls, jitted = [], sharded._jitted  # pylint: disable=protected-access

  def spy(*args, **kwargs):
    calls.append(kwargs["refresh_cache"])
    return jitted(*args, **kwargs)

  sharded._jitted = spy  # pylint: disable=protected-access
  reference = AstraeaStepModel(
      model, schedule, context, config=AstraeaConfig(selection_chunks=p), lookahead=False)
  carry = carry_ref = None
  x = x_ref = latents
  for step in range(len(schedule)):
    timestep = jnp.float32(1000.0 - 150.0 * step)
    out, carry = sharded(x, timestep, carry, step)
    want, carry_ref = reference(x_ref, timestep, carry_ref, step)
    _assert_close(out, want)
    x, x_ref = x - 0.05 * out, x_ref - 0.05 * want
  assert calls == [False, False, True, True, True, True, False]
  assert carry.out.sharding.is_equivalent_to(
      parallel.sharding(mesh, "layers", "batch", "tokens", "channels"), 4)
  _assert_close(carry.out[-1], carry_ref.out[-1])


# -- the pipeline ----------------------------------------------------------------------------------


def test_multi_process_detection():
  assert not parallel.is_multi_process({})
  assert parallel.is_multi_process({"JAX_COORDINATOR_ADDRESS": "h0:1234", "JAX_NUM_PROCESSES": "2"})
  assert not parallel.is_multi_process({"JAX_COORDINATOR_ADDRESS": "h0:1234",
                                        "JAX_NUM_PROCESSES": "1"})
  assert parallel.is_multi_process({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"})
  assert not parallel.is_multi_process({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"})
  assert parallel.is_multi_process({"OMPI_COMM_WORLD_SIZE": "4"})
  assert not parallel.maybe_initialize({})  # single process: jax.distributed is left alone


def test_pipeline_devices():
  cfg = GenerationConfig(height=16, width=24, frames=5, steps=3, guidance=3.0, seed=7,
                         negative_prompt="blurry")  # N = 5 * 8 * 12 = 480
  config = WanConfig.preset("tiny", in_channels=3, out_channels=3)

  def encode_text(prompts):
    rows = [jax.random.normal(jax.random.key(sum(map(ord, s))), (5, 16), jnp.float32)
            for s in prompts]
    return jnp.stack(rows)

  pipe = WanPipeline(name="tiny-pixel", transformer=WanTransformer3DModel(config, rngs=nnx.Rngs(0)),
                     encode_text=encode_text, decode=jnp.tanh, spatial_stride=1,
                     temporal_stride=1, default_shift=3.0, defaults=cfg)
  def run(**kw):
    return pipe.generate(["a red circle"], cfg, progress=False, **kw).latents

  _assert_close(run(devices=4), run(devices=1), rtol=1e-4)
  half = BudgetSchedule.uniform(cfg.steps, 0.5)  # k = 240, a multiple of seq = 2
  _assert_close(run(devices=4, schedule=half),
                run(devices=1, schedule=half, astraea=AstraeaConfig(selection_chunks=2)),
                rtol=1e-4)
  with pytest.raises(GenerationError, match="do not split"):
    run(devices=7)  # cfg 1 x seq 7: 480 tokens do not split in 7
