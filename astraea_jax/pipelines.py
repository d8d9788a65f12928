"""Building a `WanPipeline` from what is on disk: a converted Wan2.1 folder, or the embedded default.

A converted Wan2.1 folder holds one converted checkpoint per component, as `python -m checkpoints_convert`
writes them, and the tokenizer copied from the original folder:

  DIR/transformer/    python -m checkpoints_convert wan --src WAN_DIR --out DIR/transformer
  DIR/text_encoder/   python -m checkpoints_convert umt5 WAN_DIR DIR/text_encoder
  DIR/vae/            python -m checkpoints_convert wan_vae WAN_DIR DIR/vae
  DIR/tokenizer/      tokenizer.json of umT5-xxl (diffusers' tokenizer/ or Wan's google/umt5-xxl/)
  DIR/pipeline.json   optional: {"default_shift": 3.0, "sigma_schedule": "diffusers"}
  DIR/schedules/      optional: budget schedules searched for this model (`python -m
                      astraea_jax.search --out DIR/schedules/budget-0.5.json`), which
                      `generate --budget 0.5` then runs at their step count

`python -m checkpoints_convert wan_t2v --src WAN_DIR --out DIR` writes all of it in one go, and
`python -m astraea_jax.generate --model WAN_DIR` reads an unconverted folder directly (converting in
memory at every start).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax.numpy as jnp

from astraea_jax.acceleration.schedule import load_schedules
from astraea_jax.pipeline import GenerationConfig, WanPipeline


class ModelLoadError(Exception):
  """The model folder is missing, incomplete or of another kind."""


COMPONENTS = ("transformer", "text_encoder", "vae", "tokenizer")
PIPELINE_FILE = "pipeline.json"


def folder_kind(path: str | os.PathLike) -> str:
  """"converted" (this project's component folders), "diffusers" or "original" (a Wan2.1 release).

  Raises ModelLoadError when the folder is none of them.
  """
  root = Path(path)
  if not root.is_dir():
    raise ModelLoadError(f"model folder {str(root)!r} does not exist")
  if all((root / c).is_dir() for c in COMPONENTS) and not (root / "model_index.json").exists():
    return "converted"
  if (root / "model_index.json").is_file():
    return "diffusers"
  if (root / "Wan2.1_VAE.pth").is_file() or (root / "models_t5_umt5-xxl-enc-bf16.pth").is_file():
    return "original"
  present = [c for c in COMPONENTS if (root / c).is_dir()]
  if present:
    missing = [c for c in COMPONENTS if c not in present]
    raise ModelLoadError(f"{str(root)!r} lacks {', '.join(missing)}")
  raise ModelLoadError(
      f"{str(root)!r} is not a Wan2.1 text-to-video folder: expected a diffusers folder "
      "(model_index.json), an original release (Wan2.1_VAE.pth, models_t5_umt5-xxl-enc-bf16.pth) "
      "or converted components (transformer/, text_encoder/, vae/, tokenizer/)")


def assemble(name: str, transformer, encoder, vae, tokenizer, *, default_shift: float = 3.0,
             sigma_schedule: str = "diffusers") -> WanPipeline:
  """A `WanPipeline` around loaded components: umT5 encoder + tokenizer, Wan transformer, Wan VAE."""
  from astraea_jax.models import umt5, wan_vae  # pylint: disable=import-outside-toplevel

  text_dim = transformer.config.text_dim
  if encoder.config.d_model != text_dim:
    raise ModelLoadError(f"{name}: text encoder width {encoder.config.d_model} != transformer "
                         f"text_dim {text_dim}")
  if vae.config.z_dim != transformer.config.in_channels:
    raise ModelLoadError(f"{name}: VAE latent channels {vae.config.z_dim} != transformer "
                         f"in_channels {transformer.config.in_channels}")

  def encode_text(prompts):
    return umt5.encode_prompts(encoder, tokenizer, prompts)

  def decode(latents):
    return vae.decode(wan_vae.denormalize_latents(latents, vae.config))

  defaults = dataclasses.replace(GenerationConfig(), sigma_schedule=sigma_schedule)
  return WanPipeline(name=name, transformer=transformer, encode_text=encode_text, decode=decode,
                     spatial_stride=vae.config.spatial_compression,
                     temporal_stride=vae.config.temporal_compression, default_shift=default_shift,
                     defaults=defaults)


def read_pipeline_file(root: Path) -> dict:
  """The optional `pipeline.json` of a converted folder (default shift and sigma schedule)."""
  path = root / PIPELINE_FILE
  if not path.exists():
    return {}
  try:
    meta = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ModelLoadError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(meta, dict):
    raise ModelLoadError(f"{path}: not a JSON object")
  return {k: meta[k] for k in ("default_shift", "sigma_schedule") if k in meta}


def load_wan_pipeline(path: str | os.PathLike, *, dtype=jnp.bfloat16) -> WanPipeline:
  """A Wan2.1 text-to-video pipeline from a folder of converted components (see the module doc)."""
  from astraea_jax.models import umt5, wan, wan_vae  # pylint: disable=import-outside-toplevel
  from astraea_jax.models.tokenizer import UMT5Tokenizer  # pylint: disable=import-outside-toplevel

  root = Path(path)
  kind = folder_kind(root)
  if kind != "converted":
    raise ModelLoadError(f"{str(root)!r} is an unconverted Wan2.1 folder ({kind} layout): convert it "
                         "with `python -m checkpoints_convert wan_t2v` or pass it to "
                         "`python -m astraea_jax.generate --model` directly")
  options = read_pipeline_file(root)
  try:
    schedules = load_schedules(root / "schedules")
  except ValueError as e:
    raise ModelLoadError(str(e)) from None
  try:
    transformer = wan.load_pretrained(str(root / "transformer"))
    encoder = umt5.load_encoder(root / "text_encoder", dtype=dtype)
    vae = wan_vae.load_checkpoint(root / "vae", dtype=jnp.float32)
    tokenizer = UMT5Tokenizer(root / "tokenizer")
  except (OSError, ValueError, KeyError) as e:
    raise ModelLoadError(f"cannot load {str(root)!r}: {e}") from e
  pipe = assemble(root.name, transformer, encoder, vae, tokenizer, **options)
  return dataclasses.replace(pipe, schedules=schedules)
