"""Parity goldens for the HunyuanVideo transformer and its checkpoint converter.

Run from the repository root with the reference environment:
  .venv-ref/bin/python tests/goldens/make_hunyuan_goldens.py

Builds a tiny diffusers `HunyuanVideoTransformer3DModel` (the `tiny` preset of
`astraea_jax.models.hunyuan`: 2 dual-stream + 2 single-stream layers, 1 refiner layer, 2 heads x
head dim 8, RoPE axes (2, 2, 4), text dim 16, pooled dim 8, 4 channels, guidance embedding) with
random fp32 weights (norm scales and biases random too), and writes under tests/goldens/hunyuan/:
  diffusers/transformer/   config.json + diffusion_pytorch_model.safetensors (`save_pretrained`)
  original/transformers/mp_rank_00_model_states.pt
                           the same weights as the original HunyuanVideo release stores them:
                           `torch.save({"module": state_dict})`, keys named as the original
                           repository (`double_blocks.0.img_attn_qkv.weight`, ...; the inverse of
                           the table in diffusers' scripts/convert_hunyuan_video_to_diffusers.py)
                           with fused q/k/v projections, fused `linear1` (q, k, v, MLP-in) in the
                           single blocks and the final modulation in (shift, scale) order
  io.npz                   two cases, `case{i}.{latents [B, 4, T, Y, X], timestep [B],
                           text [B, 7, 16], text_mask [B, 7], pooled [B, 8], guidance [B]}` and the
                           outputs `case{i}.out [B, 4, T, Y, X]` and `case{i}.refined [B, 7, 16]`
                           (the token refiner's output, which padded text tokens never feed into
                           `out`)

The .npz is written with fixed zip timestamps so that regenerating gives identical bytes.
"""

from __future__ import annotations

import io
import pathlib
import re
import shutil
import zipfile

import numpy as np
import torch
from diffusers import HunyuanVideoTransformer3DModel
from diffusers.loaders.single_file_utils import convert_hunyuan_video_transformer_to_diffusers

OUT = pathlib.Path(__file__).resolve().parent / "hunyuan"
SEED = 0
CONFIG = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
              num_layers=2, num_single_layers=2, num_refiner_layers=1, mlp_ratio=4.0, patch_size=2,
              patch_size_t=1, qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=16,
              pooled_projection_dim=8, rope_theta=256.0, rope_axes_dim=(2, 2, 4))
HIDDEN = CONFIG["num_attention_heads"] * CONFIG["attention_head_dim"]
TEXT_TOKENS = 7
# latents [B, C, T, Y, X] and the valid text length of each sample. Case 0 has T, Y, X all
# different; case 1 pads its two prompts to different lengths.
CASES = [((1, 4, 3, 4, 6), [5]), ((2, 4, 2, 6, 4), [7, 3])]

# diffusers module name -> original HunyuanVideo name (inverse of
# convert_hunyuan_video_to_diffusers.py).
TOP_TO_ORIGINAL = {
    "x_embedder.proj": "img_in.proj",
    "time_text_embed.timestep_embedder.linear_1": "time_in.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "time_in.mlp.2",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.mlp.0",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.mlp.2",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "context_embedder.proj_in": "txt_in.input_embedder",
    "context_embedder.time_text_embed.timestep_embedder.linear_1": "txt_in.t_embedder.mlp.0",
    "context_embedder.time_text_embed.timestep_embedder.linear_2": "txt_in.t_embedder.mlp.2",
    "context_embedder.time_text_embed.text_embedder.linear_1": "txt_in.c_embedder.linear_1",
    "context_embedder.time_text_embed.text_embedder.linear_2": "txt_in.c_embedder.linear_2",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
REFINER_TO_ORIGINAL = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attn.to_out.0": "self_attn_proj",
    "ff.net.0.proj": "mlp.fc1",
    "ff.net.2": "mlp.fc2",
    "norm_out.linear": "adaLN_modulation.1",
}
DOUBLE_TO_ORIGINAL = {
    "norm1.linear": "img_mod.linear",
    "norm1_context.linear": "txt_mod.linear",
    "attn.norm_q": "img_attn_q_norm",
    "attn.norm_k": "img_attn_k_norm",
    "attn.to_out.0": "img_attn_proj",
    "attn.norm_added_q": "txt_attn_q_norm",
    "attn.norm_added_k": "txt_attn_k_norm",
    "attn.to_add_out": "txt_attn_proj",
    "ff.net.0.proj": "img_mlp.fc1",
    "ff.net.2": "img_mlp.fc2",
    "ff_context.net.0.proj": "txt_mlp.fc1",
    "ff_context.net.2": "txt_mlp.fc2",
}
SINGLE_TO_ORIGINAL = {
    "norm.linear": "modulation.linear",
    "attn.norm_q": "q_norm",
    "attn.norm_k": "k_norm",
    "proj_out": "linear2",
}
# Projections the original stores as one tensor, concatenated along the output axis in this order.
FUSED = {
    "refiner": {"self_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v")},
    "double": {"img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
               "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")},
    "single": {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")},
}
GROUPS = {
    "refiner": ("context_embedder.token_refiner.refiner_blocks",
                "txt_in.individual_token_refiner.blocks", REFINER_TO_ORIGINAL),
    "double": ("transformer_blocks", "double_blocks", DOUBLE_TO_ORIGINAL),
    "single": ("single_transformer_blocks", "single_blocks", SINGLE_TO_ORIGINAL),
}


