"""OpenSora v1.2 STDiT3 checkpoints -> orbax parameters of `astraea_jax.models.opensora`.

    python -m checkpoints_convert opensora --src FILE_OR_DIR --out DIR [--dtype bf16|fp32]
                                           [--overwrite]

Accepted sources, with the reference's key names (`spatial_blocks.0.attn.qkv.weight`, ...):

  released   a folder with `config.json` (`"model_type": "STDiT3"`, as hpcai-tech/OpenSora-STDiT-v3
             on the Hugging Face hub) and `model.safetensors` (possibly sharded with an index);
  weights    a `.safetensors` file (e.g. a `model.state_dict()` dump), or a folder of weights
             without config.json. The config is inferred from the tensor shapes; only
             `input_sq_size` is not recorded in the weights and takes the reference value 512.

Layout rules: linear `weight [O, I]` -> `kernel [I, O]`, Conv3d `weight [O, I, D, H, W]` ->
`kernel [D, H, W, I, O]`, RMSNorm `weight` -> `scale`, `{spatial,temporal}_blocks.{i}.*` into
slice i of the layer-stacked block parameters; renames `t_embedder.mlp.0 -> t_embedder.linear_1`,
`mlp.2 -> linear_2` (also for `fps_embedder`) and `t_block.1 -> t_block`. The buffers the model
reads (`y_embedder.y_embedding`, the null caption, and `rope.freqs`) are copied as they are.

Every shape is checked against the config from the headers alone, before any tensor is read; every
tensor must be used and every model parameter filled. Load the result with
`astraea_jax.models.opensora.load_pretrained(OUT)`; `load_params` / `load_model` convert in memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from astraea_jax.models.opensora import OPENSORA_PRESETS, STDiT3, STDiT3Config
from checkpoints_convert import common, safetensors_io
from checkpoints_convert.common import CheckpointError, ConversionSummary, format_keys

FAMILY = "opensora"
DEFAULT_INPUT_SQ_SIZE = 512

# Reference module name -> NNX module name, where they differ.
RENAMES = {
    "t_embedder.mlp.0": "t_embedder.linear_1",
    "t_embedder.mlp.2": "t_embedder.linear_2",
    "fps_embedder.mlp.0": "fps_embedder.linear_1",
    "fps_embedder.mlp.2": "fps_embedder.linear_2",
    "t_block.1": "t_block",
}
_INVERSE_RENAMES = {v: k for k, v in RENAMES.items()}
_STACKS = ("spatial_blocks", "temporal_blocks")
_BLOCK_KEY = re.compile(r"(spatial_blocks|temporal_blocks)\.(\d+)\.(.+)")
# Config fields a released config.json carries under the same names.
_JSON_FIELDS = ("input_sq_size", "in_channels", "patch_size", "hidden_size", "depth", "num_heads",
                "mlp_ratio", "pred_sigma", "caption_channels", "model_max_length", "qk_norm")


@dataclasses.dataclass(frozen=True)
class Source:
  """A located checkpoint: its layout, weights reader and (from config.json) its config."""
  layout: str  # "released" (config.json + weights) | "weights" (config inferred from shapes)
  root: Path
  reader: safetensors_io.SafetensorsReader
  config: STDiT3Config


@dataclasses.dataclass(frozen=True)
class Rule:
  """Where one source tensor goes: target name, layer slice (None: whole) and layout change."""
  target: str
  index: int | None
  kind: str  # "linear" (transpose), "conv3d" (OIDHW -> DHWIO), "copy"

  def target_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    if self.kind == "linear":
      return tuple(reversed(shape))
    if self.kind == "conv3d":
      return (*shape[2:], shape[1], shape[0])
    return tuple(shape)

  def source_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Inverse of `target_shape` (for error messages in the checkpoint's own layout)."""
    if self.kind == "linear":
      return tuple(reversed(shape))
    if self.kind == "conv3d":
      return (shape[4], shape[3], *shape[:3])
    return tuple(shape)

  def apply(self, array: np.ndarray) -> np.ndarray:
    if self.kind == "linear":
      return array.T
    if self.kind == "conv3d":
      return array.transpose(2, 3, 4, 1, 0)
    return array


# ----------------------------------------------------------------------------------------------
# Names


