"""The word-level caption tokenizer (astraea_jax.models.word_tokenizer)."""

import inspect
import json
import warnings

import numpy as np
import pytest

from astraea_jax.data import VOCABULARY, sample_descriptions
from astraea_jax.models.tokenizer import UMT5Tokenizer
from astraea_jax.models.word_tokenizer import SPECIAL_TOKENS, WordTokenizer


@pytest.fixture(name="tok")
def _tok():
  return WordTokenizer.for_captions()


def test_caption_round_trip(tok):
  captions = [d.caption for d in sample_descriptions(0, 64)]
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # grammar captions never produce <unk>
    ids, mask = tok(captions)
  assert ids.shape == mask.shape == (64, 24) and ids.dtype == mask.dtype == np.int32
  for caption, row, m in zip(captions, ids, mask):
    n = len(caption.split())
    assert tok.decode(row) == caption
    np.testing.assert_array_equal(m, (np.arange(24) < n + 1).astype(np.int32))
    assert row[n] == tok.eos_token_id and (row[n + 1:] == tok.pad_token_id).all()
    assert (row[:n] >= len(SPECIAL_TOKENS)).all()
  assert tok.vocab_size == len(VOCABULARY) + 3


def test_ids_are_the_vocabulary_order(tok):
  ids, _ = tok("a red circle")
  expected = [3 + VOCABULARY.index(w) for w in ("a", "red", "circle")] + [1]
  np.testing.assert_array_equal(ids[0, :4], expected)
  assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)


def test_cleaning_case_and_punctuation(tok):
  a, _ = tok("A  Red circle, moving RIGHT&nbsp;on a gray background.")
  b, _ = tok("a red circle moving right on a gray background")
  np.testing.assert_array_equal(a, b)


def test_unknown_words_warn_once_naming_them(tok):
  with pytest.warns(UserWarning, match="'mauve', 'blob'") as record:
    ids, mask = tok(["a mauve blob moving right", "a blob"])
  assert len(record) == 1
  np.testing.assert_array_equal(ids[0, :6], [3 + VOCABULARY.index("a"), 2, 2,
                                             3 + VOCABULARY.index("moving"),
                                             3 + VOCABULARY.index("right"), 1])
  assert mask[0].sum() == 6


def test_empty_prompt_truncation_and_length(tok):
  ids, mask = tok("")
  np.testing.assert_array_equal(ids[0, :2], [1, 0])
  assert mask[0].sum() == 1
  long = " ".join(["red"] * 40)
  ids, mask = tok(long)
  assert mask[0].sum() == 24 and ids[0, -1] == 1  # truncated, </s> kept
  ids, mask = tok(["a red circle"], max_length=8)
  assert ids.shape == (1, 8)
  with pytest.raises(ValueError, match="max_length"):
    tok("a", max_length=1)


def test_same_call_signature_as_umt5_tokenizer(tok):
  ours = inspect.signature(WordTokenizer.__call__).parameters
  theirs = inspect.signature(UMT5Tokenizer.__call__).parameters
  assert list(ours) == list(theirs)
  for name in theirs:
    assert ours[name].kind == theirs[name].kind and ours[name].default == theirs[name].default
  for attr in ("max_length", "pad_token_id", "eos_token_id", "vocab_size"):
    assert hasattr(tok, attr)


def test_save_and_load(tok, tmp_path):
  path = tok.save(tmp_path / "tok.json")
  loaded = WordTokenizer.load(path)
  assert loaded.words == tok.words and loaded.max_length == tok.max_length
  text = ["a blue star rotating on a black striped background"]
  np.testing.assert_array_equal(loaded(text)[0], tok(text)[0])
  tok.save(tmp_path)  # a folder gets tokenizer.json
  assert WordTokenizer.load(tmp_path).words == tok.words
  assert json.loads(path.read_text())["words"] == list(VOCABULARY)


def test_bad_input(tok, tmp_path):
  with pytest.raises(ValueError, match="duplicate"):
    WordTokenizer(["red", "red"])
  with pytest.raises(ValueError, match="special"):
    WordTokenizer(["red", "</s>"])
  with pytest.raises(ValueError, match="single words"):
    WordTokenizer(["Red"])
  with pytest.raises(TypeError):
    tok([1, 2])
  with pytest.raises(ValueError, match="no prompts"):
    tok([])
  with pytest.raises(FileNotFoundError):
    WordTokenizer.load(tmp_path / "missing.json")
  (tmp_path / "bad.json").write_text("{")
  with pytest.raises(ValueError, match="JSON"):
    WordTokenizer.load(tmp_path / "bad.json")
  (tmp_path / "other.json").write_text(json.dumps({"format": "x"}))
  with pytest.raises(ValueError, match="format"):
    WordTokenizer.load(tmp_path / "other.json")
  with pytest.raises(ValueError, match="outside the vocabulary"):
    tok.decode([3, 999])
