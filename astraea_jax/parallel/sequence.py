"""Sequence-parallel self-attention for video tokens sharded along the mesh axis "seq".

Called inside `jax.shard_map` with q `[B, S/P, H, D]` (this device's queries: all of its N/P
tokens, or the S/P it selected) and k, v `[B, N/P, H, D]` (this device's keys and values), P = the
"seq" axis size. Every query must see the keys of all devices. Two strategies:

- "ulysses" (DeepSpeed-Ulysses, arXiv 2309.14509), when P divides H: an all-to-all turns token
  shards into head shards (`[B, N, H/P, D]`: all tokens, H/P heads), each device attends its heads
  over the whole sequence with the single-device kernel, and a second all-to-all turns the output
  (and the LSE) back into token shards. Per device and block it moves 4 activations of `N/P x C`
  values (q, k, v out, o back), independent of P.
- "gather_kv", the fallback when P does not divide H (Wan2.1-1.3B has 12 heads; 8 token shards):
  an all-gather of K and V along "seq", then local queries against all keys. No head padding and no
  ragged shapes, at the price of `2 (P - 1) / P x N x C` values received per device and block and
  a full copy of K/V per device. Ring attention would keep K/V memory at N/P but needs an online
  softmax across P steps; at these sequence lengths the gathered K/V fit easily, so the simpler
  gather is used.

ASTRAEA (arXiv 2506.05096) selects tokens per shard in the sequence-parallel forward
(`astraea_jax.parallel.sharded`), so S/P is the same on every device and neither strategy meets
ragged shapes.
"""

from __future__ import annotations

import jax

from astraea_jax.models import attention as attention_lib

STRATEGIES = ("ulysses", "gather_kv")


def choose_strategy(num_heads: int, seq_shards: int, strategy: str | None = None) -> str:
  """`strategy` checked, or the default: Ulysses when P divides H, else gather_kv."""
  if strategy is None:
    return "ulysses" if num_heads % seq_shards == 0 else "gather_kv"
  if strategy not in STRATEGIES:
    raise ValueError(f"unknown {strategy=}; choose from {STRATEGIES}")
  if strategy == "ulysses" and num_heads % seq_shards:
    raise ValueError(f"{num_heads=} must be divisible by the seq axis size {seq_shards=} for "
                     "Ulysses")
  return strategy


def _attend(q, k, v, *, return_lse, scale, implementation):
  # The same calls as the single-device block: the LSE variant picks its own kernel.
  if return_lse:
    return attention_lib.attention_with_lse(q, k, v, scale=scale, implementation=implementation)
  return attention_lib.attention(q, k, v, scale=scale, implementation=implementation)


def _ulysses(q, k, v, *, axis_name, return_lse, scale, implementation):
  # Heads scattered, tokens gathered: [B, N/P, H, D] -> [B, N, H/P, D], tokens in shard order,
  # which is the global order because shards are contiguous.
  def move(a, split, concat):
    return jax.lax.all_to_all(a, axis_name, split_axis=split, concat_axis=concat, tiled=True)

  res = _attend(move(q, 2, 1), move(k, 2, 1), move(v, 2, 1), return_lse=return_lse, scale=scale,
                implementation=implementation)  # [B, S, H/P, D] (and lse [B, H/P, S])
  out, lse = res if return_lse else (res, None)
  out = move(out, 1, 2)  # [B, S/P, H, D]
  return (out, move(lse, 2, 1)) if return_lse else out  # lse [B, H, S/P]


def _gather_kv(q, k, v, *, axis_name, return_lse, scale, implementation):
  k = jax.lax.all_gather(k, axis_name, axis=1, tiled=True)  # [B, N, H, D]
  v = jax.lax.all_gather(v, axis_name, axis=1, tiled=True)
  return _attend(q, k, v, return_lse=return_lse, scale=scale, implementation=implementation)


def sequence_parallel_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                                return_lse: bool = False, axis_name: str = "seq",
                                scale: float | None = None, implementation: str | None = None,
                                strategy: str | None = None
                                ) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Attention of local queries to the keys of every device on `axis_name`; inside `shard_map`.

  Args:
    q: `[B, S/P, H, D]` this device's queries (RoPE applied).
    k, v: `[B, N/P, H, D]` this device's keys and values.
    return_lse: also return each query's log-sum-exp (`attention_with_lse`).
    axis_name: the mesh axis the tokens are sharded along.
    scale, implementation: as for `astraea_jax.models.attention.attention`.
    strategy: "ulysses", "gather_kv", or None (Ulysses when P divides H, else gather_kv).

  Returns:
    `out [B, S/P, H, D]`, and with `return_lse` also `lse [B, H, S/P]` float32.
  """
  p = jax.lax.axis_size(axis_name)
  strategy = choose_strategy(q.shape[2], p, strategy)
  if p == 1:
    return _attend(q, k, v, return_lse=return_lse, scale=scale, implementation=implementation)
  fn = _ulysses if strategy == "ulysses" else _gather_kv
  return fn(q, k, v, axis_name=axis_name, return_lse=return_lse, scale=scale,
            implementation=implementation)
