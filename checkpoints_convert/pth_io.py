"""A torch-free reader of PyTorch zip checkpoints (`torch.save`, format of PyTorch >= 1.6).

The archive holds `<prefix>/data.pkl` (a pickle whose tensors are `torch._utils._rebuild_tensor_v2`
calls on "persistent" storages) and one uncompressed record `<prefix>/data/<key>` per storage. This
module unpickles `data.pkl` with an allow-list: the tensor rebuild functions, the typed storage
classes, torch dtypes and `collections.OrderedDict`; any other global is refused, so a checkpoint
cannot run code. Tensors come back as numpy arrays (bf16 and fp8 through `ml_dtypes`) that honour
the saved size, stride and storage offset; with `mmap=True` they are read-only views of a memory map
of the archive, so a multi-GB checkpoint costs no RAM until read. Storages shared by several tensors
are mapped once.

Public API:
  load_pth(path, mmap=True) -> the unpickled object, tensors replaced by numpy arrays
  load_state_dict(path, mmap=True) -> dict[str, np.ndarray] (a flat mapping of names to tensors)
"""

from __future__ import annotations

import collections
import os
import pickle
import struct
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

from checkpoints_convert.common import CheckpointError

__all__ = ["load_pth", "load_state_dict"]

# Legacy typed-storage classes written by `_rebuild_tensor_v2` pickles.
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexDoubleStorage": np.dtype(np.complex128),
    "ComplexFloatStorage": np.dtype(np.complex64),
    # Dtypes newer than the typed storages are saved as raw bytes plus a dtype
    # (`_rebuild_tensor_v3`).
    "UntypedStorage": np.dtype(np.uint8),
}

# `torch.<name>` dtype globals that `_rebuild_tensor_v3` pickles reference.
_TORCH_DTYPES: dict[str, np.dtype] = {
    "float64": np.dtype(np.float64),
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "float8_e4m3fnuz": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "float8_e5m2fnuz": np.dtype(ml_dtypes.float8_e5m2fnuz),
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int16": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint64": np.dtype(np.uint64),
    "uint32": np.dtype(np.uint32),
    "uint16": np.dtype(np.uint16),
    "uint8": np.dtype(np.uint8),
    "bool": np.dtype(np.bool_),
}

_ZIP_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")
_ZIP_LOCAL_MAGIC = b"PK\x03\x04"


class _StorageType:
  """Stands in for a `torch.<X>Storage` class inside the pickle."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = _STORAGE_DTYPES[name]


class _TorchDtype:
  """Stands in for a `torch.<dtype>` global inside the pickle."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = _TORCH_DTYPES[name]


class _Storage:
  """One storage of the archive: a flat array of `numel` elements of `dtype`."""

  def __init__(self, array: np.ndarray):
    self.array = array  # [numel]


