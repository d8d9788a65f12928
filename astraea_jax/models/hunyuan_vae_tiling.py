"""Tiled decoding for HunyuanVideo's causal 3D VAE, the way diffusers' `AutoencoderKLHunyuanVideo`
does it (diffusers/models/autoencoders/autoencoder_kl_hunyuan_video.py, checked against 0.42.1).

Decoding a whole 720p x 129-frame clip at once does not fit any GPU: the mid-block attention alone
would hold `[N, N]` scores for N = 33 * 90 * 160 latent positions. diffusers decodes in overlapping
tiles and blends them linearly where they overlap:

  frame-wise (`use_framewise_decoding`, on by default in diffusers): latents of more than
      `min_num_frames / 4` frames are cut into chunks of `min_num_frames / 4 + 1` latent frames every
      `stride_num_frames / 4`; every chunk after the first drops its first decoded frame, then its
      first `min_num_frames - stride_num_frames` frames are blended with the previous chunk's last
      ones, and each chunk keeps `stride_num_frames` frames (the first `stride_num_frames + 1`).
  spatial (`enable_tiling()`, which HunyuanVideo's model card calls): latents larger than
      `min_height / 8` x `min_width / 8` are cut into tiles of that size every `stride / 8`
      latents, blended over `min - stride` pixels with the tile above and the one to the left, and
      each keeps `stride` x `stride` pixels. Inside frame-wise decoding each chunk is tiled this way.

Blends run in the same order as diffusers' in-place ones, so a tile blended with its left
neighbour sees that neighbour already blended with its own. GroupNorm statistics are taken per tile,
so a tiled decode is a different function from the whole-clip decode; this one is diffusers'
(`tests/test_hunyuan_vae.py` compares both modes with diffusers' output). Peak memory is that of
one tile; each distinct tile shape compiles once.

Dimension letters as in `hunyuan_vae`: B batch, C latent channels, T latent frames, Y, X latent
height and width; F, H, W video frames, height and width.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

__all__ = ["VAETiling", "blend", "num_tiles", "tiled_decode"]

DecodeFn = Callable[[jax.Array], jax.Array]  # [B, C, T, Y, X] -> [B, 3, F, H, W]


@dataclasses.dataclass(frozen=True)
class VAETiling:
  """diffusers' tiling parameters of `AutoencoderKLHunyuanVideo`, in video pixels and frames.

  `framewise`: `use_framewise_decoding` (diffusers' default True). `spatial`: `use_tiling` (False
  in diffusers until `enable_tiling()`). The sizes are diffusers' defaults: 256 px tiles every
  192 px, chunks of 16 frames every 12.
  """
  framewise: bool = True
  spatial: bool = False
  min_height: int = 256
  min_width: int = 256
  min_num_frames: int = 16
  stride_height: int = 192
  stride_width: int = 192
  stride_num_frames: int = 12

  def __post_init__(self):
    for size, stride, name in ((self.min_height, self.stride_height, "height"),
                               (self.min_width, self.stride_width, "width"),
                               (self.min_num_frames, self.stride_num_frames, "num_frames")):
      if not 0 < stride <= size:
        raise ValueError(f"tile stride must be in (0, min] along {name}: "
                         f"min_{name}={size}, stride_{name}={stride}")

  def check_ratios(self, spatial_ratio: int, temporal_ratio: int) -> None:
    """The latent tile sizes diffusers derives (`size // ratio`) must be positive."""
    for value, ratio, text in ((self.stride_height, spatial_ratio, f"{self.stride_height=}"),
                               (self.stride_width, spatial_ratio, f"{self.stride_width=}"),
                               (self.stride_num_frames, temporal_ratio,
                                f"{self.stride_num_frames=}")):
      if value // ratio < 1:
        raise ValueError(f"{text} is less than one latent (compression ratio {ratio})")


def blend(a: jax.Array, b: jax.Array, extent: int, axis: int) -> jax.Array:
  """diffusers' `blend_v` / `blend_h` / `blend_t`: the first `e = min(extent, both lengths)`
  entries of `b` along `axis` become `a[-e + i] * (1 - i / e) + b[i] * (i / e)`."""
  e = min(a.shape[axis], b.shape[axis], extent)
  if e <= 0:
    return b
  shape = [1] * b.ndim
  shape[axis] = e
  w = jnp.asarray((np.arange(e) / e).astype(np.float32).reshape(shape))
  head = jax.lax.slice_in_dim(b, 0, e, axis=axis)
  tail = jax.lax.slice_in_dim(a, a.shape[axis] - e, a.shape[axis], axis=axis)
  mixed = (tail * (1 - w) + head * w).astype(b.dtype)
  return jnp.concatenate([mixed, jax.lax.slice_in_dim(b, e, b.shape[axis], axis=axis)], axis=axis)


def _spatial_tiles(z_shape: tuple[int, ...], tiling: VAETiling,
                   spatial_ratio: int) -> list[list[tuple[slice, slice]]]:
  y, x = z_shape[3], z_shape[4]
  th, tw = tiling.min_height // spatial_ratio, tiling.min_width // spatial_ratio
  sh, sw = tiling.stride_height // spatial_ratio, tiling.stride_width // spatial_ratio
  return [[(slice(i, i + th), slice(j, j + tw)) for j in range(0, x, sw)] for i in range(0, y, sh)]


def _frame_chunks(num_frames: int, tiling: VAETiling, temporal_ratio: int) -> list[slice]:
  tf = tiling.min_num_frames // temporal_ratio
  sf = tiling.stride_num_frames // temporal_ratio
  return [slice(i, i + tf + 1) for i in range(0, num_frames, sf)]


def _uses_spatial(z_shape: tuple[int, ...], tiling: VAETiling, spatial_ratio: int) -> bool:
  return tiling.spatial and (z_shape[4] > tiling.min_width // spatial_ratio
                             or z_shape[3] > tiling.min_height // spatial_ratio)


def _uses_framewise(z_shape: tuple[int, ...], tiling: VAETiling, temporal_ratio: int) -> bool:
  return tiling.framewise and z_shape[2] > tiling.min_num_frames // temporal_ratio


def num_tiles(z_shape: tuple[int, ...], tiling: VAETiling, spatial_ratio: int,
              temporal_ratio: int) -> int:
  """How many decoder calls `tiled_decode` makes for latents of `z_shape` `[B, C, T, Y, X]`."""
  chunks = ([z_shape[:2] + (len(range(*s.indices(z_shape[2]))),) + z_shape[3:]
             for s in _frame_chunks(z_shape[2], tiling, temporal_ratio)]
            if _uses_framewise(z_shape, tiling, temporal_ratio) else [z_shape])
  return sum(sum(map(len, _spatial_tiles(c, tiling, spatial_ratio)))
             if _uses_spatial(c, tiling, spatial_ratio) else 1 for c in chunks)


def _decode_spatial(decode: DecodeFn, z: jax.Array, tiling: VAETiling, spatial_ratio: int,
                    bar) -> jax.Array:
  """diffusers' `tiled_decode` (or a plain decode when the latents fit one tile)."""
  if not _uses_spatial(z.shape, tiling, spatial_ratio):
    bar.update(1)
    return decode(z)
  rows = []
  for row_slices in _spatial_tiles(z.shape, tiling, spatial_ratio):
    row = []
    for ys, xs in row_slices:
      row.append(decode(z[:, :, :, ys, xs]))  # [B, 3, F, h, w]
      bar.update(1)
    rows.append(row)
  blend_h = tiling.min_height - tiling.stride_height
  blend_w = tiling.min_width - tiling.stride_width
  out_rows = []
  for i, row in enumerate(rows):
    kept = []
    for j in range(len(row)):
      tile = row[j]
      if i > 0:
        tile = blend(rows[i - 1][j], tile, blend_h, axis=3)
      if j > 0:
        tile = blend(row[j - 1], tile, blend_w, axis=4)
      row[j] = tile  # diffusers blends in place: later neighbours read the blended tile
      kept.append(tile[:, :, :, :tiling.stride_height, :tiling.stride_width])
    out_rows.append(jnp.concatenate(kept, axis=4))
  return jnp.concatenate(out_rows, axis=3)[:, :, :, :z.shape[3] * spatial_ratio,
                                           :z.shape[4] * spatial_ratio]


