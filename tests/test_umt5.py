"""umT5 encoder, tokenizer and converters against transformers and diffusers' WanPipeline.

Goldens: tests/goldens/make_umt5_goldens.py (a tiny random transformers `UMT5EncoderModel`, its
tokenizer, the same weights in Wan's `.pth` layout, and the pipeline's prompt embeddings).
"""

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from astraea_jax.models import umt5
from astraea_jax.models.tokenizer import UMT5Tokenizer, prompt_clean
from checkpoints_convert import umt5 as convert_umt5
from checkpoints_convert.common import CheckpointError

GOLDENS = pathlib.Path(__file__).parent / "goldens" / "umt5"
HF_DIR = GOLDENS / "text_encoder"
WAN_PTH = GOLDENS / "umt5_wan.pth"


@pytest.fixture(scope="module")
def golden():
  with np.load(GOLDENS / "umt5_golden.npz") as f:
    return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def prompts():
  return json.loads((GOLDENS / "prompts.json").read_text())


@pytest.fixture(scope="module")
def hf_model():
  config, params = convert_umt5.load_params(HF_DIR, dtype="float32")
  return umt5.from_params(config, params)


def _rel_err(got, want) -> float:
  return float(np.max(np.abs(np.asarray(got, np.float32) - want)) / np.max(np.abs(want)))


def test_config_from_transformers_folder_is_the_tiny_preset():
  config, _ = convert_umt5.load_source(HF_DIR)
  assert config == umt5.UMT5Config.preset("tiny")


def test_xxl_preset_matches_wan():
  config = umt5.UMT5Config.preset("umt5-xxl")
  abstract = nnx.eval_shape(lambda: umt5.UMT5Encoder(config, rngs=nnx.Rngs(0)))
  n_params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  per_layer = 4 * 4096 * 4096 + 3 * 4096 * 10240 + 32 * 64 + 2 * 4096
  assert n_params == 256384 * 4096 + 24 * per_layer + 4096  # ~5.7e9


def test_bucket_table_matches_transformers_xxl(golden):
  table = umt5.relative_position_buckets(512, 512, 32, 128)  # [M, M]
  q, k = np.meshgrid(np.arange(512), np.arange(512), indexing="ij")
  np.testing.assert_array_equal(table, golden["xxl_buckets"][k - q + 511])


@pytest.mark.parametrize("source", ["transformers", "wan_pth"])
def test_parity_with_transformers(golden, source):
  if source == "transformers":
    config, params = convert_umt5.load_params(HF_DIR, dtype="float32")
  else:
    config, params = convert_umt5.load_params(WAN_PTH, config="tiny", dtype="float32")
  model = umt5.from_params(config, params)
  hidden = model(jnp.asarray(golden["input_ids"]),
                 jnp.asarray(golden["attention_mask"]))  # [B, M, C]
  assert hidden.dtype == jnp.float32
  assert _rel_err(hidden, golden["last_hidden_state"]) < 1e-4


def test_mask_is_applied(hf_model, golden):
  ids, mask = jnp.asarray(golden["input_ids"]), jnp.asarray(golden["attention_mask"])
  valid = golden["attention_mask"].astype(bool)
  unmasked = np.asarray(hf_model(ids))  # padding tokens now take part as keys
  assert _rel_err(unmasked[valid], golden["last_hidden_state"][valid]) > 1e-2
  masked = np.asarray(hf_model(ids, mask))
  assert _rel_err(masked[valid], golden["last_hidden_state"][valid]) < 1e-4


def test_embed_zeroes_padding_like_wan_pipeline(hf_model, golden):
  embeds = np.asarray(
      hf_model.embed(jnp.asarray(golden["input_ids"]), jnp.asarray(golden["attention_mask"])))
  lengths = golden["attention_mask"].sum(-1)
  for row, n in enumerate(lengths):
    assert np.all(embeds[row, n:] == 0)
    assert np.all(np.any(embeds[row, :n] != 0, axis=-1))
  assert _rel_err(embeds, golden["prompt_embeds"]) < 1e-4


def test_encode_prompts_end_to_end(hf_model, golden, prompts):
  tokenizer = UMT5Tokenizer(GOLDENS / "tokenizer")
  embeds = umt5.encode_prompts(hf_model, tokenizer, prompts["model_prompts"],
                               max_length=prompts["seq_len"])
  assert embeds.shape == golden["prompt_embeds"].shape
  assert _rel_err(embeds, golden["prompt_embeds"]) < 1e-4


def test_bf16_weights_and_compute(golden):
  config, params = convert_umt5.load_params(WAN_PTH, config="tiny", dtype="bfloat16")
  assert all(p.dtype == ml_dtypes.bfloat16 for p in jax.tree.leaves(params))
  model = umt5.from_params(config, params, dtype=jnp.bfloat16)
  hidden = model(jnp.asarray(golden["input_ids"]), jnp.asarray(golden["attention_mask"]))
  assert hidden.dtype == jnp.bfloat16
  valid = golden["attention_mask"].astype(bool)
  assert _rel_err(np.asarray(hidden, np.float32)[valid], golden["last_hidden_state"][valid]) < 5e-2


