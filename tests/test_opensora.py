"""OpenSora v1.2: STDiT3 parity with the PyTorch reference (goldens), its converter, RFLOW."""

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from astraea_jax import checkpoint
from astraea_jax.models import opensora
from astraea_jax.sampling import loop, rflow
from checkpoints_convert import __main__ as cli
from checkpoints_convert import opensora as convert_opensora
from checkpoints_convert import safetensors_io
from checkpoints_convert.common import CheckpointError

REPO = Path(__file__).resolve().parent.parent
GOLDENS = REPO / "tests" / "goldens" / "opensora_v1_2"
WEIGHTS = GOLDENS / "stdit3_tiny_weights.safetensors"
CASES = ("a", "b", "c")


def max_rel_err(got, want) -> float:
  """max |got - want| / max |want|."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def model():
  return convert_opensora.load_model(WEIGHTS)


@pytest.fixture(scope="module")
def io():
  return safetensors_io.open_safetensors(GOLDENS / "stdit3_tiny_io.safetensors")


@pytest.fixture(scope="module")
def inter():
  return safetensors_io.open_safetensors(GOLDENS / "stdit3_tiny_intermediates.safetensors")


def case_inputs(io, case):
  """(x, timestep, y, keyword args) of a golden forward call."""
  def get(name):
    key = f"{case}.in.{name}"
    return jnp.asarray(np.array(io.read(key))) if key in io else None

  kwargs = {k: get(k) for k in ("mask", "x_mask", "fps", "height", "width")}
  return get("x"), get("timestep"), get("y"), kwargs


@nnx.jit
def _forward(module, x, timestep, y, mask, x_mask, fps, height, width):
  return module(x, timestep, y, mask=mask, x_mask=x_mask, fps=fps, height=height, width=width)


def _layer(stack, i):
  """Layer i of a stacked block module, as a module of its own."""
  graphdef, state = nnx.split(stack)
  return nnx.merge(graphdef, jax.tree_util.tree_map(lambda a: a[i], state))


# ----------------------------------------------------------------------------------------------
# Model parity


def test_golden_config_is_the_tiny_preset(model):
  constructor = json.loads((GOLDENS / "config.json").read_text())["constructor"]
  config = opensora.STDiT3Config.preset("tiny")
  assert model.config == config
  for name in ("in_channels", "hidden_size", "depth", "num_heads", "mlp_ratio", "pred_sigma",
               "caption_channels", "model_max_length", "qk_norm", "input_sq_size"):
    assert getattr(config, name) == constructor[name], name
  assert list(config.patch_size) == constructor["patch_size"]
  assert config.out_channels == 8 and config.head_dim == 24


@pytest.mark.parametrize("case", CASES)
def test_parity_with_reference(model, io, case):
  x, timestep, y, kwargs = case_inputs(io, case)
  want = np.asarray(io.read(f"{case}.out"))
  out = _forward(model, x, timestep, y, **kwargs)
  assert out.shape == want.shape and out.dtype == jnp.float32
  err = max_rel_err(out, want)
  print(f"case {case}: max relative error {err:.3g}")
  assert err < 1e-4


@pytest.mark.parametrize("case", CASES)
def test_intermediates(model, io, inter, case):
  x, timestep, y, kwargs = case_inputs(io, case)
  ref = lambda name: np.asarray(inter.read(f"{case}.{name}"))  # noqa: E731
  tokens, cond = model.embed(x, timestep, y, **kwargs)
  t_grid, y_grid, x_grid = cond.grid
  s = y_grid * x_grid

  assert max_rel_err(model.t_embedder(timestep), ref("t_embedder")) < 1e-5
  fps_emb = model.fps_embedder(kwargs["fps"])
  assert max_rel_err(fps_emb, ref("fps_embedder")) < 1e-5
  assert max_rel_err(cond.t, ref("t_embedder") + ref("fps_embedder")) < 1e-5
  t_mlp = model.t_block(jax.nn.silu(cond.t))
  assert max_rel_err(t_mlp, ref("t_block")) < 1e-5
  if case == "b":
    # The timestep-0 branch of the frame mask.
    assert max_rel_err(model.t_embedder(jnp.zeros_like(timestep)), ref("t_embedder@call1")) < 1e-5
    assert max_rel_err(cond.t0, ref("t_embedder@call1") + ref("fps_embedder")) < 1e-5
    t0_mlp = model.t_block(jax.nn.silu(cond.t0))
    assert max_rel_err(t0_mlp, ref("t_block@call1")) < 1e-5
    assert cond.t_mlp.shape == (2, t_grid, 6, 48)

  assert max_rel_err(model.y_embedder(y), ref("y_embedder")) < 1e-5
  x_emb = model.x_embedder(x)
  assert max_rel_err(x_emb, ref("x_embedder")) < 1e-5
  pos = tokens.reshape(2, t_grid, s, -1) - x_emb.reshape(2, t_grid, s, -1)
  assert max_rel_err(pos[0, 0], ref("pos_embed")[0]) < 1e-5

  h = tokens
  for i in range(model.config.depth):
    h = _layer(model.spatial_blocks, i)(h, cond)
    assert max_rel_err(h, ref(f"spatial_blocks.{i}")) < 2e-5, f"spatial {i}"
    h = _layer(model.temporal_blocks, i)(h, cond)
    assert max_rel_err(h, ref(f"temporal_blocks.{i}")) < 2e-5, f"temporal {i}"
  final = model.final_layer(h.reshape(2, t_grid, s, -1), cond).reshape(2, t_grid * s, -1)
  assert max_rel_err(final, ref("final_layer")) < 2e-5
  np.testing.assert_allclose(model.head(h, cond), io.read(f"{case}.out"), rtol=0, atol=4e-5)


def test_position_embedding_layout():
  # Case a: 4 x 6 patches of a 64 x 96 video; x (column) coordinates in the first half.
  pos = np.asarray(opensora.position_embedding_2d(4, 6, 48, np.sqrt(64 * 96) / 512, 5))
  inter = safetensors_io.open_safetensors(GOLDENS / "stdit3_tiny_intermediates.safetensors")
  np.testing.assert_allclose(pos, inter.read("a.pos_embed")[0], rtol=0, atol=2e-6)
  grid = pos.reshape(4, 6, 48)
  # The first half depends on the column only, the second on the row only.
  np.testing.assert_array_equal(grid[:, :, :24], np.broadcast_to(grid[:1, :, :24], (4, 6, 24)))
  np.testing.assert_array_equal(grid[:, :, 24:], np.broadcast_to(grid[:, :1, 24:], (4, 6, 24)))
  assert np.ptp(grid[0, :, 0]) > 0 and np.ptp(grid[:, 0, 24]) > 0


def test_rope_frequencies_match_checkpoint(model):
  want = safetensors_io.open_safetensors(WEIGHTS).read("rope.freqs")
  np.testing.assert_array_equal(np.asarray(model.rope.freqs[...]), want)
  np.testing.assert_allclose(opensora.rope_frequencies(24), want, rtol=1e-6)


def test_all_true_frame_mask_equals_no_mask(model, io):
  x, timestep, y, kwargs = case_inputs(io, "a")
  ones = jnp.ones((2, 3), bool)
  a = _forward(model, x, timestep, y, **kwargs)
  b = _forward(model, x, timestep, y, **{**kwargs, "x_mask": ones})
  np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_text_mask_is_per_sample_and_tiles(model, io):
  x, timestep, y, kwargs = case_inputs(io, "a")
  tokens, cond = model.embed(x, timestep, y, **kwargs)
  np.testing.assert_array_equal(cond.context_mask, np.asarray(kwargs["mask"]) != 0)
  # A [1, L] mask is repeated over the batch (the reference's CFG path).
  _, cond = model.embed(x, timestep, y, **{**kwargs, "mask": kwargs["mask"][:1]})
  np.testing.assert_array_equal(cond.context_mask, np.repeat(np.asarray(kwargs["mask"][:1]) != 0,
                                                              2, axis=0))
  # Padding tokens do not change the output.
  y2 = y.at[0, 0, 5:].set(100.0)
  np.testing.assert_allclose(_forward(model, x, timestep, y2, **kwargs),
                             _forward(model, x, timestep, y, **kwargs), rtol=0, atol=1e-6)
  del tokens


def test_bf16_compute_is_close(model, io):
  x, timestep, y, kwargs = case_inputs(io, "a")
  config = dataclasses.replace(model.config, dtype="bfloat16", param_dtype="bfloat16")
  bf16 = convert_opensora.load_model(WEIGHTS, config)
  assert bf16.spatial_blocks.attn.qkv.kernel[...].dtype == jnp.bfloat16
  assert bf16.t_block.kernel[...].dtype == jnp.float32
  assert bf16.spatial_blocks.scale_shift_table[...].dtype == jnp.float32
  out = _forward(bf16, x, timestep, y, **kwargs)
  assert out.dtype == jnp.float32
  assert max_rel_err(out, io.read("a.out")) < 5e-2
  # As in the reference's bf16 inference, the timestep is rounded to bf16 before its embedding.
  _, cond = bf16.embed(x, jnp.array([985.96, 250.0]), y, **kwargs)
  _, rounded = bf16.embed(x, jnp.array([984.0, 250.0]), y, **kwargs)
  np.testing.assert_array_equal(cond.t, rounded.t)


def test_null_caption(model):
  null = model.null_caption(3)
  assert null.shape == (3, 1, 8, 16)
  np.testing.assert_array_equal(null[2, 0],
                                safetensors_io.open_safetensors(WEIGHTS).read(
                                    "y_embedder.y_embedding"))


def test_forward_input_errors(model, io):
  x, timestep, y, kwargs = case_inputs(io, "a")
  with pytest.raises(ValueError, match="channels"):
    model.embed(x[:, :3], timestep, y, **kwargs)
  with pytest.raises(ValueError, match="x_mask must be"):
    model.embed(x, timestep, y, **{**kwargs, "x_mask": jnp.ones((2, 4), bool)})
  with pytest.raises(ValueError, match="fps, height and width are required"):
    model.embed(x, timestep, y, **{**kwargs, "fps": None})
  with pytest.raises(ValueError, match="mask must be"):
    model.embed(x, timestep, y, **{**kwargs, "mask": jnp.ones((2, 5), jnp.int32)})
  with pytest.raises(ValueError, match="y must be"):
    model.embed(x, timestep, y[..., :8], **kwargs)
  with pytest.raises(ValueError, match="timestep must be"):
    model.embed(x, timestep[:1].repeat(3), y, **kwargs)


def test_random_init_runs():
  config = opensora.STDiT3Config.preset("tiny", depth=1, qk_norm=False, pred_sigma=False)
  m = opensora.STDiT3(config, rngs=nnx.Rngs(0))
  out = m(jnp.ones((1, 4, 2, 3, 5)), jnp.array([10.0]), jnp.ones((1, 1, 8, 16)), fps=24,
          height=24, width=40)
  assert out.shape == (1, 4, 2, 3, 5) and bool(jnp.all(jnp.isfinite(out)))


# ----------------------------------------------------------------------------------------------
# Config


def test_presets():
  big = opensora.STDiT3Config.preset("opensora-v1.2")
  assert (big.depth, big.hidden_size, big.num_heads, big.head_dim) == (28, 1152, 16, 72)
  assert (big.in_channels, big.out_channels, big.caption_channels) == (4, 8, 4096)
  assert (big.model_max_length, big.mlp_ratio, big.qk_norm, big.input_sq_size) == (300, 4.0,
                                                                                    True, 512)
  abstract = nnx.eval_shape(lambda: opensora.STDiT3(big, rngs=nnx.Rngs(0)))
  n = sum(v.size for v in jax.tree_util.tree_leaves(nnx.state(abstract, nnx.Param)))
  assert 1.05e9 < n < 1.25e9  # STDiT3-XL/2: 1.1B parameters
  assert opensora.STDiT3Config.from_dict(big.to_dict()) == big
  assert opensora.STDiT3Config.preset("tiny", depth=3).depth == 3


@pytest.mark.parametrize("overrides, match", [
    (dict(num_heads=5), "must divide hidden_size"),
    (dict(hidden_size=18, num_heads=1), "multiple of 4"),
    (dict(hidden_size=36, num_heads=4), "must be even"),
    (dict(patch_size=(1, 2)), "patch_size"),
    (dict(patch_size=(0, 2, 2)), "patch_size"),
    (dict(depth=0), "depth=0 must be a positive int"),
    (dict(caption_channels=2.5), "caption_channels"),
    (dict(qk_norm=1), "qk_norm=1 must be a bool"),
    (dict(mlp_ratio=0.0), "mlp_ratio"),
    (dict(eps=0.0), "eps"),
    (dict(freq_dim=255), "freq_dim"),
    (dict(dtype="int32"), "floating-point"),
])
def test_config_validation(overrides, match):
  with pytest.raises(ValueError, match=match):
    opensora.STDiT3Config.preset("tiny", **overrides)


def test_config_unknown_names():
  with pytest.raises(ValueError, match="unknown OpenSora preset"):
    opensora.STDiT3Config.preset("opensora-v9")
  with pytest.raises(ValueError, match="unknown STDiT3Config fields"):
    opensora.STDiT3Config.from_dict({"depth": 2, "input_size": [None, None, None]})


# ----------------------------------------------------------------------------------------------
# Converter


def run_cli(capsys, *argv):
  rc = cli.main(["opensora", *map(str, argv)])
  captured = capsys.readouterr()
  return rc, captured.out, captured.err


def assert_clean_failure(capsys, tmp_path, src, match):
  out = tmp_path / "out"
  rc, stdout, stderr = run_cli(capsys, "--src", src, "--out", out)
  assert rc == 1, stdout
  assert stderr.count("\n") == 1 and stderr.startswith("error: "), stderr
  assert match in stderr, stderr
  assert not out.exists()
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp sibling
  return stderr


def golden_tensors():
  reader = safetensors_io.open_safetensors(WEIGHTS)
  return {k: np.array(reader.read(k)) for k in reader.keys()}


def released_config(**overrides):
  """A config.json as `STDiT3Config.save_pretrained` writes it, for the tiny model."""
  constructor = json.loads((GOLDENS / "config.json").read_text())["constructor"]
  return {"architectures": ["STDiT3"], "model_type": "STDiT3", **constructor,
          "torch_dtype": "float32", **overrides}


def test_family_is_discovered():
  assert "opensora" in cli.families()


def test_cli_end_to_end(capsys, tmp_path, io):
  rc, stdout, stderr = run_cli(capsys, "--src", WEIGHTS, "--out", tmp_path / "ck", "--dtype",
                               "fp32")
  assert rc == 0, stderr
  assert stdout.startswith("opensora (weights layout, tiny): ") and stdout.count("\n") == 1
  meta = checkpoint.read_metadata(tmp_path / "ck")
  assert meta["family"] == "opensora" and meta["config"]["depth"] == 2
  loaded = opensora.load_pretrained(str(tmp_path / "ck"))
  assert loaded.config == opensora.STDiT3Config.preset("tiny")
  x, timestep, y, kwargs = case_inputs(io, "b")
  assert max_rel_err(_forward(loaded, x, timestep, y, **kwargs), io.read("b.out")) < 1e-4
  # Layout rules against the source tensors.
  src = safetensors_io.open_safetensors(WEIGHTS)
  np.testing.assert_array_equal(loaded.temporal_blocks.attn.qkv.kernel[...][1],
                                src.read("temporal_blocks.1.attn.qkv.weight").T)
  np.testing.assert_array_equal(loaded.spatial_blocks.attn.k_norm.scale[...][0],
                                src.read("spatial_blocks.0.attn.k_norm.weight"))
  np.testing.assert_array_equal(loaded.x_embedder.proj.kernel[...],
                                src.read("x_embedder.proj.weight").transpose(2, 3, 4, 1, 0))
  np.testing.assert_array_equal(loaded.t_embedder.linear_2.bias[...],
                                src.read("t_embedder.mlp.2.bias"))
  np.testing.assert_array_equal(loaded.t_block.kernel[...], src.read("t_block.1.weight").T)
  # bf16 storage by default, fp32 kept where the model keeps it.
  rc, _, stderr = run_cli(capsys, "--src", WEIGHTS, "--out", tmp_path / "bf16")
  assert rc == 0, stderr
  bf16 = opensora.load_pretrained(str(tmp_path / "bf16"))
  assert bf16.spatial_blocks.mlp.fc1.kernel[...].dtype == ml_dtypes.bfloat16
  assert bf16.final_layer.scale_shift_table[...].dtype == np.float32
  assert bf16.y_embedder.y_embedding[...].dtype == np.float32
  # An existing output is refused, unless overwritten.
  rc, _, stderr = run_cli(capsys, "--src", WEIGHTS, "--out", tmp_path / "ck")
  assert rc == 1 and "already exists" in stderr
  rc, _, stderr = run_cli(capsys, "--src", WEIGHTS, "--out", tmp_path / "ck", "--overwrite")
  assert rc == 0, stderr


def test_released_layout_uses_config_json(capsys, tmp_path):
  src = tmp_path / "OpenSora-STDiT-v3"
  src.mkdir()
  shutil.copy(WEIGHTS, src / "model.safetensors")
  (src / "config.json").write_text(json.dumps(released_config(input_sq_size=256)))
  rc, stdout, stderr = run_cli(capsys, "--src", src, "--out", tmp_path / "ck")
  assert rc == 0, stderr
  assert "released layout, custom" in stdout
  meta = checkpoint.read_metadata(tmp_path / "ck")
  assert meta["config"]["input_sq_size"] == 256 and meta["layout"] == "released"
  # A config.json of the wrong size: every shape is checked against it.
  (src / "config.json").write_text(json.dumps(released_config(hidden_size=64)))
  err = assert_clean_failure(capsys, tmp_path, src, "do not match the config (depth 2, hidden 64")
  assert "(+" in err
  (src / "config.json").write_text(json.dumps(released_config(depth=3)))
  assert_clean_failure(capsys, tmp_path, src, "missing from the checkpoint: spatial_blocks.2.")
  (src / "config.json").write_text(json.dumps(released_config(skip_y_embedder=True)))
  assert_clean_failure(capsys, tmp_path, src, "skip_y_embedder")


def test_missing_extra_and_misshapen_tensors(capsys, tmp_path):
  tensors = golden_tensors()
  src = tmp_path / "w.safetensors"
  safetensors_io.save_file({k: v for k, v in tensors.items()
                            if k != "temporal_blocks.1.mlp.fc2.bias"}, src)
  err = assert_clean_failure(capsys, tmp_path, src, "1 tensor(s) of the config")
  assert "missing from the checkpoint: temporal_blocks.1.mlp.fc2.bias" in err
  safetensors_io.save_file({**tensors, "spatial_blocks.0.attn.extra.weight":
                            np.ones((2, 2), np.float32)}, src)
  assert_clean_failure(capsys, tmp_path, src, "not parameters of the STDiT3")
  safetensors_io.save_file({**tensors, "spatial_blocks.1.cross_attn.kv_linear.weight":
                            np.ones((95, 48), np.float32)}, src)
  assert_clean_failure(capsys, tmp_path, src, "spatial_blocks.1.cross_attn.kv_linear.weight "
                       "(95, 48) (expected (96, 48))")
  safetensors_io.save_file({**tensors, "final_layer.scale_shift_table":
                            np.ones((2, 48), np.int32)}, src)
  assert_clean_failure(capsys, tmp_path, src, "non-float dtype")
  # A tensor the config inference needs.
  safetensors_io.save_file({k: v for k, v in tensors.items() if k != "rope.freqs"}, src)
  assert_clean_failure(capsys, tmp_path, src, "no tensor 'rope.freqs'")


def test_other_model_family(capsys, tmp_path):
  wan = REPO / "tests" / "goldens" / "wan"
  assert_clean_failure(capsys, tmp_path, wan / "io.safetensors",
                       "not an OpenSora v1.2 STDiT3 checkpoint")
  assert_clean_failure(capsys, tmp_path, wan / "diffusers" / "transformer",
                       "describes 'WanTransformer3DModel', not an OpenSora v1.2 STDiT3")
  # The golden folder itself: its config.json is a description, not a checkpoint config.
  assert_clean_failure(capsys, tmp_path, GOLDENS, "not an OpenSora v1.2 STDiT3 transformer")
  assert_clean_failure(capsys, tmp_path, tmp_path / "absent", "no such file or directory")


def test_load_params_with_config():
  config, params = convert_opensora.load_params(WEIGHTS, opensora.STDiT3Config.preset("tiny"))
  assert params["spatial_blocks"]["attn"]["qkv"]["kernel"].shape == (2, 48, 144)
  assert params["rope"]["freqs"].dtype == np.float32 and config.depth == 2
  with pytest.raises(CheckpointError, match="missing from the checkpoint"):
    convert_opensora.load_params(WEIGHTS, opensora.STDiT3Config.preset("tiny", depth=3))
  with pytest.raises(CheckpointError, match="not parameters of the STDiT3"):
    convert_opensora.load_params(WEIGHTS, opensora.STDiT3Config.preset("tiny", depth=1))


# ----------------------------------------------------------------------------------------------
# RFLOW


@pytest.fixture(scope="module")
def rflow_ref():
  return json.loads((GOLDENS / "rflow.json").read_text())


@pytest.mark.parametrize("name, dtype, frames", [
    ("timesteps_30_transform_240p_9x16_51f_bf16", ml_dtypes.bfloat16, 51),
    ("timesteps_30_transform_240p_9x16_51f_fp32", np.float32, 51),
    ("timesteps_30_transform_240p_9x16_1f_fp32", np.float32, 1),
])
def test_timestep_transform(rflow_ref, name, dtype, frames):
  args = rflow.multi_resolution_info(2, (240, 426), frames, 24, dtype)
  assert args["height"].dtype == dtype
  ts = rflow.rflow_timesteps(rflow.RFlowConfig(), 2, height=args["height"], width=args["width"],
                             num_frames=args["num_frames"])
  want = np.asarray(rflow_ref[name]["timesteps"], np.float32)
  np.testing.assert_array_equal(ts, np.stack([want, want], axis=1))
  if "dt_over_num_timesteps" in rflow_ref[name]:
    dts = rflow._step_dts(ts, 1000)  # pylint: disable=protected-access
    np.testing.assert_array_equal(dts[:, 0], np.asarray(rflow_ref[name]["dt_over_num_timesteps"],
                                                        np.float32))


def test_untransformed_timesteps_and_defaults(rflow_ref):
  ts = rflow.rflow_timesteps(rflow.RFlowConfig(use_timestep_transform=False), 1)
  np.testing.assert_array_equal(ts[:, 0], np.asarray(
      rflow_ref["timesteps_30_no_transform"]["timesteps"], np.float32))
  config = rflow.RFlowConfig()
  assert (config.num_sampling_steps, config.cfg_scale, config.use_timestep_transform) == (30, 7.0,
                                                                                         True)
  # The scheduler's default video is sample.py's (240p 9:16, 51 frames, bf16 arguments).
  state = rflow.RFlowScheduler().set_timesteps(30)
  np.testing.assert_array_equal(state.timesteps, np.asarray(
      rflow_ref["timesteps_30_transform_240p_9x16_51f_bf16"]["timesteps"], np.float32))
  with pytest.raises(ValueError, match="needs height, width and num_frames"):
    rflow.rflow_timesteps(config, 1)


@pytest.fixture(scope="module")
def euler():
  reader = safetensors_io.open_safetensors(GOLDENS / "rflow_euler.safetensors")
  return {k: np.array(reader.read(k)) for k in reader.keys()}


def fake_model(z_in, t_in, *, y, mask, x_mask, fps, height, width):
  """The golden's recording model: v = 0.1 z + t/1000 + 0.05 mean(y), then 4 channels of 99."""
  del mask, x_mask, fps, height, width
  shift = (t_in / 1000 + 0.05 * jnp.mean(y, axis=(1, 2, 3))).reshape(-1, 1, 1, 1, 1)
  v = 0.1 * z_in + shift
  return jnp.concatenate([v, jnp.full_like(v, 99.0)], axis=1)


