"""A diffusers HunyuanVideo release folder -> `astraea_jax.pipeline_hunyuan.HunyuanPipeline`, in memory.

The folder is what `HunyuanVideoPipeline.save_pretrained` writes (e.g. hunyuanvideo-community/
HunyuanVideo): `model_index.json` naming `HunyuanVideoPipeline`, `transformer/`, `text_encoder/`
(the Llama-3 decoder), `text_encoder_2/` (CLIP-L), `tokenizer/` (a `tokenizer.json`) and `tokenizer_2/`
(a `tokenizer.json`, or CLIP's `vocab.json` + `merges.txt`), `vae/`, `scheduler/` (its `shift`). Every component goes through its own
converter (`hunyuan`, `llama_text`, `clip_text`, `hunyuan_vae`), which checks that every tensor is
used and every parameter filled. `generate --model DIR` calls `load_pipeline`; this command only
reads and checks a folder (nothing is written):

  python -m checkpoints_convert hunyuan_t2v --src DIR
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path

import jax.numpy as jnp

from checkpoints_convert import clip_text as clip_convert
from checkpoints_convert import hunyuan as transformer_convert
from checkpoints_convert import hunyuan_vae as vae_convert
from checkpoints_convert import llama_text as llama_convert
from checkpoints_convert.common import CheckpointError

__all__ = ["is_release", "load_pipeline", "main"]

PIPELINE_CLASS = "HunyuanVideoPipeline"
COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae")
# Weights and compute of the transformer and the text encoders; the VAE decodes in fp32.
_DTYPES = {"bf16": ("bf16", "bfloat16", jnp.bfloat16), "fp32": ("fp32", "float32", jnp.float32)}


def _model_index(root: Path) -> dict | None:
  try:
    meta = json.loads((root / "model_index.json").read_text(encoding="utf-8"))
  except (OSError, ValueError):
    return None
  return meta if isinstance(meta, dict) else None


def is_release(path: str | os.PathLike) -> bool:
  """True if `path` holds a model_index.json naming `HunyuanVideoPipeline`."""
  meta = _model_index(Path(path))
  return meta is not None and meta.get("_class_name") == PIPELINE_CLASS


def _shift(root: Path) -> float:
  try:
    cfg = json.loads((root / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    return float(cfg.get("shift", 7.0))
  except (OSError, ValueError, TypeError):
    return 7.0


def load_pipeline(src: str | os.PathLike, *, dtype: str = "bf16", template=None):
  """Reads and converts every component of a release folder in memory.

  `template`: a `pipeline_hunyuan.TextTemplate` other than HunyuanVideo's (tests use a short one).

  Raises:
    CheckpointError: not a HunyuanVideo folder, a component missing, truncated or of another model.
  """
  # The library sits below the converters; only this entry point joins them.
  from astraea_jax.models import clip_text, hunyuan, hunyuan_vae, llama_text  # pylint: disable=import-outside-toplevel
  from astraea_jax.models.clip_tokenizer import build_clip_tokenizer  # pylint: disable=import-outside-toplevel
  from astraea_jax.acceleration.schedule import load_schedules  # pylint: disable=import-outside-toplevel
  from astraea_jax.pipeline_hunyuan import (HunyuanPipeline,  # pylint: disable=import-outside-toplevel
                                            PaddedTokenizer, TextTemplate)

  root = Path(src)
  if not root.is_dir():
    raise CheckpointError(f"model folder {str(root)!r} does not exist")
  if not is_release(root):
    raise CheckpointError(f"{str(root)!r} is not a HunyuanVideo folder: its model_index.json must "
                          f'name "{PIPELINE_CLASS}"')
  missing = [c for c in COMPONENTS if not (root / c).is_dir()]
  if missing:
    raise CheckpointError(f"{str(root)!r} lacks {', '.join(missing)}")
  if dtype not in _DTYPES:
    raise CheckpointError(f"{dtype=} must be one of {sorted(_DTYPES)}")
  try:
    schedules = load_schedules(root / "schedules")
  except ValueError as e:
    raise CheckpointError(str(e)) from None
  short, long, compute = _DTYPES[dtype]
  config, params = transformer_convert.load_params(root / "transformer", dtype=short)
  transformer = hunyuan.from_params(config, params)
  llama_config, llama_params = llama_convert.load_params(root / "text_encoder", dtype=long)
  text_encoder = llama_text.from_params(llama_config, llama_params, dtype=compute)
  clip_config, clip_params = clip_convert.load_params(root / "text_encoder_2", dtype=long)
  text_encoder_2 = clip_text.from_params(clip_config, clip_params, dtype=compute)
  vae_config, vae_params = vae_convert.load_params(root / "vae", dtype="float32")
  vae = hunyuan_vae.from_params(vae_config, vae_params)
  if llama_config.hidden_size != config.text_embed_dim:
    raise CheckpointError(f"{root.name}: Llama width {llama_config.hidden_size} != transformer "
                          f"text_embed_dim {config.text_embed_dim}")
  if clip_config.hidden_size != config.pooled_projection_dim:
    raise CheckpointError(f"{root.name}: CLIP width {clip_config.hidden_size} != transformer "
                          f"pooled_projection_dim {config.pooled_projection_dim}")
  if vae_config.latent_channels != config.in_channels:
    raise CheckpointError(f"{root.name}: VAE latent channels {vae_config.latent_channels} != "
                          f"transformer in_channels {config.in_channels}")
  template = TextTemplate() if template is None else template
  try:
    tokenizer = PaddedTokenizer(root / "tokenizer",
                                max_length=template.max_sequence_length + template.crop_start)
    tokenizer_2 = PaddedTokenizer(root / "tokenizer_2", max_length=77, build=build_clip_tokenizer)
  except ValueError as e:
    raise CheckpointError(str(e)) from None
  return HunyuanPipeline(name=root.name, transformer=transformer, text_encoder=text_encoder,
                         tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                         tokenizer_2=tokenizer_2, vae=vae, template=template, shift=_shift(root),
                         schedules=schedules)


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m checkpoints_convert hunyuan_t2v",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--src", required=True, help="a diffusers HunyuanVideo folder")
  p.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16")
  args = p.parse_args(argv)
  pipe = load_pipeline(args.src, dtype=args.dtype)
  print(f"{pipe.name}: every component read and checked (transformer "
        f"{pipe.transformer.config.num_layers}+{pipe.transformer.config.num_single_layers} blocks, "
        f"flow shift {pipe.shift:g}); `python -m astraea_jax.generate --model {args.src}` uses it")
  return 0
