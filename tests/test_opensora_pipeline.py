"""OpenSora v1.2 text-to-video pipeline on tiny random components: the converted folder, dense and
ASTRAEA generation, agreement with `rflow.sample`, and clear errors for bad folders and requests."""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from astraea_jax import checkpoint
from astraea_jax import pipeline_opensora as po
from astraea_jax.acceleration import BudgetSchedule
from astraea_jax.pipeline import GenerationError
from astraea_jax.pipelines import ModelLoadError
from astraea_jax.sampling import rflow
from checkpoints_convert import __main__ as cli
from opensora_tiny import STDIT3_WEIGHTS, T5_TOKENIZER, write_hf_t5, write_released_vae

TEXT_LENGTH = 8  # the tiny STDiT3's model_max_length
PROMPT = "a red fox runs through the snowy forest"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("opensora")
  t5_dir = write_hf_t5(tmp / "t5-v1_1-tiny", d_model=16)  # = the tiny STDiT3's caption_channels
  vae_dir = write_released_vae(tmp / "OpenSora-VAE-tiny")
  out = tmp / "OpenSora-tiny"
  assert cli.main(["opensora_t2v", "--transformer", str(STDIT3_WEIGHTS), "--text-encoder",
                   str(t5_dir), "--vae", str(vae_dir), "--tokenizer", str(T5_TOKENIZER), "--out",
                   str(out), "--dtype", "fp32", "--vae-preset", "tiny", "--text-length",
                   str(TEXT_LENGTH)]) == 0
  return out


@pytest.fixture(scope="module")
def pipe(folder):
  return po.load_opensora_pipeline(folder)


@pytest.fixture(scope="module")
def cfg(pipe):
  # Tiny VAE: 4x spatial compression; 17 frames -> 5 latent frames; 8x12 latents -> 5*4*6 tokens.
  return dataclasses.replace(pipe.defaults, height=32, width=48, frames=17, steps=3)


def test_folder_layout_and_detection(folder, tmp_path):
  assert sorted(p.name for p in folder.iterdir()) == [
      "pipeline.json", "text_encoder", "tokenizer", "transformer", "vae"]
  meta = json.loads((folder / "pipeline.json").read_text())
  assert meta["family"] == "opensora" and meta["text_length"] == TEXT_LENGTH
  assert po.is_opensora_folder(folder)
  assert not po.is_opensora_folder(tmp_path / "missing")
  wan_like = tmp_path / "wan"
  for c in po.COMPONENTS:
    (wan_like / c).mkdir(parents=True)
  assert not po.is_opensora_folder(wan_like)
  (wan_like / "pipeline.json").write_text('{"default_shift": 3.0}')
  assert not po.is_opensora_folder(wan_like)


def test_defaults_are_the_reference_sample_config(pipe):
  d = po.OpenSoraGenerationConfig()
  assert (d.height, d.width, d.frames, d.steps, d.guidance, d.aes, d.fps) == (
      240, 426, 51, 30, 7.0, 6.5, 24)
  assert pipe.fps == 24 and pipe.default_prompt is None and pipe.name == "OpenSora-tiny"
  assert pipe.latent_shape(dataclasses.replace(d, height=32, width=48, frames=51)) == (4, 15, 8, 12)


@pytest.fixture(scope="module")
def noise(pipe, cfg):
  c, t, y, x = pipe.latent_shape(cfg)
  assert (c, t, y, x) == (4, 5, 8, 12)
  return np.random.default_rng(0).standard_normal((1, c, t, y, x)).astype(np.float32)


@pytest.fixture(scope="module")
def dense(pipe, cfg, noise):
  return pipe.generate([PROMPT], cfg, progress=False, noise=noise)


def test_generate_dense_matches_rflow_sample(pipe, cfg, noise, dense):
  result = dense
  assert result.frames.shape == (1, 17, 32, 48, 3) and result.frames.dtype == np.uint8
  assert result.latents.shape == (1, 4, 5, 8, 12) and np.isfinite(result.latents).all()
  assert result.num_tokens == 5 * 4 * 6 and result.schedule is None
  assert len(result.denoise_stats.step_seconds) == 3
  assert result.total_seconds >= result.encode_seconds + result.decode_seconds > 0
  assert 0 < result.frames.std()  # not a constant video

  # The same run through `rflow.sample` (the golden-tested port of RFLOW.sample), fed the
  # pipeline's own text features: the loop, guidance, timesteps and conditioning agree.
  texts = rflow.append_score_to_prompts([PROMPT])
  y_text, mask = pipe.encode_text(texts)
  model = pipe.transformer
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda st, *a, **k: nnx.merge(graphdef, st)(*a, **k))
  model_fn = lambda *a, **k: forward(state, *a, **k)  # noqa: E731
  info = rflow.multi_resolution_info(1, (cfg.height, cfg.width), cfg.frames, cfg.fps,
                                     dtype=ml_dtypes.bfloat16)
  ref = rflow.sample(model_fn, jnp.asarray(noise), y=y_text, y_null=model.null_caption(1),
                     model_args={k: info[k].astype(np.float32) if k in ("fps",) else info[k]
                                 for k in ("height", "width", "num_frames", "fps")},
                     text_mask=mask, config=rflow.RFlowConfig(num_sampling_steps=3))
  np.testing.assert_allclose(result.latents, np.asarray(ref), rtol=2e-4, atol=2e-4)


