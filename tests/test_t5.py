"""T5 v1.1 encoder (OpenSora's text encoder): parity with transformers' `T5EncoderModel`, the
converter, the shared relative-position bias, tokenization and caption cleaning."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from astraea_jax.models import t5, umt5
from astraea_jax.models.tokenizer import UMT5Tokenizer
from checkpoints_convert import __main__ as cli
from checkpoints_convert import t5 as convert_t5
from checkpoints_convert.common import CheckpointError

GOLDENS = Path(__file__).resolve().parent / "goldens" / "t5"


@pytest.fixture(scope="module")
def golden():
  return np.load(GOLDENS / "t5_golden.npz")


def _rel_err(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float32) - b)) / np.max(np.abs(b)))


def test_config_from_hf_shares_the_first_bias():
  config = json.loads((GOLDENS / "text_encoder" / "config.json").read_text())
  cfg = t5.config_from_hf(config)
  assert cfg == t5.PRESETS["tiny"]
  assert cfg.shared_relative_bias
  # umT5 configs keep one bias per layer (backward compatible).
  assert not umt5.UMT5Config.from_hf_config({**config, "model_type": "umt5"}).shared_relative_bias
  with pytest.raises(ValueError, match="gated-gelu"):
    t5.config_from_hf({**config, "feed_forward_proj": "relu"})


def test_only_the_first_block_has_a_bias():
  model = nnx.eval_shape(lambda: umt5.UMT5Encoder(t5.PRESETS["tiny"], rngs=nnx.Rngs(0)))
  assert model.blocks[0].pos_embedding is not None
  assert all(b.pos_embedding is None for b in model.blocks[1:])


def test_parity_with_transformers(golden):
  cfg, params = convert_t5.load_params(GOLDENS / "text_encoder", dtype="float32")
  model = umt5.from_params(cfg, params)
  out = t5.encode_ids(model, golden["input_ids"], golden["attention_mask"])
  # Every position, padding included: OpenSora passes the raw last_hidden_state and the mask.
  assert _rel_err(out, golden["last_hidden_state"]) < 1e-4


def test_convert_cli_and_load(tmp_path, golden):
  out = tmp_path / "t5"
  assert cli.main(["t5", "--src", str(GOLDENS / "text_encoder"), "--out", str(out),
                   "--dtype", "fp32"]) == 0
  model = t5.load_encoder(out, dtype=jnp.float32)
  assert model.config.shared_relative_bias
  out_ = t5.encode_ids(model, golden["input_ids"], golden["attention_mask"])
  assert _rel_err(out_, golden["last_hidden_state"]) < 1e-4
  with pytest.raises(ValueError, match="not umt5"):
    umt5.load_encoder(out)  # the umT5 loader refuses a T5 checkpoint


def test_convert_rejects_bad_sources(tmp_path):
  with pytest.raises(CheckpointError, match="no such T5 folder"):
    convert_t5.load_params(tmp_path / "missing")
  (tmp_path / "empty").mkdir()
  with pytest.raises(CheckpointError, match="not a transformers T5 folder"):
    convert_t5.load_params(tmp_path / "empty")


def test_tokenizer_matches_transformers(golden):
  prompts = json.loads((GOLDENS / "prompts.json").read_text())["prompts"]
  tok = UMT5Tokenizer(GOLDENS / "tokenizer")
  ids, mask = tok(prompts, max_length=int(golden["seq_len"]), clean=False)
  np.testing.assert_array_equal(ids, golden["input_ids"])
  np.testing.assert_array_equal(mask, golden["attention_mask"])


def test_encode_prompts_returns_hidden_and_mask(golden):
  cfg, params = convert_t5.load_params(GOLDENS / "text_encoder", dtype="float32")
  model = umt5.from_params(cfg, params)
  tok = UMT5Tokenizer(GOLDENS / "tokenizer")
  prompts = json.loads((GOLDENS / "prompts.json").read_text())["prompts"]
  y, mask = t5.encode_prompts(model, tok, prompts, max_length=int(golden["seq_len"]),
                              preprocess=False)
  np.testing.assert_array_equal(mask, golden["attention_mask"])
  assert _rel_err(y, golden["last_hidden_state"]) < 1e-4


@pytest.mark.parametrize("raw, clean", [
    ("A Cat walks.  aesthetic score: 6.5.", "a cat walks. aesthetic score: 6.5."),
    ("Visit https://example.com/x now", "visit now"),
    ("<b>Bold</b> text by @someone", "bold text by"),
    ("a “quoted” word — dash", 'a "quoted" word - dash'),
    ("stars *** and #tags ~~", "stars and tags"),
    ("this-is-a-long-slug", "this is a long slug"),
])
def test_text_preprocessing(raw, clean):
  assert t5.text_preprocessing(raw) == clean
