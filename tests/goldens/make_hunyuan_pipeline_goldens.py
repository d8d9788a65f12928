"""End-to-end goldens: a whole tiny HunyuanVideo text-to-video folder and diffusers'
`HunyuanVideoPipeline` on it.

Run from the repository root with the reference environment:
  .venv-ref/bin/python tests/goldens/make_hunyuan_pipeline_goldens.py

Builds random tiny components whose widths fit together (transformer text_embed_dim = Llama hidden
32, pooled_projection_dim = CLIP hidden 32, transformer channels = VAE latent channels 4), reusing
the per-model golden makers, and two tiny word-level fast tokenizers. Writes under
tests/goldens/hunyuan_pipeline/:
  diffusers/     the folder `HunyuanVideoPipeline.save_pretrained` writes (model_index.json,
                 transformer/, text_encoder/ (LlamaModel), text_encoder_2/ (CLIPTextModel, 77
                 positions as CLIP-L), tokenizer/ + tokenizer_2/ (tokenizer.json), vae/,
                 scheduler/ (FlowMatchEulerDiscreteScheduler, shift 7))
  golden.npz     prompts, the initial noise passed as `latents=`, what `encode_prompt` gives
                 (Llama hidden state -(skip + 1) cropped past the template's system part, its mask,
                 CLIP pooled) with the token ids behind them, the scheduler's sigmas / timesteps,
                 the guidance the transformer gets (guidance_scale * 1000), the latents after each
                 step, the final latents (`output_type="latent"`, not divided by the scaling
                 factor) and the raw VAE decode of latents / scaling_factor (`video`, nominally
                 [-1, 1], unclamped); fixed zip timestamps
  meta.json      prompts, sizes, steps, guidance, shift, the prompt template with its crop_start,
                 max_sequence_length, num_hidden_layers_to_skip, seed, versions
"""

from __future__ import annotations

import inspect
import json
import pathlib
import shutil
import sys

import diffusers
import numpy as np
import torch
import transformers
from diffusers import (FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline,
                       HunyuanVideoTransformer3DModel)
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import make_clip_text_goldens  # noqa: E402  pylint: disable=wrong-import-position
import make_hunyuan_goldens  # noqa: E402  pylint: disable=wrong-import-position
import make_hunyuan_vae_goldens  # noqa: E402  pylint: disable=wrong-import-position
import make_llama_text_goldens  # noqa: E402  pylint: disable=wrong-import-position

OUT = HERE / "hunyuan_pipeline"
SEED = 5
LLAMA_HIDDEN, CLIP_HIDDEN = 32, 32
TRANSFORMER = dict(make_hunyuan_goldens.CONFIG, text_embed_dim=LLAMA_HIDDEN,
                   pooled_projection_dim=CLIP_HIDDEN,
                   in_channels=make_hunyuan_vae_goldens.CONFIG["latent_channels"],
                   out_channels=make_hunyuan_vae_goldens.CONFIG["latent_channels"],
                   guidance_embeds=True)
PROMPTS = ["a red fox walks on the grass", "ocean waves at sunset"]
HEIGHT, WIDTH, FRAMES, STEPS, GUIDANCE, SHIFT = 32, 48, 9, 3, 6.0, 7.0
MAX_SEQUENCE_LENGTH = 16
CLIP_POSITIONS = 77  # the pipeline always tokenizes CLIP input to 77 tokens
SYSTEM = "<|start_header_id|>system<|end_header_id|> describe the video <|eot_id|>"
USER = "<|start_header_id|>user<|end_header_id|> "
TEMPLATE = SYSTEM + USER + "{} <|eot_id|>"

LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eot_id|>", "<unk>"]
LLAMA_PAD = "<pad>"  # id make_llama_text_goldens.PAD_ID (100), the model's pad_token_id
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"  # ids 97, 98 as in make_clip_text_goldens


def words() -> list[str]:
  """Every plain word of the prompts and the template, in first-seen order."""
  seen: list[str] = []
  text = " ".join([TEMPLATE.replace("{}", "")] + PROMPTS)
  for special in LLAMA_SPECIALS:
    text = text.replace(special, " ")
  for word, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text):
    if word not in seen:
      seen.append(word)
  return seen


