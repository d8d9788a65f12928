"""T5 v1.1 encoder checkpoints (transformers layout) -> Flax params of the T5 encoder (orbax).

The source is a transformers folder: `config.json` + `model.safetensors` or sharded
`model-0000x-of-0000y.safetensors` (+ index), e.g. DeepFloyd/t5-v1_1-xxl as OpenSora v1.2 loads it
with `T5EncoderModel`. Decoder and LM-head tensors of a full `T5ForConditionalGeneration` checkpoint
are skipped, as `T5EncoderModel.from_pretrained` skips them. The layout rules are umT5's
(`checkpoints_convert.umt5`): only `encoder.block.0` carries `relative_attention_bias`, which the
config's `shared_relative_bias` expects.

Usage:
  python -m checkpoints_convert t5 --src HF_FOLDER --out OUT [--dtype bf16] [--preset NAME]
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from astraea_jax.models import t5 as t5_model
from astraea_jax.models.umt5 import UMT5Config
from checkpoints_convert import safetensors_io
from checkpoints_convert.common import CheckpointError, encoder_main, save_converted
from checkpoints_convert.umt5 import hf_to_wan_names, to_params

__all__ = ["convert", "load_params", "main"]

_SKIPPED_PREFIXES = ("decoder.", "lm_head.")


def _find_folder(src: str) -> str:
  for folder in (src, os.path.join(src, "text_encoder")):
    if os.path.isfile(os.path.join(folder, "config.json")) and any(
        n.endswith(".safetensors") or n.endswith(".safetensors.index.json")
        for n in os.listdir(folder)):
      return folder
  raise CheckpointError(f"{src}: not a transformers T5 folder (config.json + *.safetensors)")


def load_params(src: str | os.PathLike, config: UMT5Config | str | None = None, *,
                dtype: str | np.dtype = "bfloat16") -> tuple[UMT5Config, dict[str, Any]]:
  """Reads a transformers T5 folder and returns `(config, params)` for `T5Encoder`."""
  src = os.fspath(src)
  if not os.path.isdir(src):
    raise CheckpointError(f"{src}: no such T5 folder")
  folder = _find_folder(src)
  if isinstance(config, str):
    try:
      config = t5_model.PRESETS[config]
    except KeyError:
      raise CheckpointError(f"unknown T5 preset {config!r}; choose from "
                            f"{sorted(t5_model.PRESETS)}") from None
  if config is None:
    try:
      with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        config = t5_model.config_from_hf(json.load(f))
    except (OSError, json.JSONDecodeError, ValueError, TypeError) as e:
      raise CheckpointError(f"{folder}/config.json: not a usable T5 config: {e}") from e
  state = {k: v for k, v in safetensors_io.load_folder(folder)
           if not k.startswith(_SKIPPED_PREFIXES)}
  return config, to_params(hf_to_wan_names(state), config, dtype=dtype)


def convert(src: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "bfloat16",
            config: UMT5Config | str | None = None, overwrite: bool = False) -> str:
  """Converts a T5 encoder to an `astraea_jax.checkpoint` directory (family "t5") at `out`."""
  return save_converted(src, out, load_params,
                        family=t5_model.FAMILY, config=config, dtype=dtype, overwrite=overwrite)


def main(argv: Sequence[str] | None = None) -> int:
  return encoder_main(
      argv, convert, prog="python -m checkpoints_convert t5",
      description=__doc__.split("\n")[0],
      src_help="transformers T5 folder (config.json + safetensors)")


if __name__ == "__main__":
  sys.exit(main())
