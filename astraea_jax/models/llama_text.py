"""HunyuanVideo's main text encoder: the Llama-3 decoder of llava-llama-3-8b, in Flax NNX.

HunyuanVideo conditions its transformer on the hidden states of a Llama-3-8B decoder (the language
model of xtuner's llava-llama-3-8b-v1_1), used as a text encoder. diffusers' `HunyuanVideoPipeline`
loads `text_encoder/` as `transformers.LlamaModel`; this module computes the same function
(transformers 5.23 `modeling_llama.py`, default "sdpa" attention):

  x = embed_tokens(ids)                                   # [B, S, C], hidden_states[0]
  for each of L layers:
    x = x + o_proj(attention(rope(q_proj(rms(x))), rope(k_proj(rms(x))), v_proj(rms(x))))
    x = x + down_proj(silu(gate_proj(rms(x))) * up_proj(rms(x)))      # hidden_states[1..L]
  hidden_states[L] = norm(x)                              # the last one replaced by the final norm

* Attention is causal with grouped key/value heads (query head h uses key/value head
  `h // (H // G)`, transformers' `repeat_kv`), scaled by `D ** -0.5`. A query attends to the keys
  at or before it whose `attention_mask` is nonzero (`create_causal_mask`: causal AND key padding).
  Positions are `0..S-1` whatever the padding (transformers' default `position_ids`). A query that
  sees no key at all (a leading pad token under left padding) gets a zero attention output, as
  PyTorch's sdpa does; eager attention would average all values instead. With right padding, as
  Hunyuan pads, every query sees the first token, so every position is well defined.
* RoPE is transformers' Llama RoPE: `x * cos + rotate_half(x) * sin` with the two halves of the head
  dimension rotated together (not interleaved pairs), `inv_freq = 1 / theta ** (arange(0, D, 2) /
  D)` in fp32. Llama-3-8B (and llava-llama-3-8b) uses plain RoPE with theta 500000: no rope_scaling
  (Llama-3.1's "llama3" scaling is refused by `LlamaTextConfig.from_hf_config`).
* RMSNorm statistics are fp32 (`weight * (x * rsqrt(mean(x^2) + eps)).astype(dtype)`); so are the
  attention scores, the softmax and RoPE, whatever the compute dtype.

Outputs: `LlamaTextModel.hidden_states` returns transformers' `output_hidden_states=True` tuple
(L + 1 arrays, the embeddings first, the last after the final norm);
`LlamaTextModel(ids, mask, skip_layers=k)` returns just `hidden_states[-(k + 1)]` and runs only the
layers it needs (for Hunyuan's k = 2, the last two layers and the final norm are never run).

What the pipeline must do around it (diffusers 0.42.1
`HunyuanVideoPipeline._get_llama_prompt_embeds` with its defaults, constants below):
  1. Put each prompt into the template: `HUNYUAN_PROMPT_TEMPLATE.format(prompt)` (a Llama-3 chat
     preamble, "Describe the video by detailing the following aspects: ...", then the prompt as the
     user turn, closed by `<|eot_id|>`).
  2. Tokenize with the release's Llama-3 tokenizer (`tokenizer/`, special tokens as it adds them by
     default) to `max_length = max_sequence_length + crop_start` = 256 + 95 = 351,
     `padding="max_length"` (right padding), `truncation=True`, keeping the attention mask.
  3. Run the encoder on ids and mask and take `hidden_states[-(num_hidden_layers_to_skip + 1)]` with
     `num_hidden_layers_to_skip = 2`: `hidden_states[-3]` = the output of layer L - 2 (30 of 32
     layers run, no final norm) = `model(ids, mask, skip_layers=2)`. Cast to the transformer dtype.
  4. Crop the first `crop_start = 95` positions (the template preamble) from the embeddings and the
     mask: `embeds[:, 95:]`, `mask[:, 95:]` -> `[B, 256, 4096]` and `[B, 256]`. The padded positions
     are not zeroed; the mask goes to the transformer with the embeddings.
  (For a template without `crop_start`, diffusers uses the length of the template itself tokenized
  with `padding="max_length"` (so at least the tokenizer's `model_max_length`) minus 2; the default
  template gives `crop_start` = 95 explicitly.)
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from astraea_jax import checkpoint

__all__ = [
    "FAMILY",
    "HUNYUAN_CROP_START",
    "HUNYUAN_MAX_SEQUENCE_LENGTH",
    "HUNYUAN_PROMPT_TEMPLATE",
    "HUNYUAN_SKIP_LAYERS",
    "PRESETS",
    "LlamaTextConfig",
    "LlamaTextModel",
    "from_params",
    "load_text_encoder",
    "rope_inv_freq",
]

FAMILY = "llama_text"

# diffusers 0.42.1 pipelines/hunyuan_video/pipeline_hunyuan_video.py: DEFAULT_PROMPT_TEMPLATE and
# the defaults of `_get_llama_prompt_embeds` / `__call__` (tests compare them with diffusers).
HUNYUAN_PROMPT_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following "
    "aspects: "
    "1. The main content and theme of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the "
    "objects."
    "4. background environment, light, style and atmosphere."
    "5. camera angles, movements, and transitions used in the video:<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>")
HUNYUAN_CROP_START = 95  # leading template tokens dropped after encoding
HUNYUAN_MAX_SEQUENCE_LENGTH = 256  # tokens kept after the crop; tokenize to 256 + 95
HUNYUAN_SKIP_LAYERS = 2  # num_hidden_layers_to_skip: hidden_states[-3]


@dataclasses.dataclass(frozen=True)
class LlamaTextConfig:
  """Architecture of a Llama decoder used as a text encoder; names follow transformers'
  `LlamaConfig`. Defaults: llava-llama-3-8b (HunyuanVideo's `text_encoder/config.json`)."""

  vocab_size: int = 128320
  hidden_size: int = 4096  # C
  intermediate_size: int = 14336  # F
  num_hidden_layers: int = 32  # L
  num_attention_heads: int = 32  # H
  num_key_value_heads: int = 8  # G (grouped-query attention)
  rms_norm_eps: float = 1e-5
  rope_theta: float = 500000.0
  max_position_embeddings: int = 8192

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"{self.hidden_size=} must be a multiple of {self.num_attention_heads=}")
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(
          f"{self.num_attention_heads=} must be a multiple of {self.num_key_value_heads=}")
    if self.head_dim % 2:
      raise ValueError(f"{self.head_dim=} must be even for rotary embeddings")
    if not self.rms_norm_eps > 0:
      raise ValueError(f"{self.rms_norm_eps=} must be positive")
    if not self.rope_theta > 0:
      raise ValueError(f"{self.rope_theta=} must be positive")

  @property
  def head_dim(self) -> int:  # D
    return self.hidden_size // self.num_attention_heads

  @classmethod
  def from_hf_config(cls, config: Mapping[str, Any]) -> LlamaTextConfig:
    """Builds the config from a transformers `config.json` dict (`LlamaConfig`, 4.x or 5.x).

    Raises `ValueError` for what this port does not implement: another activation than SiLU,
    projection biases, a `head_dim` other than `hidden_size // num_attention_heads`, or RoPE
    scaling.
    """
    if config.get("model_type") not in (None, "llama"):
      raise ValueError(f"expected a Llama config.json, got model_type={config.get('model_type')!r}")
    if config.get("hidden_act", "silu") != "silu":
      raise ValueError(f"hidden_act={config['hidden_act']!r} is not supported: Llama uses 'silu'")
    for bias in ("attention_bias", "mlp_bias"):
      if config.get(bias):
        raise ValueError(f"{bias}=True is not supported: Llama-3 has no projection biases")
    # transformers 5 keeps rope settings in `rope_parameters`; 4.x in `rope_theta` / `rope_scaling`.
    rope = dict(config.get("rope_parameters") or {})
    scaling = config.get("rope_scaling") or {}
    for rope_type in (rope.get("rope_type"), scaling.get("rope_type", scaling.get("type"))):
      if rope_type not in (None, "default"):
        raise ValueError(
            f"rope_type={rope_type!r} is not supported: only plain RoPE (Llama-3-8B)")
    kwargs = {f.name: config[f.name] for f in dataclasses.fields(cls)
              if config.get(f.name) is not None}
    kwargs.pop("rope_theta", None)
    kwargs["rope_theta"] = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    kwargs.setdefault("num_key_value_heads", config.get("num_attention_heads"))
    out = cls(**{k: v for k, v in kwargs.items() if v is not None})
    head_dim = config.get("head_dim")
    if head_dim is not None and head_dim != out.head_dim:
      raise ValueError(f"head_dim={head_dim} is not supported: this port needs hidden_size // "
                       f"num_attention_heads = {out.head_dim}")
    return out

  @classmethod
  def preset(cls, name: str) -> LlamaTextConfig:
    try:
      return PRESETS[name]
    except KeyError:
      raise ValueError(f"unknown Llama text encoder preset {name!r}; choose from "
                       f"{sorted(PRESETS)}") from None


