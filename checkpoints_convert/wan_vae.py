"""Wan2.1 VAE checkpoints -> Flax params of `astraea_jax.models.wan_vae.AutoencoderKLWan` (orbax).

Two source layouts hold the same weights:
  * diffusers (`Wan-AI/Wan2.1-T2V-*-Diffusers`, folder `vae/`): `config.json` +
    `diffusion_pytorch_model.safetensors`, names like `decoder.up_blocks.1.resnets.0.conv1.weight`.
  * Wan2.1's own release: `Wan2.1_VAE.pth`, a `torch.save`d state dict of `WanVAE_`
    (wan/modules/vae.py), names like `decoder.upsamples.4.residual.2.weight`, read without torch by
    `pth_io`. It carries no config: the architecture defaults to the "wan2.1" preset (Wan hard-codes
    it and the latent statistics), and every tensor shape is checked against it.
The layout is told by the names, so either may come as `.pth` or `.safetensors`.

Wan names are first renamed to diffusers' (the mapping of `convert_vae` in diffusers'
scripts/convert_wan_to_diffusers.py, written for any depth: Wan's decoder is one flat nn.Sequential
with `num_res_blocks + 1` residual blocks and one upsampler per level). Our module names are
diffusers', so the layout rules are: Conv3d `weight [O, I, kt, ky, kx]` ->
`kernel [kt, ky, kx, I, O]`, Conv2d `weight [O, I, ky, kx]` -> `kernel [ky, kx, I, O]`, RMS-norm
`gamma [C, 1, 1(, 1)]` -> `gamma [C]`, and `resample.1.` (the conv inside an nn.Sequential) ->
`resample.`. Every source tensor must be used and every parameter filled.

Usage:
  python -m checkpoints_convert wan_vae SRC OUT [--dtype float32] [--preset NAME] [--overwrite]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from astraea_jax.models.wan_vae import AutoencoderKLWan, WanVAEConfig
from checkpoints_convert import pth_io, safetensors_io
from checkpoints_convert.common import (CheckpointError, ParamTree, atomic_output_dir,
                                        check_all_used, parse_dtype)

__all__ = ["FAMILY", "convert", "load_params", "load_source", "main", "to_params",
           "wan_to_diffusers_names"]

FAMILY = "wan_vae"
_WAN_PTH = "Wan2.1_VAE.pth"
_DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"

# Wan's `ResidualBlock.residual` nn.Sequential index (or `shortcut`) -> diffusers' layer name.
_WAN_RESNET = {"residual.0": "norm1", "residual.2": "conv1", "residual.3": "norm2",
               "residual.6": "conv2", "shortcut": "conv_shortcut"}
_WAN_TOP = {"conv1": "quant_conv", "conv2": "post_quant_conv"}
_WAN_ENDS = {"conv1": "conv_in", "head.0": "norm_out", "head.2": "conv_out"}
_RESNET_KEY = re.compile(r"(residual\.\d+|shortcut)\.(weight|bias|gamma)")
# Any of these prefixes marks a Wan-named state dict.
_WAN_MARKERS = ("encoder.downsamples.", "decoder.upsamples.", "encoder.middle.", "decoder.middle.",
                "encoder.head.", "decoder.head.")


def _wan_resnet(rest: str, key: str) -> str:
  m = _RESNET_KEY.fullmatch(rest)
  if not m or m[1] not in _WAN_RESNET:
    raise CheckpointError(f"unexpected residual-block tensor {key!r} in the Wan VAE checkpoint")
  return f"{_WAN_RESNET[m[1]]}.{m[2]}"


def _wan_to_diffusers_name(key: str, num_res_blocks: int) -> str:
  part, _, rest = key.partition(".")
  if part in _WAN_TOP and rest in ("weight", "bias"):
    return f"{_WAN_TOP[part]}.{rest}"
  if part not in ("encoder", "decoder"):
    raise CheckpointError(f"unexpected tensor {key!r} in the Wan VAE checkpoint")
  for wan, ours in _WAN_ENDS.items():
    if rest.startswith(wan + "."):
      return f"{part}.{ours}.{rest[len(wan) + 1:]}"
  if m := re.fullmatch(r"middle\.([02])\.(.+)", rest):
    return f"{part}.mid_block.resnets.{int(m[1]) // 2}.{_wan_resnet(m[2], key)}"
  if m := re.fullmatch(r"middle\.1\.(.+)", rest):
    return f"{part}.mid_block.attentions.0.{m[1]}"
  if part == "encoder" and (m := re.fullmatch(r"downsamples\.(\d+)\.(.+)", rest)):
    if m[2].startswith(("resample.", "time_conv.")):
      return f"encoder.down_blocks.{m[1]}.{m[2]}"
    return f"encoder.down_blocks.{m[1]}.{_wan_resnet(m[2], key)}"
  if part == "decoder" and (m := re.fullmatch(r"upsamples\.(\d+)\.(.+)", rest)):
    level, j = divmod(int(m[1]), num_res_blocks + 2)
    if j <= num_res_blocks:
      return f"decoder.up_blocks.{level}.resnets.{j}.{_wan_resnet(m[2], key)}"
    return f"decoder.up_blocks.{level}.upsamplers.0.{m[2]}"
  raise CheckpointError(f"unexpected tensor {key!r} in the Wan VAE checkpoint")


def is_wan_layout(keys: Sequence[str]) -> bool:
  """Whether a state dict uses `WanVAE_`'s names rather than diffusers'."""
  return any(k.startswith(_WAN_MARKERS) for k in keys)


def wan_to_diffusers_names(state: Mapping[str, np.ndarray], *,
                           num_res_blocks: int = 2) -> dict[str, np.ndarray]:
  """Renames a `WanVAE_` state dict (Wan2.1_VAE.pth) to diffusers' `AutoencoderKLWan` names."""
  out: dict[str, np.ndarray] = {}
  for key, value in state.items():
    name = _wan_to_diffusers_name(key, num_res_blocks)
    if name in out:
      raise CheckpointError(f"two tensors of the Wan VAE checkpoint map to {name!r}")
    out[name] = value
  return out


