"""The CLIP-L text encoder that HunyuanVideo uses for its pooled text vector, in Flax NNX.

HunyuanVideo (Kong et al., arXiv 2412.03603) conditions its transformer on two text encoders: an
MLLM for the token sequence and CLIP-L (openai/clip-vit-large-patch14's text tower, diffusers'
`text_encoder_2/`) whose `pooler_output` — the final-layer-normed hidden state of the end-of-text
token — is the global text vector added to the timestep embedding. diffusers'
`HunyuanVideoPipeline._get_clip_prompt_embeds` calls transformers' `CLIPTextModel` on 77 tokens
without an attention mask and keeps only `pooler_output`.

This module reproduces transformers' `CLIPTextModel` (models/clip/modeling_clip.py, 5.x):

  x = token_embedding(ids) + position_embedding(arange(S))        # [B, S, C]
  for each of L layers (pre-norm):
    x = x + out_proj(attention(layer_norm1(x), causal & padding mask))
    x = x + fc2(act(fc1(layer_norm2(x))))                           # act: quick_gelu for CLIP-L
  last_hidden_state = final_layer_norm(x)
  pooled = last_hidden_state[b, eos position of row b]

The eos position follows transformers exactly: with the legacy `eos_token_id == 2` (the value in
openai/clip-vit-large-patch14's config and so in HunyuanVideo's `text_encoder_2/config.json`) it is
the argmax of the token ids (the end-of-text id 49407 is the largest in CLIP's vocabulary); for any
other `eos_token_id` it is the first position holding that id (0 if there is none).

Attribute names mirror the transformers checkpoint (`embeddings.token_embedding`,
`encoder.layers[i].self_attn.q_proj`, ...), so checkpoints_convert/clip_text.py converts by layout
rules alone. Layer norms keep fp32 parameters and statistics; attention is a plain fp32 softmax
(S is 77), masked additively with the dtype minimum as transformers' eager attention does.

Dims: B batch, S tokens, H heads, D head dim, C channels, F MLP width.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from astraea_jax import checkpoint

__all__ = [
    "FAMILY",
    "PRESETS",
    "CLIPTextConfig",
    "CLIPTextModel",
    "config_from_hf",
    "encode_ids",
    "from_params",
    "load_encoder",
]

FAMILY = "clip_text"
F32 = jnp.float32
# transformers' `eos_token_id` before PR #24773: pooling then takes the argmax of the ids.
LEGACY_EOS_TOKEN_ID = 2
_ACTIVATIONS = ("quick_gelu", "gelu")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """Architecture of a CLIP text tower; field names follow transformers' `CLIPTextConfig`."""

  vocab_size: int = 49408
  hidden_size: int = 768  # C
  intermediate_size: int = 3072  # F
  num_hidden_layers: int = 12  # L
  num_attention_heads: int = 12  # H
  max_position_embeddings: int = 77  # the most tokens S
  layer_norm_eps: float = 1e-5
  hidden_act: str = "quick_gelu"
  eos_token_id: int = LEGACY_EOS_TOKEN_ID

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "max_position_embeddings"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive int")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"{self.hidden_size=} must be a multiple of {self.num_attention_heads=}")
    if not self.layer_norm_eps > 0:
      raise ValueError(f"{self.layer_norm_eps=} must be positive")
    if self.hidden_act not in _ACTIVATIONS:
      raise ValueError(f"{self.hidden_act=} is not supported; choose from {_ACTIVATIONS}")
    if not isinstance(self.eos_token_id, int) or self.eos_token_id < 0:
      raise ValueError(f"{self.eos_token_id=} must be a non-negative int")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @classmethod
  def preset(cls, name: str) -> CLIPTextConfig:
    try:
      return PRESETS[name]
    except KeyError:
      raise ValueError(
          f"unknown CLIP text preset {name!r}; choose from {sorted(PRESETS)}") from None


PRESETS: dict[str, CLIPTextConfig] = {
    # openai/clip-vit-large-patch14's text tower, HunyuanVideo's text_encoder_2 (legacy eos id 2).
    "clip-vit-large-patch14": CLIPTextConfig(),
    # The configuration of the parity goldens (tests/goldens/make_clip_text_goldens.py).
    "tiny": CLIPTextConfig(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=16,
                           eos_token_id=LEGACY_EOS_TOKEN_ID),
}