PRESETS: dict[str, LlamaTextConfig] = {
    # HunyuanVideo's text_encoder/ (the language model of xtuner/llava-llama-3-8b-v1_1).
    "llava-llama-3-8b": LlamaTextConfig(),
    # The configuration of the parity goldens (tests/goldens/make_llama_text_goldens.py).
    "tiny": LlamaTextConfig(vocab_size=101, hidden_size=32, intermediate_size=48,
                            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                            rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=64),
}


@functools.lru_cache(maxsize=16)
def rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:
  """`[D / 2]` fp32 inverse frequencies, computed in fp32 as transformers computes them."""
  exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
  inv = (np.float32(1.0) / (np.float32(theta)**exponent)).astype(np.float32)
  inv.setflags(write=False)
  return inv


def _rope_cos_sin(seq_len: int, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """fp32 `cos, sin [S, D]` of positions `0..S-1`, each frequency repeated over both halves."""
  positions = jnp.arange(seq_len, dtype=jnp.float32)  # [S]
  freqs = positions[:, None] * jnp.asarray(rope_inv_freq(head_dim, theta))[None, :]  # [S, D/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)  # [S, D]
  return jnp.cos(emb), jnp.sin(emb)


def _apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """`x * cos + rotate_half(x) * sin` on `x [B, S, H, D]` in fp32, cast back to `x.dtype`."""
  x32 = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)  # rotate_half
  out = x32 * cos[None, :, None, :] + rotated * sin[None, :, None, :]
  return out.astype(x.dtype)


