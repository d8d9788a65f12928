"""A word-level tokenizer over a closed vocabulary (the caption grammar of `astraea_jax.data`).

It stands in for the umT5 tokenizer (`astraea_jax.models.tokenizer.UMT5Tokenizer`) with the
project's small text encoder, and has the same call signature: prompts -> `(input_ids,
attention_mask)` int32 arrays `[B, M]`, with `</s>` after the last word, right padding with `<pad>`,
and truncation that keeps the `</s>`. Token ids follow T5's special tokens: `<pad>` = 0, `</s>` = 1,
`<unk>` = 2, then the words in the order given.

Text is lower-cased, punctuation becomes spaces and whitespace splits words. Words outside the
vocabulary map to `<unk>`, with one `UserWarning` per call naming them.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from astraea_jax.models.tokenizer import check_prompts, prompt_clean

__all__ = ["SPECIAL_TOKENS", "WordTokenizer"]

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "</s>", "<unk>")
_FORMAT = "astraea-word-tokenizer"
_NON_WORD = re.compile(r"[^\w]+")


class WordTokenizer:
  """Prompts -> fixed-length `(input_ids, attention_mask)` over a fixed word list.

  Args:
    words: the vocabulary (order fixes the ids; duplicates and special tokens are rejected).
    max_length: default text length M, counting the `</s>`.
  """

  pad_token_id = 0
  eos_token_id = 1
  unk_token_id = 2

  def __init__(self, words: Iterable[str], *, max_length: int = 24):
    words = list(words)
    if max_length < 2:
      raise ValueError(f"{max_length=} must leave room for a word and </s>")
    bad = [w for w in words if not isinstance(w, str) or not w or w != w.lower() or
           _NON_WORD.search(w) or w in SPECIAL_TOKENS]
    if bad:
      raise ValueError(f"vocabulary words must be lower-case single words, not special tokens: "
                       f"{bad[:5]}")
    if len(set(words)) != len(words):
      dupes = sorted({w for w in words if words.count(w) > 1})
      raise ValueError(f"vocabulary has duplicate words: {dupes[:5]}")
    self.words: tuple[str, ...] = tuple(words)
    self.max_length = max_length
    self._tokens = SPECIAL_TOKENS + self.words
    self._ids = {t: i for i, t in enumerate(self._tokens)}

  @property
  def vocab_size(self) -> int:
    return len(self._tokens)

  def token_to_id(self, token: str) -> int | None:
    return self._ids.get(token)

  def split(self, text: str) -> list[str]:
    """Lower-case words of `text`, punctuation removed."""
    return [w for w in _NON_WORD.sub(" ", text.lower()).split() if w]

  def __call__(self, prompts: str | Sequence[str], *, max_length: int | None = None,
               clean: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Tokenizes a prompt or a batch of them.

    Args:
      prompts: a string or a sequence of strings.
      max_length: text length M; defaults to the tokenizer's `max_length`.
      clean: apply `prompt_clean` (HTML entities, whitespace) first, as the umT5 tokenizer does.

    Returns:
      `input_ids [B, M]` and `attention_mask [B, M]`, int32 (1 for the words and `</s>`).
    """
    prompts, m = check_prompts(prompts, self.max_length if max_length is None else max_length)
    ids = np.full((len(prompts), m), self.pad_token_id, np.int32)  # [B, M]
    mask = np.zeros((len(prompts), m), np.int32)  # [B, M]
    unknown: list[str] = []
    for i, prompt in enumerate(prompts):
      words = self.split(prompt_clean(prompt) if clean else prompt)
      row = []
      for w in words:
        token = self._ids.get(w)
        if token is None:
          unknown.append(w)
          token = self.unk_token_id
        row.append(token)
      row = row[:m - 1] + [self.eos_token_id]
      ids[i, :len(row)] = row
      mask[i, :len(row)] = 1
    if unknown:
      names = ", ".join(repr(w) for w in dict.fromkeys(unknown))
      warnings.warn(f"words outside the tokenizer's {len(self.words)}-word vocabulary map to "
                    f"<unk>: {names}", UserWarning, stacklevel=2)
    return ids, mask

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Ids of one prompt -> its words, stopping at `</s>` and skipping padding."""
    words = []
    for i in np.asarray(ids).reshape(-1).tolist():
      if i == self.eos_token_id:
        break
      if i != self.pad_token_id:
        if not 0 <= i < self.vocab_size:
          raise ValueError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
        words.append(self._tokens[i])
    return " ".join(words)

  def to_dict(self) -> dict:
    return {"format": _FORMAT, "special_tokens": list(SPECIAL_TOKENS), "words": list(self.words),
            "max_length": self.max_length}

  @classmethod
  def from_dict(cls, d: dict) -> WordTokenizer:
    if d.get("format") != _FORMAT:
      raise ValueError(f"not a word tokenizer file (format {d.get('format')!r})")
    if tuple(d.get("special_tokens", ())) != SPECIAL_TOKENS:
      raise ValueError(f"word tokenizer special tokens {d.get('special_tokens')} != "
                       f"{list(SPECIAL_TOKENS)}")
    return cls(d["words"], max_length=int(d["max_length"]))

  def save(self, path: str | os.PathLike) -> Path:
    """Writes the tokenizer as JSON to `path` (a file, or a folder that gets `tokenizer.json`)."""
    path = Path(path)
    if path.is_dir():
      path = path / "tokenizer.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
    return path

  @classmethod
  def load(cls, path: str | os.PathLike) -> WordTokenizer:
    """Reads a file written by `save` (or the folder holding its `tokenizer.json`)."""
    path = Path(path)
    if path.is_dir():
      path = path / "tokenizer.json"
    if not path.is_file():
      raise FileNotFoundError(f"no word tokenizer at {str(path)!r}")
    try:
      d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON: {e}") from None
    return cls.from_dict(d)

  @classmethod
  def for_captions(cls, *, max_length: int = 24) -> WordTokenizer:
    """The tokenizer of the procedural clips' caption grammar (`astraea_jax.data.VOCABULARY`)."""
    from astraea_jax.data.grammar import VOCABULARY  # pylint: disable=import-outside-toplevel

    return cls(VOCABULARY, max_length=max_length)
