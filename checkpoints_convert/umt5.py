"""umT5-xxl encoder checkpoints -> Flax params of `astraea_jax.models.umt5.UMT5Encoder` (orbax).

Two source layouts hold the same weights:
  * transformers (diffusers' Wan folder, `text_encoder/`): `config.json` + `model.safetensors` or
    sharded `model-0000x-of-0000y.safetensors` with `model.safetensors.index.json`; names like
    `encoder.block.{i}.layer.0.SelfAttention.q.weight`.
  * Wan2.1's own release: `models_t5_umt5-xxl-enc-bf16.pth`, a `torch.save`d state dict of Wan's
    `T5Encoder` (wan/modules/t5.py) with names like `blocks.{i}.attn.q.weight`, read without torch
    by `pth_io`. It carries no config: the architecture is read off the tensor shapes, with Wan's
    fixed relative-attention max distance.

Our module names are Wan's, so the layout rules are: PyTorch `Linear.weight [out, in]` ->
`kernel [in, out]`, `Embedding.weight` -> `embedding`, `ffn.gate.0` -> `ffn.gate`; transformers
names are first renamed to Wan's.

Usage:
  python -m checkpoints_convert umt5 SRC OUT [--dtype bf16] [--preset NAME] [--overwrite]
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flax import nnx

from astraea_jax.models.umt5 import PRESETS, UMT5Config, UMT5Encoder
from checkpoints_convert import pth_io, safetensors_io
from checkpoints_convert.common import (CheckpointError, ParamTree, check_all_used, encoder_main,
                                        format_keys, parse_dtype, save_converted)

__all__ = [
    "convert", "expected_params", "hf_to_wan_names", "infer_wan_config", "load_params",
    "load_source", "main", "to_params"
]

# Wan's T5Encoder hard-codes max_dist=128 in T5RelativeEmbedding; the .pth does not store it.
_WAN_MAX_DISTANCE = 128

# transformers name (after `encoder.block.{i}.`) -> Wan name (after `blocks.{i}.`)
_HF_BLOCK_RENAMES = {
    "layer.0.layer_norm.weight": "norm1.weight",
    "layer.0.SelfAttention.q.weight": "attn.q.weight",
    "layer.0.SelfAttention.k.weight": "attn.k.weight",
    "layer.0.SelfAttention.v.weight": "attn.v.weight",
    "layer.0.SelfAttention.o.weight": "attn.o.weight",
    "layer.0.SelfAttention.relative_attention_bias.weight": "pos_embedding.embedding.weight",
    "layer.1.layer_norm.weight": "norm2.weight",
    "layer.1.DenseReluDense.wi_0.weight": "ffn.gate.0.weight",
    "layer.1.DenseReluDense.wi_1.weight": "ffn.fc1.weight",
    "layer.1.DenseReluDense.wo.weight": "ffn.fc2.weight",
}
_HF_BLOCK_KEY = re.compile(r"encoder\.block\.(\d+)\.(.+)")
_WAN_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)")
# Wan block name -> (our param path after `blocks.{i}.`, transpose)
_WAN_BLOCK_RULES = {
    "norm1.weight": ("norm1.weight", False),
    "attn.q.weight": ("attn.q.kernel", True),
    "attn.k.weight": ("attn.k.kernel", True),
    "attn.v.weight": ("attn.v.kernel", True),
    "attn.o.weight": ("attn.o.kernel", True),
    "norm2.weight": ("norm2.weight", False),
    "ffn.gate.0.weight": ("ffn.gate.kernel", True),
    "ffn.fc1.weight": ("ffn.fc1.kernel", True),
    "ffn.fc2.weight": ("ffn.fc2.kernel", True),
    "pos_embedding.embedding.weight": ("pos_embedding.embedding", False),
}
_WAN_TOP_RULES = {
    "token_embedding.weight": ("token_embedding.embedding", False),
    "norm.weight": ("norm.weight", False),
}


def hf_to_wan_names(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Renames a transformers `UMT5EncoderModel` state dict to Wan's `T5Encoder` names."""
  out: dict[str, np.ndarray] = {}
  # `shared` is the embedding the model uses (encoder.embed_tokens is tied to it); either may be
  # saved.
  embedding = state.get("shared.weight", state.get("encoder.embed_tokens.weight"))
  if embedding is None:
    raise CheckpointError(
        "transformers checkpoint has neither shared.weight nor encoder.embed_tokens.weight")
  out["token_embedding.weight"] = embedding
  unknown = []
  for key, value in state.items():
    if key in ("shared.weight", "encoder.embed_tokens.weight"):
      continue
    if key == "encoder.final_layer_norm.weight":
      out["norm.weight"] = value
      continue
    match = _HF_BLOCK_KEY.fullmatch(key)
    if match and match.group(2) in _HF_BLOCK_RENAMES:
      out[f"blocks.{match.group(1)}.{_HF_BLOCK_RENAMES[match.group(2)]}"] = value
    else:
      unknown.append(key)
  if unknown:
    raise CheckpointError(f"unexpected transformers umT5 keys (decoder weights? another model?): "
                          f"{format_keys(unknown)}")
  return out


