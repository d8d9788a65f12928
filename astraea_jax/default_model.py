"""The embedded default model of `python -m astraea_jax.generate` (no `--model`).

A small pixel-space model of the Wan2.1 architecture (the same `WanTransformer3DModel` code, 3 channels,
8x8 patches, 17 frames of 64x64), a word-hashing text embedding, and the identity as decoder. It runs the
whole pipeline -- text conditioning, classifier-free guidance, the UniPC solver, ASTRAEA's token
selection and cache, video writing -- on a laptop CPU in seconds.

Its weights are drawn from a fixed seed: until trained weights ship with the package, its videos are
structured noise, useful to exercise and time the pipeline but not to judge quality.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from astraea_jax.models.wan import WanConfig, WanTransformer3DModel
from astraea_jax.pipeline import GenerationConfig, WanPipeline

DEFAULT_PROMPT = "a red circle moving right on a gray background"

CONFIG = WanConfig(patch_size=(1, 8, 8), num_attention_heads=4, attention_head_dim=64, in_channels=3,
                   out_channels=3, text_dim=128, freq_dim=64, ffn_dim=1024, num_layers=4,
                   param_dtype="float32", dtype="float32")
TEXT_LENGTH = 16
_VOCAB_BUCKETS = 4096
_SEED = 0
_WORD = re.compile(r"[a-z0-9]+")


def _bucket(word: str) -> int:
  # A stable hash (Python's hash() is salted per process).
  return int.from_bytes(hashlib.blake2b(word.encode(), digest_size=4).digest(), "little") % _VOCAB_BUCKETS


class HashedWordEmbedding:
  """Prompts -> `[B, TEXT_LENGTH, text_dim]`: one fixed random vector per word, zero padding."""

  def __init__(self, text_dim: int, *, seed: int):
    self.table = jax.random.normal(jax.random.key(seed), (_VOCAB_BUCKETS, text_dim), jnp.float32)

  def __call__(self, prompts: Sequence[str]) -> jax.Array:
    ids, mask = [], []
    for prompt in prompts:
      words = _WORD.findall(prompt.lower())[:TEXT_LENGTH]
      if len(_WORD.findall(prompt.lower())) > TEXT_LENGTH:
        warnings.warn(f"prompt truncated to its first {TEXT_LENGTH} words", stacklevel=2)
      ids.append([_bucket(w) for w in words] + [0] * (TEXT_LENGTH - len(words)))
      mask.append([1.0] * len(words) + [0.0] * (TEXT_LENGTH - len(words)))
    emb = self.table[jnp.asarray(ids, jnp.int32)]  # [B, M, text_dim]
    return emb * jnp.asarray(mask, jnp.float32)[..., None]


def load_default_pipeline() -> WanPipeline:
  """The embedded default pipeline (see the module docstring)."""
  transformer = WanTransformer3DModel(CONFIG, rngs=nnx.Rngs(_SEED))
  pipe = WanPipeline(
      name="default (untrained pixel-space Wan, random weights)", transformer=transformer,
      encode_text=HashedWordEmbedding(CONFIG.text_dim, seed=_SEED + 1),
      decode=jnp.tanh, spatial_stride=1, temporal_stride=1, default_shift=3.0, fps=8,
      defaults=GenerationConfig(height=64, width=64, frames=17, steps=20, guidance=4.0,
                                negative_prompt=""),
      default_prompt=DEFAULT_PROMPT)
  return pipe
