"""CLIP-L's byte-level BPE tokenizer as a `tokenizers.Tokenizer`, built without transformers.

HunyuanVideo (Kong et al., arXiv 2412.03603) feeds the prompt to CLIP-L (openai/clip-vit-large-patch14's
text tower) for its pooled text vector. Releases in diffusers' layout keep that tokenizer under
`tokenizer_2/` as the files of transformers' *slow* `CLIPTokenizer` — `vocab.json`, `merges.txt`,
`tokenizer_config.json`, `special_tokens_map.json` — and may ship no `tokenizer.json`, so the
`tokenizers` package cannot load the folder directly. transformers builds the fast tokenizer from
those files at load time (`convert_slow_tokenizer.CLIPConverter`, and in 5.x the constructor of
`models/clip/tokenization_clip.CLIPTokenizer`); this module does the same so that inference needs no
transformers:

  model          BPE(vocab, merges, end_of_word_suffix="</w>", continuing_subword_prefix="",
                     unk_token=unk, fuse_unk=False)
  normalizer     NFC, collapse every whitespace run to one space, lowercase
  pre-tokenizer  Split on CLIP's pattern (the special tokens, 's 't 're 've 'm 'll 'd, letter runs,
                 single digits, runs of other non-space characters; the rest — spaces — removed),
                 then ByteLevel(add_prefix_space=False)
  post-process   RobertaProcessing: `<|startoftext|> ... <|endoftext|>` (bos/eos from the config)
  decoder        ByteLevel
  added tokens   the special tokens (bos, eos, unk, pad and any in `added_tokens_decoder`), with the
                 flags the config gives them

The padding token is set from the config (CLIP-L pads with `<|endoftext|>`, its eos) so that
`tokenizer.enable_padding(length=77)` pads the way transformers does; truncation is left to the
caller (`tokenizer.enable_truncation(77)` keeps room for the two special tokens).

If the folder has a `tokenizer.json` it is loaded as is.
"""

from __future__ import annotations

import json
import os
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

__all__ = ["build_clip_tokenizer", "CLIP_SPLIT_PATTERN"]

# transformers 5.x `CLIPTokenizer` (and OpenAI's `SimpleTokenizer`); `CLIPConverter` has the same
# pattern without the two special-token alternatives, which only matters for a special token that
# reaches the pre-tokenizer as text.
CLIP_SPLIT_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")

_DEFAULTS = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
}


def _read_json(path: str) -> dict[str, Any]:
  if not os.path.isfile(path):
    return {}
  with open(path, encoding="utf-8") as f:
    data = json.load(f)
  if not isinstance(data, dict):
    raise ValueError(f"{path!r} does not hold a JSON object")
  return data


def _content(value: Any) -> str | None:
  """A token as tokenizer_config.json / special_tokens_map.json write it: a string or an
  AddedToken dict (`{"content": ..., ...}`)."""
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, dict) and isinstance(value.get("content"), str):
    return value["content"]
  raise ValueError(f"unreadable special token entry {value!r}")


def _special_tokens(folder: str) -> tuple[dict[str, str], dict[str, Any]]:
  """bos/eos/unk/pad from tokenizer_config.json, else special_tokens_map.json, else CLIP's
  defaults; and the config itself."""
  config = _read_json(os.path.join(folder, "tokenizer_config.json"))
  special_map = _read_json(os.path.join(folder, "special_tokens_map.json"))
  tokens = {key: _content(config.get(key)) or _content(special_map.get(key)) or default
            for key, default in _DEFAULTS.items()}
  return tokens, config


def _pad_token(folder: str) -> str:
  return _special_tokens(folder)[0]["pad_token"]


def _read_merges(path: str) -> list[tuple[str, str]]:
  merges = []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f.read().split("\n"), start=1):
      if not line.strip() or (number == 1 and line.startswith("#version")):
        continue
      parts = line.split(" ")
      if len(parts) != 2:
        raise ValueError(f"{path!r} line {number}: expected two symbols, got {line!r}")
      merges.append((parts[0], parts[1]))
  return merges


def build_clip_tokenizer(folder: str | os.PathLike) -> Tokenizer:
  """CLIP's tokenizer from `folder`: its `tokenizer.json` if there is one, otherwise built from
  `vocab.json` + `merges.txt` (+ the special tokens of `tokenizer_config.json` /
  `special_tokens_map.json`) as transformers' `CLIPTokenizer` builds it. Padding is enabled with
  the configured pad token (no fixed length; also for a `tokenizer.json` that sets none);
  truncation is not."""
  folder = os.fspath(folder)
  if not os.path.isdir(folder):
    raise ValueError(f"no tokenizer folder at {folder!r}")
  tokenizer_json = os.path.join(folder, "tokenizer.json")
  if os.path.isfile(tokenizer_json):
    tokenizer = Tokenizer.from_file(tokenizer_json)
    if tokenizer.padding is None:
      pad = _pad_token(folder)
      if tokenizer.token_to_id(pad) is not None:
        tokenizer.enable_padding(pad_id=tokenizer.token_to_id(pad), pad_token=pad)
    return tokenizer
  vocab_path = os.path.join(folder, "vocab.json")
  merges_path = os.path.join(folder, "merges.txt")
  missing = [os.path.basename(p) for p in (vocab_path, merges_path) if not os.path.isfile(p)]
  if missing:
    raise ValueError(
        f"{folder!r} has no tokenizer.json and no {' / '.join(missing)}: not a CLIP tokenizer folder")

  vocab = _read_json(vocab_path)
  if not vocab or not all(isinstance(i, int) for i in vocab.values()):
    raise ValueError(f"{vocab_path!r} is not a token -> id mapping")
  merges = _read_merges(merges_path)

  tokens, config = _special_tokens(folder)
  for key, value in tokens.items():
    if value not in vocab:
      raise ValueError(f"{key} {value!r} is not in {vocab_path!r}")

  tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                            end_of_word_suffix="</w>", fuse_unk=False, unk_token=tokens["unk_token"]))
  tokenizer.normalizer = normalizers.Sequence(
      [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
  tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False),
  ])
  tokenizer.decoder = decoders.ByteLevel()

  # Special tokens: those the config lists with their flags (transformers' added_tokens_decoder),
  # then bos/eos/unk/pad as plain special tokens if the config did not list them.
  added: dict[str, AddedToken] = {}
  for entry in (config.get("added_tokens_decoder") or {}).values():
    if isinstance(entry, dict) and isinstance(entry.get("content"), str):
      added[entry["content"]] = AddedToken(
          entry["content"], single_word=bool(entry.get("single_word", False)),
          lstrip=bool(entry.get("lstrip", False)), rstrip=bool(entry.get("rstrip", False)),
          normalized=bool(entry.get("normalized", False)), special=bool(entry.get("special", True)))
  for value in tokens.values():
    added.setdefault(value, AddedToken(value, special=True, normalized=False))
  special = [t for t in added.values() if t.special]
  normal = [t for t in added.values() if not t.special]
  if special:
    tokenizer.add_special_tokens(special)
  if normal:
    tokenizer.add_tokens(normal)

  bos, eos = tokens["bos_token"], tokens["eos_token"]
  tokenizer.post_processor = processors.RobertaProcessing(
      (eos, tokenizer.token_to_id(eos)), (bos, tokenizer.token_to_id(bos)),
      trim_offsets=False, add_prefix_space=False)
  pad = tokens["pad_token"]
  tokenizer.enable_padding(pad_id=tokenizer.token_to_id(pad), pad_token=pad)
  return tokenizer
