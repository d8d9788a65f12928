"""HunyuanVideo text to video end to end on one GPU: text encoders, denoising, tiled VAE decode.

The full-size pipeline with random weights built on the device (Llama-3-8B text encoder and CLIP-L
in bf16, the 13B transformer in bf16, the causal 3D VAE in fp32, as `checkpoints_convert
hunyuan_t2v` loads a release) goes through `HunyuanPipeline.generate`, the code path of `python -m
astraea_jax.generate --model HunyuanVideo`. The tokenizers are the parity goldens' small ones
(token ids do not change the encoders' cost). Default: 960x544 x 129 frames (5 s, the paper's
HunyuanVideo setting), 50 steps, the default model's searched 0.7 whole-step schedule resampled to
50 steps (`--schedule none`: dense). Each run is one process: its first call compiles.

    PYTHONPATH=.:benchmarks python3 benchmarks/hunyuan_e2e.py
    PYTHONPATH=.:benchmarks python3 benchmarks/hunyuan_e2e.py --size 1280x720 --steps 4 --schedule none
    PYTHONPATH=.:benchmarks python3 benchmarks/hunyuan_e2e.py --quick      # tiny models, any backend

Prints one line and appends a JSON record to `--out` (default results/hunyuan_e2e-<device>.jsonl).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from astraea_jax.acceleration import BudgetSchedule
from astraea_jax.models import hunyuan_vae as hv
from astraea_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from astraea_jax.models.clip_tokenizer import build_clip_tokenizer
from astraea_jax.models.hunyuan import HunyuanConfig, HunyuanVideoTransformer3DModel
from astraea_jax.models.llama_text import LlamaTextConfig, LlamaTextModel
from astraea_jax.pipeline_hunyuan import (HunyuanGenerationConfig, HunyuanPipeline,
                                          PaddedTokenizer, TextTemplate)
from benchutil import append_record, generation_fields, init_on_device, run_fields  # (script dir)

GOLDEN = Path(__file__).resolve().parent.parent / "tests" / "goldens" / "hunyuan_pipeline" / "diffusers"
SCHEDULE = Path(__file__).resolve().parent / "schedules" / "searched_default_0.7-whole.json"
PROMPT = "a cat walks on the grass, realistic style"


def _on_device(make):
  return nnx.merge(*init_on_device(make))


def build(quick: bool) -> HunyuanPipeline:
  bf16 = jnp.float32 if quick else jnp.bfloat16
  if quick:
    config = HunyuanConfig.preset("tiny")
    llama = LlamaTextConfig(vocab_size=256, hidden_size=16, intermediate_size=32,
                            num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
                            max_position_embeddings=512)
    clip = dataclasses.replace(CLIPTextConfig.preset("tiny"), hidden_size=config.pooled_projection_dim,
                               intermediate_size=16, num_attention_heads=2,
                               max_position_embeddings=77)
    vae = hv.PRESETS["tiny"]
    template = TextTemplate(template="{}", crop_start=0, max_sequence_length=8)
  else:
    config = HunyuanConfig.preset("hunyuanvideo-t2v")
    llama = LlamaTextConfig.preset("llava-llama-3-8b")
    clip = CLIPTextConfig.preset("clip-vit-large-patch14")
    vae = hv.PRESETS["hunyuan-video"]
    template = TextTemplate()
  transformer = _on_device(lambda: HunyuanVideoTransformer3DModel(config, rngs=nnx.Rngs(0)))
  text_encoder = _on_device(lambda: LlamaTextModel(llama, rngs=nnx.Rngs(1), dtype=bf16,
                                                   param_dtype=bf16))
  text_encoder_2 = _on_device(lambda: CLIPTextModel(clip, rngs=nnx.Rngs(2), dtype=bf16,
                                                    param_dtype=bf16))
  decoder = _on_device(lambda: hv.HunyuanVAEDecoder(vae, rngs=nnx.Rngs(3)))
  tokenizer = PaddedTokenizer(GOLDEN / "tokenizer",
                              max_length=template.max_sequence_length + template.crop_start)
  tokenizer_2 = PaddedTokenizer(GOLDEN / "tokenizer_2", max_length=clip.max_position_embeddings,
                                build=build_clip_tokenizer)
  return HunyuanPipeline(name=("tiny" if quick else "hunyuanvideo-t2v") + " (random)",
                         transformer=transformer, text_encoder=text_encoder, tokenizer=tokenizer,
                         text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, vae=decoder,
                         template=template)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--size", default=None, help="video WxH (default 960x544; quick 48x32)")
  p.add_argument("--frames", type=int, default=None, help="default 129 (quick 9)")
  p.add_argument("--steps", type=int, default=None, help="default 50 (quick 4)")
  p.add_argument("--schedule", default=str(SCHEDULE), help="schedule JSON, or 'none' (dense)")
  p.add_argument("--quick", action="store_true", help="tiny random models (CPU smoke run)")
  p.add_argument("--out", type=Path, default=None)
  args = p.parse_args(argv)

  w, h = (int(v) for v in (args.size or ("48x32" if args.quick else "960x544")).split("x"))
  cfg = HunyuanGenerationConfig(height=h, width=w, frames=args.frames or (9 if args.quick else 129),
                                steps=args.steps or (4 if args.quick else 50))
  schedule = (None if args.schedule == "none" else
              BudgetSchedule.load(args.schedule).resample(cfg.steps))
  start = time.perf_counter()
  pipe = build(args.quick)
  built = time.perf_counter() - start
  pipe.latent_shape(cfg)
  start = time.perf_counter()
  result = pipe.generate([PROMPT], cfg, schedule=schedule, progress=True)
  wall = time.perf_counter() - start
  stats = result.denoise_stats
  peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use", 0) / 2**30
  computed = (cfg.steps if result.step_records is None else
              sum(r.computed for r in result.step_records))
  record = {
      "benchmark": "hunyuan_e2e", "model": pipe.name, "video": f"{w}x{h}x{cfg.frames}",
      "steps": cfg.steps, "schedule": None if schedule is None else Path(args.schedule).name,
      "computed_steps": computed, "num_tokens": result.num_tokens, "build_s": round(built, 2),
      **generation_fields(result, wall), "frames": list(result.frames.shape),
      "peak_gib": round(peak, 2), **run_fields()}
  append_record(record, args.out, "hunyuan_e2e")
  print(f"{pipe.name} {record['video']}, {computed}/{cfg.steps} steps computed: generate "
        f"{wall:.1f} s (text {result.encode_seconds:.1f}, denoise {stats.total_seconds:.1f} of "
        f"which compile {record['denoise_compile_s']:.1f}, decode {result.decode_seconds:.1f}), "
        f"peak {peak:.2f} GiB; frames {tuple(result.frames.shape)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