def to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
  """diffusers state dict -> original HunyuanVideo state dict."""
  out: dict[str, torch.Tensor] = {}
  used: set[str] = set()
  for group, (prefix, orig_prefix, table) in GROUPS.items():
    layers = sorted({int(m.group(1)) for k in state
                     if (m := re.fullmatch(rf"{re.escape(prefix)}\.(\d+)\..+", k))})
    for i in layers:
      src, dst = f"{prefix}.{i}.", f"{orig_prefix}.{i}."
      for fused, parts in FUSED[group].items():
        for param in ("weight", "bias"):
          names = [f"{src}{p}.{param}" for p in parts]
          out[f"{dst}{fused}.{param}"] = torch.cat([state[n] for n in names], dim=0)
          used.update(names)
      for module, orig in table.items():
        for param in ("weight", "bias"):
          if f"{src}{module}.{param}" in state:
            out[f"{dst}{orig}.{param}"] = state[f"{src}{module}.{param}"]
            used.add(f"{src}{module}.{param}")
  for module, orig in TOP_TO_ORIGINAL.items():
    for param in ("weight", "bias"):
      value = state[f"{module}.{param}"]
      if module == "norm_out.linear":
        # diffusers' (scale, shift) back to the original (shift, scale).
        scale, shift = value.chunk(2, dim=0)
        value = torch.cat([shift, scale], dim=0)
      out[f"{orig}.{param}"] = value
      used.add(f"{module}.{param}")
  assert used == set(state), sorted(set(state) - used)
  return {k: v.contiguous() for k, v in out.items()}


def check_round_trip(original: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
  """The original dict converts back to `state` with diffusers' own conversion."""
  # diffusers' converter hard-codes hidden size 3072 to split `linear1`; split those here.
  rest = {k: v.clone() for k, v in original.items() if ".linear1." not in k}
  back = convert_hunyuan_video_transformer_to_diffusers(rest)
  for key, value in original.items():
    if ".linear1." in key:
      i, param = re.fullmatch(r"single_blocks\.(\d+)\.linear1\.(weight|bias)", key).groups()
      parts = value.split([HIDDEN, HIDDEN, HIDDEN, value.shape[0] - 3 * HIDDEN], dim=0)
      for name, part in zip(FUSED["single"]["linear1"], parts):
        back[f"single_transformer_blocks.{i}.{name}.{param}"] = part
  assert set(back) == set(state), sorted(set(back) ^ set(state))
  for key, value in state.items():
    assert torch.equal(back[key], value), key


def randomize(model: torch.nn.Module, gen: torch.Generator) -> None:
  """Random non-zero weights of a size that keeps activations O(1)."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name and name.endswith("weight") and p.ndim == 1:
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
      elif name.endswith("weight") and p.ndim >= 2:
        fan_in = p[0].numel()
        p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
      else:
        p.copy_(0.2 * torch.randn(p.shape, generator=gen))


def save_npz(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
  """`np.savez` with a fixed timestamp on every member (np.savez stamps the current time)."""
  with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
    for name, array in arrays.items():
      buf = io.BytesIO()
      np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
      zf.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), buf.getvalue())


def main() -> None:
  torch.manual_seed(SEED)
  gen = torch.Generator().manual_seed(SEED)
  model = HunyuanVideoTransformer3DModel(**CONFIG).eval()
  randomize(model, gen)

  if OUT.exists():
    shutil.rmtree(OUT)
  (OUT / "diffusers").mkdir(parents=True)
  model.save_pretrained(OUT / "diffusers" / "transformer", safe_serialization=True)

  state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
  original = to_original(state)
  check_round_trip(original, state)
  (OUT / "original" / "transformers").mkdir(parents=True)
  torch.save({"module": original}, OUT / "original" / "transformers" / "mp_rank_00_model_states.pt")

  refined = {}
  hook = model.context_embedder.register_forward_hook(
      lambda module, args, output: refined.__setitem__("out", output))
  arrays = {}
  for i, (shape, lengths) in enumerate(CASES):
    b = shape[0]
    latents = torch.randn(shape, generator=gen)
    timestep = torch.rand(b, generator=gen) * 1000.0
    text = torch.randn(b, TEXT_TOKENS, CONFIG["text_embed_dim"], generator=gen)
    text_mask = (torch.arange(TEXT_TOKENS)[None, :] < torch.tensor(lengths)[:, None]).to(
        torch.int64)
    pooled = torch.randn(b, CONFIG["pooled_projection_dim"], generator=gen)
    guidance = torch.full((b,), 6000.0) + 500.0 * torch.rand(b, generator=gen)
    with torch.no_grad():
      (out,) = model(latents, timestep, text, text_mask, pooled, guidance, return_dict=False)
    arrays.update({f"case{i}.latents": latents, f"case{i}.timestep": timestep,
                   f"case{i}.text": text, f"case{i}.text_mask": text_mask,
                   f"case{i}.pooled": pooled, f"case{i}.guidance": guidance,
                   f"case{i}.out": out, f"case{i}.refined": refined["out"]})
  hook.remove()
  save_npz(OUT / "io.npz", {k: v.detach().numpy() for k, v in arrays.items()})
  print(f"wrote {OUT}")


if __name__ == "__main__":
  main()
