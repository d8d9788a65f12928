"""Peer methods beside ASTRAEA: TeaCache / EasyCache (step_cache), PAB (attention_broadcast), uniform
step skipping (step_skip), their composition with ASTRAEA budgets (theta = 0 is a skipped step), the
pipeline hook and `generate --method`. Tiny preset (fp32) for the loops, the default model for the
pipeline and the CLI."""

import dataclasses
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from astraea_jax import generate
from astraea_jax.acceleration.astraea import AstraeaStepModel, jit_astraea_step
from astraea_jax.acceleration.attention_broadcast import PABConfig, PABStepModel
from astraea_jax.acceleration.method_stats import StepRecord, summarize, summary_line
from astraea_jax.acceleration.schedule import BudgetSchedule
from astraea_jax.acceleration.step_cache import (EasyCacheConfig, EasyCacheStepModel,
                                                 TeaCacheConfig, TeaCacheStepModel)
from astraea_jax.acceleration.step_skip import StepSkipConfig, StepSkipStepModel
from astraea_jax.default_model import load_default_pipeline
from astraea_jax.models.wan import WanConfig, WanTransformer3DModel
from astraea_jax.pipeline import DenseStepModel, GenerationError, step_method
from astraea_jax.sampling.loop import denoise
from astraea_jax.sampling.schedulers import FlowEulerConfig, make_scheduler

STEPS, LAYERS = 8, 2
SCHEDULER = make_scheduler(FlowEulerConfig(shift=3.0))
STATE = SCHEDULER.set_timesteps(STEPS)  # timesteps 999 954 900 833 750 643 500 301