def _target_name(key: str, ndim: int) -> tuple[str, str]:
  """diffusers name -> (our param name, layout rule)."""
  key = key.replace(".resample.1.", ".resample.")
  stem, _, param = key.rpartition(".")
  if param == "weight" and ndim in (4, 5):
    return f"{stem}.kernel", f"conv{ndim}d"
  if param == "gamma":
    return key, "gamma"
  if param == "bias":
    return key, "bias"
  raise CheckpointError(f"unexpected tensor {key!r} ({ndim}-D) in the Wan VAE checkpoint")


def _expected(config: WanVAEConfig, dtype: np.dtype) -> dict[str, tuple[tuple[int, ...], Any]]:
  model = nnx.eval_shape(lambda: AutoencoderKLWan(config, rngs=nnx.Rngs(0)))
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  return {".".join(map(str, path)): (tuple(v.shape), dtype) for path, v in flat}


def _intify(tree: Any) -> Any:
  """String digit keys (list indices of `nnx.List`) -> ints, as in `nnx.State.to_pure_dict()`."""
  if isinstance(tree, Mapping):
    return {int(k) if isinstance(k, str) and k.isdigit() else k: _intify(v)
            for k, v in tree.items()}
  return tree


def to_params(state: Mapping[str, np.ndarray], config: WanVAEConfig, *,
              dtype: str | np.dtype = "float32") -> dict[str, Any]:
  """diffusers-named tensors -> the nested param dict of `AutoencoderKLWan` (a pure `nnx.State`).

  Raises `CheckpointError` unless every tensor is used and every parameter filled with its shape.
  """
  dtype = parse_dtype(dtype)
  tree = ParamTree(_expected(config, dtype))
  used = []
  for key, value in state.items():
    value = np.asarray(value)
    name, rule = _target_name(key, value.ndim)
    if rule == "conv5d":
      value = value.transpose(2, 3, 4, 1, 0)
    elif rule == "conv4d":
      value = value.transpose(2, 3, 1, 0)
    elif rule == "gamma":
      if value.ndim < 1 or value.size != value.shape[0]:
        raise CheckpointError(f"{key}: expected an RMS-norm scale [C, 1, ...], got {value.shape}")
      value = value.reshape(-1)
    if name not in tree.expected:
      raise CheckpointError(f"tensor {key!r} has no place in a Wan VAE of this config (as "
                            f"{name!r}); a different depth or a Wan2.2 checkpoint?")
    tree.set(name, np.ascontiguousarray(value))
    used.append(key)
  check_all_used(state.keys(), used, what="Wan VAE checkpoint")
  return _intify(tree.finish(what="Wan VAE checkpoint"))


