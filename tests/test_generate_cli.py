"""`python -m astraea_jax.generate`: outputs, flags and one-line errors on bad input."""

import json
import os
import subprocess
import sys

import pytest

from astraea_jax import generate, video


def _run(tmp_path, *args):
  return subprocess.run([sys.executable, "-m", "astraea_jax.generate", "--quiet", *args],
                        cwd=tmp_path, capture_output=True, text=True, timeout=600)


def test_default_run_writes_playable_video_and_preview(tmp_path):
  r = _run(tmp_path, "--steps", "3", "--budget", "0.5", "--out", "clip.mp4", "--save-latents")
  assert r.returncode == 0, r.stderr
  assert "wrote clip.mp4" in r.stdout and "budget 0.5" in r.stdout
  assert "first step dense: 0.67 of N=" in r.stdout  # (1 + 0.5 + 0.5) / 3 of the tokens
  frames = video.read_video(tmp_path / "clip.mp4")
  assert frames.shape == (17, 64, 64, 3)
  assert (tmp_path / "clip.gif").stat().st_size > 0
  assert (tmp_path / "clip.npy").exists()


def test_budget_runs_the_schedule_the_model_ships(tmp_path):
  """The default model ships searched schedules at its 20 steps; --uniform asks for theta at
  every step instead (at 3 steps, above, there is no shipped schedule: uniform)."""
  r = _run(tmp_path, "--budget", "0.4", "--out", "s.mp4", "--no-gif")
  assert r.returncode == 0, r.stderr
  assert "searched schedule 'searched-0.4-whole'" in r.stderr
  assert "computed 8/20 steps" in r.stdout and "budget 0.40" in r.stdout
  r = _run(tmp_path, "--budget", "0.4", "--uniform", "--steps", "4", "--out", "u.mp4", "--no-gif")
  assert r.returncode == 0, r.stderr
  assert "searched schedule" not in r.stderr and "schedule uniform-0.4" in r.stderr


def test_prompt_file_batch_and_schedule(tmp_path):
  (tmp_path / "prompts.txt").write_text("a red circle moving right\n\na blue square moving up\n")
  (tmp_path / "s.json").write_text(json.dumps(
      {"format": "astraea-budget-schedule", "version": 1, "name": "t", "thetas": [1.0, 0.3, 0.6]}))
  r = _run(tmp_path, "--steps", "3", "--prompt-file", "prompts.txt", "--schedule", "s.json",
           "--out", "b.mp4", "--no-gif")
  assert r.returncode == 0, r.stderr
  assert sorted(p.name for p in tmp_path.glob("*.mp4")) == ["b_000.mp4", "b_001.mp4"]


def test_resample_modes_match_the_schedule():
  """The CLI lists the modes without importing jax; they must be `BudgetSchedule`'s."""
  from astraea_jax.acceleration import BudgetSchedule  # pylint: disable=import-outside-toplevel

  action = next(a for a in generate.build_parser()._actions if a.dest == "resample_schedule")
  assert tuple(action.choices) == BudgetSchedule.RESAMPLE_MODES


def test_schedule_of_another_step_count_needs_resample_flag(tmp_path):
  (tmp_path / "s.json").write_text(json.dumps(
      {"format": "astraea-budget-schedule", "version": 1, "name": "t", "thetas": [1.0, 0.0, 0.5]}))
  r = _run(tmp_path, "--steps", "4", "--schedule", "s.json", "--out", "a.mp4", "--no-gif")
  assert r.returncode == 1 and "--resample-schedule" in r.stderr.splitlines()[-1]
  assert not list(tmp_path.glob("*.mp4"))
  r = _run(tmp_path, "--steps", "4", "--schedule", "s.json", "--resample-schedule", "--out",
           "a.mp4", "--no-gif")
  assert r.returncode == 0, r.stderr
  assert "from 3 to 4 steps (repeat): mean budget 0.500 -> 0.500" in r.stderr
  assert (tmp_path / "a.mp4").stat().st_size > 0
  r = _run(tmp_path, "--steps", "4", "--schedule", "s.json", "--resample-schedule", "average",
           "--out", "c.mp4", "--no-gif")
  assert r.returncode == 0, r.stderr
  assert "from 3 to 4 steps (average): mean budget 0.500 -> 0.500" in r.stderr
  assert (tmp_path / "c.mp4").stat().st_size > 0


