"""Parity goldens for the OpenSora v1.2 VAE (decoder path).

Run from the repository root with the reference environment:
  .venv-ref/bin/python tests/goldens/make_opensora_vae_goldens.py
  OPENSORA_SRC=/path/to/Open-Sora .venv-ref/bin/python tests/goldens/make_opensora_vae_goldens.py

Writes under tests/goldens/opensora_vae/:

  spatial_vae.safetensors  a tiny random diffusers `AutoencoderKL` (the SDXL VAE's architecture at
                           3 levels, 1 layer per block, 4 GroupNorm groups; fp32) under the released
                           checkpoint's names (`spatial_vae.module.*`): the decoder, post_quant_conv
                           and quant_conv (kept to check that the converter skips encoder tensors;
                           the rest of the encoder is left out to keep the file small)
  golden.npz               latents z [2, 4, 5, 6], `AutoencoderKL.decode(z).sample` [2, 3, 20, 24]
  config.json              the AutoencoderKL config and versions

and, only when OPENSORA_SRC names a checkout of hpcaitech/Open-Sora at tag v1.2.0 (17cce908) and
`einops` is importable (it is not in requirements.txt; without them this part is skipped and its
file kept):

  pipeline_golden.npz      OpenSora's own `VideoAutoencoderPipeline.decode(z, num_frames)`
                           (opensora/models/vae/vae.py and vae_temporal.py, run unmodified) with the
                           tiny AutoencoderKL above and a tiny `VAE_Temporal` (filters 8, 1 res
                           block per level, multipliers (1, 2, 2, 4), temporal_downsample (False, True,
                           True), 4 groups), micro_frame_size 17, scale (1.5, 2, 0.5, 3), shift
                           (0.1, -0.2, 0.3, 0): z34 [1, 4, 10, 2, 3] -> v34 [1, 3, 34, 8, 12] and
                           z24 [1, 4, 7, 2, 3] -> v24 [1, 3, 24, 8, 12]. The temporal weights are
                           not stored: every tensor is drawn from numpy's default_rng seeded with the
                           CRC-32 of its released name (convs N(0,1)/sqrt(fan_in), norm weights
                           1 + 0.2 N, biases 0.1 N), which tests/opensora_tiny.py reproduces.
                           Only `opensora.registry` (mmengine) and `opensora.utils.ckpt_utils`
                           (colossalai) are replaced by stubs at import time.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import tempfile
import types
import zlib

import diffusers
import numpy as np
import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

OUT = pathlib.Path(__file__).resolve().parent / "opensora_vae"
CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16),
              down_block_types=("DownEncoderBlock2D",) * 3,
              up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, norm_num_groups=4, sample_size=32)
TEMPORAL = dict(in_out_channels=4, latent_embed_dim=4, embed_dim=4, filters=8, num_res_blocks=1,
                channel_multipliers=(1, 2, 2, 4), temporal_downsample=(False, True, True),
                num_groups=4)
SCALE = (1.5, 2.0, 0.5, 3.0)
SHIFT = (0.1, -0.2, 0.3, 0.0)


def keyed_tensor(key: str, shape: tuple[int, ...]) -> torch.Tensor:
  rng = np.random.default_rng(zlib.crc32(key.encode()))
  x = rng.standard_normal(shape)
  if key.endswith(".bias"):
    x = 0.1 * x
  elif len(shape) == 1:
    x = 1 + 0.2 * x
  else:
    x = x / np.sqrt(np.prod(shape[1:]))
  return torch.from_numpy(x.astype(np.float32))


def make_spatial() -> AutoencoderKL:
  vae = AutoencoderKL(**CONFIG).eval()
  with torch.no_grad():
    for name, p in vae.named_parameters():
      if name.endswith("bias"):
        p.copy_(0.1 * torch.randn_like(p))
      elif p.ndim == 1:  # GroupNorm weights: away from 1 so that their conversion is checked
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
  return vae


def _import_opensora(src: pathlib.Path):
  """Imports OpenSora's vae.py / vae_temporal.py / utils.py from the checkout, with stubs for the
  registry and the checkpoint loader (their only imports outside torch, diffusers, transformers and
  einops)."""
  registry = types.ModuleType("opensora.registry")

  class Registry:
    def __init__(self):
      self.modules = {}

    def register_module(self, name=None, **kwargs):
      del kwargs

      def deco(obj):
        self.modules[name or obj.__name__] = obj
        return obj
      return deco

  registry.MODELS = Registry()
  registry.build_module = lambda cfg, reg: reg.modules[cfg["type"]](
      **{k: v for k, v in cfg.items() if k != "type"})
  ckpt = types.ModuleType("opensora.utils.ckpt_utils")
  ckpt.load_checkpoint = lambda *a, **k: (_ for _ in ()).throw(NotImplementedError())
  for name in ("opensora", "opensora.utils", "opensora.models", "opensora.models.vae"):
    pkg = types.ModuleType(name)
    pkg.__path__ = [str(src / name.replace(".", "/"))]  # bypass the package __init__ files
    sys.modules[name] = pkg
  sys.modules["opensora.registry"] = registry
  sys.modules["opensora.utils.ckpt_utils"] = ckpt
  import importlib  # pylint: disable=import-outside-toplevel
  importlib.import_module("opensora.models.vae.vae_temporal")
  return importlib.import_module("opensora.models.vae.vae")


def make_pipeline_golden(spatial: AutoencoderKL) -> None:
  src = os.environ.get("OPENSORA_SRC")
  try:
    import importlib  # pylint: disable=import-outside-toplevel
    importlib.import_module("einops")
  except ImportError:
    src = None
  if not src:
    print("skipping pipeline_golden.npz (set OPENSORA_SRC to an Open-Sora v1.2.0 checkout and "
          "install einops)")
    return
  vae_mod = _import_opensora(pathlib.Path(src))
  with tempfile.TemporaryDirectory() as tmp:
    spatial.save_pretrained(tmp)
    config = vae_mod.VideoAutoencoderPipelineConfig(
        vae_2d=dict(type="VideoAutoencoderKL", from_pretrained=tmp, micro_batch_size=4),
        vae_temporal=dict(type="VAE_Temporal", **TEMPORAL), micro_frame_size=17, shift=SHIFT,
        scale=SCALE)
    model = vae_mod.VideoAutoencoderPipeline(config).eval()
  with torch.no_grad():
    for key, value in model.temporal_vae.state_dict().items():
      value.copy_(keyed_tensor(f"temporal_vae.{key}", tuple(value.shape)))
  rng = np.random.default_rng(7)
  z34 = rng.standard_normal((1, 4, 10, 2, 3)).astype(np.float32)
  z24 = rng.standard_normal((1, 4, 7, 2, 3)).astype(np.float32)
  with torch.no_grad():
    v34 = model.decode(torch.from_numpy(z34), num_frames=34).numpy()
    v24 = model.decode(torch.from_numpy(z24), num_frames=24).numpy()
  np.savez(OUT / "pipeline_golden.npz", z34=z34, v34=v34, z24=z24, v24=v24)


def main() -> None:
  torch.manual_seed(0)
  OUT.mkdir(parents=True, exist_ok=True)
  vae = make_spatial()
  state = {f"spatial_vae.module.{k}": v.contiguous() for k, v in vae.state_dict().items()
           if not k.startswith("encoder.")}
  save_file(state, str(OUT / "spatial_vae.safetensors"))
  z = torch.randn(2, 4, 5, 6)
  with torch.no_grad():
    out = vae.decode(z).sample
  np.savez(OUT / "golden.npz", z=z.numpy(), decoded=out.numpy())
  make_pipeline_golden(vae)
  (OUT / "config.json").write_text(json.dumps(
      {"autoencoder_kl": CONFIG, "vae_temporal": TEMPORAL, "scale": SCALE, "shift": SHIFT,
       "diffusers": diffusers.__version__, "torch": torch.__version__}, indent=1) + "\n")
  total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
  print(f"wrote {OUT} ({total / 1024:.0f} KiB)")


if __name__ == "__main__":
  main()