@pytest.mark.parametrize("variant", ["nomask", "mask_ones", "mask_i2v"])
def test_euler_sampler_parity(euler, rflow_ref, variant):
  args = {k.split(".", 1)[1]: jnp.asarray(v) for k, v in euler.items()
          if k.startswith("model_args.")}
  seen = {}
  mask = euler.get(f"{variant}.mask")
  z = rflow.sample(fake_model, jnp.asarray(euler["z_init"]), y=jnp.asarray(euler["y_cond"]),
                   y_null=jnp.asarray(euler["y_null"]), model_args=args,
                   text_mask=jnp.asarray(euler["text_mask"]), mask=mask,
                   key=jax.random.key(0), config=rflow.RFlowConfig(num_sampling_steps=3),
                   callback=lambda i, d: seen.setdefault(i, d))
  for i in range(3):
    np.testing.assert_array_equal(seen[i]["t_in"], euler[f"{variant}.step{i}.t_in"])
    np.testing.assert_allclose(seen[i]["z_in"], euler[f"{variant}.step{i}.z_in"], rtol=0,
                               atol=2e-6)
    if mask is None:
      assert seen[i]["x_mask_in"] is None
    else:
      np.testing.assert_array_equal(seen[i]["x_mask_in"], euler[f"{variant}.step{i}.x_mask_in"])
  np.testing.assert_allclose(z, euler[f"{variant}.z_final"], rtol=0, atol=2e-6)
  np.testing.assert_array_equal(seen[2]["t_in"][:1],
                                np.float32(rflow_ref["euler_3step"]["timesteps"][2]))


