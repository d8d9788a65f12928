"""HunyuanVideo's causal 3D VAE (decoder path) in Flax NNX.

Ports the decode half of diffusers' `AutoencoderKLHunyuanVideo`
(diffusers/models/autoencoders/autoencoder_kl_hunyuan_video.py, checked against diffusers 0.42.1):
`post_quant_conv` (a 1x1x1 Conv3d) then `HunyuanVideoDecoder3D`:

  conv_in      causal 3x3x3 conv, latent channels -> block_out_channels[-1]
  mid_block    resnet, attention, resnet. The attention is one head over every T*Y*X position
               (GroupNorm first, residual after) with diffusers' `prepare_causal_attention_mask`: a
               query in frame t sees the keys of frames 0..t only (a causal-by-frame mask, all
               positions of a frame see each other). Its GroupNorm still takes statistics over all
               frames, as do every other GroupNorm of the decoder, so the decoder as a whole is not
               causal in time.
  up_blocks    len(block_out_channels) blocks of `layers_per_block + 1` resnets each, over the
               reversed block_out_channels; block i upsamples space when i < log2(spatial ratio) and
               time when len - 1 - log2(temporal ratio) <= i < len - 1 (the released config: blocks
               0, 1, 2 space, blocks 1, 2 time). `HunyuanVideoUpsampleCausal3D`: the first frame is
               upsampled in space only, the other frames by nearest-neighbour in time and space
               (T -> 1 + 2 (T - 1)), then a causal 3x3x3 conv.
  conv_norm_out, SiLU, conv_out (causal 3x3x3 conv -> out_channels).

Every resnet is GroupNorm, SiLU, causal conv, GroupNorm, SiLU, causal conv, plus the input (through
a causal 1x1x1 `conv_shortcut` where the channels change); all GroupNorms use eps 1e-6 and compute
in fp32. `HunyuanVideoCausalConv3d` pads with `mode="replicate"` (diffusers' default, which no
decoder layer overrides): `k_t - 1` copies of the first frame in front (none behind) and `k // 2`
edge copies on both sides of height and width, then an unpadded conv. (diffusers writes the F.pad
tuple as (k_t//2, k_t//2, k_h//2, k_h//2, k_w - 1, 0), i.e. width gets the time kernel's half and
time the width kernel's `k - 1`; every conv of this VAE is cubic, so it is the same thing and this
port takes cubic kernels only.)

So `T` latent frames decode to `F = (T - 1) * 4 + 1` frames of `8Y x 8X` (released config):
latent frame 0 is video frame 0, every further latent frame four more.

Latent scaling: the HunyuanVideo transformer works on `z * scaling_factor` (0.476986, the released
`vae/config.json`); pipelines divide by it before `vae.decode`. `decode(z)` is `vae.decode(z)` (no
scaling, like diffusers); `decode_scaled(latents)` divides by `config.scaling_factor` first.

Layout: the public `decode` takes and returns diffusers' channels-first `[B, C, T, Y, X]` /
`[B, 3, F, H, W]`; the modules compute channels-last (`[B, T, Y, X, C]`). Dimension letters: B batch,
C channels, T latent frames (F video frames), Y, X latent height and width (H, W video), N = T*Y*X
attention positions. Parameter names follow diffusers' keys (`decoder.up_blocks.1.resnets.0.conv1
.conv.weight` -> `decoder.up_blocks.1.resnets.0.conv1.conv.kernel`), so
checkpoints_convert/hunyuan_vae.py is one layout rule per tensor. Conv3d kernels are stored
`[kt, kh, kw, I, O]`, Linear kernels `[I, O]`. `decode` runs the whole latent at once (the
mid-block attention materialises its `[B, N, N]` scores, fine for small latents only);
`decode_tiled` decodes as diffusers' `vae.decode` does, frame-wise past 4 latent frames and, with
`VAETiling(spatial=True)` (diffusers' `enable_tiling()`), in 256 px tiles (`hunyuan_vae_tiling`).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from astraea_jax.models.hunyuan_vae_tiling import VAETiling, tiled_decode
from astraea_jax.models.opensora_vae import GroupNorm, Linear

F32 = jnp.float32

__all__ = [
    "HunyuanVAEConfig",
    "HunyuanVAEDecoder",
    "PRESETS",
    "VAETiling",
    "causal_frame_mask",
    "decode_jit",
    "decode_tiled",
    "from_params",
]

FAMILY = "hunyuan_vae"
_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class HunyuanVAEConfig:
  """`AutoencoderKLHunyuanVideo` decoder hyper-parameters (field names as in diffusers'
  config.json). `dtype` / `param_dtype`: compute and parameter dtypes (GroupNorm statistics, conv
  accumulation and the attention softmax are always fp32)."""
  latent_channels: int = 16
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  temporal_compression_ratio: int = 4
  spatial_compression_ratio: int = 8
  mid_block_add_attention: bool = True
  scaling_factor: float = 0.476986
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
    object.__setattr__(self, "mid_block_add_attention", bool(self.mid_block_add_attention))
    object.__setattr__(self, "scaling_factor", float(self.scaling_factor))
    object.__setattr__(self, "dtype", jnp.dtype(self.dtype).name)
    object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype).name)
    for value, text in ((self.latent_channels, f"{self.latent_channels=}"),
                        (self.out_channels, f"{self.out_channels=}"),
                        (self.layers_per_block, f"{self.layers_per_block=}"),
                        (self.norm_num_groups, f"{self.norm_num_groups=}")):
      if value < 1:
        raise ValueError(f"{text} must be positive")
    boc = self.block_out_channels
    if not boc or any(c < 1 or c % self.norm_num_groups for c in boc):
      raise ValueError(f"{self.block_out_channels=} must be positive multiples of "
                       f"{self.norm_num_groups=}")
    if self.temporal_compression_ratio != 4:
      # The only ratio diffusers' HunyuanVideoDecoder3D builds.
      raise ValueError(f"{self.temporal_compression_ratio=} must be 4")
    sr = self.spatial_compression_ratio
    if sr < 1 or sr & (sr - 1):
      raise ValueError(f"{self.spatial_compression_ratio=} must be a power of two")
    times = math.prod(t for t, _ in self.upsample_factors)
    spaces = math.prod(s for _, s in self.upsample_factors)
    if (times, spaces) != (self.temporal_compression_ratio, sr):
      raise ValueError(f"{self.block_out_channels=} gives {len(boc)} up blocks, which upsample "
                       f"{times}x in time and {spaces}x in space, not "
                       f"{self.temporal_compression_ratio=} and {self.spatial_compression_ratio=}")
    if not self.scaling_factor > 0:
      raise ValueError(f"{self.scaling_factor=} must be positive")

  @property
  def upsample_factors(self) -> tuple[tuple[int, int], ...]:
    """(time, space) factor of each up block, as `HunyuanVideoDecoder3D` derives them."""
    n = len(self.block_out_channels)
    n_space = int(np.log2(self.spatial_compression_ratio))
    n_time = int(np.log2(self.temporal_compression_ratio))
    return tuple((2 if n - 1 - n_time <= i < n - 1 else 1, 2 if i < n_space else 1)
                 for i in range(n))

  def num_frames(self, latent_frames: int) -> int:
    """Video frames of `latent_frames` latent frames: `(T - 1) * temporal ratio + 1`."""
    return (latent_frames - 1) * self.temporal_compression_ratio + 1

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> HunyuanVAEConfig:
    return cls(**d)

  @classmethod
  def from_diffusers_config(cls, config: Mapping[str, Any], **overrides) -> HunyuanVAEConfig:
    """From diffusers' `vae/config.json` of an `AutoencoderKLHunyuanVideo`."""
    name = config.get("_class_name")
    if name not in (None, "AutoencoderKLHunyuanVideo"):
      raise ValueError(f"expected an AutoencoderKLHunyuanVideo config, got {name=}")
    act_fn = config.get("act_fn", "silu")
    if act_fn not in ("silu", "swish"):
      raise ValueError(f"{act_fn=} is not supported (silu only)")
    up_block_types = tuple(config.get("up_block_types", ()))
    if any(t != "HunyuanVideoUpBlock3D" for t in up_block_types):
      raise ValueError(f"{up_block_types=}: only HunyuanVideoUpBlock3D is supported")
    names = {f.name for f in dataclasses.fields(cls)} - {"dtype", "param_dtype"}
    kwargs = {k: v for k, v in config.items() if k in names}
    if up_block_types and len(up_block_types) != len(kwargs.get("block_out_channels",
                                                                cls.block_out_channels)):
      raise ValueError(f"{up_block_types=} and block_out_channels differ in length")
    return cls(**{**kwargs, **overrides})