@pytest.fixture(scope="module")
def model():
  return WanTransformer3DModel(WanConfig.preset("tiny"), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def inputs():
  k1, k2 = jax.random.split(jax.random.key(0))
  latents = jax.random.normal(k1, (1, 4, 2, 4, 6), jnp.float32)  # N = 12 tokens
  context = jax.random.normal(k2, (2, 5, 16), jnp.float32)  # cond, uncond
  return latents, context


def _run(step_model, latents):
  out, _, _ = denoise(step_model, latents, SCHEDULER, STATE, guidance_scale=3.0, progress=False)
  return np.asarray(out)


@pytest.fixture(scope="module")
def dense(model, inputs):
  return _run(DenseStepModel(model, inputs[1]), inputs[0])


class Counting:
  """A step model that counts its calls (the steps the wrapper did not skip)."""

  def __init__(self, inner):
    self.inner, self.steps, self.num_layers = inner, [], LAYERS

  def __call__(self, latents, timestep, carry, step):
    self.steps.append(step)
    return self.inner(latents, timestep, carry, step)


def _methods(model, context, *, off):
  dense_inner = DenseStepModel(model, context)
  if off:
    return {"teacache": TeaCacheStepModel(model, context, TeaCacheConfig(0.0), num_steps=STEPS),
            "easycache": EasyCacheStepModel(dense_inner, EasyCacheConfig(0.0), num_steps=STEPS),
            "pab": PABStepModel(model, context, PABConfig(1, 1, 0.0, 1000.0)),
            "step-skip": StepSkipStepModel(dense_inner, StepSkipConfig(1))}
  return {"teacache": TeaCacheStepModel(model, context, TeaCacheConfig(1.0), num_steps=STEPS),
          "easycache": EasyCacheStepModel(dense_inner, EasyCacheConfig(1.0), num_steps=STEPS),
          "pab": PABStepModel(model, context, PABConfig(3, 6, 0.0, 1000.0)),
          "step-skip": StepSkipStepModel(dense_inner, StepSkipConfig(3))}


def test_off_settings_equal_dense(model, inputs, dense):
  latents, context = inputs
  for name, step_model in _methods(model, context, off=True).items():
    np.testing.assert_allclose(_run(step_model, latents), dense, atol=1e-5, err_msg=name)
    s = summarize(step_model.records, LAYERS)
    assert s["num_computed_steps"] == STEPS and s["blocks"] == STEPS * LAYERS, name
    assert s["self_attn"] == s["cross_attn"] == STEPS * LAYERS, name


def test_aggressive_settings_compute_less_and_stay_finite(model, inputs, dense):
  latents, context = inputs
  for name, step_model in _methods(model, context, off=False).items():
    out = _run(step_model, latents)
    assert np.all(np.isfinite(out)) and not np.allclose(out, dense, atol=1e-4), name
    s = summarize(step_model.records, LAYERS)
    assert s["steps"] == STEPS and s["computed_steps"][0] == 0, name
    if name == "pab":  # every block runs; its attentions are reused
      assert s["self_attn"] < STEPS * LAYERS and s["cross_attn"] < s["self_attn"]
    else:
      assert s["num_computed_steps"] < STEPS and s["blocks"] == LAYERS * s["num_computed_steps"]
    if name in ("teacache", "easycache"):
      assert STEPS - 1 in s["computed_steps"], "cutoff: the last step computes"


@pytest.mark.parametrize("interval, warmup, expected", [
    (3, 1, [0, 3, 6]), (4, 2, [0, 1, 4]), (2, 1, [0, 2, 4, 6]), (1, 1, list(range(STEPS)))])
def test_step_skip_computes_exactly_the_expected_steps(model, inputs, interval, warmup, expected):
  latents, context = inputs
  inner = Counting(DenseStepModel(model, context))
  config = StepSkipConfig(interval, warmup)
  step_model = StepSkipStepModel(inner, config)
  _run(step_model, latents)
  assert inner.steps == expected == config.computed_steps(STEPS)
  assert summarize(step_model.records, LAYERS)["computed_steps"] == expected


def test_pab_reuses_only_inside_its_window(model, inputs):
  latents, context = inputs
  # Timesteps 999 954 900 833 750 643 500 301: the window [640, 960] holds steps 1..5.
  step_model = PABStepModel(model, context, PABConfig(self_range=2, cross_range=3, t_start=640.0,
                                                      t_end=960.0))
  assert np.all(np.isfinite(_run(step_model, latents)))
  self_ran = [r.self_attn == LAYERS for r in step_model.records]
  cross_ran = [r.cross_attn == LAYERS for r in step_model.records]
  assert all(r.blocks == LAYERS for r in step_model.records)  # FFN always runs
  assert self_ran == [True, False, True, False, True, False, True, True]
  assert cross_ran == [True, False, False, True, False, False, True, True]


def test_adaptive_decisions_replay_exactly(model, inputs):
  latents, context = inputs
  tea = TeaCacheStepModel(model, context, TeaCacheConfig(0.6), num_steps=STEPS)
  out = _run(tea, latents)
  pattern = [r.computed for r in tea.records]
  assert 2 <= sum(pattern) < STEPS
  replay = TeaCacheStepModel(model, context, TeaCacheConfig(0.0), num_steps=STEPS,
                             decisions=pattern)
  np.testing.assert_allclose(_run(replay, latents), out, atol=1e-6)
  assert [r.computed for r in replay.records] == pattern
  # TeaCache's rule: skip while the accumulated indicator stays under the threshold.
  acc = 0.0
  for step, value in enumerate(tea.indicators):
    if 0 < step < STEPS - 1:
      acc += value
      assert pattern[step] == (acc >= 0.6)
      acc = 0.0 if pattern[step] else acc


def test_easycache_skipped_steps_do_not_call_the_inner_model(model, inputs):
  latents, context = inputs
  inner = Counting(DenseStepModel(model, context))
  step_model = EasyCacheStepModel(inner, EasyCacheConfig(1.0, warmup=2, cutoff=0))
  _run(step_model, latents)
  assert inner.steps == summarize(step_model.records, LAYERS)["computed_steps"]
  assert inner.steps[:2] == [0, 1] and len(inner.steps) < STEPS


# -- composition with ASTRAEA: theta = 0 is a skipped step ------------------------------------------


def test_theta_zero_steps_compute_no_blocks(model, inputs):
  latents, context = inputs
  schedule = BudgetSchedule((1.0, 0.0, 0.5, 0.0, 1.0, 0.0, 0.0, 0.5))
  step_model = AstraeaStepModel(model, schedule, context)
  assert np.all(np.isfinite(_run(step_model, latents)))
  assert [r.blocks for r in step_model.records] == [LAYERS, 0, LAYERS, 0, LAYERS, 0, 0, LAYERS]
  assert summary_line(step_model.records, LAYERS).startswith("computed 4/8 steps, 8/16 blocks")
  # The k = 0 program runs no block: no loop at all and a fraction of the dense FLOPs (the head).
  graphdef, state = nnx.split(model)
  step = jit_astraea_step(graphdef)
  batch = jnp.concatenate([latents, latents])
  t = jnp.full((2,), 500.0, jnp.float32)
  _, cache = step(state, batch, t, context, None, num_selected=12)

  def compiled(k):
    return step.lower(state, batch, t, context, cache, num_selected=k).compile()

  def flops(c):
    cost = c.cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]

  zero, full = compiled(0), compiled(12)
  assert "while" not in zero.as_text() and "while" in full.as_text()
  assert flops(zero) < 0.1 * flops(full)


