"""Tiny random OpenSora v1.2 components in their released layouts, for the VAE and pipeline tests.

Nothing here is a golden: the weights are random, written under the original key names so that the
converters (`checkpoints_convert.{opensora_vae,t5,opensora_t2v}`) run on them as on the releases.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np

from astraea_jax.models import opensora_vae as ov
from checkpoints_convert import opensora_vae as convert_vae
from checkpoints_convert import safetensors_io

REPO = Path(__file__).resolve().parent.parent
GOLDENS = REPO / "tests" / "goldens"
SPATIAL_GOLDEN = GOLDENS / "opensora_vae" / "spatial_vae.safetensors"
STDIT3_WEIGHTS = GOLDENS / "opensora_v1_2" / "stdit3_tiny_weights.safetensors"
T5_TOKENIZER = GOLDENS / "t5" / "tokenizer"


def keyed_tensor(key: str, shape: tuple[int, ...]) -> np.ndarray:
  """The random value of the released tensor `key` (PyTorch layout), seeded by the key's CRC-32 so
  that tests/goldens/make_opensora_vae_goldens.py gives the reference model the same weights:
  convs N(0, 1) / sqrt(fan_in), norm weights 1 + 0.2 N, biases 0.1 N."""
  rng = np.random.default_rng(zlib.crc32(key.encode()))
  x = rng.standard_normal(shape)
  if key.endswith(".bias"):
    x = 0.1 * x
  elif len(shape) == 1:
    x = 1 + 0.2 * x
  else:
    x = x / np.sqrt(np.prod(shape[1:]))
  return x.astype(np.float32)


def temporal_state(config: ov.OpenSoraVAEConfig) -> dict[str, np.ndarray]:
  """`temporal_vae.*` decoder tensors (PyTorch layout, `keyed_tensor` values) for `config`."""
  out = {}
  for name, (shape, _) in convert_vae.expected_params(config, np.float32).items():
    if not name.startswith("temporal."):
      continue
    rest = name[len("temporal."):]
    if rest.endswith(".kernel"):  # [kt, kh, kw, I, O] -> [O, I, kt, kh, kw]
      key = f"temporal_vae.{rest[:-len('.kernel')]}.weight"
      out[key] = keyed_tensor(key, (shape[4], shape[3], *shape[:3]))
    else:
      out[f"temporal_vae.{rest}"] = keyed_tensor(f"temporal_vae.{rest}", shape)
  # The encoder half of the release is not ported; a tensor of it must be skipped, not rejected.
  out["temporal_vae.encoder.conv_in.conv.weight"] = np.zeros((8, 4, 3, 3, 3), np.float32)
  out["temporal_vae.quant_conv.conv.weight"] = np.zeros((8, 8, 1, 1, 1), np.float32)
  return out


def released_vae_state(config: ov.OpenSoraVAEConfig = ov.PRESETS["tiny"],
                       scale=(1.5, 2.0, 0.5, 3.0), shift=(0.1, -0.2, 0.3, 0.0)
                       ) -> dict[str, np.ndarray]:
  """A tiny `VideoAutoencoderPipeline` state dict: the golden AutoencoderKL + a random temporal VAE
  + the scale/shift buffers."""
  state = dict(safetensors_io.load_folder(SPATIAL_GOLDEN))
  state = {k: np.array(v) for k, v in state.items()}
  state.update(temporal_state(config))
  # Registered as `scale[None, :, None, None, None]` buffers, so saved as [1, C, 1, 1, 1].
  state["scale"] = np.asarray(scale, np.float32).reshape(1, -1, 1, 1, 1)
  state["shift"] = np.asarray(shift, np.float32).reshape(1, -1, 1, 1, 1)
  return state


def write_released_vae(folder: Path, **kwargs) -> Path:
  folder.mkdir(parents=True, exist_ok=True)
  safetensors_io.save_file(released_vae_state(**kwargs), folder / "model.safetensors")
  return folder


def write_hf_t5(folder: Path, *, d_model: int = 16, vocab: int = 128, layers: int = 2,
                heads: int = 2, d_kv: int = 8, d_ff: int = 24, buckets: int = 8,
                max_distance: int = 16, seed: int = 0) -> Path:
  """A random transformers `T5EncoderModel` folder (config.json + model.safetensors)."""
  rng = np.random.default_rng(seed)
  inner = heads * d_kv
  lin = lambda o, i: (rng.standard_normal((o, i)) / np.sqrt(i)).astype(np.float32)  # noqa: E731
  norm = lambda: (1 + 0.2 * rng.standard_normal(d_model)).astype(np.float32)  # noqa: E731
  st = {"shared.weight": rng.standard_normal((vocab, d_model)).astype(np.float32),
        "encoder.final_layer_norm.weight": norm()}
  for i in range(layers):
    p = f"encoder.block.{i}.layer."
    for n in "qkv":
      st[f"{p}0.SelfAttention.{n}.weight"] = lin(inner, d_model)
    st[f"{p}0.SelfAttention.o.weight"] = lin(d_model, inner)
    st[f"{p}0.layer_norm.weight"] = norm()
    st[f"{p}1.DenseReluDense.wi_0.weight"] = lin(d_ff, d_model)
    st[f"{p}1.DenseReluDense.wi_1.weight"] = lin(d_ff, d_model)
    st[f"{p}1.DenseReluDense.wo.weight"] = lin(d_model, d_ff)
    st[f"{p}1.layer_norm.weight"] = norm()
  st["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = (
      rng.standard_normal((buckets, heads)).astype(np.float32))
  folder.mkdir(parents=True, exist_ok=True)
  safetensors_io.save_file(st, folder / "model.safetensors")
  config = {"model_type": "t5", "architectures": ["T5EncoderModel"], "vocab_size": vocab,
            "d_model": d_model, "d_kv": d_kv, "num_heads": heads, "d_ff": d_ff,
            "num_layers": layers, "relative_attention_num_buckets": buckets,
            "relative_attention_max_distance": max_distance, "feed_forward_proj": "gated-gelu",
            "layer_norm_epsilon": 1e-6, "tie_word_embeddings": False}
  (folder / "config.json").write_text(json.dumps(config))
  return folder