def make_llama_tokenizer() -> PreTrainedTokenizerFast:
  vocab = {tok: i for i, tok in enumerate(LLAMA_SPECIALS + words())}
  vocab[LLAMA_PAD] = make_llama_text_goldens.PAD_ID
  assert len(vocab) - 1 < make_llama_text_goldens.PAD_ID
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.add_special_tokens(LLAMA_SPECIALS + [LLAMA_PAD])
  tok.post_processor = processors.TemplateProcessing(
      single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
      special_tokens=[("<|begin_of_text|>", vocab["<|begin_of_text|>"])])
  return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                 eos_token="<|end_of_text|>", unk_token="<unk>",
                                 pad_token=LLAMA_PAD, padding_side="right",
                                 model_max_length=1024)


def make_clip_tokenizer() -> PreTrainedTokenizerFast:
  vocab = {tok: i for i, tok in enumerate(["<unk>"] + words())}
  vocab[CLIP_BOS], vocab[CLIP_EOS] = make_clip_text_goldens.BOS, make_clip_text_goldens.EOS
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.add_special_tokens(["<unk>", CLIP_BOS, CLIP_EOS])
  tok.post_processor = processors.TemplateProcessing(
      single=f"{CLIP_BOS} $A {CLIP_EOS}", pair=f"{CLIP_BOS} $A {CLIP_EOS} {CLIP_BOS} $B {CLIP_EOS}",
      special_tokens=[(CLIP_BOS, vocab[CLIP_BOS]), (CLIP_EOS, vocab[CLIP_EOS])])
  return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=CLIP_BOS, eos_token=CLIP_EOS,
                                 unk_token="<unk>", pad_token=CLIP_EOS, padding_side="right",
                                 model_max_length=CLIP_POSITIONS)


