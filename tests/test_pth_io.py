"""The torch-free `.pth` reader against `torch.save` files (tests/goldens/make_umt5_goldens.py)."""

import os
import pathlib
import pickle
import shutil
import zipfile

import ml_dtypes
import numpy as np
import pytest

from checkpoints_convert import pth_io
from checkpoints_convert.common import CheckpointError

GOLDENS = pathlib.Path(__file__).parent / "goldens" / "umt5"
CASES = GOLDENS / "pth_cases.pth"

_DTYPES = {
    "bfloat16": ml_dtypes.bfloat16,
    "float16": np.float16,
    "float32": np.float32,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
    "int64": np.int64,
    "bool": np.bool_
}


@pytest.fixture(scope="module")
def expected():
  with np.load(GOLDENS / "pth_cases.npz") as f:
    return {k: f[k] for k in f.files}


@pytest.mark.parametrize("mmap", [True, False])
def test_reads_every_dtype_and_layout(expected, mmap):
  obj = pth_io.load_pth(CASES, mmap=mmap)
  cases = obj["tensors"]
  names = [k for k in expected if not k.startswith("dtype_")]
  assert sorted(cases) == sorted(names)
  for name in names:
    got, want = cases[name], expected[name]
    assert got.dtype == np.dtype(_DTYPES[str(expected[f"dtype_{name}"])]), name
    assert got.shape == want.shape, name
    # Saved values are exact in float32, so the comparison is exact too.
    np.testing.assert_array_equal(got.astype(want.dtype), want, err_msg=name)
  assert not cases["transposed"].flags.c_contiguous
  assert not cases["bf16_transposed"].flags.c_contiguous
  assert cases["scalar"].shape == ()
  assert obj["meta"] == {"step": 7, "name": "x"}
  np.testing.assert_array_equal(obj["list"][0], np.ones(2, np.float32))


@pytest.mark.parametrize("mmap", [True, False])
def test_shared_storage_is_read_once(mmap):
  cases = pth_io.load_pth(CASES, mmap=mmap)["tensors"]
  assert np.shares_memory(cases["shared_full"], cases["shared_offset"])
  assert np.shares_memory(cases["shared_full"], cases["shared_strided"])


def test_mmap_arrays_are_read_only():
  cases = pth_io.load_pth(CASES)["tensors"]
  with pytest.raises(ValueError):
    cases["fp32"][0, 0, 0] = 1.0


def test_load_state_dict():
  state = pth_io.load_state_dict(GOLDENS / "umt5_wan.pth")
  assert "token_embedding.weight" in state and "blocks.1.ffn.gate.0.weight" in state
  assert all(v.dtype == np.float32 for v in state.values())
  with pytest.raises(CheckpointError, match="not a flat state dict"):
    pth_io.load_state_dict(CASES)


def test_missing_file(tmp_path):
  with pytest.raises(CheckpointError, match="no such checkpoint"):
    pth_io.load_pth(tmp_path / "nope.pth")


@pytest.mark.parametrize("keep", [0.5, 0.98])
def test_truncated_file(tmp_path, keep):
  data = (GOLDENS / "umt5_wan.pth").read_bytes()
  path = tmp_path / "truncated.pth"
  path.write_bytes(data[:int(len(data) * keep)])
  with pytest.raises(CheckpointError):
    pth_io.load_pth(path)


def test_not_a_zip(tmp_path):
  path = tmp_path / "legacy.pth"
  path.write_bytes(b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19." + bytes(64))
  with pytest.raises(CheckpointError, match="not a PyTorch zip checkpoint"):
    pth_io.load_pth(path)


def _rewrite(src: pathlib.Path, dst: pathlib.Path, *, drop=(), replace=None):
  """Copies a torch zip archive, dropping or replacing records."""
  replace = replace or {}
  with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
    for info in zin.infolist():
      suffix = info.filename.split("/", 1)[1]
      if suffix in drop:
        continue
      zout.writestr(info.filename, replace.get(suffix, zin.read(info)))


def test_missing_storage_record(tmp_path):
  path = tmp_path / "missing.pth"
  _rewrite(GOLDENS / "umt5_wan.pth", path, drop={"data/3"})
  with pytest.raises(CheckpointError, match="missing"):
    pth_io.load_pth(path)


def test_storage_of_wrong_size(tmp_path):
  path = tmp_path / "short.pth"
  _rewrite(GOLDENS / "umt5_wan.pth", path, replace={"data/0": b"\x00" * 12})
  with pytest.raises(CheckpointError, match="expected"):
    pth_io.load_pth(path, mmap=False)


class _Payload:

  def __reduce__(self):
    return (os.system, ("echo should-never-run",))


def test_refuses_arbitrary_globals(tmp_path):
  path = tmp_path / "evil.pth"
  _rewrite(GOLDENS / "umt5_wan.pth", path,
           replace={"data.pkl": pickle.dumps({"x": _Payload()}, protocol=2)})
  with pytest.raises(CheckpointError, match="refusing to unpickle global"):
    pth_io.load_pth(path)


def test_stored_records_are_memory_mapped(tmp_path):
  path = tmp_path / "copy.pth"
  shutil.copy(GOLDENS / "umt5_wan.pth", path)
  state = pth_io.load_state_dict(path)
  base = state["norm.weight"]
  while not isinstance(base, np.memmap) and base.base is not None:
    base = base.base
  assert isinstance(base, np.memmap)