class LlamaRMSNorm(nnx.Module):
  """`weight * (x / sqrt(mean(x^2) + eps))`, statistics in fp32, no bias."""

  def __init__(self, dim: int, *, eps: float, dtype, param_dtype, rngs: nnx.Rngs):
    del rngs
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = (x32 * jax.lax.rsqrt(var + jnp.float32(self.eps))).astype(self.dtype)
    return self.weight[...].astype(self.dtype) * y


class LlamaAttention(nnx.Module):
  """Causal grouped-query self-attention with RoPE (transformers' `LlamaAttention`)."""

  def __init__(self, config: LlamaTextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    linear = functools.partial(nnx.Linear, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                               rngs=rngs)
    h, g, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    self.q_proj = linear(config.hidden_size, h * d)
    self.k_proj = linear(config.hidden_size, g * d)
    self.v_proj = linear(config.hidden_size, g * d)
    self.o_proj = linear(h * d, config.hidden_size)
    self.num_heads = h
    self.num_kv_heads = g
    self.head_dim = d

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array,
               allowed: jax.Array) -> jax.Array:
    """`x [B, S, C]`, fp32 `cos, sin [S, D]`, `allowed [B, S_q, S_k]` bool -> `[B, S, C]`."""
    b, s, _ = x.shape
    g, d = self.num_kv_heads, self.head_dim
    r = self.num_heads // g  # query heads per key/value head
    q = self.q_proj(x).reshape(b, s, self.num_heads, d)  # [B, S, H, D]
    k = self.k_proj(x).reshape(b, s, g, d)  # [B, S, G, D]
    v = self.v_proj(x).reshape(b, s, g, d)  # [B, S, G, D]
    q = _apply_rope(q, cos, sin).reshape(b, s, g, r, d)  # head h = g * R + r, as repeat_kv
    k = _apply_rope(k, cos, sin)
    scores = jnp.einsum("bqgrd,bkgd->bgrqk", q, k,
                        preferred_element_type=jnp.float32)  # [B, G, R, S, S]
    scores = scores * jnp.float32(d**-0.5)
    mask = allowed[:, None, None]  # [B, 1, 1, S, S]
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    # A query that sees no key gets a zero output (PyTorch sdpa's safe softmax).
    probs = jnp.where(jnp.any(mask, axis=-1, keepdims=True), probs, jnp.float32(0))
    out = jnp.einsum("bgrqk,bkgd->bqgrd", probs.astype(v.dtype), v)  # [B, S, G, R, D]
    return self.o_proj(out.reshape(b, s, self.num_heads * d))


