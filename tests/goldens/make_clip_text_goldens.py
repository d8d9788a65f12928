"""Goldens for CLIP-L's text encoder, whose pooled output HunyuanVideo uses (arXiv 2412.03603).

Run from the repository root with the reference environment:
  .venv-ref/bin/python tests/goldens/make_clip_text_goldens.py

Writes under tests/goldens/clip_text/:
  config.json, model.safetensors  a tiny random transformers `CLIPTextModel` (quick_gelu, the
                                  legacy `eos_token_id=2` of openai/clip-vit-large-patch14, so
                                  pooling takes the argmax of the ids), fp32, `save_pretrained`
  io.npz                          two rows of ids (one full, one right-padded with the end-of-text
                                  id as CLIP-L's tokenizer pads), their attention mask, and the
                                  model's `last_hidden_state` and `pooler_output` with the mask;
                                  `pooler_output_nomask` without it (HunyuanVideo's call); and
                                  `pooler_output_eos_first` with `eos_token_id` set to the
                                  end-of-text id (the post-#24773 rule: first position of that id)
  versions.json                   the transformers and torch versions that wrote them
"""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import torch
import transformers
from transformers import CLIPTextConfig, CLIPTextModel

OUT = pathlib.Path(__file__).resolve().parent / "clip_text"
SEQ_LEN = 16  # plays the role of CLIP-L's 77 positions (max_position_embeddings)
BOS, EOS = 97, 98  # the two largest ids, as <|startoftext|> 49406 / <|endoftext|> 49407 in CLIP


def make_model() -> CLIPTextModel:
  # intermediate_size 37 is odd and != hidden_size, so a transposed fc1 / fc2 cannot pass unnoticed.
  config = CLIPTextConfig(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=SEQ_LEN,
                          hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=32,
                          bos_token_id=0, eos_token_id=2, pad_token_id=1,
                          attn_implementation="eager")
  model = CLIPTextModel(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "layer_norm" in name and name.endswith("weight"):  # norm weights start at 1: randomize
        p.copy_(1.0 + 0.5 * torch.randn_like(p))
      elif name.endswith("bias"):  # biases start at 0: randomize to check their conversion
        p.copy_(0.1 * torch.randn_like(p))
      elif "embedding" in name:
        p.copy_(0.5 * torch.randn_like(p))
  return model


def make_ids() -> tuple[torch.Tensor, torch.Tensor]:
  g = torch.Generator().manual_seed(1)
  ids = torch.randint(3, BOS, (2, SEQ_LEN), generator=g)
  ids[:, 0] = BOS
  ids[0, -1] = EOS  # row 0: full length, end-of-text last
  length = 9  # row 1: bos, 7 tokens, eos, then padding with the eos id (CLIP-L's pad token)
  ids[1, length - 1:] = EOS
  mask = torch.ones_like(ids)
  mask[1, length:] = 0
  return ids, mask


def main() -> None:
  torch.manual_seed(0)
  if OUT.exists():
    shutil.rmtree(OUT)
  OUT.mkdir(parents=True)
  model = make_model()
  model.save_pretrained(OUT, safe_serialization=True)
  ids, mask = make_ids()
  with torch.no_grad():
    out = model(input_ids=ids, attention_mask=mask)
    nomask = model(input_ids=ids).pooler_output
    model.eos_token_id = EOS  # the non-legacy rule: first position holding eos_token_id
    eos_first = model(input_ids=ids, attention_mask=mask).pooler_output
  # Both rules pick the same tokens here, but from different code paths.
  assert torch.equal(eos_first, out.pooler_output)
  np.savez(OUT / "io.npz", input_ids=ids.numpy().astype(np.int32),
           attention_mask=mask.numpy().astype(np.int32),
           last_hidden_state=out.last_hidden_state.numpy(),
           pooler_output=out.pooler_output.numpy(), pooler_output_nomask=nomask.numpy(),
           pooler_output_eos_first=eos_first.numpy(), eos_first_id=np.int32(EOS))
  (OUT / "versions.json").write_text(json.dumps(
      {"transformers": transformers.__version__, "torch": torch.__version__}, indent=1) + "\n")
  total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
  print(f"wrote {OUT} ({total / 1024:.0f} KiB)")


if __name__ == "__main__":
  main()
