"""The text-to-video pipeline end to end on a tiny pixel-space Wan model (random weights, CPU)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from astraea_jax import metrics, video
from astraea_jax.acceleration import BudgetSchedule
from astraea_jax.models.wan import WanConfig, WanTransformer3DModel
from astraea_jax.pipeline import GenerationConfig, GenerationError, WanPipeline

CFG = GenerationConfig(height=16, width=24, frames=5, steps=4, guidance=3.0, seed=7,
                       negative_prompt="blurry")


def _encode_text(prompts):
  # A deterministic stand-in encoder: each prompt seeds its own embedding.
  rows = [jax.random.normal(jax.random.key(sum(map(ord, p))), (5, 16), jnp.float32) for p in prompts]
  return jnp.stack(rows)  # [B, M, text_dim]


@pytest.fixture(scope="module")
def pipe():
  config = WanConfig.preset("tiny", in_channels=3, out_channels=3)
  model = WanTransformer3DModel(config, rngs=nnx.Rngs(0))
  return WanPipeline(name="tiny-pixel", transformer=model, encode_text=_encode_text,
                     decode=lambda z: jnp.tanh(z), spatial_stride=1, temporal_stride=1,
                     default_shift=3.0, fps=8, defaults=CFG)


def test_shapes_and_determinism(pipe):
  a = pipe.generate(["a red circle"], CFG, progress=False)
  b = pipe.generate(["a red circle"], CFG, progress=False)
  assert a.frames.shape == (1, 5, 16, 24, 3) and a.frames.dtype == np.uint8
  assert a.latents.shape == (1, 3, 5, 16, 24)
  np.testing.assert_array_equal(a.frames, b.frames)
  c = pipe.generate(["a red circle"], dataclasses.replace(CFG, seed=8), progress=False)
  assert not np.array_equal(a.frames, c.frames)
  assert len(a.denoise_stats.step_seconds) == CFG.steps


def test_batch_of_prompts(pipe):
  both = pipe.generate(["a red circle", "a blue square"], CFG, progress=False)
  # The seed draws the noise of the whole batch at once, so only the first row equals a single run.
  first = pipe.generate(["a red circle"], CFG, progress=False)
  assert both.frames.shape[0] == 2
  np.testing.assert_allclose(both.latents[0], first.latents[0], rtol=1e-4, atol=1e-4)
  assert not np.allclose(both.latents[0], both.latents[1])


def test_full_budget_equals_dense_and_half_budget_differs(pipe):
  dense = pipe.generate(["a red circle"], CFG, progress=False)
  full = pipe.generate(["a red circle"], CFG, schedule=BudgetSchedule.uniform(CFG.steps, 1.0),
                       progress=False)
  half = pipe.generate(["a red circle"], CFG, schedule=BudgetSchedule.uniform(CFG.steps, 0.5),
                       progress=False)
  np.testing.assert_allclose(full.latents, dense.latents, rtol=1e-4, atol=1e-4)
  assert np.abs(half.latents - dense.latents).max() > 1e-3
  assert metrics.psnr(half.frames, dense.frames) < float("inf")


def test_written_video_plays_back(pipe, tmp_path):
  result = pipe.generate(["a red circle"], CFG, progress=False)
  path = video.write_video(tmp_path / "out.mp4", result.frames[0], fps=pipe.fps)
  back = video.read_video(path)
  assert back.shape == result.frames[0].shape


@pytest.mark.parametrize("change, match", [
    (dict(height=15), "multiple of"),
    (dict(frames=0), "frames=0 must be positive"),
    (dict(guidance=float("nan")), "guidance"),
])
def test_bad_requests(pipe, change, match):
  with pytest.raises(GenerationError, match=match):
    pipe.latent_shape(dataclasses.replace(CFG, **change))


def test_schedule_length_must_match(pipe):
  with pytest.raises(GenerationError, match="steps"):
    pipe.generate(["x"], CFG, schedule=BudgetSchedule.uniform(CFG.steps + 1, 0.5), progress=False)
