"""Options of the Astraea token scorer and cache (ASTRAEA, arXiv 2506.05096, Sec. 3).

The paper scores token i of a block as

  S_i = w_a * LSE_prev_i * delta_i + w_b * exp(n_i)

and leaves several details open. This module names each choice and its default:

- `head_reduction`: LSE is per head (`[B, H, N]`); the score needs one number per token. "mean"
  (default) averages the natural-log LSE over heads, "max" takes the largest head.
- `delta_norm`: delta is the L2 norm, over the hidden dim, of the change of the token's block input
  since the step in which the block last computed it. "relative" (default) divides by the L2 norm of
  that cached input, `||x - x_c|| / ||x_c||`; "absolute" does not divide.
- `delta_mode`: how the cached input is kept. "exact" stores it (one more hidden vector per token
  per block, i.e. twice the cache). "sketch" (default) stores a fixed Gaussian random projection of
  it, `x_c P` with P `[C, sketch_dim]` (shared by all blocks and steps, seeded by `sketch_seed`):
  `||x P - x_c P||` and `||x_c P||` estimate `||x - x_c||` and `||x_c||` (Johnson-Lindenstrauss,
  relative error about `1 / sqrt(2 * sketch_dim)` each, ~9% at 64), enough to rank tokens (the tests
  check rank correlation > 0.98 with the exact delta), at `sketch_dim` float32 per token instead of
  C activations. The products run in the activation dtype with float32 accumulation.
- `eps`: guards the division by `||x_c||`.
- `inplace_input`: execution only (results are the same): whether block l reads its input in place
  from the cache's output of block l - 1 (default) or from a carried copy.
- `staleness_cap`: exp(n) is evaluated at `min(n, staleness_cap)` so that it stays finite in
  float32; with the default 80 any token skipped that long outranks every LSE * delta term anyway.

LSE is used with its sign as the formula states; with N keys it is at least `log N + mean score`,
positive in practice at video lengths.
"""

from __future__ import annotations

import dataclasses

__all__ = ["AstraeaConfig"]

_HEAD_REDUCTIONS = ("mean", "max")
_DELTA_NORMS = ("relative", "absolute")
_DELTA_MODES = ("sketch", "exact")


@dataclasses.dataclass(frozen=True)
class AstraeaConfig:
  """Token scoring and cache options; the defaults are the paper's weights and the sketch cache."""

  w_a: float = 1.0
  w_b: float = 0.5
  head_reduction: str = "mean"
  delta_norm: str = "relative"
  delta_mode: str = "sketch"
  sketch_dim: int = 64
  sketch_seed: int = 0
  staleness_cap: int = 80
  eps: float = 1e-6  # guards ||x_c|| in the relative delta
  # Execution only, no effect on results: each block reads its input in place from the cache
  # (True) or from a carried copy (False, one more activation read + write per block).
  inplace_input: bool = True
  # Execution only: how the top-k set is found, "sort" (`lax.top_k`) or "radix" (a radix select
  # without sorting); both give the same set (`token_selection.select_top_k`).
  selection: str = "sort"
  # Top-k independently within each of this many contiguous token chunks (k / chunks each; both N
  # and k must be multiples). The sequence-parallel forward selects per shard of N/P tokens
  # (`astraea_jax.parallel.sharded`); `selection_chunks=P` on one device selects the same sets.
  selection_chunks: int = 1

  def __post_init__(self):
    if self.head_reduction not in _HEAD_REDUCTIONS:
      raise ValueError(f"{self.head_reduction=} must be one of {_HEAD_REDUCTIONS}")
    if self.delta_norm not in _DELTA_NORMS:
      raise ValueError(f"{self.delta_norm=} must be one of {_DELTA_NORMS}")
    if self.delta_mode not in _DELTA_MODES:
      raise ValueError(f"{self.delta_mode=} must be one of {_DELTA_MODES}")
    if self.selection not in ("sort", "radix"):
      raise ValueError(f"{self.selection=} must be 'sort' or 'radix'")
    if self.selection_chunks < 1:
      raise ValueError(f"{self.selection_chunks=} must be positive")
    if self.sketch_dim < 1:
      raise ValueError(f"{self.sketch_dim=} must be positive")
    if not 0 <= self.staleness_cap <= 88:
      # exp(89) overflows float32.
      raise ValueError(f"{self.staleness_cap=} must lie in [0, 88]")
    if not self.eps > 0:
      raise ValueError(f"{self.eps=} must be positive")
    for name in ("w_a", "w_b"):
      value = getattr(self, name)
      if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name}={value} must be finite")
