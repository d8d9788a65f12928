"""OpenSora v1.2 VAE (decoder path): the spatial decoder against diffusers' `AutoencoderKL`
(goldens), the temporal VAE by its properties and a numpy causal conv, the converter."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from astraea_jax.models import opensora_vae as ov
from checkpoints_convert import __main__ as cli
from checkpoints_convert import opensora_vae as convert_vae
from checkpoints_convert import safetensors_io
from checkpoints_convert.common import CheckpointError
from opensora_tiny import GOLDENS, released_vae_state, write_released_vae

TINY = ov.PRESETS["tiny"]


@pytest.fixture(scope="module")
def vae():
  config, params, skipped = convert_vae.to_params(released_vae_state(), TINY)
  assert skipped > 0  # the encoders' tensors
  return ov.from_params(config, params)


def _jit(vae, method, *static):
  """`vae.method` jitted over the split module (eager NNX calls are slow to dispatch)."""
  graphdef, state = nnx.split(vae)
  f = jax.jit(lambda st, *a: getattr(nnx.merge(graphdef, st), method)(*a),
              static_argnums=tuple(i + 1 for i in static))
  return lambda *a: f(state, *a)


def _reference_latent_size(num_frames, micro=17, factor=4):
  # VideoAutoencoderPipeline.get_latent_size with VAE_Temporal.get_latent_size, as written there.
  def temporal(n):
    pad = 0 if n % factor == 0 else factor - n % factor
    return (n + pad) // factor
  size = temporal(micro) * (num_frames // micro)
  if num_frames % micro:
    size += temporal(num_frames % micro)
  return size


@pytest.mark.parametrize("frames", [1, 4, 16, 17, 18, 24, 34, 51, 68, 102, 204])
def test_latent_frames(frames):
  assert ov.latent_frames(frames) == _reference_latent_size(frames)
  assert ov.max_frames(ov.latent_frames(frames), ov.PRESETS["v1.2"]) >= frames


def test_spatial_decoder_matches_diffusers(vae):
  golden = np.load(GOLDENS / "opensora_vae" / "golden.npz")
  z = jnp.asarray(golden["z"]).transpose(0, 2, 3, 1)  # [N, Y, X, C]
  out = np.asarray(vae.spatial(z)).transpose(0, 3, 1, 2)
  ref = golden["decoded"]
  assert out.shape == ref.shape == (2, 3, 20, 24)
  assert np.max(np.abs(out - ref)) / np.max(np.abs(ref)) < 1e-4


@pytest.mark.parametrize("frames", [34, 24])
def test_decode_matches_opensora_pipeline(vae, frames):
  """The whole decoder (scale/shift, 17-frame chunks incl. a shorter last one, temporal VAE,
  per-frame AutoencoderKL with the 0.18215 factor) against OpenSora's own
  `VideoAutoencoderPipeline.decode` run on the same tiny weights
  (tests/goldens/make_opensora_vae_goldens.py)."""
  golden = np.load(GOLDENS / "opensora_vae" / "pipeline_golden.npz")
  ref = golden[f"v{frames}"]
  out = np.asarray(ov.decode_jit(vae, jnp.asarray(golden[f"z{frames}"]), frames))
  assert out.shape == ref.shape == (1, 3, frames, 8, 12)
  assert np.max(np.abs(out - ref)) / np.max(np.abs(ref)) < 1e-4


def _numpy_causal_conv(x, w, b, stride_t):
  """Direct evaluation of OpenSora's CausalConv3d: zero-pad time at the front by
  (k_t - 1) + (1 - s_t) and H, W by k // 2, then a strided 3D cross-correlation.
  x [T, H, W, I], w [kt, kh, kw, I, O]."""
  kt, kh, kw = w.shape[:3]
  xp = np.pad(x, (((kt - 1) + (1 - stride_t), 0), (kh // 2,) * 2, (kw // 2,) * 2, (0, 0)))
  t_out = (xp.shape[0] - kt) // stride_t + 1
  out = np.zeros((t_out, x.shape[1], x.shape[2], w.shape[-1]), np.float64)
  for t in range(t_out):
    for i in range(x.shape[1]):
      for j in range(x.shape[2]):
        patch = xp[t * stride_t:t * stride_t + kt, i:i + kh, j:j + kw]  # [kt, kh, kw, I]
        out[t, i, j] = np.tensordot(patch, w, axes=4) + b
  return out


@pytest.mark.parametrize("stride_t, frames", [(1, 5), (2, 8), (2, 7)])
def test_causal_conv_matches_numpy(stride_t, frames):
  conv = ov.CausalConv3d(3, 2, 3, stride_t=stride_t, dtype=jnp.float32, param_dtype=jnp.float32,
                         rngs=nnx.Rngs(1))
  conv.conv.bias[...] = jnp.asarray([0.5, -0.25], jnp.float32)
  x = np.random.default_rng(0).standard_normal((1, frames, 4, 5, 3)).astype(np.float32)
  got = np.asarray(conv(jnp.asarray(x)))[0]
  want = _numpy_causal_conv(x[0], np.asarray(conv.conv.kernel[...]),
                            np.asarray(conv.conv.bias[...]), stride_t)
  # With the causal padding, T' = T // s_t.
  assert got.shape == want.shape == (frames // stride_t, 4, 5, 2)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # Causality: changing input frame m leaves every output whose window ends before it unchanged.
  m = frames - 2
  x2 = x.copy()
  x2[:, m] += 1.0
  got2 = np.asarray(conv(jnp.asarray(x2)))[0]
  p = m + 2 + (1 - stride_t)  # m's index in the padded input
  before = [t for t in range(got.shape[0]) if t * stride_t + 2 < p]
  after = [t for t in range(got.shape[0]) if t * stride_t <= p <= t * stride_t + 2]
  assert before and after
  np.testing.assert_array_equal(got2[before], got[before])
  assert not np.allclose(got2[after], got[after])


@pytest.mark.parametrize("frames", [17, 34, 51, 24, 1])
def test_decode_shapes(vae, frames):
  tz = ov.latent_frames(frames)
  graphdef, state = nnx.split(vae)
  out = jax.eval_shape(lambda st, z: nnx.merge(graphdef, st).decode(z, frames), state,
                       jax.ShapeDtypeStruct((2, 4, tz, 3, 5), jnp.float32))
  s = TINY.spatial_compression
  assert out.shape == (2, 3, frames, 3 * s, 5 * s)
  # A chunk alone: 4 * T_z frames before dropping the front padding.
  dec = jax.eval_shape(lambda st, z: nnx.merge(graphdef, st).temporal.decoder(z), state,
                       jax.ShapeDtypeStruct((1, 5, 3, 5, 4), jnp.float32))
  assert dec.shape == (1, 20, 3, 5, 4)


def test_chunks_are_independent_and_causal(vae):
  """Decoded frames of a 5-latent-frame chunk depend on that chunk only: changing the second
  chunk's latents leaves frames 0..16 unchanged, and the first chunk decodes alone the same."""
  decode_temporal = _jit(vae, "decode_temporal", 1)
  z = jax.random.normal(jax.random.key(0), (1, 4, 10, 3, 4))
  x = np.asarray(decode_temporal(z, 34))
  assert x.shape == (1, 34, 3, 4, 4)
  z2 = z.at[:, :, 5:].add(1.0)
  x2 = np.asarray(decode_temporal(z2, 34))
  np.testing.assert_array_equal(x2[:, :17], x[:, :17])
  assert not np.allclose(x2[:, 17:], x[:, 17:])
  alone = np.asarray(decode_temporal(z[:, :, :5], 17))
  np.testing.assert_allclose(alone, x[:, :17], rtol=1e-5, atol=1e-5)