def rule_for(name: str, ndim: int) -> Rule | None:
  """Reference key -> `Rule` into the NNX tree; None if no rule covers it."""
  match = _BLOCK_KEY.fullmatch(name)
  stack, index, rest = (match.group(1), int(match.group(2)), match.group(3)) if match else (
      None, None, name)
  prefix = f"{stack}." if stack else ""
  module, _, param = rest.rpartition(".")
  if param in ("weight", "bias") and not module:
    return None
  if param == "weight":
    if module.endswith("_norm"):
      return Rule(f"{prefix}{module}.scale", index, "copy")
    if module == "x_embedder.proj" and ndim == 5:
      return Rule("x_embedder.proj.kernel", None, "conv3d")
    if ndim == 2:
      return Rule(f"{prefix}{RENAMES.get(module, module)}.kernel", index, "linear")
    return None
  if param == "bias":
    return Rule(f"{prefix}{RENAMES.get(module, module)}.bias", index, "copy")
  # Parameters and buffers without a layout: scale_shift_table, y_embedding, rope.freqs.
  return Rule(f"{prefix}{rest}", index, "copy")


def source_name(target: str, index: int | None) -> str:
  """NNX name (and layer slice) -> the reference key it is read from (inverse of `rule_for`)."""
  module, _, param = target.rpartition(".")
  if param in ("kernel", "scale"):
    param = "weight"
  module = _INVERSE_RENAMES.get(module, module)
  name = f"{module}.{param}" if module else param
  if index is not None:
    stack, _, rest = name.partition(".")
    name = f"{stack}.{index}.{rest}"
  return name


# ----------------------------------------------------------------------------------------------
# Config


def _invalid(what: str, e: Exception) -> CheckpointError:
  return CheckpointError(f"invalid STDiT3 config {what}: {e}")


def config_from_json(cfg: dict[str, Any]) -> STDiT3Config:
  """A released `config.json` (the reference's `STDiT3Config`) -> `STDiT3Config` (fp32)."""
  model = cfg.get("model_type") or cfg.get("_class_name")
  if model != "STDiT3" and "STDiT3" not in (cfg.get("architectures") or []):
    raise CheckpointError(f"config.json describes {model or 'an unknown model'!r}, not an "
                          f"OpenSora v1.2 STDiT3 transformer (model_type 'STDiT3')")
  if cfg.get("skip_y_embedder"):
    raise CheckpointError("config.json has skip_y_embedder=true (captions bypass y_embedder): "
                          "not supported")
  fields = {k: cfg[k] for k in _JSON_FIELDS if k in cfg}
  if isinstance(fields.get("mlp_ratio"), int):
    fields["mlp_ratio"] = float(fields["mlp_ratio"])
  try:
    return STDiT3Config(**fields, param_dtype="float32", dtype="float32")
  except (TypeError, ValueError) as e:
    raise _invalid("in config.json", e) from None


def infer_config(reader: safetensors_io.SafetensorsReader) -> STDiT3Config:
  """The `STDiT3Config` (fp32) that the tensor shapes fix; `input_sq_size` is 512."""

  def shape(key: str) -> tuple[int, ...]:
    if key not in reader:
      raise CheckpointError(f"cannot infer the STDiT3 config without config.json: the weights "
                            f"have no tensor {key!r}")
    return reader.shape(key)

  conv = shape("x_embedder.proj.weight")
  if len(conv) != 5:
    raise CheckpointError(f"x_embedder.proj.weight has shape {conv}, expected a Conv3d weight "
                          "[C, C_in, pt, py, px]")
  hidden, in_channels, patch = conv[0], conv[1], conv[2:]
  freqs = shape("rope.freqs")
  caption = shape("y_embedder.y_embedding")
  fc1 = shape("spatial_blocks.0.mlp.fc1.weight")
  t_in = shape("t_embedder.mlp.0.weight")
  out = shape("final_layer.linear.weight")
  if len(freqs) != 1 or len(caption) != 2 or len(fc1) != 2 or len(t_in) != 2 or len(out) != 2:
    raise CheckpointError("cannot infer the STDiT3 config: rope.freqs, y_embedder.y_embedding or "
                          "a linear weight has an unexpected rank")
  head_dim = 2 * freqs[0]
  out_channels, rem = divmod(out[0], math.prod(patch))
  if rem or out_channels not in (in_channels, 2 * in_channels):
    raise CheckpointError(f"final_layer.linear.weight has {out[0]} outputs: not "
                          f"prod(patch)={math.prod(patch)} x (1 or 2) x in_channels={in_channels}")
  depth = 1 + max(int(m.group(2)) for m in map(_BLOCK_KEY.fullmatch, reader.keys()) if m)
  if head_dim == 0 or hidden % head_dim:
    raise CheckpointError(f"rope.freqs has {freqs[0]} entries, so head dim {head_dim}, which does "
                          f"not divide hidden_size={hidden}")
  try:
    return STDiT3Config(
        patch_size=patch, in_channels=in_channels, hidden_size=hidden, depth=depth,
        num_heads=hidden // head_dim, mlp_ratio=fc1[0] / hidden,
        pred_sigma=out_channels == 2 * in_channels, caption_channels=caption[1],
        model_max_length=caption[0], qk_norm=any(".attn.q_norm." in k for k in reader.keys()),
        input_sq_size=DEFAULT_INPUT_SQ_SIZE, freq_dim=t_in[1], param_dtype="float32",
        dtype="float32")
  except (TypeError, ValueError) as e:
    raise _invalid("inferred from the weights", e) from None


