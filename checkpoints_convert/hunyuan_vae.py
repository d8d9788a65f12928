"""HunyuanVideo VAE (diffusers) -> Flax params of `astraea_jax.models.hunyuan_vae.HunyuanVAEDecoder`.

Source: a diffusers `AutoencoderKLHunyuanVideo` folder, i.e. `config.json` +
`diffusion_pytorch_model.safetensors` (sharded or not), given as that folder or as the pipeline
root holding it under `vae/`. Only the decoder is ported: `encoder.*` and `quant_conv.*` tensors are
skipped (and counted); every other tensor must be used and every parameter filled with its shape,
else `CheckpointError` (one line, naming the keys).

Our names are diffusers', so the rules are per layout only:
  Conv3d  `weight [O, I, kt, kh, kw]` -> `kernel [kt, kh, kw, I, O]` (`post_quant_conv.weight`, and
          every `HunyuanVideoCausalConv3d`'s `<name>.conv.weight`)
  Linear  `weight [O, I]` -> `kernel [I, O]` (mid-block attention `to_q/to_k/to_v/to_out.0`)
  GroupNorm `weight [C]` stays `weight`; biases stay `bias`.
diffusers' legacy attention names (`query`, `key`, `value`, `proj_attn`) are accepted too.

The architecture comes from `config.json` (`HunyuanVAEConfig.from_diffusers_config`) unless a
config (or preset name) is passed. Not registered in `checkpoints_convert/__main__.py`; use
`load_params` and `astraea_jax.models.hunyuan_vae.from_params`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from astraea_jax.models import hunyuan_vae as hv
from checkpoints_convert import safetensors_io
from checkpoints_convert.common import (CheckpointError, ParamTree, check_all_used, format_keys,
                                        parse_dtype)

__all__ = ["expected_params", "load_params", "resolve", "to_params"]

_SKIPPED = ("encoder.", "quant_conv.")
_LEGACY_ATTENTION = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.",
                     ".proj_attn.": ".to_out.0."}
_WHAT = "HunyuanVideo VAE checkpoint"


def expected_params(config: hv.HunyuanVAEConfig, dtype) -> dict[str, tuple[tuple[int, ...], Any]]:
  """`{"decoder.conv_in.conv.kernel": (shape, dtype), ...}` of the decoder of `config`."""
  model = nnx.eval_shape(lambda: hv.HunyuanVAEDecoder(config, rngs=nnx.Rngs(0)))
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  return {".".join(map(str, p)): (tuple(v.shape), dtype) for p, v in flat}


def _target(key: str, value: np.ndarray) -> tuple[str, np.ndarray] | None:
  """Source key -> (target name, array in our layout); None for skipped (encoder) tensors."""
  if key.startswith(_SKIPPED):
    return None
  name = key
  for old, new in _LEGACY_ATTENTION.items():
    name = name.replace(old, new)
  if name.endswith(".bias"):
    return name, value
  if not name.endswith(".weight"):
    raise CheckpointError(f"unexpected tensor {key!r} (neither a weight nor a bias)")
  base = name[:-len(".weight")]
  if value.ndim == 1:
    return name, value  # GroupNorm
  if value.ndim == 2:
    return base + ".kernel", value.T  # Linear
  if value.ndim == 4 and ".attentions." in name:  # legacy 1x1-conv attention projections
    return base + ".kernel", value[:, :, 0, 0].T
  if value.ndim == 5:
    return base + ".kernel", value.transpose(2, 3, 4, 1, 0)  # Conv3d
  raise CheckpointError(f"{key}: unexpected shape {tuple(value.shape)}")


def to_params(state: Mapping[str, np.ndarray], config: hv.HunyuanVAEConfig, *,
              dtype: str | np.dtype = "float32") -> tuple[dict[str, Any], int]:
  """diffusers state dict -> `(params, number of skipped encoder tensors)`."""
  tree = ParamTree(expected_params(config, parse_dtype(dtype)))
  used, skipped, unknown = [], 0, []
  for key, value in state.items():
    target = _target(key, np.asarray(value))
    if target is None:
      used.append(key)
      skipped += 1
      continue
    name, array = target
    if name not in tree.expected:
      unknown.append(key)
      continue
    try:
      tree.set(name, np.asarray(array))
    except CheckpointError as e:  # name the source tensor too where it differs from the target
      raise (CheckpointError(f"{key}: {e}") if name != key else e) from None
    used.append(key)
  if unknown:
    raise CheckpointError(f"{len(unknown)} tensor(s) of the {_WHAT} have no parameter in this "
                          f"configuration (another architecture?): {format_keys(unknown)}")
  check_all_used(state.keys(), used, what=_WHAT)
  return tree.finish(what=_WHAT), skipped


def resolve(src: str | os.PathLike) -> tuple[Path, Path | None]:
  """`src` -> (weights file or folder, its config.json or None)."""
  src = Path(src)
  if src.is_dir():
    for folder in (src, src / "vae"):
      if any(folder.glob("*.safetensors*")):
        config = folder / "config.json"
        return folder, config if config.is_file() else None
    raise CheckpointError(f"{src}: no *.safetensors in it or in {src / 'vae'}")
  if not src.is_file():
    raise CheckpointError(f"{src}: no such HunyuanVideo VAE checkpoint")
  config = src.parent / "config.json"
  return src, config if config.is_file() else None


def _read_config(path: Path) -> hv.HunyuanVAEConfig:
  try:
    return hv.HunyuanVAEConfig.from_diffusers_config(json.loads(path.read_text()))
  except (OSError, ValueError, TypeError) as e:
    raise CheckpointError(f"{path}: not a usable AutoencoderKLHunyuanVideo config: {e}") from e


def load_params(src: str | os.PathLike, config: hv.HunyuanVAEConfig | str | None = None, *,
                dtype: str | np.dtype = "float32") -> tuple[hv.HunyuanVAEConfig, dict[str, Any]]:
  """Reads a diffusers VAE: `(config, params)` ready for `hunyuan_vae.from_params`.

  `config`: a `HunyuanVAEConfig` or preset name; None reads the folder's config.json (the
  "hunyuan-video" preset when there is none). The returned config's `param_dtype` is `dtype`.
  """
  weights, config_json = resolve(src)
  if isinstance(config, str):
    try:
      config = hv.PRESETS[config]
    except KeyError:
      raise CheckpointError(f"unknown HunyuanVideo VAE preset {config!r}; choose from "
                            f"{sorted(hv.PRESETS)}") from None
  elif config is None:
    config = _read_config(config_json) if config_json else hv.PRESETS["hunyuan-video"]
  np_dtype = parse_dtype(dtype)
  state = dict(safetensors_io.load_folder(weights))
  params, _ = to_params(state, config, dtype=np_dtype)
  return dataclasses.replace(config, param_dtype=np.dtype(np_dtype).name), params