def test_composition_equals_astraea_where_it_should(model, inputs):
  latents, context = inputs
  schedule = BudgetSchedule((1.0, 0.5, 0.0, 0.5, 1.0, 0.5, 0.0, 0.5))
  astraea = _run(AstraeaStepModel(model, schedule, context), latents)
  # Nothing skipped by the wrapper: exactly the ASTRAEA run.
  for config in (EasyCacheConfig(0.0), StepSkipConfig(1)):
    build = step_method(config, schedule=schedule)
    step_model = build(model, context, num_steps=STEPS)
    np.testing.assert_allclose(_run(step_model, latents), astraea, atol=1e-6)
    assert [r.tokens for r in step_model.records] == [1.0, .5, 0.0, .5, 1.0, .5, 0.0, .5]
  # Skipping whole steps on top of the budgets: the skipped steps never reach ASTRAEA.
  step_model = step_method(StepSkipConfig(2), schedule=schedule)(model, context, num_steps=STEPS)
  assert np.all(np.isfinite(_run(step_model, latents)))
  assert [r.step for r in step_model.inner.records] == [0, 2, 4, 6]
  assert summarize(step_model.records, LAYERS)["computed_steps"] == [0, 4]  # steps 2, 6: theta 0
  with pytest.raises(GenerationError, match="does not combine"):
    step_method(TeaCacheConfig(), schedule=schedule)
  with pytest.raises(GenerationError, match="schedule has 8 steps"):
    step_method(StepSkipConfig(2), schedule=schedule)(model, context, num_steps=4)