def tiled_decode(decode: DecodeFn, z: jax.Array, tiling: VAETiling, *, spatial_ratio: int = 8,
                 temporal_ratio: int = 4, progress: bool = False) -> jax.Array:
  """diffusers' `AutoencoderKLHunyuanVideo._decode` with its tiling settings.

  Args:
    decode: the whole-latent decode, `[B, C, T, Y, X] -> [B, 3, F, H, W]` with
      `F = (T - 1) * temporal_ratio + 1`, `H, W = spatial_ratio * (Y, X)` (e.g. `decode_jit`
      bound to a `HunyuanVAEDecoder`).
    z: unscaled latents `[B, C, T, Y, X]`.
    tiling: which tilings apply and their sizes.
    progress: a tqdm bar over the decoder calls.

  Returns:
    video `[B, 3, F, H, W]`, as `decode(z)` would be shaped.
  """
  tiling.check_ratios(spatial_ratio, temporal_ratio)
  total = num_tiles(tuple(z.shape), tiling, spatial_ratio, temporal_ratio)
  with tqdm(total=total, desc="decoding", unit="tile", disable=not progress or total == 1) as bar:
    if not _uses_framewise(z.shape, tiling, temporal_ratio):
      return _decode_spatial(decode, z, tiling, spatial_ratio, bar)
    chunks = []
    for i, frames in enumerate(_frame_chunks(z.shape[2], tiling, temporal_ratio)):
      video = _decode_spatial(decode, z[:, :, frames], tiling, spatial_ratio, bar)
      chunks.append(video if i == 0 else video[:, :, 1:])  # [B, 3, f, H, W]
    blend_f = tiling.min_num_frames - tiling.stride_num_frames
    kept = []
    for i in range(len(chunks)):
      if i == 0:
        kept.append(chunks[0][:, :, :tiling.stride_num_frames + 1])
      else:
        chunks[i] = blend(chunks[i - 1], chunks[i], blend_f, axis=2)
        kept.append(chunks[i][:, :, :tiling.stride_num_frames])
    num_frames = (z.shape[2] - 1) * temporal_ratio + 1
    return jnp.concatenate(kept, axis=2)[:, :, :num_frames]