def infer_wan_config(state: Mapping[str, np.ndarray], *,
                     max_distance: int | None = None) -> UMT5Config:
  """Reads the architecture off the shapes of a Wan `T5Encoder` state dict.

  The relative-position max distance leaves no trace in the weights: `max_distance` if given, else
  that of the preset with exactly these shapes, else Wan's 128.
  """
  try:
    vocab, d_model = state["token_embedding.weight"].shape
    inner = state["blocks.0.attn.q.weight"].shape[0]
    d_ff = state["blocks.0.ffn.fc1.weight"].shape[0]
    num_buckets, num_heads = state["blocks.0.pos_embedding.embedding.weight"].shape
  except KeyError as e:
    raise CheckpointError(f"not a Wan umT5 encoder state dict: missing {e}") from None
  layers = {int(m.group(1)) for k in state if (m := _WAN_BLOCK_KEY.fullmatch(k))}
  if inner % num_heads:
    raise CheckpointError(f"attention width {inner} is not a multiple of {num_heads} heads")
  config = UMT5Config(vocab_size=vocab, d_model=d_model, d_kv=inner // num_heads,
                      num_heads=num_heads, d_ff=d_ff, num_layers=len(layers),
                      relative_attention_num_buckets=num_buckets,
                      relative_attention_max_distance=max_distance or _WAN_MAX_DISTANCE)
  if max_distance is None:
    for preset in PRESETS.values():
      if dataclasses.replace(preset, relative_attention_max_distance=_WAN_MAX_DISTANCE) == config:
        return preset
  return config


def expected_params(config: UMT5Config, dtype: np.dtype) -> dict[str, tuple[tuple[int, ...], Any]]:
  """Dot-named parameters of `UMT5Encoder(config)` -> `(shape, dtype)`, from an abstract model."""
  model = nnx.eval_shape(lambda: UMT5Encoder(config, rngs=nnx.Rngs(0)))
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  return {".".join(map(str, path)): (tuple(v.shape), dtype) for path, v in flat}


def to_params(wan_state: Mapping[str, np.ndarray], config: UMT5Config, *,
              dtype: str | np.dtype = "bfloat16") -> dict[str, Any]:
  """Wan-named PyTorch tensors -> the nested param dict of `UMT5Encoder` (a pure `nnx.State`).

  Every parameter of the model must be produced and every source tensor used, with matching shapes.
  Tensors are cast (and memory-mapped ones read) one at a time.
  """
  tree = ParamTree(expected_params(config, parse_dtype(dtype)))
  used = []
  for key, value in wan_state.items():
    if key in _WAN_TOP_RULES:
      path, transpose = _WAN_TOP_RULES[key]
    elif (m := _WAN_BLOCK_KEY.fullmatch(key)) and m.group(2) in _WAN_BLOCK_RULES:
      rel, transpose = _WAN_BLOCK_RULES[m.group(2)]
      path = f"blocks.{int(m.group(1))}.{rel}"
    else:
      continue
    array = np.asarray(value)
    if transpose:
      if array.ndim != 2:
        raise CheckpointError(f"{key}: expected a 2-D Linear weight, got shape {array.shape}")
      array = array.T
    if path not in tree.expected:
      raise CheckpointError(f"{key}: the config has no parameter {path} "
                            f"({config.num_layers} layers)")
    tree.set(path, array)
    used.append(key)
  check_all_used(wan_state.keys(), used, what="umT5 checkpoint")
  return tree.finish(what="umT5 checkpoint")


