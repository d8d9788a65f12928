"""Building a `WanPipeline` from what is on disk: a converted Wan2.1 folder, or the embedded default.

A converted Wan2.1 folder holds one converted checkpoint per component, as `python -m checkpoints_convert`
writes them, and the tokenizer copied from the original folder:

  DIR/transformer/    python -m checkpoints_convert wan --src WAN_DIR --out DIR/transformer
  DIR/text_encoder/   python -m checkpoints_convert umt5 WAN_DIR DIR/text_encoder
  DIR/vae/            python -m checkpoints_convert wan_vae WAN_DIR DIR/vae
  DIR/tokenizer/      tokenizer.json of umT5-xxl (diffusers' tokenizer/ or Wan's google/umt5-xxl/)
"""

from __future__ import annotations

import os
from pathlib import Path

import jax.numpy as jnp

from astraea_jax.pipeline import WanPipeline


class ModelLoadError(Exception):
  """The model folder is missing, incomplete or of another kind."""


_COMPONENTS = ("transformer", "text_encoder", "vae", "tokenizer")


def load_wan_pipeline(path: str | os.PathLike, *, dtype=jnp.bfloat16) -> WanPipeline:
  """A Wan2.1 text-to-video pipeline from a folder of converted components (see the module doc)."""
  from astraea_jax.models import umt5, wan, wan_vae  # pylint: disable=import-outside-toplevel
  from astraea_jax.models.tokenizer import UMT5Tokenizer  # pylint: disable=import-outside-toplevel

  root = Path(path)
  if not root.is_dir():
    raise ModelLoadError(f"model folder {str(root)!r} does not exist")
  missing = [c for c in _COMPONENTS if not (root / c).is_dir()]
  if missing:
    hint = ""
    if (root / "model_index.json").exists() or (root / "Wan2.1_VAE.pth").exists():
      hint = ("; this looks like an unconverted Wan2.1 folder: convert it with "
              "`python -m checkpoints_convert` (see the README)")
    raise ModelLoadError(f"{str(root)!r} lacks {', '.join(missing)}{hint}")
  try:
    transformer = wan.load_pretrained(str(root / "transformer"))
    encoder = umt5.load_encoder(root / "text_encoder", dtype=dtype)
    vae = wan_vae.load_checkpoint(root / "vae", dtype=jnp.float32)
    tokenizer = UMT5Tokenizer(root / "tokenizer")
  except (OSError, ValueError, KeyError) as e:
    raise ModelLoadError(f"cannot load {str(root)!r}: {e}") from e
  text_dim = transformer.config.text_dim

  def encode_text(prompts):
    out = umt5.encode_prompts(encoder, tokenizer, prompts)
    if out.shape[-1] != text_dim:
      raise ModelLoadError(f"text encoder width {out.shape[-1]} != transformer text_dim {text_dim}")
    return out

  def decode(latents):
    return vae.decode(wan_vae.denormalize_latents(latents, vae.config))

  return WanPipeline(name=root.name, transformer=transformer, encode_text=encode_text,
                     decode=decode, spatial_stride=vae.config.spatial_compression,
                     temporal_stride=vae.config.temporal_compression, default_shift=3.0)