def test_decode_checks_its_input(vae):
  # scale and shift come from the file's buffers (float32).
  np.testing.assert_allclose(vae.config.scale, (1.5, 2.0, 0.5, 3.0), rtol=1e-6)
  np.testing.assert_allclose(vae.config.shift, (0.1, -0.2, 0.3, 0.0), rtol=1e-6)
  z = jnp.zeros((1, 4, 5, 2, 2))
  with pytest.raises(ValueError, match="latent frames"):
    vae.decode(z, 34)
  with pytest.raises(ValueError, match="latents must be"):
    vae.decode(jnp.zeros((1, 3, 5, 2, 2)), 17)


def test_convert_cli_and_errors(tmp_path):
  src = write_released_vae(tmp_path / "OpenSora-VAE-v1.2")
  out = tmp_path / "vae"
  assert cli.main(["opensora_vae", "--src", str(src), "--out", str(out), "--preset", "tiny"]) == 0
  vae = ov.load_checkpoint(out)
  np.testing.assert_allclose(vae.config.scale, (1.5, 2.0, 0.5, 3.0), rtol=1e-6)
  assert vae.config.spatial == TINY.spatial and vae.config.temporal == TINY.temporal
  # The released (full-size) architecture does not fit tiny weights: a clear shape error.
  with pytest.raises(CheckpointError, match="shape mismatch|no parameter"):
    convert_vae.load_params(src, config="v1.2")
  state = released_vae_state()
  bad = tmp_path / "bad.safetensors"
  safetensors_io.save_file({**state, "something_else.weight": np.zeros(3, np.float32)}, bad)
  with pytest.raises(CheckpointError, match="something_else"):
    convert_vae.load_params(bad, config="tiny")
  missing = {k: v for k, v in state.items() if "conv_out" not in k}
  safetensors_io.save_file(missing, bad)
  with pytest.raises(CheckpointError, match="missing"):
    convert_vae.load_params(bad, config="tiny")
  assert not (tmp_path / "vae2").exists()


def test_config_checks():
  with pytest.raises(ValueError, match="latent channels"):
    dataclasses.replace(TINY, spatial=dataclasses.replace(TINY.spatial, latent_channels=8))
  assert ov.OpenSoraVAEConfig.from_dict(TINY.to_dict()) == TINY