@pytest.mark.parametrize("args, message", [
    (["--size", "60x64"], "multiple of"),
    (["--frames", "0"], "frames=0"),
    (["--prompt-file", "missing.txt"], "cannot read prompt file"),
    (["--prompt", "   "], "--prompt is empty"),
    (["--out", "nodir/clip.mp4"], "does not exist"),
    (["--out", "clip.avi"], ".mp4"),
    (["--schedule", "bad.json"], "cannot read schedule"),
    (["--model", "no_such_model_dir"], "does not exist"),
    (["--uniform", "--dense"], "--uniform goes with --budget"),
])
def test_bad_input_one_line_and_no_output(tmp_path, args, message):
  (tmp_path / "bad.json").write_text("{not json")
  r = _run(tmp_path, "--steps", "2", *args)
  assert r.returncode != 0
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert lines and lines[-1].startswith("error:") and message in lines[-1], r.stderr
  assert not list(tmp_path.glob("*.mp4")) and not list(tmp_path.glob("*.gif"))


def test_missing_mp4_encoder_is_one_line_before_any_work(tmp_path):
  fake = tmp_path / "site" / "imageio_ffmpeg"
  fake.mkdir(parents=True)
  (fake / "__init__.py").write_text("raise ImportError('no module named imageio_ffmpeg')\n")
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      [str(tmp_path / "site"), *filter(None, [os.environ.get("PYTHONPATH")])])}
  r = subprocess.run([sys.executable, "-m", "astraea_jax.generate", "--quiet", "--steps", "2"],
                     cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert r.returncode == 1 and len(lines) == 1, r.stderr
  assert lines[0].startswith("error: writing .mp4 needs imageio-ffmpeg")
  assert not list(tmp_path.glob("*.mp4")) and not list(tmp_path.glob("*.gif"))


def test_budget_out_of_range_is_a_usage_error(tmp_path):
  r = _run(tmp_path, "--budget", "1.5")
  assert r.returncode == 2 and "budget must lie in [0, 1]" in r.stderr


def test_help_mentions_every_flag():
  text = generate.build_parser().format_help()
  for flag in ("--model", "--prompt", "--budget", "--uniform", "--schedule", "--dense",
               "--compare-dense", "--size", "--frames", "--steps", "--guidance", "--seed", "--out", "--save-latents"):
    assert flag in text


def test_compile_cache_stores_programs_that_a_second_run_loads(tmp_path):
  """`--compile-cache DIR`: the first run writes its compiled programs there, a second run with
  the same request reads them back and writes the same video."""
  env = dict(os.environ, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  args = ("--steps", "3", "--budget", "0.5", "--no-gif", "--compile-cache", "cache")
  for out in ("a.mp4", "b.mp4"):
    r = subprocess.run([sys.executable, "-m", "astraea_jax.generate", "--quiet", *args, "--out", out],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    if out == "a.mp4":
      stored = sorted(p.name for p in (tmp_path / "cache").iterdir())
      assert stored, "nothing was written to the compilation cache"
  assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == stored  # nothing new compiled
  assert (tmp_path / "a.mp4").read_bytes() == (tmp_path / "b.mp4").read_bytes()


def test_compile_cache_settings(tmp_path, monkeypatch):
  from astraea_jax import cli_support  # pylint: disable=import-outside-toplevel

  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  assert cli_support.enable_compile_cache("none") is None
  blocker = tmp_path / "file"
  blocker.write_text("")
  # A folder the user named that cannot be made is an error; the default one is skipped quietly.
  with pytest.raises(ValueError, match="--compile-cache .*cannot use it"):
    cli_support.enable_compile_cache(blocker / "xla")
  monkeypatch.delenv(cli_support.COMPILE_CACHE_ENV)
  monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
  assert cli_support.default_compile_cache() == str(blocker / "astraea-jax" / "xla")
  assert cli_support.enable_compile_cache(None) is None
  monkeypatch.setenv(cli_support.COMPILE_CACHE_ENV, "none")
  assert cli_support.enable_compile_cache(None) is None


def test_unusable_compile_cache_is_one_error_line(tmp_path):
  (tmp_path / "file").write_text("")
  r = _run(tmp_path, "--steps", "2", "--out", "v.mp4", "--compile-cache", "file/xla")
  assert r.returncode == 1 and r.stderr.strip().startswith("error: --compile-cache")
  assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "v.mp4").exists()
