"""HunyuanVideo end to end on a tiny random release folder against diffusers' `HunyuanVideoPipeline`.

The golden (`tests/goldens/make_hunyuan_pipeline_goldens.py`) is a whole diffusers folder (transformer,
Llama and CLIP text encoders with their tokenizers, 3D VAE, flow-match Euler with shift 7) and what
diffusers computed on it: token ids, the cropped Llama embeddings and mask, CLIP's pooled vector, the
sigmas and timesteps, the final latents of 3 steps from a fixed noise, and their decode.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from astraea_jax.acceleration import BudgetSchedule
from astraea_jax.pipeline import GenerationError
from astraea_jax.pipeline_hunyuan import HunyuanGenerationConfig, TextTemplate
from astraea_jax.sampling.schedulers import flow_sigmas
from checkpoints_convert import hunyuan_t2v
from checkpoints_convert.common import CheckpointError

GOLDEN = Path(__file__).parent / "goldens" / "hunyuan_pipeline"
FOLDER = GOLDEN / "diffusers"


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def golden():
  meta = json.loads((GOLDEN / "meta.json").read_text())
  with np.load(GOLDEN / "golden.npz") as f:
    arrays = {k: f[k] for k in f.files}
  return meta, arrays


@pytest.fixture(scope="module")
def pipe(golden):
  meta, _ = golden
  template = TextTemplate(template=meta["prompt_template"]["template"],
                          crop_start=meta["crop_start"],
                          max_sequence_length=meta["max_sequence_length"],
                          skip_layers=meta["num_hidden_layers_to_skip"])
  return hunyuan_t2v.load_pipeline(FOLDER, dtype="fp32", template=template)


def request(meta) -> HunyuanGenerationConfig:
  return HunyuanGenerationConfig(height=meta["height"], width=meta["width"], frames=meta["frames"],
                                 steps=meta["steps"], guidance=meta["guidance"], seed=meta["seed"])


def test_detects_the_folder():
  assert hunyuan_t2v.is_release(FOLDER)
  assert not hunyuan_t2v.is_release(GOLDEN)


def test_text_encoding_matches_diffusers(pipe, golden):
  meta, g = golden
  tpl = pipe.template
  ids, mask = pipe.tokenizer([tpl.template.format(p) for p in meta["prompts"]],
                             max_length=tpl.max_sequence_length + tpl.crop_start)
  np.testing.assert_array_equal(ids, g["input_ids"])
  np.testing.assert_array_equal(mask, g["input_ids_mask"])
  clip_ids, _ = pipe.tokenizer_2(meta["prompts"], max_length=77)
  np.testing.assert_array_equal(clip_ids, g["clip_input_ids"])
  text, text_mask, pooled = pipe.encode_text(meta["prompts"])
  np.testing.assert_array_equal(np.asarray(text_mask), g["prompt_attention_mask"])
  assert rel_err(text, g["prompt_embeds"]) < 1e-5
  assert rel_err(pooled, g["pooled_prompt_embeds"]) < 1e-5


def test_sigmas_and_timesteps_match_diffusers(golden):
  meta, g = golden
  sigmas, timesteps = flow_sigmas(meta["steps"], sigma_schedule="hunyuan", shift=meta["shift"])
  np.testing.assert_allclose(sigmas, g["sigmas"], rtol=1e-6)
  np.testing.assert_allclose(timesteps, g["timesteps"], rtol=1e-6)


def test_dense_generation_matches_diffusers(pipe, golden):
  meta, g = golden
  out = pipe.generate(meta["prompts"], request(meta), noise=g["noise"], progress=False)
  err = rel_err(out.latents, g["latents"])
  print(f"final latents vs diffusers: max relative error {err:.2e}")
  assert err < 1e-4, err
  video = pipe.decode(out.latents)
  assert rel_err(video, g["video"]) < 1e-4
  assert out.frames.shape == (2, meta["frames"], meta["height"], meta["width"], 3)
  assert out.frames.dtype == np.uint8


def test_astraea_full_budget_is_dense_and_half_budget_differs(pipe, golden):
  meta, g = golden
  cfg = request(meta)
  dense = pipe.generate(meta["prompts"], cfg, noise=g["noise"], progress=False).latents
  full = pipe.generate(meta["prompts"], cfg, noise=g["noise"], progress=False,
                       schedule=BudgetSchedule.uniform(cfg.steps, 1.0)).latents
  assert rel_err(full, dense) < 1e-4
  half = pipe.generate(meta["prompts"], cfg, noise=g["noise"], progress=False,
                       schedule=BudgetSchedule.uniform(cfg.steps, 0.5)).latents
  assert np.all(np.isfinite(half)) and rel_err(half, dense) > 1e-3


def test_prompts_split_over_devices_match_one_device(pipe, golden):
  """The golden's two prompts on two devices (one row each: the guidance is embedded)."""
  meta, g = golden
  cfg = request(meta)
  for schedule in (None, BudgetSchedule.uniform(cfg.steps, 0.5)):
    one = pipe.generate(meta["prompts"], cfg, noise=g["noise"], progress=False, schedule=schedule)
    two = pipe.generate(meta["prompts"], cfg, noise=g["noise"], progress=False, schedule=schedule,
                        devices=2)
    assert rel_err(two.latents, one.latents) < 1e-5
  with pytest.raises(GenerationError, match="3 devices do not split the request's 2 batch rows"):
    pipe.generate(meta["prompts"], cfg, noise=g["noise"], progress=False, devices=3)


