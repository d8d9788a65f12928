"""The HunyuanVideo transformer: parity with diffusers for both checkpoint layouts (goldens), the
converter end to end and on bad input, the token layout and mask, config validation, bf16."""

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
from astraea_jax.models import hunyuan as hy
from checkpoints_convert import __main__ as cli
from checkpoints_convert import hunyuan as convert_hy
from checkpoints_convert import pth_io, safetensors_io
from checkpoints_convert.common import CheckpointError

REPO = Path(__file__).resolve().parent.parent
GOLDENS = REPO / "tests" / "goldens" / "hunyuan"
DIFFUSERS = GOLDENS / "diffusers"
ORIGINAL = GOLDENS / "original"
ORIGINAL_PT = ORIGINAL / "transformers" / "mp_rank_00_model_states.pt"
INPUTS = ("latents", "timestep", "text", "text_mask", "pooled", "guidance")


def max_rel_err(got, want) -> float:
  """max |got - want| / max |want|."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / np.abs(want).max())


@nnx.jit
def _jit_call(module, *args):
  return module(*args)


@pytest.fixture(scope="module")
def io():
  with np.load(GOLDENS / "io.npz") as data:
    return {k: data[k] for k in data.files}


def _args(io, case):
  return tuple(jnp.asarray(io[f"case{case}.{name}"]) for name in INPUTS)


@pytest.fixture(scope="module")
def models():
  """Both golden layouts read in memory in fp32 (the original layout has no config file)."""
  out = {}
  for layout, src, config in (("diffusers", DIFFUSERS, None), ("original", ORIGINAL, "tiny")):
    cfg, params = convert_hy.load_params(src, config=config, dtype="fp32")
    out[layout] = hy.from_params(cfg, params)
  return out


# ----------------------------------------------------------------------------------------------
# Parity


@pytest.mark.parametrize("layout", ["diffusers", "original"])
@pytest.mark.parametrize("case", [0, 1])
def test_parity_with_diffusers(models, io, layout, case):
  model = models[layout]
  assert model.config == hy.HunyuanConfig.preset("tiny")
  out = _jit_call(model, *_args(io, case))
  want = io[f"case{case}.out"]
  assert out.shape == want.shape == io[f"case{case}.latents"].shape
  assert out.dtype == jnp.float32
  assert max_rel_err(out, want) < 1e-4


@pytest.mark.parametrize("case", [0, 1])
def test_token_refiner_parity(models, io, case):
  # Padded text tokens never reach the video output, so their refiner rows are checked here.
  model = models["original"]
  latents, timestep, text, text_mask, *_ = _args(io, case)
  del latents
  refined = nnx.jit(lambda m, *a: m.context_embedder(*a))(model, text, timestep,
                                                           text_mask.astype(jnp.bool_))
  assert max_rel_err(refined, io[f"case{case}.refined"]) < 1e-4


def test_golden_cases(io):
  # One case with T, Y, X all different, one batch of 2 prompts padded to different lengths.
  _, _, *dims = io["case0.latents"].shape
  assert len(set(dims)) == 3
  lengths = io["case1.text_mask"].sum(axis=1)
  assert io["case1.latents"].shape[0] == 2 and lengths[0] != lengths[1]
  assert (lengths < io["case1.text_mask"].shape[1]).any()


def test_layouts_give_identical_params(models):
  a = nnx.to_pure_dict(nnx.state(models["diffusers"], nnx.Param))
  b = nnx.to_pure_dict(nnx.state(models["original"], nnx.Param))
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_layout_rules_against_source_tensors(models):
  model = models["diffusers"]
  src = safetensors_io.open_safetensors(DIFFUSERS / "transformer")
  np.testing.assert_array_equal(model.transformer_blocks.attn.to_out.kernel[...][1],
                                src.read("transformer_blocks.1.attn.to_out.0.weight").T)
  np.testing.assert_array_equal(
      model.context_embedder.token_refiner.refiner_blocks.ff.proj_in.bias[...][0],
      src.read("context_embedder.token_refiner.refiner_blocks.0.ff.net.0.proj.bias"))
  np.testing.assert_array_equal(model.single_transformer_blocks.attn.norm_k.scale[...][1],
                                src.read("single_transformer_blocks.1.attn.norm_k.weight"))
  np.testing.assert_array_equal(model.x_embedder.proj.kernel[...],
                                src.read("x_embedder.proj.weight").transpose(2, 3, 4, 1, 0))
  # The original stores the final modulation as (shift, scale) and fuses q, k, v (and the MLP
  # input of the single blocks) along the output axis.
  state = pth_io.load_pth(ORIGINAL_PT)["module"]
  c = model.config.hidden_size
  shift_scale = state["final_layer.adaLN_modulation.1.weight"]
  np.testing.assert_array_equal(model.norm_out.linear.kernel[...],
                                np.concatenate([shift_scale[c:], shift_scale[:c]]).T)
  linear1 = state["single_blocks.1.linear1.weight"]
  np.testing.assert_array_equal(model.single_transformer_blocks.attn.to_k.kernel[...][1],
                                linear1[c:2 * c].T)
  np.testing.assert_array_equal(model.single_transformer_blocks.proj_mlp.kernel[...][1],
                                linear1[3 * c:].T)
  qkv = state["double_blocks.0.txt_attn_qkv.bias"]
  np.testing.assert_array_equal(model.transformer_blocks.attn.add_v_proj.bias[...][0],
                                qkv[2 * c:])


# ----------------------------------------------------------------------------------------------
# Token layout and mask


def test_stages_and_key_mask(models, io):
  model = models["diffusers"]
  args = _args(io, 1)
  x, ctx, cond = model.embed(*args)
  n = 2 * 3 * 2
  assert cond.grid == (2, 3, 2) and cond.num_video_tokens == n
  assert x.shape == (2, n, 16) and ctx.shape == (2, 7, 16)
  assert cond.temb.shape == (2, 16) and cond.temb.dtype == jnp.float32
  assert cond.rope_cos.shape == (n, 4)
  lengths = io["case1.text_mask"].sum(axis=1)
  want = np.concatenate([np.ones((2, n), bool), np.arange(7)[None] < lengths[:, None]], axis=1)
  np.testing.assert_array_equal(cond.key_mask, want)
  x, ctx = model.run_dual_blocks(x, ctx, cond)
  h = model.run_single_blocks(jnp.concatenate([x, ctx], axis=1), cond)
  out = model.head(h[:, :n], cond)
  assert max_rel_err(out, io["case1.out"]) < 1e-4


def test_padded_text_tokens_do_not_reach_the_video(models, io):
  model = models["diffusers"]
  latents, timestep, text, text_mask, pooled, guidance = _args(io, 1)
  base = _jit_call(model, latents, timestep, text, text_mask, pooled, guidance)
  pad = (text_mask == 0)[..., None]
  noise = jax.random.normal(jax.random.key(1), text.shape)
  changed = _jit_call(model, latents, timestep, jnp.where(pad, noise, text), text_mask, pooled,
                      guidance)
  np.testing.assert_array_equal(changed, base)
  # All tokens valid: the padded ones now count.
  full = _jit_call(model, latents, timestep, text, jnp.ones_like(text_mask), pooled, guidance)
  assert max_rel_err(full, base) > 1e-3


def test_rope_tables():
  config = hy.HunyuanConfig.preset("tiny")
  cos, sin = hy.rope_tables(config, (2, 3, 4))
  assert cos.shape == (24, 4)
  # Token (t=1, y=2, x=3): the t and y parts have one pair each (frequency 1); the x part two,
  # frequencies 1 and 256^(-2/4).
  angles = np.arctan2(np.asarray(sin[1 * 12 + 2 * 4 + 3]), np.asarray(cos[1 * 12 + 2 * 4 + 3]))
  np.testing.assert_allclose(angles, [1.0, 2.0, 3.0, 3.0 / 16.0], rtol=1e-6)
  full = hy.HunyuanConfig.preset("hunyuanvideo-t2v")
  assert hy.rope_tables(full, (1, 1, 2))[0].shape == (2, 64)


# ----------------------------------------------------------------------------------------------
# Converter


def run_cli(capsys, *argv):
  rc = cli.main(["hunyuan", *map(str, argv)])
  captured = capsys.readouterr()
  return rc, captured.out, captured.err


def assert_clean_failure(capsys, tmp_path, src, match, *extra):
  out = tmp_path / "out"
  rc, stdout, stderr = run_cli(capsys, "--src", src, "--out", out, *extra)
  assert rc == 1, stdout
  assert stderr.count("\n") == 1 and stderr.startswith("error: "), stderr
  assert match in stderr, stderr
  assert not out.exists()
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp sibling
  return stderr


def test_cli_end_to_end_both_layouts(capsys, tmp_path, io):
  runs = (("diffusers", DIFFUSERS, ()), ("original", ORIGINAL_PT, ("--config", "tiny")))
  for layout, src, extra in runs:
    out = tmp_path / layout
    rc, stdout, stderr = run_cli(capsys, "--src", src, "--out", out, "--dtype", "fp32", *extra)
    assert rc == 0, stderr
    assert stdout.startswith(f"hunyuan ({layout} layout, tiny): ") and stdout.count("\n") == 1
    meta = checkpoint.read_metadata(out)
    assert meta["family"] == "hunyuan" and meta["layout"] == layout
    model = hy.load_pretrained(str(out))
    assert model.config == hy.HunyuanConfig.preset("tiny")
    assert max_rel_err(_jit_call(model, *_args(io, 0)), io["case0.out"]) < 1e-4
  # bf16 storage by default; fp32 kept for the conditioning embedders and norm scales.
  rc, _, stderr = run_cli(capsys, "--src", DIFFUSERS, "--out", tmp_path / "bf16")
  assert rc == 0, stderr
  model = hy.load_pretrained(str(tmp_path / "bf16"))
  assert model.config.dtype == model.config.param_dtype == "bfloat16"
  assert model.single_transformer_blocks.proj_out.kernel[...].dtype == ml_dtypes.bfloat16
  assert model.time_text_embed.guidance_embedder.linear_1.kernel[...].dtype == np.float32
  assert model.transformer_blocks.attn.norm_q.scale[...].dtype == np.float32
  rc, _, stderr = run_cli(capsys, "--src", DIFFUSERS, "--out", tmp_path / "bf16")
  assert rc == 1 and "already exists" in stderr


def test_original_config_from_shapes():
  # The release's shapes give the release's architecture.
  shapes = {"img_in.proj.weight": (3072, 16, 1, 2, 2), "final_layer.linear.weight": (64, 3072),
            "double_blocks.0.img_mlp.fc1.weight": (12288, 3072),
            "txt_in.input_embedder.weight": (3072, 4096), "vector_in.in_layer.weight": (3072, 768),
            "guidance_in.mlp.0.weight": (3072, 256)}
  shapes.update({f"double_blocks.{i}.img_attn_q_norm.weight": (128,) for i in range(20)})
  shapes.update({f"single_blocks.{i}.q_norm.weight": (128,) for i in range(40)})
  shapes.update({f"txt_in.individual_token_refiner.blocks.{i}.norm1.weight": (3072,)
                 for i in range(2)})
  assert convert_hy.config_from_original(shapes) == hy.HunyuanConfig.preset("hunyuanvideo-t2v")
  # The tiny model's RoPE split cannot be read off its weights.
  with pytest.raises(CheckpointError, match="RoPE axes"):
    convert_hy.load_params(ORIGINAL, dtype="fp32")


def _diffusers_copy(tmp_path, edit):
  """The diffusers golden with its tensors changed by `edit(dict)`."""
  src = tmp_path / "src"
  shutil.copytree(DIFFUSERS / "transformer", src)
  weights = src / "diffusion_pytorch_model.safetensors"
  reader = safetensors_io.open_safetensors(weights)
  tensors = {k: np.array(reader.read(k)) for k in reader.keys()}  # copies: the file is rewritten
  del reader
  edit(tensors)
  weights.unlink()
  safetensors_io.save_file(tensors, weights)
  return src


def test_missing_wrong_shape_and_extra_tensors(capsys, tmp_path):
  src = _diffusers_copy(tmp_path, lambda t: t.pop("transformer_blocks.1.attn.to_q.weight"))
  assert_clean_failure(capsys, tmp_path, src,
                       "1 parameter(s) of the config (2 dual + 2 single + 1 refiner layers, "
                       "hidden 16, mlp 64, preset tiny) are missing from the checkpoint: "
                       "transformer_blocks.attn.to_q.kernel[1]")
  shutil.rmtree(src)
  src = _diffusers_copy(tmp_path, lambda t: t.update(
      {"single_transformer_blocks.0.proj_mlp.weight": np.ones((32, 16), np.float32)}))
  assert_clean_failure(capsys, tmp_path, src, "do not match the config")
  shutil.rmtree(src)
  src = _diffusers_copy(tmp_path, lambda t: t.update({"extra.weight": np.ones((2, 2), np.float32)}))
  assert_clean_failure(capsys, tmp_path, src, "are not parameters of the HunyuanVideo transformer")
  # More layers in the config than in the weights.
  shutil.rmtree(src)
  src = _diffusers_copy(tmp_path, lambda t: None)
  config = json.loads((src / "config.json").read_text())
  (src / "config.json").write_text(json.dumps({**config, "num_single_layers": 3}))
  assert_clean_failure(capsys, tmp_path, src, "14 parameter(s) of the config (2 dual + 3 single")


def _original_source(edit):
  state = {k: np.asarray(v) for k, v in pth_io.load_pth(ORIGINAL_PT)["module"].items()}
  edit(state)
  config = hy.HunyuanConfig.preset("tiny")
  return convert_hy.Source("original", ORIGINAL_PT, convert_hy.ArrayReader(state), config)


def test_original_layout_errors():
  expected = convert_hy.target_shapes(hy.HunyuanConfig.preset("tiny"))
  # A fused tensor feeds several parameters, all missing with it.
  source = _original_source(lambda s: s.pop("single_blocks.1.linear1.weight"))
  with pytest.raises(CheckpointError, match=r"4 parameter\(s\).*single_transformer_blocks"
                     r"\.attn\.to_k\.kernel\[1\]"):
    convert_hy.plan(source, expected)
  # A fused tensor of the wrong height cannot be split.
  source = _original_source(lambda s: s.update(
      {"double_blocks.0.img_attn_qkv.weight": np.ones((40, 16), np.float32)}))
  with pytest.raises(CheckpointError, match=r"do not match.*double_blocks\.0\.img_attn_qkv\.weight "
                     r"\(40, 16\)"):
    convert_hy.plan(source, expected)
  source = _original_source(lambda s: s.update(
      {"single_blocks.0.linear1.bias": np.ones((48,), np.float32)}))
  with pytest.raises(CheckpointError, match=r"single_blocks\.0\.linear1\.bias \(48,\)"):
    convert_hy.plan(source, expected)
  source = _original_source(lambda s: s.update({"double_blocks.0.img_norm1.weight": np.ones(16)}))
  with pytest.raises(CheckpointError, match=r"not parameters.*double_blocks\.0\.img_norm1\.weight"):
    convert_hy.plan(source, expected)


def test_other_model_families(capsys, tmp_path):
  wan = REPO / "tests" / "goldens" / "wan" / "diffusers"
  if wan.is_dir():
    assert_clean_failure(capsys, tmp_path, wan, "describes 'WanTransformer3DModel'")
  umt5 = REPO / "tests" / "goldens" / "umt5" / "umt5_wan.pth"
  if umt5.is_file():
    assert_clean_failure(capsys, tmp_path, umt5, "not a HunyuanVideo transformer in the original")
  i2v = tmp_path / "i2v"
  shutil.copytree(DIFFUSERS / "transformer", i2v)
  config = json.loads((i2v / "config.json").read_text())
  (i2v / "config.json").write_text(json.dumps({**config, "image_condition_type": "token_replace"}))
  assert_clean_failure(capsys, tmp_path, i2v, "only text-to-video")
  empty = tmp_path / "empty"
  empty.mkdir()
  assert_clean_failure(capsys, tmp_path, empty, "mp_rank_00_model_states.pt")
  assert_clean_failure(capsys, tmp_path, tmp_path / "absent", "no such file or directory")
  truncated = tmp_path / "truncated.pt"
  truncated.write_bytes(ORIGINAL_PT.read_bytes()[:-2000])
  assert_clean_failure(capsys, tmp_path, truncated, "truncated.pt", "--config", "tiny")
  assert_clean_failure(capsys, tmp_path, DIFFUSERS, "neither a preset", "--config", "huge")


# ----------------------------------------------------------------------------------------------
# Config, inputs, precision


def test_config_validation():
  config = hy.HunyuanConfig.preset("tiny")
  assert hy.HunyuanConfig.from_dict(config.to_dict()) == config
  assert json.loads(json.dumps(config.to_dict()))["rope_axes_dim"] == [2, 2, 4]
  assert dataclasses.replace(config, rope_axes_dim=[4, 2, 2]).rope_axes_dim == (4, 2, 2)
  full = hy.HunyuanConfig.preset("hunyuanvideo-t2v")
  assert (full.hidden_size, full.mlp_dim, full.num_layers, full.num_single_layers) == (
      3072, 12288, 20, 40)
  assert full.rope_axes_dim == (16, 56, 56) and full.rope_theta == 256.0 and full.guidance_embeds
  with pytest.raises(ValueError, match="must sum to attention_head_dim"):
    hy.HunyuanConfig.preset("tiny", rope_axes_dim=(4, 4, 4))
  with pytest.raises(ValueError, match="three positive even ints"):
    hy.HunyuanConfig.preset("tiny", rope_axes_dim=(3, 1, 4))
  with pytest.raises(ValueError, match="qk_norm"):
    hy.HunyuanConfig.preset("tiny", qk_norm="layer_norm")
  with pytest.raises(ValueError, match="num_single_layers"):
    hy.HunyuanConfig.preset("tiny", num_single_layers=0)
  with pytest.raises(ValueError, match="mlp_ratio"):
    hy.HunyuanConfig.preset("tiny", mlp_ratio=0.0)
  with pytest.raises(ValueError, match="unknown HunyuanVideo preset"):
    hy.HunyuanConfig.preset("hunyuan9")
  with pytest.raises(ValueError, match="unknown HunyuanConfig fields"):
    hy.HunyuanConfig.from_dict({**config.to_dict(), "image_condition_type": "latent_concat"})


def test_full_size_parameter_count():
  model = nnx.eval_shape(lambda: hy.HunyuanVideoTransformer3DModel(
      hy.HunyuanConfig.preset("hunyuanvideo-t2v"), rngs=nnx.Rngs(0)))
  count = sum(x.size for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))
  assert 12.7e9 < count < 12.9e9  # HunyuanVideo's 13B transformer


def test_bad_inputs(models, io):
  model = models["diffusers"]
  latents, timestep, text, text_mask, pooled, guidance = _args(io, 0)
  with pytest.raises(ValueError, match="channels"):
    model(latents[:, :3], timestep, text, text_mask, pooled, guidance)
  with pytest.raises(ValueError, match="multiples of the patch"):
    model(latents[..., :5], timestep, text, text_mask, pooled, guidance)
  with pytest.raises(ValueError, match="text must be"):
    model(latents, timestep, text[..., :8], text_mask, pooled, guidance)
  with pytest.raises(ValueError, match="text_mask must be"):
    model(latents, timestep, text, text_mask[:, :3], pooled, guidance)
  with pytest.raises(ValueError, match="pooled must be"):
    model(latents, timestep, text, text_mask, pooled[:, :3], guidance)
  with pytest.raises(ValueError, match="pass guidance"):
    model(latents, timestep, text, text_mask, pooled)
  with pytest.raises(ValueError, match="guidance must be"):
    model(latents, timestep, text, text_mask, pooled, jnp.ones((3,)))
  no_guidance = hy.HunyuanVideoTransformer3DModel(
      hy.HunyuanConfig.preset("tiny", guidance_embeds=False), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="no guidance embedding"):
    no_guidance(latents, timestep, text, text_mask, pooled, guidance)


def test_bf16_compute_close_to_fp32(models, io):
  model32 = models["diffusers"]
  config16 = dataclasses.replace(model32.config, param_dtype="bfloat16", dtype="bfloat16",
                                 attention_impl="xla")
  params = jax.tree.map(lambda a, b: a.astype(b.dtype),
                        nnx.to_pure_dict(nnx.state(model32, nnx.Param)),
                        nnx.to_pure_dict(nnx.state(nnx.eval_shape(
                            lambda: hy.HunyuanVideoTransformer3DModel(config16, rngs=nnx.Rngs(0))),
                            nnx.Param)))
  model16 = hy.from_params(config16, params)
  assert model16.transformer_blocks.ff.proj_in.kernel[...].dtype == jnp.bfloat16
  assert model16.time_text_embed.timestep_embedder.linear_1.kernel[...].dtype == jnp.float32
  args = _args(io, 1)
  got = _jit_call(model16, *args)
  assert got.dtype == jnp.float32
  want = io["case1.out"]
  assert float(np.linalg.norm(np.asarray(got) - want) / np.linalg.norm(want)) < 3e-2