def save_dir_size(path: pathlib.Path) -> int:
  return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
  torch.manual_seed(SEED)
  gen = torch.Generator().manual_seed(SEED)
  transformer = HunyuanVideoTransformer3DModel(**TRANSFORMER).eval()
  make_hunyuan_goldens.randomize(transformer, gen)
  text_encoder = make_llama_text_goldens.make_model()
  assert text_encoder.config.hidden_size == LLAMA_HIDDEN
  make_clip_text_goldens.SEQ_LEN = CLIP_POSITIONS  # make_model reads it for the position count
  text_encoder_2 = make_clip_text_goldens.make_model()
  assert text_encoder_2.config.hidden_size == CLIP_HIDDEN
  assert text_encoder_2.config.max_position_embeddings == CLIP_POSITIONS
  # make_model asks for eager attention; a pipeline loaded from the saved folder runs sdpa.
  text_encoder_2.set_attn_implementation("sdpa")
  vae = make_hunyuan_vae_goldens.make_vae()
  vae.disable_tiling()
  tokenizer, tokenizer_2 = make_llama_tokenizer(), make_clip_tokenizer()
  scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT)
  pipe = HunyuanVideoPipeline(text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=transformer, vae=vae, scheduler=scheduler,
                              text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
  pipe.set_progress_bar_config(disable=True)

  # crop_start: tokens (with the BOS) before the user's text.
  crop_start = len(tokenizer(SYSTEM + USER).input_ids)
  assert tokenizer(SYSTEM + USER).input_ids[0] == tokenizer.bos_token_id
  prompt_template = {"template": TEMPLATE, "crop_start": crop_start}
  skip = inspect.signature(
      HunyuanVideoPipeline._get_llama_prompt_embeds).parameters["num_hidden_layers_to_skip"].default
  for p in PROMPTS:  # no word falls back to <unk>
    assert tokenizer.unk_token_id not in tokenizer(TEMPLATE.format(p)).input_ids
    assert tokenizer_2.unk_token_id not in tokenizer_2(p).input_ids

  if OUT.exists():
    shutil.rmtree(OUT)
  pipe.save_pretrained(OUT / "diffusers", safe_serialization=True)

  vae_t = make_hunyuan_vae_goldens.CONFIG["temporal_compression_ratio"]
  vae_s = make_hunyuan_vae_goldens.CONFIG["spatial_compression_ratio"]
  shape = (len(PROMPTS), TRANSFORMER["in_channels"], (FRAMES - 1) // vae_t + 1, HEIGHT // vae_s,
           WIDTH // vae_s)
  noise = torch.randn(shape, generator=gen)
  ids = tokenizer([TEMPLATE.format(p) for p in PROMPTS],
                  max_length=MAX_SEQUENCE_LENGTH + crop_start, padding="max_length",
                  truncation=True, return_tensors="pt")
  ids_2 = tokenizer_2(PROMPTS, max_length=CLIP_POSITIONS, padding="max_length", truncation=True,
                      return_tensors="pt")
  step_latents = []

  def keep_latents(pipeline, i, t, kwargs):  # latents after each scheduler step
    del pipeline, i, t
    step_latents.append(kwargs["latents"].clone())
    return {}

  with torch.no_grad():
    prompt_embeds, pooled, prompt_mask = pipe.encode_prompt(
        prompt=PROMPTS, prompt_template=prompt_template, max_sequence_length=MAX_SEQUENCE_LENGTH,
        device=torch.device("cpu"))
    latents = pipe(prompt=PROMPTS, height=HEIGHT, width=WIDTH, num_frames=FRAMES,
                   num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                   prompt_template=prompt_template, max_sequence_length=MAX_SEQUENCE_LENGTH,
                   generator=torch.Generator().manual_seed(SEED), latents=noise.clone(),
                   output_type="latent", callback_on_step_end=keep_latents,
                   callback_on_step_end_tensor_inputs=["latents"]).frames
    video = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
  sigmas = pipe.scheduler.sigmas.clone()
  timesteps = pipe.scheduler.timesteps.clone()
  assert latents.shape == noise.shape and len(step_latents) == STEPS
  assert torch.equal(step_latents[-1], latents)
  assert video.shape == (len(PROMPTS), 3, FRAMES, HEIGHT, WIDTH), video.shape
  assert prompt_embeds.shape == (len(PROMPTS), MAX_SEQUENCE_LENGTH, LLAMA_HIDDEN)
  assert not torch.allclose(latents[0], latents[1], atol=1e-3)
  assert video.std() > 0.05, video.std()

  arrays = {
      "prompts": np.asarray(PROMPTS),
      "noise": noise.numpy(),
      "input_ids": ids.input_ids.numpy().astype(np.int32),
      "input_ids_mask": ids.attention_mask.numpy().astype(np.int32),
      "clip_input_ids": ids_2.input_ids.numpy().astype(np.int32),
      "prompt_embeds": prompt_embeds.numpy(),
      "prompt_attention_mask": prompt_mask.numpy().astype(np.int32),
      "pooled_prompt_embeds": pooled.numpy(),
      "sigmas": sigmas.numpy(),
      "timesteps": timesteps.numpy(),
      "transformer_guidance": np.full((len(PROMPTS),), GUIDANCE * 1000.0, np.float32),
      "step_latents": torch.stack(step_latents).numpy(),
      "latents": latents.numpy(),
      "video": video.numpy(),
  }
  make_hunyuan_goldens.save_npz(OUT / "golden.npz", arrays)
  meta = {
      "prompts": PROMPTS, "height": HEIGHT, "width": WIDTH, "frames": FRAMES, "steps": STEPS,
      "guidance": GUIDANCE, "shift": SHIFT, "prompt_template": prompt_template,
      "crop_start": crop_start, "max_sequence_length": MAX_SEQUENCE_LENGTH,
      "clip_max_length": CLIP_POSITIONS, "num_hidden_layers_to_skip": skip, "seed": SEED,
      "scaling_factor": vae.config.scaling_factor,
      "versions": {"diffusers": diffusers.__version__, "transformers": transformers.__version__,
                   "torch": torch.__version__},
  }
  (OUT / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
  print(f"wrote {OUT} ({save_dir_size(OUT) / 1024:.0f} KiB); crop_start {crop_start}, "
        f"latents {tuple(latents.shape)} std {latents.std():.3f}, video {tuple(video.shape)} "
        f"std {video.std():.3f}")


if __name__ == "__main__":
  main()
