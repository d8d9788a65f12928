"""The Wan2.1 VAE against diffusers' `AutoencoderKLWan` (tests/goldens/make_wan_vae_goldens.py),
its feature-cached chunked decode, and the checkpoint converter for both source layouts."""

import dataclasses
import json
import pathlib
import shutil
import time

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from astraea_jax.models import wan_vae
from astraea_jax.models.wan_vae import AutoencoderKLWan, WanVAEConfig
from checkpoints_convert import pth_io, safetensors_io
from checkpoints_convert import wan_vae as convert_vae
from checkpoints_convert.common import CheckpointError

GOLDENS = pathlib.Path(__file__).parent / "goldens" / "wan_vae"
DIFFUSERS = GOLDENS / "vae"
PTH = GOLDENS / "wan_vae.pth"
TINY = wan_vae.PRESETS["tiny"]


@pytest.fixture(scope="module", autouse=True)
def exact_fp32():
  # On GPU, fp32 convolutions default to TF32; parity needs true fp32 (a no-op on CPU). Module
  # scope, so that the module-scoped fixtures below are computed under it too.
  with jax.default_matmul_precision("highest"):
    yield


def max_rel_err(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def golden():
  with np.load(GOLDENS / "wan_vae_golden.npz") as f:
    return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def params():
  config, params = convert_vae.load_params(DIFFUSERS)
  assert config == TINY
  return params


@pytest.fixture(scope="module")
def model(params):
  return wan_vae.from_params(TINY, params)


@pytest.fixture(scope="module")
def decoded(model, golden):
  return np.asarray(model.decode(jnp.asarray(golden["latents"])))


# --- config --------------------------------------------------------------------------------------


def test_presets_and_diffusers_config():
  real = WanVAEConfig.preset("wan2.1")
  assert (real.base_dim, real.z_dim, real.dim_mult) == (96, 16, (1, 2, 4, 4))
  assert real.num_res_blocks == 2
  assert real.temperal_downsample == (False, True, True) and real.attn_scales == ()
  assert real.latents_mean[:2] == (-0.7571, -0.7089) and real.latents_std[-1] == 1.9160
  assert (real.temporal_compression, real.spatial_compression, real.num_frames(21)) == (4, 8, 81)
  assert real.decoder_dims == (384, 384, 384, 192, 96)
  raw = json.loads((DIFFUSERS / "config.json").read_text())
  assert WanVAEConfig.from_diffusers_config(raw) == TINY
  # The same structure as Wan2.1: the tiny checkpoint has the real one's keys.
  assert dataclasses.replace(TINY, base_dim=96, z_dim=16, latents_mean=real.latents_mean,
                             latents_std=real.latents_std) == real
  with pytest.raises(ValueError, match="unknown Wan VAE preset"):
    WanVAEConfig.preset("wan9")


@pytest.mark.parametrize("changes, match", [
    (dict(temperal_downsample=(True,)), "temperal_downsample"),
    (dict(attn_scales=(0.5,)), "attn_scales"),
    (dict(latents_std=(1.0, 1.0, 1.0, 0.0)), "latents_std"),
    (dict(latents_mean=(0.0,)), "z_dim=4"),
    (dict(base_dim=0), "base_dim"),
    (dict(dim_mult=(1,), temperal_downsample=()), "dim_mult"),
])
def test_config_validation(changes, match):
  with pytest.raises(ValueError, match=match):
    dataclasses.replace(TINY, **changes)


@pytest.mark.parametrize("raw, match", [
    ({"_class_name": "AutoencoderKL"}, "AutoencoderKLWan"),
    ({"is_residual": True}, "Wan2.2"),
    ({"patch_size": 2}, "Wan2.2"),
])
def test_unsupported_diffusers_configs(raw, match):
  with pytest.raises(ValueError, match=match):
    WanVAEConfig.from_diffusers_config(raw)


# --- parity with diffusers -----------------------------------------------------------------------


def test_decode_parity_diffusers_layout(decoded, golden):
  assert decoded.shape == golden["video"].shape == (1, 3, 9, 32, 48)
  assert decoded.dtype == np.float32
  assert max_rel_err(decoded, golden["video"]) < 1e-4
  # The first frame passes no temporal upsampler and has no history: much tighter.
  assert max_rel_err(decoded[:, :, 0], golden["video"][:, :, 0]) < 1e-5


def test_pth_layout_gives_the_same_params(params):
  state = pth_io.load_state_dict(PTH)
  assert convert_vae.is_wan_layout(list(state))
  renamed = convert_vae.wan_to_diffusers_names(state)
  with safetensors_io.open_safetensors(DIFFUSERS) as st:
    assert sorted(renamed) == sorted(st.keys())
    for key in st.keys():
      np.testing.assert_array_equal(renamed[key], st.read(key), err_msg=key)
  config, from_pth = convert_vae.load_params(PTH, config="tiny")
  assert config == TINY
  jax.tree.map(np.testing.assert_array_equal, from_pth, params)


def test_decode_parity_pth_layout(golden):
  config, params = convert_vae.load_params(PTH, config="tiny")
  model = wan_vae.from_params(config, params)
  video = model.decode(jnp.asarray(golden["latents"]))
  assert max_rel_err(video, golden["video"]) < 1e-4


def test_encode_parity(model, golden):
  mean, logvar = model.encode(jnp.asarray(golden["video_in"]))
  assert mean.shape == logvar.shape == golden["mean"].shape == (1, 4, 3, 2, 2)
  assert max_rel_err(mean, golden["mean"]) < 1e-4
  assert max_rel_err(logvar, golden["logvar"]) < 1e-4


def test_latent_normalization(golden):
  z = jnp.asarray(golden["latents"])
  denorm = wan_vae.denormalize_latents(z, TINY)
  np.testing.assert_allclose(denorm, golden["denormalized"], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(wan_vae.normalize_latents(denorm, TINY), z, rtol=1e-5, atol=1e-5)
  assert wan_vae.denormalize_latents(z.astype(jnp.bfloat16), TINY).dtype == jnp.bfloat16


# --- the chunked, cached decode ------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [2, 5])
def test_chunked_decode_equals_frame_by_frame(model, golden, decoded, chunk):
  # chunk=2: all frames after the first in one go (one scan step); chunk=5 > T - 1: no scan, only
  # the trailing partial chunk.
  video = np.asarray(model.decode(jnp.asarray(golden["latents"]), chunk=chunk))
  assert max_rel_err(video, decoded) < 1e-5
  np.testing.assert_array_equal(video[:, :, 0], decoded[:, :, 0])


def test_chunked_encode(model, golden):
  mean1, _ = model.encode(jnp.asarray(golden["video_in"]), chunk=1)
  mean2, _ = model.encode(jnp.asarray(golden["video_in"]), chunk=2)
  assert max_rel_err(mean2, mean1) < 1e-5


def test_decode_program_does_not_grow_with_frames(model):
  """One scan body for every latent frame after the first: the traced program has a fixed size."""

  def count(jaxpr) -> int:
    n = 0
    for eqn in jaxpr.eqns:
      n += 1
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        n += count(sub)
    return n

  graphdef, state = nnx.split(model)

  def program(frames):
    z = jnp.zeros((1, TINY.z_dim, frames, 2, 2), jnp.float32)
    return jax.make_jaxpr(lambda s, z: nnx.merge(graphdef, s).decode(z))(state, z).jaxpr

  short, long = program(3), program(12)
  assert count(short) == count(long)
  assert "scan" in str(long)


def test_decoder_cache_is_a_fixed_pytree(model):
  """The first chunk and every later one leave caches of the same structure, shapes and dtypes."""
  x = jax.ShapeDtypeStruct((1, 1, 2, 3, TINY.z_dim), jnp.float32)
  first_out, first = nnx.eval_shape(lambda m, x: m.decoder(x), model, x)
  out, later = nnx.eval_shape(lambda m, x, c: m.decoder(x, c), model, x, first)
  assert first_out.shape == (1, 1, 16, 24, 3) and out.shape == (1, 4, 16, 24, 3)
  assert jax.tree.structure(first) == jax.tree.structure(later)
  spec = lambda a: (a.shape, a.dtype)  # noqa: E731
  assert jax.tree.map(spec, first) == jax.tree.map(spec, later)
  assert all(a.shape[1] in (1, wan_vae.CACHE_T) for a in jax.tree.leaves(first))


def test_bf16_decode_runs(params, golden):
  model = wan_vae.from_params(TINY, params, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  video = model.decode(jnp.asarray(golden["latents"]))
  assert video.dtype == jnp.bfloat16
  video = np.asarray(video.astype(jnp.float32))
  assert max_rel_err(video, golden["video"]) < 0.05
  assert np.abs(video - golden["video"]).mean() < 0.02 * np.abs(golden["video"]).mean()


@pytest.mark.parametrize("shape", [(1, 3, 3, 4, 6), (1, 4, 3, 4), (1, 4, 0, 4, 6)])
def test_decode_rejects_bad_latents(model, shape):
  with pytest.raises(ValueError, match="latents must be"):
    model.decode(jnp.zeros(shape, jnp.float32))


@pytest.mark.parametrize("shape, match", [((1, 3, 4, 16, 16), "T = 1 \\+ 4 k"),
                                          ((1, 3, 5, 12, 16), "multiples of 8"),
                                          ((1, 1, 5, 16, 16), "video must be")])
def test_encode_rejects_bad_video(model, shape, match):
  with pytest.raises(ValueError, match=match):
    model.encode(jnp.zeros(shape, jnp.float32))


def test_bad_chunk(model, golden):
  with pytest.raises(ValueError, match="chunk"):
    model.decode(jnp.asarray(golden["latents"]), chunk=0)


def test_from_params_checks_the_tree(params):
  with pytest.raises(ValueError, match="do not fit"):
    wan_vae.from_params(dataclasses.replace(TINY, z_dim=8, latents_mean=(0.0,) * 8,
                                            latents_std=(1.0,) * 8), params)


# --- the converter -------------------------------------------------------------------------------


def test_convert_and_load_checkpoint(tmp_path, model, golden, decoded):
  out = convert_vae.convert(DIFFUSERS, tmp_path / "vae", "float32")
  loaded = wan_vae.load_checkpoint(out)
  assert loaded.config == TINY
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(loaded, nnx.Param)),
               nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  # The CLI entry point, from the .pth layout, in bf16.
  assert convert_vae.main(["--src", str(PTH), "--out", str(tmp_path / "bf16"), "--preset", "tiny",
                           "--dtype", "bfloat16"]) == 0
  bf16 = wan_vae.load_checkpoint(tmp_path / "bf16")
  assert {a.dtype for a in jax.tree.leaves(nnx.state(bf16, nnx.Param))} == {jnp.dtype(jnp.bfloat16)}
  with pytest.raises(CheckpointError, match="already exists"):
    convert_vae.convert(DIFFUSERS, out)


def _write_diffusers(folder: pathlib.Path, tensors: dict, config: dict | None = None):
  folder.mkdir()
  raw = json.loads((DIFFUSERS / "config.json").read_text())
  raw.update(config or {})
  (folder / "config.json").write_text(json.dumps(raw))
  safetensors_io.save_file(tensors, folder / "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def diffusers_tensors():
  return {k: np.array(v) for k, v in safetensors_io.load_folder(DIFFUSERS)}


def _mutations(tensors):
  first = sorted(tensors)[0]
  yield "extra", {**tensors, "decoder.extra.weight": np.zeros(3, np.float32)}, None, \
      "unexpected tensor|no place"
  yield "missing", {k: v for k, v in tensors.items() if k != first}, None, "missing"
  shape = dict(tensors)
  shape["decoder.conv_out.bias"] = np.zeros(5, np.float32)
  yield "shape", shape, None, "shape mismatch"
  yield "class", tensors, {"_class_name": "AutoencoderKL"}, "AutoencoderKLWan"
  yield "wan22", tensors, {"is_residual": True}, "Wan2.2"


@pytest.mark.parametrize("case", ["extra", "missing", "shape", "class", "wan22"])
def test_bad_diffusers_checkpoints(tmp_path, diffusers_tensors, case):
  _, tensors, config, match = next(m for m in _mutations(diffusers_tensors) if m[0] == case)
  src = tmp_path / "vae"
  _write_diffusers(src, tensors, config)
  with pytest.raises(CheckpointError, match=match):
    convert_vae.convert(src, tmp_path / "out")
  assert not (tmp_path / "out").exists()


def test_bad_sources(tmp_path):
  with pytest.raises(CheckpointError, match="no such file"):
    convert_vae.load_params(tmp_path / "absent")
  (tmp_path / "empty").mkdir()
  with pytest.raises(CheckpointError, match="neither a diffusers VAE folder"):
    convert_vae.load_params(tmp_path / "empty")
  # The tiny .pth against the real architecture (the default for a .pth).
  with pytest.raises(CheckpointError, match="shape mismatch"):
    convert_vae.load_params(PTH)
  with pytest.raises(CheckpointError, match="unknown Wan VAE preset"):
    convert_vae.load_params(PTH, config="huge")
  # A Wan-named checkpoint with a tensor Wan's VAE does not have.
  bad = tmp_path / "bad.safetensors"
  safetensors_io.save_file({"decoder.upsamples.0.residual.1.weight": np.zeros(2, np.float32)}, bad)
  with pytest.raises(CheckpointError, match="residual-block tensor"):
    convert_vae.load_params(bad, config="tiny")
  truncated = tmp_path / "trunc" / "vae"
  shutil.copytree(DIFFUSERS, truncated)
  weights = truncated / "diffusion_pytorch_model.safetensors"
  weights.write_bytes(weights.read_bytes()[:-100])
  with pytest.raises(CheckpointError, match="truncated"):
    convert_vae.load_params(tmp_path / "trunc")
  not_pth = tmp_path / "Wan2.1_VAE.pth"
  not_pth.write_bytes(b"not a zip")
  with pytest.raises(CheckpointError):
    convert_vae.load_params(tmp_path)


# --- GPU: the real size ---------------------------------------------------------------------------


@pytest.mark.gpu_only
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_decode_81_frames_480p_on_gpu(dtype):
  """Wan2.1's VAE (random weights) decodes 21 latent frames at 60x104 into 81 frames at 480x832."""
  model = AutoencoderKLWan(wan_vae.PRESETS["wan2.1"], dtype=dtype, param_dtype=dtype,
                           rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  z = jax.random.normal(jax.random.key(0), (1, 16, 21, 60, 104), dtype)
  # The backend's default precision, as users get it (TF32 convolutions for fp32 on GPU).
  with jax.default_matmul_precision("default"):
    decode = jax.jit(lambda s, z: nnx.merge(graphdef, s).decode(z)).lower(state, z).compile()
  mem = decode.memory_analysis()
  # What the compiled decode holds: temporaries (cache, one step's activations, the stacked
  # output), inputs and output. The allocator's own peak also counts compile-time autotuning.
  gib = (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes) / 2**30
  video = decode(state, z).block_until_ready()
  start = time.perf_counter()
  video = decode(state, z).block_until_ready()
  seconds = time.perf_counter() - start
  assert video.shape == (1, 3, 81, 480, 832)
  assert bool(jnp.isfinite(video.astype(jnp.float32)).all())
  print(f"\nWan2.1 VAE decode 81x480x832 {jnp.dtype(dtype).name} on "
        f"{jax.devices()[0].device_kind}: {seconds:.2f} s, program memory {gib:.1f} GiB")
  assert gib < 20