def preset_name(config: STDiT3Config) -> str:
  """The preset whose architecture matches `config` (dtype fields ignored), or "custom"."""
  for name, preset in OPENSORA_PRESETS.items():
    if dataclasses.replace(preset, param_dtype=config.param_dtype, dtype=config.dtype,
                           attention_impl=config.attention_impl) == config:
      return name
  return "custom"


def describe(config: STDiT3Config) -> str:
  return (f"config (depth {config.depth}, hidden {config.hidden_size}, {config.num_heads} heads, "
          f"caption {config.caption_channels}x{config.model_max_length}, "
          f"preset {preset_name(config)})")


# ----------------------------------------------------------------------------------------------
# Locating and mapping


def open_source(src: str | os.PathLike) -> Source:
  """Opens the weights (and config.json, if any) at `src` and checks they are an STDiT3."""
  root = Path(src)
  if not root.exists():
    raise CheckpointError(f"{root}: no such file or directory")
  config = None
  if root.is_dir() and (root / "config.json").is_file():
    config_file = root / "config.json"
    try:
      cfg = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise CheckpointError(f"{config_file}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
      raise CheckpointError(f"{config_file}: not a JSON object")
    try:
      config = config_from_json(cfg)
    except CheckpointError as e:
      raise CheckpointError(f"{config_file}: {e}") from None
  reader = safetensors_io.open_safetensors(root)
  keys = reader.keys()
  if not all(any(k.startswith(f"{stack}.") for k in keys) for stack in _STACKS):
    raise CheckpointError(f"{root}: not an OpenSora v1.2 STDiT3 checkpoint (no 'spatial_blocks.' "
                          f"and 'temporal_blocks.' keys; found e.g. {format_keys(keys, 3)})")
  if config is None:
    return Source("weights", root, reader, infer_config(reader))
  return Source("released", root, reader, config)


def target_shapes(config: STDiT3Config) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """Flat `{name: (shape, dtype)}` of the model's parameters and buffers (nothing allocated)."""
  abstract = nnx.eval_shape(lambda: STDiT3(config, rngs=nnx.Rngs(0)))
  flat = common.flatten(nnx.to_pure_dict(nnx.state(abstract)))
  return {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in flat.items()}


def plan(reader: safetensors_io.SafetensorsReader, config: STDiT3Config,
         expected: dict[str, tuple[tuple[int, ...], np.dtype]]) -> dict[str, Rule]:
  """Maps every source key to a `Rule` and checks all shapes against the config, headers only."""
  rules: dict[str, Rule] = {}
  unknown: list[str] = []
  mismatched: list[str] = []
  for key in reader.keys():
    shape = tuple(reader.shape(key))
    rule = rule_for(key, len(shape))
    if rule is None or rule.target not in expected or (
        rule.index is not None and rule.index >= config.depth):
      unknown.append(key)
      continue
    want = expected[rule.target][0]
    want = want[1:] if rule.index is not None else want
    if rule.target_shape(shape) != want:
      mismatched.append(f"{key} {shape} (expected {rule.source_shape(want)})")
      continue
    if not jnp.issubdtype(reader.dtype(key), jnp.floating):
      raise CheckpointError(f"tensor {key} has non-float dtype {reader.dtype(key)}")
    rules[key] = rule
  if mismatched:
    raise CheckpointError(f"{len(mismatched)} tensor(s) do not match the {describe(config)}: "
                          f"{format_keys(mismatched, 3)}")
  if unknown:
    raise CheckpointError(f"{len(unknown)} tensor(s) are not parameters of the STDiT3 with this "
                          f"{describe(config)}: {format_keys(unknown)}")
  wanted = set()
  for target, (shape, _) in expected.items():
    stacked = target.split(".", 1)[0] in _STACKS
    wanted.update(source_name(target, i) for i in (range(shape[0]) if stacked else [None]))
  missing = wanted - set(rules)
  if missing:
    raise CheckpointError(f"{len(missing)} tensor(s) of the {describe(config)} are missing from "
                          f"the checkpoint: {format_keys(missing)}")
  return rules


# ----------------------------------------------------------------------------------------------
# Conversion


def read_params(src: str | os.PathLike, *, dtype: str = "bf16", config: STDiT3Config | None = None
                ) -> tuple[Source, STDiT3Config, dict[str, Any]]:
  """Reads a checkpoint into the nested numpy parameter tree of `STDiT3`.

  `dtype` is the storage dtype of the large weights (the time/fps embeddings, modulation tables,
  norm scales and buffers stay fp32). With `config`, the checkpoint must fit that config (its
  param_dtype then wins over `dtype`); otherwise config.json or the shapes give it.
  """
  source = open_source(src)
  if config is None:
    param_dtype = common.parse_dtype(dtype)
    config = dataclasses.replace(source.config, param_dtype=param_dtype.name,
                                 dtype=param_dtype.name)
  expected = target_shapes(config)
  rules = plan(source.reader, config, expected)
  tree = common.ParamTree(expected)
  for key, rule in rules.items():
    tree.set(rule.target, rule.apply(source.reader.read(key)), index=rule.index)
  common.check_all_used(source.reader.keys(), rules)
  return source, config, tree.finish()


def load_params(src: str | os.PathLike, config: STDiT3Config | None = None, *,
                dtype: str = "fp32") -> tuple[STDiT3Config, dict[str, Any]]:
  """Converts in memory: `(config, nested numpy params)` of `STDiT3(config)` (`read_params`)."""
  _, config, params = read_params(src, dtype=dtype, config=config)
  return config, params


def load_model(src: str | os.PathLike, config: STDiT3Config | None = None, *,
               dtype: str = "fp32") -> STDiT3:
  """An `STDiT3` with the weights at `src`, converted in memory (no orbax round trip)."""
  config, params = load_params(src, config, dtype=dtype)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: STDiT3(config, rngs=nnx.Rngs(0))))
  nnx.replace_by_pure_dict(state, jax.tree_util.tree_map(jnp.asarray, params))
  return nnx.merge(graphdef, state)



