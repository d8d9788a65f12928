"""Memory-bounded attention with log-sum-exp in pure JAX: the path for CPUs and non-Hopper GPUs.

The online softmax of FlashAttention (Dao et al., arXiv 2205.14135), written with `lax.map` over
query chunks and `lax.scan` over key chunks, so the largest temporary is one
`[B, H, q_chunk, kv_chunk]` float32 score tile whatever the sequence length. Scores and the
running statistics are float32; half-precision inputs enter the matmuls as they are (with float32
accumulation) and the probabilities are rounded to the input dtype before `P V`, as the Mosaic GPU
kernel does. float32 inputs use HIGHEST matmul precision.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.tuning import AttentionTuning

__all__ = ["chunked_attention", "chunked_block_sparse_attention"]


def _precision(dtype):
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


# Finite start for the running maximum, so that rows which have seen only masked keys never compute
# -inf - (-inf).
_M_INIT = -1e30


def _online_update(carry, s, v_tile, valid, *, dtype, precision, spec_pv):
  """One online-softmax step: fold the scores `s` of one key tile into (acc, m, l)."""
  acc, m, l = carry
  s = jnp.where(valid, s, -jnp.inf)
  m_new = jnp.maximum(m, s.max(axis=-1))
  alpha = jnp.exp(m - m_new)
  p = jnp.exp(s - m_new[..., None])
  l = l * alpha + p.sum(axis=-1)
  pv = jnp.einsum(spec_pv, p.astype(dtype), v_tile, precision=precision,
                  preferred_element_type=jnp.float32)
  return acc * alpha[..., None] + pv, m_new, l


def _finish(acc, m, l):
  has_keys = l > 0.0
  out = acc / jnp.where(has_keys, l, 1.0)[..., None]
  lse = jnp.where(has_keys, m + jnp.log(jnp.where(has_keys, l, 1.0)), -jnp.inf)
  return out, lse


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float,
                      kv_len: jax.Array | None, tuning: AttentionTuning
                      ) -> tuple[jax.Array, jax.Array]:
  """Dense attention with LSE; see `selected_query_attention` for the contract.

  Args:
    q: `[B, Nq, H, D]`; k, v: `[B, Nk, H, D]`, same dtype.
    scale: score scale.
    kv_len: `[B]` int32 valid keys per batch row, or None when all Nk keys are valid.
    tuning: `q_chunk` and `kv_chunk` bound the working set.

  Returns:
    out `[B, Nq, H, D]` in q's dtype and lse `[B, H, Nq]` float32.
  """
  batch, nq, heads, dim = q.shape
  nk = k.shape[1]
  dtype = q.dtype
  precision = _precision(dtype)
  qc = min(tuning.q_chunk, nq)
  kc = min(tuning.kv_chunk, nk)
  nq_pad = -(-nq // qc) * qc
  nk_pad = -(-nk // kc) * kc
  if kv_len is None:
    kv_len = jnp.full((batch,), nk, jnp.int32)
  q = jnp.pad(q, ((0, 0), (0, nq_pad - nq), (0, 0), (0, 0)))
  k = jnp.pad(k, ((0, 0), (0, nk_pad - nk), (0, 0), (0, 0)))
  v = jnp.pad(v, ((0, 0), (0, nk_pad - nk), (0, 0), (0, 0)))
  # Folding the scale into q (in float32, then back to the input dtype for half inputs) would round
  # it twice; scaling the float32 scores keeps one rounding.
  q_chunks = q.reshape(batch, nq_pad // qc, qc, heads, dim).swapaxes(0, 1)  # [Tq, B, qc, H, D]
  k_chunks = k.reshape(batch, nk_pad // kc, kc, heads, dim).swapaxes(0, 1)  # [Tk, B, kc, H, D]
  v_chunks = v.reshape(batch, nk_pad // kc, kc, heads, dim).swapaxes(0, 1)
  scale32 = jnp.float32(scale)

  def one_q_chunk(q_c):  # [B, qc, H, D]
    def kv_step(carry, xs):
      k_c, v_c, start = xs
      s = jnp.einsum("bqhd,bkhd->bhqk", q_c, k_c, precision=precision,
                     preferred_element_type=jnp.float32) * scale32  # [B, H, qc, kc]
      valid = (start + jnp.arange(kc))[None, :] < kv_len[:, None]  # [B, kc]
      carry = _online_update(carry, s, v_c, valid[:, None, None, :], dtype=dtype,
                             precision=precision, spec_pv="bhqk,bkhd->bhqd")
      return carry, None

    init = (jnp.zeros((batch, heads, qc, dim), jnp.float32),
            jnp.full((batch, heads, qc), _M_INIT, jnp.float32),
            jnp.zeros((batch, heads, qc), jnp.float32))
    starts = jnp.arange(nk_pad // kc, dtype=jnp.int32) * kc
    (acc, m, l), _ = lax.scan(kv_step, init, (k_chunks, v_chunks, starts))
    return _finish(acc, m, l)  # [B, H, qc, D], [B, H, qc]

  out, lse = lax.map(one_q_chunk, q_chunks)  # [Tq, B, H, qc, D], [Tq, B, H, qc]
  out = out.transpose(1, 0, 3, 2, 4).reshape(batch, nq_pad, heads, dim)[:, :nq]
  lse = lse.transpose(1, 2, 0, 3).reshape(batch, heads, nq_pad)[:, :, :nq]
  return out.astype(dtype), lse


def chunked_block_sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float,
                                   kv_len: jax.Array | None, tile_indices: jax.Array,
                                   tile_counts: jax.Array, block_q: int, block_kv: int
                                   ) -> tuple[jax.Array, jax.Array]:
  """Block-sparse attention with LSE; see `block_sparse_attention` for the contract.

  Each scan step gathers, for every (batch, head, query tile), the key/value tile named by the next
  entry of its list, so the work is proportional to the listed tiles, not to Nk.
  """
  batch, nq, heads, dim = q.shape
  nk = k.shape[1]
  dtype = q.dtype
  precision = _precision(dtype)
  num_q_tiles = tile_indices.shape[2]
  num_kv_tiles = -(-nk // block_kv)
  if kv_len is None:
    kv_len = jnp.full((batch,), nk, jnp.int32)
  nq_pad = num_q_tiles * block_q
  nk_pad = num_kv_tiles * block_kv
  q = jnp.pad(q, ((0, 0), (0, nq_pad - nq), (0, 0), (0, 0)))
  k = jnp.pad(k, ((0, 0), (0, nk_pad - nk), (0, 0), (0, 0)))
  v = jnp.pad(v, ((0, 0), (0, nk_pad - nk), (0, 0), (0, 0)))
  q_tiles = q.reshape(batch, num_q_tiles, block_q, heads, dim).transpose(0, 3, 1, 2, 4)
  k_tiles = k.reshape(batch, num_kv_tiles, block_kv, heads, dim).transpose(0, 3, 1, 2, 4)
  v_tiles = v.reshape(batch, num_kv_tiles, block_kv, heads, dim).transpose(0, 3, 1, 2, 4)
  # q_tiles [B, H, Tq, bq, D]; k_tiles, v_tiles [B, H, Tk, bkv, D]
  b_ix = jnp.arange(batch)[:, None, None]
  h_ix = jnp.arange(heads)[None, :, None]
  scale32 = jnp.float32(scale)

  def step(carry, t):
    tile = jnp.clip(tile_indices[..., t], 0, num_kv_tiles - 1)  # [B, H, Tq]
    k_t = k_tiles[b_ix, h_ix, tile]  # [B, H, Tq, bkv, D]
    v_t = v_tiles[b_ix, h_ix, tile]
    s = jnp.einsum("bhtqd,bhtkd->bhtqk", q_tiles, k_t, precision=precision,
                   preferred_element_type=jnp.float32) * scale32  # [B, H, Tq, bq, bkv]
    key_pos = tile[..., None] * block_kv + jnp.arange(block_kv)  # [B, H, Tq, bkv]
    valid = (key_pos < kv_len[:, None, None, None]) & (t < tile_counts)[..., None]
    carry = _online_update(carry, s, v_t, valid[..., None, :], dtype=dtype, precision=precision,
                           spec_pv="bhtqk,bhtkd->bhtqd")
    return carry, None

  init = (jnp.zeros((batch, heads, num_q_tiles, block_q, dim), jnp.float32),
          jnp.full((batch, heads, num_q_tiles, block_q), _M_INIT, jnp.float32),
          jnp.zeros((batch, heads, num_q_tiles, block_q), jnp.float32))
  (acc, m, l), _ = lax.scan(step, init, jnp.arange(tile_indices.shape[-1]))
  out, lse = _finish(acc, m, l)
  out = out.transpose(0, 2, 3, 1, 4).reshape(batch, nq_pad, heads, dim)[:, :nq]
  lse = lse.reshape(batch, heads, nq_pad)[:, :, :nq]
  return out.astype(dtype), lse
