"""Helpers shared by every checkpoint converter: errors, atomic output, a checked target tree.

A converter reads source tensors one at a time (see `safetensors_io`), renames them and fills a
`ParamTree` of numpy arrays with the target layout; `ParamTree.finish` and `check_all_used` then
prove that every source tensor was used and every target parameter filled with the right shape,
before anything is written through `atomic_output_dir` (no partial output directory is ever left
behind).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

_DTYPES = {
    "bf16": np.dtype(ml_dtypes.bfloat16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "fp32": np.dtype(np.float32),
    "float32": np.dtype(np.float32),
    "fp16": np.dtype(np.float16),
    "float16": np.dtype(np.float16),
}


class CheckpointError(Exception):
  """A checkpoint cannot be read or does not fit the target model. The message is one line."""


def format_keys(keys: Iterable[str], limit: int = 5) -> str:
  """`"a, b, c (+12 more)"`: a few keys (sorted) and a count of the rest, for one-line errors."""
  keys = sorted(keys)
  shown = ", ".join(keys[:limit])
  if len(keys) > limit:
    shown += f" (+{len(keys) - limit} more)"
  return shown


def parse_dtype(name: str | np.dtype) -> np.dtype:
  """`"bf16"|"bfloat16"|"fp32"|"float32"|"fp16"|"float16"` (or a numpy dtype) -> numpy dtype."""
  if isinstance(name, np.dtype):
    return name
  try:
    return _DTYPES[str(name).lower()]
  except KeyError:
    raise CheckpointError(f"unknown dtype {name!r}; choose from {sorted(_DTYPES)}") from None


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
  """Yields a fresh temporary sibling of `out`; renames it to `out` only if the body succeeds.

  On any exception the temporary directory is removed, so a failed conversion leaves nothing at
  `out` (and an existing `out` untouched). With `overwrite=True` an existing `out` is replaced on
  success; otherwise an existing `out` is an error before any work is done.
  """
  out = Path(out).absolute()
  if out.exists() and not overwrite:
    raise CheckpointError(f"{out}: output already exists (pass overwrite to replace it)")
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  try:
    if out.exists():
      old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
      os.replace(out, old / out.name)
      os.replace(tmp, out)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def check_all_used(source_keys: Iterable[str], used_keys: Iterable[str], *, what: str = "checkpoint"
                   ) -> None:
  """Raises `CheckpointError` naming the source tensors that no rule consumed."""
  unused = set(source_keys) - set(used_keys)
  if unused:
    raise CheckpointError(f"{len(unused)} unused tensor(s) in the {what}: {format_keys(unused)}")


class ParamTree:
  """A flat, dot-named tree of numpy target arrays, filled piece by piece and checked at the end.

  `expected` maps target names (`"blocks.attn1.to_q.kernel"`) to `(shape, dtype)`. Arrays are
  allocated on first write. A name may be filled whole (`set(name, value)`) or, for parameters
  stacked along a leading layer axis, one slice at a time (`set(name, value, index=i)`); each slice
  must be written exactly once.
  """

  def __init__(self, expected: Mapping[str, tuple[tuple[int, ...], Any]]):
    self._expected = {k: (tuple(int(d) for d in s), np.dtype(t)) for k, (s, t) in expected.items()}
    self._arrays: dict[str, np.ndarray] = {}
    self._filled: dict[str, np.ndarray] = {}  # per-name bool mask over the leading axis (or [1])
    self._sliced: dict[str, bool] = {}

  @property
  def expected(self) -> Mapping[str, tuple[tuple[int, ...], np.dtype]]:
    return self._expected

  def set(self, name: str, value: np.ndarray, *, index: int | None = None) -> None:
    """Casts `value` to the target dtype and stores it (into slice `index` of a stacked name)."""
    if name not in self._expected:
      raise CheckpointError(f"no target parameter {name!r}")
    shape, dtype = self._expected[name]
    want = shape if index is None else shape[1:]
    if tuple(value.shape) != want:
      where = name if index is None else f"{name}[{index}]"
      raise CheckpointError(f"shape mismatch for {where}: checkpoint has {tuple(value.shape)}, "
                            f"the model expects {want}")
    if index is not None and not 0 <= index < shape[0]:
      raise CheckpointError(f"layer index {index} out of range for {name} with {shape[0]} layers")
    if name not in self._arrays:
      self._arrays[name] = np.empty(shape, dtype)
      # Whole writes track one slot; sliced writes one slot per layer.
      self._filled[name] = np.zeros(1 if index is None else shape[0], bool)
      self._sliced[name] = index is not None
    mask = self._filled[name]
    slot = 0 if index is None else index
    if mask[slot] or self._sliced[name] != (index is not None):
      raise CheckpointError(f"target parameter {name!r} written twice")
    if index is None:
      self._arrays[name][...] = value.astype(dtype, copy=False)
    else:
      self._arrays[name][index] = value.astype(dtype, copy=False)
    mask[slot] = True

  def missing(self) -> list[str]:
    """Names (with `[i]` for missing layer slices) that were not filled."""
    out = []
    for name in self._expected:
      mask = self._filled.get(name)
      if mask is None:
        out.append(name)
      elif not mask.all():
        out.extend(f"{name}[{i}]" for i in np.flatnonzero(~mask))
    return out

  def finish(self, *, what: str = "checkpoint") -> dict[str, Any]:
    """Checks that everything was filled and returns the nested dict of arrays."""
    missing = self.missing()
    if missing:
      raise CheckpointError(f"{len(missing)} model parameter(s) missing from the {what}: "
                            f"{format_keys(missing)}")
    return unflatten(self._arrays)

  def nbytes(self) -> int:
    return sum(a.nbytes for a in self._arrays.values())


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """Nested dict -> `{"a.b.c": leaf}`."""
  out: dict[str, Any] = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      out.update(flatten(value, name + "."))
    else:
      out[name] = value
  return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """`{"a.b.c": leaf}` -> nested dict."""
  out: dict[str, Any] = {}
  for name, value in flat.items():
    node = out
    *parents, last = name.split(".")
    for part in parents:
      node = node.setdefault(part, {})
    node[last] = value
  return out


@dataclasses.dataclass(frozen=True)
class ConversionSummary:
  """What a transformer conversion wrote, as the one line its command prints."""

  family: str
  out: Path
  layout: str
  preset: str
  num_params: int
  nbytes: int
  seconds: float

  def line(self) -> str:
    return (f"{self.family} ({self.layout} layout, {self.preset}): {_count(self.num_params)} "
            f"params, {_size(self.nbytes)} -> {self.out} in {self.seconds:.1f} s")


def _count(n: int) -> str:
  for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
    if n >= scale:
      return f"{n / scale:.2f}{unit}"
  return str(n)


def _size(n: int) -> str:
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= scale:
      return f"{n / scale:.2f} {unit}"
  return f"{n} B"


def save_converted(src: str | os.PathLike, out: str | os.PathLike, load: Any, *, family: str,
                   config: Any, dtype: str, overwrite: bool) -> str:
  """`load(src, config, dtype=dtype) -> (config, params)` written to an `astraea_jax.checkpoint`
  directory of `family`; nothing is left at `out` if reading or writing fails."""
  from astraea_jax import checkpoint  # pylint: disable=import-outside-toplevel

  with atomic_output_dir(out, overwrite=overwrite) as tmp:
    config, params = load(src, config, dtype=dtype)
    checkpoint.save_params(tmp, params, family=family, config=dataclasses.asdict(config),
                           extra={"source": os.fspath(src), "dtype": str(parse_dtype(dtype))})
  return os.fspath(out)


def encoder_main(argv: Any, convert: Any, *, prog: str, description: str, src_help: str) -> int:
  """The command line of a single-component converter: --src, --out, --dtype, --preset,
  --overwrite, calling `convert(src, out, dtype=, config=, overwrite=)`."""
  import argparse  # pylint: disable=import-outside-toplevel

  parser = argparse.ArgumentParser(prog=prog, description=description)
  parser.add_argument("--src", required=True, help=src_help)
  parser.add_argument("--out", required=True, help="output orbax checkpoint directory")
  parser.add_argument("--dtype", default="bfloat16", help="bf16 / bfloat16, fp32 / float32, fp16")
  parser.add_argument("--preset", default=None, help="architecture preset instead of config.json")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
  args = parser.parse_args(argv)
  path = convert(args.src, args.out, dtype=args.dtype, config=args.preset, overwrite=args.overwrite)
  print(f"wrote {path}")
  return 0
