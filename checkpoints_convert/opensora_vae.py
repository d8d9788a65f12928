"""OpenSora v1.2 VAE checkpoint -> Flax params of `astraea_jax.models.opensora_vae.OpenSoraVAE`.

Source: hpcai-tech/OpenSora-VAE-v1.2's `model.safetensors` (a file, or the folder holding it): the
state dict of `VideoAutoencoderPipeline`, with
  spatial_vae.module.*   the diffusers `AutoencoderKL` (SDXL VAE) state dict
  temporal_vae.*         `VAE_Temporal_SD` (`encoder.*`, `quant_conv.conv.*`,
                         `post_quant_conv.conv.*`, `decoder.*`), every conv under `.conv.`
  scale, shift           the latent normalisation buffers (4 values each), when saved
Only the decoders are ported: encoder and quant_conv tensors are skipped (and counted). Layout
rules: Conv2d `[O, I, kh, kw]` -> `kernel [kh, kw, I, O]`, Conv3d `[O, I, kt, kh, kw]` ->
`kernel [kt, kh, kw, I, O]`, Linear `[O, I]` -> `kernel [I, O]`, norm weights stay `weight`.
diffusers' legacy attention names (`query`, `key`, `value`, `proj_attn`) are accepted too.

The architecture is not stored in the file: it is the preset (`v1.2` by default, `tiny` for tests)
and every tensor shape is checked against it; `scale`/`shift` come from the file when present.

Usage:
  python -m checkpoints_convert opensora_vae --src OpenSora-VAE-v1.2/ --out OUT [--preset v1.2]
      [--dtype float32] [--overwrite]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flax import nnx

from astraea_jax import checkpoint
from astraea_jax.models import opensora_vae as ov
from checkpoints_convert import safetensors_io
from checkpoints_convert.common import (CheckpointError, ParamTree, atomic_output_dir,
                                        check_all_used, parse_dtype)

__all__ = ["convert", "expected_params", "load_params", "main", "to_params"]

_SPATIAL = "spatial_vae.module."
_TEMPORAL = "temporal_vae."
_SKIPPED = ("encoder.", "quant_conv.")
_LEGACY_ATTENTION = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.",
                     ".proj_attn.": ".to_out.0."}


def expected_params(config: ov.OpenSoraVAEConfig, dtype) -> dict[str, tuple[tuple[int, ...], Any]]:
  model = nnx.eval_shape(lambda: ov.OpenSoraVAE(config, rngs=nnx.Rngs(0)))
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  return {".".join(map(str, p)): (tuple(v.shape), dtype) for p, v in flat}


def _target(key: str, value: np.ndarray) -> tuple[str, np.ndarray] | None:
  """Source key -> (target name, array in our layout); None for skipped tensors."""
  if key.startswith(_SPATIAL):
    rest, prefix = key[len(_SPATIAL):], "spatial."
    for old, new in _LEGACY_ATTENTION.items():
      rest = rest.replace(old, new)
  elif key.startswith(_TEMPORAL):
    rest, prefix = key[len(_TEMPORAL):], "temporal."
  else:
    raise CheckpointError(f"unexpected tensor {key!r}: not spatial_vae.module.* or temporal_vae.*")
  if rest.startswith(_SKIPPED):
    return None
  name = prefix + rest
  if name.endswith(".bias"):
    return name, value
  if not name.endswith(".weight"):
    raise CheckpointError(f"unexpected tensor {key!r}")
  base = name[:-len(".weight")]
  if value.ndim == 1:
    return name, value  # GroupNorm
  if value.ndim == 2:
    return base + ".kernel", value.T  # Linear
  if value.ndim == 4:
    if ".attentions." in name:  # legacy 1x1-conv attention projections
      return base + ".kernel", value[:, :, 0, 0].T
    return base + ".kernel", value.transpose(2, 3, 1, 0)
  if value.ndim == 5:
    return base + ".kernel", value.transpose(2, 3, 4, 1, 0)
  raise CheckpointError(f"{key}: unexpected shape {value.shape}")


def to_params(state: Mapping[str, np.ndarray], config: ov.OpenSoraVAEConfig, *,
              dtype: str | np.dtype = "float32"
              ) -> tuple[ov.OpenSoraVAEConfig, dict[str, Any], int]:
  """Released state dict -> `(config with the file's scale/shift, params, skipped count)`."""
  tree = ParamTree(expected_params(config, parse_dtype(dtype)))
  used, skipped = [], 0
  norm = {}
  for key, value in state.items():
    if key in ("scale", "shift"):
      norm[key] = tuple(float(v) for v in np.ravel(np.asarray(value, np.float32)))
      used.append(key)
      continue
    target = _target(key, np.asarray(value))
    used.append(key)
    if target is None:
      skipped += 1
      continue
    name, array = target
    if name not in tree.expected:
      raise CheckpointError(f"{key}: the configuration has no parameter {name} (another "
                            "architecture? pick the matching --preset)")
    tree.set(name, np.asarray(array))
  check_all_used(state.keys(), used, what="OpenSora VAE checkpoint")
  params = tree.finish(what="OpenSora VAE checkpoint")
  if norm:
    config = dataclasses.replace(config, **norm)
  return config, params, skipped


def _weights_path(src: str) -> str:
  if os.path.isdir(src):
    path = os.path.join(src, "model.safetensors")
    if os.path.isfile(path):
      return path
    return src  # any *.safetensors (or an index) in the folder
  if not os.path.isfile(src):
    raise CheckpointError(f"{src}: no such OpenSora VAE checkpoint")
  return src


def load_params(src: str | os.PathLike, *, config: ov.OpenSoraVAEConfig | str = "v1.2",
                dtype: str | np.dtype = "float32") -> tuple[ov.OpenSoraVAEConfig, dict[str, Any]]:
  """Reads the released checkpoint: `(config, params)` ready for `OpenSoraVAE`."""
  if isinstance(config, str):
    try:
      config = ov.PRESETS[config]
    except KeyError:
      raise CheckpointError(f"unknown OpenSora VAE preset {config!r}; choose from "
                            f"{sorted(ov.PRESETS)}") from None
  state = dict(safetensors_io.load_folder(_weights_path(os.fspath(src))))
  config, params, _ = to_params(state, config, dtype=dtype)
  return config, params


def convert(src: str | os.PathLike, out: str | os.PathLike, *,
            config: ov.OpenSoraVAEConfig | str = "v1.2", dtype: str = "float32",
            overwrite: bool = False) -> str:
  """Converts the VAE to an `astraea_jax.checkpoint` directory (family "opensora_vae")."""
  with atomic_output_dir(out, overwrite=overwrite) as tmp:
    config, params = load_params(src, config=config, dtype=dtype)
    checkpoint.save_params(tmp, params, family=ov.FAMILY,
                           config=dataclasses.replace(config, param_dtype=str(parse_dtype(dtype))
                                                      ).to_dict(),
                           extra={"source": os.fspath(src)})
  return os.fspath(out)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m checkpoints_convert opensora_vae",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--src", required=True, help="model.safetensors or the folder holding it")
  parser.add_argument("--out", required=True, help="output orbax checkpoint directory")
  parser.add_argument("--preset", default="v1.2", choices=sorted(ov.PRESETS))
  parser.add_argument("--dtype", default="float32", help="parameter dtype (fp32 / bf16)")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
  args = parser.parse_args(argv)
  path = convert(args.src, args.out, config=args.preset, dtype=args.dtype,
                 overwrite=args.overwrite)
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
