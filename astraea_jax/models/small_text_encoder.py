"""The project's small text-to-video model: a tiny text encoder and a pixel-space Wan2.1 preset.

No real weights can be downloaded where this project is developed and tested, so it trains a model
of its own (`python -m astraea_jax.train`) on procedural captioned clips (`astraea_jax.data`): the
same `WanTransformer3DModel` code as Wan2.1 (arXiv 2503.20314), here in pixel space (3 channels, 8x8
patches: 17 frames of 64x64 are 1088 tokens), conditioned by

  SmallTextEncoder  word ids [B, M] -> [B, M, text_dim]: token + learned position embeddings, pre-LN
                    Transformer encoder layers with a key padding mask, a final LayerNorm, and zeros
                    at the padding (as Wan's umT5 embeddings, `UMT5Encoder.embed`),

trained jointly with the transformer. Tokens come from `astraea_jax.models.word_tokenizer`.

`SmallVideoModel` bundles both; `save_small_model` / `load_small_model` write and read its inference
checkpoint (the `astraea_jax.checkpoint` format, family "small_t2v", with the tokenizer's JSON
beside it), and `encode_prompts` is the text conditioning a `WanPipeline` needs. A model whose
transformer predicts the clean clip (`config.prediction == "x0"`) needs `output_to_velocity` on the
transformer's output before a flow-matching sampler step.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from astraea_jax import checkpoint
from astraea_jax.models.prediction import PREDICTIONS, output_to_velocity
from astraea_jax.models.wan import WanConfig, WanTransformer3DModel, layer_norm
from astraea_jax.models.word_tokenizer import WordTokenizer

__all__ = [
    "FAMILY",
    "PREDICTIONS",
    "SMALL_VIDEO_PRESETS",
    "SmallTextEncoder",
    "SmallTextEncoderConfig",
    "SmallVideoConfig",
    "SmallVideoModel",
    "encode_prompts",
    "load_small_model",
    "output_to_velocity",
    "save_small_model",
]

F32 = jnp.float32
FAMILY = "small_t2v"
TOKENIZER_FILE = "tokenizer.json"


@dataclasses.dataclass(frozen=True)
class SmallTextEncoderConfig:
  """Architecture of the small text encoder.

  Attributes:
    vocab_size: token table size (the word tokenizer's `vocab_size`).
    max_length: longest token sequence M (learned positions).
    dim: width C, which is the transformer's `text_dim`.
    num_heads, ffn_dim, num_layers: H, F and L of the encoder layers.
    param_dtype, dtype: storage and compute dtypes.
  """
  vocab_size: int = 64
  max_length: int = 24
  dim: int = 128
  num_heads: int = 4
  ffn_dim: int = 512
  num_layers: int = 2
  eps: float = 1e-6
  param_dtype: str = "float32"
  dtype: str = "float32"

  def __post_init__(self):
    set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen dataclass)
    set_("param_dtype", jnp.dtype(self.param_dtype).name)
    set_("dtype", jnp.dtype(self.dtype).name)
    for name in ("vocab_size", "max_length", "dim", "num_heads", "ffn_dim", "num_layers"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"{name}={getattr(self, name)} must be positive")
    if self.vocab_size < 4:
      raise ValueError(f"vocab_size={self.vocab_size} must cover <pad>, </s>, <unk> and a word")
    if self.dim % self.num_heads:
      raise ValueError(f"num_heads={self.num_heads} must divide dim={self.dim}")


class _EncoderLayer(nnx.Module):
  """Pre-LN Transformer encoder layer: x + attn(ln(x)), then x + mlp(ln(x))."""

  def __init__(self, config: SmallTextEncoderConfig, *, rngs: nnx.Rngs):
    c, cd, pd = config.dim, config.dtype, config.param_dtype
    self.heads = config.num_heads
    self.eps = config.eps
    self.norm1_scale = nnx.Param(jnp.ones((c,), F32))
    self.norm2_scale = nnx.Param(jnp.ones((c,), F32))
    self.qkv = nnx.Linear(c, 3 * c, dtype=cd, param_dtype=pd, rngs=rngs)
    self.out = nnx.Linear(c, c, dtype=cd, param_dtype=pd, rngs=rngs)
    self.fc1 = nnx.Linear(c, config.ffn_dim, dtype=cd, param_dtype=pd, rngs=rngs)
    self.fc2 = nnx.Linear(config.ffn_dim, c, dtype=cd, param_dtype=pd, rngs=rngs)

  def __call__(self, x: jax.Array, key_mask: jax.Array) -> jax.Array:
    b, m, c = x.shape
    h = (layer_norm(x, self.eps) * self.norm1_scale[...]).astype(x.dtype)
    q, k, v = jnp.split(self.qkv(h).reshape(b, m, 3 * self.heads, c // self.heads), 3, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q.astype(F32), k.astype(F32))  # [B, H, M, M]
    scores = scores / math.sqrt(c // self.heads)
    # Padding is hidden from every query; a row of only padding still sees its </s> (key 0 is real).
    scores = jnp.where(key_mask[:, None, None, :], scores, jnp.finfo(F32).min)
    attn = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v.astype(F32))
    x = x + self.out(attn.reshape(b, m, c).astype(x.dtype))
    h = (layer_norm(x, self.eps) * self.norm2_scale[...]).astype(x.dtype)
    return x + self.fc2(jax.nn.gelu(self.fc1(h), approximate=True))


class SmallTextEncoder(nnx.Module):
  """Word ids `[B, M]` and mask -> `[B, M, dim]`, zero at positions past each prompt's length."""

  def __init__(self, config: SmallTextEncoderConfig, *, rngs: nnx.Rngs):
    self.config = config
    c, pd = config.dim, config.param_dtype
    self.token_embedding = nnx.Embed(config.vocab_size, c, param_dtype=pd,
                                     embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
    self.position_embedding = nnx.Param(
        0.02 * jax.random.normal(rngs.params(), (config.max_length, c), pd))
    self.layers = nnx.List([_EncoderLayer(config, rngs=rngs) for _ in range(config.num_layers)])
    self.norm_scale = nnx.Param(jnp.ones((c,), F32))
    self.norm_bias = nnx.Param(jnp.zeros((c,), F32))

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """input_ids, attention_mask: `[B, M]` (mask nonzero for real tokens, right padded).

    Returns:
      `[B, M, dim]` in the compute dtype, zero at every position `>= sum(mask)`.
    """
    cfg = self.config
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be [B, M], got shape {tuple(input_ids.shape)}")
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
      raise TypeError(f"input_ids must be integer token ids, got {input_ids.dtype}")
    if attention_mask.shape != input_ids.shape:
      raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                       f"{tuple(input_ids.shape)}")
    m = input_ids.shape[1]
    if m > cfg.max_length:
      raise ValueError(f"{m} tokens exceed the encoder's max_length={cfg.max_length}")
    lengths = jnp.sum((attention_mask != 0).astype(jnp.int32), axis=-1)  # [B]
    keep = jnp.arange(m, dtype=jnp.int32)[None, :] < lengths[:, None]  # [B, M]
    x = self.token_embedding(input_ids) + self.position_embedding[:m][None]  # [B, M, C]
    x = x.astype(cfg.dtype)
    key_mask = keep | (jnp.arange(m)[None, :] == 0)  # an empty prompt still attends to slot 0
    for layer in self.layers:
      x = layer(x, key_mask)
    x = (layer_norm(x, cfg.eps) * self.norm_scale[...] + self.norm_bias[...]).astype(cfg.dtype)
    return jnp.where(keep[..., None], x, jnp.zeros((), x.dtype))


# ----------------------------------------------------------------------------------------------
# The bundle: text encoder + Wan transformer


@dataclasses.dataclass(frozen=True)
class SmallVideoConfig:
  """The small text-to-video model: its two parts and the clip size it is trained at.

  `wan.text_dim` must equal `text.dim`; `wan.in_channels = out_channels = 3` (pixel space).

  `prediction` is what the transformer outputs: "velocity" (`noise - x0`, Wan's flow prediction)
  or "x0" (the clean clip; `output_to_velocity` turns it into `(x_t - x0) / sigma`). Predicting the
  clean clip suits pixel-space models whose patches (8 x 8 x 3 = 192 values) are not much narrower
  than the hidden size: the network need not carry the noise through (Li & He, "Back to Basics:
  Let Denoising Generative Models Denoise", 2025).
  """
  wan: WanConfig
  text: SmallTextEncoderConfig
  frames: int = 17
  height: int = 64
  width: int = 64
  prediction: str = "velocity"

  def __post_init__(self):
    if self.wan.text_dim != self.text.dim:
      raise ValueError(f"wan.text_dim={self.wan.text_dim} must equal text.dim={self.text.dim}")
    if self.wan.in_channels != 3 or self.wan.out_channels != 3:
      raise ValueError(f"a pixel-space model needs in/out_channels=3, got "
                       f"{self.wan.in_channels}/{self.wan.out_channels}")
    if self.prediction not in PREDICTIONS:
      raise ValueError(f"prediction={self.prediction!r} must be one of {PREDICTIONS}")
    token_frames = self.frames // self.wan.patch_size[0]
    if 0 < self.wan.num_frame_embeddings < token_frames:
      raise ValueError(f"wan.num_frame_embeddings={self.wan.num_frame_embeddings} must cover the "
                       f"{token_frames} token frames of {self.frames=}")
    pt, py, px = self.wan.patch_size
    if self.frames % pt or self.height % py or self.width % px:
      raise ValueError(f"clip {self.frames}x{self.height}x{self.width} does not split into "
                       f"patches {self.wan.patch_size}")

  @property
  def num_tokens(self) -> int:
    pt, py, px = self.wan.patch_size
    return (self.frames // pt) * (self.height // py) * (self.width // px)

  def replace(self, *, wan: dict[str, Any] | None = None, text: dict[str, Any] | None = None,
              **fields: Any) -> SmallVideoConfig:
    """A copy with overridden fields; `wan=` / `text=` override fields of the parts."""
    return dataclasses.replace(
        self, wan=dataclasses.replace(self.wan, **(wan or {})),
        text=dataclasses.replace(self.text, **(text or {})), **fields)

  def to_dict(self) -> dict[str, Any]:
    return {"wan": self.wan.to_dict(), "text": dataclasses.asdict(self.text),
            "frames": self.frames, "height": self.height, "width": self.width,
            "prediction": self.prediction}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> SmallVideoConfig:
    try:
      return cls(wan=WanConfig.from_dict(dict(d["wan"])),
                 text=SmallTextEncoderConfig(**d["text"]),
                 **{k: int(d[k]) for k in ("frames", "height", "width")},
                 prediction=str(d.get("prediction", "velocity")))
    except (KeyError, TypeError) as e:
      raise ValueError(f"not a SmallVideoConfig dict: {e}") from None

  @classmethod
  def preset(cls, name: str) -> SmallVideoConfig:
    try:
      return SMALL_VIDEO_PRESETS[name]
    except KeyError:
      raise ValueError(f"unknown small model preset {name!r}; choose from "
                       f"{sorted(SMALL_VIDEO_PRESETS)}") from None


def _vocab_size() -> int:
  return WordTokenizer.for_captions().vocab_size


SMALL_VIDEO_PRESETS: dict[str, SmallVideoConfig] = {
    # Tests: 5 frames of 32x32 (320 tokens of 4x4 pixels), toy widths, fp32. The width (64) exceeds
    # a patch's 48 values, which a velocity-predicting pixel model needs to carry its input through.
    "tiny": SmallVideoConfig(
        wan=WanConfig(patch_size=(1, 4, 4), num_attention_heads=2, attention_head_dim=32,
                      in_channels=3, out_channels=3, text_dim=32, freq_dim=32, ffn_dim=128,
                      num_layers=2, param_dtype="float32", dtype="float32",
                      num_frame_embeddings=5),
        text=SmallTextEncoderConfig(vocab_size=_vocab_size(), dim=32, num_heads=2, ffn_dim=64,
                                    num_layers=1),
        frames=5, height=32, width=32),
    # The embedded default: 17 x 64 x 64 pixels -> 17 x 8 x 8 = 1088 tokens, dim 320 (5 heads of
    # 64), 8 layers, FFN 1024; 12.9M transformer + 0.4M text parameters, 27 MB stored. Trained with
    # bf16 compute on fp32 master weights; CPU inference runs in fp32. Absolute frame embeddings
    # (see `WanConfig`) mark where a clip starts.
    "small": SmallVideoConfig(
        wan=WanConfig(patch_size=(1, 8, 8), num_attention_heads=5, attention_head_dim=64,
                      in_channels=3, out_channels=3, text_dim=128, freq_dim=256, ffn_dim=1024,
                      num_layers=8, param_dtype="float32", dtype="bfloat16",
                      num_frame_embeddings=17),
        text=SmallTextEncoderConfig(vocab_size=_vocab_size(), dim=128, num_heads=4, ffn_dim=512,
                                    num_layers=2),
        frames=17, height=64, width=64, prediction="x0"),
}


class SmallVideoModel(nnx.Module):
  """Text encoder + pixel-space Wan transformer, trained together.

  `__call__(videos [B, 3, T, Y, X], timestep [B], input_ids [B, M], attention_mask [B, M])` returns
  the flow-matching velocity `[B, 3, T, Y, X]` (fp32), with Wan's conventions: the input is
  `(1 - sigma) x0 + sigma noise`, the timestep is `1000 sigma`, the target is `noise - x0`.
  """

  def __init__(self, config: SmallVideoConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.text_encoder = SmallTextEncoder(config.text, rngs=rngs)
    self.transformer = WanTransformer3DModel(config.wan, rngs=rngs)

  def zero_init_outputs(self) -> None:
    """Zeroes the output projection and the timestep modulation projection.

    The DiT recipe for training from scratch (adaLN-Zero, Peebles & Xie 2023): the transformer's
    output starts at zero and its blocks' modulation starts from the learned tables alone.
    """
    t = self.transformer
    for lin in (t.proj_out, t.condition_embedder.time_proj):
      lin.kernel[...] = jnp.zeros_like(lin.kernel[...])
      lin.bias[...] = jnp.zeros_like(lin.bias[...])

  def encode_text(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    return self.text_encoder(input_ids, attention_mask)  # [B, M, text_dim]

  def __call__(self, videos: jax.Array, timestep: jax.Array, input_ids: jax.Array,
               attention_mask: jax.Array) -> jax.Array:
    """The flow-matching velocity `[B, 3, T, Y, X]` fp32, whatever the transformer predicts."""
    out = self.transformer(videos, timestep, self.encode_text(input_ids, attention_mask))
    return output_to_velocity(out, videos, timestep, self.config.prediction)


def encode_prompts(model: SmallVideoModel, tokenizer: WordTokenizer,
                   prompts: str | Sequence[str]) -> jax.Array:
  """Prompts -> text conditioning `[B, M, text_dim]` (zero past each prompt's length), jitted."""
  ids, mask = tokenizer(prompts, max_length=model.config.text.max_length)
  graphdef, state = nnx.split(model.text_encoder)
  return _encode_jit(graphdef, state, jnp.asarray(ids), jnp.asarray(mask))


@functools.partial(jax.jit, static_argnums=0)
def _encode_jit(graphdef: nnx.GraphDef, state: nnx.State, ids: jax.Array,
                mask: jax.Array) -> jax.Array:
  return nnx.merge(graphdef, state)(ids, mask)


# ----------------------------------------------------------------------------------------------
# Inference checkpoints


def save_small_model(out_dir: str | os.PathLike, model: SmallVideoModel | nnx.State | dict,
                     config: SmallVideoConfig, tokenizer: WordTokenizer, *,
                     storage: str = "bfloat16", extra: dict[str, Any] | None = None) -> Path:
  """Writes an inference checkpoint: parameters (large matrices in `storage` dtype), config and the
  tokenizer JSON. `model` is the module, or its parameter state (e.g. the EMA parameters)."""
  if storage not in ("bfloat16", "float32"):
    raise ValueError(f"{storage=} must be 'bfloat16' or 'float32'")
  state = nnx.state(model, nnx.Param) if isinstance(model, nnx.Module) else model
  pure = nnx.to_pure_dict(state) if isinstance(state, nnx.State) else state
  # Each leaf is stored in the dtype a model built with `param_dtype=storage` gives it: the large
  # matrices in `storage`, while the time embedding, modulation tables and norm scales stay fp32.
  storage_config = config.replace(wan={"param_dtype": storage}, text={"param_dtype": storage})
  target = nnx.to_pure_dict(nnx.state(
      nnx.eval_shape(lambda: SmallVideoModel(storage_config, rngs=nnx.Rngs(0))), nnx.Param))
  try:
    host = jax.tree.map(lambda x, t: np.asarray(jax.device_get(x)).astype(t.dtype), pure, target)
  except ValueError as e:
    raise ValueError(f"the parameters do not match the config: {e}") from None
  out = Path(out_dir)
  if (out / checkpoint.PARAMS_DIR).exists():
    raise FileExistsError(f"{str(out)!r} already holds a checkpoint")
  checkpoint.save_params(out, host, family=FAMILY, config=config.to_dict(),
                         extra={"storage": storage, **(extra or {})})
  tokenizer.save(out / TOKENIZER_FILE)
  return out


def load_small_model(path: str | os.PathLike, *, dtype: str = "float32",
                     param_dtype: str = "float32") -> tuple[SmallVideoModel, WordTokenizer]:
  """Reads a `save_small_model` checkpoint: `(model, tokenizer)`.

  `dtype` / `param_dtype` set the compute and parameter dtypes of both parts (fp32 suits CPUs).
  """
  meta = checkpoint.read_metadata(path)
  if meta.get("family") != FAMILY:
    raise ValueError(f"{path}: checkpoint of family {meta.get('family')!r}, not {FAMILY!r}")
  config = SmallVideoConfig.from_dict(meta["config"]).replace(
      wan={"dtype": dtype, "param_dtype": param_dtype},
      text={"dtype": dtype, "param_dtype": param_dtype})
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: SmallVideoModel(config,
                                                                        rngs=nnx.Rngs(0))))
  state = checkpoint.load_params(path, abstract, family=FAMILY)
  tokenizer = WordTokenizer.load(Path(path) / TOKENIZER_FILE)
  if tokenizer.vocab_size != config.text.vocab_size:
    raise ValueError(f"{path}: tokenizer has {tokenizer.vocab_size} tokens, the text encoder "
                     f"{config.text.vocab_size}")
  return nnx.merge(graphdef, state), tokenizer
