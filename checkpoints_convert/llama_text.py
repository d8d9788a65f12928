"""Llama text encoder checkpoints (transformers layout) -> Flax params of `LlamaTextModel` (orbax).

HunyuanVideo's main text encoder is the Llama-3 decoder of llava-llama-3-8b
(`astraea_jax.models.llama_text`). The source is a transformers folder: `config.json` +
`model.safetensors` or sharded `model-0000x-of-0000y.safetensors` with
`model.safetensors.index.json`, or a diffusers HunyuanVideo root holding one as `text_encoder/`.
Both layouts of the weights are read: `LlamaModel` (`embed_tokens.weight`, `layers.{i}...`,
`norm.weight`, as diffusers' `text_encoder/` stores it) and `LlamaForCausalLM` (the same under
`model.`, plus `lm_head.weight`, which an encoder does not use and is skipped). Stale
`rotary_emb.inv_freq` buffers of older checkpoints are skipped too: the frequencies are recomputed
from `rope_theta`.

The module names are transformers', so the layout rules are: PyTorch `Linear.weight [out, in]` ->
`kernel [in, out]`, `Embedding.weight` -> `embedding`, RMSNorm `weight` as is.

Usage:
  python -m checkpoints_convert llama_text --src HF_FOLDER --out OUT [--dtype bf16] [--preset NAME]
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from flax import nnx

from astraea_jax.models import llama_text as llama_model
from astraea_jax.models.llama_text import LlamaTextConfig, LlamaTextModel
from checkpoints_convert import safetensors_io
from checkpoints_convert.common import (CheckpointError, ParamTree, check_all_used, encoder_main,
                                        parse_dtype, save_converted)

__all__ = ["convert", "expected_params", "load_params", "main", "to_params"]

_SKIPPED = re.compile(r"(model\.)?(lm_head\.weight|layers\.\d+\.self_attn\.rotary_emb\.inv_freq)")
_LAYER_KEY = re.compile(r"layers\.(\d+)\.(.+)")
# transformers name -> (our param path, transpose)
_TOP_RULES = {
    "embed_tokens.weight": ("embed_tokens.embedding", False),
    "norm.weight": ("norm.weight", False),
}
# transformers name after `layers.{i}.` -> (our path after `layers.{i}.`, transpose)
_LAYER_RULES = {
    **{f"self_attn.{p}_proj.weight": (f"self_attn.{p}_proj.kernel", True) for p in "qkvo"},
    **{f"mlp.{p}_proj.weight": (f"mlp.{p}_proj.kernel", True) for p in ("gate", "up", "down")},
    "input_layernorm.weight": ("input_layernorm.weight", False),
    "post_attention_layernorm.weight": ("post_attention_layernorm.weight", False),
}


def _find_folder(src: str) -> str:
  for folder in (src, os.path.join(src, "text_encoder")):
    if os.path.isfile(os.path.join(folder, "config.json")) and any(
        n.endswith(".safetensors") or n.endswith(".safetensors.index.json")
        for n in os.listdir(folder)):
      return folder
  raise CheckpointError(f"{src}: not a transformers Llama folder (config.json + *.safetensors, "
                        "or text_encoder/ with them)")


def expected_params(config: LlamaTextConfig,
                    dtype: np.dtype) -> dict[str, tuple[tuple[int, ...], Any]]:
  """Dot-named parameters of `LlamaTextModel(config)` -> `(shape, dtype)` (abstract model)."""
  model = nnx.eval_shape(lambda: LlamaTextModel(config, rngs=nnx.Rngs(0)))
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  return {".".join(map(str, path)): (tuple(v.shape), dtype) for path, v in flat}


def _target(key: str) -> tuple[str, bool] | None:
  """transformers name (without `model.`) -> `(our path, transpose)`, or None if unknown."""
  if key in _TOP_RULES:
    return _TOP_RULES[key]
  match = _LAYER_KEY.fullmatch(key)
  if match and match.group(2) in _LAYER_RULES:
    rel, transpose = _LAYER_RULES[match.group(2)]
    return f"layers.{int(match.group(1))}.{rel}", transpose
  return None


def to_params(state: Iterable[tuple[str, np.ndarray]], config: LlamaTextConfig, *,
              dtype: str | np.dtype = "bfloat16") -> dict[str, Any]:
  """transformers-named `(key, tensor)` pairs -> the nested param dict of `LlamaTextModel`.

  Keys may carry the `model.` prefix of `LlamaForCausalLM`; `lm_head.weight` and
  `rotary_emb.inv_freq` are skipped. Every parameter of the model must be produced and every other
  source tensor used, with matching shapes, else `CheckpointError`. Tensors are cast (and
  memory-mapped ones read) one at a time.
  """
  tree = ParamTree(expected_params(config, parse_dtype(dtype)))
  seen, used = [], []
  for key, value in state:
    seen.append(key)
    if _SKIPPED.fullmatch(key):
      used.append(key)
      continue
    rule = _target(key[len("model."):] if key.startswith("model.") else key)
    if rule is None:
      continue  # reported by check_all_used
    path, transpose = rule
    if path not in tree.expected:
      raise CheckpointError(f"{key}: the config has no parameter {path} "
                            f"({config.num_hidden_layers} layers)")
    array = np.asarray(value)
    if transpose:
      if array.ndim != 2:
        raise CheckpointError(f"{key}: expected a 2-D Linear weight, got shape {array.shape}")
      array = array.T
    tree.set(path, array)
    used.append(key)
  check_all_used(seen, used, what="Llama checkpoint")
  return tree.finish(what="Llama checkpoint")


def load_params(src: str | os.PathLike, config: LlamaTextConfig | str | None = None,
                dtype: str | np.dtype = "bfloat16") -> tuple[LlamaTextConfig, dict[str, Any]]:
  """Reads a transformers Llama folder and returns `(config, params)` for `LlamaTextModel`.

  Args:
    src: a transformers folder (`config.json` + safetensors, single or sharded), or a diffusers
      HunyuanVideo root with such a `text_encoder/`.
    config: overrides the architecture (a `LlamaTextConfig` or a preset name); default: the
      folder's `config.json`.
    dtype: parameter dtype of the result ("bf16", "fp32", ...).
  """
  src = os.fspath(src)
  if not os.path.isdir(src):
    raise CheckpointError(f"{src}: no such Llama folder")
  folder = _find_folder(src)
  if isinstance(config, str):
    try:
      config = LlamaTextConfig.preset(config)
    except ValueError as e:
      raise CheckpointError(str(e)) from None
  if config is None:
    try:
      with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        config = LlamaTextConfig.from_hf_config(json.load(f))
    except (OSError, json.JSONDecodeError, ValueError, TypeError) as e:
      raise CheckpointError(f"{folder}/config.json: not a usable Llama config: {e}") from e
  return config, to_params(safetensors_io.load_folder(folder), config, dtype=dtype)


def convert(src: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "bfloat16",
            config: LlamaTextConfig | str | None = None, overwrite: bool = False) -> str:
  """Converts a Llama text encoder to an `astraea_jax.checkpoint` directory (family "llama_text").

  Read back by `astraea_jax.models.llama_text.load_text_encoder`; nothing is left at `out` if
  conversion fails.
  """
  return save_converted(src, out, load_params, family=llama_model.FAMILY, config=config, dtype=dtype,
                        overwrite=overwrite)


def main(argv: Sequence[str] | None = None) -> int:
  return encoder_main(
      argv, convert, prog="python -m checkpoints_convert llama_text",
      description=__doc__.split("\n")[0],
      src_help="transformers Llama folder (config.json + safetensors) or a diffusers "
               "HunyuanVideo root with text_encoder/")


if __name__ == "__main__":
  sys.exit(main())
