"""Selected-query flash attention with log-sum-exp for Hopper, in Pallas Mosaic GPU.

ASTRAEA (arXiv 2506.05096, Sec. 3) computes attention for the k selected tokens (queries) against
all N tokens (keys and values) in every block, and scores tokens at the next step by each query
row's LSE. This kernel is a FlashAttention-3-style forward pass (Shah et al., arXiv 2407.08608)
written for that shape: one thread block (CTA) per (head, tile of `block_q` queries, batch) with
three warpgroups:

- a memory warpgroup streams key/value tiles into a ring of `stages` shared-memory buffers with TMA,
  waiting on per-slot "free" barriers before it overwrites a slot;
- two compute warpgroups each own `block_q // 2` query rows and keep O in a wgmma accumulator. Step
  j issues `S = Q K_j^T` and `O += P_{j-1} V_{j-1}` together, waits for S alone, and runs the online
  softmax of S while `P V` is still on the tensor cores (FA3's intra-warpgroup overlap). An optional
  schedule barrier (`AttentionTuning.schedule_barrier`) also makes the two warpgroups take turns
  (FA3's ping-pong); with the overlap it measured slower, so it is off by default.

The softmax keeps its running maximum in the base-2 domain of the scaled scores, `m = max_j(s_j) *
scale * log2(e)`, and its running sum `l = sum_j 2^(s_j * scale * log2(e) - m)`, so the natural-log
LSE of the scaled scores is `m * ln(2) + ln(l)`.

q, k and v stay in the models' `[B, N, H, D]` layout: each TMA box is `[rows, D]` with a row stride
of `H * D` elements, so no transpose is needed. Ragged lengths: TMA fills rows read past the end of
q, k or v with zeros and drops rows written past the end of the output; keys at or past `kv_len` are
masked to -inf in a separate (at most one step long) loop, so full tiles pay nothing for it. Mosaic
GPU needs sequence lengths that are multiples of 8 (it tiles the global array for TMA): other
lengths, and head dims that are not a multiple of 64, are zero-padded here (a copy of the padded
operands).

The block-sparse variant takes, per (batch, head, query tile), a list of key/value tile indices and
a count; the memory warpgroup loads only those tiles and the compute warpgroups mask with the tile's
true key offset.

GPU interpret mode (CPU) runs the same kernel except for `P V`: the interpreter simulates wgmma only
with both operands in shared memory and without accumulator stores, so there P is staged in shared
memory and O kept there in float32. Everything else (TMA, barriers, masking, softmax) is shared.

References read while writing this: jax's `pallas/ops/gpu/attention_mgpu.py` (FlashAttention-3 in
Mosaic GPU) and the FlashAttention-3 paper.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.tuning import AttentionTuning

__all__ = ["check_mosaic_gpu_inputs", "mosaic_gpu_attention"]

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
# Finite start for the running maximum: a row that has seen only masked keys then gives
# alpha = 2^0 = 1 and p = 2^-inf = 0 instead of the NaN that -inf - (-inf) would give.
_M_INIT = -1e30
_MAX_HEAD_DIM = 256
_SMEM_BYTES = 232448  # Hopper's per-block limit
# Barriers, alignment and Mosaic GPU's own scratch: block_kv 192 with a separate 512-byte LSE buffer
# was 88-120 bytes over the limit on an H100, which puts it at about 2.7 KB.
_SMEM_OVERHEAD = 2816


def _padded_head_dim(head_dim: int) -> int:
  return -(-head_dim // 64) * 64


def _smem_bytes(head_dim: int, tuning: AttentionTuning, *, lse_in_smem: bool) -> int:
  d = _padded_head_dim(head_dim)
  tiles = 2 * (tuning.block_q * d + 2 * tuning.stages * tuning.block_kv * d)
  return tiles + (4 * tuning.block_q if lse_in_smem else 0) + _SMEM_OVERHEAD


def _lse_in_smem(head_dim: int, tuning: AttentionTuning) -> bool:
  """Stage the LSE in shared memory (one bulk copy per warpgroup) where it fits; the largest tiles
  (block_kv 192, or 3 stages of 128, at D = 128) leave no room for its 512 bytes, and there each
  thread stores its rows' LSE to global memory directly."""
  return _smem_bytes(head_dim, tuning, lse_in_smem=True) <= _SMEM_BYTES


