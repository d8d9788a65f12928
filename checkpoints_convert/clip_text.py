"""CLIP text encoder checkpoints (transformers layout) -> Flax params of `CLIPTextModel` (orbax).

HunyuanVideo (arXiv 2412.03603) takes its pooled text vector from CLIP-L's text tower; diffusers'
HunyuanVideo releases ship it as `text_encoder_2/` (a transformers `CLIPTextModel` folder:
`config.json` + `model.safetensors`). A full `CLIPModel` checkpoint (openai/clip-vit-large-patch14)
works too: its `text_model.` prefix is stripped and `vision_model.*`, `visual_projection`,
`text_projection` and `logit_scale` are skipped, as `CLIPTextModel.from_pretrained` skips them.

Layout rules (astraea_jax/models/clip_text.py mirrors the transformers names):
`Linear.weight [out, in]` -> `kernel [in, out]`, `Linear.bias` -> `bias`, `Embedding.weight` ->
`embedding`, `LayerNorm.weight` / `.bias` -> `scale` / `bias` (kept in fp32 whatever `dtype`). The
non-persistent `embeddings.position_ids` buffer, if an old checkpoint saved it, is ignored.

Usage:
  python -m checkpoints_convert.clip_text --src HF_FOLDER --out OUT [--dtype bf16] [--preset NAME]
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flax import nnx

from astraea_jax.models import clip_text as clip_model
from astraea_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from checkpoints_convert import safetensors_io
from checkpoints_convert.common import (CheckpointError, ParamTree, check_all_used, encoder_main,
                                        parse_dtype, save_converted)

__all__ = ["convert", "expected_params", "load_params", "main", "to_params"]

# Tensors of a full CLIPModel that the text encoder does not use (plus the position_ids buffer).
_SKIPPED_PREFIXES = ("vision_model.", "visual_projection.", "text_projection.")
_SKIPPED_KEYS = ("logit_scale", "embeddings.position_ids")
_TEXT_PREFIX = "text_model."

# transformers suffix -> (our suffix, transpose)
_SUFFIX_RULES = {
    "weight": ("kernel", True),  # Linear (overridden below for embeddings and layer norms)
    "bias": ("bias", False),
}
_TOP_RULES = {
    "embeddings.token_embedding.weight": ("embeddings.token_embedding.embedding", False),
    "embeddings.position_embedding.weight": ("embeddings.position_embedding.embedding", False),
    "final_layer_norm.weight": ("final_layer_norm.scale", False),
    "final_layer_norm.bias": ("final_layer_norm.bias", False),
}
_LAYER_KEY = re.compile(r"encoder\.layers\.(\d+)\.(.+)")
_LAYER_RULES = {
    **{f"self_attn.{p}.{s}": (f"self_attn.{p}.{_SUFFIX_RULES[s][0]}", _SUFFIX_RULES[s][1])
       for p in ("q_proj", "k_proj", "v_proj", "out_proj") for s in ("weight", "bias")},
    **{f"mlp.{p}.{s}": (f"mlp.{p}.{_SUFFIX_RULES[s][0]}", _SUFFIX_RULES[s][1])
       for p in ("fc1", "fc2") for s in ("weight", "bias")},
    "layer_norm1.weight": ("layer_norm1.scale", False),
    "layer_norm1.bias": ("layer_norm1.bias", False),
    "layer_norm2.weight": ("layer_norm2.scale", False),
    "layer_norm2.bias": ("layer_norm2.bias", False),
}


def expected_params(config: CLIPTextConfig,
                    dtype: np.dtype) -> dict[str, tuple[tuple[int, ...], Any]]:
  """Dot-named parameters of `CLIPTextModel(config)` -> `(shape, dtype)`; layer norms stay fp32."""
  model = nnx.eval_shape(lambda: CLIPTextModel(config, rngs=nnx.Rngs(0)))
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  out = {}
  for path, v in flat:
    name = ".".join(map(str, path))
    is_norm = any(str(p).startswith(("layer_norm", "final_layer_norm")) for p in path)
    out[name] = (tuple(v.shape), np.dtype(np.float32) if is_norm else dtype)
  return out


def _text_state(keys: Sequence[str]) -> dict[str, str]:
  """Source key -> text-model key (prefix stripped), for the tensors the text model may use."""
  out = {}
  for key in keys:
    name = key[len(_TEXT_PREFIX):] if key.startswith(_TEXT_PREFIX) else key
    if key.startswith(_SKIPPED_PREFIXES) or name in _SKIPPED_KEYS:
      continue
    out[key] = name
  return out


def to_params(state: Mapping[str, np.ndarray], config: CLIPTextConfig, *,
              dtype: str | np.dtype = "bfloat16") -> dict[str, Any]:
  """transformers-named tensors -> the nested param dict of `CLIPTextModel` (a pure `nnx.State`).

  Every parameter of the model must be produced and every used source tensor consumed, with matching
  shapes; anything else raises `CheckpointError` naming the keys.
  """
  tree = ParamTree(expected_params(config, parse_dtype(dtype)))
  names = _text_state(list(state.keys()))
  used = []
  for key, name in names.items():
    if name in _TOP_RULES:
      path, transpose = _TOP_RULES[name]
    elif (m := _LAYER_KEY.fullmatch(name)) and m.group(2) in _LAYER_RULES:
      rel, transpose = _LAYER_RULES[m.group(2)]
      path = f"encoder.layers.{int(m.group(1))}.{rel}"
    else:
      continue  # reported by check_all_used
    array = np.asarray(state[key])
    if transpose:
      if array.ndim != 2:
        raise CheckpointError(f"{key}: expected a 2-D Linear weight, got shape {array.shape}")
      array = array.T
    if path not in tree.expected:
      raise CheckpointError(f"{key}: the config has no parameter {path} "
                            f"({config.num_hidden_layers} layers)")
    tree.set(path, array)
    used.append(key)
  check_all_used(names.keys(), used, what="CLIP text checkpoint")
  return tree.finish(what="CLIP text checkpoint")


def _find_folder(src: str) -> str:
  for folder in (src, os.path.join(src, "text_encoder_2")):
    if os.path.isfile(os.path.join(folder, "config.json")) and any(
        n.endswith(".safetensors") or n.endswith(".safetensors.index.json")
        for n in os.listdir(folder)):
      return folder
  raise CheckpointError(
      f"{src}: not a transformers CLIP folder (config.json + *.safetensors, or text_encoder_2/)")


def load_params(src: str | os.PathLike, config: CLIPTextConfig | str | None = None, *,
                dtype: str | np.dtype = "bfloat16") -> tuple[CLIPTextConfig, dict[str, Any]]:
  """Reads a transformers CLIP folder and returns `(config, params)` for `CLIPTextModel`.

  Args:
    src: a `CLIPTextModel` / `CLIPModel` folder, or a diffusers HunyuanVideo root holding
      `text_encoder_2/`.
    config: overrides the architecture (a `CLIPTextConfig` or a preset name); default: config.json.
    dtype: storage dtype of embeddings and Linear parameters (layer norms stay fp32).
  """
  src = os.fspath(src)
  if not os.path.isdir(src):
    raise CheckpointError(f"{src}: no such CLIP folder")
  folder = _find_folder(src)
  if isinstance(config, str):
    try:
      config = CLIPTextConfig.preset(config)
    except ValueError as e:
      raise CheckpointError(str(e)) from None
  if config is None:
    try:
      with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        config = clip_model.config_from_hf(json.load(f))
    except (OSError, json.JSONDecodeError, ValueError, TypeError) as e:
      raise CheckpointError(f"{folder}/config.json: not a usable CLIP text config: {e}") from e
  state = dict(safetensors_io.load_folder(folder))
  return config, to_params(state, config, dtype=dtype)


def convert(src: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "bfloat16",
            config: CLIPTextConfig | str | None = None, overwrite: bool = False) -> str:
  """Converts a CLIP text encoder to an `astraea_jax.checkpoint` directory (family "clip_text")."""
  return save_converted(src, out, load_params, family=clip_model.FAMILY, config=config, dtype=dtype,
                        overwrite=overwrite)


def main(argv: Sequence[str] | None = None) -> int:
  return encoder_main(
      argv, convert, prog="python -m checkpoints_convert clip_text",
      description=__doc__.split("\n")[0],
      src_help="transformers CLIP folder, or a diffusers HunyuanVideo root "
               "(text_encoder_2/)")


if __name__ == "__main__":
  sys.exit(main())
