"""HunyuanVideo transformer checkpoints -> orbax parameters of `astraea_jax.models.hunyuan`.

    python -m checkpoints_convert hunyuan --src DIR_OR_FILE --out DIR [--dtype bf16|fp32]
        [--config PRESET|CONFIG_JSON] [--overwrite]

Two on-disk layouts are accepted:

  diffusers  `transformer/config.json` + `diffusion_pytorch_model*.safetensors` (the pipeline root
             or its `transformer/` folder, possibly sharded with a `*.safetensors.index.json`);
             keys like `transformer_blocks.0.attn.to_q.weight`.
  original   the HunyuanVideo release's `mp_rank_00_model_states.pt` (the file, or a folder holding
             it directly or under `transformers/`): a torch pickle whose "module" entry is the state
             dict, keys like `double_blocks.0.img_attn_qkv.weight`. It is read without torch
             (`pth_io`, memory-mapped). The release has no config file: the architecture is read off
             the tensor shapes (RoPE axes (16, 56, 56) and theta 256 assumed, which needs head dim
             128), or given with `--config`.

Original names are first mapped to diffusers names (the table of diffusers'
scripts/convert_hunyuan_video_to_diffusers.py, read backwards): fused projections are split along
their output axis (`img_attn_qkv`, `txt_attn_qkv`, the refiner's `self_attn_qkv` into q, k, v; the
single blocks' `linear1` into q, k, v and the MLP input), and the final modulation is reordered from
(shift, scale) to diffusers' (scale, shift). diffusers names then map to the NNX tree: linear
`weight [O, I]` -> `kernel [I, O]`, Conv3d `weight [O, I, D, H, W]` -> `kernel [D, H, W, I, O]`,
norm `weight` -> `scale`, and `<stack>.{i}.*` (the dual, single and refiner block stacks) into
slice i of the layer-stacked parameters.

Every shape is checked against the config before any tensor is read; every source tensor must be
used and every parameter filled (a `CheckpointError` names the offending keys). Tensors are then
read one at a time into the target arrays and written with `astraea_jax.checkpoint.save_params`;
nothing is left at `--out` on failure. Load the result with
`astraea_jax.models.hunyuan.load_pretrained(OUT)`, or skip the disk with `load_params` +
`astraea_jax.models.hunyuan.from_params`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from astraea_jax.models.hunyuan import (HUNYUAN_PRESETS, HunyuanConfig,
                                        HunyuanVideoTransformer3DModel)
from checkpoints_convert import common, pth_io, safetensors_io
from checkpoints_convert.common import CheckpointError, ConversionSummary, format_keys

FAMILY = "hunyuan"
DIFFUSERS_CLASS = "HunyuanVideoTransformer3DModel"
ORIGINAL_FILE = "mp_rank_00_model_states.pt"

# Original module name -> diffusers module name, outside the block stacks.
ORIGINAL_TOP = {
    "img_in.proj": "x_embedder.proj",
    "time_in.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "time_in.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "guidance_in.mlp.0": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.mlp.2": "time_text_embed.guidance_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "txt_in.input_embedder": "context_embedder.proj_in",
    "txt_in.t_embedder.mlp.0": "context_embedder.time_text_embed.timestep_embedder.linear_1",
    "txt_in.t_embedder.mlp.2": "context_embedder.time_text_embed.timestep_embedder.linear_2",
    "txt_in.c_embedder.linear_1": "context_embedder.time_text_embed.text_embedder.linear_1",
    "txt_in.c_embedder.linear_2": "context_embedder.time_text_embed.text_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",  # halves swapped, see `_original_pieces`
}
# Block stacks: original prefix -> (diffusers prefix, module table, fused projections). A fused
# tensor is the listed diffusers projections concatenated along the output axis, in order.
ORIGINAL_GROUPS = {
    "txt_in.individual_token_refiner.blocks": (
        "context_embedder.token_refiner.refiner_blocks",
        {"norm1": "norm1", "norm2": "norm2", "self_attn_proj": "attn.to_out.0",
         "mlp.fc1": "ff.net.0.proj", "mlp.fc2": "ff.net.2",
         "adaLN_modulation.1": "norm_out.linear"},
        {"self_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v")}),
    "double_blocks": (
        "transformer_blocks",
        {"img_mod.linear": "norm1.linear", "txt_mod.linear": "norm1_context.linear",
         "img_attn_q_norm": "attn.norm_q", "img_attn_k_norm": "attn.norm_k",
         "img_attn_proj": "attn.to_out.0", "txt_attn_q_norm": "attn.norm_added_q",
         "txt_attn_k_norm": "attn.norm_added_k", "txt_attn_proj": "attn.to_add_out",
         "img_mlp.fc1": "ff.net.0.proj", "img_mlp.fc2": "ff.net.2",
         "txt_mlp.fc1": "ff_context.net.0.proj", "txt_mlp.fc2": "ff_context.net.2"},
        {"img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
         "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}),
    "single_blocks": (
        "single_transformer_blocks",
        {"modulation.linear": "norm.linear", "q_norm": "attn.norm_q", "k_norm": "attn.norm_k",
         "linear2": "proj_out"},
        # q, k and v are hidden_size rows each; the MLP input takes the rest.
        {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}),
}
_ORIGINAL_BLOCK_KEY = re.compile(
    r"(txt_in\.individual_token_refiner\.blocks|double_blocks|single_blocks)\.(\d+)\.(.+)")

# diffusers stacks -> NNX stacks (same names), and in-block module renames.
_STACKS = ("transformer_blocks", "single_transformer_blocks",
           "context_embedder.token_refiner.refiner_blocks")
_DIFFUSERS_BLOCK_KEY = re.compile(
    r"(transformer_blocks|single_transformer_blocks"
    r"|context_embedder\.token_refiner\.refiner_blocks)\.(\d+)\.(.+)")
DIFFUSERS_TO_NNX = {
    "attn.to_out.0": "attn.to_out",
    "ff.net.0.proj": "ff.proj_in",
    "ff.net.2": "ff.proj_out",
    "ff_context.net.0.proj": "ff_context.proj_in",
    "ff_context.net.2": "ff_context.proj_out",
}


class ArrayReader:
  """The `SafetensorsReader` interface over an in-memory (or memory-mapped) state dict."""

  def __init__(self, arrays: Mapping[str, np.ndarray]):
    self._arrays = dict(arrays)

  def keys(self) -> list[str]:
    return list(self._arrays)

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._arrays[key].shape)

  def dtype(self, key: str) -> np.dtype:
    return np.dtype(self._arrays[key].dtype)

  def read(self, key: str) -> np.ndarray:
    return np.asarray(self._arrays[key])


@dataclasses.dataclass(frozen=True)
class Source:
  """A located checkpoint: its layout, a tensor reader (`keys`, `shape`, `dtype`, `read`) and the
  `HunyuanConfig` it was found with."""
  layout: str  # "diffusers" | "original"
  path: Path
  reader: Any
  config: HunyuanConfig


@dataclasses.dataclass(frozen=True)
class Piece:
  """One diffusers-named tensor cut from a source tensor: `rows` are `[start, stop)` ranges of its
  leading axis, concatenated (None: the whole tensor)."""
  name: str
  rows: tuple[tuple[int, int], ...] | None = None

  def shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    if self.rows is None:
      return tuple(shape)
    return (sum(stop - start for start, stop in self.rows), *shape[1:])

  def cut(self, array: np.ndarray) -> np.ndarray:
    if self.rows is None:
      return array
    return np.concatenate([array[start:stop] for start, stop in self.rows], axis=0)


@dataclasses.dataclass(frozen=True)
class Rule:
  """Where one piece goes: target name, layer slice (None: whole) and layout change."""
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


def config_from_diffusers(cfg: Mapping[str, Any]) -> HunyuanConfig:
  """`HunyuanVideoTransformer3DModel` config.json -> `HunyuanConfig` (text-to-video only)."""
  if cfg.get("image_condition_type") is not None:
    raise CheckpointError(f"config has image_condition_type={cfg['image_condition_type']!r}: "
                          f"image-conditioned HunyuanVideo models are not supported, only "
                          f"text-to-video")
  fields = {f.name for f in dataclasses.fields(HunyuanConfig)} - {"param_dtype", "dtype",
                                                                     "attention_impl"}
  kwargs = {k: v for k, v in cfg.items() if k in fields}
  if kwargs.get("out_channels", 0) is None:  # diffusers: out_channels or in_channels
    kwargs["out_channels"] = kwargs.get("in_channels", 16)
  try:
    return HunyuanConfig(**kwargs)
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"invalid HunyuanVideo config: {e}") from None


def _layer_count(keys: Sequence[str], prefix: str) -> int:
  pattern = re.compile(rf"{re.escape(prefix)}\.(\d+)\.")
  indices = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
  return max(indices) + 1 if indices else 0


def config_from_original(shapes: Mapping[str, tuple[int, ...]]) -> HunyuanConfig:
  """Reads the architecture off the tensor shapes of an original state dict.

  RoPE is not visible in the weights: the release's axes (16, 56, 56) and theta 256 are assumed,
  which needs head dim 128; other sizes need an explicit config.
  """

  def shape(key: str) -> tuple[int, ...]:
    if key not in shapes:
      raise CheckpointError(f"cannot read the architecture off the checkpoint: it has no {key!r} "
                            f"(pass a config)")
    return shapes[key]

  c, cin, pt, p, _ = shape("img_in.proj.weight")
  keys = list(shapes)
  layers = _layer_count(keys, "double_blocks")
  if layers:
    d = shape("double_blocks.0.img_attn_q_norm.weight")[0]
    mlp = shape("double_blocks.0.img_mlp.fc1.weight")[0]
  else:
    d = shape("single_blocks.0.q_norm.weight")[0]
    mlp = shape("single_blocks.0.linear1.weight")[0] - 3 * c
  if c % d:
    raise CheckpointError(f"head dim {d} (from the q norm) does not divide hidden size {c}")
  if d != 128:
    raise CheckpointError(f"head dim {d}: the RoPE axes of this checkpoint are unknown (the "
                          f"release's (16, 56, 56) needs head dim 128); pass a config")
  try:
    return HunyuanConfig(
        in_channels=cin, out_channels=shape("final_layer.linear.weight")[0] // (pt * p * p),
        num_attention_heads=c // d, attention_head_dim=d, num_layers=layers,
        num_single_layers=_layer_count(keys, "single_blocks"),
        num_refiner_layers=_layer_count(keys, "txt_in.individual_token_refiner.blocks"),
        mlp_ratio=mlp / c, patch_size=p, patch_size_t=pt,
        guidance_embeds=any(k.startswith("guidance_in.") for k in keys),
        text_embed_dim=shape("txt_in.input_embedder.weight")[1],
        pooled_projection_dim=shape("vector_in.in_layer.weight")[1])
  except ValueError as e:
    raise CheckpointError(f"the checkpoint's shapes give an invalid config: {e}") from None


def resolve_config(config: HunyuanConfig | str | os.PathLike | None) -> HunyuanConfig | None:
  """A `HunyuanConfig`, a preset name, or a diffusers-style config.json path -> `HunyuanConfig`."""
  if config is None or isinstance(config, HunyuanConfig):
    return config
  if str(config) in HUNYUAN_PRESETS:
    return HunyuanConfig.preset(str(config))
  path = Path(config)
  if not path.is_file():
    raise CheckpointError(f"config {str(config)!r} is neither a preset "
                          f"({', '.join(sorted(HUNYUAN_PRESETS))}) nor a config.json file")
  try:
    cfg = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(cfg, dict):
    raise CheckpointError(f"{path}: not a JSON object")
  return config_from_diffusers(cfg)


def preset_name(config: HunyuanConfig) -> str:
  """The preset whose architecture matches `config` (dtype fields ignored), or "custom"."""
  for name, preset in HUNYUAN_PRESETS.items():
    if dataclasses.replace(preset, param_dtype=config.param_dtype, dtype=config.dtype,
                           attention_impl=config.attention_impl) == config:
      return name
  return "custom"


# ----------------------------------------------------------------------------------------------
# Locating and mapping


def _open_diffusers(root: Path, config: HunyuanConfig | None) -> Source:
  config_file = root / "config.json"
  try:
    cfg = json.loads(config_file.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{config_file}: not valid JSON ({e})") from None
  if not isinstance(cfg, dict):
    raise CheckpointError(f"{config_file}: not a JSON object")
  cls = cfg.get("_class_name")
  if cls != DIFFUSERS_CLASS:
    raise CheckpointError(f"{root}: not a HunyuanVideo transformer checkpoint (config.json "
                          f"describes {cls or 'an unknown model'!r})")
  found = config_from_diffusers(cfg)
  reader = safetensors_io.open_safetensors(root)
  keys = reader.keys()
  if not any(k.startswith(("transformer_blocks.", "single_transformer_blocks.")) for k in keys):
    raise CheckpointError(f"{root}: the weights are not a HunyuanVideo transformer in the "
                          f"diffusers layout (no 'transformer_blocks.' keys; found e.g. "
                          f"{format_keys(keys, 3)})")
  return Source("diffusers", root, reader, config or found)


def _open_original(file: Path, config: HunyuanConfig | None) -> Source:
  obj = pth_io.load_pth(file, mmap=True)
  state = obj.get("module", obj) if isinstance(obj, dict) else obj
  if not isinstance(state, dict):
    raise CheckpointError(f"{file}: expected a state dict (or a dict with one under 'module'), "
                          f"found a {type(state).__name__}")
  bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, np.ndarray)]
  if bad:
    raise CheckpointError(f"{file}: not a flat state dict: entries {format_keys(map(str, bad), 3)} "
                          f"are not name -> tensor")
  keys = list(state)
  if not any(k.startswith("double_blocks.") or k.startswith("single_blocks.") for k in keys):
    raise CheckpointError(f"{file}: not a HunyuanVideo transformer in the original layout (no "
                          f"'double_blocks.' keys; found e.g. {format_keys(keys, 3)})")
  if config is None:
    config = config_from_original({k: tuple(v.shape) for k, v in state.items()})
  return Source("original", file, ArrayReader(state), config)


def open_source(src: str | os.PathLike, config: HunyuanConfig | str | None = None) -> Source:
  """Finds the weights under `src`, tells the layout apart and settles the config (`config`, if
  given, wins over the checkpoint's own)."""
  path = Path(src)
  config = resolve_config(config)
  if not path.exists():
    raise CheckpointError(f"{path}: no such file or directory")
  if path.is_file():
    return _open_original(path, config)
  root = path / "transformer" if (path / "transformer" / "config.json").is_file() else path
  if (root / "config.json").is_file():
    return _open_diffusers(root, config)
  for file in (path / ORIGINAL_FILE, path / "transformers" / ORIGINAL_FILE):
    if file.is_file():
      return _open_original(file, config)
  raise CheckpointError(f"{path}: neither a diffusers HunyuanVideo transformer (no config.json) "
                        f"nor an original checkpoint (no {ORIGINAL_FILE} here or under "
                        f"transformers/)")


def _original_pieces(key: str, shape: tuple[int, ...], hidden: int) -> list[Piece] | None:
  """Original key -> the diffusers-named pieces it holds; None if no rule covers it."""
  module, _, param = key.rpartition(".")
  if param not in ("weight", "bias"):
    return None
  match = _ORIGINAL_BLOCK_KEY.fullmatch(module)
  if match is None:
    name = ORIGINAL_TOP.get(module)
    if name is None:
      return None
    if module == "final_layer.adaLN_modulation.1":  # (shift, scale) -> (scale, shift)
      half = shape[0] // 2
      return [Piece(f"{name}.{param}", ((half, shape[0]), (0, half)))]
    return [Piece(f"{name}.{param}")]
  group, index, rest = match.groups()
  prefix, table, fused = ORIGINAL_GROUPS[group]
  head = f"{prefix}.{index}."
  if rest in table:
    return [Piece(f"{head}{table[rest]}.{param}")]
  if rest in fused:
    parts = fused[rest]
    sizes = [hidden] * 3 + ([shape[0] - 3 * hidden] if len(parts) == 4 else [])
    bounds = np.cumsum([0, *sizes]).tolist()
    return [Piece(f"{head}{part}.{param}", ((start, stop),))
            for part, start, stop in zip(parts, bounds[:-1], bounds[1:])]
  return None


def rule_for(name: str, ndim: int) -> Rule | None:
  """diffusers key -> `Rule` into the NNX tree; None if the key is not a HunyuanVideo parameter."""
  match = _DIFFUSERS_BLOCK_KEY.fullmatch(name)
  index, rest = (int(match.group(2)), match.group(3)) if match else (None, name)
  module, _, param = rest.rpartition(".")
  if param not in ("weight", "bias") or not module:
    return None
  module = DIFFUSERS_TO_NNX.get(module, module)
  if match:
    module = f"{match.group(1)}.{module}"
  if param == "bias":
    return Rule(f"{module}.bias", index, "copy")
  if module.rsplit(".", 1)[-1].startswith("norm"):
    return Rule(f"{module}.scale", index, "copy")
  if module == "x_embedder.proj" and ndim == 5:
    return Rule("x_embedder.proj.kernel", None, "conv3d")
  if ndim == 2:
    return Rule(f"{module}.kernel", index, "linear")
  return None


def target_shapes(config: HunyuanConfig) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """Flat `{name: (shape, dtype)}` of the model's parameters (no arrays are allocated)."""
  abstract = nnx.eval_shape(lambda: HunyuanVideoTransformer3DModel(config, rngs=nnx.Rngs(0)))
  flat = common.flatten(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
  return {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in flat.items()}


def _describe(config: HunyuanConfig) -> str:
  return (f"config ({config.num_layers} dual + {config.num_single_layers} single + "
          f"{config.num_refiner_layers} refiner layers, hidden {config.hidden_size}, mlp "
          f"{config.mlp_dim}, preset {preset_name(config)})")


def plan(source: Source, expected: Mapping[str, tuple[tuple[int, ...], np.dtype]]
         ) -> list[tuple[str, Piece, Rule]]:
  """Maps every source tensor to its pieces and `Rule`s and checks all shapes against the config,
  without reading any tensor."""
  steps: list[tuple[str, Piece, Rule]] = []
  unknown: list[str] = []
  mismatched: list[str] = []
  covered: dict[str, set[int | None]] = {}
  reader, config = source.reader, source.config
  for key in reader.keys():
    shape = reader.shape(key)
    if source.layout == "original":
      pieces = _original_pieces(key, shape, config.hidden_size)
    else:
      pieces = [Piece(key)]
    rules = [rule_for(p.name, len(shape)) for p in pieces] if pieces else [None]
    if any(r is None or r.target not in expected for r in rules):
      unknown.append(key)
      continue
    if any(r.index is not None and r.index >= expected[r.target][0][0] for r in rules):
      unknown.append(key)
      continue
    fits = all(start >= 0 and stop > start for p in pieces for start, stop in p.rows or ())
    fits = fits and (pieces[0].rows is None or sum(p.shape(shape)[0] for p in pieces) == shape[0])
    for piece, rule in zip(pieces, rules):
      want = expected[rule.target][0]
      want = want[1:] if rule.index is not None else want
      fits = fits and rule.target_shape(piece.shape(shape)) == want
    if not fits:
      mismatched.append(f"{key} {shape}")
      continue
    if not jax.numpy.issubdtype(reader.dtype(key), jax.numpy.floating):
      raise CheckpointError(f"tensor {key} has non-float dtype {reader.dtype(key)}")
    for piece, rule in zip(pieces, rules):
      steps.append((key, piece, rule))
      covered.setdefault(rule.target, set()).add(rule.index)
  what = _describe(config)
  if mismatched:
    raise CheckpointError(f"{len(mismatched)} tensor(s) do not match the {what}: "
                          f"{format_keys(mismatched, 3)}")
  if unknown:
    raise CheckpointError(f"{len(unknown)} tensor(s) are not parameters of the HunyuanVideo "
                          f"transformer with this {what}: {format_keys(unknown)}")
  missing = []
  for target, (shape, _) in expected.items():
    got = covered.get(target, set())
    if target.startswith(_STACKS):
      missing += [f"{target}[{i}]" for i in range(shape[0]) if i not in got]
    elif None not in got:
      missing.append(target)
  if missing:
    raise CheckpointError(f"{len(missing)} parameter(s) of the {what} are missing from the "
                          f"checkpoint: {format_keys(missing)}")
  return steps


# ----------------------------------------------------------------------------------------------
# Conversion



def read_params(src: str | os.PathLike, *, config: HunyuanConfig | str | None = None,
                dtype: str = "bf16") -> tuple[Source, HunyuanConfig, dict[str, Any]]:
  """Reads a checkpoint into the nested numpy parameter tree of `HunyuanVideoTransformer3DModel`.

  `config`: a `HunyuanConfig`, preset name or config.json path overriding the checkpoint's own (the
  original layout has none). `dtype` is the storage and compute dtype of the returned config; the
  conditioning embedders and norm scales stay fp32 as the model keeps them.
  """
  source = open_source(src, config)
  param_dtype = common.parse_dtype(dtype)
  config = dataclasses.replace(source.config, param_dtype=param_dtype.name, dtype=param_dtype.name)
  expected = target_shapes(config)
  steps = plan(source, expected)
  tree = common.ParamTree(expected)
  for key, piece, rule in steps:
    tree.set(rule.target, rule.apply(piece.cut(source.reader.read(key))), index=rule.index)
  common.check_all_used(source.reader.keys(), {key for key, _, _ in steps})
  return source, config, tree.finish()


def load_params(src: str | os.PathLike, *, config: HunyuanConfig | str | None = None,
                dtype: str = "bf16") -> tuple[HunyuanConfig, dict[str, Any]]:
  """Reads a checkpoint in either layout and returns `(config, params)` ready for
  `astraea_jax.models.hunyuan.from_params`."""
  _, config, params = read_params(src, config=config, dtype=dtype)
  return config, params


def convert(src: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "bf16",
            config: HunyuanConfig | str | None = None, overwrite: bool = False) -> ConversionSummary:
  """Converts the checkpoint at `src` to an orbax checkpoint at `out`; nothing is left at `out` on
  failure."""
  from astraea_jax import checkpoint  # pylint: disable=import-outside-toplevel

  start = time.perf_counter()
  out = Path(out)
  if out.exists() and not overwrite:
    raise CheckpointError(f"{out}: output already exists (use --overwrite to replace it)")
  source, config, params = read_params(src, config=config, dtype=dtype)
  leaves = jax.tree_util.tree_leaves(params)
  with common.atomic_output_dir(out, overwrite=overwrite) as tmp:
    checkpoint.save_params(tmp, params, family=FAMILY, config=config.to_dict(),
                           extra={"source": str(Path(src).absolute()), "layout": source.layout,
                                  "preset": preset_name(config)})
  return ConversionSummary("hunyuan", out.absolute(), source.layout, preset_name(config),
                 sum(x.size for x in leaves), sum(x.nbytes for x in leaves),
                 time.perf_counter() - start)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m checkpoints_convert hunyuan",
      description="Convert a HunyuanVideo transformer checkpoint (diffusers safetensors, possibly "
      "sharded, or the original mp_rank_00_model_states.pt) to an orbax checkpoint for "
      "astraea_jax.")
  parser.add_argument("--src", required=True,
                      help="diffusers pipeline root or its transformer/ folder, or the original "
                      f"{ORIGINAL_FILE} (or a folder holding it)")
  parser.add_argument("--out", required=True, help="output checkpoint directory (must not exist)")
  parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"],
                      help="storage dtype of the weights (default bf16)")
  parser.add_argument("--config", default=None,
                      help=f"architecture: a preset ({', '.join(sorted(HUNYUAN_PRESETS))}) or a "
                      "diffusers transformer config.json; default: the checkpoint's config.json, "
                      "or for the original layout read off the tensor shapes")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  args = parser.parse_args(argv)
  try:
    summary = convert(args.src, args.out, dtype=args.dtype, config=args.config,
                      overwrite=args.overwrite)
  except CheckpointError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(summary.line())
  return 0


if __name__ == "__main__":
  sys.exit(main())
