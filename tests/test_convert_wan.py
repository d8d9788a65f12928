"""`python -m checkpoints_convert wan`: both layouts end to end, and every kind of bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest

from astraea_jax import checkpoint
from astraea_jax.models import wan
from checkpoints_convert import __main__ as cli
from checkpoints_convert import safetensors_io
from checkpoints_convert import wan as convert_wan

REPO = Path(__file__).resolve().parent.parent
GOLDENS = REPO / "tests" / "goldens" / "wan"
DIFFUSERS = GOLDENS / "diffusers"
ORIGINAL = GOLDENS / "original"


def run_cli(capsys, *argv):
  rc = cli.main(["wan", *map(str, argv)])
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


def _flat_params(path):
  graphdef, abstract = nnx_split_abstract(checkpoint.read_metadata(path)["config"])
  state = checkpoint.load_params(path, abstract)
  del graphdef
  return {"/".join(map(str, k)): np.asarray(v) for k, v in
          jax.tree_util.tree_flatten_with_path(state)[0]}


def nnx_split_abstract(config_dict):
  from flax import nnx  # pylint: disable=import-outside-toplevel
  config = wan.WanConfig.from_dict(config_dict)
  return nnx.split(nnx.eval_shape(lambda: wan.WanTransformer3DModel(config, rngs=nnx.Rngs(0))))


def test_cli_both_layouts_agree(capsys, tmp_path):
  outs = {}
  for name, src in (("d", DIFFUSERS), ("o", ORIGINAL)):
    outs[name] = tmp_path / name
    rc, stdout, stderr = run_cli(capsys, "--src", src, "--out", outs[name])
    assert rc == 0, stderr
    layout = "diffusers" if name == "d" else "original"
    assert stdout.startswith(f"wan ({layout} layout, tiny): 19.83k params") and stdout.count(
        "\n") == 1
  meta = checkpoint.read_metadata(outs["d"])
  assert meta["family"] == "wan" and meta["layout"] == "diffusers"
  assert meta["config"]["num_layers"] == 2 and meta["config"]["param_dtype"] == "bfloat16"
  a, b = _flat_params(outs["d"]), _flat_params(outs["o"])
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  # bf16 storage by default; fp32 kept where the model keeps it.
  model = wan.load_pretrained(str(outs["d"]))
  assert model.blocks.ffn.proj_in.kernel[...].dtype == ml_dtypes.bfloat16
  assert model.blocks.scale_shift_table[...].dtype == np.float32
  assert model.condition_embedder.time_embedder.linear_1.kernel[...].dtype == np.float32


def test_layout_rules_against_source_tensors(tmp_path):
  convert_wan.convert(DIFFUSERS, tmp_path / "ck", dtype="fp32")
  model = wan.load_pretrained(str(tmp_path / "ck"))
  src = safetensors_io.open_safetensors(DIFFUSERS / "transformer")
  np.testing.assert_array_equal(model.blocks.attn1.to_out.kernel[...][1],
                                src.read("blocks.1.attn1.to_out.0.weight").T)
  np.testing.assert_array_equal(model.blocks.ffn.proj_in.bias[...][0],
                                src.read("blocks.0.ffn.net.0.proj.bias"))
  np.testing.assert_array_equal(model.blocks.norm2.scale[...][1], src.read("blocks.1.norm2.weight"))
  np.testing.assert_array_equal(model.patch_embedding.kernel[...],
                                np.asarray(src.read("patch_embedding.weight")).transpose(
                                    2, 3, 4, 1, 0))
  np.testing.assert_array_equal(model.scale_shift_table[...], src.read("scale_shift_table"))


def test_original_layout_unprefixed_single_file(capsys, tmp_path):
  src = tmp_path / "wan"
  src.mkdir()
  shutil.copy(ORIGINAL / "config.json", src / "config.json")
  reader = safetensors_io.open_safetensors(ORIGINAL)
  # bf16 on disk, to exercise that read path.
  tensors = {k.removeprefix("model.diffusion_model."): reader.read(k).astype(ml_dtypes.bfloat16)
             for k in reader.keys()}
  safetensors_io.save_file(tensors, src / "diffusion_pytorch_model.safetensors")
  rc, stdout, stderr = run_cli(capsys, "--src", src, "--out", tmp_path / "ck", "--dtype", "fp32")
  assert rc == 0, stderr
  assert "original layout" in stdout
  config = checkpoint.read_metadata(tmp_path / "ck")["config"]
  assert config["param_dtype"] == "float32"
  model = wan.load_pretrained(str(tmp_path / "ck"))
  np.testing.assert_array_equal(model.blocks.attn2.to_k.kernel[...][0],
                                tensors["blocks.0.cross_attn.k.weight"].astype(np.float32).T)


def test_transformer_folder_and_existing_output(capsys, tmp_path):
  rc, _, stderr = run_cli(capsys, "--src", DIFFUSERS / "transformer", "--out", tmp_path / "ck")
  assert rc == 0, stderr
  rc, _, stderr = run_cli(capsys, "--src", DIFFUSERS, "--out", tmp_path / "ck")
  assert rc == 1 and "already exists" in stderr
  rc, _, stderr = run_cli(capsys, "--src", DIFFUSERS, "--out", tmp_path / "ck", "--overwrite")
  assert rc == 0, stderr


def test_no_weights(capsys, tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  shutil.copy(DIFFUSERS / "transformer" / "config.json", src / "config.json")
  assert_clean_failure(capsys, tmp_path, src, "no .safetensors weights")
  assert_clean_failure(capsys, tmp_path, tmp_path / "absent", "no such directory")
  empty = tmp_path / "empty"
  empty.mkdir()
  assert_clean_failure(capsys, tmp_path, empty, "no config.json")


def test_truncated_safetensors(capsys, tmp_path):
  src = tmp_path / "src"
  shutil.copytree(DIFFUSERS / "transformer", src)
  weights = src / "diffusion_pytorch_model.safetensors"
  weights.write_bytes(weights.read_bytes()[:-1000])
  assert_clean_failure(capsys, tmp_path, src, "truncated")


def test_index_naming_missing_shard(capsys, tmp_path):
  src = tmp_path / "src"
  shutil.copytree(ORIGINAL, src)
  (src / "diffusion_pytorch_model-00001-of-00002.safetensors").unlink()
  assert_clean_failure(capsys, tmp_path, src, "missing shard(s) diffusion_pytorch_model-00001")


def test_other_model_family(capsys, tmp_path):
  umt5 = REPO / "tests" / "goldens" / "umt5" / "text_encoder"
  if umt5.is_dir():
    assert_clean_failure(capsys, tmp_path, umt5, "not a Wan2.1 transformer checkpoint")
  src = tmp_path / "vae"
  src.mkdir()
  (src / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLWan"}))
  safetensors_io.save_file({"encoder.conv_in.weight": np.ones((2, 2), np.float32)},
                           src / "diffusion_pytorch_model.safetensors")
  assert_clean_failure(capsys, tmp_path, src, "describes 'AutoencoderKLWan'")
  # A Wan config over weights of something else.
  shutil.copy(DIFFUSERS / "transformer" / "config.json", src / "config.json")
  assert_clean_failure(capsys, tmp_path, src, "not a Wan2.1 transformer in the diffusers layout")
  # Image-to-video is another model.
  i2v = tmp_path / "i2v"
  shutil.copytree(DIFFUSERS / "transformer", i2v)
  config = json.loads((i2v / "config.json").read_text())
  (i2v / "config.json").write_text(json.dumps({**config, "image_dim": 1280,
                                                "added_kv_proj_dim": 24}))
  assert_clean_failure(capsys, tmp_path, i2v, "only text-to-video")


def test_other_model_size(capsys, tmp_path):
  # Weights of the golden model under a config of another width: every shape disagrees.
  src = tmp_path / "src"
  shutil.copytree(DIFFUSERS / "transformer", src)
  config = json.loads((src / "config.json").read_text())
  (src / "config.json").write_text(json.dumps({**config, "attention_head_dim": 16}))
  err = assert_clean_failure(capsys, tmp_path, src, "do not match the config")
  assert "hidden 32" in err and "(+" in err
  # More layers in the config than in the weights.
  (src / "config.json").write_text(json.dumps({**config, "num_layers": 3}))
  assert_clean_failure(capsys, tmp_path, src, "missing from the checkpoint: blocks.")
  # Fewer layers in the config than in the weights.
  (src / "config.json").write_text(json.dumps({**config, "num_layers": 1}))
  assert_clean_failure(capsys, tmp_path, src, "are not parameters of the Wan2.1 T2V transformer")
  # A larger FFN in the original layout's config.
  orig = tmp_path / "orig"
  shutil.copytree(ORIGINAL, orig)
  config = json.loads((orig / "config.json").read_text())
  (orig / "config.json").write_text(json.dumps({**config, "ffn_dim": 64}))
  assert_clean_failure(capsys, tmp_path, orig, "blocks.0.ffn.0")


def test_extra_and_missing_tensors(capsys, tmp_path):
  src = tmp_path / "src"
  shutil.copytree(DIFFUSERS / "transformer", src)
  weights = src / "diffusion_pytorch_model.safetensors"
  reader = safetensors_io.open_safetensors(weights)
  tensors = {k: np.array(reader.read(k)) for k in reader.keys()}  # copies: the file is rewritten
  del reader
  safetensors_io.save_file({**tensors, "blocks.0.attn1.extra.weight": np.ones((2, 2), np.float32)},
                           weights)
  assert_clean_failure(capsys, tmp_path, src, "blocks.0.attn1.extra.weight")
  del tensors["blocks.1.attn2.norm_k.weight"]
  safetensors_io.save_file(tensors, weights)
  assert_clean_failure(capsys, tmp_path, src, "blocks.attn2.norm_k.scale[1]")


def test_subprocess_help_and_exit_status(tmp_path):
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  done = subprocess.run([sys.executable, "-m", "checkpoints_convert", "wan", "--help"], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=120, check=False)
  assert done.returncode == 0 and "--src" in done.stdout and "--dtype" in done.stdout
  done = subprocess.run([sys.executable, "-m", "checkpoints_convert", "wan", "--src",
                         str(tmp_path), "--out", str(tmp_path / "out")], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120, check=False)
  assert done.returncode == 1
  assert done.stderr.count("\n") == 1 and "no config.json" in done.stderr
  assert not (tmp_path / "out").exists()


def test_family_dispatch(capsys):
  assert "wan" in cli.families()
  assert cli.main(["no-such-family"]) == 2
  assert "unknown model family" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["wan2.1-t2v-1.3b", "wan2.1-t2v-14b"])
def test_real_configs_map_to_presets(name):
  # The config.json files published with the real checkpoints (diffusers and original layouts).
  real = {"wan2.1-t2v-1.3b": (1536, 12, 8960, 30), "wan2.1-t2v-14b": (5120, 40, 13824, 40)}
  dim, heads, ffn, layers = real[name]
  diffusers_cfg = {"_class_name": "WanTransformer3DModel", "added_kv_proj_dim": None,
                   "attention_head_dim": 128, "cross_attn_norm": True, "eps": 1e-06,
                   "ffn_dim": ffn, "freq_dim": 256, "image_dim": None, "in_channels": 16,
                   "num_attention_heads": heads, "num_layers": layers, "out_channels": 16,
                   "patch_size": [1, 2, 2], "qk_norm": "rms_norm_across_heads",
                   "rope_max_seq_len": 1024, "text_dim": 4096}
  original_cfg = {"_class_name": "WanModel", "_diffusers_version": "0.30.0", "dim": dim,
                  "eps": 1e-06, "ffn_dim": ffn, "freq_dim": 256, "in_dim": 16,
                  "model_type": "t2v", "num_heads": heads, "num_layers": layers, "out_dim": 16,
                  "text_len": 512}
  assert convert_wan.preset_name(convert_wan.config_from_diffusers(diffusers_cfg)) == name
  assert convert_wan.preset_name(convert_wan.config_from_original(original_cfg)) == name


def _write_synthetic_diffusers(root, config):
  """A random diffusers-layout checkpoint (fp32) for `config`, built from the target shapes."""
  to_diffusers = {v: k for k, v in convert_wan.DIFFUSERS_TO_NNX.items()}
  rng = np.random.default_rng(0)
  tensors = {}
  for name, (shape, _) in convert_wan.target_shapes(config).items():
    module, _, leaf = name.rpartition(".")
    layers, prefix = [None], ""
    if name.startswith("blocks."):
      layers, shape, module = range(shape[0]), shape[1:], module.removeprefix("blocks")[1:]
    module = to_diffusers.get(module, module)
    for i in layers:
      prefix = "" if i is None else f"blocks.{i}."
      if leaf == "scale_shift_table":
        key, src_shape = f"{prefix}scale_shift_table", shape
      elif leaf == "kernel" and len(shape) == 5:
        key, src_shape = f"{prefix}{module}.weight", (shape[4], shape[3], *shape[:3])
      elif leaf == "kernel":
        key, src_shape = f"{prefix}{module}.weight", shape[::-1]
      else:
        key, src_shape = f"{prefix}{module}.{'bias' if leaf == 'bias' else 'weight'}", shape
      tensors[key] = rng.standard_normal(src_shape, dtype=np.float32)
  root.mkdir()
  safetensors_io.save_file(tensors, root / "diffusion_pytorch_model.safetensors")
  fields = {k: v for k, v in config.to_dict().items()
            if k not in ("param_dtype", "dtype", "attention_impl")}
  (root / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel", **fields}))


def test_conversion_streams_within_memory_budget(tmp_path):
  # ~38M parameters: a 73 MiB bf16 target from a 145 MiB fp32 source. Peak memory above the
  # process's footprint after a first, tiny conversion must stay under 1.5x the target (no second
  # copy of the weights).
  config = wan.WanConfig(num_attention_heads=4, attention_head_dim=128, ffn_dim=2048,
                         num_layers=8, text_dim=512)
  src = tmp_path / "src"
  _write_synthetic_diffusers(src, config)
  script = (
      "import sys\n"
      "from checkpoints_convert import wan\n"
      "def status(key):  # VmHWM, unlike ru_maxrss, does not count the forked parent's memory\n"
      "  return int(open('/proc/self/status').read().split(key + ':')[1].split()[0]) * 1024\n"
      "wan.convert(sys.argv[3], sys.argv[2] + '-warm')  # loads every library the real one uses\n"
      "base = status('VmRSS')\n"
      "summary = wan.convert(sys.argv[1], sys.argv[2])\n"
      "print(summary.nbytes, status('VmHWM') - base)\n")
  done = subprocess.run([sys.executable, "-c", script, str(src), str(tmp_path / "out"),
                         str(DIFFUSERS)], cwd=REPO,
                        env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                        text=True, timeout=300, check=True)
  target, extra = map(int, done.stdout.split())
  assert target > 70 * 2**20
  assert extra < 1.5 * target, (extra / target, done.stdout)
  print(f"conversion peak host memory: {extra / target:.2f}x the target size")
  model = wan.load_pretrained(str(tmp_path / "out"))
  assert model.config.num_layers == 8
