"""The HunyuanVideo text-to-video diffusion transformer in Flax NNX.

Ports diffusers' `HunyuanVideoTransformer3DModel` (diffusers/models/transformers/
transformer_hunyuan_video.py, 0.42) and the original `HYVideoDiffusionTransformer`
(Tencent/HunyuanVideo, hyvideo/modules/models.py, model HYVideo-T/2-cfgdistill), text-to-video
only:

  * `x_embedder`: Conv3d patch embedding, kernel = stride = (patch_size_t, patch_size, patch_size).
  * `time_text_embed`: the conditioning vector `temb [B, C]` = MLP(sinusoid(timestep)) +
    MLP(sinusoid(guidance)) (the cfg-distilled guidance embedding) + MLP(pooled CLIP text
    embedding).
  * `context_embedder`: the token refiner; projects the LLM text tokens to C and runs
    `num_refiner_layers` individual-token-refiner blocks (masked self-attention + SiLU MLP, gated by
    their own conditioning from the timestep and the masked mean of the text tokens).
  * `transformer_blocks`: dual-stream blocks; video and text tokens have their own modulation,
    projections (q/k RMS-normed per head) and MLPs and meet in one joint attention.
  * `single_transformer_blocks`: single-stream blocks over the concatenated sequence; one
    modulation, q/k/v and a parallel GELU MLP whose output is fused with the attention output by
    `proj_out`.
  * `norm_out` (AdaLayerNormContinuous, modulation chunks in (scale, shift) order), `proj_out` and
    unpatchify.

3D RoPE: the head dim D is split into `rope_axes_dim` (16, 56, 56 at D = 128) parts rotated by the
frame, row and column of each video token with base `rope_theta` (256), on interleaved channel pairs
(as `wan.apply_rope`). Text tokens are never rotated.

Token layout. Video tokens are frame-major: token `n = (t * Y' + y) * X' + x` on the patchified grid
`(T', Y', X')`, N = T' Y' X'. The dual-stream blocks keep video `x [B, N, C]` and text
`ctx [B, M, C]` apart; the single-stream blocks run on `h = concat([x, ctx]) [B, N + M, C]`, video
tokens first, and the head reads `h[:, :N]`. Every attention over the joint sequence uses the key
mask `cond.key_mask [B, N + M]`: all video tokens, and the first `sum(text_mask)` text tokens of
each sample (diffusers' rule, which assumes right-padded prompts); padded text tokens are still
computed as queries but never attended to, so they cannot change the video output. `embed`,
`run_dual_blocks`, `run_single_blocks` and `head` are the stages of `__call__`, so token-wise
acceleration can run any stage on a subset of the video tokens.

Selected rows (ASTRAEA, arXiv 2506.05096, Sec. 3). Both block types take `select [B, S]` (video
token indices) and `return_lse`: only the S selected video tokens get queries, and everything after
the attention runs on them alone, while keys and values come from all N video tokens and all M text
tokens; the text tokens are always computed in full (the dual block's whole text stream, the M
text rows of the single block). That attention is `attention_with_lse` with the key mask given as
a key length, `cond.kv_len = N + sum(text_mask)`: keys are ordered [video; text] with the padding
last, so "key j < kv_len" is exactly `key_mask`. `return_lse` also returns the log-sum-exp of the
video queries (`[B, H, N or S]` fp32), the attention term of the token score (Eq. 1). A selected
row equals the dense block's row to float rounding, and `select=None, return_lse=True` is the dense
block on the LSE kernel.

Attribute names mirror the diffusers checkpoint, so conversion is a rename table plus layout rules;
the exceptions are `to_out.0 -> to_out`, `ff.net.0.proj -> ff.proj_in`, `ff.net.2 -> ff.proj_out`
(and the same for `ff_context`) and `weight -> kernel | scale`. Each stack of blocks is one module
whose parameters carry a leading layer axis L, run with `nnx.scan`.

Precision: the conditioning embedders (timestep, guidance, pooled text and the refiner's own) run
in fp32 with fp32 weights, as do the layer / RMS norms, the modulation and gating arithmetic and
RoPE; projections, attention and MLPs run in `config.dtype` with `config.param_dtype` weights.
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
from astraea_jax.models.wan import (LayerNorm, PatchEmbed, RMSNorm, Rope, TimestepEmbedding,
                                    apply_rope)
from astraea_jax.models.wan import layer_norm

F32 = jnp.float32
EPS = 1e-6  # every norm of the model
TIME_FREQ_DIM = 256  # sinusoid width of the timestep and guidance embeddings
REFINER_MLP_RATIO = 4.0  # the refiner's MLP width does not follow `mlp_ratio` in either reference


@dataclasses.dataclass(frozen=True)
class HunyuanConfig(PresetConfig):
  """HunyuanVideo transformer hyper-parameters, named as diffusers' `HunyuanVideoTransformer3DModel`
  config (text-to-video: no `image_condition_type`).

  `param_dtype` is the storage dtype of the large weights (fp32 is kept for the conditioning
  embedders and the norm scales); `dtype` is the compute dtype; `attention_impl` is passed to
  `astraea_jax.models.attention.attention` (None: its default for the platform).
  """
  in_channels: int = 16
  out_channels: int = 16
  num_attention_heads: int = 24
  attention_head_dim: int = 128
  num_layers: int = 20
  num_single_layers: int = 40
  num_refiner_layers: int = 2
  mlp_ratio: float = 4.0
  patch_size: int = 2
  patch_size_t: int = 1
  qk_norm: str = "rms_norm"
  guidance_embeds: bool = True
  text_embed_dim: int = 4096
  pooled_projection_dim: int = 768
  rope_theta: float = 256.0
  rope_axes_dim: tuple[int, int, int] = (16, 56, 56)
  param_dtype: str = "bfloat16"
  dtype: str = "bfloat16"
  attention_impl: str | None = None

  def __post_init__(self):
    set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen dataclass)
    set_("rope_axes_dim", tuple(int(d) for d in self.rope_axes_dim))
    set_("mlp_ratio", float(self.mlp_ratio))
    set_("rope_theta", float(self.rope_theta))
    set_("guidance_embeds", bool(self.guidance_embeds))
    set_("param_dtype", jnp.dtype(self.param_dtype).name)
    set_("dtype", jnp.dtype(self.dtype).name)
    for name in ("in_channels", "out_channels", "num_attention_heads", "attention_head_dim",
                 "num_layers", "num_single_layers", "num_refiner_layers", "patch_size",
                 "patch_size_t", "text_embed_dim", "pooled_projection_dim"):
      value = getattr(self, name)
      if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive int")
      set_(name, int(value))
    if self.qk_norm != "rms_norm":
      raise ValueError(f"qk_norm={self.qk_norm!r}: only 'rms_norm' is supported")
    if not self.mlp_ratio > 0 or int(self.hidden_size * self.mlp_ratio) < 1:
      raise ValueError(f"mlp_ratio={self.mlp_ratio} must be positive")
    if not self.rope_theta > 0:
      raise ValueError(f"rope_theta={self.rope_theta} must be positive")
    axes = self.rope_axes_dim
    if len(axes) != 3 or any(d < 2 or d % 2 for d in axes):
      raise ValueError(f"rope_axes_dim={axes} must be three positive even ints (t, y, x)")
    if sum(axes) != self.attention_head_dim:
      raise ValueError(f"rope_axes_dim={axes} must sum to attention_head_dim="
                       f"{self.attention_head_dim}")

  @property
  def hidden_size(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  @property
  def mlp_dim(self) -> int:
    """Inner width of the dual-stream feed-forwards and the single-stream MLP."""
    return int(self.hidden_size * self.mlp_ratio)

  @property
  def patch(self) -> tuple[int, int, int]:
    return self.patch_size_t, self.patch_size, self.patch_size

  family = "HunyuanVideo"

  @classmethod
  def presets(cls) -> dict[str, HunyuanConfig]:
    return HUNYUAN_PRESETS


HUNYUAN_PRESETS: dict[str, HunyuanConfig] = {
    # Tests: every feature at toy size, fp32 throughout (the goldens' model).
    "tiny": HunyuanConfig(in_channels=4, out_channels=4, num_attention_heads=2,
                          attention_head_dim=8, num_layers=2, num_single_layers=2,
                          num_refiner_layers=1, mlp_ratio=4.0, text_embed_dim=16,
                          pooled_projection_dim=8, rope_axes_dim=(2, 2, 4),
                          param_dtype="float32", dtype="float32"),
    # tencent/HunyuanVideo, HYVideo-T/2-cfgdistill: hidden 3072, 20 dual + 40 single layers.
    "hunyuanvideo-t2v": HunyuanConfig(),
}


@flax.struct.dataclass
class HunyuanConditioning:
  """Per-step conditioning shared by every block (output of `HunyuanVideoTransformer3DModel.embed`).

  Attributes:
    temb: `[B, C]` fp32 conditioning vector (timestep + guidance + pooled text), input of every
      modulation.
    rope_cos, rope_sin: `[N, D/2]` fp32, one angle per rotated channel pair of every video token.
    key_mask: `[B, N + M]` bool, True for the keys every query may attend to (all video tokens, the
      valid text tokens).
    grid: `(T', Y', X')` token grid after patchifying (static).
  """
  temb: jax.Array
  rope_cos: jax.Array
  rope_sin: jax.Array
  key_mask: jax.Array
  grid: tuple[int, int, int] = flax.struct.field(pytree_node=False)

  @property
  def num_video_tokens(self) -> int:
    return math.prod(self.grid)

  @property
  def kv_len(self) -> jax.Array:
    """`[B]` int32 valid keys per sample: `key_mask` is a prefix (every video token, then the
    valid text tokens), so its count is the same mask as a key length."""
    return jnp.sum(self.key_mask.astype(jnp.int32), axis=1)


# ----------------------------------------------------------------------------------------------
# Layers


def _linear(din: int, dout: int, *, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(din, dout, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def _gelu_tanh(x: jax.Array) -> jax.Array:
  return jax.nn.gelu(x, approximate=True)


def timestep_sinusoid(t: jax.Array, dim: int = TIME_FREQ_DIM, max_period: float = 10000.0
                      ) -> jax.Array:
  """`[B]` -> `[B, dim]` fp32 as `cat(cos(t w), sin(t w))`, `w_i = max_period^(-i / (dim/2))`.

  The guidance embedding sees values in the thousands, where one ulp of a frequency moves the angle
  by up to ~4e-4 rad; so the frequencies are built on the host the references' way (fp32 exponents,
  `-log(max_period) * i` then `/ (dim/2)`), each exponential rounded once from float64.
  """
  half = dim // 2
  exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)
  exponent = exponent / np.float32(half)
  freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)  # [dim/2]
  args = t.astype(F32)[:, None] * jnp.asarray(freqs)[None, :]  # [B, dim/2]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def rope_tables(config: HunyuanConfig, grid: tuple[int, int, int]
                ) -> tuple[jax.Array, jax.Array]:
  """cos / sin of the 3D RoPE angles, `[N, D/2]` fp32, tokens frame-major (t, y, x).

  Pair i of the t part rotates by `pos_t * theta^(-2i / d_t)`; the y and x parts likewise with their
  own widths `rope_axes_dim`. Angles are formed in fp32 like both references.
  """
  t, y, x = grid
  theta = np.float32(config.rope_theta)
  cos, sin = [], []
  for dim, n in zip(config.rope_axes_dim, grid):
    inv = np.float32(1.0) / theta ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    angles = np.outer(np.arange(n, dtype=np.float32), inv.astype(np.float32))  # [n, dim/2]
    cos.append(jnp.asarray(np.cos(angles), F32))
    sin.append(jnp.asarray(np.sin(angles), F32))

  def expand(tabs):  # per-axis [n, d/2] tables -> [T' Y' X', D/2], built on device
    a, b, c = tabs
    full = jnp.concatenate([
        jnp.broadcast_to(a[:, None, None, :], (t, y, x, a.shape[-1])),
        jnp.broadcast_to(b[None, :, None, :], (t, y, x, b.shape[-1])),
        jnp.broadcast_to(c[None, None, :, :], (t, y, x, c.shape[-1])),
    ], axis=-1)
    return full.reshape(t * y * x, -1)

  return expand(cos), expand(sin)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """`LayerNorm(x) * (1 + scale) + shift` in fp32 (no affine, eps 1e-6); x `[B, S, C]`, shift and
  scale `[B, C]` fp32; returns x's dtype."""
  return (layer_norm(x, EPS) * (1 + scale[:, None]) + shift[:, None]).astype(x.dtype)


