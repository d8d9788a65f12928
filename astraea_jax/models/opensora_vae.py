"""The OpenSora v1.2 video VAE (decoder path) in Flax NNX.

Ports `VideoAutoencoderPipeline` / `OpenSoraVAE_V1_2` of Open-Sora v1.2 (hpcaitech/Open-Sora, tag
v1.2.0: opensora/models/vae/vae.py and vae_temporal.py), released as hpcai-tech/OpenSora-VAE-v1.2.
It stacks two autoencoders:

  spatial   the SDXL VAE (diffusers `AutoencoderKL`, PixArt-Sigma's copy), applied to every frame on
            its own: 8x spatial compression, 4 latent channels. OpenSora's `VideoAutoencoderKL`
            divides its input by 0.18215 before `AutoencoderKL.decode` (a constant in its code;
            the 0.13025 of the SDXL VAE's own config is not used).
  temporal  `VAE_Temporal_SD`: a MAGVIT-style 3D conv autoencoder over the spatial latents
            (4 -> 4 channels, 4x temporal compression, no spatial compression). Every conv is a
            `CausalConv3d`: time is padded at the front only, by `dilation*(k_t-1) + (1-stride)`
            zero frames, height and width symmetrically by `k//2` zeros. Upsampling in time is a
            conv to 2x channels followed by depth-to-space (`B (C 2) T H W -> B C (T 2) H W`).
            Decoding `z_t` latent frames gives `4 z_t` frames, of which the first
            `(4 - num_frames % 4) % 4` are dropped.

Decoding (`OpenSoraVAE.decode(z, num_frames)`):

  z = z * scale + shift                               # per channel: OpenSora's latent normalisation
  for each chunk of 5 latent frames (micro_frame_size 17 frames -> 5 latent frames):
    x_z += temporal.decode(chunk, min(17, frames left))   # 17 frames per full chunk
  video = spatial.decode(x_z / 0.18215) frame by frame   # [B, 3, F, 8Y, 8X] in about [-1, 1]

and the latent length of F frames is `5 (F // 17) + ceil((F % 17) / 4)`
(`latent_frames`). The temporal decoder is causal in its convolutions, but its GroupNorms take
statistics over all frames of a chunk, so a decoded frame depends on the whole 5-frame latent chunk
it belongs to, and on nothing outside it.

Layout: modules compute channels-last (`[N, H, W, C]`, `[N, T, H, W, C]`); the public `decode`
takes and returns PyTorch's channels-first layout. Parameter names follow the released checkpoint
(`spatial_vae.module.decoder.up_blocks.0.resnets.1.conv1.weight` ->
`spatial.decoder.up_blocks.0.resnets.1.conv1.kernel`,
`temporal_vae.decoder.conv_blocks.1.conv.weight` -> `temporal.decoder.conv_blocks.1.conv.kernel`),
so `checkpoints_convert.opensora_vae` is a layout rule per tensor. Only the decoders are ported.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

F32 = jnp.float32

__all__ = [
    "FAMILY",
    "OpenSoraVAE",
    "OpenSoraVAEConfig",
    "PRESETS",
    "SpatialVAEConfig",
    "TemporalVAEConfig",
    "decode_jit",
    "latent_frames",
    "load_checkpoint",
]

FAMILY = "opensora_vae"


@dataclasses.dataclass(frozen=True)
class SpatialVAEConfig:
  """diffusers `AutoencoderKL` decoder hyper-parameters (SDXL VAE defaults)."""
  out_channels: int = 3
  latent_channels: int = 4
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  mid_block_add_attention: bool = True

  def __post_init__(self):
    object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
    if not self.block_out_channels or any(
        c < 1 or c % self.norm_num_groups for c in self.block_out_channels):
      raise ValueError(f"block_out_channels={self.block_out_channels} must be positive multiples "
                       f"of norm_num_groups={self.norm_num_groups}")
    for name in ("out_channels", "latent_channels", "layers_per_block", "norm_num_groups"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)} must be positive")

  @property
  def spatial_compression(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)


@dataclasses.dataclass(frozen=True)
class TemporalVAEConfig:
  """`VAE_Temporal` hyper-parameters (`VAE_Temporal_SD` defaults)."""
  in_out_channels: int = 4
  latent_embed_dim: int = 4
  embed_dim: int = 4
  filters: int = 128
  num_res_blocks: int = 4
  channel_multipliers: tuple[int, ...] = (1, 2, 2, 4)
  temporal_downsample: tuple[bool, ...] = (False, True, True)
  num_groups: int = 32

  def __post_init__(self):
    object.__setattr__(self, "channel_multipliers", tuple(int(c) for c in self.channel_multipliers))
    object.__setattr__(self, "temporal_downsample",
                       tuple(bool(t) for t in self.temporal_downsample))
    levels = len(self.channel_multipliers)
    if len(self.temporal_downsample) != levels - 1:
      raise ValueError(f"temporal_downsample needs {levels - 1} entries, got "
                       f"{self.temporal_downsample}")
    if any((self.filters * m) % self.num_groups for m in self.channel_multipliers):
      raise ValueError(f"filters * channel_multipliers must be multiples of num_groups="
                       f"{self.num_groups}")
    for name in ("in_out_channels", "latent_embed_dim", "embed_dim", "filters", "num_res_blocks",
                 "num_groups"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)} must be positive")

  @property
  def temporal_compression(self) -> int:
    return 2 ** sum(self.temporal_downsample)


@dataclasses.dataclass(frozen=True)
class OpenSoraVAEConfig:
  """The whole pipeline: both autoencoders, the chunking and the latent normalisation.

  `shift`/`scale`: per-channel latent normalisation (`z_model = (z - shift) / scale`).
  `spatial_scaling`: OpenSora's factor on the spatial latents (0.18215, hard-coded in vae.py).
  `micro_frame_size`: frames per temporal chunk (17; None decodes all latent frames at once).
  `micro_batch_size`: frames per spatial decoder call (memory only; 4 in OpenSora).
  `dtype` / `param_dtype`: compute and parameter dtypes (norm statistics always fp32).
  """
  spatial: SpatialVAEConfig = SpatialVAEConfig()
  temporal: TemporalVAEConfig = TemporalVAEConfig()
  shift: tuple[float, ...] = (-0.10, 0.34, 0.27, 0.98)
  scale: tuple[float, ...] = (3.85, 2.32, 2.33, 3.06)
  spatial_scaling: float = 0.18215
  micro_frame_size: int | None = 17
  micro_batch_size: int = 4
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    if isinstance(self.spatial, dict):
      object.__setattr__(self, "spatial", SpatialVAEConfig(**self.spatial))
    if isinstance(self.temporal, dict):
      object.__setattr__(self, "temporal", TemporalVAEConfig(**self.temporal))
    object.__setattr__(self, "shift", tuple(float(s) for s in np.ravel(self.shift)))
    object.__setattr__(self, "scale", tuple(float(s) for s in np.ravel(self.scale)))
    object.__setattr__(self, "dtype", jnp.dtype(self.dtype).name)
    object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype).name)
    c = self.temporal.in_out_channels
    if self.spatial.latent_channels != c:
      raise ValueError(f"spatial latent channels {self.spatial.latent_channels} != temporal "
                       f"in_out_channels {c}")
    for name in ("shift", "scale"):
      if len(getattr(self, name)) not in (1, self.temporal.embed_dim):
        raise ValueError(f"{name} needs 1 or {self.temporal.embed_dim} values, got "
                         f"{getattr(self, name)}")
    if self.micro_frame_size is not None and self.micro_frame_size < 1:
      raise ValueError(f"micro_frame_size={self.micro_frame_size} must be positive or None")
    if self.micro_batch_size < 1:
      raise ValueError(f"micro_batch_size={self.micro_batch_size} must be positive")

  @property
  def latent_channels(self) -> int:
    return self.temporal.embed_dim

  @property
  def spatial_compression(self) -> int:
    return self.spatial.spatial_compression

  @property
  def temporal_compression(self) -> int:
    return self.temporal.temporal_compression

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> OpenSoraVAEConfig:
    return cls(**d)


PRESETS: dict[str, OpenSoraVAEConfig] = {
    # hpcai-tech/OpenSora-VAE-v1.2 (OpenSoraVAE_V1_2 with PixArt-Sigma's SDXL VAE).
    "v1.2": OpenSoraVAEConfig(),
    # A tiny random configuration for tests.
    "tiny": OpenSoraVAEConfig(
        spatial=SpatialVAEConfig(block_out_channels=(8, 16, 16), layers_per_block=1,
                                 norm_num_groups=4),
        temporal=TemporalVAEConfig(filters=8, num_res_blocks=1, num_groups=4)),
}


def latent_frames(num_frames: int, temporal_compression: int = 4,
                  micro_frame_size: int | None = 17) -> int:
  """Latent frames of a `num_frames` video (the reference's `get_latent_size`)."""
  if num_frames < 1:
    raise ValueError(f"num_frames={num_frames} must be positive")
  tc = temporal_compression
  if micro_frame_size is None:
    return -(-num_frames // tc)
  full, rest = divmod(num_frames, micro_frame_size)
  return full * -(-micro_frame_size // tc) + -(-rest // tc)


# -- building blocks (channels-last) --------------------------------------------------------------


def group_norm(x: jax.Array, groups: int, weight: jax.Array, bias: jax.Array, eps: float
               ) -> jax.Array:
  """GroupNorm of channels-last `x [N, ..., C]`: statistics over every non-batch axis of a group."""
  shape = x.shape
  x32 = x.astype(F32).reshape(shape[0], -1, groups, shape[-1] // groups)
  mean = jnp.mean(x32, axis=(1, 3), keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=(1, 3), keepdims=True)
  y = ((x32 - mean) * jax.lax.rsqrt(var + np.float32(eps))).reshape(shape)
  return (y * weight.astype(F32) + bias.astype(F32)).astype(x.dtype)


class GroupNorm(nnx.Module):

  def __init__(self, groups: int, channels: int, *, eps: float, param_dtype):
    self.groups, self.eps = groups, eps
    self.weight = nnx.Param(jnp.ones((channels,), param_dtype))
    self.bias = nnx.Param(jnp.zeros((channels,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    return group_norm(x, self.groups, self.weight[...], self.bias[...], self.eps)


def _conv_init(rngs: nnx.Rngs, shape: tuple[int, ...], dtype) -> jax.Array:
  fan_in = int(np.prod(shape[:-1]))
  return jax.random.normal(rngs.params(), shape, F32).astype(dtype) / math.sqrt(fan_in)


class Conv2d(nnx.Module):
  """`nn.Conv2d` with `padding = k // 2` (odd k), stride 1; kernel `[kh, kw, in, out]`."""

  def __init__(self, cin: int, cout: int, k: int, *, dtype, param_dtype, rngs: nnx.Rngs,
               use_bias: bool = True):
    self.kernel = nnx.Param(_conv_init(rngs, (k, k, cin, cout), param_dtype))
    self.bias = nnx.Param(jnp.zeros((cout,), param_dtype)) if use_bias else None
    self.pad = k // 2
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), self.kernel[...].astype(self.dtype), (1, 1),
        ((self.pad, self.pad), (self.pad, self.pad)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
        preferred_element_type=F32)
    if self.bias is not None:
      y = y + self.bias[...].astype(F32)
    return y.astype(self.dtype)


class Linear(nnx.Module):

  def __init__(self, din: int, dout: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.kernel = nnx.Param(_conv_init(rngs, (din, dout), param_dtype))
    self.bias = nnx.Param(jnp.zeros((dout,), param_dtype))
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                preferred_element_type=F32)
    return (y + self.bias[...].astype(F32)).astype(self.dtype)


class CausalConv3d(nnx.Module):
  """OpenSora's `CausalConv3d`: zero padding of `(k_t - 1) + (1 - s_t)` frames at the front of
  time and `k // 2` on both sides of height and width, then a `[k_t, k_h, k_w]` conv with stride
  `(s_t, 1, 1)`. Parameters under `conv.` like the reference (`conv.kernel [kt, kh, kw, in, out]`).
  """

  def __init__(self, cin: int, cout: int, kernel_size: int | Sequence[int], *, stride_t: int = 1,
               use_bias: bool = True, dtype, param_dtype, rngs: nnx.Rngs):
    k = (kernel_size,) * 3 if isinstance(kernel_size, int) else tuple(kernel_size)
    if k[1] % 2 == 0 or k[2] % 2 == 0:
      raise ValueError(f"height and width kernel sizes must be odd, got {k}")
    self.conv = _Conv3dParams(cin, cout, k, use_bias=use_bias, param_dtype=param_dtype, rngs=rngs)
    self.kernel_size, self.stride_t, self.dtype = k, stride_t, dtype
    self.time_pad = (k[0] - 1) + (1 - stride_t)

  def __call__(self, x: jax.Array) -> jax.Array:
    """`[N, T, H, W, C_in] -> [N, T', H, W, C_out]`, `T' = (T + time_pad - k_t) // s_t + 1`."""
    _, kh, kw = self.kernel_size
    pads = ((self.time_pad, 0), (kh // 2, kh // 2), (kw // 2, kw // 2))
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), self.conv.kernel[...].astype(self.dtype), (self.stride_t, 1, 1),
        pads, dimension_numbers=("NDHWC", "DHWIO", "NDHWC"), preferred_element_type=F32)
    if self.conv.bias is not None:
      y = y + self.conv.bias[...].astype(F32)
    return y.astype(self.dtype)


class _Conv3dParams(nnx.Module):

  def __init__(self, cin, cout, k, *, use_bias, param_dtype, rngs):
    self.kernel = nnx.Param(_conv_init(rngs, (*k, cin, cout), param_dtype))
    self.bias = nnx.Param(jnp.zeros((cout,), param_dtype)) if use_bias else None


class Identity(nnx.Module):

  def __call__(self, x):
    return x


# -- spatial: the diffusers AutoencoderKL decoder -------------------------------------------------


class ResnetBlock2D(nnx.Module):

  def __init__(self, cin: int, cout: int, groups: int, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm1 = GroupNorm(groups, cin, eps=1e-6, param_dtype=param_dtype)
    self.conv1 = Conv2d(cin, cout, 3, **kw)
    self.norm2 = GroupNorm(groups, cout, eps=1e-6, param_dtype=param_dtype)
    self.conv2 = Conv2d(cout, cout, 3, **kw)
    self.conv_shortcut = Conv2d(cin, cout, 1, **kw) if cin != cout else None

  def __call__(self, x):
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    if self.conv_shortcut is not None:
      x = self.conv_shortcut(x)
    return (x.astype(F32) + h.astype(F32)).astype(h.dtype)


class AttentionBlock2D(nnx.Module):
  """The VAE mid-block attention: one head over all H*W positions, GroupNorm first, residual."""

  def __init__(self, c: int, groups: int, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.group_norm = GroupNorm(groups, c, eps=1e-6, param_dtype=param_dtype)
    self.to_q, self.to_k, self.to_v = Linear(c, c, **kw), Linear(c, c, **kw), Linear(c, c, **kw)
    self.to_out = nnx.List([Linear(c, c, **kw)])

  def __call__(self, x):
    n, h, w, c = x.shape
    t = self.group_norm(x).reshape(n, h * w, c)
    q, k, v = self.to_q(t), self.to_k(t), self.to_v(t)
    s = jnp.einsum("nqc,nkc->nqk", q, k, preferred_element_type=F32) / np.float32(math.sqrt(c))
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    o = self.to_out[0](jnp.einsum("nqk,nkc->nqc", p, v)).reshape(n, h, w, c)
    return (o.astype(F32) + x.astype(F32)).astype(o.dtype)


class MidBlock2D(nnx.Module):

  def __init__(self, c: int, groups: int, add_attention: bool, **kw):
    self.resnets = nnx.List([ResnetBlock2D(c, c, groups, **kw), ResnetBlock2D(c, c, groups, **kw)])
    self.attentions = nnx.List([AttentionBlock2D(c, groups, **kw)] if add_attention else [])

  def __call__(self, x):
    x = self.resnets[0](x)
    if len(self.attentions):
      x = self.attentions[0](x)
    return self.resnets[1](x)


class Upsample2D(nnx.Module):

  def __init__(self, c: int, **kw):
    self.conv = Conv2d(c, c, 3, **kw)

  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest, 2x
    return self.conv(x)


class UpDecoderBlock2D(nnx.Module):

  def __init__(self, cin: int, cout: int, num_layers: int, groups: int, add_upsample: bool, **kw):
    self.resnets = nnx.List([ResnetBlock2D(cin if i == 0 else cout, cout, groups, **kw)
                             for i in range(num_layers)])
    self.upsamplers = nnx.List([Upsample2D(cout, **kw)] if add_upsample else [])

  def __call__(self, x):
    for r in self.resnets:
      x = r(x)
    for u in self.upsamplers:
      x = u(x)
    return x


class SpatialDecoder2D(nnx.Module):
  """diffusers `Decoder` (conv_in, mid block, up blocks, norm, SiLU, conv_out)."""

  def __init__(self, cfg: SpatialVAEConfig, **kw):
    boc, g = cfg.block_out_channels, cfg.norm_num_groups
    self.conv_in = Conv2d(cfg.latent_channels, boc[-1], 3, **kw)
    self.mid_block = MidBlock2D(boc[-1], g, cfg.mid_block_add_attention, **kw)
    rev = list(reversed(boc))
    blocks, out = [], rev[0]
    for i, ch in enumerate(rev):
      blocks.append(UpDecoderBlock2D(out, ch, cfg.layers_per_block + 1, g,
                                     add_upsample=i < len(rev) - 1, **kw))
      out = ch
    self.up_blocks = nnx.List(blocks)
    self.conv_norm_out = GroupNorm(g, boc[0], eps=1e-6, param_dtype=kw["param_dtype"])
    self.conv_out = Conv2d(boc[0], cfg.out_channels, 3, **kw)

  def __call__(self, z):
    x = self.mid_block(self.conv_in(z))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class SpatialVAE(nnx.Module):
  """`AutoencoderKL.decode` without scaling: `[N, Y, X, C_lat] -> [N, 8Y, 8X, 3]`."""

  def __init__(self, cfg: SpatialVAEConfig, **kw):
    self.post_quant_conv = Conv2d(cfg.latent_channels, cfg.latent_channels, 1, **kw)
    self.decoder = SpatialDecoder2D(cfg, **kw)

  def __call__(self, z):
    return self.decoder(self.post_quant_conv(z))


# -- temporal: VAE_Temporal's decoder -------------------------------------------------------------


class ResBlock3D(nnx.Module):
  """MAGVIT ResBlock: GroupNorm, SiLU, causal 3x3x3 conv (no bias), twice; 1x1x1 shortcut."""

  def __init__(self, cin: int, cout: int, groups: int, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm1 = GroupNorm(groups, cin, eps=1e-5, param_dtype=param_dtype)
    self.conv1 = CausalConv3d(cin, cout, 3, use_bias=False, **kw)
    self.norm2 = GroupNorm(groups, cout, eps=1e-5, param_dtype=param_dtype)
    self.conv2 = CausalConv3d(cout, cout, 3, use_bias=False, **kw)
    self.conv3 = CausalConv3d(cin, cout, 1, use_bias=False, **kw) if cin != cout else None

  def __call__(self, x):
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    if self.conv3 is not None:
      x = self.conv3(x)
    return (h.astype(F32) + x.astype(F32)).astype(h.dtype)


class TemporalDecoder(nnx.Module):
  """`vae_temporal.Decoder`: conv1, res blocks, per level res blocks + (time-upsampling conv,
  depth-to-space), GroupNorm, SiLU, conv_out."""

  def __init__(self, cfg: TemporalVAEConfig, **kw):
    g, mults = cfg.num_groups, cfg.channel_multipliers
    filters = cfg.filters * mults[-1]
    self.conv1 = CausalConv3d(cfg.latent_embed_dim, filters, 3, **kw)
    self.res_blocks = nnx.List([ResBlock3D(filters, filters, g, **kw)
                                for _ in range(cfg.num_res_blocks)])
    levels: list[Any] = [None] * len(mults)
    convs: list[Any] = [None] * (len(mults) - 1)
    prev = filters
    for i in reversed(range(len(mults))):
      f = cfg.filters * mults[i]
      items = []
      for _ in range(cfg.num_res_blocks):
        items.append(ResBlock3D(prev, f, g, **kw))
        prev = f
      levels[i] = nnx.List(items)
      if i > 0:
        convs[i - 1] = (CausalConv3d(prev, prev * 2, 3, **kw) if cfg.temporal_downsample[i - 1]
                        else Identity())
    self.block_res_blocks = nnx.List(levels)
    self.conv_blocks = nnx.List(convs)
    self.upsample = tuple(cfg.temporal_downsample)
    self.norm1 = GroupNorm(g, prev, eps=1e-5, param_dtype=kw["param_dtype"])
    self.conv_out = CausalConv3d(prev, cfg.in_out_channels, 3, **kw)

  def __call__(self, x):
    x = self.conv1(x)
    for r in self.res_blocks:
      x = r(x)
    for i in reversed(range(len(self.block_res_blocks))):
      for r in self.block_res_blocks[i]:
        x = r(x)
      if i > 0 and self.upsample[i - 1]:
        x = self.conv_blocks[i - 1](x)  # [N, T, H, W, 2C], channel 2c + s -> frame 2t + s
        n, t, h, w, c2 = x.shape
        x = x.reshape(n, t, h, w, c2 // 2, 2).transpose(0, 1, 5, 2, 3, 4)
        x = x.reshape(n, 2 * t, h, w, c2 // 2)
    return self.conv_out(jax.nn.silu(self.norm1(x)))


class TemporalVAE(nnx.Module):
  """`VAE_Temporal.decode`: `[N, T_z, H, W, C] -> [N, num_frames', H, W, C]`."""

  def __init__(self, cfg: TemporalVAEConfig, **kw):
    self.post_quant_conv = CausalConv3d(cfg.embed_dim, cfg.latent_embed_dim, 1, **kw)
    self.decoder = TemporalDecoder(cfg, **kw)
    self.factor = cfg.temporal_compression

  def __call__(self, z, num_frames: int):
    pad = (self.factor - num_frames % self.factor) % self.factor
    return self.decoder(self.post_quant_conv(z))[:, pad:]


class OpenSoraVAE(nnx.Module):
  """OpenSora v1.2's `VideoAutoencoderPipeline`, decoder path."""

  def __init__(self, config: OpenSoraVAEConfig, *, rngs: nnx.Rngs):
    self.config = config
    kw = dict(dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype), rngs=rngs)
    self.spatial = SpatialVAE(config.spatial, **kw)
    self.temporal = TemporalVAE(config.temporal, **kw)

  def latent_frames(self, num_frames: int) -> int:
    return latent_frames(num_frames, self.config.temporal_compression,
                         self.config.micro_frame_size)

  def decode_temporal(self, z: jax.Array, num_frames: int) -> jax.Array:
    """Normalised latents `[B, C, T_z, Y, X]` -> spatial latents `[B, F, Y, X, C]` (channels-last;
    the reference's `x_z`), chunk by chunk."""
    cfg = self.config
    scale = jnp.asarray(cfg.scale, F32).reshape(1, -1, 1, 1, 1)
    shift = jnp.asarray(cfg.shift, F32).reshape(1, -1, 1, 1, 1)
    z = (z.astype(F32) * scale + shift).astype(cfg.dtype)
    z = jnp.transpose(z, (0, 2, 3, 4, 1))  # [B, T_z, Y, X, C]
    b, tz = z.shape[:2]
    if cfg.micro_frame_size is None:
      return self.temporal(z, num_frames)
    mf = cfg.micro_frame_size
    mz = latent_frames(mf, cfg.temporal_compression, None)
    full = min(tz // mz, num_frames // mf)
    outs = []
    if full:
      # Chunks are independent (GroupNorm statistics are per sample): decode them as one batch.
      chunks = z[:, :full * mz].reshape(b * full, mz, *z.shape[2:])
      x = self.temporal(chunks, mf)  # [B*full, mf, Y, X, C]
      outs.append(x.reshape(b, full * mf, *x.shape[2:]))
    if tz > full * mz:
      rest = num_frames - full * mf
      if rest < 1:
        raise ValueError(f"{tz} latent frames do not fit num_frames={num_frames}")
      outs.append(self.temporal(z[:, full * mz:], min(mf, rest)))
    return jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]

  def decode_spatial(self, x_z: jax.Array) -> jax.Array:
    """`[B, F, Y, X, C]` spatial latents -> `[B, F, 8Y, 8X, 3]`, `micro_batch_size` frames a call."""
    cfg = self.config
    b, f = x_z.shape[:2]
    frames = (x_z.astype(F32) / np.float32(cfg.spatial_scaling)).astype(cfg.dtype)
    frames = frames.reshape(b * f, *x_z.shape[2:])
    n = frames.shape[0]
    mb = min(cfg.micro_batch_size, n)
    pad = -n % mb
    if pad:
      frames = jnp.concatenate([frames, jnp.zeros((pad, *frames.shape[1:]), frames.dtype)])
    graphdef, state = nnx.split(self.spatial)

    def one(chunk):
      return nnx.merge(graphdef, state)(chunk)

    out = jax.lax.map(one, frames.reshape(-1, mb, *frames.shape[1:]))  # [n/mb, mb, H, W, 3]
    out = out.reshape(-1, *out.shape[2:])[:n]
    return out.reshape(b, f, *out.shape[1:])

  def decode(self, z: jax.Array, num_frames: int | None = None) -> jax.Array:
    """Latents `[B, C, T_z, Y, X]` (OpenSora-normalised) -> video `[B, 3, F, 8Y, 8X]` (~[-1, 1]).

    `num_frames` defaults to the longest video with T_z latent frames that this VAE makes.
    """
    if z.ndim != 5 or z.shape[1] != self.config.latent_channels:
      raise ValueError(f"latents must be [B, {self.config.latent_channels}, T, Y, X], got shape "
                       f"{tuple(z.shape)}")
    tz = z.shape[2]
    if num_frames is None:
      num_frames = max_frames(tz, self.config)
    if self.latent_frames(num_frames) != tz:
      raise ValueError(f"num_frames={num_frames} needs {self.latent_frames(num_frames)} latent "
                       f"frames, got {tz}")
    video = self.decode_spatial(self.decode_temporal(z, num_frames))  # [B, F, H, W, 3]
    return jnp.transpose(video, (0, 4, 1, 2, 3)).astype(F32)


def max_frames(tz: int, config: OpenSoraVAEConfig) -> int:
  """The most frames whose latent length is `tz`."""
  tc, mf = config.temporal_compression, config.micro_frame_size
  if mf is None:
    return tz * tc
  mz = latent_frames(mf, tc, None)
  full, rest = divmod(tz, mz)
  return full * mf + rest * tc


@functools.partial(jax.jit, static_argnums=(0, 3))
def _decode_jit(graphdef, state, z, num_frames):
  return nnx.merge(graphdef, state).decode(z, num_frames)


def decode_jit(vae: OpenSoraVAE, z: jax.Array, num_frames: int | None = None) -> jax.Array:
  """Jitted `vae.decode` (one compile per latent shape and frame count)."""
  if num_frames is None:
    num_frames = max_frames(z.shape[2], vae.config)
  graphdef, state = nnx.split(vae)
  return _decode_jit(graphdef, state, jnp.asarray(z), int(num_frames))


def from_params(config: OpenSoraVAEConfig, params: Any) -> OpenSoraVAE:
  """Builds the VAE around converted params (the pure dict of `nnx.state(vae, nnx.Param)`)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: OpenSoraVAE(config, rngs=nnx.Rngs(0))))
  try:
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  except ValueError as e:
    raise ValueError(f"params do not fit an OpenSora VAE of this config: {e}") from e
  return nnx.merge(graphdef, state)


def load_checkpoint(path: str | os.PathLike, *, dtype: str | None = None,
                    shardings: Any = None) -> OpenSoraVAE:
  """Loads a VAE written by `python -m checkpoints_convert opensora_vae`."""
  from astraea_jax import checkpoint  # pylint: disable=import-outside-toplevel

  meta = checkpoint.read_metadata(path)
  if meta.get("family") != FAMILY:
    raise ValueError(f"{path}: a {meta.get('family')!r} checkpoint, not {FAMILY}")
  config = OpenSoraVAEConfig.from_dict(meta["config"])
  if dtype is not None:
    config = dataclasses.replace(config, dtype=dtype)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: OpenSoraVAE(config, rngs=nnx.Rngs(0))))
  state = checkpoint.load_params(path, abstract, shardings=shardings, family=FAMILY)
  return nnx.merge(graphdef, state)
