"""HunyuanVideo causal 3D VAE (decoder path): parity with diffusers' `AutoencoderKLHunyuanVideo`
on a tiny random VAE (tests/goldens/make_hunyuan_vae_goldens.py), the converter's checks, input and
config validation."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from astraea_jax.models import hunyuan_vae as hv
from astraea_jax.models import hunyuan_vae_tiling as tiling
from checkpoints_convert import hunyuan_vae as convert_vae
from checkpoints_convert import safetensors_io
from checkpoints_convert.common import CheckpointError

GOLDEN = pathlib.Path(__file__).resolve().parent / "goldens" / "hunyuan_vae"
TINY = hv.PRESETS["tiny"]


@pytest.fixture(scope="module")
def vae():
  config, params = convert_vae.load_params(GOLDEN)
  return hv.from_params(config, params)


def test_decode_matches_diffusers(vae):
  assert vae.config == TINY  # read from the golden's config.json
  golden = np.load(GOLDEN / "io.npz")
  z, ref = golden["z"], golden["video"]
  assert z.shape == (1, 4, 3, 4, 6)
  out = np.asarray(hv.decode_jit(vae, jnp.asarray(z)))
  assert out.shape == ref.shape == (1, 3, TINY.num_frames(3), 32, 48) == (1, 3, 9, 32, 48)
  err = float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))
  print(f"hunyuan VAE decode vs diffusers: max relative error {err:.3g}")
  assert err < 1e-4, err
  # decode_scaled undoes the transformer's latent scaling.
  scaled = np.asarray(jax.jit(lambda v, x: v.decode_scaled(x))(vae, jnp.asarray(
      z * np.float32(TINY.scaling_factor))))
  np.testing.assert_allclose(scaled, out, rtol=1e-4, atol=1e-4 * np.max(np.abs(ref)))


def _tiling_of(golden) -> hv.VAETiling:
  t = json.loads(str(golden["tiling"]))
  return hv.VAETiling(spatial=True, **{k.removeprefix("tile_sample_"): v for k, v in t.items()})


def test_framewise_decode_matches_diffusers(vae):
  """diffusers' default decode of 6 latent frames: chunks of 5 every 3, blended over 4 frames."""
  golden = np.load(GOLDEN / "tiled.npz")
  z, ref = golden["z_framewise"], golden["video_framewise"]
  assert ref.shape == (1, 3, TINY.num_frames(6), 32, 48)
  assert tiling.num_tiles(z.shape, hv.VAETiling(), 8, 4) == 2
  out = np.asarray(hv.decode_tiled(vae, jnp.asarray(z)))
  err = float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))
  print(f"hunyuan VAE frame-wise decode vs diffusers: max relative error {err:.3g}")
  assert err < 1e-4, err
  # Frame-wise decoding is not the whole-clip decode (GroupNorm statistics are per chunk).
  whole = np.asarray(hv.decode_jit(vae, jnp.asarray(z)))
  assert np.max(np.abs(whole - ref)) > 100 * err * np.max(np.abs(ref))


def test_spatial_and_framewise_tiles_match_diffusers(vae):
  """`enable_tiling` with small tiles: edge tiles of 1 and 2 latents, chunks of 1 to 3 frames."""
  golden = np.load(GOLDEN / "tiled.npz")
  z, ref = golden["z_tiled"], golden["video_tiled"]
  cfg = _tiling_of(golden)
  assert ref.shape == (1, 3, TINY.num_frames(4), 56, 40)
  assert tiling.num_tiles(z.shape, cfg, 8, 4) == 4 * 3 * 2
  out = np.asarray(hv.decode_tiled(vae, jnp.asarray(z), cfg))
  err = float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))
  print(f"hunyuan VAE tiled decode vs diffusers: max relative error {err:.3g}")
  assert err < 1e-4, err
  # The tiles spread over two devices: the same programs, the same result.
  spread = hv.decode_tiled(vae, jnp.asarray(z), cfg, devices=jax.devices()[:2])
  assert spread.devices() == {jax.devices()[0]}
  np.testing.assert_allclose(np.asarray(spread), out, rtol=1e-6, atol=1e-6)


def test_blend_is_diffusers_linear_ramp():
  a = jnp.arange(2 * 5, dtype=jnp.float32).reshape(1, 2, 5) + 100
  b = jnp.zeros((1, 2, 3), jnp.float32)
  out = np.asarray(tiling.blend(a, b, 4, axis=2))  # e = min(5, 3, 4) = 3
  w = np.arange(3) / 3
  np.testing.assert_allclose(out, np.asarray(a)[:, :, -3:] * (1 - w), rtol=1e-6)
  assert tiling.blend(a, b, 0, axis=2) is b


def test_tiling_small_latents_decode_whole(vae):
  """Latents within one tile and one chunk decode in one call, as diffusers does."""
  golden = np.load(GOLDEN / "io.npz")
  z = jnp.asarray(golden["z"])
  assert tiling.num_tiles(z.shape, hv.VAETiling(spatial=True), 8, 4) == 1
  np.testing.assert_array_equal(np.asarray(hv.decode_tiled(vae, z, hv.VAETiling(spatial=True))),
                                np.asarray(hv.decode_jit(vae, z)))


