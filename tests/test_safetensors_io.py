"""checkpoints_convert.safetensors_io: headers, lazy reads, sharded indexes and broken files."""

import json
import shutil
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from checkpoints_convert import safetensors_io
from checkpoints_convert.common import CheckpointError

GOLDENS = Path(__file__).parent / "goldens" / "wan"


def _tensors():
  rng = np.random.default_rng(0)
  return {
      "a.weight": rng.standard_normal((3, 5)).astype(np.float32),
      "b.bf16": rng.standard_normal((2, 3, 4)).astype(ml_dtypes.bfloat16),
      "c.f16": rng.standard_normal((7,)).astype(np.float16),
      "d.i64": np.arange(6, dtype=np.int64).reshape(2, 3),
      "e.scalar": np.array(2.5, np.float32),
      "f.empty": np.zeros((0, 4), np.float32),
  }


def test_round_trip_all_dtypes(tmp_path):
  tensors = _tensors()
  path = tmp_path / "x.safetensors"
  safetensors_io.save_file(tensors, path, metadata={"format": "pt"})
  with safetensors_io.open_safetensors(path) as st:
    assert sorted(st.keys()) == sorted(tensors)
    assert st.metadata == {"format": "pt"}
    for name, want in tensors.items():
      assert st.shape(name) == want.shape
      assert st.dtype(name) == want.dtype
      got = st.read(name)
      assert got.dtype == want.dtype and got.shape == want.shape
      np.testing.assert_array_equal(np.asarray(got), want)
    assert st.nbytes() == sum(t.nbytes for t in tensors.values())


def test_reads_are_memory_mapped(tmp_path):
  path = tmp_path / "x.safetensors"
  safetensors_io.save_file({"w": np.ones((64, 64), np.float32)}, path)
  array = safetensors_io.open_safetensors(path).read("w")
  assert isinstance(array, np.memmap)
  assert not array.flags.writeable


def test_reads_torch_written_golden():
  # Written by safetensors.torch in the reference env (tests/goldens/make_wan_goldens.py).
  st = safetensors_io.open_safetensors(GOLDENS / "diffusers" / "transformer")
  assert st.shape("blocks.0.attn1.to_q.weight") == (24, 24)
  assert st.shape("patch_embedding.weight") == (24, 4, 1, 2, 2)
  assert st.dtype("scale_shift_table") == np.float32
  assert np.isfinite(np.asarray(st.read("proj_out.weight"))).all()


def test_sharded_index_and_directory_forms_agree():
  root = GOLDENS / "original"
  by_dir = safetensors_io.open_safetensors(root)
  by_index = safetensors_io.open_safetensors(root /
                                             "diffusion_pytorch_model.safetensors.index.json")
  assert sorted(by_dir.keys()) == sorted(by_index.keys())
  assert len(by_dir.files()) == 2
  key = "model.diffusion_model.blocks.1.ffn.0.weight"
  np.testing.assert_array_equal(np.asarray(by_dir.read(key)), np.asarray(by_index.read(key)))
  assert dict(safetensors_io.load_folder(root)).keys() == set(by_dir.keys())


def test_directory_of_several_files(tmp_path):
  safetensors_io.save_file({"a": np.ones(2, np.float32)}, tmp_path / "one.safetensors")
  safetensors_io.save_file({"b": np.zeros(3, np.float32)}, tmp_path / "two.safetensors")
  st = safetensors_io.open_safetensors(tmp_path)
  assert sorted(st.keys()) == ["a", "b"]
  safetensors_io.save_file({"a": np.ones(2, np.float32)}, tmp_path / "three.safetensors")
  with pytest.raises(CheckpointError, match="more than one file"):
    safetensors_io.open_safetensors(tmp_path)


def test_truncated_file(tmp_path):
  path = tmp_path / "x.safetensors"
  safetensors_io.save_file({"a": np.ones((16, 16), np.float32)}, path)
  data = path.read_bytes()
  path.write_bytes(data[:-10])
  with pytest.raises(CheckpointError, match="truncated"):
    safetensors_io.open_safetensors(path)
  path.write_bytes(data[:20])  # cut inside the header
  with pytest.raises(CheckpointError, match="truncated"):
    safetensors_io.open_safetensors(path)
  path.write_bytes(data[:5])
  with pytest.raises(CheckpointError, match="truncated"):
    safetensors_io.open_safetensors(path)


def test_bad_headers(tmp_path):
  path = tmp_path / "x.safetensors"
  raw = b"not json"
  path.write_bytes(struct.pack("<Q", len(raw)) + raw)
  with pytest.raises(CheckpointError, match="not a safetensors file"):
    safetensors_io.open_safetensors(path)
  header = json.dumps({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
  path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
  with pytest.raises(CheckpointError, match="does not match shape"):
    safetensors_io.open_safetensors(path)
  header = json.dumps({"a": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}).encode()
  path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
  with pytest.raises(CheckpointError, match="unsupported dtype"):
    safetensors_io.open_safetensors(path)


def test_missing_shard_and_incomplete_shard(tmp_path):
  root = tmp_path / "ckpt"
  shutil.copytree(GOLDENS / "original", root)
  shard = root / "diffusion_pytorch_model-00002-of-00002.safetensors"
  data = shard.read_bytes()
  shard.unlink()
  with pytest.raises(CheckpointError, match="missing shard.*00002-of-00002"):
    safetensors_io.open_safetensors(root)
  # A shard present but lacking a tensor its index names.
  safetensors_io.save_file({"other": np.ones(1, np.float32)}, shard)
  with pytest.raises(CheckpointError, match="not in their shard"):
    safetensors_io.open_safetensors(root)
  shard.write_bytes(data)
  assert len(safetensors_io.open_safetensors(root)) > 0


def test_no_weights(tmp_path):
  with pytest.raises(CheckpointError, match="no .safetensors weights"):
    safetensors_io.open_safetensors(tmp_path)
  with pytest.raises(CheckpointError, match="no such file"):
    safetensors_io.open_safetensors(tmp_path / "absent.safetensors")
  (tmp_path / "x.safetensors.index.json").write_text("{}")
  with pytest.raises(CheckpointError, match="not a safetensors index"):
    safetensors_io.open_safetensors(tmp_path)


def test_unknown_key(tmp_path):
  path = tmp_path / "x.safetensors"
  safetensors_io.save_file({"a": np.ones(1, np.float32)}, path)
  with pytest.raises(CheckpointError, match="'b' not in"):
    safetensors_io.open_safetensors(path).read("b")