class LlamaMLP(nnx.Module):
  """SwiGLU feed-forward: `down_proj(silu(gate_proj(x)) * up_proj(x))`."""

  def __init__(self, config: LlamaTextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    linear = functools.partial(nnx.Linear, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                               rngs=rngs)
    self.gate_proj = linear(config.hidden_size, config.intermediate_size)
    self.up_proj = linear(config.hidden_size, config.intermediate_size)
    self.down_proj = linear(config.intermediate_size, config.hidden_size)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))  # via [B, S, F]


class LlamaDecoderLayer(nnx.Module):
  """Pre-norm attention and MLP residual layers (transformers' `LlamaDecoderLayer`)."""

  def __init__(self, config: LlamaTextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    norm = functools.partial(LlamaRMSNorm, config.hidden_size, eps=config.rms_norm_eps,
                             dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.self_attn = LlamaAttention(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.mlp = LlamaMLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.input_layernorm = norm()
    self.post_attention_layernorm = norm()

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array,
               allowed: jax.Array) -> jax.Array:
    x = x + self.self_attn(self.input_layernorm(x), cos, sin, allowed)
    return x + self.mlp(self.post_attention_layernorm(x))


class LlamaTextModel(nnx.Module):
  """Llama decoder stack (transformers' `LlamaModel`): token embedding, L layers, final RMSNorm.

  Attribute names mirror the checkpoint (`embed_tokens`, `layers[i].self_attn.q_proj`, ...,
  `norm`), so conversion is a rename-free layout change (checkpoints_convert/llama_text.py).

  Args:
    config: the architecture.
    dtype: compute dtype of activations and matmuls (norm statistics, RoPE, attention scores and
      softmax are always fp32).
    param_dtype: storage dtype of the parameters.
    rngs: initialisation randomness (weights are random until a converted checkpoint is loaded).
  """

  def __init__(self, config: LlamaTextConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    self.config = config
    self.dtype = dtype
    self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, dtype=dtype,
                                  param_dtype=param_dtype,
                                  embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
    self.layers = nnx.List([
        LlamaDecoderLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        for _ in range(config.num_hidden_layers)
    ])
    self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype,
                             param_dtype=param_dtype, rngs=rngs)

  def _prepare(self, input_ids: jax.Array, attention_mask: jax.Array | None):
    """Validates the inputs; returns the embeddings, fp32 `cos, sin` and `allowed [B, S, S]`."""
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be [B, S], got shape {input_ids.shape}")
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
      raise TypeError(f"input_ids must be integer token ids, got {input_ids.dtype}")
    b, s = input_ids.shape
    if s > self.config.max_position_embeddings:
      raise ValueError(f"sequence length {s} exceeds {self.config.max_position_embeddings=}")
    allowed = jnp.tril(jnp.ones((s, s), bool))[None]  # [1, S_q, S_k] causal
    if attention_mask is not None:
      if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {attention_mask.shape} != input_ids shape {input_ids.shape}")
      allowed = allowed & (attention_mask != 0)[:, None, :]  # and the key is not padding
    allowed = jnp.broadcast_to(allowed, (b, s, s))
    cos, sin = _rope_cos_sin(s, self.config.head_dim, self.config.rope_theta)
    return self.embed_tokens(input_ids), cos, sin, allowed  # [B, S, C], [S, D] x2, [B, S, S]

  def hidden_states(self, input_ids: jax.Array,
                    attention_mask: jax.Array | None = None) -> tuple[jax.Array, ...]:
    """transformers' `LlamaModel(..., output_hidden_states=True).hidden_states`.

    Args:
      input_ids: `[B, S]` integer token ids.
      attention_mask: `[B, S]`, nonzero for real tokens; padded tokens are hidden from every query
        as keys. None: causal attention over all tokens.

    Returns:
      L + 1 arrays `[B, S, C]` in the compute dtype: the token embeddings, the outputs of layers
      1..L-1, and the output of layer L after the final norm (= `last_hidden_state`).
    """
    x, cos, sin, allowed = self._prepare(input_ids, attention_mask)
    out = [x]
    for layer in self.layers:
      x = layer(x, cos, sin, allowed)
      out.append(x)
    out[-1] = self.norm(x)
    return tuple(out)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
               skip_layers: int = 0) -> jax.Array:
    """One hidden state: `hidden_states(input_ids, attention_mask)[-(skip_layers + 1)]`.

    Only the first `L - skip_layers` layers run (and the final norm only for `skip_layers=0`).
    HunyuanVideo uses `skip_layers=HUNYUAN_SKIP_LAYERS` (2).

    Args:
      input_ids: `[B, S]` integer token ids.
      attention_mask: `[B, S]`, nonzero for real tokens (see `hidden_states`).
      skip_layers: transformers' `num_hidden_layers_to_skip`, in `[0, L]`; `L` gives the embeddings.

    Returns:
      `[B, S, C]` in the compute dtype; padded positions hold values too (not zeroed).
    """
    num_layers = self.config.num_hidden_layers
    if isinstance(skip_layers, bool) or not 0 <= int(skip_layers) <= num_layers:
      raise ValueError(f"{skip_layers=} must be an integer in [0, {num_layers}]")
    x, cos, sin, allowed = self._prepare(input_ids, attention_mask)
    for layer in self.layers[:num_layers - int(skip_layers)]:
      x = layer(x, cos, sin, allowed)
    return self.norm(x) if skip_layers == 0 else x


def from_params(config: LlamaTextConfig, params: Mapping[str, Any], *,
                dtype=jnp.float32) -> LlamaTextModel:
  """Builds the model around converted params (the pure dict of `nnx.state(model, nnx.Param)`).

  Nothing is randomly initialised; parameters keep the dtype they were converted to and compute runs
  in `dtype`.
  """
  return checkpoint.module_from_params(
      lambda: LlamaTextModel(config, dtype=dtype, rngs=nnx.Rngs(0)), params,
      what="Llama text encoder")


def load_text_encoder(path: str | os.PathLike, *, dtype=jnp.bfloat16, param_dtype=None,
                      shardings=None) -> LlamaTextModel:
  """Loads a model written by `python -m checkpoints_convert llama_text` (`astraea_jax.checkpoint`).

  Args:
    path: the converted checkpoint directory.
    dtype: compute dtype.
    param_dtype: dtype the parameters are restored in; defaults to `dtype`.
    shardings: passed to `astraea_jax.checkpoint.load_params` (default: the first local device).
  """
  param_dtype = dtype if param_dtype is None else param_dtype
  return checkpoint.load_module(
      path,
      lambda c: LlamaTextModel(LlamaTextConfig(**c), dtype=dtype, param_dtype=param_dtype,
                               rngs=nnx.Rngs(0)),
      family=FAMILY, shardings=shardings)