PRESETS: dict[str, HunyuanVAEConfig] = {
    # hunyuanvideo-community/HunyuanVideo vae/config.json (diffusers' defaults).
    "hunyuan-video": HunyuanVAEConfig(),
    # The parity goldens' configuration (tests/goldens/make_hunyuan_vae_goldens.py).
    "tiny": HunyuanVAEConfig(latent_channels=4, block_out_channels=(4, 8, 8, 8),
                             layers_per_block=1, norm_num_groups=4),
}


# -- layers (channels-last) -----------------------------------------------------------------------


def _conv_init(rngs: nnx.Rngs, shape: tuple[int, ...], dtype) -> jax.Array:
  fan_in = int(np.prod(shape[:-1]))
  return jax.random.normal(rngs.params(), shape, F32).astype(dtype) / math.sqrt(fan_in)


class Conv3d(nnx.Module):
  """`nn.Conv3d` without padding, stride 1: `kernel [kt, kh, kw, I, O]`, `bias [O]`."""

  def __init__(self, cin: int, cout: int, k: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.kernel = nnx.Param(_conv_init(rngs, (k, k, k, cin, cout), param_dtype))
    self.bias = nnx.Param(jnp.zeros((cout,), param_dtype))
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    """`[B, T, Y, X, I] -> [B, T - kt + 1, Y - kh + 1, X - kw + 1, O]`."""
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), self.kernel[...].astype(self.dtype), (1, 1, 1), "VALID",
        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"), preferred_element_type=F32)
    return (y + self.bias[...].astype(F32)).astype(self.dtype)


