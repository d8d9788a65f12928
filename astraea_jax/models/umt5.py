"""The umT5-xxl text encoder of Wan2.1, in Flax NNX.

Ports the encoder half of umT5 (Chung et al., "UniMax", ICLR 2023) as used by Wan2.1: transformers'
`UMT5EncoderModel` (diffusers' `text_encoder/`) and Wan's own `T5Encoder` (wan/modules/t5.py in
Wan-Video/Wan2.1, checkpoint `models_t5_umt5-xxl-enc-bf16.pth`) compute the same function:

  x = embed(ids)                                        # [B, M, C]
  for each of L blocks:
    x = x + o(attention(rms(x), bias=rel_bias_l, mask))  # T5 attention: no 1/sqrt(D) scaling
    x = x + fc2(gelu_tanh(gate(rms(x))) * fc1(rms(x)))   # gated GELU
  out = rms(x)

T5's RMSNorm has a weight and no bias or mean subtraction; every block owns its relative-position
bias (umT5 does not share it across layers, unlike T5 v1.1), bucketed bidirectionally. Attribute
names follow Wan's `T5Encoder`, so its checkpoint converts by layout rules alone and transformers'
by a short rename table (checkpoints_convert/umt5.py).

`encode_prompts` reproduces diffusers' `WanPipeline._get_t5_prompt_embeds`: tokenize to a fixed
length (512 in Wan), run the encoder with the attention mask, and zero every position past each
prompt's length.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from astraea_jax import checkpoint

__all__ = [
    "PRESETS",
    "UMT5Config",
    "UMT5Encoder",
    "encode_ids",
    "encode_prompts",
    "from_params",
    "load_encoder",
    "relative_position_buckets",
]


@dataclasses.dataclass(frozen=True)
class UMT5Config:
  """Architecture of a umT5 encoder; field names follow transformers' `UMT5Config`."""

  vocab_size: int = 256384
  d_model: int = 4096  # C
  d_kv: int = 64  # D
  num_heads: int = 64  # H
  d_ff: int = 10240  # F
  num_layers: int = 24  # L
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "gated-gelu"
  pad_token_id: int = 0
  eos_token_id: int = 1
  # T5 / T5 v1.1 / mT5: only the first block owns a relative-position bias, and every block adds
  # that one bias (transformers' `has_relative_attention_bias=bool(i == 0)`). umT5: False.
  shared_relative_bias: bool = False

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "d_kv", "num_heads", "d_ff", "num_layers"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)} must be positive")
    if self.relative_attention_num_buckets < 4 or self.relative_attention_num_buckets % 4:
      # Bidirectional bucketing halves the buckets, then half of those are exact offsets.
      raise ValueError(f"{self.relative_attention_num_buckets=} must be a positive multiple of 4")
    if self.relative_attention_max_distance <= self.relative_attention_num_buckets // 4:
      raise ValueError(
          f"{self.relative_attention_max_distance=} must exceed "
          f"relative_attention_num_buckets // 4 = {self.relative_attention_num_buckets // 4}")
    if self.feed_forward_proj != "gated-gelu":
      raise ValueError(f"{self.feed_forward_proj=} is not supported: umT5 uses 'gated-gelu'")
    if not self.layer_norm_epsilon > 0:
      raise ValueError(f"{self.layer_norm_epsilon=} must be positive")

  @property
  def inner_dim(self) -> int:
    return self.num_heads * self.d_kv

  @classmethod
  def from_hf_config(cls, config: Mapping[str, Any]) -> UMT5Config:
    """Builds the config from a transformers `config.json` (a `UMT5Config` or `T5Config` dict)."""
    if config.get("model_type") not in (None, "umt5", "t5", "mt5"):
      raise ValueError(f"expected a umT5 config.json, got model_type={config.get('model_type')!r}")
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {k: config[k] for k in names if config.get(k) is not None}
    # transformers' T5 and mT5 share the first layer's position bias; umT5 has one per layer.
    kwargs.setdefault("shared_relative_bias", config.get("model_type") in ("t5", "mt5"))
    return cls(**kwargs)

  @classmethod
  def preset(cls, name: str) -> UMT5Config:
    try:
      return PRESETS[name]
    except KeyError:
      raise ValueError(f"unknown umT5 preset {name!r}; choose from {sorted(PRESETS)}") from None


