"""astraea_jax.models.clip_tokenizer against transformers' CLIP tokenizer (goldens from
tests/goldens/make_clip_tokenizer_goldens.py: a tiny CLIP vocab.json + merges.txt folder, no
tokenizer.json)."""

from __future__ import annotations

import json
import pathlib
import shutil

import pytest

from astraea_jax.models.clip_tokenizer import build_clip_tokenizer

GOLDEN = pathlib.Path(__file__).resolve().parent / "goldens" / "clip_tokenizer"


def _io():
  with open(GOLDEN / "io.json", encoding="utf-8") as f:
    return json.load(f)


def _encode_fixed(tokenizer, texts, max_length):
  """transformers' padding="max_length", truncation=True, with the tokenizers API."""
  tokenizer.enable_truncation(max_length)
  pad = tokenizer.padding
  tokenizer.enable_padding(pad_id=pad["pad_id"], pad_token=pad["pad_token"], length=max_length)
  return tokenizer.encode_batch(texts)


def test_golden_folder_is_slow_layout():
  assert not (GOLDEN / "tokenizer.json").exists()
  for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
    assert (GOLDEN / name).is_file(), name


def test_matches_transformers_from_vocab_and_merges():
  io = _io()
  tokenizer = build_clip_tokenizer(GOLDEN)
  # CLIP-L pads with its end-of-text token.
  assert tokenizer.padding["pad_token"] == "<|endoftext|>"
  assert tokenizer.padding["pad_id"] == tokenizer.token_to_id("<|endoftext|>")
  cases = io["cases"]
  encodings = _encode_fixed(tokenizer, [c["text"] for c in cases], io["max_length"])
  for case, enc in zip(cases, encodings):
    assert enc.ids == case["input_ids"], (case["text"], enc.tokens, case["tokens"])
    assert enc.attention_mask == case["attention_mask"], case["text"]
  # Single encode (no batch) agrees too.
  for case in cases:
    assert tokenizer.encode(case["text"]).ids == case["input_ids"]


def test_plain_config_matches_transformers(tmp_path):
  """Without added_tokens_decoder (special tokens as plain strings) every special token is matched
  un-normalized, as transformers does for such a folder."""
  io = _io()
  for name in ("vocab.json", "merges.txt"):
    shutil.copy(GOLDEN / name, tmp_path)
  config = json.loads((GOLDEN / "tokenizer_config.json").read_text(encoding="utf-8"))
  config.pop("added_tokens_decoder")
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
  tokenizer = build_clip_tokenizer(tmp_path)
  cases = io["cases"]
  encodings = _encode_fixed(tokenizer, [c["text"] for c in cases], io["max_length"])
  differs = 0
  for case, enc in zip(cases, encodings):
    assert enc.ids == case["plain_config_input_ids"], case["text"]
    differs += case["plain_config_input_ids"] != case["input_ids"]
  assert differs == 1  # the capitalized <|StartOfText|> prompt


def test_defaults_without_config(tmp_path):
  """vocab.json + merges.txt alone: CLIP's default special tokens."""
  io = _io()
  for name in ("vocab.json", "merges.txt"):
    shutil.copy(GOLDEN / name, tmp_path)
  tokenizer = build_clip_tokenizer(tmp_path)
  assert tokenizer.padding["pad_token"] == "<|endoftext|>"
  cases = io["cases"]
  for case, enc in zip(cases, _encode_fixed(tokenizer, [c["text"] for c in cases], io["max_length"])):
    assert enc.ids == case["plain_config_input_ids"], case["text"]


def test_loads_tokenizer_json(tmp_path):
  io = _io()
  built = build_clip_tokenizer(GOLDEN)
  built.no_padding()
  built.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "vocab.json").write_text("not read", encoding="utf-8")  # tokenizer.json wins
  for name in ("tokenizer_config.json", "special_tokens_map.json"):
    shutil.copy(GOLDEN / name, tmp_path)
  tokenizer = build_clip_tokenizer(tmp_path)
  assert tokenizer.padding["pad_token"] == "<|endoftext|>"  # set from the config
  cases = io["cases"]
  encodings = _encode_fixed(tokenizer, [c["text"] for c in cases], io["max_length"])
  for case, enc in zip(cases, encodings):
    assert enc.ids == case["input_ids"], case["text"]
    assert enc.attention_mask == case["attention_mask"], case["text"]


def test_decode_round_trip():
  tokenizer = build_clip_tokenizer(GOLDEN)
  ids = tokenizer.encode("A photo of a CAT.").ids
  assert tokenizer.decode(ids).replace("</w>", " ").split() == ["a", "photo", "of", "a", "cat", "."]


def test_errors(tmp_path):
  with pytest.raises(ValueError, match="no tokenizer.json and no vocab.json / merges.txt"):
    build_clip_tokenizer(tmp_path)
  (tmp_path / "vocab.json").write_text("{}", encoding="utf-8")
  with pytest.raises(ValueError, match="no merges.txt"):
    build_clip_tokenizer(tmp_path)
  with pytest.raises(ValueError, match="no tokenizer folder"):
    build_clip_tokenizer(tmp_path / "missing")
