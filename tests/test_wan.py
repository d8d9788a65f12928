"""The Wan2.1 transformer: parity with diffusers (goldens), the block's `select` path, LSE."""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from astraea_jax.models import wan
from checkpoints_convert import safetensors_io
from checkpoints_convert import wan as convert_wan

GOLDENS = Path(__file__).parent / "goldens" / "wan"


def max_rel_err(got, want) -> float:
  """max |got - want| / max |want|."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """Both golden layouts converted in fp32 and loaded."""
  root = tmp_path_factory.mktemp("wan")
  models = {}
  for layout in ("diffusers", "original"):
    out = root / layout
    convert_wan.convert(GOLDENS / layout, out, dtype="fp32")
    models[layout] = wan.load_pretrained(str(out))
  return models


@pytest.fixture(scope="module")
def io():
  return safetensors_io.open_safetensors(GOLDENS / "io.safetensors")


@pytest.mark.parametrize("layout", ["diffusers", "original"])
@pytest.mark.parametrize("case", [0, 1])
def test_parity_with_diffusers(converted, io, layout, case):
  model = converted[layout]
  assert model.config.dtype == "float32" and model.config.param_dtype == "float32"
  latents = jnp.asarray(io.read(f"case{case}.latents"))
  want = np.asarray(io.read(f"case{case}.out"))
  out = _jit_call(model, latents, jnp.asarray(io.read(f"case{case}.timestep")),
                  jnp.asarray(io.read(f"case{case}.context")))
  assert out.shape == want.shape == latents.shape
  assert out.dtype == jnp.float32
  assert max_rel_err(out, want) < 1e-4


def test_golden_case_shapes(io):
  # One case with T, Y, X all different, one with batch 2.
  b0, _, *dims0 = io.shape("case0.latents")
  b1, *_ = io.shape("case1.latents")
  assert len(set(dims0)) == 3 and b1 == 2


def _tiny(seed=0, **overrides):
  return wan.WanTransformer3DModel(wan.WanConfig.preset("tiny", **overrides), rngs=nnx.Rngs(seed))


def _inputs(model, shape=(2, 4, 3, 4, 6), m=7, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  latents = jax.random.normal(keys[0], shape)
  timestep = jax.random.uniform(keys[1], (shape[0],), minval=0.0, maxval=1000.0)
  context = jax.random.normal(keys[2], (shape[0], m, model.config.text_dim))
  return latents, timestep, context


@nnx.jit
def _jit_call(module, *args):
  return module(*args)


def _block(model, layer):
  """Layer `layer` of the stacked blocks as a standalone `WanTransformerBlock`."""
  graphdef, state = nnx.split(model.blocks)
  return nnx.merge(graphdef, jax.tree_util.tree_map(lambda a: a[layer], state))


def test_forward_equals_embed_blocks_head():
  model = _tiny()
  args = _inputs(model)
  x, cond = model.embed(*args)
  assert x.shape == (2, 3 * 2 * 3, 24) and cond.grid == (3, 2, 3)
  assert cond.timestep_proj.shape == (2, 6, 24) and cond.timestep_proj.dtype == jnp.float32
  assert cond.rope_cos.shape == (18, 6) and cond.context.shape == (2, 7, 24)
  manual = x
  for layer in range(model.config.num_layers):
    manual = _jit_call(_block(model, layer), manual, cond)
  run_blocks = nnx.jit(lambda m, x, c: m.run_blocks(x, c))
  np.testing.assert_allclose(run_blocks(model, x, cond), manual, rtol=1e-5, atol=1e-5)
  head = nnx.jit(lambda m, x, c: m.head(x, c))
  np.testing.assert_allclose(_jit_call(model, *args), head(model, manual, cond), rtol=1e-5,
                             atol=1e-5)


def test_select_all_in_order_equals_dense():
  model = _tiny()
  x, cond = model.embed(*_inputs(model))
  block = _block(model, 1)
  n = x.shape[1]
  dense = block(x, cond)
  sel = block(x, cond, select=jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (2, n)))
  np.testing.assert_allclose(sel, dense, rtol=1e-5, atol=1e-6)


def test_select_subset_equals_dense_rows():
  model = _tiny()
  x, cond = model.embed(*_inputs(model, shape=(2, 4, 3, 4, 6)))
  block = _block(model, 0)
  dense = block(x, cond)
  rng = np.random.default_rng(0)
  # Different rows (in no particular order) for each batch entry.
  idx = jnp.asarray(np.stack([rng.permutation(x.shape[1])[:7] for _ in range(2)]), jnp.int32)
  out = nnx.jit(lambda b, x, c, i: b(x, c, select=i))(block, x, cond, idx)
  assert out.shape == (2, 7, 24)
  np.testing.assert_allclose(out, jnp.take_along_axis(dense, idx[..., None], axis=1), rtol=1e-5,
                             atol=1e-6)


def _reference_lse(block, x, cond):
  """LSE of the block's scaled self-attention scores, from plain softmax algebra."""
  mod = block.scale_shift_table[...] + cond.timestep_proj
  h = wan.layer_norm(x, block.eps) * (1 + mod[:, 1:2]) + mod[:, 0:1]
  q = wan.apply_rope(block.attn1.project_q(h), cond.rope_cos, cond.rope_sin)
  k, _ = block.attn1.project_kv(h)
  k = wan.apply_rope(k, cond.rope_cos, cond.rope_sin)
  scores = jnp.einsum("bshd,bnhd->bhsn", q, k) / np.sqrt(q.shape[-1])
  return jax.scipy.special.logsumexp(scores, axis=-1)  # [B, H, N]