class CausalConv3d(nnx.Module):
  """`HunyuanVideoCausalConv3d` (cubic kernel k, stride 1): replicate-pad `k - 1` frames in front
  and `k // 2` pixels on each side of Y and X, then `conv` (parameters under `.conv.` like
  diffusers). Shape-preserving in T, Y, X."""

  def __init__(self, cin: int, cout: int, k: int, **kw):
    self.conv = Conv3d(cin, cout, k, **kw)
    self.k = k

  def __call__(self, x: jax.Array) -> jax.Array:
    """`[B, T, Y, X, I] -> [B, T, Y, X, O]`."""
    k = self.k
    if k > 1:
      x = jnp.pad(x, ((0, 0), (k - 1, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)), mode="edge")
    return self.conv(x)


class ResnetBlockCausal3D(nnx.Module):
  """`HunyuanVideoResnetBlockCausal3D` (dropout is a no-op at inference)."""

  def __init__(self, cin: int, cout: int, groups: int, **kw):
    pd = kw["param_dtype"]
    self.norm1 = GroupNorm(groups, cin, eps=_EPS, param_dtype=pd)
    self.conv1 = CausalConv3d(cin, cout, 3, **kw)
    self.norm2 = GroupNorm(groups, cout, eps=_EPS, param_dtype=pd)
    self.conv2 = CausalConv3d(cout, cout, 3, **kw)
    self.conv_shortcut = CausalConv3d(cin, cout, 1, **kw) if cin != cout else None

  def __call__(self, x: jax.Array) -> jax.Array:
    """`[B, T, Y, X, C_in] -> [B, T, Y, X, C_out]`."""
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    if self.conv_shortcut is not None:
      x = self.conv_shortcut(x)
    return (h.astype(F32) + x.astype(F32)).astype(h.dtype)


def causal_frame_mask(t: int, hw: int) -> jax.Array:
  """diffusers' `prepare_causal_attention_mask` as booleans: `[N, N]` (N = t * hw), True where the
  key's frame is not after the query's (`mask[q, k] = frame(k) <= frame(q)`)."""
  frame = jnp.repeat(jnp.arange(t), hw)
  return frame[None, :] <= frame[:, None]


class Attention(nnx.Module):
  """The mid-block `Attention` (one head of width C, `_from_deprecated_attn_block`, residual,
  GroupNorm over channels with statistics over all N positions), with the causal frame mask."""

  def __init__(self, c: int, groups: int, **kw):
    self.group_norm = GroupNorm(groups, c, eps=_EPS, param_dtype=kw["param_dtype"])
    self.to_q, self.to_k, self.to_v = Linear(c, c, **kw), Linear(c, c, **kw), Linear(c, c, **kw)
    self.to_out = nnx.List([Linear(c, c, **kw)])

  def __call__(self, x: jax.Array) -> jax.Array:
    """`[B, T, Y, X, C] -> [B, T, Y, X, C]`."""
    b, t, y, xx, c = x.shape
    h = self.group_norm(x).reshape(b, t * y * xx, c)  # [B, N, C]
    q, k, v = self.to_q(h), self.to_k(h), self.to_v(h)
    s = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=F32) / np.float32(math.sqrt(c))
    s = jnp.where(causal_frame_mask(t, y * xx)[None], s, -jnp.inf)  # [B, N, N]
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    o = jnp.einsum("bqk,bkc->bqc", p, v, preferred_element_type=F32).astype(v.dtype)
    o = self.to_out[0](o).reshape(b, t, y, xx, c)
    return (o.astype(F32) + x.astype(F32)).astype(o.dtype)


