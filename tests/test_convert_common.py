"""checkpoints_convert.common (atomic output, checked target tree) and astraea_jax.checkpoint."""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from astraea_jax import checkpoint
from checkpoints_convert import common
from checkpoints_convert.common import CheckpointError


def test_atomic_output_dir_success_and_failure(tmp_path):
  out = tmp_path / "out"
  with pytest.raises(RuntimeError):
    with common.atomic_output_dir(out) as tmp:
      (tmp / "partial").write_text("x")
      raise RuntimeError("boom")
  assert list(tmp_path.iterdir()) == []  # neither out nor the temporary sibling

  with common.atomic_output_dir(out) as tmp:
    (tmp / "done").write_text("x")
  assert (out / "done").read_text() == "x"
  assert [p.name for p in tmp_path.iterdir()] == ["out"]

  with pytest.raises(CheckpointError, match="already exists"):
    with common.atomic_output_dir(out):
      pass
  with pytest.raises(ValueError):
    with common.atomic_output_dir(out, overwrite=True) as tmp:
      raise ValueError
  assert (out / "done").exists()  # a failed overwrite keeps the old output
  with common.atomic_output_dir(out, overwrite=True) as tmp:
    (tmp / "new").write_text("y")
  assert sorted(p.name for p in out.iterdir()) == ["new"]
  assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_param_tree_fills_checks_and_nests():
  tree = common.ParamTree({"a.kernel": ((2, 3), np.float32),
                           "blocks.w": ((3, 2), ml_dtypes.bfloat16)})
  tree.set("a.kernel", np.ones((2, 3), np.float64))
  tree.set("blocks.w", np.full(2, 1.5, np.float32), index=0)
  with pytest.raises(CheckpointError, match=r"shape mismatch for blocks.w\[1\]"):
    tree.set("blocks.w", np.ones(3, np.float32), index=1)
  with pytest.raises(CheckpointError, match="written twice"):
    tree.set("blocks.w", np.ones(2, np.float32), index=0)
  with pytest.raises(CheckpointError, match="out of range"):
    tree.set("blocks.w", np.ones(2, np.float32), index=3)
  with pytest.raises(CheckpointError, match="no target parameter"):
    tree.set("nope", np.ones(1))
  assert tree.missing() == ["blocks.w[1]", "blocks.w[2]"]
  with pytest.raises(CheckpointError, match=r"2 model parameter\(s\) missing.*blocks.w\[1\]"):
    tree.finish()
  tree.set("blocks.w", np.ones(2, np.float32), index=1)
  tree.set("blocks.w", np.ones(2, np.float32), index=2)
  out = tree.finish()
  assert out["a"]["kernel"].dtype == np.float32
  assert out["blocks"]["w"].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(out["blocks"]["w"][0].astype(np.float32), [1.5, 1.5])


def test_check_all_used_names_a_few_and_counts():
  common.check_all_used(["a", "b"], ["b", "a"])
  keys = [f"k{i:02d}" for i in range(12)]
  with pytest.raises(CheckpointError, match=r"12 unused tensor\(s\).*k00, .*\(\+7 more\)"):
    common.check_all_used(keys, [])


def test_parse_dtype():
  assert common.parse_dtype("bf16") == np.dtype(ml_dtypes.bfloat16)
  assert common.parse_dtype("fp32") == np.float32
  with pytest.raises(CheckpointError, match="unknown dtype"):
    common.parse_dtype("int4")


class _Tiny(nnx.Module):

  def __init__(self, rngs):
    self.lin = nnx.Linear(4, 8, rngs=rngs)
    self.stack = nnx.Param(jnp.arange(16.0).reshape(2, 8))


def test_checkpoint_round_trip_with_shardings(tmp_path):
  model = _Tiny(nnx.Rngs(0))
  state = nnx.to_pure_dict(nnx.state(model))
  numpy_tree = jax.tree_util.tree_map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16), state)
  path = checkpoint.save_params(tmp_path / "ck", numpy_tree, family="tiny", config={"n": 4},
                                extra={"source": "test"})
  meta = checkpoint.read_metadata(path)
  assert meta["family"] == "tiny" and meta["config"] == {"n": 4} and meta["source"] == "test"
  assert meta["num_params"] == 4 * 8 + 8 + 16 and meta["dtypes"] == ["bfloat16"]
  json.dumps(meta)

  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: _Tiny(nnx.Rngs(1))))
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("a", "b"))
  shardings = {"lin": {"kernel": NamedSharding(mesh, P(None, "b")),
                       "bias": NamedSharding(mesh, P("b"))},
               "stack": NamedSharding(mesh, P("a", "b"))}
  restored = checkpoint.load_params(path, abstract, shardings=shardings, family="tiny")
  assert isinstance(restored, nnx.State)
  merged = nnx.merge(graphdef, restored)
  assert merged.lin.kernel[...].dtype == jnp.float32  # cast to the abstract dtype
  assert merged.stack[...].sharding == shardings["stack"]
  want = np.asarray(state["lin"]["kernel"]).astype(ml_dtypes.bfloat16).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(merged.lin.kernel[...]), want)
  np.testing.assert_array_equal(np.asarray(merged.stack[...]), np.arange(16.0).reshape(2, 8))

  with pytest.raises(ValueError, match="family 'tiny'"):
    checkpoint.load_params(path, abstract, family="wan")
  with pytest.raises(FileNotFoundError, match="not an astraea_jax checkpoint"):
    checkpoint.read_metadata(tmp_path)