@pytest.mark.parametrize("make, message", [
    (lambda: TeaCacheConfig(rel_l1_thresh=-0.1), "rel_l1_thresh=-0.1"),
    (lambda: TeaCacheConfig(warmup=0), "warmup=0"),
    (lambda: TeaCacheConfig(indicator="x"), "indicator"),
    (lambda: TeaCacheConfig(coefficients=()), "coefficients"),
    (lambda: EasyCacheConfig(threshold=float("nan")), "threshold=nan"),
    (lambda: EasyCacheConfig(warmup=1), "warmup=1"),
    (lambda: PABConfig(self_range=0), "self_range=0"),
    (lambda: PABConfig(t_start=900.0, t_end=100.0), "t_start"),
    (lambda: StepSkipConfig(interval=0), "interval=0"),
    (lambda: StepSkipConfig(interval=2.0), "interval=2.0"),
])
def test_configs_reject_bad_values(make, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(")):
    make()


def test_records_summary_line():
  records = [StepRecord.full(0, 4), StepRecord.reused(1), StepRecord(2, 4, 0, 4, 1.0, "pab")]
  assert summary_line(records, 4) == "computed 2/3 steps, 8/12 blocks (self-attn 4, cross-attn 8)"


# -- the pipeline hook and the CLI --------------------------------------------------------------------


def test_pipeline_method_hook_records_steps():
  pipe = load_default_pipeline()
  cfg = dataclasses.replace(pipe.defaults, steps=3)
  result = pipe.generate(["a red circle moving right"], cfg, progress=False,
                         method=step_method(StepSkipConfig(2)))
  assert [r.computed for r in result.step_records] == [True, False, True]
  assert result.num_layers == pipe.transformer.config.num_layers
  assert np.all(np.isfinite(result.latents))
  with pytest.raises(GenerationError, match="one device"):
    pipe.generate(["a red circle"], cfg, progress=False, devices=2,
                  method=step_method(StepSkipConfig(2)))


def _cli(tmp_path, *args):
  return subprocess.run([sys.executable, "-m", "astraea_jax.generate", "--quiet", *args],
                        cwd=tmp_path, capture_output=True, text=True, timeout=600)


def test_cli_method_runs_and_reports_computed_steps(tmp_path):
  r = _cli(tmp_path, "--steps", "3", "--method", "teacache", "--cache-threshold", "0",
           "--out", "c.mp4", "--no-gif")
  assert r.returncode == 0, r.stderr
  assert "teacache (rel_l1_thresh=0.0" in r.stdout and "computed 3/3 steps, 24/24 blocks" in r.stdout


def test_cli_bad_value_is_one_line_and_exit_1(tmp_path):
  r = _cli(tmp_path, "--steps", "2", "--method", "pab", "--pab-self-range", "0")
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert r.returncode == 1 and len(lines) == 1, r.stderr
  assert lines[0] == "error: --pab-self-range: self_range=0 must be a positive integer"
  assert not list(tmp_path.glob("*.mp4"))


@pytest.mark.parametrize("args, message", [
    (["--method", "foo"], "--method 'foo' must be one of"),
    (["--method", "teacache", "--cache-threshold", "abc"], "--cache-threshold must be a number"),
    (["--method", "easycache", "--cache-threshold", "-1"], "--cache-threshold: threshold=-1.0"),
    (["--method", "easycache", "--cache-warmup", "1"], "--cache-warmup: warmup=1"),
    (["--method", "pab", "--pab-window", "900,100"], "--pab-window"),
    (["--method", "pab", "--pab-window", "100"], "--pab-window must look like"),
    (["--method", "pab", "--pab-cross-range", "1.5"], "--pab-cross-range must be an integer"),
    (["--method", "step-skip", "--skip-interval", "0"], "--skip-interval: interval=0"),
    (["--method", "teacache", "--skip-interval", "2"], "--skip-interval applies to --method"),
    (["--method", "teacache", "--teacache-coefficients", "x"], "--teacache-coefficients 'x'"),
    (["--method", "pab", "--budget", "0.5"], "does not combine"),
    (["--method", "step-skip", "--dense"], "--dense applies to --method astraea"),
    (["--cache-threshold", "0.1"], "applies to --method teacache / easycache only"),
])
def test_cli_bad_method_flags(args, message, capsys):
  assert generate.main(["--quiet", *args]) == 1
  lines = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_help_documents_method_flags():
  text = generate.build_parser().format_help()
  for flag in ("--method", "--cache-threshold", "--cache-warmup", "--teacache-coefficients",
               "--pab-self-range", "--pab-cross-range", "--pab-window", "--skip-interval"):
    assert flag in text
  for name in generate.METHODS:
    assert name in text