class _Archive:
  """The zip file, its record prefix and the storages read so far."""

  def __init__(self, path: str, zf: zipfile.ZipFile, prefix: str, mmap: bool):
    self.path = path
    self.zf = zf
    self.prefix = prefix
    self.mmap = mmap
    self.storages: dict[str, _Storage] = {}

  def storage(self, key: str, dtype: np.dtype, numel: int) -> _Storage:
    if key in self.storages:
      cached = self.storages[key]
      if cached.array.dtype != dtype:
        raise CheckpointError(
            f"{self.path}: storage {key} is viewed as both {cached.array.dtype} and {dtype}")
      return cached
    name = f"{self.prefix}data/{key}"
    try:
      info = self.zf.getinfo(name)
    except KeyError:
      raise CheckpointError(
          f"{self.path}: record {name!r} is missing (truncated or corrupt checkpoint)") from None
    nbytes = numel * dtype.itemsize
    if info.file_size != nbytes:
      raise CheckpointError(
          f"{self.path}: record {name!r} holds {info.file_size} bytes, expected {nbytes} "
          f"({numel} x {dtype})")
    if nbytes == 0:
      array = np.empty((0,), dtype)
    elif self.mmap:
      if info.compress_type != zipfile.ZIP_STORED:
        raise CheckpointError(
            f"{self.path}: record {name!r} is compressed; PyTorch writes stored records")
      array = np.memmap(self.path, dtype=dtype, mode="r", offset=self._data_offset(info),
                        shape=(numel,))
    else:
      try:
        raw = self.zf.read(info)
      except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointError(f"{self.path}: cannot read record {name!r}: {e}") from e
      array = np.frombuffer(raw, dtype=dtype)
    storage = _Storage(array)
    self.storages[key] = storage
    return storage

  def _data_offset(self, info: zipfile.ZipInfo) -> int:
    """Byte offset of a stored record's data (the central directory lacks the local header size)."""
    with open(self.path, "rb") as f:
      f.seek(info.header_offset)
      header = f.read(_ZIP_LOCAL_HEADER.size)
    if len(header) != _ZIP_LOCAL_HEADER.size or header[:4] != _ZIP_LOCAL_MAGIC:
      raise CheckpointError(f"{self.path}: bad local header for record {info.filename!r}")
    fields = _ZIP_LOCAL_HEADER.unpack(header)
    name_len, extra_len = fields[-2], fields[-1]
    offset = info.header_offset + _ZIP_LOCAL_HEADER.size + name_len + extra_len
    if offset + info.file_size > os.path.getsize(self.path):
      raise CheckpointError(
          f"{self.path}: record {info.filename!r} runs past the end of the file (truncated)")
    return offset


def _tensor(storage: _Storage, storage_offset: int, size, stride,
            dtype: np.dtype | None = None) -> np.ndarray:
  base = storage.array
  if dtype is not None and dtype != base.dtype:
    if base.dtype != np.uint8:
      raise CheckpointError(f"a {base.dtype} storage cannot be viewed as {dtype}")
    if base.size % dtype.itemsize:
      raise CheckpointError(f"a {base.size}-byte storage is not a whole number of {dtype} elements")
    base = base.view(dtype)
  size = tuple(int(s) for s in size)
  stride = tuple(int(s) for s in stride)
  if len(size) != len(stride) or any(s < 0 for s in size) or any(s < 0 for s in stride):
    raise CheckpointError(f"bad tensor geometry: size={size} stride={stride}")
  if any(s == 0 for s in size):
    return np.empty(size, base.dtype)
  extent = storage_offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1
  if storage_offset < 0 or extent > base.size:
    raise CheckpointError(
        f"tensor of size={size} stride={stride} at offset {storage_offset} overruns its "
        f"storage of {base.size} elements")
  flat = base[storage_offset:extent]
  return np.lib.stride_tricks.as_strided(flat, shape=size,
                                         strides=tuple(s * base.itemsize for s in stride),
                                         writeable=False)


def _check_metadata(metadata) -> None:
  # Conjugate / negative bits would change the values; PyTorch state dicts never carry them.
  if metadata and any(metadata.values()):
    raise CheckpointError(f"tensors with lazy conj/neg bits are not supported: {metadata}")


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       metadata=None):
  del requires_grad, backward_hooks
  _check_metadata(metadata)
  return _tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                       metadata=None):
  del requires_grad, backward_hooks
  _check_metadata(metadata)
  if not isinstance(dtype, _TorchDtype):
    raise CheckpointError(f"_rebuild_tensor_v3 needs a torch dtype, got {type(dtype).__name__}")
  return _tensor(storage, storage_offset, size, stride, dtype.dtype)


