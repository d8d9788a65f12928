"""Wan2.1 T2V transformer checkpoints -> orbax parameters of `astraea_jax.models.wan`.

    python -m checkpoints_convert wan --src DIR --out DIR [--dtype bf16|fp32] [--overwrite]

Two on-disk layouts are accepted, either one possibly sharded with a `*.safetensors.index.json`:

  diffusers  `transformer/config.json` + `diffusion_pytorch_model*.safetensors` (the pipeline root
             or its `transformer/` folder); keys like `blocks.0.attn1.to_q.weight`.
  original   Wan2.1's `config.json` + `diffusion_pytorch_model*.safetensors`; keys like
             `blocks.0.self_attn.q.weight`, possibly prefixed `model.diffusion_model.`.

Original names are first mapped to diffusers names (the inverse of diffusers'
scripts/convert_wan_to_diffusers.py table), then to the NNX tree: linear `weight [O, I]` ->
`kernel [I, O]`, Conv3d `weight [O, I, D, H, W]` -> `kernel [D, H, W, I, O]`, norm `weight` ->
`scale`, and `blocks.{i}.*` into slice i of the layer-stacked block parameters.

Every shape is checked against the config from the headers alone, before any tensor is read; then
tensors are streamed one at a time into the target arrays (peak host memory ~ the target size plus
one tensor) and written with `astraea_jax.checkpoint.save_params`. Load the result with
`astraea_jax.models.wan.load_pretrained(OUT)`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from astraea_jax.models.wan import WAN_PRESETS, WanConfig, WanTransformer3DModel
from checkpoints_convert import common, safetensors_io
from checkpoints_convert.common import CheckpointError, ConversionSummary, format_keys

FAMILY = "wan"
ORIGINAL_PREFIX = "model.diffusion_model."

# Original Wan2.1 name -> diffusers name (convert_wan_to_diffusers.py, T2V entries). The original
# block calls its cross-attention norm `norm3`; diffusers calls it `norm2`.
ORIGINAL_TOP = {
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.modulation": "scale_shift_table",
    "head.head": "proj_out",
    "patch_embedding": "patch_embedding",
}
ORIGINAL_BLOCK = {
    "modulation": "scale_shift_table",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
    "norm3": "norm2",
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "self_attn.norm_q": "attn1.norm_q",
    "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "cross_attn.norm_q": "attn2.norm_q",
    "cross_attn.norm_k": "attn2.norm_k",
}
# diffusers module name -> NNX module name, where they differ.
DIFFUSERS_TO_NNX = {
    "attn1.to_out.0": "attn1.to_out",
    "attn2.to_out.0": "attn2.to_out",
    "ffn.net.0.proj": "ffn.proj_in",
    "ffn.net.2": "ffn.proj_out",
}
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)")


@dataclasses.dataclass(frozen=True)
class Source:
  """A located checkpoint: its layout, weights reader and the `WanConfig` from its config.json."""
  layout: str  # "diffusers" | "original"
  root: Path
  reader: safetensors_io.SafetensorsReader
  config: WanConfig
  prefix: str  # stripped from every key ("" or ORIGINAL_PREFIX)


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

  def apply(self, array: np.ndarray) -> np.ndarray:
    if self.kind == "linear":
      return array.T
    if self.kind == "conv3d":
      return array.transpose(2, 3, 4, 1, 0)
    return array


# ----------------------------------------------------------------------------------------------
# Config


def config_from_diffusers(cfg: dict[str, Any]) -> WanConfig:
  """`WanTransformer3DModel` config.json -> `WanConfig` (T2V only)."""
  for key in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len"):
    if cfg.get(key) is not None:
      raise CheckpointError(f"config has {key}={cfg[key]}: image-conditioned Wan models are not "
                            f"supported, only text-to-video")
  fields = {f.name for f in dataclasses.fields(WanConfig)} - {"param_dtype", "dtype",
                                                                "attention_impl"}
  try:
    return WanConfig(**{k: v for k, v in cfg.items() if k in fields})
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"invalid Wan config: {e}") from None


def config_from_original(cfg: dict[str, Any]) -> WanConfig:
  """Wan2.1 `WanModel` config.json (`dim`, `num_heads`, `in_dim`, ...) -> `WanConfig` (T2V only)."""
  if cfg.get("model_type", "t2v") != "t2v":
    raise CheckpointError(f"config has model_type={cfg['model_type']!r}: only Wan text-to-video "
                          f"(t2v) transformers are supported")
  try:
    dim, heads = int(cfg["dim"]), int(cfg["num_heads"])
    if dim % heads:
      raise ValueError(f"num_heads={heads} must divide dim={dim}")
    return WanConfig(
        patch_size=tuple(cfg.get("patch_size", (1, 2, 2))), num_attention_heads=heads,
        attention_head_dim=dim // heads, in_channels=int(cfg.get("in_dim", 16)),
        out_channels=int(cfg.get("out_dim", 16)), text_dim=int(cfg.get("text_dim", 4096)),
        freq_dim=int(cfg.get("freq_dim", 256)), ffn_dim=int(cfg["ffn_dim"]),
        num_layers=int(cfg["num_layers"]), cross_attn_norm=bool(cfg.get("cross_attn_norm", True)),
        qk_norm="rms_norm_across_heads" if cfg.get("qk_norm", True) else None,
        eps=float(cfg.get("eps", 1e-6)))
  except KeyError as e:
    raise CheckpointError(f"Wan config.json lacks {e.args[0]!r}") from None
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"invalid Wan config: {e}") from None


def preset_name(config: WanConfig) -> str:
  """The preset whose architecture matches `config` (dtype fields ignored), or "custom"."""
  for name, preset in WAN_PRESETS.items():
    if dataclasses.replace(preset, param_dtype=config.param_dtype, dtype=config.dtype,
                           attention_impl=config.attention_impl) == config:
      return name
  return "custom"


# ----------------------------------------------------------------------------------------------
# Locating and mapping


def open_source(src: str | os.PathLike) -> Source:
  """Finds the config and weights under `src` and tells the layout apart."""
  root = Path(src)
  if not root.exists():
    raise CheckpointError(f"{root}: no such directory")
  if not root.is_dir():
    raise CheckpointError(f"{root}: expected a checkpoint directory")
  if (root / "transformer" / "config.json").is_file():
    root = root / "transformer"
  config_file = root / "config.json"
  if not config_file.is_file():
    raise CheckpointError(f"{root}: no config.json (expected a diffusers transformer/ folder or an "
                          f"original Wan2.1 checkpoint directory)")
  try:
    cfg = json.loads(config_file.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{config_file}: not valid JSON ({e})") from None
  if not isinstance(cfg, dict):
    raise CheckpointError(f"{config_file}: not a JSON object")
  cls = cfg.get("_class_name")
  if cls == "WanTransformer3DModel":
    layout, config = "diffusers", config_from_diffusers(cfg)
  elif cls == "WanModel" or (cls is None and {"dim", "num_heads", "ffn_dim"} <= set(cfg)):
    layout, config = "original", config_from_original(cfg)
  else:
    raise CheckpointError(f"{root}: not a Wan2.1 transformer checkpoint (config.json describes "
                          f"{cls or 'an unknown model'!r})")
  reader = safetensors_io.open_safetensors(root)
  keys = reader.keys()
  prefix = ORIGINAL_PREFIX if keys and all(k.startswith(ORIGINAL_PREFIX) for k in keys) else ""
  marker = ".self_attn." if layout == "original" else ".attn1."
  if not any(marker in k for k in keys):
    raise CheckpointError(f"{root}: the weights are not a Wan2.1 transformer in the {layout} "
                          f"layout (no '{marker}' keys; found e.g. {format_keys(keys, 3)})")
  return Source(layout, root, reader, config, prefix)


def to_diffusers_name(name: str) -> str | None:
  """Original Wan2.1 key (without prefix) -> diffusers key; None if no rule covers it."""
  match = _BLOCK_KEY.fullmatch(name)
  table, rest, head = (ORIGINAL_BLOCK, match.group(2), f"blocks.{match.group(1)}.") if match else (
      ORIGINAL_TOP, name, "")
  module, _, param = rest.rpartition(".")
  if rest in table:  # parameters without a module: `modulation`, `head.modulation`
    return head + table[rest]
  if module in table and param in ("weight", "bias"):
    return f"{head}{table[module]}.{param}"
  return None


def rule_for(name: str, ndim: int) -> Rule | None:
  """diffusers key -> `Rule` into the NNX tree; None if the key is not a Wan2.1 T2V parameter."""
  match = _BLOCK_KEY.fullmatch(name)
  index, rest = (int(match.group(1)), match.group(2)) if match else (None, name)
  if rest == "scale_shift_table":
    return Rule("blocks.scale_shift_table" if match else "scale_shift_table", index, "copy")
  module, _, param = rest.rpartition(".")
  if param not in ("weight", "bias") or not module:
    return None
  module = DIFFUSERS_TO_NNX.get(module, module)
  if match:
    module = f"blocks.{module}"
  if param == "bias":
    return Rule(f"{module}.bias", index, "copy")
  if module.rsplit(".", 1)[-1].startswith("norm"):
    return Rule(f"{module}.scale", index, "copy")
  if module == "patch_embedding" and ndim == 5:
    return Rule("patch_embedding.kernel", None, "conv3d")
  if ndim == 2:
    return Rule(f"{module}.kernel", index, "linear")
  return None


def target_shapes(config: WanConfig) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """Flat `{name: (shape, dtype)}` of the model's parameters (no arrays are allocated)."""
  abstract = nnx.eval_shape(lambda: WanTransformer3DModel(config, rngs=nnx.Rngs(0)))
  flat = common.flatten(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
  return {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in flat.items()}


def plan(source: Source, expected: dict[str, tuple[tuple[int, ...], np.dtype]]
         ) -> dict[str, Rule]:
  """Maps every source key to a `Rule` and checks all shapes against the config, headers only."""
  rules: dict[str, Rule] = {}
  unknown: list[str] = []
  mismatched: list[str] = []
  covered: dict[str, set[int | None]] = {}
  layers = source.config.num_layers
  for key in source.reader.keys():
    name = key[len(source.prefix):]
    if source.layout == "original":
      name = to_diffusers_name(name)
    rule = rule_for(name, len(source.reader.shape(key))) if name is not None else None
    if rule is None or rule.target not in expected or (
        rule.index is not None and rule.index >= layers):
      unknown.append(key)
      continue
    shape = rule.target_shape(source.reader.shape(key))
    want = expected[rule.target][0]
    want = want[1:] if rule.index is not None else want
    if shape != want:
      mismatched.append(f"{key} {tuple(source.reader.shape(key))}")
      continue
    if not jax.numpy.issubdtype(source.reader.dtype(key), jax.numpy.floating):
      raise CheckpointError(f"tensor {key} has non-float dtype {source.reader.dtype(key)}")
    rules[key] = rule
    covered.setdefault(rule.target, set()).add(rule.index)
  what = (f"config ({source.config.num_layers} layers, hidden {source.config.hidden_size}, "
          f"ffn {source.config.ffn_dim}, preset {preset_name(source.config)})")
  if mismatched:
    raise CheckpointError(f"{len(mismatched)} tensor(s) do not match the {what}: "
                          f"{format_keys(mismatched, 3)}")
  if unknown:
    raise CheckpointError(f"{len(unknown)} tensor(s) are not parameters of the Wan2.1 T2V "
                          f"transformer with this {what}: {format_keys(unknown)}")
  missing = []
  for target, (shape, _) in expected.items():
    got = covered.get(target, set())
    if target.startswith("blocks."):
      missing += [f"{target}[{i}]" for i in range(shape[0]) if i not in got]
    elif None not in got:
      missing.append(target)
  if missing:
    raise CheckpointError(f"{len(missing)} parameter(s) of the {what} are missing from the "
                          f"checkpoint: {format_keys(missing)}")
  return rules


# ----------------------------------------------------------------------------------------------
# Conversion



def read_params(src: str | os.PathLike, *, dtype: str = "bf16"
                ) -> tuple[Source, WanConfig, dict[str, Any]]:
  """Reads a checkpoint into the nested numpy parameter tree of `WanTransformer3DModel`.

  `dtype` is the storage dtype of the large weights; the time embedding, modulation tables and norm
  scales stay fp32 as the model keeps them.
  """
  source = open_source(src)
  param_dtype = common.parse_dtype(dtype)
  config = dataclasses.replace(source.config, param_dtype=param_dtype.name, dtype=param_dtype.name)
  expected = target_shapes(config)
  rules = plan(source, expected)
  tree = common.ParamTree(expected)
  for key, rule in rules.items():
    tree.set(rule.target, rule.apply(source.reader.read(key)), index=rule.index)
  common.check_all_used(source.reader.keys(), rules)
  return source, config, tree.finish()


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
  return ConversionSummary("wan", out.absolute(), source.layout, preset_name(config),
                 sum(x.size for x in leaves), sum(x.nbytes for x in leaves),
                 time.perf_counter() - start)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m checkpoints_convert wan",
      description="Convert a Wan2.1 T2V transformer checkpoint (diffusers or original layout, "
      "safetensors, possibly sharded) to an orbax checkpoint for astraea_jax.")
  parser.add_argument("--src", required=True,
                      help="diffusers pipeline root or its transformer/ folder, or an original "
                      "Wan2.1 checkpoint directory")
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
