"""The umT5 tokenizer of Wan2.1, read from its folder on disk with the `tokenizers` package.

Both layouts ship a `tokenizer.json` (a SentencePiece Unigram model with T5's `</s>`
post-processor): diffusers' Wan folder has it under `tokenizer/`, the original Wan release under
`google/umt5-xxl/`. Tokenization follows diffusers' `WanPipeline._get_t5_prompt_embeds` (and Wan's
`HuggingfaceTokenizer(clean="whitespace")`): clean the prompt, append `</s>`, truncate to the text
length keeping `</s>`, right-pad with `<pad>`, and return the attention mask.

Wan's cleaning also runs `ftfy.fix_text`, which repairs mis-decoded text (mojibake); it is not
applied here, which changes nothing for well-formed prompts.
"""

from __future__ import annotations

import html
import os
import re
from collections.abc import Sequence

import numpy as np

__all__ = ["UMT5Tokenizer", "check_prompts", "prompt_clean"]

_WHITESPACE = re.compile(r"\s+")


def prompt_clean(text: str) -> str:
  """Wan's prompt cleaning: unescape HTML entities (twice, as Wan does), collapse whitespace."""
  text = html.unescape(html.unescape(text)).strip()
  return _WHITESPACE.sub(" ", text).strip()


def check_prompts(prompts: str | Sequence[str], max_length: int) -> tuple[list[str], int]:
  """The shared argument checks of the tokenizers: a string or a non-empty list of strings, and a
  text length with room for a token and `</s>`."""
  if isinstance(prompts, str):
    prompts = [prompts]
  if not all(isinstance(p, str) for p in prompts):
    raise TypeError("prompts must be a string or a sequence of strings")
  if not prompts:
    raise ValueError("no prompts given")
  if max_length < 2:
    raise ValueError(f"max_length={max_length} must leave room for a token and </s>")
  return list(prompts), max_length


def _resolve(path: str | os.PathLike) -> str:
  path = os.fspath(path)
  if os.path.isfile(path):
    return path
  if not os.path.isdir(path):
    raise FileNotFoundError(
        f"no tokenizer at {path!r}: expected a folder with tokenizer.json or the file itself")
  candidates = (os.path.join(path, "tokenizer.json"), os.path.join(path, "tokenizer", "tokenizer.json"))
  for candidate in candidates:
    if os.path.isfile(candidate):
      return candidate
  raise FileNotFoundError(f"{path!r} has no tokenizer.json (a spiece.model alone is not supported)")


class UMT5Tokenizer:
  """Prompts -> fixed-length `(input_ids, attention_mask)` arrays for the umT5 encoder.

  Args:
    path: a tokenizer folder (diffusers' `tokenizer/`, Wan's `google/umt5-xxl/`), a diffusers model
      root that contains `tokenizer/`, or a `tokenizer.json` file.
    max_length: default text length (Wan2.1: 512).
  """

  def __init__(self, path: str | os.PathLike, *, max_length: int = 512):
    try:
      import tokenizers  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ImportError(
          "UMT5Tokenizer needs the `tokenizers` package (pip install tokenizers)") from e
    if max_length < 1:
      raise ValueError(f"{max_length=} must be positive")
    self.path = _resolve(path)
    try:
      self._tokenizer = tokenizers.Tokenizer.from_file(self.path)
    except Exception as e:  # the Rust side raises a bare Exception for malformed JSON
      raise ValueError(f"cannot read tokenizer {self.path!r}: {e}") from e
    self.max_length = max_length
    self.pad_token_id = self._token_id("<pad>")
    self.eos_token_id = self._token_id("</s>")
    if self._tokenizer.post_processor is None:
      # T5 ends every sequence with </s>; some exported tokenizer.json files leave it to the caller.
      self._tokenizer.post_processor = tokenizers.processors.TemplateProcessing(
          single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", self.eos_token_id)])

  def _token_id(self, token: str) -> int:
    token_id = self._tokenizer.token_to_id(token)
    if token_id is None:
      raise ValueError(f"tokenizer {self.path!r} has no {token} token; is it a T5 tokenizer?")
    return token_id

  @property
  def vocab_size(self) -> int:
    return self._tokenizer.get_vocab_size(with_added_tokens=True)

  def __call__(self, prompts: str | Sequence[str], *, max_length: int | None = None,
               clean: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Tokenizes a prompt or a batch of them.

    Args:
      prompts: a string or a sequence of strings.
      max_length: text length M; defaults to the tokenizer's `max_length`.
      clean: apply `prompt_clean` first, as Wan and diffusers do.

    Returns:
      `input_ids [B, M]` and `attention_mask [B, M]`, int32 (1 for real tokens, 0 for padding).
    """
    prompts, m = check_prompts(prompts, self.max_length if max_length is None else max_length)
    texts = [prompt_clean(p) for p in prompts] if clean else list(prompts)
    # The library truncates the text and keeps the closing </s>, like transformers' `truncation`.
    self._tokenizer.enable_truncation(max_length=m)
    self._tokenizer.enable_padding(length=m, pad_id=self.pad_token_id, pad_token="<pad>")
    encodings = self._tokenizer.encode_batch(texts, add_special_tokens=True)
    ids = np.asarray([enc.ids for enc in encodings], np.int32)  # [B, M]
    mask = np.asarray([enc.attention_mask for enc in encodings], np.int32)  # [B, M]
    return ids, mask