def test_bad_requests(pipe, golden):
  meta, _ = golden
  cfg = request(meta)
  with pytest.raises(GenerationError, match="multiple of 16x16"):
    pipe.generate(["a fox"], dataclasses.replace(cfg, height=40), progress=False)
  with pytest.raises(GenerationError, match="4 k \\+ 1"):
    pipe.generate(["a fox"], dataclasses.replace(cfg, frames=8), progress=False)
  with pytest.raises(GenerationError, match="non-empty"):
    pipe.generate([" "], cfg, progress=False)


def test_bad_folders(tmp_path):
  with pytest.raises(CheckpointError, match="does not exist"):
    hunyuan_t2v.load_pipeline(tmp_path / "nothing")
  broken = tmp_path / "HunyuanVideo"
  shutil.copytree(FOLDER, broken)
  shutil.rmtree(broken / "vae")
  with pytest.raises(CheckpointError, match="lacks vae"):
    hunyuan_t2v.load_pipeline(broken)


def test_generate_cli_runs_a_hunyuan_folder(tmp_path, capsys):
  from astraea_jax import generate
  from astraea_jax.acceleration import BudgetSchedule
  folder = tmp_path / "HunyuanVideo"
  shutil.copytree(FOLDER, folder)
  # HunyuanVideo's own template needs 95 + 256 positions; RoPE has no weights, so only the config
  # of the tiny Llama changes.
  config_file = folder / "text_encoder" / "config.json"
  config = json.loads(config_file.read_text())
  config_file.write_text(json.dumps(dict(config, max_position_embeddings=512)))
  out = tmp_path / "fox.mp4"
  rc = generate.main(["--model", str(folder), "--prompt", "a red fox walks on the grass", "--size",
                      "48x32", "--frames", "9", "--steps", "2", "--budget", "0.5", "--out",
                      str(out)])
  assert rc == 0, capsys.readouterr().err
  assert out.stat().st_size > 0
  # The folder's searched schedules stand in for --budget at their mean and length.
  (folder / "schedules").mkdir()
  BudgetSchedule.from_thetas([1.0, 0.0], name="whole-0.5").save(folder / "schedules" / "b.json")
  rc = generate.main(["--model", str(folder), "--prompt", "a red fox walks on the grass", "--size",
                      "48x32", "--frames", "9", "--steps", "2", "--budget", "0.5", "--no-gif",
                      "--out", str(out)])
  err = capsys.readouterr().err
  assert rc == 0 and "the model's searched schedule 'whole-0.5'" in err, err


def test_generate_cli_bad_hunyuan_folder(tmp_path, capsys, golden):
  from astraea_jax import generate
  meta, _ = golden
  broken = tmp_path / "HunyuanVideo"
  shutil.copytree(FOLDER, broken)
  (broken / "text_encoder_2" / "model.safetensors").write_bytes(b"\0" * 16)
  out = tmp_path / "v.mp4"
  rc = generate.main(["--model", str(broken), "--prompt", meta["prompts"][0], "--size", "48x32",
                      "--frames", "9", "--steps", "2", "--out", str(out)])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 1 and err[-1].startswith("error:") and "text_encoder_2" in err[-1]
  assert not out.exists()


def test_check_command(capsys):
  from checkpoints_convert import __main__ as cli
  assert cli.main(["hunyuan_t2v", "--src", str(FOLDER), "--dtype", "fp32"]) == 0
  assert "every component read and checked" in capsys.readouterr().out
  assert cli.main(["hunyuan_t2v", "--src", str(GOLDEN)]) == 1
  assert "not a HunyuanVideo folder" in capsys.readouterr().err