def config_from_hf(config: Mapping[str, Any]) -> CLIPTextConfig:
  """Builds the config from a transformers `config.json`: a `CLIPTextConfig` dict, or a full
  `CLIPConfig` dict (its `text_config`). Missing fields take transformers' defaults, as
  `CLIPTextConfig` does (e.g. `eos_token_id` 49407, `hidden_size` 512)."""
  if config.get("model_type") == "clip" or "text_config" in config:
    config = config.get("text_config") or {}
  elif config.get("model_type") not in (None, "clip_text_model"):
    raise ValueError(f"expected a CLIP text config.json, got model_type="
                     f"{config.get('model_type')!r}")
  # transformers' CLIPTextConfig defaults (openai/clip-vit-base-patch32 style).
  defaults = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                  num_attention_heads=8, max_position_embeddings=77, layer_norm_eps=1e-5,
                  hidden_act="quick_gelu", eos_token_id=49407)
  kwargs = {k: config[k] if config.get(k) is not None else v for k, v in defaults.items()}
  if isinstance(kwargs["eos_token_id"], list):
    raise ValueError(f"a list eos_token_id={kwargs['eos_token_id']} is not supported")
  return CLIPTextConfig(**kwargs)


class LayerNorm(nnx.Module):
  """Affine LayerNorm with fp32 `scale` / `bias` and fp32 statistics; returns the input dtype."""

  def __init__(self, dim: int, *, eps: float):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), F32))
    self.bias = nnx.Param(jnp.zeros((dim,), F32))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(F32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + jnp.float32(self.eps))
    return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


