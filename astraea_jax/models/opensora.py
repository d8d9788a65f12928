"""OpenSora v1.2 STDiT3 (spatial-temporal DiT) in Flax NNX.

Ports `STDiT3` of Open-Sora v1.2 (hpcaitech/Open-Sora, branch opensora/v1.2, tag v1.2.0:
opensora/models/stdit/stdit3.py and opensora/models/layers/blocks.py; Zheng et al., "Open-Sora:
Democratizing Efficient Video Production for All", arXiv 2412.20404), a PixArt-style DiT that
alternates spatial and temporal blocks:

  x_embedder    Conv3d patch embedding (kernel = stride = patch, zero padding at the end of T, Y,
                X) plus a 2D sin-cos position embedding of the patch grid, the same for every
                frame, scaled by the pixel resolution (`scale = sqrt(height*width) / input_sq_size`,
                `base_size = round(sqrt(y * x))`);
  t_embedder    sinusoidal timestep embedding (cos first, 256 channels) + MLP, plus the fps
  fps_embedder  embedding (same sinusoid, own MLP): t [B, C];
  t_block       SiLU + linear: the 6-way modulation t_mlp [B, 6C] shared by every block;
  y_embedder    caption MLP (GELU tanh) on the T5 features; its `y_embedding` is the null caption;
  blocks        `depth` pairs (spatial block, temporal block). Each block: adaLN-modulated
                self-attention (per-head LlamaRMSNorm on q and k), un-normalised cross-attention to
                the valid text tokens of its own sample, adaLN-modulated GELU-tanh MLP. Only the
                temporal blocks apply RoPE (interleaved channel pairs, rotary_embedding_torch), over
                the frame index after the q/k norm;
  final_layer   LayerNorm, 2-way modulation from t (not t_mlp), linear, unpatchify and crop.

Token layout. The token grid is `(t, y, x)` (latent T, Y, X padded and divided by the patch).
Between blocks the video tokens are `x [B, N, C]` with `N = t * y * x`, frame-major, row-major
within a frame. A spatial block attends within each frame, on `[B*t, y*x, C]` (the reference's
`[B*T, S, C]`, S patches per frame); a temporal block attends along time at each patch position,
on `[B*y*x, t, C]` (`[B*S, T, C]`; the tokens are transposed patch-major for the attention only).
Modulation, cross-attention and the MLP act per token. `embed`, `run_blocks` and `head` run the
three stages separately.

Selected rows (ASTRAEA, arXiv 2506.05096, Sec. 3: `astraea_jax.acceleration.opensora_astraea`). A
block called with `select=positions [B, K]` computes only the tokens at K patch positions of the
frame grid, in every frame (t*K rows per sample, frame-major), and with `return_lse=True` also
returns their self-attention log-sum-exp. A spatial block projects queries for those rows only and
keys/values for all y*x positions of each frame; a temporal block attends along a position's own
frames, so the selected positions form a self-contained sub-video and the block runs on it as it
would densely. Either way the computed rows equal the dense block's rows; the dense path
(`select=None`, no LSE) is unchanged.

Frame mask (`x_mask [B, t]` bool, image/video conditioning): frames where it is False are modulated
(in every block and in the head) with the embedding of timestep 0 instead of the sample's timestep.
The head reproduces a quirk of the reference: for those frames it normalises and modulates the
output of the first modulation again, instead of the block output.

Attribute names mirror the released checkpoint (`spatial_blocks.attn.qkv`, `cross_attn.kv_linear`,
`y_embedder.y_proj.fc1`, ...), so conversion (`checkpoints_convert.opensora`) is a rename table
plus layout rules; the renames are `mlp.0 -> linear_1`, `mlp.2 -> linear_2` (time and fps MLPs),
`t_block.1 -> t_block`, and `weight -> kernel | scale`. The spatial and the temporal blocks are two
stacks with a leading layer axis L, run together with `nnx.scan`.

Precision: the timestep and fps embeddings, the modulation tables and their arithmetic, the norms,
the position embedding and RoPE run in fp32; the projections, attention and MLPs in `config.dtype`.
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
from astraea_jax.models.wan import PatchEmbed, RMSNorm, apply_rope, layer_norm, sinusoidal_embedding

F32 = jnp.float32

__all__ = [
    "OPENSORA_PRESETS",
    "STDiT3",
    "STDiT3Config",
    "STDiT3Conditioning",
    "load_pretrained",
    "position_embedding_2d",
    "rope_frequencies",
    "take_positions",
]


@dataclasses.dataclass(frozen=True)
class STDiT3Config(PresetConfig):
  """STDiT3 hyper-parameters, named as the reference's `STDiT3Config`.

  `pred_sigma` doubles the output channels (velocity, then a variance half that samplers drop);
  `freq_dim` is the sinusoid width of the timestep and fps embeddings; `eps` is the LayerNorm and
  RMSNorm epsilon. `param_dtype` is the storage dtype of the large weights (the time/fps embeddings,
  the modulation tables, the norm scales, the null caption and the RoPE frequencies stay fp32);
  `dtype` is the compute dtype; `attention_impl` is passed to `astraea_jax.models.attention`.
  """
  patch_size: tuple[int, int, int] = (1, 2, 2)
  in_channels: int = 4
  hidden_size: int = 1152
  depth: int = 28
  num_heads: int = 16
  mlp_ratio: float = 4.0
  pred_sigma: bool = True
  caption_channels: int = 4096
  model_max_length: int = 300
  qk_norm: bool = True
  input_sq_size: int = 512
  freq_dim: int = 256
  eps: float = 1e-6
  param_dtype: str = "bfloat16"
  dtype: str = "bfloat16"
  attention_impl: str | None = None

  def __post_init__(self):
    set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen dataclass)
    try:
      set_("patch_size", tuple(int(p) for p in self.patch_size))
    except TypeError:
      raise ValueError(f"patch_size={self.patch_size!r} must be three positive ints") from None
    set_("param_dtype", jnp.dtype(self.param_dtype).name)
    set_("dtype", jnp.dtype(self.dtype).name)
    if len(self.patch_size) != 3 or min(self.patch_size) < 1:
      raise ValueError(f"patch_size={self.patch_size} must be three positive ints (t, y, x)")
    for name in ("in_channels", "hidden_size", "depth", "num_heads", "caption_channels",
                 "model_max_length", "input_sq_size", "freq_dim"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive int")
    for name in ("pred_sigma", "qk_norm"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"{name}={getattr(self, name)!r} must be a bool")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"num_heads={self.num_heads} must divide hidden_size={self.hidden_size}")
    if self.head_dim % 2:
      raise ValueError(f"head dim {self.head_dim} must be even (RoPE rotates channel pairs)")
    if self.hidden_size % 4:
      raise ValueError(f"hidden_size={self.hidden_size} must be a multiple of 4 (the 2D position "
                       "embedding has sin and cos halves per axis)")
    if self.freq_dim % 2:
      raise ValueError(f"freq_dim={self.freq_dim} must be even")
    if not (isinstance(self.mlp_ratio, (int, float)) and math.isfinite(self.mlp_ratio)
            and self.mlp_hidden >= 1):
      raise ValueError(f"mlp_ratio={self.mlp_ratio!r} must be a finite number giving an MLP width "
                       ">= 1")
    if not (isinstance(self.eps, (int, float)) and self.eps > 0):
      raise ValueError(f"eps={self.eps!r} must be positive")
    for name in ("param_dtype", "dtype"):
      if not jnp.issubdtype(jnp.dtype(getattr(self, name)), jnp.floating):
        raise ValueError(f"{name}={getattr(self, name)!r} must be a floating-point dtype")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def out_channels(self) -> int:
    return 2 * self.in_channels if self.pred_sigma else self.in_channels

  @property
  def mlp_hidden(self) -> int:
    return int(self.hidden_size * self.mlp_ratio)

  family = "OpenSora"

  @classmethod
  def presets(cls) -> dict[str, STDiT3Config]:
    return OPENSORA_PRESETS


OPENSORA_PRESETS: dict[str, STDiT3Config] = {
    # Tests: the golden data's configuration (tests/goldens/opensora_v1_2/config.json), fp32.
    "tiny": STDiT3Config(patch_size=(1, 2, 2), in_channels=4, hidden_size=48, depth=2,
                         num_heads=2, mlp_ratio=4.0, caption_channels=16, model_max_length=8,
                         qk_norm=True, input_sq_size=512, param_dtype="float32",
                         dtype="float32"),
    # hpcai-tech/OpenSora-STDiT-v3 (STDiT3-XL/2, 1.1B parameters), T5-XXL captions of 300 tokens.
    "opensora-v1.2": STDiT3Config(patch_size=(1, 2, 2), in_channels=4, hidden_size=1152,
                                  depth=28, num_heads=16, mlp_ratio=4.0, caption_channels=4096,
                                  model_max_length=300, qk_norm=True, input_sq_size=512),
}


class Buffer(nnx.Variable):
  """An array saved with the parameters but not trained (the reference's buffers and frozen
  parameters: the null caption, the RoPE frequencies)."""


@flax.struct.dataclass
class STDiT3Conditioning:
  """Per-step conditioning shared by every block (output of `STDiT3.embed`).

  Attributes:
    t: `[B, C]` fp32, timestep + fps embedding (the head's modulation input).
    t0: `[B, C]` fp32, the same at timestep 0, or None without a frame mask.
    t_mlp: `[B, t', 6, C]` fp32, the blocks' shared 6-way modulation per frame: t' = 1 without a
      frame mask, else t' = t with the timestep-0 rows where `x_mask` is False.
    x_mask: `[B, t]` bool frame mask, or None.
    context: `[B, M, C]` projected caption tokens in the compute dtype.
    context_mask: `[B, M]` bool, True for the caption tokens each sample attends to.
    rope_cos, rope_sin: `[t, D/2]` fp32, the temporal RoPE angle of every frame and channel pair.
    grid: `(t, y, x)` token grid after padding and patchifying (static).
    input_size: `(T, Y, X)` latent size before padding, restored by `head` (static).
  """
  t: jax.Array
  t0: jax.Array | None
  t_mlp: jax.Array
  x_mask: jax.Array | None
  context: jax.Array
  context_mask: jax.Array
  rope_cos: jax.Array
  rope_sin: jax.Array
  grid: tuple[int, int, int] = flax.struct.field(pytree_node=False)
  input_size: tuple[int, int, int] = flax.struct.field(pytree_node=False)


# ----------------------------------------------------------------------------------------------
# Embeddings


def _linear(din: int, dout: int, *, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(din, dout, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def _gelu_tanh(x: jax.Array) -> jax.Array:
  return jax.nn.gelu(x, approximate=True)


def position_embedding_2d(rows: int, cols: int, dim: int, scale: jax.Array | float,
                          base_size: int) -> jax.Array:
  """The reference's `PositionEmbedding2D` of a `rows x cols` patch grid: `[rows*cols, dim]` fp32.

  Coordinates are `arange(n) / scale * base_size / n` per axis; each is embedded as
  `[sin(p f), cos(p f)]` with `f_i = 10000^(-2i / (dim/2))`, the column (x) coordinate in the first
  half of the channels and the row (y) coordinate in the second. Tokens are row-major.
  """
  half = dim // 2
  inv_freq = 1.0 / (10000.0 ** (jnp.arange(0, half, 2, dtype=F32) / half))  # [dim/4]
  scale = jnp.asarray(scale, F32)

  def axis(n: int) -> jax.Array:  # [n, dim/2]
    pos = jnp.arange(n, dtype=F32) / scale * np.float32(base_size / n)
    ang = pos[:, None] * inv_freq[None, :]
    return jnp.concatenate([jnp.sin(ang), jnp.cos(ang)], axis=-1)

  emb_y, emb_x = axis(rows), axis(cols)
  emb_x = jnp.broadcast_to(emb_x[None, :, :], (rows, cols, half))
  emb_y = jnp.broadcast_to(emb_y[:, None, :], (rows, cols, half))
  return jnp.concatenate([emb_x, emb_y], axis=-1).reshape(rows * cols, dim)


def rope_frequencies(head_dim: int) -> np.ndarray:
  """RoPE inverse frequencies `10000^(-2i / D)`, `[D/2]` fp32 (rotary_embedding_torch's "lang")."""
  return (1.0 / (10000.0 ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))
          ).astype(np.float32)


class TimestepEmbedder(nnx.Module):
  """Sinusoid (cos, sin) -> linear_1 -> SiLU -> linear_2, fp32: `[B]` -> `[B, C]` (the
  reference's `TimestepEmbedder`; its `SizeEmbedder` for fps is the same computation)."""

  def __init__(self, hidden: int, freq_dim: int, *, rngs: nnx.Rngs):
    self.freq_dim = freq_dim
    self.linear_1 = _linear(freq_dim, hidden, dtype=F32, param_dtype=F32, rngs=rngs)
    self.linear_2 = _linear(hidden, hidden, dtype=F32, param_dtype=F32, rngs=rngs)

  def __call__(self, t: jax.Array) -> jax.Array:
    return self.linear_2(jax.nn.silu(self.linear_1(sinusoidal_embedding(t, self.freq_dim))))


class Mlp(nnx.Module):
  """fc1 -> GELU (tanh) -> fc2 (timm's `Mlp`, as the reference builds it)."""

  def __init__(self, din: int, hidden: int, dout: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.fc1 = _linear(din, hidden, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc2 = _linear(hidden, dout, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(_gelu_tanh(self.fc1(x)))


class CaptionEmbedder(nnx.Module):
  """Caption MLP `y_proj` and the learned null caption `y_embedding [M, C_text]` used for CFG."""

  def __init__(self, config: STDiT3Config, *, rngs: nnx.Rngs):
    c, cd, pd = config.hidden_size, config.dtype, config.param_dtype
    self.y_proj = Mlp(config.caption_channels, c, c, dtype=cd, param_dtype=pd, rngs=rngs)
    self.y_embedding = Buffer(
        jax.random.normal(rngs.params(), (config.model_max_length, config.caption_channels), F32)
        / math.sqrt(config.caption_channels))

  def __call__(self, y: jax.Array) -> jax.Array:
    return self.y_proj(y)


class PatchEmbed3D(nnx.Module):
  """Zero-pads `[B, C_in, T, Y, X]` at the end to multiples of the patch, then `proj` (Conv3d)."""

  def __init__(self, config: STDiT3Config, *, rngs: nnx.Rngs):
    self.patch = config.patch_size
    self.proj = PatchEmbed(config.in_channels, config.hidden_size, config.patch_size,
                           dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    pad = [(0, 0), (0, 0)] + [(0, -n % p) for n, p in zip(x.shape[2:], self.patch)]
    return self.proj(jnp.pad(x, pad))  # [B, N, C]


class RotaryEmbedding(nnx.Module):
  """The temporal RoPE's inverse frequencies `freqs [D/2]` (a checkpoint tensor upstream)."""

  def __init__(self, head_dim: int):
    self.freqs = Buffer(jnp.asarray(rope_frequencies(head_dim)))

  def tables(self, num_frames: int) -> tuple[jax.Array, jax.Array]:
    """cos / sin of `frame * freqs[i]`, `[t, D/2]` fp32."""
    ang = jnp.arange(num_frames, dtype=F32)[:, None] * self.freqs[...].astype(F32)[None, :]
    return jnp.cos(ang), jnp.sin(ang)


# ----------------------------------------------------------------------------------------------
# Blocks


class Attention(nnx.Module):
  """Self-attention: fused `qkv` (column layout (3, H, D)), per-head RMSNorm on q and k, then
  optional RoPE, `proj`."""

  def __init__(self, config: STDiT3Config, *, rngs: nnx.Rngs):
    c, cd, pd = config.hidden_size, config.dtype, config.param_dtype
    self.heads = config.num_heads
    self.impl = config.attention_impl
    self.qkv = _linear(c, 3 * c, dtype=cd, param_dtype=pd, rngs=rngs)
    if config.qk_norm:
      self.q_norm = RMSNorm(config.head_dim, eps=config.eps)
      self.k_norm = RMSNorm(config.head_dim, eps=config.eps)
    else:
      self.q_norm = self.k_norm = None
    self.proj = _linear(c, c, dtype=cd, param_dtype=pd, rngs=rngs)

  def project_qkv(self, x: jax.Array, rope: tuple[jax.Array, jax.Array] | None = None
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x `[B', N', C]` -> q, k, v `[B', N', H, D]`; rope: `(cos, sin)` `[N', D/2]`, or None."""
    b, s, _ = x.shape
    q, k, v = jnp.moveaxis(self.qkv(x).reshape(b, s, 3, self.heads, -1), 2, 0)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    if rope is not None:
      q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    return q, k, v

  def _columns(self, x: jax.Array, part: int, parts: int) -> jax.Array:
    """`parts` consecutive thirds of `qkv`, from third `part` on: one matmul on the sliced weights,
    so that rows that only need keys and values (or only queries) pay for nothing else."""
    layer, c = self.qkv, self.qkv.in_features
    dt = layer.dtype or x.dtype
    w = layer.kernel[...][:, part * c:(part + parts) * c].astype(dt)  # [C, parts*C]
    y = jnp.dot(x.astype(dt), w, precision=layer.precision)
    return y + layer.bias[...][part * c:(part + parts) * c].astype(dt)

  def project_q(self, x: jax.Array) -> jax.Array:
    """x `[B', N', C]` -> q `[B', N', H, D]` (normed, no RoPE)."""
    b, s, _ = x.shape
    q = self._columns(x, 0, 1).reshape(b, s, self.heads, -1)
    return self.q_norm(q) if self.q_norm is not None else q

  def project_kv(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x `[B', N', C]` -> k, v `[B', N', H, D]` (k normed, no RoPE)."""
    b, s, _ = x.shape
    k, v = jnp.moveaxis(self._columns(x, 1, 2).reshape(b, s, 2, self.heads, -1), 2, 0)
    return (self.k_norm(k) if self.k_norm is not None else k), v

  def output(self, o: jax.Array) -> jax.Array:
    return self.proj(o.reshape(*o.shape[:2], -1))  # [B', N', H, D] -> [B', N', C]

  def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, return_lse: bool
             ) -> tuple[jax.Array, jax.Array | None]:
    """`(out [B', S', H, D], lse [B', H, S'] fp32 or None)`."""
    if return_lse:
      # Model-level names ("xla", ...) leave the LSE kernel to pick its own implementation.
      o, lse = attention_lib.attention_with_lse(q, k, v, implementation=self.impl)
      return o.astype(q.dtype), lse.astype(F32)
    return attention_lib.attention(q, k, v, implementation=self.impl), None

  def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array] | None = None, *,
               return_lse: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
    """x `[B', N', C]` -> `[B', N', C]`, and with `return_lse` the LSE `[B', H, N']` fp32."""
    q, k, v = self.project_qkv(x, rope)
    o, lse = self.attend(q, k, v, return_lse)
    out = self.output(o)
    return (out, lse) if return_lse else out


class MultiHeadCrossAttention(nnx.Module):
  """Video tokens attend to their own sample's valid caption tokens; `kv_linear` columns are laid
  out (2, H, D). No norms."""

  def __init__(self, config: STDiT3Config, *, rngs: nnx.Rngs):
    c, cd, pd = config.hidden_size, config.dtype, config.param_dtype
    self.heads = config.num_heads
    self.impl = config.attention_impl
    self.q_linear = _linear(c, c, dtype=cd, param_dtype=pd, rngs=rngs)
    self.kv_linear = _linear(c, 2 * c, dtype=cd, param_dtype=pd, rngs=rngs)
    self.proj = _linear(c, c, dtype=cd, param_dtype=pd, rngs=rngs)

  def __call__(self, x: jax.Array, context: jax.Array, context_mask: jax.Array) -> jax.Array:
    """x `[B, N, C]`, context `[B, M, C]`, context_mask `[B, M]` bool -> `[B, N, C]`."""
    b, n, _ = x.shape
    q = self.q_linear(x).reshape(b, n, self.heads, -1)  # [B, N, H, D]
    k, v = jnp.moveaxis(self.kv_linear(context).reshape(b, context.shape[1], 2, self.heads, -1),
                        2, 0)  # [B, M, H, D] each
    # The caption mask is a prefix (tokenizer padding at the end): a key length every
    # implementation runs natively, as the original's per-sample sequence lengths.
    kv_len = jnp.sum(context_mask.astype(jnp.int32), axis=1)  # [B]
    o = attention_lib.attention(q, k, v, kv_len=kv_len, implementation=self.impl)
    return self.proj(o.reshape(b, n, -1))


class STDiT3Block(nnx.Module):
  """One spatial or temporal block: modulated self-attention, cross-attention, modulated MLP."""

  def __init__(self, config: STDiT3Config, *, temporal: bool, rngs: nnx.Rngs):
    c = config.hidden_size
    self.temporal = temporal
    self.eps = config.eps
    self.attn = Attention(config, rngs=rngs)
    self.cross_attn = MultiHeadCrossAttention(config, rngs=rngs)
    self.mlp = Mlp(c, config.mlp_hidden, c, dtype=config.dtype, param_dtype=config.param_dtype,
                   rngs=rngs)
    self.scale_shift_table = nnx.Param(
        jax.random.normal(rngs.params(), (6, c), F32) / math.sqrt(c))

  def self_attention(self, h: jax.Array, cond: STDiT3Conditioning, *, return_lse: bool = False
                     ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """h `[B, t, S, C]` (modulated, S positions) -> attention output, same shape: within each frame
    on `[B*t, S, C]` (spatial), or along time at each position on `[B*S, t, C]` with RoPE
    (temporal). With `return_lse` also the LSE `[B, H, t*S]` fp32, frame-major like the tokens."""
    b, t, s, c = h.shape
    if self.temporal:
      res = self.attn(h.transpose(0, 2, 1, 3).reshape(b * s, t, c),
                      (cond.rope_cos, cond.rope_sin), return_lse=return_lse)
      o, lse = res if return_lse else (res, None)
      o = o.reshape(b, s, t, c).transpose(0, 2, 1, 3)
      if not return_lse:
        return o
      return o, lse.reshape(b, s, -1, t).transpose(0, 2, 3, 1).reshape(b, -1, t * s)
    res = self.attn(h.reshape(b * t, s, c), return_lse=return_lse)
    if not return_lse:
      return res.reshape(b, t, s, c)
    o, lse = res
    return o.reshape(b, t, s, c), _frame_major(lse, b, t)

  def _selected_spatial_attention(self, h: jax.Array, positions: jax.Array, return_lse: bool
                                  ) -> tuple[jax.Array, jax.Array | None]:
    """Queries of the selected positions against keys/values of every position of their frame.

    h `[B, t, S, C]`, positions `[B, K]` -> `(out [B, t, K, C], lse [B, H, t*K] fp32 or None)`.
    """
    b, t, s, c = h.shape
    k, v = self.attn.project_kv(h.reshape(b * t, s, c))  # [B*t, S, H, D]
    q = self.attn.project_q(take_positions(h, positions).reshape(b * t, -1, c))  # [B*t, K, H, D]
    o, lse = self.attn.attend(q, k, v, return_lse)
    o = self.attn.output(o).reshape(b, t, -1, c)
    return o, (None if lse is None else _frame_major(lse, b, t))

  def __call__(self, x: jax.Array, cond: STDiT3Conditioning, *, select: jax.Array | None = None,
               return_lse: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Runs the block on all N tokens, or on the tokens at the positions named by `select`.

    Args:
      x: `[B, N, C]` full-length block input (N = t*y*x, frame-major, compute dtype).
      cond: the step's `STDiT3Conditioning`.
      select: None (dense), or `[B, K]` int32 patch positions per sample (indices into the y*x
        positions of a frame, distinct within a row): only the tokens at those positions, in every
        frame, are computed, and they equal the dense block's tokens.
      return_lse: also return the self-attention log-sum-exp of the computed tokens.

    Returns:
      `out [B, N, C]`, or with `select` `[B, t*K, C]` whose row `f*K + j` is frame f at position
      `select[b, j]`; in x's dtype. With `return_lse` also `lse [B, H, N or t*K]` fp32, same rows.
    """
    b, n, c = x.shape
    t = cond.grid[0]
    dt = x.dtype
    # Per-frame modulation: with a frame mask, masked frames take the timestep-0 rows (t' = t).
    mod = self.scale_shift_table[...] + cond.t_mlp  # [B, t', 6, C] fp32
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
        mod[:, :, None, i] for i in range(6))  # [B, t', 1, C]
    x = x.reshape(b, t, n // t, c)  # [B, t, y*x, C]
    if select is not None:
      select = select.astype(jnp.int32)
      if self.temporal:
        # Temporal attention never leaves a position: the selected positions, in all frames, are a
        # video of their own, and everything below runs on it as on the full one.
        x = take_positions(x, select)  # [B, t, K, C]

    h = (layer_norm(x, self.eps) * (1 + scale_msa) + shift_msa).astype(dt)
    if select is not None and not self.temporal:
      x = take_positions(x, select)  # [B, t, K, C]
      a, lse = self._selected_spatial_attention(h, select, return_lse)
    elif return_lse:
      a, lse = self.self_attention(h, cond, return_lse=True)
    else:
      a, lse = self.self_attention(h, cond), None
    x = (x.astype(F32) + a.astype(F32) * gate_msa).astype(dt)

    # Cross-attention reads the raw residual stream: no norm, modulation or gate.
    ca = self.cross_attn(x.reshape(b, -1, c), cond.context, cond.context_mask)
    x = (x.astype(F32) + ca.reshape(x.shape).astype(F32)).astype(dt)

    h = (layer_norm(x, self.eps) * (1 + scale_mlp) + shift_mlp).astype(dt)
    m = self.mlp(h)
    x = (x.astype(F32) + m.astype(F32) * gate_mlp).astype(dt)
    out = x.reshape(b, -1, c)
    return (out, lse) if return_lse else out


def take_positions(x: jax.Array, positions: jax.Array) -> jax.Array:
  """`x [B, t, S, ...]`, `positions [B, K]` -> `x[b, :, positions[b]]`, `[B, t, K, ...]`."""
  return jax.vmap(lambda xb, pb: xb[:, pb])(x, positions)


def _frame_major(lse: jax.Array, b: int, t: int) -> jax.Array:
  """Per-frame LSE `[B*t, H, S]` -> `[B, H, t*S]`, in the tokens' frame-major order."""
  s = lse.shape[-1]
  return lse.reshape(b, t, -1, s).transpose(0, 2, 1, 3).reshape(b, -1, t * s)


class T2IFinalLayer(nnx.Module):
  """LayerNorm + 2-way modulation from t + `linear` to `pt*py*px*C_out` features per token."""

  def __init__(self, config: STDiT3Config, *, rngs: nnx.Rngs):
    c = config.hidden_size
    self.eps = config.eps
    self.linear = _linear(c, math.prod(config.patch_size) * config.out_channels,
                          dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)
    self.scale_shift_table = nnx.Param(
        jax.random.normal(rngs.params(), (2, c), F32) / math.sqrt(c))

  def _modulate(self, x: jax.Array, t: jax.Array) -> jax.Array:
    mod = self.scale_shift_table[...][None] + t[:, None, :]  # [B, 2, C]
    shift, scale = mod[:, None, None, 0], mod[:, None, None, 1]  # [B, 1, 1, C]
    return layer_norm(x, self.eps) * (1 + scale) + shift

  def __call__(self, x: jax.Array, cond: STDiT3Conditioning) -> jax.Array:
    """x `[B, t, y*x, C]` -> `[B, t, y*x, pt*py*px*C_out]`."""
    h = self._modulate(x, cond.t)  # fp32
    if cond.x_mask is not None:
      # The reference modulates the masked frames from the already modulated h, not from x.
      h0 = self._modulate(h, cond.t0)
      h = jnp.where(cond.x_mask[:, :, None, None], h, h0)
    return self.linear(h.astype(x.dtype))


# ----------------------------------------------------------------------------------------------
# Model


class STDiT3(nnx.Module):
  """OpenSora v1.2 STDiT3: `embed` -> scanned (spatial, temporal) `run_blocks` -> `head`.

  `__call__(x [B, C_in, T, Y, X], timestep [B], y [B, 1, M, C_text], mask [B, M] | None,
  x_mask [B, t] | None, fps [B], height, width)` returns `[B, C_out, T, Y, X]` fp32, like the
  reference's `STDiT3.forward`.
  """

  def __init__(self, config: STDiT3Config, *, rngs: nnx.Rngs):
    self.config = config
    c = config.hidden_size
    self.x_embedder = PatchEmbed3D(config, rngs=rngs)
    self.t_embedder = TimestepEmbedder(c, config.freq_dim, rngs=rngs)
    self.fps_embedder = TimestepEmbedder(c, config.freq_dim, rngs=rngs)
    self.t_block = _linear(c, 6 * c, dtype=F32, param_dtype=F32, rngs=rngs)
    self.y_embedder = CaptionEmbedder(config, rngs=rngs)
    self.rope = RotaryEmbedding(config.head_dim)

    def stack(temporal: bool) -> STDiT3Block:
      @nnx.split_rngs(splits=config.depth)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def make(rngs: nnx.Rngs) -> STDiT3Block:
        return STDiT3Block(config, temporal=temporal, rngs=rngs)

      return make(rngs)

    self.spatial_blocks = stack(False)
    self.temporal_blocks = stack(True)
    self.final_layer = T2IFinalLayer(config, rngs=rngs)

  def grid(self, x_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """Token grid `(t, y, x)` of latents `[B, C_in, T, Y, X]` after padding to the patch."""
    if len(x_shape) != 5:
      raise ValueError(f"x must be [B, C_in, T, Y, X], got shape {tuple(x_shape)}")
    if x_shape[1] != self.config.in_channels:
      raise ValueError(f"x has {x_shape[1]} channels, the model expects "
                       f"in_channels={self.config.in_channels}")
    if min(x_shape[2:]) < 1:
      raise ValueError(f"x has an empty T, Y or X axis: shape {tuple(x_shape)}")
    return tuple(-(-n // p) for n, p in zip(x_shape[2:], self.config.patch_size))

  def null_caption(self, batch: int) -> jax.Array:
    """The unconditional caption `[batch, 1, M, C_text]` (the reference text encoder's `null`)."""
    y = self.y_embedder.y_embedding[...]
    return jnp.broadcast_to(y[None, None], (batch, 1, *y.shape))

  def embed(self, x: jax.Array, timestep: jax.Array, y: jax.Array, mask: jax.Array | None = None,
            x_mask: jax.Array | None = None, fps: jax.Array | float | None = None,
            height: jax.Array | float | None = None, width: jax.Array | float | None = None
            ) -> tuple[jax.Array, STDiT3Conditioning]:
    """Patch, time, fps and caption embeddings.

    Args:
      x: `[B, C_in, T, Y, X]` latents (any size: Y, X, T are zero-padded to the patch).
      timestep: `[B]` or a scalar, in [0, 1000].
      y: `[B, 1, M, C_text]` (or `[B, M, C_text]`) caption features.
      mask: `[B', M]` caption mask (nonzero = valid token); B' divides B (tiled, as the reference
        does under CFG). None: all M tokens are valid.
      x_mask: `[B, t]` bool frame mask (token frames), or None.
      fps: `[B]`, `[1]` or a scalar frame rate.
      height, width: pixel size of the video (`[B]` or scalars; only the first entry is read), for
        the position embedding's scale.

    Returns:
      tokens `x [B, N, C]` (compute dtype, frame-major) and the step's `STDiT3Conditioning`.
    """
    cfg = self.config
    grid = self.grid(x.shape)
    b = x.shape[0]
    tt, yy, xx = grid
    if fps is None or height is None or width is None:
      raise ValueError("fps, height and width are required (the fps embedding and the position "
                       "embedding's resolution scale depend on them)")
    timestep = jnp.asarray(timestep)
    if timestep.ndim == 0:
      timestep = jnp.broadcast_to(timestep, (b,))
    if timestep.shape != (b,):
      raise ValueError(f"timestep must be a scalar or [B={b}], got shape {tuple(timestep.shape)}")
    if y.ndim == 4:
      if y.shape[1] != 1:
        raise ValueError(f"y must be [B, 1, M, C_text], got shape {tuple(y.shape)}")
      y = y[:, 0]
    if y.ndim != 3 or y.shape[0] != b or y.shape[2] != cfg.caption_channels:
      raise ValueError(f"y must be [B={b}, 1, M, caption_channels={cfg.caption_channels}], got "
                       f"shape {tuple(y.shape)}")
    num_text = y.shape[1]
    fps = jnp.atleast_1d(jnp.asarray(fps)).reshape(-1)
    if b % fps.shape[0]:
      raise ValueError(f"fps has {fps.shape[0]} entries, which does not divide the batch {b}")
    fps = jnp.tile(fps, b // fps.shape[0])

    # Position embedding: resolution scale and grid size as the reference computes them.
    height = jnp.atleast_1d(jnp.asarray(height)).reshape(-1)[0].astype(F32)
    width = jnp.atleast_1d(jnp.asarray(width)).reshape(-1)[0].astype(F32)
    scale = jnp.sqrt(height * width) / np.float32(cfg.input_sq_size)
    base_size = int(round((yy * xx) ** 0.5))
    pos = position_embedding_2d(yy, xx, cfg.hidden_size, scale, base_size)  # [y*x, C]

    tokens = self.x_embedder(x)  # [B, N, C]
    tokens = tokens.reshape(b, tt, yy * xx, -1).astype(F32) + pos
    tokens = tokens.reshape(b, tt * yy * xx, -1).astype(cfg.dtype)

    # The reference casts the timestep to the model dtype before embedding it; its bf16 inference
    # thus sees timesteps rounded to bf16 (a spacing of 4 near t = 1000), which this reproduces.
    timestep = timestep.astype(cfg.dtype)
    fps_emb = self.fps_embedder(fps)  # [B, C]
    t = self.t_embedder(timestep) + fps_emb  # [B, C]
    t_mlp = self.t_block(jax.nn.silu(t)).reshape(b, 1, 6, -1)  # [B, 1, 6, C]
    t0 = None
    if x_mask is not None:
      x_mask = jnp.asarray(x_mask)
      if x_mask.shape != (b, tt):
        raise ValueError(f"x_mask must be [B={b}, t={tt}] (token frames), got shape "
                         f"{tuple(x_mask.shape)}")
      x_mask = x_mask.astype(bool)
      t0 = self.t_embedder(jnp.zeros_like(timestep)) + fps_emb
      t0_mlp = self.t_block(jax.nn.silu(t0)).reshape(b, 1, 6, -1)
      t_mlp = jnp.where(x_mask[:, :, None, None], t_mlp, t0_mlp)  # [B, t, 6, C]

    if mask is None:
      context_mask = jnp.ones((b, num_text), bool)
    else:
      mask = jnp.asarray(mask)
      if mask.ndim != 2 or mask.shape[1] != num_text or b % mask.shape[0]:
        raise ValueError(f"mask must be [B', M={num_text}] with B' dividing B={b}, got shape "
                         f"{tuple(mask.shape)}")
      context_mask = jnp.tile(mask != 0, (b // mask.shape[0], 1))  # [B, M]
    context = self.y_embedder(y.astype(cfg.dtype))  # [B, M, C]

    cos, sin = self.rope.tables(tt)
    cond = STDiT3Conditioning(t=t, t0=t0, t_mlp=t_mlp, x_mask=x_mask, context=context,
                              context_mask=context_mask, rope_cos=cos, rope_sin=sin, grid=grid,
                              input_size=tuple(x.shape[2:]))
    return tokens, cond

  def run_blocks(self, x: jax.Array, cond: STDiT3Conditioning) -> jax.Array:
    """All `depth` (spatial, temporal) block pairs, scanned over the stacked layer axis."""

    @nnx.scan(in_axes=(0, 0, nnx.Carry, None), out_axes=nnx.Carry)
    def body(spatial: STDiT3Block, temporal: STDiT3Block, x: jax.Array,
             cond: STDiT3Conditioning) -> jax.Array:
      return temporal(spatial(x, cond), cond)

    return body(self.spatial_blocks, self.temporal_blocks, x, cond)

  def head(self, x: jax.Array, cond: STDiT3Conditioning) -> jax.Array:
    """Final layer, unpatchify and crop: `[B, N, C] -> [B, C_out, T, Y, X]` (fp32)."""
    b = x.shape[0]
    t, y, w = cond.grid
    pt, py, px = self.config.patch_size
    c_out = self.config.out_channels
    out = self.final_layer(x.reshape(b, t, y * w, -1), cond).astype(F32)  # [B, t, y*x, P*C_out]
    out = out.reshape(b, t, y, w, pt, py, px, c_out)
    out = out.transpose(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, c_out, t * pt, y * py, w * px)
    ti, yi, xi = cond.input_size
    return out[:, :, :ti, :yi, :xi]

  def __call__(self, x: jax.Array, timestep: jax.Array, y: jax.Array,
               mask: jax.Array | None = None, x_mask: jax.Array | None = None,
               fps: jax.Array | float | None = None, height: jax.Array | float | None = None,
               width: jax.Array | float | None = None) -> jax.Array:
    tokens, cond = self.embed(x, timestep, y, mask, x_mask, fps, height, width)
    return self.head(self.run_blocks(tokens, cond), cond)


def load_pretrained(path: str, *, dtype: str | None = None, param_dtype: str | None = None,
                    attention_impl: str | None = None, shardings: Any = None) -> STDiT3:
  """Builds an `STDiT3` from a checkpoint of `python -m checkpoints_convert opensora`.

  The config comes from the checkpoint's metadata; `dtype` / `param_dtype` / `attention_impl`
  override its compute dtype, parameter dtype (default: as stored) and attention implementation.
  `shardings` (one `jax.sharding.Sharding` or a matching tree) places each array as it is read.
  """
  from astraea_jax import checkpoint  # pylint: disable=import-outside-toplevel

  meta = checkpoint.read_metadata(path)
  if meta.get("family") != "opensora":
    raise ValueError(f"{path}: checkpoint of family {meta.get('family')!r}, not an OpenSora STDiT3")
  config = STDiT3Config.from_dict(meta["config"])
  overrides = {k: v for k, v in (("dtype", dtype), ("param_dtype", param_dtype),
                                 ("attention_impl", attention_impl)) if v is not None}
  config = dataclasses.replace(config, **overrides)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: STDiT3(config, rngs=nnx.Rngs(0))))
  state = checkpoint.load_params(path, abstract, shardings=shardings)
  return nnx.merge(graphdef, state)
