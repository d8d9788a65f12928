"""`pallas_kernels.selected_query_attention` against float64 numpy attention.

One test body serves CPU and GPU: on the CPU (`INTERPRET`) the Mosaic GPU kernel runs in GPU
interpret mode, which also fills fresh buffers with NaN (so an output element the kernel never
writes shows up) and checks barrier use and data races; on a GPU the allocator is poisoned with NaN
buffers before each call instead. Tolerances (relative L2 error of the output) follow the operand
precision: bf16 1e-2, fp16 4e-3, fp32 1e-5.
"""

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import INTERPRET, ON_GPU
from jax.experimental.pallas import mosaic_gpu as plgpu

import pallas_kernels as pk

TOL = {jnp.bfloat16: 1e-2, jnp.float16: 4e-3, jnp.float32: 1e-5}
LSE_TOL = {jnp.bfloat16: 2e-4, jnp.float16: 2e-4, jnp.float32: 1e-5}
TINY = pk.TUNING_PRESETS["tiny"]


def interpret_params():
  if not INTERPRET:
    return False
  return plgpu.InterpretGPUParams(detect_races=True, uninitialized_memory="nan")


def races_found() -> bool:
  if not INTERPRET:
    return False
  # pylint: disable-next=import-outside-toplevel
  from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call

  return bool(interpret_pallas_call.get_races().races_found)


