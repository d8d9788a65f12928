"""Parity goldens for the HunyuanVideo causal 3D VAE (decoder path).

Run from the repository root with the reference environment:
  .venv-ref/bin/python tests/goldens/make_hunyuan_vae_goldens.py

Writes under tests/goldens/hunyuan_vae/:

  config.json, diffusion_pytorch_model.safetensors
           `AutoencoderKLHunyuanVideo.save_pretrained` of a tiny random VAE: the released
           architecture (four HunyuanVideoUpBlock3D, so up blocks 0-2 upsample space and blocks 1-2
           also time, 8x spatial / 4x temporal compression, mid-block attention with its causal
           frame mask) at block_out_channels (4, 8, 8, 8) (the last up block goes 8 -> 4
           channels, so a conv_shortcut is converted too), 1 layer per block, 4 GroupNorm groups,
           4 latent channels, fp32 (PyTorch's default dtype), seeded. The encoder and quant_conv
           are saved too, so that the converter is checked to skip them. GroupNorm weights and
           every bias are re-drawn (weights 1 + 0.3 N, biases 0.1 N) so that their conversion
           matters.
  io.npz   z [1, 4, 3, 4, 6] (B, C, T, Y, X; T, Y, X all different) and diffusers'
           `vae.decode(z).sample` [1, 3, 9, 32, 48] (F = (T - 1) * 4 + 1 frames), plus the
           versions used.
  tiled.npz
           diffusers' tiled decoding (`tiled_decode` / `_temporal_tiled_decode`): `z_framewise`
           [1, 4, 6, 4, 6] and its default `vae.decode` (frame-wise: 6 > 16 // 4 latent frames, in
           chunks of 5 every 3); `z_tiled` [1, 4, 4, 7, 5] and its decode after
           `enable_tiling(**TILING)` (32 px tiles every 24, 8-frame chunks every 4, so edge tiles of
           1 and 2 latents and chunks of 1-3 latent frames occur).
"""

from __future__ import annotations

import json
import pathlib

import diffusers
import numpy as np
import torch
from diffusers import AutoencoderKLHunyuanVideo

OUT = pathlib.Path(__file__).resolve().parent / "hunyuan_vae"
CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4,
              block_out_channels=(4, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
              scaling_factor=0.476986, spatial_compression_ratio=8, temporal_compression_ratio=4,
              mid_block_add_attention=True)
Z_SHAPE = (1, 4, 3, 4, 6)
Z_FRAMEWISE_SHAPE = (1, 4, 6, 4, 6)
Z_TILED_SHAPE = (1, 4, 4, 7, 5)
TILING = dict(tile_sample_min_height=32, tile_sample_min_width=32, tile_sample_min_num_frames=8,
              tile_sample_stride_height=24, tile_sample_stride_width=24,
              tile_sample_stride_num_frames=4)


def make_vae() -> AutoencoderKLHunyuanVideo:
  vae = AutoencoderKLHunyuanVideo(**CONFIG).eval()
  with torch.no_grad():
    for name, p in vae.named_parameters():
      if name.endswith("bias"):
        p.copy_(0.1 * torch.randn_like(p))
      elif p.ndim == 1:  # GroupNorm weights: away from 1 so that their conversion is checked
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
  return vae


def main() -> None:
  torch.manual_seed(0)
  OUT.mkdir(parents=True, exist_ok=True)
  vae = make_vae()
  # Plain decode: no tiling, and the frame-wise decoding only starts past 16 // 4 = 4 latent frames.
  vae.disable_tiling()
  assert Z_SHAPE[2] <= vae.tile_sample_min_num_frames // vae.temporal_compression_ratio
  vae.save_pretrained(str(OUT), safe_serialization=True)
  z = torch.randn(*Z_SHAPE, generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    video = vae.decode(z).sample
  assert video.shape == (1, 3, (Z_SHAPE[2] - 1) * 4 + 1, Z_SHAPE[3] * 8, Z_SHAPE[4] * 8)
  np.savez(OUT / "io.npz", z=z.numpy(), video=video.numpy(),
           versions=np.array(f"diffusers {diffusers.__version__}, torch {torch.__version__}"))
  # Tiled decoding: the defaults decode frame-wise past 4 latent frames; enable_tiling adds spatial tiles.
  z_framewise = torch.randn(*Z_FRAMEWISE_SHAPE, generator=torch.Generator().manual_seed(2))
  z_tiled = torch.randn(*Z_TILED_SHAPE, generator=torch.Generator().manual_seed(3))
  with torch.no_grad():
    assert vae.use_framewise_decoding and not vae.use_tiling
    video_framewise = vae.decode(z_framewise).sample
    vae.enable_tiling(**TILING)
    video_tiled = vae.decode(z_tiled).sample
    vae.disable_tiling()
  np.savez(OUT / "tiled.npz", z_framewise=z_framewise.numpy(),
           video_framewise=video_framewise.numpy(), z_tiled=z_tiled.numpy(),
           video_tiled=video_tiled.numpy(), tiling=np.array(json.dumps(TILING)),
           versions=np.array(f"diffusers {diffusers.__version__}, torch {torch.__version__}"))
  total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
  print(f"wrote {OUT} ({total / 1024:.0f} KiB), video {tuple(video.shape)}, "
        f"max |video| {video.abs().max().item():.3f}")


if __name__ == "__main__":
  main()
