"""End-to-end goldens: a whole tiny Wan2.1 text-to-video folder and diffusers' `WanPipeline` on it.

Run from the repository root with the reference environment (after make_umt5_goldens.py, whose
tokenizer it reuses):
  .venv-ref/bin/python tests/goldens/make_wan_pipeline_goldens.py

Builds random tiny components whose widths fit together (transformer text_dim = umT5 d_model 40,
transformer channels = VAE z_dim 4) and writes under tests/goldens/wan_pipeline/:
  diffusers/     the folder `WanPipeline.save_pretrained` writes (model_index.json, transformer/,
                 text_encoder/, tokenizer/, vae/, scheduler/ with UniPC flow_shift 3)
  original/      the same weights as the original Wan2.1 release lays them out: config.json +
                 diffusion_pytorch_model.safetensors (Wan names), models_t5_umt5-xxl-enc-bf16.pth,
                 Wan2.1_VAE.pth, google/umt5-xxl/ (tokenizer)
  golden.npz     prompts, initial noise, the final latents of diffusers' `WanPipeline` (UniPC,
                 4 steps, guidance 5, a negative prompt) and their VAE decode (`video`, [-1, 1])
"""

from __future__ import annotations

import json
import pathlib
import shutil
import sys

import numpy as np
import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from safetensors.torch import save_file
from transformers import AutoTokenizer

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import make_umt5_goldens  # noqa: E402  pylint: disable=wrong-import-position
import make_wan_goldens  # noqa: E402  pylint: disable=wrong-import-position
import make_wan_vae_goldens  # noqa: E402  pylint: disable=wrong-import-position

OUT = HERE / "wan_pipeline"
SEED = 3
TRANSFORMER = dict(make_wan_goldens.CONFIG, text_dim=40)
PROMPTS = ["a red fox walks on the grass", "ocean waves at sunset"]
NEGATIVE = "blurry"
HEIGHT, WIDTH, FRAMES, STEPS, GUIDANCE, SHIFT = 32, 48, 9, 4, 5.0, 3.0


def main() -> None:
  torch.manual_seed(SEED)
  gen = torch.Generator().manual_seed(SEED)
  transformer = WanTransformer3DModel(**TRANSFORMER).eval()
  make_wan_goldens.randomize(transformer, gen)
  text_encoder = make_umt5_goldens.make_model()
  vae = make_wan_vae_goldens.make_model()
  tokenizer = AutoTokenizer.from_pretrained(HERE / "umt5" / "tokenizer")
  scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                      num_train_timesteps=1000, flow_shift=SHIFT)
  pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                     transformer=transformer)

  if OUT.exists():
    shutil.rmtree(OUT)
  pipe.save_pretrained(OUT / "diffusers", safe_serialization=True)

  original = OUT / "original"
  original.mkdir()
  state = {make_wan_goldens.to_original(k): v.contiguous()
           for k, v in transformer.state_dict().items()}
  save_file(state, original / "diffusion_pytorch_model.safetensors")
  config = {
      "_class_name": "WanModel", "_diffusers_version": "0.30.0", "model_type": "t2v",
      "patch_size": list(TRANSFORMER["patch_size"]), "text_len": 512,
      "in_dim": TRANSFORMER["in_channels"],
      "dim": TRANSFORMER["num_attention_heads"] * TRANSFORMER["attention_head_dim"],
      "ffn_dim": TRANSFORMER["ffn_dim"], "freq_dim": TRANSFORMER["freq_dim"],
      "text_dim": TRANSFORMER["text_dim"], "out_dim": TRANSFORMER["out_channels"],
      "num_heads": TRANSFORMER["num_attention_heads"], "num_layers": TRANSFORMER["num_layers"],
      "qk_norm": True, "cross_attn_norm": True, "eps": TRANSFORMER["eps"]}
  (original / "config.json").write_text(json.dumps(config, indent=2) + "\n")
  torch.save(make_umt5_goldens.wan_state_dict(text_encoder),
             original / "models_t5_umt5-xxl-enc-bf16.pth")
  vae_state = {make_wan_vae_goldens.diffusers_to_wan_name(
      k, make_wan_vae_goldens.CONFIG["num_res_blocks"]): v.detach().clone().contiguous()
               for k, v in vae.state_dict().items()}
  torch.save(vae_state, original / "Wan2.1_VAE.pth")
  shutil.copytree(HERE / "umt5" / "tokenizer", original / "google" / "umt5-xxl")

  shape = (len(PROMPTS), TRANSFORMER["in_channels"], (FRAMES - 1) // 4 + 1, HEIGHT // 8, WIDTH // 8)
  noise = torch.randn(shape, generator=gen)
  with torch.no_grad():
    latents = pipe(prompt=PROMPTS, negative_prompt=NEGATIVE, height=HEIGHT, width=WIDTH,
                   num_frames=FRAMES, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                   latents=noise.clone(), output_type="latent").frames
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    video = vae.decode(latents / inv_std + mean, return_dict=False)[0]
  np.savez(OUT / "golden.npz", prompts=np.asarray(PROMPTS), negative_prompt=np.asarray(NEGATIVE),
           size=np.asarray([HEIGHT, WIDTH, FRAMES, STEPS]), guidance=np.float32(GUIDANCE),
           shift=np.float32(SHIFT), noise=noise.numpy(), latents=latents.numpy(),
           video=video.numpy())
  print(f"wrote {OUT}")


if __name__ == "__main__":
  main()