class MidBlock3D(nnx.Module):
  """`HunyuanVideoMidBlock3D` (num_layers 1): resnet, [attention], resnet."""

  def __init__(self, c: int, groups: int, add_attention: bool, **kw):
    self.resnets = nnx.List([ResnetBlockCausal3D(c, c, groups, **kw),
                             ResnetBlockCausal3D(c, c, groups, **kw)])
    self.attentions = nnx.List([Attention(c, groups, **kw)] if add_attention else [])

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.resnets[0](x)
    if len(self.attentions):
      x = self.attentions[0](x)
    return self.resnets[1](x)


def _repeat(x: jax.Array, factor: int, axes: tuple[int, ...]) -> jax.Array:
  for axis in axes:
    if factor > 1:
      x = jnp.repeat(x, factor, axis=axis)
  return x


class UpsampleCausal3D(nnx.Module):
  """`HunyuanVideoUpsampleCausal3D`: nearest upsampling (frame 0 in space only, frames 1.. in time
  and space) then a causal 3x3x3 conv. `[B, T, Y, X, C] -> [B, 1 + ft (T - 1), fs Y, fs X, C]`."""

  def __init__(self, c: int, factor_t: int, factor_s: int, **kw):
    self.conv = CausalConv3d(c, c, 3, **kw)
    self.factor_t, self.factor_s = factor_t, factor_s

  def __call__(self, x: jax.Array) -> jax.Array:
    first = _repeat(x[:, :1], self.factor_s, (2, 3))  # [B, 1, fs Y, fs X, C]
    if x.shape[1] > 1:
      rest = _repeat(_repeat(x[:, 1:], self.factor_t, (1,)), self.factor_s, (2, 3))
      x = jnp.concatenate([first, rest], axis=1)  # [B, 1 + ft (T - 1), fs Y, fs X, C]
    else:
      x = first
    return self.conv(x)


class UpBlock3D(nnx.Module):
  """`HunyuanVideoUpBlock3D`: resnets, then an upsampler when either factor is 2."""

  def __init__(self, cin: int, cout: int, num_layers: int, groups: int, factors: tuple[int, int],
               **kw):
    self.resnets = nnx.List([ResnetBlockCausal3D(cin if i == 0 else cout, cout, groups, **kw)
                             for i in range(num_layers)])
    self.upsamplers = nnx.List([UpsampleCausal3D(cout, *factors, **kw)] if max(factors) > 1
                               else [])

  def __call__(self, x: jax.Array) -> jax.Array:
    for r in self.resnets:
      x = r(x)
    for u in self.upsamplers:
      x = u(x)
    return x


