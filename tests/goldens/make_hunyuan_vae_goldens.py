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
"""

from __future__ import annotations

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
  total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
  print(f"wrote {OUT} ({total / 1024:.0f} KiB), video {tuple(video.shape)}, "
        f"max |video| {video.abs().max().item():.3f}")


if __name__ == "__main__":
  main()
