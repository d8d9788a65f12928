"""The Wan2.1 text-to-video diffusion transformer in Flax NNX.

Ports diffusers' `WanTransformer3DModel` (diffusers/models/transformers/transformer_wan.py, 0.42)
and the original `WanModel` (Wan-Video/Wan2.1, wan/modules/model.py): Conv3d (1, 2, 2) patch
embedding, sinusoidal time embedding + MLP + 6-way modulation, text MLP (GELU tanh), self-attention
with RMSNorm across all heads on q and k and a 3D RoPE (head dim split t/y/x as D - 4(D//6),
2(D//6), 2(D//6), rotating interleaved pairs), cross-attention to the text tokens, a GELU-tanh FFN,
and an output head with its own 2-way modulation followed by unpatchify.

Attribute names mirror the diffusers checkpoint (`condition_embedder.time_embedder.linear_1`,
`blocks.attn1.to_q`, `blocks.scale_shift_table`, `proj_out`, ...), so conversion is a rename table
plus layout rules; the exceptions are `to_out.0 -> to_out`, `ffn.net.0.proj -> ffn.proj_in` and
`ffn.net.2 -> ffn.proj_out`, and `weight -> kernel | scale`.

The transformer blocks are ONE `WanTransformerBlock` whose parameters carry a leading layer axis L
and are run with `nnx.scan`. The block also evaluates a subset of rows (`select=`), the operation
the ASTRAEA token-wise acceleration (arXiv 2506.05096) is built on: queries, cross-attention and FFN
for the S selected tokens only, keys and values for all N.

Precision follows the references: the time embedding, the modulation tables and their arithmetic,
the layer/RMS norms and RoPE run in fp32; the projections, attention and FFN in `config.dtype`. Two
departures in rounding only, for speed (equal in fp32): q and k are rotated without rounding the
norm's output first (`RMSNorm.with_rope`), and the residual gates are folded into a `config.dtype`
copy of the out-projection and FFN-down weights (`gated_residual`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from astraea_jax.models import attention as attention_lib
from astraea_jax.models.config_io import PresetConfig

F32 = jnp.float32
Rope = tuple[jax.Array, jax.Array]  # cos, sin tables: [S, D/2] or [B, S, D/2] fp32


@dataclasses.dataclass(frozen=True)
class WanConfig(PresetConfig):
  """Wan2.1 transformer hyper-parameters, named as diffusers' `WanTransformer3DModel` config.

  `param_dtype` is the storage dtype of the large weights (fp32 is kept for the time embedding, the
  modulation tables and the norm scales); `dtype` is the compute dtype; `attention_impl` is passed
  to `astraea_jax.models.attention.attention` (None: its default for the platform);
  `fuse_projections` runs self-attention's q and k projections as one matmul on the
  concatenated weights (the parameters stay separate, as in the checkpoints).
  `num_frame_embeddings` > 0 adds a learned embedding of each token frame's absolute index (up to
  that many frames) to the patch embeddings. No Wan2.1 release has one (0). The project's
  pixel-space model does: RoPE encodes only offsets between frames, and it has no causal VAE whose
  distinct first latent frame would mark where a clip starts.
  """
  patch_size: tuple[int, int, int] = (1, 2, 2)
  num_attention_heads: int = 12
  attention_head_dim: int = 128
  in_channels: int = 16
  out_channels: int = 16
  text_dim: int = 4096
  freq_dim: int = 256
  ffn_dim: int = 8960
  num_layers: int = 30
  cross_attn_norm: bool = True
  qk_norm: str | None = "rms_norm_across_heads"
  eps: float = 1e-6
  rope_max_seq_len: int = 1024
  param_dtype: str = "bfloat16"
  dtype: str = "bfloat16"
  attention_impl: str | None = None
  fuse_projections: bool = True
  num_frame_embeddings: int = 0

  def __post_init__(self):
    set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen dataclass)
    set_("patch_size", tuple(int(p) for p in self.patch_size))
    set_("param_dtype", jnp.dtype(self.param_dtype).name)
    set_("dtype", jnp.dtype(self.dtype).name)
    if len(self.patch_size) != 3 or min(self.patch_size) < 1:
      raise ValueError(f"patch_size={self.patch_size} must be three positive ints (t, y, x)")
    for name in ("num_attention_heads", "attention_head_dim", "in_channels", "out_channels",
                 "text_dim", "freq_dim", "ffn_dim", "num_layers", "rope_max_seq_len"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"{name}={getattr(self, name)} must be positive")
    d = self.attention_head_dim
    if d % 2 or d < 6:
      raise ValueError(f"attention_head_dim={d} must be even and >= 6 (3D RoPE splits it in three)")
    if self.freq_dim % 2:
      raise ValueError(f"freq_dim={self.freq_dim} must be even")
    if self.qk_norm not in (None, "rms_norm_across_heads"):
      raise ValueError(f"qk_norm={self.qk_norm!r} must be 'rms_norm_across_heads' or None")
    if self.num_frame_embeddings < 0:
      raise ValueError(f"{self.num_frame_embeddings=} must be >= 0")

  @property
  def hidden_size(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  @property
  def rope_split(self) -> tuple[int, int, int]:
    """Head-dim channels rotated by the t, y, x positions (44/42/42 at D = 128)."""
    yx = 2 * (self.attention_head_dim // 6)
    return self.attention_head_dim - 2 * yx, yx, yx

  family = "Wan"

  @classmethod
  def presets(cls) -> dict[str, WanConfig]:
    return WAN_PRESETS


WAN_PRESETS: dict[str, WanConfig] = {
    # Tests: every feature at toy size, fp32 throughout.
    "tiny": WanConfig(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                      in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32,
                      num_layers=2, param_dtype="float32", dtype="float32"),
    # Wan-AI/Wan2.1-T2V-1.3B(-Diffusers): dim 1536, 30 layers.
    "wan2.1-t2v-1.3b": WanConfig(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960,
                                 num_layers=30),
    # Wan-AI/Wan2.1-T2V-14B(-Diffusers): dim 5120, 40 layers.
    "wan2.1-t2v-14b": WanConfig(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824,
                                num_layers=40),
}


@flax.struct.dataclass
class WanConditioning:
  """Per-step conditioning shared by every block (output of `WanTransformer3DModel.embed`).

  Attributes:
    timestep_proj: `[B, 6, C]` fp32, the 6-way modulation before each block's own table.
    temb: `[B, C]` fp32, the timestep embedding (the head's modulation input).
    context: `[B, M, C]` projected text tokens in the compute dtype.
    rope_cos, rope_sin: `[N, D/2]` fp32, one angle per rotated channel pair of every video token.
    grid: `(t, y, x)` token grid after patchifying (static).
  """
  timestep_proj: jax.Array
  temb: jax.Array
  context: jax.Array
  rope_cos: jax.Array
  rope_sin: jax.Array
  grid: tuple[int, int, int] = flax.struct.field(pytree_node=False)


# ----------------------------------------------------------------------------------------------
# Layers


def layer_norm(x: jax.Array, eps: float) -> jax.Array:
  """LayerNorm without affine parameters, computed in fp32 (diffusers' FP32LayerNorm)."""
  x = x.astype(F32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)


class LayerNorm(nnx.Module):
  """Affine LayerNorm in fp32 with fp32 `scale` / `bias`; returns the input dtype."""

  def __init__(self, dim: int, *, eps: float):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), F32))
    self.bias = nnx.Param(jnp.zeros((dim,), F32))

  def __call__(self, x: jax.Array) -> jax.Array:
    return (layer_norm(x, self.eps) * self.scale[...] + self.bias[...]).astype(x.dtype)