def _find_hf_folder(src: str) -> str | None:
  for folder in (src, os.path.join(src, "text_encoder")):
    if os.path.isfile(os.path.join(folder, "config.json")) and any(
        n.endswith(".safetensors") or n.endswith(".safetensors.index.json")
        for n in os.listdir(folder)):
      return folder
  return None


def load_source(src: str | os.PathLike, *,
                config: UMT5Config | str | None = None) -> tuple[UMT5Config, dict[str, np.ndarray]]:
  """Reads a checkpoint in either layout: its config and a Wan-named numpy state dict.

  Args:
    src: a transformers folder (or a diffusers Wan root with `text_encoder/`), or a Wan `.pth` file
      (or a folder holding `models_t5_umt5-xxl-enc-bf16.pth`).
    config: overrides the architecture (a `UMT5Config` or a preset name). Without it the
      transformers `config.json` is used, or for `.pth` the shapes plus Wan's max distance of 128.

  Returns:
    `(config, state)`, the tensors in their source dtype (memory-mapped where the format allows).
  """
  src = os.fspath(src)
  if isinstance(config, str):
    config = UMT5Config.preset(config)
  if os.path.isdir(src):
    hf = _find_hf_folder(src)
    if hf is not None:
      try:
        with open(os.path.join(hf, "config.json"), encoding="utf-8") as f:
          hf_config = json.load(f)
        file_config = UMT5Config.from_hf_config(hf_config)
      except (OSError, json.JSONDecodeError, ValueError, TypeError) as e:
        raise CheckpointError(f"{hf}/config.json: not a usable umT5 config: {e}") from e
      state = hf_to_wan_names(dict(safetensors_io.load_folder(hf)))
      return config or file_config, state
    wan = os.path.join(src, "models_t5_umt5-xxl-enc-bf16.pth")
    if not os.path.isfile(wan):
      raise CheckpointError(
          f"{src}: neither a transformers umT5 folder (config.json + safetensors) nor a Wan "
          "folder with models_t5_umt5-xxl-enc-bf16.pth")
    src = wan
  if not os.path.isfile(src):
    raise CheckpointError(f"{src}: no such umT5 checkpoint")
  state = pth_io.load_state_dict(src)
  return config or infer_wan_config(state), state


def load_params(src: str | os.PathLike, config: UMT5Config | str | None = None, *,
                dtype: str | np.dtype = "bfloat16") -> tuple[UMT5Config, dict[str, Any]]:
  """Reads a checkpoint in either layout and returns `(config, params)` ready for `UMT5Encoder`."""
  config, state = load_source(src, config=config)
  return config, to_params(state, config, dtype=dtype)


def convert(src: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "bfloat16",
            config: UMT5Config | str | None = None, overwrite: bool = False) -> str:
  """Converts a umT5 encoder checkpoint to an `astraea_jax.checkpoint` directory at `out`.

  The `UMT5Config` fields are stored as the checkpoint's config (read back by
  `astraea_jax.models.umt5.load_encoder`); nothing is left at `out` if conversion fails.
  """
  return save_converted(src, out, load_params,
                        family="umt5", config=config, dtype=dtype, overwrite=overwrite)


def main(argv: Sequence[str] | None = None) -> int:
  return encoder_main(
      argv, convert, prog="python -m checkpoints_convert umt5",
      description=__doc__.split("\n")[0],
      src_help="transformers text_encoder/ folder, diffusers Wan root, or Wan's .pth")


if __name__ == "__main__":
  sys.exit(main())
