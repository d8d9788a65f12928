"""Parity goldens for HunyuanVideo's main text encoder (llava-llama-3-8b's Llama-3 decoder).

Run from the repository root with the reference environment:
  .venv-ref/bin/python tests/goldens/make_llama_text_goldens.py

diffusers' `HunyuanVideoPipeline` loads `text_encoder/` as `transformers.LlamaModel` and keeps
`hidden_states[-3]` of `output_hidden_states=True`. This writes under tests/goldens/llama_text/:
  config.json, model.safetensors   a tiny random fp32 `LlamaModel` (`save_pretrained` layout: no
                                   `model.` prefix), with GQA (4 query heads, 2 key/value heads),
                                   Llama-3's rope_theta 500000 and randomized RMSNorm weights; the
                                   projections are scaled up so that attention is far from uniform
                                   and RoPE matters
  io.npz                           input_ids [2, S] (row 1 right-padded, as Hunyuan pads) and
                                   attention_mask, every hidden state stacked `hidden_states
                                   [L + 1, 2, S, C]` (embeddings first, the last after the final
                                   norm); the same for a left-padded batch (`left_*`) whose leading
                                   padded queries see no key at all
  pipeline.json                    what `HunyuanVideoPipeline._get_llama_prompt_embeds` applies
                                   around the encoder: its default prompt template, crop_start,
                                   max_sequence_length and num_hidden_layers_to_skip
  versions.json                    the reference versions

The default attention (`sdpa`) is the one the pipeline runs. For right padding every query sees at
least the first token, so all positions are well defined and eager attention agrees (checked here).
A query that sees no key (left padding) gets a zero attention output under sdpa (PyTorch's safe
softmax), but a uniform average under eager attention: only sdpa's value is stored.
"""

from __future__ import annotations

import inspect
import json
import pathlib
import shutil

import diffusers
import numpy as np
import torch
import transformers
from diffusers.pipelines.hunyuan_video import pipeline_hunyuan_video
from transformers import LlamaConfig, LlamaModel

OUT = pathlib.Path(__file__).resolve().parent / "llama_text"
SEQ_LEN = 12
PAD_ID = 100  # a token id of its own, so that its embedding is visible at padded positions
LENGTHS = (SEQ_LEN, 7)  # row 1 is right-padded (Hunyuan's tokenizer pads right)
LEFT_PAD = 3  # leading pad tokens of row 1 of the left-padded batch


def make_model() -> LlamaModel:
  config = LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                       rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                       max_position_embeddings=64, pad_token_id=PAD_ID, bos_token_id=0,
                       eos_token_id=1, tie_word_embeddings=False)
  model = LlamaModel(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:  # norm weights start at 1: randomize them to check their conversion
        p.copy_(1.0 + 0.5 * torch.randn_like(p))
      elif "embed_tokens" in name:
        p.copy_(torch.randn_like(p))
      else:  # Linear [out, in]: unit-variance outputs, sharper q/k so that attention is peaky
        scale = 2.0 if ("q_proj" in name or "k_proj" in name) else 1.0
        p.copy_(scale * torch.randn_like(p) / p.shape[1] ** 0.5)
  return model


def hidden_states(model: LlamaModel, ids: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
  with torch.no_grad():
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
  assert len(out.hidden_states) == model.config.num_hidden_layers + 1
  torch.testing.assert_close(out.hidden_states[-1], out.last_hidden_state, rtol=0, atol=0)
  return torch.stack(out.hidden_states).numpy()  # [L + 1, B, S, C]


def main() -> None:
  torch.manual_seed(0)
  if OUT.exists():
    shutil.rmtree(OUT)
  OUT.mkdir(parents=True)
  model = make_model()
  assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
  model.save_pretrained(OUT, safe_serialization=True)

  ids = torch.randint(0, PAD_ID, (2, SEQ_LEN))
  mask = torch.zeros(2, SEQ_LEN, dtype=torch.long)
  for row, n in enumerate(LENGTHS):
    mask[row, :n] = 1
  ids[mask == 0] = PAD_ID
  hidden = hidden_states(model, ids, mask)

  left_ids = ids.clone()
  left_mask = torch.ones_like(mask)
  left_ids[1] = torch.roll(ids[0], LEFT_PAD)
  left_ids[1, :LEFT_PAD] = PAD_ID
  left_mask[1, :LEFT_PAD] = 0
  left_hidden = hidden_states(model, left_ids, left_mask)

  # Eager attention agrees wherever every query sees a key (all of the right-padded batch).
  model.config._attn_implementation = "eager"
  np.testing.assert_allclose(hidden_states(model, ids, mask), hidden, rtol=1e-5, atol=1e-5)
  eager_left = hidden_states(model, left_ids, left_mask)
  np.testing.assert_allclose(eager_left[:, :, LEFT_PAD:], left_hidden[:, :, LEFT_PAD:], rtol=1e-5,
                             atol=1e-5)

  np.savez(OUT / "io.npz", input_ids=ids.numpy().astype(np.int32),
           attention_mask=mask.numpy().astype(np.int32), hidden_states=hidden,
           left_input_ids=left_ids.numpy().astype(np.int32),
           left_attention_mask=left_mask.numpy().astype(np.int32), left_hidden_states=left_hidden)
  pipe = pipeline_hunyuan_video.HunyuanVideoPipeline
  defaults = inspect.signature(pipe._get_llama_prompt_embeds).parameters
  (OUT / "pipeline.json").write_text(json.dumps(
      {"template": pipeline_hunyuan_video.DEFAULT_PROMPT_TEMPLATE["template"],
       "crop_start": pipeline_hunyuan_video.DEFAULT_PROMPT_TEMPLATE["crop_start"],
       "max_sequence_length": inspect.signature(pipe.__call__).parameters[
           "max_sequence_length"].default,
       "num_hidden_layers_to_skip": defaults["num_hidden_layers_to_skip"].default},
      indent=1) + "\n")
  (OUT / "versions.json").write_text(json.dumps(
      {"transformers": transformers.__version__, "diffusers": diffusers.__version__,
       "torch": torch.__version__, "attn_implementation": "sdpa"}, indent=1) + "\n")
  total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
  print(f"wrote {OUT} ({total / 1024:.0f} KiB)")


if __name__ == "__main__":
  main()
