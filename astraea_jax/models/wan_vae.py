"""Wan2.1's causal 3D video VAE in Flax NNX.

Ports diffusers' `AutoencoderKLWan` (diffusers/models/autoencoders/autoencoder_kl_wan.py, the
Wan2.1 configuration: `is_residual=False`, no `patch_size`), which is itself a port of `WanVAE_` in
Wan-Video/Wan2.1 (wan/modules/vae.py). Module and parameter names follow diffusers, so its
checkpoint converts by layout rules alone and Wan's `Wan2.1_VAE.pth` by a short rename table
(checkpoints_convert/wan_vae.py).

The model is causal in time. Every 3x3x3 convolution is padded with two frames of history in front
(zeros at the start of the video) and none behind; the encoder halves time twice with stride-2
convolutions and the decoder doubles it twice by emitting two frames per input frame, except on the
first chunk, where the temporal resampling is skipped. So video frame 0 maps to latent frame 0 and
every following group of 4 frames to one more latent frame: 81 frames <-> 21 latent frames.

Decoding runs latent frame by latent frame (encoding: 1 frame, then 4 at a time), as the references
do, with a feature cache: for each causal convolution the last `CACHE_T = 2` frames of its input,
for each temporal downsampler the last frame of its input. Here the cache is an explicit pytree
that mirrors the module tree and is carried through `jax.lax.scan`; the first chunk is traced
separately (its cache starts empty), every later chunk by one compiled scan body. A zero cache is
exactly the references' "no cache yet" state: their causal zero padding and the zero frames they
insert in front of a short first cache.

Memory (Wan2.1 config, 127M parameters; one 480x832 video of 81 frames = 21 latent frames at
60x104, chunk=1): the decoder's cache holds 2 frames of the input of each of its 32 cached
convolutions, 9.4e8 numbers (3.8 GB in fp32, 1.9 GB in bf16), 5.4e8 of them at full resolution
(7 convolutions x 96 channels x 2 x 480 x 832). One step decodes 4 frames; its largest tensors are
the upsampled input of the last spatial upsampler (192 channels x 4 frames x 480 x 832 = 3.1e8
numbers) and the full-resolution convolution inputs (96 x 6 x 480 x 832 = 2.3e8), a few of them
live at once: ~1e9 numbers (4 GB fp32). The output video, 3 x 81 x 480 x 832 = 9.7e7 numbers
(0.4 GB fp32), is held about twice while it is assembled. So a decode needs ~10 GB in fp32
whatever the number of frames (only the output grows with it). Measured on an H100 (jax 0.11.2,
XLA's memory analysis of the compiled decode): 7.3 GiB of temporaries in fp32 (4.1 GiB in bf16),
1.64 s (0.99 s) for the 81 frames; the encoder of the same video: 6.1 GiB (3.1 GiB), 0.95 s
(0.61 s). Compile-time convolution autotuning takes scratch on top, as much as is free (the
allocator peaked at 38 GiB in fp32, 4.7 GiB in bf16). `test_decode_81_frames_480p_on_gpu` in
tests/test_wan_vae.py checks it.

Public API (tensors channels-first `[B, C, T, Y, X]` like diffusers; computed channels-last):
  WanVAEConfig, PRESETS
  AutoencoderKLWan(config, *, dtype, param_dtype, rngs)
    .decode(z, *, chunk=1) -> video in [-1, 1]
    .encode(video, *, chunk=1) -> (mean, logvar)
  normalize_latents(mean, config), denormalize_latents(z, config)
  from_params(config, params, *, dtype, param_dtype), load_checkpoint(path, *, dtype, ...)
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from astraea_jax.models.attention import attention

__all__ = [
    "CACHE_T",
    "PRESETS",
    "AutoencoderKLWan",
    "WanVAEConfig",
    "denormalize_latents",
    "from_params",
    "load_checkpoint",
    "normalize_latents",
]

# Frames of history a causal 3x3x3 convolution needs (its temporal padding).
CACHE_T = 2

# diffusers' `AutoencoderKLWan` defaults = `WanVAE.mean` / `WanVAE.std` of wan/modules/vae.py.
_WAN21_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134,
                       -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
_WAN21_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687,
                      2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

# `F.normalize`'s default epsilon, which the references' RMS norm uses.
_NORM_EPS = 1e-12
# `DiagonalGaussianDistribution` clamps the log-variance to this range.
_LOGVAR_RANGE = (-30.0, 20.0)


@dataclasses.dataclass(frozen=True)
class WanVAEConfig:
  """Architecture of a Wan2.1 VAE; field names follow diffusers' `AutoencoderKLWan` config.

  `temperal_downsample` keeps diffusers' (and Wan's) spelling so that config.json maps 1:1.
  """

  base_dim: int = 96
  decoder_base_dim: int | None = None  # None: base_dim
  z_dim: int = 16
  dim_mult: tuple[int, ...] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  attn_scales: tuple[float, ...] = ()
  temperal_downsample: tuple[bool, ...] = (False, True, True)
  latents_mean: tuple[float, ...] = _WAN21_LATENTS_MEAN
  latents_std: tuple[float, ...] = _WAN21_LATENTS_STD
  in_channels: int = 3
  out_channels: int = 3

  def __post_init__(self):
    # config.json gives lists; tuples keep the config hashable (it is a static jit argument).
    for name in ("dim_mult", "attn_scales", "latents_mean", "latents_std"):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    object.__setattr__(self, "temperal_downsample",
                       tuple(bool(t) for t in self.temperal_downsample))
    for name in ("base_dim", "z_dim", "num_res_blocks", "in_channels", "out_channels"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)} must be positive")
    if self.decoder_base_dim is not None and self.decoder_base_dim < 1:
      raise ValueError(f"{self.decoder_base_dim=} must be positive")
    if len(self.dim_mult) < 2 or min(self.dim_mult) < 1:
      raise ValueError(f"{self.dim_mult=} needs at least 2 positive multipliers")
    if len(self.temperal_downsample) != len(self.dim_mult) - 1:
      raise ValueError(f"{self.temperal_downsample=} needs len(dim_mult) - 1 = "
                       f"{len(self.dim_mult) - 1} entries")
    if self.attn_scales:
      raise ValueError(f"{self.attn_scales=} is not supported: Wan2.1's VAE has attention only in "
                       "its middle blocks (diffusers' decoder ignores attn_scales)")
    if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
      raise ValueError(f"latents_mean and latents_std need z_dim={self.z_dim} entries, got "
                       f"{len(self.latents_mean)} and {len(self.latents_std)}")
    if min(self.latents_std) <= 0:
      raise ValueError(f"{self.latents_std=} must be positive")
    for i in range(1, len(self.dim_mult)):
      # The decoder feeds level i with the output of level i-1's upsampler, which halves channels.
      if self.decoder_dims[i] < 2:
        raise ValueError(f"decoder level {i} has {self.decoder_dims[i]} channel(s); its upsampler "
                         "halves them, so it needs at least 2")

  @property
  def encoder_dims(self) -> tuple[int, ...]:
    """Channels entering the encoder's levels, then its output: `base_dim * [1, *dim_mult]`."""
    return tuple(self.base_dim * m for m in (1, *self.dim_mult))

  @property
  def decoder_dims(self) -> tuple[int, ...]:
    """Channels of the decoder's middle block, then the output of each of its levels."""
    dim = self.decoder_base_dim or self.base_dim
    return tuple(dim * m for m in (self.dim_mult[-1], *self.dim_mult[::-1]))

  @property
  def temporal_compression(self) -> int:
    return 2 ** sum(self.temperal_downsample)

  @property
  def spatial_compression(self) -> int:
    return 2 ** (len(self.dim_mult) - 1)

  def num_frames(self, latent_frames: int) -> int:
    """Video frames decoded from `latent_frames` latent frames: the first gives 1, each next 4."""
    return 1 + self.temporal_compression * (latent_frames - 1)

  @classmethod
  def from_diffusers_config(cls, config: Mapping[str, Any]) -> WanVAEConfig:
    """Builds the config from diffusers' `vae/config.json` of an `AutoencoderKLWan`."""
    name = config.get("_class_name")
    if name not in (None, "AutoencoderKLWan"):
      raise ValueError(f"expected an AutoencoderKLWan config, got _class_name={name!r}")
    if config.get("is_residual"):
      raise ValueError("is_residual=True (the Wan2.2 VAE) is not supported")
    if config.get("patch_size") is not None:
      raise ValueError(f"patch_size={config['patch_size']} (the Wan2.2 VAE) is not supported")
    names = [f.name for f in dataclasses.fields(cls)]
    return cls(**{k: config[k] for k in names if k in config and
                  (config[k] is not None or k == "decoder_base_dim")})

  @classmethod
  def preset(cls, name: str) -> WanVAEConfig:
    try:
      return PRESETS[name]
    except KeyError:
      raise ValueError(f"unknown Wan VAE preset {name!r}; choose from {sorted(PRESETS)}") from None