def check_mosaic_gpu_inputs(dtype, head_dim: int, tuning: AttentionTuning) -> None:
  """Raises TypeError (dtype) or ValueError (head dim, shared memory) if the kernel cannot run."""
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    raise TypeError(f"the Mosaic GPU kernel takes bfloat16 or float16, got "
                    f"{jnp.dtype(dtype).name}; use implementation='chunked' for float32")
  d = _padded_head_dim(head_dim)
  if d > _MAX_HEAD_DIM:
    raise ValueError(f"the Mosaic GPU kernel takes head dims up to {_MAX_HEAD_DIM}, got {head_dim}")
  smem = _smem_bytes(head_dim, tuning, lse_in_smem=False)
  if smem > _SMEM_BYTES:
    raise ValueError(f"{tuning=} needs {smem} bytes of shared memory at head dim {d}, more than "
                     f"{_SMEM_BYTES}; lower block_kv or stages")


def _when(cond, fn) -> None:
  """`pl.when` that also takes a Python bool (static trip counts)."""
  if isinstance(cond, bool):
    if cond:
      fn()
  else:
    pl.when(cond)(fn)


def _maximum(a, b):
  return max(a, b) if isinstance(a, int) else jnp.maximum(a, b)


def _kernel_body(q_ref, k_ref, v_ref, kv_len_ref, tile_idx_ref, tile_count_ref, out_ref, lse_ref,
                 smem, ready, free, schedule, *, tuning: AttentionTuning,
                 scale: float, dtype, head_dim: int, static_kv_len: int | None, sparse: bool,
                 mask_sparse: bool):
  """One CTA: `block_q` queries of one (batch, head) against its key/value tiles."""
  bq = tuning.rows_per_warpgroup
  bkv = tuning.block_kv
  stages = tuning.stages
  b = lax.axis_index("b")
  h = lax.axis_index("h")
  q_tile = lax.axis_index("q")
  wg = lax.axis_index("wg")
  qo_smem, k_smem, v_smem, lse_smem, p_smem, o_smem = smem
  k_ready, v_ready, q_ready = ready
  k_free, v_free = free

  if sparse:
    num_steps = tile_count_ref[b, h, q_tile]

    def tile_of(step):
      return tile_idx_ref[b, h, q_tile, step]
  else:
    if static_kv_len is not None:
      # Static trip counts when kv_len is known at trace time.
      num_steps, num_full = -(-static_kv_len // bkv), static_kv_len // bkv
    else:
      kv_len = kv_len_ref[b]
      num_steps = lax.div(kv_len + (bkv - 1), jnp.int32(bkv))
      num_full = lax.div(kv_len, jnp.int32(bkv))
    # Tiles before `num_full` hold only valid keys; the rest (zero or one tile) needs the mask.

    def tile_of(step):
      return step

  def schedule_sync():
    if tuning.schedule_barrier:
      plgpu.barrier_arrive(schedule)
      plgpu.barrier_wait(schedule)

  c = scale * _LOG2E

  def softmax_step(s, m, l, step, masked: bool):
    """Online softmax of one score tile: new max, new sum, rescale factor, P in the input dtype."""
    if masked:
      kv_len = static_kv_len if static_kv_len is not None else kv_len_ref[b]
      limit = kv_len - tile_of(step) * bkv
      cols = plgpu.broadcasted_iota(jnp.int32, (bq, bkv), 1, layout=plgpu.Layout.WGMMA)
      s = jnp.where(cols < limit, s, -jnp.inf)
    m_new = jnp.maximum(m, s.max(axis=1) * c)
    alpha = jnp.exp2(m - m_new)
    # One FMA per score: s * c - m_new.
    p = jnp.exp2(s * c - lax.broadcast_in_dim(m_new, s.shape, [0]))
    l = l * alpha + p.sum(axis=1)
    return m_new, l, alpha, p.astype(dtype)

  def write_out(q_smem, row0, acc, m, l):
    # A row with no valid key (kv_len = 0, or an empty tile list) has l = 0: output 0, LSE -inf.
    has_keys = l > 0.0
    inv_l = jnp.where(has_keys, 1.0 / jnp.where(has_keys, l, 1.0), 0.0)
    lse = jnp.where(has_keys, m * _LN2 + jnp.log(jnp.where(has_keys, l, 1.0)), -jnp.inf)
    q_smem[...] = (acc * lax.broadcast_in_dim(inv_l, acc.shape, [0])).astype(dtype)
    if lse_smem is not None:
      lse_smem.at[wg][...] = lse
    plgpu.commit_smem()  # one fence for both tiles
    plgpu.copy_smem_to_gmem(q_smem, out_ref.at[b, pl.ds(row0, bq), h])
    if lse_smem is None:
      lse_ref.at[b, h, pl.ds(row0, bq)][...] = lse
    else:
      plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, h, pl.ds(row0, bq)])
    plgpu.wait_smem_to_gmem(0)

  def init_stats():
    m = plgpu.layout_cast(jnp.full((bq,), _M_INIT, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
    l = plgpu.layout_cast(jnp.zeros((bq,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
    return m, l

  @pl.when(wg < 2)
  def _compute():
    """FlashAttention-3's intra-warpgroup overlap: `P V` of step j-1 and `Q K^T` of step j are
    issued together, and the softmax of step j runs while `P V` is still on the tensor cores.

    O stays in a wgmma accumulator for the whole loop. Per step j >= 1:
      wait K_j, V_{j-1}; issue S = Q K_j^T, O += P_{j-1} V_{j-1}; wait for S only;
      softmax(S) -> P_j, alpha_j; wait for O; O *= alpha_j.
    """
    plgpu.set_max_registers(tuning.registers, action="increase")
    q_smem = qo_smem.at[wg]
    row0 = q_tile * tuning.block_q + wg * bq
    plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(row0, bq), h], q_smem, q_ready.at[wg])
    plgpu.barrier_wait(q_ready.at[wg])

    def stage(step):
      return lax.rem(step, jnp.int32(stages))

    def with_o(o_ref):
      if o_smem is None:
        def o_mma(p16, slot):
          plgpu.wgmma(o_ref, p16, v_smem.at[slot])

        def o_load():
          return plgpu.wgmma_accumulator_load(o_ref, wait_n=0)

        def o_store(x):
          o_ref[...] = x
      else:
        # Interpret mode simulates wgmma only with both operands in shared memory and has no
        # accumulator stores: P is staged in shared memory and O kept there in float32.
        def o_mma(p16, slot):
          p_smem.at[wg][...] = p16
          plgpu.commit_smem()

          def fresh(pv_ref):
            plgpu.wgmma(pv_ref, p_smem.at[wg], v_smem.at[slot])
            return pv_ref[...]

          o_smem.at[wg][...] = o_smem.at[wg][...] + pl.run_scoped(
              fresh, plgpu.ACC((bq, head_dim), jnp.float32))

        def o_load():
          return o_smem.at[wg][...]

        def o_store(x):
          o_smem.at[wg][...] = x

      def scores(step, p_prev):
        """Issue Q K_step^T (and P_prev V_{step-1}), then wait for the scores only."""
        slot = stage(step)

        def issue(s_ref):
          plgpu.wgmma(s_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
          if p_prev is not None:
            o_mma(p_prev, stage(step - 1))
          schedule_sync()
          return plgpu.wgmma_accumulator_load(s_ref, wait_n=0 if p_prev is None else 1)

        s = pl.run_scoped(issue, plgpu.ACC((bq, bkv), jnp.float32))  # [bq, bkv]
        plgpu.barrier_arrive(k_free.at[slot])
        return s

      def handoff(step):
        # Second schedule phase; meanwhile wait for the next step's tiles to have landed.
        if tuning.schedule_barrier:
          plgpu.barrier_arrive(schedule)
        nxt = step + 1

        @pl.when(nxt < num_steps)
        def _():
          plgpu.barrier_wait(k_ready.at[stage(nxt)])
        plgpu.barrier_wait(v_ready.at[stage(step)])
        if tuning.schedule_barrier:
          plgpu.barrier_wait(schedule)

      def step_fn(step, carry, *, masked: bool):
        m, l, p_prev = carry
        s = scores(step, p_prev)
        m, l, alpha, p16 = softmax_step(s, m, l, step, masked)
        o = o_load()
        plgpu.barrier_arrive(v_free.at[stage(step - 1)])
        o_store(o * lax.broadcast_in_dim(alpha, o.shape, [0]))
        handoff(step)
        return m, l, p16

      def run():
        plgpu.barrier_wait(k_ready.at[0])
        m, l = init_stats()
        first_masked = mask_sparse if sparse else (static_kv_len is None or num_full == 0)
        m, l, _, p16 = softmax_step(scores(jnp.int32(0), None), m, l, jnp.int32(0), first_masked)
        handoff(jnp.int32(0))
        carry = (m, l, p16)
        if sparse:
          carry = lax.fori_loop(1, num_steps, functools.partial(step_fn, masked=mask_sparse),
                                carry)
        else:
          carry = lax.fori_loop(1, num_full, functools.partial(step_fn, masked=False), carry)
          carry = lax.fori_loop(_maximum(num_full, 1), num_steps,
                                functools.partial(step_fn, masked=True), carry)
        m, l, p16 = carry
        last = num_steps - 1
        o_mma(p16, stage(last))
        schedule_sync()
        o = o_load()
        plgpu.barrier_arrive(v_free.at[stage(last)])
        write_out(q_smem, row0, o, m, l)

      def run_empty():
        m, l = init_stats()
        write_out(q_smem, row0, jnp.zeros((bq, head_dim), jnp.float32), m, l)

      pl.when(wg == 1)(schedule_sync)
      _when(num_steps > 0, run)
      _when(num_steps == 0, run_empty)
      pl.when(wg == 0)(schedule_sync)

    if o_smem is None:
      pl.run_scoped(with_o, plgpu.ACC((bq, head_dim), jnp.float32))
    else:
      o_smem.at[wg][...] = jnp.zeros((bq, head_dim), jnp.float32)
      with_o(None)

  @pl.when(wg == 2)
  def _memory():
    plgpu.set_max_registers(tuning.memory_registers, action="decrease")

    def load(step, slot):
      rows = (b, pl.ds(tile_of(step) * bkv, bkv), h)
      plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_ready.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_ready.at[slot])

    for i in range(stages):
      _when(i < num_steps, functools.partial(load, jnp.int32(i), i))

    @pl.loop(0, _maximum(num_steps - stages, 0))
    def _(i):
      step = i + stages
      slot = lax.rem(i, jnp.int32(stages))
      rows = (b, pl.ds(tile_of(step) * bkv, bkv), h)
      plgpu.barrier_wait(k_free.at[slot])
      plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_ready.at[slot])
      plgpu.barrier_wait(v_free.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_ready.at[slot])

    # Observe the releases of the last tiles too, so that every barrier phase is waited on once.
    @pl.loop(_maximum(num_steps - stages, 0), num_steps)
    def _(step):
      slot = lax.rem(step, jnp.int32(stages))
      plgpu.barrier_wait(k_free.at[slot])
      plgpu.barrier_wait(v_free.at[slot])


def mosaic_gpu_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float,
                         kv_len: jax.Array | None, tuning: AttentionTuning,
                         tile_indices: jax.Array | None = None,
                         tile_counts: jax.Array | None = None,
                         interpret: plgpu.InterpretGPUParams | None = None
                         ) -> tuple[jax.Array, jax.Array]:
  """The Mosaic GPU kernel on validated inputs; see `selected_query_attention` for the contract.

  Args:
    q: `[B, Nq, H, D]` bf16/fp16.
    k, v: `[B, Nk, H, D]`, q's dtype.
    scale: positive score scale.
    kv_len: `[B]` int32 valid keys per batch row, or None when all Nk keys are valid.
    tuning: tile sizes.
    tile_indices, tile_counts: block-sparse layout, `[B, H, Tq, T]` and `[B, H, Tq]` int32 with
      `Tq = cdiv(Nq, tuning.block_q)`; both None for dense attention.
    interpret: GPU interpret mode parameters to run on the CPU, or None to compile for the GPU.

  Returns:
    out `[B, Nq, H, D]` in q's dtype and lse `[B, H, Nq]` float32.
  """
  batch, nq, heads, head_dim = q.shape
  nk = k.shape[1]
  dtype = q.dtype
  sparse = tile_indices is not None
  d = _padded_head_dim(head_dim)
  if d != head_dim:
    # Zero columns add nothing to q.k and produce zero output columns, sliced off below.
    pad = ((0, 0), (0, 0), (0, 0), (0, d - head_dim))
    q, k, v = jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad)
  bkv = tuning.block_kv
  bq = tuning.rows_per_warpgroup
  # Mosaic GPU tiles the global array like the shared one, (8, 64), for TMA, so a sequence longer
  # than 8 rows must be a multiple of 8; and a TMA box may not exceed the array. Rows added here are
  # masked (keys) or sliced off (queries): no copy at the usual lengths (multiples of 8 rows).
  nk_k = max(-(-nk // 8) * 8, bkv)
  nq_k = max(-(-nq // 8) * 8, bq)
  if nk_k != nk:
    pad = ((0, 0), (0, nk_k - nk), (0, 0), (0, 0))
    k, v = jnp.pad(k, pad), jnp.pad(v, pad)
  if nq_k != nq:
    q = jnp.pad(q, ((0, 0), (0, nq_k - nq), (0, 0), (0, 0)))
  num_q_tiles = -(-nq_k // tuning.block_q)
  # With no per-batch lengths the trip counts are static, and only a ragged last tile is masked.
  static_kv_len = nk if kv_len is None else None
  if kv_len is None:
    kv_len = jnp.zeros((1,), jnp.int32)  # unused
  if sparse:
    assert tile_counts is not None
    mask_sparse = static_kv_len is None or static_kv_len % bkv != 0
  else:
    tile_indices = jnp.zeros((1, 1, 1, 1), jnp.int32)
    tile_counts = jnp.zeros((1, 1, 1), jnp.int32)
    mask_sparse = False

  # 128-byte swizzle: conflict-free wgmma operand reads; the (8, 64) tiling is what it implies for
  # 2-byte elements.
  transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
  smem = (
      plgpu.SMEM((2, bq, d), dtype, transforms=transforms),  # q, then the output
      plgpu.SMEM((tuning.stages, bkv, d), dtype, transforms=transforms),  # k ring
      plgpu.SMEM((tuning.stages, bkv, d), dtype, transforms=transforms),  # v ring
      plgpu.SMEM((2, bq), jnp.float32) if _lse_in_smem(d, tuning) else None,  # lse
      plgpu.SMEM((2, bq, bkv), dtype) if interpret is not None else None,  # P, interpreter only
      plgpu.SMEM((2, bq, d), jnp.float32) if interpret is not None else None,  # O, interpreter
  )
  ready = (plgpu.Barrier(num_barriers=tuning.stages), plgpu.Barrier(num_barriers=tuning.stages),
           plgpu.Barrier(num_barriers=2))
  free = (plgpu.Barrier(num_arrivals=2, num_barriers=tuning.stages),
          plgpu.Barrier(num_arrivals=2, num_barriers=tuning.stages))
  schedule = plgpu.Barrier(num_arrivals=2)

  body = functools.partial(
      _kernel_body, tuning=tuning, scale=float(scale), dtype=dtype,
      head_dim=d, static_kv_len=static_kv_len, sparse=sparse, mask_sparse=mask_sparse)
  out, lse = plgpu.kernel(
      body,
      out_type=(jax.ShapeDtypeStruct((batch, nq_k, heads, d), dtype),
                jax.ShapeDtypeStruct((batch, heads, num_q_tiles * tuning.block_q), jnp.float32)),
      scratch_types=(smem, ready, free, schedule),
      grid=(heads, num_q_tiles, batch),
      grid_names=("h", "q", "b"),
      num_threads=3,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=interpret,
  )(q, k, v, kv_len, tile_indices, tile_counts)
  return out[:, :nq, :, :head_dim], lse[:, :, :nq]
