"""The T5 v1.1-xxl text encoder of OpenSora v1.2 (DeepFloyd/t5-v1_1-xxl), in Flax NNX.

T5 v1.1 (Raffel et al., JMLR 2020; the "v1.1" checkpoints: gated GELU, no dropout at inference,
untied embeddings) computes what `astraea_jax.models.umt5` computes for umT5, except for the
relative-position bias: only the first block owns one, and every block adds that same bias
(transformers' `T5Attention(has_relative_attention_bias=(i == 0))`). `UMT5Config` expresses this
with `shared_relative_bias=True`, so the encoder here *is* `UMT5Encoder` with that option; this
module adds the T5 presets, the checkpoint family "t5" and OpenSora's text conditioning:

  OpenSora's `T5Embedder.get_text_embeddings` (opensora/models/text_encoder/t5.py, v1.2.0)
  tokenizes to `model_max_length` (300 in configs/opensora-v1-2/inference/sample.py) with padding
  and truncation, runs `T5EncoderModel(input_ids, attention_mask).last_hidden_state`, and passes
  the hidden states *and* the mask to STDiT3, which hides the padding in its cross-attention. So,
  unlike Wan's `encode_prompts`, nothing is zeroed here.

Before tokenizing, OpenSora's inference script runs every prompt through `text_preprocessing`
(DeepFloyd's caption cleaning, twice): `clean_caption` below is an independent re-implementation of
its main rules (lower case, URL / HTML / @handle removal, dash and quote normalisation, noisy
punctuation to spaces, whitespace). It does not run `ftfy` or BeautifulSoup, so exotic input
(mojibake, HTML entities beyond `&quot;` / `&amp;`) may be cleaned differently; ordinary prompts
come out the same.
"""

from __future__ import annotations

import dataclasses
import functools
import html
import os
import re
import urllib.parse
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from astraea_jax import checkpoint
from astraea_jax.models.umt5 import UMT5Config, UMT5Encoder

__all__ = [
    "FAMILY",
    "PRESETS",
    "T5Config",
    "T5Encoder",
    "clean_caption",
    "encode_ids",
    "encode_prompts",
    "load_encoder",
    "text_preprocessing",
]

FAMILY = "t5"
T5Config = UMT5Config
T5Encoder = UMT5Encoder

PRESETS: dict[str, UMT5Config] = {
    # DeepFloyd/t5-v1_1-xxl's encoder (config.json of that repository), as OpenSora v1.2 uses it.
    "t5-v1_1-xxl": UMT5Config(vocab_size=32128, d_model=4096, d_kv=64, num_heads=64, d_ff=10240,
                              num_layers=24, relative_attention_num_buckets=32,
                              relative_attention_max_distance=128, shared_relative_bias=True),
    # The configuration of the parity goldens (tests/goldens/make_t5_goldens.py).
    "tiny": UMT5Config(vocab_size=128, d_model=40, d_kv=8, num_heads=4, d_ff=48, num_layers=3,
                       relative_attention_num_buckets=8, relative_attention_max_distance=16,
                       shared_relative_bias=True),
}

# OpenSora v1.2's text length (sample.py: `model_max_length=300`).
OPENSORA_MAX_LENGTH = 300


@functools.partial(jax.jit, static_argnums=0)
def _encode_jit(graphdef, state, input_ids, attention_mask):
  return nnx.merge(graphdef, state)(input_ids, attention_mask)


def encode_ids(model: UMT5Encoder, input_ids, attention_mask) -> jax.Array:
  """Jitted `last_hidden_state` `[B, M, C]` of `[B, M]` ids and mask (padding keeps its values)."""
  graphdef, state = nnx.split(model)
  return _encode_jit(graphdef, state, jnp.asarray(input_ids, jnp.int32),
                     jnp.asarray(attention_mask, jnp.int32))


def encode_prompts(model: UMT5Encoder, tokenizer, prompts: str | Sequence[str], *,
                   max_length: int = OPENSORA_MAX_LENGTH, preprocess: bool = True
                   ) -> tuple[jax.Array, jax.Array]:
  """Prompts -> OpenSora's caption features: `(y [B, M, C], mask [B, M] int32)`.

  Args:
    model: the encoder.
    tokenizer: an `astraea_jax.models.tokenizer.UMT5Tokenizer` over T5's tokenizer.json (it is
      called with `clean=False`: OpenSora cleans with `text_preprocessing` instead).
    prompts: a prompt or a list of them.
    max_length: M (300 in OpenSora v1.2).
    preprocess: apply `text_preprocessing` as OpenSora's inference script does.
  """
  if isinstance(prompts, str):
    prompts = [prompts]
  prompts = list(prompts)
  if preprocess:
    prompts = [text_preprocessing(p) for p in prompts]
  ids, mask = tokenizer(prompts, max_length=max_length, clean=False)
  return encode_ids(model, ids, mask), jnp.asarray(mask, jnp.int32)