class RMSNorm(nnx.Module):
  """RMSNorm over the last axis (all heads together) in fp32; returns the input dtype."""

  def __init__(self, dim: int, *, eps: float):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), F32))

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(F32)
    y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...]).astype(x.dtype)

  def with_rope(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """`apply_rope(self(x), cos, sin)` in one pass after the row statistic.

    x: `[B, S, H, D]`, normalised over the axes the scale covers: all heads together (scale
    `[H * D]`, Wan) or each head (scale `[D]`, HunyuanVideo); cos, sin: `[S, D/2]` or
    `[B, S, D/2]` fp32 -> `[B, S, H, D]` in x's dtype.

    The rotation's partner channels are read from x itself (`swap(x) * r * swap(scale)`, with the
    row factor r shared by a pair), so the normalised q or k is never written out: XLA otherwise
    stores it in fp32 between a normalisation kernel and a RoPE kernel (three passes over q and
    three over k per block, ~10 ms of the Wan 1.3B forward on an H200). The norm's output is not
    rounded to x's dtype before the rotation, as XLA on the GPU already computed it (excess
    precision); in fp32 the result equals the unfused one.
    """
    d = x.shape[-1]
    w = self.scale[...]
    per_head = w.shape[0] == d
    w = w if per_head else w.reshape(-1, d)  # [D] or [H, D]
    xf = x.astype(F32)
    rows = xf if per_head else xf.reshape(*x.shape[:-2], -1)  # [B, S, H, D] or [B, S, H * D]
    r = jax.lax.rsqrt(jnp.mean(jnp.square(rows), axis=-1, keepdims=True) + self.eps)
    r = r if per_head else r[..., None]  # [B, S, H or 1, 1]
    cos2, sin2 = _rope_factors(cos, sin, d)
    out = xf * r * w * cos2 + _swap_pairs(xf) * r * _swap_pairs(w) * sin2
    return out.astype(x.dtype)


def _linear(din: int, dout: int, *, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(din, dout, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def _fused_linear(x: jax.Array, layers: tuple[nnx.Linear, ...]) -> tuple[jax.Array, ...]:
  """`tuple(layer(x) for layer in layers)` as one matmul on the concatenated weights.

  One `[S, C] x [C, 2C]` product reads x once; concatenating the weights costs a few microseconds
  per block. Only for outputs that their consumers read in place (q and k go to their norms): a
  slice handed to a custom call (the attention kernel) is copied.
  """
  dt = layers[0].dtype
  w = jnp.concatenate([layer.kernel[...].astype(dt) for layer in layers], axis=1)  # [C, sum(out)]
  b = jnp.concatenate([layer.bias[...].astype(dt) for layer in layers])
  y = jnp.dot(x.astype(dt), w) + b
  splits = np.cumsum([layer.out_features for layer in layers])[:-1]
  return tuple(jnp.split(y, splits, axis=-1))


class TimestepEmbedding(nnx.Module):
  """linear_1 -> act -> linear_2 (diffusers' TimestepEmbedding; the text projection's shape too)."""

  def __init__(self, din: int, dout: int, *, dtype, param_dtype, act, rngs: nnx.Rngs):
    self.linear_1 = _linear(din, dout, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.linear_2 = _linear(dout, dout, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.act = act

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.linear_2(self.act(self.linear_1(x)))


def _gelu_tanh(x: jax.Array) -> jax.Array:
  return jax.nn.gelu(x, approximate=True)


class ConditionEmbedder(nnx.Module):
  """Timestep -> (temb [B, C], timestep_proj [B, 6C]) fp32; text [B, M, text_dim] -> [B, M, C]."""

  def __init__(self, config: WanConfig, *, rngs: nnx.Rngs):
    c, cd, pd = config.hidden_size, config.dtype, config.param_dtype
    self.freq_dim = config.freq_dim
    # The original WanModel runs the time MLP and projection under fp32 autocast.
    self.time_embedder = TimestepEmbedding(config.freq_dim, c, dtype=F32, param_dtype=F32,
                                           act=jax.nn.silu, rngs=rngs)
    self.time_proj = _linear(c, 6 * c, dtype=F32, param_dtype=F32, rngs=rngs)
    self.text_embedder = TimestepEmbedding(config.text_dim, c, dtype=cd, param_dtype=pd,
                                           act=_gelu_tanh, rngs=rngs)

  def __call__(self, timestep: jax.Array, context: jax.Array) -> tuple[jax.Array, ...]:
    temb = self.time_embedder(sinusoidal_embedding(timestep, self.freq_dim))  # [B, C]
    timestep_proj = self.time_proj(jax.nn.silu(temb))  # [B, 6C]
    return temb, timestep_proj, self.text_embedder(context)


def sinusoidal_embedding(timestep: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """`[B]` -> `[B, dim]` fp32 as `cat(cos(t w), sin(t w))`, `w_i = max_period^(-i / (dim/2))`."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=F32) / half)  # [dim/2]
  args = timestep.astype(F32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def rope_tables(config: WanConfig, grid: tuple[int, int, int]) -> tuple[jax.Array, jax.Array]:
  """cos / sin of the 3D RoPE angles, `[N, D/2]` fp32, tokens frame-major (t, y, x).

  Pair i of the t part rotates by `pos_t * theta^(-2i / d_t)`; the y and x parts likewise with their
  own widths. Angles are computed in float64 on the host, as the references do, then rounded.
  """
  t, y, x = grid
  if max(grid) > config.rope_max_seq_len:
    raise ValueError(f"token grid {grid} exceeds rope_max_seq_len={config.rope_max_seq_len}")
  parts = []
  for dim, n in zip(config.rope_split, grid):
    inv = 1.0 / (10000.0 ** (np.arange(0, dim, 2, dtype=np.float64) / dim))  # [dim/2]
    parts.append(np.outer(np.arange(n, dtype=np.float64), inv))  # [n, dim/2]
  cos = [jnp.asarray(np.cos(a), F32) for a in parts]
  sin = [jnp.asarray(np.sin(a), F32) for a in parts]

  def expand(tabs):  # per-axis [n, d/2] tables -> [t*y*x, D/2], built on device
    a, b, c = tabs
    full = jnp.concatenate([
        jnp.broadcast_to(a[:, None, None, :], (t, y, x, a.shape[-1])),
        jnp.broadcast_to(b[None, :, None, :], (t, y, x, b.shape[-1])),
        jnp.broadcast_to(c[None, None, :, :], (t, y, x, c.shape[-1])),
    ], axis=-1)
    return full.reshape(t * y * x, -1)

  return expand(cos), expand(sin)


def _swap_pairs(x: jax.Array) -> jax.Array:
  """`(x[2i+1], x[2i])` for each channel pair of the last axis."""
  return x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)[..., ::-1].reshape(x.shape)


def _rope_factors(cos: jax.Array, sin: jax.Array, d: int) -> tuple[jax.Array, jax.Array]:
  """`[S, D/2]` or `[B, S, D/2]` tables -> `[B or 1, S, 1, D]` factors `cos'`, `sin'` with
  `rope(x) = x * cos' + swap_pairs(x) * sin'`."""
  if cos.ndim == 2:
    cos, sin = cos[None], sin[None]
  cos2 = jnp.repeat(cos, 2, axis=-1)[:, :, None, :]  # [B, S, 1, D]
  sin2 = jnp.stack([-sin, sin], axis=-1).reshape(*sin.shape[:-1], d)[:, :, None, :]
  return cos2, sin2


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates interleaved channel pairs `(x[2i], x[2i+1])` by the angle whose cos/sin are given.

  x: `[B, S, H, D]`; cos, sin: `[S, D/2]` or `[B, S, D/2]` fp32. Computed in fp32, returned in x's
  dtype.

  Written as `x * cos' + swap(x) * sin'` (cos repeated per pair, sin signed `(-sin, sin)`, `swap`
  exchanging the two channels of each pair) rather than by stacking the two rotated halves: every
  output element is then an elementwise function of a fixed pair of inputs, so XLA need not build the
  output by concatenation (a separate pass over q and k, 7.3 ms per 1.3B forward on an H200). The
  same products and sums are computed, so the result is unchanged.
  """
  xf = x.astype(F32)
  cos2, sin2 = _rope_factors(cos, sin, x.shape[-1])
  return (xf * cos2 + _swap_pairs(xf) * sin2).astype(x.dtype)


class WanAttention(nnx.Module):
  """Multi-head attention with RMSNorm across heads on q and k (diffusers' WanAttention, T2V)."""

  def __init__(self, config: WanConfig, *, rngs: nnx.Rngs):
    c, cd, pd = config.hidden_size, config.dtype, config.param_dtype
    self.heads = config.num_attention_heads
    self.impl = config.attention_impl
    self.fuse = config.fuse_projections
    self.to_q = _linear(c, c, dtype=cd, param_dtype=pd, rngs=rngs)
    self.to_k = _linear(c, c, dtype=cd, param_dtype=pd, rngs=rngs)
    self.to_v = _linear(c, c, dtype=cd, param_dtype=pd, rngs=rngs)
    self.to_out = _linear(c, c, dtype=cd, param_dtype=pd, rngs=rngs)
    if config.qk_norm:
      self.norm_q = RMSNorm(c, eps=config.eps)
      self.norm_k = RMSNorm(c, eps=config.eps)
    else:
      self.norm_q = self.norm_k = None

  def _heads(self, x: jax.Array) -> jax.Array:
    return x.reshape(*x.shape[:2], self.heads, -1)  # [B, S, C] -> [B, S, H, D]

  def _norm(self, norm: RMSNorm | None, x: jax.Array, rope: Rope | None) -> jax.Array:
    """Optional RMSNorm, split into heads, optional RoPE: `[B, S, C] -> [B, S, H, D]`."""
    if norm is not None and rope is not None:
      return norm.with_rope(self._heads(x), *rope)
    x = self._heads(norm(x) if norm is not None else x)
    return apply_rope(x, *rope) if rope is not None else x

  def project_q(self, x: jax.Array, rope: Rope | None = None) -> jax.Array:
    """q `[B, S, H, D]`, normalised and, given `rope = (cos, sin)` tables, rotated."""
    return self._norm(self.norm_q, self.to_q(x), rope)

  def project_kv(self, x: jax.Array, rope: Rope | None = None) -> tuple[jax.Array, jax.Array]:
    """k (normalised, rotated by `rope` if given) and v, `[B, N, H, D]` each.

    Two matmuls rather than one on the concatenated weights: v as a slice of a fused product
    would be copied out for the attention kernel (a pass over v per block), while k's slice is
    read by its normalisation directly.
    """
    return self._norm(self.norm_k, self.to_k(x), rope), self._heads(self.to_v(x))

  def project_qkv(self, x: jax.Array, rope: Rope | None = None
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`(project_q(x, rope), *project_kv(x, rope))`, q and k as one matmul when fused."""
    if not self.fuse:
      return (self.project_q(x, rope), *self.project_kv(x, rope))
    q, k = _fused_linear(x, (self.to_q, self.to_k))
    v = self.to_v(x)
    return self._norm(self.norm_q, q, rope), self._norm(self.norm_k, k, rope), self._heads(v)

  def output(self, o: jax.Array) -> jax.Array:
    return self.to_out(o.reshape(*o.shape[:2], -1))  # [B, S, H, D] -> [B, S, C]

  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    """Cross-attention (no RoPE): x `[B, S, C]` attends to context `[B, M, C]`."""
    k, v = self.project_kv(context)
    return self.output(attention_lib.attention(self.project_q(x), k, v, implementation=self.impl))


class FeedForward(nnx.Module):
  """proj_in -> GELU (tanh) -> proj_out (diffusers' `ffn.net.0.proj` / `ffn.net.2`)."""

  def __init__(self, config: WanConfig, *, rngs: nnx.Rngs):
    c, f, cd, pd = config.hidden_size, config.ffn_dim, config.dtype, config.param_dtype
    self.proj_in = _linear(c, f, dtype=cd, param_dtype=pd, rngs=rngs)
    self.proj_out = _linear(f, c, dtype=cd, param_dtype=pd, rngs=rngs)

  def hidden(self, x: jax.Array) -> jax.Array:
    """GELU(proj_in(x)), `[B, S, C] -> [B, S, F]`."""
    return _gelu_tanh(self.proj_in(x))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.proj_out(self.hidden(x))


def gated_residual(x: jax.Array, inp: jax.Array, linear: nnx.Linear, gate: jax.Array) -> jax.Array:
  """`x + linear(inp) * gate`, the gated residual of a Wan block, as `x + inp @ (W * gate) + b * gate`.

  x `[B, S, C]` (compute dtype), inp `[B, S, K]`, gate `[B, 1, C]` fp32 -> `[B, S, C]` in x's dtype.

  The gate is folded into a per-row copy of the weights (`[B, K, C]`, a few MB), so that the
  residual add goes into the matmul's epilogue instead of a separate pass over `[B, S, C]`: 4.5 ms of
  the 1.3B forward at batch 1 on an H200 (two passes per block; at batch 2 the batched product
  measured the same as before). In fp32 it equals the unfused form up to rounding; in bf16 the result
  is rounded once instead of twice, and the folded weights once more.
  """
  dt = x.dtype
  w = (linear.kernel[...].astype(F32)[None] * gate).astype(dt)  # [B, K, C]
  b = (linear.bias[...].astype(F32) * gate).astype(dt)  # [B, 1, C]
  return x + (jnp.einsum("bsk,bkc->bsc", inp.astype(dt), w) + b)


def _take_rows(x: jax.Array, select: jax.Array) -> jax.Array:
  """x `[B, N, ...]`, select `[B, S]` -> `[B, S, ...]`."""
  idx = select.reshape(*select.shape, *([1] * (x.ndim - 2)))
  return jnp.take_along_axis(x, idx, axis=1, mode="clip")


class WanTransformerBlock(nnx.Module):
  """One Wan2.1 block: modulated self-attention with RoPE, cross-attention, modulated FFN."""

  def __init__(self, config: WanConfig, *, rngs: nnx.Rngs):
    c = config.hidden_size
    self.eps = config.eps
    self.attn_impl = config.attention_impl
    self.attn1 = WanAttention(config, rngs=rngs)
    self.attn2 = WanAttention(config, rngs=rngs)
    self.norm2 = LayerNorm(c, eps=config.eps) if config.cross_attn_norm else None
    self.ffn = FeedForward(config, rngs=rngs)
    self.scale_shift_table = nnx.Param(
        jax.random.normal(rngs.params(), (1, 6, c), F32) / math.sqrt(c))

  def __call__(self, x: jax.Array, cond: WanConditioning, *, select: jax.Array | None = None,
               return_lse: bool = False, attention_fn: Any = None
               ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Runs the block on all N rows, or on the S rows named by `select`.

    Args:
      x: `[B, N, C]` full-length block input (compute dtype).
      cond: the step's `WanConditioning`.
      select: None (dense), or `[B, S]` int32 token indices: only those rows are computed; their
        queries attend to keys/values of all N rows, so the result equals the dense block's rows.
      return_lse: also return the self-attention log-sum-exp of the computed rows.
      attention_fn: replaces the self-attention call, `attention_fn(q, k, v, return_lse=...)` ->
        `out` or `(out, lse)`; the sequence-parallel forward (`astraea_jax.parallel`) passes one
        that attends to the keys of every device. None: `astraea_jax.models.attention`.

    Returns:
      `out [B, N or S, C]` in x's dtype, and with `return_lse` also `lse [B, H, N or S]` fp32.
    """
    dt = x.dtype
    mod = self.scale_shift_table[...] + cond.timestep_proj  # [B, 6, C] fp32
    shift, scale, gate, c_shift, c_scale, c_gate = (mod[:, i:i + 1] for i in range(6))

    # Keys and values come from every row; queries and everything after only from the selected ones.
    h = (layer_norm(x, self.eps) * (1 + scale) + shift).astype(dt)  # [B, N, C]
    rope = (cond.rope_cos, cond.rope_sin)
    if select is None:
      x_s = x
      q, k, v = self.attn1.project_qkv(h, rope)  # [B, N, H, D], q and k rotated
    else:
      select = select.astype(jnp.int32)
      x_s, h_s = _take_rows(x, select), _take_rows(h, select)  # [B, S, C]
      k, v = self.attn1.project_kv(h, rope)  # [B, N, H, D]
      q = self.attn1.project_q(h_s, (cond.rope_cos[select], cond.rope_sin[select]))  # [B, S, H, D]
    if attention_fn is not None:
      res = attention_fn(q, k, v, return_lse=return_lse)
      o, lse = res if return_lse else (res, None)
    elif return_lse:
      # `attention_impl` names an `attention` backend; the LSE variant picks its own kernel.
      o, lse = attention_lib.attention_with_lse(q, k, v)
    else:
      o, lse = attention_lib.attention(q, k, v, implementation=self.attn_impl), None
    x_s = gated_residual(x_s, o.astype(dt).reshape(*o.shape[:2], -1), self.attn1.to_out, gate)

    h_s = self.norm2(x_s.astype(F32)).astype(dt) if self.norm2 is not None else x_s
    x_s = x_s + self.attn2(h_s, cond.context).astype(dt)

    h_s = (layer_norm(x_s, self.eps) * (1 + c_scale) + c_shift).astype(dt)
    out = gated_residual(x_s, self.ffn.hidden(h_s), self.ffn.proj_out, c_gate)
    if return_lse:
      return out, lse.astype(F32)
    return out


class WanTransformer3DModel(nnx.Module):
  """Wan2.1 T2V transformer: `embed` -> scanned `blocks` -> `head`.

  `__call__(latents [B, C_in, T, Y, X], timestep [B], context [B, M, text_dim])` returns the
  prediction `[B, C_out, T, Y, X]` in fp32.
  """

  def __init__(self, config: WanConfig, *, rngs: nnx.Rngs):
    self.config = config
    c, cd, pd = config.hidden_size, config.dtype, config.param_dtype
    pt, py, px = config.patch_size
    self.patch_embedding = PatchEmbed(config.in_channels, c, config.patch_size, dtype=cd,
                                      param_dtype=pd, rngs=rngs)
    # Zero at initialisation: a model warm-started without one starts out unchanged.
    self.frame_embedding = (nnx.Param(jnp.zeros((config.num_frame_embeddings, c), pd))
                            if config.num_frame_embeddings else None)
    self.condition_embedder = ConditionEmbedder(config, rngs=rngs)

    @nnx.split_rngs(splits=config.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_blocks(rngs: nnx.Rngs) -> WanTransformerBlock:
      return WanTransformerBlock(config, rngs=rngs)

    self.blocks = make_blocks(rngs)
    self.proj_out = _linear(c, config.out_channels * pt * py * px, dtype=cd, param_dtype=pd,
                            rngs=rngs)
    self.scale_shift_table = nnx.Param(
        jax.random.normal(rngs.params(), (1, 2, c), F32) / math.sqrt(c))

  def grid(self, latent_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """Token grid `(t, y, x)` of latents `[B, C_in, T, Y, X]`; ValueError if they don't patchify."""
    if len(latent_shape) != 5:
      raise ValueError(f"latents must be [B, C_in, T, Y, X], got shape {tuple(latent_shape)}")
    if latent_shape[1] != self.config.in_channels:
      raise ValueError(f"latents have {latent_shape[1]} channels, the model expects "
                       f"in_channels={self.config.in_channels}")
    dims = tuple(latent_shape[2:])
    if any(n % p for n, p in zip(dims, self.config.patch_size)):
      raise ValueError(f"latent T, Y, X = {dims} must be multiples of "
                       f"patch_size={self.config.patch_size}")
    return tuple(n // p for n, p in zip(dims, self.config.patch_size))

  def embed(self, latents: jax.Array, timestep: jax.Array, context: jax.Array
            ) -> tuple[jax.Array, WanConditioning]:
    """latents `[B, C_in, T, Y, X]`, timestep `[B]` (or scalar), context `[B, M, text_dim]` ->
    tokens `x [B, N, C]` (compute dtype, frame-major) and the step's `WanConditioning`."""
    grid = self.grid(latents.shape)
    b = latents.shape[0]
    if context.ndim != 3 or context.shape[0] != b or context.shape[2] != self.config.text_dim:
      raise ValueError(f"context must be [B={b}, M, text_dim={self.config.text_dim}], got shape "
                       f"{tuple(context.shape)}")
    timestep = jnp.asarray(timestep)
    if timestep.ndim == 0:
      timestep = jnp.broadcast_to(timestep, (b,))
    if timestep.shape != (b,):
      raise ValueError(f"timestep must be a scalar or [B={b}], got shape {tuple(timestep.shape)}")
    x = self.patch_embedding(latents)  # [B, N, C]
    if self.frame_embedding is not None:
      x = self._add_frame_embedding(x, grid)
    temb, timestep_proj, ctx = self.condition_embedder(
        timestep, context.astype(self.config.dtype))
    cos, sin = rope_tables(self.config, grid)
    cond = WanConditioning(timestep_proj=timestep_proj.reshape(b, 6, -1), temb=temb,
                           context=ctx, rope_cos=cos, rope_sin=sin, grid=grid)
    return x, cond

  def _add_frame_embedding(self, x: jax.Array, grid: tuple[int, int, int]) -> jax.Array:
    t = grid[0]
    if t > self.config.num_frame_embeddings:
      raise ValueError(f"{t} token frames exceed the model's "
                       f"num_frame_embeddings={self.config.num_frame_embeddings}")
    b, n, c = x.shape
    emb = self.frame_embedding[:t].astype(x.dtype)  # [T, C]
    return (x.reshape(b, t, n // t, c) + emb[None, :, None, :]).reshape(b, n, c)

  def run_blocks(self, x: jax.Array, cond: WanConditioning) -> jax.Array:
    """All L blocks, dense, scanned over the stacked layer axis."""

    @nnx.scan(in_axes=(0, nnx.Carry, None), out_axes=nnx.Carry)
    def body(block: WanTransformerBlock, x: jax.Array, cond: WanConditioning) -> jax.Array:
      return block(x, cond)

    return body(self.blocks, x, cond)

  def head(self, x: jax.Array, cond: WanConditioning) -> jax.Array:
    """Output norm, 2-way modulation, projection and unpatchify: `[B, N, C] -> [B, C_out, T, Y, X]`
    (fp32)."""
    mod = self.scale_shift_table[...] + cond.temb[:, None, :]  # [B, 2, C] fp32
    shift, scale = mod[:, 0:1], mod[:, 1:2]
    h = (layer_norm(x, self.config.eps) * (1 + scale) + shift).astype(x.dtype)
    out = self.proj_out(h).astype(F32)  # [B, N, pt*py*px*C_out]
    t, y, w = cond.grid
    pt, py, px = self.config.patch_size
    out = out.reshape(x.shape[0], t, y, w, pt, py, px, self.config.out_channels)
    out = out.transpose(0, 7, 1, 4, 2, 5, 3, 6)  # [B, C_out, t, pt, y, py, x, px]
    return out.reshape(x.shape[0], self.config.out_channels, t * pt, y * py, w * px)

  def __call__(self, latents: jax.Array, timestep: jax.Array, context: jax.Array) -> jax.Array:
    x, cond = self.embed(latents, timestep, context)
    return self.head(self.run_blocks(x, cond), cond)


class PatchEmbed(nnx.Module):
  """Conv3d with kernel = stride = patch (diffusers' `patch_embedding`), kernel stored DHWIO."""

  def __init__(self, cin: int, cout: int, patch: tuple[int, int, int], *, dtype, param_dtype,
               rngs: nnx.Rngs):
    self.patch = patch
    self.dtype = dtype
    fan_in = cin * math.prod(patch)
    init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                                in_axis=(0, 1, 2, 3), out_axis=4)
    self.kernel = nnx.Param(init(rngs.params(), (*patch, cin, cout), param_dtype))
    bound = 1.0 / math.sqrt(fan_in)
    self.bias = nnx.Param(jax.random.uniform(rngs.params(), (cout,), param_dtype, -bound, bound))

  def __call__(self, latents: jax.Array) -> jax.Array:
    b, cin, tt, yy, xx = latents.shape
    pt, py, px = self.patch
    t, y, x = tt // pt, yy // py, xx // px
    v = latents.astype(self.dtype).reshape(b, cin, t, pt, y, py, x, px)
    kernel = self.kernel[...].astype(self.dtype)  # [pt, py, px, C_in, C]
    out = jnp.einsum("bitpyqxr,pqrio->btyxo", v, kernel)  # [B, t, y, x, C]
    out = out + self.bias[...].astype(self.dtype)
    return out.reshape(b, t * y * x, -1)


def load_pretrained(path: str, *, dtype: str | None = None, param_dtype: str | None = None,
                    attention_impl: str | None = None, shardings: Any = None
                    ) -> WanTransformer3DModel:
  """Builds a `WanTransformer3DModel` from a checkpoint of `python -m checkpoints_convert wan`.

  The config comes from the checkpoint's metadata; `dtype` / `param_dtype` / `attention_impl`
  override its compute dtype, parameter dtype (default: as stored) and attention implementation.
  `shardings` (one `jax.sharding.Sharding` or a matching tree) places each array as it is read.
  """
  from astraea_jax import checkpoint  # pylint: disable=import-outside-toplevel

  meta = checkpoint.read_metadata(path)
  if meta.get("family") != "wan":
    raise ValueError(f"{path}: checkpoint of family {meta.get('family')!r}, not a Wan transformer")
  config = WanConfig.from_dict(meta["config"])
  overrides = {k: v for k, v in (("dtype", dtype), ("param_dtype", param_dtype),
                                 ("attention_impl", attention_impl)) if v is not None}
  config = dataclasses.replace(config, **overrides)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: WanTransformer3DModel(config,
                                                                              rngs=nnx.Rngs(0))))
  state = checkpoint.load_params(path, abstract, shardings=shardings)
  return nnx.merge(graphdef, state)