def test_generate_with_budget(pipe, cfg, noise, dense):
  prompts = [PROMPT]
  full = pipe.generate(prompts, cfg, progress=False, noise=noise,
                       schedule=BudgetSchedule.uniform(3, 1.0))
  # theta = 1 computes every position at every step: the dense result, to rounding.
  np.testing.assert_allclose(full.latents, dense.latents, rtol=1e-3, atol=1e-3)
  half = pipe.generate(prompts, cfg, progress=False, noise=noise,
                       schedule=BudgetSchedule.dense_then(3, 0.5, dense_steps=1))
  assert half.frames.shape == (1, 17, 32, 48, 3) and np.isfinite(half.latents).all()
  assert half.schedule is not None and half.num_tokens == dense.num_tokens
  assert not np.allclose(half.latents, dense.latents)


def test_rows_split_over_devices_match_one_device(pipe, cfg, noise, dense):
  """CFG's cond and uncond halves on 2 devices, and 2 prompts x 2 halves on 4: the same latents
  as one device (each device runs the same program on fewer rows), dense and with a budget."""
  schedule = BudgetSchedule((1.0, 0.5, 0.0))
  two = pipe.generate([PROMPT], cfg, progress=False, noise=noise, devices=2)
  np.testing.assert_allclose(two.latents, dense.latents, rtol=1e-5, atol=1e-5)
  one = pipe.generate([PROMPT], cfg, progress=False, noise=noise, schedule=schedule)
  two = pipe.generate([PROMPT], cfg, progress=False, noise=noise, schedule=schedule, devices=2)
  np.testing.assert_allclose(two.latents, one.latents, rtol=1e-5, atol=1e-5)
  assert [r.blocks for r in two.step_records] == [r.blocks for r in one.step_records]
  prompts = [PROMPT, "a blue bird flies over the sea"]
  noise2 = np.concatenate([noise, noise[:, ::-1]], axis=0)
  one = pipe.generate(prompts, cfg, progress=False, noise=noise2, schedule=schedule)
  four = pipe.generate(prompts, cfg, progress=False, noise=noise2, schedule=schedule, devices=4)
  np.testing.assert_allclose(four.latents, one.latents, rtol=1e-5, atol=1e-5)
  assert not np.allclose(four.latents[0], four.latents[1])


def test_request_errors(pipe, cfg):
  with pytest.raises(GenerationError, match="non-empty"):
    pipe.generate([" "], cfg, progress=False)
  with pytest.raises(GenerationError, match="schedule has 2 steps"):
    pipe.generate([PROMPT], cfg, schedule=BudgetSchedule.uniform(2, 0.5), progress=False)
  with pytest.raises(GenerationError, match="3 devices do not split the request's 2 batch rows "
                     "evenly .* try --devices 2"):
    pipe.generate([PROMPT], cfg, devices=3, progress=False)
  with pytest.raises(GenerationError, match="Wan models only"):
    pipe.generate([PROMPT], cfg, method=lambda *a, **k: None, progress=False)
  with pytest.raises(GenerationError, match="smaller"):
    pipe.latent_shape(dataclasses.replace(cfg, height=2))
  with pytest.raises(GenerationError, match="noise"):
    pipe.generate([PROMPT], cfg, noise=np.zeros((1, 4, 4, 8, 12), np.float32), progress=False)
  with pytest.raises(GenerationError, match="steps"):
    dataclasses.replace(cfg, steps=0)


