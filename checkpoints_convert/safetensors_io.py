"""A numpy-only reader (and small writer) for the safetensors format, single-file or sharded.

Format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length `n`, `n`
bytes of JSON mapping each tensor name to `{"dtype", "shape", "data_offsets": [begin, end]}`
(offsets relative to the byte after the header) plus an optional `"__metadata__"` string map, then
the raw little-endian tensor bytes. Sharded checkpoints add `*.safetensors.index.json` with a
`weight_map` from tensor name to shard file.

Tensors are read one at a time through `np.memmap`, so a converter never holds more than the tensor
it is working on (bf16 arrays use `ml_dtypes.bfloat16`). Every header is validated when a file is
opened: a truncated file or an index naming a missing shard fails at once with a `CheckpointError`.

    with open_safetensors("ckpt_dir") as st:      # a file, a directory, or an index.json
      for key in st.keys():
        array = st.read(key)                       # np.ndarray view of the file (read-only)
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import NamedTuple

import ml_dtypes
import numpy as np

from checkpoints_convert.common import CheckpointError, format_keys

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
# A header larger than this is not a safetensors file (the format itself caps it at 100 MB).
_MAX_HEADER = 100 * 1024 * 1024


class TensorInfo(NamedTuple):
  """Where one tensor lives: `file`, safetensors `dtype` name, `shape`, absolute byte `offset`."""
  file: Path
  dtype: str
  shape: tuple[int, ...]
  offset: int

  @property
  def np_dtype(self) -> np.dtype:
    return _DTYPES[self.dtype]

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * _DTYPES[self.dtype].itemsize


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
  """Parses and validates one file's header: `({name: TensorInfo}, metadata)`.

  Raises `CheckpointError` for a missing file, a malformed header, an unknown dtype, a byte range
  that does not match the shape, or data beyond the end of the file (truncation).
  """
  path = Path(path)
  try:
    size = path.stat().st_size
    with open(path, "rb") as f:
      head = f.read(8)
      if len(head) < 8:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
      (n,) = struct.unpack("<Q", head)
      if n > _MAX_HEADER:
        raise CheckpointError(f"{path}: not a safetensors file (header length {n})")
      if 8 + n > size:
        raise CheckpointError(f"{path}: truncated safetensors file (header of {n} bytes, file "
                              f"of {size})")
      raw = f.read(n)
  except FileNotFoundError:
    raise CheckpointError(f"{path}: no such file") from None
  except IsADirectoryError:
    raise CheckpointError(f"{path}: is a directory, not a safetensors file") from None
  try:
    header = json.loads(raw)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path}: not a safetensors file (bad header: {e})") from None
  if not isinstance(header, dict):
    raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
  metadata = header.pop("__metadata__", None) or {}
  data_size = size - 8 - n
  tensors: dict[str, TensorInfo] = {}
  for name, entry in header.items():
    try:
      dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
    except (KeyError, TypeError, ValueError):
      raise CheckpointError(f"{path}: malformed header entry for tensor {name!r}") from None
    if dtype not in _DTYPES:
      raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
    info = TensorInfo(path, dtype, tuple(int(d) for d in shape), 8 + n + int(begin))
    if end - begin != info.nbytes or begin < 0:
      raise CheckpointError(f"{path}: tensor {name!r} has byte range [{begin}, {end}) that does "
                            f"not match shape {list(shape)} of {dtype}")
    if end > data_size:
      raise CheckpointError(f"{path}: truncated safetensors file (tensor {name!r} ends at data "
                            f"byte {end}, only {data_size} present)")
    tensors[name] = info
  return tensors, metadata


class SafetensorsReader:
  """Read-only view of one or more safetensors files as one name -> tensor mapping.

  Build it with `open_safetensors`. `keys()`, `shape(k)`, `dtype(k)` come from the headers alone;
  `read(k)` maps that tensor's bytes (no copy until the caller converts it).
  """

  def __init__(self, tensors: Mapping[str, TensorInfo], metadata: Mapping[str, str] | None = None,
               source: Path | None = None):
    self._tensors = dict(tensors)
    self.metadata = dict(metadata or {})
    self.source = source

  def __enter__(self) -> SafetensorsReader:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    """Nothing is held open between reads; present so the reader works as a context manager."""

  def keys(self) -> list[str]:
    return list(self._tensors)

  def __contains__(self, key: object) -> bool:
    return key in self._tensors

  def __len__(self) -> int:
    return len(self._tensors)

  def __iter__(self) -> Iterator[str]:
    return iter(self._tensors)

  def info(self, key: str) -> TensorInfo:
    try:
      return self._tensors[key]
    except KeyError:
      raise CheckpointError(f"tensor {key!r} not in {self.source}") from None

  def shape(self, key: str) -> tuple[int, ...]:
    return self.info(key).shape

  def dtype(self, key: str) -> np.dtype:
    return self.info(key).np_dtype

  def files(self) -> list[Path]:
    return sorted({t.file for t in self._tensors.values()})

  def nbytes(self) -> int:
    return sum(t.nbytes for t in self._tensors.values())

  def read(self, key: str) -> np.ndarray:
    """The tensor as a read-only numpy array backed by the file (`np.memmap`).

    The array is a view of the file: copy it (`np.array(...)`) before rewriting that file, since
    truncating a mapped file kills the process (SIGBUS) on the next access.
    """
    info = self.info(key)
    if info.nbytes == 0:
      return np.zeros(info.shape, info.np_dtype)
    try:
      array = np.memmap(info.file, dtype=info.np_dtype, mode="r", offset=info.offset,
                        shape=info.shape or (1,))
    except (OSError, ValueError) as e:
      raise CheckpointError(f"{info.file}: cannot read tensor {key!r}: {e}") from None
    return array.reshape(info.shape) if not info.shape else array

  def items(self) -> Iterator[tuple[str, np.ndarray]]:
    """Yields `(key, array)` one tensor at a time, in file order."""
    for key in sorted(self._tensors, key=lambda k: self._tensors[k][::3]):  # (file, offset)
      yield key, self.read(key)


def _open_index(index: Path) -> SafetensorsReader:
  try:
    weight_map = json.loads(index.read_text())["weight_map"]
  except FileNotFoundError:
    raise CheckpointError(f"{index}: no such file") from None
  except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
    raise CheckpointError(f"{index}: not a safetensors index (no weight_map)") from None
  shards = sorted(set(weight_map.values()))
  missing = [s for s in shards if not (index.parent / s).is_file()]
  if missing:
    raise CheckpointError(f"{index}: missing shard(s) {format_keys(missing)}")
  tensors: dict[str, TensorInfo] = {}
  metadata: dict[str, str] = {}
  for shard in shards:
    found, meta = read_header(index.parent / shard)
    metadata.update(meta)
    for name, info in found.items():
      if weight_map.get(name) == shard:
        tensors[name] = info
  absent = set(weight_map) - set(tensors)
  if absent:
    raise CheckpointError(f"{index}: {len(absent)} tensor(s) listed in the index are not in their "
                          f"shard: {format_keys(absent)}")
  return SafetensorsReader(tensors, metadata, index)


def _open_files(files: list[Path], source: Path) -> SafetensorsReader:
  tensors: dict[str, TensorInfo] = {}
  metadata: dict[str, str] = {}
  for file in files:
    found, meta = read_header(file)
    metadata.update(meta)
    dup = set(found) & set(tensors)
    if dup:
      raise CheckpointError(f"{source}: tensor(s) in more than one file: {format_keys(dup)}")
    tensors.update(found)
  return SafetensorsReader(tensors, metadata, source)


def open_safetensors(path: str | os.PathLike) -> SafetensorsReader:
  """Opens a `.safetensors` file, a `*.safetensors.index.json`, or a directory holding either.

  A directory with exactly one index uses it (sharded checkpoint); otherwise all its `*.safetensors`
  files are read as one mapping (a name in two files is an error). Raises `CheckpointError` if the
  path holds no weights, a header is bad, a file is truncated or a shard is missing.
  """
  path = Path(path)
  if path.is_dir():
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
      raise CheckpointError(f"{path}: more than one safetensors index: "
                            f"{format_keys(p.name for p in indexes)}")
    if indexes:
      return _open_index(indexes[0])
    files = sorted(path.glob("*.safetensors"))
    if not files:
      raise CheckpointError(f"{path}: no .safetensors weights in this directory")
    return _open_files(files, path)
  if path.name.endswith(".index.json"):
    return _open_index(path)
  if not path.exists():
    raise CheckpointError(f"{path}: no such file or directory")
  return _open_files([path], path)


def load_folder(path: str | os.PathLike) -> Iterator[tuple[str, np.ndarray]]:
  """Yields `(key, array)` for every tensor under `path` (see `open_safetensors`), one at a time."""
  yield from open_safetensors(path).items()


def save_file(tensors: Mapping[str, np.ndarray], path: str | os.PathLike,
              metadata: Mapping[str, str] | None = None) -> None:
  """Writes numpy arrays to one safetensors file (tests and small outputs: all held in memory)."""
  header: dict[str, object] = {}
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  offset = 0
  arrays = []
  for name, array in tensors.items():
    array = np.asarray(array, order="C")
    if array.dtype not in _NAMES:
      raise CheckpointError(f"cannot store tensor {name!r} of dtype {array.dtype} in safetensors")
    header[name] = {"dtype": _NAMES[array.dtype], "shape": list(array.shape),
                    "data_offsets": [offset, offset + array.nbytes]}
    offset += array.nbytes
    arrays.append(array)
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # the format aligns the data start to 8 bytes
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for array in arrays:
      f.write(array.tobytes())