PRESETS: dict[str, WanVAEConfig] = {
    # Wan2.1_VAE.pth / Wan-AI/Wan2.1-T2V-*-Diffusers vae/config.json.
    "wan2.1": WanVAEConfig(),
    # The configuration of the parity goldens (tests/goldens/make_wan_vae_goldens.py): Wan2.1's
    # structure with 1/48 of its channels, so that its checkpoint keys are exactly Wan2.1's.
    "tiny": WanVAEConfig(base_dim=2, z_dim=4, latents_mean=(0.25, -0.5, 0.125, 1.0),
                         latents_std=(1.5, 0.75, 2.0, 1.25)),
}


# ---------------------------------------------------------------------------------------------
# Layers


def _conv_init(rngs: nnx.Rngs, shape: Sequence[int], param_dtype) -> tuple[jax.Array, jax.Array]:
  """PyTorch's default Conv init: kernel and bias uniform in +-1/sqrt(fan_in)."""
  fan_in = int(np.prod(shape[:-1]))
  bound = 1.0 / np.sqrt(fan_in)
  kernel = jax.random.uniform(rngs.params(), tuple(shape), param_dtype, -bound, bound)
  bias = jax.random.uniform(rngs.params(), (shape[-1],), param_dtype, -bound, bound)
  return kernel, bias


