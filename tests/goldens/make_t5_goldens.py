"""Parity goldens for OpenSora v1.2's T5 v1.1 text encoder (DeepFloyd/t5-v1_1-xxl's architecture).

Run from the repository root with the reference environment:
  .venv-ref/bin/python tests/goldens/make_t5_goldens.py

Writes under tests/goldens/t5/:
  text_encoder/   a tiny random transformers `T5EncoderModel` in the v1.1 style (gated GELU, untied
                  embeddings, relative-position bias in the first block only, shared by all blocks),
                  fp32, `save_pretrained` layout (config.json + model.safetensors)
  tokenizer/      a tiny transformers `T5Tokenizer` (Unigram): tokenizer.json, tokenizer_config.json
  t5_golden.npz   ids and mask of the prompts as OpenSora's `T5Embedder.get_text_embeddings`
                  tokenizes them (padding="max_length", truncation, special tokens) and the encoder's
                  `last_hidden_state` for them
"""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import torch
import transformers
from transformers import AutoTokenizer, T5Config, T5EncoderModel, T5Tokenizer

OUT = pathlib.Path(__file__).resolve().parent / "t5"
SEQ_LEN = 20  # plays the role of OpenSora's 300-token text length
PROMPTS = [
    "a red fox runs through the snowy forest, the camera follows it slowly. aesthetic score: 6.5.",
    "ocean waves at sunset.",
    "a cat",
]
_WORDS = ("a cat walks on the grass dog and moon ocean waves at sunset cinematic lighting red fox "
          "runs through snowy forest while camera follows it slowly golden hour light aesthetic "
          "score").split()


def make_tokenizer() -> None:
  pieces = ["▁" + w for w in sorted(set(_WORDS))]
  chars = sorted({c for w in _WORDS for c in w} | set(",.:0123456789")) + ["▁"]
  vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
  vocab += [(p, -2.0 - 0.01 * i) for i, p in enumerate(pieces)]
  vocab += [(c, -9.0 - 0.01 * i) for i, c in enumerate(chars)]
  tok = T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)
  out = OUT / "tokenizer"
  tok.save_pretrained(out)
  for extra in out.iterdir():
    if extra.name not in ("tokenizer.json", "tokenizer_config.json"):
      extra.unlink()


def make_model() -> T5EncoderModel:
  # Three layers, so that sharing the first layer's position bias is exercised; d_kv * num_heads !=
  # d_model, so a transposed projection cannot pass unnoticed.
  config = T5Config(vocab_size=128, d_model=40, d_kv=8, num_heads=4, d_ff=48, num_layers=3,
                    relative_attention_num_buckets=8, relative_attention_max_distance=16,
                    feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
                    is_encoder_decoder=False, attn_implementation="eager")
  model = T5EncoderModel(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "layer_norm" in name:  # norm weights start at 1: randomize them to check their conversion
        p.copy_(1.0 + 0.5 * torch.randn_like(p))
      elif "relative_attention_bias" in name:
        p.copy_(torch.randn_like(p))
  return model


def main() -> None:
  torch.manual_seed(0)
  if OUT.exists():
    shutil.rmtree(OUT)
  OUT.mkdir(parents=True)
  make_tokenizer()
  tok = AutoTokenizer.from_pretrained(OUT / "tokenizer")
  model = make_model()
  assert sum("relative_attention_bias" in k for k in model.state_dict()) == 1
  model.save_pretrained(OUT / "text_encoder", safe_serialization=True)
  # The call of OpenSora's T5Embedder.get_text_embeddings (opensora/models/text_encoder/t5.py).
  enc = tok(PROMPTS, max_length=SEQ_LEN, padding="max_length", truncation=True,
            return_attention_mask=True, add_special_tokens=True, return_tensors="pt")
  ids, mask = enc.input_ids, enc.attention_mask
  assert len(set(mask.sum(1).tolist())) == len(PROMPTS), "the prompts must differ in length"
  with torch.no_grad():
    hidden = model(input_ids=ids, attention_mask=mask)["last_hidden_state"]
  np.savez(OUT / "t5_golden.npz", input_ids=ids.numpy().astype(np.int32),
           attention_mask=mask.numpy().astype(np.int32), last_hidden_state=hidden.numpy(),
           seq_len=np.int32(SEQ_LEN))
  (OUT / "prompts.json").write_text(json.dumps(
      {"prompts": PROMPTS, "seq_len": SEQ_LEN, "transformers": transformers.__version__,
       "torch": torch.__version__}, indent=1) + "\n")
  total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
  print(f"wrote {OUT} ({total / 1024:.0f} KiB)")


if __name__ == "__main__":
  main()