PRESETS: dict[str, UMT5Config] = {
    # google/umt5-xxl's encoder as Wan2.1 ships it (Wan's `umt5_xxl`, diffusers' text_encoder/).
    "umt5-xxl": UMT5Config(),
    # The configuration of the parity goldens (tests/goldens/make_umt5_goldens.py).
    "tiny": UMT5Config(vocab_size=128, d_model=40, d_kv=8, num_heads=4, d_ff=48, num_layers=2,
                       relative_attention_num_buckets=8, relative_attention_max_distance=16),
}


@functools.lru_cache(maxsize=16)
def relative_position_buckets(q_len: int, k_len: int, num_buckets: int,
                              max_distance: int) -> np.ndarray:
  """Bidirectional T5 bucket of every (query, key) pair: `[M_q, M_k]` int32 in `[0, num_buckets)`.

  Keys after the query use the upper half of the buckets. Within a half, offsets below a quarter of
  the buckets are exact and larger ones are log-spaced up to `max_distance`, beyond which they share
  the last bucket. The log is taken in float32 like the PyTorch references, so that rounding at
  bucket edges agrees with them.
  """
  keys = np.arange(k_len, dtype=np.int64)[None, :]
  queries = np.arange(q_len, dtype=np.int64)[:, None]
  rel = keys - queries  # [M_q, M_k]
  half = num_buckets // 2
  max_exact = half // 2
  offset = np.where(rel > 0, half, 0)
  dist = np.abs(rel)
  # Distance 0 would take log(0); it is an exact bucket anyway, so any positive stand-in does.
  safe = np.maximum(dist, 1).astype(np.float32)
  log_ratio = (np.log(safe / np.float32(max_exact)) /
               np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact))
  large = np.minimum(max_exact + log_ratio.astype(np.int64), half - 1)
  buckets = offset + np.where(dist < max_exact, dist, large)
  buckets = buckets.astype(np.int32)
  buckets.setflags(write=False)
  return buckets


class T5LayerNorm(nnx.Module):
  """T5's RMSNorm: `weight * x / sqrt(mean(x^2) + eps)`, statistics in fp32, no bias."""

  def __init__(self, dim: int, *, eps: float, dtype, param_dtype, rngs: nnx.Rngs):
    del rngs
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = (x32 * jax.lax.rsqrt(var + jnp.float32(self.eps))).astype(self.dtype)
    return y * self.weight[...].astype(self.dtype)


class RelativePositionBias(nnx.Module):
  """A block's learned bias per head and relative-position bucket (`embedding [buckets, H]`)."""

  def __init__(self, config: UMT5Config, *, param_dtype, rngs: nnx.Rngs):
    shape = (config.relative_attention_num_buckets, config.num_heads)
    self.embedding = nnx.Param(nnx.initializers.normal(1.0)(rngs.params(), shape, param_dtype))
    self.num_buckets = config.relative_attention_num_buckets
    self.max_distance = config.relative_attention_max_distance

  def __call__(self, q_len: int, k_len: int) -> jax.Array:
    buckets = relative_position_buckets(q_len, k_len, self.num_buckets, self.max_distance)  # [M, M]
    bias = jnp.take(self.embedding[...].astype(jnp.float32), jnp.asarray(buckets),
                    axis=0)  # [M, M, H]
    return jnp.transpose(bias, (2, 0, 1))  # [H, M, M]


class T5Attention(nnx.Module):
  """Self-attention with an additive position bias and a key mask; T5 does not scale scores."""

  def __init__(self, config: UMT5Config, *, dtype, param_dtype, rngs: nnx.Rngs):
    linear = functools.partial(nnx.Linear, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                               rngs=rngs)
    self.q = linear(config.d_model, config.inner_dim)
    self.k = linear(config.d_model, config.inner_dim)
    self.v = linear(config.d_model, config.inner_dim)
    self.o = linear(config.inner_dim, config.d_model)
    self.num_heads = config.num_heads
    self.head_dim = config.d_kv

  def __call__(self, x: jax.Array, bias: jax.Array, key_mask: jax.Array | None) -> jax.Array:
    b, m, _ = x.shape
    q = self.q(x).reshape(b, m, self.num_heads, self.head_dim)  # [B, M, H, D]
    k = self.k(x).reshape(b, m, self.num_heads, self.head_dim)  # [B, M, H, D]
    v = self.v(x).reshape(b, m, self.num_heads, self.head_dim)  # [B, M, H, D]
    # fp32 scores and softmax: the unscaled logits of T5 are large, and Wan's reference does the
    # same.
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)  # [B, H, M, M]
    scores = scores + bias[None]
    if key_mask is not None:
      scores = jnp.where(key_mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)  # [B, M, H, D]
    return self.o(out.reshape(b, m, self.num_heads * self.head_dim))