class RMSNorm(nnx.Module):
  """`F.normalize(x, dim=C) * sqrt(C) * gamma` (the references' `RMS_norm`), statistics in fp32."""

  def __init__(self, dim: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
    del rngs
    self.scale = float(dim) ** 0.5
    self.gamma = nnx.Param(jnp.ones((dim,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:  # [..., C]
    x32 = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(x32), axis=-1, keepdims=True))
    y = x32 / jnp.maximum(norm, _NORM_EPS)
    return (y * self.scale * self.gamma[...].astype(jnp.float32)).astype(x.dtype)


class Conv2d(nnx.Module):
  """A 2D convolution applied to every frame: `[..., Y, X, Cin] -> [..., Y', X', Cout]`."""

  def __init__(self, in_dim: int, out_dim: int, kernel_size: int, *, stride: int = 1,
               padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0)),
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    kernel, bias = _conv_init(rngs, (kernel_size, kernel_size, in_dim, out_dim), param_dtype)
    self.kernel = nnx.Param(kernel)  # [ky, kx, Cin, Cout]
    self.bias = nnx.Param(bias)  # [Cout]
    self.stride = stride
    self.padding = padding
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    lead = x.shape[:-3]
    x = x.reshape(-1, *x.shape[-3:]).astype(self.dtype)  # [N, Y, X, C]
    y = jax.lax.conv_general_dilated(x, self.kernel[...].astype(self.dtype),
                                     (self.stride, self.stride), self.padding,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = y + self.bias[...].astype(self.dtype)
    return y.reshape(*lead, *y.shape[1:])


class CausalConv3d(nnx.Module):
  """The references' `CausalConv3d` on `[B, T, Y, X, C]`: zero-padded in space, causal in time.

  A temporal padding `p` of the PyTorch module becomes `2p` frames of history in front of the input
  and none behind. `__call__` uses zeros as that history; `chunk` takes it from a cache.
  """

  def __init__(self, in_dim: int, out_dim: int, kernel_size: int | Sequence[int], *,
               stride: Sequence[int] = (1, 1, 1), padding: int | Sequence[int] = 0,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    ks = (kernel_size,) * 3 if isinstance(kernel_size, int) else tuple(kernel_size)
    pad = (padding,) * 3 if isinstance(padding, int) else tuple(padding)
    kernel, bias = _conv_init(rngs, (*ks, in_dim, out_dim), param_dtype)
    self.kernel = nnx.Param(kernel)  # [kt, ky, kx, Cin, Cout]
    self.bias = nnx.Param(bias)  # [Cout]
    self.stride = tuple(stride)
    self.time_pad = 2 * pad[0]
    self.spatial_pad = ((pad[1], pad[1]), (pad[2], pad[2]))
    self.dtype = dtype

  def _conv(self, x: jax.Array) -> jax.Array:
    y = jax.lax.conv_general_dilated(x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                                     self.stride, ((0, 0), *self.spatial_pad),
                                     dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    return y + self.bias[...].astype(self.dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.time_pad:
      x = jnp.pad(x, ((0, 0), (self.time_pad, 0), (0, 0), (0, 0), (0, 0)))
    return self._conv(x)

  def chunk(self, x: jax.Array, cache: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Convolves one chunk after the frames in `cache` (`[B, CACHE_T, Y, X, Cin]`, None: zeros).

    Returns the output and the cache for the next chunk: the last CACHE_T input frames, the
    history included, so that a 1-frame chunk keeps the last frame of the previous one.
    """
    assert self.time_pad == CACHE_T, "only causal convolutions with temporal padding are cached"
    if cache is None:
      cache = jnp.zeros((x.shape[0], CACHE_T, *x.shape[2:]), x.dtype)
    x = jnp.concatenate([cache.astype(x.dtype), x], axis=1)  # [B, CACHE_T + T, Y, X, C]
    return self._conv(x), x[:, -CACHE_T:]


class ResidualBlock(nnx.Module):
  """`x + conv2(silu(norm2(conv1(silu(norm1(x))))))`, a 1x1x1 shortcut when channels change."""

  def __init__(self, in_dim: int, out_dim: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm1 = RMSNorm(in_dim, param_dtype=param_dtype, rngs=rngs)
    self.conv1 = CausalConv3d(in_dim, out_dim, 3, padding=1, **kw)
    self.norm2 = RMSNorm(out_dim, param_dtype=param_dtype, rngs=rngs)
    self.conv2 = CausalConv3d(out_dim, out_dim, 3, padding=1, **kw)
    self.conv_shortcut = CausalConv3d(in_dim, out_dim, 1, **kw) if in_dim != out_dim else None

  def __call__(self, x: jax.Array, cache: Any = None) -> tuple[jax.Array, Any]:
    h = x if self.conv_shortcut is None else self.conv_shortcut(x)
    c1, c2 = (None, None) if cache is None else cache
    x, c1 = self.conv1.chunk(jax.nn.silu(self.norm1(x)), c1)
    x, c2 = self.conv2.chunk(jax.nn.silu(self.norm2(x)), c2)
    return x + h, (c1, c2)


class AttentionBlock(nnx.Module):
  """Single-head self-attention over the pixels of each frame (no temporal mixing, no cache)."""

  def __init__(self, dim: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm = RMSNorm(dim, param_dtype=param_dtype, rngs=rngs)
    self.to_qkv = Conv2d(dim, 3 * dim, 1, **kw)
    self.proj = Conv2d(dim, dim, 1, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, y, w, c = x.shape
    qkv = self.to_qkv(self.norm(x)).reshape(b * t, y * w, 1, 3 * c)  # [B*T, N, H=1, 3C]
    # fp32: one frame's N x N scores are cheap (N = 6240 at 480p), and jax's XLA attention path
    # does not take bf16 under strict dtype promotion.
    q, k, v = jnp.split(qkv.astype(jnp.float32), 3, axis=-1)  # [B*T, N, 1, C]
    # Head dim C (384 in Wan2.1) exceeds what the fused kernels take; XLA's einsum path it is.
    out = attention(q, k, v, implementation="xla").astype(x.dtype)
    return x + self.proj(out.reshape(b, t, y, w, c))


class MidBlock(nnx.Module):
  """`resnet -> attention -> resnet` (the references' `middle`)."""

  def __init__(self, dim: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.resnets = nnx.List([ResidualBlock(dim, dim, **kw), ResidualBlock(dim, dim, **kw)])
    self.attentions = nnx.List([AttentionBlock(dim, **kw)])

  def __call__(self, x: jax.Array, cache: Any = None) -> tuple[jax.Array, Any]:
    c0, c1 = (None, None) if cache is None else cache
    x, c0 = self.resnets[0](x, c0)
    x = self.attentions[0](x)
    x, c1 = self.resnets[1](x, c1)
    return x, (c0, c1)


def _repeat_2x(x: jax.Array) -> jax.Array:
  """Nearest 2x spatial upsampling of `[B, T, Y, X, C]` ("nearest-exact" at scale 2)."""
  return jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)


class Resample(nnx.Module):
  """The references' `Resample`: 2x spatial up/downsampling, optionally 2x temporal as well.

  `upsample3d` first doubles time with a causal (3,1,1) convolution whose `2C` output channels are
  two frames; `downsample3d` halves it after the spatial step with a stride-2 (3,1,1) convolution
  over the last frame of the previous chunk and this chunk. Neither temporal step runs on the first
  chunk (cache None), as in the references.
  """

  MODES = ("upsample2d", "upsample3d", "downsample2d", "downsample3d")

  def __init__(self, dim: int, mode: str, *, upsample_out_dim: int | None = None,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    if mode not in self.MODES:
      raise ValueError(f"unknown resample {mode=}; choose from {self.MODES}")
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.mode = mode
    if mode.startswith("upsample"):
      out = dim // 2 if upsample_out_dim is None else upsample_out_dim
      self.resample = Conv2d(dim, out, 3, padding=((1, 1), (1, 1)), **kw)
    else:
      # nn.ZeroPad2d((0, 1, 0, 1)): one zero row below and one zero column right.
      self.resample = Conv2d(dim, dim, 3, stride=2, padding=((0, 1), (0, 1)), **kw)
    if mode == "upsample3d":
      self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), padding=(1, 0, 0), **kw)
    elif mode == "downsample3d":
      self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), **kw)
    else:
      self.time_conv = None

  def __call__(self, x: jax.Array, cache: Any = None) -> tuple[jax.Array, Any]:
    if self.mode == "upsample3d":
      if cache is None:
        # First chunk: no temporal upsampling; the next chunk sees zero history.
        cache = jnp.zeros((x.shape[0], CACHE_T, *x.shape[2:]), x.dtype)
      else:
        b, t, y, w, c = x.shape
        x, cache = self.time_conv.chunk(x, cache)  # [B, T, Y, X, 2C]
        # Channels [0, C) are frame 2t, [C, 2C) frame 2t + 1.
        x = x.reshape(b, t, y, w, 2, c).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, y, w, c)
    if self.mode.startswith("upsample"):
      x = _repeat_2x(x)
    x = self.resample(x)
    if self.mode == "downsample3d":
      if cache is not None:
        x_last = x[:, -1:]
        x = self.time_conv(jnp.concatenate([cache.astype(x.dtype), x], axis=1))
        cache = x_last
      else:
        cache = x[:, -1:]  # [B, 1, Y, X, C]
    return x, cache


class UpBlock(nnx.Module):
  """`num_res_blocks + 1` residual blocks, then an optional upsampler (diffusers' `WanUpBlock`)."""

  def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, upsample_mode: str | None, *,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    dims = [in_dim] + [out_dim] * (num_res_blocks + 1)
    self.resnets = nnx.List([ResidualBlock(i, o, **kw) for i, o in zip(dims[:-1], dims[1:])])
    self.upsamplers = (nnx.List([Resample(out_dim, upsample_mode, **kw)])
                       if upsample_mode is not None else None)

  def __call__(self, x: jax.Array, cache: Any = None) -> tuple[jax.Array, Any]:
    caches = []
    for i, resnet in enumerate(self.resnets):
      x, c = resnet(x, None if cache is None else cache[0][i])
      caches.append(c)
    up = None
    if self.upsamplers is not None:
      x, up = self.upsamplers[0](x, None if cache is None else cache[1])
    return x, (tuple(caches), up)


class Encoder3d(nnx.Module):
  """diffusers' `WanEncoder3d` (Wan's `Encoder3d`): `[B, T, Y, X, 3]` -> `[B, T', y, x, 2z]`."""

  def __init__(self, config: WanVAEConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    dims = config.encoder_dims
    self.conv_in = CausalConv3d(config.in_channels, dims[0], 3, padding=1, **kw)
    blocks = []
    levels = len(config.dim_mult)
    for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
      for _ in range(config.num_res_blocks):
        blocks.append(ResidualBlock(in_dim, out_dim, **kw))
        in_dim = out_dim
      if i != levels - 1:
        mode = "downsample3d" if config.temperal_downsample[i] else "downsample2d"
        blocks.append(Resample(out_dim, mode, **kw))
    self.down_blocks = nnx.List(blocks)
    self.mid_block = MidBlock(dims[-1], **kw)
    self.norm_out = RMSNorm(dims[-1], param_dtype=param_dtype, rngs=rngs)
    self.conv_out = CausalConv3d(dims[-1], 2 * config.z_dim, 3, padding=1, **kw)

  def __call__(self, x: jax.Array, cache: Any = None) -> tuple[jax.Array, Any]:
    get = (lambda key: None) if cache is None else cache.__getitem__
    x, c_in = self.conv_in.chunk(x, get("conv_in"))
    downs = []
    for i, block in enumerate(self.down_blocks):
      x, c = block(x, None if cache is None else cache["down_blocks"][i])
      downs.append(c)
    x, c_mid = self.mid_block(x, get("mid_block"))
    x, c_out = self.conv_out.chunk(jax.nn.silu(self.norm_out(x)), get("conv_out"))
    return x, {"conv_in": c_in, "down_blocks": tuple(downs), "mid_block": c_mid, "conv_out": c_out}


class Decoder3d(nnx.Module):
  """diffusers' `WanDecoder3d` (Wan's `Decoder3d`): `[B, T, y, x, z]` -> video `[B, T', Y, X, 3]`.

  On the first chunk (cache None) the temporal upsamplers are skipped, so 1 latent frame gives 1
  video frame; on later chunks every latent frame gives `temporal_compression` frames.
  """

  def __init__(self, config: WanVAEConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    dims = config.decoder_dims
    temperal_upsample = config.temperal_downsample[::-1]
    levels = len(config.dim_mult)
    self.conv_in = CausalConv3d(config.z_dim, dims[0], 3, padding=1, **kw)
    self.mid_block = MidBlock(dims[0], **kw)
    blocks = []
    for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
      if i > 0:
        in_dim //= 2  # the previous level's upsampler halved the channels
      mode = None
      if i != levels - 1:
        mode = "upsample3d" if temperal_upsample[i] else "upsample2d"
      blocks.append(UpBlock(in_dim, out_dim, config.num_res_blocks, mode, **kw))
    self.up_blocks = nnx.List(blocks)
    self.norm_out = RMSNorm(dims[-1], param_dtype=param_dtype, rngs=rngs)
    self.conv_out = CausalConv3d(dims[-1], config.out_channels, 3, padding=1, **kw)

  def __call__(self, x: jax.Array, cache: Any = None) -> tuple[jax.Array, Any]:
    get = (lambda key: None) if cache is None else cache.__getitem__
    x, c_in = self.conv_in.chunk(x, get("conv_in"))
    x, c_mid = self.mid_block(x, get("mid_block"))
    ups = []
    for i, block in enumerate(self.up_blocks):
      x, c = block(x, None if cache is None else cache["up_blocks"][i])
      ups.append(c)
    x, c_out = self.conv_out.chunk(jax.nn.silu(self.norm_out(x)), get("conv_out"))
    return x, {"conv_in": c_in, "mid_block": c_mid, "up_blocks": tuple(ups), "conv_out": c_out}


# ---------------------------------------------------------------------------------------------
# The autoencoder


def _run_chunks(net, x: jax.Array, first: int, step: int) -> jax.Array:
  """Runs a causal network over `x [B, T, ...]` in chunks: `first` frames, then `step` at a time.

  The first chunk is traced on its own (empty cache); full chunks after it go through one
  `lax.scan` body with the cache as carry; a shorter last chunk (if any) is traced once more.
  Returns the outputs concatenated along time.
  """
  out, cache = net(x[:, :first])
  outs = [out]
  rest = x[:, first:]
  n = rest.shape[1] // step
  if n:
    chunks = rest[:, :n * step].reshape(rest.shape[0], n, step, *rest.shape[2:])
    chunks = jnp.moveaxis(chunks, 1, 0)  # [n, B, step, ...]

    def body(carry, xs):
      y, carry = net(xs, carry)
      return carry, y

    cache, ys = jax.lax.scan(body, cache, chunks)  # ys [n, B, t, ...]
    ys = jnp.moveaxis(ys, 0, 1)
    outs.append(ys.reshape(ys.shape[0], -1, *ys.shape[3:]))
  if rest.shape[1] > n * step:
    out, _ = net(rest[:, n * step:], cache)
    outs.append(out)
  return jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]


def _to_last(x: jax.Array) -> jax.Array:
  return jnp.moveaxis(x, 1, -1)  # [B, C, T, Y, X] -> [B, T, Y, X, C]


def _to_first(x: jax.Array) -> jax.Array:
  return jnp.moveaxis(x, -1, 1)  # [B, T, Y, X, C] -> [B, C, T, Y, X]


@nnx.jit(static_argnames=("chunk",))
def _decode(model: AutoencoderKLWan, z: jax.Array, chunk: int) -> jax.Array:
  x = model.post_quant_conv(_to_last(z).astype(model.dtype))  # [B, T, y, x, z]
  video = _run_chunks(model.decoder, x, 1, chunk)  # [B, T', Y, X, 3]
  return _to_first(jnp.clip(video, -1.0, 1.0))


@nnx.jit(static_argnames=("chunk",))
def _encode(model: AutoencoderKLWan, video: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
  x = _to_last(video).astype(model.dtype)  # [B, T, Y, X, 3]
  h = model.quant_conv(_run_chunks(model.encoder, x, 1, model.config.temporal_compression * chunk))
  mean, logvar = jnp.split(h, 2, axis=-1)  # [B, T', y, x, z] each
  logvar = jnp.clip(logvar, *_LOGVAR_RANGE)
  return _to_first(mean), _to_first(logvar)


class AutoencoderKLWan(nnx.Module):
  """Wan2.1's VAE: `encode` video to a diagonal Gaussian over latents, `decode` latents to video.

  Attribute names are diffusers' (`encoder`, `quant_conv`, `post_quant_conv`, `decoder`).
  """

  def __init__(self, config: WanVAEConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.config = config
    self.dtype = dtype
    self.encoder = Encoder3d(config, **kw)
    self.quant_conv = CausalConv3d(2 * config.z_dim, 2 * config.z_dim, 1, **kw)
    self.post_quant_conv = CausalConv3d(config.z_dim, config.z_dim, 1, **kw)
    self.decoder = Decoder3d(config, **kw)

  def decode(self, z: jax.Array, *, chunk: int = 1) -> jax.Array:
    """Latents -> video, as diffusers' `AutoencoderKLWan.decode(z).sample`.

    Args:
      z: `[B, z_dim, T, y, x]` latents, already denormalized (see `denormalize_latents`).
      chunk: latent frames decoded per step after the first. The result does not depend on it;
        larger chunks trade memory for fewer, larger steps.

    Returns:
      `[B, out_channels, 1 + 4 (T - 1), 8 y, 8 x]` clipped to [-1, 1], in the compute dtype.
    """
    c = self.config
    if z.ndim != 5 or z.shape[1] != c.z_dim or min(z.shape) < 1:
      raise ValueError(f"latents must be [B, z_dim={c.z_dim}, T, Y, X] with no empty axis, got "
                       f"shape {tuple(z.shape)}")
    _check_chunk(chunk)
    return _decode(self, z, chunk=chunk)

  def encode(self, video: jax.Array, *, chunk: int = 1) -> tuple[jax.Array, jax.Array]:
    """Video -> `(mean, logvar)` of the latent distribution, as diffusers' `encode(x).latent_dist`.

    Args:
      video: `[B, in_channels, T, Y, X]` in [-1, 1], `T = 1 + 4 k`, Y and X multiples of 8.
      chunk: groups of 4 frames encoded per step after the first frame (the result does not
        depend on it).

    Returns:
      `mean` and `logvar` (clamped to [-30, 20]), each `[B, z_dim, 1 + k, Y / 8, X / 8]`. The
      mean is the latent the Wan pipelines use (`normalize_latents` it before diffusion).
    """
    c = self.config
    s, t = c.spatial_compression, c.temporal_compression
    if video.ndim != 5 or video.shape[1] != c.in_channels or min(video.shape) < 1:
      raise ValueError(f"video must be [B, {c.in_channels}, T, Y, X] with no empty axis, got shape "
                       f"{tuple(video.shape)}")
    if (video.shape[2] - 1) % t or video.shape[3] % s or video.shape[4] % s:
      raise ValueError(f"video of shape {tuple(video.shape)} needs T = 1 + {t} k frames and a "
                       f"height and width that are multiples of {s}")
    _check_chunk(chunk)
    return _encode(self, video, chunk=chunk)


def _check_chunk(chunk: int) -> None:
  if not isinstance(chunk, int) or chunk < 1:
    raise ValueError(f"{chunk=} must be a positive int")


def _stats(config: WanVAEConfig, dtype) -> tuple[jax.Array, jax.Array]:
  """`latents_mean` and `1 / latents_std` as `[1, z, 1, 1, 1]` arrays; the reciprocal is taken in
  fp32 before the cast, as the diffusers pipelines do."""
  mean = np.asarray(config.latents_mean, np.float32).reshape(1, -1, 1, 1, 1)
  inv_std = 1.0 / np.asarray(config.latents_std, np.float32).reshape(1, -1, 1, 1, 1)
  return jnp.asarray(mean, dtype), jnp.asarray(inv_std, dtype)


def normalize_latents(latents: jax.Array, config: WanVAEConfig) -> jax.Array:
  """VAE latents `[B, z, T, Y, X]` -> the diffusion model's space: `(z - mean) / std`.

  As Wan's `WanVAE.encode` and diffusers' `WanImageToVideoPipeline` do with the encoder mean.
  """
  mean, inv_std = _stats(config, latents.dtype)
  return (latents - mean) * inv_std


def denormalize_latents(latents: jax.Array, config: WanVAEConfig) -> jax.Array:
  """The diffusion model's latents `[B, z, T, Y, X]` -> VAE latents: `z * std + mean`.

  As diffusers' `WanPipeline` does before `vae.decode` (`latents / (1 / std) + mean`).
  """
  mean, inv_std = _stats(config, latents.dtype)
  return latents / inv_std + mean


def from_params(config: WanVAEConfig, params: Mapping[str, Any], *, dtype=jnp.float32,
                param_dtype=None) -> AutoencoderKLWan:
  """Builds a VAE around converted params (the pure dict of `nnx.state(model, nnx.Param)`).

  Nothing is randomly initialised. Parameters keep their dtype unless `param_dtype` is given;
  compute runs in `dtype`. Raises `ValueError` if the tree or a shape does not fit `config`.
  """
  abstract = nnx.eval_shape(lambda: AutoencoderKLWan(config, dtype=dtype, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  want = {path: tuple(v.shape) for path, v in nnx.to_flat_state(state)}
  got = {path: tuple(np.shape(v)) for path, v in _flat(params).items()}
  if want != got:
    missing = sorted(".".join(map(str, p)) for p in set(want) - set(got))
    extra = sorted(".".join(map(str, p)) for p in set(got) - set(want))
    bad = sorted(".".join(map(str, p)) for p in set(want) & set(got) if want[p] != got[p])
    raise ValueError(f"params do not fit a Wan VAE of this config: missing {missing[:3]}, "
                     f"unexpected {extra[:3]}, wrong shape {bad[:3]}")
  cast = jnp.asarray if param_dtype is None else (lambda a: jnp.asarray(a, param_dtype))
  nnx.replace_by_pure_dict(state, jax.tree.map(cast, dict(params)))
  return nnx.merge(graphdef, state)


def _flat(tree: Mapping[Any, Any], prefix: tuple = ()) -> dict[tuple, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flat(value, (*prefix, key)))
    else:
      out[(*prefix, key)] = value
  return out


def load_checkpoint(path: str | os.PathLike, *, dtype=jnp.float32, param_dtype=None,
                    shardings: Any = None) -> AutoencoderKLWan:
  """Loads a VAE converted by `python -m checkpoints_convert wan_vae` (config from its metadata).

  Parameters keep the dtype they were converted to unless `param_dtype` is given.
  """
  from astraea_jax import checkpoint  # pylint: disable=import-outside-toplevel

  meta = checkpoint.read_metadata(path)
  if meta.get("family") != "wan_vae":
    raise ValueError(f"{path}: checkpoint of family {meta.get('family')!r}, expected 'wan_vae'")
  config = WanVAEConfig(**meta["config"])
  model = nnx.eval_shape(lambda: AutoencoderKLWan(config, dtype=dtype, rngs=nnx.Rngs(0)))
  graphdef, abstract = nnx.split(model)
  if param_dtype is None:
    saved = meta.get("dtype")
    param_dtype = jnp.dtype(saved) if saved else jnp.float32
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, param_dtype), abstract)
  state = checkpoint.load_params(path, abstract, shardings=shardings, family="wan_vae")
  return nnx.merge(graphdef, state)
