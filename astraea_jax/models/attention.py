"""The one attention function every model in the package calls.

Routing all attention through `attention` (and `attention_with_lse`) lets the Pallas kernels, cuDNN and
the sparse variants replace each other without touching model code.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

# q [B, S, H, D], k and v [B, N, H, D] -> out [B, S, H, D]
AttentionFn = Callable[..., jax.Array]


def _xla(q, k, v, *, scale, key_mask=None, kv_len=None):
  # Scores and softmax in fp32 whatever the input dtype; explicit casts keep strict promotion happy.
  s = jnp.einsum("bshd,bnhd->bhsn", q, k, preferred_element_type=jnp.float32) * scale  # [B, H, S, N]
  if kv_len is not None:
    s = jnp.where(jnp.arange(k.shape[1])[None, None, None, :] < kv_len[:, None, None, None], s, -jnp.inf)
  if key_mask is not None:
    s = jnp.where(key_mask[:, None, None, :], s, -jnp.inf)
  p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
  return jnp.einsum("bhsn,bnhd->bshd", p, v, preferred_element_type=jnp.float32).astype(q.dtype)


def _cudnn(q, k, v, *, scale, key_mask=None, kv_len=None):
  mask = None
  if key_mask is not None:
    # cuDNN takes a mask only at full [B, 1, S, N]; fine for the short masked calls (text keys).
    mask = jnp.broadcast_to(key_mask[:, None, None, :], (q.shape[0], 1, q.shape[1], k.shape[1]))
  return jax.nn.dot_product_attention(q, k, v, scale=scale, mask=mask, key_value_seq_lengths=kv_len,
                                      implementation="cudnn")


def _pallas(q, k, v, *, scale, key_mask=None, kv_len=None):
  import pallas_kernels  # pylint: disable=import-outside-toplevel

  if key_mask is not None:  # the kernel takes key lengths, not a general mask
    return _cudnn(q, k, v, scale=scale, key_mask=key_mask, kv_len=kv_len)
  out, _ = pallas_kernels.selected_query_attention(q, k, v, scale=scale, kv_len=kv_len)
  return out


_IMPLEMENTATIONS: dict[str, AttentionFn] = {"xla": _xla, "cudnn": _cudnn, "pallas": _pallas}


def default_implementation(dtype) -> str:
  """The project's Pallas kernel for half precision on Hopper (faster than cuDNN at the Wan shapes:
  661 vs 580 TFLOP/s, benchmarks/NOTES-attention.md), cuDNN on other GPUs, XLA's einsum path on CPU."""
  import pallas_kernels  # pylint: disable=import-outside-toplevel

  if jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
    return "pallas" if pallas_kernels.default_implementation(dtype) == "mosaic_gpu" else "cudnn"
  return "xla"


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float | None = None,
              key_mask: jax.Array | None = None, kv_len: jax.Array | None = None,
              implementation: str | None = None) -> jax.Array:
  """Softmax attention, `softmax(q k^T * scale) v`, optionally masked over keys.

  Args:
    q: `[B, S, H, D]` queries.
    k, v: `[B, N, H, D]` keys and values (N may differ from S).
    scale: score scale; defaults to `D ** -0.5`.
    key_mask: optional `[B, N]` bool, True for keys every query may attend to (e.g. the valid text
      tokens of each sample). Every row must keep at least one key. Prefer `kv_len` where the mask
      is a prefix: every implementation runs it natively (the Pallas kernel defers to cuDNN for a mask).
    kv_len: optional `[B]` int, the number of valid keys of each sample: keys at index >= kv_len are
      masked (text padding at the end). At least 1.
    implementation: one of `"xla"`, `"cudnn"`, `"pallas"`; None picks `default_implementation`.

  Returns:
    `[B, S, H, D]` in q's dtype.
  """
  if scale is None:
    scale = q.shape[-1] ** -0.5
  name = implementation or default_implementation(q.dtype)
  try:
    fn = _IMPLEMENTATIONS[name]
  except KeyError:
    raise ValueError(f"unknown attention {implementation=}; choose from {sorted(_IMPLEMENTATIONS)}") from None
  if kv_len is not None:
    kv_len = jnp.asarray(kv_len, jnp.int32)
  return fn(q, k, v, scale=scale, key_mask=key_mask, kv_len=kv_len)


def attention_with_lse(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float | None = None,
                       implementation: str | None = None,
                       kv_len: int | jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Attention that also returns each query's log-sum-exp, `lse [B, H, S]` (fp32, natural log, scaled scores).

  The Astraea token scorer needs the LSE of every computed query; see `pallas_kernels.selected_query_attention`.
  `kv_len` (an int or `[B]` ints) ignores the keys at index >= kv_len: a key mask that is a prefix of each row.
  """
  import pallas_kernels  # pylint: disable=import-outside-toplevel

  if scale is None:
    scale = q.shape[-1] ** -0.5
  # Model-level names ("pallas", "cudnn", "xla") choose the LSE-free path; only the kernel registry's
  # own names ("mosaic_gpu", "chunked", "reference") pin the LSE kernel, else it picks for the platform.
  if implementation not in pallas_kernels.IMPLEMENTATIONS:
    implementation = None
  return pallas_kernels.selected_query_attention(q, k, v, scale=scale, kv_len=kv_len,
                                                 implementation=implementation)