def test_lse_dense_and_selected():
  model = _tiny()
  x, cond = model.embed(*_inputs(model))
  block = _block(model, 1)
  want = _reference_lse(block, x, cond)
  out, lse = block(x, cond, return_lse=True)
  assert lse.shape == (2, 2, x.shape[1]) and lse.dtype == jnp.float32
  np.testing.assert_allclose(lse, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out, block(x, cond), rtol=1e-5, atol=1e-6)
  idx = jnp.asarray([[5, 0, 17, 3], [1, 2, 16, 9]], jnp.int32)
  out_s, lse_s = block(x, cond, select=idx, return_lse=True)
  np.testing.assert_allclose(lse_s, jnp.take_along_axis(want, idx[:, None, :], axis=2),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out_s, jnp.take_along_axis(out, idx[..., None], axis=1), rtol=1e-5,
                             atol=1e-6)


def test_rope_interleaved_pairs_and_split():
  config = wan.WanConfig.preset("wan2.1-t2v-1.3b")
  assert config.rope_split == (44, 42, 42)
  assert wan.WanConfig.preset("tiny").rope_split == (4, 4, 4)
  cos, sin = wan.rope_tables(wan.WanConfig.preset("tiny"), (2, 3, 4))
  # Token (t=1, y=2, x=3); pair 0 of each axis part turns by the position itself (frequency 1).
  row = 1 * 12 + 2 * 4 + 3
  np.testing.assert_allclose(np.arctan2(sin[row], cos[row])[[0, 2, 4]], [1.0, 2.0, 3.0],
                             rtol=1e-6)
  x = jnp.arange(24.0).reshape(1, 1, 2, 12)
  c, s = jnp.cos(jnp.full((1, 6), 0.3)), jnp.sin(jnp.full((1, 6), 0.3))
  out = wan.apply_rope(x, c, s)
  x0, x1 = x[..., 0::2], x[..., 1::2]
  np.testing.assert_allclose(out[..., 0::2], x0 * c - x1 * s, rtol=1e-6)
  np.testing.assert_allclose(out[..., 1::2], x0 * s + x1 * c, rtol=1e-6)


