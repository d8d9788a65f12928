"""The embedded default model of `python -m astraea_jax.generate` (no `--model`).

The project's own small text-to-video model (`astraea_jax.models.small_text_encoder`, preset "small"):
a pixel-space Wan2.1 transformer (the same `WanTransformer3DModel` code; 8x8 patches, 17 frames of
64x64 RGB, 1088 tokens; 13.3M parameters with its text encoder) trained with `python -m
astraea_jax.train` on the procedural clips of `astraea_jax.data` ("a red circle moving right on a gray
background"). It predicts the clean clip (x0), which the sampler turns into Wan's flow velocity. Its
weights ship with the package (`astraea_jax/assets/small_t2v/`, bf16 matrices), with the budget
schedules searched for it (`schedules/`, whole steps at budgets 0.4, 0.5 and 0.7), so the whole pipeline
-- text conditioning, classifier-free guidance, the UniPC solver, ASTRAEA's token selection and cache,
video writing -- runs on a laptop CPU in seconds and makes videos whose quality can be judged.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp

from astraea_jax.acceleration.schedule import load_schedules
from astraea_jax.models.small_text_encoder import encode_prompts, load_small_model
from astraea_jax.pipeline import GenerationConfig, WanPipeline

__all__ = ["DEFAULT_PROMPT", "WEIGHTS", "load_default_pipeline"]

DEFAULT_PROMPT = "a red circle moving right on a gray background"
WEIGHTS = Path(__file__).parent / "assets" / "small_t2v"


def _decode(latents: jax.Array) -> jax.Array:
  # Pixel space: the latents are the video in [-1, 1].
  return jnp.clip(latents, -1.0, 1.0)


@functools.cache
def load_default_pipeline(dtype: str = "float32") -> WanPipeline:
  """The embedded default pipeline (see the module docstring); loaded once per process."""
  model, tokenizer = load_small_model(WEIGHTS, dtype=dtype, param_dtype=dtype)
  config = model.config

  def encode_text(prompts: Sequence[str]) -> jax.Array:
    return encode_prompts(model, tokenizer, list(prompts))  # [B, M, text_dim]

  return WanPipeline(
      name="default (the project's small pixel-space Wan, 13M parameters)",
      transformer=model.transformer, encode_text=encode_text, decode=_decode,
      spatial_stride=1, temporal_stride=1, default_shift=3.0, fps=8,
      defaults=GenerationConfig(height=config.height, width=config.width, frames=config.frames,
                                steps=20, guidance=4.0, negative_prompt=""),
      default_prompt=DEFAULT_PROMPT, prediction=config.prediction,
      schedules=load_schedules(WEIGHTS / "schedules"))
