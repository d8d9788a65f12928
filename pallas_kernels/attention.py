"""Selected-query attention with log-sum-exp, dense and block-sparse: the public entry points.

ASTRAEA (arXiv 2506.05096, Sec. 3) runs, in every transformer block, attention for the k selected
tokens as queries against all N tokens as keys and values, and ranks tokens at the next step by
each query's log-sum-exp. `selected_query_attention` returns both; `block_sparse_attention` is the
same computation restricted to listed key/value tiles (for sparse-attention baselines).

Each entry point validates its inputs and then calls one implementation from a registry:

- "mosaic_gpu": the Pallas Mosaic GPU kernel (Hopper: TMA, wgmma, warp specialization); bf16/fp16.
- "chunked": online softmax over key chunks in pure JAX; any backend, any float dtype.
- "reference": the whole score matrix in float32; tests and small shapes only.

The default is "mosaic_gpu" on a GPU of compute capability 9.x for bf16/fp16 inputs with at least
`SHORT_KEYS` keys, and "chunked" otherwise; `implementation=` overrides it and `interpret=True` runs
the Mosaic GPU kernel in GPU interpret mode on the CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.chunked import chunked_attention, chunked_block_sparse_attention
from pallas_kernels.mosaic_attention import check_mosaic_gpu_inputs, mosaic_gpu_attention
from pallas_kernels.reference import attention_reference, block_sparse_reference
from pallas_kernels.tuning import AttentionTuning, default_tuning

__all__ = [
    "BLOCK_SPARSE_IMPLEMENTATIONS",
    "IMPLEMENTATIONS",
    "SHORT_KEYS",
    "block_sparse_attention",
    "block_sparse_attention_reference",
    "default_implementation",
    "selected_query_attention",
    "selected_query_attention_reference",
]

_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))

# Below one 64-key tile the Mosaic GPU kernel's 128 x 128 tiles (head dims padded to 64 or 128)
# are mostly padding: OpenSora's temporal attention (30 keys, D = 72) did 3% useful work in them,
# and the pads cost more than the attention. One small score tile per query block in the "chunked"
# einsum path is faster there: 1.44 against 4.17 ms on an H200
# (benchmarks/NOTES-opensora-hunyuan.md).
SHORT_KEYS = 64
Interpret = bool | plgpu.InterpretGPUParams


# --------------------------------------------------------------------------------------------------
# Implementations. Each takes validated inputs: kv_len is a [B] int32 array, or None when all
# keys are valid.


def _interpret_params(interpret: Interpret) -> plgpu.InterpretGPUParams | None:
  if isinstance(interpret, plgpu.InterpretGPUParams):
    return interpret
  return plgpu.InterpretGPUParams() if interpret else None


@functools.partial(jax.jit, static_argnames=("scale", "tuning", "interpret"))
def _mosaic_dense(q, k, v, kv_len, *, scale, tuning, interpret):
  return mosaic_gpu_attention(q, k, v, scale=scale, kv_len=kv_len, tuning=tuning,
                              interpret=interpret)


def _mosaic_impl(q, k, v, *, scale, kv_len, tuning, interpret):
  check_mosaic_gpu_inputs(q.dtype, q.shape[-1], tuning)
  return _mosaic_dense(q, k, v, kv_len, scale=scale, tuning=tuning,
                       interpret=_interpret_params(interpret))


@functools.partial(jax.jit, static_argnames=("scale", "tuning"))
def _chunked_dense(q, k, v, kv_len, *, scale, tuning):
  return chunked_attention(q, k, v, scale=scale, kv_len=kv_len, tuning=tuning)


def _chunked_impl(q, k, v, *, scale, kv_len, tuning, interpret):
  del interpret
  return _chunked_dense(q, k, v, kv_len, scale=scale, tuning=tuning)


def _reference_impl(q, k, v, *, scale, kv_len, tuning, interpret):
  del tuning, interpret
  if kv_len is None:
    kv_len = jnp.full((q.shape[0],), k.shape[1], jnp.int32)
  return attention_reference(q, k, v, scale=scale, kv_len=kv_len)


@functools.partial(jax.jit, static_argnames=("scale", "tuning", "interpret"))
def _mosaic_sparse(q, k, v, kv_len, tile_indices, tile_counts, *, scale, tuning, interpret):
  return mosaic_gpu_attention(q, k, v, scale=scale, kv_len=kv_len, tuning=tuning,
                              tile_indices=tile_indices, tile_counts=tile_counts,
                              interpret=interpret)


def _mosaic_sparse_impl(q, k, v, tile_indices, tile_counts, *, scale, kv_len, block_q, block_kv,
                        tuning, interpret):
  # The kernel's query tile and key tile are the layout's tiles.
  tuning = dataclasses.replace(tuning, block_q=block_q, block_kv=block_kv)
  check_mosaic_gpu_inputs(q.dtype, q.shape[-1], tuning)
  return _mosaic_sparse(q, k, v, kv_len, tile_indices, tile_counts, scale=scale, tuning=tuning,
                        interpret=_interpret_params(interpret))


@functools.partial(jax.jit, static_argnames=("scale", "block_q", "block_kv"))
def _chunked_sparse(q, k, v, kv_len, tile_indices, tile_counts, *, scale, block_q, block_kv):
  return chunked_block_sparse_attention(q, k, v, scale=scale, kv_len=kv_len,
                                        tile_indices=tile_indices, tile_counts=tile_counts,
                                        block_q=block_q, block_kv=block_kv)


def _chunked_sparse_impl(q, k, v, tile_indices, tile_counts, *, scale, kv_len, block_q, block_kv,
                         tuning, interpret):
  del tuning, interpret
  return _chunked_sparse(q, k, v, kv_len, tile_indices, tile_counts, scale=scale,
                         block_q=block_q, block_kv=block_kv)


def _reference_sparse_impl(q, k, v, tile_indices, tile_counts, *, scale, kv_len, block_q,
                           block_kv, tuning, interpret):
  del tuning, interpret
  if kv_len is None:
    kv_len = jnp.full((q.shape[0],), k.shape[1], jnp.int32)
  return block_sparse_reference(q, k, v, tile_indices, tile_counts, scale=scale, kv_len=kv_len,
                                block_q=block_q, block_kv=block_kv)


IMPLEMENTATIONS: dict[str, Callable[..., tuple[jax.Array, jax.Array]]] = {
    "mosaic_gpu": _mosaic_impl,
    "chunked": _chunked_impl,
    "reference": _reference_impl,
}

BLOCK_SPARSE_IMPLEMENTATIONS: dict[str, Callable[..., tuple[jax.Array, jax.Array]]] = {
    "mosaic_gpu": _mosaic_sparse_impl,
    "chunked": _chunked_sparse_impl,
    "reference": _reference_sparse_impl,
}


@functools.cache
def _hopper_present() -> bool:
  try:
    device = jax.devices()[0]
  except RuntimeError:
    return False
  capability = getattr(device, "compute_capability", None)
  return device.platform == "gpu" and isinstance(capability, str) and capability.startswith("9.")


def default_implementation(dtype, *, interpret: Interpret = False,
                           num_keys: int | None = None) -> str:
  """"mosaic_gpu" for bf16/fp16 on a compute capability 9.x GPU (or when interpreting it), else
  "chunked"; also "chunked" on the GPU for fewer than `SHORT_KEYS` keys (`num_keys`, if given)."""
  if interpret:
    return "mosaic_gpu"
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  short = num_keys is not None and num_keys < SHORT_KEYS
  return "mosaic_gpu" if half and _hopper_present() and not short else "chunked"


# --------------------------------------------------------------------------------------------------
# Validation.


def _validate(q, k, v, scale, kv_len) -> tuple[float, jax.Array | None]:
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be [B, N, H, D]; got {q.shape=}, {k.shape=}, {v.shape=}")
  batch, nq, heads, dim = q.shape
  if k.shape != v.shape or k.shape[0] != batch or k.shape[2:] != (heads, dim):
    raise ValueError(f"k and v must be [B, Nk, H, D] matching q; got {q.shape=}, {k.shape=}, "
                     f"{v.shape=}")
  if not (q.dtype == k.dtype == v.dtype):
    raise TypeError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
  if jnp.dtype(q.dtype) not in _DTYPES:
    raise TypeError(f"dtype must be bfloat16, float16 or float32; got {q.dtype}")
  if nq < 1 or k.shape[1] < 1 or dim < 1 or heads < 1 or batch < 1:
    raise ValueError(f"every dimension must be at least 1; got {q.shape=}, {k.shape=}")
  if scale is None:
    scale = dim ** -0.5
  scale = float(scale)
  if not (math.isfinite(scale) and scale > 0):
    raise ValueError(f"{scale=} must be finite and positive")
  return scale, _kv_len_array(kv_len, batch, k.shape[1])


def _kv_len_array(kv_len, batch: int, nk: int) -> jax.Array | None:
  if kv_len is None:
    return None
  if isinstance(kv_len, int):
    if not 0 <= kv_len <= nk:
      raise ValueError(f"{kv_len=} must lie in [0, Nk={nk}]")
    return None if kv_len == nk else jnp.full((batch,), kv_len, jnp.int32)
  kv_len = jnp.asarray(kv_len)
  if kv_len.shape != (batch,) or not jnp.issubdtype(kv_len.dtype, jnp.integer):
    raise ValueError(f"kv_len must be an int or a [B]={batch} integer array; got "
                     f"{kv_len.shape} {kv_len.dtype}")
  return jnp.clip(kv_len.astype(jnp.int32), 0, nk)


def _lookup(registry, implementation, dtype, interpret, num_keys=None):
  name = implementation or default_implementation(dtype, interpret=interpret, num_keys=num_keys)
  try:
    return registry[name]
  except KeyError:
    raise ValueError(f"unknown {implementation=}; choose from {sorted(registry)}") from None


# --------------------------------------------------------------------------------------------------
# Public API.


def selected_query_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                             scale: float | None = None, kv_len: int | jax.Array | None = None,
                             implementation: str | None = None,
                             tuning: AttentionTuning | None = None,
                             interpret: Interpret = False) -> tuple[jax.Array, jax.Array]:
  """`softmax(q k^T * scale) v` for a subset of queries against all keys, with each query's LSE.

  Args:
    q: `[B, Nq, H, D]` queries (the selected tokens), bfloat16 (float16 and float32 accepted).
    k, v: `[B, Nk, H, D]` keys and values (all tokens), q's dtype. Nq and Nk are any lengths.
    scale: positive score scale, a Python number; defaults to `D ** -0.5`.
    kv_len: number of valid keys: an int, or a `[B]` integer array (one length per batch row,
      clipped into [0, Nk]). Keys at index >= kv_len are ignored. None means all Nk.
    implementation: a key of `IMPLEMENTATIONS`; None picks
      `default_implementation(q.dtype, num_keys=Nk)`.
    tuning: tile sizes; None picks `default_tuning(D, Nk)`.
    interpret: run the Mosaic GPU kernel in GPU interpret mode (True, or `InterpretGPUParams`).

  Returns:
    out: `[B, Nq, H, D]` in q's dtype, accumulated in float32.
    lse: `[B, H, Nq]` float32, the natural log of the softmax denominator of the scaled scores,
      `log(sum_j exp(scale * q.k_j))` over valid keys. A row with no valid key (kv_len = 0) gets
      lse = -inf and out = 0.

  Raises:
    ValueError: bad shapes, scale, kv_len or implementation name; TypeError: bad dtypes.
  """
  scale, kv_len = _validate(q, k, v, scale, kv_len)
  fn = _lookup(IMPLEMENTATIONS, implementation, q.dtype, interpret, num_keys=k.shape[1])
  tuning = tuning or default_tuning(q.shape[-1], k.shape[1])
  return fn(q, k, v, scale=scale, kv_len=kv_len, tuning=tuning, interpret=interpret)


def selected_query_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, *,
                                       scale: float | None = None,
                                       kv_len: int | jax.Array | None = None
                                       ) -> tuple[jax.Array, jax.Array]:
  """`selected_query_attention` with the whole score matrix in float32 (HIGHEST precision)."""
  scale, kv_len = _validate(q, k, v, scale, kv_len)
  if kv_len is None:
    kv_len = jnp.full((q.shape[0],), k.shape[1], jnp.int32)
  return attention_reference(q, k, v, scale=scale, kv_len=kv_len)


def _validate_layout(q, k, tile_indices, tile_counts, block_q, block_kv):
  batch, nq, heads, _ = q.shape
  if block_q < 1 or block_kv < 1:
    raise ValueError(f"{block_q=} and {block_kv=} must be positive")
  num_q_tiles = -(-nq // block_q)
  if tile_indices.ndim != 4 or tile_indices.shape[:3] != (batch, heads, num_q_tiles):
    raise ValueError(f"kv_tile_indices must be [B, H, cdiv(Nq, block_q), T] = "
                     f"[{batch}, {heads}, {num_q_tiles}, T]; got {tile_indices.shape}")
  if tile_counts.shape != (batch, heads, num_q_tiles):
    raise ValueError(f"kv_tile_counts must be [B, H, cdiv(Nq, block_q)] = "
                     f"[{batch}, {heads}, {num_q_tiles}]; got {tile_counts.shape}")
  for name, a in (("kv_tile_indices", tile_indices), ("kv_tile_counts", tile_counts)):
    if not jnp.issubdtype(a.dtype, jnp.integer):
      raise TypeError(f"{name} must be integer; got {a.dtype}")
  counts = jnp.clip(tile_counts.astype(jnp.int32), 0, tile_indices.shape[-1])
  return tile_indices.astype(jnp.int32), counts


def block_sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array, kv_tile_indices: jax.Array,
                           kv_tile_counts: jax.Array, *, scale: float | None = None,
                           block_q: int = 128, block_kv: int = 128,
                           kv_len: int | jax.Array | None = None,
                           implementation: str | None = None,
                           tuning: AttentionTuning | None = None,
                           interpret: Interpret = False) -> tuple[jax.Array, jax.Array]:
  """Attention in which each query tile sees only the key/value tiles listed for it, with LSE.

  Queries are cut into tiles of `block_q` rows and keys into tiles of `block_kv` (the last ones
  ragged). Query tile `t` of (batch b, head h) attends to the keys of the tiles
  `kv_tile_indices[b, h, t, :kv_tile_counts[b, h, t]]`, minus keys at index >= kv_len.

  Args:
    q: `[B, Nq, H, D]`; k, v: `[B, Nk, H, D]`; dtypes as in `selected_query_attention`.
    kv_tile_indices: `[B, H, cdiv(Nq, block_q), T]` integer key-tile indices; the first
      `kv_tile_counts` entries of each list must be distinct and in [0, cdiv(Nk, block_kv));
      the rest are ignored. Any order (the result is the same up to rounding).
    kv_tile_counts: `[B, H, cdiv(Nq, block_q)]` integer list lengths, clipped into [0, T].
    scale, kv_len, implementation, tuning, interpret: as in `selected_query_attention`, with
      `BLOCK_SPARSE_IMPLEMENTATIONS` as the registry. The Mosaic GPU kernel takes the layout's
      tiles as its own, so it needs block_q a multiple of 128 and block_kv a multiple of 64.
    block_q, block_kv: the tile sizes of the layout.

  Returns:
    out `[B, Nq, H, D]` in q's dtype and lse `[B, H, Nq]` float32; a query with no visible key
    gets out = 0 and lse = -inf.
  """
  scale, kv_len = _validate(q, k, v, scale, kv_len)
  tile_indices, tile_counts = _validate_layout(q, k, kv_tile_indices, kv_tile_counts, block_q,
                                               block_kv)
  fn = _lookup(BLOCK_SPARSE_IMPLEMENTATIONS, implementation, q.dtype, interpret)
  tuning = tuning or default_tuning(q.shape[-1], k.shape[1])
  return fn(q, k, v, tile_indices, tile_counts, scale=scale, kv_len=kv_len, block_q=block_q,
            block_kv=block_kv, tuning=tuning, interpret=interpret)


def block_sparse_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array,
                                     kv_tile_indices: jax.Array, kv_tile_counts: jax.Array, *,
                                     scale: float | None = None, block_q: int = 128,
                                     block_kv: int = 128, kv_len: int | jax.Array | None = None
                                     ) -> tuple[jax.Array, jax.Array]:
  """`block_sparse_attention` as a dense float32 attention under the mask the layout describes."""
  scale, kv_len = _validate(q, k, v, scale, kv_len)
  tile_indices, tile_counts = _validate_layout(q, k, kv_tile_indices, kv_tile_counts, block_q,
                                               block_kv)
  if kv_len is None:
    kv_len = jnp.full((q.shape[0],), k.shape[1], jnp.int32)
  return block_sparse_reference(q, k, v, tile_indices, tile_counts, scale=scale, kv_len=kv_len,
                                block_q=block_q, block_kv=block_kv)