def load_encoder(path: str | os.PathLike, *, dtype=jnp.bfloat16, param_dtype=None,
                 shardings=None) -> UMT5Encoder:
  """Loads an encoder written by `python -m checkpoints_convert t5`."""
  meta = checkpoint.read_metadata(path)
  if meta.get("family") != FAMILY:
    raise ValueError(f"{path}: a {meta.get('family')!r} checkpoint, not {FAMILY}")
  config = UMT5Config(**meta["config"])
  param_dtype = dtype if param_dtype is None else param_dtype
  abstract = nnx.eval_shape(
      lambda: UMT5Encoder(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  state = checkpoint.load_params(path, state, shardings=shardings, family=FAMILY)
  return nnx.merge(graphdef, state)


def config_from_hf(config: dict) -> UMT5Config:
  """A transformers T5 `config.json` dict -> the encoder config (first-layer bias shared)."""
  if config.get("model_type") not in (None, "t5"):
    raise ValueError(f"expected a T5 config.json, got model_type={config.get('model_type')!r}")
  if config.get("feed_forward_proj", "gated-gelu") != "gated-gelu":
    raise ValueError(f"feed_forward_proj={config.get('feed_forward_proj')!r} is not supported: "
                     "T5 v1.1 uses 'gated-gelu' (the original T5's 'relu' is not ported)")
  cfg = UMT5Config.from_hf_config({**config, "model_type": "t5"})
  return dataclasses.replace(cfg, shared_relative_bias=True)


# -- caption cleaning ----------------------------------------------------------------------------

_URL = re.compile(r"\b((?:https?:(?:/{1,3}|[a-z0-9%])|www[.:]|[a-z0-9.\-]+[.]"
                  r"(?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b/?(?!@)))")
_HTML_TAG = re.compile(r"<[^<>]+>")
_HANDLE = re.compile(r"@[\w\d]+\b")
_CJK = re.compile(r"[\u31c0-\u31ef\u31f0-\u31ff\u3200-\u32ff\u3300-\u33ff\u3400-\u4dbf"
                  r"\u4dc0-\u4dff\u4e00-\u9fff]+")
_DASHES = re.compile(r"[\u002D\u058A\u05BE\u1400\u1806\u2010-\u2015\u2E17\u2E1A\u2E3A\u2E3B"
                     r"\u2E40\u301C\u3030\u30A0\uFE31\uFE32\uFE58\uFE63\uFF0D]+")
_NOISY_PUNCT = re.compile(r"[#®•©™&@·º½¾¿¡§~)(\]\[}{|\\/*]+")


def clean_caption(caption: str) -> str:
  """One pass of DeepFloyd's caption cleaning as OpenSora applies it (see the module doc)."""
  text = urllib.parse.unquote_plus(str(caption)).strip().lower()
  text = text.replace("<person>", "person")
  text = _URL.sub("", text)
  text = _HTML_TAG.sub("", text)
  text = _HANDLE.sub("", text)
  text = _CJK.sub("", text)
  text = _DASHES.sub("-", text)
  text = re.sub(r"[`´«»“”¨]", '"', text)
  text = re.sub(r"[‘’]", "'", text)
  text = re.sub(r"&quot;?", "", text)
  text = text.replace("&amp", "")
  text = re.sub(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " ", text)  # IP addresses
  text = re.sub(r"\d:\d\d\s+$", "", text)
  text = text.replace("\\n", " ")
  text = re.sub(r"#\d{1,3}\b", "", text)
  text = re.sub(r"#\d{5,}\b", "", text)
  text = re.sub(r"\b\d{6,}\b", "", text)
  text = re.sub(r"\S+\.(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)", "", text)  # file names
  text = re.sub(r"[\"']{2,}", '"', text)
  text = re.sub(r"\.{2,}", " ", text)
  text = _NOISY_PUNCT.sub(" ", text)
  text = re.sub(r"\s+\.\s+", " ", text)
  if len(re.findall(r"[-_]", text)) > 3:  # this-is-a-slug / this_is_a_slug
    text = re.sub(r"[-_]", " ", text)
  text = html.unescape(html.unescape(text)).strip()
  text = re.sub(r"\b[a-zA-Z]{1,3}\d{3,15}\b", "", text)  # product codes
  text = re.sub(r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", "", text)
  text = re.sub(r"\b\d+[a-zA-Z]+\d+\b", "", text)
  text = re.sub(r"(worldwide\s+)?(free\s+)?shipping", "", text)
  text = re.sub(r"(free\s)?download(\sfree)?", "", text)
  text = re.sub(r"\bclick\b\s(?:for|on)\s\w+", "", text)
  text = re.sub(r"\b(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)(\simage[s]?)?", "", text)
  text = re.sub(r"\bpage\s+\d+\b", "", text)
  text = re.sub(r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", " ", text)
  text = re.sub(r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", "", text)  # sizes like 1920x1080
  text = re.sub(r"\b\s+:\s+", ": ", text)
  text = re.sub(r"(\D[,./])\b", r"\1 ", text)  # a space after punctuation glued to a word
  text = re.sub(r"\s+", " ", text)
  text = re.sub(r"^[\"']([\w\W]+)[\"']$", r"\1", text)
  text = re.sub(r"^['_,\-:;]", "", text)
  text = re.sub(r"['_,\-:+]$", "", text)
  text = re.sub(r"^\.\S+$", "", text)
  return text.strip()


def text_preprocessing(text: str) -> str:
  """OpenSora's prompt cleaning before T5: `clean_caption` twice."""
  return clean_caption(clean_caption(text))