def gated_residual(x: jax.Array, y: jax.Array, gate: jax.Array) -> jax.Array:
  """`x + y * gate` in fp32, returned in x's dtype; gate `[B, C]` fp32."""
  return (x.astype(F32) + y.astype(F32) * gate[:, None]).astype(x.dtype)


class AdaModulation(nnx.Module):
  """SiLU -> linear giving `n` modulation vectors (the `.linear` of diffusers' AdaLayerNorm* and
  of the refiner's `norm_out`): `temb [B, C]` fp32 -> `[B, n, C]` fp32, chunks in output order."""

  def __init__(self, c: int, n: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.n = n
    self.dtype = dtype
    self.linear = _linear(c, n * c, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, temb: jax.Array) -> jax.Array:
    out = self.linear(jax.nn.silu(temb).astype(self.dtype)).astype(F32)
    return out.reshape(temb.shape[0], self.n, -1)


class FeedForward(nnx.Module):
  """proj_in -> activation -> proj_out (diffusers' `ff.net.0.proj` / `ff.net.2`)."""

  def __init__(self, c: int, inner: int, act, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.proj_in = _linear(c, inner, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.proj_out = _linear(inner, c, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.act = act

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.proj_out(self.act(self.proj_in(x)))


class HunyuanAttention(nnx.Module):
  """Projections of one attention layer; the attention itself is run by the calling block.

  `qk_norm`: per-head RMSNorm on q and k (`norm_q`, `norm_k`); `context`: a second set of
  projections for the text stream (`add_{q,k,v}_proj`, `norm_added_{q,k}`, `to_add_out`);
  `output`: the video/joint output projection `to_out`.
  """

  def __init__(self, config: HunyuanConfig, *, qk_norm: bool, context: bool, output: bool,
               rngs: nnx.Rngs):
    c, d, cd, pd = config.hidden_size, config.attention_head_dim, config.dtype, config.param_dtype
    lin = lambda: _linear(c, c, dtype=cd, param_dtype=pd, rngs=rngs)  # noqa: E731
    self.heads = config.num_attention_heads
    self.to_q, self.to_k, self.to_v = lin(), lin(), lin()
    self.norm_q = RMSNorm(d, eps=EPS) if qk_norm else None
    self.norm_k = RMSNorm(d, eps=EPS) if qk_norm else None
    self.to_out = lin() if output else None
    if context:
      self.add_q_proj, self.add_k_proj, self.add_v_proj = lin(), lin(), lin()
      self.norm_added_q = RMSNorm(d, eps=EPS) if qk_norm else None
      self.norm_added_k = RMSNorm(d, eps=EPS) if qk_norm else None
      self.to_add_out = lin()
    else:
      self.add_q_proj = self.add_k_proj = self.add_v_proj = None
      self.norm_added_q = self.norm_added_k = self.to_add_out = None

  def _heads(self, x: jax.Array) -> jax.Array:
    return x.reshape(*x.shape[:2], self.heads, -1)  # [B, S, C] -> [B, S, H, D]

  @staticmethod
  def _norm(norm: RMSNorm | None, x: jax.Array, rope: Rope | None = None) -> jax.Array:
    """Optional per-head RMSNorm, then optional RoPE (`rope = (cos, sin)`), in one pass when both."""
    if norm is not None and rope is not None:
      return norm.with_rope(x, *rope)
    x = norm(x) if norm is not None else x
    return apply_rope(x, *rope) if rope is not None else x

  def qkv(self, x: jax.Array, rope: Rope | None = None
          ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`[B, S, C]` -> q, k, v `[B, S, H, D]` (q and k normed, and rotated by `rope` if given)."""
    q = self._norm(self.norm_q, self._heads(self.to_q(x)), rope)
    k = self._norm(self.norm_k, self._heads(self.to_k(x)), rope)
    return q, k, self._heads(self.to_v(x))

  def project_q(self, x: jax.Array, rope: Rope | None = None) -> jax.Array:
    """`[B, S, C]` -> q `[B, S, H, D]` (normed, and rotated by `rope` if given)."""
    return self._norm(self.norm_q, self._heads(self.to_q(x)), rope)

  def project_kv(self, x: jax.Array, rope: Rope | None = None) -> tuple[jax.Array, jax.Array]:
    """`[B, N, C]` -> k (normed, and rotated by `rope` if given), v `[B, N, H, D]`."""
    return self._norm(self.norm_k, self._heads(self.to_k(x)), rope), self._heads(self.to_v(x))

  def added_qkv(self, ctx: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Text-stream projections of the dual-stream attention: `[B, M, C]` -> `[B, M, H, D]` x 3."""
    q = self._norm(self.norm_added_q, self._heads(self.add_q_proj(ctx)))
    k = self._norm(self.norm_added_k, self._heads(self.add_k_proj(ctx)))
    return q, k, self._heads(self.add_v_proj(ctx))


def _flat(o: jax.Array) -> jax.Array:
  return o.reshape(*o.shape[:2], -1)  # [B, S, H, D] -> [B, S, C]


def _take_rows(x: jax.Array, rows: jax.Array) -> jax.Array:
  """x `[B, N, ...]`, rows `[B, S]` -> `[B, S, ...]`."""
  idx = rows.reshape(*rows.shape, *([1] * (x.ndim - 2)))
  return jnp.take_along_axis(x, idx, axis=1, mode="clip")


def _attend(q, k, v, cond: HunyuanConditioning, impl: str | None, return_lse: bool):
  """Joint attention under the text mask: `attention` (key mask) for the plain dense block, the
  LSE kernel with the mask as a key length otherwise. Returns `(o [B, S, H, D], lse or None)`."""
  if return_lse:
    return attention_lib.attention_with_lse(q, k, v, kv_len=cond.kv_len)
  return attention_lib.attention(q, k, v, kv_len=cond.kv_len, implementation=impl), None


class HunyuanRefinerBlock(nnx.Module):
  """One individual-token-refiner block: affine LayerNorm -> masked self-attention -> gated
  residual, affine LayerNorm -> SiLU MLP -> gated residual; the two gates come from `norm_out`."""

  def __init__(self, config: HunyuanConfig, *, rngs: nnx.Rngs):
    c, cd, pd = config.hidden_size, config.dtype, config.param_dtype
    self.attn_impl = config.attention_impl
    self.norm1 = LayerNorm(c, eps=EPS)
    self.attn = HunyuanAttention(config, qk_norm=False, context=False, output=True, rngs=rngs)
    self.norm2 = LayerNorm(c, eps=EPS)
    self.ff = FeedForward(c, int(c * REFINER_MLP_RATIO), jax.nn.silu, dtype=cd, param_dtype=pd,
                          rngs=rngs)
    self.norm_out = AdaModulation(c, 2, dtype=cd, param_dtype=pd, rngs=rngs)

  def __call__(self, x: jax.Array, temb: jax.Array, mask: jax.Array) -> jax.Array:
    """x `[B, M, C]` text tokens, temb `[B, C]` fp32 (the refiner's own), mask `[B, M]` bool."""
    q, k, v = self.attn.qkv(self.norm1(x))  # [B, M, H, D]
    # The references mask pairs (query i, key j) by `mask_i & mask_j`, then re-open key 0 for
    # every query: valid queries see the valid keys plus key 0, padded queries see key 0 only. Two
    # calls express that exactly.
    # Both masks are prefixes (the text mask is; key 0 starts it), so they run as key lengths.
    valid = jnp.maximum(jnp.sum(mask.astype(jnp.int32), axis=1), 1)  # [B]
    o_valid = attention_lib.attention(q, k, v, kv_len=valid, implementation=self.attn_impl)
    o_pad = attention_lib.attention(q, k, v, kv_len=jnp.ones_like(valid),
                                    implementation=self.attn_impl)
    o = jnp.where(mask[:, :, None, None], o_valid, o_pad)  # [B, M, H, D]
    gates = self.norm_out(temb)  # [B, 2, C]: attention, MLP
    x = gated_residual(x, self.attn.to_out(_flat(o).astype(x.dtype)), gates[:, 0])
    return gated_residual(x, self.ff(self.norm2(x)), gates[:, 1])


class TimeTextEmbed(nnx.Module):
  """`timestep_embedder` (+ `guidance_embedder`) on 256-wide sinusoids, `text_embedder` on a pooled
  text vector; their sum `[B, C]` is the conditioning vector. fp32 weights and compute."""

  def __init__(self, c: int, text_dim: int, *, guidance: bool, rngs: nnx.Rngs):
    mlp = lambda din: TimestepEmbedding(din, c, dtype=F32, param_dtype=F32,  # noqa: E731
                                        act=jax.nn.silu, rngs=rngs)
    self.timestep_embedder = mlp(TIME_FREQ_DIM)
    self.guidance_embedder = mlp(TIME_FREQ_DIM) if guidance else None
    self.text_embedder = mlp(text_dim)

  def __call__(self, timestep: jax.Array, pooled: jax.Array,
               guidance: jax.Array | None = None) -> jax.Array:
    temb = self.timestep_embedder(timestep_sinusoid(timestep))
    if self.guidance_embedder is not None:
      temb = temb + self.guidance_embedder(timestep_sinusoid(guidance))
    return temb + self.text_embedder(pooled.astype(F32))


class IndividualTokenRefiner(nnx.Module):
  """The refiner blocks, one module with a leading layer axis (diffusers' `token_refiner`)."""

  def __init__(self, config: HunyuanConfig, *, rngs: nnx.Rngs):

    @nnx.split_rngs(splits=config.num_refiner_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_blocks(rngs: nnx.Rngs) -> HunyuanRefinerBlock:
      return HunyuanRefinerBlock(config, rngs=rngs)

    self.refiner_blocks = make_blocks(rngs)

  def __call__(self, x: jax.Array, temb: jax.Array, mask: jax.Array) -> jax.Array:

    @nnx.scan(in_axes=(0, nnx.Carry, None, None), out_axes=nnx.Carry)
    def body(block: HunyuanRefinerBlock, x: jax.Array, temb: jax.Array, mask: jax.Array):
      return block(x, temb, mask)

    return body(self.refiner_blocks, x, temb, mask)


class TokenRefiner(nnx.Module):
  """LLM text tokens `[B, M, text_embed_dim]` -> refined text tokens `[B, M, C]` (diffusers'
  `context_embedder`)."""

  def __init__(self, config: HunyuanConfig, *, rngs: nnx.Rngs):
    c = config.hidden_size
    self.time_text_embed = TimeTextEmbed(c, config.text_embed_dim, guidance=False, rngs=rngs)
    self.proj_in = _linear(config.text_embed_dim, c, dtype=config.dtype,
                           param_dtype=config.param_dtype, rngs=rngs)
    self.token_refiner = IndividualTokenRefiner(config, rngs=rngs)

  def __call__(self, text: jax.Array, timestep: jax.Array, mask: jax.Array) -> jax.Array:
    """text `[B, M, text_embed_dim]`, timestep `[B]`, mask `[B, M]` bool -> `[B, M, C]`."""
    m = mask.astype(F32)[..., None]  # [B, M, 1]
    # Masked mean of the text tokens; a sample without any valid token gives NaN, as in the
    # references.
    pooled = jnp.sum(text.astype(F32) * m, axis=1) / jnp.sum(m, axis=1)  # [B, text_embed_dim]
    temb = self.time_text_embed(timestep, pooled)
    x = self.proj_in(text.astype(self.proj_in.dtype))
    return self.token_refiner(x, temb, mask)


class HunyuanDualBlock(nnx.Module):
  """Dual-stream block: separate modulation, projections and MLPs for video and text, one joint
  attention over `[video; text]` (diffusers' `HunyuanVideoTransformerBlock`)."""

  def __init__(self, config: HunyuanConfig, *, rngs: nnx.Rngs):
    c, f, cd, pd = config.hidden_size, config.mlp_dim, config.dtype, config.param_dtype
    self.attn_impl = config.attention_impl
    self.norm1 = AdaModulation(c, 6, dtype=cd, param_dtype=pd, rngs=rngs)
    self.norm1_context = AdaModulation(c, 6, dtype=cd, param_dtype=pd, rngs=rngs)
    self.attn = HunyuanAttention(config, qk_norm=True, context=True, output=True, rngs=rngs)
    self.ff = FeedForward(c, f, _gelu_tanh, dtype=cd, param_dtype=pd, rngs=rngs)
    self.ff_context = FeedForward(c, f, _gelu_tanh, dtype=cd, param_dtype=pd, rngs=rngs)

  def __call__(self, x: jax.Array, ctx: jax.Array, cond: HunyuanConditioning, *,
               select: jax.Array | None = None, return_lse: bool = False):
    """Runs the block on all N video tokens, or on the S named by `select`.

    Args:
      x: `[B, N, C]` video tokens (compute dtype), always full length: keys and values come from
        every one of them.
      ctx: `[B, M, C]` text tokens, always computed in full.
      cond: the step's `HunyuanConditioning`.
      select: None (dense) or `[B, S]` int32 video token indices: queries, output projection and
        MLP run on those rows only.
      return_lse: also return the LSE of the video queries.

    Returns:
      `(x [B, N or S, C], ctx [B, M, C])`, with `return_lse` also `lse [B, H, N or S]` fp32.
    """
    lse_path = return_lse or select is not None
    # Chunks: shift, scale, gate (attention), shift, scale, gate (MLP).
    mod, mod_c = self.norm1(cond.temb), self.norm1_context(cond.temb)  # [B, 6, C] fp32
    h = modulate(x, mod[:, 0], mod[:, 1])  # [B, N, C]
    rope = (cond.rope_cos, cond.rope_sin)
    if select is None:
      q, k, v = self.attn.qkv(h, rope)  # [B, N, H, D], q and k rotated
    else:
      select = select.astype(jnp.int32)
      x = _take_rows(x, select)  # [B, S, C]: the rows computed from here on
      k, v = self.attn.project_kv(h, rope)  # [B, N, H, D]
      q = self.attn.project_q(_take_rows(h, select), (cond.rope_cos[select],
                                                      cond.rope_sin[select]))  # [B, S, H, D]
    qc, kc, vc = self.attn.added_qkv(modulate(ctx, mod_c[:, 0], mod_c[:, 1]))  # [B, M, H, D]
    o, lse = _attend(jnp.concatenate([q, qc], axis=1), jnp.concatenate([k, kc], axis=1),
                     jnp.concatenate([v, vc], axis=1), cond, self.attn_impl,
                     lse_path)  # [B, S + M, H, D], [B, H, S + M]
    s = q.shape[1]
    o = _flat(o).astype(x.dtype)
    x = gated_residual(x, self.attn.to_out(o[:, :s]), mod[:, 2])
    ctx = gated_residual(ctx, self.attn.to_add_out(o[:, s:]), mod_c[:, 2])
    x = gated_residual(x, self.ff(modulate(x, mod[:, 3], mod[:, 4])), mod[:, 5])
    ctx = gated_residual(ctx, self.ff_context(modulate(ctx, mod_c[:, 3], mod_c[:, 4])),
                         mod_c[:, 5])
    if return_lse:
      return x, ctx, lse[:, :, :s].astype(F32)
    return x, ctx


class HunyuanSingleBlock(nnx.Module):
  """Single-stream block on `h = [video; text]`: modulated LayerNorm, then attention and a GELU MLP
  in parallel, fused by `proj_out` and gated (diffusers' `HunyuanVideoSingleTransformerBlock`)."""

  def __init__(self, config: HunyuanConfig, *, rngs: nnx.Rngs):
    c, f, cd, pd = config.hidden_size, config.mlp_dim, config.dtype, config.param_dtype
    self.attn_impl = config.attention_impl
    self.norm = AdaModulation(c, 3, dtype=cd, param_dtype=pd, rngs=rngs)
    self.attn = HunyuanAttention(config, qk_norm=True, context=False, output=False, rngs=rngs)
    self.proj_mlp = _linear(c, f, dtype=cd, param_dtype=pd, rngs=rngs)
    self.proj_out = _linear(c + f, c, dtype=cd, param_dtype=pd, rngs=rngs)

  def __call__(self, h: jax.Array, cond: HunyuanConditioning, *,
               select: jax.Array | None = None, return_lse: bool = False):
    """Runs the block on the whole sequence, or on the S video tokens named by `select` and all M
    text tokens.

    Args:
      h: `[B, N + M, C]`, video tokens first (compute dtype), always full length: keys and values
        come from every row.
      cond: the step's `HunyuanConditioning`.
      select: None (dense) or `[B, S]` int32 video token indices (< N).
      return_lse: also return the LSE of the video queries.

    Returns:
      `[B, N + M, C]`, or with `select` `[B, S + M, C]` (the selected video rows, then every text
      row); with `return_lse` also `lse [B, H, N or S]` fp32.
    """
    n = cond.num_video_tokens
    m = h.shape[1] - n
    mod = self.norm(cond.temb)  # [B, 3, C] fp32: shift, scale, gate
    hn = modulate(h, mod[:, 0], mod[:, 1])  # [B, N + M, C]
    # The text rows get the identity rotation (cos 1, sin 0), which leaves them exactly unchanged.
    cos = jnp.concatenate([cond.rope_cos, jnp.ones((m, cond.rope_cos.shape[1]), F32)], axis=0)
    sin = jnp.concatenate([cond.rope_sin, jnp.zeros((m, cond.rope_sin.shape[1]), F32)], axis=0)
    if select is None:
      q, k, v = self.attn.qkv(hn, (cos, sin))  # [B, N + M, H, D], q and k rotated
    else:
      text_rows = jnp.broadcast_to(n + jnp.arange(m, dtype=jnp.int32), (h.shape[0], m))
      rows = jnp.concatenate([select.astype(jnp.int32), text_rows], axis=1)  # [B, S + M]
      k, v = self.attn.project_kv(hn, (cos, sin))  # [B, N + M, H, D]
      h, hn = _take_rows(h, rows), _take_rows(hn, rows)  # [B, S + M, C]: the rows computed
      q = self.attn.project_q(hn, (cos[rows], sin[rows]))  # [B, S + M, H, D]
    mlp = _gelu_tanh(self.proj_mlp(hn))  # [B, S + M, F]
    o, lse = _attend(q, k, v, cond, self.attn_impl,
                     return_lse or select is not None)  # [B, S + M, H, D], [B, H, S + M]
    out = self.proj_out(jnp.concatenate([_flat(o).astype(h.dtype), mlp], axis=-1))
    out = gated_residual(h, out, mod[:, 2])
    if return_lse:
      return out, lse[:, :, :q.shape[1] - m].astype(F32)
    return out


class HunyuanVideoTransformer3DModel(nnx.Module):
  """HunyuanVideo T2V transformer: `embed` -> `run_dual_blocks` -> `run_single_blocks` -> `head`.

  `__call__(latents [B, C_in, T, Y, X], timestep [B], text [B, M, text_embed_dim], text_mask [B, M],
  pooled [B, pooled_projection_dim], guidance [B])` returns the prediction `[B, C_out, T, Y, X]` in
  fp32. `guidance` (the distilled guidance scale times 1000) is required iff `guidance_embeds`.
  """

  def __init__(self, config: HunyuanConfig, *, rngs: nnx.Rngs):
    self.config = config
    c, cd, pd = config.hidden_size, config.dtype, config.param_dtype
    self.x_embedder = HunyuanPatchEmbed(config, rngs=rngs)
    self.context_embedder = TokenRefiner(config, rngs=rngs)
    self.time_text_embed = TimeTextEmbed(c, config.pooled_projection_dim,
                                         guidance=config.guidance_embeds, rngs=rngs)

    @nnx.split_rngs(splits=config.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_dual(rngs: nnx.Rngs) -> HunyuanDualBlock:
      return HunyuanDualBlock(config, rngs=rngs)

    @nnx.split_rngs(splits=config.num_single_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_single(rngs: nnx.Rngs) -> HunyuanSingleBlock:
      return HunyuanSingleBlock(config, rngs=rngs)

    self.transformer_blocks = make_dual(rngs)
    self.single_transformer_blocks = make_single(rngs)
    self.norm_out = AdaModulation(c, 2, dtype=cd, param_dtype=pd, rngs=rngs)
    self.proj_out = _linear(c, config.out_channels * math.prod(config.patch), dtype=cd,
                            param_dtype=pd, rngs=rngs)

  def grid(self, latent_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """Token grid `(T', Y', X')` of latents `[B, C_in, T, Y, X]`; ValueError if they don't
    patchify."""
    if len(latent_shape) != 5:
      raise ValueError(f"latents must be [B, C_in, T, Y, X], got shape {tuple(latent_shape)}")
    if latent_shape[1] != self.config.in_channels:
      raise ValueError(f"latents have {latent_shape[1]} channels, the model expects "
                       f"in_channels={self.config.in_channels}")
    dims = tuple(latent_shape[2:])
    if any(n % p for n, p in zip(dims, self.config.patch)):
      raise ValueError(f"latent T, Y, X = {dims} must be multiples of the patch "
                       f"{self.config.patch}")
    return tuple(n // p for n, p in zip(dims, self.config.patch))

  def _per_sample(self, name: str, value: jax.Array | float, b: int) -> jax.Array:
    value = jnp.asarray(value)
    if value.ndim == 0:
      value = jnp.broadcast_to(value, (b,))
    if value.shape != (b,):
      raise ValueError(f"{name} must be a scalar or [B={b}], got shape {tuple(value.shape)}")
    return value.astype(F32)

  def embed(self, latents: jax.Array, timestep: jax.Array, text: jax.Array,
            text_mask: jax.Array | None, pooled: jax.Array, guidance: jax.Array | None = None
            ) -> tuple[jax.Array, jax.Array, HunyuanConditioning]:
    """Patchifies the latents, refines the text and builds the step's conditioning.

    Args:
      latents: `[B, C_in, T, Y, X]`.
      timestep: `[B]` or a scalar, in [0, 1000].
      text: `[B, M, text_embed_dim]` LLM text embeddings.
      text_mask: `[B, M]` (bool or 0/1), 1 for the valid, leading tokens of each prompt; None: all
        valid.
      pooled: `[B, pooled_projection_dim]` pooled CLIP text embedding.
      guidance: `[B]` or a scalar (guidance scale x 1000); only with `guidance_embeds`.

    Returns:
      video tokens `x [B, N, C]` and text tokens `ctx [B, M, C]` in the compute dtype, and the
      `HunyuanConditioning`.
    """
    cfg = self.config
    grid = self.grid(latents.shape)
    b = latents.shape[0]
    if text.ndim != 3 or text.shape[0] != b or text.shape[2] != cfg.text_embed_dim:
      raise ValueError(f"text must be [B={b}, M, text_embed_dim={cfg.text_embed_dim}], got shape "
                       f"{tuple(text.shape)}")
    m = text.shape[1]
    if text_mask is None:
      text_mask = jnp.ones((b, m), jnp.bool_)
    if tuple(text_mask.shape) != (b, m):
      raise ValueError(f"text_mask must be [B={b}, M={m}], got shape {tuple(text_mask.shape)}")
    text_mask = text_mask.astype(jnp.bool_)
    if tuple(pooled.shape) != (b, cfg.pooled_projection_dim):
      raise ValueError(f"pooled must be [B={b}, pooled_projection_dim="
                       f"{cfg.pooled_projection_dim}], got shape {tuple(pooled.shape)}")
    timestep = self._per_sample("timestep", timestep, b)
    if cfg.guidance_embeds:
      if guidance is None:
        raise ValueError("this model embeds the guidance scale (guidance_embeds=True): pass "
                         "guidance")
      guidance = self._per_sample("guidance", guidance, b)
    elif guidance is not None:
      raise ValueError("guidance given, but the model has no guidance embedding "
                       "(guidance_embeds=False)")

    temb = self.time_text_embed(timestep, pooled, guidance)  # [B, C] fp32
    x = self.x_embedder(latents)  # [B, N, C]
    ctx = self.context_embedder(text, timestep, text_mask)  # [B, M, C]
    n = x.shape[1]
    # Text keys count by length, not position: key j is valid iff j < sum(mask).
    text_len = jnp.sum(text_mask.astype(jnp.int32), axis=1)  # [B]
    text_keys = jnp.arange(m, dtype=jnp.int32)[None, :] < text_len[:, None]  # [B, M]
    key_mask = jnp.concatenate([jnp.ones((b, n), jnp.bool_), text_keys], axis=1)  # [B, N + M]
    cos, sin = rope_tables(cfg, grid)
    cond = HunyuanConditioning(temb=temb, rope_cos=cos, rope_sin=sin, key_mask=key_mask, grid=grid)
    return x, ctx, cond

  def run_dual_blocks(self, x: jax.Array, ctx: jax.Array, cond: HunyuanConditioning
                      ) -> tuple[jax.Array, jax.Array]:
    """All dual-stream blocks, scanned over the stacked layer axis: `x [B, N, C]`,
    `ctx [B, M, C]`."""

    @nnx.scan(in_axes=(0, nnx.Carry, None), out_axes=nnx.Carry)
    def body(block: HunyuanDualBlock, carry, cond: HunyuanConditioning):
      return block(*carry, cond)

    return body(self.transformer_blocks, (x, ctx), cond)

  def run_single_blocks(self, h: jax.Array, cond: HunyuanConditioning) -> jax.Array:
    """All single-stream blocks on `h = concat([x, ctx], axis=1) [B, N + M, C]`."""

    @nnx.scan(in_axes=(0, nnx.Carry, None), out_axes=nnx.Carry)
    def body(block: HunyuanSingleBlock, h: jax.Array, cond: HunyuanConditioning) -> jax.Array:
      return block(h, cond)

    return body(self.single_transformer_blocks, h, cond)

  def head(self, x: jax.Array, cond: HunyuanConditioning) -> jax.Array:
    """Output norm with (scale, shift) modulation, projection and unpatchify: video tokens
    `[B, N, C]` -> `[B, C_out, T, Y, X]` (fp32)."""
    mod = self.norm_out(cond.temb)  # [B, 2, C] fp32: scale, shift
    h = modulate(x, mod[:, 1], mod[:, 0])
    out = self.proj_out(h).astype(F32)  # [B, N, C_out * pt * py * px]
    t, y, w = cond.grid
    pt, py, px = self.config.patch
    b, c_out = x.shape[0], self.config.out_channels
    # Each token's outputs are channel-major: (c, dt, dy, dx).
    out = out.reshape(b, t, y, w, c_out, pt, py, px)
    out = out.transpose(0, 4, 1, 5, 2, 6, 3, 7)  # [B, C_out, T', pt, Y', py, X', px]
    return out.reshape(b, c_out, t * pt, y * py, w * px)

  def __call__(self, latents: jax.Array, timestep: jax.Array, text: jax.Array,
               text_mask: jax.Array | None, pooled: jax.Array,
               guidance: jax.Array | None = None) -> jax.Array:
    x, ctx, cond = self.embed(latents, timestep, text, text_mask, pooled, guidance)
    x, ctx = self.run_dual_blocks(x, ctx, cond)
    h = self.run_single_blocks(jnp.concatenate([x, ctx], axis=1), cond)
    return self.head(h[:, :cond.num_video_tokens], cond)


class HunyuanPatchEmbed(nnx.Module):
  """`x_embedder`: holds the Conv3d as `proj` like the checkpoints; `[B, C_in, T, Y, X]` ->
  `[B, N, C]` frame-major."""

  def __init__(self, config: HunyuanConfig, *, rngs: nnx.Rngs):
    self.proj = PatchEmbed(config.in_channels, config.hidden_size, config.patch,
                           dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)

  def __call__(self, latents: jax.Array) -> jax.Array:
    return self.proj(latents)


def from_params(config: HunyuanConfig, params: Any) -> HunyuanVideoTransformer3DModel:
  """Builds a model around converted params (the pure dict of `nnx.state(model, nnx.Param)`);
  nothing is randomly initialised."""
  graphdef, state = nnx.split(nnx.eval_shape(
      lambda: HunyuanVideoTransformer3DModel(config, rngs=nnx.Rngs(0))))
  try:
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  except (ValueError, KeyError) as e:
    raise ValueError(f"params do not fit a HunyuanVideo transformer of this config: {e}") from e
  return nnx.merge(graphdef, state)


def load_pretrained(path: str, *, dtype: str | None = None, param_dtype: str | None = None,
                    attention_impl: str | None = None, shardings: Any = None
                    ) -> HunyuanVideoTransformer3DModel:
  """Builds the transformer from a checkpoint of `python -m checkpoints_convert hunyuan`.

  The config comes from the checkpoint's metadata; `dtype` / `param_dtype` / `attention_impl`
  override its compute dtype, parameter dtype (default: as stored) and attention implementation.
  `shardings` (one `jax.sharding.Sharding` or a matching tree) places each array as it is read.
  """
  from astraea_jax import checkpoint  # pylint: disable=import-outside-toplevel

  meta = checkpoint.read_metadata(path)
  if meta.get("family") != "hunyuan":
    raise ValueError(f"{path}: checkpoint of family {meta.get('family')!r}, not a HunyuanVideo "
                     f"transformer")
  config = HunyuanConfig.from_dict(meta["config"])
  overrides = {k: v for k, v in (("dtype", dtype), ("param_dtype", param_dtype),
                                 ("attention_impl", attention_impl)) if v is not None}
  config = dataclasses.replace(config, **overrides)
  graphdef, abstract = nnx.split(nnx.eval_shape(
      lambda: HunyuanVideoTransformer3DModel(config, rngs=nnx.Rngs(0))))
  state = checkpoint.load_params(path, abstract, shardings=shardings)
  return nnx.merge(graphdef, state)
