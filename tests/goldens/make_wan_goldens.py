"""Parity goldens for the Wan2.1 transformer and its checkpoint converter.

Run from the repository root with the reference environment:
  .venv-ref/bin/python tests/goldens/make_wan_goldens.py

Builds a tiny diffusers `WanTransformer3DModel` (2 layers, 2 heads x head dim 12, FFN 32, text
dim 16, 4 channels) with random fp32 weights (norm scales and biases random too), and writes under
tests/goldens/wan/:
  diffusers/transformer/   config.json + diffusion_pytorch_model.safetensors (`save_pretrained`)
  original/                the same weights in the original Wan2.1 layout
                           (`blocks.0.self_attn.q.weight`, ...; names from the inverse of the table
                           in diffusers' scripts/convert_wan_to_diffusers.py), prefixed
                           `model.diffusion_model.`, sharded in two files with a
                           `diffusion_pytorch_model.safetensors.index.json`, and a config.json
  io.safetensors           inputs and outputs of two cases: `case{i}.latents [B, 4, T, Y, X]`,
                           `case{i}.timestep [B]`, `case{i}.context [B, 7, 16]`, `case{i}.out`
"""

from __future__ import annotations

import json
import pathlib
import re
import shutil

import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import save_file

OUT = pathlib.Path(__file__).resolve().parent / "wan"
SEED = 0
CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
              out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2,
              cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
              rope_max_seq_len=1024)
# latents [B, C, T, Y, X]; the first case has T, Y, X all different.
CASES = [(1, 4, 3, 4, 6), (2, 4, 2, 6, 4)]
TEXT_TOKENS = 7

# diffusers name -> original Wan2.1 name (inverse of convert_wan_to_diffusers.py, T2V entries).
# Block-level rules apply after `blocks.{i}.`; the norm2/norm3 swap is the reference's own.
TOP_TO_ORIGINAL = {
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "scale_shift_table": "head.modulation",
    "proj_out": "head.head",
    "patch_embedding": "patch_embedding",
}
BLOCK_TO_ORIGINAL = {
    "scale_shift_table": "modulation",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
    "norm2": "norm3",
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn1.norm_q": "self_attn.norm_q",
    "attn1.norm_k": "self_attn.norm_k",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "attn2.norm_q": "cross_attn.norm_q",
    "attn2.norm_k": "cross_attn.norm_k",
}
PREFIX = "model.diffusion_model."


def to_original(name: str) -> str:
  match = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)|blocks\.(\d+)\.(scale_shift_table)",
                       name)
  if match:
    layer = match.group(1) or match.group(4)
    module = match.group(2) or match.group(5)
    suffix = f".{match.group(3)}" if match.group(3) else ""
    return f"blocks.{layer}.{BLOCK_TO_ORIGINAL[module]}{suffix}"
  module, _, suffix = name.rpartition(".")
  if name == "scale_shift_table":
    return TOP_TO_ORIGINAL[name]
  return f"{TOP_TO_ORIGINAL[module]}.{suffix}"


def randomize(model: torch.nn.Module, gen: torch.Generator) -> None:
  """Every parameter random; norm scales near one (not one), so a missed scale shows."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
      elif name.endswith("weight") and p.ndim >= 2:
        fan_in = p[0].numel()
        p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
      else:
        p.copy_(0.2 * torch.randn(p.shape, generator=gen))


def main() -> None:
  torch.manual_seed(SEED)
  gen = torch.Generator().manual_seed(SEED)
  model = WanTransformer3DModel(**CONFIG).eval()
  randomize(model, gen)

  if OUT.exists():
    shutil.rmtree(OUT)
  (OUT / "diffusers").mkdir(parents=True)
  model.save_pretrained(OUT / "diffusers" / "transformer", safe_serialization=True)

  state = {k: v.contiguous() for k, v in model.state_dict().items()}
  original = {PREFIX + to_original(k): v for k, v in state.items()}
  assert len(original) == len(state)
  names = sorted(original)
  shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": names[:len(names) // 2],
            "diffusion_pytorch_model-00002-of-00002.safetensors": names[len(names) // 2:]}
  (OUT / "original").mkdir()
  weight_map = {}
  for file, keys in shards.items():
    save_file({k: original[k] for k in keys}, OUT / "original" / file)
    weight_map.update({k: file for k in keys})
  total = sum(v.numel() * v.element_size() for v in original.values())
  index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
  (OUT / "original" / "diffusion_pytorch_model.safetensors.index.json").write_text(
      json.dumps(index, indent=2) + "\n")
  original_config = {
      "_class_name": "WanModel", "_diffusers_version": "0.30.0", "model_type": "t2v",
      "patch_size": list(CONFIG["patch_size"]), "text_len": 512, "in_dim": CONFIG["in_channels"],
      "dim": CONFIG["num_attention_heads"] * CONFIG["attention_head_dim"],
      "ffn_dim": CONFIG["ffn_dim"], "freq_dim": CONFIG["freq_dim"], "text_dim": CONFIG["text_dim"],
      "out_dim": CONFIG["out_channels"], "num_heads": CONFIG["num_attention_heads"],
      "num_layers": CONFIG["num_layers"], "qk_norm": True, "cross_attn_norm": True,
      "eps": CONFIG["eps"]}
  (OUT / "original" / "config.json").write_text(json.dumps(original_config, indent=2) + "\n")

  io = {}
  for i, shape in enumerate(CASES):
    latents = torch.randn(shape, generator=gen)
    timestep = torch.rand(shape[0], generator=gen) * 1000.0
    context = torch.randn(shape[0], TEXT_TOKENS, CONFIG["text_dim"], generator=gen)
    with torch.no_grad():
      (out,) = model(latents, timestep, context, return_dict=False)
    io.update({f"case{i}.latents": latents, f"case{i}.timestep": timestep,
               f"case{i}.context": context, f"case{i}.out": out.contiguous()})
  save_file(io, OUT / "io.safetensors")
  print(f"wrote {OUT}")


if __name__ == "__main__":
  main()