def poison_device(nbytes: int) -> None:
  """On a GPU, hand the allocator a freed NaN buffer so fresh outputs start as garbage."""
  if ON_GPU:
    buf = jnp.full((nbytes // 4 + 1,), jnp.nan, jnp.float32).block_until_ready()
    buf.delete()


def inputs(seed_text: str, b, nq, nk, h, d, dtype):
  rng = np.random.default_rng(zlib.crc32(seed_text.encode()))
  q = rng.standard_normal((b, nq, h, d), dtype=np.float32)
  k = rng.standard_normal((b, nk, h, d), dtype=np.float32)
  v = rng.standard_normal((b, nk, h, d), dtype=np.float32)
  return tuple(jnp.asarray(x).astype(dtype) for x in (q, k, v))


def numpy_attention(q, k, v, scale, kv_len=None, mask=None):
  """float64 attention on the (rounded) inputs: out [B, Nq, H, D], lse [B, H, Nq]."""
  q, k, v = (np.asarray(x.astype(jnp.float32), np.float64) for x in (q, k, v))
  s = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
  valid = np.ones(s.shape, bool)
  if kv_len is not None:
    kv_len = np.broadcast_to(np.asarray(kv_len), (q.shape[0],))
    valid &= (np.arange(k.shape[1])[None, :] < kv_len[:, None])[:, None, None, :]
  if mask is not None:
    valid &= np.asarray(mask)
  s = np.where(valid, s, -np.inf)
  m = s.max(-1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  e = np.where(valid, np.exp(s - m), 0.0)
  l = e.sum(-1, keepdims=True)
  out = np.einsum("bhqk,bkhd->bqhd", e / np.where(l > 0, l, 1.0), v)  # rows with no key: 0
  with np.errstate(divide="ignore"):
    lse = np.where(l[..., 0] > 0, (m + np.log(l))[..., 0], -np.inf)
  return out, lse


def check_close(out, lse, want_out, want_lse, dtype):
  out = np.asarray(out.astype(jnp.float32), np.float64)
  lse = np.asarray(lse, np.float64)
  assert np.isfinite(out).all(), "output has NaN/inf: some element was not written"
  err = np.linalg.norm(out - want_out) / max(np.linalg.norm(want_out), 1e-30)
  assert err < TOL[dtype], f"relative error {err:.2e} >= {TOL[dtype]:.0e}"
  np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))
  finite = np.isfinite(want_lse)
  np.testing.assert_allclose(lse[finite], want_lse[finite], rtol=0, atol=LSE_TOL[dtype])


# (B, Nq, Nk, H, D, dtype, kv_len)
CASES = [
    pytest.param(1, 192, 192, 2, 64, jnp.bfloat16, None, id="nq_eq_nk-d64-bf16"),
    pytest.param(2, 1, 130, 2, 72, jnp.bfloat16, None, id="nq1-d72-ragged_nk-b2"),
    pytest.param(2, 70, 200, 1, 128, jnp.float16, [200, 61], id="per_batch_kv_len-fp16"),
    pytest.param(1, 201, 131, 1, 128, jnp.bfloat16, 100, id="ragged_nq-int_kv_len"),
    pytest.param(2, 64, 64, 1, 64, jnp.float16, [0, 64], id="empty_row"),
]
GPU_CASES = [
    pytest.param(2, 4100, 4099, 3, 128, jnp.bfloat16, None, id="gpu-4k",
                 marks=pytest.mark.gpu_only),
    pytest.param(1, 1500, 2053, 2, 256, jnp.bfloat16, [1999], id="gpu-d256",
                 marks=pytest.mark.gpu_only),
]


@pytest.mark.parametrize("b,nq,nk,h,d,dtype,kv_len", CASES + GPU_CASES)
def test_mosaic_gpu_matches_float64(b, nq, nk, h, d, dtype, kv_len):
  q, k, v = inputs(f"mosaic{b}{nq}{nk}{h}{d}{dtype}{kv_len}", b, nq, nk, h, d, dtype)
  kv = None if kv_len is None else (kv_len if isinstance(kv_len, int) else jnp.asarray(kv_len))
  scale = 0.7 / d ** 0.5
  poison_device(q.size * 4 * 8)
  out, lse = pk.selected_query_attention(q, k, v, scale=scale, kv_len=kv,
                                         implementation="mosaic_gpu",
                                         tuning=TINY if INTERPRET else None,
                                         interpret=interpret_params())
  assert out.shape == q.shape and out.dtype == q.dtype
  assert lse.shape == (b, h, nq) and lse.dtype == jnp.float32
  check_close(out, lse, *numpy_attention(q, k, v, scale, kv_len), dtype)
  assert not races_found()


def test_mosaic_gpu_without_schedule_barrier():
  """The default tuning runs the warpgroups without the ping-pong barrier; TINY runs with it."""
  b, nq, nk, h, d, dtype = 2, 100, 150, 1, 64, jnp.bfloat16
  q, k, v = inputs("nosched", b, nq, nk, h, d, dtype)
  tuning = dataclasses.replace(TINY, schedule_barrier=False) if INTERPRET else None
  poison_device(q.size * 4 * 8)
  out, lse = pk.selected_query_attention(q, k, v, kv_len=jnp.asarray([150, 90]),
                                         implementation="mosaic_gpu", tuning=tuning,
                                         interpret=interpret_params())
  check_close(out, lse, *numpy_attention(q, k, v, d ** -0.5, [150, 90]), dtype)
  assert not races_found()


@pytest.mark.parametrize("tuning", [
    pk.AttentionTuning(block_kv=192, compute_registers=240),
    pk.AttentionTuning(block_kv=128, stages=3),
], ids=["bkv192", "stages3"])
def test_mosaic_gpu_large_tiles(tuning):
  """The tiles that fill Hopper's shared memory at D = 128 (the LSE then bypasses shared memory):
  several full key steps, a ragged masked last step, two query tiles, B = 2."""
  b, nq, nk, h, d, dtype = 2, 200, 2 * tuning.block_kv * tuning.stages + 37, 1, 128, jnp.bfloat16
  q, k, v = inputs(f"large{tuning.block_kv}{tuning.stages}", b, nq, nk, h, d, dtype)
  pk.mosaic_attention.check_mosaic_gpu_inputs(dtype, d, tuning)  # fits in shared memory
  poison_device(q.size * 4 * 8)
  out, lse = pk.selected_query_attention(q, k, v, kv_len=jnp.asarray([nk, nk - 100]),
                                         implementation="mosaic_gpu", tuning=tuning,
                                         interpret=interpret_params())
  check_close(out, lse, *numpy_attention(q, k, v, d ** -0.5, [nk, nk - 100]), dtype)
  assert not races_found()


@pytest.mark.parametrize("b,nq,nk,h,d,dtype,kv_len", CASES + [
    pytest.param(2, 45, 97, 2, 40, jnp.float32, [97, 3], id="fp32-odd_d"),
])
@pytest.mark.parametrize("implementation", ["chunked", "reference"])
def test_pure_jax_paths_match_float64(b, nq, nk, h, d, dtype, kv_len, implementation):
  q, k, v = inputs(f"{implementation}{b}{nq}{nk}{h}{d}{dtype}{kv_len}", b, nq, nk, h, d, dtype)
  kv = None if kv_len is None else (kv_len if isinstance(kv_len, int) else jnp.asarray(kv_len))
  out, lse = pk.selected_query_attention(q, k, v, kv_len=kv, implementation=implementation,
                                         tuning=TINY)
  assert out.dtype == q.dtype and lse.dtype == jnp.float32
  check_close(out, lse, *numpy_attention(q, k, v, d ** -0.5, kv_len), dtype)


def test_chunked_under_jit_with_traced_kv_len():
  q, k, v = inputs("jit", 2, 33, 90, 2, 16, jnp.float32)

  @jax.jit
  def f(q, k, v, kv_len):
    return pk.selected_query_attention(q, k, v, kv_len=kv_len, implementation="chunked",
                                       tuning=TINY)

  kv_len = np.array([90, 17])
  out, lse = f(q, k, v, jnp.asarray(kv_len, jnp.int32))
  check_close(out, lse, *numpy_attention(q, k, v, 16 ** -0.5, kv_len), jnp.float32)


def test_default_implementation():
  if ON_GPU:
    pytest.skip("CPU choice")
  assert pk.default_implementation(jnp.bfloat16) == "chunked"
  assert pk.default_implementation(jnp.bfloat16, interpret=True) == "mosaic_gpu"
  assert set(pk.IMPLEMENTATIONS) == {"mosaic_gpu", "chunked", "reference"}
  q, k, v = inputs("default", 1, 5, 7, 1, 8, jnp.float32)
  out, lse = pk.selected_query_attention(q, k, v, scale=0.3)
  check_close(out, lse, *numpy_attention(q, k, v, 0.3), jnp.float32)


def test_short_key_sequences_take_the_chunked_path(monkeypatch):
  """On Hopper, fewer keys than one 64-key tile go to "chunked"; longer ones to the kernel."""
  import pallas_kernels.attention as attention_module  # pylint: disable=import-outside-toplevel

  monkeypatch.setattr(attention_module, "_hopper_present", lambda: True)
  choose = pk.default_implementation
  assert choose(jnp.bfloat16) == "mosaic_gpu"
  assert choose(jnp.bfloat16, num_keys=pk.SHORT_KEYS) == "mosaic_gpu"
  assert choose(jnp.bfloat16, num_keys=pk.SHORT_KEYS - 1) == "chunked"
  assert choose(jnp.float32, num_keys=4096) == "chunked"
  assert choose(jnp.bfloat16, num_keys=30, interpret=True) == "mosaic_gpu"

  called = []
  for name in ("mosaic_gpu", "chunked"):
    real = pk.IMPLEMENTATIONS[name]

    def spy(*a, _name=name, _real=real, **kw):
      called.append(_name)
      return pk.IMPLEMENTATIONS["reference"](*a, **kw)

    monkeypatch.setitem(pk.IMPLEMENTATIONS, name, spy)
  for nk in (30, 64):
    q, k, v = inputs("short", 2, 5, nk, 2, 8, jnp.bfloat16)
    pk.selected_query_attention(q, k, v)
  assert called == ["chunked", "mosaic_gpu"]


def test_preset_override_is_scoped():
  before = pk.TUNING_PRESETS["default"]
  swept = dataclasses.replace(before, block_kv=64)
  with pytest.raises(RuntimeError, match="inside"):
    with pk.preset_override("default", swept):
      assert pk.default_tuning(128, 32760) is swept
      raise RuntimeError("inside")
  assert pk.TUNING_PRESETS["default"] is before
  with pytest.raises(KeyError, match="unknown tuning preset"):
    with pk.preset_override("fastest", swept):
      pass
  with pytest.raises(TypeError, match="AttentionTuning"):
    with pk.preset_override("default", {"block_kv": 64}):
      pass


def test_bad_inputs_raise():
  q, k, v = inputs("bad", 1, 4, 6, 2, 8, jnp.bfloat16)
  f = pk.selected_query_attention
  with pytest.raises(ValueError, match=r"\[B, N, H, D\]"):
    f(q[0], k, v)
  with pytest.raises(ValueError, match="matching q"):
    f(q, k[:, :, :1], v[:, :, :1])
  with pytest.raises(TypeError, match="share a dtype"):
    f(q, k.astype(jnp.float32), v)
  with pytest.raises(TypeError, match="bfloat16, float16 or float32"):
    f(*(x.astype(jnp.int8) for x in (q, k, v)))
  with pytest.raises(ValueError, match="scale"):
    f(q, k, v, scale=0.0)
  with pytest.raises(ValueError, match="kv_len"):
    f(q, k, v, kv_len=7)
  with pytest.raises(ValueError, match="kv_len"):
    f(q, k, v, kv_len=jnp.array([1, 2]))
  with pytest.raises(ValueError, match="unknown implementation"):
    f(q, k, v, implementation="triton")
  with pytest.raises(TypeError, match="chunked"):
    f(*(x.astype(jnp.float32) for x in (q, k, v)), implementation="mosaic_gpu", interpret=True)
  with pytest.raises(ValueError, match="head dims up to"):
    q3, k3, v3 = inputs("wide", 1, 4, 6, 1, 320, jnp.bfloat16)
    f(q3, k3, v3, implementation="mosaic_gpu", interpret=True)
  with pytest.raises(ValueError, match="multiple of 128"):
    pk.AttentionTuning(block_q=64)
  with pytest.raises(ValueError, match="compute_registers"):
    pk.AttentionTuning(compute_registers=236)
  with pytest.raises(ValueError, match="shared memory"):
    pk.mosaic_attention.check_mosaic_gpu_inputs(jnp.bfloat16, 128,
                                                pk.AttentionTuning(block_kv=256))


def test_default_tuning_by_key_count():
  """192-key tiles for long key sequences, 128-key tiles where they pad much less (512 text keys),
  64-key tiles at head dim 256; each preset fits the kernel's shared memory."""
  presets = pk.TUNING_PRESETS
  assert pk.default_tuning(128, 32760) is presets["default"]  # 32,832 vs 32,768 padded
  assert pk.default_tuning(128, 512) is presets["short_keys"]  # 576 vs 512
  assert pk.default_tuning(128, 256) is presets["short_keys"]
  assert pk.default_tuning(128, 300) is presets["default"]  # 384 either way, in fewer steps
  assert pk.default_tuning(64, 4099) is presets["default"]
  assert pk.default_tuning(256, 512) is presets["wide_head"]
  for d, nk in ((128, 32760), (128, 512), (256, 512)):
    pk.mosaic_attention.check_mosaic_gpu_inputs(jnp.bfloat16, d, pk.default_tuning(d, nk))


def test_register_split_fits_the_register_file():
  """`setmaxnreg` waits for registers that are free: asking for all 65,536 hangs the kernel."""
  for tuning in (pk.AttentionTuning(), pk.AttentionTuning(block_kv=128), TINY,
                 pk.AttentionTuning(block_kv=192, compute_registers=232),
                 *pk.TUNING_PRESETS.values()):
    assert 256 * tuning.registers + 128 * tuning.memory_registers <= 64512
    assert tuning.memory_registers >= 24
  assert pk.AttentionTuning().registers == 240  # the 96-register score tile of 192 keys
  assert pk.AttentionTuning(block_kv=128).registers == 232
