"""The per-block token cache of ASTRAEA (arXiv 2506.05096, Sec. 3.2), stacked over the blocks.

For every block l, batch row b and token i the cache holds what the token selection needs between
denoising steps:

- `out [L, B, N, C]` (activation dtype, bf16 on GPU): the block's output for the token from the last
  step that computed it. Skipped tokens read it back; it is also the next block's input for them.
- `in_ref`: what is kept of the block input the token had then, to measure its change (delta):
  `[L, B, N, P]` float32, a random sketch (`delta_mode="sketch"`, default), or
  `[L, B, N, C]` activation dtype, the input itself (`delta_mode="exact"`). The relative delta
  divides by its norm, so no separate norm is stored.
- `lse [L, B, N]` float32: its self-attention LSE then, reduced over heads.
- `skips [L, B, N]` int32: consecutive steps the block has skipped it.
- `proj [C, P]` (sketch mode only): the sketch matrix, fixed for the run.

A schedule's dense step that no partial step follows needs none of this but the last block's output,
which k = 0 steps read: `TokenCache.last_output` holds only that (`out [1, B, N, C]`, the other fields
None), so whole-step schedules run in about the dense model's memory.
The leading L axis matches the model's stacked block parameters, so one `lax.scan` walks both. The
cache is a pytree that the accelerated forward returns updated; nothing is mutated in place from
Python. Memory per token per block and batch row, sketch mode: `2 C` bytes (bf16 output) + `4 P`
(sketch) + 8 bytes of scalars; for Wan2.1-1.3B (C = 1536, P = 64) that is 3072 + 264 bytes, 1.09
hidden vectors. The exact mode costs `4 C + 8` bytes, two hidden vectors.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from astraea_jax.acceleration.config import AstraeaConfig

__all__ = ["TokenCache", "cache_bytes_per_token_per_block"]


@struct.dataclass
class TokenCache:
  """Per-block token state carried across denoising steps; see the module docstring."""

  out: jax.Array  # [L, B, N, C], or [1, B, N, C] for a last-output cache
  in_ref: jax.Array | None  # [L, B, N, P] f32 (sketch) or [L, B, N, C] (exact)
  lse: jax.Array | None  # [L, B, N] f32
  skips: jax.Array | None  # [L, B, N] int32
  proj: jax.Array | None = None  # [C, P], sketch mode only

  @classmethod
  def last_output(cls, x: jax.Array) -> TokenCache:
    """A cache of the last block's output `x [B, N, C]` only: enough for k = 0 steps and for a
    dense step (which refills a full cache), not for a partial step."""
    return cls(out=x[None], in_ref=None, lse=None, skips=None)

  @property
  def is_last_output(self) -> bool:
    return self.lse is None

  @property
  def num_layers(self) -> int:
    return self.out.shape[0]

  @property
  def batch_size(self) -> int:
    return self.out.shape[1]

  @property
  def num_tokens(self) -> int:
    return self.out.shape[2]

  @property
  def delta_mode(self) -> str:
    return "exact" if self.proj is None else "sketch"

  def check_serves(self, num_selected: int, num_dense: int) -> None:
    """ValueError if a last-output cache is asked for a partial step (0 < k < dense k)."""
    if self.is_last_output and 0 < num_selected < num_dense:
      raise ValueError(f"num_selected={num_selected} < {num_dense} needs the per-block cache of a "
                       "dense step run with refresh_cache=True; this one kept only the last "
                       "block's output")

  @property
  def nbytes(self) -> int:
    """Bytes held by the cache's arrays (the sketch matrix included)."""
    return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize
               for a in jax.tree.leaves(self))

  def check_compatible(self, num_layers: int, batch_size: int, num_tokens: int, dim: int,
                       config: AstraeaConfig) -> None:
    """Raises ValueError if this cache was not made for these shapes and this delta mode."""
    if self.is_last_output:
      if tuple(self.out.shape) != (1, batch_size, num_tokens, dim):
        raise ValueError(f"last-output cache {tuple(self.out.shape)} does not match [1, B, N, C]="
                         f"{(1, batch_size, num_tokens, dim)}")
      return
    want = (num_layers, batch_size, num_tokens, dim)
    if tuple(self.out.shape) != want:
      raise ValueError(f"token cache out {tuple(self.out.shape)} does not match "
                       f"[L, B, N, C]={want}: a cache belongs to one model, batch and video size")
    if self.delta_mode != config.delta_mode:
      raise ValueError(f"token cache was built with delta_mode={self.delta_mode!r}, "
                       f"config says {config.delta_mode!r}")
    ref_dim = config.sketch_dim if config.delta_mode == "sketch" else dim
    if self.in_ref.shape[-1] != ref_dim:
      raise ValueError(f"token cache in_ref has last dim {self.in_ref.shape[-1]}, config needs "
                       f"{ref_dim}")


def cache_bytes_per_token_per_block(dim: int, config: AstraeaConfig = AstraeaConfig(),
                                    dtype=jnp.bfloat16) -> int:
  """Cache bytes per token, block and batch row: output + input reference + LSE + skip count."""
  item = jnp.dtype(dtype).itemsize
  ref = 4 * config.sketch_dim if config.delta_mode == "sketch" else item * dim
  return item * dim + ref + 4 + 4
