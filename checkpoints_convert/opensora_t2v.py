"""OpenSora v1.2 text-to-video release -> a converted OpenSora folder (`load_opensora_pipeline`).

OpenSora v1.2 ships its parts as three repositories; this converts each with its own converter and
writes the folder `astraea_jax.pipeline_opensora.load_opensora_pipeline` reads:

  OUT/transformer/    checkpoints_convert opensora      <- hpcai-tech/OpenSora-STDiT-v3
  OUT/text_encoder/   checkpoints_convert t5            <- DeepFloyd/t5-v1_1-xxl (transformers)
  OUT/vae/            checkpoints_convert opensora_vae  <- hpcai-tech/OpenSora-VAE-v1.2
  OUT/tokenizer/      tokenizer.json (+ tokenizer_config.json) copied from the T5 folder
  OUT/pipeline.json   {"family": "opensora", "text_length": 300, "fps": 24, ...}

The tokenizer must be a `tokenizer.json` (the `tokenizers` format). If the T5 folder has only
`spiece.model`, write one once with transformers:
`AutoTokenizer.from_pretrained(T5_DIR).save_pretrained(TOKENIZER_DIR)`.

Usage:
  python -m checkpoints_convert opensora_t2v --src ROOT --out OUT
      (ROOT/transformer, ROOT/text_encoder, ROOT/vae and optionally ROOT/tokenizer)
  python -m checkpoints_convert opensora_t2v --transformer STDIT_DIR --text-encoder T5_DIR
      --vae VAE_DIR [--tokenizer TOK_DIR] --out OUT [--dtype bf16] [--text-encoder-dtype fp32]
      [--vae-preset v1.2] [--text-length 300] [--fps 24]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from astraea_jax.models import opensora_vae as ov
from checkpoints_convert import opensora, opensora_vae, t5
from checkpoints_convert.common import CheckpointError, atomic_output_dir

__all__ = ["convert", "main"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _tokenizer_folder(path: Path) -> Path:
  for folder in (path, path / "tokenizer"):
    if (folder / "tokenizer.json").is_file():
      return folder
  hint = (" (it has spiece.model: write a tokenizer.json with transformers' "
          "AutoTokenizer.from_pretrained(...).save_pretrained(...))"
          if (path / "spiece.model").is_file() else "")
  raise CheckpointError(f"{path}: no tokenizer.json{hint}")


def convert(out: str | os.PathLike, *, transformer: str | os.PathLike,
            text_encoder: str | os.PathLike, vae: str | os.PathLike,
            tokenizer: str | os.PathLike | None = None, dtype: str = "bf16",
            text_encoder_dtype: str = "fp32", vae_dtype: str = "float32",
            vae_preset: str | ov.OpenSoraVAEConfig = "v1.2",
            text_length: int = 300, fps: int = 24, overwrite: bool = False) -> str:
  """Converts the three components and writes the folder at `out` (nothing on failure)."""
  tok = _tokenizer_folder(Path(tokenizer if tokenizer is not None else text_encoder))
  with atomic_output_dir(out, overwrite=overwrite) as tmp:
    opensora.convert(transformer, tmp / "transformer", dtype=dtype)
    t5.convert(text_encoder, tmp / "text_encoder", dtype=text_encoder_dtype)
    opensora_vae.convert(vae, tmp / "vae", config=vae_preset, dtype=vae_dtype)
    (tmp / "tokenizer").mkdir()
    for f in _TOKENIZER_FILES:
      if (tok / f).is_file():
        shutil.copy2(tok / f, tmp / "tokenizer" / f)
    meta = {"family": "opensora", "version": "1.2", "text_length": text_length, "fps": fps}
    (tmp / "pipeline.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
  return os.fspath(out)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m checkpoints_convert opensora_t2v",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--src", default=None,
                      help="a root with transformer/, text_encoder/, vae/ (and tokenizer/)")
  parser.add_argument("--transformer", default=None, help="OpenSora-STDiT-v3 folder")
  parser.add_argument("--text-encoder", default=None, help="t5-v1_1-xxl folder (transformers)")
  parser.add_argument("--vae", default=None, help="OpenSora-VAE-v1.2 folder or model.safetensors")
  parser.add_argument("--tokenizer", default=None,
                      help="folder with T5's tokenizer.json (default: the text encoder folder)")
  parser.add_argument("--out", required=True, help="output folder")
  parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"],
                      help="parameter dtype of the transformer (OpenSora runs it in bf16)")
  parser.add_argument("--text-encoder-dtype", default="fp32", choices=["bf16", "fp32"],
                      help="parameter dtype of T5 (OpenSora runs T5 in fp32)")
  parser.add_argument("--vae-dtype", default="float32", help="parameter dtype of the VAE")
  parser.add_argument("--vae-preset", default="v1.2", choices=sorted(ov.PRESETS))
  parser.add_argument("--text-length", type=int, default=300,
                      help="T5 tokens (the transformer's model_max_length; 300 for v1.2)")
  parser.add_argument("--fps", type=int, default=24, help="frame rate of the videos")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
  args = parser.parse_args(argv)
  root = Path(args.src) if args.src else None
  parts = {}
  for part, flag in (("transformer", args.transformer), ("text_encoder", args.text_encoder),
                     ("vae", args.vae)):
    parts[part] = flag or (root / part if root is not None else None)
    if parts[part] is None:
      parser.error(f"give --src or --{part.replace('_', '-')}")
  tokenizer = args.tokenizer
  if tokenizer is None and root is not None and (root / "tokenizer").is_dir():
    tokenizer = root / "tokenizer"
  path = convert(args.out, tokenizer=tokenizer, dtype=args.dtype,
                 text_encoder_dtype=args.text_encoder_dtype, vae_dtype=args.vae_dtype,
                 vae_preset=args.vae_preset, text_length=args.text_length, fps=args.fps,
                 overwrite=args.overwrite, **parts)
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