def convert(src: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "bf16",
            overwrite: bool = False) -> ConversionSummary:
  """Converts the checkpoint at `src` to an orbax checkpoint at `out`; nothing is left at `out` on
  failure."""
  from astraea_jax import checkpoint  # pylint: disable=import-outside-toplevel

  start = time.perf_counter()
  out = Path(out)
  if out.exists() and not overwrite:
    raise CheckpointError(f"{out}: output already exists (use --overwrite to replace it)")
  source, config, params = read_params(src, dtype=dtype)
  leaves = jax.tree_util.tree_leaves(params)
  with common.atomic_output_dir(out, overwrite=overwrite) as tmp:
    checkpoint.save_params(tmp, params, family=FAMILY, config=config.to_dict(),
                           extra={"source": str(Path(src).absolute()), "layout": source.layout,
                                  "preset": preset_name(config)})
  return ConversionSummary("opensora", out.absolute(), source.layout, preset_name(config),
                 sum(x.size for x in leaves), sum(x.nbytes for x in leaves),
                 time.perf_counter() - start)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m checkpoints_convert opensora",
      description="Convert an OpenSora v1.2 STDiT3 checkpoint (released folder with config.json, "
      "or safetensors weights with the reference's key names) to an orbax checkpoint for "
      "astraea_jax.")
  parser.add_argument("--src", required=True,
                      help="released checkpoint folder (config.json + model.safetensors) or a "
                      ".safetensors file / folder of weights")
  parser.add_argument("--out", required=True, help="output checkpoint directory (must not exist)")
  parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"],
                      help="storage dtype of the weights (default bf16)")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  args = parser.parse_args(argv)
  try:
    summary = convert(args.src, args.out, dtype=args.dtype, overwrite=args.overwrite)
  except CheckpointError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(summary.line())
  return 0


if __name__ == "__main__":
  sys.exit(main())