def _read_config_json(path: Path) -> WanVAEConfig:
  try:
    raw = json.loads(path.read_text())
    return WanVAEConfig.from_diffusers_config(raw)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path}: cannot read the VAE config: {e}") from None
  except (ValueError, TypeError, AttributeError) as e:
    raise CheckpointError(f"{path}: not a usable Wan2.1 AutoencoderKLWan config: {e}") from None


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
  if path.suffix == ".safetensors" or path.is_dir():
    return dict(safetensors_io.load_folder(path))
  return pth_io.load_state_dict(path)


def _resolve(src: Path) -> tuple[Path, Path | None]:
  """`src` -> (weights file or folder, config.json if there is one)."""
  if src.is_dir():
    for folder in (src / "vae", src):
      if (folder / "config.json").is_file() and any(folder.glob("*.safetensors*")):
        return folder, folder / "config.json"
    if (src / _WAN_PTH).is_file():
      return src / _WAN_PTH, None
    raise CheckpointError(f"{src}: neither a diffusers VAE folder (config.json + safetensors, or "
                          f"vae/ holding them) nor a folder with {_WAN_PTH}")
  if not src.is_file():
    raise CheckpointError(f"{src}: no such file or directory")
  sibling = src.parent / "config.json"
  return src, sibling if src.suffix == ".safetensors" and sibling.is_file() else None


def load_source(src: str | os.PathLike, *, config: WanVAEConfig | str | None = None
                ) -> tuple[WanVAEConfig, dict[str, np.ndarray]]:
  """Reads a Wan2.1 VAE checkpoint in either layout: its config and a diffusers-named state dict.

  Args:
    src: a diffusers `vae/` folder (or the pipeline root holding it), a `.safetensors` file, or
      Wan's `Wan2.1_VAE.pth` (or a folder holding it).
    config: overrides the architecture (a `WanVAEConfig` or a preset name). Without it the
      diffusers config.json is used, else the "wan2.1" preset.

  Returns:
    `(config, state)`, tensors in their source dtype (memory-mapped where the format allows).
  """
  weights, config_json = _resolve(Path(src))
  if isinstance(config, str):
    try:
      config = WanVAEConfig.preset(config)
    except ValueError as e:
      raise CheckpointError(str(e)) from None
  if config is None:
    config = _read_config_json(config_json) if config_json else WanVAEConfig.preset("wan2.1")
  state = _read_tensors(weights)
  if not state:
    raise CheckpointError(f"{weights}: holds no tensors")
  if is_wan_layout(list(state)):
    state = wan_to_diffusers_names(state, num_res_blocks=config.num_res_blocks)
  return config, state


def load_params(src: str | os.PathLike, *, config: WanVAEConfig | str | None = None,
                dtype: str | np.dtype = "float32") -> tuple[WanVAEConfig, dict[str, Any]]:
  """Reads a checkpoint in either layout: `(config, params)` ready for `wan_vae.from_params`."""
  config, state = load_source(src, config=config)
  return config, to_params(state, config, dtype=dtype)


def convert(src: str | os.PathLike, out: str | os.PathLike, dtype: str | np.dtype = "float32", *,
            config: WanVAEConfig | str | None = None, overwrite: bool = False) -> Path:
  """Converts a Wan2.1 VAE checkpoint to an orbax checkpoint directory at `out`; returns it.

  Nothing is left at `out` if any check fails. Load the result with `wan_vae.load_checkpoint`.
  """
  from astraea_jax import checkpoint  # pylint: disable=import-outside-toplevel

  dtype = parse_dtype(dtype)
  config, params = load_params(src, config=config, dtype=dtype)
  with atomic_output_dir(out, overwrite=overwrite) as tmp:
    checkpoint.save_params(tmp, params, family=FAMILY, config=dataclasses.asdict(config),
                           extra={"source": os.fspath(src), "dtype": dtype.name})
  return Path(out).absolute()


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog=f"python -m checkpoints_convert {FAMILY}",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--src", required=True, help=f"diffusers vae/ folder, Wan-Diffusers root, or {_WAN_PTH}")
  parser.add_argument("--out", required=True, help="output orbax checkpoint directory")
  parser.add_argument("--dtype", default="float32",
                      help="parameter dtype: float32 (default), bfloat16 or float16")
  parser.add_argument("--preset", default=None,
                      help="architecture preset (wan2.1, tiny) instead of the checkpoint's config")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
  args = parser.parse_args(argv)
  path = convert(args.src, args.out, args.dtype, config=args.preset, overwrite=args.overwrite)
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  try:
    sys.exit(main())
  except CheckpointError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
