"""Block sizes of the attention kernels, apart from the kernels so that benchmarks can sweep them.

One dataclass serves both implementations: the Mosaic GPU kernel reads `block_q`, `block_kv`,
`stages` and `schedule_barrier`; the chunked pure-JAX path reads `q_chunk` and `kv_chunk`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

__all__ = ["AttentionTuning", "TUNING_PRESETS", "default_tuning", "preset_override"]


@dataclasses.dataclass(frozen=True)
class AttentionTuning:
  """Tile sizes for `selected_query_attention` and `block_sparse_attention`.

  Attributes:
    block_q: query rows per Mosaic GPU thread block (CTA). Two compute warpgroups split it, so each
      owns `block_q // 2` rows, which must be a multiple of 64 (the wgmma M tile).
    block_kv: keys per pipeline step of the Mosaic GPU kernel; a multiple of 64.
    stages: key/value tiles in flight in shared memory (TMA multi-buffering), at least 2.
    schedule_barrier: make the two compute warpgroups take turns on the tensor cores
      (FlashAttention-3 ping-pong scheduling). Off by default: on an H100 with the kernel's
      intra-warpgroup overlap it measured 3-4% slower at theta = 1 (benchmarks/NOTES-attention.md).
    compute_registers: registers per thread of the two compute warpgroups (`setmaxnreg`); the
      memory warpgroup gets what is left (`memory_registers`). The score tile
      `[block_q // 2, block_kv]` float32 alone takes `block_kv // 2` of them. None: 240 for
      block_kv >= 192, else 232 (`registers`).
    q_chunk, kv_chunk: query rows and keys per step of the chunked pure-JAX path; its largest
      temporary is `[B, H, q_chunk, kv_chunk]` float32.
  """

  block_q: int = 128
  block_kv: int = 192
  stages: int = 2
  schedule_barrier: bool = False
  compute_registers: int | None = None
  q_chunk: int = 1024
  kv_chunk: int = 1024

  def __post_init__(self):
    if self.block_q <= 0 or self.block_q % 128:
      raise ValueError(f"{self.block_q=} must be a positive multiple of 128 "
                       "(2 warpgroups x 64 rows)")
    if self.block_kv <= 0 or self.block_kv % 64:
      raise ValueError(f"{self.block_kv=} must be a positive multiple of 64")
    if self.stages < 2:
      raise ValueError(f"{self.stages=} must be at least 2")
    if self.compute_registers is not None and not (
        24 <= self.compute_registers <= 240 and self.compute_registers % 8 == 0):
      raise ValueError(f"{self.compute_registers=} must be a multiple of 8 in [24, 240]")
    if self.q_chunk < 1:
      raise ValueError(f"{self.q_chunk=} must be positive")
    if self.kv_chunk < 1:
      raise ValueError(f"{self.kv_chunk=} must be positive")

  @property
  def registers(self) -> int:
    """Registers per thread of each compute warpgroup (`compute_registers`, or its default)."""
    if self.compute_registers is not None:
      return self.compute_registers
    return 240 if self.block_kv >= 192 else 232

  @property
  def memory_registers(self) -> int:
    """Registers per thread of the memory warpgroup: at most 40, and the three warpgroups together
    at most 64,512 (as FlashAttention-3's 240 + 240 + 24). `setmaxnreg` waits until the registers
    it asks for are free, so asking for the whole 65,536-register file hangs the kernel on an H200."""
    return min(40, (64512 - 256 * self.registers) // 128 // 8 * 8)

  @property
  def rows_per_warpgroup(self) -> int:
    return self.block_q // 2


TUNING_PRESETS: dict[str, AttentionTuning] = {
    # Hopper, bf16, head dim <= 128: 64 rows per warpgroup and 192 keys per step (FlashAttention-3
    # takes 176 for non-causal D = 128; Mosaic GPU needs multiples of 64), with 240 registers per
    # compute thread, or the 96-register score tile spills. On an H200 at the Wan 1.3B shape: 10.28
    # ms against 10.41 ms for 128 keys at 232 registers, 11.41 ms for 192 keys at 232
    # (benchmarks/results/attention-tunings-nvidia-h200.json).
    "default": AttentionTuning(),
    # Short key sequences that 128-key tiles cover with less padding (`default_tuning`): at 512 text
    # keys (cross-attention, B1, Nq 32,760, H 12, D 128) 0.230 ms against 0.391 ms with 192-key
    # tiles, whose third step is two-thirds padding (H200; cuDNN: 0.225 ms).
    "short_keys": AttentionTuning(block_kv=128),
    # Head dim 256 leaves room for only 64-key tiles in shared memory.
    "wide_head": AttentionTuning(block_kv=64),
    # Tests: several key steps and several chunks at lengths of a few hundred; the schedule barrier
    # on, so that interpret mode checks its protocol too.
    "tiny": AttentionTuning(block_q=128, block_kv=64, stages=2, schedule_barrier=True, q_chunk=48,
                            kv_chunk=40),
}


def default_tuning(head_dim: int, num_keys: int) -> AttentionTuning:
  """The preset for a head dim and key count: "wide_head" above D = 128; "short_keys" where its
  tiles pad the keys by 2% less than the default's (192-key tiles are ~1.3% faster per key at long
  lengths, so they keep e.g. 32,760 keys: 32,832 padded against 32,768); else "default"."""
  if head_dim > 128:
    return TUNING_PRESETS["wide_head"]
  default, short = TUNING_PRESETS["default"], TUNING_PRESETS["short_keys"]

  def padded(tuning: AttentionTuning) -> int:
    return -(-num_keys // tuning.block_kv) * tuning.block_kv

  return short if padded(short) < 0.98 * padded(default) else default


@contextlib.contextmanager
def preset_override(name: str, tuning: AttentionTuning) -> Iterator[None]:
  """Within the block, `TUNING_PRESETS[name]` is `tuning` (restored on exit, also on error).

  For benchmarks that sweep a preset through code that calls the kernels without a `tuning`
  argument (a model's forward): the override must be active while that code is traced.
  """
  if name not in TUNING_PRESETS:
    raise KeyError(f"unknown tuning preset {name=}; choose from {sorted(TUNING_PRESETS)}")
  if not isinstance(tuning, AttentionTuning):
    raise TypeError(f"tuning must be an AttentionTuning; got {type(tuning).__name__}")
  saved = TUNING_PRESETS[name]
  TUNING_PRESETS[name] = tuning
  try:
    yield
  finally:
    TUNING_PRESETS[name] = saved
