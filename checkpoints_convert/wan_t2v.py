"""A whole Wan2.1 text-to-video folder -> a `WanPipeline`, in memory or as converted components.

Reads either release layout of Wan2.1-T2V (1.3B or 14B):
  * diffusers (`Wan-AI/Wan2.1-T2V-*-Diffusers`): `model_index.json`, `transformer/`, `text_encoder/`
    (umT5-xxl encoder, transformers layout), `tokenizer/`, `vae/`, `scheduler/` (its `flow_shift`
    becomes the pipeline's default shift, with diffusers' sigma schedule);
  * original (`Wan-AI/Wan2.1-T2V-*`): `config.json` + `diffusion_pytorch_model*.safetensors`,
    `models_t5_umt5-xxl-enc-bf16.pth`, `Wan2.1_VAE.pth`, `google/umt5-xxl/` (tokenizer); default
    shift 5.0 with the original repository's sigma schedule, as Wan's generate.py samples text-to-video.

Each component goes through its own converter (`wan`, `umt5`, `wan_vae`), so the same name tables,
layout rules and completeness checks apply.

Usage:
  python -m checkpoints_convert wan_t2v --src WAN_DIR --out DIR [--dtype bf16|fp32] [--overwrite]
  (DIR then loads with `astraea_jax.pipelines.load_wan_pipeline` or `generate --model DIR`)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from astraea_jax.models import umt5 as umt5_model
from astraea_jax.models import wan_vae as vae_model
from astraea_jax.models.tokenizer import UMT5Tokenizer
from astraea_jax.models.wan import WanTransformer3DModel
from astraea_jax.pipeline import WanPipeline
from astraea_jax.pipelines import PIPELINE_FILE, ModelLoadError, assemble, folder_kind
from checkpoints_convert import umt5, wan, wan_vae
from checkpoints_convert.common import CheckpointError, atomic_output_dir

__all__ = ["load_pipeline", "convert", "main", "pipeline_options"]

# Wan's generate.py samples text-to-video with shift 5.0 and its own sigma schedule.
ORIGINAL_OPTIONS = {"default_shift": 5.0, "sigma_schedule": "wan"}
_DTYPES = {"bf16": ("bf16", "bfloat16", jnp.bfloat16), "fp32": ("fp32", "float32", jnp.float32)}


def pipeline_options(root: Path, kind: str) -> dict[str, Any]:
  """Default shift and sigma schedule of a release folder."""
  if kind == "original":
    return dict(ORIGINAL_OPTIONS)
  path = root / "scheduler" / "scheduler_config.json"
  try:
    shift = float(json.loads(path.read_text(encoding="utf-8")).get("flow_shift", 3.0))
  except FileNotFoundError:
    shift = 3.0
  except (OSError, ValueError, TypeError, AttributeError) as e:
    raise CheckpointError(f"{path}: not a usable scheduler config ({e})") from None
  return {"default_shift": shift, "sigma_schedule": "diffusers"}


def _sources(root: Path, kind: str) -> tuple[Path, Path]:
  """(text encoder, VAE) checkpoints of a release folder."""
  if kind == "diffusers":
    return root / "text_encoder", root / "vae"
  return root / "models_t5_umt5-xxl-enc-bf16.pth", root / "Wan2.1_VAE.pth"


def _vae_params(src: Path, kind: str):
  """`(config, params)` of the VAE. `Wan2.1_VAE.pth` has no config: the preset whose shapes fit."""
  if kind == "diffusers":
    return wan_vae.load_params(src, dtype="float32")
  first = None
  for name in ["wan2.1", *sorted(set(vae_model.PRESETS) - {"wan2.1"})]:
    try:
      return wan_vae.load_params(src, config=name, dtype="float32")
    except CheckpointError as e:
      first = first or e
  raise first


def _tokenizer_folder(root: Path, kind: str) -> Path:
  folder = root / ("tokenizer" if kind == "diffusers" else "google/umt5-xxl")
  if not (folder / "tokenizer.json").is_file():
    raise CheckpointError(f"{folder}: no tokenizer.json (the umT5 tokenizer of the release)")
  return folder


def _layout(src: str | os.PathLike) -> tuple[Path, str]:
  root = Path(src)
  try:
    kind = folder_kind(root)
  except ModelLoadError as e:
    raise CheckpointError(str(e)) from None
  if kind == "converted":
    raise CheckpointError(f"{root}: already converted (load it with --model directly)")
  return root, kind


def load_pipeline(src: str | os.PathLike, *, dtype: str = "bf16") -> WanPipeline:
  """Reads and converts every component of a release folder in memory (nothing is written).

  Args:
    src: a diffusers or original-layout Wan2.1-T2V folder.
    dtype: "bf16" (weights and compute of the transformer and text encoder; the VAE stays fp32)
      or "fp32".

  Raises:
    CheckpointError: a component is missing, truncated, or of another model.
  """
  root, kind = _layout(src)
  short, long, compute = _DTYPES[dtype]
  _, config, params = wan.read_params(root, dtype=short)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: WanTransformer3DModel(config,
                                                                           rngs=nnx.Rngs(0))))
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  transformer = nnx.merge(graphdef, state)
  text_src, vae_src = _sources(root, kind)
  enc_config, enc_params = umt5.load_params(text_src, dtype=long)
  encoder = umt5_model.from_params(enc_config, enc_params, dtype=compute)
  vae_config, vae_params = _vae_params(vae_src, kind)
  vae = vae_model.from_params(vae_config, vae_params)
  try:
    tokenizer = UMT5Tokenizer(_tokenizer_folder(root, kind))
    return assemble(root.name, transformer, encoder, vae, tokenizer,
                    **pipeline_options(root, kind))
  except (ValueError, ModelLoadError) as e:
    raise CheckpointError(str(e)) from None


def convert(src: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "bf16",
            overwrite: bool = False) -> Path:
  """Writes the converted component folders that `load_wan_pipeline` reads; nothing left on failure."""
  root, kind = _layout(src)
  out = Path(out)
  if out.exists() and not overwrite:
    raise CheckpointError(f"{out}: output already exists (use --overwrite to replace it)")
  short, long, _ = _DTYPES[dtype]
  with atomic_output_dir(out, overwrite=overwrite) as tmp:
    wan.convert(root, tmp / "transformer", dtype=short)
    text_src, vae_src = _sources(root, kind)
    umt5.convert(text_src, tmp / "text_encoder", dtype=long)
    wan_vae.convert(vae_src, tmp / "vae", "float32", config=_vae_params(vae_src, kind)[0])
    shutil.copytree(_tokenizer_folder(root, kind), tmp / "tokenizer")
    (tmp / PIPELINE_FILE).write_text(json.dumps(pipeline_options(root, kind), indent=2) + "\n")
  return out


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m checkpoints_convert wan_t2v",
      description="Convert a whole Wan2.1 text-to-video folder (diffusers or original layout): "
                  "transformer, umT5 text encoder, VAE and tokenizer.")
  parser.add_argument("--src", required=True, help="the Wan2.1-T2V folder")
  parser.add_argument("--out", required=True, help="output folder (must not exist)")
  parser.add_argument("--dtype", default="bf16", choices=sorted(_DTYPES),
                      help="storage dtype of the transformer and text encoder (VAE: fp32)")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  args = parser.parse_args(argv)
  out = convert(args.src, args.out, dtype=args.dtype, overwrite=args.overwrite)
  print(f"wrote {out} (transformer, text_encoder, vae, tokenizer, {PIPELINE_FILE})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