class Decoder3D(nnx.Module):
  """`HunyuanVideoDecoder3D`: `[B, T, Y, X, C_lat] -> [B, F, H, W, out_channels]`."""

  def __init__(self, cfg: HunyuanVAEConfig, **kw):
    boc, g = cfg.block_out_channels, cfg.norm_num_groups
    self.conv_in = CausalConv3d(cfg.latent_channels, boc[-1], 3, **kw)
    self.mid_block = MidBlock3D(boc[-1], g, cfg.mid_block_add_attention, **kw)
    rev = list(reversed(boc))
    blocks, prev = [], rev[0]
    for ch, factors in zip(rev, cfg.upsample_factors):
      blocks.append(UpBlock3D(prev, ch, cfg.layers_per_block + 1, g, factors, **kw))
      prev = ch
    self.up_blocks = nnx.List(blocks)
    self.conv_norm_out = GroupNorm(g, boc[0], eps=_EPS, param_dtype=kw["param_dtype"])
    self.conv_out = CausalConv3d(boc[0], cfg.out_channels, 3, **kw)

  def __call__(self, z: jax.Array) -> jax.Array:
    x = self.mid_block(self.conv_in(z))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class HunyuanVAEDecoder(nnx.Module):
  """The decode path of `AutoencoderKLHunyuanVideo`: `post_quant_conv` and `decoder`."""

  def __init__(self, config: HunyuanVAEConfig, *, rngs: nnx.Rngs):
    self.config = config
    kw = dict(dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype), rngs=rngs)
    self.post_quant_conv = Conv3d(config.latent_channels, config.latent_channels, 1, **kw)
    self.decoder = Decoder3D(config, **kw)

  def decode(self, z: jax.Array) -> jax.Array:
    """`vae.decode(z).sample`: latents `[B, C, T, Y, X]` (unscaled) -> video `[B, 3, F, H, W]`
    in about [-1, 1] (fp32), `F = (T - 1) * 4 + 1`, `H, W = 8 Y, 8 X` (released config)."""
    cfg = self.config
    if z.ndim != 5 or z.shape[1] != cfg.latent_channels:
      raise ValueError(f"latents must be [B, {cfg.latent_channels}, T, Y, X], got shape "
                       f"{tuple(z.shape)}")
    x = jnp.transpose(z, (0, 2, 3, 4, 1)).astype(cfg.dtype)  # [B, T, Y, X, C]
    video = self.decoder(self.post_quant_conv(x))  # [B, F, H, W, 3]
    return jnp.transpose(video, (0, 4, 1, 2, 3)).astype(F32)

  def decode_scaled(self, latents: jax.Array) -> jax.Array:
    """Decodes the transformer's latents (`z * scaling_factor`): `decode(latents / 0.476986)`."""
    return self.decode(latents.astype(F32) / np.float32(self.config.scaling_factor))


@functools.partial(jax.jit, static_argnums=0)
def _decode_jit(graphdef, state, z):
  return nnx.merge(graphdef, state).decode(z)


def decode_jit(vae: HunyuanVAEDecoder, z: jax.Array) -> jax.Array:
  """Jitted `vae.decode` (one compile per latent shape)."""
  graphdef, state = nnx.split(vae)
  return _decode_jit(graphdef, state, jnp.asarray(z))


def _round_robin(vae: HunyuanVAEDecoder, devices: Sequence[jax.Device], home: jax.Device):
  """A whole-latent decode that sends its i-th call to `devices[i % D]` (each holding a copy of
  the weights) and returns every result on `home`, so that the tiles decode concurrently."""
  graphdef, state = nnx.split(vae)
  states = [jax.tree.map(lambda a, d=d: jax.device_put(a, d), state) for d in devices]
  calls = itertools.count()

  def decode(z: jax.Array) -> jax.Array:
    i = next(calls) % len(devices)
    return jax.device_put(_decode_jit(graphdef, states[i], jax.device_put(z, devices[i])), home)

  return decode


def decode_tiled(vae: HunyuanVAEDecoder, z: jax.Array, tiling: VAETiling = VAETiling(), *,
                 progress: bool = False,
                 devices: Sequence[jax.Device] | None = None) -> jax.Array:
  """diffusers' `vae.decode(z).sample` with its tiling: `[B, C, T, Y, X] -> [B, 3, F, H, W]`.

  The default `tiling` is diffusers' default (frame-wise past 4 latent frames, no spatial tiles);
  `VAETiling(spatial=True)` is `vae.enable_tiling()`. Each tile shape compiles once (per device).
  `devices`: spread the tiles over these devices, round robin (the result lands on the first).
  """
  cfg = vae.config
  z = jnp.asarray(z)
  if z.ndim != 5 or z.shape[1] != cfg.latent_channels:
    raise ValueError(f"latents must be [B, {cfg.latent_channels}, T, Y, X], got shape "
                     f"{tuple(z.shape)}")
  if devices is not None and len(devices) > 1:
    z = jax.device_put(z, devices[0])
    decode = _round_robin(vae, devices, devices[0])
  else:
    decode = functools.partial(decode_jit, vae)
  return tiled_decode(decode, z, tiling,
                      spatial_ratio=cfg.spatial_compression_ratio,
                      temporal_ratio=cfg.temporal_compression_ratio, progress=progress)


def from_params(config: HunyuanVAEConfig, params: Any) -> HunyuanVAEDecoder:
  """Builds the decoder around converted params (the pure dict of `nnx.state(vae, nnx.Param)`)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: HunyuanVAEDecoder(config, rngs=nnx.Rngs(0))))
  try:
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  except ValueError as e:
    raise ValueError(f"params do not fit a HunyuanVideo VAE decoder of this config: {e}") from e
  return nnx.merge(graphdef, state)
