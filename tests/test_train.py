"""Training machinery of the small model: text encoder, flow-matching convention, overfitting one
batch, exact resume from a checkpoint, export and load (astraea_jax.train and
astraea_jax.models.small_text_encoder)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from astraea_jax import train
from astraea_jax.data import clips
from astraea_jax.models import small_text_encoder as ste
from astraea_jax.models.prediction import X0_MIN_SIGMA
from astraea_jax.models.word_tokenizer import WordTokenizer
from astraea_jax.sampling.loop import denoise
from astraea_jax.sampling.schedulers import FlowEulerConfig, FlowUniPCConfig, make_scheduler

TINY = ste.SmallVideoConfig.preset("tiny")


def _tiny_config(**kw) -> train.TrainConfig:
  base = dict(preset="tiny", steps=4, batch_size=4, lr=1e-3, warmup_steps=1, devices=2,
              save_every=2)
  return train.TrainConfig(**(base | kw))


# ---------------------------------------------------------------------------------------------
# Text encoder and model


def test_text_encoder_zero_padding_and_masking():
  tok = WordTokenizer.for_captions()
  enc = ste.SmallTextEncoder(TINY.text, rngs=nnx.Rngs(0))
  ids, mask = tok(["a red circle moving right on a gray background", ""])
  out = np.asarray(enc(jnp.asarray(ids), jnp.asarray(mask)))  # [B, M, C]
  assert out.shape == (2, 24, TINY.text.dim)
  lengths = mask.sum(-1)
  for b, n in enumerate(lengths):
    assert (np.abs(out[b, :n]).sum(-1) > 0).all() and (out[b, n:] == 0).all()
  # Tokens past the mask are invisible to the real ones.
  ids2 = ids.copy()
  ids2[0, lengths[0]:] = 5
  out2 = np.asarray(enc(jnp.asarray(ids2), jnp.asarray(mask)))
  np.testing.assert_allclose(out2, out, atol=1e-6)
  with pytest.raises(ValueError, match="max_length"):
    enc(jnp.zeros((1, 30), jnp.int32), jnp.ones((1, 30), jnp.int32))
  with pytest.raises(TypeError, match="integer"):
    enc(jnp.zeros((1, 4), jnp.float32), jnp.ones((1, 4), jnp.int32))


def test_small_preset_fits_the_weight_budget():
  cfg = ste.SmallVideoConfig.preset("small")
  assert cfg.num_tokens == 17 * 8 * 8
  model = nnx.eval_shape(lambda: ste.SmallVideoModel(cfg, rngs=nnx.Rngs(0)))
  n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert 10e6 < n < 15e6  # <= ~30 MB in bf16
  assert cfg.text.vocab_size == WordTokenizer.for_captions().vocab_size
  with pytest.raises(ValueError, match="text_dim"):
    TINY.replace(text={"dim": 16})
  with pytest.raises(ValueError, match="unknown small model preset"):
    ste.SmallVideoConfig.preset("huge")
  assert ste.SmallVideoConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


# ---------------------------------------------------------------------------------------------
# The flow-matching convention: training target and the project's samplers agree


def test_sigma_sampling():
  s = np.asarray(train.sample_sigmas(jax.random.key(0), 4096, shift=3.0))
  assert (s > 0).all() and (s < 1).all()
  assert abs(np.median(s) - 0.75) < 0.02  # shift * 0.5 / (1 + (shift - 1) * 0.5)
  s1 = np.asarray(train.sample_sigmas(jax.random.key(0), 4096))
  assert abs(np.median(s1) - 0.5) < 0.02


def test_the_ideal_velocity_has_zero_loss_and_samples_back_the_clip():
  """The exact velocity for a known clip, (x_t - x0) / sigma with sigma = timestep / 1000, scores
  zero training loss, and the project's Euler and UniPC samplers turn noise into that clip with
  it."""
  cfg = _tiny_config(batch_size=2, text_dropout=0.0)
  tok = WordTokenizer.for_captions()
  batch = train.host_batch(cfg, 0, tok)
  x0 = jnp.moveaxis(clips.render(batch.clip, 5, 32, 32, xp=jnp), -1, 1)  # [B, 3, T, Y, X]

  def ideal(x_t, timestep, ids, mask):
    del ids, mask
    return (x_t - x0) / (timestep / 1000.0)[:, None, None, None, None]

  loss = train.flow_matching_loss(ideal, batch, jax.random.key(1), clip_shape=(5, 32, 32),
                                  shift=3.0)
  assert float(loss) < 1e-8
  wrong = train.flow_matching_loss(lambda *a: -ideal(*a), batch, jax.random.key(1),
                                   clip_shape=(5, 32, 32))
  assert float(wrong) > 1.0

  for sched_cfg in (FlowEulerConfig(shift=3.0), FlowUniPCConfig(shift=3.0)):
    scheduler = make_scheduler(sched_cfg)
    state = scheduler.set_timesteps(12)
    noise = jax.random.normal(jax.random.key(2), x0.shape, jnp.float32)
    out, _, _ = denoise(lambda x, t, c, i: (ideal(x, t, None, None), c), noise, scheduler, state,
                        guidance_scale=1.0, progress=False)
    # The schedulers feed int(1000 sigma), so the ideal velocity is off by under 1/(1000 sigma).
    np.testing.assert_allclose(np.asarray(out), np.asarray(x0), atol=0.02)


def test_x0_prediction_becomes_the_velocity():
  x0 = jax.random.normal(jax.random.key(0), (3, 3, 2, 8, 8), jnp.float32)
  noise = jax.random.normal(jax.random.key(1), x0.shape, jnp.float32)
  sigma = jnp.asarray([0.9, 0.3, 0.01], jnp.float32)
  s = sigma[:, None, None, None, None]
  x_t = (1 - s) * x0 + s * noise
  v = ste.output_to_velocity(x0, x_t, 1000.0 * sigma, "x0")
  np.testing.assert_allclose(np.asarray(v[:2]), np.asarray((noise - x0)[:2]), rtol=1e-4, atol=1e-4)
  # Below the floor the division uses X0_MIN_SIGMA, not sigma.
  np.testing.assert_allclose(np.asarray(v[2]), np.asarray((x_t - x0)[2] / X0_MIN_SIGMA),
                             rtol=1e-5, atol=1e-5)
  assert ste.output_to_velocity(x0, x_t, 1000.0 * sigma, "velocity") is x0
  with pytest.raises(ValueError, match="prediction"):
    ste.output_to_velocity(x0, x_t, sigma, "eps")
  assert ste.SmallVideoConfig.preset("small").prediction == "x0"
  assert train.TrainConfig(preset="tiny", prediction="x0").model_config.prediction == "x0"


# ---------------------------------------------------------------------------------------------
# Training


def test_host_batches_are_a_function_of_the_step():
  tok = WordTokenizer.for_captions()
  cfg = _tiny_config(batch_size=64, text_dropout=0.5)
  a, b, c = (train.host_batch(cfg, s, tok) for s in (3, 3, 4))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a.input_ids, c.input_ids)
  empty = (a.attention_mask.sum(-1) == 1).sum()  # dropped captions are the empty prompt
  assert 16 <= empty <= 48
  assert a.clip.center.shape == (64, 2, 5, 2)


def test_overfits_one_batch():
  cfg = train.TrainConfig(preset="tiny", steps=30, batch_size=2, lr=3e-3, warmup_steps=5,
                          devices=1, overfit=True, text_dropout=0.0, prediction="x0")
  import tempfile  # pylint: disable=import-outside-toplevel
  with tempfile.TemporaryDirectory() as out:
    trainer = train.Trainer(cfg, out)
    batch = trainer.batch(0)
    before = trainer.eval_loss(batch)
    trainer.run(progress=False, export=False)
    after = trainer.eval_loss(batch)
    trainer.close()
  assert trainer.step == 30
  assert after < 0.75 * before, (before, after)


def _tree_equal(a, b):
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_resume_continues_exactly(tmp_path, capsys):
  """Two steps, a checkpoint, a new process-level run with --resume: the same parameters, EMA and
  optimizer state as four uninterrupted steps (data parallel over 2 devices)."""
  cfg = _tiny_config()
  straight = train.Trainer(cfg, tmp_path / "a")
  assert straight.run(progress=False, log_every=1) == 4
  straight.close()

  first = train.Trainer(cfg, tmp_path / "b")
  assert first.run(stop_at=2, progress=False, log_every=1) == 2
  first.close()
  assert train.main(["--out", str(tmp_path / "b"), "--resume", "--no-progress",
                     "--compile-cache", "none"]) == 0
  resumed = train.Trainer(cfg, tmp_path / "b", resume=True)
  assert resumed.step == 4
  _tree_equal(resumed.state, straight.state)
  resumed.close()
  log_a = [json.loads(x) for x in (tmp_path / "a" / train.LOG_FILE).read_text().splitlines()]
  log_b = [json.loads(x) for x in (tmp_path / "b" / train.LOG_FILE).read_text().splitlines()]
  assert [r["step"] for r in log_b] == [1, 2, 3, 4] and log_a == log_b

  capsys.readouterr()
  assert train.main(["--out", str(tmp_path / "b"), "--compile-cache", "none"]) == 2
  assert "--resume" in capsys.readouterr().err
  assert train.main(["--out", str(tmp_path / "b"), "--resume", "--lr", "0.5",
                     "--compile-cache", "none"]) == 2
  assert "lr=0.5" in capsys.readouterr().err

  # The export holds the EMA parameters and the tokenizer, readable for inference.
  trainer = train.Trainer(cfg, tmp_path / "b", resume=True)
  path = trainer.export(tmp_path / "fp32", storage="float32")
  model, tok = ste.load_small_model(path)
  assert isinstance(tok, WordTokenizer) and model.config == TINY
  _tree_equal(nnx.to_pure_dict(nnx.state(model, nnx.Param)), trainer.state.ema)
  model_bf16, _ = ste.load_small_model(tmp_path / "b" / train.EXPORT_DIR)
  meta = json.loads((tmp_path / "b" / train.EXPORT_DIR / "astraea_metadata.json").read_text())
  assert meta["train_step"] == 4 and meta["family"] == "small_t2v"
  ctx = ste.encode_prompts(model, tok, ["a red circle moving right on a gray background"])
  ctx16 = ste.encode_prompts(model_bf16, tok, ["a red circle moving right on a gray background"])
  assert ctx.shape == (1, 24, TINY.text.dim)
  np.testing.assert_allclose(np.asarray(ctx16), np.asarray(ctx), atol=0.05)
  trainer.close()
  with pytest.raises(FileExistsError):
    ste.save_small_model(path, model, TINY, tok)


def test_warm_start_adds_zero_frame_embeddings(tmp_path):
  """`--init-from` a model without frame embeddings: every other parameter is the source's, the
  frame embedding starts at zero, so the run starts from the source's predictions; a source of
  another architecture is refused."""
  tok = WordTokenizer.for_captions()
  source_config = TINY.replace(wan={"num_frame_embeddings": 0})
  source = ste.SmallVideoModel(source_config, rngs=nnx.Rngs(3))
  path = ste.save_small_model(tmp_path / "src", source, source_config, tok, storage="float32")
  trainer = train.Trainer(_tiny_config(), tmp_path / "run", init_from=path)
  params = trainer.state.params
  np.testing.assert_array_equal(params["transformer"]["frame_embedding"], np.zeros((5, 64)))
  warm = nnx.merge(trainer.graphdef, params)
  ids, mask = tok(["a red circle moving left on a gray background"])
  videos = jax.random.normal(jax.random.key(0), (1, 3, 5, 32, 32))
  args = (videos, jnp.full((1,), 700.0), jnp.asarray(ids), jnp.asarray(mask))
  np.testing.assert_allclose(warm(*args), source(*args), rtol=1e-5, atol=1e-5)
  trainer.close()

  other_config = TINY.replace(wan={"ffn_dim": 96})
  other = ste.SmallVideoModel(other_config, rngs=nnx.Rngs(3))
  other_path = ste.save_small_model(tmp_path / "other", other, other_config, tok,
                                    storage="float32")
  with pytest.raises(ValueError, match="another configuration"):
    train.Trainer(_tiny_config(), tmp_path / "run2", init_from=other_path)


def test_bad_config(tmp_path):
  with pytest.raises(ValueError, match="multiple of the 2 devices"):
    train.Trainer(_tiny_config(batch_size=3), tmp_path / "never")
  assert not (tmp_path / "never").exists()
  with pytest.raises(ValueError, match="unknown small model preset"):
    train.TrainConfig(preset="nope")
  with pytest.raises(ValueError, match="text_dropout"):
    train.TrainConfig(text_dropout=1.5)
