"""HunyuanVideo's Llama-3 text encoder: parity with transformers' `LlamaModel` (every hidden state,
right and left padding), `skip_layers`, the converter's layouts and errors, and diffusers' prompt
rule."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from astraea_jax.models import llama_text
from astraea_jax.models.llama_text import LlamaTextConfig
from checkpoints_convert import __main__ as cli
from checkpoints_convert import llama_text as convert_llama
from checkpoints_convert import safetensors_io
from checkpoints_convert.common import CheckpointError

GOLDENS = Path(__file__).resolve().parent / "goldens" / "llama_text"


@pytest.fixture(scope="module")
def golden():
  return np.load(GOLDENS / "io.npz")


@pytest.fixture(scope="module")
def converted():
  return convert_llama.load_params(GOLDENS, dtype="float32")


@pytest.fixture(scope="module")
def model(converted):
  return llama_text.from_params(*converted)


def _rel_err(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float32) - b)) / np.max(np.abs(b)))


def _hf_config() -> dict:
  return json.loads((GOLDENS / "config.json").read_text())


def test_config_from_hf_and_presets():
  assert LlamaTextConfig.from_hf_config(_hf_config()) == llama_text.PRESETS["tiny"]
  # transformers 4.x spelling (top-level rope_theta, rope_scaling null), as HunyuanVideo ships it.
  old = {k: v for k, v in _hf_config().items() if k not in ("rope_parameters", "head_dim")}
  old.update(rope_theta=500000.0, rope_scaling=None)
  assert LlamaTextConfig.from_hf_config(old) == llama_text.PRESETS["tiny"]
  big = llama_text.PRESETS["llava-llama-3-8b"]
  assert (big.vocab_size, big.hidden_size, big.intermediate_size, big.num_hidden_layers,
          big.num_attention_heads, big.num_key_value_heads, big.head_dim, big.rms_norm_eps,
          big.rope_theta) == (128320, 4096, 14336, 32, 32, 8, 128, 1e-5, 500000.0)


@pytest.mark.parametrize("change, match", [
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "llama3"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "linear"),
    ({"hidden_act": "gelu"}, "silu"),
    ({"attention_bias": True}, "attention_bias"),
    ({"head_dim": 16}, "head_dim"),
    ({"model_type": "t5"}, "model_type"),
    ({"num_key_value_heads": 3}, r"self.num_attention_heads=4 must be a multiple of "
     r"self.num_key_value_heads=3"),
])
def test_config_from_hf_rejects(change, match):
  with pytest.raises(ValueError, match=match):
    LlamaTextConfig.from_hf_config({**_hf_config(), **change})


def test_config_validation():
  with pytest.raises(ValueError, match=r"self.hidden_size=30 must be a multiple"):
    LlamaTextConfig(hidden_size=30, num_attention_heads=4, num_key_value_heads=2)
  with pytest.raises(ValueError, match=r"self.head_dim=3 must be even"):
    LlamaTextConfig(hidden_size=12, num_attention_heads=4, num_key_value_heads=2)
  with pytest.raises(ValueError, match=r"self.rms_norm_eps=0.0 must be positive"):
    LlamaTextConfig(rms_norm_eps=0.0)
  with pytest.raises(ValueError, match="num_hidden_layers=0"):
    LlamaTextConfig(num_hidden_layers=0)
  with pytest.raises(ValueError, match="unknown Llama text encoder preset"):
    LlamaTextConfig.preset("llama-2")


@pytest.mark.parametrize("prefix", ["", "left_"])
def test_parity_every_hidden_state(model, golden, prefix):
  ids, mask = golden[f"{prefix}input_ids"], golden[f"{prefix}attention_mask"]
  ref = golden[f"{prefix}hidden_states"]  # [L + 1, B, S, C]
  out = model.hidden_states(jnp.asarray(ids), jnp.asarray(mask))
  assert len(out) == ref.shape[0] == model.config.num_hidden_layers + 1
  valid = mask.astype(bool)
  for i, (got, want) in enumerate(zip(out, ref)):
    got = np.asarray(got)
    assert got.shape == want.shape and got.dtype == np.float32
    assert _rel_err(got[valid], want[valid]) < 1e-4, f"hidden_states[{i}], valid positions"
    # Padded positions too: with right padding each query still sees the first tokens; with left
    # padding a leading pad query sees no key and gets a zero attention output, as PyTorch's sdpa.
    assert _rel_err(got, want) < 1e-4, f"hidden_states[{i}], all positions"


def test_skip_layers_returns_one_hidden_state_jitted(model, golden):
  ids, mask = jnp.asarray(golden["input_ids"]), jnp.asarray(golden["attention_mask"])
  ref = golden["hidden_states"]
  graphdef, state = nnx.split(model)

  @jax.jit
  def hunyuan(state, ids, mask):
    return nnx.merge(graphdef, state)(ids, mask, skip_layers=llama_text.HUNYUAN_SKIP_LAYERS)

  assert _rel_err(hunyuan(state, ids, mask), ref[-3]) < 1e-4
  for skip in range(model.config.num_hidden_layers + 1):
    assert _rel_err(model(ids, mask, skip_layers=skip), ref[-(skip + 1)]) < 1e-4, skip


def test_hunyuan_prompt_rule_matches_diffusers():
  pipe = json.loads((GOLDENS / "pipeline.json").read_text())
  assert llama_text.HUNYUAN_PROMPT_TEMPLATE == pipe["template"]
  assert llama_text.HUNYUAN_CROP_START == pipe["crop_start"]
  assert llama_text.HUNYUAN_MAX_SEQUENCE_LENGTH == pipe["max_sequence_length"]
  assert llama_text.HUNYUAN_SKIP_LAYERS == pipe["num_hidden_layers_to_skip"]


def test_bad_inputs(model, golden):
  ids, mask = jnp.asarray(golden["input_ids"]), jnp.asarray(golden["attention_mask"])
  with pytest.raises(ValueError, match=r"input_ids must be \[B, S\]"):
    model(ids[0], mask[0])
  with pytest.raises(TypeError, match="integer token ids"):
    model(ids.astype(jnp.float32), mask)
  with pytest.raises(ValueError, match="attention_mask shape"):
    model(ids, mask[:, :-1])
  with pytest.raises(ValueError, match=r"skip_layers=4 must be an integer in \[0, 3\]"):
    model(ids, mask, skip_layers=4)
  with pytest.raises(ValueError, match="skip_layers=-1"):
    model(ids, mask, skip_layers=-1)
  too_long = jnp.zeros((1, model.config.max_position_embeddings + 1), jnp.int32)
  with pytest.raises(ValueError, match="exceeds self.config.max_position_embeddings=64"):
    model(too_long)


def _write_causal_lm_variant(root: Path, *, extra=None, drop=None) -> Path:
  """The golden weights as a sharded `LlamaForCausalLM` (`model.` prefix, `lm_head`, a stale
  `rotary_emb.inv_freq`) in `root/text_encoder/`, like a diffusers HunyuanVideo release."""
  folder = root / "text_encoder"
  folder.mkdir(parents=True)
  shutil.copy(GOLDENS / "config.json", folder / "config.json")
  state = {f"model.{k}": np.array(v) for k, v in safetensors_io.load_folder(GOLDENS)}
  state["lm_head.weight"] = state["model.embed_tokens.weight"].copy()
  state["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)
  state.update(extra or {})
  for key in drop or ():
    del state[key]
  keys = sorted(state)
  shards = {"model-00001-of-00002.safetensors": keys[::2],
            "model-00002-of-00002.safetensors": keys[1::2]}
  for name, names in shards.items():
    safetensors_io.save_file({k: state[k] for k in names}, folder / name)
  (folder / "model.safetensors.index.json").write_text(json.dumps(
      {"weight_map": {k: name for name, names in shards.items() for k in names}}))
  return root


def test_convert_causal_lm_layout_sharded_subfolder(tmp_path, converted):
  cfg, params = convert_llama.load_params(_write_causal_lm_variant(tmp_path), dtype="float32")
  assert cfg == converted[0]
  flat = jax.tree_util.tree_leaves_with_path(params)
  ref = dict(jax.tree_util.tree_leaves_with_path(converted[1]))
  assert len(flat) == len(ref) == 2 + 9 * cfg.num_hidden_layers
  for path, value in flat:
    np.testing.assert_array_equal(value, ref[path])
  # Linear weights become Flax kernels [in, out]: k_proj maps C=32 to G * D = 16.
  assert params["layers"]["0"]["self_attn"]["k_proj"]["kernel"].shape == (32, 16)
  # bf16 conversion by default.
  _, bf16 = convert_llama.load_params(tmp_path, config="tiny")
  assert bf16["norm"]["weight"].dtype == np.dtype("bfloat16")


def test_convert_rejects_bad_sources(tmp_path):
  with pytest.raises(CheckpointError, match="no such Llama folder"):
    convert_llama.load_params(tmp_path / "missing")
  (tmp_path / "empty").mkdir()
  with pytest.raises(CheckpointError, match="not a transformers Llama folder"):
    convert_llama.load_params(tmp_path / "empty")
  extra = _write_causal_lm_variant(
      tmp_path / "extra", extra={"model.layers.0.self_attn.q_proj.bias": np.zeros(32, np.float32)})
  with pytest.raises(CheckpointError, match=r"1 unused tensor\(s\).*q_proj.bias"):
    convert_llama.load_params(extra)
  missing = _write_causal_lm_variant(tmp_path / "missing_norm", drop=["model.norm.weight"])
  with pytest.raises(CheckpointError, match=r"1 model parameter\(s\) missing.*norm.weight"):
    convert_llama.load_params(missing)
  with pytest.raises(CheckpointError, match="shape mismatch for embed_tokens.embedding"):
    convert_llama.load_params(GOLDENS, config="llava-llama-3-8b")
  fewer = LlamaTextConfig(**{**llama_text.PRESETS["tiny"].__dict__, "num_hidden_layers": 2})
  with pytest.raises(CheckpointError, match="has no parameter layers.2"):
    convert_llama.load_params(GOLDENS, config=fewer)
  with pytest.raises(CheckpointError, match="unknown Llama text encoder preset"):
    convert_llama.load_params(GOLDENS, config="llama-2")


def test_convert_cli_and_load(tmp_path, golden):
  out = tmp_path / "llama"
  assert "llama_text" in cli.families()
  assert cli.main(["llama_text", "--src", str(GOLDENS), "--out", str(out), "--dtype", "fp32"]) == 0
  model = llama_text.load_text_encoder(out, dtype=jnp.float32)
  assert model.config == llama_text.PRESETS["tiny"]
  ids, mask = jnp.asarray(golden["input_ids"]), jnp.asarray(golden["attention_mask"])
  assert _rel_err(model(ids, mask, skip_layers=2), golden["hidden_states"][-3]) < 1e-4
  # bf16 compute and storage stays close (fp32 norms, RoPE and softmax).
  bf16 = llama_text.load_text_encoder(out, dtype=jnp.bfloat16)
  assert _rel_err(bf16(ids, mask, skip_layers=2), golden["hidden_states"][-3]) < 5e-2
