"""`pallas_kernels.block_sparse_attention` against float64 numpy attention under the tile mask.

The mask is built here from the tile lists, independently of `pallas_kernels.reference`. Same
interpret-mode / poisoning discipline and tolerances as test_selected_query_attention.py.
"""

import zlib

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import INTERPRET
from test_selected_query_attention import (
    check_close,
    inputs,
    interpret_params,
    numpy_attention,
    poison_device,
    races_found,
)

import pallas_kernels as pk


def random_layout(seed_text, b, h, nq, nk, block_q, block_kv, *, empty: bool = True):
  """Random distinct tile lists (some empty when `empty`), padded with junk past the counts."""
  rng = np.random.default_rng(zlib.crc32(seed_text.encode()))
  tq, tk = -(-nq // block_q), -(-nk // block_kv)
  width = tk + 1
  idx = np.full((b, h, tq, width), 10**6, np.int32)  # entries past the count must be ignored
  cnt = rng.integers(0 if empty else 1, tk + 1, size=(b, h, tq)).astype(np.int32)
  for i in np.ndindex(b, h, tq):
    idx[i][:cnt[i]] = rng.permutation(tk)[:cnt[i]]
  if empty:
    cnt[0, 0, 0] = 0
  return idx, cnt


def numpy_mask(idx, cnt, nq, nk, block_q, block_kv):
  b, h, _, _ = idx.shape
  mask = np.zeros((b, h, nq, nk), bool)
  for i in np.ndindex(b, h, idx.shape[2]):
    rows = slice(i[2] * block_q, (i[2] + 1) * block_q)
    for t in idx[i][:cnt[i]]:
      mask[i[0], i[1], rows, t * block_kv:(t + 1) * block_kv] = True
  return mask


# (B, Nq, Nk, H, D, dtype, kv_len, block_kv)
CASES = [
    pytest.param(2, 150, 300, 2, 64, jnp.bfloat16, None, 64, id="ragged-bf16-b2"),
    pytest.param(1, 256, 200, 1, 128, jnp.float16, [150], 128, id="kv_len-fp16"),
    pytest.param(2, 1, 190, 1, 72, jnp.bfloat16, [190, 70], 64, id="nq1-d72"),
]


@pytest.mark.parametrize("b,nq,nk,h,d,dtype,kv_len,block_kv", CASES)
def test_mosaic_gpu_matches_float64(b, nq, nk, h, d, dtype, kv_len, block_kv):
  seed = f"sparse{b}{nq}{nk}{h}{d}{dtype}{kv_len}{block_kv}"
  q, k, v = inputs(seed, b, nq, nk, h, d, dtype)
  idx, cnt = random_layout(seed, b, h, nq, nk, 128, block_kv)
  kv = None if kv_len is None else jnp.asarray(kv_len)
  poison_device(q.size * 4 * 8)
  out, lse = pk.block_sparse_attention(q, k, v, jnp.asarray(idx), jnp.asarray(cnt), kv_len=kv,
                                       block_kv=block_kv, implementation="mosaic_gpu",
                                       interpret=interpret_params())
  assert out.shape == q.shape and lse.shape == (b, h, nq)
  want = numpy_attention(q, k, v, d ** -0.5, kv_len,
                         mask=numpy_mask(idx, cnt, nq, nk, 128, block_kv))
  check_close(out, lse, *want, dtype)
  assert not races_found()


@pytest.mark.parametrize("b,nq,nk,h,d,dtype,kv_len,block_kv", CASES + [
    pytest.param(2, 50, 77, 2, 24, jnp.float32, [77, 20], 16, id="fp32-small_tiles"),
])
@pytest.mark.parametrize("implementation", ["chunked", "reference"])
def test_pure_jax_paths_match_float64(b, nq, nk, h, d, dtype, kv_len, block_kv, implementation):
  block_q = 128 if block_kv != 16 else 8
  seed = f"{implementation}{b}{nq}{nk}{h}{d}{dtype}{kv_len}{block_kv}"
  q, k, v = inputs(seed, b, nq, nk, h, d, dtype)
  idx, cnt = random_layout(seed, b, h, nq, nk, block_q, block_kv)
  kv = None if kv_len is None else jnp.asarray(kv_len)
  out, lse = pk.block_sparse_attention(q, k, v, jnp.asarray(idx), jnp.asarray(cnt), kv_len=kv,
                                       block_q=block_q, block_kv=block_kv,
                                       implementation=implementation)
  want = numpy_attention(q, k, v, d ** -0.5, kv_len,
                         mask=numpy_mask(idx, cnt, nq, nk, block_q, block_kv))
  check_close(out, lse, *want, dtype)


@pytest.mark.parametrize("implementation", ["mosaic_gpu", "chunked"])
def test_all_tiles_listed_equals_dense(implementation):
  b, nq, nk, h, d = 1, 130, 250, 2, 64
  q, k, v = inputs(f"full{implementation}", b, nq, nk, h, d, jnp.bfloat16)
  tq, tk = -(-nq // 128), -(-nk // 64)
  rng = np.random.default_rng(5)
  idx = np.stack([rng.permutation(tk) for _ in range(b * h * tq)]).reshape(b, h, tq, tk)
  cnt = np.full((b, h, tq), tk)
  interpret = interpret_params() if implementation == "mosaic_gpu" else False
  out, lse = pk.block_sparse_attention(q, k, v, jnp.asarray(idx), jnp.asarray(cnt), block_kv=64,
                                       implementation=implementation, interpret=interpret)
  dense_out, dense_lse = pk.selected_query_attention(q, k, v, implementation="reference")
  check_close(out, lse, np.asarray(dense_out.astype(jnp.float32), np.float64),
              np.asarray(dense_lse, np.float64), jnp.bfloat16)


def test_bad_layouts_raise():
  q, k, v = inputs("badlayout", 1, 130, 70, 2, 64, jnp.bfloat16)
  idx = jnp.zeros((1, 2, 2, 3), jnp.int32)
  cnt = jnp.ones((1, 2, 2), jnp.int32)
  f = pk.block_sparse_attention
  with pytest.raises(ValueError, match="kv_tile_indices"):
    f(q, k, v, idx[:, :, :1], cnt)
  with pytest.raises(ValueError, match="kv_tile_counts"):
    f(q, k, v, idx, cnt[:, :1])
  with pytest.raises(TypeError, match="integer"):
    f(q, k, v, idx.astype(jnp.float32), cnt)
  with pytest.raises(ValueError, match="unknown implementation"):
    f(q, k, v, idx, cnt, implementation="dense")
  if INTERPRET:
    with pytest.raises(ValueError, match="multiple of 128"):
      f(q, k, v, jnp.zeros((1, 2, 3, 3), jnp.int32), jnp.ones((1, 2, 3), jnp.int32), block_q=64,
        implementation="mosaic_gpu", interpret=True)