def test_bad_folders(folder, tmp_path):
  with pytest.raises(ModelLoadError, match="does not exist"):
    po.load_opensora_pipeline(tmp_path / "missing")
  plain = tmp_path / "plain"
  plain.mkdir()
  with pytest.raises(ModelLoadError, match="not a converted OpenSora folder"):
    po.load_opensora_pipeline(plain)
  partial = tmp_path / "partial"
  shutil.copytree(folder, partial, ignore=shutil.ignore_patterns("vae"))
  with pytest.raises(ModelLoadError, match="lacks vae"):
    po.load_opensora_pipeline(partial)
  swapped = tmp_path / "swapped"
  shutil.copytree(folder, swapped)
  shutil.rmtree(swapped / "vae")
  shutil.copytree(folder / "text_encoder", swapped / "vae")
  with pytest.raises(ModelLoadError, match="cannot load .*not opensora_vae"):
    po.load_opensora_pipeline(swapped)


def test_convert_errors(tmp_path):
  out = tmp_path / "out"
  assert cli.main(["opensora_t2v", "--transformer", str(STDIT3_WEIGHTS), "--text-encoder",
                   str(tmp_path), "--vae", str(tmp_path), "--out", str(out)]) == 1
  assert not out.exists()


def test_convert_from_a_root_folder(tmp_path):
  """`--src ROOT` with the three releases side by side (and the tokenizer) gives the same layout."""
  root = tmp_path / "release"
  (root / "transformer").mkdir(parents=True)
  shutil.copy(STDIT3_WEIGHTS, root / "transformer" / "model.safetensors")
  write_hf_t5(root / "text_encoder", d_model=16)
  write_released_vae(root / "vae")
  shutil.copytree(T5_TOKENIZER, root / "tokenizer")
  out = tmp_path / "converted"
  assert cli.main(["opensora_t2v", "--src", str(root), "--out", str(out), "--vae-preset", "tiny",
                   "--text-length", str(TEXT_LENGTH)]) == 0
  assert po.is_opensora_folder(out)
  assert sorted(p.name for p in (out / "tokenizer").iterdir()) == [
      "tokenizer.json", "tokenizer_config.json"]
  # OpenSora runs T5 in fp32 and STDiT3 in bf16: the default conversion keeps those dtypes.
  assert checkpoint.read_metadata(out / "text_encoder")["dtypes"] == ["float32"]
  assert checkpoint.read_metadata(out / "transformer")["dtypes"] == ["bfloat16", "float32"]


def test_generate_cli_detects_the_opensora_folder(folder, tmp_path, capsys):
  from astraea_jax import generate  # pylint: disable=import-outside-toplevel

  out = tmp_path / "fox.mp4"
  assert generate.main(["--model", str(folder), "--prompt", PROMPT, "--size", "48x32", "--frames",
                        "17", "--steps", "2", "--budget", "0.5", "--no-gif", "--quiet",
                        "--out", str(out)]) == 0
  assert out.stat().st_size > 0
  assert "OpenSora-tiny" in capsys.readouterr().err


def test_generate_cli_runs_the_folders_searched_schedule(folder, tmp_path, capsys):
  """A converted folder's `schedules/*.json` stand in for `--budget` at their mean and length."""
  from astraea_jax import generate  # pylint: disable=import-outside-toplevel
  from astraea_jax.acceleration import BudgetSchedule  # pylint: disable=import-outside-toplevel

  own = tmp_path / "OpenSora-tiny"
  shutil.copytree(folder, own)
  (own / "schedules").mkdir()
  BudgetSchedule.from_thetas([1.0, 0.0], name="whole-0.5").save(own / "schedules" / "b.json")
  args = ["--model", str(own), "--prompt", PROMPT, "--size", "48x32", "--frames", "17", "--steps",
          "2", "--budget", "0.5", "--no-gif", "--quiet", "--out", str(tmp_path / "fox.mp4")]
  assert generate.main(args) == 0
  out, err = capsys.readouterr()
  assert "the model's searched schedule 'whole-0.5'" in err, err
  assert "budget 0.50 " in out and "computed 1/2 steps" in out, out
  # --uniform: the plain budget; --devices 2: the CFG halves on two devices.
  assert generate.main(args + ["--uniform", "--devices", "2"]) == 0
  assert "searched schedule" not in capsys.readouterr().err
  (own / "schedules" / "bad.json").write_text("{}")
  assert generate.main(args) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].startswith("error:") and "bad.json" in err[-1], err


def test_search_cli_names_the_models_it_runs(folder, tmp_path, capsys):
  from astraea_jax.search import cli  # pylint: disable=import-outside-toplevel

  out = tmp_path / "s.json"
  assert cli.main(["--model", str(folder), "--budget", "0.5", "--out", str(out)]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error:") and "search runs Wan2.1 models" in err[0]
  assert not out.exists()
