"""CLIP-L text encoder (HunyuanVideo's pooled text vector): parity with transformers'
`CLIPTextModel`, eos pooling rules, and the converter's checks."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from astraea_jax.models import clip_text
from checkpoints_convert import clip_text as convert_clip
from checkpoints_convert import safetensors_io
from checkpoints_convert.common import CheckpointError

GOLDENS = Path(__file__).resolve().parent / "goldens" / "clip_text"


@pytest.fixture(scope="module")
def golden():
  return np.load(GOLDENS / "io.npz")


@pytest.fixture(scope="module")
def converted():
  return convert_clip.load_params(GOLDENS, dtype="float32")


def _rel_err(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float32) - b)) / np.max(np.abs(b)))


def _state():
  with safetensors_io.open_safetensors(GOLDENS / "model.safetensors") as st:
    return {k: np.array(st.read(k)) for k in st.keys()}


def _write_folder(path: Path, state, config=None) -> Path:
  path.mkdir(parents=True)
  if config is None:
    shutil.copy(GOLDENS / "config.json", path / "config.json")
  else:
    (path / "config.json").write_text(json.dumps(config))
  safetensors_io.save_file(state, path / "model.safetensors")
  return path


def test_config_from_hf_and_presets():
  config = json.loads((GOLDENS / "config.json").read_text())
  assert clip_text.config_from_hf(config) == clip_text.PRESETS["tiny"]
  # A full CLIPModel config.json nests the text tower; missing fields take transformers' defaults.
  nested = clip_text.config_from_hf({"model_type": "clip", "text_config": {"hidden_size": 768}})
  assert (nested.hidden_size, nested.num_attention_heads, nested.eos_token_id) == (768, 8, 49407)
  with pytest.raises(ValueError, match="model_type='t5'"):
    clip_text.config_from_hf({"model_type": "t5"})
  large = clip_text.CLIPTextConfig.preset("clip-vit-large-patch14")
  assert large.eos_token_id == clip_text.LEGACY_EOS_TOKEN_ID
  model = nnx.eval_shape(lambda: clip_text.CLIPTextModel(large, rngs=nnx.Rngs(0)))
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert sum(int(np.prod(x.shape)) for x in leaves) == 123_060_480  # CLIP-L's text tower


@pytest.mark.parametrize("kwargs, match", [
    ({"hidden_size": 30}, "self.hidden_size=30 must be a multiple"),
    ({"hidden_act": "relu"}, "self.hidden_act='relu' is not supported"),
    ({"layer_norm_eps": 0.0}, "self.layer_norm_eps=0.0 must be positive"),
    ({"num_hidden_layers": 0}, "num_hidden_layers=0 must be a positive int"),
])
def test_config_validation(kwargs, match):
  with pytest.raises(ValueError, match=match):
    dataclasses.replace(clip_text.PRESETS["tiny"], **kwargs)


def test_parity_with_transformers(golden, converted):
  cfg, params = converted
  model = clip_text.from_params(cfg, params)
  hidden, pooled = clip_text.encode_ids(model, golden["input_ids"], golden["attention_mask"])
  assert hidden.shape == golden["last_hidden_state"].shape and hidden.dtype == jnp.float32
  # Every position, padding included, as transformers returns it.
  err_hidden = _rel_err(hidden, golden["last_hidden_state"])
  err_pooled = _rel_err(pooled, golden["pooler_output"])
  print(f"max relative error: last_hidden_state {err_hidden:.2e}, pooler_output {err_pooled:.2e}")
  assert err_hidden < 1e-4
  assert err_pooled < 1e-4
  # HunyuanVideo's call: no attention mask, causal mask only.
  _, pooled_nomask = clip_text.encode_ids(model, golden["input_ids"])
  assert _rel_err(pooled_nomask, golden["pooler_output_nomask"]) < 1e-4


def test_pooling_with_a_non_legacy_eos_id(golden, converted):
  cfg, params = converted
  cfg = dataclasses.replace(cfg, eos_token_id=int(golden["eos_first_id"]))
  model = clip_text.from_params(cfg, params)
  _, pooled = clip_text.encode_ids(model, golden["input_ids"], golden["attention_mask"])
  assert _rel_err(pooled, golden["pooler_output_eos_first"]) < 1e-4
  # The two rules differ when the eos id is not the largest: argmax vs first occurrence.
  ids = np.array([[5, 9, 3, 7]], np.int32)
  legacy = clip_text.from_params(clip_text.PRESETS["tiny"], params)
  hidden, pooled_legacy = legacy(jnp.asarray(ids))
  np.testing.assert_array_equal(pooled_legacy, hidden[:, 1])
  first = clip_text.from_params(dataclasses.replace(cfg, eos_token_id=3), params)
  hidden, pooled_first = first(jnp.asarray(ids))
  np.testing.assert_array_equal(pooled_first, hidden[:, 2])


def test_bf16_params_stay_close(golden):
  cfg, params = convert_clip.load_params(GOLDENS, dtype="bf16")
  assert params["final_layer_norm"]["scale"].dtype == np.float32  # norms stay fp32
  assert params["encoder"]["layers"]["0"]["mlp"]["fc1"]["kernel"].dtype == jnp.bfloat16
  model = clip_text.from_params(cfg, params)
  _, pooled = clip_text.encode_ids(model, golden["input_ids"], golden["attention_mask"])
  assert _rel_err(pooled, golden["pooler_output"]) < 5e-2


def test_convert_and_load(tmp_path, golden):
  # A diffusers HunyuanVideo root holds the encoder under text_encoder_2/.
  root = tmp_path / "hunyuan"
  shutil.copytree(GOLDENS, root / "text_encoder_2")
  out = tmp_path / "clip"
  assert convert_clip.main(["--src", str(root), "--out", str(out), "--dtype", "fp32"]) == 0
  model = clip_text.load_encoder(out, dtype=jnp.float32)
  assert model.config == clip_text.PRESETS["tiny"]
  hidden, pooled = clip_text.encode_ids(model, golden["input_ids"], golden["attention_mask"])
  assert _rel_err(hidden, golden["last_hidden_state"]) < 1e-4
  assert _rel_err(pooled, golden["pooler_output"]) < 1e-4


def test_full_clip_model_layout_is_accepted(tmp_path, converted):
  state = {f"text_model.{k}": v for k, v in _state().items()}
  state.update({"vision_model.embeddings.class_embedding": np.zeros(8, np.float32),
                "visual_projection.weight": np.zeros((4, 8), np.float32),
                "text_projection.weight": np.zeros((4, 32), np.float32),
                "logit_scale": np.zeros((), np.float32),
                "text_model.embeddings.position_ids": np.arange(16, dtype=np.int64)[None]})
  config = {"model_type": "clip",
            "text_config": json.loads((GOLDENS / "config.json").read_text())}
  cfg, params = convert_clip.load_params(_write_folder(tmp_path / "full", state, config),
                                         dtype="float32")
  assert cfg == converted[0]
  jax.tree.map(np.testing.assert_array_equal, params, converted[1])


def test_missing_tensor_is_named(tmp_path):
  state = _state()
  del state["encoder.layers.1.mlp.fc2.weight"]
  with pytest.raises(CheckpointError,
                     match=r"1 model parameter\(s\) missing.*encoder\.layers\.1\.mlp\.fc2\.kernel"):
    convert_clip.load_params(_write_folder(tmp_path / "missing", state), dtype="float32")


def test_unused_and_misshaped_tensors_are_named(tmp_path):
  state = _state()
  state["encoder.layers.0.self_attn.extra.weight"] = np.zeros((32, 32), np.float32)
  with pytest.raises(CheckpointError,
                     match=r"unused.*encoder\.layers\.0\.self_attn\.extra\.weight"):
    convert_clip.load_params(_write_folder(tmp_path / "unused", state), dtype="float32")
  state = _state()
  state["encoder.layers.0.mlp.fc1.weight"] = state["encoder.layers.0.mlp.fc1.weight"].T.copy()
  with pytest.raises(CheckpointError, match=r"shape mismatch for encoder\.layers\.0\.mlp\.fc1"):
    convert_clip.load_params(_write_folder(tmp_path / "shape", state), dtype="float32")
  state = _state()
  state["encoder.layers.2.layer_norm1.weight"] = np.ones(32, np.float32)
  with pytest.raises(CheckpointError, match="no parameter encoder.layers.2.layer_norm1.scale"):
    convert_clip.load_params(_write_folder(tmp_path / "layers", state), dtype="float32")


def test_convert_rejects_bad_sources(tmp_path):
  with pytest.raises(CheckpointError, match="no such CLIP folder"):
    convert_clip.load_params(tmp_path / "absent")
  (tmp_path / "empty").mkdir()
  with pytest.raises(CheckpointError, match="not a transformers CLIP folder"):
    convert_clip.load_params(tmp_path / "empty")
  with pytest.raises(CheckpointError, match="unknown CLIP text preset"):
    convert_clip.load_params(GOLDENS, "clip-xxl")


def test_bad_inputs_raise(converted):
  model = clip_text.from_params(*converted)
  with pytest.raises(ValueError, match="exceeds"):
    model(jnp.zeros((1, 17), jnp.int32))
  with pytest.raises(TypeError, match="integer"):
    model(jnp.zeros((1, 4), jnp.float32))
  with pytest.raises(ValueError, match="attention_mask shape"):
    model(jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 5), jnp.int32))