def test_tiling_rejects_bad_sizes(vae):
  with pytest.raises(ValueError, match="stride must be in"):
    hv.VAETiling(min_height=128, stride_height=192)
  with pytest.raises(ValueError, match="stride_width=4 is less than one latent"):
    hv.decode_tiled(vae, jnp.zeros((1, 4, 2, 4, 4)), hv.VAETiling(spatial=True, stride_width=4))
  with pytest.raises(ValueError, match="latents must be"):
    hv.decode_tiled(vae, jnp.zeros((1, 3, 2, 4, 4)))


def test_decode_rejects_bad_latents(vae):
  with pytest.raises(ValueError, match=r"latents must be \[B, 4, T, Y, X\]"):
    vae.decode(jnp.zeros((1, 3, 2, 4, 4)))  # wrong channel count
  with pytest.raises(ValueError, match="latents must be"):
    vae.decode(jnp.zeros((4, 2, 4, 4)))  # no batch axis


def test_causal_frame_mask_is_diffusers():
  t, hw = 3, 2
  # prepare_causal_attention_mask: meshgrid(indexing="xy") -> x[i, j] = frame(j), y[i, j] = frame(i)
  frames = np.repeat(np.arange(1, t + 1), hw)
  x, y = np.meshgrid(frames, frames, indexing="xy")
  np.testing.assert_array_equal(np.asarray(hv.causal_frame_mask(t, hw)), x <= y)


@pytest.mark.parametrize("t", [1, 2, 5])
def test_released_shapes(t):
  config = hv.PRESETS["hunyuan-video"]
  assert config.upsample_factors == ((1, 2), (2, 2), (2, 2), (1, 1))
  graphdef, state = nnx.split(nnx.eval_shape(lambda: hv.HunyuanVAEDecoder(config,
                                                                          rngs=nnx.Rngs(0))))
  out = jax.eval_shape(lambda st, z: nnx.merge(graphdef, st).decode(z), state,
                       jax.ShapeDtypeStruct((1, 16, t, 3, 5), jnp.float32))
  assert out.shape == (1, 3, (t - 1) * 4 + 1, 24, 40)


def _write(folder: pathlib.Path, state) -> pathlib.Path:
  folder.mkdir(parents=True)
  shutil.copy(GOLDEN / "config.json", folder / "config.json")
  safetensors_io.save_file(state, folder / "diffusion_pytorch_model.safetensors")
  return folder


def test_converter_checks(tmp_path):
  state = dict(safetensors_io.load_folder(GOLDEN / "diffusion_pytorch_model.safetensors"))
  state = {k: np.array(v) for k, v in state.items()}
  params, skipped = convert_vae.to_params(state, TINY)
  assert skipped == sum(k.startswith(("encoder.", "quant_conv.")) for k in state) > 0
  kernel = params["decoder"]["up_blocks"]["1"]["upsamplers"]["0"]["conv"]["conv"]["kernel"]
  np.testing.assert_array_equal(
      kernel, state["decoder.up_blocks.1.upsamplers.0.conv.conv.weight"].transpose(2, 3, 4, 1, 0))
  # The pipeline root (vae/ inside) works too, in bf16.
  root = tmp_path / "root"
  _write(root / "vae", state)
  config, params = convert_vae.load_params(root, dtype="bf16")
  assert config.param_dtype == "bfloat16"
  assert params["post_quant_conv"]["kernel"].dtype == jnp.bfloat16
  # An unknown tensor, a missing one and the wrong architecture: one-line errors naming keys.
  with pytest.raises(CheckpointError, match="decoder.extra.weight"):
    convert_vae.load_params(_write(tmp_path / "extra", {
        **state, "decoder.extra.weight": np.zeros(3, np.float32)}))
  with pytest.raises(CheckpointError, match="missing.*decoder.conv_out.conv.kernel"):
    convert_vae.load_params(_write(tmp_path / "missing", {
        k: v for k, v in state.items() if not k.startswith("decoder.conv_out.")}))
  with pytest.raises(CheckpointError, match="shape mismatch for decoder.*checkpoint has"):
    convert_vae.load_params(GOLDEN, config="hunyuan-video")
  with pytest.raises(CheckpointError, match="no \\*.safetensors"):
    (tmp_path / "empty").mkdir()
    convert_vae.load_params(tmp_path / "empty")
  bad = _write(tmp_path / "badcfg", state)
  cfg = json.loads((bad / "config.json").read_text())
  (bad / "config.json").write_text(json.dumps({**cfg, "act_fn": "gelu"}))
  with pytest.raises(CheckpointError, match="act_fn='gelu'"):
    convert_vae.load_params(bad)


def test_config_checks():
  assert hv.HunyuanVAEConfig.from_dict(TINY.to_dict()) == TINY
  released = hv.PRESETS["hunyuan-video"]
  assert (released.latent_channels, released.block_out_channels, released.layers_per_block,
          released.norm_num_groups, released.scaling_factor) == (16, (128, 256, 512, 512), 2, 32,
                                                                 0.476986)
  with pytest.raises(ValueError, match=r"self.block_out_channels=\(4, 6, 8, 8\)"):
    dataclasses.replace(TINY, block_out_channels=(4, 6, 8, 8))
  with pytest.raises(ValueError, match="self.temporal_compression_ratio=8"):
    dataclasses.replace(TINY, temporal_compression_ratio=8)
  with pytest.raises(ValueError, match="2 up blocks"):
    dataclasses.replace(TINY, block_out_channels=(4, 8), spatial_compression_ratio=4)
  with pytest.raises(ValueError, match="self.latent_channels=0"):
    dataclasses.replace(TINY, latent_channels=0)