def test_scheduler_in_the_denoise_loop(euler):
  # RFLOW through the project's loop equals RFLOW.sample (nomask).
  scheduler = rflow.RFlowScheduler(rflow.RFlowConfig(num_sampling_steps=3), height=240.0,
                                   width=426.0, num_frames=51.0, condition_dtype="float32")
  y_all = jnp.concatenate([jnp.asarray(euler["y_cond"]), jnp.asarray(euler["y_null"])], axis=0)

  def step_model(batch, timestep, carry, i):
    del i
    out = fake_model(batch, timestep, y=y_all, mask=None, x_mask=None, fps=None, height=None,
                     width=None)
    return out[:, :4], carry

  z, _, stats = loop.denoise(step_model, jnp.asarray(euler["z_init"]), scheduler,
                             scheduler.set_timesteps(3), guidance_scale=7.0, progress=False)
  assert len(stats.step_seconds) == 3
  np.testing.assert_allclose(z, euler["nomask.z_final"], rtol=0, atol=2e-6)


def test_add_noise(euler):
  out = rflow.add_noise(jnp.asarray(euler["add_noise.x0"]), jnp.asarray(euler["add_noise.noise"]),
                        jnp.asarray(euler["add_noise.t"]))
  np.testing.assert_allclose(out, euler["add_noise.out"], rtol=0, atol=1e-6)


