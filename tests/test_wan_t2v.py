"""A whole Wan2.1 text-to-video folder, end to end against diffusers' `WanPipeline` (golden).

tests/goldens/make_wan_pipeline_goldens.py builds a tiny random Wan2.1-T2V release in both layouts
(diffusers and original) and records diffusers' `WanPipeline` on it: UniPC, 4 steps, guidance 5, a
negative prompt, from given initial noise. Here the same folder is read in memory and after
`checkpoints_convert wan_t2v`, and the project's pipeline must reproduce diffusers' final latents and
their decode.
"""

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from astraea_jax import video
from astraea_jax.pipelines import ModelLoadError, folder_kind, load_wan_pipeline
from checkpoints_convert.common import CheckpointError
from checkpoints_convert.wan_t2v import convert, load_pipeline

GOLDENS = Path(__file__).parent / "goldens" / "wan_pipeline"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def golden():
  return dict(np.load(GOLDENS / "golden.npz"))


def _request(pipe, golden):
  height, width, frames, steps = (int(v) for v in golden["size"])
  return dataclasses.replace(pipe.defaults, height=height, width=width, frames=frames, steps=steps,
                             guidance=float(golden["guidance"]), shift=float(golden["shift"]),
                             negative_prompt=str(golden["negative_prompt"]),
                             sigma_schedule="diffusers", solver="unipc")


def _check(pipe, golden):
  result = pipe.generate([str(p) for p in golden["prompts"]], _request(pipe, golden),
                         progress=False, noise=golden["noise"])
  want = golden["latents"]
  err = np.abs(result.latents - want).max() / np.abs(want).max()
  assert err < 1e-4, err
  decoded = np.asarray(pipe.decode(result.latents))  # [B, 3, F, H, W]
  np.testing.assert_allclose(decoded, golden["video"], atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_release_folder_matches_diffusers_pipeline(golden, layout):
  root = GOLDENS / layout
  assert folder_kind(root) == layout
  pipe = load_pipeline(root, dtype="fp32")
  assert pipe.default_shift == (3.0 if layout == "diffusers" else 5.0)
  assert pipe.defaults.sigma_schedule == ("diffusers" if layout == "diffusers" else "wan")
  _check(pipe, golden)


def test_converted_folder_matches_diffusers_pipeline(golden, tmp_path):
  out = convert(GOLDENS / "diffusers", tmp_path / "converted", dtype="fp32")
  assert folder_kind(out) == "converted"
  pipe = load_wan_pipeline(out, dtype=jnp.float32)
  assert pipe.default_shift == 3.0
  _check(pipe, golden)


def test_generate_cli_on_a_release_folder(tmp_path):
  out = tmp_path / "fox.mp4"
  proc = subprocess.run(
      [sys.executable, "-m", "astraea_jax.generate", "--model", str(GOLDENS / "original"),
       "--prompt", "a red fox", "--size", "48x32", "--frames", "9", "--steps", "3", "--budget",
       "0.5", "--quiet", "--no-gif", "--out", str(out)],
      capture_output=True, text=True, cwd=ROOT, timeout=600,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr
  assert video.read_video(out).shape == (9, 32, 48, 3)
  assert "converting" in proc.stderr


def test_bad_folders(tmp_path):
  with pytest.raises(ModelLoadError, match="not a Wan2.1 text-to-video folder"):
    folder_kind(tmp_path)
  broken = tmp_path / "broken"
  shutil.copytree(GOLDENS / "diffusers", broken)
  weights = broken / "transformer" / "diffusion_pytorch_model.safetensors"
  weights.write_bytes(weights.read_bytes()[:1000])
  with pytest.raises(CheckpointError):
    load_pipeline(broken)
  with pytest.raises(CheckpointError):
    convert(broken, tmp_path / "out")
  assert not (tmp_path / "out").exists()
  with pytest.raises(ModelLoadError, match="unconverted"):
    load_wan_pipeline(GOLDENS / "diffusers")
