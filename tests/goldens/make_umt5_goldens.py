"""Parity goldens for the umT5 text encoder, its tokenizer and the torch-free `.pth` reader.

Run from the repository root with the reference environment:
  .venv-ref/bin/python tests/goldens/make_umt5_goldens.py

Writes under tests/goldens/umt5/:
  text_encoder/      a tiny random transformers `UMT5EncoderModel` (fp32), `save_pretrained` layout
  tokenizer/         a tiny transformers `T5Tokenizer` (Unigram), `save_pretrained` layout
  umt5_wan.pth       the same weights under Wan2.1's `T5Encoder` names (wan/modules/t5.py)
  umt5_golden.npz    token ids + masks (tokenizer golden); ids, mask and last hidden state of two
                     prompts; their zero-padded embeddings from diffusers'
                     `WanPipeline._get_t5_prompt_embeds`; the umT5-xxl relative-position buckets
  pth_cases.pth      tensors of several dtypes and layouts for the `.pth` reader
  pth_cases.npz      their values
"""

from __future__ import annotations

import json
import pathlib
import shutil
import types

import numpy as np
import torch
import transformers
from diffusers.pipelines.wan.pipeline_wan import WanPipeline, prompt_clean
from transformers import AutoTokenizer, T5Tokenizer, UMT5Config, UMT5EncoderModel
from transformers.models.umt5.modeling_umt5 import UMT5Attention

OUT = pathlib.Path(__file__).resolve().parent / "umt5"
SEQ_LEN = 24  # plays the role of Wan's 512-token text length
TOKENIZER_SEQ_LEN = 16

# Tokenizer golden prompts: cleaning (HTML entities, runs of whitespace), unknown characters, an
# empty prompt and one long enough to be truncated.
TOKENIZER_PROMPTS = [
    "a cat walks on the grass",
    "  A  dog\tand a\n\ncat &amp;amp; the moon  ",
    "ocean waves at sunset, cinematic lighting",
    "",
    "a red fox runs through the snowy forest while the camera follows it slowly, golden hour light",
    "zebra 🦓 über café",
]
MODEL_PROMPTS = [
    "a red fox runs through the snowy forest, the camera follows it slowly",
    "ocean waves at sunset",
]

_WORDS = ("a cat walks on the grass dog and moon ocean waves at sunset cinematic lighting red fox "
          "runs through snowy forest while camera follows it slowly golden hour light").split()


def make_tokenizer() -> None:
  pieces = ["▁" + w for w in sorted(set(_WORDS))]
  chars = sorted({c for w in _WORDS for c in w} | set(",&;.")) + ["▁"]
  subwords = ["ing", "ed", "s", "er", "ow", "est"]
  vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
  vocab += [(p, -2.0 - 0.01 * i) for i, p in enumerate(pieces)]
  vocab += [(p, -6.0 - 0.01 * i) for i, p in enumerate(subwords)]
  vocab += [(c, -9.0 - 0.01 * i) for i, c in enumerate(chars)]
  tok = T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)
  out = OUT / "tokenizer"
  tok.save_pretrained(out)
  # Keep only what a Wan / diffusers tokenizer folder has: tokenizer.json and tokenizer_config.json.
  for extra in out.iterdir():
    if extra.name not in ("tokenizer.json", "tokenizer_config.json"):
      extra.unlink()


