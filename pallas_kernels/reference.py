"""Plain jnp attention with log-sum-exp: the specification the kernels are tested against.

Everything is computed in float32 at HIGHEST matmul precision with the whole `[B, H, Nq, Nk]` score
matrix in memory, so these are for tests and small shapes only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = ["attention_reference", "block_sparse_mask", "block_sparse_reference"]

_HI = jax.lax.Precision.HIGHEST


@functools.partial(jax.jit, static_argnames=("scale",))
def attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float,
                        kv_len: jax.Array, mask: jax.Array | None = None
                        ) -> tuple[jax.Array, jax.Array]:
  """`softmax(q k^T * scale) v` and its natural-log LSE, keys at index >= kv_len[b] excluded.

  Args:
    q: `[B, Nq, H, D]`.
    k, v: `[B, Nk, H, D]`.
    scale: score scale.
    kv_len: `[B]` int32 valid keys per batch row.
    mask: optional `[B, H, Nq, Nk]` bool, False excludes a (query, key) pair.

  Returns:
    out `[B, Nq, H, D]` in q's dtype (0 for rows without a valid key) and lse `[B, H, Nq]` float32
    (-inf for such rows).
  """
  qf, kf, vf = (x.astype(jnp.float32) for x in (q, k, v))
  s = jnp.einsum("bqhd,bkhd->bhqk", qf, kf, precision=_HI) * jnp.float32(scale)  # [B, H, Nq, Nk]
  valid = jnp.arange(k.shape[1])[None, :] < kv_len[:, None]  # [B, Nk]
  valid = jnp.broadcast_to(valid[:, None, None, :], s.shape)
  if mask is not None:
    valid = valid & mask
  s = jnp.where(valid, s, -jnp.inf)
  lse = jax.nn.logsumexp(s, axis=-1)  # [B, H, Nq]
  has_keys = jnp.isfinite(lse)
  p = jnp.where(valid, jnp.exp(s - jnp.where(has_keys, lse, 0.0)[..., None]), 0.0)
  out = jnp.einsum("bhqk,bkhd->bqhd", p, vf, precision=_HI)  # [B, Nq, H, D]
  lse = jnp.where(has_keys, lse, -jnp.inf)
  return out.astype(q.dtype), lse


@functools.partial(jax.jit, static_argnames=("scale", "block_q", "block_kv"))
def block_sparse_reference(q: jax.Array, k: jax.Array, v: jax.Array, tile_indices: jax.Array,
                           tile_counts: jax.Array, *, scale: float, kv_len: jax.Array,
                           block_q: int, block_kv: int) -> tuple[jax.Array, jax.Array]:
  """`attention_reference` under the mask of a block-sparse layout (see `block_sparse_mask`)."""
  mask = block_sparse_mask(tile_indices, tile_counts, nq=q.shape[1], nk=k.shape[1],
                           block_q=block_q, block_kv=block_kv)
  return attention_reference(q, k, v, scale=scale, kv_len=kv_len, mask=mask)


def block_sparse_mask(tile_indices: jax.Array, tile_counts: jax.Array, *, nq: int, nk: int,
                      block_q: int, block_kv: int) -> jax.Array:
  """The `[B, H, Nq, Nk]` bool mask that a block-sparse tile layout describes.

  Query i may see key j when j's tile `j // block_kv` is among the first `tile_counts[b, h, i //
  block_q]` entries of `tile_indices[b, h, i // block_q]`.
  """
  t = tile_indices.shape[-1]
  listed = jnp.arange(t)[None, None, None, :] < tile_counts[..., None]  # [B, H, Tq, T]
  num_kv_tiles = -(-nk // block_kv)
  onehot = (tile_indices[..., None] == jnp.arange(num_kv_tiles)) & listed[..., None]
  tile_mask = onehot.any(axis=-2)  # [B, H, Tq, Tk]
  rows = jnp.arange(nq) // block_q
  cols = jnp.arange(nk) // block_kv
  return tile_mask[:, :, rows][:, :, :, cols]