def _rebuild_parameter(data, requires_grad, backward_hooks):
  del requires_grad, backward_hooks
  return data


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _Unpickler(pickle.Unpickler):

  def __init__(self, file, archive: _Archive):
    super().__init__(file)
    self.archive = archive

  def find_class(self, module: str, name: str):
    if (module, name) in _ALLOWED_GLOBALS:
      return _ALLOWED_GLOBALS[(module, name)]
    if module == "torch" and name in _STORAGE_DTYPES or (module, name) == ("torch.storage",
                                                                           "UntypedStorage"):
      return _StorageType(name)
    if module == "torch" and name in _TORCH_DTYPES:
      return _TorchDtype(name)
    raise CheckpointError(f"{self.archive.path}: refusing to unpickle global {module}.{name} "
                          "(only tensors, storages and plain containers are allowed)")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
      raise CheckpointError(f"{self.archive.path}: unsupported persistent id {pid!r:.80}")
    _, storage_type, key, _location, numel = pid
    if not isinstance(storage_type, _StorageType):
      raise CheckpointError(
          f"{self.archive.path}: persistent id names no storage class: {storage_type!r:.80}")
    key = key.decode("ascii") if isinstance(key, bytes) else str(key)
    return self.archive.storage(key, storage_type.dtype, int(numel))


def _find_prefix(zf: zipfile.ZipFile, path: str) -> str:
  pickles = [n for n in zf.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
  # A checkpoint's own pickle sits one folder deep; deeper ones would belong to nested archives.
  pickles = [n for n in pickles if n.count("/") <= 1]
  if len(pickles) != 1:
    raise CheckpointError(f"{path}: expected one data.pkl in the archive, found {len(pickles)}")
  prefix = pickles[0][:-len("data.pkl")]
  byteorder = prefix + "byteorder"
  if byteorder in zf.namelist() and zf.read(byteorder).strip() != b"little":
    raise CheckpointError(f"{path}: big-endian checkpoints are not supported")
  return prefix


def load_pth(path: str | os.PathLike, mmap: bool = True) -> Any:
  """Reads a `torch.save` zip checkpoint without torch.

  Args:
    path: the `.pth` / `.pt` / `.bin` file.
    mmap: map storages from the file (read-only arrays, no copy) instead of reading them.

  Returns:
    The saved object (usually an `OrderedDict` state dict) with every tensor as a numpy array of
    the saved dtype (`ml_dtypes.bfloat16` for bf16), shape and strides.

  Raises:
    CheckpointError: a missing, truncated or corrupt file, the legacy (pre-1.6) format, or a pickle
      that references anything other than tensors, storages and plain containers.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: no such checkpoint file")
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic != _ZIP_LOCAL_MAGIC:
    raise CheckpointError(
        f"{path}: not a PyTorch zip checkpoint (legacy pre-1.6 format or another file type)")
  try:
    zf = zipfile.ZipFile(path)
  except (zipfile.BadZipFile, OSError, EOFError) as e:
    raise CheckpointError(f"{path}: unreadable zip archive (truncated or corrupt): {e}") from e
  with zf:
    prefix = _find_prefix(zf, path)
    archive = _Archive(path, zf, prefix, mmap)
    try:
      with zf.open(prefix + "data.pkl") as f:
        return _Unpickler(f, archive).load()
    except CheckpointError:
      raise
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, OSError, ValueError, TypeError,
            AttributeError, IndexError, KeyError) as e:
      raise CheckpointError(f"{path}: cannot unpickle data.pkl: {type(e).__name__}: {e}") from e


def load_state_dict(path: str | os.PathLike, mmap: bool = True) -> dict[str, np.ndarray]:
  """Reads a `.pth` state dict: a flat mapping from parameter names to arrays (see `load_pth`)."""
  obj = load_pth(path, mmap=mmap)
  if not isinstance(obj, dict):
    raise CheckpointError(f"{os.fspath(path)}: expected a state dict, found a {type(obj).__name__}")
  bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, np.ndarray)]
  if bad:
    raise CheckpointError(
        f"{os.fspath(path)}: not a flat state dict: entries {bad[:3]} are not name -> tensor")
  return dict(obj)