def test_norm_with_rope_equals_norm_then_rope():
  """The one-pass RMSNorm + RoPE of q and k equals the norm followed by `apply_rope`, for the
  dense tables `[S, D/2]` and the selected rows' `[B, S, D/2]`; in bf16 it differs only by the
  norm's rounding, which it skips."""
  attn = _block(_tiny(), 0).attn1
  norm, heads = attn.norm_q, attn.heads
  norm.scale[...] = jax.random.uniform(jax.random.key(1), norm.scale.shape, minval=0.5, maxval=2)
  x = jax.random.normal(jax.random.key(2), (2, 5, 24)) * 3.0
  angles = jax.random.uniform(jax.random.key(3), (2, 5, 24 // heads // 2), maxval=6.0)
  for cos, sin in ((jnp.cos(angles[0]), jnp.sin(angles[0])), (jnp.cos(angles), jnp.sin(angles))):
    want = wan.apply_rope(norm(x).reshape(2, 5, heads, -1), cos, sin)
    got = norm.with_rope(x.reshape(2, 5, heads, -1), cos, sin)
    assert got.shape == (2, 5, heads, 24 // heads)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    xb = x.astype(jnp.bfloat16)
    want = wan.apply_rope(norm(xb).reshape(2, 5, heads, -1), cos, sin)
    got = norm.with_rope(xb.reshape(2, 5, heads, -1), cos, sin)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=2e-2, atol=2e-2)
  # A per-head norm (scale [D], as HunyuanVideo's) normalises each head on its own.
  per_head = wan.RMSNorm(24 // heads, eps=1e-6)
  per_head.scale[...] = jax.random.uniform(jax.random.key(4), (24 // heads,), minval=0.5, maxval=2)
  xh = x.reshape(2, 5, heads, -1) * jnp.asarray([1.0, 5.0])[:heads, None]  # heads of other scales
  want = wan.apply_rope(per_head(xh), jnp.cos(angles), jnp.sin(angles))
  got = per_head.with_rope(xh, jnp.cos(angles), jnp.sin(angles))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_presets_have_the_real_sizes():
  def count(name):
    model = nnx.eval_shape(lambda: wan.WanTransformer3DModel(wan.WanConfig.preset(name),
                                                             rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))

  small = wan.WanConfig.preset("wan2.1-t2v-1.3b")
  assert (small.hidden_size, small.num_layers, small.ffn_dim) == (1536, 30, 8960)
  large = wan.WanConfig.preset("wan2.1-t2v-14b")
  assert (large.hidden_size, large.num_layers, large.ffn_dim) == (5120, 40, 13824)
  assert small.dtype == small.param_dtype == "bfloat16"
  assert 1.40e9 < count("wan2.1-t2v-1.3b") < 1.43e9
  assert 14.0e9 < count("wan2.1-t2v-14b") < 14.4e9


def test_bf16_compute_close_to_fp32():
  model32 = _tiny()
  model16 = _tiny(param_dtype="bfloat16", dtype="bfloat16", attention_impl="xla")
  state16 = nnx.state(model16)
  nnx.update(model16, jax.tree_util.tree_map(lambda a, b: a.astype(b.dtype), nnx.state(model32),
                                             state16))
  kernel = model16.blocks.attn1.to_q.kernel[...]
  assert kernel.dtype == jnp.bfloat16
  assert model16.blocks.scale_shift_table[...].dtype == jnp.float32
  args = _inputs(model32)
  want = _jit_call(model32, *args)
  with jax.numpy_dtype_promotion("standard"):  # jax's own XLA attention mixes bf16 and fp32
    got = _jit_call(model16, *args)
  assert got.dtype == jnp.float32
  assert float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) < 3e-2


def test_bad_inputs_and_configs():
  model = _tiny()
  latents, timestep, context = _inputs(model)
  with pytest.raises(ValueError, match="channels"):
    model(latents[:, :3], timestep, context)
  with pytest.raises(ValueError, match="multiples of patch_size"):
    model(latents[..., :5], timestep, context)
  with pytest.raises(ValueError, match=r"\[B, C_in, T, Y, X\]"):
    model(latents[0], timestep, context)
  with pytest.raises(ValueError, match="context"):
    model(latents, timestep, context[..., :8])
  with pytest.raises(ValueError, match="timestep"):
    model(latents, timestep[:1].repeat(3), context)
  assert model(latents, jnp.float32(3.0), context).shape == latents.shape  # scalar timestep
  with pytest.raises(ValueError, match="attention_head_dim"):
    wan.WanConfig.preset("tiny", attention_head_dim=7)
  with pytest.raises(ValueError, match="unknown Wan preset"):
    wan.WanConfig.preset("wan9")
  with pytest.raises(ValueError, match="qk_norm"):
    wan.WanConfig.preset("tiny", qk_norm="layer_norm")
  config = wan.WanConfig.preset("tiny")
  assert wan.WanConfig.from_dict(config.to_dict()) == config
  assert dataclasses.replace(config, patch_size=[1, 2, 2]).patch_size == (1, 2, 2)


def test_fused_projections_equal_separate_ones():
  fused, separate = _tiny(), _tiny(fuse_projections=False)
  args = _inputs(fused)
  np.testing.assert_allclose(np.asarray(_jit_call(fused, *args)),
                             np.asarray(_jit_call(separate, *args)), rtol=1e-5, atol=1e-5)
  # The selected-rows path projects k and v separately; its rows still equal the dense ones.
  block, h = _block(fused, 0), jax.random.normal(jax.random.key(3), (1, 6, 24))
  q, k, v = block.attn1.project_qkv(h)
  k2, v2 = block.attn1.project_kv(h)
  np.testing.assert_allclose(np.asarray(q), np.asarray(block.attn1.project_q(h)), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(np.asarray(k), np.asarray(k2), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(v), np.asarray(v2), rtol=1e-5, atol=1e-6)


def test_frame_embedding_adds_each_frames_row():
  """A zero frame embedding leaves the model unchanged; its row f is added to every token of token
  frame f (checked through `embed`), and more frames than rows is refused."""
  plain, framed = _tiny(), _tiny(num_frame_embeddings=4)
  args = _inputs(plain)  # 3 token frames of 2 x 3
  np.testing.assert_array_equal(_jit_call(framed, *args), _jit_call(plain, *args))
  rows = jax.random.normal(jax.random.key(1), (4, 24))
  framed.frame_embedding[...] = rows
  x0, _ = plain.embed(*args)
  x1, _ = framed.embed(*args)
  expected = x0.reshape(2, 3, 6, 24) + rows[:3, None, :]
  np.testing.assert_allclose(x1.reshape(2, 3, 6, 24), expected, rtol=1e-6, atol=1e-6)
  assert not np.allclose(_jit_call(framed, *args), _jit_call(plain, *args))
  latents, timestep, context = _inputs(plain, shape=(1, 4, 5, 4, 6))
  with pytest.raises(ValueError, match="num_frame_embeddings=4"):
    framed(latents, timestep, context)
  with pytest.raises(ValueError, match="num_frame_embeddings"):
    wan.WanConfig.preset("tiny", num_frame_embeddings=-1)