def test_wan_config_inferred_from_shapes():
  _, state = convert_umt5.load_source(WAN_PTH, config="tiny")
  inferred = convert_umt5.infer_wan_config(state, max_distance=16)
  assert inferred == umt5.UMT5Config.preset("tiny")
  # Without an override: the preset of these shapes, else Wan's own max distance (128).
  assert convert_umt5.infer_wan_config(state) == umt5.UMT5Config.preset("tiny")
  wider = dict(state, **{"token_embedding.weight": np.zeros((64, 40), np.float32)})
  assert convert_umt5.infer_wan_config(wider).relative_attention_max_distance == 128


def test_tokenizer_matches_transformers(golden, prompts):
  tokenizer = UMT5Tokenizer(GOLDENS / "tokenizer", max_length=int(golden["tokenizer_seq_len"]))
  ids, mask = tokenizer(prompts["tokenizer_prompts"])
  np.testing.assert_array_equal(ids, golden["tokenizer_ids"])
  np.testing.assert_array_equal(mask, golden["tokenizer_mask"])
  ids, mask = tokenizer(prompts["model_prompts"], max_length=prompts["seq_len"])
  np.testing.assert_array_equal(ids, golden["input_ids"])
  np.testing.assert_array_equal(mask, golden["attention_mask"])
  # Truncation keeps the closing </s>.
  long_row = prompts["tokenizer_prompts"].index(max(prompts["tokenizer_prompts"], key=len))
  assert golden["tokenizer_ids"][long_row, -1] == tokenizer.eos_token_id


def test_tokenizer_inputs(tmp_path):
  assert prompt_clean("  a &amp;amp;\t b\n") == "a & b"
  tokenizer = UMT5Tokenizer(GOLDENS / "tokenizer")
  ids, mask = tokenizer("a cat")
  assert ids.shape == mask.shape == (1, 512) and ids.dtype == np.int32
  with pytest.raises(FileNotFoundError):
    UMT5Tokenizer(tmp_path)
  with pytest.raises(ValueError):
    tokenizer([])
  with pytest.raises(TypeError):
    tokenizer([1, 2])


def test_config_validation():
  with pytest.raises(ValueError, match="unknown umT5 preset"):
    umt5.UMT5Config.preset("umt5-small")
  with pytest.raises(ValueError, match="gated-gelu"):
    umt5.UMT5Config(feed_forward_proj="relu")
  with pytest.raises(ValueError, match="relative_attention_num_buckets"):
    umt5.UMT5Config(relative_attention_num_buckets=10)


def test_bad_inputs(hf_model):
  with pytest.raises(ValueError, match="input_ids must be"):
    hf_model(jnp.zeros((3,), jnp.int32))
  with pytest.raises(TypeError, match="integer"):
    hf_model(jnp.zeros((1, 3), jnp.float32))
  with pytest.raises(ValueError, match="attention_mask shape"):
    hf_model(jnp.zeros((1, 3), jnp.int32), jnp.ones((1, 4), jnp.int32))


def test_checkpoint_errors(tmp_path):
  with pytest.raises(CheckpointError):
    convert_umt5.load_params(tmp_path / "missing.pth")
  with pytest.raises(CheckpointError):
    convert_umt5.load_params(tmp_path)  # an empty folder
  truncated = tmp_path / "truncated.pth"
  truncated.write_bytes(WAN_PTH.read_bytes()[:40000])
  with pytest.raises(CheckpointError):
    convert_umt5.load_params(truncated, config="tiny")
  # A config that does not fit the weights.
  with pytest.raises(CheckpointError, match="shape mismatch"):
    convert_umt5.load_params(WAN_PTH, config="umt5-xxl")
  # A transformers folder whose weights are missing.
  broken = tmp_path / "text_encoder"
  broken.mkdir()
  shutil.copy(HF_DIR / "config.json", broken / "config.json")
  with pytest.raises(CheckpointError):
    convert_umt5.load_params(broken)


def test_convert_round_trip_through_orbax(tmp_path, golden):
  out = tmp_path / "umt5_tiny"
  argv = ["--src", str(WAN_PTH), "--out", str(out), "--dtype", "fp32", "--preset", "tiny"]
  assert convert_umt5.main(argv) == 0
  model = umt5.load_encoder(out, dtype=jnp.float32)
  assert model.config == umt5.UMT5Config.preset("tiny")
  hidden = model(jnp.asarray(golden["input_ids"]), jnp.asarray(golden["attention_mask"]))
  assert _rel_err(hidden, golden["last_hidden_state"]) < 1e-4
  # An existing output is refused unless overwritten; a failed conversion leaves nothing behind.
  with pytest.raises(CheckpointError, match="already exists"):
    convert_umt5.main(argv)
  failed = tmp_path / "failed"
  with pytest.raises(CheckpointError):
    convert_umt5.convert(WAN_PTH, failed, config="umt5-xxl")
  assert not failed.exists()