def tokenize(tok, prompts: list[str], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  # Same call as WanPipeline._get_t5_prompt_embeds.
  enc = tok([prompt_clean(p) for p in prompts], padding="max_length", max_length=seq_len,
            truncation=True, add_special_tokens=True, return_attention_mask=True,
            return_tensors="pt")
  return enc.input_ids.numpy().astype(np.int32), enc.attention_mask.numpy().astype(np.int32)


def make_model() -> UMT5EncoderModel:
  # d_kv * num_heads != d_model, so a transposed projection cannot pass unnoticed.
  config = UMT5Config(vocab_size=128, d_model=40, d_kv=8, num_heads=4, d_ff=48, num_layers=2,
                      relative_attention_num_buckets=8, relative_attention_max_distance=16,
                      feed_forward_proj="gated-gelu", dropout_rate=0.0, is_encoder_decoder=False,
                      attn_implementation="eager")
  model = UMT5EncoderModel(config).eval()
  with torch.no_grad():
    # Norm weights start at 1; randomize them so that their conversion is checked too.
    for name, p in model.named_parameters():
      if "layer_norm" in name:
        p.copy_(1.0 + 0.5 * torch.randn_like(p))
  return model


def wan_state_dict(model: UMT5EncoderModel) -> dict[str, torch.Tensor]:
  """The transformers weights under the module names of Wan2.1's `T5Encoder` (wan/modules/t5.py)."""
  sd = model.state_dict()
  out = {"token_embedding.weight": sd["shared.weight"]}
  for i in range(model.config.num_layers):
    hf = f"encoder.block.{i}.layer."
    wan = f"blocks.{i}."
    out[wan + "norm1.weight"] = sd[hf + "0.layer_norm.weight"]
    for p in "qkvo":
      out[wan + f"attn.{p}.weight"] = sd[hf + f"0.SelfAttention.{p}.weight"]
    out[wan + "norm2.weight"] = sd[hf + "1.layer_norm.weight"]
    out[wan + "ffn.gate.0.weight"] = sd[hf + "1.DenseReluDense.wi_0.weight"]
    out[wan + "ffn.fc1.weight"] = sd[hf + "1.DenseReluDense.wi_1.weight"]
    out[wan + "ffn.fc2.weight"] = sd[hf + "1.DenseReluDense.wo.weight"]
    out[wan +
        "pos_embedding.embedding.weight"] = sd[hf +
                                               "0.SelfAttention.relative_attention_bias.weight"]
  out["norm.weight"] = sd["encoder.final_layer_norm.weight"]
  return {k: v.clone().contiguous() for k, v in out.items()}


def xxl_bucket_table() -> np.ndarray:
  """umT5-xxl bucket of every relative position -511..511 (key minus query), from transformers."""
  config = UMT5Config(d_model=64, d_kv=8, num_heads=8, relative_attention_num_buckets=32,
                      relative_attention_max_distance=128, is_decoder=False)
  attn = UMT5Attention(config, has_relative_attention_bias=True)
  rel = torch.arange(-511, 512)
  return attn._relative_position_bucket(rel).numpy().astype(np.int32)


def make_pth_cases() -> None:
  base = torch.arange(24, dtype=torch.float32) * 0.5 - 3.0
  cases = {
      "bf16": torch.randn(3, 5).to(torch.bfloat16),
      "fp16": torch.randn(4, 3).to(torch.float16),
      "fp32": torch.randn(2, 3, 4),
      "transposed": torch.randn(5, 7).t(),  # non-contiguous
      "shared_full": base.view(4, 6),  # these three views share one storage
      "shared_offset": base[6:18].view(3, 4),
      "shared_strided": base.view(4, 6)[:, 1::2],
      "bf16_transposed": torch.randn(3, 4).to(torch.bfloat16).t(),
      "fp8": torch.randn(6).to(torch.float8_e4m3fn),  # written by _rebuild_tensor_v3
      "int64": torch.arange(5, dtype=torch.int64) - 2,
      "bool": torch.tensor([True, False, True]),
      "scalar": torch.tensor(3.5),
      "empty": torch.zeros(0, 3),
  }
  nested = {
      "tensors": cases,
      "list": [torch.ones(2), torch.zeros(1)],
      "meta": {
          "step": 7,
          "name": "x"
      }
  }
  torch.save(nested, OUT / "pth_cases.pth")
  np.savez(
      OUT / "pth_cases.npz", **{
          k: v.to(torch.float32).numpy() if v.is_floating_point() else v.numpy()
          for k, v in cases.items()
      }, **{
          f"dtype_{k}": np.array(str(v.dtype).removeprefix("torch.")) for k, v in cases.items()
      })


def main() -> None:
  torch.manual_seed(0)
  if OUT.exists():
    shutil.rmtree(OUT)
  OUT.mkdir(parents=True)

  make_tokenizer()
  tok = AutoTokenizer.from_pretrained(OUT / "tokenizer")
  tok_ids, tok_mask = tokenize(tok, TOKENIZER_PROMPTS, TOKENIZER_SEQ_LEN)

  model = make_model()
  model.save_pretrained(OUT / "text_encoder", safe_serialization=True)
  torch.save(wan_state_dict(model), OUT / "umt5_wan.pth")

  ids, mask = tokenize(tok, MODEL_PROMPTS, SEQ_LEN)
  assert len(set(mask.sum(1).tolist())) == len(MODEL_PROMPTS), "the prompts must differ in length"
  with torch.no_grad():
    hidden = model(torch.from_numpy(ids).long(), torch.from_numpy(mask).long()).last_hidden_state
    # The pipeline's own code path: tokenizer, encoder, cut at each prompt's length, zero-pad.
    fake_pipe = types.SimpleNamespace(_execution_device=torch.device("cpu"), text_encoder=model,
                                      tokenizer=tok)
    embeds = WanPipeline._get_t5_prompt_embeds(fake_pipe, prompt=MODEL_PROMPTS,
                                               max_sequence_length=SEQ_LEN,
                                               device=torch.device("cpu"), dtype=torch.float32)

  np.savez(OUT / "umt5_golden.npz", tokenizer_ids=tok_ids, tokenizer_mask=tok_mask,
           tokenizer_seq_len=np.int32(TOKENIZER_SEQ_LEN), input_ids=ids, attention_mask=mask,
           last_hidden_state=hidden.numpy(), prompt_embeds=embeds.numpy(),
           xxl_buckets=xxl_bucket_table())
  (OUT / "prompts.json").write_text(
      json.dumps(
          {
              "tokenizer_prompts": TOKENIZER_PROMPTS,
              "model_prompts": MODEL_PROMPTS,
              "seq_len": SEQ_LEN,
              "transformers": transformers.__version__,
              "torch": torch.__version__
          }, indent=1, ensure_ascii=False) + "\n")

  make_pth_cases()
  total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
  print(f"wrote {OUT} ({total / 1024:.0f} KiB)")


if __name__ == "__main__":
  main()