def test_append_score_to_prompts():
  assert rflow.append_score_to_prompts(["a cat", "a dog. aesthetic score: 5.0."]) == [
      "a cat aesthetic score: 6.5.", "a dog. aesthetic score: 5.0."]
  assert rflow.append_score_to_prompts(["x"], aes=None, flow=4, camera_motion="pan left") == [
      "x motion score: 4.0. camera motion: pan left."]


def test_multi_resolution_info_image_fps():
  args = rflow.multi_resolution_info(1, (240, 426), 1, 24)
  assert args["fps"][0] == rflow.IMG_FPS and args["ar"][0] == np.float32(240 / 426)


@pytest.mark.parametrize("overrides, match", [
    (dict(num_sampling_steps=0), "num_sampling_steps"),
    (dict(cfg_scale=float("nan")), "cfg_scale"),
    (dict(transform_scale=0.0), "transform_scale"),
    (dict(use_timestep_transform=1), "use_timestep_transform"),
])
def test_rflow_config_validation(overrides, match):
  with pytest.raises(ValueError, match=match):
    rflow.RFlowConfig(**overrides)


def test_sample_with_mask_needs_key(euler):
  with pytest.raises(ValueError, match="PRNG key"):
    rflow.sample(fake_model, jnp.asarray(euler["z_init"]), y=jnp.asarray(euler["y_cond"]),
                 y_null=jnp.asarray(euler["y_null"]), model_args={"height": 240, "width": 426,
                                                                 "num_frames": 51},
                 mask=euler["mask_i2v.mask"])