def _linear(din: int, dout: int, *, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(din, dout, use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class CLIPAttention(nnx.Module):
  """Multi-head self-attention scaled by `1/sqrt(D)`, with an additive `[B, S, S]` mask."""

  def __init__(self, config: CLIPTextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    c = config.hidden_size
    linear = functools.partial(_linear, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_proj = linear(c, c)
    self.k_proj = linear(c, c)
    self.v_proj = linear(c, c)
    self.out_proj = linear(c, c)
    self.num_heads = config.num_attention_heads
    self.head_dim = config.head_dim

  def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
    b, s, _ = x.shape
    shape = (b, s, self.num_heads, self.head_dim)
    q = self.q_proj(x).reshape(shape)  # [B, S, H, D]
    k = self.k_proj(x).reshape(shape)  # [B, S, H, D]
    v = self.v_proj(x).reshape(shape)  # [B, S, H, D]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=F32)  # [B, H, S, S]
    scores = scores * jnp.float32(self.head_dim**-0.5) + bias[:, None]
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)  # [B, S, H, D]
    return self.out_proj(out.reshape(b, s, self.num_heads * self.head_dim))  # [B, S, C]


class CLIPMLP(nnx.Module):
  """`fc2(act(fc1(x)))`; act is quick_gelu `x * sigmoid(1.702 x)` or exact (erf) GELU."""

  def __init__(self, config: CLIPTextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    linear = functools.partial(_linear, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc1 = linear(config.hidden_size, config.intermediate_size)
    self.fc2 = linear(config.intermediate_size, config.hidden_size)
    self.hidden_act = config.hidden_act

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.fc1(x)  # [B, S, F]
    if self.hidden_act == "quick_gelu":
      h = h * jax.nn.sigmoid(jnp.asarray(1.702, h.dtype) * h)
    else:
      h = jax.nn.gelu(h, approximate=False)
    return self.fc2(h)  # [B, S, C]


class CLIPEncoderLayer(nnx.Module):
  """Pre-norm residual attention and MLP."""

  def __init__(self, config: CLIPTextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.self_attn = CLIPAttention(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.layer_norm1 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
    self.mlp = CLIPMLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.layer_norm2 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

  def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
    x = x + self.self_attn(self.layer_norm1(x), bias)
    return x + self.mlp(self.layer_norm2(x))


class CLIPTextEmbeddings(nnx.Module):
  """Token plus learned absolute position embeddings."""

  def __init__(self, config: CLIPTextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    embed = functools.partial(nnx.Embed, dtype=dtype, param_dtype=param_dtype,
                              embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
    self.token_embedding = embed(config.vocab_size, config.hidden_size)
    self.position_embedding = embed(config.max_position_embeddings, config.hidden_size)

  def __call__(self, input_ids: jax.Array) -> jax.Array:
    s = input_ids.shape[1]
    positions = jnp.arange(s, dtype=jnp.int32)[None]  # [1, S]
    return self.token_embedding(input_ids) + self.position_embedding(positions)  # [B, S, C]


class CLIPEncoder(nnx.Module):

  def __init__(self, config: CLIPTextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.layers = nnx.List([
        CLIPEncoderLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        for _ in range(config.num_hidden_layers)
    ])

  def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
    for layer in self.layers:
      x = layer(x, bias)
    return x


class CLIPTextModel(nnx.Module):
  """transformers' `CLIPTextModel`: embeddings, L causal layers, final LayerNorm, eos pooling.

  Args:
    config: the architecture.
    rngs: initialisation randomness (weights are random until a converted checkpoint is loaded).
    dtype: compute dtype of activations and matmuls (layer norms and softmax are always fp32).
    param_dtype: storage dtype of embeddings and Linear parameters (layer norms are always fp32).
  """

  def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    self.config = config
    self.dtype = dtype
    self.embeddings = CLIPTextEmbeddings(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.encoder = CLIPEncoder(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.final_layer_norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

  def __call__(self, input_ids: jax.Array,
               attention_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """`(last_hidden_state, pooler_output)` as transformers' `CLIPTextModel` returns them.

    Args:
      input_ids: `[B, S]` integer token ids, `S <= max_position_embeddings`.
      attention_mask: `[B, S]`, nonzero for real tokens; masked tokens are hidden as keys (on top of
        the causal mask). None: causal mask only (HunyuanVideo passes none).

    Returns:
      `last_hidden_state [B, S, C]` and `pooled [B, C]`, in the compute dtype.
    """
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be [B, S], got shape {input_ids.shape}")
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
      raise TypeError(f"input_ids must be integer token ids, got {input_ids.dtype}")
    b, s = input_ids.shape
    if s > self.config.max_position_embeddings:
      raise ValueError(f"sequence length {s} exceeds {self.config.max_position_embeddings=}")
    allowed = jnp.tril(jnp.ones((s, s), bool))[None]  # [1, S, S]: key k <= query q
    if attention_mask is not None:
      if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {attention_mask.shape} != input_ids shape {input_ids.shape}")
      allowed = allowed & (attention_mask != 0)[:, None, :]  # [B, S, S]
    # transformers' eager mask: 0 where allowed, the fp32 minimum elsewhere. A query with no key
    # left (a left-padded position) then attends uniformly, as eager attention does; transformers'
    # sdpa path gives such rows other (equally meaningless) values. Real tokens and the pooled
    # output agree with both.
    bias = jnp.where(allowed, jnp.float32(0), jnp.finfo(F32).min)  # [B or 1, S, S]
    bias = jnp.broadcast_to(bias, (b, s, s))
    x = self.embeddings(input_ids)  # [B, S, C]
    x = self.encoder(x, bias)
    hidden = self.final_layer_norm(x)  # [B, S, C]
    ids = input_ids.astype(jnp.int32)
    if self.config.eos_token_id == LEGACY_EOS_TOKEN_ID:
      eos = jnp.argmax(ids, axis=-1)  # [B]: first position of the largest id
    else:
      eos = jnp.argmax((ids == self.config.eos_token_id).astype(jnp.int32), axis=-1)  # [B]
    pooled = jnp.take_along_axis(hidden, eos[:, None, None], axis=1)[:, 0]  # [B, C]
    return hidden, pooled


@functools.partial(jax.jit, static_argnums=0)
def _call_jit(graphdef: nnx.GraphDef, state: nnx.State, input_ids: jax.Array,
              attention_mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  return nnx.merge(graphdef, state)(input_ids, attention_mask)


def encode_ids(model: CLIPTextModel, input_ids: jax.Array,
               attention_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Jitted `model(input_ids, attention_mask)`: `(last_hidden_state [B, S, C], pooled [B, C])`."""
  graphdef, state = nnx.split(model)
  mask = None if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
  return _call_jit(graphdef, state, jnp.asarray(input_ids, jnp.int32), mask)


def from_params(config: CLIPTextConfig, params: Mapping[str, Any], *,
                dtype=jnp.float32) -> CLIPTextModel:
  """Builds a model around converted params (the pure dict of `nnx.state(model, nnx.Param)`).

  Nothing is randomly initialised; parameters keep the dtype they were converted to and compute runs
  in `dtype`.
  """
  return checkpoint.module_from_params(
      lambda: CLIPTextModel(config, dtype=dtype, rngs=nnx.Rngs(0)), params,
      what="CLIP text model")


def load_encoder(path: str | os.PathLike, *, dtype=jnp.bfloat16, param_dtype=None,
                 shardings=None) -> CLIPTextModel:
  """Loads a model written by `checkpoints_convert.clip_text.convert` (`astraea_jax.checkpoint`).

  Args:
    path: the converted checkpoint directory.
    dtype: compute dtype.
    param_dtype: dtype embeddings and Linear parameters are restored in; defaults to `dtype`.
    shardings: passed to `astraea_jax.checkpoint.load_params` (default: the first local device).
  """
  param_dtype = dtype if param_dtype is None else param_dtype
  return checkpoint.load_module(
      path,
      lambda c: CLIPTextModel(CLIPTextConfig(**c), dtype=dtype, param_dtype=param_dtype,
                              rngs=nnx.Rngs(0)),
      family=FAMILY, shardings=shardings)