class T5FeedForward(nnx.Module):
  """Gated GELU: `fc2(gelu_tanh(gate(x)) * fc1(x))` (transformers' wi_0, wi_1, wo)."""

  def __init__(self, config: UMT5Config, *, dtype, param_dtype, rngs: nnx.Rngs):
    linear = functools.partial(nnx.Linear, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                               rngs=rngs)
    self.gate = linear(config.d_model, config.d_ff)
    self.fc1 = linear(config.d_model, config.d_ff)
    self.fc2 = linear(config.d_ff, config.d_model)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = jax.nn.gelu(self.gate(x), approximate=True) * self.fc1(x)  # [B, M, F]
    return self.fc2(h)


class T5Block(nnx.Module):
  """Pre-norm self-attention and feed-forward residual layers with the block's own position bias
  (`has_relative_bias=False`: none; the caller passes the shared bias)."""

  def __init__(self, config: UMT5Config, *, dtype, param_dtype, rngs: nnx.Rngs,
               has_relative_bias: bool = True):
    norm = functools.partial(T5LayerNorm, config.d_model, eps=config.layer_norm_epsilon,
                             dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm1 = norm()
    self.attn = T5Attention(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm2 = norm()
    self.ffn = T5FeedForward(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.pos_embedding = (RelativePositionBias(config, param_dtype=param_dtype, rngs=rngs)
                          if has_relative_bias else None)

  def __call__(self, x: jax.Array, key_mask: jax.Array | None,
               bias: jax.Array | None = None) -> jax.Array:
    m = x.shape[1]
    if bias is None:
      if self.pos_embedding is None:
        raise ValueError("this block has no relative-position bias of its own: pass `bias`")
      bias = self.pos_embedding(m, m)
    x = x + self.attn(self.norm1(x), bias, key_mask)
    return x + self.ffn(self.norm2(x))


class UMT5Encoder(nnx.Module):
  """umT5 encoder stack: token embedding, L blocks, final RMSNorm.

  Args:
    config: the architecture.
    dtype: compute dtype of activations and matmuls (norm statistics and softmax are always fp32).
    param_dtype: storage dtype of the parameters.
    rngs: initialisation randomness (weights are random until a converted checkpoint is loaded).
  """

  def __init__(self, config: UMT5Config, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.config = config
    self.dtype = dtype
    self.token_embedding = nnx.Embed(config.vocab_size, config.d_model, dtype=dtype,
                                     param_dtype=param_dtype,
                                     embedding_init=nnx.initializers.normal(1.0), rngs=rngs)
    self.blocks = nnx.List([
        T5Block(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                has_relative_bias=not config.shared_relative_bias or i == 0)
        for i in range(config.num_layers)
    ])
    self.norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon, dtype=dtype,
                            param_dtype=param_dtype, rngs=rngs)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """The last hidden state, like transformers' `UMT5EncoderModel(...).last_hidden_state`.

    Args:
      input_ids: `[B, M]` integer token ids.
      attention_mask: `[B, M]`, nonzero for real tokens; masked tokens are hidden from every query
        as keys. None attends to all tokens.

    Returns:
      `[B, M, C]` in the compute dtype (masked positions hold values too; see `embed`).
    """
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be [B, M], got shape {input_ids.shape}")
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
      raise TypeError(f"input_ids must be integer token ids, got {input_ids.dtype}")
    key_mask = None
    if attention_mask is not None:
      if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {attention_mask.shape} != input_ids shape {input_ids.shape}")
      key_mask = attention_mask != 0  # [B, M]
    x = self.token_embedding(input_ids)  # [B, M, C]
    shared = None
    if self.config.shared_relative_bias:
      m = input_ids.shape[1]
      shared = self.blocks[0].pos_embedding(m, m)  # [H, M, M], added by every block
    for block in self.blocks:
      x = block(x, key_mask, shared)
    return self.norm(x)

  def embed(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Wan's text embeddings: the masked encoder output, zero at positions `>= sum(mask)`.

    As in `WanPipeline._get_t5_prompt_embeds`, each prompt keeps its first `sum(mask)` positions, so
    a right-padded mask zeroes exactly the padding.

    Returns:
      `[B, M, C]` in the compute dtype.
    """
    hidden = self(input_ids, attention_mask)  # [B, M, C]
    lengths = jnp.sum((attention_mask != 0).astype(jnp.int32), axis=-1)  # [B]
    keep = jnp.arange(input_ids.shape[1], dtype=jnp.int32)[None, :] < lengths[:, None]  # [B, M]
    return jnp.where(keep[..., None], hidden, jnp.zeros((), hidden.dtype))


@functools.partial(jax.jit, static_argnums=0)
def _embed_jit(graphdef: nnx.GraphDef, state: nnx.State, input_ids: jax.Array,
               attention_mask: jax.Array) -> jax.Array:
  # A pure jit over (graphdef, state): `nnx.jit` would also return the unchanged parameters, which
  # XLA then copies, doubling the 11 GB of umT5-xxl weights on the device.
  return nnx.merge(graphdef, state).embed(input_ids, attention_mask)


def encode_ids(model: UMT5Encoder, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """Jitted `model.embed`: `[B, M]` ids and mask -> `[B, M, C]`, zero past each length."""
  graphdef, state = nnx.split(model)
  return _embed_jit(graphdef, state, jnp.asarray(input_ids, jnp.int32),
                    jnp.asarray(attention_mask, jnp.int32))


def encode_prompts(model: UMT5Encoder, tokenizer, prompts: str | Sequence[str], *,
                   max_length: int = 512) -> jax.Array:
  """Prompts -> Wan text conditioning `[B, max_length, C]` (diffusers' `_get_t5_prompt_embeds`).

  Args:
    model: the encoder.
    tokenizer: an `astraea_jax.models.tokenizer.UMT5Tokenizer` (or anything with its call signature,
      returning `(ids, mask)` arrays of shape `[B, max_length]`).
    prompts: one prompt or a list of them; each is cleaned as Wan does (HTML entities, whitespace).
    max_length: text length; Wan2.1 uses 512. Longer prompts are truncated, keeping the `</s>`.

  Returns:
    `[B, max_length, C]` in the model's compute dtype, zero past each prompt's last token.
  """
  ids, mask = tokenizer(prompts, max_length=max_length)
  return encode_ids(model, ids, mask)


def from_params(config: UMT5Config, params: Mapping[str, Any], *, dtype=jnp.float32) -> UMT5Encoder:
  """Builds an encoder around converted params (the pure dict of `nnx.state(model, nnx.Param)`).

  Nothing is randomly initialised; parameters keep the dtype they were converted to and compute runs
  in `dtype`.
  """
  return checkpoint.module_from_params(
      lambda: UMT5Encoder(config, dtype=dtype, rngs=nnx.Rngs(0)), params,
      what="umT5 encoder")


def load_encoder(path: str | os.PathLike, *, dtype=jnp.bfloat16, param_dtype=None,
                 shardings=None) -> UMT5Encoder:
  """Loads an encoder written by `python -m checkpoints_convert umt5` (`astraea_jax.checkpoint`).

  Args:
    path: the converted checkpoint directory.
    dtype: compute dtype.
    param_dtype: dtype the parameters are restored in; defaults to `dtype`.
    shardings: passed to `astraea_jax.checkpoint.load_params` (default: the first local device).
  """
  param_dtype = dtype if param_dtype is None else param_dtype
  return checkpoint.load_module(
      path,
      lambda c: UMT5Encoder(UMT5Config(**c), dtype=dtype, param_dtype=param_dtype,
                            rngs=nnx.Rngs(0)),
      family="umt5", shardings=shardings)
