"""Parity goldens for the Wan2.1 VAE (`astraea_jax.models.wan_vae`) and its checkpoint converter.

Run from the repository root with the reference environment:
  .venv-ref/bin/python tests/goldens/make_wan_vae_goldens.py

Writes under tests/goldens/wan_vae/:
  vae/            a tiny random diffusers `AutoencoderKLWan` (fp32), `save_pretrained` layout
                  (config.json + diffusion_pytorch_model.safetensors)
  wan_vae.pth     the same weights under the names of Wan2.1's `WanVAE_` (wan/modules/vae.py), as
                  `torch.save` of its state dict, like the released `Wan2.1_VAE.pth`
  wan_vae_golden.npz
                  latents [1, z, 3, 4, 6] and diffusers' decoded video [1, 3, 9, 32, 48];
                  the WanPipeline denormalization of those latents; a video [1, 3, 9, 16, 16] and
                  the mean / logvar of its latent distribution

The tiny model has Wan2.1's structure (dim_mult [1, 2, 4, 4], 2 residual blocks, temporal
downsampling [False, True, True]) with base_dim 2 instead of 96, so its `.pth` has exactly the keys
of the real checkpoint; the renaming is checked against diffusers' own single-file converter.
"""

from __future__ import annotations

import json
import pathlib
import re
import shutil

import numpy as np
import torch
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

OUT = pathlib.Path(__file__).resolve().parent / "wan_vae"
# With 2 channels in its outer levels, the tiny model's RMS norms can meet near-zero vectors that
# amplify rounding; with this seed they do not (checked below against float64), so the 1e-4 parity
# tolerance leaves room for other backends' convolution algorithms (e.g. cuDNN on GPU).
MODEL_SEED = 1

# Must match PRESETS["tiny"] in astraea_jax/models/wan_vae.py.
CONFIG = dict(
    base_dim=2,
    z_dim=4,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    attn_scales=[],
    temperal_downsample=[False, True, True],
    latents_mean=[0.25, -0.5, 0.125, 1.0],
    latents_std=[1.5, 0.75, 2.0, 1.25],
)

# diffusers residual-block names -> Wan's (`ResidualBlock.residual` is an nn.Sequential).
_RESNET = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3",
           "conv2": "residual.6", "conv_shortcut": "shortcut"}
_TOP = {"quant_conv": "conv1", "post_quant_conv": "conv2"}
_ENDS = {"conv_in": "conv1", "norm_out": "head.0", "conv_out": "head.2"}


def _resnet(rest: str) -> str:
  layer, param = rest.split(".", 1)
  return f"{_RESNET[layer]}.{param}"


def diffusers_to_wan_name(key: str, num_res_blocks: int) -> str:
  """One diffusers `AutoencoderKLWan` key -> the `WanVAE_` key holding the same tensor."""
  part, rest = key.split(".", 1)
  if part in _TOP:
    return f"{_TOP[part]}.{rest}"
  layer, tail = rest.split(".", 1)
  if layer in _ENDS:
    return f"{part}.{_ENDS[layer]}.{tail}"
  if m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(.+)", rest):
    return f"{part}.middle.{2 * int(m[1])}.{_resnet(m[2])}"
  if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", rest):
    return f"{part}.middle.1.{m[1]}"
  if m := re.fullmatch(r"down_blocks\.(\d+)\.(norm1|conv1|norm2|conv2|conv_shortcut)\.(.+)", rest):
    return f"encoder.downsamples.{m[1]}.{_resnet(m[2] + '.' + m[3])}"
  if m := re.fullmatch(r"down_blocks\.(\d+)\.(.+)", rest):
    return f"encoder.downsamples.{m[1]}.{m[2]}"
  # Wan's decoder is one flat nn.Sequential: per level, num_res_blocks + 1 residual blocks, then
  # the upsampler.
  per_level = num_res_blocks + 2
  if m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest):
    return f"decoder.upsamples.{int(m[1]) * per_level + int(m[2])}.{_resnet(m[3])}"
  if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)", rest):
    return f"decoder.upsamples.{int(m[1]) * per_level + num_res_blocks + 1}.{m[2]}"
  raise KeyError(f"no Wan name for diffusers key {key!r}")


def make_model() -> AutoencoderKLWan:
  vae = AutoencoderKLWan(**CONFIG).eval()
  with torch.no_grad():
    for name, p in vae.named_parameters():
      # Non-trivial norm scales and biases, so that a misplaced tensor cannot go unnoticed.
      if name.endswith("gamma"):
        p.copy_(1.0 + 0.25 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.copy_(0.2 * torch.randn_like(p))
  return vae


def main() -> None:
  torch.manual_seed(MODEL_SEED)
  if OUT.exists():
    shutil.rmtree(OUT)
  OUT.mkdir(parents=True)
  vae = make_model()
  vae.save_pretrained(OUT / "vae", safe_serialization=True)

  state = {k: v.detach().clone().contiguous() for k, v in vae.state_dict().items()}
  wan_state = {diffusers_to_wan_name(k, CONFIG["num_res_blocks"]): v for k, v in state.items()}
  assert len(wan_state) == len(state)
  # diffusers' own converter of Wan's checkpoint must give back exactly the diffusers state dict.
  back = convert_wan_vae_to_diffusers(dict(wan_state))
  assert set(back) == set(state), sorted(set(back) ^ set(state))[:5]
  assert all(torch.equal(back[k], state[k]) for k in state)
  torch.save(wan_state, OUT / "wan_vae.pth")

  g = torch.Generator().manual_seed(1)
  latents = torch.randn(1, CONFIG["z_dim"], 3, 4, 6, generator=g)
  video_in = torch.rand(1, 3, 9, 16, 16, generator=g) * 2 - 1
  with torch.no_grad():
    video = vae.decode(latents).sample
    dist = vae.encode(video_in).latent_dist
    # diffusers' WanPipeline, just before `vae.decode`.
    mean = torch.tensor(CONFIG["latents_mean"]).view(1, -1, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(CONFIG["latents_std"]).view(1, -1, 1, 1, 1)
    denormalized = latents / inv_std + mean
    video64 = vae.double().decode(latents.double()).sample
    mean64 = vae.encode(video_in.double()).latent_dist.mean
  for name, fp32, fp64 in (("video", video, video64), ("mean", dist.mean, mean64)):
    err = float((fp32 - fp64).abs().max() / fp64.abs().max())
    assert err < 5e-6, f"the tiny model is ill-conditioned: fp32 {name} is {err:.1e} off fp64"
  clipped = float((video.abs() >= 1.0).float().mean())
  assert clipped < 0.05, f"{clipped:.1%} of the golden video is clipped: weak parity test"
  np.savez(OUT / "wan_vae_golden.npz",
           latents=latents.numpy(), video=video.numpy(), denormalized=denormalized.numpy(),
           video_in=video_in.numpy(), mean=dist.mean.numpy(), logvar=dist.logvar.numpy())
  total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
  print(json.dumps({"params": sum(v.numel() for v in state.values()), "tensors": len(state),
                    "video_std": float(video.std()), "clipped": clipped, "bytes": total}))


if __name__ == "__main__":
  main()
