"""Saving and loading converted model parameters (orbax) with a small JSON metadata file.

A checkpoint directory holds

    params/                orbax PyTree checkpoint of the parameter tree (nested dict of arrays)
    astraea_metadata.json  {"format": 1, "family": "wan", "config": {...}, "dtypes": [...], ...}

The parameter tree is the pure-dict form of a Flax NNX state (`nnx.to_pure_dict(state)`), so
`load_params(path, abstract_state)` restores straight into a model's state:

    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Model(config, rngs=nnx.Rngs(0))))
    state = load_params(path, abstract, shardings=...)
    model = nnx.merge(graphdef, state)
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

METADATA_FILE = "astraea_metadata.json"
PARAMS_DIR = "params"
FORMAT_VERSION = 1


class _WrittenInPlace(np.ndarray):
  """A view that orbax's numpy handler writes as it is, instead of deep-copying every array first
  (that copy would double the host memory of a conversion; the save below is synchronous, so the
  arrays cannot change while they are written)."""

  def __deepcopy__(self, memo):
    return self


def _pure(state: Any) -> Any:
  if isinstance(state, nnx.State):
    return nnx.to_pure_dict(state)
  return state


def save_params(out_dir: str | os.PathLike, state: Any, *, family: str, config: Mapping[str, Any],
                extra: Mapping[str, Any] | None = None) -> Path:
  """Writes `state` (nested dict of numpy/jax arrays, or an `nnx.State`) to `out_dir`.

  Args:
    out_dir: directory to create or fill; must not already hold `params/`.
    state: the parameter tree. Numpy arrays are written as they are (no device copy).
    family: model family, e.g. `"wan"`, `"umt5"`; checked by `load_params(..., family=)`.
    config: JSON-serialisable model config (e.g. `dataclasses.asdict(config)`).
    extra: further JSON-serialisable metadata (source path, converter options).

  Returns:
    The checkpoint directory.
  """
  out = Path(out_dir).absolute()
  out.mkdir(parents=True, exist_ok=True)
  tree = jax.tree_util.tree_map(
      lambda x: x.view(_WrittenInPlace) if type(x) is np.ndarray else x, _pure(state))
  leaves = jax.tree_util.tree_leaves(tree)
  meta = {
      "format": FORMAT_VERSION,
      "family": family,
      "config": dict(config),
      "num_params": int(sum(np.size(x) for x in leaves)),
      "nbytes": int(sum(np.size(x) * np.dtype(x.dtype).itemsize for x in leaves)),
      "dtypes": sorted({str(np.dtype(x.dtype)) for x in leaves}),
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      **dict(extra or {}),
  }
  # Synchronous and uncompressed: compression buffers the encoded checkpoint in memory until it is
  # committed, which would add most of a second copy to the peak host memory of a conversion.
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False)) as ckpt:
    ckpt.save(out / PARAMS_DIR, args=ocp.args.PyTreeSave(tree))
  (out / METADATA_FILE).write_text(json.dumps(meta, indent=1, default=str) + "\n")
  return out


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
  """The metadata dict of a checkpoint written by `save_params`. Raises `FileNotFoundError`."""
  file = Path(path) / METADATA_FILE
  if not file.is_file():
    raise FileNotFoundError(f"{path}: not an astraea_jax checkpoint (no {METADATA_FILE})")
  return json.loads(file.read_text())


def load_params(path: str | os.PathLike, abstract_state: Any, *, shardings: Any = None,
                family: str | None = None) -> Any:
  """Restores the parameter tree of a `save_params` checkpoint.

  Args:
    path: the checkpoint directory.
    abstract_state: target structure: an `nnx.State` or nested dict whose leaves have `.shape` and
      `.dtype` (e.g. `jax.ShapeDtypeStruct` from `nnx.eval_shape`). Arrays are cast to these dtypes.
    shardings: a `jax.sharding.Sharding` for every leaf, or a tree of them matching the state; each
      array is read straight onto its sharding. Default: the leaf's own `.sharding` if it has one,
      else the first local device.
    family: if given, the checkpoint's family must match (`ValueError` otherwise).

  Returns:
    Same kind as `abstract_state` (an `nnx.State` if one was passed) holding `jax.Array`s.
  """
  path = Path(path).absolute()
  meta = read_metadata(path)
  if family is not None and meta.get("family") != family:
    raise ValueError(f"{path}: checkpoint of family {meta.get('family')!r}, expected {family!r}")
  is_state = isinstance(abstract_state, nnx.State)
  tree = _pure(abstract_state)
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  if shardings is None:
    shard_tree = jax.tree_util.tree_map(lambda x: getattr(x, "sharding", None) or default, tree)
  elif isinstance(shardings, jax.sharding.Sharding):
    shard_tree = jax.tree_util.tree_map(lambda _: shardings, tree)
  else:
    shard_tree = _pure(shardings)

  def restore_args(x, s):
    return ocp.ArrayRestoreArgs(sharding=s, global_shape=tuple(x.shape), dtype=x.dtype)

  args = jax.tree_util.tree_map(restore_args, tree, shard_tree)
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckpt:
    try:
      restored = ckpt.restore(path / PARAMS_DIR, args=ocp.args.PyTreeRestore(item=tree,
                                                                              restore_args=args))
    except (ValueError, KeyError) as e:
      raise ValueError(f"{path}: checkpoint does not match the model: {e}") from None
  if is_state:
    out = jax.tree_util.tree_map(lambda x: x, abstract_state)
    nnx.replace_by_pure_dict(out, restored)
    return out
  return restored


def module_from_params(make: Any, params: Mapping[str, Any], *, what: str) -> Any:
  """`make()` (an NNX module constructor, run abstractly) filled with converted `params` (the pure
  dict of `nnx.state(module, nnx.Param)`); nothing is randomly initialised. `what` names the model
  in the error when the params do not fit."""
  graphdef, state = nnx.split(nnx.eval_shape(make))
  try:
    nnx.replace_by_pure_dict(state, jax.tree.map(jax.numpy.asarray, params))
  except ValueError as e:
    raise ValueError(f"params do not fit a {what} of this config: {e}") from e
  return nnx.merge(graphdef, state)


def load_module(path: str | os.PathLike, make: Any, *, family: str, shardings: Any = None) -> Any:
  """`make(config_dict)` (an NNX module constructor from the checkpoint's stored config, run
  abstractly) restored from a checkpoint of `family` written by `save_params`."""
  meta = read_metadata(path)
  if meta.get("family") != family:
    raise ValueError(f"{path}: a {meta.get('family')!r} checkpoint, not {family}")
  graphdef, state = nnx.split(nnx.eval_shape(lambda: make(meta["config"])))
  state = load_params(path, state, shardings=shardings, family=family)
  return nnx.merge(graphdef, state)
